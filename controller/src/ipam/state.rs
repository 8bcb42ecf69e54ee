//! The in-memory state: its shape, loading it from a snapshot, the derived
//! indices, and read-only lookups.
use super::{
    addr::{addr_at, host_net, ordinal_of},
    records::{AllocationView, BlockState, PoolState, Slot},
    selector::Selector,
};
use ipnet::IpNet;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};
use tabby_store::{Allocation, Block, Handle, IpamConfig, Node, Pool, Snapshot};

/// In-memory IPAM state. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct IpamState {
    pub(super) pools: BTreeMap<String, PoolState>,
    pub(super) blocks: BTreeMap<IpNet, BlockState>,
    pub(super) handles: HashMap<String, Handle>,
    pub(super) nodes: BTreeMap<String, Node>,
    pub(super) config: IpamConfig,
    /// Allocation records that lie in no block (only from a damaged store).
    pub(super) orphans: BTreeMap<IpAddr, Allocation>,
    /// Last release sequence number handed out.
    pub(super) release_seq: u64,
    /// Derived index: blocks affine to each node.
    pub(super) node_blocks: HashMap<String, BTreeSet<IpNet>>,
}

impl IpamState {
    /// Builds the state from a store snapshot. Inconsistent records are kept
    /// (so that `check` can report them), never a reason to fail start-up.
    pub fn from_snapshot(s: Snapshot) -> IpamState {
        let mut st = IpamState {
            config: s.config,
            nodes: s.nodes,
            handles: s.handles.into_iter().collect(),
            ..Default::default()
        };
        for (name, p) in s.pools {
            // A stored selector was validated on write; fall back to "none
            // selected" rather than "all" if it somehow no longer parses.
            let selector = Selector::parse(&p.node_selector)
                .unwrap_or_else(|_| Selector::parse("has(tabby.invalid-selector)").expect("valid"));
            st.pools.insert(name, PoolState { rec: p, selector });
        }
        for (cidr, b) in s.blocks {
            st.index_block(&b);
            st.blocks.insert(cidr, BlockState::new(b));
        }
        for (addr, seq) in &s.released {
            if let Some(b) = st.block_containing_mut(*addr) {
                let o = ordinal_of(&b.rec.cidr, *addr);
                b.free.remove(&(0, o));
                b.free.insert((*seq, o));
                b.slots[o as usize] = Slot::Free { seq: *seq };
            }
            st.release_seq = st.release_seq.max(*seq);
        }
        for (addr, a) in s.allocations {
            match st.block_containing_mut(addr) {
                Some(b) => {
                    let o = ordinal_of(&b.rec.cidr, addr);
                    if let Slot::Free { seq } = b.slots[o as usize] {
                        b.free.remove(&(seq, o));
                    }
                    b.slots[o as usize] = Slot::Used(a);
                }
                None => {
                    st.orphans.insert(addr, a);
                }
            }
        }
        st
    }

    pub(super) fn index_block(&mut self, b: &Block) {
        if let Some(n) = &b.affinity {
            self.node_blocks
                .entry(n.clone())
                .or_default()
                .insert(b.cidr);
        }
    }

    pub(super) fn unindex_block(&mut self, b: &Block) {
        if let Some(n) = &b.affinity {
            if let Some(set) = self.node_blocks.get_mut(n) {
                set.remove(&b.cidr);
                if set.is_empty() {
                    self.node_blocks.remove(n);
                }
            }
        }
    }

    pub(super) fn block_key_containing(&self, a: IpAddr) -> Option<IpNet> {
        self.blocks
            .range(..=host_net(a))
            .next_back()
            .filter(|(c, _)| c.contains(&a))
            .map(|(c, _)| *c)
    }

    fn block_containing_mut(&mut self, a: IpAddr) -> Option<&mut BlockState> {
        let k = self.block_key_containing(a)?;
        self.blocks.get_mut(&k)
    }

    pub(super) fn pool_containing(&self, a: IpAddr) -> Option<&PoolState> {
        self.pools.values().find(|p| p.rec.cidr.contains(&a))
    }

    /// Current configuration.
    pub fn config(&self) -> IpamConfig {
        self.config
    }

    /// Every pool, by name.
    pub fn pools(&self) -> Vec<Pool> {
        self.pools.values().map(|p| p.rec.clone()).collect()
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.values().cloned().collect()
    }

    /// A handle, if it exists.
    pub fn handle(&self, h: &str) -> Option<&Handle> {
        self.handles.get(h)
    }

    /// Handles held by a node, sorted.
    pub fn handles_of(&self, node: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .handles
            .iter()
            .filter(|(_, h)| h.node == node)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Every allocation, by address (from blocks; orphans excluded).
    pub fn allocations(&self) -> Vec<AllocationView> {
        let mut v = Vec::new();
        for b in self.blocks.values() {
            for (o, s) in b.slots.iter().enumerate() {
                if let Slot::Used(a) = s {
                    v.push(self.view(b, o as u32, a));
                }
            }
        }
        v
    }

    fn view(&self, b: &BlockState, ordinal: u32, a: &Allocation) -> AllocationView {
        AllocationView {
            address: addr_at(&b.rec.cidr, ordinal),
            handle: a.handle.clone(),
            node: a.node.clone(),
            block: b.rec.cidr,
            block_affinity: b.rec.affinity.clone(),
        }
    }

    /// Every block record, by CIDR.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.blocks.values().map(|b| &b.rec)
    }

    /// A block record.
    pub fn block(&self, cidr: &IpNet) -> Option<&Block> {
        self.blocks.get(cidr).map(|b| &b.rec)
    }

    /// A node.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Who holds an address, if anyone.
    pub fn allocation_of(&self, a: IpAddr) -> Option<AllocationView> {
        let k = self.block_key_containing(a)?;
        let b = &self.blocks[&k];
        let o = ordinal_of(&k, a);
        match &b.slots[o as usize] {
            Slot::Used(al) => Some(self.view(b, o, al)),
            Slot::Free { .. } => None,
        }
    }

    /// Who holds `a`, also when it lies in no block (a damaged store).
    pub(super) fn holder(&self, a: IpAddr) -> Option<&Allocation> {
        if let Some(k) = self.block_key_containing(a) {
            if let Slot::Used(al) = &self.blocks[&k].slots[ordinal_of(&k, a) as usize] {
                return Some(al);
            }
        }
        self.orphans.get(&a)
    }
}
