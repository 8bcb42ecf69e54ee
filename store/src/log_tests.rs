#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

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
    Reopen,
    Settle,
}

fn step() -> impl Strategy<Value = Step> {
    let batch = proptest::collection::vec((0u8..40, proptest::option::of(any::<u8>())), 1..12);
    prop_oneof![
        6 => batch.clone().prop_map(Step::Write),
        1 => batch.prop_map(Step::Lost),
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
                    b.apply(puts).unwrap();
                    b.sync().unwrap();
                }
                Step::Lost(batch) => {
                    b.apply(to_puts(&batch)).unwrap();
                    drop(b);
                    b = LogBackend::open_with(dir.path(), TINY).unwrap();
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
        b.apply(batch).unwrap();
        b.sync().unwrap();
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
    b.apply(vec![put("a/1", "one")]).unwrap();
    b.sync().unwrap();
    b.apply(vec![put("a/2", "two"), put("a/3", "three")])
        .unwrap();
    b.sync().unwrap();
    drop(b);
    let log = log_path(dir.path(), 0);
    let full = std::fs::read(&log).unwrap();
    let mut want = Model::new();
    apply(&mut want, &[put("a/1", "one")]);
    // Every cut inside the second frame, and a bad checksum.
    let first = FRAME + u32::from_le_bytes(full[..4].try_into().unwrap()) as usize;
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
    b.apply(vec![put("a/4", "four")]).unwrap();
    b.sync().unwrap();
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
        b.apply(vec![put(&format!("a/{i:04}"), "some value")])
            .unwrap();
        b.sync().unwrap();
    }
    b.settle();
    drop(b);
    let snap = names(dir.path())
        .into_iter()
        .find(|n| n.starts_with(SNAP))
        .unwrap();
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
    b.apply(vec![put("a/1", "one")]).unwrap();
    b.sync().unwrap();
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
        b.apply(batch).unwrap();
        b.sync().unwrap();
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
    b.apply(vec![put("a/new", "y")]).unwrap();
    b.sync().unwrap();
    drop(b);
    apply(&mut model, &[put("a/new", "y")]);
    assert_eq!(all(&open_embedded(dir.path(), 1 << 20).unwrap()), model);
}
