//! `list` reads letters without moving them: same letters, same order, same
//! counts after as before; and the counts agree with what was dead-lettered.

use lapin::types::AMQPValue;
use sluice_testkit::amqp;

use crate::helpers::*;

/// The order and content of `list --json` that must not change: everything
/// but the ages (which grow).
fn stable(list: &serde_json::Value) -> serde_json::Value {
    let mut list = list.clone();
    for letter in list["letters"].as_array_mut().expect("letters") {
        letter
            .as_object_mut()
            .expect("a letter")
            .remove("age_seconds");
    }
    list
}

#[actix_web::test]
async fn list_changes_nothing_same_letters_same_order_same_counts() {
    let app = spawn_app_with(
        sluice_testkit::fresh_database().await,
        &[("MAX_BODY_BYTES", "64".to_owned())],
    )
    .await;
    // Letters of three reasons, published in a known order.
    for i in 0..30 {
        app.publish_raw(
            "orders.bad",
            format!("{{bad {i}").as_bytes(),
            Some(&format!("nj-{i:02}")),
        )
        .await;
        if i % 3 == 0 {
            app.publish_raw("orders.empty", b"", Some(&format!("e-{i:02}")))
                .await;
        }
    }
    let big_body = format!("{{\"pad\":\"{}\"}}", "x".repeat(100));
    app.publish_raw("orders.big", big_body.as_bytes(), None)
        .await;
    app.wait_dead(41).await;

    let before = app.list_all().await;
    assert_eq!(before["total"], 41);
    assert_eq!(before["by_reason"]["not_json"], 30);
    assert_eq!(before["by_reason"]["empty"], 10);
    assert_eq!(before["by_reason"]["too_large"], 1);
    assert_eq!(before["by_reason"]["overflow"], 0);
    // Newest first (by when each was dead-lettered, to the millisecond).
    let letters = before["letters"].as_array().expect("letters");
    let times: Vec<&str> = letters
        .iter()
        .map(|l| l["dead_at"].as_str().expect("dead_at"))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    let big = letters
        .iter()
        .find(|l| l["reason"] == "too_large")
        .expect("the too_large letter");
    assert!(
        big["message_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sha256:")),
        "a letter without message_id shows the key its row would get: {big}"
    );
    assert_eq!(big["routing_key"], "orders.big");
    assert_eq!(big["body_bytes"], big_body.len());

    // Act: list, in every form, several times; and a dry run.
    let human = app.dead_letters(&["list"]).await;
    assert_eq!(human.code, Some(0), "{human:?}");
    assert!(
        human.stdout.contains("41 dead letter(s) held") && human.stdout.contains("not_json"),
        "{}",
        human.stdout
    );
    for _ in 0..3 {
        app.dead_letters(&["list", "--json", "--limit", "5"])
            .await
            .json();
        app.dead_letters(&["list", "--reason", "not_json", "--json"])
            .await
            .json();
    }
    let dry = app
        .dead_letters(&["replay", "--reason", "not_json", "--dry-run", "--json"])
        .await
        .json();
    assert_eq!(dry["replayed"], 30);

    // Assert: the same letters in the same order, the same counts.
    let after = app.list_all().await;
    assert_eq!(stable(&after), stable(&before));
    assert_eq!(app.dead_ready().await, 41);
    assert_eq!(app.rows().await, 0);

    // And each queue, taken at last, holds its letters in publish order,
    // with their reason and detail.
    let not_json = amqp::get_all(&app.amqp_url, &format!("{}.dead.not_json", app.prefix))
        .await
        .expect("the not_json letters");
    let ids: Vec<String> = not_json.iter().filter_map(|m| m.message_id()).collect();
    let expected: Vec<String> = (0..30).map(|i| format!("nj-{i:02}")).collect();
    assert_eq!(ids, expected, "same order");
    for (i, letter) in not_json.iter().enumerate() {
        assert_eq!(letter.body, format!("{{bad {i}").into_bytes(), "same body");
        assert_eq!(letter.routing_key, "orders.bad");
        assert_eq!(
            letter.header_str("x-sluice-reason").as_deref(),
            Some("not_json")
        );
        assert!(letter
            .header_str("x-sluice-detail")
            .is_some_and(|d| d.contains("not JSON")));
        assert!(matches!(
            letter.headers().inner().get("x-sluice-dead-at"),
            Some(AMQPValue::LongLongInt(_))
        ));
        assert!(
            letter.header_str("x-sluice-replays").is_none(),
            "never replayed"
        );
    }
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[test]
fn the_testkit_knows_every_dead_letter_queue() {
    let reasons: Vec<&str> = sluice_actors::event::DeadReason::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();
    assert_eq!(reasons, amqp::DEAD_REASONS);
}
