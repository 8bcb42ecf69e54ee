#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;
use std::{collections::BTreeMap, io::Write, sync::Arc};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// Folds after a few hundred bytes, so that the tests cross many.
const TINY: LogOptions = LogOptions {
    compact_min: 300,
    compact_max: 2_000,
};

fn all(b: &LogBackend) -> Model {
    let mut m = Model::new();
    b.scan(b"", &mut |k, v| {
        assert!(m.insert(k.to_vec(), v.to_vec()).is_none(), "{k:?} twice");
        Ok(())
    })
    .unwrap();
    m
}

fn apply(model: &mut Model, batch: &[Put]) {
    for (k, v) in batch {
        match v {
            Some(v) => model.insert(k.clone(), v.clone()),
            None => model.remove(k),
        };
    }
}

fn put(k: &str, v: &str) -> Put {
    (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
}

/// Applies `batch` and makes it durable, as a group commit does.
fn commit(b: &LogBackend, batch: Vec<Put>) {
    b.apply(batch).unwrap();
    b.sync().unwrap();
}

/// The name of the one snapshot in `dir`.
fn snapshot_name(dir: &Path) -> String {
    names(dir)
        .into_iter()
        .find(|n| n.starts_with(SNAP))
        .unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("tabby-") && n != LOCK)
        .collect();
    v.sort();
    v
}

#[derive(Debug, Clone)]
enum Step {
    Write(Vec<(u8, Option<u8>)>),
    /// Written but never synced, then the store is dropped (a crash before
    /// the flush: the batch was never acknowledged).
    Lost(Vec<(u8, Option<u8>)>),
    /// Written and synced, then cut back to part of its frame or zeros (a
    /// crash mid-append: as if never acknowledged), then reopened.
    Torn(Vec<(u8, Option<u8>)>, u16, bool),
    Reopen,
    Settle,
}

fn step() -> impl Strategy<Value = Step> {
    let batch = proptest::collection::vec((0u8..40, proptest::option::of(any::<u8>())), 1..12);
    prop_oneof![
        6 => batch.clone().prop_map(Step::Write),
        1 => batch.clone().prop_map(Step::Lost),
        1 => (batch, any::<u16>(), any::<bool>()).prop_map(|(b, c, z)| Step::Torn(b, c, z)),
        1 => Just(Step::Reopen),
        1 => Just(Step::Settle),
    ]
}

fn to_puts(b: &[(u8, Option<u8>)]) -> Vec<Put> {
    b.iter()
        .map(|(k, v)| {
            // Keys of a few prefixes and lengths; values of varied size.
            let key = format!("{}/{k:03}", (b'a' + k % 3) as char).into_bytes();
            (key, v.map(|v| vec![v; 1 + v as usize % 37]))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Whatever the writes, folds and reopens, the store holds exactly the
    /// synced writes, in order; point reads and prefix scans agree with it.
    #[test]
    fn the_store_holds_exactly_what_was_synced(steps in proptest::collection::vec(step(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::new();
        let mut b = LogBackend::open_with(dir.path(), TINY).unwrap();
        for s in steps {
            match s {
                Step::Write(batch) => {
                    let puts = to_puts(&batch);
                    apply(&mut model, &puts);
                    commit(&b, puts);
                }
                Step::Lost(batch) => {
                    b.apply(to_puts(&batch)).unwrap();
                    drop(b);
                    b = LogBackend::open_with(dir.path(), TINY).unwrap();
                }
                Step::Torn(batch, cut, zeros) => {
                    let logs = |d: &Path| -> Vec<String> {
                        names(d).into_iter().filter(|n| n.starts_with(LOG)).collect()
                    };
                    b.settle();
                    let before = logs(dir.path());
                    let newest = dir.path().join(before.last().unwrap());
                    let len = std::fs::metadata(&newest).unwrap().len();
                    let puts = to_puts(&batch);
                    commit(&b, puts.clone());
                    b.settle();
                    drop(b);
                    if logs(dir.path()) == before {
                        // Cut inside the new frame: part of it, or zeros in
                        // its place.
                        let full = std::fs::metadata(&newest).unwrap().len();
                        let keep = len + u64::from(cut) % (full - len);
                        let data = std::fs::read(&newest).unwrap();
                        let f = std::fs::OpenOptions::new().write(true).open(&newest).unwrap();
                        f.set_len(keep).unwrap();
                        if zeros {
                            f.set_len(full).unwrap();
                            if data[keep as usize..].iter().all(|b| *b == 0) {
                                // Zeros where zeros were: the frame is whole.
                                apply(&mut model, &puts);
                            }
                        }
                    } else {
                        // A rotation moved the frame out of the newest log:
                        // it stays (damage there would be an error).
                        apply(&mut model, &puts);
                    }
                    b = LogBackend::open_with(dir.path(), TINY).unwrap();
                    prop_assert_eq!(&all(&b), &model);
                }
                Step::Reopen => {
                    drop(b);
                    b = LogBackend::open_with(dir.path(), TINY).unwrap();
                    prop_assert_eq!(&all(&b), &model);
                }
                Step::Settle => b.settle(),
            }
        }
        prop_assert_eq!(&all(&b), &model);
        for k in 0u8..40 {
            let key = format!("{}/{k:03}", (b'a' + k % 3) as char).into_bytes();
            prop_assert_eq!(b.get(&key).unwrap(), model.get(&key).cloned());
        }
        let mut a = Vec::new();
        b.scan(b"a/", &mut |k, _| { a.push(k.to_vec()); Ok(()) }).unwrap();
        let want: Vec<Vec<u8>> = model.keys().filter(|k| k.starts_with(b"a/")).cloned().collect();
        prop_assert_eq!(a, want);
        // Read again after the first load: from the files, not the image.
        b.loaded();
        prop_assert_eq!(&all(&b), &model);
        for k in 0u8..40 {
            let key = format!("{}/{k:03}", (b'a' + k % 3) as char).into_bytes();
            prop_assert_eq!(b.get(&key).unwrap(), model.get(&key).cloned());
        }
        drop(b);
        let b = LogBackend::open_with(dir.path(), TINY).unwrap();
        prop_assert_eq!(&all(&b), &model);
    }
}

/// Many writes cross many folds: the logs are folded into snapshots, old
/// files go, and what a restart replays stays bounded.
#[test]
fn folds_replace_old_files_and_bound_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::new();
    let b = LogBackend::open_with(dir.path(), TINY).unwrap();
    for i in 0..500u32 {
        let batch = vec![put(&format!("a/{:04}", i % 97), &format!("v{i}"))];
        apply(&mut model, &batch);
        commit(&b, batch);
    }
    b.settle();
    let files = names(dir.path());
    let snaps = files.iter().filter(|n| n.starts_with(SNAP)).count();
    assert_eq!(snaps, 1, "{files:?}");
    assert!(files.len() <= 3, "{files:?}");
    let log_bytes: u64 = files
        .iter()
        .filter(|n| n.starts_with(LOG))
        .map(|n| std::fs::metadata(dir.path().join(n)).unwrap().len())
        .sum();
    assert!(log_bytes <= 2 * TINY.compact_max + 200, "{log_bytes}");
    drop(b);
    assert_eq!(all(&LogBackend::open(dir.path()).unwrap()), model);
}

/// A crash mid-append leaves part of a frame at the end of the newest log:
/// it was never acknowledged, so it is dropped (and cut from the file);
/// everything before it stays, and writing goes on after it.
#[test]
fn a_frame_cut_short_at_the_end_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let b = LogBackend::open(dir.path()).unwrap();
    commit(&b, vec![put("a/1", "one")]);
    commit(&b, vec![put("a/2", "two"), put("a/3", "three")]);
    drop(b);
    let log = log_path(dir.path(), 0);
    let full = std::fs::read(&log).unwrap();
    let mut want = Model::new();
    apply(&mut want, &[put("a/1", "one")]);
    // Every cut inside the second frame, and a bad checksum.
    let first = FRAME + u32::from_le_bytes(full[4..8].try_into().unwrap()) as usize;
    for cut in (first + 1..full.len()).step_by(3) {
        std::fs::write(&log, &full[..cut]).unwrap();
        let b = LogBackend::open(dir.path()).unwrap();
        assert_eq!(all(&b), want, "cut at {cut}");
        drop(b);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), first as u64);
    }
    let mut flipped = full.clone();
    *flipped.last_mut().unwrap() ^= 0xff;
    std::fs::write(&log, &flipped).unwrap();
    let b = LogBackend::open(dir.path()).unwrap();
    assert_eq!(all(&b), want);
    commit(&b, vec![put("a/4", "four")]);
    drop(b);
    apply(&mut want, &[put("a/4", "four")]);
    assert_eq!(all(&LogBackend::open(dir.path()).unwrap()), want);
}

/// Damage anywhere else is an error, never a quietly smaller store.
#[test]
fn a_damaged_snapshot_or_older_log_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = LogBackend::open_with(dir.path(), TINY).unwrap();
    for i in 0..200u32 {
        commit(&b, vec![put(&format!("a/{i:04}"), "some value")]);
    }
    b.settle();
    drop(b);
    let snap = snapshot_name(dir.path());
    let path = dir.path().join(&snap);
    let good = std::fs::read(&path).unwrap();
    for at in [3, 20, good.len() / 2, good.len() - 5] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let e = LogBackend::open(dir.path())
            .err()
            .expect("damage must not open");
        assert!(matches!(e, StoreError::Corrupt { .. }), "byte {at}: {e}");
    }
    std::fs::write(&path, &good).unwrap();
    assert_eq!(all(&LogBackend::open(dir.path()).unwrap()).len(), 200);

    // A log that is not the newest was complete when the next one started.
    let dir = tempfile::tempdir().unwrap();
    let b = LogBackend::open(dir.path()).unwrap();
    commit(&b, vec![put("a/1", "one")]);
    drop(b);
    File::create(log_path(dir.path(), 1)).unwrap();
    let log0 = log_path(dir.path(), 0);
    let mut l = std::fs::read(&log0).unwrap();
    l.pop();
    std::fs::write(&log0, &l).unwrap();
    let e = LogBackend::open(dir.path()).err().expect("must not open");
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
}

/// A crash during a fold leaves either a half-written snapshot (removed;
/// the old snapshot and logs still hold everything) or the new snapshot
/// beside the files it replaced (they are removed). Either way the state
/// is whole.
#[test]
fn a_fold_cut_short_leaves_a_whole_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::new();
    let b = LogBackend::open_with(dir.path(), TINY).unwrap();
    let mut saw_fold = false;
    for i in 0..300u32 {
        let before: Vec<(String, Vec<u8>)> = names(dir.path())
            .into_iter()
            .map(|n| {
                let d = std::fs::read(dir.path().join(&n)).unwrap();
                (n, d)
            })
            .collect();
        let batch = vec![put(&format!("b/{:03}", i % 50), &format!("{i}"))];
        apply(&mut model, &batch);
        commit(&b, batch);
        b.settle();
        let now = names(dir.path());
        let gone: Vec<_> = before.iter().filter(|(n, _)| !now.contains(n)).collect();
        if gone.is_empty() || saw_fold {
            continue;
        }
        saw_fold = true;
        // Put back what the fold removed, as if it had crashed before
        // removing it, plus a half-written next snapshot.
        for (n, d) in &gone {
            std::fs::write(dir.path().join(n), d).unwrap();
        }
        std::fs::write(
            dir.path().join(format!("{SNAP}{:020}{TMP}", 999)),
            b"TABBYSN1 half",
        )
        .unwrap();
    }
    assert!(saw_fold);
    drop(b);
    let b = LogBackend::open_with(dir.path(), TINY).unwrap();
    assert_eq!(all(&b), model);
    let files = names(dir.path());
    assert_eq!(
        files.iter().filter(|n| n.starts_with(SNAP)).count(),
        1,
        "{files:?}"
    );
    assert!(!files.iter().any(|n| n.ends_with(TMP)), "{files:?}");
}

/// One directory, one store: a second open is refused while the first
/// holds it, and allowed right after it is dropped.
#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = LogBackend::open(dir.path()).unwrap();
    let e = LogBackend::open(dir.path()).err().expect("second open");
    assert!(e.to_string().contains("another controller"), "{e}");
    drop(b);
    LogBackend::open(dir.path()).unwrap();
}

/// A data directory written by an older tabby (sled) is converted on first
/// open: same keys and values; sled's files are kept aside, not read again.
#[test]
fn a_sled_store_is_converted_on_first_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::new();
    {
        let s = crate::SledBackend::open(dir.path(), 1 << 20).unwrap();
        for i in 0..300u32 {
            let batch = vec![
                put(&format!("a/10.0.{}.{}", i / 256, i % 256), "x"),
                put("m/rev", &i.to_string()),
            ];
            apply(&mut model, &batch);
            s.apply(batch).unwrap();
        }
        s.sync().unwrap();
    }
    // sled's threads may hold its lock a moment after the drop.
    let t = std::time::Instant::now();
    let b = loop {
        match open_embedded(dir.path(), 1 << 20) {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && t.elapsed() < std::time::Duration::from_secs(5) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => break r.unwrap(),
        }
    };
    assert_eq!(all(&b), model);
    assert!(!dir.path().join("db").exists());
    assert!(dir.path().join(SLED_KEPT).join("db").exists());
    commit(&b, vec![put("a/new", "y")]);
    drop(b);
    apply(&mut model, &[put("a/new", "y")]);
    assert_eq!(all(&open_embedded(dir.path(), 1 << 20).unwrap()), model);
    // A conversion cut short after its snapshot, before the move: the
    // snapshot counts, sled's files are moved aside then.
    std::fs::rename(dir.path().join(SLED_KEPT).join("db"), dir.path().join("db")).unwrap();
    assert_eq!(all(&open_embedded(dir.path(), 1 << 20).unwrap()), model);
    assert!(!dir.path().join("db").exists());
}

/// A crash can leave zeros where frames were being written (the file's size
/// reached the disk, its data did not): a torn tail like any other.
#[test]
fn a_tail_of_zeros_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let b = LogBackend::open(dir.path()).unwrap();
    commit(&b, vec![put("a/1", "one")]);
    drop(b);
    let log = log_path(dir.path(), 0);
    let len = std::fs::metadata(&log).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(&[0u8; 4096]).unwrap();
    drop(f);
    let b = LogBackend::open(dir.path()).unwrap();
    assert_eq!(all(&b).len(), 1);
    drop(b);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), len);
    // Zeros hold nothing worth keeping.
    assert!(!names_all(dir.path()).iter().any(|n| n.starts_with("torn-")));
}

/// Damage with a whole frame after it is not a torn tail: acknowledged
/// batches follow it, so the open fails and the file is left as it is.
#[test]
fn damage_before_a_whole_frame_is_an_error_not_a_shorter_store() {
    let dir = tempfile::tempdir().unwrap();
    let b = LogBackend::open(dir.path()).unwrap();
    for i in 0..10 {
        commit(&b, vec![put(&format!("a/{i}"), "v")]);
    }
    drop(b);
    let log = log_path(dir.path(), 0);
    let good = std::fs::read(&log).unwrap();
    for at in [2, FRAME + 2, good.len() / 2] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        std::fs::write(&log, &bad).unwrap();
        let e = LogBackend::open(dir.path()).err().expect("must not open");
        assert!(matches!(e, StoreError::Corrupt { .. }), "byte {at}: {e}");
        assert_eq!(std::fs::read(&log).unwrap(), bad, "the log was changed");
    }
    // Garbage (not zeros) at the end is a torn tail, kept aside.
    let mut torn = good.clone();
    torn.extend_from_slice(b"TBL1\x05\0\0\0garbage");
    std::fs::write(&log, &torn).unwrap();
    assert_eq!(all(&LogBackend::open(dir.path()).unwrap()).len(), 10);
    assert_eq!(std::fs::read(&log).unwrap(), good);
    let kept: Vec<String> = names_all(dir.path())
        .into_iter()
        .filter(|n| n.starts_with("torn-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    // And a later open does not trip over the kept tail.
    assert_eq!(all(&LogBackend::open(dir.path()).unwrap()).len(), 10);
}

fn names_all(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Batches applied on one thread and synced on another, across many folds,
/// and a load in the middle: every batch is there, in order.
#[test]
fn apply_and_sync_on_two_threads_across_folds() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(LogBackend::open_with(dir.path(), TINY).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncer = {
        let (b, stop) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                b.sync().unwrap();
            }
        })
    };
    let mut model = Model::new();
    for i in 0..20_000u32 {
        let batch = vec![put(&format!("a/{:04}", i % 97), &format!("v{i}"))];
        apply(&mut model, &batch);
        b.apply(batch).unwrap();
        if i == 10_000 {
            b.loaded();
        }
    }
    b.sync().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    syncer.join().unwrap();
    assert_eq!(all(&b), model);
    drop(b);
    assert_eq!(all(&LogBackend::open(dir.path()).unwrap()), model);
}

/// Damaged files never panic an open or a read: an error or a store.
#[test]
fn damaged_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let b = LogBackend::open_with(dir.path(), TINY).unwrap();
    for i in 0..120u32 {
        commit(
            &b,
            vec![
                put(&format!("a/{:04}", i % 37), &format!("v{i}")),
                (format!("b/{i}").into_bytes(), None),
            ],
        );
    }
    drop(b);
    let mut seed = 12345u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for n in names(dir.path()) {
        let p = dir.path().join(&n);
        let good = std::fs::read(&p).unwrap();
        for _ in 0..100 {
            let mut bad = good.clone();
            if bad.is_empty() {
                break;
            }
            for _ in 0..(1 + rnd() % 3) {
                let at = (rnd() as usize) % bad.len();
                bad[at] = rnd() as u8;
            }
            if rnd() % 4 == 0 {
                let l = (rnd() as usize) % bad.len();
                bad.truncate(l);
            }
            std::fs::write(&p, &bad).unwrap();
            if let Ok(b) = LogBackend::open(dir.path()) {
                let _ = b.scan(b"", &mut |_, _| Ok(()));
            }
        }
        std::fs::write(&p, &good).unwrap();
    }
}

/// A fold that keeps failing is not tried again (with a new log) at every
/// commit, and leaves no half-written snapshots behind.
#[test]
fn a_failing_fold_backs_off_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let b = LogBackend::open_with(dir.path(), TINY).unwrap();
    for i in 0..200u32 {
        commit(&b, vec![put(&format!("a/{:04}", i % 37), &format!("v{i}"))]);
    }
    b.settle();
    let snap = snapshot_name(dir.path());
    let p = dir.path().join(&snap);
    let mut d = std::fs::read(&p).unwrap();
    let l = d.len();
    // The trailer's checksum: every fold now fails at the end.
    d[l - 1] ^= 1;
    std::fs::write(&p, &d).unwrap();
    for i in 0..200u32 {
        commit(&b, vec![put(&format!("a/{:04}", i % 37), &format!("w{i}"))]);
        b.settle();
    }
    let files = names(dir.path());
    assert!(!files.iter().any(|n| n.ends_with(TMP)), "{files:?}");
    // 200 small commits of about 30 bytes: a retry per TINY.compact_min-ish
    // of log, not one per commit.
    let logs = files.iter().filter(|n| n.starts_with(LOG)).count();
    assert!(logs <= 12, "{logs} logs: {files:?}");
}

/// A snapshot of many records, one of them larger than the read buffer,
/// is read in pieces from its index's marks: every range, point read and
/// scan starting anywhere (on a mark, between marks, before the first key,
/// past the last) gives what the model holds, with the log's later writes
/// laid over it.
#[test]
fn a_large_snapshot_is_read_from_its_marks() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::new();
    let opts = LogOptions {
        compact_min: 1,
        compact_max: 1,
    };
    let n = SNAP_MARK_EVERY as usize * 5 + 17;
    let big = vec![b'x'; SNAP_CHUNK + 12_345];
    {
        let b = LogBackend::open_with(dir.path(), opts).unwrap();
        let mut batch: Vec<Put> = (0..n)
            .map(|i| put(&format!("k/{:06}", i * 2), &"v".repeat(i % 50)))
            .collect();
        batch.push((b"k/000101x".to_vec(), Some(big.clone())));
        apply(&mut model, &batch);
        commit(&b, batch);
        b.settle();
        assert!(names(dir.path()).iter().any(|n| n.starts_with(SNAP)));
    }
    // Later writes, in the log only: changes, deletes, new keys between.
    let b = LogBackend::open_with(dir.path(), LogOptions::default()).unwrap();
    let later: Vec<Put> = vec![
        put("k/000000", "first, changed"),
        (format!("k/{:06}", SNAP_MARK_EVERY * 2).into_bytes(), None),
        put(&format!("k/{:06}", SNAP_MARK_EVERY * 2 + 1), "between"),
        (format!("k/{:06}", (n - 1) * 2).into_bytes(), None),
        put("k/999999", "last"),
        put("a/0", "before all"),
    ];
    apply(&mut model, &later);
    commit(&b, later);
    drop(b);
    let b = LogBackend::open_with(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(all(&b), model);
    let mark = SNAP_MARK_EVERY as usize;
    for i in [
        0,
        1,
        2,
        101,
        mark - 1,
        mark,
        mark + 1,
        2 * mark,
        3 * mark + 7,
        n - 1,
        n,
        n + 3,
    ] {
        for key in [format!("k/{:06}", i * 2), format!("k/{:06}", i * 2 + 1)] {
            let key = key.into_bytes();
            assert_eq!(b.get(&key).unwrap(), model.get(&key).cloned(), "{key:?}");
            // A range from here to the end of its hundred.
            let mut got = Vec::new();
            let hi = format!("k/{:04}", i * 2 / 100 + 1).into_bytes();
            b.with_image(|im| {
                im.range(&key, Some(&hi), &mut |k, v| {
                    got.push((k.to_vec(), v.to_vec()));
                    Ok(true)
                })
            })
            .unwrap();
            let want: Vec<(Vec<u8>, Vec<u8>)> = model
                .range(key.clone()..hi.clone())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(got, want, "from {key:?}");
        }
    }
    assert_eq!(b.get(b"k/000101x").unwrap(), Some(big));
    assert_eq!(b.get(b"").unwrap(), None);
    assert_eq!(b.get(b"z").unwrap(), None);
    assert_eq!(b.first_key_outside(b"k").unwrap(), Some(b"a/0".to_vec()));
}
