//! Dead letters an operator can act on: counted by reason, listed without
//! being moved, replayed exactly once, discarded. The same code serves
//! `sluice dead-letters` ([`cli`]) and `/api/dead-letters`
//! (`src/routes/dead_letters.rs`); both talk to the broker with the
//! service's own settings.
//!
//! The broker sorts letters by reason (see `sluice_actors::consumer::Topology`):
//! each reason has its queue `P.dead.<reason>`, so a count is a queue depth
//! (one passive `queue.declare`, whatever the queue holds) and a replay of one
//! reason reads only its own queue. `P.dead` holds the letters without a
//! sorted place: those the broker dead-lettered itself when Sluice could not
//! publish them (no reason header), and those of versions before the sorting;
//! operators call them `unsorted`.
//!
//! Layout: this file (buckets, connecting, counts, errors); [`scan`] (reading
//! letters without changing anything); [`replay`] (replay and discard);
//! [`cli`] (the subcommand and its output).

pub mod cli;
pub mod replay;
pub mod scan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use sluice_actors::consumer::Topology;
use sluice_actors::event::DeadReason;
use sluice_actors::tls::{connect_broker, BrokerTls};

pub use replay::{discard, replay, DiscardReport, ReplayOptions, ReplayReport};
pub use scan::{Letter, Summary};

/// How long connecting to the broker may take before the command gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where letters wait: the queue of one reason, or `P.dead` (`unsorted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    /// `P.dead.<reason>`.
    Reason(DeadReasonKey),
    /// `P.dead`: letters dead-lettered by the broker itself or by earlier versions.
    Unsorted,
}

/// A [`DeadReason`] as an ordered key (its position in [`DeadReason::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeadReasonKey(usize);

impl DeadReasonKey {
    fn reason(self) -> DeadReason {
        DeadReason::ALL[self.0]
    }
}

impl Bucket {
    /// Every bucket: each reason in [`DeadReason::ALL`] order, then `unsorted`.
    pub fn all() -> Vec<Bucket> {
        (0..DeadReason::ALL.len())
            .map(|i| Bucket::Reason(DeadReasonKey(i)))
            .chain(std::iter::once(Bucket::Unsorted))
            .collect()
    }

    /// The bucket of `reason`.
    pub fn of(reason: DeadReason) -> Bucket {
        let index = DeadReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        Bucket::Reason(DeadReasonKey(index))
    }

    /// The bucket an operator named, or an error listing the names.
    pub fn parse(name: &str) -> Result<Bucket, DeadLetterError> {
        Bucket::all()
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| DeadLetterError::UnknownReason(name.to_owned()))
    }

    /// The reason's name (`overflow`, …) or `unsorted`.
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Reason(key) => key.reason().as_str(),
            Bucket::Unsorted => "unsorted",
        }
    }

    /// The queue holding this bucket's letters.
    pub fn queue(self, topology: &Topology) -> String {
        match self {
            Bucket::Reason(key) => topology.dead_for(key.reason()),
            Bucket::Unsorted => topology.dead.clone(),
        }
    }
}

/// What can go wrong; each is one sentence for the operator, and none of
/// them leaves anything changed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Not a reason Sluice writes.
    #[error(
        "unknown reason {0:?}: expected one of {names}",
        names = Bucket::all().iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
    )]
    UnknownReason(String),
    /// The broker could not be reached.
    #[error("{0}")]
    Broker(String),
    /// A queue or exchange the service declares is not there.
    #[error(
        "{what} {name} does not exist on this broker (AMQP_PREFIX={prefix}): has Sluice \
         (this version) run with this prefix? It declares the dead-letter queues at start"
    )]
    Missing {
        /// `dead-letter queue` or `exchange`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The prefix it derives from.
        prefix: String,
    },
    /// The broker failed in the middle of an operation; what was done so far
    /// is done (each letter is acked only after its copy is confirmed), the
    /// rest is still dead.
    #[error("{0}")]
    Failed(String),
}

/// Opens a connection named `name` with the service's settings, giving up
/// after [`CONNECT_TIMEOUT`].
pub async fn connect(
    amqp_url: &str,
    tls: &BrokerTls,
    name: &str,
) -> Result<Arc<Connection>, DeadLetterError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_broker(amqp_url, tls, properties)).await {
        Ok(Ok(connection)) => Ok(Arc::new(connection)),
        Ok(Err(err)) => Err(DeadLetterError::Broker(err.to_string())),
        Err(_) => Err(DeadLetterError::Broker(format!(
            "cannot connect to the broker at {} (AMQP_URL): no answer within {CONNECT_TIMEOUT:?}",
            sluice_actors::redact::redact(amqp_url)
        ))),
    }
}

/// The letters ready in `queue` (a passive declare: nothing is created).
/// Letters held unacknowledged by someone (a running replay or list) are
/// not counted.
pub async fn depth(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
) -> Result<u32, DeadLetterError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| DeadLetterError::Failed(format!("cannot open a channel: {e}")))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    match declared {
        Ok(q) => {
            let _ = channel.close(200, "counted".into()).await;
            Ok(q.message_count())
        }
        // A failed passive declare closes the channel itself.
        Err(err) => Err(missing_or_failed(err, "dead-letter queue", queue, topology)),
    }
}

/// Checks that `exchange` exists (a passive declare).
pub async fn exchange_exists(
    connection: &Connection,
    topology: &Topology,
    exchange: &str,
) -> Result<(), DeadLetterError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| DeadLetterError::Failed(format!("cannot open a channel: {e}")))?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    match channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            passive,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(())
        }
        Err(err) => Err(missing_or_failed(err, "exchange", exchange, topology)),
    }
}

fn missing_or_failed(
    err: lapin::Error,
    what: &'static str,
    name: &str,
    topology: &Topology,
) -> DeadLetterError {
    if err.to_string().contains("NOT_FOUND") {
        DeadLetterError::Missing {
            what,
            name: name.to_owned(),
            prefix: topology.exchange.clone(),
        }
    } else {
        DeadLetterError::Failed(format!("cannot read {what} {name}: {err}"))
    }
}

/// Letters held, by bucket (every bucket of `buckets`, zeros included).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Every letter counted.
    pub total: u64,
    /// By reason name (and `unsorted`).
    pub by_reason: BTreeMap<String, u64>,
}

/// Counts the letters of `buckets` from their queues' depths.
pub async fn counts(
    connection: &Connection,
    topology: &Topology,
    buckets: &[Bucket],
) -> Result<Counts, DeadLetterError> {
    let mut by_reason = BTreeMap::new();
    let mut total = 0;
    for bucket in buckets {
        let held = u64::from(depth(connection, topology, &bucket.queue(topology)).await?);
        total += held;
        by_reason.insert(bucket.name().to_owned(), held);
    }
    Ok(Counts { total, by_reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_and_unsorted_is_a_bucket_with_its_queue() {
        let topology = Topology::new("acme");
        let names: Vec<&str> = Bucket::all().iter().map(|b| b.name()).collect();
        assert_eq!(
            names,
            [
                "empty",
                "too_large",
                "not_utf8",
                "not_json",
                "rejected_by_database",
                "overflow",
                "unsorted"
            ]
        );
        assert_eq!(
            Bucket::parse("overflow").map(|b| b.queue(&topology)).ok(),
            Some("acme.dead.overflow".to_owned())
        );
        assert_eq!(Bucket::Unsorted.queue(&topology), "acme.dead");
        assert_eq!(Bucket::of(DeadReason::NotJson).name(), "not_json");
        let err = Bucket::parse("overflows").expect_err("unknown").to_string();
        assert!(
            err.starts_with("unknown reason \"overflows\": expected one of empty, too_large"),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
