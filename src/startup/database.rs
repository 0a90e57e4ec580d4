//! The database side of start-up: the mapping read, the pool built, the
//! database waited for (up to DATABASE_START_TIMEOUT), the migrations
//! applied (instances taking turns), and the table the writers write into
//! checked. Everything here can fail, and runs before any actor.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use backon::{BackoffBuilder, ExponentialBuilder};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sluice_actors::mapped_store::{MappedStore, TableMapping};
use sluice_actors::store::{PgStore, Store};
use tokio::time::Instant;

use crate::config::Config;
use crate::database::DatabaseTarget;
use crate::mapping;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The key of the PostgreSQL advisory lock held while migrating (an arbitrary
/// constant: "sluice" in ASCII). Every instance of every version uses it.
const MIGRATION_LOCK: i64 = 0x736c_7569_6365;

/// The database, migrated and checked.
pub struct Database {
    /// The writers' pool (also read by `/readyz`).
    pub pool: Pool,
    /// Where the writers write: `events`, or the user's mapped table.
    pub store: Arc<dyn Store>,
}

impl Database {
    /// Reads MAPPING (if set), connects to DATABASE_URL, migrates, and checks
    /// the mapped table. Fails with a message naming the setting at fault.
    pub async fn open(config: &Config) -> anyhow::Result<Database> {
        let mapping = config.mapping.as_deref().map(mapping::load).transpose()?;
        let database = DatabaseTarget::parse(&config.database_url)?;
        let pool = connect(config, &database)?;
        migrate(&pool, &database, config.database_start_timeout).await?;
        let store = writers_store(config, &pool, mapping).await?;
        Ok(Database { pool, store })
    }
}

/// Where the writers write: Sluice's `events` table, or the user's own
/// table once the mapping has been checked against it.
async fn writers_store(
    config: &Config,
    pool: &Pool,
    mapping: Option<TableMapping>,
) -> anyhow::Result<Arc<dyn Store>> {
    let Some(mapping) = mapping else {
        return Ok(Arc::new(PgStore::new(pool.clone())));
    };
    let client = pool.get().await.context("connecting to check MAPPING")?;
    let path = config.mapping.as_deref().unwrap_or(Path::new(""));
    mapping::check(&client, &mapping).await.with_context(|| {
        format!(
            "MAPPING: the table does not fit the mapping in {}",
            path.display()
        )
    })?;
    log::info!(
        "writing into table {} ({} mapped columns)",
        mapping.table,
        mapping.columns.len()
    );
    Ok(Arc::new(MappedStore::new(pool.clone(), mapping)))
}

/// The writers' pool (plus two connections for `/readyz` and migrations),
/// over TLS as `sslmode` in DATABASE_URL asks.
fn connect(config: &Config, database: &DatabaseTarget) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        database.pool_config(),
        database.connector()?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(usize::from(config.writers) + 2)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("building the database pool")
}

/// Applies the migrations in `migrations/`, once the database is up.
async fn migrate(
    pool: &Pool,
    database: &DatabaseTarget,
    start_timeout: Duration,
) -> anyhow::Result<()> {
    let client = connect_when_up(pool, database, start_timeout).await?;
    // Migrations run under a session-level advisory lock held on the very
    // connection refinery uses, so instances started together take turns:
    // the first applies, the others then find nothing to do. (Without it,
    // two concurrent `CREATE TABLE IF NOT EXISTS refinery_schema_history`
    // race on the catalogue and one fails with a duplicate `pg_type` key.)
    // The connection is taken out of the pool, so whatever happens below,
    // closing it releases the lock; it is never handed to a writer still
    // holding it.
    let mut client = deadpool_postgres::Object::take(client);
    let client: &mut tokio_postgres::Client = &mut client;
    log::info!("waiting for the migration lock");
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("taking the migration lock (pg_advisory_lock)")?;
    let report = embedded::migrations::runner()
        .run_async(client)
        .await
        .context("applying database migrations");
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .context("releasing the migration lock (pg_advisory_unlock)");
    let report = report?;
    unlocked?;
    for migration in report.applied_migrations() {
        log::info!("applied migration {migration}");
    }
    Ok(())
}

/// A connection, once the database is up: a database that is not up yet is
/// tried again, with growing delays, until `timeout` (DATABASE_START_TIMEOUT)
/// has passed since the first attempt; a lasting refusal (no such database,
/// a certificate refused) fails at once.
async fn connect_when_up(
    pool: &Pool,
    database: &DatabaseTarget,
    timeout: Duration,
) -> anyhow::Result<deadpool_postgres::Object> {
    let deadline = Instant::now() + timeout;
    // No bound on the count: the deadline is the bound.
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let err = match pool.get().await {
            Ok(client) => return Ok(client),
            Err(err) => err,
        };
        if !DatabaseTarget::waiting_may_fix(&err) {
            bail!("{}", database.describe_error(&err));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "the database was not up within DATABASE_START_TIMEOUT={}: {}",
                humantime::format_duration(timeout),
                database.describe_error(&err)
            );
        }
        // The last attempt is made at the deadline, not skipped.
        let delay = delays.next().map_or(left, |delay| delay.min(left));
        log::warn!(
            "database unavailable ({}); retrying in {delay:?}",
            database.describe_error(&err)
        );
        tokio::time::sleep(delay).await;
    }
}
