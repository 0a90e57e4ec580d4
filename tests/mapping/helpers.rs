//! The mapping tests' own helpers: a service started on a prepared table,
//! pipelined publishing of chosen bodies, and running the service until it
//! refuses to start (the mapping file itself is `MappingFile`, in `tests/common`).

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use sluice_testkit::{eventually, fresh_database, unique_prefix, Proxy, TestDb};

pub use crate::common::*;

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
/// returns its exit code and everything it logged.
pub fn refused_start(db: &TestDb, mapping: &MappingFile) -> (Option<i32>, String) {
    run_to_exit(
        &[
            ("DATABASE_URL", db.url()),
            ("AMQP_PREFIX", unique_prefix()),
            mapping.env(),
        ],
        &[],
    )
}
