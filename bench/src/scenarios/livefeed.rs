//! Scenario 6, the live feed across instances: the same backlog drained by
//! **3 instances** with `LIVE_FEED=local` and with `LIVE_FEED=stream`, a
//! dashboard (a WebSocket client) reading on each instance, in rounds of
//! both modes back to back, the order alternating. Per run: the drain rate,
//! the service CPU per event (all three instances, start-up subtracted),
//! the broker's CPU per event, every copy dropped on the way to the live
//! path, and whether every client accounted for exactly what it should
//! (received + missed: every event with the stream, its own instance's with
//! the local feed). Verdicts on the medians of the rounds' ratios
//! stream / local: drain ≥ 0.9, service CPU per event ≤ 1.3, no copy
//! dropped, every count exact.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use futures_util::StreamExt;
use sluice_testkit::amqp::{amqp_url, delete_topology, queue_counts};
use sluice_testkit::{fresh_database, unique_prefix, Service, TestDb};
use tokio_tungstenite::tungstenite::Message;

use crate::prom;
use crate::rig::{cpu_seconds, peak_rss_mb, plain_tcp};
use crate::scenarios::drain::{await_count, prefill_exchange};
use crate::{say, Bench};

/// Instances in each run.
pub const INSTANCES: usize = 3;

/// The targets of the verdicts.
const DRAIN_TARGET: f64 = 0.9;
const CPU_TARGET: f64 = 1.3;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct FeedRun {
    /// `local` or `stream`.
    pub mode: &'static str,
    /// Events stored per second, from the first receipt to the last row.
    pub drain_rate: f64,
    /// Service CPU per event, all instances together, in µs.
    pub service_us_per_event: f64,
    /// Broker CPU per event, in µs (`None`: the broker's process not readable).
    pub broker_us_per_event: Option<f64>,
    /// Copies dropped on the way to the live path (the Taps' and the
    /// publishers'), all instances.
    pub dropped: u64,
    /// Acks that stopped waiting for their copy (`LIVE_FEED_MAX_WAIT`).
    pub waits_expired: u64,
    /// Per client: (received, missed, what it should account for).
    pub clients: Vec<(u64, u64, u64)>,
    /// The largest peak RSS of the instances, MB.
    pub peak_rss_mb: f64,
}

impl FeedRun {
    /// Whether every client accounted for exactly what it should.
    pub fn exact(&self) -> bool {
        self.clients
            .iter()
            .all(|(received, missed, expected)| received + missed == *expected)
    }

    /// Events the clients were told they missed, summed.
    pub fn missed(&self) -> u64 {
        self.clients.iter().map(|(_, missed, _)| missed).sum()
    }
}

/// Run the rounds and report every run and the verdicts.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let n = bench.scale.drain_messages;
    let rounds = bench.scale.drain_rounds.max(1);
    say(format!(
        "livefeed: {n} pre-filled messages, {INSTANCES} instances, a dashboard on each, \
         {rounds} round(s) of LIVE_FEED=local and stream, alternating"
    ));
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let modes = if round % 2 == 0 {
            ["local", "stream"]
        } else {
            ["stream", "local"]
        };
        let mut local = None;
        let mut stream = None;
        for mode in modes {
            let measured = one(bench, mode, n).await?;
            say(format!("  round {} {}", round + 1, describe(&measured)));
            if mode == "local" {
                local = Some(measured);
            } else {
                stream = Some(measured);
            }
        }
        let (Some(local), Some(stream)) = (local, stream) else {
            bail!("a round without both modes");
        };
        let drain = stream.drain_rate / local.drain_rate.max(1e-9);
        let cpu = stream.service_us_per_event / local.service_us_per_event.max(1e-9);
        let line = format!(
            "round {}: stream/local drain ×{drain:.2}, service CPU per event ×{cpu:.2}; \
             stream dropped {} copies, {} acks stopped waiting, every count exact: {}",
            round + 1,
            stream.dropped,
            stream.waits_expired,
            stream.exact() && local.exact()
        );
        say(format!("  {line}"));
        bench.note(format!("livefeed {line}"));
        ratios.push((drain, cpu, stream.dropped, stream.exact() && local.exact()));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let drain = median(ratios.iter().map(|r| r.0).collect());
    let cpu = median(ratios.iter().map(|r| r.1).collect());
    let dropped: u64 = ratios.iter().map(|r| r.2).sum();
    let exact = ratios.iter().all(|r| r.3);
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let summary = format!(
        "livefeed stream/local ({INSTANCES} instances, median of {rounds}): drain ×{drain:.2} \
         (≥ {DRAIN_TARGET}: {}), service CPU per event ×{cpu:.2} (≤ {CPU_TARGET}: {}), \
         copies dropped {dropped} (0: {}), every client's received + missed exact: {}",
        verdict(drain >= DRAIN_TARGET),
        verdict(cpu <= CPU_TARGET),
        verdict(dropped == 0),
        verdict(exact),
    );
    say(format!("  {summary}"));
    bench.note(summary);
    Ok(())
}

fn describe(run: &FeedRun) -> String {
    let clients: Vec<String> = run
        .clients
        .iter()
        .map(|(received, missed, expected)| format!("{received}+{missed}/{expected}"))
        .collect();
    format!(
        "{}: drain {:.0} msgs/s, service {:.1} µs CPU/event, broker {}, dropped {}, \
         acks stopped waiting {}, clients (received+missed/expected) {}, peak RSS {:.0} MB",
        run.mode,
        run.drain_rate,
        run.service_us_per_event,
        run.broker_us_per_event
            .map_or("?".to_owned(), |b| format!("{b:.1} µs CPU/event")),
        run.dropped,
        run.waits_expired,
        clients.join(" "),
        run.peak_rss_mb,
    )
}

/// Three instances of the service on one database and one prefix.
struct Cluster {
    db: TestDb,
    prefix: String,
    amqp_url: String,
    bin: std::path::PathBuf,
    env: Vec<(&'static str, String)>,
    nodes: Vec<Service>,
}

impl Cluster {
    async fn new(bin: &Path, mode: &'static str, n: u64) -> Cluster {
        let db = fresh_database().await;
        let prefix = unique_prefix();
        let amqp_url = amqp_url();
        let env = vec![
            ("AMQP_URL", amqp_url.clone()),
            ("DATABASE_URL", plain_tcp(db.url())),
            ("AMQP_PREFIX", prefix.clone()),
            ("LIVE_FEED", mode.to_owned()),
            // The dashboards open with everything the instance holds, and
            // may buffer all of it (not trimmed by a small buffer).
            ("LIVE_HISTORY", n.to_string()),
            ("WS_BUFFER", n.to_string()),
            ("RUST_LOG", "warn,sluice::startup=info".to_owned()),
        ];
        Cluster {
            db,
            prefix,
            amqp_url,
            bin: bin.to_owned(),
            env,
            nodes: Vec::new(),
        }
    }

    /// Starts every instance at once and waits until all of them consume.
    async fn start(&mut self) -> anyhow::Result<()> {
        let starting: Vec<_> = (0..INSTANCES)
            .map(|i| {
                let bin = self.bin.clone();
                let mut env = self.env.clone();
                env.push(("INSTANCE_NAME", format!("bench-{i}")));
                tokio::task::spawn_blocking(move || Service::spawn(&bin, &env))
            })
            .collect();
        for node in starting {
            self.nodes
                .push(node.await.context("an instance did not start")?);
        }
        let ingest = format!("{}.ingest", self.prefix);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let consumers = queue_counts(&self.amqp_url, &ingest)
                .await
                .map_or(0, |c| c.consumers);
            if consumers as usize >= INSTANCES {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{consumers} of {INSTANCES} instances consume {ingest} after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM every instance and wait for each.
    async fn stop(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        let _ = tokio::task::spawn_blocking(move || {
            for node in &nodes {
                node.sigterm();
            }
            for node in &nodes {
                if node.wait_exit(Duration::from_secs(30)).is_none() {
                    node.sigkill();
                }
            }
        })
        .await;
    }

    async fn finish(mut self) {
        self.stop().await;
        if let Err(e) = delete_topology(&self.amqp_url, &self.prefix).await {
            log::warn!("deleting topology {}: {e:#}", self.prefix);
        }
    }
}

/// One drain with `LIVE_FEED=mode`.
async fn one(bench: &Bench, mode: &'static str, n: u64) -> anyhow::Result<FeedRun> {
    let mut cluster = Cluster::new(&bench.bin, mode, n).await;
    let measured = measure(&mut cluster, mode, n).await;
    cluster.finish().await;
    measured
}

async fn measure(cluster: &mut Cluster, mode: &'static str, n: u64) -> anyhow::Result<FeedRun> {
    // A first start declares the topology (and the stream); what it costs
    // in CPU is the start-up cost, subtracted below.
    cluster.start().await?;
    let startup_cpu: Vec<f64> = cluster
        .nodes
        .iter()
        .filter_map(|node| cpu_seconds(node.pid()))
        .collect();
    let startup_cpu = startup_cpu.iter().sum::<f64>() / startup_cpu.len().max(1) as f64;
    cluster.stop().await;
    prefill_exchange(&cluster.amqp_url, &cluster.prefix, n).await?;

    let broker_before = broker_cpu();
    let started = Instant::now();
    cluster.start().await?;
    // A dashboard on each instance, opening with everything it holds
    // (`?last=`), then the live stream: one step, nothing twice.
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        let url = format!("ws://{}/ws?last={n}", node.http_addr());
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .with_context(|| format!("{mode}: a dashboard cannot connect to {url}"))?;
        let counts = Arc::new(Counts::default());
        clients.push((tokio::spawn(read_counting(socket, counts.clone())), counts));
    }
    let done = await_count(&cluster.db, n, started + Duration::from_secs(600)).await?;
    let mut scrapes = Vec::new();
    for node in &cluster.nodes {
        scrapes.push(prom::scrape(node.http_addr()).await?);
    }
    let mut counts = Vec::new();
    for ((reader, read), scrape) in clients.into_iter().zip(&scrapes) {
        // With the local feed, a dashboard sees its own instance's events.
        let expected = match mode {
            "stream" => n,
            _ => scrape.value("sluice_events_received_total") as u64,
        };
        let (received, missed) = settle(&read, expected).await;
        reader.abort();
        counts.push((received, missed, expected));
    }
    let broker_after = broker_cpu();
    let first_received: SystemTime = cluster
        .db
        .query_scalar("SELECT min(received_at) FROM events", &[])
        .await;
    let startup = first_received
        .duration_since(SystemTime::now() - started.elapsed())
        .unwrap_or_default();
    let busy = done.duration_since(started).saturating_sub(startup);
    let service_cpu: f64 = cluster
        .nodes
        .iter()
        .filter_map(|node| cpu_seconds(node.pid()))
        .map(|cpu| (cpu - startup_cpu).max(0.0))
        .sum();
    let peak_rss = cluster
        .nodes
        .iter()
        .filter_map(|node| peak_rss_mb(node.pid()))
        .fold(0.0, f64::max);
    let sum = |name: &str| scrapes.iter().map(|s| s.value(name)).sum::<f64>();
    let per_event_us = |seconds: f64| seconds * 1e6 / n as f64;
    Ok(FeedRun {
        mode,
        drain_rate: n as f64 / busy.as_secs_f64().max(1e-6),
        service_us_per_event: per_event_us(service_cpu),
        broker_us_per_event: broker_before
            .zip(broker_after)
            .map(|(a, b)| per_event_us(b.saturating_sub(a).as_secs_f64())),
        dropped: (sum("sluice_tap_dropped_events_total")
            + sum("sluice_live_feed_dropped_events_total")) as u64,
        waits_expired: sum("sluice_live_feed_ack_waits_expired_total") as u64,
        clients: counts,
        peak_rss_mb: peak_rss,
    })
}

/// What a dashboard has read so far.
#[derive(Debug, Default)]
struct Counts {
    received: AtomicU64,
    missed: AtomicU64,
}

impl Counts {
    fn accounted(&self) -> u64 {
        self.received.load(Ordering::Acquire) + self.missed.load(Ordering::Acquire)
    }
}

/// Reads the session until it ends, counting events and `lagged` misses.
async fn read_counting<S>(mut socket: S, counts: Arc<Counts>)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(message)) = socket.next().await {
        if let Message::Text(text) = message {
            let Ok(frame) = serde_json::from_str::<super::Frame>(text.as_str()) else {
                continue;
            };
            match frame.kind.as_str() {
                "events" => counts
                    .received
                    .fetch_add(frame.events.len() as u64, Ordering::AcqRel),
                "lagged" => counts.missed.fetch_add(frame.missed, Ordering::AcqRel),
                _ => 0,
            };
        }
    }
}

/// Waits until a dashboard accounted for `expected` events (received +
/// missed), then a moment more to see that nothing beyond them arrives;
/// returns what it read.
async fn settle(counts: &Counts, expected: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts.accounted() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    (
        counts.received.load(Ordering::Acquire),
        counts.missed.load(Ordering::Acquire),
    )
}

/// CPU time of the RabbitMQ node (its `beam.smp` process), if readable.
pub fn broker_cpu() -> Option<Duration> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "beam.smp")
        })
        .filter_map(cpu_seconds)
        .map(Duration::from_secs_f64)
        .max()
}
