//! The IPAM state as the routing model sees it. `ShowRoutes` evaluates the
//! shared route computation (`tabby_routing`) over it, the same function
//! every node runs over the intent stream.
use super::IpamState;
use ipnet::IpNet;
use tabby_routing::{vtep_mac, vtep_mac_v6, BlockIntent, Intent, NodeIntent, PoolIntent, Vtep};
use tabby_store::Node;

impl IpamState {
    /// The cluster intent at this state: what the intent stream carries
    /// (every pool, block, borrowed address and node), as the routing model.
    pub fn routing_intent(&self, revision: u64) -> Intent {
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
            blocks: self
                .blocks
                .values()
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
            borrowed: self.borrowed.iter().map(|(a, n)| (*a, n.clone())).collect(),
            nodes: self
                .nodes
                .values()
                .map(|n| (n.name.clone(), self.node_intent(n)))
                .collect(),
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
