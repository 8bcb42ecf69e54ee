//! What the reconciler needs from the kernel, as plain data and a trait, so
//! the planner and executor can be tested against a fake kernel.

pub use tabby_routing::{Route, RouteTarget};

/// Route operations on one network namespace.
pub trait RouteTable {
    /// Every route of protocol [`crate::ROUTE_PROTOCOL`] in the main table (both families).
    fn list(&mut self) -> crate::Result<Vec<Route>>;
    /// Like [`RouteTable::list`], the IPv6 routes only when `v6`: a node
    /// without IPv6 pools does not dump the IPv6 table on every pass.
    fn list_families(&mut self, v6: bool) -> crate::Result<Vec<Route>> {
        let mut all = self.list()?;
        all.retain(|r| v6 || r.dst.addr().is_ipv4());
        Ok(all)
    }
    /// Installs routes; returns one result per route, in order.
    fn add(&mut self, routes: &[Route]) -> Vec<crate::Result<()>>;
    /// Removes routes; returns one result per route, in order.
    fn del(&mut self, routes: &[Route]) -> Vec<crate::Result<()>>;
}

/// The `ip tabby` / `ip6 tabby` tables, as the reconciler drives them
/// ([`crate::nft::Nft`] in production).
pub trait NatTables: Send {
    /// Makes `<family> tabby` hold these sets, in one transaction.
    fn sync(&self, family: &str, sets: &crate::nft::NatSets) -> crate::Result<()>;
    /// The table as `nft list table <family> tabby` prints it.
    fn list(&self, family: &str) -> crate::Result<String>;
}

/// Pod interfaces in the node's network namespace, as the CNI server drives
/// them (ADD, DEL, CHECK, GC and reclaim), so that its locking and rollback
/// can be tested against a fake. The real one is
/// [`crate::reaper::NodePods`]: [`crate::netlink`] plus deferred deletion.
///
/// Every method blocks: call them on a blocking thread.
pub trait PodWiring: Send + Sync {
    /// Host veths in service whose owner is `owner` (an IPAM handle).
    fn owned_links(&self, owner: &str) -> crate::Result<Vec<String>>;
    /// Whether an interface of that name exists.
    fn link_exists(&self, name: &str) -> bool;
    /// Wires a pod. On failure it removes what it made, and reports
    /// [`crate::Error::Cleanup`] if that failed too.
    fn wire(&self, spec: &crate::netlink::PodSpec) -> crate::Result<crate::netlink::WiredPod>;
    /// CNI CHECK of a wired pod.
    fn check(&self, spec: &crate::netlink::PodSpec) -> crate::Result<()>;
    /// Takes the veths `owner` holds out of service now (their names free,
    /// their routes gone) and deletes them later; `netns` is the pod's
    /// namespace, if known. Returns how many there were (none is fine).
    fn retire(&self, owner: &str, netns: Option<&std::path::Path>) -> crate::Result<usize>;
    /// Retired veths not deleted yet.
    fn retired_pending(&self) -> usize;
    /// Makes sure no retired veth of namespace `netns` is left (failures
    /// to delete one are logged: wiring reports what is in its way).
    fn settle(&self, netns: &std::path::Path);
    /// Handles of every attachment in service.
    fn attachment_owners(&self) -> crate::Result<Vec<String>>;
    /// The attachment `owner` holds in service, if any.
    fn held_attachment(&self, owner: &str)
        -> crate::Result<Option<crate::netlink::HeldAttachment>>;
}
