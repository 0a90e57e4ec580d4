//! The Observable actor: the registry of live observers, the place every
//! event gets its position, and the fan-out to the observers.
//!
//! Events arrive in one of two ways:
//! - [`Publish`] (`LIVE_FEED=local`): the Tap's copies of this instance's
//!   events; each is written as JSON once ([`LiveEvent`]) and placed at this
//!   instance's next position. Copies the Tap had to drop take positions too,
//!   so positions are dense.
//! - [`Feed`] (`LIVE_FEED=stream`): events read from the stream, already
//!   placed (stream positions, the same on every instance), each with the
//!   count of events missed just before it.
//!
//! Every placed event goes into the [`History`] ring and out to every
//! observer whose filter matches (the rules are in [`fanout`]). A client that
//! resumes ([`SubscribeFrom`], `?since=` / `?last=`) is replayed from the
//! ring and subscribed in one step: nothing twice, nothing left out, the
//! rest told as missed. A resume from further back than the ring, with the
//! stream, is answered [`Resumed::FromStream`]: the observer reads the
//! stream itself up to the ring, then asks again.
//!
//! # Yielding to the datastore path
//!
//! While the datastore path is behind ([`Saturation`]), placed events are
//! kept in the ring at once but handed to the observers at most once per
//! yield interval (or per [`MAX_HELD`] events), not once per copy the Tap
//! or the feed hands over: a few deliveries a second to each observer
//! instead of hundreds, whose events their buffers keep or drop as ever.
//! Held events go out before anything else touches the observers (a
//! subscription, a resume, a notice), so the order and the counts are
//! those of the unheld stream.

mod fanout;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::history::{History, Positions, Since};
use crate::live_event::LiveEvent;
use crate::messages::{DroppedCopies, LiveBacklog, LivePermit, Publish};
use crate::saturation::Saturation;
use crate::shared_frames::SharedFrames;
use crate::topic::TopicPattern;
use fanout::Registry;

/// Identifies one observer (one WebSocket session) for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObserverId(pub u64);

impl ObserverId {
    /// A fresh id, never handed out before in this process.
    pub fn next() -> ObserverId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ObserverId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for ObserverId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Observer → Observable: send me the events matching `pattern` (all of them
/// when `None`). Subscribing again with the same id replaces the address and
/// the filter and keeps the count of missed events.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// Who subscribes.
    pub id: ObserverId,
    /// Where to deliver, with `try_send`.
    pub addr: Recipient<Deliver>,
    /// The topic filter; `None` means every event.
    pub pattern: Option<TopicPattern>,
    /// Bounds, in events, the deliveries sitting in the observer's mailbox
    /// (its mailbox counts messages, which may hold one event or hundreds).
    pub backlog: LiveBacklog,
}

/// Observer → Observable: forget me. Sent when the observer stops.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    /// Who unsubscribes.
    pub id: ObserverId,
}

/// Observable → Observer: events matching the observer's filter, in order,
/// shared with every other observer that receives them.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deliver {
    /// The events, oldest first.
    pub events: Arc<[Arc<LiveEvent>]>,
    /// Events this observer missed since its last successful delivery. They
    /// came before `events`.
    pub missed: u64,
    /// The last position those missed events take (0 when none): a client
    /// told of them resumes after it.
    pub missed_through: u64,
    /// The events' share of the observer's backlog, given back when handled.
    pub permit: Option<LivePermit>,
    /// The frames of `events`, built once by the first observer that needs
    /// them and shared with every other observer handed the same `events`.
    pub frames: SharedFrames,
}

/// The live feed (`LIVE_FEED=stream`) → Observable: what was read from the
/// stream, already placed, in stream order.
#[derive(Debug, Message, Default)]
#[rtype(result = "()")]
pub struct Feed {
    /// One entry per stream message that showed or missed something.
    pub messages: Vec<FeedMessage>,
}

/// What one stream message brought.
#[derive(Debug, Clone)]
pub struct FeedMessage {
    /// Events missed just before its events (a jump in some instance's
    /// numbering: copies that never reached the stream).
    pub gap: u64,
    /// Where that gap is placed: just before the message's first position.
    pub gap_position: u64,
    /// Its events shown, in order.
    pub shown: Vec<Arc<LiveEvent>>,
}

/// Observer → Observable: subscribe, and first hand me what came after a
/// position I saw (or the last few events). Done in one step inside the
/// Observable, so that the replay and the live stream meet exactly: no event
/// twice, none left out.
#[derive(Debug, Message)]
#[rtype(result = "Resumed")]
pub struct SubscribeFrom {
    /// The subscription, as [`Subscribe`].
    pub subscribe: Subscribe,
    /// Where the client's stream starts.
    pub since: Since,
    /// With the stream feed, a replay (`Since::After`) of more events than
    /// this is read from the stream at the client's pace instead of handed
    /// over at once (the observer's buffer would only trim it).
    pub max_replay: usize,
}

/// The Observable's answer to [`SubscribeFrom`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, MessageResponse)]
pub enum Resumed {
    /// Subscribed; the replay and the count of what was missed are in the
    /// observer's mailbox, ahead of any live event.
    Subscribed,
    /// Not subscribed: the position is older than the ring, and the stream
    /// holds what came after it. Read the stream from there, then ask again
    /// from the last position read.
    FromStream,
}

/// Asks how many observers are subscribed (for tests and diagnostics).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct CountObservers;

/// How often misses not yet told (because nothing got through since) are
/// sent on their own, so a client learns of them even when the stream goes
/// quiet. A live-path timer: the datastore path has none.
pub const LAGGED_INTERVAL: Duration = Duration::from_millis(250);

/// Events held at most while yielding (see the module docs): past it they
/// go at once. Half the smallest bound of an observer's mailbox
/// ([`MIN_MAILBOX_EVENTS`](crate::observer::MIN_MAILBOX_EVENTS)), so two
/// held deliveries fit in it.
pub const MAX_HELD: usize = 2048;

/// Placed events not yet handed to the observers, while yielding.
#[derive(Debug, Default)]
struct Held {
    /// The events, in order.
    events: Vec<Arc<LiveEvent>>,
    /// Events missed just before them, the last at `through`.
    missed: u64,
    through: u64,
    /// Releases them at the end of the yield interval.
    timer: Option<SpawnHandle>,
}

/// The registry of observers and the fan-out to them. See the module docs.
#[derive(Debug)]
pub struct Observable {
    /// Every subscribed observer and the fan-out rules.
    registry: Registry,
    /// Copies the Tap could not hand over (`LIVE_FEED=local`); each takes a
    /// position and is told to every observer.
    upstream: DroppedCopies,
    /// Recent events by position, for clients that resume (`?since=`) or
    /// ask for the last few (`?last=`).
    history: History,
    /// Whether the datastore path is behind.
    saturation: Saturation,
    /// While it is, events are handed over at most once per this interval;
    /// zero: never held.
    yield_interval: Duration,
    /// Events placed and not yet handed over, while yielding.
    held: Held,
}

impl Default for Observable {
    fn default() -> Self {
        Observable {
            registry: Registry::default(),
            upstream: DroppedCopies::default(),
            history: History::new(0, Positions::Dense),
            saturation: Saturation::never(),
            yield_interval: Duration::ZERO,
            held: Held::default(),
        }
    }
}

impl Observable {
    /// An Observable with no observers and no ring, placing the Tap's copies
    /// at this instance's own positions.
    pub fn new() -> Observable {
        Observable::default()
    }

    /// An Observable that tells its observers of the copies the Tap dropped.
    pub fn with_upstream(upstream: DroppedCopies) -> Observable {
        Observable {
            upstream,
            ..Observable::default()
        }
    }

    /// Keeps the last `events` events for clients that resume (see
    /// [`SubscribeFrom`]); 0 keeps none. Positions stay as they were set.
    pub fn with_history(mut self, events: usize) -> Observable {
        self.history = History::new(events, self.positions());
        self
    }

    /// Positions come from the shared stream (`LIVE_FEED=stream`): events
    /// arrive placed ([`Feed`]), a client resuming from a position this
    /// instance has not read yet gets nothing up to it again, and one older
    /// than the ring is sent to read the stream.
    pub fn with_shared_positions(mut self) -> Observable {
        self.history = History::new(self.history.capacity(), Positions::Sparse);
        self
    }

    /// While `saturation` says the datastore path is behind, hands events
    /// over at most once per `interval` (see the module docs); a zero
    /// interval never holds them.
    pub fn yielding_to(mut self, saturation: Saturation, interval: Duration) -> Observable {
        self.saturation = saturation;
        self.yield_interval = interval;
        self
    }

    /// Hands `events` (after `missed` events missed, the last at `through`)
    /// to the observers, or holds them while yielding.
    fn fan_out(
        &mut self,
        events: Arc<[Arc<LiveEvent>]>,
        missed: u64,
        through: u64,
        ctx: &mut Context<Self>,
    ) {
        let yielding =
            !self.yield_interval.is_zero() && !self.is_empty() && self.saturation.is_behind();
        if !yielding {
            self.release(ctx);
            self.registry.fan_out(&events, missed, through);
            return;
        }
        if missed > 0 && !self.held.events.is_empty() {
            // The gap is told between the events around it.
            self.release(ctx);
        }
        let held = &mut self.held;
        if missed > 0 {
            held.missed += missed;
            held.through = held.through.max(through);
        }
        held.events.extend(events.iter().cloned());
        if held.events.len() >= MAX_HELD {
            self.release(ctx);
        } else if held.timer.is_none() {
            held.timer = Some(ctx.run_later(self.yield_interval, |act, ctx| {
                act.held.timer = None;
                act.release(ctx);
            }));
        }
    }

    /// Hands the held events (and the misses before them) over now.
    fn release(&mut self, ctx: &mut Context<Self>) {
        let held = std::mem::take(&mut self.held);
        if let Some(timer) = held.timer {
            ctx.cancel_future(timer);
        }
        if held.events.is_empty() {
            if held.missed > 0 {
                self.registry.all_missed(held.missed, held.through);
                self.registry.report_misses();
            }
            return;
        }
        self.registry
            .fan_out(&held.events.into(), held.missed, held.through);
    }

    fn positions(&self) -> Positions {
        self.history.positions()
    }

    /// Starts an Observable whose mailbox holds at most `mailbox` messages,
    /// so that the Tap's `try_send` sees when it falls behind.
    pub fn start_bounded(mailbox: usize) -> Addr<Observable> {
        Observable::create(|ctx| {
            ctx.set_mailbox_capacity(mailbox);
            Observable::new()
        })
    }

    /// How many observers are subscribed.
    pub fn len(&self) -> usize {
        self.registry.len()
    }

    /// Whether no observer is subscribed.
    pub fn is_empty(&self) -> bool {
        self.registry.len() == 0
    }

    /// Copies the Tap dropped since last asked: they take the next positions
    /// and every observer is told. Returns how many, and the last position
    /// they took.
    fn take_upstream_drops(&mut self) -> (u64, u64) {
        let dropped = self.upstream.take().events;
        if dropped > 0 && self.positions() == Positions::Dense {
            self.history.skip(dropped);
        }
        (dropped, self.history.head())
    }
}

impl Actor for Observable {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(LAGGED_INTERVAL, |act, ctx| {
            act.release(ctx);
            let (dropped, through) = act.take_upstream_drops();
            act.registry.all_missed(dropped, through);
            act.registry.report_misses();
        });
    }
}

impl Handler<Subscribe> for Observable {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, ctx: &mut Self::Context) {
        self.release(ctx);
        self.registry.subscribe(msg);
    }
}

impl Handler<Unsubscribe> for Observable {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Self::Context) {
        self.registry.unsubscribe(msg.id);
    }
}

impl Handler<Publish> for Observable {
    type Result = ();

    /// `LIVE_FEED=local`: the Tap's copies, placed at this instance's next
    /// positions.
    fn handle(&mut self, msg: Publish, ctx: &mut Self::Context) {
        let (dropped, through) = self.take_upstream_drops();
        if msg.events.is_empty() || (self.is_empty() && !self.history.keeps_events()) {
            self.release(ctx);
            // Nobody to tell and nothing to keep; the positions still advance.
            self.history.skip(msg.events.len() as u64);
            self.registry.all_missed(dropped, through);
            return;
        }
        let first = self.history.next_dense();
        let all: Arc<[Arc<LiveEvent>]> = msg
            .events
            .iter()
            .zip(first..)
            .map(|(event, position)| Arc::new(LiveEvent::from_event_at(event, position)))
            .collect();
        for event in all.iter() {
            self.history.push(event.clone());
        }
        self.fan_out(all, dropped, through, ctx);
    }
}

impl Handler<Feed> for Observable {
    type Result = ();

    /// Every gap is told where it happened: the events before it and after
    /// it go out in separate deliveries, so that a client's `lagged` notice
    /// sits between the events it sat between in the stream.
    fn handle(&mut self, msg: Feed, ctx: &mut Self::Context) {
        let (mut missed, mut through) = (0, 0);
        let mut segment: Vec<Arc<LiveEvent>> = Vec::new();
        for message in msg.messages {
            if message.gap > 0 {
                if !segment.is_empty() {
                    self.fan_out(std::mem::take(&mut segment).into(), missed, through, ctx);
                    missed = 0;
                }
                self.history.gap_at(message.gap_position, message.gap);
                missed += message.gap;
                through = message.gap_position;
            }
            for event in message.shown {
                if self.history.push(event.clone()) {
                    segment.push(event);
                }
            }
        }
        if segment.is_empty() {
            self.release(ctx);
            self.registry.all_missed(missed, through);
            self.registry.report_misses();
        } else {
            self.fan_out(segment.into(), missed, through, ctx);
        }
    }
}

impl Handler<SubscribeFrom> for Observable {
    type Result = Resumed;

    fn handle(&mut self, msg: SubscribeFrom, ctx: &mut Self::Context) -> Resumed {
        // The ring holds the held events: they go to the others first, and
        // to this observer with its replay.
        self.release(ctx);
        if !self.history.covers(msg.since) {
            return Resumed::FromStream;
        }
        let id = msg.subscribe.id;
        let mut replay = self
            .history
            .replay(msg.since, msg.subscribe.pattern.as_ref());
        let sparse = self.positions() == Positions::Sparse;
        if sparse && matches!(msg.since, Since::After(_)) && replay.events() > msg.max_replay {
            // More than the client can take at once: from the stream, at its pace.
            return Resumed::FromStream;
        }
        self.registry.subscribe(msg.subscribe);
        if let Since::After(position) = msg.since {
            if sparse && position > self.history.head() {
                self.registry.skip_through(id, position);
            }
        }
        // The client asked for this history: `WS_MAX_LAG` bounds how long it
        // may take to hand it over, counted from now, not the events' age
        // (else a resume after more than `WS_MAX_LAG` away would replay nothing).
        let now = SystemTime::now();
        for segment in &mut replay.segments {
            for event in &mut segment.events {
                *event = Arc::new(LiveEvent::clone(event).received(now));
            }
        }
        self.registry.deliver_replay(id, replay);
        Resumed::Subscribed
    }
}

impl Handler<CountObservers> for Observable {
    type Result = usize;

    fn handle(&mut self, _msg: CountObservers, _ctx: &mut Self::Context) -> usize {
        self.len()
    }
}
