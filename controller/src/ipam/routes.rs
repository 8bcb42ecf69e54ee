//! The IPAM state as the routing model sees it. `ShowRoutes` evaluates the
//! shared route computation (`tabby_routing`) over it, the same function
//! every node runs over the intent stream.
use super::{records::BlockState, IpamState};
use im::{ordmap::DiffItem, OrdMap};
use ipnet::IpNet;
use std::{collections::BTreeSet, net::IpAddr, sync::Arc};
use tabby_routing::{vtep_mac, vtep_mac_v6, BlockIntent, Intent, NodeIntent, PoolIntent, Vtep};
use tabby_store::Node;

impl IpamState {
    /// The cluster intent at this state: what the intent stream carries
    /// (every pool, block, borrowed address and node), as the routing model.
    pub fn routing_intent(&self, revision: u64) -> Intent {
        self.intent_with(
            revision,
            self.blocks.values(),
            self.borrowed.iter().map(|(a, n)| (*a, n)),
            None,
        )
    }

    /// [`IpamState::routing_intent`] with only the blocks `blocks` and the
    /// borrowed addresses `borrowed`, every pool, and only the nodes those
    /// name: enough for the cluster routes of those entries alone (each
    /// depends on its own node and the pools, nothing else), at a cost that
    /// follows the change, not the cluster's size.
    pub fn routing_intent_part(
        &self,
        revision: u64,
        blocks: &BTreeSet<IpNet>,
        borrowed: &BTreeSet<IpAddr>,
    ) -> Intent {
        let blocks: Vec<&Arc<BlockState>> =
            blocks.iter().filter_map(|c| self.blocks.get(c)).collect();
        let borrowed: Vec<(IpAddr, &String)> = borrowed
            .iter()
            .filter_map(|a| self.borrowed.get(a).map(|n| (*a, n)))
            .collect();
        let named: BTreeSet<&str> = blocks
            .iter()
            .filter_map(|b| b.rec.affinity.as_deref())
            .chain(borrowed.iter().map(|(_, n)| n.as_str()))
            .collect();
        self.intent_with(
            revision,
            blocks.into_iter(),
            borrowed.into_iter(),
            Some(&named),
        )
    }

    /// What changed in the cluster routes since `prev`: the blocks and the
    /// borrowed addresses whose entries differ. None when something every
    /// route depends on changed (pools, nodes, configuration), so that only
    /// a full recomputation is right. Shared subtrees of the persistent maps
    /// are skipped, so this costs what changed, not the table's size.
    pub fn route_changes(&self, prev: &IpamState) -> Option<(BTreeSet<IpNet>, BTreeSet<IpAddr>)> {
        let pools_same = self.pools.len() == prev.pools.len()
            && self
                .pools
                .iter()
                .zip(prev.pools.iter())
                .all(|((a, p), (b, q))| a == b && p.rec == q.rec);
        if !pools_same
            || self.config != prev.config
            || self.bgp != prev.bgp
            || prev.nodes.diff(&self.nodes).next().is_some()
        {
            return None;
        }
        Some((
            changed_keys(&prev.blocks, &self.blocks),
            changed_keys(&prev.borrowed, &self.borrowed),
        ))
    }

    fn intent_with<'a>(
        &'a self,
        revision: u64,
        blocks: impl Iterator<Item = &'a Arc<BlockState>>,
        borrowed: impl Iterator<Item = (IpAddr, &'a String)>,
        only_nodes: Option<&BTreeSet<&str>>,
    ) -> Intent {
        let nodes = match only_nodes {
            None => self
                .nodes
                .values()
                .map(|n| (n.name.clone(), self.node_intent(n)))
                .collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| self.nodes.get(*n))
                .map(|n| (n.name.clone(), self.node_intent(n)))
                .collect(),
        };
        Intent {
            revision,
            pools: self
                .pools
                .values()
                .map(|p| {
                    (
                        p.rec.name.clone(),
                        PoolIntent {
                            cidr: p.rec.cidr,
                            nat_outgoing: p.rec.nat_outgoing,
                            encapsulation: p.rec.encapsulation,
                        },
                    )
                })
                .collect(),
            blocks: blocks
                .map(|b| {
                    (
                        b.rec.cidr,
                        BlockIntent {
                            node: b.rec.affinity.clone(),
                            pool: b.rec.pool.clone(),
                        },
                    )
                })
                .collect(),
            borrowed: borrowed.map(|(a, n)| (a, n.clone())).collect(),
            nodes,
            vxlan: crate::convert::vxlan_settings(&self.config),
        }
    }

    /// A node as the routing model sees it: addresses with their prefixes,
    /// and its VTEP once it holds a tunnel address.
    pub fn node_intent(&self, n: &Node) -> NodeIntent {
        NodeIntent {
            addrs: n
                .addresses
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let host = if a.is_ipv4() { 32 } else { 128 };
                    let l = n.prefix_lens.get(i).copied().unwrap_or(host).min(host);
                    IpNet::new(*a, l).unwrap_or_else(|_| IpNet::from(*a))
                })
                .collect(),
            vtep: self.tunnel_address(&n.name).map(|tunnel_ip| Vtep {
                tunnel_ip,
                mac: vtep_mac(&n.name),
            }),
            vtep_v6: self.tunnel_v6_address(&n.name).map(|tunnel_ip| Vtep {
                tunnel_ip,
                mac: vtep_mac_v6(&n.name),
            }),
        }
    }
}

/// The keys whose entries differ between `prev` and `now` (added, removed or
/// changed).
fn changed_keys<K: Ord + Copy, V: PartialEq + Clone>(
    prev: &OrdMap<K, V>,
    now: &OrdMap<K, V>,
) -> BTreeSet<K> {
    prev.diff(now)
        .map(|d| match d {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. } => {
                *k
            }
        })
        .collect()
}
