//! When and what an Observer writes: frames while the client can take
//! them (room in the channel to the socket, room in the acknowledgement
//! window), each followed by its ping; events too old to show skipped; the
//! stall timer while the client makes no progress; the heartbeat ping when
//! nothing is in flight.
//!
//! The signals are a channel permit awaited in a spawned future and the
//! client's pongs: no polling. The one timer is the yield: while the
//! datastore path is behind ([`crate::saturation`]), a frame of events
//! waits for the end of the yield interval after the previous one.

use std::time::{Duration, SystemTime};

use actix::prelude::*;
use actix_http::ws::{CloseCode, Message};
use tokio::sync::mpsc::error::TrySendError;
// Tokio's clock, so that tests can pause and advance time.
use tokio::time::Instant;

use super::buffer::FrameLimits;
use super::{Observer, CLOSE_STALLED, CLOSE_TIMEOUT};
use crate::internal_events::live::{DropStage, LiveEventsDropped, ObserverLagging};

impl Observer {
    /// Writes frames while the channel has room and the window is not
    /// full, skipping events that would reach the client too old; a ping
    /// follows every half window written, and the last frame when no ping
    /// is in flight (see `window.rs`). When blocked with events waiting,
    /// arms the stall timer; when the channel is full, waits for room in a
    /// spawned future.
    pub(super) fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.waiting_for_room || self.ended.is_some() {
            return;
        }
        loop {
            if !self.window.has_room() {
                // The next pong calls flush again.
                if self.pending.has_frame() {
                    self.arm_stall_timer(ctx);
                }
                break;
            }
            self.expire();
            if !self.pending.has_frame() {
                self.disarm_stall_timer(ctx);
                // Everything written: a resume from the stream goes on.
                self.take_replay_step(ctx);
                break;
            }
            let notice = self.pending.notice_first();
            if self.yields(ctx) {
                break;
            }
            let limits = FrameLimits {
                max_events: self.settings.max_events_per_frame,
                max_bytes: self.window.frame_bytes(),
            };
            let shared = self.shared_limits();
            // Room for the frame and the ping that may follow it.
            let blocked = match self.outgoing.try_reserve_many(2) {
                Ok(mut permits) => {
                    let (Some(frame), Some(first), Some(second)) = (
                        self.pending.next_frame(limits, shared),
                        permits.next(),
                        permits.next(),
                    ) else {
                        break;
                    };
                    first.send(frame.message);
                    let now = Instant::now();
                    self.window.wrote(frame.text_len, now);
                    if !notice {
                        self.yield_until = self.next_frame_at(now);
                    }
                    if self.window.ping_due() {
                        second.send(Message::Ping(self.window.ping(now)).into());
                    }
                    continue;
                }
                Err(err) => err,
            };
            match blocked {
                TrySendError::Full(()) => self.wait_for_room(ctx),
                TrySendError::Closed(()) => self.gone(ctx),
            }
            return;
        }
        // Nothing more to write now: what was written must be acknowledged.
        if self.window.ping_wanted() {
            let blocked = match self.outgoing.try_reserve() {
                Ok(permit) => {
                    permit.send(Message::Ping(self.window.ping(Instant::now())).into());
                    return;
                }
                Err(err) => err,
            };
            match blocked {
                TrySendError::Full(()) => self.wait_for_room(ctx),
                TrySendError::Closed(()) => self.gone(ctx),
            }
        }
    }

    /// Whether the next frame must wait because the live path yields to the
    /// datastore path (see [`crate::saturation`]): at most one frame of
    /// events per `yield_interval` while it is behind. A notice waits too,
    /// and goes with the next frame of events (one wake-up of the socket,
    /// not two). Schedules a flush for when they may go.
    fn yields(&mut self, ctx: &mut Context<Self>) -> bool {
        let Some(until) = self.yield_until else {
            return false;
        };
        let now = Instant::now();
        if now >= until || !self.settings.saturation.is_behind() {
            self.yield_until = None;
            return false;
        }
        if !self.yield_timer {
            self.yield_timer = true;
            ctx.run_later(until - now, |act, ctx| {
                act.yield_timer = false;
                act.flush(ctx);
            });
        }
        true
    }

    /// A frame of events went at `now`: while the datastore path is behind,
    /// the next waits for the yield interval.
    fn next_frame_at(&self, now: Instant) -> Option<Instant> {
        (!self.settings.yield_interval.is_zero() && self.settings.saturation.is_behind())
            .then(|| now + self.settings.yield_interval)
    }

    /// The limits of the frames built once per delivery for every observer
    /// (see [`crate::shared_frames`]): the configured ones, which a client's
    /// own never exceed, so every caught-up client can send them.
    fn shared_limits(&self) -> FrameLimits {
        FrameLimits {
            max_events: self.settings.max_events_per_frame,
            max_bytes: self.window.max_frame_bytes(),
        }
    }

    /// Skips the buffered events that would be older than the freshness
    /// bound when the client gets them: their age now plus the time a frame
    /// is expected to take to reach it.
    fn expire(&mut self) {
        let transit = self.window.expected_transit(Instant::now());
        let max_age = self.settings.max_lag.saturating_sub(transit);
        let skipped = self.pending.expire(SystemTime::now(), max_age);
        if skipped > 0 {
            LiveEventsDropped {
                stage: DropStage::Stale,
                events: skipped,
            }
            .emit();
            if !self.lagging {
                self.lagging = true;
                ObserverLagging {
                    observer: self.id.0,
                    stage: DropStage::Stale,
                }
                .emit();
            }
        }
    }

    /// Closes the session with [`CLOSE_STALLED`] unless the client makes
    /// progress (room in the channel, a pong) within the stall timeout.
    fn arm_stall_timer(&mut self, ctx: &mut Context<Self>) {
        if self.stall_timer.is_some() {
            return;
        }
        let stall_timeout = self.settings.stall_timeout;
        self.stall_timer = Some(ctx.run_later(stall_timeout, move |act, ctx| {
            act.stall_timer = None;
            act.close(
                ctx,
                CloseCode::Other(CLOSE_STALLED),
                format!(
                    "stalled: the client read nothing for {}s",
                    stall_timeout.as_secs()
                ),
            );
        }));
    }

    /// The client made progress: no stall.
    pub(super) fn disarm_stall_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.stall_timer.take() {
            ctx.cancel_future(timer);
        }
    }

    /// Waits for the socket to drain until a frame and its ping fit: the
    /// permits are the signal, awaited in a spawned future so that the
    /// Observer keeps buffering (and dropping) meanwhile.
    fn wait_for_room(&mut self, ctx: &mut Context<Self>) {
        self.waiting_for_room = true;
        self.arm_stall_timer(ctx);
        let outgoing = self.outgoing.clone();
        let room = async move { outgoing.reserve_many(2).await.map(drop) };
        ctx.spawn(
            fut::wrap_future(room).map(|result, act: &mut Observer, ctx| {
                act.waiting_for_room = false;
                if act.ended.is_some() {
                    return;
                }
                match result {
                    Ok(()) => {
                        act.disarm_stall_timer(ctx);
                        act.flush(ctx);
                    }
                    Err(_) => act.gone(ctx),
                }
            }),
        );
    }

    /// Every heartbeat: closes the session when nothing came from the
    /// client for the client timeout, else pings it if nothing is in flight.
    pub(super) fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if self.last_heard.elapsed() >= self.settings.client_timeout {
            let secs = self.settings.client_timeout.as_secs();
            self.close(
                ctx,
                CloseCode::Other(CLOSE_TIMEOUT),
                format!("timeout: nothing received from the client for {secs}s"),
            );
            return;
        }
        // Pings already follow every frame; when none is in flight, one
        // goes alone, so that a quiet stream still hears from its client.
        // A full channel means the client is not reading: the ping would
        // not reach it anyway, and the client timeout will tell.
        if !self.window.is_idle() {
            return;
        }
        let closed = match self.outgoing.try_reserve() {
            Ok(permit) => {
                permit.send(Message::Ping(self.window.sent(0, Instant::now())).into());
                false
            }
            Err(err) => matches!(err, TrySendError::Closed(())),
        };
        if closed {
            self.gone(ctx);
        }
    }

    /// How often [`Observer::heartbeat`] runs: a zero interval would spin; a
    /// tenth of a second is already plenty.
    pub(super) fn heartbeat_interval(&self) -> Duration {
        self.settings.heartbeat.max(Duration::from_millis(100))
    }
}
