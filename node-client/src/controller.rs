//! Clients for the controller, with this node's identity on every call.
use crate::{Error, Result};
use std::time::Duration;
use tabby_proto::v1 as pb;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Channel, Endpoint},
    Request, Status,
};

/// Adds the `tabby-node` header. Under mTLS the controller takes the
/// node's identity from its certificate and only checks that the header
/// agrees (a node started with another name than its certificate's is
/// refused); with `--insecure` the header is the identity.
#[derive(Clone)]
pub struct Identity(MetadataValue<Ascii>);

impl Interceptor for Identity {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(tabby_proto::NODE_IDENTITY_HEADER, self.0.clone());
        Ok(req)
    }
}

/// NodeAgent client with identity.
pub type AgentClient =
    pb::node_agent_client::NodeAgentClient<InterceptedService<Channel, Identity>>;
/// IntentStream client with identity.
pub type IntentClient =
    pb::intent_stream_client::IntentStreamClient<InterceptedService<Channel, Identity>>;

/// Both controller clients over one lazily connected channel.
#[derive(Clone)]
pub struct Controller {
    /// Node-facing IPAM calls.
    pub agent: AgentClient,
    /// The intent watch.
    pub intent: IntentClient,
}

/// How the node reaches the controller.
#[derive(Clone)]
pub enum Transport {
    /// Mutual TLS, each new connection with the newest certificate files.
    Tls(tabby_tls::Connector),
    /// Plaintext (`--insecure`).
    Plaintext,
}

/// The host part of a `--controller` address (`host:port`, `[v6]:port` or
/// a URL): what the controller's certificate must name by default.
pub fn controller_host(addr: &str) -> Result<String> {
    let uri: tonic::transport::Uri = with_scheme(addr)
        .parse()
        .map_err(|e| Error::Invalid(format!("--controller {addr:?}: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| Error::Invalid(format!("--controller {addr:?} names no host")))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl Controller {
    /// `addr` is `host:port` or a URL; `node` the identity to present.
    pub fn new(addr: &str, node: &str, transport: &Transport) -> Result<Controller> {
        // The TLS connector wraps the connection itself: the endpoint's
        // scheme stays http.
        let url = with_scheme(addr).replacen("https://", "http://", 1);
        let ep = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::Invalid(format!("--controller {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let ch = match transport {
            Transport::Tls(c) => ep.connect_with_connector_lazy(c.clone()),
            Transport::Plaintext => ep.connect_lazy(),
        };
        let id = Identity(node.parse().map_err(|_| {
            Error::Invalid(format!("node name {node:?} is not a valid header value"))
        })?);
        Ok(Controller {
            agent: pb::node_agent_client::NodeAgentClient::with_interceptor(ch.clone(), id.clone()),
            intent: pb::intent_stream_client::IntentStreamClient::with_interceptor(ch, id),
        })
    }
}

/// The controller's IPAM calls the CNI server makes, as a trait so that
/// its locking and rollback can be tested against a fake controller.
/// Errors are the controller's (or the transport's) answers.
#[tonic::async_trait]
pub trait Ipam: Send + Sync {
    /// `NodeAgent.Assign`: the handle's allocations.
    async fn assign(
        &self,
        req: pb::AssignRequest,
    ) -> std::result::Result<Vec<pb::Allocation>, Status>;
    /// `NodeAgent.ReleaseHandle`: the addresses released (none for an
    /// unknown handle).
    async fn release_handle(&self, handle: &str) -> std::result::Result<Vec<String>, Status>;
    /// `NodeAgent.ListHandles`: the handles this node holds.
    async fn list_handles(&self) -> std::result::Result<Vec<String>, Status>;
}

#[tonic::async_trait]
impl Ipam for Controller {
    async fn assign(
        &self,
        req: pb::AssignRequest,
    ) -> std::result::Result<Vec<pb::Allocation>, Status> {
        let r = self.agent.clone().assign(req).await?;
        Ok(r.into_inner().allocations)
    }

    async fn release_handle(&self, handle: &str) -> std::result::Result<Vec<String>, Status> {
        let req = pb::ReleaseHandleRequest {
            handle: handle.to_string(),
        };
        let r = self.agent.clone().release_handle(req).await?;
        Ok(r.into_inner().released)
    }

    async fn list_handles(&self) -> std::result::Result<Vec<String>, Status> {
        let r = self
            .agent
            .clone()
            .list_handles(pb::ListHandlesRequest {})
            .await?;
        Ok(r.into_inner().handles)
    }
}

/// True when a status means the controller could not be reached (as opposed
/// to refusing the request).
pub fn is_unavailable(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}
