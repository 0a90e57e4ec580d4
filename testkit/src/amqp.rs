//! RabbitMQ helpers: a unique topology prefix, a confirming publisher, queue inspection, clean-up.
//!
//! Each test gives the service its own `AMQP_PREFIX` (from [`unique_prefix`]), so
//! the topology it declares — topic exchange `<prefix>`, queue `<prefix>.ingest`,
//! the dead-letter exchanges `<prefix>.dlx` and `<prefix>.dlx.sorted`, the
//! dead-letter queues `<prefix>.dead.<reason>` and `<prefix>.dead`, the replay
//! exchange `<prefix>.replay` — is private to the test; [`delete_topology`]
//! removes it afterwards. [`dead_queues`] names every dead-letter queue.
//!
//! The broker is `amqp://guest:guest@127.0.0.1:5672/%2f` unless `AMQP_URL` says otherwise.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// The broker used when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `AMQP_URL` or [`DEFAULT_AMQP_URL`].
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned())
}

/// The broker's address, from [`amqp_url`]: for a [`crate::Proxy`] in front of it.
pub fn broker_addr() -> Result<SocketAddr> {
    let uri: AMQPUri = amqp_url()
        .parse()
        .map_err(|e| anyhow::anyhow!("AMQP_URL does not parse: {e}"))?;
    let (host, port) = (uri.authority.host.as_str(), uri.authority.port);
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving the broker {host}:{port}"))?
        .next()
        .with_context(|| format!("the broker {host}:{port} resolves to no address"))
}

/// [`amqp_url`], with the same credentials and vhost, pointed at `addr`
/// (plain AMQP; a proxy in front of the broker).
pub fn url_via(addr: SocketAddr) -> Result<String> {
    let uri: AMQPUri = amqp_url()
        .parse()
        .map_err(|e| anyhow::anyhow!("AMQP_URL does not parse: {e}"))?;
    let user = &uri.authority.userinfo;
    let vhost = uri.vhost.replace('%', "%25").replace('/', "%2f");
    Ok(format!(
        "amqp://{}:{}@{addr}/{vhost}",
        user.username, user.password
    ))
}

/// How long [`close`] waits for the broker's `close-ok`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Close `connection`, giving up after [`CLOSE_TIMEOUT`]: lapin's close
/// has been seen to wait forever for an answer on a socket already gone,
/// and a helper must not hang a test or a benchmark for it.
pub async fn close(connection: &Connection) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "bye".into())).await;
}

/// A topology prefix no other test uses: `sluice_test_<random>`.
pub fn unique_prefix() -> String {
    format!("sluice_test_{}", crate::random_suffix())
}

/// Connect on the current tokio runtime; an `amqps://` URL trusts
/// `AMQP_TLS_CA` and presents `AMQP_TLS_CERT`/`AMQP_TLS_KEY` when those
/// environment variables are set, as the service does.
async fn connect(url: &str) -> Result<Connection> {
    let runtime = lapin::runtime::default_runtime().context("lapin runtime")?;
    Connection::connect_with_config(
        url,
        ConnectionProperties::default(),
        tls_from_env()?,
        runtime,
    )
    .await
    .with_context(|| {
        let shown = url.split_once('@').map_or(url, |(_, host)| host);
        format!("cannot connect to RabbitMQ at {shown} (is it running? see scripts/setup.sh)")
    })
}

/// The service's `AMQP_TLS_*` settings, from the environment.
fn tls_from_env() -> Result<lapin::tcp::OwnedTLSConfig> {
    let read = |name: &str| -> Result<Option<Vec<u8>>> {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(|path| std::fs::read(&path).with_context(|| format!("reading {name}")))
            .transpose()
    };
    let identity = match (read("AMQP_TLS_CERT")?, read("AMQP_TLS_KEY")?) {
        (Some(pem), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 { pem, key }),
        _ => None,
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity,
        cert_chain: read("AMQP_TLS_CA")?.map(|pem| String::from_utf8_lossy(&pem).into_owned()),
    })
}

/// A connection and a channel in confirm mode: every publish waits for the broker's ack.
#[derive(Debug)]
pub struct Publisher {
    connection: Connection,
    channel: Channel,
}

impl Publisher {
    /// Connect to `url` and put a channel in confirm mode (`confirm.select`).
    pub async fn connect(url: &str) -> Result<Publisher> {
        let connection = connect(url).await?;
        let channel = connection.create_channel().await.context("open channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("confirm.select")?;
        Ok(Publisher {
            connection,
            channel,
        })
    }

    /// The underlying channel (confirm mode), for anything not covered here.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publish one message and wait until the broker confirms it (an error if nacked).
    /// Publishing to an exchange that does not exist closes the channel: start the
    /// service (which declares the topology) first.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .with_context(|| format!("publish to exchange {exchange:?}"))?;
        let confirmation = confirm
            .await
            .with_context(|| format!("confirm from exchange {exchange:?}"))?;
        if !confirmation.is_ack() {
            bail!("broker did not ack a publish to {exchange:?}: {confirmation:?}");
        }
        Ok(())
    }

    /// Publish `n` JSON messages to exchange `prefix`, then wait for all their confirms.
    ///
    /// Message `i` (0-based) has routing key `test.<i mod 10>`, body
    /// `{"seq": i, "prefix": "<prefix>"}`, the current time as `timestamp`, a header
    /// `seq = i`, and `message_id = id_fn(i)` (`None` publishes without one).
    /// Confirms are awaited together (pipelined), so large batches are quick.
    pub async fn publish_json_batch(
        &self,
        prefix: &str,
        n: usize,
        mut id_fn: impl FnMut(usize) -> Option<String>,
    ) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut confirms = Vec::with_capacity(n);
        for i in 0..n {
            let body = serde_json::json!({ "seq": i, "prefix": prefix }).to_string();
            let mut headers = FieldTable::default();
            headers.insert("seq".into(), AMQPValue::LongLongInt(i64::try_from(i)?));
            let mut props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(now)
                .with_headers(headers);
            if let Some(id) = id_fn(i) {
                props = props.with_message_id(id.into());
            }
            let confirm = self
                .channel
                .basic_publish(
                    prefix.into(),
                    format!("test.{}", i % 10).into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .with_context(|| format!("publish message {i} to exchange {prefix:?}"))?;
            confirms.push(confirm);
        }
        for (i, confirm) in confirms.into_iter().enumerate() {
            let confirmation = confirm
                .await
                .with_context(|| format!("confirm of message {i} to {prefix:?}"))?;
            if !confirmation.is_ack() {
                bail!("broker did not ack message {i} to {prefix:?}: {confirmation:?}");
            }
        }
        Ok(())
    }

    /// Close the channel and the connection cleanly (bounded, see [`close`]).
    pub async fn close(self) -> Result<()> {
        let channel = self.channel.close(200, "bye".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel).await;
        close(&self.connection).await;
        Ok(())
    }
}

/// What a queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery.
    pub ready: u32,
    /// Delivered to a consumer and not yet acked or rejected. AMQP itself does not
    /// report this: it comes from `rabbitmqctl` when that works on this machine
    /// (same host, permission to read the Erlang cookie, e.g. root), else `None`.
    pub unacked: Option<u32>,
    /// Consumers attached.
    pub consumers: u32,
}

/// Counts for queue `queue` (a full name, e.g. `<prefix>.ingest`).
///
/// Uses `rabbitmqctl list_queues` when available (one consistent snapshot of
/// ready and unacked, ~0.3 s), otherwise a passive `queue.declare` over AMQP
/// (ready and consumers only). For a fast poll of the ready count use [`ready_count`].
/// To prove "nothing unacked" without `rabbitmqctl`: stop the service (its
/// unacked deliveries return to the queue) and check that `ready` is 0.
pub async fn queue_counts(url: &str, queue: &str) -> Result<QueueCounts> {
    if let Some(counts) = rabbitmqctl_counts(queue) {
        return Ok(counts);
    }
    let (ready, consumers) = ready_and_consumers(url, queue).await?;
    Ok(QueueCounts {
        ready,
        unacked: None,
        consumers,
    })
}

/// Ready messages in `queue`, by a passive `queue.declare` (fast enough to poll).
pub async fn ready_count(url: &str, queue: &str) -> Result<u32> {
    Ok(ready_and_consumers(url, queue).await?.0)
}

async fn ready_and_consumers(url: &str, queue: &str) -> Result<(u32, u32)> {
    let connection = connect(url).await?;
    let result = async {
        let channel = connection.create_channel().await.context("open channel")?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("passive declare of queue {queue:?} (does it exist?)"))?;
        Ok((q.message_count(), q.consumer_count()))
    }
    .await;
    close(&connection).await;
    result
}

/// `rabbitmqctl list_queues` for one queue, if rabbitmqctl runs here (default vhost only).
fn rabbitmqctl_counts(queue: &str) -> Option<QueueCounts> {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [name, ready, unacked, consumers] if *name == queue => Some(QueueCounts {
                ready: ready.parse().ok()?,
                unacked: Some(unacked.parse().ok()?),
                consumers: consumers.parse().ok()?,
            }),
            _ => None,
        }
    })
}

/// A message taken from a queue by [`get_all`].
#[derive(Debug, Clone)]
pub struct GotMessage {
    /// The routing key it was published (or dead-lettered) with.
    pub routing_key: String,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// All properties, headers included.
    pub properties: BasicProperties,
}

impl GotMessage {
    /// The headers (empty if none).
    pub fn headers(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }

    /// A header as text, if present and a string (or a number, shown in decimal).
    pub fn header_str(&self, name: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        match headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            AMQPValue::LongInt(n) => Some(n.to_string()),
            AMQPValue::LongUInt(n) => Some(n.to_string()),
            AMQPValue::ShortInt(n) => Some(n.to_string()),
            AMQPValue::ShortUInt(n) => Some(n.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    /// The `message_id` property, if set.
    pub fn message_id(&self) -> Option<String> {
        self.properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
    }
}

/// The reasons the service sorts dead letters by (`x-sluice-reason`), each
/// with its queue `<prefix>.dead.<reason>` (the service's `DeadReason::ALL`;
/// `tests/dead_letters` checks the two agree).
pub const DEAD_REASONS: [&str; 6] = [
    "empty",
    "too_large",
    "not_utf8",
    "not_json",
    "rejected_by_database",
    "overflow",
];

/// Every dead-letter queue of `prefix`: one per reason, then `<prefix>.dead`
/// (letters the broker dead-lettered itself).
pub fn dead_queues(prefix: &str) -> Vec<String> {
    DEAD_REASONS
        .iter()
        .map(|reason| format!("{prefix}.dead.{reason}"))
        .chain(std::iter::once(format!("{prefix}.dead")))
        .collect()
}

/// Ready messages in all the dead-letter queues of `prefix`.
pub async fn dead_ready(url: &str, prefix: &str) -> Result<u32> {
    let mut total = 0;
    for queue in dead_queues(prefix) {
        total += ready_count(url, &queue).await?;
    }
    Ok(total)
}

/// Take every message of every dead-letter queue of `prefix` (see [`get_all`]),
/// queue by queue in [`dead_queues`] order.
pub async fn get_all_dead(url: &str, prefix: &str) -> Result<Vec<GotMessage>> {
    let mut all = Vec::new();
    for queue in dead_queues(prefix) {
        all.extend(get_all(url, &queue).await?);
    }
    Ok(all)
}

/// Take every message currently in `queue` (`basic.get` with auto-ack until empty),
/// e.g. to read `<prefix>.dead`. The messages are removed from the queue.
pub async fn get_all(url: &str, queue: &str) -> Result<Vec<GotMessage>> {
    let connection = connect(url).await?;
    let result = async {
        let channel = connection.create_channel().await.context("open channel")?;
        let mut got = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .with_context(|| format!("basic.get from {queue:?}"))?
        {
            let delivery = message.delivery;
            got.push(GotMessage {
                routing_key: delivery.routing_key.as_str().to_owned(),
                body: delivery.data,
                properties: delivery.properties,
            });
        }
        Ok(got)
    }
    .await;
    close(&connection).await;
    result
}

/// Delete the topology the service declares for `prefix` (best effort: what does
/// not exist is skipped). Queues `<prefix>.ingest`, the dead-letter queues
/// ([`dead_queues`]), the live feed's stream `<prefix>.live`; exchanges
/// `<prefix>`, `<prefix>.dlx`, `<prefix>.dlx.sorted`, `<prefix>.replay`.
pub async fn delete_topology(url: &str, prefix: &str) -> Result<()> {
    let connection = connect(url).await?;
    // A failed delete closes its channel, so each gets a fresh one.
    let mut queues = vec![format!("{prefix}.ingest"), format!("{prefix}.live")];
    queues.extend(dead_queues(prefix));
    for queue in queues {
        if let Ok(channel) = connection.create_channel().await {
            if let Err(e) = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                log::debug!("delete queue {queue}: {e}");
            }
        }
    }
    for exchange in [
        prefix.to_owned(),
        format!("{prefix}.dlx"),
        format!("{prefix}.dlx.sorted"),
        format!("{prefix}.replay"),
    ] {
        if let Ok(channel) = connection.create_channel().await {
            if let Err(e) = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
            {
                log::debug!("delete exchange {exchange}: {e}");
            }
        }
    }
    close(&connection).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
    use lapin::ExchangeKind;

    /// Declare a miniature of the service's topology (no DLX wiring needed here).
    async fn declare(url: &str, prefix: &str) -> Result<()> {
        let connection = connect(url).await?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                prefix.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let ingest = format!("{prefix}.ingest");
        channel
            .queue_declare(
                ingest.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                ingest.as_str().into(),
                prefix.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        close(&connection).await;
        Ok(())
    }

    #[tokio::test]
    async fn publish_count_drain_and_delete() {
        let url = amqp_url();
        let prefix = unique_prefix();
        let ingest = format!("{prefix}.ingest");
        declare(&url, &prefix).await.expect("declare topology");

        let publisher = Publisher::connect(&url).await.expect("publisher");
        publisher
            .publish_json_batch(&prefix, 25, |i| (i % 5 != 0).then(|| format!("m{i}")))
            .await
            .expect("publish batch");
        publisher
            .publish(&prefix, "one.more", b"{}", BasicProperties::default())
            .await
            .expect("publish one");
        publisher.close().await.expect("close publisher");

        assert_eq!(ready_count(&url, &ingest).await.expect("ready count"), 26);
        let counts = queue_counts(&url, &ingest).await.expect("queue counts");
        assert_eq!(counts.ready, 26);
        assert_eq!(counts.consumers, 0);
        if let Some(unacked) = counts.unacked {
            assert_eq!(unacked, 0);
        }

        let got = get_all(&url, &ingest).await.expect("get all");
        assert_eq!(got.len(), 26);
        assert_eq!(got[1].message_id().as_deref(), Some("m1"));
        assert_eq!(got[0].message_id(), None);
        assert_eq!(got[3].header_str("seq").as_deref(), Some("3"));
        assert_eq!(got[3].routing_key, "test.3");
        let body: serde_json::Value = serde_json::from_slice(&got[3].body).expect("json body");
        assert_eq!(body["seq"], 3);
        assert_eq!(ready_count(&url, &ingest).await.expect("ready count"), 0);

        delete_topology(&url, &prefix).await.expect("delete");
        assert!(
            ready_count(&url, &ingest).await.is_err(),
            "queue still exists after delete_topology"
        );
        // Deleting again (nothing left) is fine.
        delete_topology(&url, &prefix).await.expect("delete again");
    }
}

/// Deletes a test's broker objects (see [`delete_topology`]) when dropped,
/// also when the test panics, so that failed runs do not leave queues and
/// their messages behind on a broker that every run shares. Drop it after the
/// service is stopped: a running service would declare the topology again.
#[derive(Debug)]
pub struct TopologyGuard {
    url: String,
    prefix: String,
}

impl TopologyGuard {
    /// Guards the topology named by `prefix` on the broker at `url`.
    pub fn new(url: &str, prefix: &str) -> TopologyGuard {
        TopologyGuard {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // A thread with a runtime of its own: works inside or outside an async test.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => {
                    if let Err(e) = runtime.block_on(delete_topology(&url, &prefix)) {
                        eprintln!("testkit: could not delete the topology {prefix}: {e:#}");
                    }
                }
                Err(e) => eprintln!("testkit: no runtime to delete the topology {prefix}: {e}"),
            }
        });
        let _ = cleanup.join();
    }
}
