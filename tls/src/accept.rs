//! The server side: TLS handshakes off the accept loop, and each
//! connection's peer identity carried into its requests.
use crate::{material::ServerMaterial, Identity, Reloading};
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Semaphore},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;

/// What a request knows about the connection it came on. tonic puts it into
/// every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's TCP address.
    pub remote: SocketAddr,
    /// The identity its verified certificate names; `None` when it sent no
    /// certificate, or one that names no tabby identity.
    pub identity: Option<Identity>,
}

/// A handshaken TLS connection.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    /// The peer of this connection.
    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Limits of the accepting side.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// A handshake not done in this time is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further accepted sockets wait.
    pub max_handshakes: usize,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        AcceptLimits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
        }
    }
}

/// Accepts on `listener` and yields connections whose handshake succeeded,
/// for tonic's `serve_with_incoming`. Each handshake runs in its own task
/// with the config current at accept time, so a slow or hostile peer holds
/// up no one. A refused handshake (no shared protocol, a client certificate
/// that does not verify, or one naming a malformed or second identity) is
/// logged with the peer address and the connection closed. The accept task
/// ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Reloading<ServerMaterial>,
    limits: AcceptLimits,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let gate = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: keep serving what is open.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = gate.clone().acquire_owned().await else {
                return;
            };
            let (tx, acceptor) = (tx.clone(), TlsAcceptor::from(tls.current()));
            tokio::spawn(async move {
                let _permit = permit;
                let hs = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                let stream = match hs.await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %remote, "TLS handshake timed out");
                        return;
                    }
                };
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned());
                let identity = match leaf.map(|c| Identity::from_cert_der(&c)) {
                    None => None,
                    Some(Ok(id)) => id,
                    Some(Err(e)) => {
                        tracing::info!(peer = %remote, error = %e, "client certificate refused");
                        return;
                    }
                };
                let conn = TlsConn {
                    inner: stream,
                    info: PeerInfo { remote, identity },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
