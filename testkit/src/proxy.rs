//! A fault-injecting TCP proxy: pass, refuse, cut and delay connections to an upstream.
//!
//! Tests put it between the service and PostgreSQL: `set_mode(Mode::Refuse)` plus
//! `cut()` is a database outage (live connections die, new ones are closed at
//! once), `set_mode(Mode::Pass)` is the database coming back, and
//! `set_latency(d)` makes a local database behave like a remote one (each chunk
//! of bytes arrives `d` later in each direction, so a request/response round
//! trip costs `2 × d`, while streaming throughput is not otherwise reduced),
//! and `set_rate(r)` makes it a slow link (each direction of each connection
//! forwards at most `r` bytes a second).
//!
//! The proxy runs on its own thread with its own tokio runtime, so it works the
//! same from synchronous tests, `#[tokio::test]` and `#[actix::test]`.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

/// What the proxy does with *new* connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Connect each new client to the upstream and forward both ways.
    Pass,
    /// Accept and close each new connection at once (the client sees EOF / reset).
    Refuse,
}

/// Size of one read from either side.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight per direction while latency is applied (bounds memory).
const IN_FLIGHT_CHUNKS: usize = 256;
/// How long `cut()` waits for the cut connections to be gone.
const CUT_WAIT: Duration = Duration::from_secs(5);

/// A running proxy; stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    refuse: std::sync::atomic::AtomicBool,
    latency_nanos: AtomicU64,
    /// Bytes per second each direction forwards at most; 0 is unlimited.
    rate: AtomicU64,
    /// Live connections by id; a connection removes itself when its task ends.
    live: Mutex<HashMap<u64, AbortHandle>>,
    /// Signalled whenever a connection ends.
    ended: Condvar,
    next_id: AtomicU64,
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }
}

/// Removes its connection from the live set when the connection task ends,
/// whether it finished, failed or was aborted by `cut()`.
struct LiveGuard {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.shared.live().remove(&self.id);
        self.shared.ended.notify_all();
    }
}

impl Proxy {
    /// Start a proxy listening on `127.0.0.1:0` that forwards to `upstream`, in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = StdTcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            refuse: std::sync::atomic::AtomicBool::new(false),
            latency_nanos: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            ended: Condvar::new(),
            next_id: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let (shutdown, stop) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{addr}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            log::error!("proxy {addr}: cannot register listener: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stop => {}
                        () = accept_loop(listener, upstream, thread_shared) => {}
                    }
                });
                // Dropping the runtime here drops every connection task and its sockets.
            })?;
        Ok(Proxy {
            addr,
            upstream,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Choose what happens to new connections; live ones are not affected (see [`Proxy::cut`]).
    pub fn set_mode(&self, mode: Mode) {
        self.shared
            .refuse
            .store(mode == Mode::Refuse, Ordering::SeqCst);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        if self.shared.refuse.load(Ordering::SeqCst) {
            Mode::Refuse
        } else {
            Mode::Pass
        }
    }

    /// Delay every chunk forwarded, in each direction, by `latency` (zero to turn off).
    /// Applies to chunks read from now on, on live and new connections.
    pub fn set_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.shared.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Forward at most `bytes_per_second` in each direction of each
    /// connection (0: unlimited), as a slow link would. Applies to bytes
    /// written from now on, on live and new connections. Bytes read ahead
    /// wait in the proxy (bounded), as in a router's queue.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.shared.rate.store(bytes_per_second, Ordering::Relaxed);
    }

    /// Drop every live connection (both sockets closed) and return once they are
    /// gone (bounded wait). New connections are still accepted unless the mode is
    /// [`Mode::Refuse`]: for an outage, call `set_mode(Mode::Refuse)` first.
    /// Returns how many connections were cut.
    pub fn cut(&self) -> usize {
        let mut live = self.shared.live();
        let ids: Vec<u64> = live.keys().copied().collect();
        for handle in live.values() {
            handle.abort();
        }
        let deadline = Instant::now() + CUT_WAIT;
        while ids.iter().any(|id| live.contains_key(id)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "proxy {}: cut connections still alive after {CUT_WAIT:?}",
                    self.addr
                );
                break;
            }
            live = self
                .shared
                .ended
                .wait_timeout(live, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        ids.len()
    }

    /// Connections currently forwarded.
    pub fn live_connections(&self) -> usize {
        self.shared.live().len()
    }

    /// Connections accepted and forwarded since start (refused ones not counted).
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed at once because the mode was [`Mode::Refuse`].
    pub fn refused_connections(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // e.g. EMFILE: back off briefly instead of spinning.
                log::warn!("proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.refuse.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let guard = LiveGuard {
            id,
            shared: Arc::clone(&shared),
        };
        // Hold the lock across spawn + insert so the task cannot remove its entry
        // before it exists (the task cannot run before this returns anyway: the
        // runtime is single-threaded).
        let mut live = shared.live();
        let task = tokio::spawn(async move {
            if let Err(e) = forward(client, upstream, &guard.shared).await {
                log::debug!("proxy connection {id} ended: {e}");
            }
            drop(guard);
        });
        live.insert(id, task.abort_handle());
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, shared: &Arc<Shared>) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Both directions run in this one task, so aborting it drops all four halves.
    tokio::try_join!(
        pump(client_read, server_write, shared),
        pump(server_read, client_write, shared),
    )?;
    Ok(())
}

/// Copy one direction. A reader stamps each chunk with its delivery time
/// (`read time + latency`) and a writer delivers chunks in order at that time,
/// so latency delays bytes without serialising the stream behind sleeps.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT_CHUNKS);
    let read = async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(()); // EOF: dropping tx tells the writer
            }
            buf.truncate(n);
            let due = Instant::now() + shared.latency();
            if tx.send((due, buf)).await.is_err() {
                return Ok(()); // the writer failed; it reports the error
            }
        }
    };
    let write = async move {
        // When the rate allows the next byte out.
        let mut next_free = Instant::now();
        while let Some((due, buf)) = rx.recv().await {
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
            let rate = shared.rate.load(Ordering::Relaxed);
            if rate == 0 {
                to.write_all(&buf).await?;
                continue;
            }
            // Pieces of a twentieth of a second each, paced.
            let piece = usize::try_from(rate / 20).unwrap_or(usize::MAX).max(1);
            for part in buf.chunks(piece) {
                let now = Instant::now();
                if next_free > now {
                    tokio::time::sleep(next_free - now).await;
                }
                to.write_all(part).await?;
                let cost = Duration::from_secs_f64(part.len() as f64 / rate as f64);
                next_free = next_free.max(Instant::now()) + cost;
            }
        }
        // Pass the half-close on, like a real connection would.
        to.shutdown().await
    };
    tokio::try_join!(read, write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server on its own runtime thread; returns its address.
    fn echo_server() -> SocketAddr {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind echo server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("echo addr");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("echo runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("echo listener");
                loop {
                    let Ok((mut sock, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let (mut r, mut w) = sock.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
        });
        addr
    }

    async fn round_trip(sock: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        sock.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        sock.read_exact(&mut got).await?;
        Ok(got)
    }

    /// Is this connection dead (EOF or error) within a second?
    async fn is_closed(sock: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        let _ = sock.write_all(b"ping").await;
        matches!(
            tokio::time::timeout(Duration::from_secs(1), sock.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn passes_bytes_both_ways() {
        let proxy = Proxy::start(echo_server()).expect("proxy");
        let mut sock = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(
            round_trip(&mut sock, b"hello").await.expect("echo"),
            b"hello"
        );
        // A payload larger than one chunk arrives whole and in order.
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = sock.split();
        let send = async {
            w.write_all(&big).await.expect("send big");
        };
        let recv = async {
            let mut got = vec![0u8; big.len()];
            r.read_exact(&mut got).await.expect("receive big");
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert!(got == big, "payload corrupted or reordered");
        assert_eq!(proxy.live_connections(), 1);
        assert_eq!(proxy.accepted_connections(), 1);
    }

    #[tokio::test]
    async fn refuse_closes_new_connections_and_pass_restores() {
        let proxy = Proxy::start(echo_server()).expect("proxy");
        proxy.set_mode(Mode::Refuse);
        assert_eq!(proxy.mode(), Mode::Refuse);
        let mut refused = TcpStream::connect(proxy.addr()).await.expect("tcp connect");
        assert!(
            is_closed(&mut refused).await,
            "refused connection stayed open"
        );
        assert_eq!(proxy.refused_connections(), 1);

        proxy.set_mode(Mode::Pass);
        let mut sock = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut sock, b"back").await.expect("echo"), b"back");
    }

    #[tokio::test]
    async fn cut_drops_live_connections_only() {
        let proxy = Proxy::start(echo_server()).expect("proxy");
        let mut a = TcpStream::connect(proxy.addr()).await.expect("connect a");
        let mut b = TcpStream::connect(proxy.addr()).await.expect("connect b");
        round_trip(&mut a, b"a").await.expect("echo a");
        round_trip(&mut b, b"b").await.expect("echo b");

        assert_eq!(proxy.cut(), 2);
        assert_eq!(proxy.live_connections(), 0);
        assert!(is_closed(&mut a).await, "a survived the cut");
        assert!(is_closed(&mut b).await, "b survived the cut");

        // Still in Pass mode: a new connection works.
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect c");
        assert_eq!(round_trip(&mut c, b"c").await.expect("echo c"), b"c");
    }

    #[tokio::test]
    async fn latency_delays_each_direction_but_pipelines() {
        let proxy = Proxy::start(echo_server()).expect("proxy");
        let latency = Duration::from_millis(50);
        proxy.set_latency(latency);
        let mut sock = TcpStream::connect(proxy.addr()).await.expect("connect");

        // One round trip: delayed once on the way in, once on the way out.
        let start = Instant::now();
        round_trip(&mut sock, b"x").await.expect("echo");
        let rtt = start.elapsed();
        assert!(
            rtt >= 2 * latency,
            "round trip {rtt:?} shorter than 2 × {latency:?}"
        );
        assert!(
            rtt < 2 * latency + Duration::from_millis(400),
            "round trip {rtt:?} too slow"
        );

        // Twenty writes sent back to back are delayed together, not one after another.
        let start = Instant::now();
        for _ in 0..20 {
            sock.write_all(b"y").await.expect("write");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut got = [0u8; 20];
        sock.read_exact(&mut got).await.expect("read back");
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(600),
            "20 pipelined writes took {took:?}: latency is being serialised"
        );

        proxy.set_latency(Duration::ZERO);
        let start = Instant::now();
        round_trip(&mut sock, b"z").await.expect("echo");
        assert!(start.elapsed() < latency, "latency not turned off");
    }

    #[tokio::test]
    async fn rate_limits_throughput() {
        let proxy = Proxy::start(echo_server()).expect("proxy");
        proxy.set_rate(100_000);
        let mut sock = TcpStream::connect(proxy.addr()).await.expect("connect");
        // 50 KB through the proxy twice (there and back) at 100 KB/s each
        // way: at least half a second, however fast the machine. Only the
        // lower bound is asserted; a loaded machine may be slower.
        let payload = vec![7u8; 50_000];
        let start = Instant::now();
        let got = round_trip(&mut sock, &payload).await.expect("echo");
        assert_eq!(got, payload);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(450),
            "50 KB crossed a 100 KB/s link in {took:?}"
        );
        proxy.set_rate(0);
        assert_eq!(round_trip(&mut sock, b"fast").await.expect("echo"), b"fast");
    }

    #[test]
    fn works_from_a_sync_test_and_stops_on_drop() {
        let proxy = Proxy::start(echo_server()).expect("proxy");
        let addr = proxy.addr();
        let mut sock = std::net::TcpStream::connect(addr).expect("connect");
        std::io::Write::write_all(&mut sock, b"sync").expect("write");
        let mut got = [0u8; 4];
        std::io::Read::read_exact(&mut sock, &mut got).expect("read");
        assert_eq!(&got, b"sync");
        drop(proxy);
        let mut buf = [0u8; 1];
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let n = std::io::Read::read(&mut sock, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "connection outlived the proxy");
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "listener outlived the proxy"
        );
    }
}
