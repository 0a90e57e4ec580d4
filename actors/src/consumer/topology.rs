//! The broker-side names of one deployment, all derived from one prefix.

/// The broker-side names, all derived from one prefix so that several
/// deployments (and tests) can share a broker.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Durable topic exchange producers publish to.
    pub exchange: String,
    /// Durable queue bound to `exchange` with `#`; this is what Sluice consumes.
    pub ingest: String,
    /// Durable fanout exchange for dead letters.
    pub dlx: String,
    /// Durable queue bound to `dlx`: where dead letters wait for a human.
    pub dead: String,
}

impl Topology {
    /// The names for `prefix`: `prefix`, `prefix.ingest`, `prefix.dlx`, `prefix.dead`.
    pub fn new(prefix: &str) -> Self {
        Topology {
            exchange: prefix.to_owned(),
            ingest: format!("{prefix}.ingest"),
            dlx: format!("{prefix}.dlx"),
            dead: format!("{prefix}.dead"),
        }
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
    }
}
