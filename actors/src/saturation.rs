//! Whether the datastore path is behind, as a signal the live path reads to
//! give it the cores: while it is, the live path yields (see
//! [`crate::observable`] and [`crate::observer`]).
//!
//! "Behind" means events wait to be stored, which the Consumer sees in two
//! places:
//!
//! - **a backlog at the broker**: more than a prefetch window of messages
//!   ready in the ingest queue (asked every
//!   [`BACKLOG_PROBE_EVERY`](crate::consumer::BACKLOG_PROBE_EVERY)). A
//!   drain that the broker's delivery limits, with Sluice keeping up with
//!   every delivery, is behind this way;
//! - **a full prefetch window**: three quarters of it unacked, when rows
//!   commit slower than deliveries arrive (a slow database).
//!
//! Each turns on at its mark and off only below a quarter of it, so that a
//! drain (where each commit frees a batch for a moment) reads as one
//! episode, not as a flicker. A stream the database keeps up with holds a
//! few deliveries in flight and nothing ready, far from either mark: the
//! live path then sends every client all it can read.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::internal_events::live::LiveYielding;

/// The shared signal. Cloning shares it. See the module docs.
#[derive(Debug, Clone)]
pub struct Saturation(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// The prefetch window, in deliveries; 0: never behind.
    window: u64,
    /// Which of the two ways it is behind ([`UNACKED`], [`READY`]).
    behind: AtomicU8,
}

/// The prefetch window is (three quarters) full.
const UNACKED: u8 = 1;
/// A window's worth of messages waits at the broker.
const READY: u8 = 2;

impl Saturation {
    /// The signal for a prefetch window of `window` deliveries.
    pub fn new(window: u16) -> Saturation {
        Saturation(Arc::new(Inner {
            window: u64::from(window),
            behind: AtomicU8::new(0),
        }))
    }

    /// A signal that never says behind: the live path never yields.
    pub fn never() -> Saturation {
        Saturation::new(0)
    }

    /// Notes that `unacked` deliveries are in flight (read, not yet acked):
    /// behind from three quarters of the window until below a quarter.
    /// Called by the Consumer (its reader and its actor).
    pub fn note_unacked(&self, unacked: u64) {
        let window = self.0.window;
        self.note(UNACKED, unacked * 4 >= window * 3, unacked * 4 < window);
    }

    /// Notes that `ready` messages wait in the ingest queue at the broker:
    /// behind from a window's worth until below a quarter of one.
    pub fn note_ready(&self, ready: u64) {
        let window = self.0.window;
        self.note(READY, ready >= window, ready * 4 < window);
    }

    /// Sets `way` when `on`, clears it when `off`; reports a change of the
    /// whole signal.
    fn note(&self, way: u8, on: bool, off: bool) {
        let inner = &self.0;
        if inner.window == 0 {
            return;
        }
        let (before, after) = if on {
            let before = inner.behind.fetch_or(way, Ordering::Relaxed);
            (before, before | way)
        } else if off {
            let before = inner.behind.fetch_and(!way, Ordering::Relaxed);
            (before, before & !way)
        } else {
            return;
        };
        if (before == 0) != (after == 0) {
            LiveYielding {
                yielding: after != 0,
                backlog: after & READY != 0,
            }
            .emit();
        }
    }

    /// Whether the datastore path is behind now.
    pub fn is_behind(&self) -> bool {
        self.0.behind.load(Ordering::Relaxed) != 0
    }
}

impl Default for Saturation {
    fn default() -> Self {
        Saturation::never()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_from_three_quarters_of_the_window_until_below_a_quarter() {
        let s = Saturation::new(2000);
        s.note_unacked(10);
        assert!(!s.is_behind(), "a few in flight is keeping up");
        s.note_unacked(1499);
        assert!(!s.is_behind(), "below three quarters");
        s.note_unacked(1500);
        assert!(s.is_behind(), "three quarters of the window");
        s.note_unacked(1000);
        assert!(
            s.is_behind(),
            "a commit freed a batch: still the same drain"
        );
        s.note_unacked(500);
        assert!(s.is_behind(), "a quarter is still behind");
        s.note_unacked(499);
        assert!(!s.is_behind(), "below a quarter: caught up");
        s.note_unacked(1000);
        assert!(!s.is_behind(), "half the window again is not yet behind");
    }

    #[test]
    fn a_backlog_at_the_broker_is_behind_until_it_is_drained() {
        let s = Saturation::new(2000);
        s.note_ready(1999);
        assert!(!s.is_behind(), "less than a window waits");
        s.note_ready(100_000);
        s.note_unacked(3);
        assert!(
            s.is_behind(),
            "a backlog, Sluice keeping up with its deliveries"
        );
        s.note_ready(600);
        assert!(s.is_behind(), "the end of the drain is still the drain");
        s.note_ready(0);
        assert!(!s.is_behind(), "drained");
    }

    #[test]
    fn behind_while_either_says_so() {
        let s = Saturation::new(2000);
        s.note_ready(5000);
        s.note_unacked(2000);
        s.note_ready(0);
        assert!(s.is_behind(), "the window is still full");
        s.note_unacked(0);
        assert!(!s.is_behind());
    }

    #[test]
    fn a_window_of_one_is_behind_with_one_in_flight() {
        let s = Saturation::new(1);
        s.note_unacked(1);
        assert!(s.is_behind());
        s.note_unacked(0);
        assert!(!s.is_behind());
    }

    #[test]
    fn never_is_never_behind() {
        let s = Saturation::never();
        s.note_unacked(u64::from(u16::MAX));
        s.note_ready(u64::MAX / 8);
        assert!(!s.is_behind());
        let shared = s.clone();
        shared.note_unacked(1_000_000);
        assert!(!s.is_behind());
    }
}
