//! Production connections against the real servers over real TLS: the
//! broker behind a TLS-terminating proxy (certificates made at test time),
//! PostgreSQL with the certificate `scripts/setup.sh` gave it, and a run
//! with passwords in both URLs whose every output is searched for them.

#[path = "../common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{get, run_to_exit, spawn_app_with, PATIENCE};
use sluice_testkit::amqp::{self, amqp_url};
use sluice_testkit::tls::{ServerCert, TestCa, TlsProxy};
use sluice_testkit::{
    fresh_database, random_suffix, unique_prefix, Publisher, Service, TopologyGuard,
};

/// The local broker (plain AMQP), behind every TLS proxy here.
fn broker() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5672))
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sluice"))
}

/// A CA and a proxy whose certificate it signed for `names`.
fn tls_broker(ca: &TestCa, file: &str, names: &[&str], expired: bool) -> TlsProxy {
    let cert = ca
        .server_cert(file, &ServerCert { names, expired })
        .expect("server certificate");
    TlsProxy::start(broker(), &cert).expect("TLS proxy starts")
}

fn amqps_url(host: &str, port: u16) -> String {
    format!("amqps://guest:guest@{host}:{port}/%2f")
}

#[actix_web::test]
async fn amqps_with_a_private_ca_drains_every_message() {
    let ca = TestCa::new("good").expect("CA");
    let proxy = tls_broker(&ca, "broker", &["localhost", "127.0.0.1"], false);
    let db = fresh_database().await;
    let app = spawn_app_with(
        db,
        &[
            ("AMQP_URL", amqps_url("localhost", proxy.addr().port())),
            ("AMQP_TLS_CA", ca.ca_file().display().to_string()),
        ],
    )
    .await;
    assert!(
        proxy.handshakes() >= 1,
        "the service connected through the TLS proxy"
    );

    let n = 300;
    app.publisher
        .publish_json_batch(&app.prefix, n, |i| Some(format!("tls-{i}")))
        .await
        .expect("publish");
    app.wait_rows(n as i64).await;
    assert_eq!(app.readyz().await.0, 200);

    // `sluice load` takes the same URL and TLS settings.
    let (code, output) = run_to_exit(
        &[
            ("AMQP_URL", amqps_url("localhost", proxy.addr().port())),
            ("AMQP_TLS_CA", ca.ca_file().display().to_string()),
            ("AMQP_PREFIX", app.prefix.clone()),
        ],
        &["load", "--count", "40"],
    );
    assert_eq!(code, Some(0), "{output}");
    app.wait_rows(n as i64 + 40).await;

    assert_eq!(app.terminate(), Some(0));
    assert_eq!(app.ingest_ready().await, 0, "everything was acked over TLS");
    app.cleanup().await;
}

#[actix_web::test]
async fn a_client_certificate_is_presented_when_configured() {
    let ca = TestCa::new("mtls").expect("CA");
    let server = ca
        .server_cert(
            "broker",
            &ServerCert {
                names: &["localhost"],
                expired: false,
            },
        )
        .expect("server certificate");
    let client = ca
        .client_cert("client", "sluice")
        .expect("client certificate");
    let proxy = TlsProxy::start_mutual(broker(), &server, &ca.ca_file()).expect("proxy");
    let url = amqps_url("localhost", proxy.addr().port());

    // Without one, the broker's refusal is named.
    let db = fresh_database().await;
    let service = Service::spawn(
        bin(),
        &[
            ("AMQP_URL", url.clone()),
            ("AMQP_TLS_CA", ca.ca_file().display().to_string()),
            ("DATABASE_URL", db.url()),
            ("AMQP_PREFIX", unique_prefix()),
        ],
    );
    let line = service.wait_for_log("broker unavailable (attempt 1)", PATIENCE);
    assert!(line.contains("AMQP_TLS_CERT"), "{line}");
    service.sigkill();
    service.wait_exit(PATIENCE);

    // With one, it connects and stores.
    let app = spawn_app_with(
        db,
        &[
            ("AMQP_URL", url),
            ("AMQP_TLS_CA", ca.ca_file().display().to_string()),
            ("AMQP_TLS_CERT", client.cert.display().to_string()),
            ("AMQP_TLS_KEY", client.key.display().to_string()),
        ],
    )
    .await;
    app.publisher
        .publish_json_batch(&app.prefix, 20, |i| Some(format!("mtls-{i}")))
        .await
        .expect("publish");
    app.wait_rows(20).await;
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

/// Waits for the reconnect log line carrying `cause`, then checks the
/// service is not ready, retries, and has taken nothing off the queue.
async fn assert_refused(service: &Service, cause: &[&str], ingest: &str, waiting: u32) {
    let line = service.wait_for_log("broker unavailable (attempt 1)", PATIENCE);
    for needle in cause {
        assert!(
            line.contains(needle),
            "{needle:?} not in the log line: {line}"
        );
    }
    let (status, body) = get(&format!("{}/readyz", service.base_url())).await;
    assert_eq!(status, 503, "not ready while the broker is refused: {body}");
    // Keeps retrying, as for an outage, with the same cause each time.
    let again = service.wait_for_log("broker unavailable (attempt 2)", PATIENCE);
    assert!(again.contains(cause[0]), "{again}");
    // One line per attempt names the cause; nothing else complains.
    let lines = service.log_lines();
    let noisy: Vec<&String> = lines
        .iter()
        .filter(|l| {
            (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("broker unavailable")
        })
        .collect();
    assert!(noisy.is_empty(), "other warnings: {noisy:#?}");
    let ready = amqp::ready_count(&amqp_url(), ingest).await.expect("queue");
    assert_eq!(ready, waiting, "nothing was taken off the queue");
    service.sigkill();
    service.wait_exit(PATIENCE);
}

#[actix_web::test]
async fn refused_broker_certificates_name_the_cause_keep_retrying_and_lose_nothing() {
    let ca = TestCa::new("right").expect("CA");
    let wrong = TestCa::new("wrong").expect("other CA");
    let good = tls_broker(&ca, "good", &["localhost", "127.0.0.1"], false);
    let other_host = tls_broker(&ca, "other-host", &["broker.sluice.test"], false);
    let expired = tls_broker(&ca, "expired", &["localhost"], true);

    let db = fresh_database().await;
    let prefix = unique_prefix();
    let _topology = TopologyGuard::new(&amqp_url(), &prefix);
    let ingest = format!("{prefix}.ingest");
    let ca_file = ca.ca_file().display().to_string();
    let base = vec![
        ("DATABASE_URL", db.url()),
        ("AMQP_PREFIX", prefix.clone()),
        ("AMQP_TLS_CA", ca_file.clone()),
    ];
    let with = |extra: &[(&'static str, String)]| {
        let mut env = base.clone();
        env.extend(extra.iter().cloned());
        env
    };

    // A first run declares the topology, then the messages wait in the queue.
    let first = common::start(&with(&[(
        "AMQP_URL",
        amqps_url("localhost", good.addr().port()),
    )]));
    first.sigterm();
    assert_eq!(first.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0));
    let n = 120;
    let publisher = Publisher::connect(&amqp_url()).await.expect("publisher");
    publisher
        .publish_json_batch(&prefix, n, |i| Some(format!("wait-{i}")))
        .await
        .expect("publish");
    let n = u32::try_from(n).expect("small");

    // The wrong CA.
    let service = Service::spawn(
        bin(),
        &with(&[
            ("AMQP_URL", amqps_url("localhost", good.addr().port())),
            ("AMQP_TLS_CA", wrong.ca_file().display().to_string()),
        ]),
    );
    assert_refused(
        &service,
        &["not signed by a trusted CA", "AMQP_TLS_CA="],
        &ingest,
        n,
    )
    .await;

    // A certificate for another host name.
    let service = Service::spawn(
        bin(),
        &with(&[("AMQP_URL", amqps_url("localhost", other_host.addr().port()))]),
    );
    assert_refused(
        &service,
        &["not valid for host `localhost`", "AMQP_URL"],
        &ingest,
        n,
    )
    .await;

    // An expired certificate.
    let service = Service::spawn(
        bin(),
        &with(&[("AMQP_URL", amqps_url("localhost", expired.addr().port()))]),
    );
    assert_refused(&service, &["has expired", "AMQP_URL"], &ingest, n).await;

    // A plain-text broker behind an amqps:// URL.
    let service = Service::spawn(bin(), &with(&[("AMQP_URL", amqps_url("127.0.0.1", 5672))]));
    assert_refused(
        &service,
        &["did not answer with TLS", "AMQP_URL"],
        &ingest,
        n,
    )
    .await;

    // Given the right CA again, it drains everything that waited.
    let app_service = common::start(&with(&[(
        "AMQP_URL",
        amqps_url("localhost", good.addr().port()),
    )]));
    let rows = || async { db.count_rows("events").await };
    sluice_testkit::eventually(PATIENCE, "every waiting message is stored", || async {
        let stored = rows().await;
        if stored == i64::from(n) {
            Ok(())
        } else {
            Err(format!("{stored} rows"))
        }
    })
    .await;
    app_service.sigterm();
    assert_eq!(
        app_service.wait_exit(PATIENCE).and_then(|s| s.code()),
        Some(0)
    );
    assert_eq!(
        amqp::ready_count(&amqp_url(), &ingest)
            .await
            .expect("queue"),
        0
    );
    let _ = publisher.close().await;
}

/// The CA `scripts/setup.sh` made for the local PostgreSQL.
fn pg_ca() -> PathBuf {
    let path = std::env::var_os("SLUICE_PG_TLS_CA").map_or_else(
        || PathBuf::from("/var/lib/postgresql/sluice-tls/ca.pem"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh (it gives PostgreSQL a certificate the tests can verify)",
        path.display()
    );
    path
}

#[actix_web::test]
async fn postgres_verify_full_stores_every_row_over_tls() {
    let db = fresh_database().await;
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url(),
        pg_ca().display()
    );
    let name = db.name().to_owned();
    let app = spawn_app_with(db, &[("DATABASE_URL", url)]).await;
    let n = 200;
    app.publisher
        .publish_json_batch(&app.prefix, n, |i| Some(format!("pg-tls-{i}")))
        .await
        .expect("publish");
    app.wait_rows(n as i64).await;
    // The service's own sessions are encrypted (seen from the server).
    let encrypted: i64 = app
        .db
        .query_scalar(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE datname = $1 AND application_name = 'sluice' AND ssl",
            &[&name],
        )
        .await;
    assert!(encrypted >= 1, "the service's sessions use TLS");
    let plain: i64 = app
        .db
        .query_scalar(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE datname = $1 AND application_name = 'sluice' AND NOT ssl",
            &[&name],
        )
        .await;
    assert_eq!(plain, 0, "no plain-text session");
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

#[actix_web::test]
async fn postgres_verify_full_against_the_wrong_ca_fails_clearly() {
    let wrong = TestCa::new("pg-wrong").expect("CA");
    let db = fresh_database().await;
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url(),
        wrong.ca_file().display()
    );
    let (code, output) = run_to_exit(&[("DATABASE_URL", url)], &[]);
    assert_eq!(code, Some(1), "{output}");
    let errors: Vec<&str> = output.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{output}");
    for needle in [
        "DATABASE_URL",
        "sslmode=verify-full",
        "not signed by a trusted CA",
        "sslrootcert=",
    ] {
        assert!(
            errors[0].contains(needle),
            "{needle:?} missing: {}",
            errors[0]
        );
    }
}

/// A RabbitMQ user that exists for one test (deleted on drop).
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn create(password: &str) -> BrokerUser {
        let name = format!("sluice-tls-{}", random_suffix());
        let ctl = |args: &[&str]| {
            let out = Command::new("rabbitmqctl")
                .args(args)
                .output()
                .expect("rabbitmqctl runs (tests need it to make a throwaway broker user)");
            assert!(
                out.status.success(),
                "rabbitmqctl {:?}: {}",
                args.first(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ctl(&["add_user", &name, password]);
        let user = BrokerUser { name };
        ctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

#[actix_web::test]
async fn no_password_is_ever_printed() {
    let amqp_password = format!("AmqpPw{}", random_suffix());
    let pg_password = format!("PgPw{}", random_suffix());
    let token = format!("Tok{}", random_suffix());
    let wrong_password = format!("WrongPw{}", random_suffix());
    let secrets = [&amqp_password, &pg_password, &token, &wrong_password];
    let user = BrokerUser::create(&amqp_password);

    let ca = TestCa::new("secrets").expect("CA");
    let wrong_ca = TestCa::new("secrets-wrong").expect("CA");
    let proxy = tls_broker(&ca, "broker", &["localhost"], false);
    let amqp = format!(
        "amqps://{}:{amqp_password}@localhost:{}/%2f",
        user.name,
        proxy.addr().port()
    );
    let db = fresh_database().await;
    // Trust authentication accepts any password; it still travels in the URL.
    let database_url = db
        .url()
        .replacen("postgres@", &format!("postgres:{pg_password}@"), 1);
    assert!(database_url.contains(&pg_password));
    let files = ca.dir();
    let write = |name: &str, text: &str| {
        let path = files.join(name);
        std::fs::write(&path, text).expect("write secret");
        path.display().to_string()
    };
    let amqp_file = write("amqp_url", &format!("{amqp}\n"));
    let db_file = write("database_url", &database_url);
    let token_file = write("token", &token);

    let mut outputs = Vec::new();
    {
        // Every secret from a file (so AMQP_URL and DATABASE_URL are unset).
        let prefix = unique_prefix();
        let _topology = TopologyGuard::new(&amqp_url(), &prefix);
        let service = common::start(&[
            ("AMQP_URL_FILE", amqp_file.clone()),
            ("DATABASE_URL_FILE", db_file.clone()),
            ("AUTH_TOKEN_FILE", token_file.clone()),
            ("AMQP_PREFIX", prefix.clone()),
            ("AMQP_TLS_CA", ca.ca_file().display().to_string()),
            // Everything any crate logs, whatever it logs.
            ("RUST_LOG", "trace".into()),
        ]);
        // Traffic, a dead letter, and the endpoints.
        let publisher = Publisher::connect(&amqp_url()).await.expect("publisher");
        publisher
            .publish_json_batch(&prefix, 50, |i| Some(format!("s-{i}")))
            .await
            .expect("publish");
        publisher
            .publish(&prefix, "bad", b"not json", Default::default())
            .await
            .expect("publish");
        sluice_testkit::eventually(PATIENCE, "50 rows and 1 dead letter", || async {
            let rows = db.count_rows("events").await;
            let dead = amqp::dead_ready(&amqp_url(), &prefix).await.unwrap_or(0);
            if rows == 50 && dead == 1 {
                Ok(())
            } else {
                Err(format!("{rows} rows, {dead} dead letters"))
            }
        })
        .await;
        for path in ["/api/stats", "/metrics", "/readyz", "/healthz", "/ws"] {
            outputs.push(get(&format!("{}{path}", service.base_url())).await.1);
        }
        service.sigterm();
        assert_eq!(service.wait_exit(PATIENCE).and_then(|s| s.code()), Some(0));
        outputs.push(service.logs());
        let _ = publisher.close().await;
    }

    // Failures: a refused certificate and a refused password, with the
    // secrets in the URLs.
    let failing = Service::spawn(
        bin(),
        &[
            ("AMQP_URL", amqp.clone()),
            ("DATABASE_URL", database_url.clone()),
            ("AMQP_TLS_CA", wrong_ca.ca_file().display().to_string()),
            ("RUST_LOG", "debug".into()),
        ],
    );
    failing.wait_for_log("broker unavailable (attempt 2)", PATIENCE);
    outputs.push(get(&format!("{}/readyz", failing.base_url())).await.1);
    failing.sigkill();
    failing.wait_exit(PATIENCE);
    outputs.push(failing.logs());

    let wrong_login = amqp.replace(&amqp_password, &wrong_password);
    let failing = Service::spawn(
        bin(),
        &[
            ("AMQP_URL", wrong_login.clone()),
            ("DATABASE_URL", database_url.clone()),
            ("AMQP_TLS_CA", ca.ca_file().display().to_string()),
            ("RUST_LOG", "debug".into()),
        ],
    );
    failing.wait_for_log("broker unavailable (attempt 2)", PATIENCE);
    failing.sigkill();
    failing.wait_exit(PATIENCE);
    outputs.push(failing.logs());

    // The load generator's failure, both URLs set at once, and --help.
    let env = [
        ("AMQP_URL", wrong_login.clone()),
        ("DATABASE_URL", database_url.clone()),
        ("AUTH_TOKEN", token.clone()),
        ("AMQP_TLS_CA", wrong_ca.ca_file().display().to_string()),
    ];
    let (code, text) = run_to_exit(&env, &["load", "--count", "1"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("AMQP_URL"), "{text}");
    outputs.push(text);
    let (code, text) = run_to_exit(
        &[("AMQP_URL", amqp.clone()), ("AMQP_URL_FILE", amqp_file)],
        &[],
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("AMQP_URL and AMQP_URL_FILE"), "{text}");
    outputs.push(text);
    for args in [&["--help"][..], &["load", "--help"][..], &["-h"][..]] {
        let (code, text) = run_to_exit(&env, args);
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("AMQP_URL"), "{text}");
        outputs.push(text);
    }
    let (_, text) = run_to_exit(&[], &["--help"]);
    assert!(
        !text.contains("guest:guest"),
        "the default URL's password: {text}"
    );
    outputs.push(text);

    let everything = outputs.join("\n");
    assert!(everything.contains("***"), "URLs are printed, masked");
    for secret in secrets {
        assert!(
            !everything.contains(secret.as_str()),
            "a secret was printed:\n{}",
            everything
                .lines()
                .filter(|l| l.contains(secret.as_str()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
