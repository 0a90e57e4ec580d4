//! The acker of one channel generation: sends `basic.ack(multiple = true)`
//! for the newest ackable tag, in order, without making anyone wait for it.
//!
//! The Consumer actor decides *what* may be acked (the contiguous settled
//! watermark) and hands the tag over here; a send replaces the tag not yet
//! sent, so this holds one number whatever the rate (bounded), and acks are
//! coalesced by themselves when the broker connection is slower than the
//! commits. Tags only grow, and one task sends them, so the broker never sees
//! a `multiple` ack below one it already had.
//!
//! Once an ack is handed to the connection, the acker records how long each
//! delivery it covers took from receipt ([`ReceivedTimes`], filled by the
//! reader): `sluice_received_to_acked_seconds`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::watch;

use crate::internal_events::datastore::Acked;

/// When the deliveries not yet acked were read: one entry per chunk the
/// reader took (its deliveries have consecutive tags and one receipt time),
/// so it holds at most one entry per unacked delivery, bounded by the
/// prefetch window.
#[derive(Debug, Default)]
pub(super) struct ReceivedTimes {
    /// `(last tag of a chunk, when it was read)`, oldest first.
    chunks: VecDeque<(u64, SystemTime)>,
    /// Every tag up to this one was acked and recorded.
    acked_through: u64,
}

impl ReceivedTimes {
    /// The reader read the deliveries up to `last_tag` (those after the
    /// previous chunk's) at `at`.
    pub(super) fn read(&mut self, last_tag: u64, at: SystemTime) {
        self.chunks.push_back((last_tag, at));
    }

    /// Every delivery up to `tag` is acked: returns, per chunk, when its
    /// deliveries were read and how many of them this ack covers.
    pub(super) fn acked(&mut self, tag: u64) -> Vec<(SystemTime, usize)> {
        let mut covered = Vec::new();
        while let Some(&(last, at)) = self.chunks.front() {
            if tag <= self.acked_through {
                break;
            }
            let through = last.min(tag);
            let count = through.saturating_sub(self.acked_through);
            if count > 0 {
                covered.push((at, usize::try_from(count).unwrap_or(usize::MAX)));
            }
            self.acked_through = through;
            if through == last {
                self.chunks.pop_front();
            }
        }
        self.acked_through = self.acked_through.max(tag);
        covered
    }
}

/// Something that sends a coalesced ack (the channel; a recorder in tests).
pub(super) trait AckSink: 'static {
    /// Ack every delivery up to `tag` (`multiple = true`).
    fn ack_up_to(&self, tag: u64) -> impl std::future::Future<Output = Result<(), String>>;
}

impl AckSink for Channel {
    async fn ack_up_to(&self, tag: u64) -> Result<(), String> {
        self.basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(|e| e.to_string())
    }
}

/// The handle the actor keeps; the task runs on the current arbiter.
#[derive(Debug)]
pub(super) struct Acker {
    /// The newest tag that may be acked; dropped to stop the task.
    newest: watch::Sender<u64>,
    /// Resolves once the task has sent the last tag and stopped.
    done: tokio::task::JoinHandle<()>,
}

impl Acker {
    /// Starts the task acking on `sink`; the reader notes in `received`
    /// when it read each chunk.
    pub(super) fn start(sink: impl AckSink, received: Arc<Mutex<ReceivedTimes>>) -> Acker {
        let (newest, tags) = watch::channel(0);
        let done = actix::spawn(run(sink, tags, received));
        Acker { newest, done }
    }

    /// Asks for every delivery up to `tag` to be acked; never waits.
    pub(super) fn ack_up_to(&self, tag: u64) {
        self.newest.send_if_modified(|newest| {
            let newer = tag > *newest;
            if newer {
                *newest = tag;
            }
            newer
        });
    }

    /// Sends what is still pending and stops; resolves when it is sent.
    pub(super) async fn flush(self) {
        drop(self.newest);
        let _ = self.done.await;
    }
}

async fn run(
    sink: impl AckSink,
    mut tags: watch::Receiver<u64>,
    received: Arc<Mutex<ReceivedTimes>>,
) {
    let mut sent = 0;
    loop {
        // An error means the actor let go: send what is left, then stop.
        let closed = tags.changed().await.is_err();
        let tag = *tags.borrow_and_update();
        if tag > sent {
            let result = sink.ack_up_to(tag).await;
            // A poisoned lock only means a panic elsewhere; the times are plain data.
            let covered = received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .acked(tag);
            match result {
                Ok(()) => Acked { received: covered }.emit(),
                Err(err) => log::warn!("ack up to delivery {tag} failed (channel lost?): {err}"),
            }
            sent = tag;
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// Records the acks; each takes a moment, as a real send does.
    #[derive(Clone, Default)]
    struct Recorder(Rc<RefCell<Vec<u64>>>);

    impl AckSink for Recorder {
        async fn ack_up_to(&self, tag: u64) -> Result<(), String> {
            tokio::task::yield_now().await;
            self.0.borrow_mut().push(tag);
            Ok(())
        }
    }

    fn times() -> Arc<Mutex<ReceivedTimes>> {
        Arc::default()
    }

    #[actix::test]
    async fn acks_go_out_in_order_coalesced_and_all_before_flush_returns() {
        let recorder = Recorder::default();
        let acker = Acker::start(recorder.clone(), times());
        for tag in 1..=1000 {
            acker.ack_up_to(tag);
            if tag % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        acker.ack_up_to(500); // lower than what was asked: ignored
        acker.flush().await;
        let acks = recorder.0.borrow().clone();
        assert!(acks.windows(2).all(|w| w[0] < w[1]), "{acks:?}");
        assert_eq!(
            acks.last(),
            Some(&1000),
            "the last tag is sent before flush returns"
        );
        assert!(acks.len() < 1000, "acks are coalesced: {}", acks.len());
    }

    #[actix::test]
    async fn nothing_is_sent_when_nothing_was_settled() {
        let recorder = Recorder::default();
        Acker::start(recorder.clone(), times()).flush().await;
        assert!(recorder.0.borrow().is_empty());
    }

    #[test]
    fn each_ack_covers_the_deliveries_up_to_its_tag_with_their_receipt_times() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let mut times = ReceivedTimes::default();
        times.read(3, at(1)); // tags 1..=3
        times.read(4, at(2)); // tag 4
        times.read(10, at(3)); // tags 5..=10
        assert_eq!(times.acked(2), vec![(at(1), 2)]);
        assert_eq!(times.acked(2), vec![], "nothing twice");
        assert_eq!(times.acked(7), vec![(at(1), 1), (at(2), 1), (at(3), 3)]);
        assert_eq!(times.acked(10), vec![(at(3), 3)]);
        assert!(times.chunks.is_empty(), "nothing kept past its ack");
        // A tag beyond what was read (never happens) covers nothing unknown.
        assert_eq!(times.acked(12), vec![]);
        times.read(13, at(4)); // tags 11..=13
        assert_eq!(
            times.acked(13),
            vec![(at(4), 1)],
            "11 and 12 were covered already"
        );
    }
}
