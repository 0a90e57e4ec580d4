//! Test helpers for Sluice's integration tests and benchmark, all against the real servers.
//!
//! - [`proxy`]: a TCP proxy that can refuse, cut and delay connections (put it
//!   between the service and PostgreSQL to simulate an outage or a remote database).
//! - [`db`]: a throwaway PostgreSQL database per test, dropped afterwards.
//! - [`amqp`]: a unique topology prefix per test, a publisher with confirms,
//!   queue inspection and clean-up.
//! - [`broker`]: a RabbitMQ node of a test's own, which it may restart.
//! - [`tls`]: a certificate authority made at test time, and a
//!   TLS-terminating proxy to put in front of the plain local broker.
//! - [`service`]: the `sluice` binary as a child process, with its logs captured,
//!   its HTTP address discovered from its log, and signals to stop it; plus
//!   [`service::wait_until`] for eventually-consistent checks.
//!
//! Nothing here is a mock: each helper talks to the real RabbitMQ and PostgreSQL
//! (defaults: `amqp://guest:guest@127.0.0.1:5672/%2f` and
//! `postgres://postgres@127.0.0.1:5432`, overridable with `AMQP_URL` and
//! `DATABASE_URL_BASE`).

pub mod amqp;
pub mod broker;
pub mod db;
pub mod proxy;
pub mod service;
pub mod tls;

pub use amqp::{unique_prefix, Publisher, TopologyGuard};
pub use broker::PrivateBroker;
pub use db::{fresh_database, TestDb};
pub use proxy::{Mode, Proxy};
pub use service::{eventually, wait_until, Service};

/// A random lowercase suffix for names that must not collide between tests
/// running in parallel (databases, AMQP prefixes).
pub fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..12)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}
