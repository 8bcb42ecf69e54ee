//! Durable typed state of the tabby controller.
//!
//! Everything lives in one key space on a [`Backend`] (the embedded
//! default, a snapshot and a log: [`LogBackend`]; or etcd, for controllers
//! that fail over) so that a
//! [`Mutation`] (any mix of pools, blocks, allocations, handles, nodes and
//! config) is applied as one atomic batch. [`Store::commit`] takes several mutations at once (group
//! commit), gives each its own revision, writes one batch and flushes it to
//! disk before returning: a caller may acknowledge only after that.
//!
//! Key layout (the store reads keys back only when it opens):
//! `m/rev`, `m/id` (the store's random identity), `m/intent` (revision of
//! the last intent change, and the revision it is valid at), `m/epochs`
//! (one per open: a random id and the revision it started at), `p/<pool>`,
//! `b/<block cidr>`, `a/<address>`, `r/<address>` (release order of a free
//! address), `h/<handle>`, `n/<node>`, `c/ipam`.
//!
//! The change feed ([`Store::subscribe`]) reports every durable commit with
//! its revision and the keys it touched. It is in memory: no log is written
//! to disk (one would add two key writes to every mutation; measured, that
//! cost a quarter of the write throughput). What the intent stream needs
//! across restarts is the intent mark: a watcher that has applied it needs
//! nothing, any other gets a snapshot.

mod backend;
pub mod etcd;
mod log;
pub mod migrate;
mod types;
pub mod warm;

mod attributes;
pub use backend::{Backend, SledBackend};
pub use log::{embedded_store_in, open_embedded, LogBackend, LogOptions};
pub use types::*;

use serde::{de::DeserializeOwned, Serialize};
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
};
use tokio::sync::broadcast;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (I/O, corruption detected by sled).
    #[error("store: {0}")]
    Db(#[from] sled::Error),
    /// A file of the embedded store could not be read or written.
    #[error("store: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// etcd failed or could not be reached.
    #[error("store: etcd: {0}")]
    Etcd(String),
    /// This controller is no longer the leader: its write was refused
    /// (fencing), and nothing of it landed.
    #[error("store: not the leader any more: {0}")]
    Fenced(String),
    /// A migration's target already holds keys; nothing was written.
    #[error("store: {0}")]
    NotEmpty(String),
    /// A record could not be encoded or decoded.
    #[error("store: record codec: {0}")]
    Codec(#[from] postcard::Error),
    /// A key or value does not have the expected shape.
    #[error("store: corrupt entry {key:?}: {why}")]
    Corrupt {
        /// The offending key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Result type of the store.
pub type Result<T> = std::result::Result<T, StoreError>;

/// One change to durable state. A [`Mutation`] is a list of these.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Create or replace a pool.
    PutPool(Pool),
    /// Remove a pool by name.
    DeletePool(String),
    /// Create or replace a block.
    PutBlock(Block),
    /// Remove a block by CIDR.
    DeleteBlock(ipnet::IpNet),
    /// Record an address as allocated.
    PutAllocation(IpAddr, Allocation),
    /// Mark an address as free again.
    DeleteAllocation(IpAddr),
    /// Remember when a free address was released (FIFO reuse order).
    SetReleased(IpAddr, u64),
    /// Forget the release order of an address (it is allocated again).
    ClearReleased(IpAddr),
    /// Create or replace a handle.
    PutHandle(String, Handle),
    /// Remove a handle.
    DeleteHandle(String),
    /// Create or replace a node.
    PutNode(Node),
    /// Remove a node.
    DeleteNode(String),
    /// Replace the IPAM configuration.
    PutConfig(IpamConfig),
    /// Replace the BGP configuration.
    PutBgp(BgpConfig),
}

/// What a committed [`Op`] touched: the change feed carries these.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Key {
    /// A pool, by name.
    Pool(String),
    /// A block, by CIDR.
    Block(ipnet::IpNet),
    /// An address (allocation or release order).
    Address(IpAddr),
    /// A handle.
    Handle(String),
    /// A node.
    Node(String),
    /// The IPAM configuration.
    Config,
    /// The BGP configuration.
    Bgp,
}

impl Op {
    /// The key this op changes.
    pub fn key(&self) -> Key {
        match self {
            Op::PutPool(p) => Key::Pool(p.name.clone()),
            Op::DeletePool(n) => Key::Pool(n.clone()),
            Op::PutBlock(b) => Key::Block(b.cidr),
            Op::DeleteBlock(c) => Key::Block(*c),
            Op::PutAllocation(a, _)
            | Op::DeleteAllocation(a)
            | Op::SetReleased(a, _)
            | Op::ClearReleased(a) => Key::Address(*a),
            Op::PutHandle(h, _) | Op::DeleteHandle(h) => Key::Handle(h.clone()),
            Op::PutNode(n) => Key::Node(n.name.clone()),
            Op::DeleteNode(n) => Key::Node(n.clone()),
            Op::PutConfig(_) => Key::Config,
            Op::PutBgp(_) => Key::Bgp,
        }
    }
}

/// A set of ops applied atomically under one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mutation {
    /// The ops, applied in order.
    pub ops: Vec<Op>,
}

impl Mutation {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// One committed mutation, as the change feed reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Commit {
    /// The revision the mutation was stored under.
    pub revision: u64,
    /// Every key it touched, deduplicated, sorted.
    pub keys: Vec<Key>,
}

/// One stored record, as [`Store::load_each`] hands them over.
#[derive(Debug, Clone)]
pub enum Record {
    /// A pool.
    Pool(Pool),
    /// A block.
    Block(Block),
    /// The release order of a free address that was released once.
    Released(IpAddr, u64),
    /// An allocated address.
    Allocation(IpAddr, Allocation),
    /// A handle, by id.
    Handle(String, Handle),
    /// A node.
    Node(Node),
    /// The IPAM configuration.
    Config(IpamConfig),
    /// The BGP configuration.
    Bgp(BgpConfig),
}

/// Everything in the store, as loaded at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Revision of the last committed mutation (0 for an empty store).
    pub revision: u64,
    /// Pools by name.
    pub pools: BTreeMap<String, Pool>,
    /// Blocks by CIDR.
    pub blocks: BTreeMap<ipnet::IpNet, Block>,
    /// Allocated addresses.
    pub allocations: BTreeMap<IpAddr, Allocation>,
    /// Release order of free addresses that were ever released.
    pub released: BTreeMap<IpAddr, u64>,
    /// Handles by id.
    pub handles: BTreeMap<String, Handle>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// IPAM configuration.
    pub config: IpamConfig,
    /// BGP configuration.
    pub bgp: BgpConfig,
    /// Last revision written with an intent mark ([`Store::write_marked`]):
    /// no intent change was committed after it. 0 when none was written.
    pub intent_revision: u64,
}

impl Snapshot {
    /// Applies a mutation in memory exactly as [`Store::commit`] applies it on
    /// disk (revision included). Lets tests and tools replay mutations.
    pub fn apply(&mut self, m: &Mutation) {
        if m.is_empty() {
            return;
        }
        self.revision += 1;
        for op in &m.ops {
            match op.clone() {
                Op::PutPool(p) => {
                    self.pools.insert(p.name.clone(), p);
                }
                Op::DeletePool(n) => {
                    self.pools.remove(&n);
                }
                Op::PutBlock(b) => {
                    self.blocks.insert(b.cidr, b);
                }
                Op::DeleteBlock(c) => {
                    self.blocks.remove(&c);
                }
                Op::PutAllocation(a, al) => {
                    self.allocations.insert(a, al);
                }
                Op::DeleteAllocation(a) => {
                    self.allocations.remove(&a);
                }
                Op::SetReleased(a, seq) => {
                    self.released.insert(a, seq);
                }
                Op::ClearReleased(a) => {
                    self.released.remove(&a);
                }
                Op::PutHandle(h, r) => {
                    self.handles.insert(h, r);
                }
                Op::DeleteHandle(h) => {
                    self.handles.remove(&h);
                }
                Op::PutNode(n) => {
                    self.nodes.insert(n.name.clone(), n);
                }
                Op::DeleteNode(n) => {
                    self.nodes.remove(&n);
                }
                Op::PutConfig(c) => self.config = c,
                Op::PutBgp(b) => self.bgp = b,
            }
        }
    }
}

/// Batches applied by [`Store::write`] and not yet made durable.
#[derive(Debug, Default)]
#[must_use = "nothing is durable until make_durable"]
pub struct Written {
    commits: Vec<Commit>,
}

/// The durable store. Cheap to share behind an `Arc`; commits are serialized.
pub struct Store {
    backend: Box<dyn Backend>,
    /// Random identity, made when the store was created.
    id: String,
    /// Its opens, oldest first; the last is this one.
    epochs: Vec<Epoch>,
    /// Last committed revision and intent mark; the lock also serializes
    /// commits.
    revision: Mutex<Counters>,
    feed: broadcast::Sender<Arc<Commit>>,
}

const REV_KEY: &[u8] = b"m/rev";
const ID_KEY: &[u8] = b"m/id";
const INTENT_KEY: &[u8] = b"m/intent";
const EPOCHS_KEY: &[u8] = b"m/epochs";
/// Epochs kept: a watcher from an older one just gets a snapshot.
const MAX_EPOCHS: usize = 256;

/// One open of the store: what a resuming watcher's revisions belong to.
///
/// A data directory restored from a copy keeps its id but not what followed
/// the copy. Revisions seen after the copy under the copy's last epoch are
/// past that epoch's end (the start of the next), and epochs opened after the
/// copy are unknown to it: either way the watcher needs a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Epoch {
    /// 64 random bits in hex.
    pub id: String,
    /// Revision when it was opened.
    pub start: u64,
}

/// The revision counter and the intent mark.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    revision: u64,
    /// Last revision written with an intent mark.
    intent: u64,
}

/// A big-endian u64 meta value.
fn meta_u64(key: &[u8], v: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| {
        StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            why: format!("{} bytes, want 8", v.len()),
        }
    })?))
}

/// A store's identity: a random (v4) UUID as 32 lowercase hex digits, the
/// width and alphabet of the 16 random bytes earlier versions wrote.
fn new_store_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// An epoch's identity: 64 random bits as 16 lowercase hex digits.
fn new_epoch_id() -> String {
    // The halves' fixed version and variant bits sit at different
    // positions, so their XOR is 64 random bits.
    let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
    format!("{:016x}", hi ^ lo)
}

#[cfg(test)]
mod id_tests {
    fn is_hex(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    #[test]
    fn ids_keep_their_width_and_alphabet() {
        let (a, b) = (super::new_store_id(), super::new_store_id());
        assert!(is_hex(&a, 32) && is_hex(&b, 32) && a != b, "{a} {b}");
        let (a, b) = (super::new_epoch_id(), super::new_epoch_id());
        assert!(is_hex(&a, 16) && is_hex(&b, 16) && a != b, "{a} {b}");
    }
}
const CONFIG_KEY: &[u8] = b"c/ipam";
const BGP_KEY: &[u8] = b"c/bgp";

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(postcard::to_allocvec(v)?)
}

fn dec<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T> {
    postcard::from_bytes(v).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    })
}

/// Decodes a record written as `T`, or as its older layout `Old`. Exactly:
/// a `T` must use every byte (postcard ignores trailing bytes), so that an
/// old record is never read as a new one with garbage in its new fields.
fn dec_or<T: DeserializeOwned, Old: DeserializeOwned + Into<T>>(key: &[u8], v: &[u8]) -> Result<T> {
    match postcard::take_from_bytes::<T>(v) {
        Ok((t, [])) => Ok(t),
        _ => match postcard::take_from_bytes::<Old>(v) {
            Ok((o, [])) => Ok(o.into()),
            _ => dec(key, v),
        },
    }
}

fn op_key(op: &Op) -> Vec<u8> {
    match op.key() {
        Key::Pool(n) => format!("p/{n}"),
        Key::Block(c) => format!("b/{c}"),
        Key::Address(a) => match op {
            Op::SetReleased(..) | Op::ClearReleased(_) => format!("r/{a}"),
            _ => format!("a/{a}"),
        },
        Key::Handle(h) => format!("h/{h}"),
        Key::Node(n) => format!("n/{n}"),
        Key::Config => return CONFIG_KEY.to_vec(),
        Key::Bgp => return BGP_KEY.to_vec(),
    }
    .into_bytes()
}

/// sled's page cache while an old sled store is read to convert it (once):
/// the embedded store itself keeps no cache.
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

impl Store {
    /// Opens (or creates) the embedded store in `dir` (see
    /// [`open_embedded`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the embedded store in `dir`; converting an old
    /// sled store there reads it through a page cache of about
    /// `cache_bytes`.
    pub fn open_with_cache(dir: impl AsRef<Path>, cache_bytes: u64) -> Result<Store> {
        Self::open_on(Box::new(open_embedded(dir.as_ref(), cache_bytes)?))
    }

    /// Opens (or creates) the store on `backend`: reads the revision, the
    /// intent mark and the identity, and records a new epoch, durably.
    pub fn open_on(backend: Box<dyn Backend>) -> Result<Store> {
        let revision = match backend.get(REV_KEY)? {
            Some(v) => meta_u64(REV_KEY, &v)?,
            None => 0,
        };
        // The mark counts only if it was kept up to date to the last batch
        // (a binary that did not know it would have left it behind).
        let intent = match backend.get(INTENT_KEY)? {
            Some(v) if v.len() == 16 => {
                let (mark, at) = v.split_at(8);
                if meta_u64(INTENT_KEY, at)? == revision {
                    meta_u64(INTENT_KEY, mark)?
                } else {
                    0
                }
            }
            Some(v) => {
                return Err(StoreError::Corrupt {
                    key: "m/intent".into(),
                    why: format!("{} bytes, want 16", v.len()),
                })
            }
            None => 0,
        };
        let mut first = Vec::new();
        let id = match backend.get(ID_KEY)? {
            Some(v) => String::from_utf8(v.to_vec()).map_err(|_| StoreError::Corrupt {
                key: "m/id".into(),
                why: "not UTF-8".into(),
            })?,
            None => {
                let id = new_store_id();
                first.push((ID_KEY.to_vec(), Some(id.as_bytes().to_vec())));
                id
            }
        };
        let mut epochs: Vec<Epoch> = match backend.get(EPOCHS_KEY)? {
            Some(v) => dec(EPOCHS_KEY, &v)?,
            None => Vec::new(),
        };
        epochs.push(Epoch {
            id: new_epoch_id(),
            start: revision,
        });
        let drop_old = epochs.len().saturating_sub(MAX_EPOCHS);
        epochs.drain(..drop_old);
        first.push((EPOCHS_KEY.to_vec(), Some(enc(&epochs)?)));
        backend.apply(first)?;
        // Durable before anyone is told the new epoch.
        backend.sync()?;
        let (feed, _) = broadcast::channel(4096);
        Ok(Store {
            backend,
            id,
            epochs,
            revision: Mutex::new(Counters { revision, intent }),
            feed,
        })
    }

    /// The store's identity: random, made when it was created, never
    /// changed. Tells a resuming watcher whether its revisions mean anything
    /// here.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every open of this store still remembered, oldest first; the last is
    /// this open.
    pub fn epochs(&self) -> &[Epoch] {
        &self.epochs
    }

    /// This open's epoch.
    pub fn epoch(&self) -> &Epoch {
        self.epochs.last().expect("open always records an epoch")
    }

    /// Revision of the last committed mutation.
    pub fn revision(&self) -> u64 {
        self.counters().revision
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.revision.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to commits made from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Commit>> {
        self.feed.subscribe()
    }

    /// Reads every record.
    pub fn load(&self) -> Result<Snapshot> {
        let mut s = Snapshot::default();
        let (revision, intent) = self.load_each(|r| match r {
            Record::Pool(p) => {
                s.pools.insert(p.name.clone(), p);
            }
            Record::Block(b) => {
                s.blocks.insert(b.cidr, b);
            }
            Record::Released(a, seq) => {
                s.released.insert(a, seq);
            }
            Record::Allocation(a, al) => {
                s.allocations.insert(a, al);
            }
            Record::Handle(id, h) => {
                s.handles.insert(id, h);
            }
            Record::Node(n) => {
                s.nodes.insert(n.name.clone(), n);
            }
            Record::Config(c) => s.config = c,
            Record::Bgp(b) => s.bgp = b,
        })?;
        s.revision = revision;
        s.intent_revision = intent;
        Ok(s)
    }

    /// Reads every record and hands each to `f` as it is decoded, without
    /// collecting them: pools first, then blocks, release marks, handles,
    /// allocations, nodes and the configuration, so that a reader
    /// can place each record where it belongs as it comes. Returns the
    /// revision and the intent mark the records are at.
    pub fn load_each(&self, mut f: impl FnMut(Record)) -> Result<(u64, u64)> {
        let c = *self.counters();
        for prefix in [b'p', b'b', b'r', b'h', b'a', b'n', b'c'] {
            self.backend.scan(&[prefix, b'/'], &mut |k, v| {
                let corrupt = |why: &str| StoreError::Corrupt {
                    key: String::from_utf8_lossy(k).into_owned(),
                    why: why.to_string(),
                };
                let rest = std::str::from_utf8(&k[2..]).map_err(|_| corrupt("key is not UTF-8"))?;
                let addr =
                    || -> Result<IpAddr> { rest.parse().map_err(|_| corrupt("bad address")) };
                f(match prefix {
                    b'p' => Record::Pool(dec(k, v)?),
                    b'b' => Record::Block(dec(k, v)?),
                    b'r' => Record::Released(addr()?, dec(k, v)?),
                    b'a' => Record::Allocation(addr()?, dec(k, v)?),
                    b'h' => Record::Handle(rest.to_string(), dec(k, v)?),
                    b'n' => Record::Node(dec_or::<Node, NodeV1>(k, v)?),
                    _ if rest == "bgp" => Record::Bgp(dec(k, v)?),
                    _ => Record::Config(dec_or::<IpamConfig, IpamConfigV1>(k, v)?),
                });
                Ok(())
            })?;
        }
        // Anything else is damage: say so rather than start on part of it.
        if let Some(k) = self.backend.first_key_outside(b"abchmnpr")? {
            return Err(StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                why: "unknown prefix".into(),
            });
        }
        self.backend.loaded();
        Ok((c.revision, c.intent))
    }

    /// Applies `mutations` as one atomic batch, each under its own revision,
    /// and returns once the batch is durable on disk. Returns the revision of
    /// each mutation (an empty mutation gets the current revision and writes
    /// nothing).
    pub fn commit(&self, mutations: &[Mutation]) -> Result<Vec<u64>> {
        let (revs, written) = self.write(mutations)?;
        self.make_durable(vec![written])?;
        Ok(revs)
    }

    /// The revision [`Store::write`] would give the last of `mutations` if
    /// called now: one more per non-empty mutation.
    pub fn revision_after(&self, mutations: &[Mutation]) -> u64 {
        self.revision() + mutations.iter().filter(|m| !m.is_empty()).count() as u64
    }

    /// First half of [`Store::commit`]: applies `mutations` as one atomic
    /// batch (revisions as for `commit`) without waiting for the disk. Nothing
    /// may be acknowledged until [`Store::make_durable`] has returned for it;
    /// splitting the two lets a caller prepare the next batch during a flush.
    pub fn write(&self, mutations: &[Mutation]) -> Result<(Vec<u64>, Written)> {
        self.write_marked(mutations, false)
    }

    /// [`Store::write`]; with `intent` the batch also records its last
    /// revision as the last one that changed the intent (atomically with it),
    /// which [`Snapshot::intent_revision`] reads back after a restart.
    pub fn write_marked(
        &self,
        mutations: &[Mutation],
        intent: bool,
    ) -> Result<(Vec<u64>, Written)> {
        let mut guard = self.counters();
        let mut rev = guard.revision;
        let mut batch: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut revs = Vec::with_capacity(mutations.len());
        let mut commits = Vec::new();
        let feed = self.feed.receiver_count() > 0;
        for m in mutations {
            if m.is_empty() {
                revs.push(rev);
                continue;
            }
            rev += 1;
            // Keys are for the feed: skip building them when nobody listens.
            let mut keys = Vec::with_capacity(if feed { m.ops.len() } else { 0 });
            for op in &m.ops {
                let k = op_key(op);
                let v = match op {
                    Op::PutPool(p) => Some(enc(p)?),
                    Op::PutBlock(b) => Some(enc(b)?),
                    Op::PutAllocation(_, a) => Some(enc(a)?),
                    Op::SetReleased(_, seq) => Some(enc(seq)?),
                    Op::PutHandle(_, h) => Some(enc(h)?),
                    Op::PutNode(n) => Some(enc(n)?),
                    Op::PutConfig(c) => Some(enc(c)?),
                    Op::PutBgp(b) => Some(enc(b)?),
                    Op::DeletePool(_)
                    | Op::DeleteBlock(_)
                    | Op::DeleteAllocation(_)
                    | Op::ClearReleased(_)
                    | Op::DeleteHandle(_)
                    | Op::DeleteNode(_) => None,
                };
                batch.push((k, v));
                if feed {
                    keys.push(op.key());
                }
            }
            keys.sort();
            keys.dedup();
            let c = Commit {
                revision: rev,
                keys,
            };
            revs.push(rev);
            commits.push(c);
        }
        if commits.is_empty() {
            return Ok((revs, Written { commits }));
        }
        let mark = if intent { rev } else { guard.intent };
        batch.push((REV_KEY.to_vec(), Some(rev.to_be_bytes().to_vec())));
        let mut m = [0u8; 16];
        m[..8].copy_from_slice(&mark.to_be_bytes());
        m[8..].copy_from_slice(&rev.to_be_bytes());
        batch.push((INTENT_KEY.to_vec(), Some(m.to_vec())));
        self.backend.apply(batch)?;
        *guard = Counters {
            revision: rev,
            intent: mark,
        };
        Ok((revs, Written { commits }))
    }

    /// Second half of [`Store::commit`]: one flush makes every batch written
    /// so far durable; then the change feed hears about `written`, in order.
    pub fn make_durable(&self, written: Vec<Written>) -> Result<()> {
        if written.iter().all(|w| w.commits.is_empty()) {
            return Ok(());
        }
        self.backend.sync()?;
        if self.feed.receiver_count() > 0 {
            for c in written.into_iter().flat_map(|w| w.commits) {
                // A receiver gone meanwhile is fine.
                let _ = self.feed.send(Arc::new(c));
            }
        }
        Ok(())
    }

    /// Flushes everything to disk (used at shutdown).
    pub fn flush(&self) -> Result<()> {
        self.backend.sync()
    }
}

#[cfg(test)]
mod tests;
