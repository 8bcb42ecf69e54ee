//! Pools: create, update, delete.
use super::{
    addr::{addr_at, Family},
    records::{BlockState, PoolState, PoolUpdate},
    selector::Selector,
    validate::{check_name, parse_cidr},
    IpamState,
};
use crate::error::{Error, Result};
use ipnet::IpNet;
use tabby_store::{Mutation, Op, Pool};

impl IpamState {
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
        self.pools
            .insert(p.name.clone(), PoolState::new(p.clone(), selector));
        let mut m = Mutation {
            ops: vec![Op::PutPool(p.clone())],
        };
        self.reconcile_tunnels(None, &mut m);
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
        // Block size and network never change: the free blocks stay.
        let free = self.pools.get(name).map(|s| s.free.clone());
        let mut st = PoolState::new(p.clone(), selector);
        if let Some(free) = free {
            st.free = free;
        }
        self.pools.insert(name.to_string(), st);
        let mut m = Mutation {
            ops: vec![Op::PutPool(p.clone())],
        };
        self.reconcile_tunnels(None, &mut m);
        Ok((p, m))
    }

    /// The blocks inside `cidr`, by CIDR.
    pub(super) fn blocks_in(&self, cidr: &IpNet) -> Vec<IpNet> {
        self.blocks_of_range(cidr).map(|b| b.rec.cidr).collect()
    }

    /// The blocks inside `cidr`, in order.
    pub(super) fn blocks_of_range<'a>(
        &'a self,
        cidr: &'a IpNet,
    ) -> impl Iterator<Item = &'a BlockState> + 'a {
        self.blocks
            .range(IpNet::new(cidr.network(), 0).expect("valid")..)
            .take_while(|(c, _)| cidr.contains(&c.network()))
            .map(|(_, b)| &**b)
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
        // Tunnel addresses do not hold a pool: they are given back first, and
        // their nodes get new ones from what remains.
        let tunnels: Vec<String> = self
            .handles
            .iter()
            .filter(|(h, v)| {
                super::tunnel_handle_node(h).is_some()
                    && v.addresses.iter().any(|a| cidr.contains(a))
            })
            .map(|(h, _)| h.to_string())
            .collect();
        let used: u64 = blocks
            .iter()
            .map(|c| self.blocks[c].used() as u64)
            .sum::<u64>()
            - tunnels.len() as u64;
        if used > 0 {
            return Err(Error::FailedPrecondition(format!(
                "pool {name:?} still has {used} allocated address(es) in {} block(s); disable it \
                 (UpdatePool disabled=true) so no new pods get its addresses, drain those pods, then delete it",
                blocks.len()
            )));
        }
        let mut ops = Vec::new();
        for h in &tunnels {
            ops.extend(self.release_handle(None, h)?.1.ops);
        }
        let p = self.pools.remove(name).expect("checked").rec;
        ops.push(Op::DeletePool(name.to_string()));
        for c in &blocks {
            let b = self.remove_block(c).expect("listed");
            for &(seq, o) in &b.free {
                if seq > 0 {
                    ops.push(Op::ClearReleased(addr_at(c, o)));
                }
            }
            ops.push(Op::DeleteBlock(*c));
        }
        let mut m = Mutation { ops };
        self.reconcile_tunnels(None, &mut m);
        Ok(((p, blocks.len() as u32), m))
    }
}
