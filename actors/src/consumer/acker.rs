//! The acker of one channel generation: sends `basic.ack(multiple = true)`
//! for the newest ackable tag, in order, without making anyone wait for it.
//!
//! The Consumer actor decides *what* may be acked (the contiguous settled
//! watermark) and hands the tag over here; a send replaces the tag not yet
//! sent, so this holds one number whatever the rate (bounded), and acks are
//! coalesced by themselves when the broker connection is slower than the
//! commits. Tags only grow, and one task sends them, so the broker never sees
//! a `multiple` ack below one it already had.

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::watch;

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
    /// Starts the task acking on `sink`.
    pub(super) fn start(sink: impl AckSink) -> Acker {
        let (newest, tags) = watch::channel(0);
        let done = actix::spawn(run(sink, tags));
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

async fn run(sink: impl AckSink, mut tags: watch::Receiver<u64>) {
    let mut sent = 0;
    loop {
        // An error means the actor let go: send what is left, then stop.
        let closed = tags.changed().await.is_err();
        let tag = *tags.borrow_and_update();
        if tag > sent {
            if let Err(err) = sink.ack_up_to(tag).await {
                log::warn!("ack up to delivery {tag} failed (channel lost?): {err}");
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

    #[actix::test]
    async fn acks_go_out_in_order_coalesced_and_all_before_flush_returns() {
        let recorder = Recorder::default();
        let acker = Acker::start(recorder.clone());
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
        Acker::start(recorder.clone()).flush().await;
        assert!(recorder.0.borrow().is_empty());
    }
}
