//! The feed publisher: the Tap's copy target with `LIVE_FEED=stream`.
//!
//! The actor numbers the copies it is given (one sequence per process; the
//! copies the Tap had to drop take numbers too, so readers see them as a
//! gap) and hands them to a publishing task through a bounded channel with
//! `try_send`: it never waits. The task gathers whatever is waiting into
//! batches ([`super::wire`]: up to 4,096 events or about 1 MiB each, no
//! timer: a lone copy goes at once) and publishes them with publisher
//! confirms.
//!
//! **Nothing is dropped for being slow or disconnected.** Batches are kept
//! until the broker confirms them; after a reconnect every unconfirmed batch
//! is published again, with the same numbers (readers skip what they already
//! have), then the new ones. As each batch is confirmed, the last delivery
//! its copies cover is published on a watch channel: the Consumer acks a
//! delivery only once its copy is done ([`crate::consumer::FeedGate`]).
//! Copies whose numbers were given but which never reached the task (the
//! Tap's or this actor's channel full) are done once a later batch, or a
//! *marker* (a batch of no entries, published when idle), is confirmed:
//! readers then see the jump.
//!
//! Bounds: the channel holds [`CHANNEL_CHUNKS`] chunks; every copy holds its
//! share of the Tap's `LiveBacklog` until its batch is confirmed, so what
//! waits here is bounded in events; at most `max_unconfirmed` batches are
//! published and not yet confirmed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::stream::{FuturesOrdered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use tokio::sync::{mpsc, watch};

use super::placer::headers;
use super::wire::{self, Entry};
use super::{connect, FeedSettings};
use crate::event::{DeliveryRef, EventData};
use crate::internal_events::live_feed::{
    FeedDropReason, FeedLink, FeedPublishDropped, FeedPublished,
};
use crate::messages::{Dropped, DroppedCopies, LivePermit, Publish};
use crate::observable::LAGGED_INTERVAL;

/// Chunks waiting for the publishing task, at most.
pub const CHANNEL_CHUNKS: usize = 256;

/// How long the publishing task waits for more work before it publishes a
/// marker it owes (after copies were dropped).
pub const MARKER_AFTER: Duration = Duration::from_millis(100);

/// What goes to the publishing task.
#[derive(Debug)]
enum Outgoing {
    /// Copies numbered `first_seq ..`, on their way to the stream.
    Copies {
        first_seq: u64,
        events: Arc<[Arc<EventData>]>,
        /// The last delivery they cover.
        through: Option<DeliveryRef>,
        /// Held until their batch is confirmed.
        permit: Option<LivePermit>,
    },
    /// Numbers up to `up_to` went to copies that were dropped on the way.
    Skipped {
        up_to: u64,
        through: Option<DeliveryRef>,
    },
}

/// The Tap's copy target. See the module docs.
pub struct FeedPublisher {
    /// To the publishing task.
    outgoing: mpsc::Sender<Outgoing>,
    /// The last sequence number given out.
    seq: u64,
    /// Copies the Tap dropped, not yet numbered.
    tap_drops: DroppedCopies,
    /// Copies numbered but not handed to the task, not yet told to it.
    owed: Dropped,
}

impl std::fmt::Debug for FeedPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedPublisher")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl FeedPublisher {
    /// A publisher feeding `settings.stream`; `tap_drops` are the copies the
    /// Tap could not hand over; `done` is told the last delivery whose copy
    /// is done. Spawns the publishing task on the current arbiter.
    pub fn new(
        settings: FeedSettings,
        tap_drops: DroppedCopies,
        done: watch::Sender<Option<DeliveryRef>>,
    ) -> FeedPublisher {
        let (outgoing, rx) = mpsc::channel(CHANNEL_CHUNKS);
        actix::spawn(Batcher::new(settings, done).run(rx));
        FeedPublisher {
            outgoing,
            seq: 0,
            tap_drops,
            owed: Dropped::default(),
        }
    }

    /// Numbers the copies the Tap dropped; tells the task of every number
    /// given to a copy it will not get, if it can take the news now.
    fn tell_skipped(&mut self) {
        let dropped = self.tap_drops.take();
        self.seq += dropped.events;
        self.owed.events += dropped.events;
        self.owed.through = self.owed.through.max(dropped.through);
        if self.owed.events == 0 && self.owed.through.is_none() {
            return;
        }
        let skipped = Outgoing::Skipped {
            up_to: self.seq,
            through: self.owed.through,
        };
        if self.outgoing.try_send(skipped).is_ok() {
            self.owed = Dropped::default();
        }
    }
}

impl Actor for FeedPublisher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Copies dropped while no new chunk comes are told from here, so
        // readers learn of them even when the stream goes quiet.
        ctx.run_interval(LAGGED_INTERVAL, |act, _| act.tell_skipped());
    }
}

impl Handler<Publish> for FeedPublisher {
    type Result = ();

    fn handle(&mut self, msg: Publish, _ctx: &mut Self::Context) {
        self.tell_skipped();
        let n = msg.events.len() as u64;
        let first_seq = self.seq + 1;
        self.seq += n;
        if self.owed.events > 0 {
            // The task has not heard of earlier numbers yet: these copies
            // must not overtake that news. Drop them too (readers see it all
            // as one gap, told once the task hears).
            self.owed.events += n;
            self.owed.through = self.owed.through.max(msg.through);
            FeedPublishDropped {
                reason: FeedDropReason::Full,
                events: n,
            }
            .emit();
            return;
        }
        let copies = Outgoing::Copies {
            first_seq,
            events: msg.events,
            through: msg.through,
            permit: msg.permit,
        };
        if let Err(err) = self.outgoing.try_send(copies) {
            let through = match err.into_inner() {
                Outgoing::Copies { through, .. } | Outgoing::Skipped { through, .. } => through,
            };
            self.owed.events += n;
            self.owed.through = self.owed.through.max(through);
            FeedPublishDropped {
                reason: FeedDropReason::Full,
                events: n,
            }
            .emit();
        }
    }
}

/// One batch: built once, published until the broker confirms it.
#[derive(Debug)]
struct Batch {
    first_seq: u64,
    count: u64,
    body: Vec<u8>,
    /// The last delivery its copies (and every earlier one's) cover.
    through: Option<DeliveryRef>,
    /// The copies' share of the live backlog.
    _permits: Vec<LivePermit>,
}

/// A batch being gathered from the chunks waiting in the channel.
#[derive(Debug, Default)]
struct Gathering {
    first_seq: u64,
    events: Vec<Arc<EventData>>,
    bytes: usize,
    through: Option<DeliveryRef>,
    permits: Vec<LivePermit>,
}

/// The publishing task. See the module docs.
struct Batcher {
    settings: FeedSettings,
    /// The next sequence number not yet in a batch.
    next_seq: u64,
    /// Batches built and not yet confirmed, oldest first.
    unconfirmed: VecDeque<Batch>,
    /// How many of `unconfirmed` (from the front) are published on the
    /// current channel.
    published: usize,
    /// The batch being gathered.
    gathering: Gathering,
    /// Numbers were skipped since the last batch: readers must be told,
    /// by a marker if no batch comes soon.
    owe_marker: bool,
    /// Deliveries covered by skipped copies, told with the next batch.
    skipped_through: Option<DeliveryRef>,
    /// Where the last delivery whose copy is done is told.
    done: watch::Sender<Option<DeliveryRef>>,
}

impl Batcher {
    fn new(settings: FeedSettings, done: watch::Sender<Option<DeliveryRef>>) -> Batcher {
        Batcher {
            settings,
            next_seq: 1,
            unconfirmed: VecDeque::new(),
            published: 0,
            gathering: Gathering::default(),
            owe_marker: false,
            skipped_through: None,
            done,
        }
    }

    /// Publishes what arrives, reconnecting with backoff, until the actor
    /// is gone and every batch is confirmed (or the link is lost then).
    async fn run(mut self, mut rx: mpsc::Receiver<Outgoing>) {
        let mut delays = backoff(&self.settings);
        loop {
            let (connection, channel) = match open(&self.settings).await {
                Ok(link) => link,
                Err(why) => {
                    FeedLink {
                        side: "publisher",
                        lost: Some(why),
                    }
                    .emit();
                    let wait = delays.next().unwrap_or(self.settings.reconnect_max);
                    if !self.gather_for(&mut rx, wait).await {
                        return;
                    }
                    continue;
                }
            };
            FeedLink {
                side: "publisher",
                lost: None,
            }
            .emit();
            delays = backoff(&self.settings);
            self.published = 0;
            let served = self.serve(&channel, &mut rx).await;
            match served {
                Ok(()) => {
                    crate::tls::close_broker(&connection, "bye").await;
                    return;
                }
                Err(why) => {
                    FeedLink {
                        side: "publisher",
                        lost: Some(why),
                    }
                    .emit();
                    crate::tls::close_broker(&connection, "reconnecting").await;
                }
            }
        }
    }

    /// Publishes on `channel` until it fails (`Err`) or the actor is gone
    /// and everything is confirmed (`Ok`).
    async fn serve(
        &mut self,
        channel: &lapin::Channel,
        rx: &mut mpsc::Receiver<Outgoing>,
    ) -> Result<(), String> {
        let mut confirms = FuturesOrdered::new();
        let mut closed = false;
        loop {
            while self.published < self.unconfirmed.len()
                && self.published < self.settings.max_unconfirmed.max(1)
            {
                let confirm = self.publish(channel, self.published).await?;
                confirms.push_back(confirm);
                self.published += 1;
            }
            if closed && confirms.is_empty() {
                return Ok(());
            }
            tokio::select! {
                biased;
                Some(confirmation) = confirms.next(), if !confirms.is_empty() => {
                    match confirmation {
                        Ok(lapin::Confirmation::Ack(None)) => self.confirmed(),
                        Ok(lapin::Confirmation::Ack(Some(_))) => {
                            // Unroutable: the stream is gone (deleted under us).
                            // Declaring it again is part of reconnecting.
                            return Err(format!("the stream {} does not exist", self.settings.stream));
                        }
                        Ok(_) => return Err("the broker refused a batch (nack)".to_owned()),
                        Err(e) => return Err(format!("waiting for the stream's confirm: {e}")),
                    }
                }
                incoming = rx.recv(), if !closed => match incoming {
                    Some(outgoing) => self.gather(outgoing, rx),
                    None => {
                        // Everything gathered goes out, and a jump owed too.
                        closed = true;
                        self.seal_marker();
                    }
                },
                () = tokio::time::sleep(MARKER_AFTER), if self.owe_marker && !closed => self.seal_marker(),
            }
        }
    }

    /// Takes `first` and whatever else waits in the channel into batches.
    fn gather(&mut self, first: Outgoing, rx: &mut mpsc::Receiver<Outgoing>) {
        self.take(first);
        while let Ok(next) = rx.try_recv() {
            self.take(next);
        }
        self.seal();
    }

    /// While disconnected: gathers what arrives for `wait`; `false` once the
    /// actor is gone.
    async fn gather_for(&mut self, rx: &mut mpsc::Receiver<Outgoing>, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return true,
                Ok(None) => return false,
                Ok(Some(outgoing)) => self.gather(outgoing, rx),
            }
        }
    }

    fn take(&mut self, outgoing: Outgoing) {
        match outgoing {
            Outgoing::Skipped { up_to, through } => {
                self.seal();
                if up_to >= self.next_seq {
                    self.next_seq = up_to + 1;
                    self.owe_marker = true;
                }
                self.skipped_through = self.skipped_through.max(through);
                if !self.owe_marker {
                    self.cover(through);
                }
            }
            Outgoing::Copies {
                first_seq,
                events,
                through,
                permit,
            } => {
                if events.is_empty() {
                    self.cover(through);
                    return;
                }
                if first_seq != self.next_seq {
                    // Numbers skipped before these (the actor dropped copies):
                    // this batch starts after the jump, which readers see.
                    self.seal();
                    self.next_seq = first_seq;
                }
                for event in events.iter() {
                    let size = Entry::size_hint(event);
                    if self.gathering.events.len() >= wire::MAX_ENTRIES
                        || (self.gathering.bytes + size > wire::MAX_BODY_BYTES
                            && !self.gathering.events.is_empty())
                    {
                        self.seal();
                    }
                    if self.gathering.events.is_empty() {
                        self.gathering.first_seq = self.next_seq;
                    }
                    self.gathering.events.push(event.clone());
                    self.gathering.bytes += size;
                    self.next_seq += 1;
                }
                self.gathering.through = self.gathering.through.max(through);
                self.gathering.permits.extend(permit);
            }
        }
    }

    /// The deliveries up to `through` have no copy of their own (dead
    /// letters) or only skipped ones: done with the batch before them.
    fn cover(&mut self, through: Option<DeliveryRef>) {
        if !self.gathering.events.is_empty() {
            self.gathering.through = self.gathering.through.max(through);
        } else if self.owe_marker {
            // After copies that were skipped: done once readers see the jump.
            self.skipped_through = self.skipped_through.max(through);
        } else if let Some(last) = self.unconfirmed.back_mut() {
            last.through = last.through.max(through);
        } else if through.is_some() {
            self.done.send_if_modified(|done| {
                let moved = through > *done;
                *done = (*done).max(through);
                moved
            });
        }
    }

    /// Closes the batch being gathered.
    fn seal(&mut self) {
        if self.gathering.events.is_empty() {
            return;
        }
        let gathering = std::mem::take(&mut self.gathering);
        let count = gathering.events.len() as u64;
        self.unconfirmed.push_back(Batch {
            first_seq: gathering.first_seq,
            count,
            body: wire::encode(&gathering.events),
            through: gathering.through.max(self.skipped_through.take()),
            _permits: gathering.permits,
        });
        // Its numbers follow the jump: readers see the skipped ones.
        self.owe_marker = false;
    }

    /// Queues a marker: no entries, "numbered up to `next_seq − 1`".
    fn seal_marker(&mut self) {
        self.seal();
        if !self.owe_marker {
            return;
        }
        self.owe_marker = false;
        self.unconfirmed.push_back(Batch {
            first_seq: self.next_seq,
            count: 0,
            body: wire::encode(&[]),
            through: self.skipped_through.take(),
            _permits: Vec::new(),
        });
    }

    async fn publish(
        &self,
        channel: &lapin::Channel,
        index: usize,
    ) -> Result<lapin::PublisherConfirm, String> {
        let batch = &self.unconfirmed[index];
        let properties = BasicProperties::default()
            .with_content_type(wire::CONTENT_TYPE.into())
            .with_headers(headers(&self.settings.origin, batch.first_seq, batch.count));
        channel
            .basic_publish(
                "".into(),
                self.settings.stream.as_str().into(),
                // Returned (not silently dropped) if the stream is gone.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &batch.body,
                properties,
            )
            .await
            .map_err(|e| format!("publishing to the stream failed: {e}"))
    }

    /// The oldest published batch is confirmed: its copies are done.
    fn confirmed(&mut self) {
        let Some(batch) = self.unconfirmed.pop_front() else {
            return;
        };
        self.published -= 1;
        FeedPublished {
            events: batch.count,
        }
        .emit();
        if batch.through.is_some() {
            self.done.send_if_modified(|done| {
                let moved = batch.through > *done;
                *done = (*done).max(batch.through);
                moved
            });
        }
    }
}

/// Connects with publisher confirms on.
async fn open(settings: &FeedSettings) -> Result<(lapin::Connection, lapin::Channel), String> {
    let (connection, channel) = connect(settings, "publisher").await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
    Ok((connection, channel))
}

pub(crate) fn backoff(settings: &FeedSettings) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(settings.reconnect_min)
        .with_max_delay(settings.reconnect_max)
        .without_max_times()
        .with_jitter()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live_event::tests::event;

    fn batcher() -> (Batcher, watch::Receiver<Option<DeliveryRef>>) {
        let (done, rx) = watch::channel(None);
        let settings = FeedSettings {
            amqp_url: String::new(),
            tls: crate::tls::BrokerTls::default(),
            stream: "s.live".into(),
            max_age: Duration::from_secs(60),
            max_bytes: 1 << 20,
            max_unconfirmed: 16,
            origin: "test/1-1".into(),
            prefetch: 10,
            reconnect_min: Duration::from_millis(1),
            reconnect_max: Duration::from_millis(1),
        };
        (Batcher::new(settings, done), rx)
    }

    fn delivery(tag: u64) -> Option<DeliveryRef> {
        Some(DeliveryRef { channel: 1, tag })
    }

    fn copies(first_seq: u64, n: u64, through: u64) -> Outgoing {
        Outgoing::Copies {
            first_seq,
            events: (first_seq..first_seq + n).map(|i| event("k", i)).collect(),
            through: delivery(through),
            permit: None,
        }
    }

    fn batches(b: &Batcher) -> Vec<(u64, u64, Option<DeliveryRef>)> {
        b.unconfirmed
            .iter()
            .map(|batch| (batch.first_seq, batch.count, batch.through))
            .collect()
    }

    #[test]
    fn waiting_chunks_go_out_as_one_batch_split_at_the_bound() {
        let (mut b, _) = batcher();
        b.take(copies(1, 3, 3));
        b.take(copies(4, wire::MAX_ENTRIES as u64, 9));
        b.seal();
        // The first batch covers the first chunk's deliveries only: the
        // second chunk's are done with the batch holding its last copy.
        assert_eq!(
            batches(&b),
            [
                (1, wire::MAX_ENTRIES as u64, delivery(3)),
                (wire::MAX_ENTRIES as u64 + 1, 3, delivery(9))
            ]
        );
    }

    #[test]
    fn the_gate_moves_as_batches_are_confirmed_in_order() {
        let (mut b, done) = batcher();
        b.take(copies(1, 2, 5));
        b.seal();
        b.take(copies(3, 1, 8));
        b.seal();
        b.published = 2;
        b.confirmed();
        assert_eq!(*done.borrow(), delivery(5));
        b.confirmed();
        assert_eq!(*done.borrow(), delivery(8));
        // Deliveries with no copy (dead letters) while nothing is pending:
        // done at once.
        b.take(Outgoing::Copies {
            first_seq: 4,
            events: Arc::new([]),
            through: delivery(11),
            permit: None,
        });
        assert_eq!(*done.borrow(), delivery(11));
    }

    #[test]
    fn skipped_copies_are_done_only_with_the_jump_readers_will_see() {
        let (mut b, done) = batcher();
        b.take(copies(1, 2, 2));
        b.seal();
        // Copies 3..=5 were dropped on the way; they covered up to delivery 7.
        b.take(Outgoing::Skipped {
            up_to: 5,
            through: delivery(7),
        });
        // A chunk of dead letters only, after them.
        b.take(Outgoing::Copies {
            first_seq: 6,
            events: Arc::new([]),
            through: delivery(9),
            permit: None,
        });
        b.published = 1;
        b.confirmed();
        assert_eq!(*done.borrow(), delivery(2), "not past the skipped ones yet");
        // Nothing else comes: a marker says "numbered up to 5".
        b.seal_marker();
        assert_eq!(batches(&b), [(6, 0, delivery(9))]);
        b.published = 1;
        b.confirmed();
        assert_eq!(*done.borrow(), delivery(9));
    }

    #[test]
    fn a_batch_after_a_skip_starts_after_the_jump_and_carries_it() {
        let (mut b, _) = batcher();
        b.take(copies(1, 1, 1));
        b.take(Outgoing::Skipped {
            up_to: 4,
            through: delivery(4),
        });
        b.take(copies(5, 2, 6));
        b.seal();
        assert_eq!(batches(&b), [(1, 1, delivery(1)), (5, 2, delivery(6))]);
        assert!(!b.owe_marker, "the batch after the jump tells it");
    }
}
