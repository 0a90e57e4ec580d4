//! Starts the service, and runs it until a shutdown is asked for.
//!
//! [`Application::build`] calls one builder per part, in an order that
//! matters: first everything that can fail (the HTTP port, the broker's TLS
//! files, the mapping, the database and its migrations, the HTTP server),
//! then the actors (the live path, then the datastore path), after which
//! nothing can fail. A failed start thus leaves nothing running: no actor is
//! left unstarted when `main` leaves the runtime (its `started` would then
//! run outside it, and panic).
//!
//! - `http.rs`: the port (bound first, listened on last) and the server
//! - `database.rs`: the mapping, the pool, migrations, the writers' store
//! - `live.rs`: the Observable on its own thread; `LIVE_FEED=stream`'s feed
//! - `pipeline.rs`: the Queue, the Tap, the Consumer and the Writers
//!
//! Shutdown is passed in as a future, which is what lets tests drive it.

mod database;
mod http;
mod live;
mod pipeline;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use actix_web::web;
use anyhow::bail;
use metrics_exporter_prometheus::PrometheusHandle;
use sluice_actors::consumer::{BrokerStatus, Consumer, Shutdown};

use crate::config::Config;
use crate::routes::health::Readiness;
use crate::ws::WsState;
use database::Database;
use live::LivePath;

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
    /// Checks everything that can fail at start-up, then starts every actor
    /// and the HTTP server. Fails (with a message naming the setting at
    /// fault) only before any actor runs. Must run inside an actix `System`.
    pub async fn build(config: Config, metrics: PrometheusHandle) -> anyhow::Result<Application> {
        // First what can fail; nothing runs yet.
        let port = http::Port::bind(config.http_addr)?;
        let broker_tls = config.broker_tls()?;
        let database = Database::open(&config).await?;
        let live = LivePath::reserve(&config, &broker_tls);
        let ws = web::Data::new(
            WsState::new(config.ws(), live.observable()).with_replays(live.replays()),
        );
        let observers = ws.connected.clone();
        let broker = BrokerStatus::default();
        let readiness = Readiness {
            broker: broker.clone(),
            pool: database.pool,
        };
        let (http_addr, server) = http::server(
            port,
            http::Shared {
                readiness: web::Data::new(readiness),
                metrics: web::Data::new(metrics),
                ws,
                send_buffer: config.ws_window_bytes as usize,
            },
        )?;

        // Then the actors; nothing below can fail.
        let (live_arbiter, copies) = live.start(&config, observers).await;
        let consumer = pipeline::start(&config, broker_tls, database.store, copies, broker);
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
