//! The mapping tests' own helpers: a mapping file that is deleted afterwards,
//! a service started on a prepared table, pipelined publishing of chosen
//! bodies, and running the service until it refuses to start.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use sluice_testkit::{eventually, fresh_database, random_suffix, unique_prefix, Proxy, TestDb};

pub use crate::common::*;

/// A mapping file in the temporary directory, deleted on drop.
pub struct MappingFile {
    pub path: PathBuf,
}

impl MappingFile {
    pub fn new(text: &str) -> MappingFile {
        let path = std::env::temp_dir().join(format!("sluice-mapping-{}.toml", random_suffix()));
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

/// A fresh database holding the user's table (`ddl`).
pub async fn database_with(ddl: &str) -> TestDb {
    let db = fresh_database().await;
    db.execute(ddl).await;
    db
}

/// The service writing through `mapping` into `db`, its database reached
/// through a proxy adding a little latency, with settings that keep the
/// drain slow enough to interrupt (one writer, small batches, a small window).
pub async fn slow_mapped_app(db: TestDb, mapping: &MappingFile) -> (TestApp, Proxy) {
    let proxy = Proxy::start(db.server_addr()).expect("proxy starts");
    proxy.set_latency(Duration::from_millis(2));
    let env = [
        mapping.env(),
        ("WRITERS", "1".to_owned()),
        ("MAX_BATCH", "20".to_owned()),
        ("AMQP_PREFETCH", "100".to_owned()),
        ("DATABASE_URL", db.url_via(proxy.addr())),
    ];
    (spawn_app_with(db, &env).await, proxy)
}

/// Publishes `(message_id, routing_key, body)` messages, then waits for all
/// their confirms (pipelined, so thousands are quick).
pub async fn publish_all(app: &TestApp, messages: &[(String, String, String)]) {
    let channel = app.publisher.channel();
    let mut confirms = Vec::with_capacity(messages.len());
    for (id, key, body) in messages {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_timestamp(1_767_225_600);
        let confirm = channel
            .basic_publish(
                app.prefix.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert!(confirm.await.expect("confirm").is_ack(), "broker acked");
    }
}

/// Rows of `table`.
pub async fn table_rows(db: &TestDb, table: &str) -> i64 {
    db.count_rows(table).await
}

/// Waits until `table` holds exactly `n` rows (failing if it passes `n`).
pub async fn wait_table_rows(db: &TestDb, table: &str, n: i64) {
    eventually(PATIENCE, &format!("{n} rows in {table}"), || async {
        let rows = table_rows(db, table).await;
        assert!(rows <= n, "more rows ({rows}) than events ({n}) in {table}");
        if rows == n {
            Ok(())
        } else {
            Err(format!("{rows} rows"))
        }
    })
    .await;
}

/// Waits until `table` holds at least `n` rows, and returns how many.
pub async fn wait_some_table_rows(db: &TestDb, table: &str, n: i64) -> i64 {
    eventually(
        PATIENCE,
        &format!("at least {n} rows in {table}"),
        || async {
            let rows = table_rows(db, table).await;
            if rows >= n {
                Ok(rows)
            } else {
                Err(format!("{rows} rows"))
            }
        },
    )
    .await
}

/// Runs the service on `db` with `mapping`, expecting it to refuse to start:
/// returns its exit code and everything it logged. Fails the test if it is
/// still running after [`PATIENCE`].
pub fn refused_start(db: &TestDb, mapping: &MappingFile) -> (Option<i32>, String) {
    let log = std::env::temp_dir().join(format!("sluice-refused-{}.log", random_suffix()));
    let file = std::fs::File::create(&log).expect("create the log file");
    let mut child = Command::new(Path::new(env!("CARGO_BIN_EXE_sluice")))
        .env("DATABASE_URL", db.url())
        .env("AMQP_PREFIX", unique_prefix())
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env("MAPPING", &mapping.path)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone the log file"))
        .stderr(file)
        .spawn()
        .expect("start sluice");
    // The exit is the signal: a thread waits for it, the test waits for the thread.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(child.wait());
    });
    let status = match exit.recv_timeout(PATIENCE) {
        Ok(status) => status.expect("wait for sluice"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let logs = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            panic!("sluice did not refuse to start within {PATIENCE:?}; its output:\n{logs}");
        }
    };
    let logs = std::fs::read_to_string(&log).expect("read the log file");
    let _ = std::fs::remove_file(&log);
    (status.code(), logs)
}
