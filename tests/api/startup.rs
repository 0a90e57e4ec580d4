//! Start-up failures: whatever keeps the service from starting (the HTTP port
//! taken, a database that does not exist, a broker TLS file that is not
//! there, a mapping that does not parse), it exits 1 with one error line
//! naming the setting to fix, and nothing panics on the way out.

use std::net::TcpListener;

use sluice_testkit::db::{base_url, with_database};
use sluice_testkit::{fresh_database, random_suffix, unique_prefix};

use crate::helpers::*;

/// Runs the service with `env` (on a throwaway AMQP prefix) until it gives
/// up, and checks that it failed the way a user can act on: exit status 1,
/// exactly one error line, naming `setting`, no panic, nothing served.
/// Returns that line.
fn refused(env: &[(&str, String)], setting: &str) -> String {
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
    errors[0].to_owned()
}

#[actix_web::test]
async fn a_taken_http_port_is_named_before_the_database_is_touched() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("the bound address");
    let db = fresh_database().await;
    let line = refused(
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
    let line = refused(
        &[("DATABASE_URL", with_database(&base_url(), &name))],
        "DATABASE_URL",
    );
    assert!(
        line.contains(&format!(r#"database "{name}" does not exist"#)),
        "{line}"
    );
}

#[actix_web::test]
async fn a_broker_tls_file_that_is_not_there_is_named() {
    let db = fresh_database().await;
    let ca = std::env::temp_dir()
        .join(format!("sluice-missing-{}", random_suffix()))
        .join("ca.pem");
    let line = refused(
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
    let line = refused(&[("DATABASE_URL", db.url()), mapping.env()], "MAPPING");
    assert!(
        line.contains(&format!(
            "{} is not a valid mapping",
            mapping.path.display()
        )),
        "{line}"
    );
}
