//! A group commit on the embedded store reaches the disk, not only the page
//! cache: it ends in an `fdatasync` of the log it was appended to (sled's
//! flush, which this store replaced, ended in `sync_file_range`: no cache
//! flush, no file size). Seen with
//! strace attached to this test's own process, so it needs root (CI runs as
//! root) and strace (installed by scripts/install-deps.sh). A file of its
//! own: no other test's syscalls in the trace.
#![allow(clippy::unwrap_used)]
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use tabby_store::{Encapsulation, Mutation, Op, Pool, Store};

/// Whether a tracer is attached to this process.
fn traced() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
        })
        .unwrap_or(false)
}

fn pool(name: &str, cidr: &str) -> Pool {
    Pool {
        name: name.into(),
        cidr: cidr.parse().unwrap(),
        block_size: 26,
        nat_outgoing: false,
        encapsulation: Encapsulation::None,
        disabled: false,
        node_selector: String::new(),
    }
}

#[test]
fn a_group_commit_ends_in_fdatasync_of_its_log() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it attaches strace to its own process); CI runs it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Warm up: the first commit may open or grow files.
    store
        .commit(&[Mutation {
            ops: vec![Op::PutPool(pool("warm", "10.0.0.0/24"))],
        }])
        .unwrap();

    let log = dir.path().join("strace.log");
    let err = dir.path().join("strace.err");
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=fdatasync,fsync,sync_file_range",
            "-o",
        ])
        .arg(&log)
        .arg("-p")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("strace (scripts/install-deps.sh installs it)");
    let t = Instant::now();
    while !traced() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "strace did not attach: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // strace attaches thread by thread; give it a moment for the rest.
    std::thread::sleep(Duration::from_millis(200));
    let revs = store
        .commit(&[Mutation {
            ops: vec![Op::PutPool(pool("p", "10.1.0.0/24"))],
        }])
        .unwrap();
    // SIGTERM: strace detaches and writes out its log.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(strace.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    strace.wait().unwrap();
    let trace = std::fs::read_to_string(&log).unwrap();
    assert_eq!(revs.len(), 1);
    // The log the commit was appended to (the only one: no fold yet).
    let logs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("tabby-log-")
        })
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let data = format!("{}>", logs[0].display());
    let synced = trace
        .lines()
        .any(|l| (l.contains("fdatasync(") || l.contains("fsync(")) && l.contains(&data));
    assert!(
        synced,
        "no fdatasync/fsync of {} during the commit; strace saw:\n{trace}",
        logs[0].display()
    );
}
