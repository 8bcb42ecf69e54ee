//! Nodes and configuration.
use super::{addr::addr_at, records::NodeDeletion, validate::check_name, IpamState};
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
        if self.nodes.get(&n.name) == Some(&n) {
            return Ok((n, Mutation::default()));
        }
        self.nodes.insert(n.name.clone(), n.clone());
        Ok((
            n.clone(),
            Mutation {
                ops: vec![Op::PutNode(n)],
            },
        ))
    }

    /// Deletes a node: its empty blocks go, blocks in use are reported.
    pub fn delete_node(&mut self, name: &str) -> Result<(NodeDeletion, Mutation)> {
        if !self.nodes.contains_key(name) && !self.node_blocks.contains_key(name) {
            return Err(Error::NotFound(format!(
                "node {name:?} is not registered; ListNodes shows the nodes"
            )));
        }
        let mut out = NodeDeletion::default();
        let mut ops = Vec::new();
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
    pub fn set_config(
        &mut self,
        strict_affinity: Option<bool>,
        max_blocks_per_node: Option<u32>,
    ) -> Result<(IpamConfig, Mutation)> {
        let mut c = self.config;
        if let Some(v) = strict_affinity {
            c.strict_affinity = v;
        }
        if let Some(v) = max_blocks_per_node {
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
