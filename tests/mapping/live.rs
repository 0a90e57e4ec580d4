//! The live path with a mapping: dashboards still see the whole event, not
//! just the mapped columns.

use std::time::Duration;

use awc::ws::Frame;
use futures_util::StreamExt as _;
use serde_json::Value;

use crate::helpers::*;

/// Attempts (one published event each) before giving up on a live event.
const ATTEMPTS: u64 = 10;

#[actix_web::test]
async fn a_websocket_client_sees_the_whole_event_while_rows_go_to_the_mapped_table() {
    let ddl = "CREATE TABLE slim (msg_id text PRIMARY KEY, sensor int)";
    let mapping = MappingFile::new(
        "table = \"slim\"\nconflict = [\"msg_id\"]\n\
         [columns]\nmsg_id = \"message_id\"\nsensor = \"/sensor\"\n",
    );
    let app = spawn_app_with(database_with(ddl).await, &[mapping.env()]).await;
    let url = format!("ws://{}/ws", app.service.http_addr());
    let (_response, mut socket) = awc::Client::new()
        .ws(url.as_str())
        .max_frame_size(1 << 20)
        .connect()
        .await
        .expect("WebSocket upgrade");

    // The subscription is set up asynchronously: publish until one arrives.
    let mut seen = None;
    let mut published = 0;
    for i in 0..ATTEMPTS {
        published += 1;
        publish_all(
            &app,
            &[(format!("live-{i}"), "reading.live".into(), body(i))],
        )
        .await;
        let frame = tokio::time::timeout(Duration::from_secs(3), socket.next()).await;
        if let Ok(Some(Ok(Frame::Text(text)))) = frame {
            let frame: Value = serde_json::from_slice(&text).expect("a JSON frame");
            if frame["type"] == "events" {
                seen = Some(frame["events"][0].clone());
                break;
            }
        }
    }
    let event = seen.expect("a live event within the attempts");
    let id = event["message_id"].as_str().expect("message id").to_owned();
    let i: u64 = id.trim_start_matches("live-").parse().expect("numbered id");
    assert_eq!(event["routing_key"], "reading.live");
    assert_eq!(
        event["payload"],
        serde_json::from_str::<Value>(&body(i)).expect("body")
    );
    assert!(event["headers"].is_object() && event["received_at"].is_string());

    wait_table_rows(&app.db, "slim", published).await;
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

/// A body with more in it than the two mapped columns.
fn body(i: u64) -> String {
    serde_json::json!({"sensor": i, "value": 0.5, "tags": ["a"], "extra": {"deep": [i]}})
        .to_string()
}
