//! The dashboard resumes by itself: opened, it shows the newest events at
//! once (`?last=`); when its connection drops, it reconnects with `?since=`
//! and shows what it missed, nothing twice. Headless Chromium over WebDriver
//! against the real service, behind a TCP proxy that cuts the connection.
//! Needs `chromium` and `chromedriver` (`scripts/setup.sh --with-browser`);
//! `SLUICE_SKIP_BROWSER=1` skips it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use sluice_testkit::{fresh_database, random_suffix, Mode, Proxy};

use crate::client::LiveClient;
use crate::helpers::*;

/// `name` on the `PATH`, if there.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A child process killed (by its own id) when the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts chromedriver on a free port and waits until it accepts connections.
fn start_chromedriver(chromedriver: &Path) -> (Reaped, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
    let child = Reaped(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(start.elapsed() < PATIENCE, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, format!("http://{addr}"))
}

/// Evaluates `expression` in the page until it is `true` (bounded).
async fn wait_for(client: &Client, what: &str, expression: &str) {
    let script = format!("return Boolean({expression});");
    let start = Instant::now();
    loop {
        let value = client
            .execute(&script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("evaluating {expression:?}: {e}"));
        if value == json!(true) {
            return;
        }
        if start.elapsed() > PATIENCE {
            let state = client
                .execute(
                    "return JSON.stringify(Object.assign({}, document.body.dataset));",
                    Vec::new(),
                )
                .await
                .map_or_else(|e| e.to_string(), |v| v.to_string());
            panic!("timed out waiting until {what}; page state: {state}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn the_dashboard_opens_with_the_newest_events_and_resumes_after_a_cut() {
    if std::env::var("SLUICE_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("SLUICE_SKIP_BROWSER=1: skipped");
        return;
    }
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        panic!("needs `chromium` and `chromedriver`: scripts/setup.sh --with-browser");
    };
    let cluster = Cluster::start(fresh_database().await, 1, &[]).await;
    let node = &cluster.nodes[0];
    let mut watcher = LiveClient::connect(node.http_addr(), "?since=0").await;
    cluster.publish("p", 30).await;
    // Once a client saw all 30, the ring holds them.
    watcher.read_until_received(30).await;

    // The browser reaches the service through a proxy that can cut it off.
    let proxy = Proxy::start(node.http_addr()).expect("proxy");
    let (_chromedriver, webdriver) = start_chromedriver(&chromedriver);
    let profile = std::env::temp_dir().join(format!("sluice-chromium-{}", random_suffix()));
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": chromium, "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.display()),
        ]}),
    );
    let client = ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&webdriver)
        .await
        .expect("a Chromium session");
    client
        .goto(&format!("http://{}/", proxy.addr()))
        .await
        .expect("the dashboard loads");
    wait_for(
        &client,
        "the 30 events published before the page opened are shown",
        "document.body.dataset.ws === 'open' && document.body.dataset.tailRows === '30' \
         && document.body.dataset.eventsSeen === '30' && document.body.dataset.instance === 'node-0'",
    )
    .await;

    // The connection drops; 20 more events come while the page is away.
    proxy.set_mode(Mode::Refuse);
    proxy.cut();
    wait_for(
        &client,
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
        &client,
        "the page resumed with the 20 it missed, nothing twice, nothing lost",
        "document.body.dataset.ws === 'open' && document.body.dataset.eventsSeen === '50' \
         && document.body.dataset.missed === '0' && document.body.dataset.tailRows === '50'",
    )
    .await;
    let _ = client.close().await;
    let _ = std::fs::remove_dir_all(&profile);
    cluster.stop_all();
    cluster.cleanup().await;
}
