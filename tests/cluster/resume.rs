//! Positions and resume on one instance (`LIVE_FEED=local`): a client that
//! reconnects with `?since=` gets what it missed and then the live stream,
//! every event exactly once; beyond the ring, an exact `lagged` count; a
//! page opened with `?last=` starts with the newest events.

use std::collections::HashSet;

use sluice_testkit::{fresh_database, Publisher};

use crate::client::{Collected, LiveClient};
use crate::helpers::*;

/// Events published in each test.
const N: usize = 2000;

/// Publishes `n` events `<tag>-<i>` on a connection of its own, in the
/// background, so a client can disconnect while they flow.
fn publish_in_background(
    cluster: &Cluster,
    tag: &'static str,
    n: usize,
) -> actix_web::rt::task::JoinHandle<()> {
    let (url, prefix) = (cluster.amqp_url.clone(), cluster.prefix.clone());
    actix_web::rt::spawn(async move {
        let publisher = Publisher::connect(&url).await.expect("publisher");
        publisher
            .publish_json_batch(&prefix, n, |i| Some(format!("{tag}-{i}")))
            .await
            .expect("publish");
        let _ = publisher.close().await;
    })
}

/// Every id `<tag>-0..n` is in `before` then `after` exactly once, or was
/// counted missed; returns the number missed.
fn assert_once(tag: &str, n: usize, before: &Collected, after: &Collected) -> u64 {
    let mut seen = HashSet::new();
    for id in before.ids().into_iter().chain(after.ids()) {
        assert!(id.starts_with(&format!("{tag}-")), "a stranger: {id}");
        assert!(seen.insert(id.clone()), "{id} received twice");
    }
    assert_eq!(
        seen.len() as u64 + before.missed + after.missed,
        n as u64,
        "received + missed == published"
    );
    // Positions only grow, across the reconnect too.
    let positions: Vec<u64> = before
        .events
        .iter()
        .chain(&after.events)
        .map(|e| e.position)
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    before.missed + after.missed
}

#[actix_web::test]
async fn a_client_that_reconnects_with_since_gets_every_event_exactly_once() {
    let db = fresh_database().await;
    // The resume bound is the smaller of the ring and the client's buffer
    // (a replay larger than WS_BUFFER is trimmed by it, and counted).
    let cluster = Cluster::start(
        db,
        1,
        &[
            ("LIVE_HISTORY", "10000".to_owned()),
            ("WS_BUFFER", "4096".to_owned()),
        ],
    )
    .await;
    let addr = cluster.nodes[0].http_addr();
    let mut first = LiveClient::connect(addr, "?since=0").await;
    let publishing = publish_in_background(&cluster, "r", N);
    first.read_until_received(300).await;
    let before = first.close().await;
    assert_eq!(before.missed, 0);
    let resume_at = before.last_position().expect("events");
    publishing.await.expect("published");

    let mut second = LiveClient::connect(addr, &format!("?since={resume_at}")).await;
    second
        .read_until_accounted((N - before.events.len()) as u64)
        .await;
    let missed = assert_once("r", N, &before, &second.got);
    assert_eq!(missed, 0, "within the ring nothing is missed");
    cluster.stop_all();
    cluster.cleanup().await;
}

#[actix_web::test]
async fn beyond_the_ring_a_resuming_client_is_told_the_exact_gap() {
    let db = fresh_database().await;
    let cluster = Cluster::start(db, 1, &[("LIVE_HISTORY", "100".to_owned())]).await;
    let addr = cluster.nodes[0].http_addr();
    // A watcher reading everything proves the Observable handled it all.
    let mut watcher = LiveClient::connect(addr, "?since=0").await;
    let mut first = LiveClient::connect(addr, "?since=0").await;
    cluster.publish("g", 500).await;
    first.read_until_accounted(500).await;
    let before = first.close().await;
    assert_eq!(before.missed, 0);
    // 1500 more while the client is away: more than the ring's 100.
    cluster
        .publisher
        .publish_json_batch(&cluster.prefix, 1500, |i| Some(format!("g-{}", 500 + i)))
        .await
        .expect("publish");
    watcher.read_until_accounted(2000).await;
    let resume_at = before.last_position().expect("events");
    let mut second = LiveClient::connect(addr, &format!("?since={resume_at}")).await;
    second.read_until_received(100).await;
    // Exactly: the 100 newest replayed, the 1400 before them told as lagged,
    // in publish order (one instance: one consumer, in order).
    assert_eq!((second.got.events.len(), second.got.missed), (100, 1400));
    let expected: Vec<String> = (1900..2000).map(|i| format!("g-{i}")).collect();
    assert_eq!(second.got.ids(), expected);
    assert_once("g", 2000, &before, &second.got);
    cluster.stop_all();
    cluster.cleanup().await;
}

#[actix_web::test]
async fn a_page_opened_with_last_starts_with_the_newest_events() {
    let db = fresh_database().await;
    let cluster = Cluster::start(db, 1, &[]).await;
    let addr = cluster.nodes[0].http_addr();
    let mut watcher = LiveClient::connect(addr, "?since=0").await;
    cluster.publish("l", 50).await;
    // Once a client saw all 50, the ring holds them too.
    watcher.read_until_received(50).await;
    let mut page = LiveClient::connect(addr, "?last=10").await;
    page.read_until_received(10).await;
    let expected: Vec<String> = (40..50).map(|i| format!("l-{i}")).collect();
    assert_eq!(page.got.ids(), expected);
    assert_eq!(page.got.missed, 0);
    cluster.stop_all();
    cluster.cleanup().await;
}
