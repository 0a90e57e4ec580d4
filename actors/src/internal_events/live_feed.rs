//! Instrumentation of the cluster-wide live feed (`LIVE_FEED=stream`): what
//! this instance published to the stream, dropped instead, and read back.

/// Why a copy never made it into the stream. (A slow or unreachable broker
/// is not a reason: the publisher keeps copies until they are confirmed,
/// within the live backlog, past which the Tap drops and counts them.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedDropReason {
    /// The publisher's channel to its task was full.
    Full,
}

impl FeedDropReason {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedDropReason::Full => "full",
        }
    }
}

/// Copies dropped instead of published to the stream.
#[derive(Debug, Clone, Copy)]
pub struct FeedPublishDropped {
    /// Why.
    pub reason: FeedDropReason,
    /// How many events.
    pub events: u64,
}

impl FeedPublishDropped {
    /// Records the drop (`sluice_live_feed_dropped_events_total{reason}`).
    /// Readers see it as a gap in this instance's sequence.
    pub fn emit(self) {
        metrics::counter!("sluice_live_feed_dropped_events_total", "reason" => self.reason.as_str())
            .increment(self.events);
    }
}

/// Events published to the stream (sent; confirms are counted apart).
#[derive(Debug, Clone, Copy)]
pub struct FeedPublished {
    /// How many events.
    pub events: u64,
}

impl FeedPublished {
    /// `sluice_live_feed_published_events_total`.
    pub fn emit(self) {
        metrics::counter!("sluice_live_feed_published_events_total").increment(self.events);
    }
}

/// Events read from the stream, and events found missing in it.
#[derive(Debug, Clone, Copy)]
pub struct FeedRead {
    /// Events read.
    pub events: u64,
    /// Events missing before them (gaps in some instance's sequence).
    pub missing: u64,
}

impl FeedRead {
    /// `sluice_live_feed_read_events_total`, `sluice_live_feed_gap_events_total`.
    pub fn emit(self) {
        metrics::counter!("sluice_live_feed_read_events_total").increment(self.events);
        if self.missing > 0 {
            metrics::counter!("sluice_live_feed_gap_events_total").increment(self.missing);
        }
    }
}

/// The feed's link to the broker changed state.
#[derive(Debug, Clone)]
pub struct FeedLink {
    /// `publisher` or `reader`.
    pub side: &'static str,
    /// `None`: connected; `Some(why)`: lost.
    pub lost: Option<String>,
}

impl FeedLink {
    /// Logs the change and sets `sluice_live_feed_connected{side}`.
    pub fn emit(self) {
        let up = self.lost.is_none();
        match &self.lost {
            None => log::info!("live feed {}: connected to the stream", self.side),
            Some(why) => log::warn!("live feed {}: {why}; reconnecting", self.side),
        }
        metrics::gauge!("sluice_live_feed_connected", "side" => self.side).set(if up {
            1.0
        } else {
            0.0
        });
    }
}

/// A delivery was acked although its copy was not confirmed in the stream
/// within the gate's bound (`LIVE_FEED_MAX_WAIT`).
#[derive(Debug, Clone, Copy)]
pub struct FeedAckWaitExpired {
    /// The bound that passed.
    pub max_wait: std::time::Duration,
}

impl FeedAckWaitExpired {
    /// Logs (at most once a minute) and counts
    /// `sluice_live_feed_ack_waits_expired_total`.
    pub fn emit(self) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static LAST_LOGGED_S: AtomicU64 = AtomicU64::new(0);
        metrics::counter!("sluice_live_feed_ack_waits_expired_total").increment(1);
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = LAST_LOGGED_S.load(Ordering::Relaxed);
        if now_s >= last + 60
            && LAST_LOGGED_S
                .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "live feed: acking deliveries whose copies are not confirmed in the stream after {:?} \
                 (the stream is slow or unreachable); the copies go out when it takes them",
                self.max_wait
            );
        }
    }
}

/// A client's resume is being read from the stream: counted in
/// `sluice_live_replays` (replays reading now, at most `LIVE_MAX_REPLAYS`)
/// while the value lives.
#[derive(Debug)]
pub struct ReplayReading;

impl ReplayReading {
    /// One more replay reading.
    pub fn start() -> ReplayReading {
        metrics::gauge!("sluice_live_replays").increment(1.0);
        ReplayReading
    }
}

impl Drop for ReplayReading {
    fn drop(&mut self) {
        metrics::gauge!("sluice_live_replays").decrement(1.0);
    }
}
