//! TLS for the tests: a throwaway certificate authority made at test time
//! (rcgen), and a TLS-terminating proxy (rustls server → plain TCP) to put
//! in front of the local broker, which has no TLS listener of its own.
//!
//! Everything lives in a temporary directory removed on drop.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

/// A certificate authority of its own, and the files it wrote.
#[derive(Debug)]
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How a server certificate is made.
#[derive(Debug, Clone)]
pub struct ServerCert<'a> {
    /// DNS names and IP addresses it is valid for.
    pub names: &'a [&'a str],
    /// Valid in the past only (expired).
    pub expired: bool,
}

impl TestCa {
    /// A new CA named `name`, writing its files under a fresh temporary
    /// directory (`ca.pem` is the certificate clients trust).
    pub fn new(name: &str) -> Result<TestCa> {
        let dir =
            std::env::temp_dir().join(format!("sluice-tls-{name}-{}", crate::random_suffix()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("sluice test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.join("ca.pem"), issuer.pem()).context("writing ca.pem")?;
        Ok(TestCa {
            issuer,
            dir,
            name: name.to_owned(),
        })
    }

    /// The CA's certificate (PEM), to give a client as its trust root.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The directory holding this CA's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server certificate signed by this CA, written as `<file>.pem` and
    /// `<file>.key`.
    pub fn server_cert(&self, file: &str, how: &ServerCert<'_>) -> Result<CertFiles> {
        let names: Vec<String> = how.names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{} server {file}", self.name));
        if how.expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        self.write(file, &params)
    }

    /// A client certificate (for mutual TLS) signed by this CA.
    pub fn client_cert(&self, file: &str, common_name: &str) -> Result<CertFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name.to_owned());
        self.write(file, &params)
    }

    fn write(&self, file: &str, params: &CertificateParams) -> Result<CertFiles> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).context("writing the certificate")?;
        std::fs::write(&files.key, key.serialize_pem()).context("writing the key")?;
        Ok(files)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS-terminating proxy on `127.0.0.1:0`: it accepts TLS with the given
/// certificate and forwards the plain bytes to `upstream`. Stops on drop.
#[derive(Debug)]
pub struct TlsProxy {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsProxy {
    /// Starts the proxy with `cert` (files from [`TestCa::server_cert`]).
    pub fn start(upstream: SocketAddr, cert: &CertFiles) -> Result<TlsProxy> {
        TlsProxy::start_with(upstream, cert, None)
    }

    /// As [`TlsProxy::start`], and clients must present a certificate
    /// signed by the CA in `client_ca` (mutual TLS).
    pub fn start_mutual(
        upstream: SocketAddr,
        cert: &CertFiles,
        client_ca: &Path,
    ) -> Result<TlsProxy> {
        TlsProxy::start_with(upstream, cert, Some(client_ca))
    }

    fn start_with(
        upstream: SocketAddr,
        cert: &CertFiles,
        client_ca: Option<&Path>,
    ) -> Result<TlsProxy> {
        let chain = CertificateDer::pem_file_iter(&cert.cert)
            .context("reading the server certificate")?
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the server certificate")?;
        let key = PrivateKeyDer::from_pem_file(&cert.key).context("reading the server key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("protocol versions")?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path).context("reading the client CA")? {
                    roots
                        .add(cert.context("parsing the client CA")?)
                        .context("adding the client CA")?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .context("client certificate verifier")?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .context("server certificate and key")?;
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&handshakes);
        let (shutdown, stop) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("tls-proxy-{addr}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            log::error!("tls proxy {addr}: cannot register listener: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stop => {}
                        () = accept_loop(listener, upstream, acceptor, counted) => {}
                    }
                });
            })?;
        Ok(TlsProxy {
            addr,
            handshakes,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    acceptor: TlsAcceptor,
    handshakes: Arc<AtomicUsize>,
) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("tls proxy: accept failed: {e}");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let handshakes = Arc::clone(&handshakes);
        tokio::spawn(async move {
            if let Err(e) = relay(client, upstream, acceptor, handshakes).await {
                log::debug!("tls proxy: connection from {peer} ended: {e}");
            }
        });
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    acceptor: TlsAcceptor,
    handshakes: Arc<AtomicUsize>,
) -> io::Result<()> {
    let mut tls = acceptor.accept(client).await?;
    handshakes.fetch_add(1, Ordering::Relaxed);
    let mut server = TcpStream::connect(upstream).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
    Ok(())
}
