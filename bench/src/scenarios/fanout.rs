//! Scenario 5, fan-out: many WebSocket clients on `/ws`, some of which never
//! read. At a steady rate the database sustains: database throughput and
//! latency with the clients against without, events delivered to the reading
//! clients against the `missed` they were told of, and the service's peak
//! memory. Then the same comparison for a saturated service (a backlog).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::rig::{Rig, Strategy};
use crate::scenarios::drain::{await_rows, prepare_backlog};
use crate::scenarios::{fmt_opt, step};
use crate::{say, Bench, FanoutResult};

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
        say(format!("  with {} clients:", clients.count()));
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

/// The parts of a frame the clients count.
#[derive(Debug, Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    events: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    missed: u64,
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
            let Ok(frame) = serde_json::from_str::<Frame>(text.as_str()) else {
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
