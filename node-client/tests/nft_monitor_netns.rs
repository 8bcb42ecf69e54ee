//! Real-kernel tests of `tabby_node::nft_monitor`, root only.
//!
//! Every test makes its own namespace (`tabbytest-nftmon-<pid>-<n>`) and
//! removes it in a guard, even on failure. The monitor runs on a thread that
//! entered the namespace with `setns` before creating its socket; changes
//! are made with `ip netns exec <ns> nft ...` from outside.
#![allow(clippy::unwrap_used)]
use nix::sched::CloneFlags;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tabby_node::nft_monitor::{monitor_nft_tables, NftEvent, NftMonitor};

const V4: NftEvent = NftEvent::Changed { family: 2 };
const V6: NftEvent = NftEvent::Changed { family: 10 };

fn need_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (CI runs as root)");
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!(
            "tabbytest-nftmon-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    /// Runs `nft script` inside the namespace; panics on failure.
    fn nft(&self, script: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft {script:?} in {}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Moves the calling thread into namespace `name`.
fn enter(name: &str) {
    let f = std::fs::File::open(Path::new("/var/run/netns").join(name)).unwrap();
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// An [`NftMonitor`] created inside `ns` on its own thread, forwarding
/// events until the receiver is gone (and one more event arrives).
fn spawn_monitor(ns: &Netns) -> (Receiver<NftEvent>, JoinHandle<()>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (tx, rx) = mpsc::channel();
    let name = ns.0.clone();
    let handle = std::thread::spawn(move || {
        enter(&name);
        let mut mon = NftMonitor::new().unwrap();
        ready_tx.send(()).unwrap();
        loop {
            let ev = mon.next_blocking().unwrap();
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("monitor did not start");
    (rx, handle)
}

/// The first event within `within`, then drains what follows it.
fn expect_event(rx: &Receiver<NftEvent>, within: Duration, what: &str) -> NftEvent {
    let started = Instant::now();
    let ev = rx
        .recv_timeout(within)
        .unwrap_or_else(|e| panic!("no event within {within:?} after {what}: {e}"));
    eprintln!("{what}: {ev:?}, {:?} after nft exited", started.elapsed());
    while let Ok(more) = rx.recv_timeout(Duration::from_millis(300)) {
        eprintln!("{what}: also {more:?}");
        assert_eq!(more, ev, "{what}: unexpected second event");
    }
    ev
}

fn expect_quiet(rx: &Receiver<NftEvent>, what: &str) {
    match rx.recv_timeout(Duration::from_millis(500)) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("{what}: expected no event, got {other:?}"),
    }
}

#[test]
fn monitor_reports_only_tabby_tables() {
    need_root();
    let ns = Netns::new();
    let (rx, handle) = spawn_monitor(&ns);

    ns.nft("add table ip tabby; add set ip tabby all-pools { type ipv4_addr; flags interval; }");
    let two = Duration::from_secs(2);
    assert_eq!(expect_event(&rx, two, "add ip tabby"), V4);

    ns.nft("add table ip other; add chain ip other c; add rule ip other c counter");
    expect_quiet(&rx, "changes to ip other");

    ns.nft("add element ip tabby all-pools { 10.244.0.0/16 }");
    assert_eq!(expect_event(&rx, two, "add element"), V4);

    ns.nft("add table ip6 tabby");
    assert_eq!(expect_event(&rx, two, "add ip6 tabby"), V6);

    // A table of the same name in another family is reported with it.
    ns.nft("add table inet tabby");
    let ev = expect_event(&rx, two, "add inet tabby");
    assert_eq!(ev, NftEvent::Changed { family: 1 });

    ns.nft("delete table ip other");
    expect_quiet(&rx, "deleting ip other");

    ns.nft("delete table ip tabby");
    assert_eq!(expect_event(&rx, two, "delete ip tabby"), V4);

    // Stop the thread: drop the receiver, then wake it with one more change.
    drop(rx);
    ns.nft("delete table ip6 tabby");
    handle.join().unwrap();
}

#[test]
fn monitor_loop_stops_when_told() {
    need_root();
    let ns = Netns::new();
    let ns_name = ns.0.clone();
    let watcher = std::thread::spawn(move || {
        enter(&ns_name);
        let mut seen = Vec::new();
        monitor_nft_tables(|ev| {
            seen.push(ev);
            false
        })
        .map(|()| seen)
    });
    // The loop subscribes asynchronously: keep changing the table until it
    // has seen a change.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !watcher.is_finished() {
        assert!(Instant::now() < deadline, "monitor_nft_tables saw nothing");
        ns.nft("add table ip tabby; delete table ip tabby");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(watcher.join().unwrap().unwrap(), [V4]);
}
