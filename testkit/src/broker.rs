//! A RabbitMQ node of a test's own, for the tests that restart the broker:
//! the shared one on 127.0.0.1:5672 serves every other test running at the
//! same time, so it is never stopped.
//!
//! The node is the machine's own RabbitMQ (the Debian package's
//! `rabbitmq-server`, the same version), started with its own node name,
//! ports, data and log directories under a temporary directory, and no
//! plugins. [`PrivateBroker::restart`] stops and starts the RabbitMQ
//! application on it: every connection is closed, every queue and stream
//! is recovered from disk, as in a restart of the broker. Dropping the value
//! stops the node and deletes its directory.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a node may take to start (or start again).
const START_WAIT: Duration = Duration::from_secs(90);

/// A RabbitMQ node of the test's own. See the module docs.
#[derive(Debug)]
pub struct PrivateBroker {
    node: String,
    port: u16,
    dir: PathBuf,
}

impl PrivateBroker {
    /// Starts a node and waits until it accepts AMQP connections.
    pub fn start() -> Result<PrivateBroker> {
        let port = free_port()?;
        let dist_port = free_port()?;
        let suffix = crate::random_suffix();
        let node = format!("sluicetest{suffix}@localhost");
        let dir = std::env::temp_dir().join(format!("sluice-rabbitmq-{suffix}"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).context("the node's directories")?;
        }
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )?;
        // Run as root, the server script drops to the `rabbitmq` user, which
        // must own what the node writes.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .output();
        let broker = PrivateBroker { node, port, dir };
        let started = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &broker.node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", broker.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", broker.dir.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                broker.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", broker.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_PID_FILE", broker.dir.join("pid"))
            .current_dir(std::env::temp_dir())
            .output()
            .context("running rabbitmq-server (installed by scripts/setup.sh)")?;
        check("rabbitmq-server -detached", &started)?;
        broker.wait_listening()?;
        Ok(broker)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Stops the RabbitMQ application (every connection closes; durable
    /// queues and streams stay on disk) and starts it again; returns once
    /// it accepts connections again.
    pub fn restart(&self) -> Result<()> {
        self.ctl(&["stop_app"])?;
        self.ctl(&["start_app"])?;
        self.wait_listening()
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let output = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .context("running rabbitmqctl")?;
        check(&format!("rabbitmqctl {}", args.join(" ")), &output)
    }

    fn wait_listening(&self) -> Result<()> {
        let deadline = Instant::now() + START_WAIT;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the private RabbitMQ node {} did not listen on {} within {START_WAIT:?}; its log: {}",
            self.node,
            self.addr(),
            log_tail(&self.dir.join("log"))
        )
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port free now (the node binds it a moment later).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn check(what: &str, output: &Output) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The last lines of the node's log, for a failure message.
fn log_tail(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .find(|e| e.file_name().to_string_lossy().ends_with("@localhost.log"))
        })
        .and_then(|entry| std::fs::read_to_string(entry.path()).ok())
        .map(|log| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        })
        .unwrap_or_else(|| "(none)".into())
}
