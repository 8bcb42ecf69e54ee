//! Pure planning: the cluster intent (as streamed by the controller) in, this
//! node's desired kernel state out, and the list of route changes that takes
//! the kernel from what it has to what it should have.
use crate::{
    kernel::{Route, RouteTable, RouteTarget},
    nft::NatSets,
    Error, Result,
};
use ipnet::IpNet;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};
use tabby_proto::v1 as pb;

/// A pool as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolIntent {
    /// Pool CIDR.
    pub cidr: IpNet,
    /// Masquerade egress.
    pub nat_outgoing: bool,
    /// Inter-node transport.
    pub encapsulation: pb::Encapsulation,
}

/// A block and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIntent {
    /// Affine node, if any.
    pub node: Option<String>,
    /// Pool name.
    pub pool: String,
}

/// The cluster-wide intent, rebuilt from the stream's snapshot and deltas.
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
    /// Node addresses by node name.
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
}

fn net(s: &str) -> Result<IpNet> {
    s.parse()
        .map_err(|_| Error::Invalid(format!("intent: bad CIDR {s:?}")))
}

fn addr(s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| Error::Invalid(format!("intent: bad address {s:?}")))
}

impl Intent {
    /// Applies one stream message. On error the intent is unchanged.
    pub fn apply(&mut self, u: &pb::IntentUpdate) -> Result<()> {
        let mut next = if u.snapshot {
            Intent::default()
        } else {
            self.clone()
        };
        for c in &u.removed_blocks {
            next.blocks.remove(&net(c)?);
        }
        for b in &u.blocks {
            next.blocks.insert(
                net(&b.cidr)?,
                BlockIntent {
                    node: (!b.node.is_empty()).then(|| b.node.clone()),
                    pool: b.pool.clone(),
                },
            );
        }
        for a in &u.removed_borrowed {
            next.borrowed.remove(&addr(a)?);
        }
        for b in &u.borrowed {
            next.borrowed.insert(addr(&b.address)?, b.node.clone());
        }
        if u.pools_changed || u.snapshot {
            next.pools.clear();
            for p in &u.pools {
                next.pools.insert(
                    p.name.clone(),
                    PoolIntent {
                        cidr: net(&p.cidr)?,
                        nat_outgoing: p.nat_outgoing,
                        encapsulation: pb::Encapsulation::try_from(p.encapsulation)
                            .unwrap_or(pb::Encapsulation::None),
                    },
                );
            }
        }
        for n in &u.removed_nodes {
            next.nodes.remove(n);
        }
        for n in &u.nodes {
            let addrs = n
                .addresses
                .iter()
                .map(|a| addr(a))
                .collect::<Result<Vec<_>>>()?;
            next.nodes.insert(n.name.clone(), addrs);
        }
        next.revision = u.revision;
        *self = next;
        Ok(())
    }
}

/// What this node's kernel should hold.
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
    /// Pools whose encapsulation this node does not apply yet.
    pub unsupported: Vec<String>,
    /// Blocks or addresses that could not be routed (owner has no address of the family).
    pub unroutable: Vec<String>,
}

fn same_family(a: &IpAddr, n: &IpNet) -> bool {
    matches!(
        (a, n),
        (IpAddr::V4(_), IpNet::V4(_)) | (IpAddr::V6(_), IpNet::V6(_))
    )
}

fn node_addr(intent: &Intent, node: &str, dst: &IpNet) -> Option<IpAddr> {
    intent
        .nodes
        .get(node)?
        .iter()
        .find(|a| same_family(a, dst))
        .copied()
}

fn pool_of<'a>(intent: &'a Intent, a: &IpNet) -> Option<(&'a String, &'a PoolIntent)> {
    intent.pools.iter().find(|(_, p)| p.cidr.contains(a))
}

/// Computes this node's desired state from the cluster intent.
pub fn desired(intent: &Intent, me: &str) -> Desired {
    let mut d = Desired::default();
    let mut unsupported = BTreeSet::new();
    for (name, p) in &intent.pools {
        if p.encapsulation != pb::Encapsulation::None {
            unsupported.insert(format!(
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
    d.unsupported = unsupported.into_iter().collect();
    let plain = |n: &IpNet| {
        pool_of(intent, n).is_none_or(|(_, p)| p.encapsulation == pb::Encapsulation::None)
    };
    for (cidr, b) in &intent.blocks {
        match b.node.as_deref() {
            Some(n) if n == me => {
                d.routes.insert(Route {
                    dst: *cidr,
                    target: RouteTarget::Blackhole,
                });
            }
            Some(n) if plain(cidr) => match node_addr(intent, n, cidr) {
                Some(gw) => {
                    d.routes.insert(Route {
                        dst: *cidr,
                        target: RouteTarget::Via(gw),
                    });
                }
                None => d.unroutable.push(format!(
                    "block {cidr}: node {n} has no address of its family"
                )),
            },
            _ => {}
        }
    }
    for (a, holder) in &intent.borrowed {
        let dst = IpNet::from(*a);
        if holder == me || !plain(&dst) {
            continue; // Our own pods have their link routes from pod wiring.
        }
        match node_addr(intent, holder, &dst) {
            Some(gw) => {
                d.routes.insert(Route {
                    dst,
                    target: RouteTarget::Via(gw),
                });
            }
            None => d.unroutable.push(format!(
                "borrowed {a}: node {holder} has no address of its family"
            )),
        }
    }
    d
}

/// Route changes, deletions first (a changed route is a delete plus an add).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Routes to remove.
    pub del: Vec<Route>,
    /// Routes to install.
    pub add: Vec<Route>,
}

impl RoutePlan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.del.is_empty() && self.add.is_empty()
    }
}

/// Plans the changes from `actual` (tabby's routes in the kernel) to `want`.
/// `remove_stale` is false until the first full sync has arrived, so a
/// restarted node never removes routes on partial knowledge.
pub fn plan_routes(want: &BTreeSet<Route>, actual: &[Route], remove_stale: bool) -> RoutePlan {
    let have: BTreeSet<Route> = actual.iter().copied().collect();
    let wanted_dsts: BTreeSet<IpNet> = want.iter().map(|r| r.dst).collect();
    let del = have
        .iter()
        .filter(|r| !want.contains(r) && (remove_stale || wanted_dsts.contains(&r.dst)))
        .copied()
        .collect();
    let add = want.difference(&have).copied().collect();
    RoutePlan { del, add }
}

/// Outcome of applying a plan.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Routes installed or removed.
    pub applied: usize,
    /// What failed (retried at the next reconcile).
    pub failed: Vec<(Route, Error)>,
}

/// Executes a plan. A delete of a route already gone and an add of a route
/// already present count as done; other failures are reported, not fatal.
pub fn apply_plan(table: &mut dyn RouteTable, plan: &RoutePlan) -> ApplyReport {
    let mut rep = ApplyReport::default();
    for (r, res) in plan.del.iter().zip(table.del(&plan.del)) {
        match res {
            Ok(()) | Err(Error::NotFound(_)) => rep.applied += 1,
            Err(e) => rep.failed.push((*r, e)),
        }
    }
    let mut retry = Vec::new();
    for (r, res) in plan.add.iter().zip(table.add(&plan.add)) {
        match res {
            Ok(()) => rep.applied += 1,
            Err(Error::Exists(_)) => retry.push(*r),
            Err(e) => rep.failed.push((*r, e)),
        }
    }
    // EEXIST: ours with the same target is fine; anything else at that
    // destination (another protocol) is not ours to replace.
    if !retry.is_empty() {
        match table.list() {
            Ok(now) => {
                for r in retry {
                    if now.contains(&r) {
                        rep.applied += 1;
                    } else {
                        rep.failed.push((
                            r,
                            Error::Exists(format!("{r}: another route holds this destination")),
                        ));
                    }
                }
            }
            Err(e) => {
                for r in retry {
                    rep.failed
                        .push((r, Error::Netlink(format!("listing after EEXIST: {e}"))));
                }
            }
        }
    }
    rep
}

#[cfg(test)]
mod tests;
