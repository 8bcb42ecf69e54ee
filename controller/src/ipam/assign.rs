//! Assignment: plan where each family's address comes from (an own block,
//! a new block, a borrowed address, or the one requested), then apply the
//! plan, so that a failure leaves nothing half done.
use super::{
    addr::{addr_at, block_of, ordinal_of, Family},
    records::{AllocationView, AssignRequest, Held, PoolState, Slot},
    validate::check_handle,
    IpamState,
};
use crate::error::{Error, Result};
use ipnet::IpNet;
use std::sync::Arc;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};
use tabby_store::{Attributes, Block, Handle, Mutation, Node, Op};

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

impl IpamState {
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
        // The per-node index is in that order already: the first entry of
        // this family and an eligible pool, not a walk over every block.
        let own = self.node_blocks.get(node.name.as_str());
        let best = self
            .node_free
            .get(node.name.as_str())
            .into_iter()
            .flatten()
            .find(|(_, _, c)| {
                Family::of_net(c) == fam && pool_names.contains(self.blocks[c].rec.pool.as_str())
            });
        if let Some(&(_, ordinal, block)) = best {
            return Ok(Pick::Existing { block, ordinal });
        }
        // 2. A new block, unless the node reached its limit.
        let owned = own.map_or(0, |s| s.len()) as u32;
        let max = self.config.max_blocks_per_node;
        let at_limit = max > 0 && owned >= max;
        if !at_limit {
            for p in &pools {
                if let Some(block) = p.first_free_block() {
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
                Slot::Free { .. } if self.config.strict_affinity && b.lends_to(&node.name) => {
                    Err(Error::FailedPrecondition(format!(
                        "requested address {a} is in block {c} of node {:?}; strict_affinity forbids borrowing it",
                        b.rec.affinity.as_deref().unwrap_or("")
                    )))
                }
                Slot::Free { .. } => Ok(Pick::Existing { block: c, ordinal }),
            },
            None => {
                let owned = self.node_blocks.get(node.name.as_str()).map_or(0, |s| s.len()) as u32;
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
        if let Some(h) = self.handles.get(req.handle.as_str()) {
            if &*h.node != node {
                // Another node's handle: not this caller's to use (#12).
                return Err(Error::PermissionDenied(format!(
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
        if req.num_v4 == 0 && req.num_v6 == 0 && req.requested.is_empty() {
            // Nothing asked: one address of each family a pool of the node
            // offers (dual stack where both do); IPv4 when none does, which
            // then says what is missing.
            let v6 = !self.eligible_pools(Family::V6, n).is_empty();
            if !v6 || !self.eligible_pools(Family::V4, n).is_empty() {
                want.insert(Family::V4, None);
            }
            if v6 {
                want.insert(Family::V6, None);
            }
        }
        if req.num_v4 == 1 {
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
        let held = Held {
            handle: req.handle.as_str().into(),
            node: self.node_name(&node),
        };
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
                    ops.push(Op::PutBlock(rec.clone()));
                    self.add_block(rec);
                    (block, ordinal)
                }
            };
            let old = self.blocks.get(&block).and_then(|b| b.free_key());
            let b = Arc::make_mut(self.blocks.get_mut(&block).expect("planned"));
            let seq = match b.slots[ordinal as usize] {
                Slot::Free { seq } => seq,
                Slot::Used(_) => unreachable!("planned a free slot"),
            };
            b.free.remove(&(seq, ordinal));
            b.slots[ordinal as usize] = Slot::Used(held.clone());
            let borrowed = b.lends_to(&node);
            let addr = addr_at(&block, ordinal);
            if borrowed {
                self.borrowed.insert(addr, node.clone());
            }
            self.count_address(&held.node, borrowed, true);
            self.refresh_free(&block, old);
            if seq > 0 {
                ops.push(Op::ClearReleased(addr));
            }
            ops.push(Op::PutAllocation(addr, held.record()));
            addrs.push(addr);
        }
        let h = Handle {
            node: node.clone(),
            addresses: addrs.clone(),
            attributes: Attributes::from(&req.attributes),
        };
        ops.push(Op::PutHandle(req.handle.clone(), h.clone()));
        self.put_handle(held.handle, h);
        let views = addrs
            .iter()
            .filter_map(|a| self.allocation_of(*a))
            .collect();
        Ok((views, Mutation { ops }))
    }
}
