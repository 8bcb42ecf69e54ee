//! The typed records kept in the store.
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, net::IpAddr};

pub use crate::attributes::{Attributes, Iter as AttributeIter};
pub use tabby_routing::Encapsulation;

/// An IP pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Unique name.
    pub name: String,
    /// The pool's network (host bits zero).
    pub cidr: IpNet,
    /// Prefix length of its blocks.
    pub block_size: u8,
    /// Masquerade egress to outside all pools.
    pub nat_outgoing: bool,
    /// Inter-node transport.
    pub encapsulation: Encapsulation,
    /// No new assignments when set.
    pub disabled: bool,
    /// Selector over node labels; empty selects every node.
    pub node_selector: String,
}

/// A block carved from a pool. Which of its addresses are allocated is kept
/// in [`Allocation`] records, so an assignment rewrites no block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The block's network.
    pub cidr: IpNet,
    /// Name of the pool it belongs to.
    pub pool: String,
    /// Node the block is affine to, if any.
    pub affinity: Option<String>,
}

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The handle holding it.
    pub handle: String,
    /// The node holding it.
    pub node: String,
}

/// A handle: what one workload holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Handle {
    /// The node the workload runs on.
    pub node: String,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// Attributes given at assignment (pod namespace, name, ...).
    pub attributes: Attributes,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Addresses other nodes route to.
    pub addresses: Vec<IpAddr>,
    /// Labels matched by pool selectors.
    pub labels: BTreeMap<String, String>,
    /// The interface prefix length of each address, in the same order
    /// (CrossSubnet compares subnets); empty for a node that reported none,
    /// whose addresses count as host prefixes.
    pub prefix_lens: Vec<u8>,
}

/// A node as stores before prefix lengths were kept wrote it (postcard has
/// no optional trailing fields: such records decode through this).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeV1 {
    /// Node name.
    pub name: String,
    /// Addresses other nodes route to.
    pub addresses: Vec<IpAddr>,
    /// Labels matched by pool selectors.
    pub labels: BTreeMap<String, String>,
}

impl From<NodeV1> for Node {
    fn from(n: NodeV1) -> Node {
        Node {
            name: n.name,
            addresses: n.addresses,
            labels: n.labels,
            prefix_lens: Vec::new(),
        }
    }
}

/// The controller's BGP configuration: the speaker and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BgpConfig {
    /// Speak BGP at all.
    pub enabled: bool,
    /// The cluster's AS number (0: the default, 64512).
    pub asn: u32,
    /// The router id (None: derived from the controller's address).
    pub router_id: Option<std::net::Ipv4Addr>,
    /// Where passive sessions are accepted (None: the controller's gRPC
    /// address, port 179).
    pub listen: Option<std::net::SocketAddr>,
    /// The peers, by address.
    pub peers: Vec<BgpPeer>,
}

/// One BGP peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpPeer {
    /// The peer's address.
    pub address: IpAddr,
    /// Its AS number.
    pub remote_asn: u32,
    /// Wait for the peer to connect instead of connecting.
    pub passive: bool,
    /// Proposed hold time, seconds (0 or 3..=65535).
    pub hold_time: u16,
    /// Keepalive interval, seconds (0: a third of the negotiated hold time).
    pub keepalive: u16,
    /// TCP-MD5 password (empty: none).
    pub password: String,
    /// Nodes holding their own session (empty: the controller holds it).
    pub node_selector: String,
    /// Pools whose blocks are advertised (empty: every pool).
    pub export_pools: Vec<String>,
    /// Only destinations inside these prefixes are advertised (empty: no
    /// restriction).
    pub export_prefixes: Vec<ipnet::IpNet>,
    /// Communities attached to every advertised route (`asn:value` as one
    /// 32-bit number each).
    pub communities: Vec<u32>,
    /// Received routes inside these prefixes are accepted (empty: none).
    pub import_prefixes: Vec<ipnet::IpNet>,
}

/// IPAM-wide configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IpamConfig {
    /// Never borrow from other nodes' blocks.
    pub strict_affinity: bool,
    /// Limit of blocks per node; 0 is unlimited.
    pub max_blocks_per_node: u32,
    /// VXLAN network identifier; 0 means the default (4096).
    pub vxlan_vni: u32,
    /// VXLAN UDP port; 0 means the default (4789).
    pub vxlan_port: u16,
}

/// The configuration as stores before the VXLAN settings wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IpamConfigV1 {
    /// Never borrow from other nodes' blocks.
    pub strict_affinity: bool,
    /// Limit of blocks per node; 0 is unlimited.
    pub max_blocks_per_node: u32,
}

impl From<IpamConfigV1> for IpamConfig {
    fn from(c: IpamConfigV1) -> IpamConfig {
        IpamConfig {
            strict_affinity: c.strict_affinity,
            max_blocks_per_node: c.max_blocks_per_node,
            ..Default::default()
        }
    }
}
