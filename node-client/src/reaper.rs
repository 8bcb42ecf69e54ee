//! Deferred deletion of retired pod veths.
//!
//! DEL takes a pod's host veth out of service synchronously (down, /32 route
//! gone, renamed: [`netlink::retire_owned`]) and hands the slow part, deleting
//! the pair, to this one thread. An ADD into a namespace that still holds a
//! retired pair first settles it, so a re-ADD never collides with it.
use crate::{netlink, Result};
use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
};

#[derive(Default)]
struct Queue {
    waiting: VecDeque<(String, PathBuf)>,
    deleting: Option<(String, PathBuf)>,
}

/// Handle to the reaper thread. Cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    q: Arc<(Mutex<Queue>, Condvar)>,
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reaper {
    /// Starts the thread; retired links left from a previous run are queued.
    pub fn start() -> Reaper {
        let r = Reaper {
            q: Arc::new((Mutex::new(Queue::default()), Condvar::new())),
        };
        match netlink::retired_links() {
            Ok(left) => {
                let mut g = lock(&r.q.0);
                g.waiting
                    .extend(left.into_iter().map(|n| (n, PathBuf::new())));
            }
            Err(e) => tracing::warn!(error = %e, "cannot list retired veths"),
        }
        let q = r.q.clone();
        let _ = std::thread::Builder::new().name("veth-reaper".into()).spawn(move || loop {
            let (name, ns) = {
                let mut g = lock(&q.0);
                loop {
                    if let Some(x) = g.waiting.pop_front() {
                        g.deleting = Some(x.clone());
                        break x;
                    }
                    g = q.1.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            };
            if let Err(e) = netlink::delete_link_named(&name) {
                tracing::warn!(link = %name, netns = %ns.display(), error = %e, "deleting retired veth failed");
            }
            lock(&q.0).deleting = None;
            q.1.notify_all();
        });
        r
    }

    /// Retires the veths `owner` holds now and queues their deletion.
    /// Returns how many there were. Blocking.
    pub fn retire(&self, owner: &str, netns: Option<&Path>) -> Result<usize> {
        let names = netlink::retire_owned(owner)?;
        let n = names.len();
        if n > 0 {
            let ns = netns.map(Path::to_path_buf).unwrap_or_default();
            lock(&self.q.0)
                .waiting
                .extend(names.into_iter().map(|name| (name, ns.clone())));
            self.q.1.notify_all();
        }
        Ok(n)
    }

    /// Makes sure no retired pair of namespace `netns` is left (deleting the
    /// queued ones now, waiting for one being deleted). Pairs of unknown
    /// namespace (left by a previous run) count as matching. Blocking.
    pub fn settle(&self, netns: &Path) {
        let hits = |n: &PathBuf| n == netns || n.as_os_str().is_empty();
        let mine: Vec<String> = {
            let mut g = lock(&self.q.0);
            let (hit, keep): (VecDeque<_>, VecDeque<_>) =
                g.waiting.drain(..).partition(|(_, n)| hits(n));
            g.waiting = keep;
            hit.into_iter().map(|(n, _)| n).collect()
        };
        for name in mine {
            if let Err(e) = netlink::delete_link_named(&name) {
                tracing::warn!(link = %name, error = %e, "deleting retired veth failed");
            }
        }
        let mut g = lock(&self.q.0);
        while g.deleting.as_ref().is_some_and(|(_, n)| hits(n)) {
            g = self.q.1.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Number of retired veths still to delete.
    pub fn pending(&self) -> usize {
        let g = lock(&self.q.0);
        g.waiting.len() + usize::from(g.deleting.is_some())
    }
}
