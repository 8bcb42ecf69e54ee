//! The I/O edge towards `tabby-node`: a tonic client over its Unix socket,
//! with a connect timeout and a per-call timeout. No TLS: the socket's file
//! mode is the access control.

use crate::plan::NodeApi;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tabby_proto::v1 as pb;
use tabby_proto::v1::pod_network_client::PodNetworkClient;
use tokio::net::UnixStream;
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
    /// Connect (and complete the HTTP/2 handshake) within `connect_timeout`.
    /// The error is a human-readable reason.
    pub async fn connect(
        socket: &Path,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, String> {
        let path: PathBuf = socket.to_path_buf();
        // The authority is never resolved: the connector below ignores the URI.
        let endpoint = Endpoint::from_static("http://tabby-node")
            .connect_timeout(connect_timeout)
            .timeout(timeout);
        let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }));
        match tokio::time::timeout(connect_timeout, connect).await {
            Err(_) => Err(format!(
                "no connection within {} ms",
                connect_timeout.as_millis()
            )),
            Ok(Err(e)) => Err(error_chain(&e)),
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
}
