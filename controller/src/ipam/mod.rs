//! IP address management: pure logic.
//!
//! [`IpamState`] is the in-memory picture of pools, blocks, allocations,
//! handles, nodes and config. Every operation validates first and changes
//! nothing on error; on success it updates the state and returns the
//! [`Mutation`] that makes the same change durable. The owner task
//! ([`crate::owner`]) commits that mutation before anyone hears the answer.

pub mod selector;

use crate::error::{Error, Result};
use ipnet::IpNet;
use selector::Selector;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};
use tabby_store::{
    Allocation, Block, Encapsulation, Handle, IpamConfig, Mutation, Node, Op, Pool, Snapshot,
};

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Family of a network.
    pub fn of_net(n: &IpNet) -> Family {
        match n {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
    /// Family of an address.
    pub fn of(a: &IpAddr) -> Family {
        match a {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    /// Allowed block sizes and the default.
    fn block_sizes(self) -> (std::ops::RangeInclusive<u8>, u8) {
        match self {
            Family::V4 => (20..=32, 26),
            Family::V6 => (116..=128, 122),
        }
    }
}

fn addr_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

fn u128_addr(f: Family, v: u128) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// Number of addresses in a block (blocks are /20../32 or /116../128, so it fits).
fn block_len(cidr: &IpNet) -> u32 {
    1u32 << (cidr.max_prefix_len() - cidr.prefix_len())
}

fn addr_at(cidr: &IpNet, ordinal: u32) -> IpAddr {
    u128_addr(
        Family::of_net(cidr),
        addr_u128(cidr.network()) + ordinal as u128,
    )
}

fn ordinal_of(cidr: &IpNet, a: IpAddr) -> u32 {
    (addr_u128(a) - addr_u128(cidr.network())) as u32
}

/// The block of size `prefix` that contains `a`.
fn block_of(a: IpAddr, prefix: u8) -> IpNet {
    IpNet::new(a, prefix).expect("prefix validated").trunc()
}

fn host_net(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

/// Parses a CIDR whose host bits must be zero.
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    let n: IpNet = s.trim().parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{s:?} is not a CIDR; write it as address/prefix, e.g. 10.244.0.0/16 or fd00:10:244::/48"
        ))
    })?;
    if n.trunc() != n {
        return Err(Error::InvalidArgument(format!(
            "{n} has host bits set; did you mean {}?",
            n.trunc()
        )));
    }
    Ok(n)
}

/// Parses an IP address.
pub fn parse_addr(s: &str) -> Result<IpAddr> {
    s.trim().parse().map_err(|_| {
        Error::InvalidArgument(format!("{s:?} is not an IP address (e.g. 10.244.1.5)"))
    })
}

fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} name {s:?} is invalid: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        )))
    }
}

fn check_handle(h: &str) -> Result<()> {
    if h.is_empty() || h.len() > 512 || h.chars().any(|c| c.is_control() || c == '/') {
        return Err(Error::InvalidArgument(format!(
            "handle {h:?} is invalid: want <network-name>.<container-id>, 1..512 printable characters, no '/'"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Slot {
    /// Free; `seq` is the release order (0: never released).
    Free {
        seq: u64,
    },
    Used(Allocation),
}

#[derive(Debug, Clone)]
struct BlockState {
    rec: Block,
    slots: Vec<Slot>,
    /// Free ordinals ordered by (release seq, ordinal): least recently released first.
    free: BTreeSet<(u64, u32)>,
}

impl BlockState {
    fn new(rec: Block) -> BlockState {
        let n = block_len(&rec.cidr);
        BlockState {
            rec,
            slots: vec![Slot::Free { seq: 0 }; n as usize],
            free: (0..n).map(|o| (0, o)).collect(),
        }
    }
    fn used(&self) -> u32 {
        self.slots.len() as u32 - self.free.len() as u32
    }
}

#[derive(Debug, Clone)]
struct PoolState {
    rec: Pool,
    selector: Selector,
}

/// Where an assignment will come from (planned before anything changes).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pick {
    /// A free ordinal of an existing block.
    Existing { block: IpNet, ordinal: u32 },
    /// A new block claimed for the node, and an ordinal in it.
    Claim {
        block: IpNet,
        pool: String,
        ordinal: u32,
    },
}

/// One assigned address as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationView {
    /// The address.
    pub address: IpAddr,
    /// The handle holding it.
    pub handle: String,
    /// The node holding it.
    pub node: String,
    /// Its block.
    pub block: IpNet,
    /// Node the block is affine to.
    pub block_affinity: Option<String>,
}

impl AllocationView {
    /// Borrowed from another node's block.
    pub fn borrowed(&self) -> bool {
        self.block_affinity.as_deref() != Some(self.node.as_str())
    }
}

/// What to assign.
#[derive(Debug, Clone, Default)]
pub struct AssignRequest {
    /// Handle id.
    pub handle: String,
    /// Attributes kept with the handle.
    pub attributes: BTreeMap<String, String>,
    /// IPv4 addresses wanted (0 or 1).
    pub num_v4: u32,
    /// IPv6 addresses wanted (0 or 1).
    pub num_v6: u32,
    /// Specific addresses wanted.
    pub requested: Vec<IpAddr>,
}

/// Changes to a pool; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct PoolUpdate {
    /// New nat_outgoing.
    pub nat_outgoing: Option<bool>,
    /// New encapsulation.
    pub encapsulation: Option<Encapsulation>,
    /// New disabled flag.
    pub disabled: Option<bool>,
    /// New node selector.
    pub node_selector: Option<String>,
    /// Must equal the current CIDR if given.
    pub cidr: Option<String>,
    /// Must equal the current block size if given.
    pub block_size: Option<u32>,
}

/// Utilization of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    /// The pool.
    pub pool: Pool,
    /// Addresses in the pool (saturating).
    pub size: u64,
    /// Blocks claimed.
    pub blocks: u64,
    /// Addresses allocated.
    pub used: u64,
}

/// Utilization of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeUsage {
    /// Node name.
    pub name: String,
    /// Affine blocks.
    pub blocks: Vec<IpNet>,
    /// Addresses held.
    pub addresses: u64,
    /// Of which borrowed.
    pub borrowed: u64,
}

/// Utilization of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUsage {
    /// The block record.
    pub block: Block,
    /// Addresses in it.
    pub size: u64,
    /// Allocated.
    pub used: u64,
}

/// The whole `ShowIpam` view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpamUsage {
    /// Per pool.
    pub pools: Vec<PoolUsage>,
    /// Per node (registered or holding blocks/addresses).
    pub nodes: Vec<NodeUsage>,
    /// Per block.
    pub blocks: Vec<BlockUsage>,
}

/// Kinds of inconsistency `check` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Allocated address whose handle does not list it.
    AddressWithoutHandle,
    /// Handle lists an address not allocated to it.
    HandlePointsNowhere,
    /// Block in no pool.
    BlockOutsidePools,
    /// Block affine to an unregistered node.
    BlockOfUnknownNode,
    /// Borrowed address (informational).
    BorrowedAddress,
}

/// One problem found by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What kind.
    pub kind: ProblemKind,
    /// Address concerned.
    pub address: Option<IpAddr>,
    /// Handle concerned.
    pub handle: Option<String>,
    /// Block concerned.
    pub block: Option<IpNet>,
    /// Explanation and fix.
    pub detail: String,
    /// Fixed by `release_leaked(repair = true)`.
    pub repairable: bool,
}

/// Result of an admin release.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeakRelease {
    /// Addresses released.
    pub released: Vec<IpAddr>,
    /// Listed addresses that were not allocated.
    pub not_allocated: Vec<IpAddr>,
    /// Dangling handle records removed.
    pub handles_removed: Vec<String>,
}

/// Result of deleting a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeDeletion {
    /// Empty blocks removed.
    pub blocks_freed: Vec<IpNet>,
    /// Blocks still holding addresses.
    pub blocks_in_use: Vec<IpNet>,
}

/// In-memory IPAM state. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct IpamState {
    pools: BTreeMap<String, PoolState>,
    blocks: BTreeMap<IpNet, BlockState>,
    handles: HashMap<String, Handle>,
    nodes: BTreeMap<String, Node>,
    config: IpamConfig,
    /// Allocation records that lie in no block (only from a damaged store).
    orphans: BTreeMap<IpAddr, Allocation>,
    /// Last release sequence number handed out.
    release_seq: u64,
    /// Derived index: blocks affine to each node.
    node_blocks: HashMap<String, BTreeSet<IpNet>>,
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

    fn index_block(&mut self, b: &Block) {
        if let Some(n) = &b.affinity {
            self.node_blocks
                .entry(n.clone())
                .or_default()
                .insert(b.cidr);
        }
    }

    fn unindex_block(&mut self, b: &Block) {
        if let Some(n) = &b.affinity {
            if let Some(set) = self.node_blocks.get_mut(n) {
                set.remove(&b.cidr);
                if set.is_empty() {
                    self.node_blocks.remove(n);
                }
            }
        }
    }

    fn block_key_containing(&self, a: IpAddr) -> Option<IpNet> {
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

    fn pool_containing(&self, a: IpAddr) -> Option<&PoolState> {
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

    // ----- pools -------------------------------------------------------

    /// Creates a pool.
    pub fn create_pool(&mut self, mut p: Pool) -> Result<(Pool, Mutation)> {
        check_name("pool", &p.name)?;
        if self.pools.contains_key(&p.name) {
            return Err(Error::AlreadyExists(format!(
                "pool {:?} exists already; use UpdatePool to change it",
                p.name
            )));
        }
        if p.cidr.trunc() != p.cidr {
            return Err(Error::InvalidArgument(format!(
                "{} has host bits set; did you mean {}?",
                p.cidr,
                p.cidr.trunc()
            )));
        }
        let fam = Family::of_net(&p.cidr);
        let (range, default) = fam.block_sizes();
        if p.block_size == 0 {
            p.block_size = default.max(p.cidr.prefix_len());
        }
        if !range.contains(&p.block_size) {
            return Err(Error::InvalidArgument(format!(
                "block size /{} is out of range for {}: use {}..{} (default {})",
                p.block_size,
                fam.name(),
                range.start(),
                range.end(),
                default
            )));
        }
        if p.block_size < p.cidr.prefix_len() {
            return Err(Error::InvalidArgument(format!(
                "block size /{} is larger than the pool {}; use a block size of at least /{}",
                p.block_size,
                p.cidr,
                p.cidr.prefix_len()
            )));
        }
        if let Some(o) = self.pools.values().find(|o| {
            o.rec.cidr.contains(&p.cidr.network()) || p.cidr.contains(&o.rec.cidr.network())
        }) {
            return Err(Error::InvalidArgument(format!(
                "{} overlaps pool {:?} ({}); pools must not overlap",
                p.cidr, o.rec.name, o.rec.cidr
            )));
        }
        let selector = Selector::parse(&p.node_selector)
            .map_err(|e| Error::InvalidArgument(format!("node_selector: {e}")))?;
        self.pools.insert(
            p.name.clone(),
            PoolState {
                rec: p.clone(),
                selector,
            },
        );
        let m = Mutation {
            ops: vec![Op::PutPool(p.clone())],
        };
        Ok((p, m))
    }

    /// Changes a pool's mutable fields.
    pub fn update_pool(&mut self, name: &str, u: PoolUpdate) -> Result<(Pool, Mutation)> {
        let cur = self.pools.get(name).ok_or_else(|| {
            Error::NotFound(format!(
                "pool {name:?} does not exist; ListPools shows the pools"
            ))
        })?;
        if let Some(c) = &u.cidr {
            if parse_cidr(c)? != cur.rec.cidr {
                return Err(Error::InvalidArgument(format!(
                    "cidr of pool {name:?} is immutable ({}); create a new pool instead",
                    cur.rec.cidr
                )));
            }
        }
        if let Some(bs) = u.block_size {
            if bs != cur.rec.block_size as u32 {
                return Err(Error::InvalidArgument(format!(
                    "block_size of pool {name:?} is immutable (/{}); create a new pool instead",
                    cur.rec.block_size
                )));
            }
        }
        let mut p = cur.rec.clone();
        let mut selector = cur.selector.clone();
        if let Some(s) = u.node_selector {
            selector = Selector::parse(&s)
                .map_err(|e| Error::InvalidArgument(format!("node_selector: {e}")))?;
            p.node_selector = s;
        }
        if let Some(v) = u.nat_outgoing {
            p.nat_outgoing = v;
        }
        if let Some(v) = u.encapsulation {
            p.encapsulation = v;
        }
        if let Some(v) = u.disabled {
            p.disabled = v;
        }
        self.pools.insert(
            name.to_string(),
            PoolState {
                rec: p.clone(),
                selector,
            },
        );
        Ok((
            p.clone(),
            Mutation {
                ops: vec![Op::PutPool(p)],
            },
        ))
    }

    fn blocks_in(&self, cidr: &IpNet) -> Vec<IpNet> {
        self.blocks
            .range(IpNet::new(cidr.network(), 0).expect("valid")..)
            .take_while(|(c, _)| cidr.contains(&c.network()))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Deletes a pool that holds no allocations, with its (empty) blocks.
    pub fn delete_pool(&mut self, name: &str) -> Result<((Pool, u32), Mutation)> {
        let p = self.pools.get(name).ok_or_else(|| {
            Error::NotFound(format!(
                "pool {name:?} does not exist; ListPools shows the pools"
            ))
        })?;
        let cidr = p.rec.cidr;
        let blocks: Vec<IpNet> = self
            .blocks
            .iter()
            .filter(|(c, b)| b.rec.pool == name || cidr.contains(&c.network()))
            .map(|(c, _)| *c)
            .collect();
        let used: u64 = blocks.iter().map(|c| self.blocks[c].used() as u64).sum();
        if used > 0 {
            return Err(Error::FailedPrecondition(format!(
                "pool {name:?} still has {used} allocated address(es) in {} block(s); disable it \
                 (UpdatePool disabled=true) so no new pods get its addresses, drain those pods, then delete it",
                blocks.len()
            )));
        }
        let p = self.pools.remove(name).expect("checked").rec;
        let mut ops = vec![Op::DeletePool(name.to_string())];
        for c in &blocks {
            let b = self.blocks.remove(c).expect("listed");
            self.unindex_block(&b.rec);
            for (seq, o) in b.free {
                if seq > 0 {
                    ops.push(Op::ClearReleased(addr_at(c, o)));
                }
            }
            ops.push(Op::DeleteBlock(*c));
        }
        Ok(((p, blocks.len() as u32), Mutation { ops }))
    }

    // ----- nodes and config ------------------------------------------

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
                let b = self.blocks.remove(&c).expect("indexed");
                self.unindex_block(&b.rec);
                for (seq, o) in b.free {
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

    // ----- assignment --------------------------------------------------

    fn eligible_pools(&self, fam: Family, node: &Node) -> Vec<&PoolState> {
        self.pools
            .values()
            .filter(|p| {
                Family::of_net(&p.rec.cidr) == fam
                    && !p.rec.disabled
                    && p.selector.matches(&node.labels)
            })
            .collect()
    }

    fn first_free_block(&self, p: &Pool, planned: &[Pick]) -> Option<IpNet> {
        let step: u128 = 1u128 << (p.cidr.max_prefix_len() - p.block_size);
        let count: u128 = 1u128
            .checked_shl((p.block_size - p.cidr.prefix_len()) as u32)
            .unwrap_or(u128::MAX);
        let base = addr_u128(p.cidr.network());
        let fam = Family::of_net(&p.cidr);
        let mut i: u128 = 0;
        while i < count {
            let c = IpNet::new(u128_addr(fam, base + i * step), p.block_size).expect("valid");
            let taken = self.blocks.contains_key(&c)
                || planned
                    .iter()
                    .any(|x| matches!(x, Pick::Claim { block, .. } if *block == c));
            if !taken {
                return Some(c);
            }
            i += 1;
        }
        None
    }

    fn plan_any(&self, fam: Family, node: &Node) -> Result<Pick> {
        let pools = self.eligible_pools(fam, node);
        if pools.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "no enabled {} pool selects node {:?}; create one (CreatePool) or check pool node selectors and the node's labels",
                fam.name(),
                node.name
            )));
        }
        let pool_names: BTreeSet<&str> = pools.iter().map(|p| p.rec.name.as_str()).collect();
        // 1. The node's own blocks: the least recently released free address
        // over all of them (never-used ones first), so a just-freed address
        // waits while any other is free.
        let own = self.node_blocks.get(&node.name);
        let best = own
            .into_iter()
            .flatten()
            .filter(|c| {
                Family::of_net(c) == fam && pool_names.contains(self.blocks[*c].rec.pool.as_str())
            })
            .filter_map(|c| self.blocks[c].free.first().map(|f| (*f, *c)))
            .min();
        if let Some(((_, ordinal), block)) = best {
            return Ok(Pick::Existing { block, ordinal });
        }
        // 2. A new block, unless the node reached its limit.
        let owned = own.map_or(0, |s| s.len()) as u32;
        let max = self.config.max_blocks_per_node;
        let at_limit = max > 0 && owned >= max;
        if !at_limit {
            for p in &pools {
                if let Some(block) = self.first_free_block(&p.rec, &[]) {
                    return Ok(Pick::Claim {
                        block,
                        pool: p.rec.name.clone(),
                        ordinal: 0,
                    });
                }
            }
        }
        // 3. Borrow from any block of an eligible pool.
        if !self.config.strict_affinity {
            for p in &pools {
                for c in self.blocks_in(&p.rec.cidr) {
                    let b = &self.blocks[&c];
                    if let Some((_, o)) = b.free.first() {
                        return Ok(Pick::Existing {
                            block: c,
                            ordinal: *o,
                        });
                    }
                }
            }
        }
        let list: Vec<String> = pools
            .iter()
            .map(|p| format!("{} ({})", p.rec.name, p.rec.cidr))
            .collect();
        let mut why = format!(
            "no free {} address for node {:?} in pool(s) {}",
            fam.name(),
            node.name,
            list.join(", ")
        );
        if at_limit {
            why.push_str(&format!(
                "; the node holds {owned} block(s), the max_blocks_per_node limit ({max}): raise it with SetIpamConfig"
            ));
        } else {
            why.push_str("; every block is claimed");
        }
        if self.config.strict_affinity {
            why.push_str("; strict_affinity forbids borrowing from other nodes' blocks");
        } else {
            why.push_str(" and full");
        }
        why.push_str("; add a pool or free addresses");
        Err(Error::Exhausted(why))
    }

    fn plan_specific(&self, a: IpAddr, node: &Node, planned: &[Pick]) -> Result<Pick> {
        let p = self.pool_containing(a).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "requested address {a} is outside every pool; ListPools shows the pools"
            ))
        })?;
        if p.rec.disabled {
            return Err(Error::FailedPrecondition(format!(
                "requested address {a} is in pool {:?}, which is disabled",
                p.rec.name
            )));
        }
        let c = block_of(a, p.rec.block_size);
        let ordinal = ordinal_of(&c, a);
        match self.blocks.get(&c) {
            Some(b) => match &b.slots[ordinal as usize] {
                Slot::Used(al) => Err(Error::AlreadyExists(format!(
                    "requested address {a} is taken by handle {:?} on node {:?}",
                    al.handle, al.node
                ))),
                Slot::Free { .. } if self.config.strict_affinity && b.rec.affinity.as_deref() != Some(&node.name) => {
                    Err(Error::FailedPrecondition(format!(
                        "requested address {a} is in block {c} of node {:?}; strict_affinity forbids borrowing it",
                        b.rec.affinity.as_deref().unwrap_or("")
                    )))
                }
                Slot::Free { .. } => Ok(Pick::Existing { block: c, ordinal }),
            },
            None => {
                let owned = self.node_blocks.get(&node.name).map_or(0, |s| s.len()) as u32;
                let max = self.config.max_blocks_per_node;
                let claims = planned.iter().filter(|x| matches!(x, Pick::Claim { .. })).count() as u32;
                if max > 0 && owned + claims >= max {
                    return Err(Error::Exhausted(format!(
                        "requested address {a} needs a new block {c} but node {:?} holds {owned} block(s), the max_blocks_per_node limit ({max})",
                        node.name
                    )));
                }
                Ok(Pick::Claim {
                    block: c,
                    pool: p.rec.name.clone(),
                    ordinal,
                })
            }
        }
    }

    /// Assigns addresses to `req.handle` on `node`. The same handle asked
    /// again gets the same addresses.
    pub fn assign(
        &mut self,
        node: &str,
        req: AssignRequest,
    ) -> Result<(Vec<AllocationView>, Mutation)> {
        check_handle(&req.handle)?;
        let n = self.nodes.get(node).ok_or_else(|| {
            Error::NotFound(format!(
                "node {node:?} is not registered; tabby-node registers itself at start (RegisterNode)"
            ))
        })?;
        if let Some(h) = self.handles.get(&req.handle) {
            if h.node != node {
                return Err(Error::FailedPrecondition(format!(
                    "handle {:?} is held by node {:?}, not {node:?}",
                    req.handle, h.node
                )));
            }
            let views = h
                .addresses
                .iter()
                .filter_map(|a| self.allocation_of(*a))
                .collect();
            return Ok((views, Mutation::default()));
        }
        if req.num_v4 > 1 || req.num_v6 > 1 {
            return Err(Error::InvalidArgument(
                "at most one address per family per handle (num_v4, num_v6 in 0..=1)".into(),
            ));
        }
        let mut want: BTreeMap<Family, Option<IpAddr>> = BTreeMap::new();
        if req.num_v4 == 1 || (req.num_v4 == 0 && req.num_v6 == 0 && req.requested.is_empty()) {
            want.insert(Family::V4, None);
        }
        if req.num_v6 == 1 {
            want.insert(Family::V6, None);
        }
        for a in &req.requested {
            let f = Family::of(a);
            if matches!(want.get(&f), Some(Some(_))) {
                return Err(Error::InvalidArgument(format!(
                    "more than one requested {} address; ask for at most one per family",
                    f.name()
                )));
            }
            want.insert(f, Some(*a));
        }
        // Plan every family before changing anything, so a failure in one
        // leaves no half-done assignment.
        let mut picks = Vec::new();
        for (f, a) in want {
            let p = match a {
                Some(a) => self.plan_specific(a, n, &picks)?,
                None => self.plan_any(f, n)?,
            };
            picks.push(p);
        }
        let node = n.name.clone();
        let mut ops = Vec::new();
        let mut addrs = Vec::new();
        for p in picks {
            let (block, ordinal) = match p {
                Pick::Existing { block, ordinal } => (block, ordinal),
                Pick::Claim {
                    block,
                    pool,
                    ordinal,
                } => {
                    let rec = Block {
                        cidr: block,
                        pool,
                        affinity: Some(node.clone()),
                    };
                    self.index_block(&rec);
                    ops.push(Op::PutBlock(rec.clone()));
                    self.blocks.insert(block, BlockState::new(rec));
                    (block, ordinal)
                }
            };
            let b = self.blocks.get_mut(&block).expect("planned");
            let seq = match b.slots[ordinal as usize] {
                Slot::Free { seq } => seq,
                Slot::Used(_) => unreachable!("planned a free slot"),
            };
            b.free.remove(&(seq, ordinal));
            let al = Allocation {
                handle: req.handle.clone(),
                node: node.clone(),
            };
            b.slots[ordinal as usize] = Slot::Used(al.clone());
            let addr = addr_at(&block, ordinal);
            if seq > 0 {
                ops.push(Op::ClearReleased(addr));
            }
            ops.push(Op::PutAllocation(addr, al));
            addrs.push(addr);
        }
        let h = Handle {
            node: node.clone(),
            addresses: addrs.clone(),
            attributes: req.attributes,
        };
        ops.push(Op::PutHandle(req.handle.clone(), h.clone()));
        self.handles.insert(req.handle, h);
        let views = addrs
            .iter()
            .filter_map(|a| self.allocation_of(*a))
            .collect();
        Ok((views, Mutation { ops }))
    }

    /// Frees one slot; returns the ops. The caller fixes the handle record.
    fn free_slot(&mut self, a: IpAddr, ops: &mut Vec<Op>) -> bool {
        let Some(k) = self.block_key_containing(a) else {
            return self.orphans.remove(&a).is_some() && {
                ops.push(Op::DeleteAllocation(a));
                true
            };
        };
        let b = self.blocks.get_mut(&k).expect("found");
        let o = ordinal_of(&k, a);
        if let Slot::Free { .. } = b.slots[o as usize] {
            return false;
        }
        self.release_seq += 1;
        let seq = self.release_seq;
        b.slots[o as usize] = Slot::Free { seq };
        b.free.insert((seq, o));
        ops.push(Op::DeleteAllocation(a));
        ops.push(Op::SetReleased(a, seq));
        true
    }

    fn holder(&self, a: IpAddr) -> Option<&Allocation> {
        if let Some(k) = self.block_key_containing(a) {
            if let Slot::Used(al) = &self.blocks[&k].slots[ordinal_of(&k, a) as usize] {
                return Some(al);
            }
        }
        self.orphans.get(&a)
    }

    /// Releases every address of a handle. `node`: the caller, which must
    /// hold the handle (None for admin). Unknown handle: nothing to do.
    pub fn release_handle(
        &mut self,
        node: Option<&str>,
        handle: &str,
    ) -> Result<(Vec<IpAddr>, Mutation)> {
        check_handle(handle)?;
        let Some(h) = self.handles.get(handle) else {
            return Ok((Vec::new(), Mutation::default()));
        };
        if let Some(n) = node {
            if h.node != n {
                return Err(Error::PermissionDenied(format!(
                    "handle {handle:?} is held by node {:?}, not {n:?}",
                    h.node
                )));
            }
        }
        let h = self.handles.remove(handle).expect("present");
        let mut ops = Vec::new();
        let mut released = Vec::new();
        for a in h.addresses {
            // Only free what this handle really holds.
            if self.holder(a).is_some_and(|al| al.handle == handle) && self.free_slot(a, &mut ops) {
                released.push(a);
            }
        }
        ops.push(Op::DeleteHandle(handle.to_string()));
        Ok((released, Mutation { ops }))
    }

    /// Releases one address. `node`: the caller, which must hold it (None
    /// for admin). Not allocated: nothing to do.
    pub fn release_address(
        &mut self,
        node: Option<&str>,
        a: IpAddr,
    ) -> Result<(Vec<IpAddr>, Mutation)> {
        let Some(al) = self.holder(a).cloned() else {
            return Ok((Vec::new(), Mutation::default()));
        };
        if let Some(n) = node {
            if al.node != n {
                return Err(Error::PermissionDenied(format!(
                    "address {a} is held by node {:?}, not {n:?}",
                    al.node
                )));
            }
        }
        let mut ops = Vec::new();
        self.free_slot(a, &mut ops);
        self.drop_from_handle(&al.handle, a, &mut ops);
        Ok((vec![a], Mutation { ops }))
    }

    fn drop_from_handle(&mut self, handle: &str, a: IpAddr, ops: &mut Vec<Op>) {
        if let Some(h) = self.handles.get_mut(handle) {
            h.addresses.retain(|x| *x != a);
            if h.addresses.is_empty() {
                self.handles.remove(handle);
                ops.push(Op::DeleteHandle(handle.to_string()));
            } else {
                ops.push(Op::PutHandle(handle.to_string(), h.clone()));
            }
        }
    }

    /// The cluster route table: (destination, node, next hop, borrowed).
    pub fn routes(&self) -> Vec<(IpNet, String, Option<IpAddr>, bool)> {
        let hop = |node: &str, fam: Family| {
            self.nodes
                .get(node)
                .and_then(|n| n.addresses.iter().find(|a| Family::of(a) == fam).copied())
        };
        let mut v = Vec::new();
        for b in self.blocks.values() {
            if let Some(n) = &b.rec.affinity {
                v.push((
                    b.rec.cidr,
                    n.clone(),
                    hop(n, Family::of_net(&b.rec.cidr)),
                    false,
                ));
            }
        }
        for a in self.allocations() {
            if a.borrowed() {
                v.push((
                    host_net(a.address),
                    a.node.clone(),
                    hop(&a.node, Family::of(&a.address)),
                    true,
                ));
            }
        }
        v.sort();
        v
    }

    // ----- inspection and repair ------------------------------------------

    /// Utilization per pool, node and block.
    pub fn usage(&self) -> IpamUsage {
        let mut u = IpamUsage::default();
        for p in self.pools.values() {
            let host_bits = (p.rec.cidr.max_prefix_len() - p.rec.cidr.prefix_len()) as u32;
            let size = 1u64.checked_shl(host_bits).unwrap_or(u64::MAX);
            let blocks = self.blocks_in(&p.rec.cidr);
            let used = blocks.iter().map(|c| self.blocks[c].used() as u64).sum();
            u.pools.push(PoolUsage {
                pool: p.rec.clone(),
                size,
                blocks: blocks.len() as u64,
                used,
            });
        }
        let mut nodes: BTreeMap<String, NodeUsage> = self
            .nodes
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    NodeUsage {
                        name: n.clone(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        for (n, set) in &self.node_blocks {
            nodes
                .entry(n.clone())
                .or_insert_with(|| NodeUsage {
                    name: n.clone(),
                    ..Default::default()
                })
                .blocks = set.iter().copied().collect();
        }
        for b in self.blocks.values() {
            for s in &b.slots {
                if let Slot::Used(a) = s {
                    let e = nodes.entry(a.node.clone()).or_insert_with(|| NodeUsage {
                        name: a.node.clone(),
                        ..Default::default()
                    });
                    e.addresses += 1;
                    if b.rec.affinity.as_deref() != Some(a.node.as_str()) {
                        e.borrowed += 1;
                    }
                }
            }
            u.blocks.push(BlockUsage {
                block: b.rec.clone(),
                size: b.slots.len() as u64,
                used: b.used() as u64,
            });
        }
        u.nodes = nodes.into_values().collect();
        u
    }

    /// Number of allocated addresses and of handles.
    pub fn counts(&self) -> (u64, u64) {
        let alloc =
            self.blocks.values().map(|b| b.used() as u64).sum::<u64>() + self.orphans.len() as u64;
        (alloc, self.handles.len() as u64)
    }

    /// Consistency check.
    pub fn check(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut seen: BTreeMap<IpAddr, &Allocation> = BTreeMap::new();
        for b in self.blocks.values() {
            let c = b.rec.cidr;
            let in_pool = self
                .pools
                .get(&b.rec.pool)
                .is_some_and(|p| p.rec.cidr.contains(&c));
            if !in_pool {
                out.push(Problem {
                    kind: ProblemKind::BlockOutsidePools,
                    address: None,
                    handle: None,
                    block: Some(c),
                    detail: format!(
                        "block {c} claims pool {:?}, which does not exist or does not contain it; recreate the pool or release the block's addresses",
                        b.rec.pool
                    ),
                    repairable: false,
                });
            }
            if let Some(n) = &b.rec.affinity {
                if !self.nodes.contains_key(n) {
                    out.push(Problem {
                        kind: ProblemKind::BlockOfUnknownNode,
                        address: None,
                        handle: None,
                        block: Some(c),
                        detail: format!(
                            "block {c} is affine to node {n:?}, which is not registered; DeleteNode {n:?} frees it once empty"
                        ),
                        repairable: false,
                    });
                }
            }
            for (o, s) in b.slots.iter().enumerate() {
                if let Slot::Used(al) = s {
                    let a = addr_at(&c, o as u32);
                    seen.insert(a, al);
                    self.check_alloc(a, al, b.rec.affinity.as_deref(), Some(c), &mut out);
                }
            }
        }
        for (a, al) in &self.orphans {
            seen.insert(*a, al);
            out.push(Problem {
                kind: ProblemKind::AddressWithoutHandle,
                address: Some(*a),
                handle: Some(al.handle.clone()),
                block: None,
                detail: format!("{a} is recorded as allocated but lies in no block; release it"),
                repairable: true,
            });
        }
        let mut handles: Vec<_> = self.handles.iter().collect();
        handles.sort_by(|x, y| x.0.cmp(y.0));
        for (hid, h) in handles {
            for a in &h.addresses {
                if seen.get(a).map(|al| al.handle.as_str()) != Some(hid.as_str()) {
                    out.push(Problem {
                        kind: ProblemKind::HandlePointsNowhere,
                        address: Some(*a),
                        handle: Some(hid.clone()),
                        block: self.block_key_containing(*a),
                        detail: format!(
                            "handle {hid:?} lists {a}, which is not allocated to it; repair drops it from the handle"
                        ),
                        repairable: true,
                    });
                }
            }
        }
        out
    }

    fn check_alloc(
        &self,
        a: IpAddr,
        al: &Allocation,
        affinity: Option<&str>,
        block: Option<IpNet>,
        out: &mut Vec<Problem>,
    ) {
        let listed = self
            .handles
            .get(&al.handle)
            .is_some_and(|h| h.addresses.contains(&a));
        if !listed {
            out.push(Problem {
                kind: ProblemKind::AddressWithoutHandle,
                address: Some(a),
                handle: Some(al.handle.clone()),
                block,
                detail: format!(
                    "{a} is allocated to handle {:?}, which does not list it: nothing will release it (leaked)",
                    al.handle
                ),
                repairable: true,
            });
        }
        if affinity != Some(al.node.as_str()) {
            out.push(Problem {
                kind: ProblemKind::BorrowedAddress,
                address: Some(a),
                handle: Some(al.handle.clone()),
                block,
                detail: format!(
                    "{a} on node {:?} is borrowed from block {} affine to {:?} (valid; routed by its own /32)",
                    al.node,
                    block.map(|b| b.to_string()).unwrap_or_default(),
                    affinity.unwrap_or("")
                ),
                repairable: false,
            });
        }
    }

    /// Admin release: the listed addresses, and with `repair` every
    /// repairable problem of [`IpamState::check`].
    pub fn release_leaked(
        &mut self,
        addresses: &[IpAddr],
        repair: bool,
    ) -> Result<(LeakRelease, Mutation)> {
        let mut out = LeakRelease::default();
        let mut ops = Vec::new();
        for a in addresses {
            match self.holder(*a).cloned() {
                Some(al) => {
                    self.free_slot(*a, &mut ops);
                    self.drop_from_handle(&al.handle, *a, &mut ops);
                    out.released.push(*a);
                }
                None => out.not_allocated.push(*a),
            }
        }
        if repair {
            for p in self.check() {
                if !p.repairable {
                    continue;
                }
                match (p.kind, p.address, p.handle) {
                    (ProblemKind::AddressWithoutHandle, Some(a), _)
                        if self.free_slot(a, &mut ops) =>
                    {
                        out.released.push(a);
                    }
                    (ProblemKind::HandlePointsNowhere, Some(a), Some(h)) => {
                        let before = self.handles.contains_key(&h);
                        self.drop_from_handle(&h, a, &mut ops);
                        if before && !self.handles.contains_key(&h) {
                            out.handles_removed.push(h);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok((out, Mutation { ops }))
    }
}

#[cfg(test)]
pub(crate) mod tests;
