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
//! `{"type":"events","events":[…]}`. Events dropped (here or upstream) are
//! told where they were, between the frames around them:
//! `{"type":"lagged","missed":N,"position":P}`, P the last position among
//! them, so a client that resumes (`?since=`) after the last position it
//! received or was told of gets every event once.
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
//! While the datastore path is behind ([`crate::saturation`]), the Observer
//! writes at most one frame of events per [`ObserverSettings::yield_interval`]
//! (`LIVE_YIELD_INTERVAL`); what its buffer cannot keep meanwhile is dropped
//! and told as for any slow client; the notice goes with the next frame.
//!
//! A session ends with a close frame whose code says why (see `protocol.rs`:
//! 4000 [`CLOSE_STALLED`] and 4001 [`CLOSE_TIMEOUT`] for the two timeouts).
//! The close frame always has room: one slot of the channel is reserved for it
//! when the Observer is created, so even a client that stopped reading gets it
//! queued (it will read it if it ever resumes).
//!
//! # Layout
//!
//! This file is the actor: its state, its life cycle and what it does with
//! each message. The rules it applies are rooms of their own, each pure or
//! nearly so, and tested on its own where it can be:
//!
//! - `settings.rs`: what bounds it (`WS_*`, the channel, the mailbox);
//! - `buffer.rs`: which events are kept, dropped or skipped, and the frames;
//! - `window.rs`: what the client has consumed, learnt from its pongs;
//! - `flow.rs`: when to write, the stall timer, the heartbeat;
//! - `protocol.rs`: what a client may send, and the close codes;
//! - `session.rs`: the count of open sessions;
//! - `replay.rs`: a resume read from the stream, at the client's pace;
//! - `tests.rs`: the actor end to end, with a stand-in client.

use std::sync::Arc;

use actix::prelude::*;
use actix_http::ws::{CloseCode, CloseReason, Frame, Message, ProtocolError};
use futures_util::Stream;
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
mod flow;
mod protocol;
mod replay;
mod session;
mod settings;
mod window;

pub use buffer::OnFull;
pub use protocol::{ClientMessage, CLOSE_STALLED, CLOSE_TIMEOUT};
pub use session::SessionSlot;
pub use settings::{
    outgoing_channel, ObserverSettings, Outgoing, MAILBOX_SPARE, MIN_MAILBOX_EVENTS,
    OUTGOING_FRAMES,
};

use buffer::Pending;
use protocol::{truncate, Incoming, MAX_CLOSE_REASON};
use settings::mailbox_events;
use window::AckWindow;

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
    outgoing: mpsc::Sender<Outgoing>,
    /// The slot reserved for the close frame, taken when the Observer is
    /// created so that a close can be queued even when the client stalls.
    close_permit: Option<OwnedPermit<Outgoing>>,
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
    /// While the live path yields: no frame of events before this instant.
    yield_until: Option<Instant>,
    /// A flush is scheduled for `yield_until`.
    yield_timer: bool,
}

impl Observer {
    /// An Observer for one client, writing to `outgoing` (see
    /// [`outgoing_channel`]) and subscribing to `observable` with `pattern`.
    pub fn new(
        settings: ObserverSettings,
        observable: Addr<Observable>,
        pattern: Option<TopicPattern>,
        outgoing: mpsc::Sender<Outgoing>,
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
            yield_until: None,
            yield_timer: false,
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

    /// Ends the session with a close frame (queued in the reserved slot).
    fn close(&mut self, ctx: &mut Context<Self>, code: CloseCode, reason: String) {
        if self.ended.is_some() {
            return;
        }
        let reason = truncate(reason, MAX_CLOSE_REASON);
        self.ended = Some(format!("closed with {}: {reason}", u16::from(code)));
        if let Some(permit) = self.close_permit.take() {
            permit.send(
                Message::Close(Some(CloseReason {
                    code,
                    description: Some(reason),
                }))
                .into(),
            );
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
        ctx.run_interval(self.heartbeat_interval(), Observer::heartbeat);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // The service is stopping (nobody asked this session to end): say so.
        if let Some(permit) = self.close_permit.take() {
            if self.ended.is_none() {
                permit.send(
                    Message::Close(Some(CloseReason {
                        code: CloseCode::Away,
                        description: Some("the service is stopping".into()),
                    }))
                    .into(),
                );
                self.ended = Some("the service is stopping".into());
            }
        }
        // A rare control message, sent once per session from a stopping actor
        // that cannot wait. If it overtakes a `Subscribe` still in flight, the
        // Observable forgets this observer at its next delivery anyway, since
        // this mailbox is then closed.
        self.observable.do_send(Unsubscribe { id: self.id });
        let connected = self.slot.take().map_or(0, SessionSlot::release);
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
            self.pending.missed(msg.missed, msg.missed_through);
        }
        let dropped = self
            .pending
            .push(&msg.events, &msg.frames, self.settings.on_full);
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
        match protocol::incoming(item) {
            Incoming::Filter(pattern) => {
                if pattern != self.pattern {
                    self.pattern = pattern;
                    // During a replay from the stream, the new filter applies
                    // from where the ring takes over.
                    if self.replaying.is_none() {
                        self.subscribe(ctx);
                    }
                }
            }
            Incoming::Ping(payload) => {
                // Answered when there is room; a client that does not read
                // does not need its pongs.
                if let Err(TrySendError::Closed(_)) =
                    self.outgoing.try_send(Message::Pong(payload).into())
                {
                    self.gone(ctx);
                }
            }
            Incoming::Pong(payload) => {
                // The client consumed everything before that ping: room in
                // the window, and progress.
                if self.window.acked(&payload, Instant::now()) {
                    self.disarm_stall_timer(ctx);
                    self.flush(ctx);
                }
            }
            Incoming::Close(code, reason) => self.close(ctx, code, reason),
            Incoming::Failed(reason) => {
                self.ended = Some(reason);
                ctx.stop();
            }
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
mod tests;
