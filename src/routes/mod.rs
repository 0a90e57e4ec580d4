//! HTTP routes: health checks, metrics, the stats snapshot, the dead letters
//! and the dashboard (the WebSocket route is in [`crate::ws`]).

pub mod dashboard;
pub mod dead_letters;
pub mod health;
pub mod metrics;
pub mod stats;
