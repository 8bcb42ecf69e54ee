//! Who a call comes from, and whether it may be made: the one place that
//! reads identity. [`AuthLayer`] wraps every service. Under mTLS it reads
//! the identity that the connection's verified client certificate names
//! ([`tabby_tls::PeerInfo`]); only with `--insecure` does it take a node's
//! name from the `tabby-node` header. Handlers read the result with
//! [`caller`] and nothing else.
use crate::error::{Error, Result};
use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};
use tabby_tls::{Identity, PeerInfo};
use tokio::sync::Semaphore;
use tonic::{
    codegen::{http, BoxFuture, Service},
    Code, Request, Status,
};

/// The calling node, put into request extensions by [`AuthLayer`] only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity(pub String);

/// The node a call comes from, as [`AuthLayer`] set it. UNAUTHENTICATED if
/// the call did not pass through it.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<String> {
    req.extensions()
        .get::<NodeIdentity>()
        .map(|n| n.0.clone())
        .ok_or_else(|| Error::Unauthenticated("no node identity on this call".into()))
}

/// How the server learns identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the verified client certificate; headers claim nothing.
    Mtls,
    /// `--insecure`: node calls name their node in the `tabby-node` header
    /// and admin calls need nothing. For development only.
    Insecure,
}

/// What a call path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// grpc.health.v1 and reflection: anyone who can connect.
    Open,
    /// tabby.v1.IpamAdmin and tabby.v1.BgpAdmin: an admin identity.
    Admin,
    /// tabby.v1.NodeAgent and tabby.v1.IntentStream: a node identity.
    Node,
    /// Anything else (answered UNIMPLEMENTED): some identity.
    Other,
}

/// The class of a gRPC path (`/package.Service/Method`).
pub fn classify(path: &str) -> Class {
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Class::Open,
        "tabby.v1.IpamAdmin" | "tabby.v1.BgpAdmin" => Class::Admin,
        "tabby.v1.NodeAgent" | "tabby.v1.IntentStream" => Class::Node,
        _ => Class::Other,
    }
}

/// The decision on one call: the node it acts as (for node calls), or the
/// refusal to answer with.
pub fn decide(
    mode: Mode,
    class: Class,
    cert: Option<&Identity>,
    header: Option<&str>,
) -> std::result::Result<Option<String>, Status> {
    let want = |what: &str| {
        Status::unauthenticated(format!(
            "this call needs a client certificate naming {what} (tabby-controller certs ...)"
        ))
    };
    match (mode, class) {
        (_, Class::Open) => Ok(None),
        (Mode::Insecure, Class::Admin | Class::Other) => Ok(None),
        (Mode::Insecure, Class::Node) => match header.filter(|h| !h.is_empty()) {
            Some(h) => Ok(Some(h.to_string())),
            None => Err(Status::unauthenticated(format!(
                "node-facing calls need the caller's node name in metadata {:?} (the controller runs with --insecure)",
                tabby_proto::NODE_IDENTITY_HEADER
            ))),
        },
        (Mode::Mtls, Class::Admin) => match cert {
            Some(Identity::Admin(_)) => Ok(None),
            Some(id @ Identity::Node(_)) => Err(Status::permission_denied(format!(
                "{id} may not use the admin services"
            ))),
            None => Err(want("tabby://admin/<name>")),
        },
        (Mode::Mtls, Class::Node) => match cert {
            Some(Identity::Node(n)) => match header {
                Some(h) if h != n => Err(Status::permission_denied(format!(
                    "the {:?} header names {h:?}, but the certificate names node {n:?}",
                    tabby_proto::NODE_IDENTITY_HEADER
                ))),
                _ => Ok(Some(n.clone())),
            },
            Some(id @ Identity::Admin(_)) => Err(Status::permission_denied(format!(
                "{id} is not a node: only node certificates may call the node services"
            ))),
            None => Err(want("tabby://node/<name>")),
        },
        (Mode::Mtls, Class::Other) => match cert {
            Some(_) => Ok(None),
            None => Err(want("a tabby identity")),
        },
    }
}

/// Wraps the server's routes with [`decide`], a per-node bound on calls in
/// progress (so one node flooding the controller waits for its own calls,
/// not others'), and one log line per refusal naming identity and call.
#[derive(Clone)]
pub struct AuthLayer(Arc<Shared>);

struct Shared {
    mode: Mode,
    per_node: usize,
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl AuthLayer {
    /// `per_node`: node calls one node may have in progress at once; more
    /// wait for one of them to finish.
    pub fn new(mode: Mode, per_node: usize) -> Self {
        AuthLayer(Arc::new(Shared {
            mode,
            per_node: per_node.max(1),
            gates: Mutex::default(),
        }))
    }
}

impl Shared {
    fn gate(&self, node: &str) -> Arc<Semaphore> {
        let mut g = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(node.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_node)))
            .clone()
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: self.0.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Who to name in a log line.
fn who(peer: Option<&PeerInfo>, node: Option<&str>) -> String {
    match (peer.and_then(|p| p.identity.as_ref()), node) {
        (Some(id), _) => id.to_string(),
        (None, Some(n)) => format!("node {n:?} (by header)"),
        (None, None) => "no identity".into(),
    }
}

impl<S, B> Service<http::Request<B>> for Auth<S>
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The ready clone goes into the future; a fresh one stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        let class = classify(&path);
        if class == Class::Open {
            return Box::pin(inner.call(req));
        }
        let shared = self.shared.clone();
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let header = req
            .headers()
            .get(tabby_proto::NODE_IDENTITY_HEADER)
            .map(|v| v.to_str().unwrap_or("<not ASCII>").to_string());
        let decided = decide(
            shared.mode,
            class,
            peer.as_ref().and_then(|p| p.identity.as_ref()),
            header.as_deref(),
        );
        Box::pin(async move {
            let node = match decided {
                Ok(n) => n,
                Err(st) => {
                    tracing::warn!(
                        identity = %who(peer.as_ref(), header.as_deref()),
                        peer = ?peer.as_ref().map(|p| p.remote),
                        call = %path,
                        code = ?st.code(),
                        "call refused: {}", st.message()
                    );
                    return Ok(st.into_http());
                }
            };
            let _permit = match &node {
                Some(n) => {
                    req.extensions_mut().insert(NodeIdentity(n.clone()));
                    shared.gate(n).acquire_owned().await.ok()
                }
                None => None,
            };
            let resp = inner.call(req).await?;
            // Refusals by the handlers (another node's handle, registering
            // as another node) are logged here too, once.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(Code::from);
            if code == Some(Code::PermissionDenied) {
                tracing::warn!(
                    identity = %who(peer.as_ref(), node.as_deref()),
                    peer = ?peer.as_ref().map(|p| p.remote),
                    call = %path,
                    "call refused: permission denied"
                );
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_paths() {
        assert_eq!(classify("/grpc.health.v1.Health/Check"), Class::Open);
        assert_eq!(
            classify("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Class::Open
        );
        assert_eq!(classify("/tabby.v1.IpamAdmin/ShowIpam"), Class::Admin);
        assert_eq!(classify("/tabby.v1.NodeAgent/Assign"), Class::Node);
        assert_eq!(classify("/tabby.v1.IntentStream/Watch"), Class::Node);
        assert_eq!(classify("/tabby.v1.IpamAdminX/ShowIpam"), Class::Other);
        assert_eq!(classify(""), Class::Other);
    }

    #[test]
    fn decisions() {
        let node = Identity::Node("n1".into());
        let admin = Identity::Admin("ops".into());
        let m = Mode::Mtls;
        let code = |r: std::result::Result<Option<String>, Status>| r.map_err(|s| s.code());
        assert_eq!(
            code(decide(m, Class::Node, Some(&node), None)),
            Ok(Some("n1".into()))
        );
        assert_eq!(
            code(decide(m, Class::Node, Some(&node), Some("n1"))),
            Ok(Some("n1".into()))
        );
        assert_eq!(
            code(decide(m, Class::Node, Some(&node), Some("n2"))),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(decide(m, Class::Node, Some(&admin), None)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(decide(m, Class::Node, None, Some("n1"))),
            Err(Code::Unauthenticated)
        );
        assert_eq!(code(decide(m, Class::Admin, Some(&admin), None)), Ok(None));
        assert_eq!(
            code(decide(m, Class::Admin, Some(&node), None)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(decide(m, Class::Admin, None, None)),
            Err(Code::Unauthenticated)
        );
        assert_eq!(code(decide(m, Class::Open, None, None)), Ok(None));
        assert_eq!(
            code(decide(m, Class::Other, None, None)),
            Err(Code::Unauthenticated)
        );
        let i = Mode::Insecure;
        assert_eq!(
            code(decide(i, Class::Node, None, Some("n1"))),
            Ok(Some("n1".into()))
        );
        assert_eq!(
            code(decide(i, Class::Node, None, None)),
            Err(Code::Unauthenticated)
        );
        assert_eq!(code(decide(i, Class::Admin, None, None)), Ok(None));
    }
}
