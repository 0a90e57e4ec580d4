//! The cluster-wide live feed (`LIVE_FEED=stream`): a client on each of 3
//! instances accounts for every event of all instances, in the same order
//! everywhere; a client that reconnects to another instance with `?since=`
//! gets every event exactly once within the resume bound, and an exact
//! `lagged` count beyond it; publishes dropped by an instance are told.

use std::collections::HashSet;

use sluice_testkit::eventually;

use crate::client::{Collected, LiveClient};
use crate::helpers::*;

#[actix_web::test]
async fn a_client_on_each_instance_sees_every_event_of_all_in_one_order() {
    const N: usize = 3000;
    let cluster = stream_cluster(&[]).await;
    // `?last=` also hands over what the Observable had before the
    // subscription was in place, so no event slips between.
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(LiveClient::connect(node.http_addr(), "?last=100000").await);
    }
    // The clients read while the events flow, as a dashboard does: one that
    // stops reading for longer than `WS_MAX_LAG` is rightly told it missed some.
    let readers = read_while_publishing(clients, N as u64);
    cluster.publish("f", N).await;
    cluster.wait_rows(N as i64).await;
    let mut orders = Vec::new();
    for reader in readers {
        let client = reader.await.expect("the reading client");
        assert_eq!(client.got.missed, 0, "nothing missed at this rate");
        assert_eq!(distinct_ids("f", &client.got).len(), N);
        orders.push(client.got.events.clone());
    }
    assert_eq!(orders[0], orders[1], "instances 0 and 1 agree on the order");
    assert_eq!(orders[0], orders[2], "instances 0 and 2 agree on the order");
    // Every instance took part in storing (competing consumers), yet each
    // client saw all of it.
    for node in &cluster.nodes {
        let (_, metrics) = get(&format!("{}/metrics", node.base_url())).await;
        let published =
            crate::common::metric_value(&metrics, "sluice_live_feed_published_events_total", "");
        assert!(published > 0.0, "each instance published its share");
    }
    cluster.stop_all();
    cluster.cleanup().await;
}

/// Reads `n` events on `first`, closes it, reconnects to `second` with
/// `since=`, and reads until all `total` are accounted for.
async fn resume_elsewhere(
    cluster: &Cluster,
    tag: &'static str,
    total: usize,
) -> (Collected, Collected) {
    let mut first = LiveClient::connect(cluster.nodes[0].http_addr(), "?last=100000").await;
    let publishing = {
        let (url, prefix) = (cluster.amqp_url.clone(), cluster.prefix.clone());
        actix_web::rt::spawn(async move {
            let publisher = sluice_testkit::Publisher::connect(&url)
                .await
                .expect("publisher");
            publisher
                .publish_json_batch(&prefix, total, |i| Some(format!("{tag}-{i}")))
                .await
                .expect("publish");
            let _ = publisher.close().await;
        })
    };
    first.read_until_received(300).await;
    let before = first.close().await;
    let since = before.last_position().expect("events");
    publishing.await.expect("published");
    cluster.wait_rows(total as i64).await;
    let mut second =
        LiveClient::connect(cluster.nodes[1].http_addr(), &format!("?since={since}")).await;
    second
        .read_until_accounted((total - before.events.len()) as u64 - before.missed)
        .await;
    let after = second.got.clone();
    // No duplicate across the two sessions, positions only grow, and
    // received + missed == every event.
    let mut all = distinct_ids(tag, &before);
    for id in distinct_ids(tag, &after) {
        assert!(all.insert(id.clone()), "{id} received by both sessions");
    }
    assert_eq!(
        all.len() as u64 + before.missed + after.missed,
        total as u64
    );
    let positions: Vec<u64> = before
        .events
        .iter()
        .chain(&after.events)
        .map(|e| e.position)
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    (before, after)
}

#[actix_web::test]
async fn a_client_resuming_on_another_instance_gets_every_event_exactly_once() {
    let cluster = stream_cluster(&[]).await;
    let (before, after) = resume_elsewhere(&cluster, "e", 2000).await;
    assert_eq!(before.missed + after.missed, 0, "within the ring: no gap");
    cluster.stop_all();
    cluster.cleanup().await;
}

#[actix_web::test]
async fn a_client_resuming_from_deeper_than_the_ring_is_replayed_from_the_stream() {
    let cluster = stream_cluster(&[("LIVE_HISTORY", "100")]).await;
    // A watcher on instance 1 proves, by reading everything, that instance 1
    // has read the whole stream before the resume.
    let watcher = LiveClient::connect(cluster.nodes[1].http_addr(), "?last=100").await;
    let first = LiveClient::connect(cluster.nodes[0].http_addr(), "?last=100").await;
    let watching = read_while_publishing(vec![watcher], 2000).remove(0);
    let reading = read_while_publishing(vec![first], 500).remove(0);
    cluster.publish("b", 500).await;
    let first = reading.await.expect("the first client");
    let before = first.close().await;
    assert_eq!(before.missed, 0);
    // 1500 more while the client is away: far more than the ring's 100.
    cluster
        .publisher
        .publish_json_batch(&cluster.prefix, 1500, |i| Some(format!("b-{}", 500 + i)))
        .await
        .expect("publish");
    let watcher = watching.await.expect("the watcher");
    assert_eq!(watcher.got.missed, 0, "the watcher kept up");
    let since = before.last_position().expect("events");
    let mut second =
        LiveClient::connect(cluster.nodes[1].http_addr(), &format!("?since={since}")).await;
    second.read_until_accounted(1500).await;
    // Every one of them, from the stream itself (the ring holds 100), in
    // the stream's order as the watcher on the same instance saw them.
    assert_eq!((second.got.events.len(), second.got.missed), (1500, 0));
    let newest = &watcher.got.events[watcher.got.events.len() - 1500..];
    assert_eq!(second.got.events, newest);
    // And then the live stream, seamlessly.
    cluster.publish("c", 10).await;
    second.read_until_accounted(1510).await;
    assert_eq!(second.got.missed, 0);
    let ids: HashSet<String> = second.got.ids().into_iter().collect();
    assert_eq!(ids.len(), 1510, "none twice");
    cluster.stop_all();
    cluster.cleanup().await;
}

#[actix_web::test]
async fn copies_an_instance_drops_are_told_to_every_client() {
    const N: usize = 3000;
    // Room for one event on its way to the stream, one batch unconfirmed at a
    // time: most copies are dropped by the Tap, and every reader must count
    // them.
    let cluster =
        stream_cluster(&[("LIVE_BACKLOG", "1"), ("LIVE_STREAM_MAX_UNCONFIRMED", "1")]).await;
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(LiveClient::connect(node.http_addr(), "?last=100000").await);
    }
    let readers = read_while_publishing(clients, N as u64);
    cluster.publish("d", N).await;
    cluster.wait_rows(N as i64).await;
    let mut dropped = 0.0;
    for node in &cluster.nodes {
        let (_, metrics) = get(&format!("{}/metrics", node.base_url())).await;
        dropped += crate::common::metric_value(&metrics, "sluice_tap_dropped_events_total", "");
    }
    assert!(dropped > 0.0, "the bound made the Taps drop copies");
    let mut orders = Vec::new();
    for reader in readers {
        let client = reader.await.expect("the reading client");
        assert!(client.got.missed > 0);
        distinct_ids("d", &client.got);
        orders.push(client.got.events.clone());
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[0], orders[2]);
    cluster.stop_all();
    cluster.cleanup().await;
}

#[actix_web::test]
async fn a_replay_ends_where_the_ring_takes_over_even_when_the_filter_matched_nothing() {
    // One replay at a time on this instance: a replay that never ended
    // would keep every other resume waiting.
    let cluster = stream_cluster(&[("LIVE_HISTORY", "100"), ("LIVE_MAX_REPLAYS", "1")]).await;
    let mut first = LiveClient::connect(cluster.nodes[0].http_addr(), "").await;
    cluster.publish("p", 10).await;
    first.read_until_accounted(10).await;
    let since = first.close().await.resume_after();
    cluster
        .publisher
        .publish_json_batch(&cluster.prefix, 1500, |i| Some(format!("q-{i}")))
        .await
        .expect("publish");
    cluster.wait_rows(1510).await;
    // Far deeper than the ring, with a filter none of it matches: the
    // replay reads the stream, hands the client nothing, and must end where
    // the ring takes over (it holds the instance's only replay slot).
    let quiet = LiveClient::connect(
        cluster.nodes[1].http_addr(),
        &format!("?since={since}&topic=nothing.here"),
    )
    .await;
    let replays = |metrics: &str| crate::common::metric_value(metrics, "sluice_live_replays", "");
    let node = cluster.nodes[1].base_url();
    eventually(PATIENCE, "the replay started and ended", || async {
        let (_, metrics) = get(&format!("{node}/metrics")).await;
        let started = metrics.contains("sluice_live_replays");
        if started && replays(&metrics) == 0.0 {
            Ok(())
        } else {
            Err(format!("replays reading: {}", replays(&metrics)))
        }
    })
    .await;
    // The next resume gets the slot.
    let mut next =
        LiveClient::connect(cluster.nodes[1].http_addr(), &format!("?since={since}")).await;
    next.read_until_accounted(1500).await;
    assert_eq!((next.got.events.len(), next.got.missed), (1500, 0));
    assert!(quiet.close().await.events.is_empty());
    cluster.stop_all();
    cluster.cleanup().await;
}
