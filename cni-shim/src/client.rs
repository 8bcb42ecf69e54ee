//! The I/O edge towards `tabby-node`: a tonic client over its Unix socket,
//! with a connect timeout and a per-call timeout. No TLS: the socket's file
//! mode is the access control.

use crate::plan::NodeApi;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tabby_proto::v1 as pb;
use tabby_proto::v1::pod_network_client::PodNetworkClient;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

/// A connected `tabby.v1.PodNetwork` client.
pub struct NodeClient {
    inner: PodNetworkClient<Channel>,
    timeout: Duration,
}

/// `e` and every `source()` below it, joined: tonic's own message alone is
/// just "transport error".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        // Some layers already print their source; do not repeat it.
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

impl NodeClient {
    /// Connect and complete the HTTP/2 handshake within `connect_timeout`:
    /// the handshake counts as done once tabby-node's SETTINGS frame has
    /// arrived. h2's client handshake returns as soon as it has *written*
    /// the client preface, so without [`PrefaceWatch`] a socket that accepts
    /// and never answers (a wedged tabby-node) would pass here and hold the
    /// call until `timeout`. The error is a human-readable reason.
    pub async fn connect(
        socket: &Path,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, String> {
        let path: PathBuf = socket.to_path_buf();
        let (preface_tx, preface_rx) = oneshot::channel();
        // Only the first connection reports; tonic may reconnect later.
        let preface_tx = Arc::new(Mutex::new(Some(preface_tx)));
        let connected = Arc::new(AtomicBool::new(false));
        let connected_in = connected.clone();
        // The authority is never resolved: the connector below ignores the URI.
        let endpoint = Endpoint::from_static("http://tabby-node")
            .connect_timeout(connect_timeout)
            .timeout(timeout);
        let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            let tx = preface_tx.lock().ok().and_then(|mut t| t.take());
            let connected = connected_in.clone();
            async move {
                let stream = UnixStream::connect(path).await?;
                connected.store(true, Ordering::SeqCst);
                Ok::<_, std::io::Error>(TokioIo::new(PrefaceWatch::new(stream, tx)))
            }
        }));
        let handshake = async {
            let channel = connect.await.map_err(|e| error_chain(&e))?;
            match preface_rx.await {
                Ok(Ok(())) => Ok(channel),
                Ok(Err(why)) => Err(why),
                Err(_) => Err("the connection closed during the HTTP/2 handshake".to_string()),
            }
        };
        match tokio::time::timeout(connect_timeout, handshake).await {
            Err(_) if connected.load(Ordering::SeqCst) => Err(format!(
                "connected, but no HTTP/2 handshake from tabby-node within {} ms \
                 (connect_timeout_ms); the node may be stuck",
                connect_timeout.as_millis()
            )),
            Err(_) => Err(format!(
                "no connection within {} ms (connect_timeout_ms)",
                connect_timeout.as_millis()
            )),
            Ok(Err(e)) => Err(e),
            Ok(Ok(channel)) => Ok(Self {
                inner: PodNetworkClient::new(channel),
                timeout,
            }),
        }
    }

    /// A request carrying the deadline (`grpc-timeout`), so the node knows it.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    async fn timed<T>(
        timeout: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer from tabby-node within {} ms",
                timeout.as_millis()
            ))),
            Ok(r) => r.map(tonic::Response::into_inner),
        }
    }
}

/// Length of an HTTP/2 frame header; byte 3 is the frame type.
const FRAME_HEADER_LEN: usize = 9;
/// Frame type of SETTINGS, which an HTTP/2 server sends first (RFC 9113, 3.4).
const FRAME_TYPE_SETTINGS: u8 = 0x4;

/// The socket as the HTTP/2 connection sees it, reporting once whether the
/// server's first frame header arrived and is a SETTINGS frame: the end of
/// the handshake as far as the client can observe it.
struct PrefaceWatch<S> {
    io: S,
    header: Vec<u8>,
    report: Option<oneshot::Sender<Result<(), String>>>,
}

impl<S> PrefaceWatch<S> {
    fn new(io: S, report: Option<oneshot::Sender<Result<(), String>>>) -> Self {
        Self {
            io,
            header: Vec::with_capacity(FRAME_HEADER_LEN),
            report,
        }
    }

    fn report(&mut self, outcome: Result<(), String>) {
        if let Some(tx) = self.report.take() {
            let _ = tx.send(outcome);
        }
    }

    /// Look at bytes just read from the server.
    fn saw(&mut self, bytes: &[u8]) {
        if self.report.is_none() {
            return;
        }
        if bytes.is_empty() {
            return self.report(Err(
                "tabby-node closed the connection before the HTTP/2 handshake".into(),
            ));
        }
        let want = FRAME_HEADER_LEN - self.header.len();
        self.header
            .extend_from_slice(&bytes[..want.min(bytes.len())]);
        if self.header.len() == FRAME_HEADER_LEN {
            let outcome = if self.header[3] == FRAME_TYPE_SETTINGS {
                Ok(())
            } else {
                Err(format!(
                    "the socket does not speak HTTP/2: its first bytes {:02x?} are not a \
                     SETTINGS frame",
                    self.header
                ))
            };
            self.report(outcome);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefaceWatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => this.saw(&buf.filled()[before..]),
            Poll::Ready(Err(e)) => {
                let why = format!("reading the HTTP/2 handshake failed: {e}");
                this.report(Err(why));
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefaceWatch<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl NodeApi for NodeClient {
    fn add(
        &mut self,
        req: pb::PodAddRequest,
    ) -> impl Future<Output = Result<pb::PodAddResponse, Status>> {
        let req = self.request(req);
        Self::timed(self.timeout, self.inner.add(req))
    }

    fn del(
        &mut self,
        req: pb::PodDelRequest,
    ) -> impl Future<Output = Result<pb::PodDelResponse, Status>> {
        let req = self.request(req);
        Self::timed(self.timeout, self.inner.del(req))
    }

    fn check(
        &mut self,
        req: pb::PodCheckRequest,
    ) -> impl Future<Output = Result<pb::PodCheckResponse, Status>> {
        let req = self.request(req);
        Self::timed(self.timeout, self.inner.check(req))
    }

    fn status(&mut self) -> impl Future<Output = Result<pb::PodStatusResponse, Status>> {
        let req = self.request(pb::PodStatusRequest {});
        Self::timed(self.timeout, self.inner.status(req))
    }

    fn gc(
        &mut self,
        req: pb::PodGcRequest,
    ) -> impl Future<Output = Result<pb::PodGcResponse, Status>> {
        let req = self.request(req);
        Self::timed(self.timeout, self.inner.gc(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connecting_to_a_missing_socket_fails_fast_with_the_os_reason() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let err = rt
            .block_on(NodeClient::connect(
                &dir.path().join("missing.sock"),
                Duration::from_secs(5),
                Duration::from_secs(5),
            ))
            .err()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(err.contains("No such file"), "{err}");
    }

    /// Connect to a listener whose accepted connections get `answer`
    /// written to them (then stay open, or are closed if `close`).
    fn connect_to_peer(answer: &'static [u8], close: bool) -> (Result<(), String>, Duration) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("peer.sock");
        rt.block_on(async {
            let listener = tokio::net::UnixListener::bind(&sock).unwrap();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((mut s, _)) = listener.accept().await {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(answer).await;
                    if !close {
                        held.push(s);
                    }
                }
            });
            let started = std::time::Instant::now();
            let r = NodeClient::connect(&sock, Duration::from_millis(300), Duration::from_secs(30))
                .await
                .map(|_| ());
            (r, started.elapsed())
        })
    }

    #[test]
    fn a_peer_that_accepts_and_never_speaks_fails_within_the_connect_timeout() {
        let (r, elapsed) = connect_to_peer(b"", false);
        let err = r.unwrap_err();
        assert!(err.contains("no HTTP/2 handshake"), "{err}");
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn a_peer_that_is_not_http2_or_hangs_up_fails_at_once() {
        let (r, elapsed) = connect_to_peer(b"HTTP/1.1 400 Bad Request\r\n\r\n", false);
        let err = r.unwrap_err();
        assert!(err.contains("does not speak HTTP/2"), "{err}");
        assert!(elapsed < Duration::from_millis(300), "{elapsed:?}");
        let (r, _) = connect_to_peer(b"", true);
        let err = r.unwrap_err();
        assert!(err.contains("closed"), "{err}");
    }

    #[test]
    fn a_settings_frame_completes_the_handshake() {
        // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
        let (r, _) = connect_to_peer(&[0, 0, 0, 4, 0, 0, 0, 0, 0], false);
        assert_eq!(r, Ok(()));
    }
}
