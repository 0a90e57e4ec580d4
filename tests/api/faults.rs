//! Faults: the service killed mid-stream, the database cut mid-stream, and a
//! graceful stop — nothing lost, nothing duplicated.

use std::time::Duration;

use sluice_testkit::{eventually, fresh_database, Mode, Proxy};

use crate::helpers::*;

/// A service whose database is reached through a proxy adding `latency` to
/// each round trip, with settings that slow the drain down enough to
/// interrupt it mid-stream (one writer, small batches, a small window).
async fn slow_app(latency: Duration, extra: &[(&str, String)]) -> (TestApp, Proxy) {
    let db = fresh_database().await;
    let proxy = Proxy::start(db.server_addr()).expect("proxy starts");
    proxy.set_latency(latency);
    let mut env = vec![
        ("WRITERS", "1".to_owned()),
        ("MAX_BATCH", "20".to_owned()),
        ("AMQP_PREFETCH", "100".to_owned()),
        ("DATABASE_URL", db.url_via(proxy.addr())),
    ];
    env.extend(extra.iter().cloned());
    (spawn_app_with(db, &env).await, proxy)
}

async fn wait_some_rows(app: &TestApp, at_least: i64) -> i64 {
    eventually(PATIENCE, &format!("at least {at_least} rows"), || async {
        let rows = app.rows().await;
        if rows >= at_least {
            Ok(rows)
        } else {
            Err(format!("{rows} rows"))
        }
    })
    .await
}

#[actix_web::test]
async fn killed_mid_stream_and_restarted_every_event_is_stored_once() {
    // A little latency per round trip keeps the drain slow enough to interrupt.
    let (app, _proxy) = slow_app(Duration::from_millis(2), &[]).await;
    app.publish("k", 3000).await;
    let before = wait_some_rows(&app, 100).await;
    app.service.sigkill();
    app.service.wait_exit(PATIENCE).expect("killed");
    assert!(before < 3000, "the kill happened mid-stream");

    let restarted = app.service.respawn();
    restarted.wait_for_log("consuming", PATIENCE);
    app.wait_rows(3000).await;
    let distinct: i64 = app
        .db
        .query_scalar("SELECT count(DISTINCT message_id) FROM events", &[])
        .await;
    assert_eq!(distinct, 3000);
    restarted.sigterm();
    let status = restarted.wait_exit(PATIENCE).expect("exits");
    assert_eq!(status.code(), Some(0), "logs:\n{}", restarted.logs());
    assert_eq!(app.ingest_ready().await, 0);
    assert_eq!(
        app.dead_ready().await,
        0,
        "an outage is not a reason to dead-letter"
    );
    app.cleanup().await;
}

#[actix_web::test]
async fn database_cut_mid_stream_resumes_by_itself_and_loses_nothing() {
    let (app, proxy) = slow_app(Duration::from_millis(2), &[]).await;
    app.publish("cut", 2000).await;
    wait_some_rows(&app, 100).await;

    let ready = app.readyz().await;
    assert_eq!(ready.0, 200, "ready while both servers answer: {}", ready.1);

    proxy.set_mode(Mode::Refuse);
    proxy.cut();
    app.service.wait_for_log("database unavailable", PATIENCE);
    let during = app.rows().await;
    assert!(during < 2000, "the cut happened mid-stream ({during} rows)");
    let (status, body) = app.readyz().await;
    assert_eq!(status, 503, "not ready while the database is down: {body}");
    assert!(
        body.contains(r#""database":"down""#) && body.contains(r#""broker":"up""#),
        "{body}"
    );
    // While the database is down nothing is acked, so nothing can be lost:
    // the broker holds the unsettled deliveries (the prefetch window is full).
    proxy.set_mode(Mode::Pass);
    app.wait_rows(2000).await;
    app.service.wait_for_log("database is back", PATIENCE);
    assert_eq!(app.readyz().await.0, 200, "ready again");
    assert_eq!(app.terminate(), Some(0));
    assert_eq!(app.ingest_ready().await, 0);
    assert_eq!(app.dead_ready().await, 0);
    app.cleanup().await;
}

#[actix_web::test]
async fn sigterm_drains_what_was_delivered_and_exits_zero() {
    let (app, _proxy) = slow_app(Duration::from_millis(5), &[]).await;
    app.publish("term", 4000).await;
    wait_some_rows(&app, 50).await;

    assert_eq!(app.terminate(), Some(0), "logs:\n{}", app.service.logs());
    let logs = app.service.logs();
    assert!(logs.contains("drained"), "logs:\n{logs}");
    // What was delivered is stored and acked; the rest waits in the queue.
    let rows = app.rows().await;
    let ready = i64::from(app.ingest_ready().await);
    assert_eq!(rows + ready, 4000, "{rows} stored + {ready} still queued");
    assert!(ready > 0, "the stop happened mid-stream");
    assert_eq!(app.dead_ready().await, 0);
    app.cleanup().await;
}

/// Closes the service's broker connection (named `sluice <prefix>`) from the
/// broker's side, as a broker restart or a network cut would.
fn close_broker_connection(prefix: &str) {
    let name = format!("sluice {prefix}");
    let output = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl runs (this test needs it, as on the CI machines)");
    let listing = String::from_utf8_lossy(&output.stdout);
    let pid = listing
        .lines()
        .find(|line| line.contains(&name))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("no connection named {name:?} in:\n{listing}"));
    let status = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "close_connection",
            pid,
            "test: broker connection lost",
        ])
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl close_connection failed");
}

#[actix_web::test]
async fn broker_connection_lost_mid_stream_reconnects_and_loses_nothing() {
    let (app, _proxy) = slow_app(Duration::from_millis(2), &[]).await;
    app.publish("amqp", 3000).await;
    wait_some_rows(&app, 100).await;

    close_broker_connection(&app.prefix);
    app.service.wait_for_log("reconnecting", PATIENCE);
    app.service.wait_for_log("channel generation 2", PATIENCE);
    app.wait_rows(3000).await;
    assert_eq!(app.terminate(), Some(0), "logs:\n{}", app.service.logs());
    assert_eq!(
        app.ingest_ready().await,
        0,
        "redeliveries were acked on the new channel"
    );
    assert_eq!(app.dead_ready().await, 0);
    app.cleanup().await;
}

#[actix_web::test]
async fn a_long_outage_gives_the_channel_up_so_the_broker_requeues_cleanly() {
    // Far below RabbitMQ's 30-minute consumer timeout, to keep the test short.
    let stall = [("AMQP_STALL_TIMEOUT", "2s".to_owned())];
    let (app, proxy) = slow_app(Duration::ZERO, &stall).await;

    proxy.set_mode(Mode::Refuse);
    proxy.cut();
    app.publish("stall", 500).await;
    app.service.wait_for_log("giving the channel up", PATIENCE);
    app.service.wait_for_log("channel generation 2", PATIENCE);
    proxy.set_mode(Mode::Pass);
    // The deliveries held by the old channel were requeued and redelivered on
    // the new one; the writers' batches of the old generation are written
    // too, idempotently.
    app.wait_rows(500).await;
    assert_eq!(app.terminate(), Some(0), "logs:\n{}", app.service.logs());
    assert_eq!(app.ingest_ready().await, 0);
    assert_eq!(app.dead_ready().await, 0);
}
