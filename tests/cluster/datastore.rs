//! The datastore path with several instances: competing consumers on one
//! queue store a backlog exactly once while an instance crashes, and while
//! every instance is restarted in turn.

use std::time::Duration;

use sluice_testkit::{fresh_database, Proxy};

use crate::helpers::*;

/// Events in the backlog.
const BACKLOG: usize = 6000;

/// A cluster whose database is reached through a proxy adding latency to
/// each round trip, with settings that slow the drain down enough to
/// interrupt it mid-stream (one writer each, small batches, a small window).
async fn slow_cluster() -> (Cluster, Proxy) {
    let db = fresh_database().await;
    let proxy = Proxy::start(db.server_addr()).expect("proxy starts");
    proxy.set_latency(Duration::from_millis(5));
    let env = vec![
        ("WRITERS", "1".to_owned()),
        ("MAX_BATCH", "20".to_owned()),
        ("AMQP_PREFETCH", "100".to_owned()),
        ("DATABASE_URL", db.url_via(proxy.addr())),
    ];
    (Cluster::start(db, INSTANCES, &env).await, proxy)
}

/// Every event of the backlog is a row, once; the queue is empty once all
/// instances stopped (so nothing was left unacked); nothing dead-lettered.
async fn assert_stored_exactly_once(cluster: &Cluster, n: usize) {
    let n = i64::try_from(n).expect("fits");
    cluster.wait_rows(n).await;
    assert_eq!(cluster.distinct_ids().await, n);
    cluster.stop_all();
    cluster.assert_drained().await;
    assert_eq!(cluster.rows().await, n, "no row was added while stopping");
}

#[actix_web::test]
async fn one_instance_killed_mid_stream_and_restarted_every_event_is_stored_once() {
    let (mut cluster, _proxy) = slow_cluster().await;
    cluster.publish("k", BACKLOG).await;
    let before = cluster.wait_some_rows(200).await;
    let victim = &cluster.nodes[1];
    victim.sigkill();
    victim.wait_exit(PATIENCE).expect("killed");
    assert!(
        before < i64::try_from(BACKLOG).expect("fits"),
        "the kill happened mid-stream"
    );
    let restarted = victim.respawn();
    restarted.wait_for_log("consuming", PATIENCE);
    cluster.nodes[1] = restarted;
    assert_stored_exactly_once(&cluster, BACKLOG).await;
    cluster.cleanup().await;
}

#[actix_web::test]
async fn a_rolling_restart_of_every_instance_stores_every_event_once() {
    let (mut cluster, _proxy) = slow_cluster().await;
    cluster.publish("r", BACKLOG).await;
    let before = cluster.wait_some_rows(200).await;
    assert!(
        before < i64::try_from(BACKLOG).expect("fits"),
        "the restart began mid-stream"
    );
    for i in 0..INSTANCES {
        let node = &cluster.nodes[i];
        node.sigterm();
        let status = node
            .wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("no exit after SIGTERM; logs:\n{}", node.logs()));
        assert_eq!(status.code(), Some(0), "logs:\n{}", node.logs());
        let restarted = node.respawn();
        restarted.wait_for_log("consuming", PATIENCE);
        wait_ready(&restarted).await;
        eprintln!(
            "instance {i} restarted with {} rows stored",
            cluster.rows().await
        );
        cluster.nodes[i] = restarted;
    }
    assert_stored_exactly_once(&cluster, BACKLOG).await;
    cluster.cleanup().await;
}
