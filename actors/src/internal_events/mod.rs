//! Instrumentation: one struct per thing worth knowing; its `emit()` writes the
//! log line (when there is one) and records the metric, together, in one place.
//!
//! Metric names follow `sluice_<name>_<unit>[_total]`. The datastore path's
//! events live in [`datastore`], the live path's in [`live`], what operators
//! do with dead letters in [`dead_letters`].

pub mod datastore;
pub mod dead_letters;
pub mod live;
pub mod live_feed;
