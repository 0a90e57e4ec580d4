//! Dead letters: republished to the sorting dead-letter exchange with their
//! reason in headers, confirmed, and only then settled.
//!
//! Each letter keeps its body, routing key and properties; three headers are
//! added: `x-sluice-reason` (which also routes it to `P.dead.<reason>`),
//! `x-sluice-detail`, and `x-sluice-dead-at` (milliseconds since the epoch,
//! for the age `sluice dead-letters list` shows). A letter that is replayed
//! and fails again is dead-lettered again the same way, its replay count
//! (`x-sluice-replays`) kept.

use std::collections::HashMap;

use lapin::options::{BasicPublishOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use lapin::{Channel, Confirmation};

use crate::event::{headers, DeadLetter, DeadReason};
use crate::internal_events::datastore::DeadLettered;
use crate::settlement::Settled;

/// One metric update (and log line) per reason, not per message, for the
/// letters the broker now holds.
fn report_dead(dead: &[(DeadReason, String)]) {
    let mut by_reason: HashMap<DeadReason, (usize, &str)> = HashMap::new();
    for (reason, detail) in dead {
        by_reason.entry(*reason).or_insert((0, detail)).0 += 1;
    }
    for (reason, (count, detail)) in by_reason {
        DeadLettered {
            reason,
            count,
            detail: detail.to_owned(),
        }
        .emit();
    }
}

/// Longest `x-sluice-detail` header written.
const MAX_DETAIL: usize = 1024;

/// Publishes each dead letter to the sorting dead-letter exchange (`exchange`)
/// with its reason in the headers and waits for the broker's confirms
/// (`mandatory`: a letter no queue took counts as not published). A confirmed one is then
/// settled by ack (its copy is safe); one that could not be published is
/// rejected without requeue, so the queue's own dead-lettering takes it
/// (without our reason header, but not lost). Only then is it counted in
/// `sluice_events_dead_lettered_total`: the metric never runs ahead of what
/// the dead-letter queue holds.
pub(super) async fn dead_letter(
    dead_channel: &Channel,
    channel: &Channel,
    exchange: &str,
    letters: Vec<DeadLetter>,
) -> Vec<(u64, Settled)> {
    let mut pending = Vec::with_capacity(letters.len());
    let dead_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    for letter in letters {
        let mut table = letter.properties.headers().clone().unwrap_or_default();
        let mut detail = letter.detail;
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        table.insert(
            headers::REASON.into(),
            AMQPValue::LongString(letter.reason.as_str().into()),
        );
        table.insert(
            headers::DETAIL.into(),
            AMQPValue::LongString(detail.clone().into()),
        );
        table.insert(headers::DEAD_AT.into(), AMQPValue::LongLongInt(dead_at));
        let properties = letter.properties.with_headers(table);
        let publish = dead_channel
            .basic_publish(
                exchange.into(),
                letter.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &letter.body,
                properties,
            )
            .await;
        pending.push((letter.delivery.tag, letter.reason, detail, publish));
    }
    let mut settled = Vec::with_capacity(pending.len());
    let mut reported = Vec::with_capacity(pending.len());
    for (tag, reason, detail, publish) in pending {
        let confirmed = match publish {
            Ok(confirm) => match confirm.await {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))) => {
                    Err(format!("no queue took it (is {exchange} bound?)"))
                }
                Ok(_) => Err("the broker refused it (nack)".to_owned()),
                Err(err) => Err(err.to_string()),
            },
            Err(err) => Err(err.to_string()),
        };
        match confirmed {
            Ok(()) => {
                settled.push((tag, Settled::Ack));
                reported.push((reason, detail));
            }
            Err(why) => {
                log::warn!("could not publish dead letter for delivery {tag} ({why}); rejecting it instead");
                match channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await
                {
                    Ok(()) => {
                        settled.push((tag, Settled::Rejected));
                        reported.push((reason, detail));
                    }
                    Err(err) => log::warn!(
                        "reject of delivery {tag} failed too ({err}); the broker will redeliver it"
                    ),
                }
            }
        }
    }
    report_dead(&reported);
    settled
}
