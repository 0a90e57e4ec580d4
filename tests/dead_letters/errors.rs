//! What the commands refuse: an unknown reason, a broker that cannot be
//! reached, a dead-letter queue that does not exist, a discard not
//! confirmed. Each is one line on stderr and a non-zero exit, and nothing
//! changes.

use sluice_testkit::{amqp, unique_prefix};

use crate::helpers::*;

/// Asserts `run` failed with exactly one line on stderr containing every
/// one of `words`, and printed nothing on stdout.
fn refused(run: &Run, words: &[&str]) {
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.code.is_some(), "an exit code, not a crash: {run:?}");
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "one line: {run:?}");
    for word in words {
        assert!(lines[0].contains(word), "{word:?} in {:?}", lines[0]);
    }
    assert!(run.stdout.is_empty(), "{run:?}");
}

/// Three `not_json` letters.
async fn app_with_letters() -> TestApp {
    let app = spawn_app().await;
    for i in 0..3 {
        app.publish_raw("bad", b"nope", Some(&format!("bad-{i}")))
            .await;
    }
    app.wait_dead(3).await;
    app
}

#[actix_web::test]
async fn an_unknown_reason_is_refused_in_one_line_and_changes_nothing() {
    let app = app_with_letters().await;
    for args in [
        &["replay", "--reason", "overflows"][..],
        &["list", "--reason", "not-json"],
        &["discard", "--reason", "junk", "--yes"],
    ] {
        let run = app.dead_letters(args).await;
        refused(
            &run,
            &["unknown reason", "expected one of", "rejected_by_database"],
        );
    }
    assert_eq!(app.dead_ready().await, 3);
    assert_eq!(app.list_all().await["by_reason"]["not_json"], 3);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn a_broker_that_cannot_be_reached_is_one_line_naming_the_setting() {
    let app = app_with_letters().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let env = [
        (
            "AMQP_URL",
            format!("amqp://guest:secret-pw@127.0.0.1:{closed}/%2f"),
        ),
        ("AMQP_PREFIX", app.prefix.clone()),
    ];
    for args in [
        &["list"][..],
        &["replay", "--reason", "not_json"],
        &["discard", "--reason", "not_json", "--yes"],
    ] {
        let run = dead_letters_with(&env, args).await;
        refused(&run, &["cannot connect to the broker", "AMQP_URL"]);
        assert!(!run.stderr.contains("secret-pw"), "no password: {run:?}");
    }
    assert_eq!(app.dead_ready().await, 3);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn a_dead_letter_queue_that_does_not_exist_is_one_line_and_is_not_created() {
    let prefix = unique_prefix();
    let url = amqp::amqp_url();
    let _guard = sluice_testkit::TopologyGuard::new(&url, &prefix);
    let env = [("AMQP_URL", url.clone()), ("AMQP_PREFIX", prefix.clone())];
    for args in [
        &["list"][..],
        &["replay", "--reason", "overflow"],
        &["replay", "--reason", "overflow", "--dry-run"],
        &["discard", "--reason", "overflow", "--yes"],
    ] {
        let run = dead_letters_with(&env, args).await;
        refused(
            &run,
            &["does not exist", &format!("{prefix}.dead."), "AMQP_PREFIX"],
        );
    }
    for queue in amqp::dead_queues(&prefix) {
        assert!(
            amqp::ready_count(&url, &queue).await.is_err(),
            "{queue} was not created"
        );
    }
}

#[actix_web::test]
async fn discard_needs_yes_and_then_deletes_only_its_reason() {
    let app = app_with_letters().await;
    app.publish_raw("empty", b"", Some("e-1")).await;
    app.wait_dead(4).await;
    let run = app.dead_letters(&["discard", "--reason", "not_json"]).await;
    refused(&run, &["--yes", "nothing was changed"]);
    assert_eq!(app.dead_ready().await, 4);

    let report = app
        .dead_letters(&["discard", "--reason", "not_json", "--yes", "--json"])
        .await
        .json();
    assert_eq!(
        (report["discarded"].as_u64(), report["left"].as_u64()),
        (Some(3), Some(0))
    );
    let list = app.list_all().await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["by_reason"]["empty"], 1);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}
