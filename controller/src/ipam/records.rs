//! Records: what the state holds per block and pool, and the plain data
//! that requests carry in and answers carry out.
use super::{
    addr::{addr_u128, block_len, u128_addr, Family},
    free::FreeBlocks,
    selector::Selector,
    state::Name,
};
use ipnet::IpNet;
use smallvec::SmallVec;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};
use tabby_store::{Allocation, Attributes, Block, Encapsulation, Handle, Pool};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Slot {
    /// Free; `seq` is the release order (0: never released).
    Free { seq: u64 },
    /// Allocated.
    Used(Held),
}

/// Who holds an allocated address: names shared with the handle table and
/// with the node's other addresses, so a slot owns no string of its own
/// (a block shared with readers' snapshots is copied on its next change,
/// and that copy bumps counts instead of copying strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Held {
    /// The handle holding it.
    pub(super) handle: Name,
    /// The node holding it.
    pub(super) node: Name,
}

impl Held {
    /// As the store records it.
    pub(super) fn record(&self) -> Allocation {
        Allocation {
            handle: self.handle.to_string(),
            node: self.node.to_string(),
        }
    }
}

/// A handle as the state keeps it; the store's form is [`Handle`]. There is
/// one per pod, so it is kept small: the node's name is shared with the
/// state's other tables, and one address sits inline. (The attributes come
/// packed from the store.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HandleState {
    /// The node the workload runs on.
    pub(super) node: Name,
    /// Its addresses.
    pub(super) addresses: SmallVec<[IpAddr; 1]>,
    /// Its attributes.
    pub(super) attributes: Attributes,
}

impl HandleState {
    /// `h`, held on `node` (the state's shared copy of `h.node`).
    pub(super) fn new(node: Name, h: Handle) -> HandleState {
        debug_assert_eq!(&*node, h.node);
        HandleState {
            node,
            addresses: h.addresses.into_iter().collect(),
            attributes: h.attributes,
        }
    }

    /// As the store records it.
    pub(super) fn record(&self) -> Handle {
        Handle {
            node: self.node.to_string(),
            addresses: self.addresses.to_vec(),
            attributes: self.attributes.clone(),
        }
    }
}

// Eq, not only PartialEq: the BGP speaker diffs published states' block
// maps, and `Arc<T: Eq>` compares pointers first, so blocks the states
// share cost nothing to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BlockState {
    pub(super) rec: Block,
    pub(super) slots: Vec<Slot>,
    /// Free ordinals ordered by (release seq, ordinal): least recently released first.
    pub(super) free: BTreeSet<(u64, u32)>,
}

impl BlockState {
    /// Whether an address of this block held by `node` is borrowed: the
    /// block is not affine to that node.
    pub(super) fn lends_to(&self, node: &str) -> bool {
        self.rec.affinity.as_deref() != Some(node)
    }

    pub(super) fn new(rec: Block) -> BlockState {
        let n = block_len(&rec.cidr);
        BlockState {
            rec,
            slots: vec![Slot::Free { seq: 0 }; n as usize],
            free: (0..n).map(|o| (0, o)).collect(),
        }
    }
    /// Its next free address, as the per-node index keys it.
    pub(super) fn free_key(&self) -> Option<(u64, u32, IpNet)> {
        self.free.first().map(|(s, o)| (*s, *o, self.rec.cidr))
    }
    pub(super) fn used(&self) -> u32 {
        self.slots.len() as u32 - self.free.len() as u32
    }
}

#[derive(Debug, Clone)]
pub(super) struct PoolState {
    pub(super) rec: Pool,
    pub(super) selector: Selector,
    /// Derived index: the pool's unclaimed blocks.
    pub(super) free: FreeBlocks,
}

impl PoolState {
    /// A pool none of whose blocks is claimed yet.
    pub(super) fn new(rec: Pool, selector: Selector) -> PoolState {
        let free = FreeBlocks::all(block_count(&rec));
        PoolState {
            rec,
            selector,
            free,
        }
    }

    /// Index of block `cidr` within this pool, if it is one of its blocks.
    pub(super) fn block_index(&self, cidr: &IpNet) -> Option<u128> {
        let p = &self.rec;
        if cidr.prefix_len() != p.block_size || !p.cidr.contains(cidr) {
            return None;
        }
        let shift = u32::from(p.cidr.max_prefix_len() - p.block_size);
        Some((addr_u128(cidr.network()) - addr_u128(p.cidr.network())) >> shift)
    }

    /// The block at index `i` of this pool.
    pub(super) fn block_at(&self, i: u128) -> IpNet {
        let p = &self.rec;
        let shift = u32::from(p.cidr.max_prefix_len() - p.block_size);
        let a = u128_addr(
            Family::of_net(&p.cidr),
            addr_u128(p.cidr.network()) + (i << shift),
        );
        IpNet::new(a, p.block_size).expect("a block of a valid pool")
    }

    /// The lowest unclaimed block.
    pub(super) fn first_free_block(&self) -> Option<IpNet> {
        self.free.first().map(|i| self.block_at(i))
    }
}

/// How many blocks pool `p` has (saturating for IPv6 pools of more than
/// 2^128 - 1 blocks, which only a /0 pool of /128 blocks would be).
pub(super) fn block_count(p: &Pool) -> u128 {
    1u128
        .checked_shl(u32::from(p.block_size - p.cidr.prefix_len()))
        .unwrap_or(u128::MAX)
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

/// Changes to the IPAM-wide configuration; `None` keeps the current value.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigUpdate {
    /// New strict_affinity.
    pub strict_affinity: Option<bool>,
    /// New max_blocks_per_node.
    pub max_blocks_per_node: Option<u32>,
    /// New VXLAN network identifier (1..=16777215).
    pub vxlan_vni: Option<u32>,
    /// New VXLAN UDP port (1..=65535).
    pub vxlan_port: Option<u32>,
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
