//! The `sluice` binary as a child process under test, and `wait_until` for eventual checks.
//!
//! [`Service::spawn`] starts the binary with `HTTP_ADDR=127.0.0.1:0` and
//! `RUST_LOG=info` (unless the test overrides them), captures stdout and stderr
//! line by line (echoed to the test's stderr with a `[sluice <pid>]` prefix, so a
//! failing test shows what the service said), and returns once the service has
//! logged `listening on http://ADDR`, with that address parsed. Waiting is done
//! on a condition variable fed by the log readers, not by polling.

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The log line the service prints once its HTTP server is bound.
pub const LISTENING_MARKER: &str = "listening on http://";
/// How long [`Service::spawn`] waits for [`LISTENING_MARKER`].
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval of [`wait_until`] and [`eventually`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Everything the child said, and whether it can still say more.
#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    /// Output streams still open (2 at start).
    open_streams: usize,
    /// Set by the waiter thread once the child has been reaped.
    exit: Option<ExitStatus>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<LogState>,
    /// Signalled on every new line, stream end and exit.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until `done` returns `Some`, the deadline passes (`None`), or
    /// nothing more can change (`None`).
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&LogState) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(found) = done(&state) {
                return Some(found);
            }
            let finished = state.exit.is_some() && state.open_streams == 0;
            let left = deadline.saturating_duration_since(Instant::now());
            if finished || left.is_zero() {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A running `sluice` process; killed (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct Service {
    bin: PathBuf,
    env: Vec<(String, String)>,
    pid: Pid,
    http_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Service {
    /// Start `bin` with `env` (on top of the inherited environment, after the
    /// defaults `HTTP_ADDR=127.0.0.1:0` and `RUST_LOG=info`) and wait up to
    /// [`START_TIMEOUT`] for `listening on http://ADDR`.
    ///
    /// Panics, with the logs so far, if the process cannot start, exits, or does
    /// not log the line in time.
    pub fn spawn(bin: &Path, env: &[(&str, String)]) -> Service {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        Self::spawn_owned(bin.to_owned(), env)
    }

    /// Start another instance with the same binary and environment (e.g. after
    /// [`Service::sigkill`] + [`Service::wait_exit`], to test recovery).
    pub fn respawn(&self) -> Service {
        Self::spawn_owned(self.bin.clone(), self.env.clone())
    }

    fn spawn_owned(bin: PathBuf, env: Vec<(String, String)>) -> Service {
        let mut command = Command::new(&bin);
        command
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut attempt = 0;
        let mut child = loop {
            match command.spawn() {
                Ok(child) => break child,
                // ETXTBSY: the binary was just written (e.g. by a concurrent build step).
                Err(e) if e.raw_os_error() == Some(26) && attempt < 20 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(e) => panic!("cannot start {}: {e}", bin.display()),
            }
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
        let shared = Arc::new(Shared::default());
        shared.lock().open_streams = 2;
        let tag = format!("[sluice {pid}]");
        if let Some(stdout) = child.stdout.take() {
            drain(stdout, tag.clone(), Arc::clone(&shared));
        }
        if let Some(stderr) = child.stderr.take() {
            drain(stderr, tag, Arc::clone(&shared));
        }
        reap(child, Arc::clone(&shared));

        let found = shared.wait_for(START_TIMEOUT, |state| {
            state.lines.iter().find_map(|line| parse_listening(line))
        });
        let mut service = Service {
            bin,
            env,
            pid,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shared,
        };
        match found {
            Some(addr) => service.http_addr = addr,
            None => {
                let why = match service.exit_status() {
                    Some(status) => format!("exited with {status} before listening"),
                    None => format!("did not log {LISTENING_MARKER:?} within {START_TIMEOUT:?}"),
                };
                let logs = service.logs();
                drop(service); // kills it if still running
                panic!("sluice {why}; its output:\n{logs}");
            }
        }
        service
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// The address the HTTP server is bound to (from the `listening on` line).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Send SIGTERM (graceful shutdown). No-op once the process has exited.
    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Send SIGINT (like Ctrl-C). No-op once the process has exited.
    pub fn sigint(&self) {
        self.signal(Signal::SIGINT);
    }

    /// Send SIGKILL (a crash: no chance to drain or ack). No-op once the process has exited.
    pub fn sigkill(&self) {
        self.signal(Signal::SIGKILL);
    }

    fn signal(&self, signal: Signal) {
        // Checked under the lock the reaper takes to record the exit, so a
        // reaped (and possibly reused) pid is never signalled.
        let state = self.shared.lock();
        if state.exit.is_none() {
            if let Err(e) = kill(self.pid, signal) {
                eprintln!("testkit: {signal} to sluice {}: {e}", self.pid);
            }
        }
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.shared.lock().exit
    }

    /// Wait up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        self.shared.wait_for(timeout, |state| state.exit)
    }

    /// Everything the process wrote to stdout and stderr so far, one line each.
    pub fn logs(&self) -> String {
        let state = self.shared.lock();
        let mut out = state.lines.join("\n");
        out.push('\n');
        out
    }

    /// The lines logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.shared.lock().lines.clone()
    }

    /// Wait up to `timeout` for a log line containing `needle` (already logged
    /// lines count) and return it. Panics with the logs if it does not come, or if
    /// the process exits without logging it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.try_wait_for_log(needle, timeout).unwrap_or_else(|| {
            panic!(
                "sluice did not log {needle:?} within {timeout:?} (exit: {:?}); its output:\n{}",
                self.exit_status(),
                self.logs()
            )
        })
    }

    /// Like [`Service::wait_for_log`], but `None` instead of a panic.
    pub fn try_wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.shared.wait_for(timeout, |state| {
            state
                .lines
                .iter()
                .find(|line| line.contains(needle))
                .cloned()
        })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.sigkill();
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                eprintln!("testkit: sluice {} did not die after SIGKILL", self.pid);
            }
        }
    }
}

/// The address after [`LISTENING_MARKER`] in `line`, if any.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(LISTENING_MARKER)? + LISTENING_MARKER.len()..];
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

/// Read `stream` line by line into the shared log (and echo it) until EOF.
fn drain(stream: impl Read + Send + 'static, tag: String, shared: Arc<Shared>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    eprintln!("{tag} {line}");
                    shared.lock().lines.push(line);
                    shared.changed.notify_all();
                }
            }
        }
        shared.lock().open_streams -= 1;
        shared.changed.notify_all();
    });
}

/// Wait for the child on a thread of its own and record its exit status.
fn reap(mut child: Child, shared: Arc<Shared>) {
    std::thread::spawn(move || {
        let status = child.wait();
        let mut state = shared.lock();
        match status {
            Ok(status) => state.exit = Some(status),
            Err(e) => {
                eprintln!("testkit: waiting for sluice failed: {e}");
                // Record *something* so waiters do not hang; treat as killed.
                use std::os::unix::process::ExitStatusExt;
                state.exit = Some(ExitStatus::from_raw(9));
            }
        }
        drop(state);
        shared.changed.notify_all();
    });
}

/// Poll `cond` every [`POLL_INTERVAL`] until it returns `true`; panic after
/// `timeout` naming `what`. For eventually-consistent checks against the real
/// database or broker, where no event announces the state change.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Poll `check` every [`POLL_INTERVAL`] until it returns `Ok(value)`; panic after
/// `timeout` naming `what` and showing the last `Err` (e.g. "rows = 812 of 1000").
pub async fn eventually<T, E, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting until {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// [`wait_until`] for synchronous tests (blocks the thread; do not call it inside an async runtime).
pub fn wait_until_blocking(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in "service": a shell script printing the marker, then waiting.
    fn fake_service(dir: &Path, script: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("fake-sluice-{}", crate::random_suffix()));
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening("[2024 INFO sluice] listening on http://127.0.0.1:43210"),
            Some("127.0.0.1:43210".parse().expect("addr"))
        );
        assert_eq!(
            parse_listening("listening on http://[::1]:8080/ (dashboard)"),
            Some("[::1]:8080".parse().expect("addr"))
        );
        assert_eq!(parse_listening("starting"), None);
    }

    #[test]
    fn spawn_logs_signals_and_exit() {
        let dir = std::env::temp_dir();
        let bin = fake_service(
            &dir,
            r#"echo "starting with HTTP_ADDR=$HTTP_ADDR RUST_LOG=$RUST_LOG X=$X" >&2
echo "INFO listening on http://127.0.0.1:45678"
trap 'echo "got TERM"; exit 0' TERM
while true; do sleep 0.05; done"#,
        );
        let service = Service::spawn(
            &bin,
            &[("X", "42".to_owned()), ("RUST_LOG", "debug".to_owned())],
        );
        assert_eq!(
            service.http_addr(),
            "127.0.0.1:45678".parse().expect("addr")
        );
        assert_eq!(service.base_url(), "http://127.0.0.1:45678");
        let line = service.wait_for_log("starting", Duration::from_secs(5));
        assert!(
            line.contains("HTTP_ADDR=127.0.0.1:0 RUST_LOG=debug X=42"),
            "{line}"
        );
        assert_eq!(service.wait_exit(Duration::from_millis(100)), None);

        service.sigterm();
        service.wait_for_log("got TERM", Duration::from_secs(5));
        let status = service.wait_exit(Duration::from_secs(5)).expect("exited");
        assert!(status.success(), "{status}");
        let _ = std::fs::remove_file(bin);
    }

    #[test]
    fn sigkill_and_respawn() {
        let dir = std::env::temp_dir();
        let bin = fake_service(
            &dir,
            "echo \"listening on http://127.0.0.1:1\"\nwhile true; do sleep 0.05; done",
        );
        let first = Service::spawn(&bin, &[]);
        first.sigkill();
        let status = first.wait_exit(Duration::from_secs(5)).expect("killed");
        assert!(!status.success());
        first.sigkill(); // no-op after exit
        let second = first.respawn();
        assert_ne!(second.pid(), first.pid());
        drop(second); // killed on drop
        let _ = std::fs::remove_file(bin);
    }

    #[test]
    fn spawn_panics_with_logs_when_the_service_dies() {
        let bin = fake_service(
            &std::env::temp_dir(),
            "echo 'bad AMQP_PREFETCH' >&2; exit 2",
        );
        let panic =
            std::panic::catch_unwind(|| Service::spawn(&bin, &[])).expect_err("spawn panics");
        let _ = std::fs::remove_file(bin);
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("exited with"), "{message}");
        assert!(message.contains("bad AMQP_PREFETCH"), "{message}");
    }

    #[tokio::test]
    async fn wait_until_and_eventually() {
        let mut n = 0;
        wait_until(Duration::from_secs(2), "n reaches 3", || {
            n += 1;
            std::future::ready(n >= 3)
        })
        .await;
        let mut m = 0;
        let got = eventually(Duration::from_secs(2), "m reaches 2", || {
            m += 1;
            std::future::ready(if m >= 2 {
                Ok(m)
            } else {
                Err(format!("m = {m}"))
            })
        })
        .await;
        assert_eq!(got, 2);
    }

    #[tokio::test]
    #[should_panic(expected = "last seen: rows = 1")]
    async fn eventually_reports_the_last_state() {
        eventually(Duration::from_millis(120), "rows = 2", || {
            std::future::ready(Err::<(), _>("rows = 1"))
        })
        .await;
    }
}
