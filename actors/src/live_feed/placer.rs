//! The one rule every reader of the stream applies to each message: which
//! of its entries are shown, where, and how many events went missing just
//! before it.
//!
//! - An entry whose sequence number its origin already used is an entry
//!   published again after a reconnect ([`Gaps`]): not shown, not counted.
//! - A jump in an origin's sequence numbers is that many events missed.
//! - An entry whose message id is in the [`Dedupe`] window is a copy made
//!   again after a redelivery: not shown, not counted.
//! - Every other entry is shown, at its position
//!   ([`wire::position`]).
//!
//! The rule depends on the stream's content only, so every instance decides
//! alike (given it read the window before), and a decision recorded in the
//! [`Ledger`](super::ledger::Ledger) can be applied again to the same message
//! later, for a client that resumes.

use std::sync::Arc;

use lapin::types::FieldTable;

use super::dedupe::Dedupe;
use super::gaps::Gaps;
use super::wire::{self, COUNT_HEADER, ORIGIN_HEADER, SEQ_HEADER};
use crate::event::headers;
use crate::live_event::LiveEvent;

/// What a reader made of one message.
#[derive(Debug, Default)]
pub struct Placement {
    /// Events missed just before this message's entries.
    pub gap: u64,
    /// The entries shown, in order, placed.
    pub shown: Vec<Arc<LiveEvent>>,
    /// The indices of the entries not shown (published again, or copies).
    pub hidden: Vec<u16>,
    /// Entries in the message.
    pub entries: u16,
}

/// A batch's origin and numbering, from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbering {
    /// The publishing process.
    pub origin: String,
    /// The sequence number of the first entry.
    pub first_seq: u64,
    /// Entries in the body.
    pub count: u64,
}

impl Numbering {
    /// Reads the numbering headers; `None` for a message Sluice did not write.
    pub fn of(headers: &FieldTable) -> Option<Numbering> {
        let get = |name: &str| headers.inner().get(name);
        Some(Numbering {
            origin: get(ORIGIN_HEADER).and_then(headers::as_text)?,
            first_seq: get(SEQ_HEADER).and_then(headers::as_u64)?,
            count: get(COUNT_HEADER).and_then(headers::as_u64)?,
        })
    }
}

/// Per-origin sequences and the window of recent ids: what one reader
/// carries from message to message.
#[derive(Debug, Default)]
pub struct Placer {
    gaps: Gaps,
    dedupe: Dedupe,
}

impl Placer {
    /// Nothing read yet.
    pub fn new() -> Placer {
        Placer::default()
    }

    /// Applies the rule to the message at `offset`. `Err` for a message
    /// Sluice did not write (or cannot read): it places nothing.
    pub fn place(
        &mut self,
        offset: u64,
        headers: &FieldTable,
        body: &[u8],
    ) -> Result<Placement, String> {
        let numbering = Numbering::of(headers)
            .ok_or_else(|| "no x-sluice-origin, x-sluice-seq or x-sluice-count".to_owned())?;
        let entries = wire::decode(body)?;
        if entries.len() as u64 != numbering.count || entries.len() > wire::MAX_ENTRIES {
            return Err(format!(
                "{} entries where x-sluice-count says {}",
                entries.len(),
                numbering.count
            ));
        }
        let observed = self
            .gaps
            .observe(&numbering.origin, numbering.first_seq, numbering.count);
        self.dedupe.begin(offset);
        let mut placement = Placement {
            gap: observed.gap,
            shown: Vec::with_capacity(entries.len()),
            hidden: Vec::new(),
            entries: entries.len() as u16,
        };
        for (index, entry) in entries.iter().enumerate() {
            let repeated = (index as u64) < observed.repeated;
            if repeated || !self.dedupe.is_new(entry.message_id) {
                placement.hidden.push(index as u16);
                continue;
            }
            placement.shown.push(Arc::new(LiveEvent::placed(
                entry.fields(),
                wire::position(offset, index),
            )));
        }
        Ok(placement)
    }
}

/// Builds the headers of a batch (for the publisher and for tests).
pub fn headers(origin: &str, first_seq: u64, count: u64) -> FieldTable {
    use lapin::types::AMQPValue;
    let mut headers = FieldTable::default();
    headers.insert(ORIGIN_HEADER.into(), AMQPValue::LongString(origin.into()));
    headers.insert(
        SEQ_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(first_seq).unwrap_or(i64::MAX)),
    );
    headers.insert(
        COUNT_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(count).unwrap_or(i64::MAX)),
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventData;
    use crate::live_event::tests::event;

    fn ids(placement: &Placement) -> Vec<String> {
        placement
            .shown
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(e.json()).expect("JSON");
                v["message_id"].as_str().expect("id").to_owned()
            })
            .collect()
    }

    fn batch(origin: &str, first_seq: u64, events: &[Arc<EventData>]) -> (FieldTable, Vec<u8>) {
        (
            headers(origin, first_seq, events.len() as u64),
            wire::encode(events),
        )
    }

    #[test]
    fn entries_are_placed_at_their_message_and_index() {
        let mut placer = Placer::new();
        let (h, body) = batch("a", 1, &[event("k", 1), event("k", 2)]);
        let placement = placer.place(7, &h, &body).expect("placed");
        let positions: Vec<u64> = placement.shown.iter().map(|e| e.position()).collect();
        assert_eq!(positions, [70_001, 70_002]);
        assert_eq!((placement.gap, placement.entries), (0, 2));
    }

    #[test]
    fn a_copy_made_again_after_a_redelivery_is_shown_once() {
        let mut placer = Placer::new();
        let (h, body) = batch("a", 1, &[event("k", 1), event("k", 2)]);
        placer.place(0, &h, &body).expect("placed");
        // Instance b got message 2 again (a was killed before acking it).
        let (h, body) = batch("b", 1, &[event("k", 2), event("k", 3)]);
        let placement = placer.place(1, &h, &body).expect("placed");
        assert_eq!(ids(&placement), ["m-3"]);
        assert_eq!(placement.hidden, [0]);
        assert_eq!(placement.gap, 0, "a copy is not a miss");
    }

    #[test]
    fn a_batch_published_again_after_a_reconnect_adds_only_what_is_new() {
        let mut placer = Placer::new();
        let (h, body) = batch("a", 1, &[event("k", 1), event("k", 2)]);
        placer.place(0, &h, &body).expect("placed");
        // Unconfirmed at a reconnect: published again, with what came since.
        let (h, body) = batch("a", 1, &[event("k", 1), event("k", 2), event("k", 3)]);
        let placement = placer.place(1, &h, &body).expect("placed");
        assert_eq!(
            (ids(&placement), placement.hidden.clone()),
            (vec!["m-3".to_owned()], vec![0, 1])
        );
    }

    #[test]
    fn a_jump_in_an_origins_numbers_is_a_gap_before_the_message() {
        let mut placer = Placer::new();
        let (h, body) = batch("a", 1, &[event("k", 1)]);
        placer.place(0, &h, &body).expect("placed");
        // Copies 2..=4 were dropped by a; it numbered on.
        let (h, body) = batch("a", 5, &[event("k", 5)]);
        assert_eq!(placer.place(1, &h, &body).expect("placed").gap, 3);
        // A marker: numbered up to 7, nothing in it.
        let placement = placer
            .place(2, &headers("a", 8, 0), &wire::encode(&[]))
            .expect("marker");
        assert_eq!((placement.gap, placement.shown.len()), (2, 0));
    }

    #[test]
    fn a_message_sluice_did_not_write_places_nothing() {
        let mut placer = Placer::new();
        assert!(placer.place(0, &FieldTable::default(), b"{}").is_err());
        let (h, _) = batch("a", 1, &[event("k", 1)]);
        assert!(placer.place(1, &h, b"not postcard").is_err());
        let (_, body) = batch("a", 1, &[event("k", 1)]);
        assert!(
            placer.place(2, &headers("a", 1, 5), &body).is_err(),
            "wrong count"
        );
    }
}
