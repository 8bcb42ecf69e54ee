//! `tabby.v1.PodNetwork` on the node's Unix socket: what the CNI plugin calls.
//! Addresses come from the controller (this node never allocates), through
//! [`Ipam`]; the veth work happens through [`PodWiring`] (the kernel's is
//! [`NodePods`]) on blocking threads. Errors become `tonic::Status` through
//! the one mapping in [`crate::error`].
use crate::{
    controller::{is_unavailable, Controller, Ipam},
    daemon::{lock_status, SharedStatus},
    kernel::PodWiring,
    netlink::{self, PodSpec},
    reaper::NodePods,
    Error,
};
use ipnet::IpNet;
use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use tabby_proto::{limits, v1 as pb};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The PodNetwork service.
#[derive(Clone)]
pub struct PodNetworkService {
    ipam: Arc<dyn Ipam>,
    pods: Arc<dyn PodWiring>,
    status: SharedStatus,
    default_mtu: u32,
    locks: HandleLocks,
}

/// One async lock per IPAM handle: ADD, DEL and CHECK of one attachment run
/// one at a time, so a retried ADD racing the first cannot roll back (and
/// release) the address the first one is wiring.
#[derive(Clone, Default)]
struct HandleLocks(Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>);

struct HandleGuard {
    locks: HandleLocks,
    handle: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl HandleLocks {
    async fn lock(&self, handle: &str) -> HandleGuard {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(handle.to_string()).or_default().clone()
        };
        HandleGuard {
            locks: self.clone(),
            handle: handle.to_string(),
            guard: Some(m.lock_owned().await),
        }
    }
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map holds it: nobody waits, forget the entry.
        if map
            .get(&self.handle)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.handle);
        }
    }
}

/// Whether `path` is a network namespace file as this process sees it. A
/// netns bind mount made in another mount namespace (e.g. by a runtime
/// started under `ip netns exec`, or on a host whose `/run/netns` is not
/// propagated into tabby-node's container) is a plain empty file here.
fn is_netns_file(path: &Path) -> bool {
    use nix::sys::statfs::{statfs, NSFS_MAGIC};
    statfs(path).is_ok_and(|st| st.filesystem_type() == NSFS_MAGIC)
}

fn check_netns(path: &str) -> Result<(), Status> {
    if path.is_empty() || !Path::new(path).exists() {
        return Err(invalid(format!("netns {path:?} does not exist")));
    }
    if !is_netns_file(Path::new(path)) {
        return Err(invalid(format!(
            "netns {path:?} is not a network namespace as tabby-node sees it: a bind mount \
             made in another mount namespace is not visible here (share /run/netns with \
             tabby-node, e.g. mount propagation HostToContainer)"
        )));
    }
    Ok(())
}

impl PodNetworkService {
    /// A service using `ctl` for IPAM and this node's kernel for the pods;
    /// `default_mtu` when the plugin sends 0. Starts the veth reaper (one
    /// that cannot be started is logged, and tried again by the first DEL).
    pub fn new(ctl: Controller, status: SharedStatus, default_mtu: u32) -> Self {
        Self::with_parts(
            Arc::new(ctl),
            Arc::new(NodePods::start_or_log()),
            status,
            default_mtu,
        )
    }

    /// A service on the given IPAM and pod wiring (fakes in tests).
    pub fn with_parts(
        ipam: Arc<dyn Ipam>,
        pods: Arc<dyn PodWiring>,
        status: SharedStatus,
        default_mtu: u32,
    ) -> Self {
        PodNetworkService {
            ipam,
            pods,
            status,
            default_mtu,
            locks: HandleLocks::default(),
        }
    }
}

/// What [`PodNetworkService::reclaim`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// Attachments the controller holds as this node holds them (known, or
    /// assigned again).
    pub confirmed: usize,
    /// Attachments it could not confirm, with why.
    pub problems: Vec<String>,
    /// Some failed only because the controller could not be reached: worth
    /// another pass.
    pub retry: bool,
}

impl PodNetworkService {
    /// Tells the controller again about every attachment this node holds:
    /// Assign under its handle with its addresses requested. A handle the
    /// controller knows is answered unchanged (no write); one it forgot (its
    /// data directory restored from an older copy) gets its addresses back,
    /// so they are not handed to another pod. Each attachment is read from
    /// the kernel under its handle's lock, which ADD, DEL and GC also take,
    /// so it is never half-wired or half-deleted when read. Run after every
    /// intent snapshot.
    pub async fn reclaim(&self) -> Reclaimed {
        let mut out = Reclaimed::default();
        let pods = self.pods.clone();
        let owners = match blocking(move || pods.attachment_owners()).await {
            Ok(o) => o,
            Err(e) => {
                out.problems.push(format!("listing attachments: {e}"));
                return out;
            }
        };
        for owner in owners {
            let _lock = self.locks.lock(&owner).await;
            let (pods, o) = (self.pods.clone(), owner.clone());
            let att = match blocking(move || pods.held_attachment(&o)).await {
                Ok(Some(a)) => a,
                Ok(None) => continue, // deleted meanwhile
                Err(e) => {
                    out.problems.push(format!("{owner}: {e}"));
                    continue;
                }
            };
            let mut held: Vec<String> = att.addresses.iter().map(ToString::to_string).collect();
            held.sort();
            if held.is_empty() {
                // Asking with nothing requested would assign a new address.
                out.problems.push(format!(
                    "{owner}: no host route through {}",
                    att.host_ifname
                ));
                continue;
            }
            let mut attributes = HashMap::new();
            // Handles are "<network>.<container id>"; container ids have no dots.
            if let Some((_, id)) = owner.rsplit_once('.') {
                attributes.insert("container_id".to_string(), id.to_string());
            }
            attributes.insert("reclaimed_from".to_string(), att.host_ifname.clone());
            let res = self
                .ipam
                .assign(pb::AssignRequest {
                    handle: owner.clone(),
                    attributes,
                    num_v4: 0,
                    num_v6: 0,
                    requested: held.clone(),
                })
                .await;
            match res {
                Ok(allocations) => {
                    let mut got: Vec<String> = allocations.into_iter().map(|a| a.address).collect();
                    got.sort();
                    if got == held {
                        out.confirmed += 1;
                    } else {
                        out.problems.push(format!(
                            "{owner}: the controller holds {got:?} for it, {} routes {held:?}",
                            att.host_ifname
                        ));
                    }
                }
                Err(e) => {
                    out.retry |= is_unavailable(&e);
                    out.problems.push(format!(
                        "{owner} ({held:?} on {}): {}",
                        att.host_ifname,
                        e.message()
                    ));
                }
            }
        }
        out
    }

    /// Runs [`PodNetworkService::reclaim`] after every snapshot `snapshots`
    /// announces, and again with backoff (1 s doubling to 30 s) while the
    /// controller was out of reach, unless a new snapshot asks first.
    pub async fn reclaim_after_snapshots(self, snapshots: Arc<tokio::sync::Notify>) {
        loop {
            snapshots.notified().await;
            // Jittered: nodes cut off from the controller together do not
            // come back to it in step.
            let mut backoff = tabby_runtime::Backoff::exponential(
                Duration::from_secs(1),
                Duration::from_secs(30),
            )
            .with_jitter(0.25);
            loop {
                let r = self.reclaim().await;
                for p in &r.problems {
                    tracing::error!(problem = %p, "attachment not confirmed by the controller");
                }
                let (confirmed, problems) = (r.confirmed, r.problems.len());
                if problems == 0 {
                    tracing::info!(confirmed, problems, "attachments reclaimed");
                } else {
                    tracing::warn!(
                        confirmed,
                        problems,
                        retry = r.retry,
                        "attachments reclaimed"
                    );
                }
                if !r.retry {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = snapshots.notified() => {}
                }
            }
        }
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// Checks the identity fields and returns (handle, host veth name).
fn identify(
    att: &Option<pb::PodAttachment>,
    ns: &str,
    pod: &str,
) -> Result<(pb::PodAttachment, String, String), Status> {
    let a = att
        .clone()
        .ok_or_else(|| invalid("attachment is required"))?;
    let id_ok = !a.container_id.is_empty()
        && a.container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !id_ok {
        return Err(invalid(format!(
            "container id {:?} is invalid: want 1..{} of [A-Za-z0-9_.-]",
            a.container_id,
            limits::MAX_CONTAINER_ID_LEN
        )));
    }
    let if_ok = !a.ifname.is_empty()
        && a.ifname.len() <= 15
        && a.ifname != "."
        && a.ifname != ".."
        && !a
            .ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if !if_ok {
        // Control characters (a NUL) would only fail in the kernel, after
        // an address was assigned.
        return Err(invalid(format!(
            "interface name {:?} is invalid (1..15 characters, no '/', ':', spaces or control characters)",
            a.ifname
        )));
    }
    if a.network.is_empty() {
        return Err(invalid("network name is required"));
    }
    // Checked before anything is assigned: a longer handle could never be
    // written into the host veth's alias.
    limits::check_attachment(&a.network, &a.container_id).map_err(|e| invalid(e.to_string()))?;
    let handle = format!("{}.{}", a.network, a.container_id);
    let key = if !ns.is_empty() && !pod.is_empty() {
        format!("{ns}.{pod}")
    } else {
        a.container_id.clone()
    };
    Ok((a, handle, netlink::host_veth_name(&key)))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> crate::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(join_error(e)))
}

/// The handles a GC of `network` releases: those of that network that no
/// `valid` attachment names. A handle is `<network>.<container id>` and both
/// may contain dots, so a handle that records its container id belongs to
/// `network` only when it is exactly that network's handle for it (GC of
/// `k8s` leaves network `k8s.v2`'s `k8s.v2.<id>` alone); one that does not
/// is taken by its prefix, as before container ids were listed.
fn gc_candidates(
    network: &str,
    valid: &[pb::PodAttachment],
    held: Vec<pb::HandleEntry>,
) -> Vec<String> {
    let prefix = format!("{network}.");
    let valid: BTreeSet<String> = valid
        .iter()
        .map(|a| format!("{prefix}{}", a.container_id))
        .collect();
    held.into_iter()
        .filter(|e| {
            let ours = match e.container_id.as_str() {
                "" => e.handle.starts_with(&prefix),
                cid => e
                    .handle
                    .strip_prefix(&prefix)
                    .is_some_and(|rest| rest == cid),
            };
            ours && !valid.contains(&e.handle)
        })
        .map(|e| e.handle)
        .collect()
}

/// A blocking task that did not return: it panicked, or the runtime shut
/// down before it ran.
fn join_error(e: tokio::task::JoinError) -> Error {
    if e.is_panic() {
        Error::Panicked {
            name: "blocking task".into(),
            message: netlink::panic_message(e.into_panic().as_ref()),
        }
    } else {
        Error::Io("blocking task".into(), std::io::Error::other(e))
    }
}

fn host_len(a: &str) -> Result<IpNet, Status> {
    let ip: std::net::IpAddr = a
        .parse()
        .map_err(|_| Status::internal(format!("controller sent bad address {a:?}")))?;
    Ok(IpNet::from(ip))
}

/// An ADD that passed validation.
struct AddRequest {
    att: pb::PodAttachment,
    handle: String,
    host_if: String,
    netns: String,
    pod_namespace: String,
    pod_name: String,
    requested: Vec<String>,
    mtu: u32,
}

impl PodNetworkService {
    /// ADD under the handle's lock: refuses a duplicate, settles retired
    /// pairs of the namespace, assigns, wires, and rolls back on failure.
    async fn add_locked(&self, a: AddRequest) -> Result<Response<pb::PodAddResponse>, Status> {
        let AddRequest {
            att,
            handle,
            host_if,
            netns,
            ..
        } = &a;
        let _lock = self.locks.lock(handle).await;
        // The handle is the attachment's identity: a veth it owns means this
        // is a duplicate ADD, which must neither wire a second interface nor
        // (on failure) release the first one's address.
        let (pods, h, name) = (self.pods.clone(), handle.clone(), host_if.clone());
        let owned = blocking(move || Ok((pods.owned_links(&h)?, pods.link_exists(&name)))).await?;
        if !owned.0.is_empty() || owned.1 {
            return Err(Status::already_exists(format!(
                "container {} already has {} in network {} (host interface {}); DEL it first",
                att.container_id,
                att.ifname,
                att.network,
                owned.0.first().unwrap_or(host_if)
            )));
        }
        // A pair retired by a DEL into this same namespace must be gone first.
        if self.pods.retired_pending() > 0 {
            let (pods, ns) = (self.pods.clone(), PathBuf::from(netns));
            blocking(move || {
                pods.settle(&ns);
                Ok(())
            })
            .await?;
        }
        let mut attrs = std::collections::HashMap::new();
        attrs.insert("container_id".to_string(), att.container_id.clone());
        attrs.insert("ifname".to_string(), att.ifname.clone());
        if !a.pod_namespace.is_empty() {
            attrs.insert("namespace".to_string(), a.pod_namespace.clone());
        }
        if !a.pod_name.is_empty() {
            attrs.insert("pod".to_string(), a.pod_name.clone());
        }
        let allocations = self
            .ipam
            .assign(pb::AssignRequest {
                handle: handle.clone(),
                attributes: attrs,
                num_v4: 0,
                num_v6: 0,
                requested: a.requested.clone(),
            })
            .await
            .map_err(|e| Error::controller("Assign", e))?;
        let addresses = allocations
            .iter()
            .map(|a| host_len(&a.address))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = PodSpec {
            netns_path: PathBuf::from(netns),
            host_ifname: host_if.clone(),
            pod_ifname: att.ifname.clone(),
            addresses: addresses.clone(),
            mtu: a.mtu,
            owner: handle.clone(),
        };
        let pods = self.pods.clone();
        match blocking(move || pods.wire(&spec)).await {
            Ok(w) => {
                tracing::info!(addresses = ?addresses, host_if = %w.host_ifname, "pod wired");
                let gateways = addresses
                    .iter()
                    .map(|a| match a {
                        IpNet::V4(_) => crate::POD_GATEWAY_V4.to_string(),
                        IpNet::V6(_) => crate::POD_GATEWAY_V6.to_string(),
                    })
                    .collect();
                Ok(Response::new(pb::PodAddResponse {
                    host_ifname: w.host_ifname,
                    host_mac: "ee:ee:ee:ee:ee:ee".into(),
                    pod_ifname: w.pod_ifname,
                    pod_mac: w.pod_mac,
                    addresses: addresses.iter().map(ToString::to_string).collect(),
                    gateways,
                    mtu: a.mtu,
                }))
            }
            Err(e) => {
                let e = self.roll_back(handle, netns, e).await;
                tracing::error!("{e}");
                Err(e.into())
            }
        }
    }

    /// Undoes a failed ADD: retires what is left of the wiring and releases
    /// the handle's address. Returns the error to answer with: the wiring
    /// failure, with every cleanup failure chained to it.
    async fn roll_back(&self, handle: &str, netns: &str, wiring: Error) -> Error {
        // Wiring removes what it made; should its own cleanup have failed,
        // retire what is left, so that no veth naming this handle outlives
        // its address (reclaim would assign it again).
        let (pods, owner, ns) = (self.pods.clone(), handle.to_string(), PathBuf::from(netns));
        let wiring = match blocking(move || pods.retire(&owner, Some(&ns))).await {
            Ok(_) => wiring,
            Err(re) => Error::cleanup(wiring, re),
        };
        match self.ipam.release_handle(handle).await {
            Ok(_) => Error::Wiring {
                source: Box::new(wiring),
                released: true,
            },
            Err(re) => Error::cleanup(
                Error::Wiring {
                    source: Box::new(wiring),
                    released: false,
                },
                Error::controller(format!("releasing {handle}"), re),
            ),
        }
    }
}

#[tonic::async_trait]
impl pb::pod_network_server::PodNetwork for PodNetworkService {
    async fn add(
        &self,
        req: Request<pb::PodAddRequest>,
    ) -> Result<Response<pb::PodAddResponse>, Status> {
        let r = req.into_inner();
        let (att, handle, host_if) = identify(&r.attachment, &r.pod_namespace, &r.pod_name)?;
        check_netns(&r.netns)?;
        let requested = if r.requested_address.is_empty() {
            Vec::new()
        } else {
            let a: std::net::IpAddr = r.requested_address.parse().map_err(|_| {
                invalid(format!(
                    "requested address {:?} is not an IP address",
                    r.requested_address
                ))
            })?;
            vec![a.to_string()]
        };
        let mtu = if r.mtu == 0 { self.default_mtu } else { r.mtu };
        limits::check_mtu(mtu).map_err(invalid)?;
        // Under an overlay, a pod's packets must fit the tunnel.
        let mtu = match lock_status(&self.status).tunnel_mtu {
            Some(t) => mtu.min(t),
            None => mtu,
        };
        let span = tracing::info_span!("add", container = %att.container_id, pod = %format!("{}/{}", r.pod_namespace, r.pod_name));
        self.add_locked(AddRequest {
            att,
            handle,
            host_if,
            netns: r.netns,
            pod_namespace: r.pod_namespace,
            pod_name: r.pod_name,
            requested,
            mtu,
        })
        .instrument(span)
        .await
    }

    async fn del(
        &self,
        req: Request<pb::PodDelRequest>,
    ) -> Result<Response<pb::PodDelResponse>, Status> {
        let r = req.into_inner();
        // Kubelet retries a failed DEL until it succeeds. An attachment that
        // ADD would have refused (the same checks) cannot exist: nothing to do.
        let (att, handle, host_if) = match identify(&r.attachment, &r.pod_namespace, &r.pod_name) {
            Ok(id) => id,
            Err(refused) => {
                tracing::warn!(reason = %refused.message(), "DEL of an attachment no ADD could have made: nothing to delete");
                return Ok(Response::new(pb::PodDelResponse::default()));
            }
        };
        let _lock = self.locks.lock(&handle).await;
        let netns = (!r.netns.is_empty()).then(|| PathBuf::from(&r.netns));
        // Out of service now (down, /32 gone, name free); deleted in the background.
        let (pods, owner) = (self.pods.clone(), handle.clone());
        blocking(move || pods.retire(&owner, netns.as_deref())).await?;
        let released = match self.ipam.release_handle(&handle).await {
            Ok(r) => r,
            // The controller refuses this handle as malformed, so it refused
            // the Assign of an ADD for it too: nothing was ever assigned.
            Err(e) if e.code() == tonic::Code::InvalidArgument => {
                tracing::warn!(handle = %handle, reason = %e.message(), "DEL of a handle the controller refuses: nothing was assigned to it");
                Vec::new()
            }
            Err(e) => return Err(Error::controller("ReleaseHandle", e).into()),
        };
        tracing::info!(container = %att.container_id, released = ?released, host_if = %host_if, "pod deleted");
        Ok(Response::new(pb::PodDelResponse { released }))
    }

    async fn check(
        &self,
        req: Request<pb::PodCheckRequest>,
    ) -> Result<Response<pb::PodCheckResponse>, Status> {
        let r = req.into_inner();
        let (att, handle, host_if) = identify(&r.attachment, &r.pod_namespace, &r.pod_name)?;
        // The same answer as ADD gives for the same netns.
        check_netns(&r.netns)?;
        let _lock = self.locks.lock(&handle).await;
        if r.expected_addresses.is_empty() {
            return Err(invalid("CHECK needs the expected addresses (prevResult)"));
        }
        let addresses = r
            .expected_addresses
            .iter()
            .map(|a| {
                a.parse::<IpNet>()
                    .map_err(|_| invalid(format!("expected address {a:?} is not a CIDR")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = PodSpec {
            netns_path: PathBuf::from(&r.netns),
            host_ifname: host_if,
            pod_ifname: att.ifname.clone(),
            addresses,
            mtu: 0,
            owner: handle.clone(),
        };
        let pods = self.pods.clone();
        blocking(move || pods.check(&spec)).await?;
        Ok(Response::new(pb::PodCheckResponse {}))
    }

    async fn status(
        &self,
        _: Request<pb::PodStatusRequest>,
    ) -> Result<Response<pb::PodStatusResponse>, Status> {
        let st = lock_status(&self.status).clone();
        let reason = if !st.registered {
            "not registered with the controller yet".to_string()
        } else if !st.watching
            && st
                .controller_seen
                .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            "controller unreachable".to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::PodStatusResponse {
            ready: reason.is_empty(),
            reason,
            unsupported: st.unsupported,
            revision: st.revision,
            routes: st.routes as u64,
            last_error: st.last_error.unwrap_or_default(),
            bgp_sessions: st.bgp.iter().map(|(a, s)| s.to_pb(*a)).collect(),
        }))
    }

    async fn gc(
        &self,
        req: Request<pb::PodGcRequest>,
    ) -> Result<Response<pb::PodGcResponse>, Status> {
        let r = req.into_inner();
        if r.network.is_empty() {
            return Err(invalid("network name is required"));
        }
        let handles = self
            .ipam
            .list_handles()
            .await
            .map_err(|e| Error::controller("ListHandles", e))?;
        let mut released = Vec::new();
        for h in gc_candidates(&r.network, &r.valid, handles) {
            // Under the handle's lock, like ADD, DEL and reclaim: a reclaim
            // between the retire and the release would assign it again.
            let _lock = self.locks.lock(&h).await;
            // The interface is normally gone with its netns; retire it if not.
            let (pods, owner) = (self.pods.clone(), h.clone());
            blocking(move || pods.retire(&owner, None)).await?;
            self.ipam
                .release_handle(&h)
                .await
                .map_err(|e| Error::controller("ReleaseHandle", e))?;
            released.push(h);
        }
        tracing::info!(released = ?released, "gc");
        Ok(Response::new(pb::PodGcResponse {
            released_handles: released,
        }))
    }
}
