//! The session's protocol rules, apart from the actor: what a client may
//! send, what each thing it sends calls for, and the close codes.
//!
//! | code | when |
//! |---|---|
//! | 1000 normal | the client closed the session (its close is answered) |
//! | 1001 going away | the service is stopping, or the live stream is unavailable |
//! | 1002 protocol error | the client broke the WebSocket protocol (unmasked frame, bad opcode…) |
//! | 1003 unsupported data | a binary frame, or a fragmented message |
//! | 1008 policy violation | a text frame that is not a known [`ClientMessage`], or an invalid topic |
//! | 1009 message too big | a frame larger than the configured limit |
//! | 4000 [`CLOSE_STALLED`] | the client read nothing for the stall timeout while events waited |
//! | 4001 [`CLOSE_TIMEOUT`] | nothing (not even a pong) came from the client for the client timeout |
//!
//! The two timeouts get codes of their own, from the private-use range
//! (4000–4999), rather than 1008 or 1013: a dashboard can tell "you were too
//! slow, reconnect" from "you sent something wrong" without parsing the reason.

use actix_http::ws::{CloseCode, Frame, ProtocolError};
use bytes::Bytes;
use serde::Deserialize;

use crate::topic::TopicPattern;

/// Close code for a client that made no progress reading for the stall timeout.
pub const CLOSE_STALLED: u16 = 4000;

/// Close code for a client from which nothing arrived for the client timeout.
pub const CLOSE_TIMEOUT: u16 = 4001;

/// The longest close reason, in bytes: a control frame carries at most 125
/// bytes, two of which are the code.
pub(super) const MAX_CLOSE_REASON: usize = 123;

/// What a client may send, as JSON text frames tagged by `type`. Anything
/// else closes the session with 1008.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Replace the topic filter: `{"type":"filter","topic":"orders.*"}`.
    /// A missing or `null` topic means every event.
    Filter {
        /// An AMQP topic pattern.
        #[serde(default)]
        topic: Option<String>,
    },
}

/// What one frame (or decoding error) from the client calls for.
#[derive(Debug, PartialEq)]
pub(super) enum Incoming {
    /// Use this topic filter from now on (`None`: every event).
    Filter(Option<TopicPattern>),
    /// A ping: answer it with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong: perhaps the acknowledgement of one of our pings.
    Pong(Bytes),
    /// End the session with this close frame.
    Close(CloseCode, String),
    /// The connection failed: end the session, with nobody to tell.
    Failed(String),
}

/// The rule for each thing a client may send.
pub(super) fn incoming(item: Result<Frame, ProtocolError>) -> Incoming {
    match item {
        Ok(Frame::Text(text)) => text_message(&text),
        Ok(Frame::Ping(payload)) => Incoming::Ping(payload),
        Ok(Frame::Pong(payload)) => Incoming::Pong(payload),
        Ok(Frame::Binary(_)) => Incoming::Close(
            CloseCode::Unsupported,
            "binary frames are not supported; send JSON text".into(),
        ),
        Ok(Frame::Continuation(_)) => Incoming::Close(
            CloseCode::Unsupported,
            "fragmented messages are not supported".into(),
        ),
        Ok(Frame::Close(_)) => Incoming::Close(CloseCode::Normal, "closed by the client".into()),
        Err(ProtocolError::Overflow) => {
            Incoming::Close(CloseCode::Size, "frame larger than the limit".into())
        }
        Err(ProtocolError::Io(err)) => Incoming::Failed(format!("the connection failed: {err}")),
        Err(err) => Incoming::Close(CloseCode::Protocol, err.to_string()),
    }
}

/// A text frame: a [`ClientMessage`], or a policy violation.
fn text_message(text: &[u8]) -> Incoming {
    let message = match serde_json::from_slice::<ClientMessage>(text) {
        Ok(message) => message,
        Err(err) => {
            return Incoming::Close(
                CloseCode::Policy,
                format!("not a known client message: {err}"),
            )
        }
    };
    match message {
        ClientMessage::Filter { topic } => {
            match topic.as_deref().map(TopicPattern::parse).transpose() {
                Ok(pattern) => Incoming::Filter(pattern),
                Err(err) => Incoming::Close(CloseCode::Policy, err.to_string()),
            }
        }
    }
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
pub(super) fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use actix_http::ws::Item;

    use super::*;

    fn code(item: Result<Frame, ProtocolError>) -> u16 {
        match incoming(item) {
            Incoming::Close(code, _) => code.into(),
            other => panic!("expected a close, got {other:?}"),
        }
    }

    fn text(s: &'static str) -> Result<Frame, ProtocolError> {
        Ok(Frame::Text(Bytes::from_static(s.as_bytes())))
    }

    #[test]
    fn a_filter_message_sets_the_filter() {
        let Incoming::Filter(Some(pattern)) = incoming(text(r#"{"type":"filter","topic":"a.*"}"#))
        else {
            panic!("expected a filter");
        };
        assert!(pattern.matches("a.b") && !pattern.matches("b.a"));
        assert_eq!(
            incoming(text(r#"{"type":"filter","topic":null}"#)),
            Incoming::Filter(None)
        );
        assert_eq!(
            incoming(text(r#"{"type":"filter"}"#)),
            Incoming::Filter(None)
        );
    }

    #[test]
    fn each_violation_has_its_close_code() {
        assert_eq!(code(text("hello")), 1008);
        assert_eq!(code(text(r#"{"type":"subscribe_all"}"#)), 1008);
        assert_eq!(code(text(r#"{"type":"filter","topic":"orders*"}"#)), 1008);
        assert_eq!(code(Ok(Frame::Binary(Bytes::from_static(b"\x00")))), 1003);
        assert_eq!(
            code(Ok(Frame::Continuation(Item::FirstText(
                Bytes::from_static(b"{")
            )))),
            1003
        );
        assert_eq!(code(Err(ProtocolError::Overflow)), 1009);
        assert_eq!(code(Err(ProtocolError::UnmaskedFrame)), 1002);
        assert_eq!(code(Ok(Frame::Close(None))), 1000);
        assert!(matches!(
            incoming(Err(ProtocolError::Io(std::io::Error::other("reset")))),
            Incoming::Failed(_)
        ));
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(100);
        let cut = truncate(long, MAX_CLOSE_REASON);
        assert!(cut.len() <= MAX_CLOSE_REASON);
    }
}
