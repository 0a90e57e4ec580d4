//! Scenario 1, the denominators: how fast the broker alone delivers and
//! takes acks for a pre-filled queue (no database, the service's prefetch),
//! and how fast PostgreSQL alone takes the same rows in bulk inserts.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use sluice::load::{sample_body, LoadArgs, Loader};
use sluice_actors::store::INSERT;
use sluice_testkit::amqp::{amqp_url, delete_topology};
use sluice_testkit::{fresh_database, unique_prefix};

use crate::{say, Bench};

/// The service's default prefetch window (`AMQP_PREFETCH`).
pub const PREFETCH: u16 = 2000;
/// Rows per insert, as the service's default `MAX_BATCH`.
pub const PG_BATCH: usize = 1000;
/// Connections inserting at once, as the service's default `WRITERS`.
pub const PG_WRITERS: usize = 2;
/// The migration that creates the service's table.
const SCHEMA: &str = include_str!("../../../migrations/V1__create_events.sql");

/// Run both ceilings.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let n = bench.scale.ceiling_messages;
    say(format!("ceiling: broker alone, {n} messages"));
    let broker = broker_ceiling(n).await?;
    say(format!("  broker: {broker:.0} msgs/s (consume + ack)"));
    bench.results.broker_ceiling = Some(broker);
    say(format!("ceiling: PostgreSQL alone, {n} rows"));
    let pg = pg_ceiling(n).await?;
    say(format!("  PostgreSQL: {pg:.0} rows/s (bulk insert)"));
    bench.results.pg_ceiling = Some(pg);
    Ok(())
}

/// Pre-fill a queue with `n` messages of the load generator's shape, then
/// consume and ack them with the service's prefetch; msgs/s from the
/// `basic.consume` to the last ack.
pub async fn broker_ceiling(n: u64) -> anyhow::Result<f64> {
    let url = amqp_url();
    let prefix = format!("{}_ceiling", unique_prefix());
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

        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let started = Instant::now();
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "ceiling".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Acks are coalesced (`multiple`) every 100 deliveries, as a
        // consumer tuned for throughput would; the window stays open.
        let mut got = 0u64;
        let mut last_tag = 0;
        let deadline = started + Duration::from_secs(600);
        while got < n {
            let next = tokio::time::timeout_at(deadline.into(), consumer.next())
                .await
                .context("the broker ceiling timed out")?;
            let delivery = match next {
                Some(delivery) => delivery?,
                None => bail!("the consumer ended after {got} deliveries"),
            };
            got += 1;
            last_tag = delivery.delivery_tag;
            if got % 100 == 0 {
                channel
                    .basic_ack(last_tag, BasicAckOptions { multiple: true })
                    .await?;
            }
        }
        channel
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await?;
        let elapsed = started.elapsed();
        Ok::<_, anyhow::Error>(n as f64 / elapsed.as_secs_f64())
    }
    .await;
    let _ = connection.close(200, "bye".into()).await;
    if let Err(e) = delete_topology(&url, &prefix).await {
        log::warn!("deleting {prefix}: {e:#}");
    }
    result
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
