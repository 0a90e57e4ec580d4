//! Reading dead letters without changing anything: `list`, the HTTP summary
//! and `replay --dry-run`.
//!
//! A queue can only be read from its head, and reading takes letters off it.
//! So a scan consumes *without acknowledging* on a channel of its own, and
//! then closes that channel: the broker puts every letter it delivered back
//! in its place (RabbitMQ requeues a classic queue's unacknowledged
//! deliveries to their original positions), so the letters, their order and
//! the counts are as before. What changes is invisible to Sluice: the broker
//! marks those letters `redelivered` (nothing reads that flag; a replay does
//! not copy it), and while a scan holds them (for the moment it reads them)
//! a concurrent replay does not see them and may end early — run it again.
//!
//! The newest letters are at the *tail*, so to show them a scan reads the
//! queue up to a bound (`--scan`, at most 65,535: it is also the scan's
//! prefetch window) and keeps the newest `limit` it saw; when a queue holds
//! more, the summary says the scan was partial.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::Serialize;
use sluice_actors::consumer::Topology;
use sluice_actors::event::{derive_message_id, headers};

use super::{counts, Bucket, DeadLetterError};

/// The most letters one scan reads from one queue (the largest prefetch
/// window AMQP allows).
pub const MAX_SCAN: u32 = u16::MAX as u32;

/// How long a scan waits for the next letter before deciding the queue
/// changed under it (another reader took letters) and stopping.
const IDLE: Duration = Duration::from_secs(2);

/// Characters of a body shown.
const PREVIEW_CHARS: usize = 100;

/// One letter, as an operator sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Letter {
    /// Its idempotency key: the AMQP `message_id`, or the derived
    /// `sha256:` key the row would get (see `EventData::from_delivery`).
    pub message_id: String,
    /// The queue it waits in: its reason's name, or `unsorted`.
    pub queue: String,
    /// Its `x-sluice-reason`, or `unknown` (dead-lettered by the broker).
    pub reason: String,
    /// Its `x-sluice-detail`, or what the broker's `x-death` says.
    pub detail: String,
    /// The routing key it was published with (a replay restores it).
    pub routing_key: String,
    /// When it was dead-lettered, RFC 3339, if known.
    pub dead_at: Option<String>,
    /// Seconds since then.
    pub age_seconds: Option<f64>,
    /// Times it was replayed already.
    pub replays: u64,
    /// Size of the body.
    pub body_bytes: usize,
    /// The body's first characters (invalid UTF-8 shown as U+FFFD, control
    /// characters as spaces).
    pub body_preview: String,
    /// When it was dead-lettered, for ordering (ms since the epoch).
    #[serde(skip)]
    dead_at_ms: Option<u64>,
    /// Order of reading, for ordering letters dead-lettered in the same ms.
    #[serde(skip)]
    read_order: u64,
}

/// Counts by reason and the newest letters: what `list --json` prints and
/// `GET /api/dead-letters` returns.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Letters held in the queues asked about.
    pub total: u64,
    /// By reason (and `unsorted`), zeros included.
    pub by_reason: std::collections::BTreeMap<String, u64>,
    /// The newest letters, newest first.
    pub letters: Vec<Letter>,
    /// Letters read to choose them.
    pub scanned: u64,
    /// Whether every letter of those queues was read (else the letters shown
    /// are the newest of the first `scan` of each queue).
    pub scan_complete: bool,
}

/// The counts of `buckets` and their newest `limit` letters, reading at most
/// `scan` letters per queue. Changes nothing (see the module documentation).
pub async fn summarize(
    connection: &Connection,
    topology: &Topology,
    buckets: &[Bucket],
    limit: usize,
    scan: u32,
) -> Result<Summary, DeadLetterError> {
    let counts = counts(connection, topology, buckets).await?;
    let mut letters: Vec<Letter> = Vec::new();
    let mut scanned = 0;
    let mut complete = true;
    if limit > 0 {
        let now = SystemTime::now();
        for bucket in buckets {
            let held = counts.by_reason.get(bucket.name()).copied().unwrap_or(0);
            let to_read = u32::try_from(held)
                .unwrap_or(u32::MAX)
                .min(scan.min(MAX_SCAN));
            let queue = bucket.queue(topology);
            let read = read_in_place(connection, &queue, to_read, |delivery| {
                let order = scanned;
                scanned += 1;
                letters.push(Letter::from_delivery(*bucket, &delivery, now, order));
                if letters.len() >= limit * 2 {
                    keep_newest(&mut letters, limit);
                }
            })
            .await?;
            complete &= u64::from(read) == held;
        }
        keep_newest(&mut letters, limit);
    }
    Ok(Summary {
        total: counts.total,
        by_reason: counts.by_reason,
        letters,
        scanned,
        scan_complete: complete,
    })
}

/// Sorts newest first and keeps `limit`.
fn keep_newest(letters: &mut Vec<Letter>, limit: usize) {
    letters.sort_by(|a, b| {
        (b.dead_at_ms.unwrap_or(0), b.read_order).cmp(&(a.dead_at_ms.unwrap_or(0), a.read_order))
    });
    letters.truncate(limit);
}

/// Reads up to `to_read` letters from the head of `queue` without taking
/// them: consumed unacknowledged on a channel of its own, which is then
/// closed so the broker puts them all back where they were. Returns how many
/// were read (fewer when the queue lost letters meanwhile).
pub(super) async fn read_in_place(
    connection: &Connection,
    queue: &str,
    to_read: u32,
    mut visit: impl FnMut(Delivery),
) -> Result<u32, DeadLetterError> {
    if to_read == 0 {
        return Ok(0);
    }
    let failed = |e: lapin::Error| DeadLetterError::Failed(format!("cannot read {queue}: {e}"));
    let channel = connection.create_channel().await.map_err(failed)?;
    let result = async {
        // The window must hold every letter read: none is acknowledged.
        let window = u16::try_from(to_read).unwrap_or(u16::MAX);
        channel
            .basic_qos(window, BasicQosOptions::default())
            .await
            .map_err(failed)?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("sluice-list-{}", std::process::id())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
        let mut read = 0;
        while read < to_read {
            match tokio::time::timeout(IDLE, consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    read += 1;
                    visit(delivery);
                }
                Ok(Some(Err(e))) => return Err(failed(e)),
                // The queue lost letters meanwhile (another reader), or the
                // consumer was cancelled: what was read stands.
                Ok(None) | Err(_) => break,
            }
        }
        Ok(read)
    }
    .await;
    // Closing the channel hands every delivery back, unacknowledged.
    if let Err(e) = channel.close(200, "read in place".into()).await {
        log::debug!("closing the scan channel of {queue}: {e}");
    }
    result
}

impl Letter {
    fn from_delivery(bucket: Bucket, delivery: &Delivery, now: SystemTime, order: u64) -> Letter {
        let properties = &delivery.properties;
        let table = properties.headers().clone().unwrap_or_default();
        let routing_key = delivery.routing_key.as_str().to_owned();
        let death = broker_death(&table);
        let dead_at_ms = header_u64(&table, headers::DEAD_AT)
            .or_else(|| death.as_ref().and_then(|d| d.time).map(|s| s * 1000));
        let at = dead_at_ms.and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)));
        let reason = header_text(&table, headers::REASON).unwrap_or_else(|| "unknown".to_owned());
        let detail = header_text(&table, headers::DETAIL).unwrap_or_else(|| match &death {
            Some(death) => format!(
                "dead-lettered by the broker ({}, from {}): Sluice could not publish it itself",
                death.reason, death.queue
            ),
            None => String::new(),
        });
        Letter {
            message_id: message_id(properties, &routing_key, &delivery.data),
            queue: bucket.name().to_owned(),
            reason,
            detail,
            routing_key,
            dead_at: at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            age_seconds: at.and_then(|t| now.duration_since(t).ok().map(|d| d.as_secs_f64())),
            replays: replays(properties),
            body_bytes: delivery.data.len(),
            body_preview: preview(&delivery.data),
            dead_at_ms,
            read_order: order,
        }
    }
}

/// The key the row of this message gets: its `message_id`, or the derived one.
pub(super) fn message_id(properties: &BasicProperties, routing_key: &str, body: &[u8]) -> String {
    match properties.message_id() {
        Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
        _ => derive_message_id(routing_key, properties.timestamp(), body),
    }
}

/// The letter's replay count (0 when it was never replayed).
pub(super) fn replays(properties: &BasicProperties) -> u64 {
    properties
        .headers()
        .as_ref()
        .and_then(|table| header_u64(table, headers::REPLAYS))
        .unwrap_or(0)
}

fn preview(body: &[u8]) -> String {
    let head = &body[..body.len().min(PREVIEW_CHARS * 4)];
    let decoded = String::from_utf8_lossy(head);
    let mut text: String = decoded
        .chars()
        .take(PREVIEW_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if head.len() < body.len() || decoded.chars().count() > PREVIEW_CHARS {
        text.push('…');
    }
    text
}

fn header_text(table: &FieldTable, name: &str) -> Option<String> {
    table.inner().get(name).and_then(headers::as_text)
}

fn header_u64(table: &FieldTable, name: &str) -> Option<u64> {
    table.inner().get(name).and_then(headers::as_u64)
}

/// The newest entry of the broker's `x-death` header.
struct BrokerDeath {
    reason: String,
    queue: String,
    /// Seconds since the epoch.
    time: Option<u64>,
}

fn broker_death(table: &FieldTable) -> Option<BrokerDeath> {
    let AMQPValue::FieldArray(deaths) = table.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    Some(BrokerDeath {
        reason: header_text(first, "reason").unwrap_or_else(|| "?".to_owned()),
        queue: header_text(first, "queue").unwrap_or_else(|| "?".to_owned()),
        time: header_u64(first, "time"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(dead_at_ms: Option<u64>, order: u64) -> Letter {
        Letter {
            message_id: format!("m{order}"),
            queue: "overflow".into(),
            reason: "overflow".into(),
            detail: String::new(),
            routing_key: "k".into(),
            dead_at: None,
            age_seconds: None,
            replays: 0,
            body_bytes: 0,
            body_preview: String::new(),
            dead_at_ms,
            read_order: order,
        }
    }

    #[test]
    fn the_newest_are_kept_newest_first_and_ties_go_by_reading_order() {
        let mut letters = vec![
            letter(Some(10), 0),
            letter(Some(30), 1),
            letter(None, 2),
            letter(Some(30), 3),
            letter(Some(20), 4),
        ];
        keep_newest(&mut letters, 3);
        let ids: Vec<&str> = letters.iter().map(|l| l.message_id.as_str()).collect();
        assert_eq!(ids, ["m3", "m1", "m4"]);
    }

    #[test]
    fn previews_are_short_single_line_text() {
        assert_eq!(preview(b"{\"a\":\n1}"), "{\"a\": 1}");
        assert_eq!(preview(&[b'"', 0xff, b'"']), "\"\u{fffd}\"");
        let long = vec![b'x'; 500];
        let shown = preview(&long);
        assert_eq!(shown.chars().count(), PREVIEW_CHARS + 1);
        assert!(shown.ends_with('…'));
    }
}
