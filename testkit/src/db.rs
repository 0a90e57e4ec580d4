//! A throwaway PostgreSQL database per test (`sluice_test_<random>`), dropped afterwards.
//!
//! The server is `postgres://postgres@127.0.0.1:5432` unless `DATABASE_URL_BASE`
//! says otherwise (a URL without a database name, e.g.
//! `postgres://postgres@db.example:5432?sslmode=disable`). The service creates
//! its tables itself (migrations at start); this module only creates the empty
//! database and reads from it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::types::FromSqlOwned;
use tokio_postgres::{Client, NoTls};

/// The server used when `DATABASE_URL_BASE` is not set.
pub const DEFAULT_BASE_URL: &str = "postgres://postgres@127.0.0.1:5432";

/// The server URL without a database name: `DATABASE_URL_BASE` or [`DEFAULT_BASE_URL`].
pub fn base_url() -> String {
    std::env::var("DATABASE_URL_BASE")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned())
}

/// `base` with the database `name` put in its path (query parameters kept).
pub fn with_database(base: &str, name: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (base, None),
    };
    let head = head.trim_end_matches('/');
    match query {
        Some(query) => format!("{head}/{name}?{query}"),
        None => format!("{head}/{name}"),
    }
}

/// `url` with its `host:port` replaced by `addr` (for routing a connection through a [`crate::Proxy`]).
pub fn with_host_port(url: &str, addr: SocketAddr) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (userinfo, hostpart) = match rest.split_once('@') {
        Some((userinfo, hostpart)) => (Some(userinfo), hostpart),
        None => (None, rest),
    };
    let end = hostpart.find(['/', '?']).unwrap_or(hostpart.len());
    let tail = &hostpart[end..];
    match userinfo {
        Some(userinfo) => format!("{scheme}://{userinfo}@{addr}{tail}"),
        None => format!("{scheme}://{addr}{tail}"),
    }
}

/// Connect and drive the connection on the current tokio runtime.
async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("test database connection ended: {e}");
        }
    });
    Ok(client)
}

/// Create a new, empty, uniquely named database and return its handle.
///
/// Panics (with the cause) if the server cannot be reached: every integration
/// test needs it, and the message should say so plainly.
pub async fn fresh_database() -> TestDb {
    let base = base_url();
    let name = format!("sluice_test_{}", crate::random_suffix());
    let admin_url = with_database(&base, "postgres");
    let admin = connect(&admin_url).await.unwrap_or_else(|e| {
        panic!("cannot connect to PostgreSQL at {admin_url} (is it running? see scripts/setup.sh): {e}")
    });
    // Parallel CREATE DATABASE can fail while another session uses template1; retry briefly.
    let mut attempt = 0;
    loop {
        match admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
        {
            Ok(()) => break,
            Err(e) if attempt < 20 && e.to_string().contains("being accessed by other users") => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot create test database {name}: {e}"),
        }
    }
    TestDb {
        url: with_database(&base, &name),
        admin_url,
        name,
        client: tokio::sync::Mutex::new(None),
    }
}

/// A database that exists for the life of this value; dropped (with `FORCE`) on drop.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    /// Lazily opened, reopened if it died (e.g. created on another runtime).
    client: tokio::sync::Mutex<Option<Client>>,
}

impl TestDb {
    /// The database name (`sluice_test_<random>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL to give the service as `DATABASE_URL`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The same database reached through `addr` (a [`crate::Proxy`] in front of the server).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        with_host_port(&self.url, addr)
    }

    /// The server's address as written in the URL, for [`crate::Proxy::start`].
    /// Resolves `localhost`-style names; panics if the URL has no usable host.
    pub fn server_addr(&self) -> SocketAddr {
        use std::net::ToSocketAddrs;
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        let hostpart = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let end = hostpart.find(['/', '?']).unwrap_or(hostpart.len());
        let hostport = &hostpart[..end];
        let hostport = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:5432")
        };
        hostport
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| {
                panic!(
                    "cannot resolve database address {hostport:?} from {}",
                    self.url
                )
            })
    }

    /// Run `sql` on the cached client and return the first column of its one row,
    /// reconnecting once if the cached connection is gone.
    async fn with_client<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<T, tokio_postgres::Error>
    where
        T: FromSqlOwned,
    {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(connect(&self.url).await?);
        }
        let client = slot.as_ref().expect("client was just set");
        match client.query_one(sql, params).await {
            Ok(row) => row.try_get(0),
            Err(e) if client.is_closed() => {
                // The connection died under us (e.g. its runtime ended): one fresh try.
                log::debug!("test database client closed ({e}); reconnecting");
                let client = connect(&self.url).await?;
                let row = client.query_one(sql, params).await?;
                *slot = Some(client);
                row.try_get(0)
            }
            Err(e) => Err(e),
        }
    }

    /// The first column of the single row `sql` returns, or the error.
    pub async fn try_query_scalar<T: FromSqlOwned>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<T, tokio_postgres::Error> {
        self.with_client(sql, params).await
    }

    /// The first column of the single row `sql` returns; panics with the query on error.
    pub async fn query_scalar<T: FromSqlOwned>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> T {
        self.with_client(sql, params)
            .await
            .unwrap_or_else(|e| panic!("query {sql:?} on {} failed: {e}", self.name))
    }

    /// `SELECT count(*)` of `table`; panics if the table does not exist (yet).
    pub async fn count_rows(&self, table: &str) -> i64 {
        self.query_scalar(&format!("SELECT count(*) FROM {table}"), &[])
            .await
    }

    /// Rows of `table`, or `None` if the table does not exist yet (the service
    /// creates it at start), for polling before the service is up.
    pub async fn try_count_rows(&self, table: &str) -> Option<i64> {
        self.try_query_scalar(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .ok()
    }

    /// Run one or more statements (no results); panics on error.
    pub async fn execute(&self, sql: &str) {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(
                connect(&self.url)
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url)),
            );
        }
        let client = slot.as_ref().expect("client was just set");
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("statement {sql:?} on {} failed: {e}", self.name));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Close our own connection first; FORCE ends any other (the service's).
        drop(self.client.get_mut().take());
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // A separate thread with its own runtime: Drop may run inside or outside
        // a tokio runtime, and blocking on one inside another panics.
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let drop_it = async {
                    let admin = connect(&admin_url).await?;
                    admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await
                };
                match tokio::time::timeout(Duration::from_secs(20), drop_it).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("testkit: could not drop test database {name}: {e}"),
                    Err(_) => eprintln!("testkit: timed out dropping test database {name}"),
                }
            });
        });
        let _ = dropper.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_built_and_rewritten() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        let addr: SocketAddr = "127.0.0.1:7777".parse().expect("addr");
        assert_eq!(
            with_host_port("postgres://postgres@127.0.0.1:5432/db?a=b", addr),
            "postgres://postgres@127.0.0.1:7777/db?a=b"
        );
        assert_eq!(
            with_host_port("postgres://localhost/db", addr),
            "postgres://127.0.0.1:7777/db"
        );
    }

    #[tokio::test]
    async fn fresh_database_is_usable_and_dropped() {
        let db = fresh_database().await;
        assert!(db.name().starts_with("sluice_test_"));
        db.execute("CREATE TABLE events (id int); INSERT INTO events VALUES (1), (2)")
            .await;
        assert_eq!(db.count_rows("events").await, 2);
        assert_eq!(db.try_count_rows("missing").await, None);
        let one: i32 = db.query_scalar("SELECT $1::int", &[&1i32]).await;
        assert_eq!(one, 1);
        let name = db.name().to_owned();
        drop(db);

        let admin = connect(&with_database(&base_url(), "postgres"))
            .await
            .expect("admin connection");
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await
            .expect("query pg_database")
            .get(0);
        assert_eq!(left, 0, "test database {name} was not dropped");
    }

    #[tokio::test]
    async fn proxied_url_reaches_the_same_database() {
        let db = fresh_database().await;
        let proxy = crate::Proxy::start(db.server_addr()).expect("proxy");
        let client = connect(&db.url_via(proxy.addr()))
            .await
            .expect("connect via proxy");
        let name: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .expect("query via proxy")
            .get(0);
        assert_eq!(name, db.name());
        assert_eq!(proxy.live_connections(), 1);
    }
}
