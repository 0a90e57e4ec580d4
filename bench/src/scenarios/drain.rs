//! Scenario 2, backlog drain: pre-fill the queue, start the service, and time
//! until every message is stored (and acked), against two denominators
//! measured in the same run: the broker ceiling (before and after) and a
//! plain pipeline doing the same work (`sluice-bench-probe pipeline`). CPU
//! per message comes from `/proc/<pid>/stat` of each process.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use sluice::load::{LoadArgs, Loader};
use sluice_testkit::amqp::{amqp_url, delete_topology, queue_counts};
use sluice_testkit::{fresh_database, TestDb};

use crate::prom;
use crate::rig::{cpu_seconds, thread_busy, thread_cpu, Rig, Strategy, BATCH_SIZE};
use crate::scenarios::ceiling;
use crate::{say, Bench, DrainResult, Probe};

/// Run the drain: rounds of the plain pipeline and Sluice on the same backlog
/// size, back to back and in alternating order, then the broker ceiling again
/// (measuring it first if this run has none). The headline is the round with
/// the median Sluice / plain ratio; every round is kept and reported.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let n = bench.scale.drain_messages;
    let rounds = bench.scale.drain_rounds.max(1);
    if bench.results.broker_ceiling.is_none() {
        say(format!(
            "drain: broker ceiling first ({n} messages per try)"
        ));
        ceiling::best_broker(bench, n).await?;
    }
    let probe = bench.probe()?;
    let mut results = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        // Odd rounds measure the plain pipeline first, even rounds Sluice.
        let plain_first = round % 2 == 1;
        let mut plain = None;
        if plain_first {
            plain = Some(plain_round(&probe, n, round, rounds).await?);
        }
        say(format!(
            "drain {round}/{rounds}: Sluice, {n} pre-filled messages, adaptive batching"
        ));
        let mut rig = Rig::new(&bench.bin, Strategy::Adaptive, false, &[]).await?;
        let measured = drain(&mut rig, n, Duration::from_secs(600)).await;
        rig.finish().await;
        let mut result = measured?;
        say(format!(
            "  drained in {:.2?} ({:.2?} busy): {:.0} msgs/s, {:.1} µs CPU/msg, mean batch {:.0}, peak RSS {:.0} MB",
            result.wall,
            result.busy,
            result.rate,
            result.cpu_us_per_msg.unwrap_or(f64::NAN),
            result.mean_batch.unwrap_or(0.0),
            result.peak_rss_mb.unwrap_or(0.0),
        ));
        if plain.is_none() {
            plain = Some(plain_round(&probe, n, round, rounds).await?);
        }
        let plain = plain.context("the plain pipeline ran")?;
        say(format!(
            "  round {round}: Sluice / plain {:.2}, CPU per message {:.2} × plain",
            result.rate / plain.rate,
            result
                .cpu_us_per_msg
                .zip(plain.cpu_us_per_msg)
                .map_or(f64::NAN, |(s, p)| s / p),
        ));
        result.plain = Some(plain);
        results.push(result);
    }
    let (prefetch, ack_every) = bench.results.broker_best.unwrap_or((2000, 100));
    say(format!(
        "drain: broker ceiling again (prefetch {prefetch}, ack every {ack_every})"
    ));
    let after = ceiling::broker_ceiling(&probe, n, prefetch, ack_every).await?;
    say(format!("  broker: {:.0} msgs/s", after.rate));
    for result in &mut results {
        result.broker_ceiling = bench.results.broker_ceiling;
        result.broker_ceiling_after = Some(after.rate);
    }
    bench.results.drain = median_round(&results).cloned();
    bench.results.drain_rounds = results;
    Ok(())
}

/// One plain-pipeline measurement of a round, with its progress lines.
async fn plain_round(probe: &Path, n: u64, round: usize, rounds: usize) -> anyhow::Result<Probe> {
    say(format!(
        "drain {round}/{rounds}: the plain pipeline, {n} pre-filled messages"
    ));
    let plain = plain_pipeline(probe, n, Duration::from_secs(600)).await?;
    say(format!(
        "  plain pipeline: {:.0} msgs/s, {:.1} µs CPU/msg, peak RSS {:.0} MB",
        plain.rate,
        plain.cpu_us_per_msg.unwrap_or(f64::NAN),
        plain.peak_rss_mb.unwrap_or(f64::NAN),
    ));
    Ok(plain)
}

/// The round whose Sluice / plain ratio is the median (the lower middle one
/// for an even count: the figure is never rounded up).
pub fn median_round(rounds: &[DrainResult]) -> Option<&DrainResult> {
    let ratio = |d: &DrainResult| d.plain.as_ref().map_or(0.0, |p| d.rate / p.rate);
    let mut sorted: Vec<&DrainResult> = rounds.iter().collect();
    sorted.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

/// The plain pipeline (`sluice-bench-probe pipeline`, its own process) on a
/// backlog of `n` messages, into a fresh database with the service's table;
/// its rate is measured from the database exactly as Sluice's is.
pub async fn plain_pipeline(probe: &Path, n: u64, timeout: Duration) -> anyhow::Result<Probe> {
    let db = fresh_database().await;
    db.execute(ceiling::SCHEMA).await;
    let prefix = ceiling::prefilled_queue(n, "plain").await?;
    let url = amqp_url();
    let args = [
        "pipeline".to_owned(),
        url.clone(),
        format!("{prefix}.ingest"),
        n.to_string(),
        db.url(),
    ];
    let started = Instant::now();
    let run = tokio::spawn({
        let probe = probe.to_owned();
        async move { ceiling::run_probe(&probe, &args, n).await }
    });
    let stored = stored_rate(&db, n, started, started + timeout).await;
    let probe = run.await.context("the probe task panicked")?;
    if let Err(e) = delete_topology(&url, &prefix).await {
        log::warn!("deleting {prefix}: {e:#}");
    }
    let (rate, _) = stored?;
    Ok(Probe { rate, ..probe? })
}

/// Declare the topology (one start and stop of the service), pre-fill `n`
/// messages, start the service and wait until all are stored. The service is
/// left running.
pub async fn drain(rig: &mut Rig, n: u64, timeout: Duration) -> anyhow::Result<DrainResult> {
    let startup_cpu = prepare_backlog(rig, n).await?;
    let started = Instant::now();
    rig.start().await?;
    let pid = rig.service()?.pid();
    let (threads_before, sampled) = (thread_cpu(pid), Instant::now());
    let addr = rig.service()?.http_addr();
    let sampler = std::env::var_os("BENCH_SAMPLE").map(|_| sample_gauges(addr));
    let stored = stored_rate(&rig.db, n, started, started + timeout).await;
    let cpu = cpu_seconds(pid);
    if let Some((stop, task)) = sampler {
        let _ = stop.send(());
        if let Ok(line) = task.await {
            say(format!(
                "  sampled every 50 ms over the drain (means): {line}"
            ));
        }
    }
    say(format!(
        "  Sluice threads busy over the drain: {}",
        thread_busy(&threads_before, &thread_cpu(pid), sampled.elapsed())
    ));
    let (rate, busy) = stored?;
    let wall = started.elapsed();
    let cpu_us_per_msg = cpu.map(|c| (c - startup_cpu.unwrap_or(0.0)).max(0.0) * 1e6 / n as f64);
    let peak_rss_mb = rig.peak_rss_mb();
    let scrape = rig.scrape().await?;
    let batches = scrape.histogram(BATCH_SIZE);
    let writing = scrape.histogram("sluice_write_duration_seconds").sum;
    let writers = scrape.value("sluice_writers").max(1.0);
    say(format!(
        "  writers busy {:.0}% of the drain (statement time / writers / drain time)",
        writing / writers / busy.as_secs_f64().max(1e-6) * 100.0
    ));
    let idle = scrape.histogram("sluice_reader_idle_seconds");
    let admission = scrape.histogram("sluice_reader_admission_seconds");
    say(format!(
        "  reader: {} chunks (mean {:.0} deliveries), waiting for deliveries {:.0}%, for admission {:.0}% of the drain",
        admission.count,
        n as f64 / admission.count.max(1.0),
        idle.sum / busy.as_secs_f64().max(1e-6) * 100.0,
        admission.sum / busy.as_secs_f64().max(1e-6) * 100.0,
    ));
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
        rate,
        peak_rss_mb,
        mean_batch: batches.mean(),
        broker_ceiling: None,
        broker_ceiling_after: None,
        left_in_queue,
        cpu_us_per_msg,
        plain: None,
    })
}

/// Scrape the service's gauges every 50 ms until told to stop; the answer
/// is their means: unacked deliveries, Queue depth, busy writers.
fn sample_gauges(
    addr: std::net::SocketAddr,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<String>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let names = [
            "sluice_unacked_deliveries",
            "sluice_queue_depth_events",
            "sluice_writers_busy",
        ];
        let (mut sums, mut samples) = ([0.0; 3], 0u32);
        while stopped.try_recv().is_err() {
            if let Ok(scrape) = prom::scrape(addr).await {
                for (sum, name) in sums.iter_mut().zip(names) {
                    *sum += scrape.value(name);
                }
                samples += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let n = f64::from(samples.max(1));
        format!(
            "unacked {:.0}, queue depth {:.0}, writers busy {:.2} ({samples} samples)",
            sums[0] / n,
            sums[1] / n,
            sums[2] / n
        )
    });
    (stop, task)
}

/// Wait until `db` holds `n` events; the rate is `n` over the time from the
/// first event received to the moment all `n` were seen stored (polled every
/// 25 ms, the same for every pipeline measured). Returns (rate, that time).
pub async fn stored_rate(
    db: &TestDb,
    n: u64,
    started: Instant,
    deadline: Instant,
) -> anyhow::Result<(f64, Duration)> {
    let done = await_count(db, n, deadline).await?;
    let done_at = SystemTime::now();
    let first_received: SystemTime = db
        .query_scalar("SELECT min(received_at) FROM events", &[])
        .await;
    let busy = done_at
        .duration_since(first_received)
        .unwrap_or_else(|_| done.duration_since(started));
    Ok((n as f64 / busy.as_secs_f64().max(1e-6), busy))
}

/// Make sure the topology exists (the service declares it: one start and
/// stop), leave the service stopped, and pre-fill `n` messages. Returns the
/// CPU seconds that start took (until consuming an empty queue), if it ran.
pub async fn prepare_backlog(rig: &mut Rig, n: u64) -> anyhow::Result<Option<f64>> {
    let mut startup_cpu = None;
    if !rig.declared() {
        rig.start().await?;
        startup_cpu = cpu_seconds(rig.service()?.pid());
    }
    rig.stop().await;
    prefill(rig, n).await?;
    Ok(startup_cpu)
}

/// Poll the row count until the table holds `n` rows; returns when.
pub async fn await_rows(rig: &Rig, n: u64, deadline: Instant) -> anyhow::Result<Instant> {
    await_count(&rig.db, n, deadline).await
}

/// Poll `db`'s row count until the table holds `n` rows; returns when.
pub(crate) async fn await_count(db: &TestDb, n: u64, deadline: Instant) -> anyhow::Result<Instant> {
    let target = i64::try_from(n).unwrap_or(i64::MAX);
    loop {
        let stored = db.try_count_rows("events").await.unwrap_or(0);
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
    prefill_exchange(&rig.amqp_url, &rig.prefix, n).await
}

/// Publish `n` messages to exchange `prefix` on `amqp_url` as fast as
/// confirms allow.
pub async fn prefill_exchange(amqp_url: &str, prefix: &str, n: u64) -> anyhow::Result<()> {
    let loader = Loader::connect_env(amqp_url).await?;
    let report = loader
        .run(prefix, &LoadArgs::count(n), std::future::pending())
        .await?;
    loader.close().await?;
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
