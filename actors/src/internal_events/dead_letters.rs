//! Instrumentation of what operators do with dead letters (`sluice
//! dead-letters`, `POST /api/dead-letters/replay`), and of replayed letters
//! arriving back on the ingest path.
//!
//! `reason` labels are the reasons' header values (`overflow`, …) and
//! `unsorted` for the letters of `P.dead`.

use metrics::counter;

/// Letters were put back on the ingest path: each republish confirmed by the
/// broker, then the letter acked off its dead-letter queue.
#[derive(Debug)]
pub struct LettersReplayed<'a> {
    /// The queue's reason (or `unsorted`).
    pub reason: &'a str,
    /// How many.
    pub count: u64,
    /// Letters left where they were because they were replayed too often
    /// already (moved to the back of their queue).
    pub skipped: u64,
}

impl LettersReplayed<'_> {
    pub fn emit(self) {
        counter!("sluice_dead_letters_replayed_total", "reason" => self.reason.to_owned())
            .increment(self.count);
        if self.count == 0 && self.skipped == 0 {
            return;
        }
        log::info!(
            "replayed {} dead letter(s) ({}); {} skipped, past their replay limit",
            self.count,
            self.reason,
            self.skipped
        );
    }
}

/// Letters were deleted from their dead-letter queue for good.
#[derive(Debug)]
pub struct LettersDiscarded<'a> {
    /// The queue's reason (or `unsorted`).
    pub reason: &'a str,
    /// How many.
    pub count: u64,
}

impl LettersDiscarded<'_> {
    pub fn emit(self) {
        counter!("sluice_dead_letters_discarded_total", "reason" => self.reason.to_owned())
            .increment(self.count);
        if self.count == 0 {
            return;
        }
        log::warn!(
            "discarded {} dead letter(s) ({}) for good",
            self.count,
            self.reason
        );
    }
}

/// Deliveries a replay had put back arrived on the ingest path (whoever
/// replayed them: this instance, another one, or `sluice dead-letters
/// replay`). A redelivery counts again.
#[derive(Debug)]
pub struct ReplayedReceived<'a> {
    /// The reason they had been dead for (their `x-sluice-reason`).
    pub reason: &'a str,
    /// How many.
    pub count: u64,
}

impl ReplayedReceived<'_> {
    pub fn emit(self) {
        counter!("sluice_replayed_events_received_total", "reason" => self.reason.to_owned())
            .increment(self.count);
    }
}
