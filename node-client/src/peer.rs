//! Who may call the CNI socket: the socket file is mode 0600, and each call's
//! peer credentials (SO_PEERCRED, read by tonic at accept) are checked too,
//! so that a socket made reachable by mistake (a bind mount, a chmod) still
//! answers only root and the uids an operator allowed.
use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};
use tonic::{
    codegen::{http, BoxFuture, Service},
    transport::server::UdsConnectInfo,
    Status,
};

/// Whether `uid` may call: root always, others only when listed.
pub fn allowed(uid: Option<u32>, extra: &[u32]) -> bool {
    match uid {
        Some(0) => true,
        Some(u) => extra.contains(&u),
        // No credentials (not a Unix socket peer): refuse.
        None => false,
    }
}

/// The layer that refuses calls from other uids with PERMISSION_DENIED.
#[derive(Clone)]
pub struct PeerCheckLayer(Arc<Vec<u32>>);

impl PeerCheckLayer {
    /// Root and `extra` may call.
    pub fn new(extra: Vec<u32>) -> Self {
        PeerCheckLayer(Arc::new(extra))
    }
}

impl<S> tower::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;
    fn layer(&self, inner: S) -> PeerCheck<S> {
        PeerCheck {
            inner,
            extra: self.0.clone(),
        }
    }
}

/// The service [`PeerCheckLayer`] makes.
#[derive(Clone)]
pub struct PeerCheck<S> {
    inner: S,
    extra: Arc<Vec<u32>>,
}

impl<S, B> Service<http::Request<B>> for PeerCheck<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|c| c.peer_cred);
        let uid = cred.map(|c| c.uid());
        if allowed(uid, &self.extra) {
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            return Box::pin(inner.call(req));
        }
        let pid = cred.and_then(|c| c.pid());
        tracing::warn!(?uid, ?pid, call = %req.uri().path(), "CNI socket call refused: peer uid not allowed");
        let st = Status::permission_denied(format!(
            "uid {} may not call tabby-node's CNI socket (root and --cni-allowed-uids may)",
            uid.map_or("unknown".to_string(), |u| u.to_string())
        ));
        Box::pin(async move { Ok(st.into_http()) })
    }
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn root_and_listed_uids_only() {
        assert!(allowed(Some(0), &[]));
        assert!(!allowed(Some(1000), &[]));
        assert!(allowed(Some(1000), &[1000]));
        assert!(!allowed(None, &[0]));
    }
}
