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

/// The permanent neighbour and FDB entries tabby keeps on `vxlan.tabby`:
/// the two halves of each remote [`tabby_routing::VtepEntry`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VtepTables {
    /// Neighbour entries: remote tunnel address -> remote VTEP MAC.
    pub neigh: Vec<(std::net::IpAddr, tabby_routing::Mac)>,
    /// FDB entries: remote VTEP MAC -> remote underlay address.
    pub fdb: Vec<(tabby_routing::Mac, std::net::IpAddr)>,
}

/// Tunnel devices and their neighbour and FDB entries, as the reconciler
/// drives them ([`crate::netlink::NetlinkOverlay`] in production). Every
/// method blocks.
pub trait OverlayTable: Send {
    /// Makes the VXLAN device of `dev` (`vxlan.tabby` over an IPv4 local
    /// address, `vxlan-v6.tabby` over IPv6) match it with `mtu`: created when missing,
    /// recreated when its VNI, port or local address differ (the kernel
    /// cannot change those in place); MAC, MTU, learning off, the tunnel
    /// address as a host prefix, and up are set in place.
    fn ensure_vxlan(&mut self, dev: &tabby_routing::VxlanDevice, mtu: u32) -> crate::Result<()>;
    /// Removes the VXLAN device of `t`; absent is fine.
    fn remove_vxlan(&mut self, t: tabby_routing::Tunnel) -> crate::Result<()>;
    /// Makes `tunl0` (IP-in-IP) exist and up with `mtu`. Fails with a
    /// message that says "the kernel has no ipip support" when it has none.
    fn ensure_ipip(&mut self, local: std::net::IpAddr, mtu: u32) -> crate::Result<()>;
    /// The MTU of the interface that holds `addr` (the tunnel's uplink).
    fn uplink_mtu(&mut self, addr: std::net::IpAddr) -> crate::Result<u32>;
    /// The permanent entries on the VXLAN device of `t` (none when it does
    /// not exist).
    fn list_vteps(&mut self, t: tabby_routing::Tunnel) -> crate::Result<VtepTables>;
    /// Adds or replaces neighbour entries; one result per entry, in order.
    fn add_neigh(
        &mut self,
        t: tabby_routing::Tunnel,
        entries: &[(std::net::IpAddr, tabby_routing::Mac)],
    ) -> Vec<crate::Result<()>>;
    /// Removes neighbour entries; one result per entry, in order.
    fn del_neigh(
        &mut self,
        t: tabby_routing::Tunnel,
        entries: &[(std::net::IpAddr, tabby_routing::Mac)],
    ) -> Vec<crate::Result<()>>;
    /// Adds or replaces FDB entries; one result per entry, in order.
    fn add_fdb(
        &mut self,
        t: tabby_routing::Tunnel,
        entries: &[(tabby_routing::Mac, std::net::IpAddr)],
    ) -> Vec<crate::Result<()>>;
    /// Removes FDB entries; one result per entry, in order.
    fn del_fdb(
        &mut self,
        t: tabby_routing::Tunnel,
        entries: &[(tabby_routing::Mac, std::net::IpAddr)],
    ) -> Vec<crate::Result<()>>;
}
