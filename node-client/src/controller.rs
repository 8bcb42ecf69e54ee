//! Clients for the controller, with this node's identity on every call.
use crate::{Error, Result};
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
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

/// Both controller clients for one controller address, over one lazily
/// connected channel.
struct Target {
    addr: String,
    agent: AgentClient,
    intent: IntentClient,
}

/// The controller replicas this node may talk to (`--controller a,b,c`)
/// and which of them it talks to now: the leader, once found. Only the
/// leader serves (issue 16); a standby refuses with UNAVAILABLE naming the
/// leader, and the node moves there, or to the next address when none is
/// named or the address is out of reach. Clones share the choice.
#[derive(Clone)]
pub struct Controller {
    targets: Arc<[Target]>,
    current: Arc<AtomicUsize>,
}

/// How the node reaches the controller.
#[derive(Clone)]
pub enum Transport {
    /// Mutual TLS, each new connection with the newest certificate files.
    Tls {
        /// Client material; verifies the server against `server_name`, or,
        /// when that is `None`, against each address's own host.
        connector: tabby_tls::Connector,
        /// `--tls-server-name`: one name for every replica.
        server_name: Option<String>,
    },
    /// Plaintext (`--insecure`).
    Plaintext,
}

/// The addresses in a `--controller` list (comma-separated, blanks
/// ignored); an empty list is refused.
pub fn controller_addresses(list: &str) -> Result<Vec<String>> {
    let v: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if v.is_empty() {
        return Err(Error::Invalid(format!(
            "--controller {list:?} names no address"
        )));
    }
    Ok(v)
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

fn target(addr: &str, id: &Identity, transport: &Transport) -> Result<Target> {
    // The TLS connector wraps the connection itself: the endpoint's
    // scheme stays http.
    let url = with_scheme(addr).replacen("https://", "http://", 1);
    let ep = Endpoint::from_shared(url)
        .map_err(|e| Error::Invalid(format!("--controller {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let ch = match transport {
        Transport::Tls {
            connector,
            server_name,
        } => {
            let c = match server_name {
                Some(_) => connector.clone(),
                None => connector
                    .with_server_name(&controller_host(addr)?)
                    .map_err(|e| Error::Invalid(e.to_string()))?,
            };
            ep.connect_with_connector_lazy(c)
        }
        Transport::Plaintext => ep.connect_lazy(),
    };
    Ok(Target {
        addr: addr.to_string(),
        agent: pb::node_agent_client::NodeAgentClient::with_interceptor(ch.clone(), id.clone()),
        intent: pb::intent_stream_client::IntentStreamClient::with_interceptor(ch, id.clone()),
    })
}

impl Controller {
    /// `addrs` is a comma-separated list of `host:port` or URLs (the
    /// replicas); `node` the identity to present. Nothing connects yet.
    pub fn new(addrs: &str, node: &str, transport: &Transport) -> Result<Controller> {
        let id = Identity(node.parse().map_err(|_| {
            Error::Invalid(format!("node name {node:?} is not a valid header value"))
        })?);
        let targets = controller_addresses(addrs)?
            .iter()
            .map(|a| target(a, &id, transport))
            .collect::<Result<Vec<_>>>()?;
        Ok(Controller {
            targets: targets.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn now(&self) -> &Target {
        &self.targets[self.current.load(Ordering::Relaxed) % self.targets.len()]
    }

    /// The NodeAgent client of the replica in use.
    pub fn agent(&self) -> AgentClient {
        self.now().agent.clone()
    }

    /// The IntentStream client of the replica in use.
    pub fn intent(&self) -> IntentClient {
        self.now().intent.clone()
    }

    /// How many replicas the node knows.
    pub fn replicas(&self) -> usize {
        self.targets.len()
    }

    /// The address in use.
    pub fn address(&self) -> &str {
        &self.now().addr
    }

    /// After a call failed with `st`: when it says the replica does not
    /// serve (a standby, or out of reach), moves to the leader it named if
    /// that is one of ours, else to the next address. True when it moved.
    pub fn failed(&self, st: &Status) -> bool {
        if self.targets.len() < 2 || !is_unavailable(st) {
            return false;
        }
        let was = self.current.load(Ordering::Relaxed) % self.targets.len();
        let named = st
            .metadata()
            .get(tabby_proto::LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| self.targets.iter().position(|t| same_address(&t.addr, l)));
        let next = named.unwrap_or((was + 1) % self.targets.len());
        if next == was {
            return false;
        }
        // Only the first of several concurrent failures moves it.
        let moved = self
            .current
            .compare_exchange(was, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if moved {
            tracing::info!(from = %self.targets[was].addr, to = %self.targets[next].addr, reason = %st.message(), "trying another controller");
        }
        moved
    }

    /// Runs `call` against the replica in use, and on UNAVAILABLE against
    /// the others in turn (each at most once). Safe for the node's calls:
    /// Assign and ReleaseHandle are idempotent per handle, and a standby
    /// refuses before doing anything.
    async fn each<T, F, Fut>(&self, call: F) -> std::result::Result<T, Status>
    where
        F: Fn(AgentClient) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        let mut last = None;
        for _ in 0..self.targets.len() {
            match call(self.agent()).await {
                Err(e) if self.failed(&e) => last = Some(e),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable("no controller address")))
    }
}

/// True when two `--controller`-style addresses name the same place (the
/// leader advertises `host:port`; ours may carry a scheme).
fn same_address(ours: &str, leader: &str) -> bool {
    let strip = |s: &str| {
        s.split_once("://")
            .map_or(s, |(_, r)| r)
            .trim_end_matches('/')
            .to_string()
    };
    strip(ours) == strip(leader)
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
    /// `NodeAgent.ListHandles`: the handles this node holds, each with its
    /// container id (empty when unknown).
    async fn list_handles(&self) -> std::result::Result<Vec<pb::HandleEntry>, Status>;
}

#[tonic::async_trait]
impl Ipam for Controller {
    async fn assign(
        &self,
        req: pb::AssignRequest,
    ) -> std::result::Result<Vec<pb::Allocation>, Status> {
        let r = self
            .each(|mut a| {
                let req = req.clone();
                async move { a.assign(req).await }
            })
            .await?;
        Ok(r.into_inner().allocations)
    }

    async fn release_handle(&self, handle: &str) -> std::result::Result<Vec<String>, Status> {
        let req = pb::ReleaseHandleRequest {
            handle: handle.to_string(),
        };
        let r = self
            .each(|mut a| {
                let req = req.clone();
                async move { a.release_handle(req).await }
            })
            .await?;
        Ok(r.into_inner().released)
    }

    async fn list_handles(&self) -> std::result::Result<Vec<pb::HandleEntry>, Status> {
        let r = self
            .each(|mut a| async move { a.list_handles(pb::ListHandlesRequest {}).await })
            .await?
            .into_inner();
        // A controller from before `entries` sends the names only.
        if r.entries.is_empty() {
            return Ok(r
                .handles
                .into_iter()
                .map(|handle| pb::HandleEntry {
                    handle,
                    container_id: String::new(),
                })
                .collect());
        }
        Ok(r.entries)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(leader: &str) -> Status {
        let mut st = Status::unavailable("this controller is a standby");
        st.metadata_mut()
            .insert(tabby_proto::LEADER_HEADER, leader.parse().unwrap());
        st
    }

    #[test]
    fn a_controller_list_is_split_on_commas_and_an_empty_one_is_refused() {
        assert_eq!(
            controller_addresses(" a:1, b:2 ,,c:3").unwrap(),
            ["a:1", "b:2", "c:3"]
        );
        assert!(controller_addresses(" , ").is_err());
        assert!(same_address("http://10.0.0.1:50051", "10.0.0.1:50051"));
        assert!(!same_address("10.0.0.1:50051", "10.0.0.1:50052"));
    }

    /// A standby naming the leader sends the node there; one naming none
    /// (or an unreachable replica) to the next address; a refusal of
    /// another kind (the leader said no) moves nothing.
    #[tokio::test]
    async fn the_node_follows_the_leader_a_standby_names() {
        let c = Controller::new(
            "10.0.0.1:1,10.0.0.2:1,10.0.0.3:1",
            "n1",
            &Transport::Plaintext,
        )
        .unwrap();
        assert_eq!(c.address(), "10.0.0.1:1");
        assert!(c.failed(&standby("10.0.0.3:1")));
        assert_eq!(c.address(), "10.0.0.3:1");
        assert!(c.failed(&Status::unavailable("tcp connect error")));
        assert_eq!(c.address(), "10.0.0.1:1", "round the list");
        assert!(c.failed(&standby("10.9.9.9:1")), "an unknown leader: next");
        assert_eq!(c.address(), "10.0.0.2:1");
        assert!(!c.failed(&Status::permission_denied("no")));
        assert!(!c.failed(&standby("10.0.0.2:1")), "already there");
        assert_eq!(c.address(), "10.0.0.2:1");
        // Clones share the choice.
        let d = c.clone();
        d.failed(&standby("10.0.0.1:1"));
        assert_eq!(c.address(), "10.0.0.1:1");
        // One address: nothing to move to.
        let one = Controller::new("10.0.0.1:1", "n1", &Transport::Plaintext).unwrap();
        assert!(!one.failed(&Status::unavailable("down")));
    }
}
