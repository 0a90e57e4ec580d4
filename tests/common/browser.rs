//! Headless Chromium for the tests that drive the dashboard: Debian's
//! `chromium` through `chromedriver` (WebDriver), started on a free port, with
//! a throwaway profile; everything goes when the [`Browser`] is dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use sluice_testkit::random_suffix;

use super::PATIENCE;

/// The flags the issue asks for, plus a window large enough for the screenshot.
pub const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1440,1640",
];

/// `name` on the `PATH`, if there.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A child process killed (by its own id) when the test ends.
pub struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory removed when the test ends.
pub struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts chromedriver on a free port and waits until it accepts connections.
pub fn start_chromedriver(chromedriver: &Path) -> (Reaped, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port for chromedriver")
        .port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
    let child = Reaped(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            start.elapsed() < PATIENCE,
            "chromedriver did not listen on {addr} within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, format!("http://{addr}"))
}

/// Evaluates `expression` in the page every 100 ms until it is `true`;
/// fails after [`PATIENCE`] with `what` and the page's state.
pub async fn wait_for(client: &Client, what: &str, expression: &str) {
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
            panic!(
                "timed out after {PATIENCE:?} waiting until {what}; page state: {}",
                page_state(client).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every one of `total` events reached the page or was reported
/// to it as missed (`lagged`): the dashboard's "seen" plus "missed here".
pub async fn wait_accounted(client: &Client, total: usize) {
    wait_for(
        client,
        "every event reached this browser or was reported missed",
        &format!(
            "Number(document.body.dataset.eventsSeen) + Number(document.body.dataset.missed) >= {total}"
        ),
    )
    .await;
}

/// The `data-*` attributes of `<body>` and the charts, for failure messages.
pub async fn page_state(client: &Client) -> String {
    client
        .execute(
            "const s = Object.assign({}, document.body.dataset);\
             document.querySelectorAll('.chart-card').forEach(c => \
               s[c.id] = c.dataset.points + ' points, max ' + c.dataset.max);\
             s.verdict = document.getElementById('verdict-text').textContent;\
             return JSON.stringify(s);",
            Vec::new(),
        )
        .await
        .map_or_else(|e| format!("(unreadable: {e})"), |v| v.to_string())
}

/// A number from the page.
pub async fn number(client: &Client, expression: &str) -> f64 {
    client
        .execute(&format!("return Number({expression});"), Vec::new())
        .await
        .unwrap_or_else(|e| panic!("evaluating {expression:?}: {e}"))
        .as_f64()
        .unwrap_or_else(|| panic!("{expression:?} is not a number"))
}

/// Where screenshots go: `$CARGO_TARGET_DIR` or the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// A headless Chromium driven over WebDriver; everything it started goes
/// when it is dropped (after the client is closed).
pub struct Browser {
    pub client: Client,
    _chromedriver: Reaped,
    _profile: TempDir,
}

/// Starts Chromium through chromedriver, or `None` when the tests are asked
/// to skip the browser (`SLUICE_SKIP_BROWSER=1`).
pub async fn open_browser() -> Option<Browser> {
    if std::env::var("SLUICE_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("SLUICE_SKIP_BROWSER=1: the browser test is skipped");
        return None;
    }
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        panic!(
            "the browser test needs Debian's `chromium` and `chromedriver` on the PATH: \
             run `scripts/setup.sh --with-browser` (or set SLUICE_SKIP_BROWSER=1 to skip it)"
        );
    };
    let (chromedriver, webdriver) = start_chromedriver(&chromedriver);
    let profile =
        TempDir(std::env::temp_dir().join(format!("sluice-chromium-{}", random_suffix())));
    let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| (*a).to_owned()).collect();
    args.push(format!("--user-data-dir={}", profile.0.display()));
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": chromium, "args": args }),
    );
    let client = ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&webdriver)
        .await
        .expect("a Chromium session through chromedriver");
    Some(Browser {
        client,
        _chromedriver: chromedriver,
        _profile: profile,
    })
}

/// Saves what the page shows as `target/<name>`, for a person to look at.
pub async fn save_screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("a screenshot");
    let dir = target_dir();
    std::fs::create_dir_all(&dir).expect("the target directory");
    let shot = dir.join(name);
    std::fs::write(&shot, png).expect("the screenshot is written");
    eprintln!("screenshot: {}", shot.display());
}
