//! TLS at both edges, with rustls (ring): the `wss://` client listener from
//! `server.tls` PEM files, and `wss://` targets verified against the system
//! roots or an upstream's `tls.ca_file`.
//!
//! The listener completes TLS handshakes concurrently in its own bounded
//! set of tasks (so one slow client cannot hold up accepting the next), each
//! under a timeout; the set belongs to the listener and ends with it, and
//! each of its tasks is counted by the shutdown tracker's listeners group.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::debug;

use crate::shutdown::TaskGroup;
use crate::transport::accept::{BalancedListener, HandOver};

/// Bound on one client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; more wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why TLS settings could not be built from the configured PEM files.
///
/// Each text starts with the file it is about; the caller names the
/// setting in front of it (`server.tls: …`, `upstreams[0].tls.ca_file: …`),
/// and the config fixtures pin the texts as they are.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file of certificates (the listener's chain, or a CA file)
    /// could not be read or parsed.
    #[error("{path}: {source}")]
    ReadCertificates {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file holds no certificate at all.
    #[error("{path}: no certificate in PEM")]
    NoCertificate { path: String },
    /// The listener's private key could not be read or parsed.
    #[error("{path}: {source}")]
    ReadKey {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate of a CA file cannot be a trust anchor.
    #[error("{path}: {source}")]
    BadCa {
        path: String,
        #[source]
        source: rustls::Error,
    },
    /// The listener's certificate chain and key do not go together.
    #[error("{cert_file} with {key_file}: {source}")]
    CertifiedKey {
        cert_file: String,
        key_file: String,
        #[source]
        source: rustls::Error,
    },
    /// The crypto provider supports none of the safe protocol versions.
    #[error("choosing the TLS protocol versions: {0}")]
    ProtocolVersions(#[source] rustls::Error),
}

/// The certificates of the PEM file at `path`, one by one.
fn read_certificates(
    path: &str,
) -> Result<impl Iterator<Item = Result<CertificateDer<'static>, TlsError>> + '_, TlsError> {
    let failed = move |source| TlsError::ReadCertificates {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path).map_err(failed)?;
    Ok(certs.map(move |cert| cert.map_err(failed)))
}

/// The listener's TLS settings from PEM files; `http2` offers HTTP/2 by
/// ALPN (preferred, as clients expect) beside HTTP/1.1.
pub(crate) fn server_config(
    cert_file: &str,
    key_file: &str,
    http2: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        read_certificates(cert_file)?.collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::ReadKey {
        path: key_file.to_owned(),
        source,
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ProtocolVersions)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::CertifiedKey {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            source,
        })?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

/// TLS settings for `wss://` targets: the system roots, or only `ca_file`.
pub(crate) fn client_config(ca_file: Option<&str>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(file) => {
            for cert in read_certificates(file)? {
                roots.add(cert?).map_err(|source| TlsError::BadCa {
                    path: file.to_owned(),
                    source,
                })?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCertificate {
                    path: file.to_owned(),
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ProtocolVersions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connection of either edge: plain TCP, or TLS over it (boxed, so that
/// a plain connection does not carry a TLS session's room).
pub(crate) enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A connection to a target.
pub(crate) type UpstreamStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;
/// A client's connection, from either listener.
pub(crate) type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

impl UpstreamStream {
    /// Wraps `tcp` in TLS for `host` when `tls` is given.
    pub(crate) async fn connect(
        tcp: TcpStream,
        host: &str,
        tls: Option<&Arc<ClientConfig>>,
    ) -> io::Result<UpstreamStream> {
        let Some(config) = tls else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        let stream = TlsConnector::from(Arc::clone(config))
            .connect(name, tcp)
            .await?;
        Ok(MaybeTls::Tls(Box::new(stream)))
    }
}

impl From<TcpStream> for ClientStream {
    fn from(tcp: TcpStream) -> Self {
        MaybeTls::Plain(tcp)
    }
}

impl From<tokio_rustls::server::TlsStream<TcpStream>> for ClientStream {
    fn from(tls: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        MaybeTls::Tls(Box::new(tls))
    }
}

impl<T> MaybeTls<T> {
    /// The socket has nothing to read and tokio knows it: its read
    /// readiness is clear, so a read would only register the task's waker
    /// again (see [`crate::transport::upgraded::UpgradedIo::read_surely_pending`]).
    /// Always false over TLS, whose stream may hold decrypted bytes the
    /// socket's readiness says nothing about.
    pub(crate) fn read_surely_pending(&self) -> bool {
        match self {
            // `try_io` runs the closure only if tokio holds read readiness.
            MaybeTls::Plain(tcp) => tcp.try_io(Interest::READABLE, || Ok(())).is_err(),
            MaybeTls::Tls(_) => false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    // Always: a match over the two kinds, on every read and write of a
    // relay, which LLVM otherwise leaves as a call (bench/instructions.sh
    // shows what the call costs).
    #[inline(always)]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    #[inline(always)]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The listener's TLS settings, which a reload may replace (a renewed
/// certificate): each handshake takes the ones current when it begins.
pub(crate) type ServerTls = Arc<arc_swap::ArcSwap<ServerConfig>>;

/// The `wss://` client listener: TCP accepts whose TLS handshakes are done.
pub(crate) struct TlsListener {
    tcp: BalancedListener,
    config: ServerTls,
    handshakes: JoinSet<Option<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>>,
    /// Counts the handshakes in progress with the listeners' other tasks.
    group: TaskGroup,
}

impl TlsListener {
    pub(crate) fn new(tcp: BalancedListener, config: ServerTls, group: TaskGroup) -> TlsListener {
        TlsListener {
            tcp,
            config,
            handshakes: JoinSet::new(),
            group,
        }
    }
}

impl TlsListener {
    /// Starts `tcp`'s TLS handshake in the listener's set.
    fn start_handshake(&mut self, tcp: TcpStream, addr: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(self.config.load_full());
        self.handshakes.spawn(self.group.track_future(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Some((tls, addr)),
                Ok(Err(error)) => {
                    debug!(%addr, %error, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    debug!(%addr, "TLS handshake timed out");
                    None
                }
            }
        }));
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                (tcp, addr) = self.tcp.accept(), if self.handshakes.len() < MAX_HANDSHAKES => {
                    self.start_handshake(tcp, addr);
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl HandOver for TlsListener {
    fn close(&mut self) {
        self.tcp.close();
    }

    /// The connections the TCP listener had taken, each once its TLS
    /// handshake is done, and those whose handshakes were under way.
    async fn rest(&mut self) -> Option<(Self::Io, Self::Addr)> {
        loop {
            tokio::select! {
                // Once the TCP listener has nothing left, this branch is
                // off and the handshakes under way are waited for.
                Some((tcp, addr)) = self.tcp.rest(), if self.handshakes.len() < MAX_HANDSHAKES => {
                    self.start_handshake(tcp, addr);
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return Some(ready);
                    }
                }
                else => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: the accepted side as a plain [`ClientStream`].
    async fn pair() -> (ClientStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (MaybeTls::Plain(accepted), peer)
    }

    /// The texts config validation shows for PEM files without a
    /// certificate, and for a key that does not go with its certificate.
    #[test]
    fn tls_errors_name_the_file_they_are_about() {
        let dir = std::env::temp_dir().join(format!("muxgate-tls-unit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not PEM\n").unwrap();
        let empty = empty.to_str().unwrap();
        let error = client_config(Some(empty)).unwrap_err();
        assert_eq!(error.to_string(), format!("{empty}: no certificate in PEM"));
        let error = server_config(empty, empty, false).unwrap_err();
        assert_eq!(error.to_string(), format!("{empty}: no certificate in PEM"));

        let one = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, one.cert.pem()).unwrap();
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let error = server_config(cert, key, false).unwrap_err();
        assert!(matches!(error, TlsError::CertifiedKey { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("{cert} with {key}: ")),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_read_is_surely_pending_only_until_the_socket_has_bytes() {
        let (mut stream, mut peer) = pair().await;
        let mut buf = [0u8; 16];
        // A first read registers this task's waker and returns Pending,
        // and the peer writes only then; the task wakes by the socket.
        let writer = tokio::spawn(async move {
            peer.write_all(b"hello").await.unwrap();
            peer
        });
        let mut first = true;
        poll_fn(|cx| {
            if std::mem::take(&mut first) {
                let mut read = ReadBuf::new(&mut buf);
                assert!(Pin::new(&mut stream).poll_read(cx, &mut read).is_pending());
                assert!(stream.read_surely_pending(), "nothing arrived yet");
                return Poll::Pending;
            }
            Poll::Ready(())
        })
        .await;
        let _peer = writer.await.unwrap();
        assert!(!stream.read_surely_pending(), "woken: bytes are there");
        assert_eq!(stream.read(&mut buf).await.unwrap(), 5);
        // A short read clears the readiness: nothing more to read.
        assert!(stream.read_surely_pending());
    }
}
