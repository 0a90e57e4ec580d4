//! The HTTP side of start-up: the port, bound first of all (a port in use is
//! the commonest mistake, and is told at once) but listened on only once
//! everything else has been checked, and the server with its routes.

use std::net::{SocketAddr, TcpListener};

use actix_web::{web, App, HttpServer};
use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use socket2::{Domain, Protocol, Socket, Type};

use crate::routes;
use crate::ws::{self, WsState};

/// Connections the kernel holds until the server accepts them (actix-web's
/// own default).
const BACKLOG: i32 = 1024;

/// HTTP_ADDR, bound but not listening yet: the port is this instance's, and
/// a client trying it is refused until the service is about to serve.
pub struct Port {
    socket: Socket,
    /// As asked for (port 0 included), for messages.
    asked: SocketAddr,
}

impl Port {
    /// Binds `addr` (HTTP_ADDR), failing with a message naming it.
    pub fn bind(addr: SocketAddr) -> anyhow::Result<Port> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .and_then(|socket| {
                // As `std::net::TcpListener::bind` does: a port the previous
                // run left in TIME_WAIT is free again at once.
                socket.set_reuse_address(true)?;
                socket.bind(&addr.into())?;
                Ok(socket)
            })
            .with_context(|| format!("cannot listen on HTTP_ADDR={addr}"))?;
        Ok(Port {
            socket,
            asked: addr,
        })
    }
}

/// What every route shares.
pub struct Shared {
    /// `/readyz`: the broker's status and the pool.
    pub readiness: web::Data<routes::health::Readiness>,
    /// `/metrics` and `/api/stats`.
    pub metrics: web::Data<PrometheusHandle>,
    /// `/ws`: settings, the Observable, the sessions open.
    pub ws: web::Data<WsState>,
    /// `/api/dead-letters`: the broker settings, the token, the counts cache.
    pub dead_letters: web::Data<routes::dead_letters::DeadLetterDesk>,
    /// `SO_SNDBUF` of accepted connections (`WS_WINDOW_BYTES`).
    pub send_buffer: usize,
}

/// Listens on `port` and builds the server with every route. The server
/// accepts nothing until the returned [`actix_web::dev::Server`] is polled
/// (`Application::run_until` spawns it); until then connections wait in the
/// backlog. Returns the address listened on (the real port when 0 was asked for).
pub fn server(port: Port, shared: Shared) -> anyhow::Result<(SocketAddr, actix_web::dev::Server)> {
    let asked = port.asked;
    port.socket
        .listen(BACKLOG)
        .with_context(|| format!("cannot listen on HTTP_ADDR={asked}"))?;
    let listener = TcpListener::from(port.socket);
    let http_addr = listener.local_addr().context("reading the bound address")?;
    let Shared {
        readiness,
        metrics,
        ws,
        dead_letters,
        send_buffer,
    } = shared;
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
    Ok((http_addr, server))
}
