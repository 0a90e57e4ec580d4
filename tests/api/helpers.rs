//! The datastore tests' own helpers, on top of the shared `TestApp`
//! (`tests/common`): publishing numbered and raw messages, reading headers.

use lapin::BasicProperties;
use sluice_testkit::amqp::GotMessage;
use sluice_testkit::fresh_database;

pub use crate::common::*;

/// Starts the service with default settings on a fresh database and prefix.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(fresh_database().await, &[]).await
}

impl TestApp {
    /// Publishes `n` JSON events with ids `<tag>-<i>`, each confirmed by the broker.
    pub async fn publish(&self, tag: &str, n: usize) {
        self.publisher
            .publish_json_batch(&self.prefix, n, |i| Some(format!("{tag}-{i}")))
            .await
            .expect("publish confirmed");
    }

    /// Publishes one message with this body and message id.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], message_id: Option<&str>) {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        self.publisher
            .publish(&self.prefix, routing_key, body, props)
            .await
            .expect("publish confirmed");
    }
}

/// A header of a dead letter as text.
pub fn header(message: &GotMessage, name: &str) -> Option<String> {
    message.header_str(name)
}
