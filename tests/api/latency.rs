//! The latency figures against what the test measures itself, for the two
//! kinds of publishers: those that send only the AMQP `timestamp` (whole
//! seconds: pika, amqplib, Spring AMQP…) and those that send the publish
//! time in milliseconds (the `timestamp_in_ms` header, as `sluice load` and
//! RabbitMQ's message-timestamp plugin do).
//!
//! What the test measures, per event, from outside the service:
//! - when the row was committed, from both sides: after PostgreSQL wrote it
//!   (the test adds a column `inserted_at DEFAULT clock_timestamp()` to its
//!   throwaway table, stamped while the row is inserted, before the commit
//!   and its WAL flush) and before another session heard of it (a trigger
//!   the test adds sends a notification, which PostgreSQL delivers once the
//!   transaction has committed);
//! - when the test published it (its own clock, the same machine's);
//! - with `AMQP_PREFETCH=1`, when the ack reached the broker, from above:
//!   the broker hands over the next delivery only once the previous one is
//!   acked, so an ack happened before the next event's `received_at`.
//!
//! Every figure the service reports (`/api/stats`, which is `/metrics` read
//! back, and what the dashboard reads) must be within a few milliseconds of
//! these, or be explicitly absent with the reason. Quantiles are estimated
//! from histogram buckets, so they may be off by up to a bucket's width
//! (1 ms below 10 ms, see `src/telemetry.rs`) on top of that.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use futures_util::StreamExt;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::Value;
use sluice_testkit::{eventually, fresh_database, TestDb};

use crate::helpers::*;

/// How far a figure may be outside the test's own bounds, in seconds:
/// the service hears of a commit a moment after the test's session does,
/// and on a machine shared with the broker, the database and other builds
/// that moment grows with the load (so a twentieth of the figure is allowed
/// on top, which is nothing at millisecond scale).
const SLACK: f64 = 0.003;
const SLACK_SHARE: f64 = 0.05;

/// Events per test: enough for a p99 that is not the maximum.
const N: usize = 200;

/// The width of the latency bucket holding `value` (seconds), as
/// configured in `src/telemetry.rs`: how far a quantile estimated by
/// interpolation inside it can be from the exact one.
fn bucket_width(value: f64) -> f64 {
    const BOUNDS: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008,
        0.009, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05, 0.075,
        0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
    ];
    let mut lower = 0.0;
    for &upper in BOUNDS {
        if value <= upper {
            return upper - lower;
        }
        lower = upper;
    }
    f64::INFINITY
}

/// The `q` quantile of `values` by nearest rank (`ceil(q × n)`-th smallest),
/// the observation a histogram's estimate is interpolated towards.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The test's own measure of one figure, per event; for the ack only its
/// bounds are known, so a figure has a low and a high side.
struct Measured {
    low: Vec<f64>,
    high: Vec<f64>,
}

/// Checks one figure of `/api/stats` (`{count, mean, p50, p99}`, seconds)
/// against the test's measure: the count exactly, the mean within
/// [`SLACK`], each quantile within [`SLACK`] plus its bucket's width.
fn assert_close(what: &str, figure: &Value, measured: &Measured) {
    let get = |k: &str| {
        figure[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: no {k} in {figure}"))
    };
    let ms = |v: f64| format!("{:.2} ms", v * 1000.0);
    assert_eq!(get("count"), measured.low.len() as f64, "{what}: {figure}");
    let checks = [
        (
            "mean",
            get("mean"),
            mean(&measured.low),
            mean(&measured.high),
            0.0,
        ),
        (
            "p50",
            get("p50"),
            quantile(&measured.low, 0.5),
            quantile(&measured.high, 0.5),
            1.0,
        ),
        (
            "p99",
            get("p99"),
            quantile(&measured.low, 0.99),
            quantile(&measured.high, 0.99),
            1.0,
        ),
    ];
    for (name, reported, low, high, buckets) in checks {
        let slack =
            SLACK + SLACK_SHARE * high + buckets * bucket_width(reported).max(bucket_width(high));
        eprintln!(
            "{what} {name}: reported {}, measured {}..{} (slack {})",
            ms(reported),
            ms(low),
            ms(high),
            ms(slack)
        );
        assert!(
            reported >= low - slack && reported <= high + slack,
            "{what} {name}: the service reports {}, the test measured {}..{} (± {})",
            ms(reported),
            ms(low),
            ms(high),
            ms(slack)
        );
    }
}

/// Starts the service, then gives its table the column the test measures
/// the insert with (the service's statement names its columns, so the
/// default fills it).
async fn spawn_measured(extra: &[(&str, String)]) -> TestApp {
    let app = spawn_app_with(fresh_database().await, extra).await;
    app.db
        .execute("ALTER TABLE events ADD COLUMN inserted_at timestamptz DEFAULT clock_timestamp()")
        .await;
    app
}

/// Seconds since the epoch of each row's `column`, in insertion order.
async fn times(app: &TestApp, column: &str) -> Vec<f64> {
    app.db
        .query_scalar(
            &format!(
                "SELECT array_agg(extract(epoch FROM {column})::float8 ORDER BY id) FROM events"
            ),
            &[],
        )
        .await
}

/// Now, in seconds since the epoch.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// `at - from`, event by event.
fn since(at: &[f64], from: &[f64]) -> Vec<f64> {
    at.iter().zip(from).map(|(a, f)| a - f).collect()
}

/// Hears of each row's commit from a session of its own: a trigger on the
/// test's table sends a notification per row, which PostgreSQL delivers
/// once the inserting transaction has committed. When each arrives is an
/// upper bound of that row's commit.
struct CommitWatch {
    /// When each row's commit was heard of, by row id.
    heard: Rc<RefCell<HashMap<i64, f64>>>,
    /// The session listening (its connection runs in a task until dropped).
    _client: tokio_postgres::Client,
}

impl CommitWatch {
    async fn start(db: &TestDb) -> CommitWatch {
        db.execute(
            "CREATE FUNCTION test_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_notify('test_commit', NEW.id::text); RETURN NULL; END $$; \
             CREATE TRIGGER test_notify_commit AFTER INSERT ON events \
             FOR EACH ROW EXECUTE FUNCTION test_notify_commit();",
        )
        .await;
        let (client, mut connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
            .await
            .expect("a second session");
        let heard = Rc::new(RefCell::new(HashMap::new()));
        let record = heard.clone();
        actix_web::rt::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message {
                    let at = now();
                    let id: i64 = n.payload().parse().expect("a row id");
                    record.borrow_mut().entry(id).or_insert(at);
                }
            }
        });
        client
            .batch_execute("LISTEN test_commit")
            .await
            .expect("LISTEN");
        CommitWatch {
            heard,
            _client: client,
        }
    }

    /// When each row's commit was heard of, in insertion (id) order, once
    /// every row's was.
    async fn finish(self, app: &TestApp) -> Vec<f64> {
        let ids: Vec<i64> = app
            .db
            .query_scalar("SELECT array_agg(id ORDER BY id) FROM events", &[])
            .await;
        eventually(PATIENCE, "every commit heard of", || async {
            let heard = self.heard.borrow().len();
            if heard >= ids.len() {
                Ok(())
            } else {
                Err(format!("{heard} of {}", ids.len()))
            }
        })
        .await;
        let heard = self.heard.borrow();
        ids.iter().map(|id| heard[id]).collect()
    }
}

/// `/api/stats` once everything is acked (the acked figure counts every delivery).
async fn stats_when_acked(app: &TestApp, n: usize) -> Value {
    let url = format!("{}/api/stats", app.service.base_url());
    eventually(PATIENCE, &format!("{n} deliveries acked"), || async {
        let (_, body) = get(&url).await;
        let stats: Value = serde_json::from_str(&body).expect("JSON");
        let acked = stats["latency"]["received_to_acked"]["count"]
            .as_f64()
            .unwrap_or(0.0);
        if acked >= n as f64 {
            Ok(stats)
        } else {
            Err(format!("{acked} acked: {}", stats["latency"]))
        }
    })
    .await
}

#[actix_web::test]
async fn whole_second_publishers_get_exact_figures_in_sluice_and_no_end_to_end_one() {
    // Prefetch 1: each delivery waits for the previous one's ack, which
    // bounds every ack by the next event's receipt.
    let app = spawn_measured(&[("AMQP_PREFETCH", "1".to_owned())]).await;
    let watch = CommitWatch::start(&app.db).await;
    // As pika does: the AMQP timestamp, whole seconds, no header.
    app.publisher
        .publish_json_batch(&app.prefix, N, |i| Some(format!("s-{i}")))
        .await
        .expect("the broker confirms");
    app.wait_rows(N as i64).await;
    let stats = stats_when_acked(&app, N).await;
    let seen_acked = now();
    let visible = watch.finish(&app).await;

    let received = times(&app, "received_at").await;
    let inserted = times(&app, "inserted_at").await;
    assert_eq!((received.len(), inserted.len()), (N, N));
    let committed = Measured {
        low: since(&inserted, &received),
        high: since(&visible, &received),
    };
    // The ack of event k is sent after its commit and before the broker
    // delivers event k + 1 (the last one: before the test saw it counted).
    let next_received: Vec<f64> = received[1..].iter().copied().chain([seen_acked]).collect();
    let acked = Measured {
        low: committed.low.clone(),
        high: since(&next_received, &received),
    };

    let latency = &stats["latency"];
    assert_close(
        "received → committed",
        &latency["received_to_committed"],
        &committed,
    );
    assert_close("received → acked", &latency["received_to_acked"], &acked);
    assert!(
        latency["end_to_end"].is_null(),
        "no end-to-end figure from whole seconds: {latency}"
    );
    assert_eq!(
        latency["end_to_end_unmeasured"]["seconds"], N as f64,
        "{latency}"
    );
    let note = latency["end_to_end_note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with(&format!(
            "not measured: {N} had only the AMQP timestamp, which is whole seconds"
        )),
        "{note}"
    );
    // `/metrics` has no end-to-end series at all, and says why in its help.
    let metrics = app.metrics_text().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("sluice_end_to_end_latency_seconds")),
        "an end-to-end series from whole seconds:\n{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_end_to_end_unmeasured_events_total",
            "publish_time=\"seconds\""
        ),
        N as f64
    );
    assert!(
        metrics.contains("# HELP sluice_received_to_committed_seconds"),
        "the figures say what they measure:\n{metrics}"
    );
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn millisecond_publishers_get_an_end_to_end_figure_within_a_few_milliseconds() {
    let app = spawn_measured(&[]).await;
    let watch = CommitWatch::start(&app.db).await;
    // As `sluice load` does: `timestamp_in_ms` (and the AMQP timestamp),
    // one event every 10 ms, each confirmed before the next.
    let mut published = Vec::with_capacity(N);
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    for i in 0..N {
        ticks.tick().await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970");
        let ms = u64::try_from(now.as_millis()).expect("ms fit");
        let mut headers = FieldTable::default();
        headers.insert("timestamp_in_ms".into(), AMQPValue::LongLongInt(ms as i64));
        let props = BasicProperties::default()
            .with_message_id(format!("ms-{i}").into())
            .with_timestamp(ms / 1000)
            .with_headers(headers);
        app.publisher
            .publish(
                &app.prefix,
                "test.ms",
                format!("{{\"i\":{i}}}").as_bytes(),
                props,
            )
            .await
            .expect("the broker confirms");
        published.push(ms as f64 / 1000.0);
    }
    app.wait_rows(N as i64).await;
    let stats = stats_when_acked(&app, N).await;
    let visible = watch.finish(&app).await;

    let ids: Vec<String> = app
        .db
        .query_scalar("SELECT array_agg(message_id ORDER BY id) FROM events", &[])
        .await;
    let received = times(&app, "received_at").await;
    let inserted = times(&app, "inserted_at").await;
    let published: Vec<f64> = ids
        .iter()
        .map(|id| {
            published[id
                .trim_start_matches("ms-")
                .parse::<usize>()
                .expect("a test id")]
        })
        .collect();
    let end_to_end = Measured {
        low: since(&inserted, &published),
        high: since(&visible, &published),
    };
    let committed = Measured {
        low: since(&inserted, &received),
        high: since(&visible, &received),
    };

    let latency = &stats["latency"];
    assert_close("publish → committed", &latency["end_to_end"], &end_to_end);
    assert_close(
        "received → committed",
        &latency["received_to_committed"],
        &committed,
    );
    // The ack follows the commit: at least the commit's latency, and it
    // must be there for every delivery.
    let acked = &latency["received_to_acked"];
    assert_eq!(acked["count"], N as f64, "{latency}");
    assert!(
        acked["mean"]
            .as_f64()
            .is_some_and(|m| m >= mean(&committed.low) - SLACK),
        "acked before committed? {latency}"
    );
    assert_eq!(
        latency["end_to_end_unmeasured"],
        serde_json::json!({}),
        "{latency}"
    );
    assert_eq!(
        latency["end_to_end_note"], "measured on every event (timestamp_in_ms header)",
        "{latency}"
    );
    assert!(app
        .metrics_text()
        .await
        .contains("# HELP sluice_end_to_end_latency_seconds"));
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}
