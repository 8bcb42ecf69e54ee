//! Release: by handle or by address, by the node that holds it or an admin.
use super::{addr::ordinal_of, records::Slot, validate::check_handle, IpamState};
use crate::error::{Error, Result};
use std::net::IpAddr;
use std::sync::Arc;
use tabby_store::{Mutation, Op};

impl IpamState {
    /// Frees one slot; returns the ops. The caller fixes the handle record.
    pub(super) fn free_slot(&mut self, a: IpAddr, ops: &mut Vec<Op>) -> bool {
        let Some(k) = self.block_key_containing(a) else {
            return self.orphans.remove(&a).is_some() && {
                ops.push(Op::DeleteAllocation(a));
                true
            };
        };
        let old = self.blocks.get(&k).and_then(|b| b.free_key());
        let b = Arc::make_mut(self.blocks.get_mut(&k).expect("found"));
        let o = ordinal_of(&k, a);
        let holder = match &b.slots[o as usize] {
            Slot::Free { .. } => return false,
            Slot::Used(al) => al.node.clone(),
        };
        self.release_seq += 1;
        let seq = self.release_seq;
        b.slots[o as usize] = Slot::Free { seq };
        b.free.insert((seq, o));
        let borrowed = self.borrowed.remove(&a).is_some();
        self.count_address(&holder, borrowed, false);
        self.refresh_free(&k, old);
        ops.push(Op::DeleteAllocation(a));
        ops.push(Op::SetReleased(a, seq));
        true
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
            if &*h.node != n {
                return Err(Error::PermissionDenied(format!(
                    "handle {handle:?} is held by node {:?}, not {n:?}",
                    h.node
                )));
            }
        }
        let h = self.remove_handle(handle).expect("present");
        let mut ops = Vec::new();
        let mut released = Vec::new();
        for &a in &h.addresses {
            // Only free what this handle really holds.
            if self.holder(a).is_some_and(|al| &*al.handle == handle) && self.free_slot(a, &mut ops)
            {
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
            if &*al.node != n {
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

    /// Drops `a` from a handle record, and the record once it is empty.
    pub(super) fn drop_from_handle(&mut self, handle: &str, a: IpAddr, ops: &mut Vec<Op>) {
        if let Some(h) = self.handles.get_mut(handle).map(Arc::make_mut) {
            h.addresses.retain(|x| *x != a);
            if h.addresses.is_empty() {
                self.remove_handle(handle);
                ops.push(Op::DeleteHandle(handle.to_string()));
            } else {
                ops.push(Op::PutHandle(handle.to_string(), h.record()));
            }
        }
    }
}
