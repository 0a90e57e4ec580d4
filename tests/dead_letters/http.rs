//! `GET /api/dead-letters` and `POST /api/dead-letters/replay`: the same
//! figures as `list --json`; replay off without `AUTH_TOKEN`, refused
//! without the token, and counted by reason when it runs.

use serde_json::{json, Value};
use sluice_testkit::{eventually, fresh_database};

use crate::helpers::*;

/// A request with an optional bearer token: the status and the JSON body.
async fn call(method: &str, url: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
    let client = awc::Client::default();
    let mut request = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    if let Some(token) = token {
        request = request.insert_header(("Authorization", format!("Bearer {token}")));
    }
    let mut response = match body {
        Some(body) => request.send_json(&body).await,
        None => request.send().await,
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let bytes = response.body().await.expect("a body");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{method} {url}: not JSON ({e}): {bytes:?}"));
    (response.status().as_u16(), value)
}

async fn app_with_letters(extra: &[(&str, String)]) -> TestApp {
    let app = spawn_app_with(fresh_database().await, extra).await;
    for i in 0..3 {
        app.publish_raw("bad", b"nope", Some(&format!("bad-{i}")))
            .await;
    }
    app.wait_dead(3).await;
    app
}

#[actix_web::test]
async fn replay_over_http_is_off_without_a_token_and_says_which_setting() {
    let app = app_with_letters(&[]).await;
    let base = app.service.base_url();
    let (status, summary) = call("GET", &format!("{base}/api/dead-letters"), None, None).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["total"], 3);
    assert_eq!(summary["by_reason"]["not_json"], 3);
    assert_eq!(summary["replay"]["enabled"], false);
    let listed = app
        .dead_letters(&["list", "--json", "--limit", "0"])
        .await
        .json();
    assert_eq!(
        summary["by_reason"], listed["by_reason"],
        "the same figures as list"
    );

    let (status, answer) = call(
        "POST",
        &format!("{base}/api/dead-letters/replay"),
        Some(json!({"reason": "not_json"})),
        Some("anything"),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let error = answer["error"].as_str().expect("an error");
    assert!(
        error.contains("AUTH_TOKEN") && error.contains("off"),
        "{error}"
    );
    assert_eq!(app.dead_ready().await, 3);
    assert_eq!(
        app.metric("sluice_replayed_events_received_total", "")
            .await,
        0.0
    );
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn replay_over_http_needs_the_token_and_counts_what_it_replays() {
    let app = app_with_letters(&[("AUTH_TOKEN", "s3cret".to_owned())]).await;
    let base = app.service.base_url();
    let replay = format!("{base}/api/dead-letters/replay");
    for token in [None, Some("wrong")] {
        let (status, answer) =
            call("POST", &replay, Some(json!({"reason": "not_json"})), token).await;
        assert_eq!(status, 401, "{answer}");
    }
    let (status, _) = call(
        "GET",
        &format!("{base}/api/dead-letters?limit=5"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401, "letters (bodies) need the token");
    let (status, answer) = call(
        "POST",
        &replay,
        Some(json!({"reason": "nope"})),
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(app.dead_ready().await, 3);
    assert_eq!(
        app.metric("sluice_replayed_events_received_total", "")
            .await,
        0.0,
        "nothing was replayed"
    );

    let (status, summary) = call("GET", &format!("{base}/api/dead-letters"), None, None).await;
    assert_eq!((status, &summary["replay"]["enabled"]), (200, &json!(true)));
    let (status, letters) = call(
        "GET",
        &format!("{base}/api/dead-letters?limit=5&reason=not_json"),
        None,
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{letters}");
    assert_eq!(letters["letters"].as_array().map(Vec::len), Some(3));
    assert_eq!(letters["letters"][0]["body_preview"], "nope");

    let (status, report) = call(
        "POST",
        &replay,
        Some(json!({"reason": "not_json", "limit": 2})),
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (report["replayed"].as_u64(), report["skipped"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(
        app.metric("sluice_dead_letters_replayed_total", r#"reason="not_json""#)
            .await,
        2.0
    );
    // Still not JSON: they come back, each with its replay count.
    eventually(PATIENCE, "the two replayed letters are back", || async {
        let taken = app
            .metric(
                "sluice_replayed_events_received_total",
                r#"reason="not_json""#,
            )
            .await;
        let held = app.dead_ready().await;
        if taken == 2.0 && held == 3 {
            Ok(())
        } else {
            Err(format!("{taken} taken back, {held} held"))
        }
    })
    .await;
    let list = app.list_all().await;
    let mut counts: Vec<u64> = list["letters"]
        .as_array()
        .expect("letters")
        .iter()
        .map(|l| l["replays"].as_u64().expect("replays"))
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, [0, 1, 1]);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}
