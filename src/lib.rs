//! The Sluice service: configuration, start-up wiring and HTTP routes around
//! the actors of the `sluice-actors` crate.
//!
//! Layout:
//! - [`config`]: every setting, as flags with environment fallbacks.
//! - [`database`]: DATABASE_URL with libpq's `sslmode` and `sslrootcert`, over rustls.
//! - [`startup`]: checks all that can fail at start, then starts the actors and
//!   the HTTP server; runs until shutdown.
//! - [`routes`]: health checks and metrics; [`ws`]: the WebSocket endpoint.
//! - [`telemetry`]: logging and the metrics recorder.
//! - [`load`]: `sluice load`, the load generator (also used by the benchmark).
//! - [`mapping`]: `--mapping mapping.toml`, rows into the user's own table.
//! - [`dead_letters`]: `sluice dead-letters` and `/api/dead-letters`: counts by
//!   reason, listing, replay (exactly once), discard.

pub mod config;
pub mod database;
pub mod dead_letters;
pub mod load;
pub mod mapping;
pub mod routes;
pub mod startup;
pub mod telemetry;
pub mod ws;
