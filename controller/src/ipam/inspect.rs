//! Inspection and repair: utilization, the consistency check, and the admin
//! release that repairs what the check finds.
use super::{
    addr::addr_at,
    records::{
        BlockState, BlockUsage, HandleState, Held, IpamUsage, LeakRelease, NodeUsage, PoolUsage,
        Problem, ProblemKind, Slot,
    },
    IpamState,
};
use crate::error::Result;
use ipnet::IpNet;
use std::net::IpAddr;
use tabby_store::Mutation;

impl IpamState {
    /// Utilization per pool and node, and per block when `blocks` is set.
    /// From the indexes: no walk over the addresses.
    pub fn usage(&self, blocks: bool) -> IpamUsage {
        let mut u = IpamUsage::default();
        for p in self.pools.values() {
            let host_bits = (p.rec.cidr.max_prefix_len() - p.rec.cidr.prefix_len()) as u32;
            let size = 1u64.checked_shl(host_bits).unwrap_or(u64::MAX);
            let (mut blocks, mut used) = (0, 0);
            for b in self.blocks_of_range(&p.rec.cidr) {
                blocks += 1;
                used += u64::from(b.used());
            }
            u.pools.push(PoolUsage {
                pool: p.rec.clone(),
                size,
                blocks,
                used,
            });
        }
        // Nodes, their blocks and their counts are all kept in name order:
        // merged in one pass, no lookups. Blocks or addresses of a node that
        // is not registered (only from a damaged store) are listed too.
        let mut nodes: Vec<NodeUsage> = Vec::with_capacity(self.nodes.len());
        let mut registered = self.nodes.keys().map(String::as_str).peekable();
        let mut blocks_of = self.node_blocks.iter().peekable();
        let mut counts_of = self.node_counts.iter().peekable();
        loop {
            let name = [
                registered.peek().copied(),
                blocks_of.peek().map(|(n, _)| &***n),
                counts_of.peek().map(|(n, _)| &***n),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(name) = name else { break };
            let mut e = NodeUsage {
                name: name.to_string(),
                ..Default::default()
            };
            registered.next_if(|n| *n == name);
            if let Some((_, set)) = blocks_of.next_if(|(n, _)| &***n == name) {
                e.blocks = set.iter().copied().collect();
            }
            if let Some((_, c)) = counts_of.next_if(|(n, _)| &***n == name) {
                e.addresses = c.addresses;
                e.borrowed = c.borrowed;
            }
            nodes.push(e);
        }
        if blocks {
            u.blocks = self
                .blocks
                .values()
                .map(|b| BlockUsage {
                    block: b.rec.clone(),
                    size: b.slots.len() as u64,
                    used: b.used() as u64,
                })
                .collect();
        }
        u.nodes = nodes;
        u
    }

    /// Number of allocated addresses and of handles.
    pub fn counts(&self) -> (u64, u64) {
        let alloc =
            self.blocks.values().map(|b| b.used() as u64).sum::<u64>() + self.orphans.len() as u64;
        (alloc, self.handles.len() as u64)
    }

    /// Consistency check.
    ///
    /// Linear, and in parts over the cores on a large table. The blocks are
    /// walked first without looking up each allocation's handle; then each
    /// handle's addresses are looked up in their blocks. When the handles
    /// list, without repeats, as many addresses that they hold as there are
    /// allocations, every allocation is listed by its handle; only
    /// otherwise are the blocks walked again with a lookup per allocation,
    /// to name the leaked ones.
    pub fn check(&self) -> Vec<Problem> {
        let blocks: Vec<&BlockState> = self.blocks.values().map(|b| &**b).collect();
        let handles: Vec<(&str, &HandleState)> =
            self.handles.iter().map(|(k, h)| (&**k, &**h)).collect();
        // Threads pay off only on a large table.
        let parts = if blocks.len() + handles.len() < 4096 {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        };
        let mut used = 0u64;
        let mut out = Vec::new();
        for (p, n) in in_parts(&blocks, parts, |c| self.check_blocks(c, false)) {
            out.extend(p);
            used += n;
        }
        let (mut stale, mut listed, mut repeats) = (Vec::new(), 0u64, false);
        for (p, n, r) in in_parts(&handles, parts, |c| self.check_handles(c)) {
            stale.extend(p);
            listed += n;
            repeats |= r;
        }
        if repeats || listed != used + self.orphans.len() as u64 {
            out = in_parts(&blocks, parts, |c| self.check_blocks(c, true))
                .into_iter()
                .flat_map(|(p, _)| p)
                .collect();
        }
        for (a, al) in &self.orphans {
            out.push(Problem {
                kind: ProblemKind::AddressWithoutHandle,
                address: Some(*a),
                handle: Some(al.handle.to_string()),
                block: None,
                detail: format!("{a} is recorded as allocated but lies in no block; release it"),
                repairable: true,
            });
        }
        // Each part is in handle order, but a problem may name any handle.
        stale.sort_by(|x, y| (&x.handle, x.address).cmp(&(&y.handle, y.address)));
        out.append(&mut stale);
        out
    }

    /// The block part of [`IpamState::check`], and the allocations it saw;
    /// `lookup`: also whether each allocation's handle lists it.
    pub(super) fn check_blocks(&self, blocks: &[&BlockState], lookup: bool) -> (Vec<Problem>, u64) {
        let mut out = Vec::new();
        let mut used = 0;
        for b in blocks {
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
                    used += 1;
                    let a = addr_at(&c, o as u32);
                    if lookup {
                        self.check_listed(a, al, Some(c), &mut out);
                    }
                    check_affinity(a, al, b.rec.affinity.as_deref(), Some(c), &mut out);
                }
            }
        }
        (out, used)
    }

    /// The handle part of [`IpamState::check`]: problems, how many listed
    /// addresses their handle holds, and whether a handle lists one twice.
    pub(super) fn check_handles(
        &self,
        handles: &[(&str, &HandleState)],
    ) -> (Vec<Problem>, u64, bool) {
        let mut out = Vec::new();
        let (mut held, mut repeats) = (0, false);
        // Handles come in name order, and a node's pods' names sort
        // together, so the next address is mostly in the block of the last
        // one: try that block before searching the block table.
        let mut last: Option<&BlockState> = None;
        for (hid, h) in handles {
            for (i, a) in h.addresses.iter().enumerate() {
                repeats |= h.addresses[..i].contains(a);
                let block = last
                    .filter(|b| b.rec.cidr.contains(a))
                    .or_else(|| self.block_containing(*a));
                last = block.or(last);
                if self.holder_in(block, *a).map(|al| &*al.handle) == Some(*hid) {
                    held += 1;
                } else {
                    out.push(Problem {
                        kind: ProblemKind::HandlePointsNowhere,
                        address: Some(*a),
                        handle: Some(hid.to_string()),
                        block: self.block_key_containing(*a),
                        detail: format!(
                            "handle {hid:?} lists {a}, which is not allocated to it; repair drops it from the handle"
                        ),
                        repairable: true,
                    });
                }
            }
        }
        (out, held, repeats)
    }

    /// Whether `al`'s handle lists `a`; a problem if not.
    fn check_listed(&self, a: IpAddr, al: &Held, block: Option<IpNet>, out: &mut Vec<Problem>) {
        let listed = self
            .handles
            .get(&al.handle)
            .is_some_and(|h| h.addresses.contains(&a));
        if !listed {
            out.push(Problem {
                kind: ProblemKind::AddressWithoutHandle,
                address: Some(a),
                handle: Some(al.handle.to_string()),
                block,
                detail: format!(
                    "{a} is allocated to handle {:?}, which does not list it: nothing will release it (leaked)",
                    al.handle
                ),
                repairable: true,
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
                        let before = self.handles.contains_key(h.as_str());
                        self.drop_from_handle(&h, a, &mut ops);
                        if before && !self.handles.contains_key(h.as_str()) {
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

/// A borrowed address is no damage, but the check names it.
fn check_affinity(
    a: IpAddr,
    al: &Held,
    affinity: Option<&str>,
    block: Option<IpNet>,
    out: &mut Vec<Problem>,
) {
    if affinity != Some(&*al.node) {
        out.push(Problem {
            kind: ProblemKind::BorrowedAddress,
            address: Some(a),
            handle: Some(al.handle.to_string()),
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

/// `f` over `items` in `parts` threads (in this thread for one part); the
/// results in the order of the items.
fn in_parts<I: Sync, T: Send>(items: &[I], parts: usize, f: impl Fn(&[I]) -> T + Sync) -> Vec<T> {
    if parts <= 1 || items.len() < 2 {
        return vec![f(items)];
    }
    let chunk = items.len().div_ceil(parts);
    std::thread::scope(|sc| {
        let f = &f;
        let running: Vec<_> = items
            .chunks(chunk)
            .map(|c| sc.spawn(move || f(c)))
            .collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}
