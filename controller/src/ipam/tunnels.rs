//! VXLAN tunnel addresses: one per node and family while a VXLAN pool of
//! that family exists, taken from the pools that select the node like a
//! pod's and held under handle `vxlan-tunnel-addr.<node>` like any pod's
//! address (so `ShowIpam`, `GetAllocation` and `CheckIpam` see it), and
//! released when no such pool selects the node any more or the node goes.
use super::{records::AssignRequest, IpamState};
use std::{collections::BTreeMap, net::IpAddr};
use tabby_store::{Encapsulation, Mutation, Node};

/// The handle of a node's tunnel address.
pub const TUNNEL_HANDLE_PREFIX: &str = "vxlan-tunnel-addr.";
/// The handle of a node's IPv6 tunnel address.
pub const TUNNEL_V6_HANDLE_PREFIX: &str = "vxlan-v6-tunnel-addr.";

/// The handle holding `node`'s tunnel address.
pub fn tunnel_handle(node: &str) -> String {
    format!("{TUNNEL_HANDLE_PREFIX}{node}")
}

/// The handle holding `node`'s IPv6 tunnel address.
pub fn tunnel_v6_handle(node: &str) -> String {
    format!("{TUNNEL_V6_HANDLE_PREFIX}{node}")
}

/// The node a tunnel address handle belongs to, if it is one.
pub fn tunnel_handle_node(handle: &str) -> Option<&str> {
    handle
        .strip_prefix(TUNNEL_HANDLE_PREFIX)
        .or_else(|| handle.strip_prefix(TUNNEL_V6_HANDLE_PREFIX))
}

impl IpamState {
    /// Whether nodes need a tunnel address: an IPv4 VXLAN pool exists (its
    /// remote blocks are routed through every node's `vxlan.tabby`, also
    /// while it is disabled, as long as its pods live).
    fn wants_tunnels(&self, v4: bool) -> bool {
        self.pools.values().any(|p| {
            p.rec.cidr.addr().is_ipv4() == v4
                && matches!(
                    p.rec.encapsulation,
                    Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet
                )
        })
    }

    /// `node`'s tunnel address, if it holds one.
    pub fn tunnel_address(&self, node: &str) -> Option<IpAddr> {
        if self.tunnel_handles == 0 {
            return None;
        }
        self.handles
            .get(tunnel_handle(node).as_str())
            .and_then(|h| h.addresses.iter().find(|a| a.is_ipv4()).copied())
    }

    /// `node`'s IPv6 tunnel address, if it holds one.
    pub fn tunnel_v6_address(&self, node: &str) -> Option<IpAddr> {
        if self.tunnel_handles == 0 {
            return None;
        }
        self.handles
            .get(tunnel_v6_handle(node).as_str())
            .and_then(|h| h.addresses.iter().find(|a| a.is_ipv6()).copied())
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
        for v4 in [true, false] {
            let want = self.wants_tunnels(v4);
            for n in &nodes {
                let handle = if v4 {
                    tunnel_handle(&n.name)
                } else {
                    tunnel_v6_handle(&n.name)
                };
                let has = self.handles.contains_key(handle.as_str());
                if want && !has {
                    let req = AssignRequest {
                        handle,
                        attributes: BTreeMap::from([(
                            "type".into(),
                            if v4 {
                                "vxlanTunnelAddress"
                            } else {
                                "vxlanV6TunnelAddress"
                            }
                            .into(),
                        )]),
                        num_v4: u32::from(v4),
                        num_v6: u32::from(!v4),
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
}
