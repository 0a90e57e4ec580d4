//! The Tap actor: sits between the Consumer and the Queue, sends a copy of
//! every chunk to the live path without ever waiting, then forwards the chunk
//! to the Queue and waits for it to be admitted.
//!
//! The copy costs one `Arc` clone per event (payloads are shared, not copied)
//! and a `try_send`: when the Observable's mailbox is full the copy is dropped
//! and counted, so a slow live path can never slow the database.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use crate::event::EventData;
use crate::internal_events::live::TapCopyDropped;
use crate::messages::{Admitted, DroppedCopies, Ingest, LiveBacklog, Publish};

/// The Tap actor. See the module documentation.
pub struct Tap {
    /// Where every event goes (waits: this is the datastore path).
    queue: Recipient<Ingest>,
    /// Where copies go (never waits).
    observable: Recipient<Publish>,
    /// Live observers connected right now; with none, no copy is made.
    observers: Arc<AtomicUsize>,
    /// Bounds the copies not yet handled by the Observable, in events.
    backlog: LiveBacklog,
    /// Where dropped copies are counted, for the Observable to tell observers.
    dropped: DroppedCopies,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("observers", &self.observers.load(Ordering::Relaxed))
            .finish()
    }
}

impl Tap {
    /// A Tap forwarding to `queue` and copying to `observable` while
    /// `observers` is non-zero.
    /// `backlog` bounds, in events, the copies sent but not yet handled;
    /// `dropped` counts the copies that could not be sent.
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
        }
    }
}

impl Actor for Tap {
    type Context = Context<Self>;
}

impl Handler<Ingest> for Tap {
    /// Atomic: one chunk at a time, so chunks reach the Queue in order.
    type Result = AtomicResponse<Self, Admitted>;

    fn handle(&mut self, msg: Ingest, _: &mut Context<Self>) -> Self::Result {
        if self.observers.load(Ordering::Relaxed) > 0 {
            let copy: Arc<[Arc<EventData>]> = msg.events.iter().map(|e| e.data.clone()).collect();
            let events = copy.len();
            let sent = self.backlog.try_acquire(events).is_some_and(|permit| {
                let publish = Publish {
                    events: copy,
                    permit: Some(permit),
                };
                // On failure the message, and so its permit, is dropped here.
                self.observable.try_send(publish).is_ok()
            });
            if !sent {
                self.dropped.add(events as u64);
                TapCopyDropped { events }.emit();
            }
        }
        let queue = self.queue.clone();
        AtomicResponse::new(Box::pin(
            async move {
                match queue.send(msg).await {
                    Ok(admitted) => admitted,
                    Err(err) => {
                        // The deliveries stay unacked and are redelivered.
                        log::error!("the queue is gone ({err}); a chunk was not admitted");
                        Admitted::default()
                    }
                }
            }
            .into_actor(self),
        ))
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
        for tag in 0..100 {
            tap.send(Ingest {
                events: vec![event(tag)],
            })
            .await
            .expect("tap alive");
        }
        assert_eq!(admitted.load(Ordering::SeqCst), 100);
    }
}
