//! Integration tests of the datastore path and of start-up against the real RabbitMQ and
//! PostgreSQL: one test binary, each test with its own database and its own
//! AMQP prefix, so they run in parallel.

#[path = "../common/mod.rs"]
mod common;
mod datastore;
mod faults;
mod helpers;
mod latency;
mod overload;
mod startup;
