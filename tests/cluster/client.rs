//! A WebSocket client of `/ws` that keeps what an accounting test needs:
//! every event's position and message id, and the `lagged` counts.

use std::time::Duration;

use actix_codec::Framed;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;

/// How long a client waits for what it expects before failing.
pub const CLIENT_WAIT: Duration = Duration::from_secs(60);

/// One event as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Its place in the live stream.
    pub position: u64,
    /// Its message id.
    pub message_id: String,
}

/// Everything a client read.
#[derive(Debug, Default, Clone)]
pub struct Collected {
    /// Events received, in order.
    pub events: Vec<Seen>,
    /// Events `lagged` frames said were missed.
    pub missed: u64,
    /// The last position a `lagged` frame said it told of.
    pub told_through: u64,
}

impl Collected {
    /// Received plus missed.
    pub fn accounted(&self) -> u64 {
        self.events.len() as u64 + self.missed
    }

    /// The newest position received.
    pub fn last_position(&self) -> Option<u64> {
        self.events.last().map(|e| e.position)
    }

    /// Where to resume: after the newest position received or told missed.
    pub fn resume_after(&self) -> u64 {
        self.last_position().unwrap_or(0).max(self.told_through)
    }

    /// The message ids received, in order.
    pub fn ids(&self) -> Vec<String> {
        self.events.iter().map(|e| e.message_id.clone()).collect()
    }
}

/// What one read came to.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// A frame that counts (events or `lagged`).
    Frame,
    /// Nothing in time.
    Timeout,
    /// The server went away.
    Gone,
}

/// A session on `/ws`.
pub struct LiveClient {
    framed: Framed<BoxedSocket, Codec>,
    /// What was read so far.
    pub got: Collected,
    /// A slow client: it takes this long over each frame.
    pace: Option<Duration>,
}

impl LiveClient {
    /// Opens `ws://addr/ws<query>`, failing the test if refused.
    pub async fn connect(addr: std::net::SocketAddr, query: &str) -> LiveClient {
        let url = format!("ws://{addr}/ws{query}");
        let (_, framed) = awc::Client::builder()
            .timeout(Duration::from_secs(10))
            .finish()
            .ws(url.as_str())
            .max_frame_size(64 << 20)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("WebSocket {url}: {e}"));
        LiveClient {
            framed,
            got: Collected::default(),
            pace: None,
        }
    }

    /// A client that takes `pace` over each frame (a slow dashboard).
    pub fn with_pace(mut self, pace: Duration) -> LiveClient {
        self.pace = Some(pace);
        self
    }

    /// Reads one meaningful frame (answering pings) into `got`. Fails the
    /// test on an unreadable frame, or on a close unless `gone_is_fine`.
    async fn read_one(&mut self, deadline: Instant, gone_is_fine: bool) -> Read {
        if let Some(pace) = self.pace {
            // The client's own slowness, not a wait for anything.
            tokio::time::sleep(pace).await;
        }
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Err(_) => return Read::Timeout,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Frame::Close(_)))) if gone_is_fine => {
                    return Read::Gone
                }
                Ok(None) => panic!("the server ended the session"),
                Ok(Some(Err(e))) => panic!("reading /ws: {e}"),
                Ok(Some(Ok(frame))) => frame,
            };
            match frame {
                Frame::Ping(payload)
                    if self
                        .framed
                        .send(Message::Pong(payload.clone()))
                        .await
                        .is_err() =>
                {
                    assert!(gone_is_fine, "the server ended the session");
                    return Read::Gone;
                }
                Frame::Text(text) => {
                    let v: serde_json::Value = serde_json::from_slice(&text).expect("JSON frame");
                    match v["type"].as_str() {
                        Some("events") => {
                            for e in v["events"].as_array().expect("events") {
                                self.got.events.push(Seen {
                                    position: e["position"].as_u64().expect("a position"),
                                    message_id: e["message_id"]
                                        .as_str()
                                        .expect("message id")
                                        .to_owned(),
                                });
                            }
                        }
                        Some("lagged") => {
                            self.got.missed += v["missed"].as_u64().expect("missed count");
                            if let Some(position) = v["position"].as_u64() {
                                self.got.told_through = self.got.told_through.max(position);
                            }
                        }
                        _ => {} // other notices (e.g. freshness) do not count here
                    }
                    return Read::Frame;
                }
                Frame::Close(reason) => panic!("the server closed the session: {reason:?}"),
                _ => {}
            }
        }
    }

    /// Reads until received + missed reaches `total`, or until the server
    /// goes away (its instance was killed): `false` then. Fails if it passes
    /// `total`, or if that takes longer than [`CLIENT_WAIT`].
    pub async fn read_until_accounted_or_gone(&mut self, total: u64) -> bool {
        let deadline = Instant::now() + CLIENT_WAIT;
        while self.got.accounted() < total {
            match self.read_one(deadline, true).await {
                Read::Frame => {}
                Read::Gone => return false,
                Read::Timeout => panic!(
                    "after {CLIENT_WAIT:?}: {} received + {} missed of {total}",
                    self.got.events.len(),
                    self.got.missed
                ),
            }
        }
        assert_eq!(self.got.accounted(), total, "more than happened");
        true
    }

    /// Reads until received + missed reaches `total` (failing if it passes
    /// it, or if that takes longer than [`CLIENT_WAIT`]).
    pub async fn read_until_accounted(&mut self, total: u64) {
        let deadline = Instant::now() + CLIENT_WAIT;
        while self.got.accounted() < total {
            assert!(
                matches!(self.read_one(deadline, false).await, Read::Frame),
                "after {CLIENT_WAIT:?}: {} received + {} missed of {total}",
                self.got.events.len(),
                self.got.missed
            );
        }
        assert_eq!(self.got.accounted(), total, "more than happened");
    }

    /// Reads until the frame just read is a `lagged` notice, after at least
    /// one event (a client that leaves right after it was told of a miss).
    pub async fn read_until_told(&mut self) {
        let deadline = Instant::now() + CLIENT_WAIT;
        loop {
            let missed = self.got.missed;
            assert_eq!(
                self.read_one(deadline, false).await,
                Read::Frame,
                "after {CLIENT_WAIT:?}: no lagged notice ({} received)",
                self.got.events.len()
            );
            if self.got.missed > missed && !self.got.events.is_empty() {
                return;
            }
        }
    }

    /// Reads until at least `n` events were received.
    pub async fn read_until_received(&mut self, n: usize) {
        let deadline = Instant::now() + CLIENT_WAIT;
        while self.got.events.len() < n {
            assert!(
                matches!(self.read_one(deadline, false).await, Read::Frame),
                "after {CLIENT_WAIT:?}: {} received of {n}",
                self.got.events.len()
            );
        }
    }

    /// Opens a new session on `addr` after the last position this one
    /// received (`?since=`), keeping what it read: a dashboard whose
    /// instance went away, coming back elsewhere.
    pub async fn resume_on(self, addr: std::net::SocketAddr) -> LiveClient {
        let since = self.got.resume_after();
        let mut resumed = LiveClient::connect(addr, &format!("?since={since}")).await;
        resumed.got = self.got;
        resumed.pace = self.pace;
        resumed
    }

    /// Closes the session (normal closure).
    pub async fn close(mut self) -> Collected {
        let _ = self.framed.send(Message::Close(None)).await;
        self.got
    }
}
