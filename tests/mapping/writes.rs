//! Rows into the user's table: typed and partitioned tables written exactly
//! once across a crash, and bad values dead-lettered with their column while
//! their batch neighbours are stored.

use sluice_testkit::eventually;

use crate::helpers::*;

/// A typed table: the values arrive as JSON and PostgreSQL casts them.
const READINGS: &str = "
CREATE TABLE readings (
    msg_id   text PRIMARY KEY,
    topic    text NOT NULL,
    sensor   int NOT NULL,
    value    double precision,
    taken_at timestamptz NOT NULL,
    tags     text[],
    extra    jsonb,
    stored   timestamptz NOT NULL DEFAULT now()
)";

const READINGS_MAPPING: &str = r#"
table = "readings"
conflict = ["msg_id"]

[columns]
msg_id   = "message_id"
topic    = "routing_key"
sensor   = "/sensor"
value    = "/value"
taken_at = "/ts"
tags     = "/tags"
extra    = "/extra"
"#;

/// Event `i`: sensor `i`, value `i / 4`, one minute apart from 2026-01-01.
fn reading(tag: &str, i: u64) -> (String, String, String) {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600 + i * 60);
    let parity = if i % 2 == 0 { "even" } else { "odd" };
    let body = serde_json::json!({
        "sensor": i,
        "value": i as f64 / 4.0,
        "ts": humantime::format_rfc3339(at).to_string(),
        "tags": [parity, "x"],
        "extra": {"i": i, "nested": [1, 2]},
    });
    (
        format!("{tag}-{i}"),
        format!("reading.{}", i % 10),
        body.to_string(),
    )
}

/// Publishes `n` readings, kills the service (SIGKILL) once some rows are
/// stored, restarts it, and waits until `table` holds exactly `n` rows.
async fn publish_kill_restart(app: &TestApp, table: &str, n: u64) {
    let messages: Vec<_> = (0..n).map(|i| reading("r", i)).collect();
    publish_all(app, &messages).await;
    let before = wait_some_table_rows(&app.db, table, 100).await;
    app.service.sigkill();
    app.service.wait_exit(PATIENCE).expect("killed");
    assert!(
        before < n as i64,
        "the kill happened mid-stream ({before} rows)"
    );

    let restarted = app.service.respawn();
    restarted.wait_for_log("consuming", PATIENCE);
    wait_table_rows(&app.db, table, n as i64).await;
    restarted.sigterm();
    let status = restarted.wait_exit(PATIENCE).expect("exits");
    assert_eq!(status.code(), Some(0), "logs:\n{}", restarted.logs());
    assert_eq!(app.ingest_ready().await, 0, "every delivery was acked");
    assert_eq!(app.dead_ready().await, 0, "nothing was dead-lettered");
}

#[actix_web::test]
async fn a_typed_table_gets_every_event_exactly_once_across_a_crash() {
    let mapping = MappingFile::new(READINGS_MAPPING);
    let (app, _proxy) = slow_mapped_app(database_with(READINGS).await, &mapping).await;
    let n: i64 = 2000;
    publish_kill_restart(&app, "readings", n as u64).await;

    // Every value arrived in its column, cast to the column's type.
    let check = |sql: &'static str| {
        let db = &app.db;
        async move { db.query_scalar::<i64>(sql, &[]).await }
    };
    assert_eq!(
        check("SELECT count(DISTINCT msg_id) FROM readings").await,
        n
    );
    assert_eq!(
        check("SELECT sum(sensor)::bigint FROM readings").await,
        n * (n - 1) / 2
    );
    assert_eq!(
        check("SELECT count(*) FROM readings WHERE value = sensor / 4.0").await,
        n
    );
    assert_eq!(
        check(
            "SELECT count(*) FROM readings \
             WHERE taken_at = '2026-01-01T00:00:00Z'::timestamptz + sensor * interval '1 minute'"
        )
        .await,
        n
    );
    assert_eq!(
        check(
            "SELECT count(*) FROM readings WHERE tags = ARRAY[\
             CASE WHEN sensor % 2 = 0 THEN 'even' ELSE 'odd' END, 'x']"
        )
        .await,
        n
    );
    assert_eq!(
        check(
            "SELECT count(*) FROM readings \
             WHERE extra = jsonb_build_object('i', sensor, 'nested', '[1, 2]'::jsonb)"
        )
        .await,
        n
    );
    assert_eq!(
        check("SELECT count(*) FROM readings WHERE topic = 'reading.' || (sensor % 10)").await,
        n
    );
    // Sluice's own table is left alone.
    assert_eq!(app.rows().await, 0);
    app.cleanup().await;
}

#[actix_web::test]
async fn a_partitioned_table_keyed_by_a_natural_key_gets_every_event_once() {
    let ddl = "
        CREATE SCHEMA metrics;
        CREATE TABLE metrics.metrics_readings (
            sensor   int NOT NULL,
            taken_at timestamptz NOT NULL,
            value    double precision,
            UNIQUE (sensor, taken_at)
        ) PARTITION BY RANGE (taken_at);
        CREATE TABLE metrics.metrics_readings_20260101 PARTITION OF metrics.metrics_readings
            FOR VALUES FROM ('2026-01-01 00:00+00') TO ('2026-01-02 00:00+00');
        CREATE TABLE metrics.metrics_readings_20260102 PARTITION OF metrics.metrics_readings
            FOR VALUES FROM ('2026-01-02 00:00+00') TO ('2026-01-03 00:00+00');";
    let mapping = MappingFile::new(
        r#"
table = "metrics.metrics_readings"
conflict = ["sensor", "taken_at"]

[columns]
sensor   = "/sensor"
taken_at = "/ts"
value    = "/value"
"#,
    );
    let (app, _proxy) = slow_mapped_app(database_with(ddl).await, &mapping).await;
    let n: i64 = 2000;
    publish_kill_restart(&app, "metrics.metrics_readings", n as u64).await;

    // 2000 minutes from midnight: both days' partitions hold their share.
    let first: i64 = app
        .db
        .query_scalar(
            "SELECT count(*) FROM metrics.metrics_readings_20260101",
            &[],
        )
        .await;
    assert_eq!(first, 24 * 60);
    let second: i64 = app
        .db
        .query_scalar(
            "SELECT count(*) FROM metrics.metrics_readings_20260102",
            &[],
        )
        .await;
    assert_eq!(second, n - 24 * 60);
    app.cleanup().await;
}

#[actix_web::test]
async fn the_same_reading_under_another_message_id_is_stored_once() {
    let ddl = "CREATE TABLE r (sensor int, taken_at timestamptz, value float8, \
               PRIMARY KEY (sensor, taken_at))";
    let mapping = MappingFile::new(
        r#"
table = "r"
conflict = ["taken_at", "sensor"]
[columns]
sensor = "/sensor"
taken_at = "/ts"
value = "/value"
"#,
    );
    let app = spawn_app_with(database_with(ddl).await, &[mapping.env()]).await;
    let first: Vec<_> = (0..100).map(|i| reading("a", i)).collect();
    let again: Vec<_> = (0..100).map(|i| reading("b", i)).collect();
    publish_all(&app, &first).await;
    publish_all(&app, &again).await;
    // The second hundred is written without a row each: wait for that.
    eventually(PATIENCE, "the second hundred is written", || async {
        match app.metric("sluice_events_already_stored_total", "").await {
            skipped if skipped >= 100.0 => Ok(()),
            skipped => Err(format!("{skipped} already stored")),
        }
    })
    .await;
    assert_eq!(table_rows(&app.db, "r").await, 100);
    assert_eq!(app.terminate(), Some(0));
    assert_eq!(app.ingest_ready().await, 0);
    assert_eq!(app.dead_ready().await, 0);
    app.cleanup().await;
}

#[actix_web::test]
async fn a_value_that_cannot_be_cast_is_dead_lettered_with_its_column() {
    let mapping = MappingFile::new(READINGS_MAPPING);
    let app = spawn_app_with(
        database_with(READINGS).await,
        &[mapping.env(), ("MAX_BATCH", "100".to_owned())],
    )
    .await;
    let mut messages: Vec<_> = (0..50).map(|i| reading("good", i)).collect();
    let not_a_number = r#"{"sensor":"abc","value":1.5,"ts":"2026-01-01T00:00:00Z"}"#.to_owned();
    let no_sensor = r#"{"value":1.5,"ts":"2026-01-01T00:00:00Z"}"#.to_owned();
    let bad_time = r#"{"sensor":7,"value":1.5,"ts":"not a date"}"#.to_owned();
    messages.push(("bad-int".into(), "reading.x".into(), not_a_number));
    messages.push(("bad-null".into(), "reading.x".into(), no_sensor));
    messages.push(("bad-ts".into(), "reading.x".into(), bad_time));
    messages.extend((50..100).map(|i| reading("good", i)));
    publish_all(&app, &messages).await;

    wait_table_rows(&app.db, "readings", 100).await;
    let letters = app.take_dead_letters(3).await;
    let detail = |id: &str| {
        let letter = letters
            .iter()
            .find(|m| m.message_id().as_deref() == Some(id))
            .unwrap_or_else(|| panic!("{id} is dead-lettered"));
        assert_eq!(
            letter.header_str("x-sluice-reason").as_deref(),
            Some("rejected_by_database")
        );
        letter.header_str("x-sluice-detail").expect("detail header")
    };
    let int = detail("bad-int");
    assert!(
        int.contains(r#"column "sensor""#)
            && int.contains(r#"invalid input syntax for type integer: "abc""#),
        "{int}"
    );
    let null = detail("bad-null");
    assert!(
        null.contains(r#"column "sensor""#) && null.contains("not-null"),
        "{null}"
    );
    let ts = detail("bad-ts");
    assert!(
        ts.contains(r#"column "taken_at""#) && ts.contains("timestamp with time zone"),
        "{ts}"
    );
    let stored: i64 = app
        .db
        .query_scalar(
            "SELECT count(*) FROM readings WHERE msg_id LIKE 'good-%'",
            &[],
        )
        .await;
    assert_eq!(stored, 100, "the batch neighbours are stored");
    assert_eq!(app.terminate(), Some(0));
    assert_eq!(app.ingest_ready().await, 0);
    app.cleanup().await;
}

#[actix_web::test]
async fn a_row_outside_every_partition_is_dead_lettered_and_the_rest_stored() {
    let ddl = "
        CREATE TABLE daily (sensor int, taken_at timestamptz NOT NULL, UNIQUE (sensor, taken_at))
            PARTITION BY RANGE (taken_at);
        CREATE TABLE daily_20260101 PARTITION OF daily
            FOR VALUES FROM ('2026-01-01 00:00+00') TO ('2026-01-02 00:00+00');";
    let mapping = MappingFile::new(
        "table = \"daily\"\nconflict = [\"sensor\", \"taken_at\"]\n\
         [columns]\nsensor = \"/sensor\"\ntaken_at = \"/ts\"\n",
    );
    let app = spawn_app_with(database_with(ddl).await, &[mapping.env()]).await;
    // Readings 0..1440 fall on 2026-01-01; reading 1500 on the next day.
    let mut messages: Vec<_> = (0..20).map(|i| reading("in", i)).collect();
    messages.push(reading("late", 1500));
    messages.extend((20..40).map(|i| reading("in", i)));
    publish_all(&app, &messages).await;

    wait_table_rows(&app.db, "daily", 40).await;
    let letters = app.take_dead_letters(1).await;
    assert_eq!(letters[0].message_id().as_deref(), Some("late-1500"));
    let detail = letters[0].header_str("x-sluice-detail").expect("detail");
    assert!(detail.contains("no partition"), "{detail}");
    assert_eq!(app.terminate(), Some(0));
    assert_eq!(app.ingest_ready().await, 0);
    app.cleanup().await;
}

#[actix_web::test]
async fn at_least_once_writes_into_a_table_without_a_unique_key() {
    let mapping = MappingFile::new(
        "table = \"log\"\nat_least_once = true\n[columns]\nkey = \"routing_key\"\nbody = \"payload\"\n",
    );
    let app = spawn_app_with(
        database_with("CREATE TABLE log (key text, body jsonb)").await,
        &[mapping.env()],
    )
    .await;
    let messages: Vec<_> = (0..50).map(|i| reading("l", i)).collect();
    publish_all(&app, &messages).await;
    wait_table_rows(&app.db, "log", 50).await;
    let sensors: i64 = app
        .db
        .query_scalar("SELECT sum((body->>'sensor')::int)::bigint FROM log", &[])
        .await;
    assert_eq!(sensors, 49 * 50 / 2, "the whole body is stored as jsonb");
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}
