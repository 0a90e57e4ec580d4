//! The dead-letter tests' own helpers: running `sluice dead-letters` as the
//! operator would (the service's settings in the environment), a service
//! that sheds a burst as `overflow` letters, and reading which letters and
//! rows there are.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use lapin::BasicProperties;
use serde_json::Value;
use sluice_testkit::{eventually, fresh_database, Proxy};

pub use crate::common::*;

/// The `sluice` binary under test.
pub fn sluice_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sluice"))
}

/// What one run of the command did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Stdout as JSON, failing the test (with both outputs) if it is not.
    pub fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "the command failed: {self:?}");
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {self:?}"))
    }

    /// The non-empty lines written to stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// `sluice dead-letters <args>` with `env` (the broker's settings), run to
/// its end off the test's runtime thread.
pub async fn dead_letters_with(env: &[(&str, String)], args: &[&str]) -> Run {
    let mut command = Command::new(sluice_bin());
    command
        .arg("dead-letters")
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the command's thread")
        .expect("sluice dead-letters runs");
    Run::from(output)
}

/// Starts `sluice dead-letters <args>` without waiting (to kill it, or run
/// two at once); its output is captured.
pub fn spawn_dead_letters(app: &TestApp, args: &[&str]) -> Child {
    Command::new(sluice_bin())
        .arg("dead-letters")
        .args(args)
        .env("RUST_LOG", "info")
        .env("AMQP_URL", &app.amqp_url)
        .env("AMQP_PREFIX", &app.prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice dead-letters starts")
}

/// Waits for a spawned command (off the runtime thread).
pub async fn finish(child: Child) -> Run {
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("the command's thread")
        .expect("sluice dead-letters ends");
    Run::from(output)
}

/// Starts the service with default settings on a fresh database and prefix.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(fresh_database().await, &[]).await
}

impl TestApp {
    /// Publishes one message with this body and message id.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], message_id: Option<&str>) {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        self.publisher
            .publish(&self.prefix, routing_key, body, props)
            .await
            .expect("publish confirmed");
    }

    /// `sluice dead-letters <args>` against this service's broker and prefix.
    pub async fn dead_letters(&self, args: &[&str]) -> Run {
        let env = [
            ("AMQP_URL", self.amqp_url.clone()),
            ("AMQP_PREFIX", self.prefix.clone()),
        ];
        dead_letters_with(&env, args).await
    }

    /// Every letter held (`list --json`, reading every letter in place).
    pub async fn list_all(&self) -> Value {
        self.dead_letters(&["list", "--json", "--limit", "100000", "--scan", "65535"])
            .await
            .json()
    }

    /// The idempotency keys of every letter held.
    pub async fn dead_ids(&self) -> BTreeSet<String> {
        let list = self.list_all().await;
        assert_eq!(list["scan_complete"], true, "every letter was read: {list}");
        let letters = list["letters"].as_array().expect("letters");
        letters
            .iter()
            .map(|l| l["message_id"].as_str().expect("an id").to_owned())
            .collect()
    }

    /// The `message_id` of every row.
    pub async fn row_ids(&self) -> BTreeSet<String> {
        let ids: Vec<String> = self
            .db
            .query_scalar(
                "SELECT coalesce(array_agg(message_id), '{}') FROM events",
                &[],
            )
            .await;
        let count = ids.len();
        let set: BTreeSet<String> = ids.into_iter().collect();
        assert_eq!(set.len(), count, "no message_id is stored twice");
        set
    }

    /// Waits until the dead-letter queues hold exactly `n` letters.
    pub async fn wait_dead(&self, n: u32) {
        eventually(PATIENCE, &format!("{n} dead letters"), || async {
            let held = self.dead_ready().await;
            if held == n {
                Ok(())
            } else {
                Err(format!("{held} dead letters"))
            }
        })
        .await;
    }
}

/// A service that sheds a burst: its database answers 30 ms late (through
/// `proxy`), one writer takes batches of 50, the Queue holds 100 of the 300
/// deliveries in flight and drops the oldest. Set the proxy's latency to
/// zero to end the overload.
pub async fn shedding_app() -> (TestApp, Proxy) {
    let db = fresh_database().await;
    let proxy = Proxy::start(db.server_addr()).expect("proxy starts");
    let env = vec![
        ("DATABASE_URL", db.url_via(proxy.addr())),
        ("WRITERS", "1".into()),
        ("MAX_BATCH", "50".into()),
        ("AMQP_PREFETCH", "300".into()),
        ("QUEUE_CAPACITY", "100".into()),
        ("QUEUE_ON_FULL", "drop-oldest".into()),
    ];
    let app = spawn_app_with(db, &env).await;
    proxy.set_latency(Duration::from_millis(30));
    (app, proxy)
}

/// Publishes a burst of `n` events (every fifth without a `message_id`, so
/// its key is derived from routing key, timestamp and body), waits until
/// each is stored or dead-lettered, ends the overload, and returns every
/// event's key and how many were shed as `overflow`.
pub async fn burst(app: &TestApp, proxy: &Proxy, tag: &str, n: usize) -> (BTreeSet<String>, u32) {
    app.publisher
        .publish_json_batch(&app.prefix, n, |i| {
            (i % 5 != 0).then(|| format!("{tag}-{i}"))
        })
        .await
        .expect("publish confirmed");
    let dead = eventually(
        PATIENCE,
        &format!("all {n} events are stored or dead-lettered"),
        || async {
            let rows = app.rows().await;
            let dead = app.dead_ready().await;
            if rows + i64::from(dead) == n as i64 && app.ingest_ready().await == 0 {
                Ok(dead)
            } else {
                Err(format!("{rows} rows + {dead} dead letters"))
            }
        },
    )
    .await;
    proxy.set_latency(Duration::ZERO);
    assert!(dead > 0, "the burst overflowed the queue");
    let list = app.list_all().await;
    assert_eq!(
        list["by_reason"]["overflow"], dead,
        "every letter is an overflow: {}",
        list["by_reason"]
    );
    let mut keys = app.row_ids().await;
    let dead_ids = app.dead_ids().await;
    assert!(keys.is_disjoint(&dead_ids), "a letter is not also a row");
    keys.extend(dead_ids);
    assert_eq!(keys.len(), n, "every event is a row or a letter");
    (keys, dead)
}
