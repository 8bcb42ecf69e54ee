//! The cluster intent: pools, blocks, borrowed addresses and nodes, as the
//! controller streams them, and the route values a node installs.
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

/// How inter-node traffic of a pool is carried. Also the stored form: the
/// store keeps it by variant index, so the order of variants is fixed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Encapsulation {
    /// Plain routes via the node address.
    #[default]
    None,
    /// VXLAN to every node.
    Vxlan,
    /// VXLAN only across subnets.
    VxlanCrossSubnet,
    /// IP-in-IP to every node.
    Ipip,
    /// IP-in-IP only across subnets.
    IpipCrossSubnet,
}

impl Encapsulation {
    /// The proto enum's name (`ENCAPSULATION_VXLAN`), as operators see it.
    pub fn as_str_name(self) -> &'static str {
        match self {
            Encapsulation::None => "ENCAPSULATION_NONE",
            Encapsulation::Vxlan => "ENCAPSULATION_VXLAN",
            Encapsulation::VxlanCrossSubnet => "ENCAPSULATION_VXLAN_CROSS_SUBNET",
            Encapsulation::Ipip => "ENCAPSULATION_IPIP",
            Encapsulation::IpipCrossSubnet => "ENCAPSULATION_IPIP_CROSS_SUBNET",
        }
    }

    /// The inverse of [`Encapsulation::as_str_name`].
    pub fn from_str_name(name: &str) -> Option<Self> {
        [
            Encapsulation::None,
            Encapsulation::Vxlan,
            Encapsulation::VxlanCrossSubnet,
            Encapsulation::Ipip,
            Encapsulation::IpipCrossSubnet,
        ]
        .into_iter()
        .find(|e| e.as_str_name() == name)
    }
}

/// A pool as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolIntent {
    /// Pool CIDR.
    pub cidr: IpNet,
    /// Masquerade egress.
    pub nat_outgoing: bool,
    /// Inter-node transport.
    pub encapsulation: Encapsulation,
}

/// A block and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIntent {
    /// Affine node, if any.
    pub node: Option<String>,
    /// Pool name.
    pub pool: String,
}

/// A MAC address.
pub type Mac = [u8; 6];

/// The VXLAN endpoint of a node: its tunnel address (from IPAM, handle
/// `vxlan-tunnel-addr.<node>`) and its VTEP MAC ([`vtep_mac`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vtep {
    /// The address on the node's `vxlan.tabby`.
    pub tunnel_ip: IpAddr,
    /// The MAC of the node's `vxlan.tabby`.
    pub mac: Mac,
}

/// A node as the data path sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIntent {
    /// Its addresses with the prefix of the interface that holds them
    /// (`172.18.0.4/16`); a host prefix where the node reported no prefix.
    pub addrs: Vec<IpNet>,
    /// Its IPv4 VXLAN endpoint, once it has a tunnel address.
    pub vtep: Option<Vtep>,
    /// Its IPv6 VXLAN endpoint (`vxlan-v6.tabby`), once it has an IPv6
    /// tunnel address.
    pub vtep_v6: Option<Vtep>,
}

impl NodeIntent {
    /// A node with these addresses as host prefixes and no VTEP.
    pub fn plain(addrs: &[IpAddr]) -> NodeIntent {
        NodeIntent {
            addrs: addrs.iter().map(|a| IpNet::from(*a)).collect(),
            vtep: None,
            vtep_v6: None,
        }
    }
}

/// Cluster-wide VXLAN settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VxlanSettings {
    /// VXLAN network identifier (1..=16777215).
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
}

impl Default for VxlanSettings {
    fn default() -> Self {
        VxlanSettings {
            vni: 4096,
            port: 4789,
        }
    }
}

/// The VTEP MAC of a node: derived from its name, so it is the same after
/// every restart and on every node that computes it. Locally administered,
/// unicast (`x2:..`).
pub fn vtep_mac(node: &str) -> Mac {
    // FNV-1a, 64 bits: stable across releases and platforms (unlike std's
    // hasher); then splitmix64's finalizer, since FNV alone leaves names
    // that differ in their last character a byte apart.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let b = h.to_be_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// The MAC of a node's `vxlan-v6.tabby`: derived like [`vtep_mac`] but
/// distinct from it, as Calico keeps the two endpoints' MACs apart.
pub fn vtep_mac_v6(node: &str) -> Mac {
    vtep_mac(&format!("{node}\u{0}v6"))
}

/// A MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// The cluster-wide intent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Intent {
    /// Revision of the last update applied.
    pub revision: u64,
    /// Blocks by CIDR.
    pub blocks: BTreeMap<IpNet, BlockIntent>,
    /// Borrowed addresses and the node holding each.
    pub borrowed: BTreeMap<IpAddr, String>,
    /// Pools by name.
    pub pools: BTreeMap<String, PoolIntent>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, NodeIntent>,
    /// VXLAN settings.
    pub vxlan: VxlanSettings,
}

/// One change to the intent, already parsed: a snapshot replaces everything,
/// a delta upserts and removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntentDelta {
    /// Replace the whole intent with what this delta carries.
    pub snapshot: bool,
    /// Revision the intent is at after this delta.
    pub revision: u64,
    /// Blocks added or changed.
    pub blocks: Vec<(IpNet, BlockIntent)>,
    /// Blocks gone.
    pub removed_blocks: Vec<IpNet>,
    /// Borrowed addresses added or moved, with their holder.
    pub borrowed: Vec<(IpAddr, String)>,
    /// Borrowed addresses gone.
    pub removed_borrowed: Vec<IpAddr>,
    /// The complete pool list, when pools changed (always with a snapshot).
    pub pools: Option<Vec<(String, PoolIntent)>>,
    /// Nodes added or changed.
    pub nodes: Vec<(String, NodeIntent)>,
    /// Nodes gone.
    pub removed_nodes: Vec<String>,
    /// The VXLAN settings, when they changed (always with a snapshot).
    pub vxlan: Option<VxlanSettings>,
}

impl IntentDelta {
    /// The destinations whose route may differ after this delta was applied
    /// to `after` (the intent it produced): its blocks and borrowed
    /// addresses, and every destination of a node whose addresses changed
    /// or which is gone. `None`: everything may differ (a snapshot, or the
    /// pools changed).
    pub fn touched(&self, after: &Intent) -> Option<BTreeSet<IpNet>> {
        let mut t = self.own_destinations()?;
        let nodes: BTreeSet<&str> = self
            .nodes
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.removed_nodes.iter().map(String::as_str))
            .collect();
        if !nodes.is_empty() {
            t.extend(
                after
                    .blocks
                    .iter()
                    .filter(|(_, b)| b.node.as_deref().is_some_and(|n| nodes.contains(n)))
                    .map(|(c, _)| *c),
            );
            t.extend(
                after
                    .borrowed
                    .iter()
                    .filter(|(_, n)| nodes.contains(n.as_str()))
                    .map(|(a, _)| IpNet::from(*a)),
            );
        }
        Some(t)
    }

    /// The blocks and borrowed addresses this delta names; `None` for a
    /// snapshot or a pool change, which touch everything.
    fn own_destinations(&self) -> Option<BTreeSet<IpNet>> {
        if self.snapshot || self.pools.is_some() || self.vxlan.is_some() {
            return None;
        }
        let mut t: BTreeSet<IpNet> = self.blocks.iter().map(|(c, _)| *c).collect();
        t.extend(self.removed_blocks.iter().copied());
        t.extend(self.borrowed.iter().map(|(a, _)| IpNet::from(*a)));
        t.extend(self.removed_borrowed.iter().map(|a| IpNet::from(*a)));
        Some(t)
    }

    /// [`IntentDelta::touched`], with a node's destinations taken from
    /// `index` (kept for `after`) instead of a walk over every block.
    pub fn touched_indexed(&self, index: &NodeIndex) -> Option<BTreeSet<IpNet>> {
        let mut t = self.own_destinations()?;
        let nodes = self.nodes.iter().map(|(n, _)| n).chain(&self.removed_nodes);
        for n in nodes {
            t.extend(index.of_node(n));
        }
        Some(t)
    }
}

/// The destinations each node holds in an [`Intent`] (its blocks and the
/// addresses it borrows): what a change to that node touches. Kept beside
/// the intent by a reader that applies deltas, so that a node's change costs
/// what that node holds, not a walk over every block
/// ([`IntentDelta::touched_indexed`]). Blocks and borrowed addresses are
/// kept apart: a /32 block and an address borrowed from it share a prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIndex(BTreeMap<String, Held>);

/// What one node holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Held {
    blocks: BTreeSet<IpNet>,
    borrowed: BTreeSet<IpAddr>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.borrowed.is_empty()
    }
}

impl NodeIndex {
    /// The index of `intent`.
    pub fn of(intent: &Intent) -> NodeIndex {
        let mut ix = NodeIndex::default();
        for (c, b) in &intent.blocks {
            if let Some(n) = &b.node {
                ix.held(n).blocks.insert(*c);
            }
        }
        for (a, n) in &intent.borrowed {
            ix.held(n).borrowed.insert(*a);
        }
        ix
    }

    fn held(&mut self, node: &str) -> &mut Held {
        if !self.0.contains_key(node) {
            self.0.insert(node.to_string(), Held::default());
        }
        self.0.get_mut(node).expect("inserted")
    }

    fn forget(&mut self, node: &str, f: impl FnOnce(&mut Held)) {
        if let Some(h) = self.0.get_mut(node) {
            f(h);
            if h.is_empty() {
                self.0.remove(node);
            }
        }
    }

    /// Before `d` is applied to `before`: drops the entries `d` replaces.
    pub fn unlink(&mut self, before: &Intent, d: &IntentDelta) {
        if d.snapshot {
            self.0.clear();
            return;
        }
        let blocks = d.blocks.iter().map(|(c, _)| c).chain(&d.removed_blocks);
        for c in blocks {
            if let Some(n) = before.blocks.get(c).and_then(|b| b.node.as_deref()) {
                self.forget(n, |h| {
                    h.blocks.remove(c);
                });
            }
        }
        let borrowed = d.borrowed.iter().map(|(a, _)| a).chain(&d.removed_borrowed);
        for a in borrowed {
            if let Some(n) = before.borrowed.get(a) {
                self.forget(n, |h| {
                    h.borrowed.remove(a);
                });
            }
        }
    }

    /// After `d` was applied, giving `after`: adds the entries `d` brought.
    pub fn link(&mut self, after: &Intent, d: &IntentDelta) {
        if d.snapshot {
            *self = NodeIndex::of(after);
            return;
        }
        for (c, _) in &d.blocks {
            if let Some(n) = after.blocks.get(c).and_then(|b| b.node.as_deref()) {
                self.held(n).blocks.insert(*c);
            }
        }
        for (a, _) in &d.borrowed {
            if let Some(n) = after.borrowed.get(a) {
                self.held(n).borrowed.insert(*a);
            }
        }
    }

    /// What `node` holds.
    pub fn of_node(&self, node: &str) -> impl Iterator<Item = IpNet> + '_ {
        self.0.get(node).into_iter().flat_map(|h| {
            h.blocks
                .iter()
                .copied()
                .chain(h.borrowed.iter().map(|a| IpNet::from(*a)))
        })
    }
}

impl Intent {
    /// Applies one delta (or snapshot).
    pub fn apply(&mut self, d: IntentDelta) {
        if d.snapshot {
            *self = Intent::default();
        }
        for c in d.removed_blocks {
            self.blocks.remove(&c);
        }
        self.blocks.extend(d.blocks);
        for a in d.removed_borrowed {
            self.borrowed.remove(&a);
        }
        self.borrowed.extend(d.borrowed);
        if let Some(pools) = d.pools {
            self.pools = pools.into_iter().collect();
        }
        for n in d.removed_nodes {
            self.nodes.remove(&n);
        }
        self.nodes.extend(d.nodes);
        if let Some(v) = d.vxlan {
            self.vxlan = v;
        }
        self.revision = d.revision;
    }

    /// The pool whose CIDR contains `n`.
    pub fn pool_of(&self, n: &IpNet) -> Option<(&String, &PoolIntent)> {
        self.pools.iter().find(|(_, p)| p.cidr.contains(n))
    }

    /// `node`'s first address of `dst`'s family.
    pub fn node_addr(&self, node: &str, dst: &IpNet) -> Option<IpAddr> {
        self.node_net(node, dst.addr().is_ipv4()).map(|n| n.addr())
    }

    /// `node`'s first address of the family (IPv4 when `v4`), with its
    /// interface prefix.
    pub fn node_net(&self, node: &str, v4: bool) -> Option<IpNet> {
        self.nodes
            .get(node)?
            .addrs
            .iter()
            .find(|a| a.addr().is_ipv4() == v4)
            .copied()
    }
}

/// A tunnel device tabby manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tunnel {
    /// `vxlan.tabby`: VXLAN over the node's IPv4 address.
    Vxlan,
    /// `vxlan-v6.tabby`: VXLAN over the node's IPv6 address (IPv6 pools).
    VxlanV6,
    /// `tunl0`: IP-in-IP.
    Ipip,
}

impl Tunnel {
    /// The device's name.
    pub const fn device(self) -> &'static str {
        match self {
            Tunnel::Vxlan => "vxlan.tabby",
            Tunnel::VxlanV6 => "vxlan-v6.tabby",
            Tunnel::Ipip => "tunl0",
        }
    }

    /// The VXLAN device over an underlay address of `local`'s family.
    pub fn vxlan_for(local: IpAddr) -> Tunnel {
        if local.is_ipv4() {
            Tunnel::Vxlan
        } else {
            Tunnel::VxlanV6
        }
    }

    /// Bytes of encapsulation: what the device's MTU is below its
    /// uplink's (an IPv6 outer header is 20 bytes longer).
    pub const fn overhead(self) -> u32 {
        match self {
            Tunnel::Vxlan => 50,
            Tunnel::VxlanV6 => 70,
            Tunnel::Ipip => 20,
        }
    }
}

/// Where a tabby route sends traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteTarget {
    /// `<dst> via <gateway>` (resolved on-link by the kernel).
    Via(IpAddr),
    /// `blackhole <dst>`.
    Blackhole,
    /// `<dst> via <gateway> dev <tunnel> onlink`.
    Tunnel(IpAddr, Tunnel),
}

impl RouteTarget {
    /// The gateway, if the route has one.
    pub fn gateway(&self) -> Option<IpAddr> {
        match self {
            RouteTarget::Via(g) | RouteTarget::Tunnel(g, _) => Some(*g),
            RouteTarget::Blackhole => None,
        }
    }
}

/// A route tabby owns (its own route protocol, main table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Target.
    pub target: RouteTarget,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target {
            RouteTarget::Via(gw) => write!(f, "{} via {}", self.dst, gw),
            RouteTarget::Blackhole => write!(f, "blackhole {}", self.dst),
            RouteTarget::Tunnel(gw, t) => {
                write!(f, "{} via {} dev {} onlink", self.dst, gw, t.device())
            }
        }
    }
}
