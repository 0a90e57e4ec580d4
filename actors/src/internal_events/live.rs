//! Instrumentation of the live path (Tap copies, Observable, Observer, WebSocket sessions).
//!
//! Log lines are written for changes of state only (a session opens, closes,
//! starts lagging, is refused), never once per event: under load the live
//! path handles many thousands of events a second and drops are expected.
//! Counters carry the volume.

use std::time::Duration;

/// Where on the live path events were dropped; the `where` label of
/// `sluice_live_dropped_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropStage {
    /// The Observable found an observer's mailbox full.
    Observable,
    /// The Observer's own buffer was full (its client reads too slowly).
    Observer,
    /// The events were older than `WS_MAX_LAG` by the time the client could
    /// take them (the Observer skipped them to stay fresh).
    Stale,
}

impl DropStage {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropStage::Observable => "observable",
            DropStage::Observer => "observer",
            DropStage::Stale => "stale",
        }
    }
}

/// The Tap found the Observable's mailbox full and dropped its copy of a chunk.
#[derive(Debug, Clone, Copy)]
pub struct TapCopyDropped {
    /// Events in the dropped chunk.
    pub events: usize,
}

impl TapCopyDropped {
    /// Records the drop (`sluice_tap_dropped_events_total`). No log line: this
    /// happens per chunk under load.
    pub fn emit(self) {
        metrics::counter!("sluice_tap_dropped_events_total").increment(self.events as u64);
    }
}

/// Events dropped on the way to one WebSocket client.
#[derive(Debug, Clone, Copy)]
pub struct LiveEventsDropped {
    /// Where they were dropped.
    pub stage: DropStage,
    /// How many.
    pub events: u64,
}

impl LiveEventsDropped {
    /// Records the drop (`sluice_live_dropped_events_total{where}`). No log
    /// line; [`ObserverLagging`] reports the change of state.
    pub fn emit(self) {
        metrics::counter!("sluice_live_dropped_events_total", "where" => self.stage.as_str())
            .increment(self.events);
    }
}

/// The live path started or stopped yielding to the datastore path (see
/// [`crate::saturation`]).
#[derive(Debug, Clone, Copy)]
pub struct LiveYielding {
    /// Whether it yields from now on.
    pub yielding: bool,
    /// Whether a backlog at the broker is (one of) the reason(s); else the
    /// prefetch window is full.
    pub backlog: bool,
}

impl LiveYielding {
    /// Logs the change at debug level (every drain starts and ends one)
    /// and sets `sluice_live_yielding` (1 while yielding); counts the
    /// episodes in `sluice_live_yield_episodes_total`.
    pub fn emit(self) {
        metrics::gauge!("sluice_live_yielding").set(if self.yielding { 1.0 } else { 0.0 });
        if self.yielding {
            metrics::counter!("sluice_live_yield_episodes_total").increment(1);
            log::debug!(
                "the datastore path is behind ({}): the live path yields",
                if self.backlog {
                    "a backlog waits at the broker"
                } else {
                    "the prefetch window is full"
                }
            );
        } else {
            log::debug!("the datastore path caught up: the live path sends all it can");
        }
    }
}

/// An observer started losing events after keeping up (or since it joined).
#[derive(Debug, Clone, Copy)]
pub struct ObserverLagging {
    /// The observer's id.
    pub observer: u64,
    /// Where the first drop happened.
    pub stage: DropStage,
}

impl ObserverLagging {
    /// Logs the change of state, at debug level: a slow browser is normal.
    pub fn emit(self) {
        log::debug!(
            "observer {} is lagging: events dropped at the {}",
            self.observer,
            self.stage.as_str()
        );
    }
}

/// A WebSocket session's observer started.
#[derive(Debug, Clone, Copy)]
pub struct ObserverConnected {
    /// The observer's id.
    pub observer: u64,
    /// Observers connected now, this one included.
    pub connected: usize,
}

impl ObserverConnected {
    /// Logs the session and sets `sluice_observers_connected`.
    pub fn emit(self) {
        log::debug!(
            "observer {} connected ({} connected)",
            self.observer,
            self.connected
        );
        metrics::gauge!("sluice_observers_connected").set(self.connected as f64);
    }
}

/// A WebSocket session's observer stopped.
#[derive(Debug, Clone)]
pub struct ObserverDisconnected {
    /// The observer's id.
    pub observer: u64,
    /// Observers still connected.
    pub connected: usize,
    /// Why it stopped (the close reason sent, or what the client did).
    pub reason: String,
    /// Events it dropped in total (its own buffer and upstream).
    pub dropped: u64,
    /// How long the session lasted.
    pub lasted: Duration,
}

impl ObserverDisconnected {
    /// Logs the end of the session and sets `sluice_observers_connected`.
    pub fn emit(self) {
        log::debug!(
            "observer {} disconnected after {:?}: {} ({} events dropped; {} connected)",
            self.observer,
            self.lasted,
            self.reason,
            self.dropped,
            self.connected
        );
        metrics::gauge!("sluice_observers_connected").set(self.connected as f64);
    }
}

/// A WebSocket upgrade was refused before it started.
#[derive(Debug, Clone, Copy)]
pub struct WebSocketRefused {
    /// The HTTP status answered.
    pub status: u16,
    /// Why, as a short metric label (`origin`, `auth`, `limit`, `topic`, `handshake`).
    pub reason: &'static str,
}

impl WebSocketRefused {
    /// Logs at debug level (refusals can be driven by anyone on the network)
    /// and counts `sluice_ws_refused_total{reason}`.
    pub fn emit(self) {
        log::debug!(
            "WebSocket upgrade refused with {}: {}",
            self.status,
            self.reason
        );
        metrics::counter!("sluice_ws_refused_total", "reason" => self.reason).increment(1);
    }
}
