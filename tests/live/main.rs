//! Integration tests of the live path (issue 3) against the real service,
//! RabbitMQ and PostgreSQL, with real WebSocket clients (`awc`): delivery to
//! fast, slow and filtered clients, bounded memory under clients that never
//! read, refusals before the upgrade, and close codes for bad client frames.
//! Each test has its own service, database and AMQP prefix, so they run in
//! parallel.

mod admission;
#[path = "../common/mod.rs"]
mod common;
mod delivery;
mod helpers;
mod overload;
mod protocol;
