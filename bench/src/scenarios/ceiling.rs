//! Scenario 1, the denominators: how fast the broker alone delivers and
//! takes acks for a pre-filled queue (no database; the best of a few prefetch
//! windows and ack cadences, in a process of its own), and how fast
//! PostgreSQL alone takes the same rows in bulk inserts.

use std::path::Path;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context as _};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use sluice::load::{sample_body, LoadArgs, Loader};
use sluice_actors::store::INSERT;
use sluice_testkit::amqp::{amqp_url, delete_topology};
use sluice_testkit::{fresh_database, unique_prefix};

use crate::{say, Bench, BrokerTry, Probe};

/// Rows per insert, as the service's default `MAX_BATCH`.
pub const PG_BATCH: usize = 1000;
/// Connections inserting at once, as the service's default `WRITERS`.
pub const PG_WRITERS: usize = 2;
/// The migration that creates the service's table.
pub const SCHEMA: &str = include_str!("../../../migrations/V1__create_events.sql");

/// Prefetch windows and ack cadences the broker ceiling tries; the best wins.
pub const BROKER_TRIES: [(u16, u64); 4] = [(2000, 100), (2000, 1000), (8000, 100), (8000, 1000)];

/// Run both ceilings.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let n = bench.scale.ceiling_messages;
    say(format!("ceiling: broker alone, {n} messages per try"));
    best_broker(bench, n).await?;
    say(format!("ceiling: PostgreSQL alone, {n} rows"));
    let pg = pg_ceiling(n).await?;
    say(format!("  PostgreSQL: {pg:.0} rows/s (bulk insert)"));
    bench.results.pg_ceiling = Some(pg);
    Ok(())
}

/// Try every [`BROKER_TRIES`] setting and record the best as the broker ceiling.
pub async fn best_broker(bench: &mut Bench, n: u64) -> anyhow::Result<f64> {
    let probe = bench.probe()?;
    for (prefetch, ack_every) in BROKER_TRIES {
        let measured = broker_ceiling(&probe, n, prefetch, ack_every).await?;
        say(format!(
            "  broker, prefetch {prefetch}, ack every {ack_every}: {:.0} msgs/s, {:.1} µs CPU/msg",
            measured.rate,
            measured.cpu_us_per_msg.unwrap_or(f64::NAN)
        ));
        bench.results.broker_tries.push(BrokerTry {
            prefetch,
            ack_every,
            measured,
        });
    }
    let best = bench
        .results
        .broker_tries
        .iter()
        .max_by(|a, b| a.measured.rate.total_cmp(&b.measured.rate))
        .context("no broker try")?
        .clone();
    bench.results.broker_ceiling = Some(best.measured.rate);
    bench.results.broker_best = Some((best.prefetch, best.ack_every));
    Ok(best.measured.rate)
}

/// A queue of `n` messages of the load generator's shape, under a fresh
/// prefix (exchange `prefix`, queue `prefix.ingest`); delete it with
/// [`delete_topology`] when done.
pub async fn prefilled_queue(n: u64, label: &str) -> anyhow::Result<String> {
    let url = amqp_url();
    let prefix = format!("{}_{label}", unique_prefix());
    let queue = format!("{prefix}.ingest");
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {url}"))?;
    let result = async {
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                prefix.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                prefix.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let loader = Loader::connect(&url).await?;
        let report = loader
            .run(&prefix, &LoadArgs::count(n), std::future::pending())
            .await?;
        loader.close().await?;
        if report.confirmed != n {
            bail!("pre-fill: only {} of {n} confirmed", report.confirmed);
        }
        say(format!(
            "  pre-filled {n} in {:.2?} ({:.0} msgs/s published with confirms)",
            report.elapsed,
            report.rate()
        ));
        Ok::<_, anyhow::Error>(())
    }
    .await;
    sluice_actors::tls::close_broker(&connection, "bye").await;
    if let Err(e) = result {
        let _ = delete_topology(&url, &prefix).await;
        return Err(e);
    }
    Ok(prefix)
}

/// Pre-fill a queue with `n` messages, then consume and ack them with
/// `multiple = true` every `ack_every`, in the probe process (its own
/// multi-thread runtime, nothing else to do): msgs/s from the first delivery
/// to the last ack.
pub async fn broker_ceiling(
    probe: &Path,
    n: u64,
    prefetch: u16,
    ack_every: u64,
) -> anyhow::Result<Probe> {
    let prefix = prefilled_queue(n, "ceiling").await?;
    let url = amqp_url();
    let args = [
        "broker".to_owned(),
        url.clone(),
        format!("{prefix}.ingest"),
        n.to_string(),
        prefetch.to_string(),
        ack_every.to_string(),
    ];
    let result = run_probe(probe, &args, n).await;
    if let Err(e) = delete_topology(&url, &prefix).await {
        log::warn!("deleting {prefix}: {e:#}");
    }
    result
}

/// Run the probe with `args` (it handles `n` messages) and read its figures.
pub async fn run_probe(probe: &Path, args: &[String], n: u64) -> anyhow::Result<Probe> {
    let mut command = std::process::Command::new(probe);
    command.args(args).stderr(std::process::Stdio::inherit());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await?
        .with_context(|| format!("cannot run {}", probe_name(args)))?;
    if !output.status.success() {
        bail!("{} failed ({})", probe_name(args), output.status);
    }
    let line: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("{} printed no figures", probe_name(args)))?;
    Ok(Probe {
        rate: line["rate"].as_f64().context("no rate")?,
        cpu_us_per_msg: line["cpu_s"].as_f64().map(|s| s * 1e6 / n as f64),
        peak_rss_mb: line["peak_rss_mb"].as_f64(),
    })
}

fn probe_name(args: &[String]) -> String {
    format!(
        "sluice-bench-probe {}",
        args.first().map_or("", String::as_str)
    )
}

/// Insert `n` rows like the service's (same table, same statement, same
/// bodies) in batches of [`PG_BATCH`] on [`PG_WRITERS`] connections; rows/s.
pub async fn pg_ceiling(n: u64) -> anyhow::Result<f64> {
    let db = fresh_database().await;
    db.execute(SCHEMA).await;
    let now = SystemTime::now();
    let ts = sluice::load::unix_millis();
    // Rows are prepared up front so only the database is timed.
    let batches: Vec<Batch> = (0..n)
        .collect::<Vec<u64>>()
        .chunks(PG_BATCH)
        .map(|chunk| Batch {
            ids: chunk.iter().map(|i| format!("ceiling-{i}")).collect(),
            keys: chunk
                .iter()
                .map(|i| format!("sensor.{}.reading", i % 8))
                .collect(),
            payloads: chunk
                .iter()
                .map(|&i| String::from_utf8_lossy(&sample_body(i, 8, 256)).into_owned())
                .collect(),
            headers: chunk
                .iter()
                .map(|_| format!(r#"{{"timestamp_in_ms":{ts}}}"#))
                .collect(),
            times: vec![now; chunk.len()],
        })
        .collect();
    let mut clients = Vec::new();
    for _ in 0..PG_WRITERS {
        let (client, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
            .await
            .context("connecting to the ceiling database")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("ceiling connection: {e}");
            }
        });
        let statement = client.prepare(INSERT).await?;
        clients.push((client, statement));
    }
    let batches = std::sync::Arc::new(batches);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (client, statement) in clients {
        let batches = std::sync::Arc::clone(&batches);
        let next = std::sync::Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(b) = batches.get(i) else {
                    return Ok::<_, tokio_postgres::Error>(());
                };
                client
                    .execute(
                        &statement,
                        &[&b.ids, &b.keys, &b.payloads, &b.headers, &b.times, &b.times],
                    )
                    .await?;
            }
        }));
    }
    for task in tasks {
        task.await.context("insert task panicked")??;
    }
    let elapsed = started.elapsed();
    let rows = db.count_rows("events").await;
    if u64::try_from(rows).unwrap_or(0) != n {
        bail!("PostgreSQL ceiling: {rows} rows stored, {n} expected");
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// One insert's parallel arrays.
#[derive(Debug)]
struct Batch {
    ids: Vec<String>,
    keys: Vec<String>,
    payloads: Vec<String>,
    headers: Vec<String>,
    times: Vec<SystemTime>,
}
