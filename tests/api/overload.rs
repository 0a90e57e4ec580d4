//! The Queue's overload policies against the real servers: a database slower
//! than the arrival rate, QUEUE_CAPACITY below AMQP_PREFETCH.

use std::time::Duration;

use sluice_testkit::{eventually, fresh_database, Proxy, TestDb};
use tokio_postgres::NoTls;

use crate::helpers::*;

const N: usize = 600;

/// A service whose database answers 30 ms late, with a queue of 20 and a
/// prefetch window of 300, so the Queue overflows.
async fn overloaded(policy: &str) -> (TestApp, Proxy) {
    let db = fresh_database().await;
    let proxy = Proxy::start(db.server_addr()).expect("proxy starts");
    let env = vec![
        ("DATABASE_URL", db.url_via(proxy.addr())),
        ("WRITERS", "1".into()),
        ("MAX_BATCH", "10".into()),
        ("AMQP_PREFETCH", "300".into()),
        ("QUEUE_CAPACITY", "20".into()),
        ("QUEUE_ON_FULL", policy.into()),
    ];
    let app = spawn_app_with(db, &env).await;
    proxy.set_latency(Duration::from_millis(30));
    (app, proxy)
}

async fn settle_everything(app: &TestApp) -> (i64, u32) {
    eventually(
        PATIENCE,
        &format!("all {N} messages are stored or dead-lettered"),
        || async {
            let rows = app.rows().await;
            let dead = app.dead_ready().await;
            if rows + i64::from(dead) == N as i64 && app.ingest_ready().await == 0 {
                Ok((rows, dead))
            } else {
                Err(format!("{rows} rows + {dead} dead letters"))
            }
        },
    )
    .await
}

async fn assert_dropped_by_policy(policy: &str) {
    let (app, _proxy) = overloaded(policy).await;
    app.publish(policy, N).await;
    let (rows, dead) = settle_everything(&app).await;
    assert!(dead > 0, "the queue overflowed under {policy}");
    assert!(rows > 0, "some events were stored under {policy}");
    let letters = app.take_dead_letters(dead).await;
    assert!(letters
        .iter()
        .all(|m| header(m, "x-sluice-reason").as_deref() == Some("overflow")));
    // The dead letters and the rows are disjoint and together are every id.
    let mut ids: Vec<String> = letters.iter().filter_map(|m| m.message_id()).collect();
    let stored: Vec<String> = app
        .db
        .query_scalar(
            "SELECT coalesce(array_agg(message_id), '{}') FROM events",
            &[],
        )
        .await;
    ids.extend(stored);
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        N,
        "every message is either a row or a dead letter"
    );
    let counted = app
        .metric(
            "sluice_queue_dropped_events_total",
            &format!("policy=\"{policy}\""),
        )
        .await;
    assert_eq!(counted as u32, dead, "every drop is counted");
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn drop_oldest_dead_letters_overflow_and_stores_the_rest() {
    assert_dropped_by_policy("drop-oldest").await;
}

#[actix_web::test]
async fn reject_newest_dead_letters_overflow_and_stores_the_rest() {
    assert_dropped_by_policy("reject-newest").await;
}

#[actix_web::test]
async fn backpressure_stores_everything_and_drops_nothing() {
    let (app, _proxy) = overloaded("backpressure").await;
    app.publish("bp", N).await;
    let (rows, dead) = settle_everything(&app).await;
    assert_eq!((rows, dead), (N as i64, 0));
    let held = app.metric("sluice_queue_dropped_events_total", "").await;
    assert_eq!(held, 0.0);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

/// Holds an exclusive lock on `events` until dropped (or `release`d), so the
/// writer's insert waits.
struct TableLock {
    client: tokio_postgres::Client,
}

impl TableLock {
    async fn take(db: &TestDb) -> TableLock {
        let (client, connection) = tokio_postgres::connect(&db.url(), NoTls)
            .await
            .expect("lock connection");
        actix_web::rt::spawn(connection);
        client
            .batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock taken");
        TableLock { client }
    }

    async fn release(self) {
        self.client
            .batch_execute("COMMIT")
            .await
            .expect("lock released");
    }
}

#[actix_web::test]
async fn dedupe_by_message_id_stores_one_row_per_id_and_acks_every_delivery() {
    let db = fresh_database().await;
    let app = spawn_app_with(
        db,
        &[
            ("QUEUE_DEDUPE", "message-id".into()),
            ("WRITERS", "1".into()),
        ],
    )
    .await;
    let lock = TableLock::take(&app.db).await;
    // 300 deliveries carrying 30 distinct ids, published while the writer waits.
    app.publisher
        .publish_json_batch(&app.prefix, 300, |i| Some(format!("id-{}", i % 30)))
        .await
        .expect("publish confirmed");
    eventually(PATIENCE, "all 300 deliveries reached the queue", || async {
        let received = app.metric("sluice_events_received_total", "").await;
        if received >= 300.0 {
            Ok(())
        } else {
            Err(format!("{received} received"))
        }
    })
    .await;
    let merged = app
        .metric(
            "sluice_queue_deduplicated_events_total",
            "mode=\"message-id\"",
        )
        .await;
    let acked = app.metric("sluice_amqp_acked_deliveries_total", "").await;
    assert_eq!(
        acked, 0.0,
        "no duplicate is acked before its survivor commits"
    );
    lock.release().await;
    app.wait_rows(30).await;
    // The first delivery went straight to the (blocked) writer; its later
    // duplicates were kept as a separate pending event. Every other duplicate
    // was merged.
    assert!(merged >= 300.0 - 30.0 * 2.0, "merged {merged}");
    assert_eq!(app.terminate(), Some(0));
    assert_eq!(app.rows().await, 30);
    assert_eq!(
        app.ingest_ready().await,
        0,
        "every duplicate delivery was acked"
    );
    app.cleanup().await;
}
