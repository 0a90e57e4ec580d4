//! Scenario 5, fan-out: many WebSocket clients on `/ws`, some of which never
//! read. At a steady rate the database sustains: database throughput and
//! latency with the clients against without, events delivered to the reading
//! clients against the `missed` they were told of, and the service's peak
//! memory. Beside them in that phase, two clients slower than the stream: one
//! reading a frame every 50 ms, one behind a 50 KB/s link (testkit's
//! throttling proxy); their worst event age shows the freshness bound
//! (`WS_MAX_LAG`), and received + missed shows exact accounting. Then the
//! same comparison for a saturated service (a backlog).

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

use crate::rig::{Rig, Strategy};
use crate::scenarios::drain::{await_rows, prepare_backlog};
use crate::scenarios::{fmt_opt, step};
use crate::{say, Bench, FanoutResult, SlowClient};

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
    let outcome = async {
        rig.start().await?;
        say("  without clients:");
        let (without, _) = step(
            &rig,
            Strategy::Adaptive,
            0.0,
            rate,
            warmup,
            window,
            "fanout",
        )
        .await?;

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
        let (with, detail) = step(
            &rig,
            Strategy::Adaptive,
            0.0,
            rate,
            warmup,
            window,
            "fanout",
        )
        .await?;
        let published = detail.report.sent;
        clients.settle(published, Duration::from_secs(10)).await;
        let (delivered_min, delivered_max, missed_fast) = clients.fast_totals();
        let slow_reader = slow_reader.settle(published).await;
        let slow_link = slow_link.settle(published).await;
        drop(link);
        for (who, slow) in [("50 ms reader", &slow_reader), ("50 KB/s link", &slow_link)] {
            say(format!(
                "  {who}: received {} + missed {} of {published}, worst age {} ms",
                slow.received, slow.missed, slow.worst_age_ms
            ));
        }
        let mut peak_rss_mb = rig.peak_rss_mb();
        say(format!(
            "  reading clients got {delivered_min}..{delivered_max} of {published} events, \
             told of {missed_fast} missed; peak RSS {} MB",
            fmt_opt(peak_rss_mb, 0)
        ));
        drop(clients);

        let (mut drain_without, mut drain_with) = (None, None);
        if n > 0 {
            say(format!("  backlog of {n}, without clients:"));
            drain_without = Some(saturated_rate(&mut rig, n, 0, 0).await?);
            say(format!("  backlog of {n}, with {total} clients:"));
            drain_with = Some(saturated_rate(&mut rig, n, total, stalled).await?);
            peak_rss_mb = match (peak_rss_mb, rig.peak_rss_mb()) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        Ok::<_, anyhow::Error>(FanoutResult {
            clients: total,
            stalled,
            offered: rate,
            stored_without: without.stored,
            stored_with: with.stored,
            p50_without_ms: without.latency.p50_ms,
            p50_with_ms: with.latency.p50_ms,
            published,
            delivered_min,
            delivered_max,
            missed_fast,
            drain_without,
            drain_with,
            peak_rss_mb,
            slow_reader,
            slow_link,
        })
    }
    .await;
    rig.finish().await;
    bench.results.fanout = Some(outcome?);
    Ok(())
}

/// The storing rate of a saturated service, with `total` clients connected:
/// stop the service, pre-fill `n` messages, start it, connect the clients at
/// once, and time the rows stored from then until the backlog is gone.
async fn saturated_rate(
    rig: &mut Rig,
    n: u64,
    total: usize,
    stalled: usize,
) -> anyhow::Result<f64> {
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
    let mark_rows = u64::try_from(rig.db.count_rows("events").await).unwrap_or(0);
    let mark = Instant::now();
    let done = await_rows(rig, base + n, mark + Duration::from_secs(600)).await?;
    let secs = done.duration_since(mark).as_secs_f64().max(1e-3);
    let measured = (base + n).saturating_sub(mark_rows);
    let rate = measured as f64 / secs;
    let mut line = format!(
        "    stored {measured} at {rate:.0} msgs/s once the clients were connected \
         ({} before)",
        mark_rows.saturating_sub(base)
    );
    if let Some(clients) = &clients {
        clients.settle(u64::MAX, Duration::from_secs(2)).await;
        let (min, max, missed) = clients.fast_totals();
        line.push_str(&format!(
            "; reading clients got {min}..{max}, told of {missed} missed"
        ));
    }
    say(line);
    if measured < n / 2 {
        say("    (most of the backlog was stored before the measurement began: use a larger one)");
    }
    Ok(rate)
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one reading client has seen.
#[derive(Debug, Default)]
struct Seen {
    events: AtomicU64,
    missed: AtomicU64,
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
            let (min, max, missed) = self.fast_totals();
            if min >= expected || last == Some((min, max, missed)) {
                return;
            }
            last = Some((min, max, missed));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Fewest and most events one reading client got, and all `missed` added up.
    fn fast_totals(&self) -> (u64, u64, u64) {
        let events = self
            .fast
            .iter()
            .map(|(s, _)| s.events.load(Ordering::Relaxed));
        let min = events.clone().min().unwrap_or(0);
        let max = events.max().unwrap_or(0);
        let missed = self
            .fast
            .iter()
            .map(|(s, _)| s.missed.load(Ordering::Relaxed))
            .sum();
        (min, max, missed)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for (_, task) in &self.fast {
            task.abort();
        }
    }
}

/// Read frames until the connection ends, counting events and `missed`.
async fn read(mut socket: Socket, seen: Arc<Seen>) {
    while let Some(message) = socket.next().await {
        let Ok(message) = message else {
            return;
        };
        if let Message::Text(text) = message {
            let Ok(frame) = serde_json::from_str::<super::Frame>(text.as_str()) else {
                continue;
            };
            match frame.kind.as_str() {
                "events" => {
                    seen.events
                        .fetch_add(frame.events.len() as u64, Ordering::Relaxed);
                }
                "lagged" => {
                    seen.missed.fetch_add(frame.missed, Ordering::Relaxed);
                }
                _ => {}
            }
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
