//! Instances started together on an empty database all come up.

use sluice_testkit::fresh_database;

use crate::helpers::*;

#[actix_web::test]
async fn three_instances_started_at_once_on_an_empty_database_all_become_ready() {
    let db = fresh_database().await;
    let cluster = Cluster::start(db, INSTANCES, &[]).await;
    for (i, node) in cluster.nodes.iter().enumerate() {
        assert_eq!(node.exit_status(), None, "instance {i} exited");
        wait_ready(node).await;
        let (status, body) = cluster.readyz(i).await;
        assert_eq!(status, 200, "instance {i}: {body}");
    }
    // The schema was applied once, by whichever instance took the lock first.
    let applied: i64 = cluster
        .db
        .query_scalar("SELECT count(*) FROM refinery_schema_history", &[])
        .await;
    assert_eq!(applied, 1, "the one migration is recorded once");
    let applied_by: usize = cluster
        .nodes
        .iter()
        .filter(|node| node.logs().contains("applied migration"))
        .count();
    assert_eq!(applied_by, 1, "exactly one instance applied the migration");
    // Each instance names itself in its logs, its metrics and its stats.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let name = format!("node-{i}");
        let line = node.wait_for_log("listening on", PATIENCE);
        assert!(line.contains(&format!(" {name} ")), "{line}");
        let (_, metrics) = get(&format!("{}/metrics", node.base_url())).await;
        let label = format!("sluice_instance=\"{name}\"");
        let samples: Vec<&str> = metrics
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert!(!samples.is_empty());
        for sample in samples {
            assert!(sample.contains(&label), "{sample}");
        }
        let (status, stats) = get(&format!("{}/api/stats", node.base_url())).await;
        assert_eq!(status, 200);
        let stats: serde_json::Value = serde_json::from_str(&stats).expect("JSON");
        assert_eq!(stats["instance"], name.as_str());
        assert!(stats["gauges"].get("sluice_writers").is_some(), "{stats}");
    }
    // And the service works: each event stored once.
    cluster.publish("s", 300).await;
    cluster.wait_rows(300).await;
    cluster.stop_all();
    cluster.assert_drained().await;
    cluster.cleanup().await;
}
