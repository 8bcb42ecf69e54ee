//! Planning on the node: the stream's messages parsed into the routing
//! model (whose `desired` says what this node should hold), and the list of
//! route changes that takes the kernel from what it has to what it should
//! have. No I/O here; `apply_plan` drives a [`RouteTable`].
use crate::{
    kernel::{Route, RouteTable, VtepTables},
    Error, Result,
};
use ipnet::IpNet;
use std::{collections::BTreeSet, net::IpAddr};
use tabby_proto::v1 as pb;
pub use tabby_routing::{desired, Desired, Intent};
use tabby_routing::{
    parse_mac, BlockIntent, Encapsulation, IntentDelta, Mac, NodeIntent, PoolIntent, Vtep,
    VtepEntry, VxlanSettings,
};

fn net(s: &str) -> Result<IpNet> {
    s.parse()
        .map_err(|_| Error::Invalid(format!("intent: bad CIDR {s:?}")))
}

fn addr(s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| Error::Invalid(format!("intent: bad address {s:?}")))
}

/// The routing model's encapsulation for the proto's; unknown values (a newer
/// controller) count as plain.
pub fn encapsulation(e: i32) -> Encapsulation {
    pb::Encapsulation::try_from(e)
        .ok()
        .and_then(|e| Encapsulation::from_str_name(e.as_str_name()))
        .unwrap_or_default()
}

/// Parses one stream message into the routing model's delta. Any malformed
/// field fails the whole message, so a bad update changes nothing.
pub fn intent_delta(u: &pb::IntentUpdate) -> Result<IntentDelta> {
    let pools = if u.pools_changed || u.snapshot {
        Some(
            u.pools
                .iter()
                .map(|p| {
                    Ok((
                        p.name.clone(),
                        PoolIntent {
                            cidr: net(&p.cidr)?,
                            nat_outgoing: p.nat_outgoing,
                            encapsulation: encapsulation(p.encapsulation),
                        },
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    Ok(IntentDelta {
        snapshot: u.snapshot,
        revision: u.revision,
        blocks: u
            .blocks
            .iter()
            .map(|b| {
                Ok((
                    net(&b.cidr)?,
                    BlockIntent {
                        node: (!b.node.is_empty()).then(|| b.node.clone()),
                        pool: b.pool.clone(),
                    },
                ))
            })
            .collect::<Result<_>>()?,
        removed_blocks: u
            .removed_blocks
            .iter()
            .map(|c| net(c))
            .collect::<Result<_>>()?,
        borrowed: u
            .borrowed
            .iter()
            .map(|b| Ok((addr(&b.address)?, b.node.clone())))
            .collect::<Result<_>>()?,
        removed_borrowed: u
            .removed_borrowed
            .iter()
            .map(|a| addr(a))
            .collect::<Result<_>>()?,
        pools,
        nodes: u
            .nodes
            .iter()
            .map(|n| Ok((n.name.clone(), node_intent(n)?)))
            .collect::<Result<_>>()?,
        removed_nodes: u.removed_nodes.clone(),
        vxlan: u.vxlan.map(|v| vxlan_settings(&v)).transpose()?,
    })
}

/// A node of the stream: its addresses with their prefixes (a bare address
/// is a host prefix) and its VTEP, if the controller gave it a tunnel
/// address.
fn node_intent(n: &pb::Node) -> Result<NodeIntent> {
    let addrs = n
        .addresses
        .iter()
        .map(|a| match a.parse::<IpNet>() {
            Ok(net) => Ok(net),
            Err(_) => addr(a).map(IpNet::from),
        })
        .collect::<Result<Vec<_>>>()?;
    let vtep = |tunnel: &str, mac: &str| -> Result<Option<Vtep>> {
        if tunnel.is_empty() {
            return Ok(None);
        }
        Ok(Some(Vtep {
            tunnel_ip: addr(tunnel)?,
            mac: parse_mac(mac)
                .ok_or_else(|| Error::Invalid(format!("intent: bad VTEP MAC {mac:?}")))?,
        }))
    };
    Ok(NodeIntent {
        addrs,
        vtep: vtep(&n.vxlan_tunnel_address, &n.vxlan_mac)?,
        vtep_v6: vtep(&n.vxlan_v6_tunnel_address, &n.vxlan_v6_mac)?,
    })
}

fn vxlan_settings(v: &pb::IntentVxlan) -> Result<VxlanSettings> {
    let port = u16::try_from(v.port).ok().filter(|p| *p != 0);
    match port {
        Some(port) if (1..=0xff_ffff).contains(&v.vni) => Ok(VxlanSettings { vni: v.vni, port }),
        _ => Err(Error::Invalid(format!(
            "intent: bad VXLAN settings (vni {}, port {})",
            v.vni, v.port
        ))),
    }
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

/// Neighbour and FDB changes on `vxlan.tabby`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VtepPlan {
    /// Neighbour entries to remove.
    pub del_neigh: Vec<(IpAddr, Mac)>,
    /// FDB entries to remove.
    pub del_fdb: Vec<(Mac, IpAddr)>,
    /// FDB entries to add (or replace).
    pub add_fdb: Vec<(Mac, IpAddr)>,
    /// Neighbour entries to add (or replace).
    pub add_neigh: Vec<(IpAddr, Mac)>,
}

impl VtepPlan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.del_neigh.is_empty()
            && self.del_fdb.is_empty()
            && self.add_fdb.is_empty()
            && self.add_neigh.is_empty()
    }
}

/// Plans the entries that take `have` to `want`: each remote VTEP is a
/// neighbour entry and an FDB entry. Stale entries go only when
/// `remove_stale` (after the first full sync), as with routes; an entry for
/// the same address or MAC with other contents is replaced in any case.
pub fn plan_vteps(want: &BTreeSet<VtepEntry>, have: &VtepTables, remove_stale: bool) -> VtepPlan {
    let want_neigh: BTreeSet<(IpAddr, Mac)> = want.iter().map(|e| (e.tunnel_ip, e.mac)).collect();
    let want_fdb: BTreeSet<(Mac, IpAddr)> = want.iter().map(|e| (e.mac, e.underlay)).collect();
    let have_neigh: BTreeSet<(IpAddr, Mac)> = have.neigh.iter().copied().collect();
    let have_fdb: BTreeSet<(Mac, IpAddr)> = have.fdb.iter().copied().collect();
    let neigh_ips: BTreeSet<IpAddr> = want_neigh.iter().map(|(a, _)| *a).collect();
    let fdb_macs: BTreeSet<Mac> = want_fdb.iter().map(|(m, _)| *m).collect();
    VtepPlan {
        // A replaced neighbour entry needs no delete (add replaces it).
        del_neigh: have_neigh
            .iter()
            .filter(|e| !want_neigh.contains(e) && remove_stale && !neigh_ips.contains(&e.0))
            .copied()
            .collect(),
        // An FDB entry is keyed by MAC and destination: a moved node's old
        // destination must go, or both would be flooded to.
        del_fdb: have_fdb
            .iter()
            .filter(|e| !want_fdb.contains(e) && (remove_stale || fdb_macs.contains(&e.0)))
            .copied()
            .collect(),
        add_fdb: want_fdb.difference(&have_fdb).copied().collect(),
        add_neigh: want_neigh.difference(&have_neigh).copied().collect(),
    }
}

/// Outcome of applying a plan.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Routes installed or removed.
    pub applied: usize,
    /// What failed (retried at the next reconcile).
    pub failed: Vec<(Route, Error)>,
    /// Counted as done, but the kernel changed nothing (the route was
    /// already gone, or already there): no notification comes of these.
    pub noops: Vec<Route>,
}

/// Executes a plan. A delete of a route already gone and an add of a route
/// already present count as done; other failures are reported, not fatal.
pub fn apply_plan(table: &mut dyn RouteTable, plan: &RoutePlan) -> ApplyReport {
    let mut rep = ApplyReport::default();
    for (r, res) in plan.del.iter().zip(table.del(&plan.del)) {
        match res {
            Ok(()) => rep.applied += 1,
            Err(Error::NotFound(_)) => {
                rep.applied += 1;
                rep.noops.push(*r);
            }
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
                        rep.noops.push(r);
                    } else {
                        rep.failed.push((
                            r,
                            Error::Exists(format!("{r}: another route holds this destination")),
                        ));
                    }
                }
            }
            Err(e) => {
                // One cause of several failures.
                let e = std::sync::Arc::new(e);
                for r in retry {
                    rep.failed.push((
                        r,
                        Error::Context {
                            op: "listing after EEXIST".into(),
                            source: e.clone(),
                        },
                    ));
                }
            }
        }
    }
    rep
}

#[cfg(test)]
pub(crate) mod tests;
