//! Integration tests of the live path (issue 3) against the real service,
//! RabbitMQ and PostgreSQL, with real WebSocket clients (`awc`): delivery to
//! fast, slow and filtered clients, bounded memory under clients that never
//! read, refusals before the upgrade, close codes for bad client frames, and
//! the freshness bound for slow readers and slow links, and the live path
//! yielding to a backlog.
//! Each test has its own service, database and AMQP prefix, so they run in
//! parallel.

mod admission;
#[path = "../common/mod.rs"]
mod common;
mod delivery;
mod freshness;
mod helpers;
mod overload;
mod protocol;
mod yielding;
