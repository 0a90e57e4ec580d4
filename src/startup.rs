//! Builds the pipeline (Consumer → Tap → Queue → Writers, and the
//! Observable), the HTTP server, and runs them until a shutdown is asked for.
//!
//! Shutdown is passed in as a future, which is what lets tests drive it.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, App, HttpServer};
use anyhow::{bail, Context as _};
use backon::{BackoffBuilder, ExponentialBuilder};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use metrics_exporter_prometheus::PrometheusHandle;
use sluice_actors::consumer::{BrokerStatus, Consumer, ConsumerSettings, Shutdown, Topology};
use sluice_actors::event::Limits;
use sluice_actors::live_feed::{self, publisher::FeedPublisher, FeedSettings};
use sluice_actors::mapped_store::{MappedStore, TableMapping};
use sluice_actors::messages::{DroppedCopies, LiveBacklog, Publish};
use sluice_actors::observable::Observable;
use sluice_actors::queue::{Queue, QueueSettings};
use sluice_actors::store::{PgStore, Store};
use sluice_actors::tap::Tap;
use sluice_actors::writer::{RetrySettings, WriteHold, Writer};

use crate::config::{Config, LiveFeedArg};
use crate::database::DatabaseTarget;
use crate::mapping;
use crate::routes;
use crate::ws::{self, WsState};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The key of the PostgreSQL advisory lock held while migrating (an arbitrary
/// constant: "sluice" in ASCII). Every instance of every version uses it.
const MIGRATION_LOCK: i64 = 0x736c_7569_6365;

/// How long start-up waits for the live feed to read the stream before
/// consuming anyway (`LIVE_FEED=stream`).
const FEED_ATTACH_WAIT: Duration = Duration::from_secs(10);

/// Most deliveries handed to the Tap in one message.
const CHUNK: usize = 512;

/// Most events copied to the live path and not yet handled by the Observable.
const LIVE_BACKLOG_EVENTS: usize = 16 * 1024;

/// The running service.
pub struct Application {
    /// Where the HTTP server listens (the real port when 0 was asked for).
    http_addr: SocketAddr,
    /// The HTTP server; stopped after the pipeline has drained.
    server: actix_web::dev::Server,
    /// Asked to drain on shutdown.
    consumer: Addr<Consumer>,
    shutdown_timeout: Duration,
    /// Runs the Observable on its own thread, away from the datastore path.
    _live_arbiter: Arbiter,
}

impl Application {
    /// Connects to the database (migrating it), starts every actor and binds
    /// the HTTP server. Must run inside an actix `System`.
    pub async fn build(config: Config, metrics: PrometheusHandle) -> anyhow::Result<Application> {
        let mapping = config.mapping.as_deref().map(mapping::load).transpose()?;
        let database = DatabaseTarget::parse(&config.database_url)?;
        let pool = connect_database(&config, &database)?;
        migrate(&pool, &database).await?;
        let store = writers_store(&config, &pool, mapping).await?;
        let broker_tls = config.broker_tls()?;

        let live_arbiter = Arbiter::new();
        let dropped_copies = DroppedCopies::default();
        let upstream_drops = dropped_copies.clone();
        let history = config.live_history as usize;
        let stream_feed = config.live_feed == LiveFeedArg::Stream;
        let observable = Observable::start_in_arbiter(&live_arbiter.handle(), move |ctx| {
            // Small chunks are many messages; memory is bounded in events by
            // the Tap's LiveBacklog instead.
            ctx.set_mailbox_capacity(1024);
            if stream_feed {
                // The Tap's drops are numbered by the feed publisher and come
                // back, from the stream, as gaps in this instance's sequence.
                Observable::new()
                    .with_history(history)
                    .with_shared_positions()
            } else {
                Observable::with_upstream(upstream_drops).with_history(history)
            }
        });
        let ws = web::Data::new(WsState::new(config.ws(), observable.clone()));
        let observers = ws.connected.clone();
        let copy_target: Recipient<Publish> = if stream_feed {
            let feed = feed_settings(&config, &broker_tls);
            log::info!(
                "live feed: stream {} (every instance's events, one order)",
                feed.stream
            );
            let (attached, reading) = tokio::sync::oneshot::channel();
            let reader = live_feed::reader::run(
                feed.clone(),
                observable.clone().recipient(),
                LiveBacklog::new(LIVE_BACKLOG_EVENTS),
                attached,
            );
            live_arbiter.spawn(reader);
            // Read the stream before consuming the ingest queue, so this
            // instance's dashboards see every event it stores from the start.
            if tokio::time::timeout(FEED_ATTACH_WAIT, reading)
                .await
                .is_err()
            {
                log::warn!(
                    "the live feed is not reading {} after {FEED_ATTACH_WAIT:?}; \
                     starting anyway (it keeps trying)",
                    feed.stream
                );
            }
            let drops = dropped_copies.clone();
            FeedPublisher::start_in_arbiter(&live_arbiter.handle(), move |ctx| {
                ctx.set_mailbox_capacity(1024);
                FeedPublisher::new(feed, drops)
            })
            .recipient()
        } else {
            observable.clone().recipient()
        };

        let writers = usize::from(config.writers);
        let queue_settings = QueueSettings {
            capacity: config.queue_capacity as usize,
            max_batch: config.max_batch as usize,
            on_full: config.queue_on_full.into(),
            dedupe: config.queue_dedupe.clone(),
            batching: config.batching(),
            writers,
        };
        let queue = Queue::create(|ctx| {
            // Writers' reports plus the Tap's chunk: a writer never waits long.
            ctx.set_mailbox_capacity(writers + 4);
            Queue::new(queue_settings)
        });
        // The Tap copies while anyone watches. With a history ring, the ring
        // always watches: it counts as one standing observer.
        let copy_demand = if config.live_history > 0 || stream_feed {
            Arc::new(AtomicUsize::new(1))
        } else {
            observers.clone()
        };
        let tap = Tap::create(|ctx| {
            ctx.set_mailbox_capacity(2);
            Tap::new(
                queue.clone().recipient(),
                copy_target,
                copy_demand,
                LiveBacklog::new(LIVE_BACKLOG_EVENTS),
                dropped_copies,
            )
        });

        let broker = BrokerStatus::default();
        let consumer_settings = ConsumerSettings {
            amqp_url: config.amqp_url.clone(),
            tls: broker_tls.clone(),
            topology: Topology::new(&config.amqp_prefix),
            prefetch: config.amqp_prefetch,
            quorum: config.amqp_quorum,
            limits: Limits {
                max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
            },
            chunk: CHUNK,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            stall_timeout: config.amqp_stall_timeout,
        };
        let consumer = {
            let tap = tap.clone().recipient();
            let broker = broker.clone();
            Consumer::create(move |ctx| {
                ctx.set_mailbox_capacity(writers + 4);
                Consumer::new(consumer_settings, tap, broker)
            })
        };

        let writes_held = WriteHold::default();
        for id in 0..writers {
            Writer::new(
                id,
                store.clone(),
                queue.clone().recipient(),
                consumer.clone().recipient(),
                RetrySettings::default(),
            )
            .with_hold(writes_held.clone())
            .start();
        }

        let listener = TcpListener::bind(config.http_addr)
            .with_context(|| format!("cannot listen on HTTP_ADDR={}", config.http_addr))?;
        let http_addr = listener.local_addr().context("reading the bound address")?;
        let readiness = web::Data::new(routes::health::Readiness {
            broker: broker.clone(),
            pool: pool.clone(),
            writes: writes_held,
        });
        let dead_letters = web::Data::new(routes::dead_letters::DeadLetterDesk::new(
            config.amqp_url.clone(),
            broker_tls,
            &config.amqp_prefix,
            config.auth_token.clone(),
        ));
        let metrics = web::Data::new(metrics);
        let send_buffer = config.ws_window_bytes as usize;
        let server = HttpServer::new(move || {
            App::new()
                .app_data(readiness.clone())
                .app_data(metrics.clone())
                .app_data(ws.clone())
                .route("/ws", web::get().to(ws::ws_route))
                .route("/healthz", web::get().to(routes::health::healthz))
                .route("/readyz", web::get().to(routes::health::readyz))
                .route("/metrics", web::get().to(routes::metrics::metrics))
                .route("/api/stats", web::get().to(routes::stats::stats))
                .app_data(dead_letters.clone())
                .route(
                    "/api/dead-letters",
                    web::get().to(routes::dead_letters::list),
                )
                .route(
                    "/api/dead-letters/replay",
                    web::post().to(routes::dead_letters::replay_route),
                )
                .route("/", web::get().to(routes::dashboard::index))
                .route("/static/{file:.*}", web::get().to(routes::dashboard::asset))
        })
        .on_connect(move |connection, _| ws::limit_send_buffer(connection, send_buffer))
        .workers(2)
        .disable_signals()
        .shutdown_timeout(2)
        .listen(listener)
        .context("starting the HTTP server")?
        .run();
        log::info!("listening on http://{http_addr}");

        Ok(Application {
            http_addr,
            server,
            consumer,
            shutdown_timeout: config.shutdown_timeout,
            _live_arbiter: live_arbiter,
        })
    }

    /// The address the HTTP server is bound to.
    #[must_use]
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Serves until `shutdown` completes, then drains the pipeline: the
    /// consumer is cancelled, what was delivered is stored and acked, the
    /// connection is closed. Fails if that takes longer than the shutdown
    /// timeout (unacked deliveries are then redelivered by the broker).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = actix_web::rt::spawn(self.server);
        shutdown.await;
        log::info!(
            "shutting down: draining (at most {:?})",
            self.shutdown_timeout
        );
        let drained =
            tokio::time::timeout(self.shutdown_timeout, self.consumer.send(Shutdown)).await;
        handle.stop(true).await;
        let _ = server.await;
        match drained {
            Ok(Ok(())) => {
                log::info!("drained; bye");
                Ok(())
            }
            Ok(Err(err)) => bail!("the consumer stopped before draining: {err}"),
            Err(_) => bail!(
                "pending events were not all stored within SHUTDOWN_TIMEOUT ({:?}); \
                 the broker will redeliver the rest",
                self.shutdown_timeout
            ),
        }
    }
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
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
    let path = config
        .mapping
        .as_deref()
        .unwrap_or(std::path::Path::new(""));
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

/// The live feed's settings (`LIVE_FEED=stream`).
fn feed_settings(config: &Config, tls: &sluice_actors::tls::BrokerTls) -> FeedSettings {
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    FeedSettings {
        amqp_url: config.amqp_url.clone(),
        tls: tls.clone(),
        stream: format!("{}.live", config.amqp_prefix),
        max_age: config.live_stream_max_age,
        max_bytes: config.live_stream_max_bytes,
        max_unconfirmed: config.live_stream_max_unconfirmed as usize,
        // One sequence per process: a restarted instance is a new origin.
        origin: format!("{}/{}-{started_ms}", config.instance(), std::process::id()),
        prefetch: 1000,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(10),
    }
}

/// The writers' pool (plus two connections for `/readyz` and migrations),
/// over TLS as `sslmode` in DATABASE_URL asks.
fn connect_database(config: &Config, database: &DatabaseTarget) -> anyhow::Result<Pool> {
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

/// Applies the migrations in `migrations/`, waiting up to a minute for the
/// database to come up (but not for a certificate it refused).
async fn migrate(pool: &Pool, database: &DatabaseTarget) -> anyhow::Result<()> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_total_delay(Some(Duration::from_secs(60)))
        .with_jitter()
        .build();
    let client = loop {
        match pool.get().await {
            Ok(client) => break client,
            Err(err) if DatabaseTarget::is_certificate_error(&err) => {
                bail!("{}", database.describe_error(&err))
            }
            Err(err) => match delays.next() {
                Some(delay) => {
                    log::warn!(
                        "database unavailable ({}); retrying in {delay:?}",
                        database.describe_error(&err)
                    );
                    tokio::time::sleep(delay).await;
                }
                None => bail!("{}", database.describe_error(&err)),
            },
        }
    };
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
