//! The happy path and bad input: N published → N rows, duplicates stored once,
//! every kind of bad body dead-lettered with its reason.

use std::collections::HashMap;
use std::time::Duration;

use lapin::BasicProperties;
use sluice_testkit::{amqp, eventually, Proxy};

use crate::helpers::*;

#[actix_web::test]
async fn every_published_event_becomes_exactly_one_row_and_is_acked() {
    let app = spawn_app().await;
    app.publish("ev", 3000).await;
    app.wait_rows(3000).await;

    let distinct: i64 = app
        .db
        .query_scalar("SELECT count(DISTINCT message_id) FROM events", &[])
        .await;
    assert_eq!(distinct, 3000);
    // Contents are stored as published: payload, routing key, headers, timestamp.
    let seq7: i64 = app
        .db
        .query_scalar(
            "SELECT (payload->>'seq')::bigint FROM events \
             WHERE message_id = 'ev-7' AND routing_key = 'test.7' \
               AND (headers->>'seq')::bigint = 7 AND published_at IS NOT NULL",
            &[],
        )
        .await;
    assert_eq!(seq7, 7);

    // A graceful stop returns unacked deliveries to the queue: none may be left.
    assert_eq!(app.terminate(), Some(0));
    assert_eq!(app.ingest_ready().await, 0, "every delivery was acked");
    assert_eq!(app.dead_ready().await, 0);
    app.cleanup().await;
}

#[actix_web::test]
async fn duplicates_are_stored_once() {
    let app = spawn_app().await;
    // The same 200 ids published twice, and a message without id published twice.
    app.publish("dup", 200).await;
    app.publish("dup", 200).await;
    let fixed = BasicProperties::default().with_timestamp(1_700_000_000);
    for _ in 0..2 {
        app.publisher
            .publish(&app.prefix, "no.id", br#"{"same":"body"}"#, fixed.clone())
            .await
            .expect("publish confirmed");
    }
    app.wait_rows(201).await;
    assert_eq!(app.terminate(), Some(0));
    assert_eq!(
        app.rows().await,
        201,
        "no row appeared after the others were acked"
    );
    assert_eq!(app.ingest_ready().await, 0, "duplicates were acked too");
    let derived: String = app
        .db
        .query_scalar(
            "SELECT message_id FROM events WHERE routing_key = 'no.id'",
            &[],
        )
        .await;
    assert!(derived.starts_with("sha256:"), "derived key: {derived}");
    app.cleanup().await;
}

#[actix_web::test]
async fn bad_bodies_are_dead_lettered_with_their_reason_and_the_rest_is_stored() {
    let db = sluice_testkit::fresh_database().await;
    let app = spawn_app_with(db, &[("MAX_BODY_BYTES", "1024".into())]).await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad-json", b"{not json".to_vec(), "not_json"),
        ("bad-utf8", vec![b'"', 0xff, 0xfe, b'"'], "not_utf8"),
        ("bad-empty", Vec::new(), "empty"),
        (
            "bad-nul",
            br#"{"s":"a\u0000b"}"#.to_vec(),
            "rejected_by_database",
        ),
        ("bad-big", big.into_bytes(), "too_large"),
    ];
    app.publish("good", 50).await;
    for (id, body, _) in &bad {
        app.publish_raw("bad.input", body, Some(id)).await;
    }
    app.publish("later", 50).await;

    app.wait_rows(100).await;
    let letters = app.take_dead_letters(bad.len() as u32).await;
    let reasons: HashMap<String, String> = letters
        .iter()
        .map(|m| {
            let id = m.message_id().expect("message id kept");
            (id, header(m, "x-sluice-reason").expect("reason header"))
        })
        .collect();
    for (id, body, reason) in &bad {
        assert_eq!(
            reasons.get(*id).map(String::as_str),
            Some(*reason),
            "reason of {id}"
        );
        let letter = letters
            .iter()
            .find(|m| m.message_id().as_deref() == Some(*id))
            .expect("dead letter present");
        assert_eq!(&letter.body, body, "{id} is dead-lettered byte for byte");
        assert_eq!(letter.routing_key, "bad.input");
        assert!(header(letter, "x-sluice-detail").is_some_and(|d| !d.is_empty()));
    }
    assert_eq!(app.terminate(), Some(0));
    assert_eq!(
        app.ingest_ready().await,
        0,
        "bad messages were settled, not left unacked"
    );
    assert_eq!(app.rows().await, 100);
    app.cleanup().await;
}

/// The dead-letter count is what the dead-letter queue holds: a letter is
/// counted once the broker has confirmed it, never while it is still on its
/// way. The service talks to the broker across 100 ms of added latency, so a
/// count taken on receipt would run ahead of the queue by a round trip.
#[actix_web::test]
async fn a_dead_letter_is_counted_once_the_dead_letter_queue_holds_it() {
    let link =
        Proxy::start(amqp::broker_addr().expect("the broker's address")).expect("the proxy starts");
    let via = amqp::url_via(link.addr()).expect("a proxied URL");
    let app = spawn_app_with(sluice_testkit::fresh_database().await, &[("AMQP_URL", via)]).await;
    link.set_latency(Duration::from_millis(100));

    app.publish_raw("bad.input", b"{not json", Some("bad-1"))
        .await;
    eventually(PATIENCE, "the dead letter is counted", || async {
        let counted = app
            .metric("sluice_events_dead_lettered_total", r#"reason="not_json""#)
            .await;
        // Read the queue right after the metric: it must already hold what was counted.
        let held = app.dead_ready().await;
        assert!(
            f64::from(held) >= counted,
            "{counted} dead letter(s) counted but the dead-letter queue holds {held}"
        );
        if counted >= 1.0 {
            Ok(())
        } else {
            Err("not counted yet")
        }
    })
    .await;
    assert_eq!(app.dead_ready().await, 1);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}
