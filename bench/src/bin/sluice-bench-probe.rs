//! `sluice-bench-probe`: the two baselines of the drain benchmark, each run
//! by `sluice-bench` as its own process so that its CPU time and peak RSS are
//! its own (read from `/proc/self`), on a multi-thread runtime.
//!
//! ```text
//! sluice-bench-probe broker   AMQP_URL QUEUE N PREFETCH ACK_EVERY
//! sluice-bench-probe pipeline AMQP_URL QUEUE N DATABASE_URL
//! ```
//!
//! - `broker`: consume `N` deliveries and ack them with `multiple = true`
//!   every `ACK_EVERY`: what the broker alone gives (no other work).
//! - `pipeline`: the plainest correct pipeline doing Sluice's work: validate
//!   each body and derive its id (the service's own `EventData::from_delivery`),
//!   adaptive batches (whatever is pending, up to 1000) to 2 writers with the
//!   service's own `INSERT`, and a contiguous-watermark `multiple` ack after
//!   each commit. No actors, no live copy, no metrics.
//!
//! Both print one line of JSON on stdout: `{"rate":…,"cpu_s":…,"peak_rss_mb":…}`
//! (`rate` from the first delivery to the last ack; `cpu_s` from just
//! before `basic.consume` to the end).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context as _};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use sluice_actors::event::{EventData, Limits};
use sluice_actors::settlement::{Settled, Settlement};
use sluice_actors::store::INSERT;
use sluice_bench::rig::{cpu_seconds, peak_rss_mb};
use tokio::sync::{mpsc, Mutex};

/// As the service's defaults: `WRITERS`, `MAX_BATCH`, `AMQP_PREFETCH`.
const WRITERS: usize = 2;
const MAX_BATCH: usize = 1000;
const PREFETCH: u16 = 2000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .context("missing argument (see the usage in the source)")
    };
    let n: u64 = arg(3)?.parse().context("N")?;
    let connection = Connection::connect(arg(1)?, ConnectionProperties::default())
        .await
        .context("connecting to the broker")?;
    let channel = connection.create_channel().await?;
    let (cpu_before, pid) = (cpu_seconds(std::process::id()), std::process::id());
    let elapsed = match arg(0)?.as_str() {
        "broker" => {
            let prefetch: u16 = arg(4)?.parse().context("PREFETCH")?;
            let every: u64 = arg(5)?.parse().context("ACK_EVERY")?;
            broker(&channel, arg(2)?, n, prefetch, every).await?
        }
        "pipeline" => pipeline(&channel, arg(2)?, n, arg(4)?).await?,
        other => bail!("unknown mode {other:?}"),
    };
    let cpu = cpu_seconds(pid).zip(cpu_before).map(|(b, a)| b - a);
    sluice_actors::tls::close_broker(&connection, "done").await;
    let line = serde_json::json!({
        "rate": n as f64 / elapsed.as_secs_f64().max(1e-6),
        "cpu_s": cpu,
        "peak_rss_mb": peak_rss_mb(pid),
    });
    println!("{line}");
    Ok(())
}

async fn consume(channel: &Channel, queue: &str, prefetch: u16) -> anyhow::Result<lapin::Consumer> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel
        .basic_consume(
            queue.into(),
            "probe".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// Consume and ack `n` deliveries; time from the first delivery to the last ack.
async fn broker(
    channel: &Channel,
    queue: &str,
    n: u64,
    prefetch: u16,
    every: u64,
) -> anyhow::Result<std::time::Duration> {
    let mut deliveries = consume(channel, queue, prefetch).await?;
    let mut started = None;
    for got in 1..=n {
        let delivery = deliveries.next().await.context("the consumer ended")??;
        started.get_or_insert_with(Instant::now);
        if got % every == 0 || got == n {
            let multiple = BasicAckOptions { multiple: true };
            channel.basic_ack(delivery.delivery_tag, multiple).await?;
        }
    }
    Ok(started.map_or_else(Default::default, |s| s.elapsed()))
}

/// One row on its way: the delivery tag and what is written.
type Row = (u64, EventData);

/// The plain pipeline; time from the first delivery to the last ack.
async fn pipeline(
    channel: &Channel,
    queue: &str,
    n: u64,
    database_url: &str,
) -> anyhow::Result<std::time::Duration> {
    // Bounded by the prefetch window: the reader never holds more.
    let (rows_tx, rows_rx) = mpsc::channel::<Row>(usize::from(PREFETCH));
    let rows_rx = Arc::new(Mutex::new(rows_rx));
    let (settled_tx, mut settled_rx) = mpsc::channel::<Vec<(u64, Settled)>>(WRITERS * 2);
    for _ in 0..WRITERS {
        let (client, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let statement = client.prepare(INSERT).await?;
        let (rows_rx, settled_tx) = (rows_rx.clone(), settled_tx.clone());
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            loop {
                // Adaptive: wait for one row, take everything pending (≤ MAX_BATCH).
                if rows_rx.lock().await.recv_many(&mut batch, MAX_BATCH).await == 0 {
                    return Ok::<_, anyhow::Error>(());
                }
                let data = || batch.iter().map(|(_, d): &Row| d);
                let ids: Vec<&str> = data().map(|d| d.message_id.as_str()).collect();
                let keys: Vec<&str> = data().map(|d| d.routing_key.as_str()).collect();
                let payloads: Vec<&str> = data().map(|d| d.payload.as_str()).collect();
                let headers: Vec<&str> = data().map(|d| d.headers.as_str()).collect();
                let published: Vec<_> = data().map(|d| d.published_at).collect();
                let received: Vec<_> = data().map(|d| d.received_at).collect();
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                    [&ids, &keys, &payloads, &headers, &published, &received];
                client.execute(&statement, &params).await?;
                let tags = batch
                    .drain(..)
                    .map(|(tag, _)| (tag, Settled::Ack))
                    .collect();
                settled_tx.send(tags).await?;
            }
        });
    }
    drop(settled_tx);

    let mut deliveries = consume(channel, queue, PREFETCH).await?;
    let mut started = None;
    let reader_channel = channel.clone();
    let (rejected_tx, mut rejected_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        for _ in 0..n {
            let delivery = deliveries.next().await.context("the consumer ended")??;
            let _ = started.get_or_insert_with(Instant::now);
            let key = delivery.routing_key.as_str().to_owned();
            let limits = Limits {
                max_body_bytes: 1 << 20,
            };
            let data = delivery.data;
            let now = SystemTime::now();
            match EventData::from_delivery(key, data, delivery.properties, limits, now) {
                Ok(event) => rows_tx.send((delivery.delivery_tag, event)).await?,
                Err(_) => {
                    let requeue = BasicRejectOptions { requeue: false };
                    reader_channel
                        .basic_reject(delivery.delivery_tag, requeue)
                        .await?;
                    rejected_tx.send(delivery.delivery_tag)?;
                }
            }
        }
        Ok::<_, anyhow::Error>(started)
    });

    // Ack after commit, up to the contiguous settled watermark.
    let mut settlement = Settlement::new();
    while settlement.settled_count() < n {
        tokio::select! {
            Some(tag) = rejected_rx.recv() => settlement.settle(tag, Settled::Rejected),
            tags = settled_rx.recv() => {
                let tags = tags.context("the writers stopped early")?;
                for (tag, how) in tags {
                    settlement.settle(tag, how);
                }
            }
        }
        if let Some(tag) = settlement.take_ack() {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let started = reader.await??.context("no delivery")?;
    Ok(started.elapsed())
}
