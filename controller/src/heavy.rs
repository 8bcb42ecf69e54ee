//! The thread that runs the heavy admin reads (CheckIpam, ShowRoutes,
//! ShowIpam, ListNodes) on IPAM snapshots. It runs at a lower CPU priority
//! than the threads that serve pod starts (nice +[`NICE`]): on a busy
//! machine a large CheckIpam then takes a little longer instead of delaying
//! Assigns (issue 17: no pod start waits on an admin read, also not for a
//! core). Admin reads run one at a time; concurrent ones queue. (CheckIpam
//! on a large table splits its walk over the cores, in threads that inherit
//! the lower priority.)
use std::{panic::AssertUnwindSafe, sync::mpsc};
use tokio::sync::oneshot;

/// How much nicer than the rest of the process the reads run.
pub const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Hands reads to the heavy-read thread. Cloning is cheap; the thread ends
/// when the last clone is dropped.
#[derive(Clone)]
pub struct HeavyReads {
    tx: mpsc::Sender<Job>,
}

impl HeavyReads {
    /// Starts the thread.
    pub fn start() -> std::io::Result<HeavyReads> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tabby-admin-read".into())
            .spawn(move || {
                lower_priority();
                for job in rx {
                    // A read that panics fails its caller (its answer is
                    // dropped unsent), not the reads after it.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                }
            })?;
        Ok(HeavyReads { tx })
    }

    /// Runs `f` on the thread; `None` when it panicked.
    pub async fn run<T, F>(&self, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.await.ok()
    }
}

/// Lowers this thread's priority only (on Linux a thread id names one
/// thread). Failing leaves the reads at normal priority, which is what they
/// had before: worth a warning, not a failure.
fn lower_priority() {
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(Some(tid), now.saturating_add(NICE)) {
        tracing::warn!(error = %e, "could not lower the admin read thread's CPU priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    /// Reads run on a thread that is nicer than the caller's, and a read
    /// that panics does not take the later ones with it.
    #[tokio::test]
    async fn reads_run_nicer_and_survive_a_panic() {
        let h = HeavyReads::start().unwrap();
        let base = nice_of_this_thread();
        let r: Option<()> = h.run(|| panic!("injected")).await;
        assert!(r.is_none());
        let (nice, name) = h
            .run(|| {
                let name = std::thread::current().name().map(String::from);
                (nice_of_this_thread(), name)
            })
            .await
            .expect("the thread outlives a panicking read");
        assert_eq!(nice, (base + NICE).min(19), "read ran at nice {nice}");
        assert_eq!(name.as_deref(), Some("tabby-admin-read"));
    }
}
