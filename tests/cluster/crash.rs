//! The live feed through crashes (`LIVE_FEED=stream`): a client connected
//! from before the first event to after the last, on any instance, receives
//! every event exactly once (received + missed == N, nothing twice) while
//! instances are SIGKILLed mid-stream and restarted, again and again in one
//! run, including its own instance (it then resumes on another one with
//! `?since=`), and while the broker restarts under a draining backlog.
//!
//! What breaks without the feed's gate and dedupe: a delivery acked before
//! its copy reached the stream is an event in the table no dashboard ever
//! shows or counts; a copy in the stream whose delivery was not acked is
//! copied again after the redelivery and shown twice.

use std::collections::HashSet;
use std::time::Duration;

use crate::client::LiveClient;
use crate::helpers::*;

/// Kill-and-restart rounds in one run.
const ROUNDS: usize = 20;

/// Events per round, published over about a second.
const PER_ROUND: usize = 500;

/// Publishes `n` events `<tag>-<i>` in slices of 25, one slice every 50 ms:
/// a stream that is still flowing when an instance dies.
async fn publish_paced(cluster: &Cluster, tag: &str, n: usize) {
    const SLICE: usize = 25;
    let mut ticks = tokio::time::interval(Duration::from_millis(50));
    for first in (0..n).step_by(SLICE) {
        ticks.tick().await;
        let count = SLICE.min(n - first);
        cluster
            .publisher
            .publish_json_batch(&cluster.prefix, count, |i| {
                Some(format!("{tag}-{}", first + i))
            })
            .await
            .expect("publish");
    }
}

/// Every id received once, and the client's count exact: received + missed
/// is every event published, and nothing was missed (no copy was dropped).
fn assert_exact(client: &LiveClient, total: usize, who: &str) {
    let ids: HashSet<String> = client.got.ids().into_iter().collect();
    assert_eq!(
        ids.len(),
        client.got.events.len(),
        "{who}: an event received twice"
    );
    assert_eq!(
        (client.got.events.len(), client.got.missed),
        (total, 0),
        "{who}: received, missed of {total}"
    );
    let positions: Vec<u64> = client.got.events.iter().map(|e| e.position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "{who}: positions only grow"
    );
}

/// The clients `reading`, once done: each exact (see [`assert_exact`]),
/// and all of them with the same events in the same order.
async fn all_exact(
    reading: Vec<actix_web::rt::task::JoinHandle<LiveClient>>,
    total: usize,
    when: &str,
) -> Vec<LiveClient> {
    let mut clients = Vec::new();
    for reader in reading {
        clients.push(reader.await.expect("a reading client"));
    }
    for (i, client) in clients.iter().enumerate() {
        assert_exact(client, total, &format!("{when}, client {i}"));
        assert_eq!(
            client.got.events, clients[0].got.events,
            "{when}: one order on every instance"
        );
    }
    clients
}

/// Waits until `node` consumes again after a restart.
fn restarted(node: &sluice_testkit::Service) -> sluice_testkit::Service {
    let node = node.respawn();
    node.wait_for_log("consuming", PATIENCE);
    node
}

#[actix_web::test]
async fn killing_an_instance_mid_stream_twenty_times_costs_no_client_an_event_nor_shows_one_twice()
{
    let mut cluster = stream_cluster(&[]).await;
    // Clients on the two instances that survive every round, from before
    // the first event.
    let mut clients = vec![
        LiveClient::connect(cluster.nodes[1].http_addr(), "").await,
        LiveClient::connect(cluster.nodes[2].http_addr(), "").await,
    ];
    let mut total = 0;
    for round in 0..ROUNDS {
        let reading = read_while_publishing(clients, (total + PER_ROUND) as u64);
        let tag = format!("r{round}");
        let publishing = publish_paced(&cluster, &tag, PER_ROUND);
        let killing = async {
            // Mid-stream: some of this round is stored, some not yet published.
            cluster.wait_some_rows((total + PER_ROUND / 3) as i64).await;
            cluster.nodes[0].sigkill();
        };
        futures_util::join!(publishing, killing);
        total += PER_ROUND;
        cluster.nodes[0] = restarted(&cluster.nodes[0]);
        cluster.wait_rows(total as i64).await;
        clients = all_exact(reading, total, &format!("round {round}")).await;
    }
    assert_eq!(cluster.distinct_ids().await, total as i64);
    cluster.stop_all();
    cluster.cleanup().await;
}

/// A client on instance 0 through `kills` rounds, each killing the
/// instance it is on mid-stream; it resumes on the next one with
/// `?since=`. Returns what it read and the events published.
async fn own_instance_killed(
    cluster: &mut Cluster,
    mut client: LiveClient,
    kills: usize,
) -> (LiveClient, usize) {
    let mut total = 0;
    for round in 0..kills {
        // The client's instance this round, and where it goes next.
        let victim = round % INSTANCES;
        let refuge = (victim + 1) % INSTANCES;
        let tag = format!("o{round}");
        let publishing = publish_paced(cluster, &tag, PER_ROUND);
        let reading = async {
            let target = (total + PER_ROUND) as u64;
            let mut client = client;
            if !client.read_until_accounted_or_gone(target).await {
                client = client.resume_on(cluster.nodes[refuge].http_addr()).await;
                assert!(
                    client.read_until_accounted_or_gone(target).await,
                    "round {round}: the refuge stayed up"
                );
            }
            client
        };
        let killing = async {
            cluster.wait_some_rows((total + PER_ROUND / 3) as i64).await;
            cluster.nodes[victim].sigkill();
        };
        let ((), got, ()) = futures_util::join!(publishing, reading, killing);
        client = got;
        total += PER_ROUND;
        cluster.nodes[victim] = restarted(&cluster.nodes[victim]);
        cluster.wait_rows(total as i64).await;
        // The client is on the refuge now: the next round's victim.
    }
    (client, total)
}

#[actix_web::test]
async fn a_client_whose_own_instance_is_killed_resumes_on_another_and_misses_nothing() {
    let mut cluster = stream_cluster(&[]).await;
    let client = LiveClient::connect(cluster.nodes[0].http_addr(), "").await;
    let (client, total) = own_instance_killed(&mut cluster, client, 5).await;
    assert_exact(&client, total, "a fast client");
    cluster.stop_all();
    cluster.cleanup().await;
}

#[actix_web::test]
async fn a_slow_client_told_of_misses_resumes_after_them_and_counts_each_once() {
    // A small buffer and a client taking 15 ms a frame: it misses events
    // (told where they were), and its instance dies between a notice and
    // the events after it as often as not.
    let mut cluster = stream_cluster(&[("WS_BUFFER", "40")]).await;
    let client = LiveClient::connect(cluster.nodes[0].http_addr(), "")
        .await
        .with_pace(Duration::from_millis(15));
    let (client, total) = own_instance_killed(&mut cluster, client, 5).await;
    let ids: HashSet<String> = client.got.ids().into_iter().collect();
    assert_eq!(
        ids.len(),
        client.got.events.len(),
        "an event received twice"
    );
    assert_eq!(client.got.accounted(), total as u64, "received + missed");
    assert!(
        client.got.missed > 0,
        "the client was slow enough to miss some"
    );
    cluster.stop_all();
    cluster.cleanup().await;
}

#[actix_web::test]
async fn a_client_that_leaves_right_after_a_notice_resumes_without_hearing_it_twice() {
    const N: usize = 1500;
    // A small buffer and a slow client: it is told of misses.
    let cluster = stream_cluster(&[("WS_BUFFER", "40")]).await;
    let mut client = LiveClient::connect(cluster.nodes[0].http_addr(), "")
        .await
        .with_pace(Duration::from_millis(15));
    let publishing = publish_paced(&cluster, "n", N);
    let leaving = async {
        // It leaves the moment it was told of a miss, before the events
        // after it; and comes back on another instance.
        client.read_until_told().await;
        let mut client = client.resume_on(cluster.nodes[1].http_addr()).await;
        client.read_until_accounted(N as u64).await;
        client
    };
    let ((), client) = futures_util::join!(publishing, leaving);
    let ids: HashSet<String> = client.got.ids().into_iter().collect();
    assert_eq!(
        ids.len(),
        client.got.events.len(),
        "an event received twice"
    );
    assert_eq!(client.got.accounted(), N as u64, "received + missed");
    cluster.wait_rows(N as i64).await;
    cluster.stop_all();
    cluster.cleanup().await;
}

#[actix_web::test]
async fn broker_restarts_mid_stream_cost_no_client_an_event_nor_show_one_twice() {
    const RESTARTS: usize = 5;
    const PER_ROUND: usize = 3000;
    // A node of this test's own: the shared broker serves every other test.
    let broker = sluice_testkit::PrivateBroker::start().expect("a private RabbitMQ node");
    let cluster = stream_cluster_on(broker.url(), &[]).await;
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(LiveClient::connect(node.http_addr(), "").await);
    }
    let mut total = 0;
    for round in 0..RESTARTS {
        // A backlog the instances are draining (persistent messages in a
        // durable queue: they outlive the restart) when the broker restarts.
        let publisher = sluice_testkit::Publisher::connect(&broker.url())
            .await
            .expect("publisher connects");
        publisher
            .publish_json_batch(&cluster.prefix, PER_ROUND, |i| {
                Some(format!("b{round}-{i}"))
            })
            .await
            .expect("publish");
        let _ = publisher.close().await;
        let reading = read_while_publishing(clients, (total + PER_ROUND) as u64);
        cluster.wait_some_rows((total + PER_ROUND / 4) as i64).await;
        broker.restart().expect("the broker restarts");
        total += PER_ROUND;
        cluster.wait_rows(total as i64).await;
        clients = all_exact(reading, total, &format!("restart {round}")).await;
    }
    cluster.stop_all();
    cluster.cleanup().await;
}
