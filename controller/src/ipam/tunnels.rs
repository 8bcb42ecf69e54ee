//! VXLAN tunnel addresses: one per node while an IPv4 VXLAN pool exists,
//! taken from the pools that select the node like a pod's and held under handle `vxlan-tunnel-addr.<node>` like any pod's
//! address (so `ShowIpam`, `GetAllocation` and `CheckIpam` see it), and
//! released when no such pool selects the node any more or the node goes.
use super::{records::AssignRequest, IpamState};
use std::{collections::BTreeMap, net::IpAddr};
use tabby_store::{Encapsulation, Mutation, Node};

/// The handle of a node's tunnel address.
pub const TUNNEL_HANDLE_PREFIX: &str = "vxlan-tunnel-addr.";

/// The handle holding `node`'s tunnel address.
pub fn tunnel_handle(node: &str) -> String {
    format!("{TUNNEL_HANDLE_PREFIX}{node}")
}

impl IpamState {
    /// Whether nodes need a tunnel address: an IPv4 VXLAN pool exists (its
    /// remote blocks are routed through every node's `vxlan.tabby`, also
    /// while it is disabled, as long as its pods live).
    fn wants_tunnels(&self) -> bool {
        self.pools.values().any(|p| {
            p.rec.cidr.addr().is_ipv4()
                && matches!(
                    p.rec.encapsulation,
                    Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet
                )
        })
    }

    /// `node`'s tunnel address, if it holds one.
    pub fn tunnel_address(&self, node: &str) -> Option<IpAddr> {
        self.handles
            .get(tunnel_handle(node).as_str())
            .and_then(|h| h.addresses.iter().find(|a| a.is_ipv4()).copied())
    }

    /// Assigns or releases tunnel addresses so that every node holds one
    /// exactly while an IPv4 VXLAN pool exists (only `only`, when given). Appends
    /// the changes to `m`. A node that cannot get one (its pools are full)
    /// is left without: its peers report it, and the next change retries.
    pub(crate) fn reconcile_tunnels(&mut self, only: Option<&str>, m: &mut Mutation) {
        let nodes: Vec<Node> = match only {
            Some(n) => self.nodes.get(n).cloned().into_iter().collect(),
            None => self.nodes.values().cloned().collect(),
        };
        let want = self.wants_tunnels();
        for n in nodes {
            let handle = tunnel_handle(&n.name);
            let has = self.handles.contains_key(handle.as_str());
            if want && !has {
                let req = AssignRequest {
                    handle,
                    attributes: BTreeMap::from([("type".into(), "vxlanTunnelAddress".into())]),
                    num_v4: 1,
                    num_v6: 0,
                    requested: Vec::new(),
                };
                match self.assign(&n.name, req) {
                    Ok((_, more)) => m.ops.extend(more.ops),
                    Err(e) => {
                        tracing::warn!(node = %n.name, error = %e, "no VXLAN tunnel address for node")
                    }
                }
            } else if !want && has {
                if let Ok((_, more)) = self.release_handle(None, &handle) {
                    m.ops.extend(more.ops);
                }
            }
        }
    }
}
