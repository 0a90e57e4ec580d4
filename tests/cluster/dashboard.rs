//! The dashboard resumes by itself: opened, it shows the newest events at
//! once (`?last=`); when its connection drops, it reconnects with `?since=`
//! and shows what it missed, nothing twice. Headless Chromium over WebDriver
//! against the real service, behind a TCP proxy that cuts the connection.
//! Needs `chromium` and `chromedriver` (`scripts/setup.sh --with-browser`);
//! `SLUICE_SKIP_BROWSER=1` skips it.

use sluice_testkit::{fresh_database, Mode, Proxy};

use crate::common::browser::{open_browser, wait_for};

use crate::client::LiveClient;
use crate::helpers::*;

#[actix_web::test]
async fn the_dashboard_opens_with_the_newest_events_and_resumes_after_a_cut() {
    let Some(browser) = open_browser().await else {
        return; // SLUICE_SKIP_BROWSER=1
    };
    let client = &browser.client;
    let cluster = Cluster::start(fresh_database().await, 1, &[]).await;
    let node = &cluster.nodes[0];
    let mut watcher = LiveClient::connect(node.http_addr(), "?since=0").await;
    cluster.publish("p", 30).await;
    // Once a client saw all 30, the ring holds them.
    watcher.read_until_received(30).await;

    // The browser reaches the service through a proxy that can cut it off.
    let proxy = Proxy::start(node.http_addr()).expect("proxy");
    client
        .goto(&format!("http://{}/", proxy.addr()))
        .await
        .expect("the dashboard loads");
    wait_for(
        client,
        "the 30 events published before the page opened are shown",
        "document.body.dataset.ws === 'open' && document.body.dataset.tailRows === '30' \
         && document.body.dataset.eventsSeen === '30' && document.body.dataset.instance === 'node-0'",
    )
    .await;

    // The connection drops; 20 more events come while the page is away.
    proxy.set_mode(Mode::Refuse);
    proxy.cut();
    wait_for(
        client,
        "the page saw the cut",
        "document.body.dataset.ws !== 'open'",
    )
    .await;
    cluster.publish("q", 20).await;
    // Received or told missed: this watcher answers pings only when it
    // reads, so after idling through the browser's start the service may
    // judge the 20 too stale for it (`WS_MAX_LAG`). Either way the instance
    // has them now.
    watcher.read_until_accounted(50).await;
    proxy.set_mode(Mode::Pass);

    wait_for(
        client,
        "the page resumed with the 20 it missed, nothing twice, nothing lost",
        "document.body.dataset.ws === 'open' && document.body.dataset.eventsSeen === '50' \
         && document.body.dataset.missed === '0' && document.body.dataset.tailRows === '50'",
    )
    .await;
    let _ = browser.client.clone().close().await;
    cluster.stop_all();
    cluster.cleanup().await;
}
