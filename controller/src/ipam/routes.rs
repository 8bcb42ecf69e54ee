//! The IPAM state as the routing model sees it. `ShowRoutes` evaluates the
//! shared route computation (`tabby_routing`) over it, the same function
//! every node runs over the intent stream.
use super::IpamState;
use tabby_routing::{BlockIntent, Intent, PoolIntent};

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
                .map(|n| (n.name.clone(), n.addresses.clone()))
                .collect(),
        }
    }
}
