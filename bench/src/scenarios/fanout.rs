//! Scenario 5, fan-out: many WebSocket clients on `/ws`, some of which never
//! read. At a steady rate the database sustains: database throughput and
//! latency with the clients against without, events delivered to the reading
//! clients against the `missed` they were told of, and the service's peak
//! memory. Beside them in that phase, two clients slower than the stream: one
//! reading a frame every 50 ms, one behind a 50 KB/s link (testkit's
//! throttling proxy); their worst event age shows the freshness bound
//! (`WS_MAX_LAG`), and received + missed shows exact accounting. Then the
//! same comparison for a saturated service (a backlog), in rounds that
//! alternate which goes first: the storing rate, and where the CPU goes per
//! event stored (the service, the benchmark process whose clients share the
//! same cores, the broker), with what the clients got (frames, pings, bytes).
//!
//! `BENCH_FANOUT_DRAIN_ONLY=1` runs the saturated comparison alone.
//! `BENCH_LIVE_NICE=N` renices the service's live threads (the HTTP workers,
//! where the Observers and their sockets run, and the Observable's thread:
//! all named `actix-rt|system…`) to `N` in every drain, an experiment: does
//! giving the live path a lower CPU priority than the datastore path keep
//! the drain when both want the two cores?

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::rig::{cpu_seconds, thread_busy, thread_cpu, Rig, Strategy};
use crate::scenarios::drain::{await_rows, prepare_backlog};
use crate::scenarios::livefeed::broker_cpu;
use crate::scenarios::{fmt_opt, step};
use crate::{say, Bench, FanoutResult, SaturatedDrain, SlowClient};

/// Run the fan-out.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let scale = bench.scale.clone();
    let (total, stalled) = (scale.fanout_clients, scale.fanout_stalled);
    let rate = scale.fanout_rate;
    let warmup = scale.fanout_window / 5;
    let window = scale.fanout_window - warmup;
    say(format!(
        "fanout: {total} WebSocket clients ({stalled} never read) at {rate:.0} msgs/s"
    ));
    let mut rig = Rig::new(&bench.bin, Strategy::Adaptive, false, &[]).await?;
    let n = scale.fanout_drain_messages;
    let drain_only = std::env::var_os("BENCH_FANOUT_DRAIN_ONLY").is_some();
    let outcome = async {
        rig.start().await?;
        let mut result = FanoutResult {
            clients: total,
            stalled,
            offered: rate,
            ..FanoutResult::default()
        };
        if drain_only {
            say("  BENCH_FANOUT_DRAIN_ONLY: the saturated comparison alone");
        } else {
            steady(&rig, &mut result, window, warmup).await?;
        }
        if n > 0 {
            let rounds = scale.fanout_drain_rounds.max(1);
            for round in 1..=rounds {
                // Odd rounds drain without clients first, even rounds with.
                let mut pair = [None, None];
                let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
                for which in order {
                    let clients = if which == 0 { 0 } else { total };
                    say(format!(
                        "  round {round}/{rounds}: backlog of {n}, {}",
                        if clients == 0 {
                            "without clients".to_owned()
                        } else {
                            format!("with {clients} clients ({stalled} never read)")
                        }
                    ));
                    pair[which] = Some(saturated(&mut rig, n, clients, stalled).await?);
                }
                let [Some(without), Some(with)] = pair else {
                    unreachable!("both drains of a round ran");
                };
                say(format!(
                    "  round {round}: with / without {:.2}; service CPU per event {} / {} µs",
                    with.rate / without.rate.max(1e-9),
                    fmt_opt(with.service_cpu_us, 1),
                    fmt_opt(without.service_cpu_us, 1),
                ));
                result.drain_rounds.push((without, with));
            }
            if let Some((without, with)) = median_round(&result.drain_rounds) {
                result.drain_without = Some(without.rate);
                result.drain_with = Some(with.rate);
            }
            result.peak_rss_mb = match (result.peak_rss_mb, rig.peak_rss_mb()) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        Ok::<_, anyhow::Error>(result)
    }
    .await;
    rig.finish().await;
    bench.results.fanout = Some(outcome?);
    Ok(())
}

/// The round whose with / without ratio is the median (the lower middle one
/// for an even count).
pub fn median_round(
    rounds: &[(SaturatedDrain, SaturatedDrain)],
) -> Option<&(SaturatedDrain, SaturatedDrain)> {
    let ratio =
        |(without, with): &&(SaturatedDrain, SaturatedDrain)| with.rate / without.rate.max(1e-9);
    let mut sorted: Vec<_> = rounds.iter().collect();
    sorted.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

/// The steady phase: the offered rate without clients, then with them and
/// the two slow clients beside them.
async fn steady(
    rig: &Rig,
    result: &mut FanoutResult,
    window: Duration,
    warmup: Duration,
) -> anyhow::Result<()> {
    let (total, stalled, rate) = (result.clients, result.stalled, result.offered);
    say("  without clients:");
    let (without, _) = step(rig, Strategy::Adaptive, 0.0, rate, warmup, window, "fanout").await?;

    let addr = rig.service()?.http_addr();
    let clients = Clients::connect(addr, total, stalled).await?;
    let link = sluice_testkit::Proxy::start(addr).context("starting the throttling proxy")?;
    link.set_rate(SLOW_LINK_BYTES_PER_SECOND);
    let slow_reader = Slow::connect(addr, SLOW_READER_PAUSE).await?;
    let slow_link = Slow::connect(link.addr(), Duration::ZERO).await?;
    say(format!(
        "  with {} clients, plus a 50 ms reader and a 50 KB/s link:",
        clients.count()
    ));
    let (with, detail) = step(rig, Strategy::Adaptive, 0.0, rate, warmup, window, "fanout").await?;
    let published = detail.report.sent;
    clients.settle(published, Duration::from_secs(10)).await;
    let totals = clients.totals();
    let slow_reader = slow_reader.settle(published).await;
    let slow_link = slow_link.settle(published).await;
    drop(link);
    for (who, slow) in [("50 ms reader", &slow_reader), ("50 KB/s link", &slow_link)] {
        say(format!(
            "  {who}: received {} + missed {} of {published}, worst age {} ms",
            slow.received, slow.missed, slow.worst_age_ms
        ));
    }
    let peak_rss_mb = rig.peak_rss_mb();
    say(format!(
        "  reading clients got {}..{} of {published} events, told of {} missed; \
         {} frames ({:.1} events, {:.0} bytes each), {} pings; peak RSS {} MB",
        totals.min,
        totals.max,
        totals.missed,
        totals.frames,
        totals.delivered as f64 / totals.frames.max(1) as f64,
        totals.bytes as f64 / totals.frames.max(1) as f64,
        totals.pings,
        fmt_opt(peak_rss_mb, 0)
    ));
    drop(clients);
    *result = FanoutResult {
        stored_without: without.stored,
        stored_with: with.stored,
        p50_without_ms: without.latency.p50_ms,
        p50_with_ms: with.latency.p50_ms,
        published,
        delivered_min: totals.min,
        delivered_max: totals.max,
        missed_fast: totals.missed,
        peak_rss_mb,
        slow_reader,
        slow_link,
        ..result.clone()
    };
    Ok(())
}

/// A saturated service draining `n` messages with `total` clients connected:
/// stop the service, pre-fill `n` messages, start it, connect the clients at
/// once, and measure from then until the backlog is gone: the storing rate,
/// the CPU each process spent per event stored, the service's busiest
/// threads, and what the reading clients got.
async fn saturated(
    rig: &mut Rig,
    n: u64,
    total: usize,
    stalled: usize,
) -> anyhow::Result<SaturatedDrain> {
    let base = u64::try_from(rig.db.count_rows("events").await).unwrap_or(0);
    prepare_backlog(rig, n).await?;
    rig.start_listening().await?;
    let clients = if total > 0 {
        Some(Clients::connect(rig.service()?.http_addr(), total, stalled).await?)
    } else {
        // The same pause as connecting would take, so both start alike.
        tokio::time::sleep(Duration::from_millis(300)).await;
        None
    };
    let pid = rig.service()?.pid();
    if let Some(nice) = std::env::var_os("BENCH_LIVE_NICE") {
        renice_live_threads(pid, &nice.to_string_lossy());
    }
    let bench_pid = std::process::id();
    let before = (
        clients.as_ref().map(Clients::totals).unwrap_or_default(),
        cpu_seconds(pid),
        cpu_seconds(bench_pid),
        broker_cpu(),
        thread_cpu(pid),
    );
    let mark_rows = u64::try_from(rig.db.count_rows("events").await).unwrap_or(0);
    let mark = Instant::now();
    let done = await_rows(rig, base + n, mark + Duration::from_secs(600)).await?;
    let after = (
        clients.as_ref().map(Clients::totals).unwrap_or_default(),
        cpu_seconds(pid),
        cpu_seconds(bench_pid),
        broker_cpu(),
        thread_cpu(pid),
    );
    let seconds = done.duration_since(mark).as_secs_f64().max(1e-3);
    let events = (base + n).saturating_sub(mark_rows);
    let per_event = |a: Option<f64>, b: Option<f64>| {
        a.zip(b)
            .map(|(a, b)| (b - a).max(0.0) * 1e6 / events.max(1) as f64)
    };
    let got = after.0.since(&before.0);
    let result = SaturatedDrain {
        clients: total,
        reading: total.saturating_sub(stalled.min(total)),
        events,
        rate: events as f64 / seconds,
        seconds,
        service_cpu_us: per_event(before.1, after.1),
        bench_cpu_us: per_event(before.2, after.2),
        broker_cpu_us: per_event(
            before.3.map(|d| d.as_secs_f64()),
            after.3.map(|d| d.as_secs_f64()),
        ),
        threads: thread_busy(&before.4, &after.4, done.duration_since(mark)),
        frames: got.frames,
        lagged_frames: got.lagged_frames,
        pings: got.pings,
        bytes: got.bytes,
        delivered: got.delivered,
        missed: got.missed,
    };
    let share = |us: Option<f64>| {
        us.map_or("-".to_owned(), |us| {
            format!("{:.0}%", us * result.rate / 1e6 / 2.0 * 100.0)
        })
    };
    say(format!(
        "    stored {events} at {:.0} msgs/s ({} before the mark); CPU per event: service {} µs \
         ({} of 2 cores), benchmark process {} µs ({}), broker {} µs ({})",
        result.rate,
        mark_rows.saturating_sub(base),
        fmt_opt(result.service_cpu_us, 1),
        share(result.service_cpu_us),
        fmt_opt(result.bench_cpu_us, 1),
        share(result.bench_cpu_us),
        fmt_opt(result.broker_cpu_us, 1),
        share(result.broker_cpu_us),
    ));
    say(format!("    service threads busy: {}", result.threads));
    if let Some(clients) = &clients {
        say(format!(
            "    reading clients: {} frames of events ({:.1} events, {:.0} bytes each), \
             {} lagged frames, {} pings ({:.2} per frame), {} events, {} told missed",
            got.frames,
            got.delivered as f64 / got.frames.max(1) as f64,
            got.bytes as f64 / (got.frames + got.lagged_frames).max(1) as f64,
            got.lagged_frames,
            got.pings,
            got.pings as f64 / (got.frames + got.lagged_frames).max(1) as f64,
            got.delivered,
            got.missed,
        ));
        clients.settle(u64::MAX, Duration::from_secs(2)).await;
    }
    if events < n / 2 {
        say("    (most of the backlog was stored before the measurement began: use a larger one)");
    }
    Ok(result)
}

/// Renices the service's live threads (see the module docs) with
/// `renice(1)`; says how many.
fn renice_live_threads(pid: u32, nice: &str) {
    let live: Vec<String> = thread_cpu(pid)
        .into_iter()
        .filter(|(_, name, _)| name.starts_with("actix-rt|system"))
        .map(|(tid, _, _)| tid.to_string())
        .collect();
    let status = std::process::Command::new("renice")
        .args(["-n", nice, "-p"])
        .args(&live)
        .stdout(std::process::Stdio::null())
        .status();
    say(format!(
        "    BENCH_LIVE_NICE: {} live threads reniced to {nice} ({status:?})",
        live.len()
    ));
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one reading client has seen.
#[derive(Debug, Default)]
struct Seen {
    events: AtomicU64,
    missed: AtomicU64,
    frames: AtomicU64,
    lagged_frames: AtomicU64,
    pings: AtomicU64,
    bytes: AtomicU64,
}

/// What the reading clients have seen, all added up (`min`, `max`: the
/// fewest and most events one client got).
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    min: u64,
    max: u64,
    delivered: u64,
    missed: u64,
    frames: u64,
    lagged_frames: u64,
    pings: u64,
    bytes: u64,
}

impl Totals {
    /// What was seen since `before` (`min` and `max` are left as now).
    fn since(&self, before: &Totals) -> Totals {
        Totals {
            delivered: self.delivered - before.delivered,
            missed: self.missed - before.missed,
            frames: self.frames - before.frames,
            lagged_frames: self.lagged_frames - before.lagged_frames,
            pings: self.pings - before.pings,
            bytes: self.bytes - before.bytes,
            ..*self
        }
    }
}

/// The connected clients: reading ones run in tasks, stalled ones are held
/// and never polled (their socket buffers fill up).
#[derive(Debug)]
struct Clients {
    fast: Vec<(Arc<Seen>, tokio::task::JoinHandle<()>)>,
    stalled: Vec<Socket>,
}

impl Clients {
    async fn connect(addr: SocketAddr, total: usize, stalled: usize) -> anyhow::Result<Clients> {
        let url = format!("ws://{addr}/ws");
        let mut clients = Clients {
            fast: Vec::new(),
            stalled: Vec::new(),
        };
        for i in 0..total {
            let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .with_context(|| format!("WebSocket client {i} cannot connect to {url}"))?;
            if i < stalled {
                clients.stalled.push(socket);
            } else {
                let seen = Arc::new(Seen::default());
                let task = tokio::spawn(read(socket, Arc::clone(&seen)));
                clients.fast.push((seen, task));
            }
        }
        // Let the last subscriptions reach the Observable.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(clients)
    }

    fn count(&self) -> usize {
        self.fast.len() + self.stalled.len()
    }

    /// Wait until every reading client has `expected` events, or their
    /// counts stop moving, or `timeout`.
    async fn settle(&self, expected: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            let t = self.totals();
            if t.min >= expected || last == Some((t.min, t.max, t.missed)) {
                return;
            }
            last = Some((t.min, t.max, t.missed));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// What the reading clients have seen so far.
    fn totals(&self) -> Totals {
        let load = |f: fn(&Seen) -> &AtomicU64| -> Vec<u64> {
            self.fast
                .iter()
                .map(|(s, _)| f(s).load(Ordering::Relaxed))
                .collect()
        };
        let events = load(|s| &s.events);
        Totals {
            min: events.iter().copied().min().unwrap_or(0),
            max: events.iter().copied().max().unwrap_or(0),
            delivered: events.iter().sum(),
            missed: load(|s| &s.missed).iter().sum(),
            frames: load(|s| &s.frames).iter().sum(),
            lagged_frames: load(|s| &s.lagged_frames).iter().sum(),
            pings: load(|s| &s.pings).iter().sum(),
            bytes: load(|s| &s.bytes).iter().sum(),
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for (_, task) in &self.fast {
            task.abort();
        }
    }
}

/// Read frames until the connection ends, counting events and `missed`,
/// frames, pings (answered by the library) and bytes.
async fn read(mut socket: Socket, seen: Arc<Seen>) {
    while let Some(message) = socket.next().await {
        let Ok(message) = message else {
            return;
        };
        match message {
            Message::Text(text) => {
                seen.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                let Ok(frame) = serde_json::from_str::<super::Frame>(text.as_str()) else {
                    continue;
                };
                match frame.kind.as_str() {
                    "events" => {
                        seen.frames.fetch_add(1, Ordering::Relaxed);
                        seen.events
                            .fetch_add(frame.events.len() as u64, Ordering::Relaxed);
                    }
                    "lagged" => {
                        seen.lagged_frames.fetch_add(1, Ordering::Relaxed);
                        seen.missed.fetch_add(frame.missed, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            Message::Ping(_) => {
                seen.pings.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// The slow reader's pause after each frame of events.
const SLOW_READER_PAUSE: Duration = Duration::from_millis(50);

/// The slow link's rate, bytes per second each way.
const SLOW_LINK_BYTES_PER_SECOND: u64 = 50_000;

/// What a slow client has seen so far.
#[derive(Debug, Default)]
struct SlowSeen {
    received: AtomicU64,
    missed: AtomicU64,
    worst_age_ms: AtomicU64,
}

/// A client slower than the stream, reading in its own task.
#[derive(Debug)]
struct Slow {
    seen: Arc<SlowSeen>,
    task: tokio::task::JoinHandle<()>,
}

/// One event, as far as the slow clients look at it.
#[derive(Debug, Deserialize)]
struct AgedEvent {
    received_at: String,
}

/// A frame, with the events' receipt times.
#[derive(Debug, Deserialize)]
struct AgedFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    events: Vec<AgedEvent>,
    #[serde(default)]
    missed: u64,
}

impl Slow {
    /// Connects to `/ws` at `addr` and reads, pausing `pause` after each
    /// frame of events.
    async fn connect(addr: SocketAddr, pause: Duration) -> anyhow::Result<Slow> {
        let url = format!("ws://{addr}/ws");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .with_context(|| format!("a slow client cannot connect to {url}"))?;
        let seen = Arc::new(SlowSeen::default());
        let task = tokio::spawn(read_slowly(socket, Arc::clone(&seen), pause));
        Ok(Slow { seen, task })
    }

    /// Waits until it has accounted for `published` events, or its counts
    /// stop moving for two seconds; returns what it saw.
    async fn settle(self, published: u64) -> SlowClient {
        let snapshot = |seen: &SlowSeen| SlowClient {
            received: seen.received.load(Ordering::Relaxed),
            missed: seen.missed.load(Ordering::Relaxed),
            worst_age_ms: seen.worst_age_ms.load(Ordering::Relaxed),
        };
        let mut last = snapshot(&self.seen);
        while last.received + last.missed < published {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = snapshot(&self.seen);
            if now == last {
                break;
            }
            last = now;
        }
        self.task.abort();
        last
    }
}

/// Reads frames until the connection ends, recording ages and counts.
async fn read_slowly(mut socket: Socket, seen: Arc<SlowSeen>, pause: Duration) {
    while let Some(message) = socket.next().await {
        let Ok(message) = message else {
            return;
        };
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<AgedFrame>(text.as_str()) else {
            continue;
        };
        match frame.kind.as_str() {
            "events" => {
                let now = SystemTime::now();
                let worst = frame
                    .events
                    .iter()
                    .filter_map(|e| humantime::parse_rfc3339(&e.received_at).ok())
                    .filter_map(|at| now.duration_since(at).ok())
                    .max()
                    .unwrap_or_default();
                let worst_ms = u64::try_from(worst.as_millis()).unwrap_or(u64::MAX);
                seen.worst_age_ms.fetch_max(worst_ms, Ordering::Relaxed);
                seen.received
                    .fetch_add(frame.events.len() as u64, Ordering::Relaxed);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            "lagged" => {
                seen.missed.fetch_add(frame.missed, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}
