//! How an Observer is bounded: its settings (`WS_*`), the size of the
//! channel to the socket and of its mailbox. Every figure here bounds memory
//! or time.

use std::time::Duration;

use actix_http::ws::Message;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::buffer::OnFull;
use crate::saturation::Saturation;

/// Frames the outgoing channel holds for the socket (besides the slot
/// reserved for the close frame): two frames, each with the ping that
/// follows it. Small on purpose: a full channel is how the Observer sees a
/// slow client, so events wait in the Observer's buffer, where the overload
/// policy and the freshness bound apply, not in the channel.
pub const OUTGOING_FRAMES: usize = 4;

/// Events that may wait in an Observer's mailbox (bounded by a
/// [`LiveBacklog`](crate::messages::LiveBacklog)): its buffer size, but at least this many, so that a worker
/// thread busy for a moment does not cost a fast client events.
pub const MIN_MAILBOX_EVENTS: usize = 4096;

/// Room in an Observer's mailbox beyond its events, in messages: for
/// `lagged` notices, which hold no events.
pub const MAILBOX_SPARE: usize = 16;

/// What an Observer hands to the HTTP layer for its socket.
#[derive(Debug)]
pub enum Outgoing {
    /// A message, for the layer's codec to encode.
    Message(Message),
    /// A text frame already encoded, header included: the same bytes go to
    /// every observer of a delivery (see [`crate::shared_frames`]).
    Frame(Bytes),
}

impl From<Message> for Outgoing {
    fn from(message: Message) -> Self {
        Outgoing::Message(message)
    }
}

/// The channel between an Observer and the HTTP layer that writes to the
/// socket, with room for [`OUTGOING_FRAMES`] frames and the close frame.
pub fn outgoing_channel() -> (mpsc::Sender<Outgoing>, mpsc::Receiver<Outgoing>) {
    mpsc::channel(OUTGOING_FRAMES + 1)
}

/// How an Observer treats its client. Every field bounds memory or time.
#[derive(Debug, Clone)]
pub struct ObserverSettings {
    /// Events buffered for the client at most (`WS_BUFFER`).
    pub buffer: usize,
    /// What to drop when the buffer is full (`WS_ON_FULL`).
    pub on_full: OnFull,
    /// Events written in one frame at most.
    pub max_events_per_frame: usize,
    /// How often a ping is sent.
    pub heartbeat: Duration,
    /// Closes with [`CLOSE_TIMEOUT`](super::CLOSE_TIMEOUT) when nothing (no pong, no frame) came
    /// from the client for this long.
    pub client_timeout: Duration,
    /// Closes with [`CLOSE_STALLED`](super::CLOSE_STALLED) when events wait and the client has not
    /// read a single frame for this long.
    pub stall_timeout: Duration,
    /// No event is written that would reach the client older than this,
    /// counted from when Sluice received it (`WS_MAX_LAG`); older ones are
    /// skipped and told as missed.
    pub max_lag: Duration,
    /// Bytes written and not yet acknowledged by the client's pongs, at most
    /// (`WS_WINDOW_BYTES`). The window shrinks (to 4 KiB at least) while the
    /// client takes longer than a quarter of `max_lag` to consume a frame,
    /// and grows back when it is quick; a frame holds at most a quarter of
    /// the window (or one event, if larger).
    pub window_bytes: usize,
    /// While the datastore path is behind ([`Saturation`]), at most one
    /// frame of events per this interval (`LIVE_YIELD_INTERVAL`); the rest
    /// waits in the buffer, where its policy drops and tells as ever. Zero:
    /// never yield.
    pub yield_interval: Duration,
    /// Whether the datastore path is behind.
    pub saturation: Saturation,
}

impl Default for ObserverSettings {
    fn default() -> Self {
        ObserverSettings {
            buffer: 1024,
            on_full: OnFull::DropOldest,
            max_events_per_frame: 256,
            heartbeat: Duration::from_secs(10),
            client_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            max_lag: Duration::from_secs(2),
            window_bytes: 64 * 1024,
            yield_interval: Duration::from_millis(250),
            saturation: Saturation::never(),
        }
    }
}

/// Events an Observer's mailbox holds at most: see [`MIN_MAILBOX_EVENTS`].
pub(super) fn mailbox_events(settings: &ObserverSettings) -> usize {
    settings.buffer.max(MIN_MAILBOX_EVENTS)
}
