//! Builds the pipeline (Consumer → Tap → Queue → Writers, and the
//! Observable), the HTTP server, and runs them until a shutdown is asked for.
//!
//! Shutdown is passed in as a future, which is what lets tests drive it.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::str::FromStr;
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
use sluice_actors::messages::{DroppedCopies, LiveBacklog};
use sluice_actors::observable::Observable;
use sluice_actors::queue::{Queue, QueueSettings};
use sluice_actors::store::PgStore;
use sluice_actors::tap::Tap;
use sluice_actors::writer::{RetrySettings, Writer};

use crate::config::Config;
use crate::routes;
use crate::ws::{self, WsState};

mod embedded {
    refinery::embed_migrations!("migrations");
}

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
        let pool = connect_database(&config).await?;
        migrate(&pool).await?;

        let live_arbiter = Arbiter::new();
        let dropped_copies = DroppedCopies::default();
        let upstream_drops = dropped_copies.clone();
        let observable = Observable::start_in_arbiter(&live_arbiter.handle(), |ctx| {
            // Small chunks are many messages; memory is bounded in events by
            // the Tap's LiveBacklog instead.
            ctx.set_mailbox_capacity(1024);
            Observable::with_upstream(upstream_drops)
        });
        let ws = web::Data::new(WsState::new(config.ws(), observable.clone()));
        let observers = ws.connected.clone();

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
        let tap = Tap::create(|ctx| {
            ctx.set_mailbox_capacity(2);
            Tap::new(
                queue.clone().recipient(),
                observable.clone().recipient(),
                observers.clone(),
                LiveBacklog::new(LIVE_BACKLOG_EVENTS),
                dropped_copies,
            )
        });

        let broker = BrokerStatus::default();
        let consumer_settings = ConsumerSettings {
            amqp_url: config.amqp_url.clone(),
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

        let store = Arc::new(PgStore::new(pool.clone()));
        for id in 0..writers {
            Writer::new(
                id,
                store.clone(),
                queue.clone().recipient(),
                consumer.clone().recipient(),
                RetrySettings::default(),
            )
            .start();
        }

        let listener = TcpListener::bind(config.http_addr)
            .with_context(|| format!("cannot listen on HTTP_ADDR={}", config.http_addr))?;
        let http_addr = listener.local_addr().context("reading the bound address")?;
        let readiness = web::Data::new(routes::health::Readiness {
            broker: broker.clone(),
            pool: pool.clone(),
        });
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

/// The writers' pool (plus two connections for `/readyz` and migrations).
async fn connect_database(config: &Config) -> anyhow::Result<Pool> {
    let mut pg = tokio_postgres::Config::from_str(&config.database_url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    pg.connect_timeout(Duration::from_secs(5));
    pg.application_name("sluice");
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
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
/// database to come up.
async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_total_delay(Some(Duration::from_secs(60)))
        .with_jitter()
        .build();
    let mut client = loop {
        match pool.get().await {
            Ok(client) => break client,
            Err(err) => match delays.next() {
                Some(delay) => {
                    log::warn!("database unavailable ({err}); retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(err).context("cannot connect to the database (DATABASE_URL)"),
            },
        }
    };
    let client: &mut tokio_postgres::Client = &mut client;
    let report = embedded::migrations::runner()
        .run_async(client)
        .await
        .context("applying database migrations")?;
    for migration in report.applied_migrations() {
        log::info!("applied migration {migration}");
    }
    Ok(())
}
