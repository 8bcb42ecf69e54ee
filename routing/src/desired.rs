//! From the cluster intent to one node's desired kernel state, and the
//! cluster-wide route table built from the same intent.
use crate::model::{
    BlockIntent, Encapsulation, Intent, Mac, Route, RouteTarget, Tunnel, VxlanSettings,
};
use ipnet::IpNet;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

/// The two interval sets of one NAT table (`ip tabby` or `ip6 tabby`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatSets {
    /// Pools with nat_outgoing.
    pub masq: Vec<IpNet>,
    /// Every pool.
    pub all: Vec<IpNet>,
}

/// This node's `vxlan.tabby`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VxlanDevice {
    /// VNI and UDP port.
    pub settings: VxlanSettings,
    /// Local (underlay) address: the node's IPv4 address.
    pub local: IpAddr,
    /// The device's MAC (the node's VTEP MAC).
    pub mac: Mac,
    /// The node's tunnel address, put on the device as a host prefix.
    pub tunnel_ip: IpAddr,
}

/// One remote VXLAN endpoint on `vxlan.tabby`: a permanent neighbour entry
/// (tunnel address -> VTEP MAC) and a permanent FDB entry (VTEP MAC ->
/// underlay address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VtepEntry {
    /// The remote node's tunnel address.
    pub tunnel_ip: IpAddr,
    /// The remote node's VTEP MAC.
    pub mac: Mac,
    /// The remote node's address on the underlay.
    pub underlay: IpAddr,
}

/// The tunnel devices and endpoints one node should hold: what the overlay
/// pools need, apart from routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// `vxlan.tabby`, while an IPv4 VXLAN pool exists and this node has an
    /// IPv4 address and a tunnel address.
    pub vxlan: Option<VxlanDevice>,
    /// Remote VTEPs: every other node with a tunnel address that some
    /// VXLAN pool's mode tunnels to.
    pub vteps: BTreeSet<VtepEntry>,
    /// `vxlan-v6.tabby`, the same for IPv6 VXLAN pools over the nodes'
    /// IPv6 addresses.
    pub vxlan_v6: Option<VxlanDevice>,
    /// Remote IPv6 VTEPs.
    pub vteps_v6: BTreeSet<VtepEntry>,
    /// `tunl0` with this local address, while an IPv4 IP-in-IP pool exists.
    pub ipip: Option<IpAddr>,
    /// Why an overlay pool cannot be applied on this node (yet).
    pub problems: Vec<String>,
}

/// What one node's kernel should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every tabby route.
    pub routes: BTreeSet<Route>,
    /// Tunnel devices and remote endpoints.
    pub overlay: Overlay,
    /// NAT sets for `ip tabby`.
    pub nat_v4: NatSets,
    /// NAT sets for `ip6 tabby`.
    pub nat_v6: NatSets,
    /// IPv6 forwarding needed (an IPv6 pool exists).
    pub ipv6: bool,
    /// Pools whose encapsulation is not applied yet.
    pub unsupported: Vec<String>,
    /// Blocks or addresses that could not be routed (owner has no address of the family).
    pub unroutable: Vec<String>,
}

/// Whether `a` is on the subnet of `me`'s own address of its family (the
/// interface prefix `me` reported): CrossSubnet's test.
fn same_subnet(intent: &Intent, me: &str, a: &IpAddr) -> bool {
    intent
        .node_net(me, a.is_ipv4())
        .is_some_and(|n| n.contains(a))
}

/// How `me` reaches `owner` for destination `dst`, by the encapsulation of
/// `dst`'s pool: via the owner's address, or through a tunnel. `Err` says why
/// it cannot be routed.
fn target_for(intent: &Intent, me: &str, owner: &str, dst: &IpNet) -> Result<RouteTarget, String> {
    let enc = encapsulation_of(intent, dst);
    let Some(gw) = intent.node_addr(owner, dst) else {
        return Err(format!("node {owner} has no address of its family"));
    };
    let tunnel = match enc {
        Encapsulation::None => None,
        Encapsulation::Vxlan | Encapsulation::Ipip => Some(enc),
        Encapsulation::VxlanCrossSubnet | Encapsulation::IpipCrossSubnet => {
            (!same_subnet(intent, me, &gw)).then_some(enc)
        }
    };
    match tunnel {
        None => Ok(RouteTarget::Via(gw)),
        Some(Encapsulation::Ipip | Encapsulation::IpipCrossSubnet) if !gw.is_ipv4() => {
            Err(format!(
                "{} for IPv6 pools is not applied by this tabby-node",
                enc.as_str_name()
            ))
        }
        Some(Encapsulation::Ipip | Encapsulation::IpipCrossSubnet) => {
            Ok(RouteTarget::Tunnel(gw, Tunnel::Ipip))
        }
        Some(_) => {
            let n = intent.nodes.get(owner);
            let vtep = if gw.is_ipv4() {
                n.and_then(|n| n.vtep)
            } else {
                n.and_then(|n| n.vtep_v6)
            };
            match vtep {
                Some(v) => Ok(RouteTarget::Tunnel(v.tunnel_ip, Tunnel::vxlan_for(gw))),
                None => Err(format!("node {owner} has no VXLAN tunnel address yet")),
            }
        }
    }
}

/// The route `me` should hold for block `cidr`: a blackhole for its own
/// block, a route to the owner for another node's block (plain or through a
/// tunnel, by the pool's encapsulation); `Err` when it cannot be routed.
fn block_route(
    intent: &Intent,
    me: &str,
    cidr: &IpNet,
    b: &BlockIntent,
) -> Option<Result<Route, String>> {
    match b.node.as_deref() {
        Some(n) if n == me => Some(Ok(Route {
            dst: *cidr,
            target: RouteTarget::Blackhole,
        })),
        Some(n) => Some(
            target_for(intent, me, n, cidr)
                .map(|target| Route { dst: *cidr, target })
                .map_err(|e| format!("block {cidr}: {e}")),
        ),
        None => None,
    }
}

/// The route `me` should hold for an address borrowed by `holder`: to the
/// holder, unless that is `me` (pod wiring gives our own pods link routes).
fn borrowed_route(
    intent: &Intent,
    me: &str,
    a: &IpAddr,
    holder: &str,
) -> Option<Result<Route, String>> {
    let dst = IpNet::from(*a);
    if holder == me {
        return None;
    }
    Some(
        target_for(intent, me, holder, &dst)
            .map(|target| Route { dst, target })
            .map_err(|e| format!("borrowed {a}: {e}")),
    )
}

/// The tunnel devices and remote VTEPs node `me` should hold.
pub fn overlay(intent: &Intent, me: &str) -> Overlay {
    let mut o = Overlay::default();
    for v4 in [true, false] {
        vxlan_overlay(intent, me, v4, &mut o);
    }
    let local = intent.node_net(me, true).map(|a| a.addr());
    let ipip = intent.pools.iter().find(|(_, p)| {
        p.cidr.addr().is_ipv4()
            && matches!(
                p.encapsulation,
                Encapsulation::Ipip | Encapsulation::IpipCrossSubnet
            )
    });
    if let Some((name, _)) = ipip {
        match local {
            Some(a) => o.ipip = Some(a),
            None => o.problems.push(format!(
                "IPIP pool {name}: this node has no IPv4 address for the tunnel"
            )),
        }
    }
    o
}

/// The VXLAN device and remote VTEPs of one family (IPv4 pools over
/// `vxlan.tabby`, IPv6 pools over `vxlan-v6.tabby`).
fn vxlan_overlay(intent: &Intent, me: &str, v4: bool, o: &mut Overlay) {
    let (fam, mut pools) = (
        if v4 { "IPv4" } else { "IPv6" },
        intent.pools.iter().filter(|(_, p)| {
            p.cidr.addr().is_ipv4() == v4
                && matches!(
                    p.encapsulation,
                    Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet
                )
        }),
    );
    let Some((name, _)) = pools.next() else {
        return;
    };
    // Tunnel to every node if a pool says so; else only across subnets.
    let always = intent
        .pools
        .values()
        .any(|p| p.cidr.addr().is_ipv4() == v4 && p.encapsulation == Encapsulation::Vxlan);
    let addr = |n: &str| intent.node_net(n, v4).map(|a| a.addr());
    let vtep = |n: &crate::model::NodeIntent| if v4 { n.vtep } else { n.vtep_v6 };
    let mine = intent.nodes.get(me).and_then(vtep);
    let dev = match (addr(me), mine) {
        (Some(local), Some(v)) => Some(VxlanDevice {
            settings: intent.vxlan,
            local,
            mac: v.mac,
            tunnel_ip: v.tunnel_ip,
        }),
        (None, _) => {
            o.problems.push(format!(
                "VXLAN pool {name}: this node has no {fam} address for the tunnel"
            ));
            None
        }
        (_, None) => {
            o.problems.push(format!(
                "VXLAN pool {name}: this node has no {fam} tunnel address yet"
            ));
            None
        }
    };
    let mut vteps = BTreeSet::new();
    for (n, node) in &intent.nodes {
        let (Some(v), Some(under)) = (vtep(node), addr(n)) else {
            continue;
        };
        if n != me && (always || !same_subnet(intent, me, &under)) {
            vteps.insert(VtepEntry {
                tunnel_ip: v.tunnel_ip,
                mac: v.mac,
                underlay: under,
            });
        }
    }
    if v4 {
        (o.vxlan, o.vteps) = (dev, vteps);
    } else {
        (o.vxlan_v6, o.vteps_v6) = (dev, vteps);
    }
}

/// The route node `me` should hold at one destination (a block, or a
/// borrowed address as a host prefix), by the same rules as [`desired`]:
/// what a node re-plans for the destinations a delta touched.
pub fn route_at(intent: &Intent, me: &str, dst: &IpNet) -> Option<Route> {
    let borrowed = (dst.prefix_len() == dst.max_prefix_len())
        .then(|| intent.borrowed.get(&dst.addr()))
        .flatten()
        .and_then(|holder| borrowed_route(intent, me, &dst.addr(), holder));
    // As in `desired`: a borrowed route that cannot be made (its holder has
    // no address of the family) leaves the block route at that prefix.
    match borrowed {
        Some(Ok(r)) => Some(r),
        _ => intent
            .blocks
            .get(dst)
            .and_then(|b| block_route(intent, me, dst, b))
            .and_then(Result::ok),
    }
}

/// Computes node `me`'s desired state from the cluster intent: a blackhole
/// for each of its own blocks, a route via the owner's address for every
/// other node's block and for each address borrowed by another node, and the
/// NAT sets. Its own borrowed addresses need nothing here: pod wiring gives
/// them link routes. A borrowed address's route wins over a block route at
/// the same prefix (a /32 block), as in [`route_at`].
pub fn desired(intent: &Intent, me: &str) -> Desired {
    let mut d = Desired {
        overlay: overlay(intent, me),
        ..Default::default()
    };
    for (name, p) in &intent.pools {
        let ipip = matches!(
            p.encapsulation,
            Encapsulation::Ipip | Encapsulation::IpipCrossSubnet
        );
        if ipip && p.cidr.addr().is_ipv6() {
            d.unsupported.push(format!(
                "pool {name} ({}) uses {}: IP-in-IP carries IPv4 only (as in Calico); its remote blocks get no routes",
                p.cidr,
                p.encapsulation.as_str_name()
            ));
        }
        let sets = if p.cidr.addr().is_ipv4() {
            &mut d.nat_v4
        } else {
            &mut d.nat_v6
        };
        sets.all.push(p.cidr);
        if p.nat_outgoing {
            sets.masq.push(p.cidr);
        }
        d.ipv6 |= p.cidr.addr().is_ipv6();
    }
    let mut at: BTreeMap<IpNet, Route> = BTreeMap::new();
    let blocks = intent
        .blocks
        .iter()
        .filter_map(|(cidr, b)| block_route(intent, me, cidr, b));
    let borrowed = intent
        .borrowed
        .iter()
        .filter_map(|(a, holder)| borrowed_route(intent, me, a, holder));
    for r in blocks.chain(borrowed) {
        match r {
            Ok(r) => {
                at.insert(r.dst, r);
            }
            Err(e) => d.unroutable.push(e),
        }
    }
    d.routes = at.into_values().collect();
    d
}

/// What a cluster route stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClusterRouteKind {
    /// A block, routed to its affine node.
    Block,
    /// An address borrowed from another node's block, routed to its holder.
    Borrowed,
    /// One of the node's own blocks (the node view only).
    Blackhole,
}

impl ClusterRouteKind {
    /// The name `ShowRoutes` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterRouteKind::Block => "block",
            ClusterRouteKind::Borrowed => "borrowed",
            ClusterRouteKind::Blackhole => "blackhole",
        }
    }
}

/// One route of the cluster table, or of one node's view of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterRoute {
    /// Destination: a block, or a borrowed address as a host prefix.
    pub destination: IpNet,
    /// Node the destination lives on.
    pub node: String,
    /// That node's address of the destination's family; None when it has none
    /// (or for a blackhole).
    pub next_hop: Option<IpAddr>,
    /// What the route stands for.
    pub kind: ClusterRouteKind,
    /// The encapsulation of the destination's pool.
    pub encapsulation: Encapsulation,
}

fn encapsulation_of(intent: &Intent, n: &IpNet) -> Encapsulation {
    intent
        .pool_of(n)
        .map(|(_, p)| p.encapsulation)
        .unwrap_or_default()
}

/// The cluster route table: every affine block and every borrowed address,
/// with its node and next hop, ordered by destination. With `node`, only what
/// that node installs (exactly [`desired`]'s routes), each with its origin.
pub fn cluster_routes(intent: &Intent, node: Option<&str>) -> Vec<ClusterRoute> {
    if let Some(me) = node {
        return node_view(intent, me, &desired(intent, me));
    }
    let mut v: Vec<ClusterRoute> = intent
        .blocks
        .iter()
        .filter_map(|(c, b)| Some((*c, b.node.as_deref()?, ClusterRouteKind::Block)))
        .chain(
            intent
                .borrowed
                .iter()
                .map(|(a, n)| (IpNet::from(*a), n.as_str(), ClusterRouteKind::Borrowed)),
        )
        .map(|(dst, n, kind)| row(intent, dst, n, intent.node_addr(n, &dst), kind))
        .collect();
    v.sort();
    v
}

/// What node `me` installs, `d` being [`desired`] for it, each route with its
/// origin (what `ShowRoutes{node}` shows), ordered by destination (`d` holds
/// one route per destination, in that order).
pub fn node_view(intent: &Intent, me: &str, d: &Desired) -> Vec<ClusterRoute> {
    d.routes
        .iter()
        .map(|r| {
            let Some(gw) = r.target.gateway() else {
                return row(intent, r.dst, me, None, ClusterRouteKind::Blackhole);
            };
            // The rule that made this route names its origin: the borrowed
            // address's holder, else the block's node.
            let holder = intent
                .borrowed
                .get(&r.dst.addr())
                .filter(|_| r.dst.prefix_len() == r.dst.max_prefix_len())
                .filter(|h| {
                    matches!(borrowed_route(intent, me, &r.dst.addr(), h), Some(Ok(b)) if b == *r)
                });
            match holder {
                Some(h) => row(intent, r.dst, h, Some(gw), ClusterRouteKind::Borrowed),
                None => {
                    let owner = intent
                        .blocks
                        .get(&r.dst)
                        .and_then(|b| b.node.as_deref())
                        .unwrap_or_default();
                    row(intent, r.dst, owner, Some(gw), ClusterRouteKind::Block)
                }
            }
        })
        .collect()
}

fn row(
    intent: &Intent,
    dst: IpNet,
    owner: &str,
    next_hop: Option<IpAddr>,
    kind: ClusterRouteKind,
) -> ClusterRoute {
    ClusterRoute {
        destination: dst,
        node: owner.to_string(),
        next_hop,
        kind,
        encapsulation: encapsulation_of(intent, &dst),
    }
}

#[cfg(test)]
mod tests;
