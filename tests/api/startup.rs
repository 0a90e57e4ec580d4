//! Start-up failures: whatever keeps the service from starting (the HTTP port
//! taken, a database that does not exist or never comes up, a broker TLS
//! file that is not there, a mapping that does not parse), it exits 1 with
//! one error line naming the setting to fix, and nothing panics on the way
//! out. A database that comes up late is waited for.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use sluice_testkit::db::{base_url, with_database};
use sluice_testkit::{fresh_database, random_suffix, unique_prefix, wait_until, Mode, Proxy};

use crate::helpers::*;

/// Runs the service with `env` (on a throwaway AMQP prefix) until it gives
/// up, and checks that it failed the way a user can act on: exit status 1,
/// exactly one error line, naming `setting`, no panic, nothing served.
/// Returns that line, and the whole output.
fn refused(env: &[(&str, String)], setting: &str) -> (String, String) {
    let mut env = env.to_vec();
    env.push(("AMQP_PREFIX", unique_prefix()));
    let (code, output) = run_to_exit(&env, &[]);
    assert_eq!(code, Some(1), "a failed start exits 1; output:\n{output}");
    assert!(!output.contains("panicked"), "no panic; output:\n{output}");
    assert!(
        !output.contains("listening on"),
        "nothing was served; output:\n{output}"
    );
    let errors: Vec<&str> = output.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error line; output:\n{output}");
    assert!(
        errors[0].contains(setting),
        "the error names {setting}; output:\n{output}"
    );
    (errors[0].to_owned(), output)
}

#[actix_web::test]
async fn a_taken_http_port_is_named_before_the_database_is_touched() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("the bound address");
    let db = fresh_database().await;
    let (line, _) = refused(
        &[("DATABASE_URL", db.url()), ("HTTP_ADDR", addr.to_string())],
        &format!("HTTP_ADDR={addr}"),
    );
    assert!(line.contains("Address already in use"), "{line}");
    // The port is checked first: a second instance started by mistake
    // fails at once, and migrates nothing.
    let tables: i64 = db
        .query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await;
    assert_eq!(tables, 0, "no table was created");
    drop(taken);
}

#[actix_web::test]
async fn a_database_that_does_not_exist_is_named() {
    let name = format!("sluice_test_missing_{}", random_suffix());
    let (line, output) = refused(
        &[("DATABASE_URL", with_database(&base_url(), &name))],
        "DATABASE_URL",
    );
    assert!(
        line.contains(&format!(r#"database "{name}" does not exist"#)),
        "{line}"
    );
    // The server answered: waiting will not make the database exist.
    assert!(
        !output.contains("retrying"),
        "given up at once, not retried; output:\n{output}"
    );
}

#[actix_web::test]
async fn a_broker_tls_file_that_is_not_there_is_named() {
    let db = fresh_database().await;
    let ca = std::env::temp_dir()
        .join(format!("sluice-missing-{}", random_suffix()))
        .join("ca.pem");
    let (line, _) = refused(
        &[
            ("DATABASE_URL", db.url()),
            ("AMQP_URL", "amqps://127.0.0.1:5671".to_owned()),
            ("AMQP_TLS_CA", ca.display().to_string()),
        ],
        &format!("AMQP_TLS_CA={}", ca.display()),
    );
    assert!(line.contains("cannot read it"), "{line}");
}

#[actix_web::test]
async fn a_mapping_that_does_not_parse_is_named() {
    let db = fresh_database().await;
    let mapping = MappingFile::new("table = \"readings\"\n[columns\nsensor = \"/sensor\"\n");
    let (line, _) = refused(&[("DATABASE_URL", db.url()), mapping.env()], "MAPPING");
    assert!(
        line.contains(&format!(
            "{} is not a valid mapping",
            mapping.path.display()
        )),
        "{line}"
    );
}

/// A database started together with Sluice but slower to come up (a
/// container still booting) is waited for: once it answers, the service
/// starts, is ready, and stores what is published.
#[actix_web::test]
async fn a_database_that_comes_up_late_is_waited_for() {
    let db = fresh_database().await;
    let proxy = Proxy::start(db.server_addr()).expect("proxy starts");
    proxy.set_mode(Mode::Refuse);
    let url = db.url_via(proxy.addr());
    let app = spawn_app_meanwhile(db, &[("DATABASE_URL", url)], async {
        // Six refused attempts: with delays from 200 ms, doubling, the sixth
        // comes at least 6.2 s after the first, well past the four attempts
        // (2.4 s at most) Sluice used to give up after.
        wait_until(PATIENCE, "sluice tried the database 6 times", || {
            std::future::ready(proxy.refused_connections() >= 6)
        })
        .await;
        proxy.set_mode(Mode::Pass);
    })
    .await;
    let (status, body) = app.readyz().await;
    assert_eq!(status, 200, "ready: {body}");
    app.publish("late", 1).await;
    app.wait_rows(1).await;
    app.cleanup().await;
}

/// A database that never comes up is tried for DATABASE_START_TIMEOUT,
/// then given up with one line naming it.
#[actix_web::test]
async fn a_database_that_never_comes_up_is_given_up_after_the_start_timeout() {
    let db = fresh_database().await;
    let proxy = Proxy::start(db.server_addr()).expect("proxy starts");
    proxy.set_mode(Mode::Refuse);
    let timeout = Duration::from_secs(3);
    let began = Instant::now();
    let (line, _) = refused(
        &[
            ("DATABASE_URL", db.url_via(proxy.addr())),
            ("DATABASE_START_TIMEOUT", "3s".to_owned()),
        ],
        "DATABASE_START_TIMEOUT=3s",
    );
    let took = began.elapsed();
    assert!(
        took >= timeout,
        "it kept trying for DATABASE_START_TIMEOUT, but gave up after {took:?}"
    );
    assert!(line.contains("DATABASE_URL"), "{line}");
    assert!(
        proxy.refused_connections() > 1,
        "it tried more than once: {} attempts",
        proxy.refused_connections()
    );
}
