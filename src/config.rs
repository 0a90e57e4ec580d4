//! Configuration: every setting is a flag with an environment-variable
//! fallback and a default, parsed by clap. A bad value stops start-up with a
//! message naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_actors::observer::OnFull as WsOnFull;
use sluice_actors::queue::{Batching, Dedupe, OnFull};
use sluice_actors::saturation::Saturation;

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
    /// See the dead letters by reason, replay them (exactly once), or
    /// discard them, on the broker of `AMQP_URL` / `AMQP_PREFIX`.
    DeadLetters(crate::dead_letters::cli::DeadLettersArgs),
}

/// The service's settings.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// AMQP URL of the broker, `amqp://` or `amqps://` (TLS) [default: the
    /// local broker, 127.0.0.1:5672, as user guest]. Or AMQP_URL_FILE.
    // The default and the environment's value hold passwords: kept out of --help.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// PostgreSQL URL of the database (it must exist; tables are migrated at
    /// start); `sslmode` and `sslrootcert` work as in libpq
    /// [default: postgres://postgres@127.0.0.1:5432/sluice]. Or DATABASE_URL_FILE.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/sluice",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub database_url: String,

    /// At start, how long to keep trying a database that is not up yet
    /// (connection refused or cut, server starting up, no free connection
    /// slot) before exiting 1; `0s` tries once. A database that answers
    /// with a lasting refusal (no such database, bad password, certificate
    /// not trusted) stops start-up at once.
    #[arg(long, env = "DATABASE_START_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub database_start_timeout: Duration,

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

    // --- Production connections: TLS to the broker, secrets in files (issue 12).
    /// A file holding AMQP_URL (a container secret); setting both is an error.
    #[arg(long, env = "AMQP_URL_FILE")]
    pub amqp_url_file: Option<PathBuf>,

    /// A file holding DATABASE_URL; setting both is an error.
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// A file holding AUTH_TOKEN; setting both is an error.
    #[arg(long, env = "AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// `amqps://` only: a PEM file of the CA(s) that sign the broker's
    /// certificate, trusted on top of the system's root certificates.
    #[arg(long, env = "AMQP_TLS_CA")]
    pub amqp_tls_ca: Option<PathBuf>,

    /// `amqps://` only: a PEM client certificate (chain) to present, for
    /// mutual TLS (RabbitMQ's `EXTERNAL` mechanism); needs AMQP_TLS_KEY.
    #[arg(long, env = "AMQP_TLS_CERT")]
    pub amqp_tls_cert: Option<PathBuf>,

    /// `amqps://` only: the PEM private key of AMQP_TLS_CERT.
    #[arg(long, env = "AMQP_TLS_KEY")]
    pub amqp_tls_key: Option<PathBuf>,

    // Your own table (issue 13).
    /// A TOML file mapping each message to a row of an existing table (see
    /// "Your own table" in the README). Unset: rows go to Sluice's `events`.
    #[arg(long, env = "MAPPING")]
    pub mapping: Option<std::path::PathBuf>,

    // --- Several instances (issue 10): naming, the live feed, resume ---
    /// This instance's name in logs, in the `sluice_instance` label of every
    /// metric, in `/api/stats` and on the dashboard. Default: the host name.
    #[arg(long, env = "INSTANCE_NAME", value_parser = parse_instance_name)]
    pub instance_name: Option<String>,

    /// Where dashboards' events come from: `local` (this instance's own
    /// deliveries) or `stream` (every instance's, through the RabbitMQ
    /// stream `P.live`, in one order: set it on every instance).
    #[arg(long, env = "LIVE_FEED", value_enum, default_value_t = LiveFeedArg::Local)]
    pub live_feed: LiveFeedArg,

    /// Recent events kept in memory for clients that resume (`/ws?since=`)
    /// or open with the last few (`/ws?last=`); 0 keeps none.
    #[arg(long, env = "LIVE_HISTORY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub live_history: u32,

    /// `stream` feed: how long `P.live` keeps events (whole segments are
    /// removed once older; e.g. `1h`). Applies when the stream is created.
    #[arg(long, env = "LIVE_STREAM_MAX_AGE", default_value = "1h", value_parser = parse_duration)]
    pub live_stream_max_age: Duration,

    /// `stream` feed: most bytes `P.live` keeps. Applies when the stream is created.
    #[arg(long, env = "LIVE_STREAM_MAX_BYTES", default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(1 << 20..))]
    pub live_stream_max_bytes: u64,

    /// `stream` feed: batches published to `P.live` and not yet confirmed by
    /// the broker, at most; the rest wait their turn (bounded by the live
    /// backlog, in events).
    #[arg(long, env = "LIVE_STREAM_MAX_UNCONFIRMED", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub live_stream_max_unconfirmed: u32,

    /// Events copied to the live path and not yet taken by it (the
    /// Observable, or with the `stream` feed the publisher, until the broker
    /// confirms them), at most; past it, copies are dropped and every client
    /// is told. Bounds the live path's memory whatever the load.
    #[arg(long, env = "LIVE_BACKLOG", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub live_backlog: u32,

    /// `stream` feed: how long a delivery's ack may wait for its copy to be
    /// confirmed in `P.live` (what keeps dashboards exact through crashes);
    /// past it, it is acked anyway and counted
    /// (`sluice_live_feed_ack_waits_expired_total`).
    #[arg(long, env = "LIVE_FEED_MAX_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub live_feed_max_wait: Duration,

    /// `stream` feed: clients resuming from further back than `LIVE_HISTORY`
    /// that read `P.live` at once on this instance; others wait their turn.
    #[arg(long, env = "LIVE_MAX_REPLAYS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub live_max_replays: u32,

    /// While the datastore path is behind (three quarters of
    /// `AMQP_PREFETCH` unacked, until below a quarter), the live path yields
    /// the cores to it: events are handed to the WebSocket sessions at most
    /// once per this interval, and each client is sent at most one frame of
    /// events per interval (what its buffer cannot keep is dropped and told,
    /// as for any slow client). `0` never yields: every client is sent all
    /// it can read, at the drain's expense.
    #[arg(long, env = "LIVE_YIELD_INTERVAL", default_value = "250ms", value_parser = parse_yield_interval)]
    pub live_yield_interval: Duration,

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

/// `LIVE_FEED` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LiveFeedArg {
    /// This instance's own deliveries; positions are this instance's own.
    Local,
    /// Every instance's deliveries through the RabbitMQ stream `P.live`;
    /// positions are stream offsets, the same on every instance.
    Stream,
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

impl Cli {
    /// Parses the command line and the environment, then reads the secrets
    /// given as files (`AMQP_URL_FILE`, …). A bad value is a clap error
    /// naming the setting (print it with `exit()`); no value is echoed.
    pub fn load() -> Result<Cli, clap::Error> {
        Cli::load_from(std::env::args_os())
    }

    /// [`Cli::load`] from the given arguments (tests).
    pub fn load_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().try_get_matches_from(args)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        cli.service.read_secret_files(&matches)?;
        Ok(cli)
    }
}

impl Config {
    /// Replaces AMQP_URL, DATABASE_URL and AUTH_TOKEN by the contents of
    /// their `*_FILE` settings where those are set.
    fn read_secret_files(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        let given = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            )
        };
        if let Some(path) = &self.amqp_url_file {
            self.amqp_url = read_secret("AMQP_URL", path, given("amqp_url"))?;
        }
        if let Some(path) = &self.database_url_file {
            self.database_url = read_secret("DATABASE_URL", path, given("database_url"))?;
        }
        if let Some(path) = &self.auth_token_file {
            self.auth_token = Some(read_secret("AUTH_TOKEN", path, given("auth_token"))?);
        }
        Ok(())
    }

    /// The broker's TLS settings (the files are read and checked here).
    /// Given with a plain `amqp://` URL they would do nothing: that is said.
    pub fn broker_tls(
        &self,
    ) -> Result<sluice_actors::tls::BrokerTls, sluice_actors::tls::TlsFileError> {
        let any = self.amqp_tls_ca.is_some()
            || self.amqp_tls_cert.is_some()
            || self.amqp_tls_key.is_some();
        if any
            && !self
                .amqp_url
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("amqps://")
        {
            log::warn!(
                "AMQP_TLS_CA/AMQP_TLS_CERT/AMQP_TLS_KEY are set but AMQP_URL is not amqps://: \
                 the broker connection is plain text and they are not used"
            );
        }
        sluice_actors::tls::BrokerTls::from_files(
            self.amqp_tls_ca.as_deref(),
            self.amqp_tls_cert.as_deref(),
            self.amqp_tls_key.as_deref(),
        )
    }

    /// The `/ws` endpoint's settings; its sessions yield to the datastore
    /// path while `saturation` says it is behind.
    pub fn ws(&self, saturation: &Saturation) -> crate::ws::WsConfig {
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
                yield_interval: self.live_yield_interval,
                saturation: saturation.clone(),
                ..Default::default()
            },
        }
    }

    /// `INSTANCE_NAME`, or the host name when it is not set (`sluice` if
    /// even that cannot be read).
    pub fn instance(&self) -> String {
        self.instance_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|name| name.into_string().ok())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "sluice".to_owned())
        })
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

/// The secret in `path` for setting `name` (`NAME_FILE`): the whole file,
/// less a trailing line break. `also_given`: `NAME` was set too.
fn read_secret(
    name: &str,
    path: &std::path::Path,
    also_given: bool,
) -> Result<String, clap::Error> {
    use clap::error::ErrorKind;
    if also_given {
        return Err(clap::Error::raw(
            ErrorKind::ArgumentConflict,
            format!("both {name} and {name}_FILE are set: set only one of them\n"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        clap::Error::raw(
            ErrorKind::Io,
            format!("{name}_FILE={}: cannot read it: {e}\n", path.display()),
        )
    })?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.trim().is_empty() {
        return Err(clap::Error::raw(
            ErrorKind::InvalidValue,
            format!("{name}_FILE={}: the file is empty\n", path.display()),
        ));
    }
    Ok(value.to_owned())
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

fn parse_yield_interval(value: &str) -> Result<Duration, String> {
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    match parse_duration(value)? {
        interval if interval.is_zero() => Ok(interval),
        interval if interval < Duration::from_millis(10) || interval > Duration::from_secs(1) => {
            Err("must be 0 (never yield) or from 10ms to 1s: longer leaves a client's events stale before they are sent".into())
        }
        interval => Ok(interval),
    }
}

fn parse_prefix(value: &str) -> Result<String, String> {
    parse_name(value, 200)
}

fn parse_instance_name(value: &str) -> Result<String, String> {
    parse_name(value, 64)
}

/// A name of 1 to `max` characters among letters, digits, `.`, `_` and `-`
/// (safe in AMQP names, metric labels and log lines alike).
fn parse_name(value: &str, max: usize) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "expected 1 to {max} characters among letters, digits, `.`, `_` and `-`"
        ))
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

    impl Cli {
        fn command_for_help() -> String {
            use clap::CommandFactory;
            Cli::command().render_long_help().to_string()
        }
    }

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
        assert_eq!(c.database_start_timeout, Duration::from_secs(60));
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
    fn secrets_come_from_files_and_never_from_both() {
        let dir = std::env::temp_dir().join(format!("sluice-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = dir.join("amqp_url");
        std::fs::write(&url, "amqps://app:s3cret@mq:5671/%2f\n").expect("write");
        let token = dir.join("token");
        std::fs::write(&token, "tok3n").expect("write");
        let url_arg = url.display().to_string();
        let token_arg = token.display().to_string();

        let cli = Cli::load_from([
            "sluice",
            "--amqp-url-file",
            &url_arg,
            "--auth-token-file",
            &token_arg,
        ])
        .expect("files are read");
        assert_eq!(cli.service.amqp_url, "amqps://app:s3cret@mq:5671/%2f");
        assert_eq!(cli.service.auth_token.as_deref(), Some("tok3n"));

        let err = Cli::load_from([
            "sluice",
            "--amqp-url-file",
            &url_arg,
            "--amqp-url",
            "amqp://x:y@h",
        ])
        .expect_err("both set")
        .to_string();
        assert!(err.contains("AMQP_URL and AMQP_URL_FILE"), "{err}");
        assert!(!err.contains("x:y"), "the value is not echoed: {err}");

        let err = Cli::load_from(["sluice", "--database-url-file", "/nonexistent/db"])
            .expect_err("missing file")
            .to_string();
        assert!(err.contains("DATABASE_URL_FILE=/nonexistent/db"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn help_shows_no_password() {
        let help = Cli::command_for_help();
        assert!(!help.contains("guest:guest"), "{help}");
        assert!(help.contains("AMQP_TLS_CA"), "{help}");
    }

    #[test]
    fn the_instance_name_defaults_to_the_host_name_and_is_checked() {
        let c = parse(&[]).expect("defaults parse").service;
        let host = nix::unistd::gethostname().expect("host name");
        assert_eq!(c.instance(), host.to_string_lossy());
        let c = parse(&["--instance-name", "web-2"])
            .expect("parses")
            .service;
        assert_eq!(c.instance(), "web-2");
        let err = parse(&["--instance-name", "a b"])
            .expect_err("spaces are refused")
            .to_string();
        assert!(err.contains("--instance-name"), "{err}");
    }

    #[test]
    fn the_freshness_bound_parses_and_names_itself_when_wrong() {
        let c = parse(&[]).expect("defaults parse").service;
        assert_eq!(c.ws_max_lag, Duration::from_secs(2));
        assert_eq!(
            c.ws(&Saturation::never()).observer.max_lag,
            Duration::from_secs(2)
        );
        assert_eq!(c.ws(&Saturation::never()).observer.window_bytes, 64 * 1024);
        let c = parse(&["--ws-max-lag", "500ms"]).expect("parses").service;
        assert_eq!(
            c.ws(&Saturation::never()).observer.max_lag,
            Duration::from_millis(500)
        );
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
    fn the_yield_interval_parses_turns_off_and_names_itself_when_wrong() {
        let c = parse(&[]).expect("defaults parse").service;
        assert_eq!(c.live_yield_interval, Duration::from_millis(250));
        let saturation = Saturation::never();
        assert_eq!(
            c.ws(&saturation).observer.yield_interval,
            Duration::from_millis(250)
        );
        for off in ["0", "0s", "0ms"] {
            let c = parse(&["--live-yield-interval", off])
                .expect("parses")
                .service;
            assert_eq!(c.live_yield_interval, Duration::ZERO, "{off}");
        }
        for bad in ["5ms", "2s", "soon"] {
            let err = parse(&["--live-yield-interval", bad])
                .expect_err("refused")
                .to_string();
            assert!(err.contains("--live-yield-interval"), "{bad}: {err}");
        }
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
