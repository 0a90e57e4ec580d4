//! Connecting to the broker over `amqp://` or `amqps://` (lapin's own rustls
//! support) and closing within a bound, the broker's TLS settings, and one
//! sentence naming the cause of a failed TLS handshake, for the broker and
//! the database alike.
//!
//! With `amqps://`, the broker's certificate is checked against the
//! system's root certificates plus, when given, a private CA
//! (`AMQP_TLS_CA`), and its host name against the host in the URL: that
//! check cannot be turned off. A client certificate (`AMQP_TLS_CERT` and
//! `AMQP_TLS_KEY`) is presented when both are given, as RabbitMQ's
//! `EXTERNAL` mechanism needs. The files are read once, at start.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CertificateError, Error as TlsError};

use crate::redact::redact;

/// The broker's TLS settings (used by `amqps://` URLs only).
#[derive(Clone, Default)]
pub struct BrokerTls {
    /// What lapin is given: the private CA and the client identity, as PEM.
    config: OwnedTLSConfig,
    /// `AMQP_TLS_CA`, to name it in errors.
    ca: Option<PathBuf>,
}

impl fmt::Debug for BrokerTls {
    // The key stays out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerTls")
            .field("ca", &self.ca)
            .field("client_certificate", &self.config.identity.is_some())
            .finish()
    }
}

/// A TLS file that cannot be used; the message names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting}={}: {reason}", path.display())]
pub struct TlsFileError {
    /// The setting that named the file (`AMQP_TLS_CA`, …).
    pub setting: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl BrokerTls {
    /// Reads and checks the PEM files: `ca` (one or more certificates),
    /// `cert` (the client's chain) and `key` (its private key); `cert` and
    /// `key` go together.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<BrokerTls, TlsFileError> {
        let cert_chain = ca
            .map(|path| {
                let pem = read_pem("AMQP_TLS_CA", path)?;
                certificates("AMQP_TLS_CA", path, &pem)?;
                Ok::<_, TlsFileError>(String::from_utf8_lossy(&pem).into_owned())
            })
            .transpose()?;
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let pem = read_pem("AMQP_TLS_CERT", cert)?;
                certificates("AMQP_TLS_CERT", cert, &pem)?;
                let key_pem = read_pem("AMQP_TLS_KEY", key)?;
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsFileError {
                    setting: "AMQP_TLS_KEY",
                    path: key.to_owned(),
                    reason: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}"),
                })?;
                Some(OwnedIdentity::PKCS8 { pem, key: key_pem })
            }
            (Some(cert), None) => {
                return Err(TlsFileError {
                    setting: "AMQP_TLS_CERT",
                    path: cert.to_owned(),
                    reason: "a client certificate needs its key: set AMQP_TLS_KEY too".into(),
                })
            }
            (None, Some(key)) => {
                return Err(TlsFileError {
                    setting: "AMQP_TLS_KEY",
                    path: key.to_owned(),
                    reason: "a client key needs its certificate: set AMQP_TLS_CERT too".into(),
                })
            }
        };
        Ok(BrokerTls {
            config: OwnedTLSConfig {
                identity,
                cert_chain,
            },
            ca: ca.map(Path::to_owned),
        })
    }

    /// Whether a client certificate is configured.
    #[must_use]
    pub fn has_client_certificate(&self) -> bool {
        self.config.identity.is_some()
    }

    /// What the server's certificate is checked against, for messages.
    fn trust(&self) -> String {
        match &self.ca {
            Some(ca) => format!("the system roots and AMQP_TLS_CA={}", ca.display()),
            None => "the system roots (set AMQP_TLS_CA for a private CA)".into(),
        }
    }
}

fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|e| TlsFileError {
        setting,
        path: path.to_owned(),
        reason: format!("cannot read it: {e}"),
    })
}

/// The certificates of a PEM file; at least one.
pub fn certificates(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError {
            setting,
            path: path.to_owned(),
            reason: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsFileError {
            setting,
            path: path.to_owned(),
            reason: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(certs)
}

/// Opens a connection to `url` (`amqp://` or `amqps://`), with `tls` for
/// `amqps://`. The error is one sentence naming the setting to look at and
/// the cause, with the URL's password masked.
pub async fn connect_broker(
    url: &str,
    tls: &BrokerTls,
    properties: ConnectionProperties,
) -> Result<Connection, BrokerConnectError> {
    let runtime = lapin::runtime::default_runtime().map_err(|e| BrokerConnectError {
        url: redact(url),
        cause: format!("no async runtime: {e}"),
    })?;
    Connection::connect_with_config(url, properties, tls.config.clone(), runtime)
        .await
        .map_err(|e| BrokerConnectError {
            url: redact(url),
            cause: broker_cause(url, tls, &e),
        })
}

/// How long a clean close of a broker connection may take.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `connection` cleanly (`connection.close`, waiting for `close-ok`),
/// giving up after [`CLOSE_TIMEOUT`]: everything that mattered (acks,
/// confirms) was settled before, and a close that never completes (seen
/// once in a benchmark: the socket already gone, the answer never coming)
/// must not hold a shutdown. Dropping the connection then closes
/// the socket.
pub async fn close_broker(connection: &Connection, why: &str) {
    match tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, why.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("closing the broker connection: {e}"),
        Err(_) => log::warn!(
            "the broker did not answer the close within {CLOSE_TIMEOUT:?}; dropping the connection"
        ),
    }
}

/// A broker connection that failed; its text is meant for one log line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot connect to the broker at {url} (AMQP_URL): {cause}")]
pub struct BrokerConnectError {
    /// The URL, password masked.
    pub url: String,
    /// Why, naming the setting to change where one applies.
    pub cause: String,
}

fn broker_cause(url: &str, tls: &BrokerTls, error: &lapin::Error) -> String {
    let host = host_of(url);
    match tls_failure(error) {
        Some(failure) => {
            let what = failure.describe("broker", &host, &tls.trust());
            match failure {
                TlsFailure::ClientCertificateRefused if !tls.has_client_certificate() => {
                    format!("{what}; set AMQP_TLS_CERT and AMQP_TLS_KEY")
                }
                TlsFailure::ClientCertificateRefused => {
                    format!("{what}; check AMQP_TLS_CERT and AMQP_TLS_KEY")
                }
                _ => what,
            }
        }
        None => redact(&error.to_string()),
    }
}

/// The host of a URL (`scheme://user:pass@host:port/...`), for messages.
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_owned();
    }
    hostport
        .rsplit_once(':')
        .map_or(hostport, |(h, _)| h)
        .to_owned()
}

/// Why a TLS handshake failed, in terms a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// The certificate is not signed by a CA we trust.
    UntrustedCertificate,
    /// The certificate does not name the host we connected to.
    HostnameMismatch,
    /// The certificate's validity ended (`not_after` when known).
    Expired { detail: String },
    /// The certificate's validity has not begun yet.
    NotYetValid,
    /// Some other problem with the certificate.
    BadCertificate { detail: String },
    /// The peer did not speak TLS at all (a plain-text port).
    NotTls,
    /// The server refused our (missing or unknown) client certificate.
    ClientCertificateRefused,
    /// Any other handshake failure.
    Other { detail: String },
}

impl TlsFailure {
    /// One sentence about `peer` ("broker", "database") at `host`; `trust`
    /// says what the certificate was checked against.
    #[must_use]
    pub fn describe(&self, peer: &str, host: &str, trust: &str) -> String {
        match self {
            TlsFailure::UntrustedCertificate => format!(
                "TLS: the {peer}'s certificate is not signed by a trusted CA \
                 (checked against {trust})"
            ),
            TlsFailure::HostnameMismatch => format!(
                "TLS: the {peer}'s certificate is not valid for host `{host}` \
                 (the host in the URL; host names are always verified)"
            ),
            TlsFailure::Expired { detail } => {
                format!("TLS: the {peer}'s certificate has expired ({detail})")
            }
            TlsFailure::NotYetValid => {
                format!("TLS: the {peer}'s certificate is not valid yet (check the clocks)")
            }
            TlsFailure::BadCertificate { detail } => {
                format!("TLS: the {peer}'s certificate was refused: {detail}")
            }
            TlsFailure::NotTls => format!(
                "TLS: the {peer} at `{host}` did not answer with TLS: \
                 is that a plain-text port behind a TLS URL?"
            ),
            TlsFailure::ClientCertificateRefused => {
                format!("TLS: the {peer} refused the handshake: it wants a client certificate it trusts")
            }
            TlsFailure::Other { detail } => {
                format!("TLS handshake with the {peer} failed: {detail}")
            }
        }
    }
}

/// The TLS failure somewhere in `error`'s chain of causes, if any.
#[must_use]
pub fn tls_failure(error: &(dyn StdError + 'static)) -> Option<TlsFailure> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<TlsError>() {
            return Some(classify(tls));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // io::Error::source() skips the wrapped error itself: look at it.
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = inner.downcast_ref::<TlsError>() {
                    return Some(classify(tls));
                }
            }
        }
        current = err.source();
    }
    None
}

fn classify(error: &TlsError) -> TlsFailure {
    use rustls::AlertDescription as Alert;
    match error {
        TlsError::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                TlsFailure::UntrustedCertificate
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::HostnameMismatch
            }
            CertificateError::Expired => TlsFailure::Expired {
                detail: "its validity period is over".into(),
            },
            CertificateError::ExpiredContext { time, not_after } => {
                let at = |t: &rustls::pki_types::UnixTime| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs()),
                    )
                };
                TlsFailure::Expired {
                    detail: format!("valid until {}, now {}", at(not_after), at(time)),
                }
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                TlsFailure::NotYetValid
            }
            other => TlsFailure::BadCertificate {
                detail: format!("{other:?}"),
            },
        },
        TlsError::InvalidMessage(_) | TlsError::InappropriateMessage { .. } => TlsFailure::NotTls,
        TlsError::AlertReceived(Alert::CertificateRequired) => TlsFailure::ClientCertificateRefused,
        other => TlsFailure::Other {
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_out_of_urls() {
        assert_eq!(host_of("amqps://u:p@mq.example:5671/%2f"), "mq.example");
        assert_eq!(host_of("amqps://mq.example/%2f"), "mq.example");
        assert_eq!(host_of("amqps://[::1]:5671"), "::1");
    }

    #[test]
    fn causes_are_found_through_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            TlsError::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(tls_failure(&io), Some(TlsFailure::UntrustedCertificate));
        let plain = std::io::Error::other("connection refused");
        assert_eq!(tls_failure(&plain), None);
    }

    #[test]
    fn tls_files_name_their_setting() {
        let err = BrokerTls::from_files(Some(Path::new("/nonexistent/ca.pem")), None, None)
            .expect_err("missing file");
        assert!(
            err.to_string()
                .starts_with("AMQP_TLS_CA=/nonexistent/ca.pem: cannot read"),
            "{err}"
        );
        let err = BrokerTls::from_files(None, Some(Path::new("/tmp/c.pem")), None)
            .expect_err("cert without key");
        assert!(err.to_string().contains("AMQP_TLS_KEY"), "{err}");
        let dir = std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").expect("write");
        let err = BrokerTls::from_files(Some(&not_pem), None, None).expect_err("not PEM");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
