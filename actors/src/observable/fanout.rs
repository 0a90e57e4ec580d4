//! The rules of the fan-out: which observer gets which events, and how what
//! an observer could not take is counted and told.
//!
//! - Observers with the same topic filter share one selection of a chunk;
//!   observers without a filter share the whole chunk (no copy either way).
//! - Every hand-over is a `try_send`, bounded in events by the observer's
//!   [`LiveBacklog`]: when it is full the events are counted as missed for
//!   that observer, and the count travels with the next [`Deliver`] that
//!   gets through (or alone, from the Observable's timer).
//! - An observer whose mailbox is closed is forgotten.
//! - A client that resumed from a position this instance has not read yet
//!   (the shared stream, read a little behind another instance) is not sent
//!   what it has again.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::{Deliver, ObserverId, Subscribe};
use crate::history::Replay;
use crate::internal_events::live::{DropStage, LiveEventsDropped, ObserverLagging};
use crate::live_event::LiveEvent;
use crate::messages::{LiveBacklog, LivePermit};
use crate::shared_frames::SharedFrames;
use crate::topic::TopicPattern;

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
    /// The last position among them.
    missed_through: u64,
    /// Whether the first miss was logged already (logged once per observer).
    lag_reported: bool,
    /// The client resumed after this position, which this instance has not
    /// reached yet: events up to it are not sent again. 0 when nothing is
    /// to be skipped.
    skip_through: u64,
}

/// Every subscribed observer, by id, and the fan-out to them.
#[derive(Debug, Default)]
pub(super) struct Registry {
    observers: HashMap<ObserverId, Registration>,
}

impl Registration {
    /// `events` more missed, the last at `through`.
    fn miss(&mut self, events: u64, through: u64) {
        if events > 0 {
            self.missed += events;
            self.missed_through = self.missed_through.max(through);
        }
    }

    /// A delivery of `events` (with the misses not told yet before them).
    fn deliver(
        &self,
        events: Arc<[Arc<LiveEvent>]>,
        permit: Option<LivePermit>,
        frames: SharedFrames,
    ) -> Deliver {
        Deliver {
            events,
            missed: self.missed,
            missed_through: self.missed_through,
            permit,
            frames,
        }
    }

    /// The misses were told.
    fn told(&mut self) {
        self.missed = 0;
        self.missed_through = 0;
    }
}

impl Registry {
    /// How many observers are subscribed.
    pub(super) fn len(&self) -> usize {
        self.observers.len()
    }

    /// Subscribes, or replaces the address and filter of an observer already
    /// subscribed (keeping its count of missed events).
    pub(super) fn subscribe(&mut self, msg: Subscribe) {
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
                    missed_through: 0,
                    lag_reported: false,
                    skip_through: 0,
                });
            }
        }
    }

    /// Forgets an observer.
    pub(super) fn unsubscribe(&mut self, id: ObserverId) {
        self.observers.remove(&id);
    }

    /// Marks `id` as having seen everything up to `position`, which this
    /// instance has not placed yet.
    pub(super) fn skip_through(&mut self, id: ObserverId, position: u64) {
        if let Some(registration) = self.observers.get_mut(&id) {
            registration.skip_through = position;
        }
    }

    /// Every observer missed `events` more, the last at `through` (told
    /// with its next delivery).
    pub(super) fn all_missed(&mut self, events: u64, through: u64) {
        if events == 0 {
            return;
        }
        for registration in self.observers.values_mut() {
            if registration.skip_through < through {
                registration.miss(events, through);
            }
        }
    }

    /// Sends each observer the misses it was not told of yet, alone.
    pub(super) fn report_misses(&mut self) {
        let mut closed = Vec::new();
        for (id, registration) in &mut self.observers {
            if registration.missed == 0 {
                continue;
            }
            let notice = registration.deliver(Arc::new([]), None, SharedFrames::default());
            match registration.addr.try_send(notice) {
                Ok(()) => registration.told(),
                Err(SendError::Full(_)) => {}
                Err(SendError::Closed(_)) => closed.push(*id),
            }
        }
        for id in closed {
            self.observers.remove(&id);
        }
    }

    /// Hands a resuming observer its replay, which it asked for: a new
    /// observer has nothing in flight, so its backlog admits the whole
    /// replay; its own buffer then keeps what it can and counts the rest.
    pub(super) fn deliver_replay(&mut self, id: ObserverId, replay: Replay) {
        let Some(registration) = self.observers.get_mut(&id) else {
            return;
        };
        for segment in replay.segments {
            registration.miss(segment.missed, segment.missed_through);
            if segment.events.is_empty() {
                continue;
            }
            let n = segment.events.len() as u64;
            let last = segment.events.last().map_or(0, |e| e.position());
            let events: Arc<[Arc<LiveEvent>]> = segment.events.into();
            let permit = registration.backlog.try_acquire(events.len());
            let deliver = registration.deliver(events, permit, SharedFrames::default());
            match registration.addr.try_send(deliver) {
                Ok(()) => registration.told(),
                Err(SendError::Full(_)) => registration.miss(n, last),
                Err(SendError::Closed(_)) => {
                    self.observers.remove(&id);
                    return;
                }
            }
        }
        if registration.missed > 0 {
            let notice = registration.deliver(Arc::new([]), None, SharedFrames::default());
            if registration.addr.try_send(notice).is_ok() {
                registration.told();
            }
        }
    }

    /// Hands `all` (and the count of events `missed` just before them, the
    /// last at `through`) to every observer whose filter matches, with
    /// `try_send`.
    pub(super) fn fan_out(&mut self, all: &Arc<[Arc<LiveEvent>]>, missed: u64, through: u64) {
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
                registration.miss(missed, through);
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
            let last = events.last().map_or(0, |e| e.position());
            // No permit: its mailbox already holds a buffer's worth of events.
            let sent = match registration.backlog.try_acquire(events.len()) {
                Some(permit) => {
                    registration
                        .addr
                        .try_send(registration.deliver(events, Some(permit), frames))
                }
                None => Err(SendError::Full(registration.deliver(events, None, frames))),
            };
            match sent {
                Ok(()) => registration.told(),
                Err(SendError::Full(_)) => {
                    registration.miss(n, last);
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
