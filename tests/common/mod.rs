//! Shared by the integration test binaries (`tests/api`, `tests/live`, ...): a
//! real `sluice` process on a fresh database and a fresh broker topology, a
//! publisher with confirms, readers for rows, queues and metrics, a mapping
//! file, and running the binary to its exit. Each binary adds the helpers of
//! its own subject in its `helpers` module.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod browser;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_testkit::amqp::{self, GotMessage};
use sluice_testkit::{eventually, unique_prefix, Publisher, Service, TestDb, TopologyGuard};

/// How long a test waits for the pipeline to catch up before failing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A running service and everything a test needs around it.
pub struct TestApp {
    pub db: TestDb,
    pub prefix: String,
    pub amqp_url: String,
    pub service: Service,
    pub publisher: Publisher,
    /// Deletes the broker objects last, once the service is gone, even if
    /// the test panicked.
    _topology: TopologyGuard,
}

/// Starts the service on `db` with extra settings, and waits until it consumes.
pub async fn spawn_app_with(db: TestDb, extra: &[(&str, String)]) -> TestApp {
    spawn_app_meanwhile(db, extra, async {}).await
}

/// [`spawn_app_with`], running `meanwhile` while the service starts (to
/// bring up a server it is waiting for, say); returns once both are done.
/// Fails the test, with the service's output, if the service exits instead.
pub async fn spawn_app_meanwhile(
    db: TestDb,
    extra: &[(&str, String)],
    meanwhile: impl Future<Output = ()>,
) -> TestApp {
    let prefix = unique_prefix();
    let amqp_url = amqp::amqp_url();
    let topology = TopologyGuard::new(&amqp_url, &prefix);
    let mut env = vec![
        ("DATABASE_URL".to_owned(), db.url()),
        ("AMQP_PREFIX".to_owned(), prefix.clone()),
        ("AMQP_URL".to_owned(), amqp_url.clone()),
    ];
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    // Waiting for the service blocks a thread: not the one `meanwhile` runs on.
    let starting = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        start(&env)
    });
    let started = async {
        match starting.await {
            Ok(service) => service,
            Err(failed) => match failed.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(failed) => panic!("starting sluice: {failed}"),
            },
        }
    };
    let (service, ()) = tokio::join!(started, meanwhile);
    let publisher = Publisher::connect(&amqp_url)
        .await
        .expect("publisher connects");
    TestApp {
        db,
        prefix,
        amqp_url,
        service,
        publisher,
        _topology: topology,
    }
}

/// Runs the binary with `args` and `env` (after the defaults
/// `HTTP_ADDR=127.0.0.1:0` and `RUST_LOG=info`) until it exits by itself:
/// its exit code and everything it wrote (stdout, then stderr). Fails the
/// test, with that output, if it is still running after [`PATIENCE`].
pub fn run_to_exit(env: &[(&str, String)], args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(Path::new(env!("CARGO_BIN_EXE_sluice")))
        .args(args)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
    // The exit is the signal: a thread waits for it, the test waits for the thread.
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(child.wait_with_output());
    });
    let (output, in_time) = match exit.recv_timeout(PATIENCE) {
        Ok(output) => (output, true),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            (exit.recv().expect("the waiting thread answers"), false)
        }
    };
    let output = output.expect("wait for sluice");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        in_time,
        "sluice did not exit by itself within {PATIENCE:?}; its output:\n{text}"
    );
    (output.status.code(), text)
}

/// Spawns the binary and waits for its consumer (the topology then exists).
pub fn start(env: &[(&str, String)]) -> Service {
    let service = Service::spawn(Path::new(env!("CARGO_BIN_EXE_sluice")), env);
    service.wait_for_log("consuming", PATIENCE);
    service
}

impl TestApp {
    /// Rows in `events`.
    pub async fn rows(&self) -> i64 {
        self.db.count_rows("events").await
    }

    /// Waits until `events` holds exactly `n` rows (failing if it passes `n`).
    pub async fn wait_rows(&self, n: i64) {
        eventually(PATIENCE, &format!("{n} rows are stored"), || async {
            let rows = self.rows().await;
            assert!(rows <= n, "more rows ({rows}) than messages ({n})");
            if rows == n {
                Ok(())
            } else {
                Err(format!("{rows} rows"))
            }
        })
        .await;
    }

    /// Waits until the dead-letter queues hold `n` messages, then takes them
    /// (queue by queue: each reason's, then `P.dead`).
    pub async fn take_dead_letters(&self, n: u32) -> Vec<GotMessage> {
        eventually(PATIENCE, &format!("{n} dead letters"), || async {
            let ready = self.dead_ready().await;
            if ready >= n {
                Ok(())
            } else {
                Err(format!("{ready} dead letters"))
            }
        })
        .await;
        amqp::get_all_dead(&self.amqp_url, &self.prefix)
            .await
            .expect("read dead letters")
    }

    /// Messages waiting in the ingest queue (not delivered to anyone).
    pub async fn ingest_ready(&self) -> u32 {
        amqp::ready_count(&self.amqp_url, &format!("{}.ingest", self.prefix))
            .await
            .expect("ingest queue exists")
    }

    /// Messages waiting in the dead-letter queues (every reason's and `P.dead`).
    pub async fn dead_ready(&self) -> u32 {
        amqp::dead_ready(&self.amqp_url, &self.prefix)
            .await
            .expect("the dead-letter queues exist")
    }

    /// Sends SIGTERM and returns the exit code (failing if it takes too long).
    pub fn terminate(&self) -> Option<i32> {
        self.service.sigterm();
        self.service
            .wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("no exit after SIGTERM; logs:\n{}", self.service.logs()))
            .code()
    }

    /// The text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        get(&format!("{}/metrics", self.service.base_url())).await.1
    }

    /// A metric's value from `/metrics` (summed over label sets containing `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        metric_value(&self.metrics_text().await, name, labels)
    }

    /// `GET /readyz`: the status code and the body.
    pub async fn readyz(&self) -> (u16, String) {
        get(&format!("{}/readyz", self.service.base_url())).await
    }

    /// Closes the publisher and deletes the broker objects of this test.
    pub async fn cleanup(self) {
        let _ = self.publisher.close().await;
        let _ = amqp::delete_topology(&self.amqp_url, &self.prefix).await;
    }
}

/// A mapping file in the temporary directory, deleted on drop.
pub struct MappingFile {
    pub path: PathBuf,
}

impl MappingFile {
    pub fn new(text: &str) -> MappingFile {
        let path = std::env::temp_dir().join(format!(
            "sluice-mapping-{}.toml",
            sluice_testkit::random_suffix()
        ));
        std::fs::write(&path, text).expect("write the mapping file");
        MappingFile { path }
    }

    pub fn env(&self) -> (&'static str, String) {
        ("MAPPING", self.path.display().to_string())
    }
}

impl Drop for MappingFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A GET: the status code and the body, failing the test on any error.
pub async fn get(url: &str) -> (u16, String) {
    let mut response = awc::Client::default()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let body = response.body().limit(16 << 20).await.expect("body");
    (
        response.status().as_u16(),
        String::from_utf8(body.to_vec()).expect("UTF-8 body"),
    )
}

/// Sums the samples of `name` whose label set contains `labels` (e.g.
/// `reason="not_json"`; empty matches every sample).
pub fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        // Not `sum()`: the sum of no floats is -0, which reads oddly in messages.
        .fold(0.0, |sum, value| sum + value)
}
