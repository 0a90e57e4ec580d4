//! Showing a copy made again only once: the window of message ids a reader
//! has just seen in the stream.
//!
//! A delivery whose copy reached the stream but which was not acked (its
//! instance was killed, the broker restarted) is delivered again, to the
//! same instance or another, and copied again under the same message id.
//! Every reader drops an entry whose id is among the ids of the last
//! [`WINDOW_MESSAGES`] stream messages before it (at most [`WINDOW_IDS`]
//! ids: the oldest whole messages leave first). The rule depends on the
//! stream's content alone, so every reader that has read those messages
//! decides alike: a reader attaching (or replaying for a resume) starts that
//! many messages earlier to know them.
//!
//! Redeliveries come back within a few prefetch windows of the first copy
//! (the broker puts them at the head of the queue), far inside the window.
//! Ids are kept as 64-bit hashes: two different ids in one window share a
//! hash with a probability of about 2⁻⁴⁴, which would hide one event.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};

/// Stream messages whose ids are remembered.
pub const WINDOW_MESSAGES: u64 = 4096;

/// Ids remembered at most.
pub const WINDOW_IDS: usize = 1 << 20;

/// The ids of the last messages read. See the module docs.
#[derive(Debug, Default)]
pub struct Dedupe {
    /// The hashes of the ids in the window.
    seen: HashSet<u64>,
    /// The window's messages, oldest first: their offset and their ids' hashes.
    messages: VecDeque<(u64, Vec<u64>)>,
    /// Ids in the window.
    ids: usize,
}

impl Dedupe {
    /// An empty window.
    pub fn new() -> Dedupe {
        Dedupe::default()
    }

    /// Starts the message at `offset`: messages that are now out of the
    /// window leave it.
    pub fn begin(&mut self, offset: u64) {
        while self
            .messages
            .front()
            .is_some_and(|(o, _)| o + WINDOW_MESSAGES < offset)
        {
            self.forget_oldest();
        }
        self.messages.push_back((offset, Vec::new()));
    }

    /// Whether `message_id`, in the message begun last, is new (and then
    /// remembered) or a copy already in the window.
    pub fn is_new(&mut self, message_id: &str) -> bool {
        let hash = hash(message_id);
        if !self.seen.insert(hash) {
            return false;
        }
        self.ids += 1;
        if let Some((_, hashes)) = self.messages.back_mut() {
            hashes.push(hash);
        }
        while self.ids > WINDOW_IDS && self.messages.len() > 1 {
            self.forget_oldest();
        }
        true
    }

    fn forget_oldest(&mut self) {
        let Some((_, hashes)) = self.messages.pop_front() else {
            return;
        };
        self.ids -= hashes.len();
        for hash in hashes {
            self.seen.remove(&hash);
        }
    }

    /// Ids in the window.
    pub fn len(&self) -> usize {
        self.ids
    }

    /// Whether the window holds no id.
    pub fn is_empty(&self) -> bool {
        self.ids == 0
    }
}

/// A 64-bit hash of `id`, the same in every process (fixed keys).
fn hash(id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_within_the_window_is_not_new() {
        let mut window = Dedupe::new();
        window.begin(0);
        assert!(window.is_new("a"));
        assert!(window.is_new("b"));
        assert!(!window.is_new("a"), "twice in one message");
        window.begin(1);
        assert!(!window.is_new("b"), "in the next message");
        assert!(window.is_new("c"));
        assert_eq!(window.len(), 3);
    }

    #[test]
    fn ids_leave_with_their_message() {
        let mut window = Dedupe::new();
        window.begin(10);
        assert!(window.is_new("old"));
        window.begin(10 + WINDOW_MESSAGES);
        assert!(!window.is_new("old"), "the last message inside the window");
        window.begin(10 + WINDOW_MESSAGES + 1);
        assert!(window.is_new("old"), "message 10 left the window");
    }

    #[test]
    fn the_window_is_bounded_in_ids() {
        let mut window = Dedupe::new();
        for offset in 0..3u64 {
            window.begin(offset);
            for i in 0..WINDOW_IDS / 2 {
                assert!(window.is_new(&format!("{offset}-{i}")));
            }
        }
        assert!(window.len() <= WINDOW_IDS);
        assert!(window.is_new("0-0"), "the oldest message left");
        assert!(!window.is_new("2-0"), "the newest is still there");
    }

    #[test]
    fn every_reader_decides_alike() {
        // Two readers, one starting later: from a window's length after the
        // later one started, they agree on every entry.
        let messages = 10 + WINDOW_MESSAGES as usize + 200;
        let stream: Vec<Vec<String>> = (0..messages as u64)
            .map(|o| {
                // One id that comes back every 1,000 messages, two new ones.
                vec![
                    format!("again-{}", o % 1_000),
                    format!("new-{o}-a"),
                    format!("new-{o}-b"),
                ]
            })
            .collect();
        let decide = |from: usize| -> Vec<(usize, bool)> {
            let mut window = Dedupe::new();
            let mut out = Vec::new();
            for (offset, ids) in stream.iter().enumerate().skip(from) {
                window.begin(offset as u64);
                for id in ids {
                    out.push((offset, window.is_new(id)));
                }
            }
            out
        };
        let agreed_from = 10 + WINDOW_MESSAGES as usize;
        let tail = |v: Vec<(usize, bool)>| {
            v.into_iter()
                .filter(|(o, _)| *o >= agreed_from)
                .collect::<Vec<_>>()
        };
        let early = tail(decide(0));
        assert_eq!(early, tail(decide(10)));
        assert!(early.iter().any(|(_, new)| !new), "the stream repeats ids");
        assert!(early.iter().any(|(_, new)| *new), "and has new ones");
    }
}
