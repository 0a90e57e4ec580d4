//! The dashboard's dead-letter panel in a real browser (headless Chromium
//! through chromedriver) against the real service, RabbitMQ and PostgreSQL:
//! the letters held, by reason, and the Replay button — the "table fixed,
//! then replay" flow. A column too narrow for some values dead-letters
//! them; the table is widened with the service running; the operator types
//! the token and clicks Replay; every event is stored, once. A screenshot of
//! the panel goes to `target/dashboard-dead-letters.png`.
//!
//! Chromium and chromedriver come from `scripts/setup.sh --with-browser`;
//! `SLUICE_SKIP_BROWSER=1` skips the test deliberately.

#[path = "common/mod.rs"]
mod common;

use common::browser::{open_browser, target_dir, wait_for};
use fantoccini::Locator;
use sluice_testkit::{eventually, fresh_database, random_suffix};

const TOKEN: &str = "dashboard-s3cret";

#[actix_web::test]
async fn the_dead_letter_panel_shows_the_letters_by_reason_and_replays_them() {
    let Some(browser) = open_browser().await else {
        return;
    };
    let client = browser.client.clone();

    // Arrange: a table whose `code` column is too narrow for a fifth of the
    // events, and a few bodies that are not JSON.
    let db = fresh_database().await;
    db.execute("CREATE TABLE codes (msg_id text PRIMARY KEY, code varchar(4) NOT NULL)")
        .await;
    let mapping = std::env::temp_dir().join(format!("sluice-mapping-{}.toml", random_suffix()));
    std::fs::write(
        &mapping,
        "table = \"codes\"\nconflict = [\"msg_id\"]\n[columns]\nmsg_id = \"message_id\"\ncode = \"/code\"\n",
    )
    .expect("the mapping file");
    let app = common::spawn_app_with(
        db,
        &[
            ("MAPPING", mapping.display().to_string()),
            ("AUTH_TOKEN", TOKEN.to_owned()),
        ],
    )
    .await;
    let channel = app.publisher.channel();
    for i in 0..250 {
        let code = if i % 5 == 0 {
            format!("long-{i}")
        } else {
            format!("c{}", i % 10)
        };
        let body = serde_json::json!({ "code": code }).to_string();
        publish(channel, &app.prefix, &format!("w-{i}"), body.as_bytes()).await;
    }
    for i in 0..3 {
        publish(channel, &app.prefix, &format!("junk-{i}"), b"{not json").await;
    }
    eventually(common::PATIENCE, "200 rows and 53 letters", || async {
        let rows = app.db.count_rows("codes").await;
        let dead = app.dead_ready().await;
        if rows == 200 && dead == 53 {
            Ok(())
        } else {
            Err(format!("{rows} rows, {dead} letters"))
        }
    })
    .await;

    // The panel shows them by reason, with a Replay button each.
    client
        .goto(&format!("{}/", app.service.base_url()))
        .await
        .expect("the dashboard loads");
    wait_for(
        &client,
        "the panel shows 53 letters and replay is on",
        "document.getElementById('dead-letters').dataset.total === '53' && \
         document.getElementById('dead-letters').dataset.replay === 'on'",
    )
    .await;
    let held = |reason: &str| {
        format!("(document.querySelector('#dl-body tr[data-reason=\"{reason}\"]') || {{dataset: {{}}}}).dataset.held")
    };
    wait_for(
        &client,
        "50 rejected_by_database and 3 not_json",
        &format!(
            "{} === '50' && {} === '3'",
            held("rejected_by_database"),
            held("not_json")
        ),
    )
    .await;
    let panel = client
        .find(Locator::Id("dead-letters"))
        .await
        .expect("the panel");
    client
        .execute(
            "document.getElementById('dead-letters').scrollIntoView()",
            Vec::new(),
        )
        .await
        .expect("scrolled");

    // A click without the token is refused by the page, and nothing moves.
    let button = "#dl-body button[data-reason=\"rejected_by_database\"]";
    client
        .find(Locator::Css(button))
        .await
        .expect("the Replay button")
        .click()
        .await
        .expect("clicked");
    wait_for(
        &client,
        "the panel asks for the token",
        "document.getElementById('dl-status').textContent.includes('token')",
    )
    .await;
    assert_eq!(app.dead_ready().await, 53);

    // Act: the operator widens the column (the service running), types the
    // token and clicks Replay.
    app.db
        .execute("ALTER TABLE codes ALTER COLUMN code TYPE text")
        .await;
    client
        .find(Locator::Id("dl-token"))
        .await
        .expect("the token field")
        .send_keys(TOKEN)
        .await
        .expect("typed");
    let shot_before = panel.screenshot().await.expect("a screenshot of the panel");
    client
        .find(Locator::Css(button))
        .await
        .expect("the Replay button")
        .click()
        .await
        .expect("clicked");

    // Assert: every refused event is stored, once; the panel says so.
    wait_for(
        &client,
        "the panel reports the replay",
        "document.getElementById('dl-status').dataset.kind === 'done' && \
         document.getElementById('dead-letters').dataset.replayed === '50'",
    )
    .await;
    eventually(common::PATIENCE, "250 rows", || async {
        let rows = app.db.count_rows("codes").await;
        if rows == 250 {
            Ok(())
        } else {
            Err(format!("{rows} rows"))
        }
    })
    .await;
    assert_eq!(
        app.db
            .query_scalar::<i64>("SELECT count(DISTINCT msg_id) FROM codes", &[])
            .await,
        250
    );
    wait_for(
        &client,
        "the panel shows only the 3 not_json letters left",
        &format!(
            "{} === '0' && {} === '3' && document.getElementById('dead-letters').dataset.total === '3'",
            held("rejected_by_database"),
            held("not_json")
        ),
    )
    .await;
    let shot_after = panel.screenshot().await.expect("a screenshot of the panel");
    let dir = target_dir();
    std::fs::create_dir_all(&dir).expect("the target directory");
    std::fs::write(dir.join("dashboard-dead-letters-before.png"), shot_before).expect("written");
    std::fs::write(dir.join("dashboard-dead-letters.png"), shot_after).expect("written");
    eprintln!(
        "screenshots: {}",
        dir.join("dashboard-dead-letters*.png").display()
    );
    assert_eq!(
        client
            .execute("return document.body.dataset.jsError || ''", Vec::new())
            .await
            .expect("read"),
        serde_json::json!("")
    );

    client.close().await.expect("the browser closes");
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
    let _ = std::fs::remove_file(mapping);
}

async fn publish(channel: &lapin::Channel, exchange: &str, id: &str, body: &[u8]) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            "codes.new".into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.into()),
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack());
}
