//! Conversions between the store's and IPAM's plain data and protobuf. The
//! one place that knows both shapes; services and intent only call it.
use crate::{
    error::{Error, Result},
    ipam::{
        parse_addr, parse_cidr, AllocationView, AssignRequest, ConfigUpdate, IpamState, PoolUpdate,
    },
};
use std::{collections::BTreeMap, net::IpAddr};
use tabby_proto::v1 as pb;
use tabby_store::{Attributes, Block, Encapsulation, IpamConfig, Node, Pool};

/// Parses a list of addresses.
pub(crate) fn parse_addrs(v: &[String]) -> Result<Vec<IpAddr>> {
    v.iter().map(|s| parse_addr(s)).collect()
}

/// Converts a protobuf encapsulation to the stored one.
pub(crate) fn encap_from_pb(v: i32) -> Result<Encapsulation> {
    Ok(match pb::Encapsulation::try_from(v) {
        Ok(pb::Encapsulation::None) => Encapsulation::None,
        Ok(pb::Encapsulation::Vxlan) => Encapsulation::Vxlan,
        Ok(pb::Encapsulation::VxlanCrossSubnet) => Encapsulation::VxlanCrossSubnet,
        Ok(pb::Encapsulation::Ipip) => Encapsulation::Ipip,
        Ok(pb::Encapsulation::IpipCrossSubnet) => Encapsulation::IpipCrossSubnet,
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "encapsulation {v} is unknown: use ENCAPSULATION_NONE, _VXLAN, _VXLAN_CROSS_SUBNET, _IPIP or _IPIP_CROSS_SUBNET"
            )))
        }
    })
}

/// Converts a stored encapsulation to its protobuf enum.
pub fn encap_to_pb(e: Encapsulation) -> pb::Encapsulation {
    match e {
        Encapsulation::None => pb::Encapsulation::None,
        Encapsulation::Vxlan => pb::Encapsulation::Vxlan,
        Encapsulation::VxlanCrossSubnet => pb::Encapsulation::VxlanCrossSubnet,
        Encapsulation::Ipip => pb::Encapsulation::Ipip,
        Encapsulation::IpipCrossSubnet => pb::Encapsulation::IpipCrossSubnet,
    }
}

/// Converts a stored pool to protobuf.
pub fn pool_to_pb(p: &Pool) -> pb::Pool {
    pb::Pool {
        name: p.name.clone(),
        cidr: p.cidr.to_string(),
        block_size: p.block_size as u32,
        nat_outgoing: p.nat_outgoing,
        encapsulation: encap_to_pb(p.encapsulation) as i32,
        disabled: p.disabled,
        node_selector: p.node_selector.clone(),
    }
}

/// Converts a protobuf pool to a stored one; validates the CIDR and block size.
pub(crate) fn pool_from_pb(p: pb::Pool) -> Result<Pool> {
    let block_size = u8::try_from(p.block_size).map_err(|_| {
        Error::InvalidArgument(format!("block size /{} is out of range", p.block_size))
    })?;
    Ok(Pool {
        cidr: parse_cidr(&p.cidr)?,
        name: p.name,
        block_size,
        nat_outgoing: p.nat_outgoing,
        encapsulation: encap_from_pb(p.encapsulation)?,
        disabled: p.disabled,
        node_selector: p.node_selector,
    })
}

/// Converts a stored node to protobuf (node lists and intent alike), with
/// its tunnel address if it holds one. An address prints with its prefix
/// unless that is a host prefix.
pub fn node_to_pb(n: &Node, tunnel: Option<IpAddr>, tunnel_v6: Option<IpAddr>) -> pb::Node {
    pb::Node {
        name: n.name.clone(),
        addresses: n
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let host = if a.is_ipv4() { 32 } else { 128 };
                match n.prefix_lens.get(i) {
                    Some(l) if *l < host => format!("{a}/{l}"),
                    _ => a.to_string(),
                }
            })
            .collect(),
        labels: n.labels.clone().into_iter().collect(),
        vxlan_tunnel_address: tunnel.map(|a| a.to_string()).unwrap_or_default(),
        vxlan_mac: tunnel
            .map(|_| tabby_routing::mac_string(&tabby_routing::vtep_mac(&n.name)))
            .unwrap_or_default(),
        vxlan_v6_tunnel_address: tunnel_v6.map(|a| a.to_string()).unwrap_or_default(),
        vxlan_v6_mac: tunnel_v6
            .map(|_| tabby_routing::mac_string(&tabby_routing::vtep_mac_v6(&n.name)))
            .unwrap_or_default(),
    }
}

/// A node as the API shows it, with its tunnel address from `s`.
pub fn node_pb(s: &IpamState, n: &Node) -> pb::Node {
    node_to_pb(n, s.tunnel_address(&n.name), s.tunnel_v6_address(&n.name))
}

/// The configuration as the API shows it: VXLAN defaults filled in.
pub(crate) fn config_to_pb(c: &IpamConfig) -> pb::IpamConfig {
    let v = vxlan_settings(c);
    pb::IpamConfig {
        strict_affinity: c.strict_affinity,
        max_blocks_per_node: c.max_blocks_per_node,
        vxlan_vni: v.vni,
        vxlan_port: u32::from(v.port),
    }
}

/// The VXLAN settings a stored configuration means (0: the default).
pub fn vxlan_settings(c: &IpamConfig) -> tabby_routing::VxlanSettings {
    let d = tabby_routing::VxlanSettings::default();
    tabby_routing::VxlanSettings {
        vni: if c.vxlan_vni == 0 { d.vni } else { c.vxlan_vni },
        port: if c.vxlan_port == 0 {
            d.port
        } else {
            c.vxlan_port
        },
    }
}

/// A SetIpamConfig request, as the IPAM takes it.
pub(crate) fn config_update_from_pb(r: &pb::SetIpamConfigRequest) -> ConfigUpdate {
    ConfigUpdate {
        strict_affinity: r.strict_affinity,
        max_blocks_per_node: r.max_blocks_per_node,
        vxlan_vni: r.vxlan_vni,
        vxlan_port: r.vxlan_port,
    }
}

/// A node's addresses as they are reported: `172.18.0.3/24` (the address
/// and its interface prefix) or a bare address (a host prefix). Host bits
/// are the point here, so they are kept.
pub(crate) fn parse_node_addrs(v: &[String]) -> Result<(Vec<IpAddr>, Vec<u8>)> {
    let mut addrs = Vec::with_capacity(v.len());
    let mut lens = Vec::with_capacity(v.len());
    for s in v {
        match s.split_once('/') {
            Some((a, l)) => {
                let a = parse_addr(a)?;
                let max = if a.is_ipv4() { 32 } else { 128 };
                let l = l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "node address {s:?}: the prefix length must be 0..={max}"
                    ))
                })?;
                addrs.push(a);
                lens.push(l);
            }
            None => {
                let a = parse_addr(s)?;
                lens.push(if a.is_ipv4() { 32 } else { 128 });
                addrs.push(a);
            }
        }
    }
    Ok((addrs, lens))
}

/// Converts an allocation to protobuf.
pub(crate) fn alloc_to_pb(a: &AllocationView) -> pb::Allocation {
    pb::Allocation {
        address: a.address.to_string(),
        handle: a.handle.clone(),
        node: a.node.clone(),
        block: a.block.to_string(),
        block_affinity: a.block_affinity.clone().unwrap_or_default(),
        borrowed: a.borrowed(),
    }
}

/// The answer to a release.
/// A handle's attributes as the API carries them.
pub(crate) fn attributes_to_pb(a: &Attributes) -> std::collections::HashMap<String, String> {
    a.iter()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub(crate) fn release_to_pb(v: Vec<IpAddr>, rev: u64) -> pb::ReleaseResponse {
    pb::ReleaseResponse {
        released: v.iter().map(ToString::to_string).collect(),
        revision: rev,
    }
}

/// Converts a pool to its intent form.
pub(crate) fn intent_pool(p: &Pool) -> pb::IntentPool {
    pb::IntentPool {
        name: p.name.clone(),
        cidr: p.cidr.to_string(),
        nat_outgoing: p.nat_outgoing,
        encapsulation: encap_to_pb(p.encapsulation) as i32,
        disabled: p.disabled,
    }
}

/// Converts a block to its intent form.
pub(crate) fn intent_block(b: &Block) -> pb::IntentBlock {
    pb::IntentBlock {
        cidr: b.cidr.to_string(),
        node: b.affinity.clone().unwrap_or_default(),
        pool: b.pool.clone(),
    }
}

/// Converts one route of the routing model's cluster table to protobuf.
pub fn cluster_route_to_pb(r: tabby_routing::ClusterRoute) -> pb::ClusterRoute {
    pb::ClusterRoute {
        destination: r.destination.to_string(),
        node: r.node,
        next_hop: r.next_hop.map(|h| h.to_string()).unwrap_or_default(),
        kind: r.kind.as_str().into(),
        encapsulation: encap_to_pb(r.encapsulation) as i32,
    }
}

/// An Assign request, as the IPAM takes it (the caller's node apart).
pub(crate) fn assign_from_pb(r: pb::AssignRequest) -> Result<AssignRequest> {
    Ok(AssignRequest {
        handle: r.handle,
        attributes: r.attributes.into_iter().collect(),
        num_v4: r.num_v4,
        num_v6: r.num_v6,
        requested: parse_addrs(&r.requested)?,
    })
}

/// A node record from the protobuf; RegisterNode replaces its name with
/// the caller's.
pub(crate) fn node_from_pb(n: pb::Node) -> Result<Node> {
    let (addresses, prefix_lens) = parse_node_addrs(&n.addresses)?;
    Ok(Node {
        name: n.name,
        addresses,
        labels: n.labels.into_iter().collect::<BTreeMap<_, _>>(),
        prefix_lens,
    })
}

/// An UpdatePool request: the pool's name and the changes.
pub(crate) fn update_from_pb(r: pb::UpdatePoolRequest) -> Result<(String, PoolUpdate)> {
    let u = PoolUpdate {
        nat_outgoing: r.nat_outgoing,
        encapsulation: r.encapsulation.map(encap_from_pb).transpose()?,
        disabled: r.disabled,
        node_selector: r.node_selector,
        cidr: r.cidr,
        block_size: r.block_size,
    };
    Ok((r.name, u))
}

#[cfg(test)]
mod fuzz;
