//! The Tap actor: sits between the Consumer and the Queue, sends a copy of
//! every chunk to the live path without ever waiting, then forwards the chunk
//! to the Queue and waits for it to be admitted.
//!
//! The copy costs one `Arc` clone per event (payloads are shared, not copied).
//! Copies are gathered for [`LIVE_COALESCE`] and handed to the live thread in
//! one `try_send`: a message to another thread wakes it, and at thousands of
//! small chunks a second those wake-ups were most of what the live copy cost
//! the datastore path (measured: ≈ 1.8 µs of CPU per message, 18% of the
//! service's, with no dashboard open). Gathering is bounded at
//! [`MAX_GATHERED`] events, past which the copies go at once. When the live
//! path's mailbox or backlog is full the copies are dropped and counted, so a
//! slow live path can never slow the database.
//!
//! Each copy says which deliveries it covers (the last one of its chunks),
//! so that with `LIVE_FEED=stream` the Consumer acks a delivery only once
//! its copy is in the stream ([`Tap::covering_deliveries`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::event::{DeliveryRef, EventData};
use crate::internal_events::live::TapCopyDropped;
use crate::messages::{Admitted, DroppedCopies, Ingest, LiveBacklog, Publish};

/// How long copies are gathered before they go to the live path: what a
/// dashboard waits at most, beside how many wake-ups of the live thread a
/// busy stream costs (one per this period instead of one per chunk).
pub const LIVE_COALESCE: Duration = Duration::from_millis(5);

/// The most events gathered before they go at once, period or not.
pub const MAX_GATHERED: usize = 4096;

/// The Tap actor. See the module documentation.
pub struct Tap {
    /// Where every event goes (waits: this is the datastore path).
    queue: Recipient<Ingest>,
    /// Where copies go (never waited for).
    observable: Recipient<Publish>,
    /// Copies are made only while this is above zero.
    observers: Arc<AtomicUsize>,
    /// Bounds the copies in flight to the live path, in events.
    backlog: LiveBacklog,
    /// Counts copies dropped here, for the live path's gap accounting.
    dropped: DroppedCopies,
    /// Copies gathered and not yet sent, oldest first.
    gathered: Vec<Arc<EventData>>,
    /// The last delivery the gathered copies cover.
    through: Option<DeliveryRef>,
    /// Hand over the deliveries covered even when no copy was gathered
    /// (a chunk of dead letters only): the stream feed's ack gate needs them.
    covering: bool,
    /// How long to gather; zero sends every chunk's copies at once.
    coalesce: Duration,
    /// A send of `gathered` is scheduled.
    flush_scheduled: bool,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("observers", &self.observers.load(Ordering::Relaxed))
            .field("gathered", &self.gathered.len())
            .finish()
    }
}

impl Tap {
    /// A Tap forwarding to `queue` and copying to `observable` while
    /// `observers` is above zero, gathering copies for [`LIVE_COALESCE`].
    pub fn new(
        queue: Recipient<Ingest>,
        observable: Recipient<Publish>,
        observers: Arc<AtomicUsize>,
        backlog: LiveBacklog,
        dropped: DroppedCopies,
    ) -> Self {
        Tap {
            queue,
            observable,
            observers,
            backlog,
            dropped,
            gathered: Vec::new(),
            through: None,
            covering: false,
            coalesce: LIVE_COALESCE,
            flush_scheduled: false,
        }
    }

    /// Gathers copies for `coalesce` instead (zero: every chunk's copies go
    /// at once).
    pub fn with_coalesce(self, coalesce: Duration) -> Self {
        Tap { coalesce, ..self }
    }

    /// Hands over the deliveries covered even by chunks without a single
    /// copy (`LIVE_FEED=stream`, where acks wait for the copies).
    pub fn covering_deliveries(self) -> Self {
        Tap {
            covering: true,
            ..self
        }
    }

    /// Sends the gathered copies to the live path in one message, or drops
    /// and counts them when it is full.
    fn flush(&mut self) {
        self.flush_scheduled = false;
        if self.gathered.is_empty() && !(self.covering && self.through.is_some()) {
            return;
        }
        let copy: Arc<[Arc<EventData>]> = std::mem::take(&mut self.gathered).into();
        let through = self.through.take();
        let events = copy.len();
        let sent = self.backlog.try_acquire(events).is_some_and(|permit| {
            let publish = Publish {
                events: copy,
                permit: Some(permit),
                through,
            };
            self.observable.try_send(publish).is_ok()
        });
        if !sent {
            self.dropped.add(events as u64, through);
            TapCopyDropped { events }.emit();
        }
    }
}

impl Actor for Tap {
    type Context = Context<Self>;

    /// Copies still gathered when the Tap stops go out (or are counted).
    fn stopped(&mut self, _: &mut Context<Self>) {
        self.flush();
    }
}

/// Not atomic: while a chunk waits for admission (the Queue full: the
/// backpressure), the gathering timer still fires, so the live path is not
/// held back with the datastore path. The reader sends one chunk at a time,
/// so chunks still reach the Queue in order.
impl Handler<Ingest> for Tap {
    type Result = ResponseActFuture<Self, Admitted>;

    fn handle(&mut self, msg: Ingest, ctx: &mut Context<Self>) -> Self::Result {
        if self.observers.load(Ordering::Relaxed) > 0 {
            self.gathered
                .extend(msg.events.iter().map(|e| e.data.clone()));
            self.through = self.through.max(msg.through);
            if self.coalesce.is_zero() || self.gathered.len() >= MAX_GATHERED {
                self.flush();
            } else if !self.flush_scheduled {
                self.flush_scheduled = true;
                ctx.run_later(self.coalesce, |tap, _| tap.flush());
            }
        }
        if msg.events.is_empty() {
            // Only news of the deliveries covered (see `covering_deliveries`).
            return Box::pin(actix::fut::ready(Admitted::default()));
        }
        let queue = self.queue.clone();
        Box::pin(
            async move {
                match queue.send(msg).await {
                    Ok(admitted) => admitted,
                    Err(err) => {
                        log::error!("the queue is gone ({err}); a chunk was not admitted");
                        Admitted::default()
                    }
                }
            }
            .into_actor(self),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use lapin::BasicProperties;

    use super::*;
    use crate::event::{DeliveryRef, Event};

    /// Never handles anything: its mailbox fills and stays full.
    struct Stuck;
    impl Actor for Stuck {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Context<Self>) {
            ctx.set_mailbox_capacity(1);
            // Freeze the actor so its mailbox is never drained.
            ctx.wait(actix::fut::wrap_future(
                futures_util::future::pending::<()>(),
            ));
        }
    }
    impl Handler<Publish> for Stuck {
        type Result = ();
        fn handle(&mut self, _: Publish, _: &mut Context<Self>) {}
    }

    /// Admits everything and counts it.
    struct Counter(Arc<AtomicUsize>);
    impl Actor for Counter {
        type Context = Context<Self>;
    }
    impl Handler<Ingest> for Counter {
        type Result = MessageResult<Ingest>;
        fn handle(&mut self, msg: Ingest, _: &mut Context<Self>) -> Self::Result {
            self.0.fetch_add(msg.events.len(), Ordering::SeqCst);
            MessageResult(Admitted::default())
        }
    }

    fn event(tag: u64) -> Event {
        Event {
            delivery: DeliveryRef { channel: 1, tag },
            merged: Vec::new(),
            data: Arc::new(EventData {
                message_id: format!("m{tag}"),
                routing_key: "k".into(),
                payload: "{}".into(),
                headers: "{}".into(),
                published_at: None,
                received_at: SystemTime::now(),
                properties: BasicProperties::default(),
            }),
        }
    }

    /// Sends `n` one-event chunks, each after the previous one's admission, as
    /// the reader does.
    async fn send_chunks(tap: &Addr<Tap>, n: u64) {
        for tag in 0..n {
            tap.send(Ingest {
                events: vec![event(tag)],
                through: Some(DeliveryRef { channel: 1, tag }),
            })
            .await
            .expect("tap alive");
        }
    }

    #[actix::test]
    async fn a_stuck_live_path_never_holds_up_the_queue() {
        let admitted = Arc::new(AtomicUsize::new(0));
        let queue = Counter(admitted.clone()).start();
        let stuck = Stuck.start();
        let tap = Tap::new(
            queue.recipient(),
            stuck.recipient(),
            Arc::new(AtomicUsize::new(1)),
            LiveBacklog::new(1000),
            DroppedCopies::default(),
        )
        .start();
        send_chunks(&tap, 100).await;
        assert_eq!(admitted.load(Ordering::SeqCst), 100);
    }

    /// Records every copy it is handed, one entry per message.
    struct Recorder(tokio::sync::mpsc::UnboundedSender<Vec<String>>);
    impl Actor for Recorder {
        type Context = Context<Self>;
    }
    impl Handler<Publish> for Recorder {
        type Result = ();
        fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
            let ids = msg.events.iter().map(|e| e.message_id.clone()).collect();
            let _ = self.0.send(ids);
        }
    }

    /// Never answers: the Queue full, the backpressure held.
    struct Full;
    impl Actor for Full {
        type Context = Context<Self>;
    }
    impl Handler<Ingest> for Full {
        type Result = ResponseFuture<Admitted>;
        fn handle(&mut self, _: Ingest, _: &mut Context<Self>) -> Self::Result {
            Box::pin(futures_util::future::pending())
        }
    }

    #[actix::test]
    async fn copies_of_many_chunks_go_to_the_live_path_in_few_messages_in_order() {
        let admitted = Arc::new(AtomicUsize::new(0));
        let queue = Counter(admitted.clone()).start();
        let (out, mut copies) = tokio::sync::mpsc::unbounded_channel();
        let live = Recorder(out).start();
        let dropped = DroppedCopies::default();
        let tap = Tap::new(
            queue.recipient(),
            live.recipient(),
            Arc::new(AtomicUsize::new(1)),
            LiveBacklog::new(10_000),
            dropped.clone(),
        )
        .with_coalesce(Duration::from_millis(50))
        .start();
        send_chunks(&tap, 100).await;
        let mut seen = Vec::new();
        let mut messages = 0;
        while seen.len() < 100 {
            let copy = tokio::time::timeout(Duration::from_secs(5), copies.recv())
                .await
                .expect("the copies arrive")
                .expect("the recorder is alive");
            messages += 1;
            seen.extend(copy);
        }
        let expected: Vec<String> = (0..100).map(|tag| format!("m{tag}")).collect();
        assert_eq!(seen, expected, "every copy, in order");
        assert!(
            messages < 10,
            "100 chunks went to the live path in {messages} messages"
        );
        assert_eq!(admitted.load(Ordering::SeqCst), 100);
        assert_eq!(dropped.take().events, 0);
    }

    #[actix::test]
    async fn copies_reach_the_live_path_while_the_queue_holds_a_chunk_back() {
        let (out, mut copies) = tokio::sync::mpsc::unbounded_channel();
        let live = Recorder(out).start();
        let tap = Tap::new(
            Full.start().recipient(),
            live.recipient(),
            Arc::new(AtomicUsize::new(1)),
            LiveBacklog::new(10_000),
            DroppedCopies::default(),
        )
        .start();
        // The chunk is never admitted: the reader would wait here.
        tap.do_send(Ingest {
            events: vec![event(1), event(2)],
            through: None,
        });
        let copy = tokio::time::timeout(Duration::from_secs(5), copies.recv())
            .await
            .expect("the copies go out while admission waits")
            .expect("the recorder is alive");
        assert_eq!(copy, ["m1", "m2"]);
    }

    #[actix::test]
    async fn gathered_copies_the_live_path_cannot_take_are_counted() {
        let admitted = Arc::new(AtomicUsize::new(0));
        let queue = Counter(admitted.clone()).start();
        let dropped = DroppedCopies::default();
        // Room for 10 events in flight: the first 10 copies fit, the rest do not.
        let tap = Tap::new(
            queue.recipient(),
            Stuck.start().recipient(),
            Arc::new(AtomicUsize::new(1)),
            LiveBacklog::new(10),
            dropped.clone(),
        )
        .with_coalesce(Duration::ZERO)
        .start();
        send_chunks(&tap, 30).await;
        assert_eq!(admitted.load(Ordering::SeqCst), 30);
        let dropped = dropped.take();
        assert!(dropped.events >= 20, "copies past the bound are counted");
        assert_eq!(
            dropped.through,
            Some(DeliveryRef {
                channel: 1,
                tag: 29
            }),
            "with the deliveries they covered"
        );
    }
}
