//! An Observer whose client resumed from further back than the ring
//! (`LIVE_FEED=stream`): it reads the stream's replay at its client's pace,
//! then meets the ring.
//!
//! The Observable answers such a resume [`Resumed::FromStream`]; the
//! Observer then takes the replay's steps ([`Replays`]) one at a time, each
//! once everything before it was written to the socket, so a replay never
//! reads further ahead of its client than one step. After each step it asks
//! the Observable again to subscribe it after the last position the step
//! accounts for: once the ring holds that position, the rest comes from the
//! ring and the live stream, in the same one step that subscribes it, and
//! the replay ends (dropping its channel stops it).

use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use actix_http::ws::CloseCode;
use tokio::sync::mpsc;

use super::Observer;
use crate::history::Since;
use crate::live_event::LiveEvent;
use crate::live_feed::replay::{ReplayStep, Replays};
use crate::observable::Resumed;
use crate::shared_frames::SharedFrames;

/// A replay being read for this Observer's client.
#[derive(Debug)]
pub(super) struct Replaying {
    /// The replay's steps; `None` while one is being taken.
    steps: Option<mpsc::Receiver<ReplayStep>>,
    /// The Observable is being asked whether its ring takes over now.
    asking: bool,
}

impl Observer {
    /// Reads this instance's stream from `after` for the client: the
    /// Observable's ring no longer goes back that far.
    pub(super) fn start_replay(&mut self, after: u64, ctx: &mut Context<Self>) {
        let Some(replays) = self.replays.clone() else {
            // No stream to read (a local feed never answers FromStream).
            self.close(
                ctx,
                CloseCode::Error,
                "this instance cannot replay from that position".into(),
            );
            return;
        };
        let steps = Replays::start(&replays, after, self.pattern.clone());
        self.replaying = Some(Replaying {
            steps: Some(steps),
            asking: false,
        });
        self.take_replay_step(ctx);
    }

    /// Takes the replay's next step, if one is due: the buffer has written
    /// everything before it (called whenever the buffer runs empty).
    pub(super) fn take_replay_step(&mut self, ctx: &mut Context<Self>) {
        let Some(replaying) = &mut self.replaying else {
            return;
        };
        if replaying.asking || self.pending.has_frame() || self.ended.is_some() {
            return;
        }
        let Some(mut steps) = replaying.steps.take() else {
            return; // A step is on its way.
        };
        let next = async move {
            let step = steps.recv().await;
            (step, steps)
        };
        ctx.spawn(
            fut::wrap_future(next).map(|(step, steps), act: &mut Observer, ctx| {
                if let Some(replaying) = &mut act.replaying {
                    replaying.steps = Some(steps);
                }
                act.replay_step(step, ctx);
            }),
        );
    }

    fn replay_step(&mut self, step: Option<ReplayStep>, ctx: &mut Context<Self>) {
        if self.ended.is_some() {
            return;
        }
        match step {
            Some(ReplayStep::Segment { segment, through }) => {
                self.pending.missed(segment.missed, segment.missed_through);
                // Asked-for history: fresh from now (as a replay from the ring).
                let now = SystemTime::now();
                let events: Arc<[Arc<LiveEvent>]> = segment
                    .events
                    .into_iter()
                    .map(|event| Arc::new(LiveEvent::clone(&event).received(now)))
                    .collect();
                self.pending
                    .push(&events, &SharedFrames::default(), self.settings.on_full);
                if let Some(replaying) = &mut self.replaying {
                    replaying.asking = true;
                }
                self.since = Some(Since::After(through));
                self.subscribe(ctx);
                self.flush(ctx);
            }
            Some(ReplayStep::Failed(why)) => self.close(
                ctx,
                CloseCode::Error,
                format!("cannot replay the live stream: {why}"),
            ),
            None => self.close(
                ctx,
                CloseCode::Error,
                "cannot replay the live stream: the replay stopped".into(),
            ),
        }
    }

    /// The Observable's answer to a resume.
    pub(super) fn resumed(
        &mut self,
        resumed: Resumed,
        after: Option<u64>,
        ctx: &mut Context<Self>,
    ) {
        match (resumed, after) {
            (Resumed::Subscribed, _) => self.replaying = None,
            (Resumed::FromStream, Some(after)) => match &mut self.replaying {
                // Not there yet: the next step, once this one is written.
                Some(replaying) => {
                    replaying.asking = false;
                    self.take_replay_step(ctx);
                }
                None => self.start_replay(after, ctx),
            },
            (Resumed::FromStream, None) => {}
        }
    }
}
