//! The live path at start-up: the Observable on a thread of its own and,
//! with `LIVE_FEED=stream`, the feed reader and publisher. The Observable's
//! address is handed out before it runs (the HTTP server needs it, and is
//! built while a failure still has nothing to stop); nothing here fails.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use actix::dev::channel::{self, AddressReceiver};
use actix::prelude::*;
use sluice_actors::consumer::FeedGate;
use sluice_actors::live_feed::ledger::SharedLedger;
use sluice_actors::live_feed::replay::Replays;
use sluice_actors::live_feed::{self, publisher::FeedPublisher, FeedSettings};
use sluice_actors::messages::{DroppedCopies, LiveBacklog, Publish};
use sluice_actors::observable::Observable;
use sluice_actors::saturation::Saturation;
use sluice_actors::tls::BrokerTls;

use crate::config::{Config, LiveFeedArg};

/// How long start-up waits for the live feed to read the stream before
/// consuming anyway (`LIVE_FEED=stream`).
const FEED_ATTACH_WAIT: Duration = Duration::from_secs(10);

/// Messages waiting for the Observable and for the FeedPublisher. Small
/// chunks are many messages; memory is bounded in events by the Tap's
/// `LiveBacklog` instead.
const LIVE_MAILBOX: usize = 1024;

/// The live path before it runs: the Observable's address, and the mailbox
/// it will read once started; with `LIVE_FEED=stream`, the feed.
pub struct LivePath {
    observable: Addr<Observable>,
    mailbox: AddressReceiver<Observable>,
    feed: Option<Feed>,
}

/// `LIVE_FEED=stream`: the stream's settings, the reader's ledger of its
/// decisions (shared with the replays), and the replays of it.
struct Feed {
    settings: FeedSettings,
    ledger: Arc<SharedLedger>,
    replays: Arc<Replays>,
}

/// What the Tap copies into, once the live path runs.
pub struct Copies {
    /// The Observable, or with `LIVE_FEED=stream` the FeedPublisher.
    pub target: Recipient<Publish>,
    /// How many watch: the Tap copies only while it is above zero.
    pub demand: Arc<AtomicUsize>,
    /// The bound, in events, on copies on their way to the Observable.
    pub backlog: LiveBacklog,
    /// Copies the Tap could not hand over, told to clients as missed.
    pub dropped: DroppedCopies,
    /// With `LIVE_FEED=stream`: acks wait for the copies in the stream.
    pub gate: Option<FeedGate>,
}

impl LivePath {
    /// The Observable's address, usable before the actor runs (messages
    /// wait in its mailbox, bounded as ever).
    pub fn reserve(config: &Config, tls: &BrokerTls) -> LivePath {
        let (sender, mailbox) = channel::channel(LIVE_MAILBOX);
        let feed = (config.live_feed == LiveFeedArg::Stream).then(|| {
            let settings = feed_settings(config, tls);
            let ledger = Arc::new(SharedLedger::new());
            let replays = Arc::new(Replays::new(
                settings.clone(),
                ledger.clone(),
                config.live_max_replays as usize,
            ));
            Feed {
                settings,
                ledger,
                replays,
            }
        });
        LivePath {
            observable: Addr::new(sender),
            mailbox,
            feed,
        }
    }

    /// Where Observers subscribe.
    pub fn observable(&self) -> Addr<Observable> {
        self.observable.clone()
    }

    /// With `LIVE_FEED=stream`: where Observers read resumes older than the ring.
    pub fn replays(&self) -> Option<Arc<Replays>> {
        self.feed.as_ref().map(|feed| feed.replays.clone())
    }

    /// Starts the Observable (and the feed) on a new arbiter, which the
    /// caller keeps for as long as the service runs. `observers` counts the
    /// open WebSocket sessions. With `LIVE_FEED=stream`, waits (at most
    /// [`FEED_ATTACH_WAIT`]) until the feed reads the stream, so that this
    /// instance's dashboards see every event it stores from the start.
    /// While `saturation` says the datastore path is behind, the Observable
    /// yields (`LIVE_YIELD_INTERVAL`).
    pub async fn start(
        self,
        config: &Config,
        observers: Arc<AtomicUsize>,
        saturation: Saturation,
    ) -> (Arbiter, Copies) {
        let arbiter = Arbiter::new();
        let dropped = DroppedCopies::default();
        let upstream_drops = dropped.clone();
        let history = config.live_history as usize;
        let stream_feed = config.live_feed == LiveFeedArg::Stream;
        let yield_interval = config.live_yield_interval;
        let LivePath {
            observable,
            mailbox,
            feed,
        } = self;
        arbiter.spawn_fn(move || {
            let observable = if stream_feed {
                // The Tap's drops are numbered by the feed publisher and come
                // back, from the stream, as gaps in this instance's sequence.
                Observable::new()
                    .with_history(history)
                    .with_shared_positions()
            } else {
                Observable::with_upstream(upstream_drops).with_history(history)
            }
            .yielding_to(saturation, yield_interval);
            Context::with_receiver(mailbox).run(observable);
        });
        // The Tap copies while anyone watches. With a history ring, the ring
        // always watches: it counts as one standing observer.
        let demand = if config.live_history > 0 || stream_feed {
            Arc::new(AtomicUsize::new(1))
        } else {
            observers
        };
        let (target, gate) = match feed {
            Some(feed) => {
                let (target, done) = start_feed(feed, &arbiter, observable, &dropped).await;
                let gate = FeedGate {
                    done,
                    max_wait: config.live_feed_max_wait,
                };
                (target, Some(gate))
            }
            None => (observable.recipient(), None),
        };
        let copies = Copies {
            target,
            demand,
            backlog: LiveBacklog::new(config.live_backlog as usize),
            dropped,
            gate,
        };
        (arbiter, copies)
    }
}

/// `LIVE_FEED=stream`: the reader of the stream (feeding `observable`) and
/// the publisher into it (the Tap's copy target), both on `arbiter`. Also
/// returns where the publisher tells which deliveries' copies are in the
/// stream (the Consumer's ack gate).
async fn start_feed(
    feed: Feed,
    arbiter: &Arbiter,
    observable: Addr<Observable>,
    dropped: &DroppedCopies,
) -> (
    Recipient<Publish>,
    tokio::sync::watch::Receiver<Option<sluice_actors::DeliveryRef>>,
) {
    let Feed {
        settings, ledger, ..
    } = feed;
    log::info!(
        "live feed: stream {} (every instance's events, one order)",
        settings.stream
    );
    let (attached, reading) = tokio::sync::oneshot::channel();
    let reader = live_feed::reader::run(settings.clone(), observable.recipient(), ledger, attached);
    arbiter.spawn(reader);
    // Read the stream before consuming the ingest queue.
    if tokio::time::timeout(FEED_ATTACH_WAIT, reading)
        .await
        .is_err()
    {
        log::warn!(
            "the live feed is not reading {} after {FEED_ATTACH_WAIT:?}; \
             starting anyway (it keeps trying)",
            settings.stream
        );
    }
    let (done, gate) = tokio::sync::watch::channel(None);
    let drops = dropped.clone();
    let publisher = FeedPublisher::start_in_arbiter(&arbiter.handle(), move |ctx| {
        ctx.set_mailbox_capacity(LIVE_MAILBOX);
        FeedPublisher::new(settings, drops, done)
    });
    (publisher.recipient(), gate)
}

/// The live feed's settings (`LIVE_FEED=stream`).
fn feed_settings(config: &Config, tls: &BrokerTls) -> FeedSettings {
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    FeedSettings {
        amqp_url: config.amqp_url.clone(),
        tls: tls.clone(),
        stream: format!("{}.live", config.amqp_prefix),
        max_age: config.live_stream_max_age,
        max_bytes: config.live_stream_max_bytes,
        max_unconfirmed: config.live_stream_max_unconfirmed as usize,
        // One sequence per process: a restarted instance is a new origin.
        origin: format!("{}/{}-{started_ms}", config.instance(), std::process::id()),
        // Stream messages are batches (up to 4,096 events, about 1 MiB).
        prefetch: 64,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(10),
    }
}
