//! Scenario "mapping": the backlog drain written into a user's own table
//! through a 5-column `--mapping`, against the same drain into Sluice's
//! `events` table, measured in the same run: the ratio is the cost of the
//! mapping (each body parsed once, JSON rows cast by PostgreSQL). The same
//! rows are also written through each store alone (no broker), which shows
//! the mapping's cost where the broker does not hide it.

use std::time::{Duration, Instant, SystemTime};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use lapin::BasicProperties;
use sluice::load::sample_body;
use sluice_actors::mapped_store::MappedStore;
use sluice_actors::store::{PgStore, Store, StoreError};
use sluice_actors::{DeliveryRef, Event, EventData};

use crate::rig::{Rig, Strategy, BATCH_SIZE};
use crate::scenarios::ceiling::{PG_BATCH, PG_WRITERS};
use crate::scenarios::drain::{drain, prepare_backlog};
use crate::{say, Bench, DrainResult, MappingResult};

/// The user's table: five typed columns, keyed by the message id.
const TABLE: &str = "
CREATE TABLE readings (
    msg_id      text PRIMARY KEY,
    topic       text NOT NULL,
    sensor      int NOT NULL,
    value       double precision,
    received_at timestamptz NOT NULL
)";

/// The mapping: two properties, two JSON pointers, the receive time.
const MAPPING: &str = r#"
table = "readings"
conflict = ["msg_id"]

[columns]
msg_id      = "message_id"
topic       = "routing_key"
sensor      = "/sensor"
value       = "/value"
received_at = "received_at"
"#;

/// Rounds of (`events`, mapped) drains, alternated so that other work on the
/// machine falls on both sides alike.
const ROUNDS: usize = 2;

/// Drain the same backlog into `events`, then into the mapped table, twice;
/// compare the best of each side.
pub async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let n = bench.scale.drain_messages;
    let mut defaults = Vec::with_capacity(ROUNDS);
    let mut mappeds = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        say(format!(
            "mapping {round}/{ROUNDS}: {n} pre-filled messages into `events` (the baseline)"
        ));
        let default = drain_default(&bench.bin, n).await?;
        say(format!(
            "mapping {round}/{ROUNDS}: {n} pre-filled messages into a 5-column table"
        ));
        let mapped = drain_into_mapping(&bench.bin, n).await?;
        say(format!(
            "  round {round}: events {:.0} msgs/s (peak RSS {:.0} MB, mean batch {:.0}), \
             readings {:.0} msgs/s (peak RSS {:.0} MB, mean batch {:.0}): {:.2}×",
            default.rate,
            default.peak_rss_mb.unwrap_or(0.0),
            default.mean_batch.unwrap_or(0.0),
            mapped.rate,
            mapped.peak_rss_mb.unwrap_or(0.0),
            mapped.mean_batch.unwrap_or(0.0),
            mapped.rate / default.rate.max(1e-9)
        ));
        defaults.push(default);
        mappeds.push(mapped);
    }
    let best = |runs: &[DrainResult]| {
        runs.iter()
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
            .cloned()
            .context("no round ran")
    };
    let (default, mapped) = (best(&defaults)?, best(&mappeds)?);

    // The same rows through each store alone, no broker: what the mapping
    // costs the service and the database when the broker is not the limit.
    let mut alone = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        let events_rate = store_alone(n, None).await?;
        let mapped_rate = store_alone(n, Some(MAPPING)).await?;
        say(format!(
            "  store alone, round {round}: events {events_rate:.0} rows/s, readings \
             {mapped_rate:.0} rows/s: {:.2}×",
            mapped_rate / events_rate.max(1e-9)
        ));
        alone.push((events_rate, mapped_rate));
    }
    let best_events = alone.iter().map(|a| a.0).fold(0.0, f64::max);
    let best_mapped = alone.iter().map(|a| a.1).fold(0.0, f64::max);
    bench.note(format!(
        "mapping: the stores alone (no broker; {PG_WRITERS} connections, batches of \
         {PG_BATCH}): {best_mapped:.0} rows/s into the mapped table against {best_events:.0} \
         rows/s into `events`, best of {ROUNDS}: {:.2}×",
        best_mapped / best_events.max(1e-9)
    ));
    let ratio = mapped.rate / default.rate.max(1e-9);
    let rounds: Vec<String> = defaults
        .iter()
        .zip(&mappeds)
        .map(|(d, m)| format!("{:.0} vs {:.0}", m.rate, d.rate))
        .collect();
    bench.note(format!(
        "mapping: draining {n} messages into a 5-column mapped table ran at {:.0} msgs/s \
         (peak RSS {:.0} MB), against {:.0} msgs/s (peak RSS {:.0} MB) into `events`, best \
         of {ROUNDS} alternated rounds in the same run ({}): {ratio:.2}×",
        mapped.rate,
        mapped.peak_rss_mb.unwrap_or(0.0),
        default.rate,
        default.peak_rss_mb.unwrap_or(0.0),
        rounds.join(", ")
    ));
    bench.results.mapping = Some(MappingResult {
        default,
        mapped,
        ratio,
    });
    Ok(())
}

/// One drain into `events`, on its own rig.
async fn drain_default(bin: &std::path::Path, n: u64) -> anyhow::Result<DrainResult> {
    let mut rig = Rig::new(bin, Strategy::Adaptive, false, &[]).await?;
    let measured = drain(&mut rig, n, TIMEOUT).await;
    rig.finish().await;
    measured
}

/// One drain into the mapped table, on its own rig.
async fn drain_into_mapping(bin: &std::path::Path, n: u64) -> anyhow::Result<DrainResult> {
    let file = std::env::temp_dir().join(format!(
        "sluice-bench-mapping-{}.toml",
        sluice_testkit::random_suffix()
    ));
    std::fs::write(&file, MAPPING).context("writing the mapping file")?;
    let env = [("MAPPING", file.display().to_string())];
    let mut rig = Rig::new(bin, Strategy::Adaptive, false, &env).await?;
    rig.db.execute(TABLE).await;
    let measured = drain_mapped(&mut rig, n, TIMEOUT).await;
    rig.finish().await;
    let _ = std::fs::remove_file(&file);
    measured
}

/// Inserts `n` sample events through the writers' store (`events`, or the
/// mapped table when `mapping` is given) in batches of [`PG_BATCH`] on
/// [`PG_WRITERS`] connections; rows/s. The events are built up front, so the
/// store's own work (rows built, statement run) is what is timed.
async fn store_alone(n: u64, mapping: Option<&str>) -> anyhow::Result<f64> {
    let db = sluice_testkit::fresh_database().await;
    let config: tokio_postgres::Config = db.url().parse().context("test database URL")?;
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(PG_WRITERS)
        .build()
        .context("building the pool")?;
    let (store, table): (Arc<dyn Store>, &str) = match mapping {
        Some(text) => {
            db.execute(TABLE).await;
            let mapping = sluice::mapping::parse(text).context("the bench's mapping")?;
            (Arc::new(MappedStore::new(pool, mapping)), "readings")
        }
        None => {
            db.execute(EVENTS_SCHEMA).await;
            (Arc::new(PgStore::new(pool)), "events")
        }
    };
    let now = SystemTime::now();
    let events: Vec<Event> = (0..n)
        .map(|i| Event {
            delivery: DeliveryRef {
                channel: 1,
                tag: i + 1,
            },
            merged: Vec::new(),
            data: Arc::new(EventData {
                message_id: format!("alone-{i}"),
                routing_key: format!("sensor.{}.reading", i % 8),
                payload: String::from_utf8_lossy(&sample_body(i, 8, 256)).into_owned(),
                headers: "{}".to_owned(),
                published_at: Some(now),
                received_at: now,
                properties: BasicProperties::default(),
            }),
        })
        .collect();
    let batches: Arc<Vec<Vec<Event>>> =
        Arc::new(events.chunks(PG_BATCH).map(<[Event]>::to_vec).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..PG_WRITERS {
        let (store, batches, next) = (store.clone(), batches.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(batch) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                store.insert(batch).await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for task in tasks {
        task.await.context("insert task panicked")??;
    }
    let elapsed = started.elapsed();
    let rows = db.count_rows(table).await;
    if u64::try_from(rows).unwrap_or(0) != n {
        bail!("store alone: {rows} rows in {table}, {n} expected");
    }
    Ok(n as f64 / elapsed.as_secs_f64().max(1e-6))
}

/// The migration that creates the service's own table.
const EVENTS_SCHEMA: &str = include_str!("../../../migrations/V1__create_events.sql");

/// Longest a drain may take.
const TIMEOUT: Duration = Duration::from_secs(600);

/// [`drain`] into the mapped table: pre-fill `n`, start, wait for the rows.
async fn drain_mapped(rig: &mut Rig, n: u64, timeout: Duration) -> anyhow::Result<DrainResult> {
    prepare_backlog(rig, n).await?;
    let spawned_at = SystemTime::now();
    let started = Instant::now();
    rig.start().await?;
    let target = i64::try_from(n).unwrap_or(i64::MAX);
    let deadline = started + timeout;
    loop {
        let stored = rig.db.try_count_rows("readings").await.unwrap_or(0);
        if stored >= target {
            break;
        }
        if Instant::now() >= deadline {
            bail!("only {stored} of {n} rows stored in the mapped table in time");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let wall = started.elapsed();
    let done_at = SystemTime::now();
    let first_received: SystemTime = rig
        .db
        .query_scalar("SELECT min(received_at) FROM readings", &[])
        .await;
    let startup = first_received
        .duration_since(spawned_at)
        .unwrap_or_default();
    let busy = done_at
        .duration_since(first_received)
        .unwrap_or_else(|_| wall.saturating_sub(startup));
    let batches = rig.scrape().await?.histogram(BATCH_SIZE);
    Ok(DrainResult {
        messages: n,
        wall,
        busy,
        rate: n as f64 / busy.as_secs_f64().max(1e-6),
        peak_rss_mb: rig.peak_rss_mb(),
        mean_batch: batches.mean(),
        broker_ceiling: None,
        broker_ceiling_after: None,
        left_in_queue: None,
        cpu_us_per_msg: None,
        plain: None,
    })
}
