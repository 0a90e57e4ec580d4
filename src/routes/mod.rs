//! HTTP routes: health checks and metrics (the WebSocket route is in [`crate::ws`]).

pub mod health;
pub mod metrics;
