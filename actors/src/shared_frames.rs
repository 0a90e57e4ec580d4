//! WebSocket frames of live events, built once and shared by every Observer
//! that is handed the same selection of events.
//!
//! The Observable hands one selection (every event, or those a topic filter
//! matches) to many Observers at once. An Observer that is caught up writes
//! exactly the events of that selection, split into frames by the same
//! rule, so hundreds of sessions would each build, copy and encode the same
//! bytes. A [`SharedFrames`] travels with the selection instead: the first
//! Observer that needs its frames builds them, already encoded as WebSocket
//! frames, and the others send the same bytes (a reference count, not a
//! copy). An Observer whose frames must differ (behind, with events skipped
//! or dropped, or with a window shrunk for a slow client) builds its own.
//!
//! Plain data: what goes into a frame is the Observer's rule (see
//! `observer/buffer.rs`), applied once here through [`SharedFrames::get_or_build`].

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// The frames of one selection of events, built at most once, shared by
/// every clone (one per Observer it was handed to).
#[derive(Debug, Clone, Default)]
pub struct SharedFrames(Arc<OnceLock<Partition>>);

/// A selection of events split into frames.
#[derive(Debug)]
pub struct Partition {
    /// The most events a frame was allowed to hold.
    pub max_events: usize,
    /// The most bytes of events a frame was allowed to hold (one larger
    /// event still goes alone).
    pub max_bytes: usize,
    /// The frames, in order, covering the selection without gap.
    pub frames: Vec<SharedFrame>,
}

/// One frame of a [`Partition`].
#[derive(Debug)]
pub struct SharedFrame {
    /// The selection's events `start..end` are in it.
    pub start: usize,
    /// See `start`.
    pub end: usize,
    /// Bytes of its text (the JSON), which is what the Observer's window counts.
    pub text_len: usize,
    /// The whole WebSocket frame, header included, ready for the socket.
    pub encoded: Bytes,
}

impl SharedFrames {
    /// The partition, built by `build` if nobody built it yet.
    pub fn get_or_build(&self, build: impl FnOnce() -> Partition) -> &Partition {
        self.0.get_or_init(build)
    }
}

impl Partition {
    /// The frame that starts at event `start`, if one does.
    pub fn frame_at(&self, start: usize) -> Option<&SharedFrame> {
        self.frames
            .binary_search_by_key(&start, |frame| frame.start)
            .ok()
            .map(|i| &self.frames[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(start: usize, end: usize) -> SharedFrame {
        SharedFrame {
            start,
            end,
            text_len: 0,
            encoded: Bytes::new(),
        }
    }

    #[test]
    fn built_once_whoever_asks() {
        let shared = SharedFrames::default();
        let copy = shared.clone();
        let first = shared.get_or_build(|| Partition {
            max_events: 2,
            max_bytes: 10,
            frames: vec![frame(0, 2), frame(2, 3)],
        });
        assert_eq!(first.frames.len(), 2);
        let again = copy.get_or_build(|| panic!("built twice"));
        assert_eq!(again.max_events, 2);
        assert_eq!(again.frame_at(2).map(|f| f.end), Some(3));
        assert!(again.frame_at(1).is_none(), "1 is inside the first frame");
    }
}
