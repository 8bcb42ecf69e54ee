//! From the cluster intent to one node's desired kernel state, and the
//! cluster-wide route table built from the same intent.
use crate::model::{BlockIntent, Encapsulation, Intent, Route, RouteTarget};
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

/// What one node's kernel should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every tabby route.
    pub routes: BTreeSet<Route>,
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

/// Whether remote destinations in `n` are routed plainly (no pool, or a pool
/// without encapsulation). Encapsulated pools get no remote routes until
/// overlays exist.
fn plain(intent: &Intent, n: &IpNet) -> bool {
    intent
        .pool_of(n)
        .is_none_or(|(_, p)| p.encapsulation == Encapsulation::None)
}

/// The route `me` should hold for block `cidr`: a blackhole for its own
/// block, a route via the owner's address for another node's block of a
/// plainly routed pool; `Err` when the owner has no address of the family.
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
        Some(n) if plain(intent, cidr) => Some(match intent.node_addr(n, cidr) {
            Some(gw) => Ok(Route {
                dst: *cidr,
                target: RouteTarget::Via(gw),
            }),
            None => Err(format!(
                "block {cidr}: node {n} has no address of its family"
            )),
        }),
        _ => None,
    }
}

/// The route `me` should hold for an address borrowed by `holder`: via the
/// holder, unless that is `me` (pod wiring gives our own pods link routes).
fn borrowed_route(
    intent: &Intent,
    me: &str,
    a: &IpAddr,
    holder: &str,
) -> Option<Result<Route, String>> {
    let dst = IpNet::from(*a);
    if holder == me || !plain(intent, &dst) {
        return None;
    }
    Some(match intent.node_addr(holder, &dst) {
        Some(gw) => Ok(Route {
            dst,
            target: RouteTarget::Via(gw),
        }),
        None => Err(format!(
            "borrowed {a}: node {holder} has no address of its family"
        )),
    })
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
    let mut d = Desired::default();
    for (name, p) in &intent.pools {
        if p.encapsulation != Encapsulation::None {
            d.unsupported.push(format!(
                "pool {name} ({}) uses {}: not applied by this tabby-node; its remote blocks get no routes",
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
            let RouteTarget::Via(gw) = r.target else {
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
