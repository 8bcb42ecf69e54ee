//! Nodes and configuration.
use super::{
    addr::addr_at,
    records::{ConfigUpdate, NodeDeletion},
    validate::check_name,
    IpamState,
};
use crate::error::{Error, Result};
use ipnet::IpNet;
use tabby_store::{IpamConfig, Mutation, Node, Op};

impl IpamState {
    /// Registers or updates a node.
    pub fn register_node(&mut self, n: Node) -> Result<(Node, Mutation)> {
        check_name("node", &n.name)?;
        for k in n.labels.keys() {
            if k.is_empty()
                || k.len() > 253
                || k.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(Error::InvalidArgument(format!(
                    "label key {k:?} is invalid"
                )));
            }
        }
        if (!n.prefix_lens.is_empty() && n.prefix_lens.len() != n.addresses.len())
            || n.addresses
                .iter()
                .zip(&n.prefix_lens)
                .any(|(a, l)| *l > if a.is_ipv4() { 32 } else { 128 })
        {
            return Err(Error::InvalidArgument(format!(
                "node {:?}: one prefix length per address, within its family's width",
                n.name
            )));
        }
        let mut m = Mutation::default();
        if self.nodes.get(&n.name) != Some(&n) {
            self.nodes.insert(n.name.clone(), n.clone());
            m.ops.push(Op::PutNode(n.clone()));
        }
        // A node (re-)registering gets its tunnel address if it has none.
        self.reconcile_tunnels(Some(&n.name), &mut m);
        Ok((n, m))
    }

    /// Deletes a node: its empty blocks go, blocks in use are reported.
    pub fn delete_node(&mut self, name: &str) -> Result<(NodeDeletion, Mutation)> {
        if !self.nodes.contains_key(name) && !self.node_blocks.contains_key(name) {
            return Err(Error::NotFound(format!(
                "node {name:?} is not registered; ListNodes shows the nodes"
            )));
        }
        let mut out = NodeDeletion::default();
        // Its tunnel address goes with it (it would hold its block).
        let mut ops = Vec::new();
        for handle in [super::tunnel_handle(name), super::tunnel_v6_handle(name)] {
            if self.handles.contains_key(handle.as_str()) {
                ops.extend(self.release_handle(None, &handle)?.1.ops);
            }
        }
        let blocks: Vec<IpNet> = self
            .node_blocks
            .get(name)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for c in blocks {
            if self.blocks[&c].used() == 0 {
                let b = self.remove_block(&c).expect("indexed");
                for &(seq, o) in &b.free {
                    if seq > 0 {
                        ops.push(Op::ClearReleased(addr_at(&c, o)));
                    }
                }
                ops.push(Op::DeleteBlock(c));
                out.blocks_freed.push(c);
            } else {
                out.blocks_in_use.push(c);
            }
        }
        if self.nodes.remove(name).is_some() {
            ops.push(Op::DeleteNode(name.to_string()));
        }
        Ok((out, Mutation { ops }))
    }

    /// Changes the configuration.
    pub fn set_config(&mut self, u: ConfigUpdate) -> Result<(IpamConfig, Mutation)> {
        let mut c = self.config;
        if let Some(v) = u.vxlan_vni {
            if !(1..=0xff_ffff).contains(&v) {
                return Err(Error::InvalidArgument(format!(
                    "vxlan_vni {v} is out of range: use 1..16777215"
                )));
            }
            c.vxlan_vni = v;
        }
        if let Some(v) = u.vxlan_port {
            c.vxlan_port = u16::try_from(v).ok().filter(|p| *p != 0).ok_or_else(|| {
                Error::InvalidArgument(format!("vxlan_port {v} is out of range: use 1..65535"))
            })?;
        }
        if let Some(v) = u.strict_affinity {
            c.strict_affinity = v;
        }
        if let Some(v) = u.max_blocks_per_node {
            c.max_blocks_per_node = v;
        }
        if c == self.config {
            return Ok((c, Mutation::default()));
        }
        self.config = c;
        Ok((
            c,
            Mutation {
                ops: vec![Op::PutConfig(c)],
            },
        ))
    }
}

impl IpamState {
    /// The BGP configuration.
    pub fn bgp(&self) -> &tabby_store::BgpConfig {
        &self.bgp
    }

    /// Replaces the BGP configuration (validated by the caller,
    /// [`crate::bgp::config`]).
    pub fn set_bgp(
        &mut self,
        b: tabby_store::BgpConfig,
    ) -> Result<(tabby_store::BgpConfig, Mutation)> {
        if b == self.bgp {
            return Ok((b, Mutation::default()));
        }
        self.bgp = b.clone();
        Ok((
            b.clone(),
            Mutation {
                ops: vec![Op::PutBgp(b)],
            },
        ))
    }
}
