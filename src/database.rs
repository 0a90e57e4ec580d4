//! `DATABASE_URL` → a tokio-postgres configuration and a rustls connector
//! that honour libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`
//! (tokio-postgres itself knows only `disable`, `prefer` and `require`).
//!
//! As in libpq (see "SSL Support" in the PostgreSQL manual):
//! - `disable`: plain TCP.
//! - `prefer` (the default): TLS if the server offers it, else plain.
//! - `require`: TLS or nothing.
//! - `verify-ca`: TLS, and the server's chain must lead to `sslrootcert`
//!   (host name not checked).
//! - `verify-full`: as `verify-ca`, and the certificate must name the host.
//! - `prefer` and `require` verify the chain as `verify-ca` does when a root
//!   certificate file exists (`sslrootcert`, or `~/.postgresql/root.crt`),
//!   and do not verify at all otherwise.
//! - `sslrootcert=system` trusts the system's roots and makes `verify-full`
//!   the default; weaker modes are refused with it (PostgreSQL 16).
//!
//! Known differences: a `prefer` handshake that fails is an error rather
//! than a retry in plain text; `PGSSLMODE` and friends are not read.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sluice_actors::redact::redact;
use sluice_actors::tls::{certificates, tls_failure, TlsFailure};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq accepts `allow` too; it is `prefer` the other way round.
            "allow" => bail!(
                "DATABASE_URL: sslmode=allow is not supported (use prefer, require, verify-ca or verify-full)"
            ),
            other => bail!(
                "DATABASE_URL: sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            ),
        })
    }
}

/// How the server's certificate is checked, once `sslmode` and the root
/// certificate file are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// No TLS at all.
    None,
    /// TLS without any certificate check (`prefer`/`require` with no root file).
    Unverified,
    /// The chain must lead to these roots; the host name is not checked.
    Chain { roots: RootSource },
    /// Chain and host name.
    Full { roots: RootSource },
}

/// Where trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// A PEM file (`sslrootcert=...` or `~/.postgresql/root.crt`).
    File(PathBuf),
    /// `sslrootcert=system`.
    System,
}

/// `DATABASE_URL`, split into what tokio-postgres understands and the TLS
/// parameters it does not.
#[derive(Debug)]
pub struct DatabaseTarget {
    /// The connection settings (the SSL keys taken out, `ssl_mode` set).
    pub config: tokio_postgres::Config,
    pub mode: SslMode,
    pub verification: Verification,
    /// `sslcert` and `sslkey`: a client certificate to present.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl DatabaseTarget {
    /// Parses `url` (a `postgres://` URL or libpq keyword/value string).
    /// Errors name DATABASE_URL and never print its password.
    pub fn parse(url: &str) -> anyhow::Result<DatabaseTarget> {
        let (rest, params) = take_ssl_params(url)?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            anyhow::anyhow!(
                "DATABASE_URL is not a valid PostgreSQL URL: {}",
                redact(&e.to_string())
            )
        })?;
        let root = params.rootcert.as_deref();
        let mode = match &params.mode {
            Some(mode) => mode.parse()?,
            // libpq (16): sslrootcert=system makes verify-full the default.
            None if root == Some("system") => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        let roots = match root {
            Some("system") => Some(RootSource::System),
            Some(path) => Some(RootSource::File(PathBuf::from(path))),
            None => default_root_file().map(RootSource::File),
        };
        if roots == Some(RootSource::System) && mode != SslMode::VerifyFull {
            bail!(
                "DATABASE_URL: sslrootcert=system needs sslmode=verify-full (as in libpq): \
                 a weaker mode would trust any certificate a public CA signed for anyone"
            );
        }
        let existing = roots.filter(|r| match r {
            RootSource::System => true,
            RootSource::File(path) => path.exists(),
        });
        let verification = match mode {
            SslMode::Disable => Verification::None,
            SslMode::Prefer | SslMode::Require => match existing {
                Some(roots) => Verification::Chain { roots },
                None => Verification::Unverified,
            },
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let Some(roots) = existing else {
                    let path = root.map_or_else(
                        || {
                            default_root_file_path().map_or("~/.postgresql/root.crt".into(), |p| {
                                p.display().to_string()
                            })
                        },
                        str::to_owned,
                    );
                    bail!(
                        "DATABASE_URL: sslmode={} needs a root certificate, and sslrootcert={path} \
                         does not exist (give the CA's PEM file with sslrootcert=, or sslrootcert=system)",
                        params.mode.as_deref().unwrap_or("verify-full")
                    );
                };
                if mode == SslMode::VerifyCa {
                    Verification::Chain { roots }
                } else {
                    Verification::Full { roots }
                }
            }
        };
        let client_cert = match (params.cert, params.key) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            _ => bail!("DATABASE_URL: sslcert and sslkey go together: give both"),
        };
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        Ok(DatabaseTarget {
            config,
            mode,
            verification,
            client_cert,
        })
    }

    /// The rustls connector for this target.
    pub fn connector(&self) -> anyhow::Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.verification {
            // Never used (ssl_mode is Disable), but a connector is still needed.
            Verification::None | Verification::Unverified => {
                // Deliberately unverified: libpq's prefer/require without a
                // root certificate encrypt but do not authenticate the server.
                Arc::new(NoCertificateCheck(provider.clone()))
            }
            Verification::Chain { roots } => Arc::new(ChainOnly(webpki(roots, &provider)?)),
            Verification::Full { roots } => webpki(roots, &provider)?,
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certificates("sslcert", cert)?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    anyhow::anyhow!(
                        "DATABASE_URL: sslkey={}: no PEM private key: {e}",
                        key.display()
                    )
                })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .context("DATABASE_URL: sslcert and sslkey do not match")?
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// What the certificate is checked against, for messages.
    fn trust(&self) -> String {
        match &self.verification {
            Verification::Chain { roots } | Verification::Full { roots } => match roots {
                RootSource::File(path) => format!("sslrootcert={}", path.display()),
                RootSource::System => "the system roots (sslrootcert=system)".into(),
            },
            _ => "nothing".into(),
        }
    }

    /// One sentence for a failed connection: the TLS cause named when there
    /// is one, the password masked.
    pub fn describe_error(&self, error: &(dyn std::error::Error + 'static)) -> String {
        let host = self
            .config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_default();
        match tls_failure(error) {
            Some(failure) => format!(
                "cannot connect to the database (DATABASE_URL, sslmode={}): {}",
                self.mode_name(),
                failure.describe("database", &host, &self.trust())
            ),
            None => redact(&format!(
                "cannot connect to the database (DATABASE_URL): {}",
                chain(error)
            )),
        }
    }

    /// Whether `error` is a certificate problem, which waiting will not fix.
    pub fn is_certificate_error(error: &(dyn std::error::Error + 'static)) -> bool {
        matches!(
            tls_failure(error),
            Some(
                TlsFailure::UntrustedCertificate
                    | TlsFailure::HostnameMismatch
                    | TlsFailure::Expired { .. }
                    | TlsFailure::NotYetValid
                    | TlsFailure::BadCertificate { .. }
            )
        )
    }

    /// Whether waiting may fix `error`, a failure to connect: the server
    /// is not up yet (the connection refused, cut or timed out; PostgreSQL
    /// starting up, shutting down or in recovery; no connection slot free).
    /// Not so a certificate refused, nor any other answer of the server (no
    /// such database, a password refused): the setting needs fixing.
    pub fn waiting_may_fix(error: &(dyn std::error::Error + 'static)) -> bool {
        use tokio_postgres::error::{DbError, SqlState};
        if Self::is_certificate_error(error) {
            return false;
        }
        let refusal = std::iter::successors(Some(error), |e| e.source())
            .find_map(|e| e.downcast_ref::<DbError>());
        match refusal {
            None => true,
            Some(refusal) => [
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
            ]
            .contains(refusal.code()),
        }
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The settings for a connection pool (timeouts, application name).
    pub fn pool_config(&self) -> tokio_postgres::Config {
        let mut pg = self.config.clone();
        pg.connect_timeout(Duration::from_secs(5));
        pg.application_name("sluice");
        pg
    }
}

/// `error` and its causes, `: `-separated.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// `~/.postgresql/root.crt`, where libpq looks when `sslrootcert` is not given.
fn default_root_file_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".postgresql/root.crt"))
}

fn default_root_file() -> Option<PathBuf> {
    default_root_file_path().filter(|p| p.exists())
}

fn read_certificates(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("DATABASE_URL: {key}={}: cannot read it", path.display()))?;
    certificates("DATABASE_URL", path, &pem)
        .map_err(|e| anyhow::anyhow!("DATABASE_URL: {key}={}: {}", path.display(), e.reason))
}

fn webpki(
    roots: &RootSource,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
    let mut store = RootCertStore::empty();
    match roots {
        RootSource::File(path) => {
            let (added, _ignored) =
                store.add_parsable_certificates(read_certificates("sslrootcert", path)?);
            if added == 0 {
                bail!(
                    "DATABASE_URL: sslrootcert={}: no usable CA certificate in it",
                    path.display()
                );
            }
        }
        RootSource::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                bail!("DATABASE_URL: sslrootcert=system, but no system root certificate could be loaded");
            }
        }
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .context("DATABASE_URL: building the certificate verifier")
}

/// The SSL keys of a DATABASE_URL that tokio-postgres does not know.
#[derive(Debug, Default)]
struct SslParams {
    mode: Option<String>,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl SslParams {
    /// Takes `key=value` if `key` is ours; false otherwise.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.rootcert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// `url` without the SSL keys tokio-postgres does not know, and those keys.
fn take_ssl_params(url: &str) -> anyhow::Result<(String, SslParams)> {
    let mut params = SslParams::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((head, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !params.take(key, percent_decode(value)) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            head.to_owned()
        } else {
            format!("{head}?{}", kept.join("&"))
        };
        Ok((rest, params))
    } else {
        // Keyword/value form: `host=db sslmode=verify-full ...`.
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            match token.split_once('=') {
                Some((key, value))
                    if ["sslmode", "sslrootcert", "sslcert", "sslkey"].contains(&key) =>
                {
                    if value.starts_with('\'') {
                        bail!("DATABASE_URL: quote-free values only for {key} (or use the postgres:// form)");
                    }
                    params.take(key, value.to_owned());
                }
                _ => kept.push(token),
            }
        }
        Ok((kept.join(" "), params))
    }
}

/// `%XX` escapes decoded (a path in a URL query).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&value[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `prefer`/`require` without a root certificate: TLS that does not
/// authenticate the server, exactly what libpq does. The handshake's own
/// signatures are still checked (against the presented certificate), so
/// the session is encrypted to whoever holds that certificate's key.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root, but the host name is
/// not checked. The webpki verifier checks the chain first and the name
/// last, so a name mismatch means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_keys_are_taken_out_of_urls() {
        let t = DatabaseTarget::parse(
            "postgres://app:pw@db:5432/x?sslmode=verify-ca&application_name=a&sslrootcert=%2Fnonexistent%2Fca.pem",
        );
        // verify-ca with a missing root file: libpq refuses, and so do we.
        let err = t.expect_err("missing root").to_string();
        assert!(err.contains("sslrootcert=/nonexistent/ca.pem"), "{err}");
        assert!(!err.contains("pw"), "{err}");

        let t = DatabaseTarget::parse("postgres://app:pw@db/x?sslmode=require").expect("parses");
        assert_eq!(t.mode, SslMode::Require);
        assert_eq!(t.config.get_ssl_mode(), PgSslMode::Require);

        let t = DatabaseTarget::parse("host=db user=app sslmode=disable").expect("keyword form");
        assert_eq!(t.verification, Verification::None);
        assert_eq!(t.config.get_ssl_mode(), PgSslMode::Disable);
    }

    /// The verifiers behind verify-ca, verify-full and the unverified modes,
    /// on certificates made by a test CA.
    #[test]
    fn each_mode_checks_what_libpq_checks() {
        use sluice_testkit::tls::{ServerCert, TestCa};
        let ca = TestCa::new("db").expect("CA");
        let other = TestCa::new("db-other").expect("CA");
        let cert_for = |ca: &TestCa, name: &str| {
            let files = ca
                .server_cert(
                    name,
                    &ServerCert {
                        names: &[name],
                        expired: false,
                    },
                )
                .expect("certificate");
            read_certificates("sslcert", &files.cert).expect("PEM")[0].clone()
        };
        let verify = |verification: Verification, cert: &CertificateDer<'static>, host: &str| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier: Arc<dyn ServerCertVerifier> = match &verification {
                Verification::Chain { roots } => {
                    Arc::new(ChainOnly(webpki(roots, &provider).expect("roots")))
                }
                Verification::Full { roots } => webpki(roots, &provider).expect("roots"),
                _ => Arc::new(NoCertificateCheck(provider)),
            };
            let name = ServerName::try_from(host.to_owned()).expect("name");
            verifier
                .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
                .map(|_| ())
        };
        let roots = RootSource::File(ca.ca_file());
        let right_host = cert_for(&ca, "db.sluice.test");
        let wrong_host = cert_for(&ca, "elsewhere.sluice.test");
        let untrusted = cert_for(&other, "db.sluice.test");
        let full = || Verification::Full {
            roots: roots.clone(),
        };
        let chain = || Verification::Chain {
            roots: roots.clone(),
        };

        assert!(verify(full(), &right_host, "db.sluice.test").is_ok());
        assert!(matches!(
            verify(full(), &wrong_host, "db.sluice.test"),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        ));
        assert!(verify(full(), &untrusted, "db.sluice.test").is_err());
        // verify-ca: any host name, but only this CA.
        assert!(verify(chain(), &wrong_host, "db.sluice.test").is_ok());
        assert!(matches!(
            verify(chain(), &untrusted, "db.sluice.test"),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
        // prefer/require without a root file: nothing is checked.
        assert!(verify(Verification::Unverified, &untrusted, "db.sluice.test").is_ok());
    }

    #[test]
    fn modes_follow_libpq() {
        let dir = std::env::temp_dir().join(format!("sluice-pgtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not read by parse").expect("write");
        let with = |mode: &str| {
            DatabaseTarget::parse(&format!(
                "postgres://db/x?sslmode={mode}&sslrootcert={}",
                ca.display()
            ))
            .expect("parses")
            .verification
        };
        let file = RootSource::File(ca.clone());
        // `require` with a root file verifies the chain, as libpq does.
        assert_eq!(
            with("require"),
            Verification::Chain {
                roots: file.clone()
            }
        );
        assert_eq!(
            with("prefer"),
            Verification::Chain {
                roots: file.clone()
            }
        );
        assert_eq!(
            with("verify-ca"),
            Verification::Chain {
                roots: file.clone()
            }
        );
        assert_eq!(with("verify-full"), Verification::Full { roots: file });
        let _ = std::fs::remove_dir_all(&dir);

        let t = DatabaseTarget::parse("postgres://db/x?sslrootcert=system").expect("parses");
        assert_eq!(t.mode, SslMode::VerifyFull);
        let err = DatabaseTarget::parse("postgres://db/x?sslmode=require&sslrootcert=system")
            .expect_err("weak mode with system roots");
        assert!(err.to_string().contains("verify-full"), "{err}");
        let err = DatabaseTarget::parse("postgres://db/x?sslmode=maybe").expect_err("bad mode");
        assert!(err.to_string().contains("sslmode=maybe"), "{err}");
    }
}
