//! The in-memory state: its shape, loading it from a snapshot, the derived
//! indices, and read-only lookups.
use super::{
    addr::{addr_at, block_of, host_net, ordinal_of},
    records::{AllocationView, BlockState, HandleState, Held, PoolState, Slot},
    selector::Selector,
    tunnels::tunnel_handle_node,
};
use im::{HashMap as ImHashMap, OrdMap, OrdSet};
use ipnet::IpNet;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};
use tabby_store::{Attributes, Block, Handle, IpamConfig, Node, Pool, Record, Snapshot};

/// A node or handle name as the persistent maps key it: a copy of a map
/// node (after a snapshot) copies pointers, not strings.
pub(super) type Name = Arc<str>;

/// A block's next free address, as the per-node index orders it: release
/// seq (0: never used), ordinal, block.
pub(super) type FreeKey = (u64, u32, IpNet);

/// What [`IpamState`] counts per node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct NodeCounts {
    /// Addresses held, in blocks.
    pub(super) addresses: u64,
    /// Of them, in other nodes' blocks (or blocks of none).
    pub(super) borrowed: u64,
}

/// In-memory IPAM state. See the module docs.
///
/// The large tables are persistent maps (`im`), and blocks and handles sit
/// behind `Arc`s: a clone, which readers get as their snapshot, costs
/// about nothing, and the owner's next change copies only the path to what
/// it changes. A growing table never pauses to rehash.
#[derive(Debug, Clone, Default)]
pub struct IpamState {
    pub(super) pools: BTreeMap<String, PoolState>,
    pub(super) blocks: OrdMap<IpNet, Arc<BlockState>>,
    /// Ordered, not hashed: the store hands handles over in key order, so
    /// loading appends to the B-tree's last leaf, and a walk over them
    /// (CheckIpam) visits their addresses' blocks in a cache-friendly order.
    /// Against `im::HashMap` at 550,000 handles: about 100 MiB less heap,
    /// a third less time to load them, CheckIpam 4-5x faster.
    pub(super) handles: OrdMap<Name, Arc<HandleState>>,
    pub(super) nodes: OrdMap<String, Node>,
    pub(super) config: IpamConfig,
    /// The BGP speaker's configuration (kept here: one owner, one store).
    pub(super) bgp: tabby_store::BgpConfig,
    /// Allocation records that lie in no block (only from a damaged store).
    pub(super) orphans: BTreeMap<IpAddr, Held>,
    /// Last release sequence number handed out.
    pub(super) release_seq: u64,
    /// Derived index: blocks affine to each node. Ordered like `nodes` (by
    /// name), as `node_counts` is: ShowIpam merges the three in one pass.
    pub(super) node_blocks: OrdMap<Name, OrdSet<IpNet>>,
    /// Derived index: addresses held by a node other than their block's
    /// (ShowRoutes, the intent), with the holder.
    pub(super) borrowed: OrdMap<IpAddr, String>,
    /// Derived index: for each node, its blocks that have a free address,
    /// keyed by that block's next address (release seq, ordinal): the first
    /// entry is where the node's next address comes from.
    pub(super) node_free: ImHashMap<Name, OrdSet<FreeKey>>,
    /// Derived index: per node, the addresses it holds in blocks, and how
    /// many of them are borrowed (ShowIpam).
    pub(super) node_counts: OrdMap<Name, NodeCounts>,
    /// Derived index: handles held by each node (ListHandles, a node's GC).
    pub(super) node_handles: ImHashMap<Name, OrdSet<Name>>,
    /// Derived index: how many handles hold tunnel addresses. While none
    /// does, a node's tunnel lookups (two per node in ShowIpam, ShowRoutes
    /// and the intent) skip the handle table.
    pub(super) tunnel_handles: usize,
}

impl IpamState {
    /// Builds the state from a store snapshot. Inconsistent records are kept
    /// (so that `check` can report them), never a reason to fail start-up.
    pub fn from_snapshot(s: Snapshot) -> IpamState {
        Self::from_snapshot_in_order(s, false)
    }

    /// [`IpamState::from_snapshot`]; with `allocations_first` the
    /// allocations are placed before the handles instead of after them (the
    /// store's order), which must give the same state.
    pub(crate) fn from_snapshot_in_order(s: Snapshot, allocations_first: bool) -> IpamState {
        let mut p = Preparer::default();
        let mut l = Loader::default();
        // As the controller's start does: the handle index is taken when the
        // handles are in, and what comes after it at the end.
        let mut early = None;
        let mut take = |r| {
            if let Some(ix) = p.handles_done(&r) {
                early = Some(ix);
            }
            l.take(p.prepare(r))
        };
        take(Record::Config(s.config));
        take(Record::Bgp(s.bgp));
        s.pools.into_values().for_each(|p| take(Record::Pool(p)));
        s.blocks.into_values().for_each(|b| take(Record::Block(b)));
        for (a, seq) in s.released {
            take(Record::Released(a, seq));
        }
        let handles = s.handles.into_iter().map(|(id, h)| Record::Handle(id, h));
        let allocations = s
            .allocations
            .into_iter()
            .map(|(a, al)| Record::Allocation(a, al));
        if allocations_first {
            allocations.chain(handles).for_each(&mut take);
        } else {
            handles.chain(allocations).for_each(&mut take);
        }
        s.nodes.into_values().for_each(|n| take(Record::Node(n)));
        let late = p.take_index();
        l.finish(early.into_iter().chain([late]).map(HandleIndex::build))
    }

    pub(super) fn index_block(&mut self, b: &Block) {
        if let Some(p) = self.pools.get_mut(&b.pool) {
            if let Some(i) = p.block_index(&b.cidr) {
                p.free.take(i);
            }
        }
        if let Some(n) = &b.affinity {
            match self.node_blocks.get_mut(n.as_str()) {
                Some(set) => {
                    set.insert(b.cidr);
                }
                None => {
                    self.node_blocks
                        .insert(n.as_str().into(), OrdSet::unit(b.cidr));
                }
            }
        }
    }

    /// Adds a new block (every address free) to the state and its indexes.
    pub(super) fn add_block(&mut self, b: Block) {
        self.index_block(&b);
        let cidr = b.cidr;
        self.blocks.insert(cidr, Arc::new(BlockState::new(b)));
        self.refresh_free(&cidr, None);
    }

    /// Removes block `cidr` from the state and its indexes.
    pub(super) fn remove_block(&mut self, cidr: &IpNet) -> Option<Arc<BlockState>> {
        let b = self.blocks.get(cidr)?;
        if let (Some(n), Some(k)) = (b.rec.affinity.clone(), b.free_key()) {
            if let Some(set) = self.node_free.get_mut(n.as_str()) {
                set.remove(&k);
                if set.is_empty() {
                    self.node_free.remove(n.as_str());
                }
            }
        }
        let b = self.blocks.remove(cidr)?;
        self.unindex_block(&b.rec);
        Some(b)
    }

    /// Where the derived indexes disagree with a recomputation from the
    /// primary tables (empty when they agree). For tests.
    #[cfg(test)]
    pub(crate) fn index_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut blocks: OrdMap<Name, OrdSet<IpNet>> = OrdMap::new();
        for b in self.blocks.values() {
            if let Some(n) = &b.rec.affinity {
                blocks
                    .entry(n.as_str().into())
                    .or_default()
                    .insert(b.rec.cidr);
            }
        }
        if blocks != self.node_blocks {
            out.push(format!(
                "node_blocks {:?} != {:?}",
                self.node_blocks, blocks
            ));
        }
        let mut free: ImHashMap<Name, OrdSet<FreeKey>> = ImHashMap::new();
        for b in self.blocks.values() {
            if let (Some(n), Some(k)) = (&b.rec.affinity, b.free_key()) {
                free.entry(n.as_str().into()).or_default().insert(k);
            }
        }
        if free != self.node_free {
            out.push(format!("node_free {:?} != {:?}", self.node_free, free));
        }
        let mut counts: OrdMap<Name, NodeCounts> = OrdMap::new();
        for a in self.allocations() {
            let c = counts.entry(a.node.as_str().into()).or_default();
            c.addresses += 1;
            c.borrowed += u64::from(a.borrowed());
        }
        if counts != self.node_counts {
            out.push(format!(
                "node_counts {:?} != {:?}",
                self.node_counts, counts
            ));
        }
        let mut handles: ImHashMap<Name, OrdSet<Name>> = ImHashMap::new();
        for (id, h) in &self.handles {
            handles
                .entry(h.node.clone())
                .or_default()
                .insert(id.clone());
        }
        let borrowed: OrdMap<IpAddr, String> = self
            .allocations()
            .into_iter()
            .filter(|a| a.borrowed())
            .map(|a| (a.address, a.node))
            .collect();
        if borrowed != self.borrowed {
            out.push(format!("borrowed {:?} != {:?}", self.borrowed, borrowed));
        }
        let tunnels = self
            .handles
            .keys()
            .filter(|h| tunnel_handle_node(h).is_some())
            .count();
        if tunnels != self.tunnel_handles {
            out.push(format!(
                "tunnel_handles {} != {tunnels}",
                self.tunnel_handles
            ));
        }
        if handles != self.node_handles {
            out.push(format!(
                "node_handles {:?} != {:?}",
                self.node_handles, handles
            ));
        }
        for p in self.pools.values() {
            let mut free = super::free::FreeBlocks::all(super::records::block_count(&p.rec));
            for c in self.blocks.keys() {
                if let Some(i) = p.block_index(c) {
                    free.take(i);
                }
            }
            if free != p.free {
                out.push(format!(
                    "pool {} free blocks {:?} != {:?}",
                    p.rec.name, p.free, free
                ));
            }
        }
        out
    }

    /// Keeps the per-node free index right after block `cidr`'s free set
    /// changed from having next address `old`.
    pub(super) fn refresh_free(&mut self, cidr: &IpNet, old: Option<FreeKey>) {
        let Some(b) = self.blocks.get(cidr) else {
            return;
        };
        let new = b.free_key();
        if new == old {
            return;
        }
        let Some(n) = b.rec.affinity.clone() else {
            return;
        };
        if self.node_free.get(n.as_str()).is_none() {
            self.node_free.insert(n.as_str().into(), OrdSet::new());
        }
        let set = self.node_free.get_mut(n.as_str()).expect("inserted");
        if let Some(k) = old {
            set.remove(&k);
        }
        if let Some(k) = new {
            set.insert(k);
        }
        if set.is_empty() {
            self.node_free.remove(n.as_str());
        }
    }

    /// Node `n`'s name as the state already shares it (a new one if the
    /// node holds neither an address nor a handle yet).
    pub(super) fn node_name(&self, n: &str) -> Name {
        self.node_counts
            .get_key_value(n)
            .map(|(k, _)| k.clone())
            .or_else(|| self.node_handles.get_key_value(n).map(|(k, _)| k.clone()))
            .unwrap_or_else(|| n.into())
    }

    /// Handle `h`'s name as the handle table shares it (a new one if it is
    /// not there).
    pub(super) fn handle_name(&self, h: &str) -> Name {
        self.handles
            .get_key_value(h)
            .map_or_else(|| h.into(), |(k, _)| k.clone())
    }

    /// Counts an address that `node` took (`up`) or gave back.
    pub(super) fn count_address(&mut self, node: &Name, borrowed: bool, up: bool) {
        let c = self.node_counts.entry(node.clone()).or_default();
        let d = |n: &mut u64| *n = if up { *n + 1 } else { n.saturating_sub(1) };
        d(&mut c.addresses);
        if borrowed {
            d(&mut c.borrowed);
        }
        if *c == NodeCounts::default() {
            self.node_counts.remove(node);
        }
    }

    /// Adds or replaces handle `id`, keeping the per-node index.
    pub(super) fn put_handle(&mut self, id: Name, h: Handle) {
        let node = self.node_name(&h.node);
        let h = Arc::new(HandleState::new(node.clone(), h));
        // One descent of the table: the old record comes back from the insert.
        match self.handles.insert(id.clone(), h) {
            Some(old) if old.node != node => self.unindex_handle(&old.node, &id),
            Some(_) => {}
            None => self.tunnel_handles += usize::from(tunnel_handle_node(&id).is_some()),
        }
        match self.node_handles.get_mut(&*node) {
            Some(set) => {
                set.insert(id);
            }
            None => {
                self.node_handles.insert(node, OrdSet::unit(id));
            }
        }
    }

    /// Removes handle `id`, keeping the per-node index.
    pub(super) fn remove_handle(&mut self, id: &str) -> Option<Arc<HandleState>> {
        let h = self.handles.remove(id)?;
        self.unindex_handle(&h.node, id);
        self.tunnel_handles -= usize::from(tunnel_handle_node(id).is_some());
        Some(h)
    }

    fn unindex_handle(&mut self, node: &str, id: &str) {
        if let Some(set) = self.node_handles.get_mut(node) {
            set.remove(id);
            if set.is_empty() {
                self.node_handles.remove(node);
            }
        }
    }

    pub(super) fn unindex_block(&mut self, b: &Block) {
        if let Some(p) = self.pools.get_mut(&b.pool) {
            if let Some(i) = p.block_index(&b.cidr) {
                p.free.give(i);
            }
        }
        if let Some(n) = &b.affinity {
            if let Some(set) = self.node_blocks.get_mut(n.as_str()) {
                set.remove(&b.cidr);
                if set.is_empty() {
                    self.node_blocks.remove(n.as_str());
                }
            }
        }
    }

    pub(super) fn block_key_containing(&self, a: IpAddr) -> Option<IpNet> {
        self.block_containing(a).map(|b| b.rec.cidr)
    }

    /// The block holding `a`. Usually the block of `a`'s pool at the pool's
    /// block size: one lookup. Otherwise (no such block, or one of another
    /// size from a damaged store) a range search, whose iterator allocates.
    pub(super) fn block_containing(&self, a: IpAddr) -> Option<&BlockState> {
        if let Some(p) = self.pool_containing(a) {
            if let Some(b) = self.blocks.get(&block_of(a, p.rec.block_size)) {
                return Some(b);
            }
        }
        self.blocks
            .range(..=host_net(a))
            .next_back()
            .filter(|(c, _)| c.contains(&a))
            .map(|(_, b)| &**b)
    }

    fn block_containing_mut(&mut self, a: IpAddr) -> Option<&mut BlockState> {
        let k = self.block_key_containing(a)?;
        self.blocks.get_mut(&k).map(Arc::make_mut)
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

    /// A handle, if it exists (built from the state's compact form).
    pub fn handle(&self, h: &str) -> Option<Handle> {
        self.handles.get(h).map(|h| h.record())
    }

    /// A handle's addresses and attributes, if it exists, without building
    /// its record (GetAllocation).
    pub fn handle_parts(&self, h: &str) -> Option<(&[IpAddr], &Attributes)> {
        self.handles
            .get(h)
            .map(|h| (h.addresses.as_slice(), &h.attributes))
    }

    /// Handles held by a node, sorted, each with its `container_id`
    /// attribute (empty when it has none).
    pub fn handle_entries_of(&self, node: &str) -> Vec<(String, String)> {
        self.node_handles
            .get(node)
            .map(|s| {
                s.iter()
                    .map(|h| {
                        let cid = self
                            .handle_parts(h)
                            .and_then(|(_, a)| a.get("container_id"))
                            .unwrap_or_default();
                        (h.to_string(), cid.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Handles held by a node, sorted.
    pub fn handles_of(&self, node: &str) -> Vec<String> {
        self.node_handles
            .get(node)
            .map(|s| s.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    /// Addresses held by a node other than their block's, with the holder
    /// (from the index: no walk over every allocation).
    pub fn borrowed_addresses(&self) -> impl Iterator<Item = (IpAddr, &str)> {
        self.borrowed.iter().map(|(a, n)| (*a, n.as_str()))
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

    fn view(&self, b: &BlockState, ordinal: u32, a: &Held) -> AllocationView {
        AllocationView {
            address: addr_at(&b.rec.cidr, ordinal),
            handle: a.handle.to_string(),
            node: a.node.to_string(),
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
    pub(super) fn holder(&self, a: IpAddr) -> Option<&Held> {
        self.holder_in(self.block_containing(a), a)
    }

    /// [`IpamState::holder`], given the block holding `a` (None: no block
    /// does). A free slot's address may still be an orphan.
    pub(super) fn holder_in<'a>(
        &'a self,
        b: Option<&'a BlockState>,
        a: IpAddr,
    ) -> Option<&'a Held> {
        match b.map(|b| &b.slots[ordinal_of(&b.rec.cidr, a) as usize]) {
            Some(Slot::Used(al)) => Some(al),
            _ => self.orphans.get(&a),
        }
    }
}

/// The half of placing a record that needs none of the state, so that it can
/// run on the thread that reads the store while [`Loader`] places the
/// records before: one shared name per node, each handle's state built, and
/// the index of handles per node.
#[derive(Debug, Default)]
pub struct Preparer {
    /// Node names seen so far.
    nodes: HashSet<Name>,
    /// The handles' names by address (sorted once the handles are in).
    names: HandleNames,
    /// The handles prepared since the last [`Preparer::take_index`].
    index: HandleIndex,
    /// Whether [`Preparer::handles_done`] has handed out the index.
    handed: bool,
}

/// A record as [`Preparer::prepare`] makes it ready for [`Loader::take`].
#[derive(Debug)]
pub struct Prepared(Ready);

#[derive(Debug)]
enum Ready {
    /// A handle (the preparer has indexed it).
    Handle(Name, Arc<HandleState>),
    /// The address, its handle's name, and its node.
    Allocation(IpAddr, HandleRef, Name),
    Other(Record),
}

/// An allocation's handle as the preparer found it.
#[derive(Debug)]
enum HandleRef {
    /// The handle table's name.
    Shared(Name),
    /// Not found by address: the loader looks it up by name.
    Named(String),
}

/// The names of the handles a [`Preparer`] prepared, by each of their IPv4
/// addresses, sorted once the handles are in in the order of the
/// addresses' text, which is the order the store gives allocations in. An
/// allocation then finds its handle's name by stepping along beside it (one
/// string compared to check the match) on the reading thread, which has
/// time to spare while allocations come, instead of the placing thread
/// searching the handle table (a descent through 80-byte keys, most of the
/// work of placing one).
#[derive(Debug, Default)]
struct HandleNames {
    by_addr: Vec<(u128, Name)>,
    /// Where the last lookup ended.
    at: usize,
}

/// An IPv4 address's text ("10.0.12.7"), its bytes from the top and zeros
/// after them: numbers that sort as the texts do.
fn text_key(a: std::net::Ipv4Addr) -> u128 {
    let mut k = 0u128;
    let mut shift = 128;
    let mut put = |c: u8| {
        shift -= 8;
        k |= u128::from(c) << shift;
    };
    for (i, o) in a.octets().into_iter().enumerate() {
        if i > 0 {
            put(b'.');
        }
        if o >= 100 {
            put(b'0' + o / 100);
        }
        if o >= 10 {
            put(b'0' + o / 10 % 10);
        }
        put(b'0' + o % 10);
    }
    k
}

impl HandleNames {
    fn add(&mut self, id: &Name, h: &HandleState) {
        for a in &h.addresses {
            if let IpAddr::V4(v4) = a {
                self.by_addr.push((text_key(*v4), id.clone()));
            }
        }
    }

    /// The name of `handle` if it lists `addr`. Quickest when asked in the
    /// order of the addresses' text.
    fn get(&mut self, addr: IpAddr, handle: &str) -> Option<Name> {
        let IpAddr::V4(v4) = addr else {
            return None;
        };
        let k = text_key(v4);
        if self.by_addr.get(self.at).is_none_or(|e| e.0 > k)
            || self.by_addr.get(self.at + 64).is_some_and(|e| e.0 < k)
        {
            // Out of order, or far ahead: search.
            self.at = self.by_addr.partition_point(|e| e.0 < k);
        }
        while self.by_addr.get(self.at).is_some_and(|e| e.0 < k) {
            self.at += 1;
        }
        // Two handles may list one address (a damaged store): each is tried.
        self.by_addr[self.at..]
            .iter()
            .take_while(|e| e.0 == k)
            .find(|e| &*e.1 == handle)
            .map(|e| e.1.clone())
    }
}

/// The handles a [`Preparer`] indexed per node, not yet built into the
/// state's form ([`HandleIndex::build`], on any thread).
#[derive(Debug, Default)]
pub struct HandleIndex {
    handles_of: HashMap<Name, Vec<Name>>,
    tunnel_handles: usize,
}

/// A built [`HandleIndex`], for [`Loader::finish`].
#[derive(Debug)]
pub struct NodeHandles {
    node_handles: ImHashMap<Name, OrdSet<Name>>,
    tunnel_handles: usize,
}

impl HandleIndex {
    /// The per-node sets of handles.
    pub fn build(self) -> NodeHandles {
        NodeHandles {
            node_handles: self
                .handles_of
                .into_iter()
                .map(|(n, ids)| (n, ids.into_iter().collect()))
                .collect(),
            tunnel_handles: self.tunnel_handles,
        }
    }
}

impl Preparer {
    /// Prepares one record, in the order [`Loader`] takes them. The store
    /// gives each handle once.
    pub fn prepare(&mut self, r: Record) -> Prepared {
        Prepared(match r {
            Record::Handle(id, h) => {
                let id: Name = id.into();
                let node = self.node(&h.node);
                let ix = &mut self.index;
                ix.handles_of
                    .entry(node.clone())
                    .or_default()
                    .push(id.clone());
                ix.tunnel_handles += usize::from(tunnel_handle_node(&id).is_some());
                let h = HandleState::new(node, h);
                // Handles after the allocations started are not looked up.
                if !self.handed {
                    self.names.add(&id, &h);
                }
                Ready::Handle(id, Arc::new(h))
            }
            Record::Allocation(addr, a) => {
                let found = self.handed.then(|| self.names.get(addr, &a.handle));
                let handle = match found.flatten() {
                    Some(n) => HandleRef::Shared(n),
                    None => HandleRef::Named(a.handle),
                };
                Ready::Allocation(addr, handle, self.node(&a.node))
            }
            r => Ready::Other(r),
        })
    }

    /// The handles prepared since the last call, to be built.
    pub fn take_index(&mut self) -> HandleIndex {
        std::mem::take(&mut self.index)
    }

    /// Once, when `r` (about to be prepared) is the first allocation: the
    /// handles indexed so far (and their names sorted for the allocations
    /// to find). The store gives every handle before the
    /// allocations, so the index can be built while they are placed; what
    /// comes later is in the last [`Preparer::take_index`].
    pub fn handles_done(&mut self, r: &Record) -> Option<HandleIndex> {
        if self.handed || !matches!(r, Record::Allocation(..)) {
            return None;
        }
        self.handed = true;
        self.names.by_addr.sort_unstable_by_key(|e| e.0);
        Some(self.take_index())
    }

    fn node(&mut self, n: &str) -> Name {
        if let Some(k) = self.nodes.get(n) {
            return k.clone();
        }
        let k: Name = n.into();
        self.nodes.insert(k.clone());
        k
    }
}

/// Builds the state record by record, in the order [`tabby_store::Store::load_each`]
/// gives them: pools, then blocks, release marks, handles and allocations
/// (nodes and the configuration in any order; allocations before handles
/// also load correctly, only without sharing the handles' names, so in
/// more memory), each first through one [`Preparer`], whose handle indexes
/// [`Loader::finish`] takes. Nothing is collected on the way, so a start
/// holds one copy of the state, not two.
/// Inconsistent records are kept (so that `check` can report them), never a
/// reason to fail start-up.
#[derive(Debug, Default)]
pub struct Loader {
    st: IpamState,
    /// The block the last allocation went into, out of the block table
    /// while allocations in it come (they come in address order: one
    /// search of the table per block, not per address).
    open: Option<Arc<BlockState>>,
    /// Addresses per node, counted here and added to the state's index at
    /// the end (one update per node, not per address).
    counts: HashMap<Name, NodeCounts>,
}

impl Loader {
    /// Places one prepared record.
    pub fn take(&mut self, r: Prepared) {
        let r = match r.0 {
            Ready::Handle(id, h) => {
                // Indexed by the preparer; each id comes once.
                let old = self.st.handles.insert(id, h);
                debug_assert!(old.is_none(), "a handle came twice");
                return;
            }
            Ready::Allocation(addr, handle, node) => {
                // Handles come first (see [`Loader`]), so the slot shares
                // the handle table's name.
                let handle = match handle {
                    HandleRef::Shared(n) => n,
                    HandleRef::Named(h) => self.st.handle_name(&h),
                };
                return self.place_allocation(addr, Held { handle, node });
            }
            Ready::Other(r) => r,
        };
        self.shelve();
        let st = &mut self.st;
        match r {
            Record::Pool(p) => {
                // A stored selector was validated on write; fall back to "none
                // selected" rather than "all" if it somehow no longer parses.
                let selector = Selector::parse(&p.node_selector).unwrap_or_else(|_| {
                    Selector::parse("has(tabby.invalid-selector)").expect("valid")
                });
                st.pools.insert(p.name.clone(), PoolState::new(p, selector));
            }
            Record::Block(b) => {
                st.index_block(&b);
                st.blocks.insert(b.cidr, Arc::new(BlockState::new(b)));
            }
            Record::Released(addr, seq) => {
                if let Some(b) = st.block_containing_mut(addr) {
                    let o = ordinal_of(&b.rec.cidr, addr);
                    b.free.remove(&(0, o));
                    b.free.insert((seq, o));
                    b.slots[o as usize] = Slot::Free { seq };
                }
                st.release_seq = st.release_seq.max(seq);
            }
            Record::Allocation(..) | Record::Handle(..) => {
                unreachable!("the preparer makes handles and allocations ready")
            }
            Record::Node(n) => {
                st.nodes.insert(n.name.clone(), n);
            }
            Record::Config(c) => st.config = c,
            Record::Bgp(b) => st.bgp = b,
        }
    }

    /// `held` holds `addr` (an allocation record).
    fn place_allocation(&mut self, addr: IpAddr, held: Held) {
        if !self
            .open
            .as_ref()
            .is_some_and(|b| b.rec.cidr.contains(&addr))
        {
            self.shelve();
            let st = &mut self.st;
            self.open = st
                .block_key_containing(addr)
                .and_then(|k| st.blocks.remove(&k));
        }
        let Some(b) = self.open.as_mut().map(Arc::make_mut) else {
            self.st.orphans.insert(addr, held);
            return;
        };
        let o = ordinal_of(&b.rec.cidr, addr);
        if let Slot::Free { seq } = b.slots[o as usize] {
            b.free.remove(&(seq, o));
        }
        let borrowed = b.lends_to(&held.node);
        let c = self.counts.entry(held.node.clone()).or_default();
        c.addresses += 1;
        if borrowed {
            c.borrowed += 1;
            self.st.borrowed.insert(addr, held.node.to_string());
        }
        b.slots[o as usize] = Slot::Used(held);
    }

    /// Puts the open block back in the block table.
    fn shelve(&mut self) {
        if let Some(b) = self.open.take() {
            self.st.blocks.insert(b.rec.cidr, b);
        }
    }

    /// The state, with the indexes that need every record: `indexes` are
    /// everything the preparer of the records took (and built).
    pub fn finish(mut self, indexes: impl IntoIterator<Item = NodeHandles>) -> IpamState {
        self.shelve();
        let mut st = self.st;
        for ix in indexes {
            st.tunnel_handles += ix.tunnel_handles;
            for (n, ids) in ix.node_handles {
                match st.node_handles.get_mut(&n) {
                    Some(set) => set.extend(ids),
                    None => {
                        st.node_handles.insert(n, ids);
                    }
                }
            }
        }
        for (n, c) in self.counts {
            let e = st.node_counts.entry(n).or_default();
            e.addresses += c.addresses;
            e.borrowed += c.borrowed;
        }
        let keys: Vec<(String, FreeKey)> = st
            .blocks
            .values()
            .filter_map(|b| Some((b.rec.affinity.clone()?, b.free_key()?)))
            .collect();
        for (n, k) in keys {
            st.node_free.entry(n.into()).or_default().insert(k);
        }
        st
    }
}

#[cfg(test)]
mod handle_names_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn text_keys_sort_as_the_texts_do() {
        let mut addrs: Vec<Ipv4Addr> = (0..20_000u32)
            .map(|i| Ipv4Addr::from(i.wrapping_mul(2_654_435_761)))
            .chain(
                [
                    "0.0.0.0",
                    "255.255.255.255",
                    "10.0.0.1",
                    "10.0.0.10",
                    "10.0.0.100",
                ]
                .map(|s| s.parse().unwrap()),
            )
            .collect();
        addrs.sort_by_key(|a| a.to_string());
        for w in addrs.windows(2) {
            assert!(
                text_key(w[0]) <= text_key(w[1]),
                "{} {} ({:x} {:x})",
                w[0],
                w[1],
                text_key(w[0]),
                text_key(w[1])
            );
            assert_eq!(w[0] == w[1], text_key(w[0]) == text_key(w[1]));
        }
    }

    fn handle(addrs: &[&str]) -> HandleState {
        HandleState::new(
            "n1".into(),
            Handle {
                node: "n1".into(),
                addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
                attributes: Default::default(),
            },
        )
    }

    #[test]
    fn an_allocation_finds_its_handle_by_address_in_any_order() {
        let mut n = HandleNames::default();
        let (a, b, c): (Name, Name, Name) = ("h-a".into(), "h-b".into(), "h-c".into());
        n.add(&a, &handle(&["10.0.0.10", "fd00::1"]));
        // Two handles listing one address (a damaged store).
        n.add(&b, &handle(&["10.0.0.2", "10.0.0.10"]));
        n.add(&c, &handle(&["10.0.0.100"]));
        n.by_addr.sort_unstable_by_key(|e| e.0);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // The store's order (the text's), then out of it.
        for (addr, h, want) in [
            ("10.0.0.10", "h-a", Some(&a)),
            ("10.0.0.10", "h-b", Some(&b)),
            ("10.0.0.100", "h-c", Some(&c)),
            ("10.0.0.2", "h-b", Some(&b)),
            ("10.0.0.10", "h-a", Some(&a)),
            ("10.0.0.100", "h-a", None),
            ("10.0.0.3", "h-b", None),
            ("10.0.0.1", "h-a", None),
            ("fd00::1", "h-a", None),
        ] {
            let got = n.get(ip(addr), h);
            assert_eq!(got.as_deref(), want.map(|w| &**w), "{addr} {h}");
            if let (Some(g), Some(w)) = (&got, want) {
                assert!(Arc::ptr_eq(g, w), "{addr}: not the handle's own name");
            }
        }
    }

    #[test]
    fn the_preparer_finds_names_once_the_handles_are_in() {
        let mut p = Preparer::default();
        let rec = |addrs: &[&str]| Handle {
            node: "n1".into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            attributes: Default::default(),
        };
        let Prepared(Ready::Handle(a, _)) =
            p.prepare(Record::Handle("h-a".into(), rec(&["10.0.0.1"])))
        else {
            panic!("a handle");
        };
        let alloc = |h: &str| {
            Record::Allocation(
                "10.0.0.1".parse().unwrap(),
                tabby_store::Allocation {
                    handle: h.into(),
                    node: "n1".into(),
                },
            )
        };
        assert!(p.handles_done(&alloc("h-a")).is_some());
        match p.prepare(alloc("h-a")).0 {
            Ready::Allocation(_, HandleRef::Shared(n), _) => assert!(Arc::ptr_eq(&n, &a)),
            r => panic!("{r:?}"),
        }
        match p.prepare(alloc("h-x")).0 {
            Ready::Allocation(_, HandleRef::Named(n), _) => assert_eq!(n, "h-x"),
            r => panic!("{r:?}"),
        }
        // Handles after the allocations started are not collected.
        p.prepare(Record::Handle("h-d".into(), rec(&["10.0.0.4"])));
        assert_eq!(p.names.by_addr.len(), 1);
    }
}
