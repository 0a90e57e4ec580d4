//! `/metrics` and `/api/stats` against the real service, RabbitMQ and PostgreSQL:
//! after N events the Prometheus text parses and says N stored, a forced
//! dead-letter is counted under its reason, and the JSON snapshot agrees with
//! the text series for series.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::PATIENCE;
use lapin::BasicProperties;
use prometheus_parse::{Scrape, Value};
use sluice_testkit::amqp;
use sluice_testkit::{eventually, fresh_database};

/// Events published on the happy path.
const N: usize = 250;

/// The body of a GET, failing the test on any error.
async fn get(url: &str) -> (u16, String, String) {
    let mut response = awc::Client::default()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.body().limit(16 << 20).await.expect("a body");
    let text = String::from_utf8(body.to_vec()).expect("a UTF-8 body");
    (response.status().as_u16(), content_type, text)
}

/// Every series of the text as `name{labels sorted}` → value; histograms
/// contribute `name_count` and `name_sum`. Fails on any line that is not valid
/// exposition format.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        assert!(
            value == "+Inf" || value == "-Inf" || value == "NaN" || value.parse::<f64>().is_ok(),
            "bad value in {line:?}"
        );
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line:?}"
            );
        }
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("the text parses");
    let mut series = BTreeMap::new();
    for sample in scrape.samples {
        // `/api/stats` names the instance once instead of in every key.
        let labels: BTreeMap<_, _> = sample
            .labels
            .iter()
            .filter(|(name, _)| name.as_str() != "sluice_instance")
            .collect();
        let key = if labels.is_empty() {
            sample.metric.clone()
        } else {
            let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{}{{{}}}", sample.metric, pairs.join(","))
        };
        match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                series.insert(key, v);
            }
            // The `_sum` and `_count` lines arrive as untyped series of their own.
            Value::Histogram(_) | Value::Summary(_) => {}
        }
    }
    series
}

/// The same series, read from the `/api/stats` JSON.
fn flatten_stats(stats: &serde_json::Value) -> BTreeMap<String, f64> {
    let mut series = BTreeMap::new();
    for section in ["counters", "gauges"] {
        let map = stats[section]
            .as_object()
            .unwrap_or_else(|| panic!("/api/stats has no {section:?} object: {stats}"));
        for (key, value) in map {
            series.insert(key.clone(), value.as_f64().expect("a number"));
        }
    }
    let histograms = stats["histograms"]
        .as_object()
        .expect("a histograms object");
    for (key, h) in histograms {
        let (name, labels) = key.split_at(key.find('{').unwrap_or(key.len()));
        series.insert(
            format!("{name}_count{labels}"),
            h["count"].as_f64().expect("count"),
        );
        series.insert(
            format!("{name}_sum{labels}"),
            h["sum"].as_f64().expect("sum"),
        );
    }
    series
}

#[actix_web::test]
async fn metrics_count_what_happened_and_the_stats_agree() {
    let app = common::spawn_app_with(fresh_database().await, &[]).await;
    let (db, prefix, url) = (&app.db, &app.prefix, &app.amqp_url);
    let (service, publisher) = (&app.service, &app.publisher);
    let base = service.base_url();

    // Act: N good events and one that is not JSON.
    publisher
        .publish_json_batch(prefix, N, |i| Some(format!("m-{i}")))
        .await
        .expect("the broker confirms the batch");
    publisher
        .publish(
            prefix,
            "test.bad",
            b"this is not json",
            BasicProperties::default().with_message_id("bad-1".into()),
        )
        .await
        .expect("the broker confirms the bad message");

    // Assert: the counters catch up with what was published.
    let metrics_url = format!("{base}/metrics");
    let metrics = eventually(
        PATIENCE,
        "N stored and 1 dead-lettered in /metrics",
        || async {
            let (_, _, text) = get(&metrics_url).await;
            let series = parse_exposition(&text);
            let stored = series
                .get("sluice_events_stored_total")
                .copied()
                .unwrap_or(0.0);
            let dead = series
                .get(r#"sluice_events_dead_lettered_total{reason="not_json"}"#)
                .copied()
                .unwrap_or(0.0);
            if stored == N as f64 && dead == 1.0 {
                Ok(series)
            } else {
                Err(format!("stored {stored}, dead-lettered (not_json) {dead}"))
            }
        },
    )
    .await;
    assert_eq!(metrics["sluice_events_received_total"], (N + 1) as f64);
    assert!(metrics["sluice_batch_size_events_count"] >= 1.0);
    assert_eq!(metrics["sluice_batch_size_events_sum"], N as f64);
    assert!(metrics["sluice_write_duration_seconds_count"] >= 1.0);
    assert_eq!(db.count_rows("events").await, N as i64);
    let dead = amqp::get_all_dead(url, prefix)
        .await
        .expect("the dead-letter queue reads");
    assert_eq!(dead.len(), 1, "one dead letter");

    let (status, content_type, _) = get(&metrics_url).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");

    // `/api/stats` agrees with `/metrics`: taken between two identical
    // scrapes, every series must match exactly.
    let stats_url = format!("{base}/api/stats");
    let (stats, series) = eventually(PATIENCE, "a quiet moment to compare", || async {
        let (_, _, before) = get(&metrics_url).await;
        let (status, content_type, json) = get(&stats_url).await;
        let (_, _, after) = get(&metrics_url).await;
        assert_eq!(status, 200, "/api/stats answers: {json}");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let (before, after) = (parse_exposition(&before), parse_exposition(&after));
        if before == after {
            let stats: serde_json::Value = serde_json::from_str(&json).expect("JSON");
            Ok((stats, after))
        } else {
            Err("the metrics moved between the two scrapes".to_owned())
        }
    })
    .await;
    // Same series, same values (to the last bit a JSON float can lose in
    // serde_json's fast parsing: about one unit in the last place).
    let from_stats = flatten_stats(&stats);
    assert_eq!(
        from_stats.keys().collect::<Vec<_>>(),
        series.keys().collect::<Vec<_>>(),
        "/api/stats has other series than /metrics"
    );
    for (key, value) in &series {
        let json = from_stats[key];
        assert!(
            (json - value).abs() <= value.abs() * 1e-12,
            "{key}: /api/stats says {json}, /metrics says {value}"
        );
    }
    assert_eq!(stats["counters"]["sluice_events_stored_total"], N as f64);
    assert_eq!(
        stats["counters"][r#"sluice_events_dead_lettered_total{reason="not_json"}"#],
        1.0
    );
    let batch = &stats["histograms"]["sluice_batch_size_events"];
    assert_eq!(batch["sum"], N as f64);
    // Estimated as Prometheus' `histogram_quantile` does, interpolating
    // inside a bucket from the one below (0 for the first): when most batches
    // held one event, the p50 lies inside (0, 1].
    assert!(
        batch["p50"]
            .as_f64()
            .is_some_and(|p| p > 0.0 && p <= N as f64),
        "{batch}"
    );
    let pipeline = &stats["pipeline"];
    assert_eq!(pipeline["broker_up"], true, "{pipeline}");
    assert_eq!(pipeline["queue_depth"], 0.0, "{pipeline}");
    assert_eq!(pipeline["waiting_on"], "nothing", "{pipeline}");
    assert!(
        pipeline["writers"].as_f64().is_some_and(|w| w >= 1.0),
        "{pipeline}"
    );
    assert!(
        pipeline["prefetch"].as_f64().is_some_and(|p| p >= 1.0),
        "{pipeline}"
    );

    assert_eq!(app.terminate(), Some(0), "a clean exit");
    app.cleanup().await;
}
