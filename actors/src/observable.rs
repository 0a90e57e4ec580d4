//! The Observable actor: the registry of live observers and the fan-out to them.
//!
//! The Tap sends it a copy of every chunk of events ([`Publish`]). It turns
//! each event into JSON text once ([`LiveEvent`]), selects for each observer
//! the events its topic filter matches (observers with the same filter share
//! one selection, observers without a filter share the whole chunk), and hands
//! each selection over with `try_send`. It never waits: when an observer's
//! mailbox is full the events are counted as missed for that observer, and
//! the count travels with the next [`Deliver`] that gets through, so the client
//! is told. An observer whose mailbox is closed is forgotten.
//!
//! Every event gets a position (this instance's sequence from [`Publish`],
//! or the stream's from [`Feed`] with `LIVE_FEED=stream`) and the newest
//! are kept in a [`History`] ring, so a client that resumes
//! ([`SubscribeFrom`], `?since=` / `?last=`) is replayed and subscribed in
//! one step: nothing twice, nothing left out, the rest told as missed.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use crate::event::EventData;
use crate::history::{History, Since};
use crate::internal_events::live::{DropStage, LiveEventsDropped, ObserverLagging};
use crate::messages::{DroppedCopies, LiveBacklog, LivePermit, Publish};
use crate::shared_frames::SharedFrames;
use crate::topic::TopicPattern;

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

/// One event as WebSocket clients see it: a JSON object, serialised once and
/// shared by every observer that receives it.
///
/// `{"position":…,"message_id":…,"routing_key":…,"payload":…,"headers":…,"published_at":…,"received_at":…}`
/// where `position` is the event's place in the live stream (see
/// [`crate::history`]; a client resumes after it with `?since=`), `payload`
/// and `headers` are the original JSON text (not re-encoded) and the times
/// are RFC 3339 in UTC (`published_at` is `null` when the publisher did not
/// set a timestamp).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEvent {
    /// The JSON object text.
    json: Box<str>,
    /// The place in the live stream (0: none, as in [`LiveEvent::from_event`]).
    position: u64,
    /// The AMQP routing key, for topic filters.
    routing_key: Box<str>,
    /// When Sluice received the event: its age, against `WS_MAX_LAG`, is
    /// counted from here.
    received_at: SystemTime,
}

impl LiveEvent {
    /// Serialises one event at `position` (see the type's docs).
    pub fn from_event_at(event: &EventData, position: u64) -> LiveEvent {
        LiveEvent::write(event, Some(position))
    }

    /// An event whose JSON object text without a position is `json` (as
    /// [`LiveEvent::from_event`] writes it, or as it travels in the live
    /// feed), placed at `position`: `"position"` becomes its first member.
    pub fn positioned(
        position: u64,
        routing_key: &str,
        json: &str,
        received_at: SystemTime,
    ) -> LiveEvent {
        let rest = json.strip_prefix('{').unwrap_or(json);
        let mut text = String::with_capacity(json.len() + 32);
        // Writing to a String cannot fail.
        let _ = write!(text, "{{\"position\":{position}");
        if !rest.trim_start().starts_with('}') {
            text.push(',');
        }
        text.push_str(rest);
        LiveEvent {
            json: text.into(),
            position,
            routing_key: routing_key.into(),
            received_at,
        }
    }

    /// Serialises one event without a position. `payload` and `headers` are
    /// trusted to be valid JSON text: [`EventData::from_delivery`] validated
    /// the first and built the second.
    pub fn from_event(event: &EventData) -> LiveEvent {
        LiveEvent::write(event, None)
    }

    /// Writes the event's JSON object in one buffer, with `"position"` first
    /// when there is one (the same text [`LiveEvent::positioned`] makes of
    /// the unpositioned form, without writing it twice).
    fn write(event: &EventData, position: Option<u64>) -> LiveEvent {
        let mut json = String::with_capacity(
            event.payload.len() + event.headers.len() + event.message_id.len() + 192,
        );
        json.push('{');
        if let Some(position) = position {
            // Writing to a String cannot fail.
            let _ = write!(json, "\"position\":{position},");
        }
        json.push_str("\"message_id\":");
        push_json_string(&mut json, &event.message_id);
        json.push_str(",\"routing_key\":");
        push_json_string(&mut json, &event.routing_key);
        json.push_str(",\"payload\":");
        json.push_str(&event.payload);
        json.push_str(",\"headers\":");
        json.push_str(&event.headers);
        json.push_str(",\"published_at\":");
        push_time(&mut json, event.published_at);
        json.push_str(",\"received_at\":");
        push_time(&mut json, Some(event.received_at));
        json.push('}');
        LiveEvent {
            json: json.into(),
            position: position.unwrap_or(0),
            routing_key: event.routing_key.as_str().into(),
            received_at: event.received_at,
        }
    }

    /// Wraps JSON text that is already a valid event object (for tests and
    /// stand-ins), received now.
    pub fn from_json(json: impl Into<Box<str>>) -> LiveEvent {
        LiveEvent {
            json: json.into(),
            position: 0,
            routing_key: "".into(),
            received_at: SystemTime::now(),
        }
    }

    /// The same event, as if received at `at` (for tests of ageing, and for
    /// replayed history, whose freshness counts from the replay).
    pub fn received(self, at: SystemTime) -> LiveEvent {
        LiveEvent {
            received_at: at,
            ..self
        }
    }

    /// When Sluice received the event.
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    /// The JSON object text.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The place in the live stream (0 when it has none).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The AMQP routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends a time as an RFC 3339 string in UTC with milliseconds, or `null`
/// when it is absent or outside what RFC 3339 can express (before 1970 or
/// after year 9999 — a publisher can put anything in the AMQP timestamp).
fn push_time(out: &mut String, time: Option<SystemTime>) {
    const YEAR_10000: u64 = 253_402_300_800;
    match time {
        Some(t)
            if t.duration_since(UNIX_EPOCH)
                .is_ok_and(|d| d.as_secs() < YEAR_10000) =>
        {
            let _ = write!(out, "\"{}\"", humantime::format_rfc3339_millis(t));
        }
        _ => out.push_str("null"),
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
    /// Events this observer missed since its last successful delivery because
    /// its mailbox was full. They came before `events`.
    pub missed: u64,
    /// The events' share of the observer's backlog, given back when handled.
    pub permit: Option<LivePermit>,
    /// The frames of `events`, built once by the first observer that needs
    /// them and shared with every other observer handed the same `events`.
    pub frames: SharedFrames,
}

/// What the Observable knows about one observer.
#[derive(Debug)]
struct Registration {
    /// The observer's mailbox.
    addr: Recipient<Deliver>,
    /// Its filter; `None` means every event.
    pattern: Option<Arc<TopicPattern>>,
    /// Events delivered and not yet handled by the observer.
    backlog: LiveBacklog,
    /// Events missed since the last delivery that got through.
    missed: u64,
    /// Whether the first miss was logged already (logged once per observer).
    lag_reported: bool,
    /// The client resumed after this position, which this instance has not
    /// reached yet (it reads the shared stream a little behind another):
    /// events up to it are not sent again. 0 when nothing is to be skipped.
    skip_through: u64,
}

/// How often misses not yet told (because nothing got through since) are
/// sent on their own, so a client learns of them even when the stream goes
/// quiet. A live-path timer: the datastore path has none.
pub const LAGGED_INTERVAL: Duration = Duration::from_millis(250);

/// The registry of observers and the fan-out to them. See the module docs.
#[derive(Debug)]
pub struct Observable {
    /// Every subscribed observer, by id.
    observers: HashMap<ObserverId, Registration>,
    /// Copies the Tap could not hand over; told to every observer.
    upstream: DroppedCopies,
    /// Recent events by position, for clients that resume (`?since=`) or
    /// ask for the last few (`?last=`).
    history: History,
    /// Positions are shared by every instance (the stream feed): a resume
    /// from a position this instance has not reached yet waits for it.
    /// Otherwise such a position is another instance's, and ignored.
    shared_positions: bool,
}

impl Default for Observable {
    fn default() -> Self {
        Observable {
            observers: HashMap::new(),
            upstream: DroppedCopies::default(),
            history: History::new(0),
            shared_positions: false,
        }
    }
}

impl Observable {
    /// An Observable with no observers.
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
    /// [`SubscribeFrom`]); 0 keeps none.
    pub fn with_history(mut self, events: usize) -> Observable {
        self.history = History::new(events);
        self
    }

    /// Positions are the same on every instance (`LIVE_FEED=stream`): a
    /// client resuming from a position this instance has not read yet gets
    /// nothing up to it again (see [`SubscribeFrom`]).
    pub fn with_shared_positions(mut self) -> Observable {
        self.shared_positions = true;
        self
    }

    /// Sends each observer the misses it was not told of yet, alone.
    fn report_misses(&mut self) {
        let upstream = self.upstream.take();
        self.history.gap(upstream);
        let mut closed = Vec::new();
        for (id, registration) in &mut self.observers {
            registration.missed += upstream;
            if registration.missed == 0 {
                continue;
            }
            let notice = Deliver {
                events: Arc::new([]),
                missed: registration.missed,
                permit: None,
                frames: SharedFrames::default(),
            };
            match registration.addr.try_send(notice) {
                Ok(()) => registration.missed = 0,
                Err(SendError::Full(_)) => {}
                Err(SendError::Closed(_)) => closed.push(*id),
            }
        }
        for id in closed {
            self.observers.remove(&id);
        }
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
        self.observers.len()
    }

    /// Whether no observer is subscribed.
    pub fn is_empty(&self) -> bool {
        self.observers.is_empty()
    }
}

impl Actor for Observable {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(LAGGED_INTERVAL, |act, _| act.report_misses());
    }
}

impl Handler<Subscribe> for Observable {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Self::Context) {
        let pattern = msg
            .pattern
            .filter(|p| !p.matches_everything())
            .map(Arc::new);
        match self.observers.entry(msg.id) {
            MapEntry::Occupied(mut entry) => {
                let registration = entry.get_mut();
                registration.addr = msg.addr;
                registration.pattern = pattern;
                registration.backlog = msg.backlog;
            }
            MapEntry::Vacant(entry) => {
                entry.insert(Registration {
                    addr: msg.addr,
                    pattern,
                    backlog: msg.backlog,
                    missed: 0,
                    lag_reported: false,
                    skip_through: 0,
                });
            }
        }
    }
}

impl Handler<Unsubscribe> for Observable {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Self::Context) {
        self.observers.remove(&msg.id);
    }
}

impl Handler<Publish> for Observable {
    type Result = ();

    /// `LIVE_FEED=local`: the Tap's copies, placed at this instance's next
    /// positions.
    fn handle(&mut self, msg: Publish, _ctx: &mut Self::Context) {
        let upstream = self.upstream.take();
        self.history.gap(upstream);
        if msg.events.is_empty() || (self.observers.is_empty() && !self.history.keeps_events()) {
            // Nobody to tell and nothing to keep; the positions still advance.
            self.history.skip(msg.events.len() as u64);
            return;
        }
        let first = self.history.head() + 1;
        let all: Arc<[Arc<LiveEvent>]> = msg
            .events
            .iter()
            .zip(first..)
            .map(|(event, position)| Arc::new(LiveEvent::from_event_at(event, position)))
            .collect();
        for event in all.iter() {
            self.history.push(event.clone());
        }
        self.fan_out(&all, upstream);
    }
}

/// The live feed (`LIVE_FEED=stream`) → Observable: events read from the
/// stream, already placed (position = stream offset), oldest first.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Feed {
    /// The events, each with the count of events missed just before it
    /// (publishes dropped by some instance, or lost to retention).
    pub events: Vec<(u64, Arc<LiveEvent>)>,
    /// Events missed after the last one (told at once, or by the timer).
    pub missed_after: u64,
    /// The events' share of the feed's backlog, given back when handled.
    pub permit: Option<LivePermit>,
}

impl Handler<Feed> for Observable {
    type Result = ();

    fn handle(&mut self, msg: Feed, _ctx: &mut Self::Context) {
        let mut missed = 0;
        let mut all = Vec::with_capacity(msg.events.len());
        for (gap, event) in msg.events {
            self.history.gap(gap);
            missed += gap;
            if self.history.push(event.clone()) {
                all.push(event);
            }
        }
        let all: Arc<[Arc<LiveEvent>]> = all.into();
        self.fan_out(&all, missed);
        if msg.missed_after > 0 {
            self.history.gap(msg.missed_after);
            for registration in self.observers.values_mut() {
                registration.missed += msg.missed_after;
            }
            self.report_misses();
        }
    }
}

impl Observable {
    /// Hands `all` (and the count of events `missed` just before them) to
    /// every observer whose filter matches, with `try_send`.
    fn fan_out(&mut self, all: &Arc<[Arc<LiveEvent>]>, missed: u64) {
        if self.observers.is_empty() || (all.is_empty() && missed == 0) {
            return;
        }
        // One selection per distinct filter, shared by the observers using
        // it, with its frames (built once, by the first observer to write them).
        type Selection = (Arc<[Arc<LiveEvent>]>, SharedFrames);
        let everything: Selection = (all.clone(), SharedFrames::default());
        let mut selections: HashMap<Arc<TopicPattern>, Selection> = HashMap::new();
        let mut closed = Vec::new();
        let mut missed_now = 0u64;
        for (id, registration) in &mut self.observers {
            // Gaps before events a resumed client already has were told to
            // it before (in its earlier session).
            let seen_already = registration.skip_through > 0
                && all
                    .last()
                    .is_some_and(|e| e.position() <= registration.skip_through);
            if !seen_already {
                registration.missed += missed;
            }
            let (mut events, mut frames) = match &registration.pattern {
                None => everything.clone(),
                Some(pattern) => selections
                    .entry(pattern.clone())
                    .or_insert_with(|| {
                        let events = all
                            .iter()
                            .filter(|live| pattern.matches(live.routing_key()))
                            .cloned()
                            .collect();
                        (events, SharedFrames::default())
                    })
                    .clone(),
            };
            if registration.skip_through > 0 {
                let through = registration.skip_through;
                if events.last().is_some_and(|e| e.position() > through) {
                    registration.skip_through = 0;
                }
                if events.first().is_some_and(|e| e.position() <= through) {
                    events = events
                        .iter()
                        .filter(|e| e.position() > through)
                        .cloned()
                        .collect();
                    frames = SharedFrames::default();
                }
            }
            if events.is_empty() {
                continue;
            }
            let n = events.len() as u64;
            // No permit: its mailbox already holds a buffer's worth of events.
            let sent = match registration.backlog.try_acquire(events.len()) {
                Some(permit) => registration.addr.try_send(Deliver {
                    events,
                    missed: registration.missed,
                    permit: Some(permit),
                    frames,
                }),
                None => Err(SendError::Full(Deliver {
                    events,
                    missed: 0,
                    permit: None,
                    frames,
                })),
            };
            match sent {
                Ok(()) => registration.missed = 0,
                Err(SendError::Full(_)) => {
                    registration.missed += n;
                    missed_now += n;
                    if !registration.lag_reported {
                        registration.lag_reported = true;
                        ObserverLagging {
                            observer: id.0,
                            stage: DropStage::Observable,
                        }
                        .emit();
                    }
                }
                Err(SendError::Closed(_)) => closed.push(*id),
            }
        }
        if missed_now > 0 {
            LiveEventsDropped {
                stage: DropStage::Observable,
                events: missed_now,
            }
            .emit();
        }
        for id in closed {
            self.observers.remove(&id);
        }
    }
}

/// Observer → Observable: subscribe, and first hand me what came after a
/// position I saw (or the last few events). Done in one step inside the
/// Observable, so that the replay and the live stream meet exactly: no event
/// twice, none left out.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SubscribeFrom {
    /// The subscription, as [`Subscribe`].
    pub subscribe: Subscribe,
    /// Where the client's stream starts.
    pub since: Since,
}

impl Handler<SubscribeFrom> for Observable {
    type Result = ();

    fn handle(&mut self, msg: SubscribeFrom, ctx: &mut Self::Context) {
        let id = msg.subscribe.id;
        let replay = self
            .history
            .replay(msg.since, msg.subscribe.pattern.as_ref());
        <Self as Handler<Subscribe>>::handle(self, msg.subscribe, ctx);
        let Some(registration) = self.observers.get_mut(&id) else {
            return;
        };
        if let Since::After(position) = msg.since {
            if self.shared_positions && position > self.history.head() {
                registration.skip_through = position;
            }
        }
        if replay.events.is_empty() && replay.missed == 0 {
            return;
        }
        let n = replay.events.len() as u64;
        // The client asked for this history: `WS_MAX_LAG` bounds how long it
        // may take to hand it over, counted from now, not the events' age
        // (else a resume after more than `WS_MAX_LAG` away would replay nothing).
        let now = SystemTime::now();
        let events: Arc<[Arc<LiveEvent>]> = replay
            .events
            .into_iter()
            .map(|event| Arc::new(LiveEvent::clone(&event).received(now)))
            .collect();
        // A new observer has nothing in flight, so its backlog admits the
        // whole replay; its own buffer then keeps what it can and counts the rest.
        let permit = registration.backlog.try_acquire(events.len());
        let deliver = Deliver {
            events,
            missed: registration.missed + replay.missed,
            permit,
            frames: SharedFrames::default(),
        };
        match registration.addr.try_send(deliver) {
            Ok(()) => registration.missed = 0,
            Err(SendError::Full(_)) => registration.missed += replay.missed + n,
            Err(SendError::Closed(_)) => {
                self.observers.remove(&id);
            }
        }
    }
}

/// Asks how many observers are subscribed (for tests and diagnostics).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct CountObservers;

impl Handler<CountObservers> for Observable {
    type Result = usize;

    fn handle(&mut self, _msg: CountObservers, _ctx: &mut Self::Context) -> usize {
        self.observers.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use lapin::BasicProperties;
    use tokio::sync::{mpsc, oneshot};

    use super::*;

    /// An event with the given routing key and a payload naming it.
    pub(crate) fn event(routing_key: &str, n: u64) -> Arc<EventData> {
        Arc::new(EventData {
            message_id: format!("m-{n}"),
            routing_key: routing_key.to_owned(),
            payload: format!("{{\"n\":{n}}}"),
            headers: "{}".to_owned(),
            published_at: None,
            received_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            properties: BasicProperties::default(),
        })
    }

    fn publish(events: Vec<Arc<EventData>>) -> Publish {
        Publish {
            permit: None,
            events: events.into(),
        }
    }

    /// Stands in for an Observer: forwards every delivery to the test. Until
    /// `gate` fires it does not read its mailbox, like a busy observer.
    struct Probe {
        out: mpsc::UnboundedSender<Deliver>,
        gate: Option<oneshot::Receiver<()>>,
    }

    impl Actor for Probe {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Self::Context) {
            if let Some(gate) = self.gate.take() {
                // Holding the context is exactly what this stand-in is for.
                ctx.wait(fut::wrap_future(gate).map(|_, _, _| ()));
            }
        }
    }

    impl Handler<Deliver> for Probe {
        type Result = ();

        fn handle(&mut self, msg: Deliver, _ctx: &mut Self::Context) {
            let _ = self.out.send(msg);
        }
    }

    fn probe(
        mailbox: usize,
        gate: Option<oneshot::Receiver<()>>,
    ) -> (Addr<Probe>, mpsc::UnboundedReceiver<Deliver>) {
        let (out, rx) = mpsc::unbounded_channel();
        let addr = Probe::create(move |ctx| {
            ctx.set_mailbox_capacity(mailbox);
            Probe { out, gate }
        });
        (addr, rx)
    }

    fn keys(deliver: &Deliver) -> Vec<String> {
        deliver
            .events
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(e.json()).expect("valid JSON");
                v["routing_key"].as_str().expect("routing key").to_owned()
            })
            .collect()
    }

    #[test]
    fn a_positioned_event_is_written_once_and_reads_as_the_unpositioned_one_placed() {
        let data = event("a.b", 7);
        let placed = LiveEvent::from_event_at(&data, 42);
        let from_plain = LiveEvent::positioned(
            42,
            "a.b",
            LiveEvent::from_event(&data).json(),
            data.received_at,
        );
        assert_eq!(placed.json(), from_plain.json());
        assert_eq!(placed.position(), 42);
        assert!(placed
            .json()
            .starts_with("{\"position\":42,\"message_id\":"));
        let v: serde_json::Value = serde_json::from_str(placed.json()).expect("valid JSON");
        assert_eq!(v["payload"], serde_json::json!({"n": 7}));
    }

    #[test]
    fn live_event_is_the_original_json_with_metadata() {
        let mut data = Arc::try_unwrap(event("a.b", 7)).expect("unique");
        data.message_id = "id \"quoted\"\n\u{1}".into();
        data.headers = "{\"x\":[1,2]}".into();
        data.published_at = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let live = LiveEvent::from_event(&data);
        let v: serde_json::Value = serde_json::from_str(live.json()).expect("valid JSON");
        assert_eq!(v["message_id"], "id \"quoted\"\n\u{1}");
        assert_eq!(v["routing_key"], "a.b");
        assert_eq!(v["payload"], serde_json::json!({"n": 7}));
        assert_eq!(v["headers"], serde_json::json!({"x": [1, 2]}));
        assert_eq!(v["published_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["received_at"], "2023-11-14T22:13:20.123Z");
        // The payload text is embedded as is, not re-encoded.
        assert!(live.json().contains("\"payload\":{\"n\":7}"));
    }

    #[test]
    fn out_of_range_times_become_null() {
        let mut data = Arc::try_unwrap(event("a", 1)).expect("unique");
        data.published_at = Some(UNIX_EPOCH + Duration::from_secs(300_000_000_000));
        let v: serde_json::Value =
            serde_json::from_str(LiveEvent::from_event(&data).json()).expect("valid JSON");
        assert!(v["published_at"].is_null());
    }

    #[actix::test]
    async fn fans_out_to_matching_observers_only() {
        let observable = Observable::start_bounded(16);
        let (all, mut all_rx) = probe(16, None);
        let (orders, mut orders_rx) = probe(16, None);
        let (users, mut users_rx) = probe(16, None);
        for (id, addr, pattern) in [
            (1, all.recipient(), None),
            (2, orders.recipient(), Some("orders.#")),
            (3, users.recipient(), Some("users.*")),
        ] {
            observable
                .send(Subscribe {
                    backlog: LiveBacklog::new(1_000_000),
                    id: ObserverId(id),
                    addr,
                    pattern: pattern.map(|p| TopicPattern::parse(p).expect("valid")),
                })
                .await
                .expect("observable alive");
        }
        observable
            .send(publish(vec![
                event("orders.created", 1),
                event("users.signup", 2),
                event("orders", 3),
                event("users.a.b", 4),
            ]))
            .await
            .expect("observable alive");

        let got = all_rx.recv().await.expect("delivery");
        assert_eq!(
            keys(&got),
            ["orders.created", "users.signup", "orders", "users.a.b"]
        );
        assert_eq!(got.missed, 0);
        let got = orders_rx.recv().await.expect("delivery");
        assert_eq!(keys(&got), ["orders.created", "orders"]);
        let got = users_rx.recv().await.expect("delivery");
        assert_eq!(keys(&got), ["users.signup"]);

        // An event matching nobody but `all` produces no delivery for the others.
        observable
            .send(publish(vec![event("billing.paid", 5)]))
            .await
            .expect("observable alive");
        assert_eq!(
            keys(&all_rx.recv().await.expect("delivery")),
            ["billing.paid"]
        );
        assert!(orders_rx.try_recv().is_err());
        assert!(users_rx.try_recv().is_err());
    }

    #[actix::test]
    async fn observers_without_filter_share_one_slice() {
        let observable = Observable::start_bounded(16);
        let (a, mut a_rx) = probe(16, None);
        let (b, mut b_rx) = probe(16, None);
        for (id, addr) in [(1, a.recipient()), (2, b.recipient())] {
            observable
                .send(Subscribe {
                    backlog: LiveBacklog::new(1_000_000),
                    id: ObserverId(id),
                    addr,
                    pattern: Some(TopicPattern::any()),
                })
                .await
                .expect("observable alive");
        }
        observable
            .send(publish(vec![event("x", 1)]))
            .await
            .expect("observable alive");
        let a_got = a_rx.recv().await.expect("delivery");
        let b_got = b_rx.recv().await.expect("delivery");
        assert!(Arc::ptr_eq(&a_got.events, &b_got.events));
    }

    #[actix::test]
    async fn a_full_mailbox_is_a_miss_reported_on_the_next_delivery() {
        let observable = Observable::start_bounded(16);
        let (gate_tx, gate_rx) = oneshot::channel();
        let (slow, mut slow_rx) = probe(1, Some(gate_rx));
        let (fast, mut fast_rx) = probe(16, None);
        for (id, addr) in [(1, slow.recipient()), (2, fast.recipient())] {
            observable
                .send(Subscribe {
                    backlog: LiveBacklog::new(1_000_000),
                    id: ObserverId(id),
                    addr,
                    pattern: None,
                })
                .await
                .expect("observable alive");
        }
        // The first chunk fills the slow probe's mailbox; the next two are
        // missed. `send().await` returns once the Observable handled each
        // chunk: it did not wait for the stalled probe.
        observable
            .send(publish(vec![event("k", 1)]))
            .await
            .expect("alive");
        observable
            .send(publish(vec![event("k", 2), event("k", 3)]))
            .await
            .expect("alive");
        observable
            .send(publish(vec![event("k", 4)]))
            .await
            .expect("alive");
        for _ in 0..3 {
            assert_eq!(fast_rx.recv().await.expect("delivery").missed, 0);
        }

        // The probe reads its mailbox again; the next chunk carries the count.
        gate_tx.send(()).expect("probe waiting");
        let first = slow_rx.recv().await.expect("delivery");
        assert_eq!((keys(&first).len(), first.missed), (1, 0));
        observable
            .send(publish(vec![event("k", 5)]))
            .await
            .expect("alive");
        let next = slow_rx.recv().await.expect("delivery");
        assert_eq!(next.missed, 3);
        assert_eq!(keys(&next), ["k"]);
    }

    #[actix::test]
    async fn closed_observers_are_removed() {
        let observable = Observable::start_bounded(16);
        // A context that is dropped without ever running: its mailbox is closed.
        let dead = {
            let ctx = Context::<Probe>::new();
            ctx.address()
        };
        let (live, mut live_rx) = probe(16, None);
        for (id, addr) in [(1, dead.recipient()), (2, live.recipient())] {
            observable
                .send(Subscribe {
                    backlog: LiveBacklog::new(1_000_000),
                    id: ObserverId(id),
                    addr,
                    pattern: None,
                })
                .await
                .expect("alive");
        }
        assert_eq!(observable.send(CountObservers).await.expect("alive"), 2);
        observable
            .send(publish(vec![event("k", 1)]))
            .await
            .expect("alive");
        assert_eq!(observable.send(CountObservers).await.expect("alive"), 1);
        assert_eq!(keys(&live_rx.recv().await.expect("delivery")), ["k"]);
        observable
            .send(Unsubscribe { id: ObserverId(2) })
            .await
            .expect("alive");
        assert_eq!(observable.send(CountObservers).await.expect("alive"), 0);
    }

    async fn subscribe(observable: &Addr<Observable>, addr: Recipient<Deliver>, backlog: usize) {
        observable
            .send(Subscribe {
                id: ObserverId(1),
                addr,
                pattern: None,
                backlog: LiveBacklog::new(backlog),
            })
            .await
            .expect("observable alive");
    }

    #[actix::test]
    async fn a_burst_of_small_chunks_is_bounded_in_events_not_messages() {
        // 200 one-event chunks to an observer that is busy: its mailbox could
        // hold them all, but its backlog admits 50 events.
        let observable = Observable::start_bounded(1024);
        let (gate_tx, gate) = oneshot::channel();
        let (addr, mut rx) = probe(1000, Some(gate));
        subscribe(&observable, addr.recipient(), 50).await;
        for n in 0..200 {
            observable
                .send(publish(vec![event("a", n)]))
                .await
                .expect("observable alive");
        }
        let _ = gate_tx.send(());
        let mut received = 0;
        while received < 50 {
            let deliver = rx.recv().await.expect("delivery");
            assert_eq!(deliver.missed, 0, "the first 50 got through");
            received += deliver.events.len();
        }
        // The rest is reported, at the next delivery or by the timer.
        observable
            .send(publish(vec![event("a", 200)]))
            .await
            .expect("observable alive");
        let next = rx.recv().await.expect("delivery");
        assert_eq!((next.missed, next.events.len()), (150, 1));
    }

    #[actix::test]
    async fn misses_are_told_even_when_the_stream_goes_quiet() {
        tokio::time::pause();
        let upstream = DroppedCopies::default();
        let observable = Observable::create({
            let upstream = upstream.clone();
            move |_| Observable::with_upstream(upstream)
        });
        let (addr, mut rx) = probe(16, None);
        subscribe(&observable, addr.recipient(), 100).await;
        // The Tap dropped 7 copies, and then nothing more arrives.
        upstream.add(7);
        tokio::time::advance(LAGGED_INTERVAL).await;
        let notice = rx.recv().await.expect("a lagged notice");
        assert_eq!((notice.missed, notice.events.len()), (7, 0));
        // Told once.
        tokio::time::advance(LAGGED_INTERVAL * 4).await;
        observable
            .send(publish(vec![event("a", 1)]))
            .await
            .expect("observable alive");
        let next = rx.recv().await.expect("delivery");
        assert_eq!((next.missed, next.events.len()), (0, 1));
    }

    fn positions(deliver: &Deliver) -> Vec<u64> {
        deliver.events.iter().map(|e| e.position()).collect()
    }

    fn subscribe_from(id: u64, addr: Recipient<Deliver>, since: Since) -> SubscribeFrom {
        SubscribeFrom {
            subscribe: Subscribe {
                id: ObserverId(id),
                addr,
                pattern: None,
                backlog: LiveBacklog::new(1_000_000),
            },
            since,
        }
    }

    #[actix::test]
    async fn every_event_carries_its_position() {
        let observable = Observable::create(|_| Observable::new().with_history(10));
        let (addr, mut rx) = probe(16, None);
        subscribe(&observable, addr.recipient(), 100).await;
        observable
            .send(publish(vec![event("a", 1), event("a", 2)]))
            .await
            .expect("alive");
        let got = rx.recv().await.expect("delivery");
        assert_eq!(positions(&got), [1, 2]);
        let v: serde_json::Value = serde_json::from_str(got.events[1].json()).expect("JSON");
        assert_eq!(v["position"], 2);
        assert_eq!(v["message_id"], "m-2");
    }

    #[actix::test]
    async fn a_resume_meets_the_live_stream_with_no_duplicate_and_no_hole() {
        let observable = Observable::create(|ctx| {
            ctx.set_mailbox_capacity(1024);
            Observable::new().with_history(1000)
        });
        // 50 events before the client comes back; it had seen up to 20.
        for n in 1..=50 {
            observable
                .send(publish(vec![event("a", n)]))
                .await
                .expect("alive");
        }
        let (addr, mut rx) = probe(1000, None);
        // The resume is queued between chunks still arriving: the seam is
        // wherever the Observable's mailbox puts it.
        // Every message is queued at once (`send` enqueues when called).
        let mut requests: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = _>>>> = Vec::new();
        for n in 51..=60 {
            requests.push(Box::pin(observable.send(publish(vec![event("a", n)]))));
        }
        requests.push(Box::pin(observable.send(subscribe_from(
            1,
            addr.clone().recipient(),
            Since::After(20),
        ))));
        for n in 61..=70 {
            requests.push(Box::pin(observable.send(publish(vec![event("a", n)]))));
        }
        for request in requests {
            request.await.expect("alive");
        }
        let mut seen = Vec::new();
        while seen.last() != Some(&70) {
            let got = rx.recv().await.expect("delivery");
            assert_eq!(got.missed, 0);
            seen.extend(positions(&got));
        }
        assert_eq!(seen, (21..=70).collect::<Vec<u64>>());
    }

    #[actix::test]
    async fn a_resume_beyond_the_ring_is_told_the_exact_gap() {
        let upstream = DroppedCopies::default();
        let observable = Observable::create({
            let upstream = upstream.clone();
            move |_| Observable::with_upstream(upstream).with_history(10)
        });
        for n in 1..=30 {
            observable
                .send(publish(vec![event("a", n)]))
                .await
                .expect("alive");
        }
        // The Tap dropped 4 copies, then 5 more events came (31..=35).
        upstream.add(4);
        observable
            .send(publish((31..=35).map(|n| event("a", n)).collect()))
            .await
            .expect("alive");
        let (addr, mut rx) = probe(16, None);
        observable
            .send(subscribe_from(1, addr.recipient(), Since::After(5)))
            .await
            .expect("alive");
        let got = rx.recv().await.expect("the replay");
        // Held: 26..=35. Missed: 6..=25 evicted (20) and the 4 dropped copies.
        assert_eq!(positions(&got), (26..=35).collect::<Vec<u64>>());
        assert_eq!(got.missed, 20 + 4);
        // Received + missed == every event after 5 (30 received by the
        // Observable after 5, plus the 4 the Tap dropped).
        assert_eq!(got.events.len() as u64 + got.missed, 30 + 4);
    }

    #[actix::test]
    async fn a_replay_counts_its_freshness_from_the_replay_not_the_events_age() {
        let observable = Observable::create(|_| Observable::new().with_history(10));
        // `event()` was received in 2023: far older than any `WS_MAX_LAG`.
        observable
            .send(publish((1..=3).map(|n| event("a", n)).collect()))
            .await
            .expect("alive");
        let (addr, mut rx) = probe(16, None);
        let asked = SystemTime::now();
        observable
            .send(subscribe_from(1, addr.recipient(), Since::After(0)))
            .await
            .expect("alive");
        let got = rx.recv().await.expect("the replay");
        assert_eq!(positions(&got), [1, 2, 3]);
        for replayed in got.events.iter() {
            // The Observer ages the replay from now, so it is handed over…
            assert!(replayed.received_at() >= asked, "{replayed:?}");
            // …while the event itself still says when Sluice received it.
            let v: serde_json::Value = serde_json::from_str(replayed.json()).expect("JSON");
            assert_eq!(v["received_at"], "2023-11-14T22:13:20.123Z");
        }
    }

    #[actix::test]
    async fn the_last_events_are_shown_at_once_to_a_new_page() {
        let observable = Observable::create(|_| Observable::new().with_history(100));
        for n in 1..=30 {
            observable
                .send(publish(vec![event("a", n)]))
                .await
                .expect("alive");
        }
        let (addr, mut rx) = probe(16, None);
        observable
            .send(subscribe_from(1, addr.recipient(), Since::Last(5)))
            .await
            .expect("alive");
        let got = rx.recv().await.expect("the last five");
        assert_eq!((positions(&got), got.missed), (vec![26, 27, 28, 29, 30], 0));
    }

    #[actix::test]
    async fn the_feed_tells_its_gaps_to_live_and_resuming_clients_alike() {
        let observable = Observable::create(|_| Observable::new().with_history(100));
        let (live, mut live_rx) = probe(16, None);
        subscribe(&observable, live.recipient(), 100).await;
        let at = |p: u64| Arc::new(LiveEvent::positioned(p, "k", "{}", SystemTime::now()));
        // Offsets 10, 11, then 2 publishes lost, then 12; then a reconnect
        // skipped offsets 13..=14 whose 2 events show as a gap too.
        observable
            .send(Feed {
                events: vec![(0, at(10)), (0, at(11)), (2, at(12)), (2, at(15))],
                missed_after: 0,
                permit: None,
            })
            .await
            .expect("alive");
        let got = live_rx.recv().await.expect("delivery");
        assert_eq!((positions(&got), got.missed), (vec![10, 11, 12, 15], 4));
        let (late, mut late_rx) = probe(16, None);
        observable
            .send(subscribe_from(2, late.recipient(), Since::After(10)))
            .await
            .expect("alive");
        let got = late_rx.recv().await.expect("replay");
        assert_eq!((positions(&got), got.missed), (vec![11, 12, 15], 4));
    }

    #[actix::test]
    async fn a_resume_ahead_of_this_instance_skips_what_the_client_has() {
        // Another instance's client saw up to position 12; this instance has
        // read the shared stream up to 10 only.
        let observable =
            Observable::create(|_| Observable::new().with_history(100).with_shared_positions());
        let at = |p: u64| {
            (
                0,
                Arc::new(LiveEvent::positioned(p, "k", "{}", SystemTime::now())),
            )
        };
        observable
            .send(Feed {
                events: (1..=10).map(at).collect(),
                missed_after: 0,
                permit: None,
            })
            .await
            .expect("alive");
        let (addr, mut rx) = probe(16, None);
        observable
            .send(subscribe_from(1, addr.recipient(), Since::After(12)))
            .await
            .expect("alive");
        observable
            .send(Feed {
                events: (11..=15).map(at).collect(),
                missed_after: 0,
                permit: None,
            })
            .await
            .expect("alive");
        let got = rx.recv().await.expect("delivery");
        assert_eq!((positions(&got), got.missed), (vec![13, 14, 15], 0));
    }
}
