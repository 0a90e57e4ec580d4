//! Refusals before the upgrade: origin (403), token (401), topic (400) and
//! the session limit (503), each a plain HTTP answer instead of a WebSocket.

use awc::ws::{CloseCode, CloseReason, Message};

use crate::helpers::{connect, spawn_app_with, ws_request};

#[actix_web::test]
async fn upgrades_are_refused_before_the_handshake_with_the_documented_statuses() {
    const TOKEN: &str = "s3cret-token";
    let app = spawn_app_with(&[("AUTH_TOKEN", TOKEN), ("WS_MAX_OBSERVERS", "2")]).await;
    let url = |query: &str| app.ws_url(query);
    let own_origin = format!("http://{}", app.service.http_addr());

    // 403: a page from another site, even with the right token.
    let evil = ws_request(&url(""))
        .origin("http://evil.example.com")
        .bearer_auth(TOKEN);
    assert_eq!(connect(evil).await.err(), Some(403));

    // 401: no token, a wrong bearer token, a wrong query token.
    assert_eq!(connect(ws_request(&url(""))).await.err(), Some(401));
    let wrong = ws_request(&url("")).bearer_auth("nope");
    assert_eq!(connect(wrong).await.err(), Some(401));
    assert_eq!(
        connect(ws_request(&url("?token=nope"))).await.err(),
        Some(401)
    );

    // 400: a topic that is not an AMQP pattern.
    let bad_topic = ws_request(&url("?topic=orders*")).bearer_auth(TOKEN);
    assert_eq!(connect(bad_topic).await.err(), Some(400));

    // The right token as a bearer header (from the service's own origin),
    // and as `?token=` (as browsers must, from a localhost page).
    let by_header = ws_request(&url(""))
        .origin(own_origin.as_str())
        .bearer_auth(TOKEN);
    let mut first = connect(by_header).await.expect("bearer token accepted");
    first.sync().await;
    let by_query = ws_request(&url(&format!("?token={TOKEN}"))).origin("http://localhost:3000");
    let mut second = connect(by_query).await.expect("query token accepted");
    second.sync().await;

    // 503: a third session over the limit of two.
    let third = ws_request(&url("")).bearer_auth(TOKEN);
    assert_eq!(connect(third).await.err(), Some(503));

    // After one closes, there is room again (the gauge drops when its slot
    // is given back).
    first
        .send(Message::Close(Some(CloseReason::from(CloseCode::Normal))))
        .await;
    assert_eq!(first.expect_close().await, Some(1000));
    app.wait_metric("sluice_observers_connected", "", 1.0).await;
    let again = ws_request(&url("")).bearer_auth(TOKEN);
    let mut again = connect(again).await.expect("room after a close");
    again.sync().await;
    second.sync().await;

    for (reason, count) in [
        ("origin", 1.0),
        ("auth", 3.0),
        ("topic", 1.0),
        ("limit", 1.0),
    ] {
        assert_eq!(
            app.metric("sluice_ws_refused_total", &format!("reason=\"{reason}\""))
                .await,
            count,
            "refusals counted under {reason}"
        );
    }
    app.cleanup().await;
}
