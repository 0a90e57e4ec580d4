//! Scenario 2, backlog drain: pre-fill the queue, start the service, and time
//! until every message is stored (and acked), against the broker ceiling.

use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use sluice::load::LoadArgs;
use sluice_testkit::amqp::queue_counts;

use crate::rig::{Rig, Strategy, BATCH_SIZE};
use crate::scenarios::ceiling;
use crate::{say, Bench, DrainResult};

/// Run the drain (measuring the broker ceiling first if this run has none).
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let n = bench.scale.drain_messages;
    if bench.results.broker_ceiling.is_none() {
        say(format!("drain: broker ceiling first ({n} messages)"));
        let broker = ceiling::broker_ceiling(n).await?;
        say(format!("  broker: {broker:.0} msgs/s"));
        bench.results.broker_ceiling = Some(broker);
    }
    say(format!("drain: {n} pre-filled messages, adaptive batching"));
    let mut rig = Rig::new(&bench.bin, Strategy::Adaptive, false, &[]).await?;
    let measured = drain(&mut rig, n, Duration::from_secs(600)).await;
    rig.finish().await;
    let mut result = measured?;
    result.broker_ceiling = bench.results.broker_ceiling;
    say(format!(
        "  drained in {:.2?} ({:.2?} busy): {:.0} msgs/s, mean batch {:.0}, peak RSS {:.0} MB",
        result.wall,
        result.busy,
        result.rate,
        result.mean_batch.unwrap_or(0.0),
        result.peak_rss_mb.unwrap_or(0.0),
    ));
    bench.results.drain = Some(result);
    Ok(())
}

/// Declare the topology (one start and stop of the service), pre-fill `n`
/// messages, start the service and wait until all are stored. The service is
/// left running.
pub async fn drain(rig: &mut Rig, n: u64, timeout: Duration) -> anyhow::Result<DrainResult> {
    prepare_backlog(rig, n).await?;
    let spawned_at = SystemTime::now();
    let started = Instant::now();
    rig.start().await?;
    let done = await_rows(rig, n, started + timeout).await?;
    let wall = done.duration_since(started);
    let done_at = SystemTime::now();
    let first_received: SystemTime = rig
        .db
        .query_scalar("SELECT min(received_at) FROM events", &[])
        .await;
    let startup = first_received
        .duration_since(spawned_at)
        .unwrap_or_default();
    let busy = done_at
        .duration_since(first_received)
        .unwrap_or_else(|_| wall.saturating_sub(startup));
    let peak_rss_mb = rig.peak_rss_mb();
    let batches = rig.scrape().await?.histogram(BATCH_SIZE);
    // Acks follow the commits within milliseconds; give them a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left_in_queue = match queue_counts(&rig.amqp_url, &rig.ingest()).await {
        Ok(c) => Some(c.ready + c.unacked.unwrap_or(0)),
        Err(_) => None,
    };
    Ok(DrainResult {
        messages: n,
        wall,
        busy,
        rate: n as f64 / busy.as_secs_f64().max(1e-6),
        peak_rss_mb,
        mean_batch: batches.mean(),
        broker_ceiling: None,
        left_in_queue,
    })
}

/// Make sure the topology exists (the service declares it: one start and
/// stop), leave the service stopped, and pre-fill `n` messages.
pub async fn prepare_backlog(rig: &mut Rig, n: u64) -> anyhow::Result<()> {
    if !rig.declared() {
        rig.start().await?;
    }
    rig.stop().await;
    prefill(rig, n).await
}

/// Poll the row count until the table holds `n` rows; returns when.
pub async fn await_rows(rig: &Rig, n: u64, deadline: Instant) -> anyhow::Result<Instant> {
    let target = i64::try_from(n).unwrap_or(i64::MAX);
    loop {
        let stored = rig.db.try_count_rows("events").await.unwrap_or(0);
        if stored >= target {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            bail!("only {stored} of {n} rows stored in time");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Publish `n` messages to the rig's exchange as fast as confirms allow.
pub async fn prefill(rig: &Rig, n: u64) -> anyhow::Result<()> {
    let report = rig.publish(&LoadArgs::count(n)).await?;
    if report.confirmed != n {
        bail!("pre-fill: only {} of {n} confirmed", report.confirmed);
    }
    say(format!(
        "  pre-filled {n} in {:.2?} ({:.0} msgs/s)",
        report.elapsed,
        report.rate()
    ));
    Ok(())
}
