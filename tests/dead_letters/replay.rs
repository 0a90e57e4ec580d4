//! Replays: overflow letters stored exactly once, replays killed mid-way
//! (SIGKILL, several times) and run again, two replays at once, and the
//! replay limit that stops a letter that keeps failing.

use std::collections::BTreeSet;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sluice_testkit::eventually;

use crate::helpers::*;

/// Replays `overflow` at `rate` until nothing is left, and returns the
/// letters replayed. A machine starved of CPU can stall the service long
/// enough for the Queue (100 of 300 in flight) to shed some replayed letters
/// again: they come back with their replay count, and the next pass takes
/// them (five passes at most, each letter ten replays at most).
async fn replay_until_empty(app: &TestApp, rate: &str) -> u64 {
    let mut replayed = 0;
    for _pass in 0..5 {
        let args = [
            "replay",
            "--reason",
            "overflow",
            "--rate",
            rate,
            "--max-replays",
            "10",
            "--json",
        ];
        let report = app.dead_letters(&args).await.json();
        replayed += report["replayed"].as_u64().expect("replayed");
        assert_eq!(report["skipped"], 0, "{report}");
        // Each replayed letter is stored, or shed again and back as a letter.
        eventually(PATIENCE, "the replayed letters settled", || async {
            let rows = app.rows().await;
            let dead = app.dead_ready().await;
            let unsettled = app.ingest_ready().await;
            let received = app
                .metric("sluice_replayed_events_received_total", "")
                .await;
            if received as u64 >= replayed && unsettled == 0 && rows + i64::from(dead) > 0 {
                Ok(dead)
            } else {
                Err(format!(
                    "{received} of {replayed} copies taken, {rows} rows, {dead} dead"
                ))
            }
        })
        .await;
        if app.dead_ready().await == 0 {
            return replayed;
        }
    }
    panic!("letters are still dead after five replays");
}

#[actix_web::test]
async fn overflow_letters_from_a_burst_are_replayed_and_stored_exactly_once() {
    // Arrange: a burst the Queue sheds as `overflow`, then the overload ends.
    let (app, proxy) = shedding_app().await;
    let (keys, dead) = burst(&app, &proxy, "b", 600).await;

    // Act: the operator replays them, no faster than the database writes.
    let replayed = replay_until_empty(&app, "300").await;

    // Assert: every event is stored, once, under its own key (the derived
    // keys of events published without a message_id included).
    app.wait_rows(600).await;
    assert_eq!(app.row_ids().await, keys);
    assert_eq!(app.dead_ready().await, 0);
    assert!(replayed >= u64::from(dead), "{replayed} of {dead} replayed");
    assert_eq!(
        app.metric("sluice_events_already_stored_total", "").await,
        0.0,
        "no copy reached the table twice"
    );
    assert_eq!(
        app.metric(
            "sluice_replayed_events_received_total",
            r#"reason="overflow""#
        )
        .await,
        replayed as f64,
        "the service counts the replayed letters it takes back"
    );
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn a_replay_killed_mid_way_and_run_again_leaves_every_letter_stored_once_or_still_dead() {
    let (app, proxy) = shedding_app().await;
    const N: usize = 2000;
    let (keys, dead) = burst(&app, &proxy, "k", N).await;
    assert!(
        dead > 1000,
        "enough letters to kill a replay among them: {dead}"
    );

    for round in 0..4 {
        // A replay, SIGKILLed once it has put some letters back.
        let before = app.rows().await;
        let child = spawn_dead_letters(&app, &["replay", "--reason", "overflow", "--rate", "250"]);
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        eventually(PATIENCE, "the replay stored some letters", || async {
            let rows = app.rows().await;
            if rows >= before + 60 {
                Ok(())
            } else {
                Err(format!("{rows} rows, {before} before round {round}"))
            }
        })
        .await;
        kill(pid, Signal::SIGKILL).expect("SIGKILL");
        let run = finish(child).await;
        assert_eq!(run.code, None, "killed by a signal: {run:?}");

        // Never gone: each event is a row or still a letter (the broker
        // requeues what the dead connection held), and no row is doubled.
        let rows = app.row_ids().await;
        assert!(
            rows.is_subset(&keys),
            "round {round}: only known keys are rows"
        );
        eventually(PATIENCE, "every event is a row or a letter", || async {
            let rows = app.row_ids().await;
            let letters = app.dead_ids().await;
            let seen: BTreeSet<String> = rows.union(&letters).cloned().collect();
            if seen == keys {
                Ok(())
            } else {
                let missing = keys.difference(&seen).count();
                Err(format!(
                    "round {round}: {missing} events neither stored nor dead"
                ))
            }
        })
        .await;
        assert!(
            app.rows().await < N as i64,
            "round {round} was killed mid-way"
        );
    }

    // Run again to the end: everything is stored, once.
    replay_until_empty(&app, "600").await;
    app.wait_rows(N as i64).await;
    assert_eq!(app.row_ids().await, keys);
    assert_eq!(app.dead_ready().await, 0);
    let again = app.metric("sluice_events_already_stored_total", "").await;
    eprintln!("letters copied back twice (a kill between confirm and ack): {again}");
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn two_replays_at_once_store_nothing_twice() {
    let (app, proxy) = shedding_app().await;
    let (keys, dead) = burst(&app, &proxy, "c", 800).await;

    let args = ["replay", "--reason", "overflow", "--rate", "150", "--json"];
    let (first, second) = (
        spawn_dead_letters(&app, &args),
        spawn_dead_letters(&app, &args),
    );
    let (first, second) = (finish(first).await.json(), finish(second).await.json());
    let (a, b) = (
        first["replayed"].as_u64().expect("replayed"),
        second["replayed"].as_u64().expect("replayed"),
    );
    assert!(a > 0 && b > 0, "both replays took letters: {a} and {b}");
    assert!(a + b >= u64::from(dead), "{a} + {b} replayed of {dead}");
    eventually(PATIENCE, "the service took every copy", || async {
        let received = app
            .metric("sluice_replayed_events_received_total", "")
            .await;
        if received as u64 == a + b {
            Ok(())
        } else {
            Err(format!("{received} of {} copies", a + b))
        }
    })
    .await;
    // Letters the Queue shed again, if any, go back too.
    if app.dead_ready().await > 0 {
        replay_until_empty(&app, "300").await;
    }
    app.wait_rows(800).await;
    assert_eq!(app.row_ids().await, keys);
    assert_eq!(
        app.metric("sluice_events_already_stored_total", "").await,
        0.0,
        "no letter was copied back by both replays"
    );
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn a_letter_that_keeps_failing_stops_at_its_replay_limit() {
    let app = spawn_app().await;
    for i in 0..5 {
        app.publish_raw("bad.input", b"{not json", Some(&format!("nj-{i}")))
            .await;
    }
    app.wait_dead(5).await;
    let replays_of = |list: &serde_json::Value| -> Vec<u64> {
        let mut counts: Vec<u64> = list["letters"]
            .as_array()
            .expect("letters")
            .iter()
            .map(|l| l["replays"].as_u64().expect("replays"))
            .collect();
        counts.sort_unstable();
        counts
    };

    // Each replay puts them back; the service dead-letters them again, with
    // their replay count.
    for pass in 1..=3u64 {
        let report = app
            .dead_letters(&["replay", "--reason", "not_json", "--json"])
            .await
            .json();
        assert_eq!(
            (report["replayed"].as_u64(), report["skipped"].as_u64()),
            (Some(5), Some(0))
        );
        eventually(PATIENCE, "the letters came back, counted", || async {
            let list = app.list_all().await;
            if replays_of(&list) == vec![pass; 5] {
                Ok(())
            } else {
                Err(format!("replay counts {:?}", replays_of(&list)))
            }
        })
        .await;
    }

    // Past the limit (3 by default) a replay leaves them dead.
    let dry = app
        .dead_letters(&["replay", "--reason", "not_json", "--dry-run", "--json"])
        .await
        .json();
    assert_eq!(
        (dry["replayed"].as_u64(), dry["skipped"].as_u64()),
        (Some(0), Some(5))
    );
    let report = app
        .dead_letters(&["replay", "--reason", "not_json", "--json"])
        .await
        .json();
    assert_eq!(
        (report["replayed"].as_u64(), report["skipped"].as_u64()),
        (Some(0), Some(5))
    );
    assert_eq!(report["left"], 5);
    assert_eq!(replays_of(&app.list_all().await), vec![3; 5]);
    let received = app
        .metric(
            "sluice_replayed_events_received_total",
            r#"reason="not_json""#,
        )
        .await;
    assert_eq!(received, 15.0, "three passes of five, and no fourth");

    // Told otherwise, it replays them.
    let report = app
        .dead_letters(&[
            "replay",
            "--reason",
            "not_json",
            "--max-replays",
            "4",
            "--json",
        ])
        .await
        .json();
    assert_eq!(report["replayed"], 5);
    assert_eq!(app.rows().await, 0);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}
