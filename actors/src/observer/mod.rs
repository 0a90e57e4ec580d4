//! The Observer actor: one per WebSocket session, between the Observable and one browser.
//!
//! To keep this crate free of HTTP routing, the Observer does not own the
//! socket. It writes [`Message`]s into a small bounded channel whose other end
//! the HTTP layer encodes onto the connection, and it receives the client's
//! decoded frames as a stream. The channel is the Observer's view of the
//! client's speed: when it has no room, the socket is not draining.
//!
//! Events arriving from the Observable go into a bounded buffer
//! ([`ObserverSettings::buffer`]); when it is full, [`OnFull`] decides which
//! events are lost. The buffer and its drop rules are the `buffer` module,
//! pure and tested on its own. Whenever the client can take more, everything
//! buffered (up to [`ObserverSettings::max_events_per_frame`] events and a
//! quarter of the window in bytes) goes out as one frame
//! `{"type":"events","events":[…]}`, preceded by `{"type":"lagged","missed":N}`
//! when events were dropped since the last frame, here or upstream.
//!
//! # Freshness
//!
//! "The client can take more" means two things. The channel must have room
//! (the socket is draining), and the client must have *consumed* most of what
//! was written: every frame is followed by a ping carrying a sequence number,
//! and a pong for it proves the client read everything before it (the
//! `window` module). At most [`ObserverSettings::window_bytes`] may be
//! unacknowledged, whatever the kernels, proxies and client library between
//! could buffer. From the acknowledgements the Observer also knows how long a
//! frame takes to reach the client; an event that would be older than
//! [`ObserverSettings::max_lag`] (`WS_MAX_LAG`, counted from when Sluice
//! received it) by the time it got there is skipped and counted as missed,
//! so a slow client sees a fresh stream with told gaps, never an ever older
//! one. These pings are also the heartbeat: when nothing is in flight, one
//! is sent every [`ObserverSettings::heartbeat`].
//!
//! The signals are a channel permit awaited in a spawned future and the
//! client's pongs: no polling, no timers on the data path.
//!
//! # Close codes
//!
//! | code | when |
//! |---|---|
//! | 1000 normal | the client closed the session (its close is answered) |
//! | 1001 going away | the service is stopping, or the live stream is unavailable |
//! | 1002 protocol error | the client broke the WebSocket protocol (unmasked frame, bad opcode…) |
//! | 1003 unsupported data | a binary frame, or a fragmented message |
//! | 1008 policy violation | a text frame that is not a known [`ClientMessage`], or an invalid topic |
//! | 1009 message too big | a frame larger than the configured limit |
//! | 4000 [`CLOSE_STALLED`] | the client read nothing for [`ObserverSettings::stall_timeout`] while events waited |
//! | 4001 [`CLOSE_TIMEOUT`] | nothing (not even a pong) came from the client for [`ObserverSettings::client_timeout`] |
//!
//! The two timeouts get codes of their own, from the private-use range
//! (4000–4999), rather than 1008 or 1013: a dashboard can tell "you were too
//! slow, reconnect" from "you sent something wrong" without parsing the reason.
//! The close frame always has room: one slot of the channel is reserved for it
//! when the Observer is created, so even a client that stopped reading gets it
//! queued (it will read it if it ever resumes).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason, Frame, Message, ProtocolError};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::mpsc::{self, error::TrySendError, OwnedPermit};
// Tokio's clock, so that tests can pause and advance time.
use tokio::time::Instant;

use crate::history::Since;
use crate::internal_events::live::{
    DropStage, LiveEventsDropped, ObserverConnected, ObserverDisconnected, ObserverLagging,
};
use crate::live_feed::replay::Replays;
use crate::messages::LiveBacklog;
use crate::observable::{
    Deliver, Observable, ObserverId, Resumed, Subscribe, SubscribeFrom, Unsubscribe,
};
use crate::topic::TopicPattern;

mod buffer;
mod replay;
mod window;

pub use buffer::OnFull;
use buffer::Pending;
use window::AckWindow;

/// Close code for a client that made no progress reading for the stall timeout.
pub const CLOSE_STALLED: u16 = 4000;

/// Close code for a client from which nothing arrived for the client timeout.
pub const CLOSE_TIMEOUT: u16 = 4001;

/// Frames the outgoing channel holds for the socket (besides the slot
/// reserved for the close frame): two frames, each with the ping that
/// follows it. Small on purpose: a full channel is how the Observer sees a
/// slow client, so events wait in the Observer's buffer, where the overload
/// policy and the freshness bound apply, not in the channel.
pub const OUTGOING_FRAMES: usize = 4;

/// Events that may wait in an Observer's mailbox (bounded by a
/// [`LiveBacklog`]): its buffer size, but at least this many, so that a worker
/// thread busy for a moment does not cost a fast client events.
pub const MIN_MAILBOX_EVENTS: usize = 4096;

/// Room in an Observer's mailbox beyond its events, in messages: for
/// `lagged` notices, which hold no events.
pub const MAILBOX_SPARE: usize = 16;

/// The longest close reason, in bytes: a control frame carries at most 125
/// bytes, two of which are the code.
const MAX_CLOSE_REASON: usize = 123;

/// The channel between an Observer and the HTTP layer that writes to the
/// socket, with room for [`OUTGOING_FRAMES`] frames and the close frame.
pub fn outgoing_channel() -> (mpsc::Sender<Message>, mpsc::Receiver<Message>) {
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
    /// Closes with [`CLOSE_TIMEOUT`] when nothing (no pong, no frame) came
    /// from the client for this long.
    pub client_timeout: Duration,
    /// Closes with [`CLOSE_STALLED`] when events wait and the client has not
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
        }
    }
}

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

/// A place in the count of connected observers, held by one Observer and
/// given back when it stops (or when it is dropped without starting).
#[derive(Debug)]
pub struct SessionSlot {
    /// The shared count this slot is part of.
    count: Arc<AtomicUsize>,
}

impl SessionSlot {
    /// Takes a place if fewer than `max` are taken.
    pub fn try_acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<SessionSlot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SessionSlot {
                count: count.clone(),
            })
    }

    /// How many places are taken now.
    pub fn connected(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One WebSocket session's view of the live stream. See the module docs.
#[derive(Debug)]
pub struct Observer {
    /// This session's id at the Observable.
    id: ObserverId,
    /// Buffer size, policy, frame cap and timeouts.
    settings: ObserverSettings,
    /// Where to subscribe, resubscribe (filter changes) and unsubscribe.
    observable: Addr<Observable>,
    /// The current topic filter; `None` means every event.
    pattern: Option<TopicPattern>,
    /// Bounds, in events, the deliveries waiting in this Observer's mailbox.
    backlog: LiveBacklog,
    /// Frames for the socket. Its fullness is the client's backpressure.
    outgoing: mpsc::Sender<Message>,
    /// The slot reserved for the close frame, taken when the Observer is
    /// created so that a close can be queued even when the client stalls.
    close_permit: Option<OwnedPermit<Message>>,
    /// Events not yet written and drops not yet reported.
    pending: Pending,
    /// What was written and not yet acknowledged by the client's pongs.
    window: AckWindow,
    /// A spawned future is waiting for room in `outgoing`.
    waiting_for_room: bool,
    /// Fires [`CLOSE_STALLED`] if the wait for room or for an
    /// acknowledgement lasts too long while events wait.
    stall_timer: Option<SpawnHandle>,
    /// A `Subscribe` is on its way to the Observable.
    subscribing: bool,
    /// The filter changed while a `Subscribe` was on its way: send another.
    resubscribe: bool,
    /// When something last arrived from the client (for the client timeout).
    last_heard: Instant,
    /// When the session started.
    started_at: Instant,
    /// Whether the last delivery dropped events (to log lagging once per episode).
    lagging: bool,
    /// Why the session ended, once it is ending; `Some` also means "closing",
    /// after which client frames and events are ignored.
    ended: Option<String>,
    /// This session's place in the count of connected observers.
    slot: Option<SessionSlot>,
    /// Where the client's stream starts (`?since=` / `?last=`), taken by the
    /// first `Subscribe`; `None`: from now on.
    since: Option<Since>,
    /// Reads the stream for a resume older than the ring (`LIVE_FEED=stream`).
    replays: Option<Arc<Replays>>,
    /// A resume being read from the stream.
    replaying: Option<replay::Replaying>,
}

/// See [`MIN_MAILBOX_EVENTS`].
fn mailbox_events(settings: &ObserverSettings) -> usize {
    settings.buffer.max(MIN_MAILBOX_EVENTS)
}

impl Observer {
    /// An Observer for one client, writing to `outgoing` (see
    /// [`outgoing_channel`]) and subscribing to `observable` with `pattern`.
    pub fn new(
        settings: ObserverSettings,
        observable: Addr<Observable>,
        pattern: Option<TopicPattern>,
        outgoing: mpsc::Sender<Message>,
    ) -> Observer {
        let close_permit = outgoing.clone().try_reserve_owned().ok();
        let now = Instant::now();
        Observer {
            id: ObserverId::next(),
            pending: Pending::new(settings.buffer),
            window: AckWindow::new(settings.window_bytes, settings.max_lag / 4),
            backlog: LiveBacklog::new(mailbox_events(&settings)),
            settings,
            observable,
            pattern,
            outgoing,
            close_permit,
            waiting_for_room: false,
            stall_timer: None,
            subscribing: false,
            resubscribe: false,
            last_heard: now,
            started_at: now,
            lagging: false,
            ended: None,
            slot: None,
            since: None,
            replays: None,
            replaying: None,
        }
    }

    /// Starts the client's stream at `since` (a resume or the last few
    /// events) instead of now.
    pub fn with_since(mut self, since: Option<Since>) -> Observer {
        self.since = since;
        self
    }

    /// Reads a resume older than the ring from the stream with `replays`.
    pub fn with_replays(mut self, replays: Option<Arc<Replays>>) -> Observer {
        self.replays = replays;
        self
    }

    /// Holds `slot` for the life of the session (released when it stops).
    pub fn with_slot(mut self, slot: SessionSlot) -> Observer {
        self.slot = Some(slot);
        self
    }

    /// This session's id.
    pub fn id(&self) -> ObserverId {
        self.id
    }

    /// Starts the Observer with a bounded mailbox (see [`MAILBOX_SPARE`]),
    /// reading the client's decoded frames from `incoming`.
    pub fn start_with<S>(self, incoming: S) -> Addr<Observer>
    where
        S: Stream<Item = Result<Frame, ProtocolError>> + 'static,
    {
        Observer::create(move |ctx| {
            ctx.set_mailbox_capacity(mailbox_events(&self.settings) + MAILBOX_SPARE);
            ctx.add_stream(incoming);
            self
        })
    }

    /// Sends the current filter to the Observable, one `Subscribe` at a time:
    /// filter changes that arrive meanwhile are coalesced into the next one,
    /// so a client flooding filter messages costs one message in flight.
    fn subscribe(&mut self, ctx: &mut Context<Self>) {
        if self.subscribing {
            self.resubscribe = true;
            return;
        }
        self.subscribing = true;
        let subscribe = Subscribe {
            id: self.id,
            addr: ctx.address().recipient(),
            pattern: self.pattern.clone(),
            backlog: self.backlog.clone(),
        };
        let since = self.since.take();
        let after = match since {
            Some(Since::After(position)) => Some(position),
            _ => None,
        };
        let request: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Resumed, MailboxError>>>,
        > = match since {
            None => Box::pin(futures_util::FutureExt::map(
                self.observable.send(subscribe),
                |r| r.map(|()| Resumed::Subscribed),
            )),
            Some(since) => Box::pin(self.observable.send(SubscribeFrom {
                subscribe,
                since,
                max_replay: self.settings.buffer,
            })),
        };
        ctx.spawn(
            fut::wrap_future(request).map(move |result, act: &mut Observer, ctx| {
                act.subscribing = false;
                match result {
                    Err(_) => act.close(
                        ctx,
                        CloseCode::Away,
                        "the live stream is unavailable".into(),
                    ),
                    Ok(resumed) => {
                        act.resumed(resumed, after, ctx);
                        if std::mem::take(&mut act.resubscribe) {
                            act.subscribe(ctx);
                        }
                    }
                }
            }),
        );
    }

    /// Writes frames, each followed by its ping, while the channel has room
    /// and the window is not full, skipping events that would reach the
    /// client too old. When blocked with events waiting, arms the stall
    /// timer; when the channel is full, waits for room in a spawned future.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.waiting_for_room || self.ended.is_some() {
            return;
        }
        loop {
            if !self.window.has_room() {
                // The next pong calls flush again.
                if self.pending.has_frame() {
                    self.arm_stall_timer(ctx);
                }
                return;
            }
            self.expire();
            if !self.pending.has_frame() {
                self.disarm_stall_timer(ctx);
                // Everything written: a resume from the stream goes on.
                self.take_replay_step(ctx);
                return;
            }
            let blocked = match self.outgoing.try_reserve_many(2) {
                Ok(mut permits) => {
                    let frame = self.pending.next_frame(
                        self.settings.max_events_per_frame,
                        self.window.frame_bytes(),
                    );
                    if let (Some(frame), Some(first), Some(second)) =
                        (frame, permits.next(), permits.next())
                    {
                        let bytes = match &frame {
                            Message::Text(text) => text.len(),
                            _ => 0,
                        };
                        first.send(frame);
                        second.send(Message::Ping(self.window.sent(bytes, Instant::now())));
                    }
                    continue;
                }
                Err(err) => err,
            };
            match blocked {
                TrySendError::Full(()) => self.wait_for_room(ctx),
                TrySendError::Closed(()) => self.gone(ctx),
            }
            return;
        }
    }

    /// Skips the buffered events that would be older than the freshness
    /// bound when the client gets them: their age now plus the time a frame
    /// is expected to take to reach it.
    fn expire(&mut self) {
        let transit = self.window.expected_transit(Instant::now());
        let max_age = self.settings.max_lag.saturating_sub(transit);
        let skipped = self.pending.expire(SystemTime::now(), max_age);
        if skipped > 0 {
            LiveEventsDropped {
                stage: DropStage::Stale,
                events: skipped,
            }
            .emit();
            if !self.lagging {
                self.lagging = true;
                ObserverLagging {
                    observer: self.id.0,
                    stage: DropStage::Stale,
                }
                .emit();
            }
        }
    }

    /// Closes the session with [`CLOSE_STALLED`] unless the client makes
    /// progress (room in the channel, a pong) within the stall timeout.
    fn arm_stall_timer(&mut self, ctx: &mut Context<Self>) {
        if self.stall_timer.is_some() {
            return;
        }
        let stall_timeout = self.settings.stall_timeout;
        self.stall_timer = Some(ctx.run_later(stall_timeout, move |act, ctx| {
            act.stall_timer = None;
            act.close(
                ctx,
                CloseCode::Other(CLOSE_STALLED),
                format!(
                    "stalled: the client read nothing for {}s",
                    stall_timeout.as_secs()
                ),
            );
        }));
    }

    /// The client made progress: no stall.
    fn disarm_stall_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.stall_timer.take() {
            ctx.cancel_future(timer);
        }
    }

    /// Waits for the socket to drain until a frame and its ping fit: the
    /// permits are the signal, awaited in a spawned future so that the
    /// Observer keeps buffering (and dropping) meanwhile.
    fn wait_for_room(&mut self, ctx: &mut Context<Self>) {
        self.waiting_for_room = true;
        self.arm_stall_timer(ctx);
        let outgoing = self.outgoing.clone();
        let room = async move { outgoing.reserve_many(2).await.map(drop) };
        ctx.spawn(
            fut::wrap_future(room).map(|result, act: &mut Observer, ctx| {
                act.waiting_for_room = false;
                if act.ended.is_some() {
                    return;
                }
                match result {
                    Ok(()) => {
                        act.disarm_stall_timer(ctx);
                        act.flush(ctx);
                    }
                    Err(_) => act.gone(ctx),
                }
            }),
        );
    }

    /// Ends the session with a close frame (queued in the reserved slot).
    fn close(&mut self, ctx: &mut Context<Self>, code: CloseCode, reason: String) {
        if self.ended.is_some() {
            return;
        }
        let reason = truncate(reason, MAX_CLOSE_REASON);
        self.ended = Some(format!("closed with {}: {reason}", u16::from(code)));
        if let Some(permit) = self.close_permit.take() {
            permit.send(Message::Close(Some(CloseReason {
                code,
                description: Some(reason),
            })));
        }
        ctx.stop();
    }

    /// Ends the session because the client is gone (nobody to tell).
    fn gone(&mut self, ctx: &mut Context<Self>) {
        if self.ended.is_none() {
            self.ended = Some("the client went away".into());
        }
        ctx.stop();
    }

    /// Handles a text frame from the client.
    fn on_text(&mut self, text: &[u8], ctx: &mut Context<Self>) {
        let message = match serde_json::from_slice::<ClientMessage>(text) {
            Ok(message) => message,
            Err(err) => {
                self.close(
                    ctx,
                    CloseCode::Policy,
                    format!("not a known client message: {err}"),
                );
                return;
            }
        };
        match message {
            ClientMessage::Filter { topic } => {
                let pattern = match topic.as_deref().map(TopicPattern::parse).transpose() {
                    Ok(pattern) => pattern,
                    Err(err) => {
                        self.close(ctx, CloseCode::Policy, err.to_string());
                        return;
                    }
                };
                if pattern != self.pattern {
                    self.pattern = pattern;
                    // During a replay from the stream, the new filter applies
                    // from where the ring takes over.
                    if self.replaying.is_none() {
                        self.subscribe(ctx);
                    }
                }
            }
        }
    }
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Actor for Observer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ObserverConnected {
            observer: self.id.0,
            connected: self.slot.as_ref().map_or(0, SessionSlot::connected),
        }
        .emit();
        self.subscribe(ctx);
        // A zero interval would spin; a tenth of a second is already plenty.
        let heartbeat = self.settings.heartbeat.max(Duration::from_millis(100));
        ctx.run_interval(heartbeat, |act, ctx| {
            if act.last_heard.elapsed() >= act.settings.client_timeout {
                let secs = act.settings.client_timeout.as_secs();
                act.close(
                    ctx,
                    CloseCode::Other(CLOSE_TIMEOUT),
                    format!("timeout: nothing received from the client for {secs}s"),
                );
                return;
            }
            // Pings already follow every frame; when none is in flight, one
            // goes alone, so that a quiet stream still hears from its client.
            // A full channel means the client is not reading: the ping would
            // not reach it anyway, and the client timeout will tell.
            if !act.window.is_idle() {
                return;
            }
            let closed = match act.outgoing.try_reserve() {
                Ok(permit) => {
                    permit.send(Message::Ping(act.window.sent(0, Instant::now())));
                    false
                }
                Err(err) => matches!(err, TrySendError::Closed(())),
            };
            if closed {
                act.gone(ctx);
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // The service is stopping (nobody asked this session to end): say so.
        if let Some(permit) = self.close_permit.take() {
            if self.ended.is_none() {
                permit.send(Message::Close(Some(CloseReason {
                    code: CloseCode::Away,
                    description: Some("the service is stopping".into()),
                })));
                self.ended = Some("the service is stopping".into());
            }
        }
        // A rare control message, sent once per session from a stopping actor
        // that cannot wait. If it overtakes a `Subscribe` still in flight, the
        // Observable forgets this observer at its next delivery anyway, since
        // this mailbox is then closed.
        self.observable.do_send(Unsubscribe { id: self.id });
        let connected = self.slot.take().map_or(0, |slot| {
            let count = slot.count.clone();
            drop(slot);
            count.load(Ordering::Acquire)
        });
        ObserverDisconnected {
            observer: self.id.0,
            connected,
            reason: self.ended.take().unwrap_or_default(),
            dropped: self.pending.total_dropped,
            lasted: self.started_at.elapsed(),
        }
        .emit();
    }
}

impl Handler<Deliver> for Observer {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        if self.ended.is_some() {
            return;
        }
        if msg.missed > 0 {
            self.pending.missed(msg.missed);
        }
        let dropped = self.pending.push(&msg.events, self.settings.on_full);
        if dropped > 0 {
            LiveEventsDropped {
                stage: DropStage::Observer,
                events: dropped,
            }
            .emit();
        }
        let lagging = dropped > 0 || msg.missed > 0;
        if lagging && !self.lagging {
            ObserverLagging {
                observer: self.id.0,
                stage: if dropped > 0 {
                    DropStage::Observer
                } else {
                    DropStage::Observable
                },
            }
            .emit();
        }
        self.lagging = lagging;
        self.flush(ctx);
    }
}

impl StreamHandler<Result<Frame, ProtocolError>> for Observer {
    fn handle(&mut self, item: Result<Frame, ProtocolError>, ctx: &mut Self::Context) {
        if self.ended.is_some() {
            return;
        }
        self.last_heard = Instant::now();
        match item {
            Ok(Frame::Text(text)) => self.on_text(&text, ctx),
            Ok(Frame::Ping(payload)) => {
                // Answered when there is room; a client that does not read
                // does not need its pongs.
                if let Err(TrySendError::Closed(_)) = self.outgoing.try_send(Message::Pong(payload))
                {
                    self.gone(ctx);
                }
            }
            Ok(Frame::Pong(payload)) => {
                // The client consumed everything before that ping: room in
                // the window, and progress.
                if self.window.acked(&payload, Instant::now()) {
                    self.disarm_stall_timer(ctx);
                    self.flush(ctx);
                }
            }
            Ok(Frame::Binary(_)) => self.close(
                ctx,
                CloseCode::Unsupported,
                "binary frames are not supported; send JSON text".into(),
            ),
            Ok(Frame::Continuation(_)) => self.close(
                ctx,
                CloseCode::Unsupported,
                "fragmented messages are not supported".into(),
            ),
            Ok(Frame::Close(_)) => {
                self.close(ctx, CloseCode::Normal, "closed by the client".into())
            }
            Err(ProtocolError::Overflow) => {
                self.close(ctx, CloseCode::Size, "frame larger than the limit".into())
            }
            Err(ProtocolError::Io(err)) => {
                self.ended = Some(format!("the connection failed: {err}"));
                ctx.stop();
            }
            Err(err) => self.close(ctx, CloseCode::Protocol, err.to_string()),
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if self.ended.is_none() {
            self.ended = Some("the client closed the connection".into());
        }
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::buffer::tests::{json, lagged, numbers};
    use actix_http::ws::Item;
    use bytes::Bytes;

    use super::*;
    use crate::live_event::tests::event;
    use crate::live_event::LiveEvent;
    use crate::messages::Publish;
    use crate::observable::CountObservers;

    /// The client's side of a session under test.
    struct Client {
        /// Frames the Observer wrote for the socket.
        frames: mpsc::Receiver<Message>,
        /// Frames "from the browser".
        send: mpsc::UnboundedSender<Result<Frame, ProtocolError>>,
        /// The Observer.
        addr: Addr<Observer>,
        /// The Observable it subscribed to.
        observable: Addr<Observable>,
    }

    /// Settings whose timers never fire during a test unless it says so.
    fn quiet(buffer: usize, on_full: OnFull) -> ObserverSettings {
        ObserverSettings {
            buffer,
            on_full,
            max_events_per_frame: 256,
            heartbeat: Duration::from_secs(3600),
            client_timeout: Duration::from_secs(7200),
            stall_timeout: Duration::from_secs(7200),
            // The test events are from 2023: no freshness bound unless asked.
            max_lag: Duration::MAX,
            window_bytes: 1 << 20,
        }
    }

    /// Starts an Observer; when `stalled`, the two data slots of its channel
    /// are filled first (with `Nop`s the test reads later), as if the socket
    /// had stopped draining. The returned sender keeps the channel open.
    fn connect(
        settings: ObserverSettings,
        pattern: Option<&str>,
        stalled: bool,
    ) -> (Client, Option<mpsc::Sender<Message>>) {
        let observable = Observable::start_bounded(64);
        let (tx, frames) = outgoing_channel();
        let (send, incoming) = mpsc::unbounded_channel();
        let incoming = futures_util::stream::unfold(incoming, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let pattern = pattern.map(|p| TopicPattern::parse(p).expect("valid pattern"));
        let observer = Observer::new(settings, observable.clone(), pattern, tx.clone());
        let filler = if stalled {
            for _ in 0..OUTGOING_FRAMES {
                tx.try_send(Message::Nop).expect("room for filler");
            }
            Some(tx)
        } else {
            drop(tx);
            None
        };
        let addr = observer.start_with(incoming);
        let client = Client {
            frames,
            send,
            addr,
            observable,
        };
        (client, filler)
    }

    fn live(keys_and_numbers: impl IntoIterator<Item = u64>) -> Arc<[Arc<LiveEvent>]> {
        keys_and_numbers
            .into_iter()
            .map(|n| Arc::new(LiveEvent::from_event(&event("k", n))))
            .collect()
    }

    async fn deliver(client: &Client, numbers: impl IntoIterator<Item = u64>, missed: u64) {
        client
            .addr
            .send(Deliver {
                permit: None,
                events: live(numbers),
                missed,
            })
            .await
            .expect("observer alive");
    }

    /// The next message the Observer wrote, pings included.
    async fn next_raw(client: &mut Client) -> Message {
        client.frames.recv().await.expect("a frame")
    }

    /// The next message the Observer wrote that is not a ping; pings are
    /// answered, as a client that reads does.
    async fn next(client: &mut Client) -> Message {
        loop {
            match next_raw(client).await {
                Message::Ping(payload) => client.send.send(Ok(Frame::Pong(payload))).expect("open"),
                other => return other,
            }
        }
    }

    fn close_code(message: Message) -> u16 {
        match message {
            Message::Close(Some(reason)) => reason.code.into(),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    async fn read_fillers(client: &mut Client) {
        for _ in 0..OUTGOING_FRAMES {
            assert!(matches!(next(client).await, Message::Nop));
        }
    }

    /// After a close, the channel ends (the Observer is gone) and the
    /// Observable no longer knows the observer.
    async fn assert_ended(client: &mut Client) {
        assert!(client.frames.recv().await.is_none(), "channel should end");
        let count = client.observable.send(CountObservers).await.expect("alive");
        assert_eq!(count, 0);
    }

    #[actix::test]
    async fn a_fast_client_gets_every_event_in_order() {
        let (mut client, _) = connect(quiet(8, OnFull::DropOldest), None, false);
        let mut seen = Vec::new();
        for n in 0..50 {
            deliver(&client, [n], 0).await;
            seen.extend(numbers(next(&mut client).await));
        }
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
    }

    #[actix::test]
    async fn a_stalled_client_keeps_the_newest_k_and_is_told_what_it_missed() {
        let (mut client, _filler) = connect(quiet(4, OnFull::DropOldest), None, true);
        for n in 1..=7 {
            deliver(&client, [n], 0).await;
        }
        read_fillers(&mut client).await;
        assert_eq!(lagged(next(&mut client).await), 3);
        assert_eq!(numbers(next(&mut client).await), [4, 5, 6, 7]);
        // Caught up: the next event goes out alone, with no lagged notice.
        deliver(&client, [8], 0).await;
        assert_eq!(numbers(next(&mut client).await), [8]);
    }

    #[actix::test]
    async fn drop_newest_keeps_the_oldest_k() {
        let (mut client, _filler) = connect(quiet(4, OnFull::DropNewest), None, true);
        deliver(&client, 1..=3, 0).await;
        deliver(&client, 4..=7, 0).await;
        read_fillers(&mut client).await;
        assert_eq!(lagged(next(&mut client).await), 3);
        assert_eq!(numbers(next(&mut client).await), [1, 2, 3, 4]);
    }

    #[actix::test]
    async fn upstream_misses_are_reported_with_local_drops() {
        let (mut client, _filler) = connect(quiet(2, OnFull::DropOldest), None, true);
        deliver(&client, [1], 0).await;
        deliver(&client, [7, 8], 5).await;
        read_fillers(&mut client).await;
        // Five missed at the Observable, one dropped here (event 1).
        assert_eq!(lagged(next(&mut client).await), 6);
        assert_eq!(numbers(next(&mut client).await), [7, 8]);
    }

    #[actix::test]
    async fn frames_are_batched_up_to_the_cap_in_order() {
        let mut settings = quiet(100, OnFull::DropOldest);
        settings.max_events_per_frame = 4;
        let (mut client, _filler) = connect(settings, None, true);
        for n in 1..=10 {
            deliver(&client, [n], 0).await;
        }
        read_fillers(&mut client).await;
        assert_eq!(numbers(next(&mut client).await), [1, 2, 3, 4]);
        assert_eq!(numbers(next(&mut client).await), [5, 6, 7, 8]);
        assert_eq!(numbers(next(&mut client).await), [9, 10]);
    }

    #[actix::test]
    async fn the_observable_and_observer_together_count_every_event() {
        // Observable → Observer → stalled client, end to end: whatever the
        // client receives plus what it is told it missed is everything.
        let (mut client, filler) = connect(quiet(3, OnFull::DropOldest), None, true);
        // A ping answered proves the Observer subscribed (its Subscribe was
        // queued before the pong).
        client
            .send
            .send(Ok(Frame::Ping(Bytes::new())))
            .expect("open");
        drop(filler);
        read_fillers(&mut client).await;
        assert!(matches!(next(&mut client).await, Message::Pong(_)));
        for n in 0..20 {
            let events: Vec<_> = (0..5).map(|i| event("k", n * 5 + i)).collect();
            client
                .observable
                .send(Publish::of(events))
                .await
                .expect("alive");
        }
        let (mut received, mut missed) = (0, 0);
        while received + missed < 100 {
            let v = json(next(&mut client).await);
            match v["type"].as_str() {
                Some("lagged") => missed += v["missed"].as_u64().expect("missed"),
                Some("events") => received += v["events"].as_array().expect("array").len() as u64,
                other => panic!("unexpected frame type {other:?}"),
            }
        }
        assert_eq!(received + missed, 100);
    }

    #[actix::test]
    async fn filters_select_events_and_can_be_changed_by_the_client() {
        let (mut client, _) = connect(quiet(16, OnFull::DropOldest), Some("a.*"), false);
        let filter = r#"{"type":"filter","topic":"b.#"}"#;
        client
            .send
            .send(Ok(Frame::Ping(Bytes::new())))
            .expect("open");
        assert!(matches!(next(&mut client).await, Message::Pong(_)));
        let publish = |keys: &[&str]| Publish {
            permit: None,
            through: None,
            events: keys
                .iter()
                .enumerate()
                .map(|(i, k)| event(k, i as u64))
                .collect::<Vec<_>>()
                .into(),
        };
        client
            .observable
            .send(publish(&["a.x", "b.x", "a.x.y"]))
            .await
            .expect("alive");
        assert_eq!(numbers(next(&mut client).await), [0]);

        client
            .send
            .send(Ok(Frame::Text(Bytes::from_static(filter.as_bytes()))))
            .expect("open");
        client
            .send
            .send(Ok(Frame::Ping(Bytes::new())))
            .expect("open");
        assert!(matches!(next(&mut client).await, Message::Pong(_)));
        client
            .observable
            .send(publish(&["a.x", "b.x", "b", "c"]))
            .await
            .expect("alive");
        assert_eq!(numbers(next(&mut client).await), [1, 2]);
    }

    async fn closes_with(frame: Result<Frame, ProtocolError>, code: u16) {
        let (mut client, _) = connect(quiet(16, OnFull::DropOldest), None, false);
        client.send.send(frame).expect("open");
        assert_eq!(close_code(next(&mut client).await), code);
        assert_ended(&mut client).await;
    }

    #[actix::test]
    async fn malformed_text_closes_with_policy_violation() {
        closes_with(Ok(Frame::Text(Bytes::from_static(b"hello"))), 1008).await;
        closes_with(Ok(Frame::Text(Bytes::from_static(b"\xff\xfe"))), 1008).await;
    }

    #[actix::test]
    async fn unknown_messages_close_with_policy_violation() {
        closes_with(
            Ok(Frame::Text(Bytes::from_static(
                br#"{"type":"subscribe_all"}"#,
            ))),
            1008,
        )
        .await;
        closes_with(
            Ok(Frame::Text(Bytes::from_static(br#"{"topic":"a"}"#))),
            1008,
        )
        .await;
    }

    #[actix::test]
    async fn an_invalid_topic_closes_with_policy_violation() {
        closes_with(
            Ok(Frame::Text(Bytes::from_static(
                br#"{"type":"filter","topic":"orders*"}"#,
            ))),
            1008,
        )
        .await;
    }

    #[actix::test]
    async fn binary_and_fragmented_frames_close_with_unsupported_data() {
        closes_with(Ok(Frame::Binary(Bytes::from_static(b"\x00\x01"))), 1003).await;
        closes_with(
            Ok(Frame::Continuation(Item::FirstText(Bytes::from_static(
                b"{",
            )))),
            1003,
        )
        .await;
    }

    #[actix::test]
    async fn oversized_frames_close_with_message_too_big() {
        closes_with(Err(ProtocolError::Overflow), 1009).await;
    }

    #[actix::test]
    async fn protocol_errors_close_with_protocol_error() {
        closes_with(Err(ProtocolError::UnmaskedFrame), 1002).await;
    }

    #[actix::test]
    async fn a_client_close_is_answered_and_ends_the_session() {
        closes_with(Ok(Frame::Close(Some(CloseCode::Normal.into()))), 1000).await;
    }

    #[actix::test]
    async fn the_session_ends_when_the_client_goes_away() {
        let (mut client, _) = connect(quiet(16, OnFull::DropOldest), None, false);
        // Dropping the only sender ends the incoming stream, as a closed
        // connection ends the decoded payload.
        drop(std::mem::replace(
            &mut client.send,
            mpsc::unbounded_channel().0,
        ));
        assert_ended(&mut client).await;
    }

    #[actix::test]
    async fn a_stalled_client_is_closed_after_the_stall_timeout() {
        tokio::time::pause();
        let mut settings = quiet(4, OnFull::DropOldest);
        settings.stall_timeout = Duration::from_secs(5);
        let (mut client, filler) = connect(settings, None, true);
        deliver(&client, [1], 0).await;
        drop(filler);
        let started = Instant::now();
        // Nothing is read until after the timeout. Time is paused: this sleep
        // takes no real time, and the runtime fires every timer due before it
        // (the Observer's stall timer at 5 s) before the test resumes.
        tokio::time::sleep(Duration::from_secs(6)).await;
        read_fillers(&mut client).await;
        assert_eq!(close_code(next(&mut client).await), CLOSE_STALLED);
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert_ended(&mut client).await;
    }

    #[actix::test]
    async fn a_silent_client_is_pinged_then_closed_after_the_client_timeout() {
        tokio::time::pause();
        let mut settings = quiet(4, OnFull::DropOldest);
        settings.heartbeat = Duration::from_secs(1);
        settings.client_timeout = Duration::from_secs(3);
        let (mut client, _) = connect(settings, None, false);
        let mut pings = 0;
        let code = loop {
            match next_raw(&mut client).await {
                Message::Ping(_) => pings += 1,
                other => break close_code(other),
            }
        };
        assert_eq!(code, CLOSE_TIMEOUT);
        assert!((1..=3).contains(&pings), "{pings} pings");
        assert_ended(&mut client).await;
    }

    #[actix::test]
    async fn a_client_answering_pings_stays_connected() {
        tokio::time::pause();
        let mut settings = quiet(4, OnFull::DropOldest);
        settings.heartbeat = Duration::from_secs(1);
        settings.client_timeout = Duration::from_secs(3);
        let (mut client, _) = connect(settings, None, false);
        for _ in 0..10 {
            let Message::Ping(payload) = next_raw(&mut client).await else {
                panic!("expected a ping");
            };
            client.send.send(Ok(Frame::Pong(payload))).expect("open");
        }
    }

    /// Events of `size` bytes of JSON each, numbered, received `ago` before now.
    fn sized(numbers: std::ops::Range<u64>, size: usize, ago: Duration) -> Arc<[Arc<LiveEvent>]> {
        let at = SystemTime::now() - ago;
        numbers
            .map(|n| {
                let head = format!(r#"{{"payload":{{"n":{n}}},"pad":""#);
                let pad = "x".repeat(size.saturating_sub(head.len() + 2));
                Arc::new(LiveEvent::from_json(format!("{head}{pad}\"}}")).received(at))
            })
            .collect()
    }

    #[actix::test]
    async fn a_client_that_does_not_acknowledge_is_sent_one_window_at_most() {
        tokio::time::pause();
        let mut settings = quiet(1000, OnFull::DropOldest);
        settings.window_bytes = 10_000;
        let (mut client, _) = connect(settings, None, false);
        client
            .addr
            .send(Deliver {
                permit: None,
                events: sized(0..100, 1000, Duration::ZERO),
                missed: 0,
            })
            .await
            .expect("observer alive");
        // Read without answering pings: frames of two events (a frame holds
        // a quarter of the window) until 10 000 bytes are unacknowledged,
        // then nothing more comes.
        let (mut bytes, mut frames, mut pings) = (0, 0, Vec::new());
        while let Ok(message) =
            tokio::time::timeout(Duration::from_secs(1), next_raw(&mut client)).await
        {
            match message {
                Message::Text(text) => {
                    bytes += text.len();
                    frames += 1;
                }
                Message::Ping(payload) => pings.push(payload),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            (10_000..10_000 + 2_500).contains(&bytes),
            "{bytes} bytes written without acknowledgement"
        );
        assert_eq!(pings.len(), frames, "a ping after each frame");
        // The pong for the second ping opens room for two more frames.
        client
            .send
            .send(Ok(Frame::Pong(pings[1].clone())))
            .expect("open");
        let mut more = 0;
        while let Ok(message) =
            tokio::time::timeout(Duration::from_secs(1), next_raw(&mut client)).await
        {
            if let Message::Text(text) = message {
                more += text.len();
            }
        }
        // The first two frames were about 4 000 bytes: as much goes again,
        // give or take a frame.
        assert!((2_000..6_600).contains(&more), "{more} more bytes");
    }

    #[actix::test]
    async fn a_client_that_reads_but_never_acknowledges_is_closed_as_stalled() {
        tokio::time::pause();
        let mut settings = quiet(1000, OnFull::DropOldest);
        settings.window_bytes = 4096;
        settings.stall_timeout = Duration::from_secs(5);
        let (mut client, _) = connect(settings, None, false);
        client
            .addr
            .send(Deliver {
                permit: None,
                events: sized(0..100, 1000, Duration::ZERO),
                missed: 0,
            })
            .await
            .expect("observer alive");
        // Frames and pings are read, pongs never sent: the window stays
        // full while events wait, and the stall timeout ends the session.
        let code = loop {
            match next_raw(&mut client).await {
                Message::Text(_) | Message::Ping(_) => {}
                other => break close_code(other),
            }
        };
        assert_eq!(code, CLOSE_STALLED);
        assert_ended(&mut client).await;
    }

    #[actix::test]
    async fn events_too_old_to_show_are_skipped_and_told() {
        let mut settings = quiet(1000, OnFull::DropOldest);
        settings.max_lag = Duration::from_secs(2);
        let (mut client, _) = connect(settings, None, false);
        for (events, ago) in [(0..5, 3), (5..8, 0)] {
            client
                .addr
                .send(Deliver {
                    permit: None,
                    events: sized(events, 100, Duration::from_secs(ago)),
                    missed: 0,
                })
                .await
                .expect("observer alive");
        }
        // Delivered together, the five old ones never reach the client.
        let mut frames = Vec::new();
        while frames.len() < 2 {
            frames.push(json(next(&mut client).await));
        }
        let received: Vec<u64> = frames
            .iter()
            .filter(|v| v["type"] == "events")
            .flat_map(|v| v["events"].as_array().expect("events").clone())
            .map(|e| e["payload"]["n"].as_u64().expect("n"))
            .collect();
        let missed: u64 = frames
            .iter()
            .filter(|v| v["type"] == "lagged")
            .map(|v| v["missed"].as_u64().expect("missed"))
            .sum();
        assert_eq!(missed + received.len() as u64, 8, "{frames:?}");
        assert!(
            received.iter().all(|n| *n >= 5),
            "stale events sent: {received:?}"
        );
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(100);
        let cut = truncate(long, MAX_CLOSE_REASON);
        assert!(cut.len() <= MAX_CLOSE_REASON);
    }

    #[test]
    fn session_slots_are_bounded_and_released() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = SessionSlot::try_acquire(&count, 2).expect("room");
        let b = SessionSlot::try_acquire(&count, 2).expect("room");
        assert!(SessionSlot::try_acquire(&count, 2).is_none());
        assert_eq!(a.connected(), 2);
        drop(b);
        assert!(SessionSlot::try_acquire(&count, 2).is_some());
        drop(a);
        assert_eq!(count.load(Ordering::Acquire), 0);
    }
}
