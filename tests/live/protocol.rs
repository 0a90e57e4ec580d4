//! Bad client frames end that client's session with the documented close
//! code; the service keeps storing and other clients keep receiving.

use awc::ws::Message;
use bytes::Bytes;

use crate::helpers::{seqs, spawn_app_with};

/// Largest client frame accepted in this test.
const MAX_FRAME: usize = 256;

#[actix_web::test]
async fn bad_client_frames_get_the_documented_close_codes_and_harm_nobody_else() {
    const PER_ROUND: usize = 50;
    let app = spawn_app_with(&[("WS_MAX_FRAME_BYTES", "256")]).await;
    let mut witness = app.connect("").await;
    witness.sync().await;

    let oversized = format!(
        r#"{{"type":"filter","topic":"{}"}}"#,
        "a".repeat(MAX_FRAME + 1)
    );
    let cases: [(&str, Message, u16); 6] = [
        ("malformed JSON", Message::Text("hello {".into()), 1008),
        (
            "an unknown type",
            Message::Text(r#"{"type":"subscribe_all"}"#.into()),
            1008,
        ),
        (
            "an invalid filter",
            Message::Text(r#"{"type":"filter","topic":"orders*"}"#.into()),
            1008,
        ),
        (
            "a binary frame",
            Message::Binary(Bytes::from_static(b"\x00\x01")),
            1003,
        ),
        (
            "an oversized frame",
            Message::Text(oversized.as_str().into()),
            1009,
        ),
        ("a close", Message::Close(None), 1000),
    ];
    let mut published = 0;
    for (what, message, code) in cases {
        let mut bad = app.connect("").await;
        bad.sync().await;
        bad.send(message).await;
        assert_eq!(bad.expect_close().await, Some(code), "after {what}");

        // The service still stores and still streams to the others.
        app.publish("proto", published..published + PER_ROUND, 0)
            .await;
        let events = witness.events(PER_ROUND).await;
        assert_eq!(
            seqs(&events),
            (published..published + PER_ROUND).collect::<Vec<_>>(),
            "after {what}"
        );
        published += PER_ROUND;
        app.wait_rows(published as i64).await;
    }
    // Every bad session is gone; the witness remains.
    app.wait_metric("sluice_observers_connected", "", 1.0).await;
    app.cleanup().await;
}
