//! `tabby.v1.PodNetwork` on the node's Unix socket: what the CNI plugin calls.
//! Addresses come from the controller (this node never allocates); the veth
//! work happens in [`crate::netlink`] on blocking threads.
use crate::{
    controller::{is_unavailable, Controller},
    daemon::{lock_status, SharedStatus},
    netlink::{self, PodSpec},
    reaper::Reaper,
    Error,
};
use ipnet::IpNet;
use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use tabby_proto::v1 as pb;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tonic::{Request, Response, Status};

/// The PodNetwork service.
#[derive(Clone)]
pub struct PodNetworkService {
    ctl: Controller,
    status: SharedStatus,
    default_mtu: u32,
    locks: HandleLocks,
    reaper: Reaper,
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
    use std::os::unix::ffi::OsStrExt;
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a struct we own for the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == NSFS_MAGIC
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
    /// A service using `ctl` for IPAM; `default_mtu` when the plugin sends 0.
    pub fn new(ctl: Controller, status: SharedStatus, default_mtu: u32) -> Self {
        PodNetworkService {
            ctl,
            status,
            default_mtu,
            locks: HandleLocks::default(),
            reaper: Reaper::start(),
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
        let owners = match blocking(netlink::attachment_owners).await {
            Ok(o) => o,
            Err(e) => {
                out.problems.push(format!("listing attachments: {e}"));
                return out;
            }
        };
        let mut agent = self.ctl.agent.clone();
        for owner in owners {
            let _lock = self.locks.lock(&owner).await;
            let o = owner.clone();
            let att = match blocking(move || netlink::held_attachment(&o)).await {
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
            let res = agent
                .assign(pb::AssignRequest {
                    handle: owner.clone(),
                    attributes,
                    num_v4: 0,
                    num_v6: 0,
                    requested: held.clone(),
                })
                .await;
            match res {
                Ok(r) => {
                    let mut got: Vec<String> = r
                        .into_inner()
                        .allocations
                        .into_iter()
                        .map(|a| a.address)
                        .collect();
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
            let mut delay = Duration::from_secs(1);
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
                    _ = tokio::time::sleep(delay) => {}
                    _ = snapshots.notified() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
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
        && a.container_id.len() <= 256
        && a.container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !id_ok {
        return Err(invalid(format!(
            "container id {:?} is invalid: want 1..256 of [A-Za-z0-9_.-]",
            a.container_id
        )));
    }
    let if_ok = !a.ifname.is_empty()
        && a.ifname.len() <= 15
        && a.ifname != "."
        && a.ifname != ".."
        && !a
            .ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if !if_ok {
        return Err(invalid(format!(
            "interface name {:?} is invalid (1..15 characters, no '/', ':' or spaces)",
            a.ifname
        )));
    }
    if a.network.is_empty() {
        return Err(invalid("network name is required"));
    }
    let handle = format!("{}.{}", a.network, a.container_id);
    let key = if !ns.is_empty() && !pod.is_empty() {
        format!("{ns}.{pod}")
    } else {
        a.container_id.clone()
    };
    Ok((a, handle, netlink::host_veth_name(&key)))
}

fn ctl_status(what: &str, e: Status) -> Status {
    if is_unavailable(&e) {
        Status::unavailable(format!(
            "controller unavailable during {what}: {}",
            e.message()
        ))
    } else {
        Status::new(
            e.code(),
            format!("controller refused {what}: {}", e.message()),
        )
    }
}

fn kernel_status(e: Error) -> Status {
    match e {
        Error::Exists(m) => Status::already_exists(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::Invalid(m) => Status::failed_precondition(m),
        e => Status::internal(e.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> crate::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::Netlink(format!("worker failed: {e}"))))
}

fn host_len(a: &str) -> Result<IpNet, Status> {
    let ip: std::net::IpAddr = a
        .parse()
        .map_err(|_| Status::internal(format!("controller sent bad address {a:?}")))?;
    Ok(IpNet::from(ip))
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
        if !(68..=65535).contains(&mtu) {
            return Err(invalid(format!("MTU {mtu} is out of range (68..65535)")));
        }
        let _lock = self.locks.lock(&handle).await;
        // The handle is the attachment's identity: a veth it owns means this
        // is a duplicate ADD, which must neither wire a second interface nor
        // (on failure) release the first one's address.
        let (h, name) = (handle.clone(), host_if.clone());
        let owned = blocking(move || Ok((netlink::owned_links(&h)?, netlink::link_exists(&name))))
            .await
            .map_err(kernel_status)?;
        if !owned.0.is_empty() || owned.1 {
            return Err(Status::already_exists(format!(
                "container {} already has {} in network {} (host interface {}); DEL it first",
                att.container_id,
                att.ifname,
                att.network,
                owned.0.first().unwrap_or(&host_if)
            )));
        }
        // A pair retired by a DEL into this same namespace must be gone first.
        if self.reaper.pending() > 0 {
            let (r, ns) = (self.reaper.clone(), PathBuf::from(&r.netns));
            blocking(move || {
                r.settle(&ns);
                Ok(())
            })
            .await
            .map_err(kernel_status)?;
        }
        let mut agent = self.ctl.agent.clone();
        let span = tracing::info_span!("add", container = %att.container_id, pod = %format!("{}/{}", r.pod_namespace, r.pod_name));
        let _e = span.enter();
        let mut attrs = std::collections::HashMap::new();
        attrs.insert("container_id".to_string(), att.container_id.clone());
        attrs.insert("ifname".to_string(), att.ifname.clone());
        if !r.pod_namespace.is_empty() {
            attrs.insert("namespace".to_string(), r.pod_namespace.clone());
        }
        if !r.pod_name.is_empty() {
            attrs.insert("pod".to_string(), r.pod_name.clone());
        }
        let assigned = agent
            .assign(pb::AssignRequest {
                handle: handle.clone(),
                attributes: attrs,
                num_v4: 0,
                num_v6: 0,
                requested,
            })
            .await
            .map_err(|e| {
                // "Requested address taken" is a bad request, not an existing
                // attachment (what AlreadyExists means to the plugin).
                if e.code() == tonic::Code::AlreadyExists {
                    invalid(format!("controller refused Assign: {}", e.message()))
                } else {
                    ctl_status("Assign", e)
                }
            })?
            .into_inner();
        let addresses = assigned
            .allocations
            .iter()
            .map(|a| host_len(&a.address))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = PodSpec {
            netns_path: PathBuf::from(&r.netns),
            host_ifname: host_if.clone(),
            pod_ifname: att.ifname.clone(),
            addresses: addresses.clone(),
            mtu,
            owner: handle.clone(),
        };
        match blocking(move || netlink::wire_pod(&spec)).await {
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
                    mtu,
                }))
            }
            Err(e) => {
                // wire_pod removes what it made; should its own cleanup have
                // failed, retire what is left, so that no veth naming this
                // handle outlives its address (reclaim would assign it again).
                let (reaper, owner, ns) = (self.reaper.clone(), handle.clone(), r.netns.clone());
                if let Err(re) = blocking(move || reaper.retire(&owner, Some(Path::new(&ns)))).await
                {
                    tracing::warn!(error = %re, "retiring after a failed wiring");
                }
                // Roll back the assignment; report both errors if that fails too.
                let rb = agent
                    .release_handle(pb::ReleaseHandleRequest {
                        handle: handle.clone(),
                    })
                    .await;
                let msg = match rb {
                    Ok(_) => format!("wiring failed: {e} (address released)"),
                    Err(re) => format!(
                        "wiring failed: {e}; rollback failed too: releasing {handle}: {}",
                        re.message()
                    ),
                };
                tracing::error!("{msg}");
                let mut st = kernel_status(e);
                st = Status::new(st.code(), msg);
                Err(st)
            }
        }
    }

    async fn del(
        &self,
        req: Request<pb::PodDelRequest>,
    ) -> Result<Response<pb::PodDelResponse>, Status> {
        let r = req.into_inner();
        let (att, handle, host_if) = identify(&r.attachment, &r.pod_namespace, &r.pod_name)?;
        let _lock = self.locks.lock(&handle).await;
        let netns = (!r.netns.is_empty()).then(|| PathBuf::from(&r.netns));
        // Out of service now (down, /32 gone, name free); deleted in the background.
        let (reaper, owner) = (self.reaper.clone(), handle.clone());
        blocking(move || reaper.retire(&owner, netns.as_deref()))
            .await
            .map_err(kernel_status)?;
        let mut agent = self.ctl.agent.clone();
        let released = agent
            .release_handle(pb::ReleaseHandleRequest {
                handle: handle.clone(),
            })
            .await
            .map_err(|e| ctl_status("ReleaseHandle", e))?
            .into_inner()
            .released;
        tracing::info!(container = %att.container_id, released = ?released, host_if = %host_if, "pod deleted");
        Ok(Response::new(pb::PodDelResponse { released }))
    }

    async fn check(
        &self,
        req: Request<pb::PodCheckRequest>,
    ) -> Result<Response<pb::PodCheckResponse>, Status> {
        let r = req.into_inner();
        let (att, handle, host_if) = identify(&r.attachment, &r.pod_namespace, &r.pod_name)?;
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
        blocking(move || netlink::check_pod(&spec))
            .await
            .map_err(kernel_status)?;
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
        let valid: BTreeSet<String> = r
            .valid
            .iter()
            .map(|a| format!("{}.{}", r.network, a.container_id))
            .collect();
        let mut agent = self.ctl.agent.clone();
        let handles = agent
            .list_handles(pb::ListHandlesRequest {})
            .await
            .map_err(|e| ctl_status("ListHandles", e))?
            .into_inner()
            .handles;
        let prefix = format!("{}.", r.network);
        let mut released = Vec::new();
        for h in handles
            .into_iter()
            .filter(|h| h.starts_with(&prefix) && !valid.contains(h))
        {
            // Under the handle's lock, like ADD, DEL and reclaim: a reclaim
            // between the retire and the release would assign it again.
            let _lock = self.locks.lock(&h).await;
            // The interface is normally gone with its netns; retire it if not.
            let (reaper, owner) = (self.reaper.clone(), h.clone());
            blocking(move || reaper.retire(&owner, None))
                .await
                .map_err(kernel_status)?;
            agent
                .release_handle(pb::ReleaseHandleRequest { handle: h.clone() })
                .await
                .map_err(|e| ctl_status("ReleaseHandle", e))?;
            released.push(h);
        }
        tracing::info!(released = ?released, "gc");
        Ok(Response::new(pb::PodGcResponse {
            released_handles: released,
        }))
    }
}
