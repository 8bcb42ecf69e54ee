//! Copying a store from one backend to another (issue 16: `tabby-controller
//! migrate --from-dir DIR --to-etcd ...`). Every key is copied as it is:
//! the store id, epochs, intent mark and change feed keep their meaning, so
//! node clients resume on the new backend without a snapshot.
use crate::{Backend, Result, StoreError};

/// What a migration copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Copied {
    /// Keys written.
    pub keys: u64,
    /// Bytes of keys and values written.
    pub bytes: u64,
}

/// Copies every key of `from` into `to`, `batch` keys per atomic batch, and
/// makes it durable. Refused, with nothing written, when `to` holds any key:
/// a migration never merges two stores. The target must not be in use
/// while this runs (an embedded source is locked by a running controller).
pub fn copy(from: &dyn Backend, to: &dyn Backend, batch: usize) -> Result<Copied> {
    if let Some(k) = to.first_key_outside(&[])? {
        return Err(StoreError::NotEmpty(format!(
            "the target is not empty (it holds {:?}); migrate only into an empty prefix",
            String::from_utf8_lossy(&k)
        )));
    }
    let batch = batch.max(1);
    let mut done = Copied::default();
    let mut pending = Vec::with_capacity(batch);
    from.scan(b"", &mut |k, v| {
        done.keys += 1;
        done.bytes += (k.len() + v.len()) as u64;
        pending.push((k.to_vec(), Some(v.to_vec())));
        if pending.len() >= batch {
            // One durable transaction at a time keeps each within the
            // target's limits (etcd's --max-txn-ops).
            to.apply(std::mem::take(&mut pending))?;
            to.sync()?;
        }
        Ok(())
    })?;
    if !pending.is_empty() {
        to.apply(pending)?;
    }
    to.sync()?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LogBackend, Mutation, Op, Pool, Store};

    fn pool(name: &str, cidr: &str) -> Pool {
        Pool {
            name: name.into(),
            cidr: cidr.parse().unwrap_or_else(|_| unreachable!()),
            block_size: 26,
            nat_outgoing: true,
            encapsulation: crate::Encapsulation::None,
            disabled: false,
            node_selector: String::new(),
        }
    }

    /// A copy is the same store (id, revision, records), batch size
    /// whatever; a second copy into it is refused and changes nothing.
    #[test]
    fn a_copy_is_the_same_store_and_a_full_target_is_refused() -> Result<()> {
        let tmp = || tempfile::tempdir().map_err(|e| StoreError::NotEmpty(e.to_string()));
        let (a, b) = (tmp()?, tmp()?);
        let (id, rev) = {
            let s = Store::open(a.path())?;
            for i in 0..25 {
                s.commit(&[Mutation {
                    ops: vec![Op::PutPool(pool(
                        &format!("p{i}"),
                        &format!("10.{i}.0.0/16"),
                    ))],
                }])?;
            }
            (s.id().to_string(), s.revision())
        };
        let from = LogBackend::open(a.path())?;
        let to = LogBackend::open(b.path())?;
        let n = copy(&from, &to, 7)?;
        assert!(n.keys >= 25, "{n:?}");
        let again = copy(&from, &to, 7);
        assert!(matches!(again, Err(StoreError::NotEmpty(_))), "{again:?}");
        drop((from, to));
        let s = Store::open(b.path())?;
        assert_eq!((s.id(), s.revision()), (id.as_str(), rev));
        assert_eq!(s.load()?.pools.len(), 25);
        Ok(())
    }
}
