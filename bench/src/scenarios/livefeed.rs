//! Scenario 6, the live feed: the same backlog drained with `LIVE_FEED=local`
//! and with `LIVE_FEED=stream` (every copy published to the RabbitMQ stream
//! `P.live` and read back), in one run, with WebSocket clients reading the
//! live tail. Reported as ratios stream / local: drain rate, how fast the
//! clients received everything (fan-out), the service's CPU per event, and
//! the broker's CPU per event (the extra broker load the stream costs; the
//! broker is shared with whatever else runs on the machine, so that figure
//! is the noisiest).

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::rig::{Rig, Strategy};
use crate::scenarios::drain::{await_rows, prepare_backlog};
use crate::{say, Bench};

/// WebSocket clients reading the live tail in each run.
pub const CLIENTS: usize = 3;

/// What one mode measured.
#[derive(Debug, Clone, Copy)]
pub struct FeedRun {
    /// Events stored per second, from the first receipt to the last row.
    pub drain_rate: f64,
    /// Events per second until every client accounted for all of them
    /// (received + missed), from the same start.
    pub fanout_rate: f64,
    /// Events the clients were told they missed, summed.
    pub missed: u64,
    /// Service CPU time per 1000 events, in ms.
    pub service_cpu_ms_per_k: f64,
    /// Broker CPU time per 1000 events, in ms (`None`: broker not found).
    pub broker_cpu_ms_per_k: Option<f64>,
    /// Peak RSS of the service, MB.
    pub peak_rss_mb: Option<f64>,
}

/// Run both modes and report the ratios.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let n = bench.scale.drain_messages;
    say(format!(
        "livefeed: {n} pre-filled messages, {CLIENTS} WebSocket clients, LIVE_FEED=local then stream"
    ));
    let local = one(bench, "local", n).await?;
    let stream = one(bench, "stream", n).await?;
    let ratio = |s: f64, l: f64| if l > 0.0 { s / l } else { f64::NAN };
    let broker = match (stream.broker_cpu_ms_per_k, local.broker_cpu_ms_per_k) {
        (Some(s), Some(l)) => format!(
            "broker CPU {l:.1} → {s:.1} ms per 1000 events (+{:.1} ms, ×{:.2})",
            s - l,
            ratio(s, l)
        ),
        _ => "broker CPU not measured (no beam.smp process readable here)".to_owned(),
    };
    let summary = format!(
        "livefeed stream/local: drain ×{:.2} ({:.0} vs {:.0} msgs/s), fan-out ×{:.2} \
         ({:.0} vs {:.0} events/s to {CLIENTS} clients, missed {} vs {}), service CPU ×{:.2} \
         ({:.1} vs {:.1} ms per 1000 events); {broker}",
        ratio(stream.drain_rate, local.drain_rate),
        stream.drain_rate,
        local.drain_rate,
        ratio(stream.fanout_rate, local.fanout_rate),
        stream.fanout_rate,
        local.fanout_rate,
        stream.missed,
        local.missed,
        ratio(stream.service_cpu_ms_per_k, local.service_cpu_ms_per_k),
        stream.service_cpu_ms_per_k,
        local.service_cpu_ms_per_k,
    );
    say(format!("  {summary}"));
    bench.note(summary);
    Ok(())
}

/// One drain with `LIVE_FEED=mode`.
async fn one(bench: &Bench, mode: &'static str, n: u64) -> anyhow::Result<FeedRun> {
    let env = [
        ("LIVE_FEED", mode.to_owned()),
        ("LIVE_HISTORY", n.to_string()),
        ("WS_BUFFER", "65536".to_owned()),
    ];
    let mut rig = Rig::new(&bench.bin, Strategy::Adaptive, false, &env).await?;
    let measured = measure(&mut rig, mode, n).await;
    rig.finish().await;
    let run = measured?;
    say(format!(
        "  {mode}: drain {:.0} msgs/s, clients complete at {:.0} events/s (missed {}), \
         service {:.1} ms CPU / 1000 events, broker {}, peak RSS {:.0} MB",
        run.drain_rate,
        run.fanout_rate,
        run.missed,
        run.service_cpu_ms_per_k,
        run.broker_cpu_ms_per_k
            .map_or("?".to_owned(), |b| format!("{b:.1} ms CPU / 1000 events")),
        run.peak_rss_mb.unwrap_or(0.0),
    ));
    Ok(run)
}

async fn measure(rig: &mut Rig, mode: &str, n: u64) -> anyhow::Result<FeedRun> {
    prepare_backlog(rig, n).await?;
    let broker_before = broker_cpu();
    let started = Instant::now();
    rig.start().await?;
    let addr = rig.service()?.http_addr();
    // `?since=0`: the ring replays what passed before the client subscribed.
    let url = format!("ws://{addr}/ws?since=0");
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .with_context(|| format!("{mode}: client {i} cannot connect to {url}"))?;
        clients.push(tokio::spawn(read_all(socket, n)));
    }
    let deadline = started + Duration::from_secs(600);
    let done = await_rows(rig, n, deadline).await?;
    let mut missed = 0;
    let mut last_client = done;
    for client in clients {
        let (got, at) = tokio::time::timeout(Duration::from_secs(120), client)
            .await
            .with_context(|| format!("{mode}: a client did not account for all {n} events"))?
            .context("client task")??;
        missed += got;
        last_client = last_client.max(at);
    }
    let broker_after = broker_cpu();
    let first_received: SystemTime = rig
        .db
        .query_scalar("SELECT min(received_at) FROM events", &[])
        .await;
    let startup = first_received
        .duration_since(SystemTime::now() - started.elapsed())
        .unwrap_or_default();
    let busy = done.duration_since(started).saturating_sub(startup);
    let fanout = last_client.duration_since(started).saturating_sub(startup);
    let pid = rig.service()?.pid();
    let service_cpu = process_cpu(pid).unwrap_or_default();
    let per_k = |cpu: Duration| cpu.as_secs_f64() * 1000.0 / (n as f64 / 1000.0);
    Ok(FeedRun {
        drain_rate: n as f64 / busy.as_secs_f64().max(1e-6),
        fanout_rate: n as f64 / fanout.as_secs_f64().max(1e-6),
        missed,
        service_cpu_ms_per_k: per_k(service_cpu),
        broker_cpu_ms_per_k: broker_before
            .zip(broker_after)
            .map(|(a, b)| per_k(b.saturating_sub(a))),
        peak_rss_mb: rig.peak_rss_mb(),
    })
}

/// Reads until `n` events are accounted for; the missed count and when.
async fn read_all<S>(mut socket: S, n: u64) -> anyhow::Result<(u64, Instant)>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let (mut received, mut missed) = (0u64, 0u64);
    while received + missed < n {
        let message = socket
            .next()
            .await
            .context("the session ended early")?
            .context("reading the session")?;
        if let Message::Text(text) = message {
            let Ok(frame) = serde_json::from_str::<super::Frame>(text.as_str()) else {
                continue;
            };
            match frame.kind.as_str() {
                "events" => received += frame.events.len() as u64,
                "lagged" => missed += frame.missed,
                _ => {}
            }
        }
    }
    Ok((missed, Instant::now()))
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of the RabbitMQ node (the `beam.smp` process), if readable.
pub fn broker_cpu() -> Option<Duration> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "beam.smp")
        })
        .filter_map(process_cpu)
        .max()
}
