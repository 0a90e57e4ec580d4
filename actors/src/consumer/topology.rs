//! The broker-side names of one deployment, all derived from one prefix.
//!
//! Dead letters are sorted by reason on the broker: Sluice publishes each one
//! to the headers exchange `P.dlx.sorted`, which routes on its
//! `x-sluice-reason` header to the durable queue `P.dead.<reason>`. So the
//! count of each reason is a queue depth (cheap to read, whatever the size),
//! and a replay of one reason reads only its own queue. Whatever that
//! exchange cannot route (a reason this version does not know) goes to its
//! alternate exchange, `P.dlx`, the fanout exchange the ingest queue
//! dead-letters to, bound to `P.dead`: there land the letters the broker
//! dead-lettered itself (when Sluice could not publish one; they carry
//! `x-death` but no reason) and those written by versions before the sorting.

use crate::event::DeadReason;

/// The broker-side names, all derived from one prefix so that several
/// deployments (and tests) can share a broker.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Durable topic exchange producers publish to.
    pub exchange: String,
    /// Durable queue bound to `exchange` with `#`; this is what Sluice consumes.
    pub ingest: String,
    /// Durable fanout exchange the ingest queue dead-letters to (its
    /// `x-dead-letter-exchange`, fixed when the queue was first declared),
    /// and the alternate exchange of `sorted_dlx`.
    pub dlx: String,
    /// Durable queue bound to `dlx`: letters without a sorted place (see the
    /// module documentation); operators call them `unsorted`.
    pub dead: String,
    /// Durable headers exchange Sluice publishes its dead letters to; it
    /// routes on `x-sluice-reason` to [`Topology::dead_for`], keeping each
    /// letter's own routing key.
    pub sorted_dlx: String,
    /// Durable fanout exchange bound to `ingest` alone: a replay publishes
    /// there, so each letter goes back with its own routing key and reaches
    /// no other queue bound to `exchange`.
    pub replay: String,
}

impl Topology {
    /// The names for `prefix`: `prefix`, `prefix.ingest`, `prefix.dlx`,
    /// `prefix.dead`, `prefix.dlx.sorted`, `prefix.replay`.
    pub fn new(prefix: &str) -> Self {
        Topology {
            exchange: prefix.to_owned(),
            ingest: format!("{prefix}.ingest"),
            dlx: format!("{prefix}.dlx"),
            dead: format!("{prefix}.dead"),
            sorted_dlx: format!("{prefix}.dlx.sorted"),
            replay: format!("{prefix}.replay"),
        }
    }

    /// The queue holding the dead letters of `reason`: `prefix.dead.<reason>`.
    pub fn dead_for(&self, reason: DeadReason) -> String {
        format!("{}.{}", self.dead, reason.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_derives_from_the_prefix() {
        let t = Topology::new("acme");
        assert_eq!(t.exchange, "acme");
        assert_eq!(t.ingest, "acme.ingest");
        assert_eq!(t.dlx, "acme.dlx");
        assert_eq!(t.dead, "acme.dead");
        assert_eq!(t.sorted_dlx, "acme.dlx.sorted");
        assert_eq!(t.replay, "acme.replay");
        assert_eq!(t.dead_for(DeadReason::Overflow), "acme.dead.overflow");
        assert_eq!(
            t.dead_for(DeadReason::Rejected),
            "acme.dead.rejected_by_database"
        );
    }
}
