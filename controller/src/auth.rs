//! Node identity: who a node-facing call comes from. One layer sets it, and
//! handlers read it with [`caller`] and nothing else.
use crate::error::{Error, Result};
use tonic::{Request, Status};

/// The calling node's identity, put into request extensions by exactly one
/// layer ([`node_identity_interceptor`]); handlers read nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity(pub String);

/// Sets [`NodeIdentity`] from the `tabby-node` metadata header. When mTLS
/// arrives, only this function changes (to read the peer certificate).
pub fn node_identity_interceptor(mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
    let name = req
        .metadata()
        .get(tabby_proto::NODE_IDENTITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "node-facing calls need the caller's node name in metadata {:?}",
                tabby_proto::NODE_IDENTITY_HEADER
            ))
        })?;
    req.extensions_mut().insert(NodeIdentity(name));
    Ok(req)
}

/// The node a call comes from, as [`node_identity_interceptor`] set it.
/// UNAUTHENTICATED if the call did not pass through it.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<String> {
    req.extensions()
        .get::<NodeIdentity>()
        .map(|n| n.0.clone())
        .ok_or_else(|| Error::Unauthenticated("no node identity on this call".into()))
}
