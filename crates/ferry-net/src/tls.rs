//! TLS for the listeners (rustls with the `ring` provider): a server configuration from PEM
//! files, and [`TlsListener`], which accepts TCP connections and completes their handshakes in
//! their own tasks (a slow or silent client never holds up the accept loop). It serves MQTT over
//! TLS and, as an [`axum::serve::Listener`], HTTPS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TlsFiles;

/// How long a client may take to complete the TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const BACKLOG: usize = 128;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("reading {what} {path}: {reason}")]
    Pem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the certificate or key.
    #[error("TLS configuration from {cert}: {source}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// rustls's error.
        source: rustls::Error,
    },
}

fn pem_error(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A rustls server configuration from a PEM certificate chain and private key, offering `alpn`
/// protocols (empty: no ALPN).
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem_error("certificate", &files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("certificate", &files.cert, e))?;
    if certs.is_empty() {
        return Err(pem_error(
            "certificate",
            &files.cert,
            "no certificate found",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error("private key", &files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| TlsError::Config {
            cert: files.cert.clone(),
            source: e,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS listener: TCP accepts and handshakes run in background tasks (tracked by the
/// server's tracker, stopped by its shutdown token); [`TlsListener::accept`] yields the
/// connections whose handshake succeeded.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; `what` names the listener in logs.
    pub fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
        what: &'static str,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let acceptor = TlsAcceptor::from(config);
        let tracker2 = tracker.clone();
        tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    a = tcp.accept() => a,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(listener = what, error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let stop = shutdown.clone();
                tracker2.spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let r = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = handshake => r,
                    };
                    match r {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(listener = what, %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(listener = what, %peer, "TLS handshake timed out")
                        }
                    }
                });
            }
            tracing::info!(listener = what, "TLS listener stopped");
        });
        Ok(TlsListener { rx, local })
    }

    /// The next connection whose handshake succeeded; `None` once the listener stopped.
    pub async fn next(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.rx.recv().await
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.next().await {
            Some(c) => c,
            // Stopped at shutdown: axum's graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
