//! Where the store's keys live: the [`Backend`] trait, and the sled
//! backend that the embedded store was before [`crate::LogBackend`] (kept to
//! read and convert a sled store left by an older tabby). The store keeps the logic (revisions, intent
//! mark, epochs, the change feed); a backend only keeps keys and values,
//! applies batches atomically and makes them durable.
use crate::Result;
use std::path::Path;

/// A key's new value in a batch: `None` deletes it.
pub type Put = (Vec<u8>, Option<Vec<u8>>);

/// What [`Backend::scan`] calls with each key and value.
pub type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<()>;

/// An ordered key-value space with atomic batches.
pub trait Backend: Send + Sync {
    /// One key's value.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Applies `batch` atomically (later entries win for a repeated key).
    /// It is durable only once [`Backend::sync`] has returned after it.
    fn apply(&self, batch: Vec<Put>) -> Result<()>;
    /// Makes every batch applied so far durable, in order.
    fn sync(&self) -> Result<()>;
    /// Calls `f` with every key under `prefix` and its value, in key order;
    /// stops at `f`'s first error.
    fn scan(&self, prefix: &[u8], f: Visit<'_>) -> Result<()>;
    /// A key that is not `<c>/...` for one of the bytes of `known` (sorted),
    /// if there is one: damage, or another program's keys.
    fn first_key_outside(&self, known: &[u8]) -> Result<Option<Vec<u8>>>;
    /// The store has read its state: a backend may drop what it kept to
    /// serve that first load (a standby's warm copy).
    fn loaded(&self) {}
}

/// One sled tree, flushed explicitly after each group commit: what the
/// embedded store was; now opened only to convert such a store.
pub struct SledBackend {
    db: sled::Db,
    tree: sled::Tree,
    /// sled's data file. sled 0.34's flush ends in `sync_file_range`, which
    /// neither flushes the disk's write cache nor records the file's new
    /// size: a power cut or kernel crash could lose acknowledged groups. An
    /// `fdatasync` of the same file after each flush does both.
    data: std::fs::File,
}

impl SledBackend {
    /// Opens (or creates) the database in `dir`; sled's page cache holds at
    /// most about `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledBackend> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // Durability comes from our explicit flush after each group commit.
            .flush_every_ms(None)
            .open()?;
        let tree = db.open_tree("state")?;
        // sled 0.34 keeps everything in `<dir>/db` (values are far below its
        // blob threshold).
        let data = std::fs::File::open(dir.join("db")).map_err(sled::Error::Io)?;
        Ok(SledBackend { db, tree, data })
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn apply(&self, batch: Vec<Put>) -> Result<()> {
        let mut b = sled::Batch::default();
        for (k, v) in batch {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.db.flush()?;
        self.data.sync_data().map_err(sled::Error::Io)?;
        Ok(())
    }

    fn scan(&self, prefix: &[u8], f: Visit<'_>) -> Result<()> {
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            f(&k, &v)?;
        }
        Ok(())
    }

    fn first_key_outside(&self, known: &[u8]) -> Result<Option<Vec<u8>>> {
        // Known keys are `<prefix>/...`; look only into the gaps between.
        let mut lo: Vec<u8> = Vec::new();
        for p in known.iter().map(Some).chain([None]) {
            let hi = p.map(|p| vec![*p, b'/']);
            let found = match &hi {
                Some(hi) => self.tree.range(lo.clone()..hi.clone()).keys().next(),
                None => self.tree.range(lo.clone()..).keys().next(),
            };
            if let Some(k) = found {
                return Ok(Some(k?.to_vec()));
            }
            if let Some(p) = p {
                lo = vec![*p, b'/' + 1];
            }
        }
        Ok(None)
    }
}
