//! The service, a pipelined publisher of numbered events, and a WebSocket
//! client that speaks the live protocol (answering pings, parsing frames).

use std::future::Future;
use std::time::{Duration, SystemTime};

use actix_codec::Framed;
use awc::error::WsClientError;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use sluice_testkit::{eventually, fresh_database};

use crate::common;
pub use crate::common::{metric_value, TestApp, PATIENCE};
use tokio::time::Instant;

/// How long a client waits for the next frame before failing.
pub const FRAME_WAIT: Duration = Duration::from_secs(30);

/// Markers [`TestApp::wait_live_caught_up`] publishes at most.
const MARKER_ATTEMPTS: usize = 10;

/// How long [`TestApp::wait_live_caught_up`] waits for one marker.
const MARKER_WAIT: Duration = Duration::from_secs(3);

/// The largest frame the test clients accept (the server batches up to 256
/// events in a frame, and some tests send events of several KB).
const CLIENT_MAX_FRAME: usize = 64 << 20;

/// Starts the service with `extra` settings on a fresh database and prefix,
/// and waits until it consumes.
pub async fn spawn_app_with(extra: &[(&str, &str)]) -> TestApp {
    let extra: Vec<(&str, String)> = extra.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    common::spawn_app_with(fresh_database().await, &extra).await
}

impl TestApp {
    /// Publishes events `seqs` (pipelined, then waits for every confirm).
    /// Event `i` has message id `<tag>-<i>`, routing key `test.<i mod 10>`
    /// and body `{"seq":i,"pad":"xxx…"}` with `pad` bytes of padding.
    pub async fn publish(&self, tag: &str, seqs: std::ops::Range<usize>, pad: usize) {
        let channel = self.publisher.channel();
        let padding = "x".repeat(pad);
        let mut confirms = Vec::with_capacity(seqs.len());
        for i in seqs {
            let body = format!(r#"{{"seq":{i},"pad":"{padding}"}}"#);
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(format!("{tag}-{i}").into());
            let confirm = channel
                .basic_publish(
                    self.prefix.as_str().into(),
                    format!("test.{}", i % 10).into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .unwrap_or_else(|e| panic!("publish {tag}-{i}: {e}"));
            confirms.push(confirm);
        }
        let confirmed = async {
            for confirm in confirms {
                let confirmation = confirm.await.expect("publish confirmed");
                assert!(confirmation.is_ack(), "broker nacked: {confirmation:?}");
            }
        };
        tokio::time::timeout(PATIENCE, confirmed)
            .await
            .unwrap_or_else(|_| panic!("the broker did not confirm within {PATIENCE:?}"));
    }

    /// Returns once `client` (a client that reads) has received an event
    /// published after this call began: the Observable handles chunks in
    /// order, so it has then fanned out everything published before. Markers
    /// (message id `mark-<k>`) are published one at a time until one
    /// arrives, because a single one may be dropped on its way (as any event
    /// may be), and a drop is only reported with a later event.
    pub async fn wait_live_caught_up(&self, client: &mut LiveClient) {
        for k in 0..MARKER_ATTEMPTS {
            self.publish("mark", k..k + 1, 0).await;
            let deadline = Instant::now() + MARKER_WAIT;
            while let Some(incoming) = client.next_by(deadline).await {
                match incoming {
                    Incoming::Events(events) if events.iter().any(|e| e.tag == "mark") => return,
                    Incoming::Events(_) | Incoming::Lagged(_) => {}
                    other => panic!("while waiting for a marker: {other:?}"),
                }
            }
        }
        panic!("none of {MARKER_ATTEMPTS} markers reached the client");
    }

    /// Publishes events `0..n` in waves of `wave`, each read by `client`
    /// (received or told missed) before the next is published, so the client
    /// keeps up by construction: on a loaded machine the test's own reader
    /// could otherwise fall a whole buffer behind, and drops at its Observer
    /// would then be right. Any loss is then the service's.
    pub async fn publish_read_in_waves(
        &self,
        client: &mut LiveClient,
        tag: &str,
        n: usize,
        wave: usize,
        pad: usize,
    ) -> Collected {
        let deadline = Instant::now() + FRAME_WAIT;
        let mut got = Collected::default();
        for start in (0..n).step_by(wave) {
            let end = (start + wave).min(n);
            let ((), part) = futures_util::join!(
                self.publish(tag, start..end, pad),
                client.collect_by((end - start) as u64, deadline)
            );
            got.events.extend(part.events);
            got.missed += part.missed;
        }
        got
    }

    /// The live path's drop counters, for failure messages.
    pub async fn live_drops(&self) -> String {
        let text = self.metrics_text().await;
        let dropped = |name: &str, labels: &str| metric_value(&text, name, labels);
        format!(
            "dropped at the Tap {}, at the Observable {}, at the Observer {}",
            dropped("sluice_tap_dropped_events_total", ""),
            dropped("sluice_live_dropped_events_total", "where=\"observable\""),
            dropped("sluice_live_dropped_events_total", "where=\"observer\""),
        )
    }

    /// Waits until a metric has exactly `value`.
    pub async fn wait_metric(&self, name: &str, labels: &str, value: f64) {
        eventually(
            PATIENCE,
            &format!("{name}{{{labels}}} = {value}"),
            || async {
                let now = self.metric(name, labels).await;
                if now == value {
                    Ok(())
                } else {
                    Err(format!("{now}"))
                }
            },
        )
        .await;
    }

    /// `ws://…/ws` followed by `query` (e.g. `?topic=a.*`, or empty).
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.service.http_addr())
    }

    /// Opens a session with no extra headers (failing the test if refused).
    pub async fn connect(&self, query: &str) -> LiveClient {
        connect(ws_request(&self.ws_url(query)))
            .await
            .unwrap_or_else(|status| panic!("upgrade of /ws{query} refused with {status}"))
    }

    /// The service's resident memory now and at its peak, in KiB.
    pub fn memory_kib(&self) -> Memory {
        let path = format!("/proc/{}/status", self.service.pid());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {path}"))
        };
        Memory {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
        }
    }
}

/// Resident set sizes of the service, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// `VmRSS`: now.
    pub rss: u64,
    /// `VmHWM`: the peak so far.
    pub hwm: u64,
}

/// A `/ws` upgrade request with the test clients' settings; add headers to it.
pub fn ws_request(url: &str) -> awc::ws::WebsocketsRequest {
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish()
        .ws(url)
        .max_frame_size(CLIENT_MAX_FRAME)
}

/// Completes the upgrade, or returns the HTTP status it was refused with.
pub async fn connect(request: awc::ws::WebsocketsRequest) -> Result<LiveClient, u16> {
    match request.connect().await {
        Ok((_response, framed)) => Ok(LiveClient { framed, pings: 0 }),
        Err(WsClientError::InvalidResponseStatus(status)) => Err(status.as_u16()),
        Err(err) => panic!("WebSocket upgrade failed: {err}"),
    }
}

/// One event as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `<i>` of message id `<tag>-<i>`.
    pub seq: usize,
    /// The `<tag>` of the message id.
    pub tag: String,
    /// The AMQP routing key.
    pub routing_key: String,
    /// When the service received it (`received_at`).
    pub received_at: SystemTime,
}

/// What the server said, pings answered and pongs to our syncs aside.
#[derive(Debug)]
pub enum Incoming {
    /// `{"type":"events",…}`.
    Events(Vec<Event>),
    /// `{"type":"lagged","missed":N}`.
    Lagged(u64),
    /// A close frame, with its code.
    Close(Option<u16>),
    /// The connection ended.
    End,
}

/// What a client read: events received, and events `lagged` frames said
/// it missed.
#[derive(Debug, Default)]
pub struct Collected {
    pub events: Vec<Event>,
    pub missed: u64,
}

impl Collected {
    /// Received plus missed.
    pub fn accounted(&self) -> u64 {
        self.events.len() as u64 + self.missed
    }
}

/// A WebSocket client of `/ws`.
pub struct LiveClient {
    framed: Framed<BoxedSocket, Codec>,
    /// Sync pings sent, to recognise our own pongs.
    pings: u64,
}

impl std::fmt::Debug for LiveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveClient").finish_non_exhaustive()
    }
}

impl LiveClient {
    /// Sends a message to the server.
    pub async fn send(&mut self, message: Message) {
        self.framed.send(message).await.expect("send to the server");
    }

    /// The next raw frame: `Ok(None)` when the connection ended, `Err(())`
    /// at `deadline`. Callers set one deadline for what they wait for, so the
    /// server's pings cannot keep a test waiting forever.
    async fn next_raw(&mut self, deadline: Instant) -> Result<Option<Frame>, ()> {
        match tokio::time::timeout_at(deadline, self.framed.next()).await {
            Ok(Some(Ok(frame))) => Ok(Some(frame)),
            Ok(Some(Err(err))) => panic!("reading from /ws: {err}"),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }

    /// The next frame that means something to the test, or `None` if none
    /// came by `deadline`. Server pings are answered; pongs are returned only
    /// through [`LiveClient::sync`].
    pub async fn next_by(&mut self, deadline: Instant) -> Option<Incoming> {
        loop {
            match self.next_raw(deadline).await.ok()? {
                None => return Some(Incoming::End),
                Some(Frame::Ping(payload)) => self.send(Message::Pong(payload)).await,
                Some(Frame::Pong(payload)) => panic!("unexpected pong {payload:?}"),
                Some(Frame::Close(reason)) => {
                    return Some(Incoming::Close(reason.map(|r| u16::from(r.code))))
                }
                Some(Frame::Text(text)) => return Some(parse(&text)),
                Some(other) => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame that means something to the test; fails the test if
    /// none comes within [`FRAME_WAIT`].
    pub async fn next(&mut self) -> Incoming {
        self.next_by(Instant::now() + FRAME_WAIT)
            .await
            .unwrap_or_else(|| panic!("nothing from /ws within {FRAME_WAIT:?}"))
    }

    /// Round trip through the session's Observer: sends a ping and waits for
    /// its pong. Anything before the pong fails the test. After it, the
    /// Observer has handled every frame sent before, so its subscription (or
    /// filter change) is queued at the Observable ahead of any event
    /// published from now on.
    pub async fn sync(&mut self) {
        self.pings += 1;
        let payload = Bytes::from(format!("sync-{}", self.pings));
        self.send(Message::Ping(payload.clone())).await;
        let deadline = Instant::now() + FRAME_WAIT;
        loop {
            match self.next_raw(deadline).await {
                Ok(Some(Frame::Pong(got))) if got == payload => return,
                Ok(Some(Frame::Ping(p))) => self.send(Message::Pong(p)).await,
                Ok(other) => panic!("expected our pong, got {other:?}"),
                Err(()) => panic!("no pong within {FRAME_WAIT:?}"),
            }
        }
    }

    /// Reads until the events received plus those reported missed reach
    /// `total`, or until `deadline`; returns what came. Fails on a close or
    /// on more than `total`.
    pub async fn collect_by(&mut self, total: u64, deadline: Instant) -> Collected {
        let mut got = Collected::default();
        while got.accounted() < total {
            match self.next_by(deadline).await {
                None => break,
                Some(Incoming::Events(batch)) => got.events.extend(batch),
                Some(Incoming::Lagged(n)) => got.missed += n,
                Some(other) => panic!(
                    "after {} events and {} missed of {total}: {other:?}",
                    got.events.len(),
                    got.missed
                ),
            }
        }
        assert!(got.accounted() <= total, "more events than published");
        got
    }

    /// [`LiveClient::collect_by`], failing the test unless all `total` are
    /// accounted for within [`FRAME_WAIT`].
    pub async fn collect(&mut self, total: u64) -> Collected {
        let got = self.collect_by(total, Instant::now() + FRAME_WAIT).await;
        assert_eq!(
            got.accounted(),
            total,
            "{} received + {} missed after {FRAME_WAIT:?}",
            got.events.len(),
            got.missed
        );
        got
    }

    /// Reads (answering pings, keeping what comes) until `until` completes,
    /// as a browser keeps reading whatever else happens; returns its output.
    pub async fn read_while<T>(&mut self, until: impl Future<Output = T>) -> (T, Collected) {
        let mut got = Collected::default();
        let mut until = std::pin::pin!(until);
        loop {
            tokio::select! {
                output = &mut until => return (output, got),
                incoming = self.next() => match incoming {
                    Incoming::Events(batch) => got.events.extend(batch),
                    Incoming::Lagged(n) => got.missed += n,
                    other => panic!("while reading: {other:?}"),
                },
            }
        }
    }

    /// Reads until `n` events have arrived; fails on a `lagged` or a close.
    pub async fn events(&mut self, n: usize) -> Vec<Event> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            match self.next().await {
                Incoming::Events(batch) => events.extend(batch),
                other => panic!("after {} of {n} events: {other:?}", events.len()),
            }
        }
        assert_eq!(events.len(), n, "more events than expected: {events:?}");
        events
    }

    /// Waits for the close frame and returns its code; then the connection
    /// must end.
    pub async fn expect_close(&mut self) -> Option<u16> {
        let code = loop {
            match self.next().await {
                Incoming::Close(code) => break code,
                // Events published before the client misbehaved may precede it.
                Incoming::Events(_) | Incoming::Lagged(_) => {}
                Incoming::End => panic!("the connection ended without a close frame"),
            }
        };
        let deadline = Instant::now() + FRAME_WAIT;
        loop {
            match self.next_raw(deadline).await {
                Ok(None) => return code,
                Ok(Some(Frame::Ping(_) | Frame::Pong(_))) => {}
                Ok(Some(other)) => panic!("a frame after the close: {other:?}"),
                Err(()) => panic!("the connection stayed open after the close"),
            }
        }
    }
}

/// Parses a server text frame.
fn parse(text: &[u8]) -> Incoming {
    let value: serde_json::Value = serde_json::from_slice(text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(text)));
    match value["type"].as_str() {
        Some("lagged") => Incoming::Lagged(value["missed"].as_u64().expect("missed: a number")),
        Some("events") => Incoming::Events(
            value["events"]
                .as_array()
                .expect("events: an array")
                .iter()
                .map(|event| {
                    let id = event["message_id"].as_str().expect("message_id");
                    let (tag, seq) = id.rsplit_once('-').expect("message id <tag>-<i>");
                    Event {
                        seq: seq.parse().expect("numbered message id"),
                        tag: tag.to_owned(),
                        routing_key: event["routing_key"]
                            .as_str()
                            .expect("routing_key")
                            .to_owned(),
                        received_at: event["received_at"]
                            .as_str()
                            .and_then(|t| humantime::parse_rfc3339(t).ok())
                            .expect("received_at: an RFC 3339 time"),
                    }
                })
                .collect(),
        ),
        other => panic!("unknown frame type {other:?}: {value}"),
    }
}

/// The sequence numbers of `events`.
pub fn seqs(events: &[Event]) -> Vec<usize> {
    events.iter().map(|e| e.seq).collect()
}
