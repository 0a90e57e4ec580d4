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
//! Shutdown is passed in as a future, which is what lets tests drive it. An
//! HTTP server that ends by itself ends the service too (after draining, as
//! on SIGTERM), with an error: it is never left running without HTTP.

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
use sluice_actors::saturation::Saturation;
use sluice_actors::writer::WriteHold;

use crate::config::Config;
use crate::routes::dead_letters::DeadLetterDesk;
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
        // The prefetch window's fullness, read by the live path to yield.
        let saturation = Saturation::new(config.amqp_prefetch);
        let ws = web::Data::new(
            WsState::new(config.ws(&saturation), live.observable()).with_replays(live.replays()),
        );
        let observers = ws.connected.clone();
        let broker = BrokerStatus::default();
        let writes_held = WriteHold::default();
        let readiness = Readiness {
            broker: broker.clone(),
            pool: database.pool,
            writes: writes_held.clone(),
        };
        let dead_letters = DeadLetterDesk::new(
            config.amqp_url.clone(),
            broker_tls.clone(),
            &config.amqp_prefix,
            config.auth_token.clone(),
        );
        let (http_addr, server) = http::server(
            port,
            http::Shared {
                readiness: web::Data::new(readiness),
                metrics: web::Data::new(metrics),
                ws,
                dead_letters: web::Data::new(dead_letters),
                send_buffer: config.ws_window_bytes as usize,
            },
        )?;

        // Then the actors; nothing below can fail.
        let (live_arbiter, copies) = live.start(&config, observers, saturation.clone()).await;
        let consumer = pipeline::start(
            &config,
            broker_tls,
            database.store,
            writes_held,
            copies,
            broker,
            saturation,
        );
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
    /// timeout (unacked deliveries are then redelivered by the broker), and
    /// if the HTTP server ends by itself (after draining just the same).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Application {
            server,
            consumer,
            shutdown_timeout,
            _live_arbiter,
            ..
        } = self;
        serve(server, shutdown, drain(consumer, shutdown_timeout)).await
    }
}

/// Runs `server` until `shutdown` completes or the server ends by itself
/// (a failure, such as a worker that could not start), then drains with
/// `drain` while the server still serves (unless it is gone), then stops it.
/// An HTTP server that ended by itself is an error: without it the service
/// would go on with no health checks, metrics or dashboards, and say nothing.
async fn serve(
    server: actix_web::dev::Server,
    shutdown: impl Future<Output = ()>,
    drain: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let handle = server.handle();
    let mut running = actix_web::rt::spawn(server);
    let ended = tokio::select! {
        () = shutdown => None,
        ended = &mut running => Some(ended),
    };
    let Some(ended) = ended else {
        let drained = drain.await;
        handle.stop(true).await;
        match running.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => log::warn!("the HTTP server failed while stopping: {err}"),
            Err(err) => log::warn!("the HTTP server failed while stopping: {err}"),
        }
        return drained;
    };
    let why = match ended {
        Ok(Ok(())) => "the HTTP server stopped by itself".to_owned(),
        Ok(Err(err)) => format!("the HTTP server failed: {err}"),
        Err(err) => format!("the HTTP server failed: {err}"),
    };
    log::warn!("{why}");
    match drain.await {
        Ok(()) => bail!("{why} (the pipeline was drained before exiting)"),
        Err(err) => Err(err.context(why)),
    }
}

/// Asks the consumer to drain, for at most `timeout`. Nothing is asked until
/// this is awaited (`Addr::send` queues its message when called).
async fn drain(consumer: Addr<Consumer>, timeout: Duration) -> anyhow::Result<()> {
    log::info!("shutting down: draining (at most {timeout:?})");
    match tokio::time::timeout(timeout, consumer.send(Shutdown)).await {
        Ok(Ok(())) => {
            log::info!("drained; bye");
            Ok(())
        }
        Ok(Err(err)) => bail!("the consumer stopped before draining: {err}"),
        Err(_) => bail!(
            "pending events were not all stored within SHUTDOWN_TIMEOUT ({timeout:?}); \
             the broker will redeliver the rest"
        ),
    }
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    //! `serve`'s decisions, with real actix-web servers (a real failure
    //! cannot be provoked in the `sluice` binary from outside: see
    //! `a_server_that_fails_to_start_ends_the_run_after_draining`).

    use std::cell::Cell;
    use std::net::TcpListener;
    use std::rc::Rc;

    use actix_web::{App, HttpResponse, HttpServer};

    use super::*;

    /// Long enough for anything below; a run still going then is the bug.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A drain that records that it ran, and ends with `outcome`.
    fn drain_recorded(
        ran: &Rc<Cell<bool>>,
        outcome: anyhow::Result<()>,
    ) -> impl Future<Output = anyhow::Result<()>> {
        let ran = Rc::clone(ran);
        async move {
            ran.set(true);
            outcome
        }
    }

    fn local_listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").expect("bind a local port")
    }

    /// actix-server fails when a worker cannot build its services (as when a
    /// thread or an epoll instance cannot be made: resource exhaustion, which
    /// nothing outside the process can bring about at the one moment it
    /// matters). Here the app's data cannot be built.
    #[actix_web::test]
    async fn a_server_that_fails_to_start_ends_the_run_after_draining() {
        let server = HttpServer::new(|| {
            App::new()
                .data_factory(|| async { Err::<u32, _>("no data for this app") })
                .route("/", web::get().to(HttpResponse::Ok))
        })
        .workers(1)
        .disable_signals()
        .listen(local_listener())
        .expect("listen")
        .run();
        let drained = Rc::new(Cell::new(false));
        let run = serve(
            server,
            std::future::pending(),
            drain_recorded(&drained, Ok(())),
        );
        let result = tokio::time::timeout(PATIENCE, run)
            .await
            .expect("the run ends when its HTTP server does");
        let err = result.expect_err("a failed HTTP server is an error");
        let message = format!("{err:#}");
        assert!(message.starts_with("the HTTP server failed: "), "{message}");
        assert!(message.contains("drained"), "{message}");
        assert!(drained.get(), "the pipeline was drained first");
    }

    /// A server that stops while nobody asked the service to: the run ends
    /// with an error, after draining; a drain that failed is told too.
    #[actix_web::test]
    async fn a_server_that_stops_by_itself_ends_the_run_after_draining() {
        let server = HttpServer::new(|| App::new().route("/", web::get().to(HttpResponse::Ok)))
            .workers(1)
            .disable_signals()
            .listen(local_listener())
            .expect("listen")
            .run();
        let handle = server.handle();
        actix_web::rt::spawn(async move { handle.stop(false).await });
        let drained = Rc::new(Cell::new(false));
        let run = serve(
            server,
            std::future::pending(),
            drain_recorded(
                &drained,
                Err(anyhow::anyhow!(
                    "pending events were not all stored within SHUTDOWN_TIMEOUT"
                )),
            ),
        );
        let result = tokio::time::timeout(PATIENCE, run)
            .await
            .expect("the run ends when its HTTP server does");
        let message = format!(
            "{:#}",
            result.expect_err("a stopped HTTP server is an error")
        );
        assert_eq!(
            message,
            "the HTTP server stopped by itself: \
             pending events were not all stored within SHUTDOWN_TIMEOUT"
        );
        assert!(drained.get(), "the pipeline was drained first");
    }
}
