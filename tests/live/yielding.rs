//! The live path yields to the datastore path: while a backlog drains, a
//! dashboard gets a paced sample of the stream (one frame of events per
//! `LIVE_YIELD_INTERVAL`) and an exact count of the rest; once the backlog
//! is gone it gets everything again.

use std::time::Duration;

use sluice_testkit::{fresh_database, Proxy};
use tokio::time::Instant;

use crate::common;
use crate::helpers::*;

#[actix_web::test]
async fn while_a_backlog_drains_a_fast_dashboard_gets_a_frame_per_interval_and_is_told_the_rest() {
    const N: usize = 2000;
    const INTERVAL: Duration = Duration::from_millis(500);
    // A database 10 ms away, one writer, small batches: the drain takes
    // seconds, far slower than a client can read.
    let db = fresh_database().await;
    let proxy = Proxy::start(db.server_addr()).expect("proxy starts");
    proxy.set_latency(Duration::from_millis(10));
    let env = [
        ("WRITERS", "1".to_owned()),
        ("MAX_BATCH", "20".to_owned()),
        ("AMQP_PREFETCH", "100".to_owned()),
        ("WS_BUFFER", "256".to_owned()),
        ("LIVE_YIELD_INTERVAL", "500ms".to_owned()),
        ("DATABASE_URL", db.url_via(proxy.addr())),
    ];
    let app = common::spawn_app_with(db, &env).await;
    let mut client = app.connect("").await;
    client.sync().await;

    // Published at once: a backlog at the broker, the window full.
    let start = Instant::now();
    let deadline = start + PATIENCE;
    let (mut frames, mut received, mut missed) = (0u64, 0u64, 0u64);
    let ((), ()) = futures_util::join!(app.publish("y", 0..N, 0), async {
        while received + missed < N as u64 {
            match client.next_by(deadline).await {
                Some(Incoming::Events(events)) => {
                    frames += 1;
                    received += events.len() as u64;
                }
                Some(Incoming::Lagged(n)) => missed += n,
                other => panic!("{received} received, {missed} missed, then {other:?}"),
            }
        }
    });
    let took = start.elapsed();
    app.wait_rows(N as i64).await;
    let report = format!(
        "{N} events drained in {took:?}: {frames} frames of events, {received} events \
         received, {missed} told missed; {}",
        app.live_drops().await
    );
    eprintln!("{report}");
    assert_eq!(received + missed, N as u64, "exact; {report}");
    // One frame per interval while behind, and the few frames of what the
    // buffer (256 events) still held when the drain ended.
    let paced = took.as_millis() as u64 / INTERVAL.as_millis() as u64 + 1;
    assert!(frames <= paced + 8, "at most {paced} + 8 frames; {report}");
    assert!(missed > 0, "a paced sample, the rest told; {report}");
    assert!(
        app.metric("sluice_live_yield_episodes_total", "").await >= 1.0,
        "{report}"
    );

    // Caught up: the live path no longer yields, and a client that keeps
    // up gets every event (waves well under the marks).
    app.wait_metric("sluice_live_yielding", "", 0.0).await;
    let after = app
        .publish_read_in_waves(&mut client, "after", 200, 20, 0)
        .await;
    assert_eq!(after.accounted(), 200);
    assert_eq!(after.missed, 0, "nothing held back once caught up");
    app.cleanup().await;
}
