//! Configuration: every setting is a flag with an environment-variable
//! fallback and a default, parsed by clap. A bad value stops start-up with a
//! message naming the setting.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_actors::observer::OnFull as WsOnFull;
use sluice_actors::queue::{Batching, Dedupe, OnFull};

/// Moves events from a RabbitMQ queue into PostgreSQL with adaptive
/// batching, and streams a live copy to browsers over WebSockets.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub service: Config,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve,
    /// Publish test events to the service's exchange (`AMQP_PREFIX` at
    /// `AMQP_URL`) with publisher confirms: a load generator.
    Load(crate::load::LoadArgs),
}

/// The service's settings.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// AMQP URL of the broker.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// PostgreSQL URL of the database (it must exist; tables are migrated at start).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/sluice"
    )]
    pub database_url: String,

    /// Address the HTTP server (dashboard, /ws, /metrics, health) listens on.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Log filter, in env_logger syntax (e.g. `info,sluice_actors=debug`).
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,

    /// Prefix of the broker topology: exchange `P`, queues `P.ingest` and
    /// `P.dead`, dead-letter exchange `P.dlx`.
    #[arg(long, env = "AMQP_PREFIX", default_value = "sluice", value_parser = parse_prefix)]
    pub amqp_prefix: String,

    /// Deliveries the broker may have unacked at once (the prefetch window).
    /// It must cover rate × write latency: see the README.
    #[arg(long, env = "AMQP_PREFETCH", default_value_t = 2000, value_parser = clap::value_parser!(u16).range(1..))]
    pub amqp_prefetch: u16,

    /// Declare `P.ingest` as a quorum queue (only takes effect when the queue
    /// is first created).
    #[arg(long, env = "AMQP_QUORUM", default_value_t = false, action = clap::ArgAction::Set)]
    pub amqp_quorum: bool,

    /// Give the channel up (the broker requeues its deliveries) when
    /// deliveries are pending and none was settled for this long (e.g. `20m`).
    #[arg(long, env = "AMQP_STALL_TIMEOUT", default_value = "20m", value_parser = parse_duration)]
    pub amqp_stall_timeout: Duration,

    /// Bodies larger than this many bytes are dead-lettered (`too_large`).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_body_bytes: u64,

    /// Number of writer actors (each uses one database connection at a time).
    #[arg(long, env = "WRITERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub writers: u16,

    /// Largest batch written in one transaction.
    #[arg(long, env = "MAX_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_batch: u32,

    /// Pending events the Queue may hold (independent of AMQP_PREFETCH).
    #[arg(long, env = "QUEUE_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// What the Queue does when full.
    #[arg(long, env = "QUEUE_ON_FULL", value_enum, default_value_t = OnFullArg::Backpressure)]
    pub queue_on_full: OnFullArg,

    /// Merge pending duplicates: `off`, `message-id`, or `key:<JSON pointer>`
    /// (keep only the newest pending event per key, e.g. `key:/device`).
    #[arg(long, env = "QUEUE_DEDUPE", default_value = "off", value_parser = parse_dedupe)]
    pub queue_dedupe: Dedupe,

    /// How batches are formed: `adaptive` (production), or the `fixed` and
    /// `single` designs it is benchmarked against.
    #[arg(long, env = "BATCHING", value_enum, default_value_t = BatchingArg::Adaptive)]
    pub batching: BatchingArg,

    /// `fixed` batching: batch size.
    #[arg(long, env = "FIXED_BATCH", default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..))]
    pub fixed_batch: u32,

    /// `fixed` batching: flush interval (e.g. `2s`).
    #[arg(long, env = "FIXED_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub fixed_interval: Duration,

    /// Events buffered per WebSocket client; past it, the WS_ON_FULL policy drops.
    #[arg(long, env = "WS_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub ws_buffer: u32,

    /// What a WebSocket client's full buffer drops: `drop-oldest` (fresh data
    /// first, as dashboards want) or `drop-newest`.
    #[arg(long, env = "WS_ON_FULL", default_value = "drop-oldest", value_parser = parse_ws_on_full)]
    pub ws_on_full: WsOnFull,

    /// WebSocket sessions open at once at most; past it, `503` before the upgrade.
    #[arg(long, env = "WS_MAX_OBSERVERS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_max_observers: u32,

    /// Origins allowed to open `/ws`, comma-separated `scheme://host[:port]`,
    /// or `*`. Empty: the service's own origin and localhost only.
    #[arg(
        long,
        env = "WS_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub ws_allowed_origins: Vec<String>,

    /// When set, `/ws` requires it, as `Authorization: Bearer <token>` or `?token=`.
    #[arg(long, env = "AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// Largest frame accepted from a WebSocket client (larger: close 1009).
    #[arg(long, env = "WS_MAX_FRAME_BYTES", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..))]
    pub ws_max_frame_bytes: u32,

    /// A WebSocket client that reads nothing for this long while events wait
    /// is disconnected (close 4000).
    #[arg(long, env = "WS_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub ws_stall_timeout: Duration,

    /// Interval of WebSocket pings; a client silent for three of them is
    /// disconnected (close 4001).
    #[arg(long, env = "WS_HEARTBEAT", default_value = "10s", value_parser = parse_duration)]
    pub ws_heartbeat: Duration,

    /// On SIGTERM/SIGINT, how long to wait for pending events to be stored
    /// and acked before exiting anyway (unacked ones are redelivered).
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    // WebSocket freshness bound (issue 9).
    /// No WebSocket client is handed an event older than this, counted from
    /// when Sluice received it; a client that falls further behind skips
    /// ahead and is told `{"type":"lagged","missed":N}`.
    #[arg(long, env = "WS_MAX_LAG", default_value = "2s", value_parser = parse_max_lag)]
    pub ws_max_lag: Duration,

    /// Bytes written to a WebSocket client and not yet acknowledged (by the
    /// pong to a ping sent after them), at most; also the socket's send
    /// buffer. Larger suits fast clients on long links, smaller keeps slow
    /// links fresher.
    #[arg(long, env = "WS_WINDOW_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(4096..=64 * 1024 * 1024))]
    pub ws_window_bytes: u32,
}

/// `QUEUE_ON_FULL` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFullArg {
    /// Make the producer wait (nothing is dropped).
    Backpressure,
    /// Dead-letter the oldest pending event.
    DropOldest,
    /// Dead-letter the arriving event.
    RejectNewest,
}

impl From<OnFullArg> for OnFull {
    fn from(value: OnFullArg) -> Self {
        match value {
            OnFullArg::Backpressure => OnFull::Backpressure,
            OnFullArg::DropOldest => OnFull::DropOldest,
            OnFullArg::RejectNewest => OnFull::RejectNewest,
        }
    }
}

/// `BATCHING` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BatchingArg {
    /// Everything pending when a writer is free.
    Adaptive,
    /// FIXED_BATCH events or every FIXED_INTERVAL, whichever first.
    Fixed,
    /// One event per transaction.
    Single,
}

impl Config {
    /// The `/ws` endpoint's settings.
    pub fn ws(&self) -> crate::ws::WsConfig {
        crate::ws::WsConfig {
            max_observers: self.ws_max_observers as usize,
            allowed_origins: self
                .ws_allowed_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            auth_token: self.auth_token.clone().filter(|t| !t.is_empty()),
            max_frame_bytes: self.ws_max_frame_bytes as usize,
            observer: sluice_actors::observer::ObserverSettings {
                buffer: self.ws_buffer as usize,
                on_full: self.ws_on_full,
                heartbeat: self.ws_heartbeat,
                client_timeout: self.ws_heartbeat * 3,
                stall_timeout: self.ws_stall_timeout,
                max_lag: self.ws_max_lag,
                window_bytes: self.ws_window_bytes as usize,
                ..Default::default()
            },
        }
    }

    /// The dispatch strategy these settings describe.
    pub fn batching(&self) -> Batching {
        match self.batching {
            BatchingArg::Adaptive => Batching::Adaptive,
            BatchingArg::Fixed => Batching::Fixed {
                size: self.fixed_batch as usize,
                interval: self.fixed_interval,
            },
            BatchingArg::Single => Batching::Single,
        }
    }
}

fn parse_ws_on_full(value: &str) -> Result<WsOnFull, String> {
    value.parse()
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("{e} (expected e.g. `500ms`, `30s`, `20m`)"))
}

fn parse_max_lag(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        lag if lag < Duration::from_millis(100) => {
            Err("must be at least 100ms: a client needs time to read what it is sent".into())
        }
        lag => Ok(lag),
    }
}

fn parse_prefix(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 200
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err("expected 1 to 200 characters among letters, digits, `.`, `_` and `-`".into())
    }
}

fn parse_dedupe(value: &str) -> Result<Dedupe, String> {
    match value {
        "off" => Ok(Dedupe::Off),
        "message-id" => Ok(Dedupe::MessageId),
        _ => match value.strip_prefix("key:") {
            Some(pointer) if pointer.starts_with('/') => Ok(Dedupe::Key(pointer.to_owned())),
            _ => Err(
                "expected `off`, `message-id` or `key:<JSON pointer>` such as `key:/device`".into(),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_the_design() {
        let cli = parse(&[]).expect("defaults parse");
        let c = cli.service;
        assert_eq!(c.amqp_prefix, "sluice");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.queue_dedupe, Dedupe::Off);
        assert_eq!(c.batching(), Batching::Adaptive);
    }

    #[test]
    fn a_bad_value_names_the_setting() {
        let err = parse(&["--writers", "0"])
            .expect_err("zero writers is refused")
            .to_string();
        assert!(err.contains("--writers"), "{err}");
        let err = parse(&["--queue-dedupe", "maybe"])
            .expect_err("unknown mode")
            .to_string();
        assert!(
            err.contains("--queue-dedupe") && err.contains("message-id"),
            "{err}"
        );
        let err = parse(&["--shutdown-timeout", "soon"])
            .expect_err("not a duration")
            .to_string();
        assert!(err.contains("--shutdown-timeout"), "{err}");
        let err = parse(&["--amqp-prefix", "a b"])
            .expect_err("bad prefix")
            .to_string();
        assert!(err.contains("--amqp-prefix"), "{err}");
    }

    #[test]
    fn the_freshness_bound_parses_and_names_itself_when_wrong() {
        let c = parse(&[]).expect("defaults parse").service;
        assert_eq!(c.ws_max_lag, Duration::from_secs(2));
        assert_eq!(c.ws().observer.max_lag, Duration::from_secs(2));
        assert_eq!(c.ws().observer.window_bytes, 64 * 1024);
        let c = parse(&["--ws-max-lag", "500ms"]).expect("parses").service;
        assert_eq!(c.ws().observer.max_lag, Duration::from_millis(500));
        for bad in ["0s", "10ms", "soon"] {
            let err = parse(&["--ws-max-lag", bad])
                .expect_err("refused")
                .to_string();
            assert!(err.contains("--ws-max-lag"), "{err}");
        }
        let err = parse(&["--ws-window-bytes", "100"])
            .expect_err("too small")
            .to_string();
        assert!(err.contains("--ws-window-bytes"), "{err}");
    }

    #[test]
    fn dedupe_modes_parse() {
        assert_eq!(parse_dedupe("message-id"), Ok(Dedupe::MessageId));
        assert_eq!(
            parse_dedupe("key:/device/id"),
            Ok(Dedupe::Key("/device/id".into()))
        );
        assert!(parse_dedupe("key:device").is_err());
    }
}
