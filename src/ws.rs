//! The WebSocket endpoint, `GET /ws`: who may connect, and the plumbing between
//! the connection and its Observer.
//!
//! Admission happens before the upgrade, in this order, each refusal a plain
//! HTTP answer with a one-line explanation:
//!
//! 1. the `Origin` header must be allowed ([`WsConfig::allowed_origins`]), else `403`;
//! 2. when a token is configured, `Authorization: Bearer <token>` or
//!    `?token=<token>` must carry it, else `401`;
//! 3. `?topic=` must be a valid AMQP topic pattern, else `400`; `?since=`
//!    (a position) and `?last=` (a count) must be numbers, not both, else `400`;
//! 4. fewer than [`WsConfig::max_observers`] sessions may be open, else `503`;
//! 5. the request must be a valid WebSocket handshake, else `400`.
//!
//! Then the Observer ([`sluice_actors::observer`]) takes over: the request
//! body is decoded into frames for it (frames larger than
//! [`WsConfig::max_frame_bytes`] end the session with 1009), and what it writes
//! into its channel is encoded onto the response body.

use std::any::Any;
use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use actix::Addr;
use actix_codec::{Decoder, Encoder};
use actix_http::ws::{Codec, Frame, ProtocolError};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use sluice_actors::history::Since;
use sluice_actors::internal_events::live::WebSocketRefused;
use sluice_actors::live_feed::replay::Replays;
use sluice_actors::observable::Observable;
use sluice_actors::observer::{
    outgoing_channel, Observer, ObserverSettings, Outgoing, SessionSlot,
};
use sluice_actors::topic::{PatternError, TopicPattern};
use tokio::sync::mpsc;

/// Settings of the WebSocket endpoint.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Sessions open at once at most; past it, `503` before the upgrade.
    pub max_observers: usize,
    /// Origins allowed to open a session, as `scheme://host[:port]` (compared
    /// without regard to case), or `*` for any. When empty, the service's own
    /// origin (the request's `Host`) and `localhost`, `127.0.0.1` and `[::1]`
    /// on any port are allowed. A request without `Origin` (not a browser) is
    /// always allowed: the check protects browsers' users from other sites.
    pub allowed_origins: Vec<String>,
    /// When set, every session must present this token.
    pub auth_token: Option<String>,
    /// Largest frame accepted from a client, in bytes (clients only send
    /// small control messages).
    pub max_frame_bytes: usize,
    /// How each session's Observer treats its client.
    pub observer: ObserverSettings,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_observers: 1000,
            allowed_origins: Vec::new(),
            auth_token: None,
            max_frame_bytes: 4096,
            observer: ObserverSettings::default(),
        }
    }
}

/// What the `/ws` handler needs, registered as `web::Data<WsState>`.
#[derive(Debug)]
pub struct WsState {
    /// The endpoint's settings.
    pub config: WsConfig,
    /// Where Observers subscribe.
    pub observable: Addr<Observable>,
    /// Sessions open now (held by the Observers through [`SessionSlot`]s).
    pub connected: Arc<AtomicUsize>,
    /// With `LIVE_FEED=stream`: where a resume older than the ring is read.
    pub replays: Option<Arc<Replays>>,
}

impl WsState {
    /// State for the endpoint with no session open.
    pub fn new(config: WsConfig, observable: Addr<Observable>) -> WsState {
        WsState {
            config,
            observable,
            connected: Arc::new(AtomicUsize::new(0)),
            replays: None,
        }
    }

    /// Reads resumes older than the ring from the stream with `replays`.
    pub fn with_replays(mut self, replays: Option<Arc<Replays>>) -> WsState {
        self.replays = replays;
        self
    }
}

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The `Origin` is not allowed.
    #[error("origin {0:?} is not allowed to open a WebSocket here")]
    Origin(String),
    /// The token is missing or wrong.
    #[error("a valid token is required: send `Authorization: Bearer <token>` or `?token=<token>`")]
    Unauthorized,
    /// The query string could not be read.
    #[error("invalid query string: {0}")]
    Query(String),
    /// `?topic=` is not a valid pattern.
    #[error("invalid topic pattern: {0}")]
    Topic(#[from] PatternError),
    /// The session limit is reached.
    #[error("too many live sessions (the limit is {0}); try again later")]
    Full(usize),
    /// Not a valid WebSocket handshake.
    #[error("not a valid WebSocket upgrade request: {0}")]
    Handshake(actix_http::ws::HandshakeError),
}

impl Refusal {
    /// A short label for the metric.
    fn label(&self) -> &'static str {
        match self {
            Refusal::Origin(_) => "origin",
            Refusal::Unauthorized => "auth",
            Refusal::Query(_) | Refusal::Topic(_) => "topic",
            Refusal::Full(_) => "limit",
            Refusal::Handshake(_) => "handshake",
        }
    }
}

impl ResponseError for Refusal {
    fn status_code(&self) -> StatusCode {
        match self {
            Refusal::Origin(_) => StatusCode::FORBIDDEN,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::Query(_) | Refusal::Topic(_) | Refusal::Handshake(_) => {
                StatusCode::BAD_REQUEST
            }
            Refusal::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let Refusal::Unauthorized = self {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        response
            .content_type("text/plain; charset=utf-8")
            .body(format!("{self}\n"))
    }
}

/// The query parameters of `/ws`.
#[derive(Debug, Deserialize)]
struct WsQuery {
    /// AMQP topic pattern; absent means every event.
    topic: Option<String>,
    /// The token, for browsers (which cannot set `Authorization` on a WebSocket).
    token: Option<String>,
    /// Resume: start after this position (the last one the client saw).
    since: Option<u64>,
    /// History: start with the last this many events held.
    last: Option<usize>,
}

/// A request that passed admission: its filter and its session slot.
#[derive(Debug)]
pub struct Admission {
    /// The topic filter (`None`: every event).
    pub pattern: Option<TopicPattern>,
    /// The session's place under the limit.
    pub slot: SessionSlot,
    /// Where the stream starts (`?since=` or `?last=`; `None`: now).
    pub since: Option<Since>,
}

/// Checks origin, token, topic and the session limit, in that order, and
/// takes a session slot. Does not look at the WebSocket handshake headers.
pub fn admit(req: &HttpRequest, state: &WsState) -> Result<Admission, Refusal> {
    let config = &state.config;
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        if !origin_allowed(origin, host, &config.allowed_origins) {
            return Err(Refusal::Origin(origin.to_owned()));
        }
    }
    let query = web::Query::<WsQuery>::from_query(req.query_string())
        .map_err(|err| Refusal::Query(err.to_string()))?
        .into_inner();
    if let Some(expected) = &config.auth_token {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim);
        let presented = bearer.or(query.token.as_deref());
        if !presented.is_some_and(|token| same_secret(token, expected)) {
            return Err(Refusal::Unauthorized);
        }
    }
    let pattern = query
        .topic
        .as_deref()
        .map(TopicPattern::parse)
        .transpose()?;
    let since = match (query.since, query.last) {
        (Some(_), Some(_)) => {
            return Err(Refusal::Query(
                "`since` and `last` cannot be combined".to_owned(),
            ))
        }
        (Some(position), None) => Some(Since::After(position)),
        (None, Some(n)) => Some(Since::Last(n)),
        (None, None) => None,
    };
    let slot = SessionSlot::try_acquire(&state.connected, config.max_observers)
        .ok_or(Refusal::Full(config.max_observers))?;
    Ok(Admission {
        pattern,
        slot,
        since,
    })
}

/// `GET /ws`: admits the request (see the module docs), upgrades, and starts
/// the session's Observer.
pub async fn ws_route(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<WsState>,
) -> Result<HttpResponse, Refusal> {
    let refused = |refusal: Refusal| {
        WebSocketRefused {
            status: refusal.status_code().as_u16(),
            reason: refusal.label(),
        }
        .emit();
        refusal
    };
    let admission = admit(&req, &state).map_err(refused)?;
    let mut response =
        actix_web_actors::ws::handshake(&req).map_err(|err| refused(Refusal::Handshake(err)))?;

    let codec = Codec::new().max_size(state.config.max_frame_bytes);
    let (outgoing, frames) = outgoing_channel();
    Observer::new(
        state.config.observer.clone(),
        state.observable.clone(),
        admission.pattern,
        outgoing,
    )
    .with_slot(admission.slot)
    .with_since(admission.since)
    .with_replays(state.replays.clone())
    .start_with(decode_frames(payload, codec.clone()));
    Ok(response.streaming(encode_frames(frames, codec)))
}

/// For `HttpServer::on_connect`: keeps each accepted connection's kernel send
/// buffer at `bytes` (Linux doubles it for bookkeeping) instead of letting
/// autotuning grow it to megabytes. The Observer's acknowledgement window
/// already bounds what a WebSocket client has in flight; a small send buffer
/// makes a slow socket fill its channel promptly, so events wait in the
/// Observer, where the freshness bound applies. Applies to every HTTP
/// connection, since which one will upgrade is not known yet: the other
/// responses (pages, metrics) are small. A failure is logged, not fatal.
pub fn limit_send_buffer(connection: &dyn Any, bytes: usize) {
    if let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        if let Err(err) = socket2::SockRef::from(stream).set_send_buffer_size(bytes) {
            log::warn!("cannot set SO_SNDBUF to {bytes} on an HTTP connection: {err}");
        }
    }
}

/// Whether a browser page from `origin` may open a session.
fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    if !allowed.is_empty() {
        return allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin));
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // `null` (sandboxed pages, files) and other oddities.
    };
    if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return false;
    }
    if host.is_some_and(|host| host.eq_ignore_ascii_case(authority)) {
        return true;
    }
    let hostname = match authority.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8080`.
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    hostname.eq_ignore_ascii_case("localhost") || hostname == "127.0.0.1" || hostname == "::1"
}

/// Compares two secrets in time that depends on their lengths only.
pub(crate) fn same_secret(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes the request body into WebSocket frames. A frame is decoded as soon
/// as its bytes are in; more are read only when needed, so the buffer holds at
/// most one frame (bounded by the codec's `max_size`) and one read. After an
/// error the stream ends.
pub fn decode_frames<S, E>(
    payload: S,
    codec: Codec,
) -> impl Stream<Item = Result<Frame, ProtocolError>> + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Unpin + 'static,
    E: std::fmt::Display,
{
    struct State<S> {
        payload: S,
        buf: BytesMut,
        codec: Codec,
        done: bool,
    }
    let state = State {
        payload,
        buf: BytesMut::new(),
        codec,
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match st.codec.decode(&mut st.buf) {
                Ok(Some(frame)) => return Some((Ok(frame), st)),
                Ok(None) => {}
                Err(err) => {
                    st.done = true;
                    return Some((Err(err), st));
                }
            }
            match st.payload.next().await {
                Some(Ok(chunk)) => st.buf.extend_from_slice(&chunk),
                Some(Err(err)) => {
                    st.done = true;
                    let err = io::Error::other(err.to_string());
                    return Some((Err(ProtocolError::Io(err)), st));
                }
                None => return None,
            }
        }
    })
}

/// Encodes what the Observer writes into the response body (frames it
/// encoded itself, shared with other sessions, go as they are); ends when
/// the Observer is gone (after its close frame, if it sent one).
pub fn encode_frames(
    frames: mpsc::Receiver<Outgoing>,
    codec: Codec,
) -> impl Stream<Item = Result<Bytes, ProtocolError>> + 'static {
    futures_util::stream::unfold((frames, codec), |(mut frames, mut codec)| async move {
        let encoded = match frames.recv().await? {
            Outgoing::Frame(bytes) => Ok(bytes),
            Outgoing::Message(message) => {
                let mut buf = BytesMut::new();
                codec.encode(message, &mut buf).map(|()| buf.freeze())
            }
        };
        Some((encoded, (frames, codec)))
    })
}

#[cfg(test)]
mod tests {
    use actix_http::ws::Message;
    use actix_web::test::TestRequest;

    use super::*;

    fn state(config: WsConfig) -> WsState {
        WsState::new(config, Observable::start_bounded(16))
    }

    #[test]
    fn default_origins_are_the_service_itself_and_localhost() {
        let host = Some("dash.example.com:8080");
        for origin in [
            "http://dash.example.com:8080",
            "https://DASH.example.com:8080",
            "http://localhost:3000",
            "http://127.0.0.1",
            "http://[::1]:9000",
        ] {
            assert!(
                origin_allowed(origin, host, &[]),
                "{origin} should be allowed"
            );
        }
        for origin in [
            "http://evil.example.com",
            "http://dash.example.com:8081",
            "null",
            "file://",
            "http://localhost.evil.com",
            "ws://localhost",
        ] {
            assert!(
                !origin_allowed(origin, host, &[]),
                "{origin} should be refused"
            );
        }
    }

    #[test]
    fn configured_origins_replace_the_default() {
        let allowed = vec!["https://dash.example.com".to_owned()];
        assert!(origin_allowed("https://dash.example.com", None, &allowed));
        assert!(!origin_allowed("http://localhost:3000", None, &allowed));
        assert!(origin_allowed("http://anything", None, &["*".to_owned()]));
    }

    #[actix_web::test]
    async fn admission_refuses_with_the_documented_statuses() {
        let config = WsConfig {
            auth_token: Some("s3cret".into()),
            max_observers: 1,
            ..WsConfig::default()
        };
        let state = state(config);
        let status = |req: &HttpRequest| match admit(req, &state) {
            Ok(_) => 101,
            Err(refusal) => refusal.status_code().as_u16(),
        };

        let evil = TestRequest::with_uri("/ws?token=s3cret")
            .insert_header((header::ORIGIN, "http://evil.example.com"))
            .to_http_request();
        assert_eq!(status(&evil), 403);
        let no_token = TestRequest::with_uri("/ws").to_http_request();
        assert_eq!(status(&no_token), 401);
        let wrong = TestRequest::with_uri("/ws")
            .insert_header((header::AUTHORIZATION, "Bearer nope"))
            .to_http_request();
        assert_eq!(status(&wrong), 401);
        let bad_topic = TestRequest::with_uri("/ws?token=s3cret&topic=orders*").to_http_request();
        assert_eq!(status(&bad_topic), 400);

        let ok = TestRequest::with_uri("/ws?topic=orders.%23")
            .insert_header((header::AUTHORIZATION, "Bearer s3cret"))
            .insert_header((header::ORIGIN, "http://localhost:5173"))
            .to_http_request();
        let admission = admit(&ok, &state).expect("admitted");
        assert_eq!(
            admission.pattern.as_ref().map(|p| p.as_str()),
            Some("orders.#")
        );
        // The one slot is taken: the next request is refused until it is released.
        let again = TestRequest::with_uri("/ws?token=s3cret").to_http_request();
        assert_eq!(status(&again), 503);
        drop(admission);
        assert_eq!(status(&again), 101);
    }

    #[actix_web::test]
    async fn since_and_last_are_parsed_and_checked() {
        let state = state(WsConfig::default());
        let since = |uri: &str| {
            admit(&TestRequest::with_uri(uri).to_http_request(), &state).map(|a| a.since)
        };
        assert_eq!(since("/ws").expect("admitted"), None);
        assert_eq!(
            since("/ws?since=42").expect("admitted"),
            Some(Since::After(42))
        );
        assert_eq!(
            since("/ws?last=50").expect("admitted"),
            Some(Since::Last(50))
        );
        for bad in ["/ws?since=-1", "/ws?since=soon", "/ws?since=1&last=2"] {
            let refusal = since(bad).expect_err(bad);
            assert_eq!(refusal.status_code().as_u16(), 400, "{bad}");
        }
    }

    #[actix_web::test]
    async fn frames_are_decoded_until_the_size_limit() {
        // Two masked client text frames, the second larger than the limit.
        let mut client = Codec::new().client_mode();
        let mut wire = BytesMut::new();
        client
            .encode(Message::Text("hi".into()), &mut wire)
            .expect("encode");
        client
            .encode(Message::Text("x".repeat(100).into()), &mut wire)
            .expect("encode");
        // Delivered in small chunks, as the network may.
        let chunks: Vec<Result<Bytes, io::Error>> = wire
            .chunks(3)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let frames: Vec<_> = decode_frames(
            futures_util::stream::iter(chunks),
            Codec::new().max_size(64),
        )
        .collect()
        .await;
        assert_eq!(frames.len(), 2);
        assert!(matches!(&frames[0], Ok(Frame::Text(t)) if t.as_ref() == b"hi"));
        assert!(matches!(frames[1], Err(ProtocolError::Overflow)));
    }

    #[actix_web::test]
    async fn outgoing_messages_are_encoded_and_the_body_ends_with_the_channel() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Message::Text("{}".into()).into())
            .await
            .expect("open");
        // A frame the Observer encoded itself goes as it is.
        let mut shared = BytesMut::new();
        actix_http::ws::Parser::write_message(
            &mut shared,
            b"[]",
            actix_http::ws::OpCode::Text,
            true,
            false,
        );
        tx.send(Outgoing::Frame(shared.freeze()))
            .await
            .expect("open");
        drop(tx);
        let chunks: Vec<_> = encode_frames(rx, Codec::new()).collect().await;
        assert_eq!(chunks.len(), 2);
        let mut client = Codec::new().client_mode();
        for (chunk, text) in chunks.iter().zip([&b"{}"[..], b"[]"]) {
            let mut buf = BytesMut::from(&chunk.as_ref().expect("encoded")[..]);
            let frame = client.decode(&mut buf).expect("valid frame");
            assert!(matches!(frame, Some(Frame::Text(t)) if t.as_ref() == text));
        }
    }

    /// The handler behind a real server, with a real WebSocket client: events
    /// published to the Observable arrive as a batched frame, and a malformed
    /// client message is answered with close code 1008.
    #[actix_web::test]
    async fn a_real_session_receives_events_and_is_closed_for_bad_input() {
        use std::time::SystemTime;

        use actix_http::ws::CloseCode;
        use futures_util::SinkExt;
        use sluice_actors::messages::Publish;
        use sluice_actors::EventData;

        let observable = Observable::start_bounded(16);
        let data = web::Data::new(WsState::new(WsConfig::default(), observable.clone()));
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(data.clone())
                .route("/ws", web::get().to(ws_route))
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .expect("bind");
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);

        let (_, mut conn) = awc::Client::new()
            .ws(format!("http://{addr}/ws?topic=a.*"))
            .connect()
            .await
            .expect("upgrade");
        // A ping answered means the Observer is running and subscribed.
        conn.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .expect("send");
        loop {
            match conn.next().await.expect("frame").expect("valid") {
                Frame::Pong(_) => break,
                Frame::Ping(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let event = |key: &str| {
            Arc::new(EventData {
                message_id: key.to_owned(),
                routing_key: key.to_owned(),
                payload: "{\"ok\":true}".to_owned(),
                headers: "{}".to_owned(),
                published_at: None,
                received_at: SystemTime::now(),
                properties: Default::default(),
            })
        };
        observable
            .send(Publish::of(vec![event("a.1"), event("b.1"), event("a.2")]))
            .await
            .expect("observable alive");
        let text = match conn.next().await.expect("frame").expect("valid") {
            Frame::Text(text) => text,
            other => panic!("unexpected {other:?}"),
        };
        let v: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
        assert_eq!(v["type"], "events");
        let ids: Vec<_> = v["events"]
            .as_array()
            .expect("array")
            .iter()
            .map(|e| e["message_id"].as_str().expect("id").to_owned())
            .collect();
        assert_eq!(ids, ["a.1", "a.2"]);

        conn.send(Message::Text("not json".into()))
            .await
            .expect("send");
        // The events frame was followed by the Observer's ping (its
        // acknowledgement request); the close comes after it.
        loop {
            match conn.next().await.expect("frame").expect("valid") {
                Frame::Ping(_) => {}
                Frame::Close(Some(reason)) => break assert_eq!(reason.code, CloseCode::Policy),
                other => panic!("unexpected {other:?}"),
            }
        }
        handle.stop(false).await;
    }
}
