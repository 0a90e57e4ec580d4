//! What this instance's feed reader decided about every stream message it
//! read, kept compactly, so that a client resuming from further back than
//! the ring is replayed with the very same decisions (every entry shown or
//! hidden as it was live, every gap where it was), and a client resuming
//! from before what the stream still holds is told exactly how many events
//! retention took.
//!
//! Two bytes per message (its entry count) plus a record for the rare
//! message with a gap or a hidden entry; at most [`MAX_MESSAGES`] messages
//! (the oldest are forgotten first), which at a full drain is hours of a
//! stream — more than its default retention of one hour.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use super::placer::Placement;
use super::wire;

/// Messages remembered at most (8 MiB of counts).
pub const MAX_MESSAGES: usize = 1 << 22;

/// What was decided about one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Entries in the message.
    pub entries: u16,
    /// Events missed just before its entries.
    pub gap: u64,
    /// The entries not shown.
    pub hidden: Vec<u16>,
}

impl Decision {
    /// Events told by this message: its gap and the entries shown.
    pub fn told(&self) -> u64 {
        self.gap + u64::from(self.entries) - self.hidden.len() as u64
    }

    /// Entries shown after `index`.
    fn shown_after(&self, index: u64) -> u64 {
        let after = u64::from(self.entries).saturating_sub(index + 1);
        let hidden_after = self
            .hidden
            .iter()
            .filter(|&&h| u64::from(h) > index)
            .count() as u64;
        after - hidden_after
    }
}

/// The decisions about a run of consecutive stream messages.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The offset of `counts[0]`.
    base: u64,
    /// Entries per message, by offset from `base`.
    counts: VecDeque<u16>,
    /// Messages with a gap or a hidden entry.
    exceptions: BTreeMap<u64, (u64, Vec<u16>)>,
}

impl Ledger {
    /// Nothing recorded yet.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Records the decision about the message at `offset` (`None`: a message
    /// Sluice did not write, which places nothing). Offsets must follow one
    /// another; a jump (a reconnect that skipped some) starts the record anew.
    pub fn record(&mut self, offset: u64, placement: Option<&Placement>) {
        if self.counts.is_empty() || offset != self.next_offset() {
            if offset < self.next_offset() && !self.counts.is_empty() {
                return; // Read again after a reconnect: already recorded.
            }
            self.base = offset;
            self.counts.clear();
            self.exceptions.clear();
        }
        let (entries, gap, hidden) = match placement {
            Some(p) => (p.entries, p.gap, p.hidden.clone()),
            None => (0, 0, Vec::new()),
        };
        self.counts.push_back(entries);
        if gap > 0 || !hidden.is_empty() {
            self.exceptions.insert(offset, (gap, hidden));
        }
        if self.counts.len() > MAX_MESSAGES {
            self.counts.pop_front();
            self.base += 1;
            let base = self.base;
            self.exceptions.retain(|&o, _| o >= base);
        }
    }

    /// The offset after the last one recorded.
    pub fn next_offset(&self) -> u64 {
        self.base + self.counts.len() as u64
    }

    /// Whether the message at `offset` is recorded.
    pub fn covers(&self, offset: u64) -> bool {
        !self.counts.is_empty() && offset >= self.base && offset < self.next_offset()
    }

    /// The decision about the message at `offset`, if recorded.
    pub fn decision(&self, offset: u64) -> Option<Decision> {
        if !self.covers(offset) {
            return None;
        }
        let entries = self.counts[(offset - self.base) as usize];
        let (gap, hidden) = self.exceptions.get(&offset).cloned().unwrap_or_default();
        Some(Decision {
            entries,
            gap,
            hidden,
        })
    }

    /// Events told strictly after `position` and before the message at
    /// `until` (exclusive), if every message in between is recorded.
    pub fn told_between(&self, position: u64, until: u64) -> Option<u64> {
        let (offset, index) = wire::offset_of(position);
        if until <= offset {
            return Some(0);
        }
        let first = self.decision(offset)?;
        if !self.covers(until - 1) {
            return None;
        }
        let mut told = first.shown_after(index);
        for o in offset + 1..until {
            told += self.decision(o)?.told();
        }
        Some(told)
    }
}

/// The ledger as this instance shares it: its reader records, its replays
/// read, and a replay that got ahead of the reader waits for it.
#[derive(Debug)]
pub struct SharedLedger {
    ledger: Mutex<Ledger>,
    /// The offset after the last one recorded.
    recorded: watch::Sender<u64>,
}

impl Default for SharedLedger {
    fn default() -> Self {
        SharedLedger {
            ledger: Mutex::new(Ledger::new()),
            recorded: watch::channel(0).0,
        }
    }
}

impl SharedLedger {
    /// Nothing recorded yet.
    pub fn new() -> SharedLedger {
        SharedLedger::default()
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // Consistent after every call, whatever panicked while holding it.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// See [`Ledger::record`]; wakes the replays waiting for it.
    pub fn record(&self, offset: u64, placement: Option<&Placement>) {
        let next = {
            let mut ledger = self.lock();
            ledger.record(offset, placement);
            ledger.next_offset()
        };
        self.recorded.send_replace(next);
    }

    /// See [`Ledger::covers`].
    pub fn covers(&self, offset: u64) -> bool {
        self.lock().covers(offset)
    }

    /// See [`Ledger::told_between`].
    pub fn told_between(&self, position: u64, until: u64) -> Option<u64> {
        self.lock().told_between(position, until)
    }

    /// The decision about the message at `offset`, waiting for the reader
    /// to make it if it has not read that far yet; `None` if it never will
    /// (the record starts after it).
    pub async fn decision(&self, offset: u64) -> Option<Decision> {
        let mut recorded = self.recorded.subscribe();
        loop {
            {
                let ledger = self.lock();
                if ledger.covers(offset) {
                    return ledger.decision(offset);
                }
                if !ledger.counts.is_empty() && offset < ledger.base {
                    return None;
                }
            }
            if *recorded.borrow_and_update() > offset {
                continue; // Recorded meanwhile.
            }
            recorded.changed().await.ok()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(entries: u16, gap: u64, hidden: &[u16]) -> Placement {
        Placement {
            gap,
            shown: Vec::new(),
            hidden: hidden.to_vec(),
            entries,
        }
    }

    #[test]
    fn decisions_are_given_back_as_they_were_made() {
        let mut ledger = Ledger::new();
        ledger.record(5, Some(&placed(3, 0, &[])));
        ledger.record(6, Some(&placed(2, 4, &[1])));
        ledger.record(7, None);
        assert_eq!(
            ledger.decision(6),
            Some(Decision {
                entries: 2,
                gap: 4,
                hidden: vec![1]
            })
        );
        assert_eq!(ledger.decision(7).map(|d| d.told()), Some(0));
        assert!(ledger.decision(4).is_none() && ledger.decision(8).is_none());
    }

    #[test]
    fn what_retention_took_is_counted_exactly() {
        let mut ledger = Ledger::new();
        ledger.record(10, Some(&placed(3, 0, &[])));
        ledger.record(11, Some(&placed(2, 4, &[1])));
        ledger.record(12, Some(&placed(5, 0, &[])));
        // A client that saw entry 0 of message 10; the stream now starts at 12.
        let seen = wire::position(10, 0);
        assert_eq!(ledger.told_between(seen, 12), Some(2 + (4 + 1)));
        // Entry 1 of 11 was hidden: one after entry 0 there.
        assert_eq!(ledger.told_between(wire::position(11, 0), 13), Some(5));
        assert_eq!(ledger.told_between(seen, 10), Some(0));
        assert_eq!(
            ledger.told_between(wire::position(9, 0), 12),
            None,
            "not recorded"
        );
        assert_eq!(ledger.told_between(seen, 14), None, "not read yet");
    }

    #[test]
    fn a_jump_in_offsets_starts_anew_and_a_reread_is_ignored() {
        let mut ledger = Ledger::new();
        ledger.record(1, Some(&placed(1, 0, &[])));
        ledger.record(2, Some(&placed(1, 0, &[])));
        ledger.record(1, Some(&placed(9, 9, &[])));
        assert_eq!(ledger.decision(1).map(|d| d.entries), Some(1));
        ledger.record(50, Some(&placed(2, 0, &[])));
        assert!(!ledger.covers(2) && ledger.covers(50));
    }

    #[tokio::test]
    async fn a_replay_ahead_of_the_reader_waits_for_its_decision() {
        let shared = std::sync::Arc::new(SharedLedger::new());
        shared.record(0, Some(&placed(1, 0, &[])));
        let waiting = tokio::spawn({
            let shared = shared.clone();
            async move { shared.decision(2).await }
        });
        shared.record(1, Some(&placed(2, 0, &[])));
        shared.record(2, Some(&placed(3, 5, &[])));
        let decision = waiting.await.expect("the waiter");
        assert_eq!(decision.map(|d| (d.entries, d.gap)), Some((3, 5)));
        // Before the record: never recorded, no wait.
        shared.record(50, Some(&placed(1, 0, &[])));
        assert_eq!(shared.decision(3).await, None);
    }
}
