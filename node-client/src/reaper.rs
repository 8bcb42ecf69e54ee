//! Deferred deletion of retired pod veths, and [`NodePods`], the real
//! [`PodWiring`].
//!
//! DEL takes a pod's host veth out of service synchronously (down, /32 route
//! gone, renamed: [`netlink::retire_owned`]) and hands the slow part, deleting
//! the pair, to this one thread. An ADD into a namespace that still holds a
//! retired pair first settles it, so a re-ADD never collides with it.
//!
//! The thread's failures are errors: one that cannot be started fails the
//! retire that needs it (and is tried again by the next), and one that
//! panicked is logged with its message and started again by the next retire.
use crate::{
    kernel::PodWiring,
    netlink::{self, HeldAttachment, PodSpec, WiredPod},
    Error, Result,
};
use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
};

const THREAD: &str = "veth-reaper";

/// The kernel operations the reaper uses (netlink; fakes in tests).
#[derive(Clone, Copy)]
struct Ops {
    /// Retires an owner's veths, returning their new names.
    retire: fn(&str) -> Result<Vec<String>>,
    /// Deletes a link by name.
    delete: fn(&str) -> Result<()>,
}

const NETLINK: Ops = Ops {
    retire: netlink::retire_owned,
    delete: netlink::delete_link_named,
};

#[derive(Default)]
struct Queue {
    waiting: VecDeque<(String, PathBuf)>,
    deleting: Option<(String, PathBuf)>,
    /// Whether the thread is running.
    running: bool,
}

struct Shared {
    q: Mutex<Queue>,
    cv: Condvar,
    ops: Ops,
}

/// Handle to the reaper thread. Cheap to clone.
#[derive(Clone)]
pub struct Reaper(Arc<Shared>);

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reaper {
    /// Starts the thread; retired links left from a previous run are queued.
    /// A thread that cannot be started is an error.
    pub fn start() -> Result<Reaper> {
        let r = Reaper::with_leftovers();
        r.ensure_running()?;
        Ok(r)
    }

    /// A reaper (thread not started yet) with the retired links left from a
    /// previous run queued.
    fn with_leftovers() -> Reaper {
        let r = Reaper::with_ops(NETLINK);
        match netlink::retired_links() {
            Ok(left) => {
                lock(&r.0.q)
                    .waiting
                    .extend(left.into_iter().map(|n| (n, PathBuf::new())));
            }
            Err(e) => tracing::warn!(error = %e, "cannot list retired veths"),
        }
        r
    }

    fn with_ops(ops: Ops) -> Reaper {
        Reaper(Arc::new(Shared {
            q: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            ops,
        }))
    }

    /// Starts the thread unless it runs.
    fn ensure_running(&self) -> Result<()> {
        let mut g = lock(&self.0.q);
        if g.running {
            return Ok(());
        }
        let shared = self.0.clone();
        std::thread::Builder::new()
            .name(THREAD.into())
            .spawn(move || run(&shared))
            .map_err(|source| Error::Spawn {
                name: THREAD.into(),
                source,
            })?;
        g.running = true;
        Ok(())
    }

    /// Retires the veths `owner` holds now and queues their deletion.
    /// Returns how many there were. Blocking.
    pub fn retire(&self, owner: &str, netns: Option<&Path>) -> Result<usize> {
        // Before anything is retired: nothing would delete it.
        self.ensure_running()?;
        let names = (self.0.ops.retire)(owner)?;
        let n = names.len();
        if n > 0 {
            let ns = netns.map(Path::to_path_buf).unwrap_or_default();
            lock(&self.0.q)
                .waiting
                .extend(names.into_iter().map(|name| (name, ns.clone())));
            self.0.cv.notify_all();
        }
        Ok(n)
    }

    /// Makes sure no retired pair of namespace `netns` is left (deleting the
    /// queued ones now, waiting for one being deleted). Pairs of unknown
    /// namespace (left by a previous run) count as matching. Blocking.
    pub fn settle(&self, netns: &Path) {
        let hits = |n: &PathBuf| n == netns || n.as_os_str().is_empty();
        let mine: Vec<String> = {
            let mut g = lock(&self.0.q);
            let (hit, keep): (VecDeque<_>, VecDeque<_>) =
                g.waiting.drain(..).partition(|(_, n)| hits(n));
            g.waiting = keep;
            hit.into_iter().map(|(n, _)| n).collect()
        };
        for name in mine {
            if let Err(e) = (self.0.ops.delete)(&name) {
                tracing::warn!(link = %name, error = %e, "deleting retired veth failed");
            }
        }
        let mut g = lock(&self.0.q);
        // A thread that panicked clears `deleting`, so this cannot hang.
        while g.deleting.as_ref().is_some_and(|(_, n)| hits(n)) {
            g = self.0.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Number of retired veths still to delete.
    pub fn pending(&self) -> usize {
        let g = lock(&self.0.q);
        g.waiting.len() + usize::from(g.deleting.is_some())
    }
}

/// The thread: deletes queued links one at a time. A panic is caught,
/// logged, and leaves the reaper stopped (and `deleting` clear) for the next
/// retire to start it again.
fn run(shared: &Shared) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
        let (name, ns) = {
            let mut g = lock(&shared.q);
            loop {
                if let Some(x) = g.waiting.pop_front() {
                    g.deleting = Some(x.clone());
                    break x;
                }
                g = shared.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        };
        if let Err(e) = (shared.ops.delete)(&name) {
            tracing::warn!(link = %name, netns = %ns.display(), error = %e, "deleting retired veth failed");
        }
        lock(&shared.q).deleting = None;
        shared.cv.notify_all();
    }));
    if let Err(panic) = outcome {
        let mut g = lock(&shared.q);
        let link = g.deleting.take().map(|(n, _)| n).unwrap_or_default();
        g.running = false;
        drop(g);
        shared.cv.notify_all();
        let e = Error::Panicked {
            name: format!("thread {THREAD}"),
            message: netlink::panic_message(panic.as_ref()),
        };
        tracing::error!(error = %e, link = %link, "veth reaper stopped; the next retire starts it again");
    }
}

/// The real [`PodWiring`]: [`crate::netlink`] in the calling thread's
/// network namespace (the node's), with retired veths deleted by a
/// [`Reaper`].
#[derive(Clone)]
pub struct NodePods {
    reaper: Reaper,
}

impl NodePods {
    /// Starts the reaper (see [`Reaper::start`]).
    pub fn start() -> Result<NodePods> {
        Ok(NodePods {
            reaper: Reaper::start()?,
        })
    }

    /// Like [`NodePods::start`], but a reaper thread that cannot be started
    /// now is only logged: the first DEL tries again and fails with it.
    pub fn start_or_log() -> NodePods {
        let reaper = Reaper::with_leftovers();
        if let Err(e) = reaper.ensure_running() {
            tracing::error!(error = %e, "veth reaper not started; DEL will try again");
        }
        NodePods { reaper }
    }
}

impl PodWiring for NodePods {
    fn owned_links(&self, owner: &str) -> Result<Vec<String>> {
        netlink::owned_links(owner)
    }
    fn link_exists(&self, name: &str) -> bool {
        netlink::link_exists(name)
    }
    fn wire(&self, spec: &PodSpec) -> Result<WiredPod> {
        netlink::wire_pod(spec)
    }
    fn check(&self, spec: &PodSpec) -> Result<()> {
        netlink::check_pod(spec)
    }
    fn retire(&self, owner: &str, netns: Option<&Path>) -> Result<usize> {
        self.reaper.retire(owner, netns)
    }
    fn retired_pending(&self) -> usize {
        self.reaper.pending()
    }
    fn settle(&self, netns: &Path) {
        self.reaper.settle(netns)
    }
    fn attachment_owners(&self) -> Result<Vec<String>> {
        netlink::attachment_owners()
    }
    fn held_attachment(&self, owner: &str) -> Result<Option<HeldAttachment>> {
        netlink::held_attachment(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    static DELETED: AtomicUsize = AtomicUsize::new(0);

    fn fake_retire(owner: &str) -> Result<Vec<String>> {
        Ok(vec![format!("tabz-{owner}")])
    }

    fn fake_delete(name: &str) -> Result<()> {
        if name == "tabz-boom" {
            panic!("deleting {name} exploded");
        }
        DELETED.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(5), "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_panicked_reaper_is_restarted_by_the_next_retire() {
        let r = Reaper::with_ops(Ops {
            retire: fake_retire,
            delete: fake_delete,
        });
        assert_eq!(r.retire("a", None).unwrap(), 1);
        wait_until("a deleted", || DELETED.load(Ordering::SeqCst) == 1);
        assert_eq!(r.retire("boom", Some(Path::new("/ns/x"))).unwrap(), 1);
        wait_until("the thread noticed as stopped", || !lock(&r.0.q).running);
        // Nothing is left "being deleted": settling that namespace returns.
        assert_eq!(r.pending(), 0);
        r.settle(Path::new("/ns/x"));
        // The next retire starts a new thread, which deletes again.
        assert_eq!(r.retire("b", None).unwrap(), 1);
        assert!(lock(&r.0.q).running);
        wait_until("b deleted", || DELETED.load(Ordering::SeqCst) == 2);
    }
}
