//! How much an Observer has handed to the socket that its client has not
//! consumed yet, learnt from pings used as acknowledgements.
//!
//! Frames of events (and `lagged` notices) are followed by a ping carrying a
//! sequence number. A WebSocket endpoint answers a ping with a pong carrying
//! the same payload, and it reads frames in order, so the pong for ping `k`
//! proves that the client took in everything sent before ping `k` (RFC 6455
//! §5.5.2–5.5.3): whatever sat in the kernels' buffers, a proxy or the client
//! library has been consumed.
//!
//! Not every frame needs its own ping (each costs the client a pong to
//! write and the Observer one to read): a ping follows the frame that brings
//! the bytes written since the last ping to half the window, and the last
//! frame of a burst when no ping is in flight ([`AckWindow::ping_due`],
//! [`AckWindow::ping_wanted`]). So at least two acknowledgements come per
//! window, and everything written is acknowledged by the next pong or the
//! one after. [`AckWindow`] keeps the frames sent beyond the
//! last pong (bounded in bytes) and how long recent frames took to be
//! consumed, which is what the Observer needs to keep its client fresh: it
//! stops writing when the window is full, and it skips events that would be
//! older than the freshness bound by the time the client could read them.
//!
//! The window adapts to the client, as delay-based congestion control does:
//! when a frame took longer than a quarter of the freshness bound to be
//! consumed, the window is halved (once per round trip, down to
//! [`MIN_WINDOW`]); while frames take less than half of that, it grows by an
//! eighth per acknowledgement, up to the configured size. A fast client keeps
//! the whole window; a slow one gets a window it drains quickly, so the time
//! a frame spends in flight, and the error in predicting it, stay small
//! beside the bound.
//!
//! Pure bookkeeping: the caller passes the time in.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
// Tokio's clock, so that the Observer's tests can pause time.
use tokio::time::Instant;

/// Prefix of the Observer's ping payloads, so a pong answering one can be
/// told from anything else a client may send.
const PREFIX: &str = "sluice:";

/// How many recent transits the expectation looks at (it takes the longest):
/// the window and the link's queue oscillate, and a frame sent now may wait
/// as long as the slowest of the last few did.
const RECENT_TRANSITS: usize = 8;

/// The smallest the window gets, in bytes (unless configured smaller).
pub(super) const MIN_WINDOW: usize = 4096;

/// Frames sent and not yet acknowledged, closed by one ping.
#[derive(Debug)]
struct Segment {
    /// The ping's sequence number.
    seq: u64,
    /// Bytes of the frames before the ping (since the previous ping).
    bytes: usize,
    /// When the ping was handed to the socket.
    sent_at: Instant,
}

/// See the module docs.
#[derive(Debug)]
pub(super) struct AckWindow {
    /// Unacknowledged bytes at most now; past it, [`AckWindow::has_room`] is
    /// false. Between `min` and `max`.
    limit: usize,
    /// The configured window, which `limit` never exceeds.
    max: usize,
    /// The smallest `limit` gets.
    min: usize,
    /// The longest a frame should take to be consumed; longer halves `limit`.
    target: Duration,
    /// `limit` was last halved when the ping with this number was the latest
    /// sent: acknowledgements of pings up to it do not halve it again.
    cut_at: u64,
    /// Segments not yet acknowledged, oldest first.
    in_flight: VecDeque<Segment>,
    /// Their bytes and those written since the last ping, summed.
    unacked: usize,
    /// Bytes written since the last ping (not yet in a segment).
    unpinged: usize,
    /// When the first of those was written: a segment's transit is counted
    /// from its oldest byte.
    unpinged_since: Option<Instant>,
    /// The next ping's sequence number.
    next_seq: u64,
    /// How long the last acknowledged segment took from the socket to the
    /// client (what adapts the window).
    transit: Duration,
    /// The last [`RECENT_TRANSITS`] transits, newest last: the longest is
    /// the time a frame sent now can be expected to take, while the link and
    /// the client keep their pace.
    recent: VecDeque<Duration>,
}

impl AckWindow {
    /// A window of at most `max` bytes (at least 1), shrinking while frames
    /// take longer than `target` to be consumed.
    pub(super) fn new(max: usize, target: Duration) -> AckWindow {
        let max = max.max(1);
        AckWindow {
            limit: max,
            max,
            min: MIN_WINDOW.min(max),
            target,
            cut_at: 0,
            in_flight: VecDeque::new(),
            unacked: 0,
            unpinged: 0,
            unpinged_since: None,
            next_seq: 1,
            transit: Duration::ZERO,
            recent: VecDeque::with_capacity(RECENT_TRANSITS),
        }
    }

    /// Whether another frame may be sent.
    pub(super) fn has_room(&self) -> bool {
        self.unacked < self.limit
    }

    /// Whether nothing sent is waiting for its pong.
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Records `bytes` just handed to the socket, not yet followed by a ping.
    pub(super) fn wrote(&mut self, bytes: usize, now: Instant) {
        self.unpinged += bytes;
        self.unacked += bytes;
        self.unpinged_since.get_or_insert(now);
    }

    /// Whether the frame just written must be followed by a ping: the bytes
    /// written since the last one reach half the window.
    pub(super) fn ping_due(&self) -> bool {
        self.unpinged > 0 && self.unpinged >= self.limit / 2
    }

    /// Whether, with nothing more to write now, a ping must go: bytes are
    /// unacknowledged and no ping in flight will bring their pong.
    pub(super) fn ping_wanted(&self) -> bool {
        self.unpinged > 0 && self.in_flight.is_empty()
    }

    /// Closes what was written since the last ping with a ping sent now;
    /// returns the ping's payload.
    pub(super) fn ping(&mut self, now: Instant) -> Bytes {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back(Segment {
            seq,
            bytes: std::mem::take(&mut self.unpinged),
            sent_at: self.unpinged_since.take().unwrap_or(now),
        });
        Bytes::from(format!("{PREFIX}{seq}"))
    }

    /// Records `bytes` just handed to the socket, followed by a ping; returns
    /// the ping's payload.
    pub(super) fn sent(&mut self, bytes: usize, now: Instant) -> Bytes {
        self.wrote(bytes, now);
        self.ping(now)
    }

    /// Takes a pong's payload: if it answers one of our pings, everything up
    /// to that ping is consumed. Returns whether it acknowledged anything.
    pub(super) fn acked(&mut self, payload: &[u8], now: Instant) -> bool {
        let Some(seq) = std::str::from_utf8(payload)
            .ok()
            .and_then(|text| text.strip_prefix(PREFIX))
            .and_then(|digits| digits.parse::<u64>().ok())
        else {
            return false;
        };
        if seq >= self.next_seq {
            return false; // Never sent: not an acknowledgement.
        }
        let mut acked = false;
        while let Some(front) = self.in_flight.front() {
            if front.seq > seq {
                break;
            }
            let measured = (front.seq == seq).then(|| now.saturating_duration_since(front.sent_at));
            self.unacked -= front.bytes;
            self.in_flight.pop_front();
            acked = true;
            if let Some(transit) = measured {
                self.transit = transit;
                if self.recent.len() == RECENT_TRANSITS {
                    self.recent.pop_front();
                }
                self.recent.push_back(transit);
                self.adapt(seq);
            }
        }
        acked
    }

    /// Halves the window if the frame just acknowledged (ping `seq`) took
    /// too long and it was sent after the last cut; grows it while frames
    /// are quick.
    fn adapt(&mut self, seq: u64) {
        if self.transit > self.target {
            if seq > self.cut_at {
                self.limit = (self.limit / 2).max(self.min);
                self.cut_at = self.next_seq - 1;
            }
        } else if self.transit <= self.target / 2 {
            self.limit = (self.limit + (self.limit / 8).max(1)).min(self.max);
        }
    }

    /// The most bytes of events to put in one frame: a quarter of the
    /// window, so that several frames are in flight at once.
    pub(super) fn frame_bytes(&self) -> usize {
        (self.limit / 4).max(1)
    }

    /// [`AckWindow::frame_bytes`] when the window is at its configured size
    /// (a client that keeps up).
    pub(super) fn max_frame_bytes(&self) -> usize {
        (self.max / 4).max(1)
    }

    /// How long a frame sent now is expected to take to reach the client: the
    /// longest of the recent transits, or longer if the oldest frame still
    /// in flight has already waited longer (the client slowed down, or
    /// stopped).
    pub(super) fn expected_transit(&self, now: Instant) -> Duration {
        let oldest = self
            .in_flight
            .front()
            .map(|segment| segment.sent_at)
            .or(self.unpinged_since);
        let waiting = oldest.map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        let recent = self.recent.iter().copied().max().unwrap_or_default();
        recent.max(waiting)
    }

    /// Unacknowledged bytes.
    #[cfg(test)]
    fn unacked(&self) -> usize {
        self.unacked
    }

    /// The window now.
    #[cfg(test)]
    fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target no test frame reaches: the window does not adapt.
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_pong_acknowledges_everything_before_its_ping() {
        let t0 = Instant::now();
        let mut window = AckWindow::new(100, HOUR);
        let a = window.sent(40, t0);
        let b = window.sent(40, t0);
        assert!(window.has_room());
        let c = window.sent(40, t0 + Duration::from_millis(10));
        assert!(!window.has_room(), "120 bytes in flight of 100");
        assert_eq!(window.unacked(), 120);

        // The pong for b covers a and b: pongs may be coalesced or lost.
        assert!(window.acked(&b, t0 + Duration::from_millis(300)));
        assert_eq!(window.unacked(), 40);
        assert!(window.has_room());
        assert_eq!(
            window.expected_transit(t0 + Duration::from_millis(310)),
            Duration::from_millis(300)
        );
        // A late pong for a acknowledges nothing more.
        assert!(!window.acked(&a, t0 + Duration::from_millis(320)));
        assert!(window.acked(&c, t0 + Duration::from_millis(60)));
        assert!(window.is_idle());
        // The longest recent transit counts, not only the last.
        assert_eq!(window.expected_transit(t0), Duration::from_millis(300));
        for _ in 0..RECENT_TRANSITS {
            let ping = window.sent(1, t0);
            window.acked(&ping, t0 + Duration::from_millis(50));
        }
        assert_eq!(window.expected_transit(t0), Duration::from_millis(50));
    }

    #[test]
    fn a_frame_waiting_longer_than_the_last_transit_raises_the_estimate() {
        let t0 = Instant::now();
        let mut window = AckWindow::new(1000, HOUR);
        let a = window.sent(10, t0);
        window.acked(&a, t0 + Duration::from_millis(5));
        window.sent(10, t0 + Duration::from_millis(10));
        assert_eq!(
            window.expected_transit(t0 + Duration::from_millis(12)),
            Duration::from_millis(5)
        );
        // The client stopped reading: the frame in flight has waited 3 s.
        assert_eq!(
            window.expected_transit(t0 + Duration::from_millis(3010)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn pings_follow_each_half_window_and_the_end_of_a_burst() {
        let t0 = Instant::now();
        let mut window = AckWindow::new(1000, HOUR);
        window.wrote(300, t0);
        assert!(!window.ping_due(), "300 of a 1000-byte window");
        assert!(
            window.ping_wanted(),
            "nothing in flight would acknowledge it"
        );
        window.wrote(300, t0 + Duration::from_millis(5));
        assert!(window.ping_due(), "600 bytes since the last ping");
        let first = window.ping(t0 + Duration::from_millis(9));
        assert!(!window.ping_due() && !window.ping_wanted());
        window.wrote(100, t0 + Duration::from_millis(10));
        assert!(
            !window.ping_wanted(),
            "the ping in flight comes back first, then these get theirs"
        );
        // The segment's transit counts from its first byte.
        assert!(window.acked(&first, t0 + Duration::from_millis(20)));
        assert_eq!(window.transit, Duration::from_millis(20));
        assert_eq!(window.unacked(), 100);
        assert!(window.ping_wanted());
        // Unpinged bytes count as waiting, too.
        assert_eq!(
            window.expected_transit(t0 + Duration::from_millis(50)),
            Duration::from_millis(40)
        );
    }

    #[test]
    fn pongs_that_are_not_ours_are_ignored() {
        let t0 = Instant::now();
        let mut window = AckWindow::new(10, HOUR);
        window.sent(10, t0);
        for payload in [
            &b""[..],
            b"1",
            b"sluice:",
            b"sluice:x",
            b"\xff\xfe",
            b"sluice:99",
        ] {
            assert!(!window.acked(payload, t0), "{payload:?}");
        }
        assert!(!window.has_room());
    }

    #[test]
    fn the_window_shrinks_for_a_slow_client_and_grows_back_for_a_fast_one() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut window = AckWindow::new(64 * 1024, ms(500));
        assert_eq!(window.frame_bytes(), 16 * 1024);
        // Four frames sent together take 800 ms to be consumed: one cut,
        // not four, since all were sent before the first cut was made.
        let pings: Vec<_> = (0..4).map(|_| window.sent(16 * 1024, t0)).collect();
        for ping in &pings {
            window.acked(ping, t0 + ms(800));
        }
        assert_eq!(window.limit(), 32 * 1024);
        // Still slow for frames sent after the cut: halved again, down to
        // the floor at most.
        for round in 1..10 {
            let sent_at = t0 + ms(1000 * round);
            let ping = window.sent(1024, sent_at);
            window.acked(&ping, sent_at + ms(700));
        }
        assert_eq!(window.limit(), MIN_WINDOW);
        assert_eq!(window.frame_bytes(), MIN_WINDOW / 4);
        // Quick again: the window grows back to the configured size, no further.
        for round in 10..100 {
            let sent_at = t0 + ms(1000 * round);
            let ping = window.sent(1024, sent_at);
            window.acked(&ping, sent_at + ms(10));
        }
        assert_eq!(window.limit(), 64 * 1024);
    }
}
