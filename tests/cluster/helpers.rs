//! A cluster of `sluice` instances sharing one database and one broker
//! topology, started at the same moment, and the checks a test makes on it.

use std::path::Path;
use std::sync::{Arc, Barrier};

use std::collections::HashSet;

use sluice_testkit::amqp::{self, QueueCounts};
use sluice_testkit::{
    eventually, fresh_database, unique_prefix, Publisher, Service, TestDb, TopologyGuard,
};

use crate::client::{Collected, LiveClient};

pub use crate::common::{get, PATIENCE};

/// Instances per cluster in these tests.
pub const INSTANCES: usize = 3;

/// Several instances on one database and one AMQP prefix.
pub struct Cluster {
    pub db: TestDb,
    pub prefix: String,
    pub amqp_url: String,
    /// The instances, in start order (`INSTANCE_NAME` = `node-<index>`).
    pub nodes: Vec<Service>,
    pub publisher: Publisher,
    /// Deletes the broker objects last, once the instances are gone, even if
    /// the test panicked.
    _topology: TopologyGuard,
}

impl Cluster {
    /// Starts `n` instances on `db` at the same moment (one thread each,
    /// released together by a barrier), with `extra` settings, and waits
    /// until every one of them consumes.
    pub async fn start(db: TestDb, n: usize, extra: &[(&str, String)]) -> Cluster {
        Cluster::start_on(amqp::amqp_url(), db, n, extra).await
    }

    /// As [`Cluster::start`], on the broker at `amqp_url`.
    pub async fn start_on(
        amqp_url: String,
        db: TestDb,
        n: usize,
        extra: &[(&str, String)],
    ) -> Cluster {
        let prefix = unique_prefix();
        let topology = TopologyGuard::new(&amqp_url, &prefix);
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".to_owned(), db.url()),
            ("AMQP_PREFIX".to_owned(), prefix.clone()),
            ("AMQP_URL".to_owned(), amqp_url.clone()),
        ];
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let barrier = Arc::new(Barrier::new(n));
        let starting: Vec<_> = (0..n)
            .map(|i| {
                let barrier = Arc::clone(&barrier);
                let mut env = env.clone();
                env.push(("INSTANCE_NAME".to_owned(), format!("node-{i}")));
                std::thread::spawn(move || {
                    let env: Vec<(&str, String)> =
                        env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                    barrier.wait();
                    let service = Service::spawn(Path::new(env!("CARGO_BIN_EXE_sluice")), &env);
                    service.wait_for_log("consuming", PATIENCE);
                    service
                })
            })
            .collect();
        let nodes: Vec<Service> = starting
            .into_iter()
            .map(|thread| thread.join().expect("an instance started"))
            .collect();
        let publisher = Publisher::connect(&amqp_url)
            .await
            .expect("publisher connects");
        Cluster {
            db,
            prefix,
            amqp_url,
            nodes,
            publisher,
            _topology: topology,
        }
    }

    /// Rows in `events`.
    pub async fn rows(&self) -> i64 {
        self.db.count_rows("events").await
    }

    /// Distinct message ids in `events`.
    pub async fn distinct_ids(&self) -> i64 {
        self.db
            .query_scalar("SELECT count(DISTINCT message_id) FROM events", &[])
            .await
    }

    /// Waits until `events` holds at least `n` rows; returns how many.
    pub async fn wait_some_rows(&self, n: i64) -> i64 {
        eventually(PATIENCE, &format!("at least {n} rows"), || async {
            let rows = self.rows().await;
            if rows >= n {
                Ok(rows)
            } else {
                Err(format!("{rows} rows"))
            }
        })
        .await
    }

    /// Waits until `events` holds exactly `n` rows (failing if it passes `n`).
    pub async fn wait_rows(&self, n: i64) {
        eventually(PATIENCE * 2, &format!("{n} rows are stored"), || async {
            let rows = self.rows().await;
            assert!(rows <= n, "more rows ({rows}) than messages ({n})");
            if rows == n {
                Ok(())
            } else {
                Err(format!("{rows} rows"))
            }
        })
        .await;
    }

    /// Publishes `n` events with message ids `<tag>-<i>` (waits for confirms).
    pub async fn publish(&self, tag: &str, n: usize) {
        self.publisher
            .publish_json_batch(&self.prefix, n, |i| Some(format!("{tag}-{i}")))
            .await
            .expect("publish");
    }

    /// What the ingest queue holds.
    pub async fn ingest_counts(&self) -> QueueCounts {
        amqp::queue_counts(&self.amqp_url, &format!("{}.ingest", self.prefix))
            .await
            .expect("ingest queue exists")
    }

    /// Messages waiting in the dead-letter queues.
    pub async fn dead_ready(&self) -> u32 {
        amqp::dead_ready(&self.amqp_url, &self.prefix)
            .await
            .expect("the dead-letter queues exist")
    }

    /// `GET /readyz` of instance `i`: the status code and the body.
    pub async fn readyz(&self, i: usize) -> (u16, String) {
        get(&format!("{}/readyz", self.nodes[i].base_url())).await
    }

    /// SIGTERMs every instance still running and asserts each exits 0.
    pub fn stop_all(&self) {
        for node in &self.nodes {
            node.sigterm();
        }
        for node in &self.nodes {
            let status = node
                .wait_exit(PATIENCE)
                .unwrap_or_else(|| panic!("no exit after SIGTERM; logs:\n{}", node.logs()));
            assert_eq!(status.code(), Some(0), "logs:\n{}", node.logs());
        }
    }

    /// After every instance stopped: the ingest queue is empty (so nothing
    /// was left unacked: a stopped consumer's unacked deliveries return to
    /// the queue), and nothing was dead-lettered.
    pub async fn assert_drained(&self) {
        let counts = self.ingest_counts().await;
        assert_eq!(counts.ready, 0, "ingest queue after the stop: {counts:?}");
        assert_eq!(counts.unacked.unwrap_or(0), 0, "{counts:?}");
        assert_eq!(self.dead_ready().await, 0, "nothing is dead-lettered");
    }

    /// Closes the publisher (the topology guard deletes the broker objects).
    pub async fn cleanup(self) {
        let _ = self.publisher.close().await;
    }
}

/// Waits until instance `node` answers `/readyz` with 200.
pub async fn wait_ready(node: &Service) {
    eventually(PATIENCE, "the instance is ready", || async {
        let (status, body) = get(&format!("{}/readyz", node.base_url())).await;
        if status == 200 {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
}

/// Starts 3 instances with the stream feed and waits until each reads it.
pub async fn stream_cluster(extra: &[(&str, &str)]) -> Cluster {
    stream_cluster_on(amqp::amqp_url(), extra).await
}

/// As [`stream_cluster`], on the broker at `amqp_url`.
pub async fn stream_cluster_on(amqp_url: String, extra: &[(&str, &str)]) -> Cluster {
    let mut env = vec![
        ("LIVE_FEED", "stream".to_owned()),
        ("WS_BUFFER", "8192".to_owned()),
        // These tests are about every event in one order across instances,
        // not freshness (`tests/live` freshness has that): a CI machine that
        // stalls three instances for over 2 s must not turn into told misses.
        ("WS_MAX_LAG", "60s".to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let cluster = Cluster::start_on(amqp_url, fresh_database().await, INSTANCES, &env).await;
    for node in &cluster.nodes {
        node.wait_for_log("live feed reader: connected", PATIENCE);
    }
    cluster
}

/// Every received id is one of `<tag>-0..n`, none twice; returns the set.
pub fn distinct_ids(tag: &str, got: &Collected) -> HashSet<String> {
    let mut seen = HashSet::new();
    for id in got.ids() {
        assert!(id.starts_with(&format!("{tag}-")), "a stranger: {id}");
        assert!(seen.insert(id.clone()), "{id} received twice");
    }
    seen
}

/// Starts each client reading until `total` events are accounted for, on a
/// task of its own, so that every client reads while the events flow.
pub fn read_while_publishing(
    clients: Vec<LiveClient>,
    total: u64,
) -> Vec<actix_web::rt::task::JoinHandle<LiveClient>> {
    clients
        .into_iter()
        .map(|mut client| {
            actix_web::rt::spawn(async move {
                client.read_until_accounted(total).await;
                client
            })
        })
        .collect()
}
