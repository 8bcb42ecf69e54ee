//! The embedded store: a sorted snapshot file and an append-only log of
//! batches in the data directory.
//!
//! The controller keeps its own picture of the state in memory and reads the
//! store only when it starts, so what the store must do fast is make a
//! group durable, and then, at start, hand every key back once. A group
//! commit is one appended frame and one `fdatasync` (about 0.17 ms on this
//! kind of disk, where sled's flush of a block claim took 0.6–2.4 ms), and
//! nothing of the state stays in memory between starts.
//!
//! Files, for generation `G`:
//! - `tabby-snap-G`: every key and value as of the start of `tabby-log-G`,
//!   sorted, with a checksum. Absent for generation 0 (the empty store).
//! - `tabby-log-G`: frames `[marker][u32 length][u32 crc32][batch]`, in
//!   commit order.
//!
//! When the logs outgrow the snapshot (within [`LogOptions`]' bounds), the
//! writer starts `tabby-log-G+1` and a background thread folds the snapshot
//! and the closed logs into `tabby-snap-G+1` (written aside, synced, then
//! renamed), after which the old files go. At open the newest snapshot wins
//! and every log from its generation on is replayed; a frame cut short by a
//! crash (never acknowledged: its `fdatasync` had not returned) is dropped
//! from the end of the newest log, its bytes kept in `torn-<log>-<offset>`.
//! Damage with a whole frame after it is an error, never a shorter store.
use crate::{
    backend::{Backend, Put, Visit},
    Result, StoreError,
};
use std::{
    fs::File,
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
};

const SNAP: &str = "tabby-snap-";
const LOG: &str = "tabby-log-";
const TMP: &str = ".tmp";
const LOCK: &str = "tabby-lock";
const MAGIC: &[u8; 8] = b"TABBYSN1";
/// Record count (u64) and crc32 of everything before it (u32).
const TRAILER: usize = 12;
/// Frame header: a marker, the payload's length and its crc32, each u32
/// little-endian. The marker lets an open tell a torn tail (no whole frame
/// after the damage) from damage in the middle (whole frames after it)
/// without trying every byte offset.
const FRAME: usize = 12;
const FRAME_MARK: [u8; 4] = *b"TBL1";

/// When the log is folded into a new snapshot: once the logs since the last
/// snapshot hold as many bytes as the snapshot, but never before
/// `compact_min` and always by `compact_max`. The first bounds the number of
/// rewrites while the store is small; the second bounds what a restart
/// replays and what a fold holds in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// No fold before the logs hold this many bytes.
    pub compact_min: u64,
    /// A fold at the latest when the logs hold this many bytes.
    pub compact_max: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            compact_min: 16 << 20,
            compact_max: 32 << 20,
        }
    }
}

impl LogOptions {
    fn threshold(&self, snap_bytes: u64) -> u64 {
        snap_bytes.clamp(self.compact_min, self.compact_max.max(self.compact_min))
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

fn corrupt(file: &Path, why: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: file.display().to_string(),
        why: why.into(),
    }
}

fn snap_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("{SNAP}{gen:020}"))
}

fn log_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("{LOG}{gen:020}"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing directory {}", dir.display())))
}

/// What the directory holds: the newest snapshot's generation (`None`: no
/// snapshot, the state starts empty) and the logs from it on, oldest first.
#[derive(Debug, Default)]
struct Files {
    snap: Option<u64>,
    logs: Vec<u64>,
    /// Snapshots and logs that a finished fold made obsolete, and files a
    /// fold left half written.
    stale: Vec<PathBuf>,
}

fn list(dir: &Path) -> Result<Files> {
    let mut snaps = Vec::new();
    let mut logs = Vec::new();
    let mut stale = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(io(format!("listing {}", dir.display())))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("tabby-") && name.ends_with(TMP) {
            stale.push(e.path());
        } else if let Some(g) = name.strip_prefix(SNAP) {
            snaps.push(
                g.parse::<u64>()
                    .map_err(|_| corrupt(&e.path(), "bad generation"))?,
            );
        } else if let Some(g) = name.strip_prefix(LOG) {
            logs.push(
                g.parse::<u64>()
                    .map_err(|_| corrupt(&e.path(), "bad generation"))?,
            );
        }
    }
    let snap = snaps.iter().copied().max();
    let from = snap.unwrap_or(0);
    stale.extend(
        snaps
            .iter()
            .filter(|g| **g < from)
            .map(|g| snap_path(dir, *g)),
    );
    stale.extend(
        logs.iter()
            .filter(|g| **g < from)
            .map(|g| log_path(dir, *g)),
    );
    logs.retain(|g| *g >= from);
    logs.sort_unstable();
    for (i, g) in logs.iter().enumerate() {
        if *g != from + i as u64 {
            return Err(corrupt(
                &log_path(dir, *g),
                format!("logs from generation {from} are not contiguous: {logs:?}"),
            ));
        }
    }
    Ok(Files { snap, logs, stale })
}

/// Writes a snapshot: magic, then `[u32 key length][u32 value length][key]
/// [value]` per record in key order, then the trailer.
struct SnapWriter {
    w: BufWriter<File>,
    crc: crc32fast::Hasher,
    count: u64,
    bytes: u64,
    /// `bytes` when the file was last synced.
    synced: u64,
    path: PathBuf,
}

/// A snapshot being written is synced every this many bytes. On ext4 a
/// journal commit (which the log's `fdatasync` needs whenever the log grew)
/// first writes out every dirty page of files with new blocks: a whole
/// snapshot's worth left dirty made group commits wait up to 100 ms.
const SNAP_SYNC_EVERY: u64 = 4 << 20;

impl SnapWriter {
    fn create(path: PathBuf) -> Result<SnapWriter> {
        let f = File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        let mut w = SnapWriter {
            w: BufWriter::with_capacity(1 << 20, f),
            crc: crc32fast::Hasher::new(),
            count: 0,
            bytes: 0,
            synced: 0,
            path,
        };
        w.put_raw(MAGIC)?;
        Ok(w)
    }

    fn put_raw(&mut self, b: &[u8]) -> Result<()> {
        self.crc.update(b);
        self.bytes += b.len() as u64;
        let path = &self.path;
        self.w
            .write_all(b)
            .map_err(io(format!("writing {}", path.display())))
    }

    fn put(&mut self, k: &[u8], v: &[u8]) -> Result<()> {
        let too_big = |_| corrupt(&self.path, "a record over 4 GiB");
        let kl = u32::try_from(k.len()).map_err(too_big)?;
        let vl = u32::try_from(v.len()).map_err(too_big)?;
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&kl.to_le_bytes());
        h[4..].copy_from_slice(&vl.to_le_bytes());
        self.put_raw(&h)?;
        self.put_raw(k)?;
        self.put_raw(v)?;
        self.count += 1;
        if self.bytes - self.synced >= SNAP_SYNC_EVERY {
            let path = &self.path;
            self.w
                .flush()
                .and_then(|_| self.w.get_ref().sync_data())
                .map_err(io(format!("writing {}", path.display())))?;
            self.synced = self.bytes;
        }
        Ok(())
    }

    /// Finishes the snapshot and renames it to `out`, durably (the
    /// directory too); returns its size.
    fn publish(self, out: &Path) -> Result<u64> {
        let tmp = self.path.clone();
        let size = self.finish()?;
        std::fs::rename(&tmp, out).map_err(io(format!("renaming {}", tmp.display())))?;
        if let Some(dir) = out.parent() {
            sync_dir(dir)?;
        }
        Ok(size)
    }

    /// Writes the trailer and makes the file durable; returns its size.
    fn finish(mut self) -> Result<u64> {
        let mut t = [0u8; TRAILER];
        t[..8].copy_from_slice(&self.count.to_le_bytes());
        t[8..].copy_from_slice(&self.crc.clone().finalize().to_le_bytes());
        let path = self.path.clone();
        let what = || format!("writing {}", path.display());
        self.w.write_all(&t).map_err(io(what()))?;
        let f = self.w.into_inner().map_err(|e| StoreError::Io {
            what: what(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io(what()))?;
        Ok(self.bytes + TRAILER as u64)
    }
}

/// Reads a snapshot record by record without holding it (a fold).
struct SnapReader {
    r: BufReader<File>,
    /// Record bytes not read yet.
    left: u64,
    crc: crc32fast::Hasher,
    count: u64,
    path: PathBuf,
    key: Vec<u8>,
    val: Vec<u8>,
}

impl SnapReader {
    fn open(path: PathBuf) -> Result<SnapReader> {
        let f = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
        let len = f
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        if len < (MAGIC.len() + TRAILER) as u64 {
            return Err(corrupt(&path, "shorter than a snapshot can be"));
        }
        let mut r = SnapReader {
            r: BufReader::with_capacity(1 << 20, f),
            left: len - TRAILER as u64,
            crc: crc32fast::Hasher::new(),
            count: 0,
            path,
            key: Vec::new(),
            val: Vec::new(),
        };
        let mut m = [0u8; 8];
        r.read(&mut m)?;
        if &m != MAGIC {
            return Err(corrupt(&r.path, "not a tabby snapshot"));
        }
        Ok(r)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        if (buf.len() as u64) > self.left {
            return Err(corrupt(&self.path, "a record runs into the trailer"));
        }
        let path = &self.path;
        self.r
            .read_exact(buf)
            .map_err(io(format!("reading {}", path.display())))?;
        self.crc.update(buf);
        self.left -= buf.len() as u64;
        Ok(())
    }

    /// The next record into `key` and `val`; `false` at the end.
    fn next(&mut self) -> Result<bool> {
        if self.left == 0 {
            return Ok(false);
        }
        let mut h = [0u8; 8];
        self.read(&mut h)?;
        let (kl, vl) = lengths(&h);
        // Before allocating: a damaged length must not ask for gigabytes.
        if (kl + vl) as u64 > self.left {
            return Err(corrupt(&self.path, "a record runs into the trailer"));
        }
        let mut key = std::mem::take(&mut self.key);
        let mut val = std::mem::take(&mut self.val);
        key.resize(kl, 0);
        val.resize(vl, 0);
        let read = self.read(&mut key).and_then(|_| self.read(&mut val));
        self.key = key;
        self.val = val;
        read?;
        self.count += 1;
        Ok(true)
    }

    /// Checks the trailer once every record has been read.
    fn finish(mut self) -> Result<()> {
        let mut t = [0u8; TRAILER];
        self.r
            .read_exact(&mut t)
            .map_err(io(format!("reading {}", self.path.display())))?;
        check_trailer(&self.path, &t, self.count, self.crc.finalize())
    }
}

fn lengths(h: &[u8; 8]) -> (usize, usize) {
    let [a, b, c, d, e, f, g, i] = *h;
    (
        u32::from_le_bytes([a, b, c, d]) as usize,
        u32::from_le_bytes([e, f, g, i]) as usize,
    )
}

fn check_trailer(path: &Path, t: &[u8], count: u64, crc: u32) -> Result<()> {
    let mut c = [0u8; 8];
    c.copy_from_slice(&t[..8]);
    let mut s = [0u8; 4];
    s.copy_from_slice(&t[8..TRAILER]);
    if u32::from_le_bytes(s) != crc {
        return Err(corrupt(path, "checksum mismatch"));
    }
    if u64::from_le_bytes(c) != count {
        return Err(corrupt(
            path,
            format!("{} records, trailer says {}", count, u64::from_le_bytes(c)),
        ));
    }
    Ok(())
}

/// The payload length of the whole frame at `at`, or what is wrong with it.
/// The writer never writes an empty batch: a zero length is not a frame
/// (a crash can leave zeros where a frame was being written).
fn frame_at(data: &[u8], at: usize) -> std::result::Result<usize, &'static str> {
    let rest = &data[at..];
    if rest.len() < FRAME {
        return Err("header cut short");
    }
    if rest[..4] != FRAME_MARK {
        return Err("no frame marker");
    }
    let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
    let crc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
    if len == 0 {
        return Err("empty frame");
    }
    if rest.len() - FRAME < len {
        return Err("cut short");
    }
    if crc32fast::hash(&rest[FRAME..FRAME + len]) != crc {
        return Err("checksum mismatch");
    }
    Ok(len)
}

/// Cuts a torn tail off the newest log at `at`, keeping its bytes aside
/// (unless all zero) as `torn-<log>-<at>` beside it.
fn cut_torn_tail(path: &Path, data: &[u8], at: usize) -> Result<()> {
    let tail = &data[at..];
    tracing::warn!(
        file = %path.display(),
        at,
        dropped_bytes = tail.len(),
        "the store's log ends in a frame cut short by a crash; it was never acknowledged, dropping it"
    );
    if tail.iter().any(|b| *b != 0) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("log");
        let kept = path.with_file_name(format!("torn-{name}-{at}"));
        std::fs::write(&kept, tail).map_err(io(format!("writing {}", kept.display())))?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    f.set_len(at as u64)
        .and_then(|_| f.sync_all())
        .map_err(io(format!("truncating {}", path.display())))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// What a range read calls with each key and value; `false` stops it.
type Until<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<bool>;

/// Where a byte string lies: which buffer, offset, length.
#[derive(Debug, Clone, Copy)]
struct Span {
    buf: usize,
    off: usize,
    len: usize,
}

/// A log entry's key and new value (`None`: deleted).
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: Span,
    val: Option<Span>,
}

/// What the files hold: the snapshot, checked and read again in pieces
/// when asked (it is most of the store: held whole, a start would fault in
/// and copy all of it before the first record is placed), and the logs
/// whole (with their net effect, one entry per key, sorted). Serves the
/// first load; dropped after it.
#[derive(Default)]
struct Image {
    snap: Option<Snap>,
    logs: Vec<Vec<u8>>,
    net: Vec<Entry>,
}

/// Every this many records of a snapshot, its index keeps a key and where
/// its record starts: a range read starts at most this many records early.
const SNAP_MARK_EVERY: u64 = 256;

/// A snapshot's read buffer, grown only for a larger record.
const SNAP_CHUNK: usize = 1 << 20;

/// A checked snapshot file, held open (a fold that replaces it meanwhile
/// leaves this copy readable), with a sparse index of its keys.
struct Snap {
    file: File,
    path: PathBuf,
    /// The file's length.
    len: u64,
    /// Where the records end (the trailer follows).
    end: u64,
    /// (key, offset) of every [`SNAP_MARK_EVERY`]th record, from the first.
    marks: Vec<(Box<[u8]>, u64)>,
}

/// Reads a snapshot's records in order from some record on, a chunk at a
/// time, and checksums what it reads when asked to.
struct SnapCursor<'a> {
    snap: &'a Snap,
    buf: Vec<u8>,
    /// Where the current record starts in `buf`.
    start: usize,
    /// Bytes of `buf` read.
    filled: usize,
    /// The file offset of `buf[filled]`.
    next_read: u64,
    crc: Option<crc32fast::Hasher>,
    /// The current record: key length and value length (`None`: the end).
    cur: Option<(usize, usize)>,
}

impl<'a> SnapCursor<'a> {
    fn at(snap: &'a Snap, off: u64, crc: Option<crc32fast::Hasher>) -> Result<SnapCursor<'a>> {
        let mut c = SnapCursor {
            snap,
            buf: vec![0; SNAP_CHUNK],
            start: 0,
            filled: 0,
            next_read: off,
            crc,
            cur: None,
        };
        c.load()?;
        Ok(c)
    }

    /// The file offset of the current record.
    fn offset(&self) -> u64 {
        self.next_read - (self.filled - self.start) as u64
    }

    fn current(&self) -> Option<(&[u8], &[u8])> {
        let (kl, vl) = self.cur?;
        let k = self.start + 8;
        Some((&self.buf[k..k + kl], &self.buf[k + kl..k + kl + vl]))
    }

    fn advance(&mut self) -> Result<()> {
        if let Some((kl, vl)) = self.cur {
            self.start += 8 + kl + vl;
            self.load()?;
        }
        Ok(())
    }

    /// Reads the record at `start` (its header says how long it is).
    fn load(&mut self) -> Result<()> {
        let left = self.snap.end - self.offset();
        if left == 0 {
            self.cur = None;
            return Ok(());
        }
        let runs_over = || corrupt(&self.snap.path, "a record runs into the trailer");
        if left < 8 {
            return Err(runs_over());
        }
        self.fill(8)?;
        let mut h = [0u8; 8];
        h.copy_from_slice(&self.buf[self.start..self.start + 8]);
        let (kl, vl) = lengths(&h);
        // Before growing the buffer: a damaged length must not ask for
        // gigabytes.
        if (kl as u64).saturating_add(vl as u64) > left - 8 {
            return Err(runs_over());
        }
        self.fill(8 + kl + vl)?;
        self.cur = Some((kl, vl));
        Ok(())
    }

    /// Makes the `n` bytes from `start` on be in `buf` (`n` no more than
    /// what is left before the trailer).
    fn fill(&mut self, n: usize) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if self.filled - self.start >= n {
            return Ok(());
        }
        self.buf.copy_within(self.start..self.filled, 0);
        self.filled -= self.start;
        self.start = 0;
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        while self.filled < n {
            let room = (self.buf.len() - self.filled) as u64;
            let want = room.min(self.snap.end - self.next_read) as usize;
            let got = if want == 0 {
                0
            } else {
                self.snap
                    .file
                    .read_at(
                        &mut self.buf[self.filled..self.filled + want],
                        self.next_read,
                    )
                    .map_err(io(format!("reading {}", self.snap.path.display())))?
            };
            if got == 0 {
                return Err(corrupt(&self.snap.path, "cut short since it was opened"));
            }
            if let Some(c) = &mut self.crc {
                c.update(&self.buf[self.filled..self.filled + got]);
            }
            self.filled += got;
            self.next_read += got as u64;
        }
        Ok(())
    }
}

impl Snap {
    /// Opens and checks a snapshot (magic, record bounds, key order,
    /// checksum, count), reading it once a chunk at a time.
    fn open(path: &Path) -> Result<Snap> {
        use std::os::unix::fs::FileExt;
        let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        let mut magic = [0u8; 8];
        if len < (MAGIC.len() + TRAILER) as u64
            || file.read_exact_at(&mut magic, 0).is_err()
            || &magic != MAGIC
        {
            return Err(corrupt(path, "not a tabby snapshot"));
        }
        let mut snap = Snap {
            file,
            path: path.to_path_buf(),
            len,
            end: len - TRAILER as u64,
            marks: Vec::new(),
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(MAGIC);
        let mut marks = Vec::new();
        let mut count = 0u64;
        let mut last: Vec<u8> = Vec::new();
        let crc = {
            let mut c = SnapCursor::at(&snap, MAGIC.len() as u64, Some(crc))?;
            while let Some((k, _)) = c.current() {
                if count > 0 && last.as_slice() >= k {
                    return Err(corrupt(path, "keys out of order"));
                }
                if count.is_multiple_of(SNAP_MARK_EVERY) {
                    marks.push((Box::from(k), c.offset()));
                }
                last.clear();
                last.extend_from_slice(k);
                count += 1;
                c.advance()?;
            }
            c.crc.take().map_or(0, |h| h.finalize())
        };
        let mut t = [0u8; TRAILER];
        snap.file
            .read_exact_at(&mut t, snap.end)
            .map_err(io(format!("reading {}", path.display())))?;
        check_trailer(path, &t, count, crc)?;
        snap.marks = marks;
        Ok(snap)
    }

    /// A cursor at the first record whose key is not below `lo`.
    fn seek(&self, lo: &[u8]) -> Result<SnapCursor<'_>> {
        let i = self.marks.partition_point(|(k, _)| &**k <= lo);
        let off = match i.checked_sub(1) {
            Some(m) => self.marks[m].1,
            None => MAGIC.len() as u64,
        };
        let mut c = SnapCursor::at(self, off, None)?;
        while c.current().is_some_and(|(k, _)| k < lo) {
            c.advance()?;
        }
        Ok(c)
    }
}

impl Image {
    fn bytes(&self, s: Span) -> &[u8] {
        &self.logs[s.buf][s.off..s.off + s.len]
    }

    /// Reads a log and adds its entries; returns the bytes of its whole
    /// frames. A frame that is not whole ends the log: an error unless
    /// `newest` and no whole frame follows it, which is what a crash
    /// mid-append leaves (zeros, or part of a write); then the file is cut
    /// back to the frames before it, its tail kept aside.
    fn load_log(&mut self, path: &Path, newest: bool) -> Result<u64> {
        let data = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
        let buf = self.logs.len();
        let mut at = 0;
        while at < data.len() {
            let len = match frame_at(&data, at) {
                Ok(len) => len,
                Err(why) => {
                    let why = format!("frame at byte {at}: {why}");
                    if !newest {
                        return Err(corrupt(path, why));
                    }
                    if let Some(p) = (at + 1..data.len().saturating_sub(FRAME - 1))
                        .filter(|p| data[*p..].starts_with(&FRAME_MARK))
                        .find(|p| frame_at(&data, *p).is_ok())
                    {
                        // Frames after damage may hold acknowledged
                        // assignments: dropping them could hand an address
                        // out twice, so an operator decides.
                        return Err(corrupt(
                            path,
                            format!(
                                "{why}, yet a whole frame follows at byte {p}: damage, not a \
                                 write cut short. Nothing was changed. If this follows a power \
                                 loss, the frames from byte {at} on may never have been \
                                 acknowledged: keep a copy of the file, then truncate it to \
                                 {at} bytes to start from the frames before"
                            ),
                        ));
                    }
                    cut_torn_tail(path, &data, at)?;
                    break;
                }
            };
            let payload = &data[at + FRAME..at + FRAME + len];
            let batch: Vec<(&[u8], Option<&[u8]>)> =
                postcard::from_bytes(payload).map_err(|e| {
                    corrupt(path, format!("frame at byte {at}: undecodable batch: {e}"))
                })?;
            let base = data.as_ptr() as usize;
            let span = |s: &[u8]| Span {
                buf,
                off: s.as_ptr() as usize - base,
                len: s.len(),
            };
            for (k, v) in batch {
                self.net.push(Entry {
                    key: span(k),
                    val: v.map(span),
                });
            }
            at += FRAME + len;
        }
        self.logs.push(data);
        Ok(at as u64)
    }

    /// Sorts the entries by key, keeping each key's last write.
    fn settle(&mut self) {
        let mut net = std::mem::take(&mut self.net);
        // Stable: a key's writes stay in commit order.
        net.sort_by(|a, b| self.bytes(a.key).cmp(self.bytes(b.key)));
        let mut out: Vec<Entry> = Vec::with_capacity(net.len());
        for e in net {
            match out.last_mut() {
                Some(l) if self.bytes(l.key) == self.bytes(e.key) => *l = e,
                _ => out.push(e),
            }
        }
        self.net = out;
    }

    /// Reads the snapshot and logs `files` names; also returns the bytes of
    /// whole frames in the logs.
    fn read(dir: &Path, files: &Files, truncate: bool) -> Result<(Image, u64)> {
        // The snapshot and the logs are read and checked side by side: a
        // start waits for both.
        std::thread::scope(|sc| {
            let snap = sc.spawn(|| -> Result<Image> {
                let snap = files.snap.map(|g| Snap::open(&snap_path(dir, g)));
                Ok(Image {
                    snap: snap.transpose()?,
                    ..Image::default()
                })
            });
            let mut logs = Image::default();
            let mut bytes = 0;
            for (i, g) in files.logs.iter().enumerate() {
                bytes +=
                    logs.load_log(&log_path(dir, *g), truncate && i + 1 == files.logs.len())?;
            }
            logs.settle();
            let mut im = snap
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            im.logs = logs.logs;
            im.net = logs.net;
            Ok((im, bytes))
        })
    }

    /// Calls `f` with each live key in `[lo, hi)` and its value, in key
    /// order, until it returns `false`.
    fn range(&self, lo: &[u8], hi: Option<&[u8]>, f: Until<'_>) -> Result<()> {
        // The snapshot from its index's mark, and a binary search over the
        // log's entries.
        let mut snap = self.snap.as_ref().map(|s| s.seek(lo)).transpose()?;
        let mut j = self.net.partition_point(|e| self.bytes(e.key) < lo);
        let below = |k: &[u8]| hi.is_none_or(|h| k < h);
        loop {
            let (next_snap, next_net) = {
                let s = snap.as_ref().and_then(|c| c.current());
                let n = self.net.get(j).map(|e| (self.bytes(e.key), e.val));
                let (k, v, steps) = match (s, n) {
                    (Some((sk, sv)), Some((nk, nv))) => {
                        if sk < nk {
                            (sk, Some(sv), (true, false))
                        } else {
                            (nk, nv.map(|s| self.bytes(s)), (sk == nk, true))
                        }
                    }
                    (Some((sk, sv)), None) => (sk, Some(sv), (true, false)),
                    (None, Some((nk, nv))) => (nk, nv.map(|s| self.bytes(s)), (false, true)),
                    (None, None) => return Ok(()),
                };
                if !below(k) {
                    return Ok(());
                }
                if let Some(v) = v {
                    if !f(k, v)? {
                        return Ok(());
                    }
                }
                steps
            };
            if next_snap {
                if let Some(c) = &mut snap {
                    c.advance()?;
                }
            }
            j += usize::from(next_net);
        }
    }
}

/// What the first load reads: the image of the files at open, and the
/// writes made since (opening records an epoch before the load).
#[derive(Default)]
struct Boot {
    image: Image,
    since: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Boot {
    /// [`Image::range`] with the writes since open laid over it.
    fn range(&self, lo: &[u8], hi: Option<&[u8]>, f: Until<'_>) -> Result<()> {
        use std::ops::Bound;
        let upper = match hi {
            Some(h) => Bound::Excluded(h),
            None => Bound::Unbounded,
        };
        let mut over = self
            .since
            .range::<[u8], _>((Bound::Included(lo), upper))
            .peekable();
        let mut go = true;
        self.image.range(lo, hi, &mut |k, v| {
            while let Some((ok, ov)) = over.next_if(|(ok, _)| ok.as_slice() <= k) {
                let replaces = ok.as_slice() == k;
                if let Some(ov) = ov {
                    go = f(ok, ov)?;
                    if !go {
                        return Ok(false);
                    }
                }
                if replaces {
                    return Ok(true);
                }
            }
            go = f(k, v)?;
            Ok(go)
        })?;
        if go {
            for (ok, ov) in over {
                if let Some(ov) = ov {
                    if !f(ok, ov)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The smallest key above every key starting with `prefix` (`None`: none).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last < u8::MAX {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

/// The writer's side: frames not written yet, the log being appended to,
/// and what the logs since the last snapshot hold.
struct Writer {
    pending: Vec<u8>,
    file: Arc<File>,
    /// Generation of the log being appended to.
    gen: u64,
    /// Generation of the newest snapshot (`None`: the empty state).
    snap: Option<u64>,
    snap_bytes: u64,
    /// Bytes in the logs from `snap`'s generation to `gen`.
    log_bytes: u64,
    /// Set by a failed write or sync: nothing after it may be acknowledged,
    /// since the kernel may have dropped what it could not write.
    broken: Option<String>,
    /// No fold before the logs hold this many bytes: set after a failed
    /// fold, so that a fold that keeps failing is not tried (with a new
    /// log) at every commit.
    fold_after: u64,
}

/// A fold running in the background, and what it will have folded.
struct Fold {
    thread: JoinHandle<Result<u64>>,
    upto: u64,
    bytes: u64,
}

/// The embedded store on a snapshot and a log (see the module docs).
pub struct LogBackend {
    dir: PathBuf,
    opts: LogOptions,
    w: Mutex<Writer>,
    boot: Mutex<Option<Boot>>,
    fold: Mutex<Option<Fold>>,
    /// One `fdatasync` at a time: Linux reports a writeback error once per
    /// open file, so a sync overlapping the one that saw it could otherwise
    /// return success for frames the kernel dropped.
    syncing: Mutex<()>,
    /// Held (flock) while open: two controllers on one directory would
    /// interleave their logs.
    _lock: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogBackend {
    /// Opens (or creates) the store in `dir` with the default fold bounds.
    pub fn open(dir: &Path) -> Result<LogBackend> {
        Self::open_with(dir, LogOptions::default())
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open_with(dir: &Path, opts: LogOptions) -> Result<LogBackend> {
        let lock = take_lock(dir)?;
        Self::open_locked(dir, opts, lock)
    }

    fn open_locked(dir: &Path, opts: LogOptions, lock_file: File) -> Result<LogBackend> {
        let mut files = list(dir)?;
        for p in files.stale.drain(..) {
            std::fs::remove_file(&p).map_err(io(format!("removing {}", p.display())))?;
        }
        if files.logs.is_empty() {
            // A new store, or a snapshot whose log was not created yet.
            let g = files.snap.unwrap_or(0);
            File::create(log_path(dir, g)).map_err(io("creating the log"))?;
            sync_dir(dir)?;
            files.logs.push(g);
        }
        let (image, log_bytes) = Image::read(dir, &files, true)?;
        let gen = *files.logs.last().unwrap_or(&0);
        let path = log_path(dir, gen);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        let snap_bytes = image.snap.as_ref().map_or(0, |s| s.len);
        Ok(LogBackend {
            dir: dir.to_path_buf(),
            opts,
            w: Mutex::new(Writer {
                pending: Vec::new(),
                file: Arc::new(file),
                gen,
                snap: files.snap,
                snap_bytes,
                log_bytes,
                broken: None,
                fold_after: 0,
            }),
            boot: Mutex::new(Some(Boot {
                image,
                since: Default::default(),
            })),
            fold: Mutex::new(None),
            syncing: Mutex::new(()),
            _lock: lock_file,
        })
    }

    /// Whether `dir` holds this store's files (an error when it cannot be
    /// listed, or holds files of this store that make no sense).
    pub fn exists_in(dir: &Path) -> Result<bool> {
        if !dir.exists() {
            return Ok(false);
        }
        list(dir).map(|f| f.snap.is_some() || !f.logs.is_empty())
    }

    fn writer(&self) -> Result<MutexGuard<'_, Writer>> {
        let w = lock(&self.w);
        match &w.broken {
            Some(why) => Err(StoreError::Io {
                what: format!("the store's log failed earlier ({why}); restart to recover"),
                source: std::io::Error::other("log broken"),
            }),
            None => Ok(w),
        }
    }

    /// Writes the pending frames to the log (not synced).
    fn write_pending(w: &mut Writer) -> Result<()> {
        if w.pending.is_empty() {
            return Ok(());
        }
        let r = (&*w.file).write_all(&w.pending);
        if let Err(e) = r {
            w.broken = Some(e.to_string());
            return Err(StoreError::Io {
                what: "appending to the store's log".into(),
                source: e,
            });
        }
        w.log_bytes += w.pending.len() as u64;
        w.pending.clear();
        Ok(())
    }

    /// Runs `f` on what the files hold now: the image read at open until
    /// the store is loaded, then a fresh read (rare: a migration's source).
    /// That read holds the writer for as long as `f` runs: `f` must not
    /// write to this store.
    fn with_image<T>(&self, f: impl FnOnce(&Boot) -> Result<T>) -> Result<T> {
        if let Some(b) = lock(&self.boot).as_ref() {
            return f(b);
        }
        // No fold may move files while they are read, nor start meanwhile.
        let mut w = self.writer()?;
        Self::write_pending(&mut w)?;
        self.finish_fold(&mut w, true);
        let files = list(&self.dir)?;
        let (image, _) = Image::read(&self.dir, &files, false)?;
        f(&Boot {
            image,
            since: Default::default(),
        })
    }

    /// Takes a finished fold's result (waiting for it when `wait`).
    fn finish_fold(&self, w: &mut Writer, wait: bool) {
        let mut fold = lock(&self.fold);
        let done = fold.as_ref().is_some_and(|f| f.thread.is_finished());
        if !(done || wait) {
            return;
        }
        let Some(f) = fold.take() else { return };
        match f.thread.join() {
            Ok(Ok(size)) => {
                w.snap = Some(f.upto + 1);
                w.snap_bytes = size;
                w.log_bytes = w.log_bytes.saturating_sub(f.bytes);
            }
            Ok(Err(e)) => {
                w.fold_after = w.log_bytes + self.opts.threshold(w.snap_bytes);
                tracing::warn!(error = %e, retry_at_log_bytes = w.fold_after, "folding the store's log into a snapshot failed; the log keeps growing until a later fold succeeds")
            }
            Err(_) => {
                w.fold_after = w.log_bytes + self.opts.threshold(w.snap_bytes);
                tracing::error!("the store's fold thread panicked")
            }
        }
    }

    /// Starts a new log and folds the old ones in the background, once the
    /// logs are big enough and no fold is running.
    fn maybe_fold(&self) -> Result<()> {
        let _one = lock(&self.syncing);
        let mut w = self.writer()?;
        self.finish_fold(&mut w, false);
        let due = self.opts.threshold(w.snap_bytes).max(w.fold_after);
        if lock(&self.fold).is_some() || w.log_bytes < due {
            return Ok(());
        }
        // Every frame of the old log is durable before any of the new one
        // can be acknowledged: a sync sees only the new file.
        Self::write_pending(&mut w)?;
        if let Err(e) = w.file.sync_data() {
            w.broken = Some(e.to_string());
            return Err(StoreError::Io {
                what: "syncing the store's log".into(),
                source: e,
            });
        }
        let next = w.gen + 1;
        let path = log_path(&self.dir, next);
        // It may exist, empty, from a rotation that failed at the sync below.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(format!("creating {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        if len != 0 {
            return Err(corrupt(&path, "a log not yet started holds frames"));
        }
        // The new log's name must survive a crash before its frames count.
        sync_dir(&self.dir)?;
        let upto = w.gen;
        w.file = Arc::new(file);
        w.gen = next;
        let (dir, snap, bytes) = (self.dir.clone(), w.snap, w.log_bytes);
        let thread = std::thread::Builder::new()
            .name("store-fold".into())
            .spawn(move || fold(&dir, snap, upto))
            .map_err(io("starting the fold thread"))?;
        *lock(&self.fold) = Some(Fold {
            thread,
            upto,
            bytes,
        });
        Ok(())
    }

    /// Waits for a running fold (tests: a fold's result is on disk).
    pub fn settle(&self) {
        let mut w = lock(&self.w);
        self.finish_fold(&mut w, true);
    }
}

impl Drop for LogBackend {
    fn drop(&mut self) {
        // A fold still running would move files under the next open.
        let mut w = lock(&self.w);
        self.finish_fold(&mut w, true);
    }
}

/// Folds snapshot `snap` and logs `snap..=upto` into snapshot `upto + 1`,
/// then removes them. Runs at the lowest CPU priority: nothing waits for
/// it. Returns the new snapshot's size.
fn fold(dir: &Path, snap: Option<u64>, upto: u64) -> Result<u64> {
    lower_priority();
    let tmp = snap_path(dir, upto + 1).with_extension("tmp");
    let r = fold_into(dir, snap, upto, &tmp);
    if r.is_err() {
        // A snapshot's worth of disk would otherwise wait for the next open.
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn fold_into(dir: &Path, snap: Option<u64>, upto: u64, tmp: &Path) -> Result<u64> {
    let from = snap.unwrap_or(0);
    let files = Files {
        snap: None,
        logs: (from..=upto).collect(),
        stale: Vec::new(),
    };
    let (logs, _) = Image::read(dir, &files, false)?;
    let out = snap_path(dir, upto + 1);
    let mut w = SnapWriter::create(tmp.to_path_buf())?;
    let mut old = match snap {
        Some(g) => Some(SnapReader::open(snap_path(dir, g))?),
        None => None,
    };
    let mut have = match &mut old {
        Some(r) => r.next()?,
        None => false,
    };
    for e in &logs.net {
        let k = logs.bytes(e.key);
        while let Some(r) = old.as_mut().filter(|r| have && r.key.as_slice() < k) {
            w.put(&r.key, &r.val)?;
            have = r.next()?;
        }
        if let Some(r) = old.as_mut().filter(|r| have && r.key.as_slice() == k) {
            have = r.next()?;
        }
        if let Some(v) = e.val {
            w.put(k, logs.bytes(v))?;
        }
    }
    if let Some(mut r) = old {
        while have {
            w.put(&r.key, &r.val)?;
            have = r.next()?;
        }
        r.finish()?;
    }
    let size = w.publish(&out)?;
    // The new snapshot counts from here; what it replaces can go.
    let mut gone: Vec<PathBuf> = (from..=upto).map(|g| log_path(dir, g)).collect();
    if let Some(g) = snap {
        gone.push(snap_path(dir, g));
    }
    for p in gone {
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(file = %p.display(), error = %e, "could not remove a folded store file; the next open removes it");
        }
    }
    Ok(size)
}

/// The fold's nice value: the lowest. It waits for nothing but CPU left
/// over, and must not slow the admin reads (themselves niced) or the
/// answers.
const FOLD_NICE: i32 = 19;

fn lower_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), FOLD_NICE) {
        tracing::warn!(error = %e, "could not lower the store fold thread's CPU priority");
    }
}

impl Backend for LogBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut hi = key.to_vec();
        hi.push(0);
        self.with_image(|im| {
            let mut found = None;
            im.range(key, Some(&hi), &mut |_, v| {
                found = Some(v.to_vec());
                Ok(false)
            })?;
            Ok(found)
        })
    }

    fn apply(&self, batch: Vec<Put>) -> Result<()> {
        let payload = postcard::to_stdvec(&batch)?;
        let len =
            u32::try_from(payload.len()).map_err(|_| corrupt(&self.dir, "a batch over 4 GiB"))?;
        let mut w = self.writer()?;
        if let Some(b) = lock(&self.boot).as_mut() {
            for (k, v) in &batch {
                b.since.insert(k.clone(), v.clone());
            }
        }
        w.pending.extend_from_slice(&FRAME_MARK);
        w.pending.extend_from_slice(&len.to_le_bytes());
        w.pending
            .extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        w.pending.extend_from_slice(&payload);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let file = {
            let mut w = self.writer()?;
            Self::write_pending(&mut w)?;
            w.file.clone()
        };
        {
            // Outside the writer's lock: the next group's frames may be
            // written meanwhile. Lock order: `syncing`, then `w`.
            let _one = lock(&self.syncing);
            // A sync that failed meanwhile may have taken the error this one
            // would have seen.
            drop(self.writer()?);
            if let Err(e) = file.sync_data() {
                lock(&self.w).broken = Some(e.to_string());
                return Err(StoreError::Io {
                    what: "syncing the store's log".into(),
                    source: e,
                });
            }
        }
        // This sync's frames are durable whatever happens next: a failed
        // rotation is reported, and tried again at a later sync.
        if let Err(e) = self.maybe_fold() {
            tracing::warn!(error = %e, "starting a new log for a fold failed");
        }
        Ok(())
    }

    fn scan(&self, prefix: &[u8], f: Visit<'_>) -> Result<()> {
        let hi = prefix_end(prefix);
        self.with_image(|im| {
            im.range(prefix, hi.as_deref(), &mut |k, v| {
                f(k, v)?;
                Ok(true)
            })
        })
    }

    fn first_key_outside(&self, known: &[u8]) -> Result<Option<Vec<u8>>> {
        self.with_image(|im| {
            // Known keys are `<prefix>/...`; look only into the gaps between.
            let mut lo: Vec<u8> = Vec::new();
            for p in known.iter().map(Some).chain([None]) {
                let hi = p.map(|p| vec![*p, b'/']);
                let mut found = None;
                im.range(&lo, hi.as_deref(), &mut |k, _| {
                    found = Some(k.to_vec());
                    Ok(false)
                })?;
                if found.is_some() {
                    return Ok(found);
                }
                if let Some(p) = p {
                    lo = vec![*p, b'/' + 1];
                }
            }
            Ok(None)
        })
    }

    fn loaded(&self) {
        lock(&self.boot).take();
    }
}

/// Creates `dir` if needed and locks it (flock on `tabby-lock`) for as long
/// as the returned file is open.
fn take_lock(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(LOCK);
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    rustix::fs::flock(
        &lock_file,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .map_err(|e| StoreError::Io {
        what: format!(
            "locking {} (is another controller using this data directory?)",
            lock_path.display()
        ),
        source: e.into(),
    })?;
    Ok(lock_file)
}

/// Files of a sled store (what the embedded store was before this one).
const SLED_FILES: [&str; 3] = ["conf", "db", "blobs"];
/// Where a converted sled store's files are kept.
const SLED_KEPT: &str = "sled-converted";

fn holds_sled(dir: &Path) -> bool {
    dir.join("conf").exists() || dir.join("db").exists()
}

/// Whether `dir` holds an embedded store: this one, or a sled store that
/// [`open_embedded`] would convert.
pub fn embedded_store_in(dir: &Path) -> Result<bool> {
    Ok(LogBackend::exists_in(dir)? || holds_sled(dir))
}

/// Opens the embedded store in `dir`. A sled store found there (written by
/// an older tabby) is converted first: every key is copied into the first
/// snapshot, and sled's files are moved into `sled-converted/`, where they
/// are no longer read (remove them once the new store has served).
/// `sled_cache` bounds sled's page cache while it is read.
pub fn open_embedded(dir: &Path, sled_cache: u64) -> Result<LogBackend> {
    // Locked first: two starts must not convert at once.
    let lock = take_lock(dir)?;
    if !LogBackend::exists_in(dir)? && holds_sled(dir) {
        convert_sled(dir, sled_cache)?;
    }
    let b = LogBackend::open_locked(dir, LogOptions::default(), lock)?;
    // Also after a conversion cut short between its snapshot and the move.
    if holds_sled(dir) {
        keep_sled_aside(dir)?;
    }
    Ok(b)
}

fn convert_sled(dir: &Path, cache: u64) -> Result<()> {
    let sled = crate::SledBackend::open(dir, cache)?;
    let out = snap_path(dir, 1);
    let tmp = out.with_extension("tmp");
    let mut w = SnapWriter::create(tmp)?;
    // sled scans in key order, as a snapshot is written.
    sled.scan(&[], &mut |k, v| w.put(k, v))?;
    let keys = w.count;
    let bytes = w.publish(&out)?;
    tracing::info!(
        dir = %dir.display(),
        keys,
        bytes,
        "converted the sled store into the log store"
    );
    Ok(())
}

fn keep_sled_aside(dir: &Path) -> Result<()> {
    let kept = dir.join(SLED_KEPT);
    std::fs::create_dir_all(&kept).map_err(io(format!("creating {}", kept.display())))?;
    let entries = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(io(format!("listing {}", dir.display())))?;
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        if SLED_FILES.contains(&n) || n.starts_with("snap.") {
            let to = kept.join(n);
            std::fs::rename(e.path(), &to).map_err(io(format!(
                "moving {} to {}",
                n,
                to.display()
            )))?;
        }
    }
    sync_dir(dir)?;
    tracing::info!(kept = %kept.display(), "the converted sled store's files are kept aside; remove them once the new store has served");
    Ok(())
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
