//! `sluice load`: a load generator that publishes JSON events to the
//! service's exchange with publisher confirms, either as fast as the broker
//! confirms them or at a steady rate.
//!
//! Every message gets a unique `message_id` (`<id prefix>-<seq>`), the AMQP
//! `timestamp` (seconds) and a `timestamp_in_ms` header (milliseconds since the
//! epoch, read by the service for its end-to-end latency histogram), and a
//! routing key `sensor.<n>.reading` spread over a few topics. Confirms are
//! pipelined: up to `--window` publishes may be unconfirmed at once, and a
//! separate task awaits them in order.
//!
//! Rate pacing schedules message `i` at `start + i / rate` (absolute
//! deadlines, so timer jitter never accumulates) and, when the timer wakes up
//! late, sends every message that is due in one small burst. That keeps the
//! average rate exact from 1 msg/s to tens of thousands per second.
//!
//! The same code is used as a library by the benchmark (`bench/`): build a
//! [`LoadArgs`], connect a [`Loader`] and call [`Loader::run`].

use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{ArgGroup, Args};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sluice_actors::tls::{connect_broker, BrokerTls};
use tokio::sync::{mpsc, Semaphore};

/// Most messages sent in one burst when the pacer is behind schedule; the
/// rest follow after a yield, so confirms and progress keep flowing.
const MAX_BURST: u64 = 256;

/// Options of `sluice load`. The broker and the exchange come from the
/// service settings (`AMQP_URL`, `AMQP_PREFIX`).
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("bound").required(true).args(["count", "duration", "forever"])))]
pub struct LoadArgs {
    /// Publish this many messages (at `--rate` if given, else as fast as the
    /// broker confirms them).
    #[arg(long)]
    pub count: Option<u64>,

    /// Messages per second (any positive number, e.g. `0.5` or `20000`).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Publish for this long (`30` is seconds; `500ms`, `2m` also work).
    #[arg(long, value_parser = parse_seconds)]
    pub duration: Option<Duration>,

    /// Publish until interrupted (Ctrl-C), e.g. for a demo.
    #[arg(long)]
    pub forever: bool,

    /// Size of each JSON body in bytes (a `pad` field fills it up; bodies
    /// never go below the few fields every message carries).
    #[arg(long, default_value_t = 256)]
    pub size: usize,

    /// Prefix of the `message_id`s (`<prefix>-<seq>`); by default unique per run.
    #[arg(long)]
    pub id_prefix: Option<String>,

    /// Number of topics the routing keys are spread over (`sensor.<n>.reading`).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub topics: u32,

    /// Publishes that may await their confirm at once.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,

    /// Publish transient messages (delivery mode 1) instead of persistent ones.
    #[arg(long)]
    pub transient: bool,
}

impl LoadArgs {
    /// `count` messages as fast as confirms allow, other options at their defaults.
    pub fn count(count: u64) -> LoadArgs {
        LoadArgs {
            count: Some(count),
            rate: None,
            duration: None,
            forever: false,
            size: 256,
            id_prefix: None,
            topics: 8,
            window: 2000,
            transient: false,
        }
    }

    /// `rate` messages per second for `duration`, other options at their defaults.
    pub fn paced(rate: f64, duration: Duration) -> LoadArgs {
        LoadArgs {
            count: None,
            rate: Some(rate),
            duration: Some(duration),
            ..LoadArgs::count(0)
        }
    }

    /// The number of messages this run publishes, if bounded.
    fn total(&self) -> Option<u64> {
        if self.forever {
            return None;
        }
        match (self.count, self.rate, self.duration) {
            (Some(n), _, _) => Some(n),
            (None, Some(rate), Some(d)) => Some((rate * d.as_secs_f64()).round() as u64),
            _ => None,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.forever && self.rate.is_none() {
            bail!("--forever needs --rate (an unpaced endless load would only fill the queue)");
        }
        if self.size > 64 << 20 {
            bail!("--size {} is larger than 64 MiB", self.size);
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Messages published.
    pub sent: u64,
    /// Messages the broker confirmed (acked and routed).
    pub confirmed: u64,
    /// Messages the broker nacked.
    pub nacked: u64,
    /// Messages returned as unroutable (no queue bound to the routing key).
    pub returned: u64,
    /// From the first publish to the last confirm.
    pub elapsed: Duration,
    /// Largest delay of a publish behind its scheduled time (paced runs).
    pub max_behind: Duration,
}

impl LoadReport {
    /// Confirmed messages per second over the run.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.confirmed as f64 / secs
        } else {
            0.0
        }
    }
}

/// A connection to the broker with a channel in confirm mode.
#[derive(Debug)]
pub struct Loader {
    connection: Connection,
    channel: Channel,
}

impl Loader {
    /// Connect to `amqp_url` (`amqp://`; see [`Loader::connect_with`] for
    /// `amqps://` with a private CA) and put a channel in confirm mode.
    pub async fn connect(amqp_url: &str) -> anyhow::Result<Loader> {
        Loader::connect_with(amqp_url, &BrokerTls::default()).await
    }

    /// Connect to `amqp_url` with the TLS settings of the environment
    /// (`AMQP_TLS_CA`, `AMQP_TLS_CERT`, `AMQP_TLS_KEY`), as the benchmark does.
    pub async fn connect_env(amqp_url: &str) -> anyhow::Result<Loader> {
        let path = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from)
        };
        let tls = BrokerTls::from_files(
            path("AMQP_TLS_CA").as_deref(),
            path("AMQP_TLS_CERT").as_deref(),
            path("AMQP_TLS_KEY").as_deref(),
        )?;
        Loader::connect_with(amqp_url, &tls).await
    }

    /// Connect to `amqp_url` with the service's TLS settings (`AMQP_TLS_*`)
    /// and put a channel in confirm mode.
    pub async fn connect_with(amqp_url: &str, tls: &BrokerTls) -> anyhow::Result<Loader> {
        let properties = ConnectionProperties::default().with_connection_name("sluice-load".into());
        let connection = connect_broker(amqp_url, tls, properties).await?;
        let channel = connection
            .create_channel()
            .await
            .context("cannot open a channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("confirm.select")?;
        Ok(Loader {
            connection,
            channel,
        })
    }

    /// Publish to `exchange` as `args` say, until done or until `stop`
    /// completes (then the outstanding confirms are still awaited).
    pub async fn run(
        &self,
        exchange: &str,
        args: &LoadArgs,
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<LoadReport> {
        args.check()?;
        let total = args.total();
        let progress = progress_bar(total);
        let id_prefix = args.id_prefix.clone().unwrap_or_else(default_id_prefix);
        let body = Body::new(args.size);
        let window = Arc::new(Semaphore::new(args.window as usize));
        let counters = Arc::new(Counters::default());
        let (confirm_tx, confirm_rx) = mpsc::unbounded_channel();
        let confirmer = tokio::spawn(await_confirms(
            confirm_rx,
            Arc::clone(&counters),
            progress.clone(),
        ));
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let delivery_mode = if args.transient { 1 } else { 2 };
        let started = Instant::now();
        let deadline = args.duration.map(|d| started + d);
        let mut sent: u64 = 0;
        let mut max_behind = Duration::ZERO;
        let mut result = Ok(());
        tokio::pin!(stop);

        'publish: loop {
            if total.is_some_and(|n| sent >= n) {
                break;
            }
            // How many messages may go now: all that are due (paced), or one
            // more (unpaced; the confirm window is the brake).
            let burst = match args.rate {
                Some(rate) => {
                    let now = Instant::now();
                    let due = (now.duration_since(started).as_secs_f64() * rate).floor() as u64 + 1;
                    let due = total.map_or(due, |n| due.min(n));
                    if due <= sent {
                        let next = started + Duration::from_secs_f64(sent as f64 / rate);
                        tokio::select! {
                            () = tokio::time::sleep_until(next.into()) => continue 'publish,
                            () = &mut stop => break 'publish,
                        }
                    }
                    let scheduled = started + Duration::from_secs_f64(sent as f64 / rate);
                    max_behind = max_behind.max(now.saturating_duration_since(scheduled));
                    (due - sent).min(MAX_BURST)
                }
                None => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    1
                }
            };
            for _ in 0..burst {
                let permit = tokio::select! {
                    permit = Arc::clone(&window).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break 'publish,
                    },
                    () = &mut stop => break 'publish,
                };
                let now_ms = unix_millis();
                let mut headers = FieldTable::default();
                headers.insert(
                    "timestamp_in_ms".into(),
                    AMQPValue::LongLongInt(i64::try_from(now_ms).unwrap_or(i64::MAX)),
                );
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(delivery_mode)
                    .with_message_id(format!("{id_prefix}-{sent}").into())
                    .with_timestamp(now_ms / 1000)
                    .with_headers(headers);
                let topic = sent % u64::from(args.topics);
                let payload = body.render(sent, topic, now_ms);
                let published = self
                    .channel
                    .basic_publish(
                        exchange.into(),
                        format!("sensor.{topic}.reading").into(),
                        options,
                        &payload,
                        properties,
                    )
                    .await;
                match published {
                    Ok(confirm) => {
                        sent += 1;
                        // The confirmer only ends when this sender is dropped.
                        let _ = confirm_tx.send((confirm, permit));
                    }
                    Err(e) => {
                        result = Err(anyhow::Error::new(e).context(format!(
                            "publish to exchange {exchange:?} failed (does it exist? \
                             the service declares it at start)"
                        )));
                        break 'publish;
                    }
                }
                progress.set_message(format!("sent {sent}"));
            }
            if args.rate.is_some() {
                // Let the connection and the confirmer run between bursts.
                tokio::task::yield_now().await;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) && total.is_none() {
                break;
            }
        }

        drop(confirm_tx);
        let confirm_result = confirmer.await.context("confirm task panicked")?;
        let elapsed = started.elapsed();
        progress.finish_and_clear();
        result?;
        confirm_result.with_context(|| format!("awaiting confirms from exchange {exchange:?}"))?;
        Ok(LoadReport {
            sent,
            confirmed: counters.confirmed.load(Ordering::Relaxed),
            nacked: counters.nacked.load(Ordering::Relaxed),
            returned: counters.returned.load(Ordering::Relaxed),
            elapsed,
            max_behind,
        })
    }

    /// Close the channel and the connection (bounded: see
    /// [`sluice_actors::tls::close_broker`]). Every publish was confirmed
    /// before, so a close that does not complete loses nothing.
    pub async fn close(self) -> anyhow::Result<()> {
        let channel = self.channel.close(200, "bye".into());
        let _ = tokio::time::timeout(sluice_actors::tls::CLOSE_TIMEOUT, channel).await;
        sluice_actors::tls::close_broker(&self.connection, "bye").await;
        Ok(())
    }
}

/// `sluice load`: publish to exchange `exchange` at `amqp_url`, stop on
/// Ctrl-C or SIGTERM, and log a one-line summary. Fails if any message was
/// nacked or unroutable.
pub async fn run(
    amqp_url: &str,
    tls: &BrokerTls,
    exchange: &str,
    args: &LoadArgs,
) -> anyhow::Result<LoadReport> {
    args.check()?;
    let loader = Loader::connect_with(amqp_url, tls).await?;
    let report = loader.run(exchange, args, interrupted()).await?;
    loader.close().await?;
    log::info!(
        "published {} messages to {exchange:?} in {:.2?} ({:.0} msgs/s): {} confirmed, {} nacked, \
         {} unroutable, at most {:.1?} behind schedule",
        report.sent,
        report.elapsed,
        report.rate(),
        report.confirmed,
        report.nacked,
        report.returned,
        report.max_behind,
    );
    if report.nacked > 0 || report.returned > 0 {
        bail!(
            "{} of {} messages were not stored by the broker ({} nacked, {} unroutable)",
            report.nacked + report.returned,
            report.sent,
            report.nacked,
            report.returned
        );
    }
    Ok(report)
}

/// Completes on the first SIGINT or SIGTERM (never if they cannot be caught).
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::warn!("cannot install signal handlers; the load stops only when done");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    log::info!("interrupted: waiting for the outstanding confirms");
}

#[derive(Debug, Default)]
struct Counters {
    confirmed: AtomicU64,
    nacked: AtomicU64,
    returned: AtomicU64,
}

/// Await confirms in publish order, count them, and release each one's
/// window slot.
async fn await_confirms(
    mut rx: mpsc::UnboundedReceiver<(lapin::PublisherConfirm, tokio::sync::OwnedSemaphorePermit)>,
    counters: Arc<Counters>,
    progress: ProgressBar,
) -> anyhow::Result<()> {
    while let Some((confirm, permit)) = rx.recv().await {
        let confirmation = confirm
            .await
            .context("the channel closed before confirming")?;
        drop(permit);
        match confirmation {
            Confirmation::Ack(None) => {
                counters.confirmed.fetch_add(1, Ordering::Relaxed);
                progress.inc(1);
            }
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                counters.returned.fetch_add(1, Ordering::Relaxed);
            }
            Confirmation::Nack(None) => {
                counters.nacked.fetch_add(1, Ordering::Relaxed);
            }
            Confirmation::NotRequested => bail!("the channel is not in confirm mode"),
        }
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if total.is_some() {
        "{bar:40} {pos}/{len} confirmed ({per_sec}, eta {eta}) {msg}"
    } else {
        "{spinner} {pos} confirmed ({per_sec}, {elapsed}) {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The JSON body, padded to a fixed size.
#[derive(Debug)]
struct Body {
    size: usize,
}

impl Body {
    fn new(size: usize) -> Body {
        Body { size }
    }

    /// `{"seq":…,"sensor":…,"value":…,"ts_ms":…,"pad":"xxx…"}`, `size` bytes
    /// long when `size` leaves room for the fields.
    fn render(&self, seq: u64, sensor: u64, ts_ms: u64) -> Vec<u8> {
        // A deterministic, varying reading: no RNG needed.
        let value = ((seq.wrapping_mul(2_654_435_761) % 10_000) as f64) / 100.0;
        let head = format!(r#"{{"seq":{seq},"sensor":{sensor},"value":{value},"ts_ms":{ts_ms}"#);
        const PAD_FIELD: &str = r#","pad":""#;
        let mut out = Vec::with_capacity(self.size.max(head.len() + 2));
        out.extend_from_slice(head.as_bytes());
        let fixed = head.len() + PAD_FIELD.len() + 2; // `"` and `}`
        if self.size >= fixed {
            out.extend_from_slice(PAD_FIELD.as_bytes());
            out.resize(out.len() + (self.size - fixed), b'x');
            out.push(b'"');
        }
        out.push(b'}');
        out
    }
}

/// The body message `seq` of a run with `--size size` would carry (for
/// benchmarks that write the same rows without the broker).
pub fn sample_body(seq: u64, topics: u32, size: usize) -> Vec<u8> {
    Body::new(size).render(seq, seq % u64::from(topics.max(1)), unix_millis())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `load-<ms since epoch>-<pid>`: unique per run on one machine.
fn default_id_prefix() -> String {
    format!("load-{}-{}", unix_millis(), std::process::id())
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected a positive number of messages per second".into()),
    }
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| "expected a non-negative number of seconds".to_owned());
    }
    humantime::parse_duration(value).map_err(|e| format!("{e} (expected e.g. `30`, `500ms`, `2m`)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_of_the_requested_size() {
        let body = Body::new(300);
        for seq in [0, 7, 123_456_789] {
            let bytes = body.render(seq, seq % 8, 1_700_000_000_000);
            assert_eq!(bytes.len(), 300);
            let json: serde_json::Value = serde_json::from_slice(&bytes).expect("valid JSON");
            assert_eq!(json["seq"], seq);
        }
        // Too small to pad: the fields alone, still valid JSON.
        let small = Body::new(10).render(1, 1, 1);
        serde_json::from_slice::<serde_json::Value>(&small).expect("valid JSON");
        // Exactly the size of the fields plus an empty pad.
        let head = r#"{"seq":1,"sensor":1,"value":26.54,"ts_ms":1"#;
        let exact = Body::new(head.len() + r#","pad":""}"#.len()).render(1, 1, 1);
        let json: serde_json::Value = serde_json::from_slice(&exact).expect("valid JSON");
        assert_eq!(json["pad"], "");
    }

    #[test]
    fn totals_follow_the_bound() {
        assert_eq!(LoadArgs::count(5).total(), Some(5));
        assert_eq!(
            LoadArgs::paced(200.0, Duration::from_millis(1500)).total(),
            Some(300)
        );
        let forever = LoadArgs {
            forever: true,
            rate: Some(10.0),
            ..LoadArgs::count(0)
        };
        assert_eq!(forever.total(), None);
        let unpaced_forever = LoadArgs {
            forever: true,
            ..LoadArgs::count(0)
        };
        assert!(unpaced_forever.check().is_err());
    }

    #[test]
    fn durations_and_rates_parse() {
        assert_eq!(parse_seconds("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_seconds("soon").is_err());
        assert_eq!(parse_rate("20000"), Ok(20_000.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-3").is_err());
    }
}
