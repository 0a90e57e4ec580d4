//! The actors of Sluice and the typed messages they exchange.
//!
//! Layout:
//! - [`event`]: what travels through the pipeline ([`Event`], [`EventData`],
//!   [`DeliveryRef`]) and how a broker delivery becomes one, or a dead letter.
//! - [`consumer`]: the Consumer actor (lapin channel, prefetch window, acks).
//! - [`settlement`]: the contiguous-watermark bookkeeping behind coalesced acks.
//! - [`tap`]: the Tap actor, which copies events to the live path without waiting.
//! - [`queue`]: the Queue actor (adaptive batching, overload policies).
//! - [`writer`]: the Writer actor and the [`store::Store`] it writes through.
//! - [`store`]: the `Store` trait and its PostgreSQL implementation.
//! - [`mapped_store`]: a `Store` writing into the user's own table through a
//!   [`mapped_store::TableMapping`].
//! - [`observable`], [`observer`], [`topic`]: the live path to WebSocket clients;
//!   [`shared_frames`]: frames built once for every observer of a selection.
//! - [`tls`]: connecting to the broker (`amqp://`, `amqps://`), and naming
//!   the cause of a failed TLS handshake; [`redact`]: passwords out of URLs.
//! - [`saturation`]: whether the datastore path is behind (its prefetch
//!   window full), the signal on which the live path yields the cores.
//! - [`history`]: the ring of recent events by position, for clients that resume.
//! - [`live_feed`]: the cluster-wide live feed through a RabbitMQ stream.
//! - [`internal_events`]: one struct per thing worth counting; `emit()` logs and records.
//!
//! Architecture invariant: this crate knows nothing about HTTP routing or
//! configuration parsing. It takes plain settings structs and addresses.

pub mod consumer;
pub mod event;
pub mod history;
pub mod internal_events;
pub mod live_event;
pub mod live_feed;
pub mod mapped_store;
pub mod messages;
pub mod observable;
pub mod observer;
pub mod queue;
pub mod redact;
pub mod saturation;
pub mod settlement;
pub mod shared_frames;
pub mod store;
pub mod tap;
pub mod tls;
pub mod topic;
pub mod writer;

pub use event::{DeadLetter, DeadReason, DeliveryRef, Event, EventData};
