//! The one owner of IPAM state.
//!
//! A dedicated OS thread holds the [`IpamState`] and the [`Store`]. Callers
//! send it closures; it runs every queued closure against the state and
//! writes all resulting mutations as one atomic batch (group commit). A
//! second thread, the committer, flushes written batches to disk and only
//! then hands their answers and intent deltas, in order, to one task on the
//! gRPC runtime, which answers and then broadcasts the deltas, while the
//! owner already prepares the next group. An answer therefore never reveals state that is not on disk, and a
//! crash loses nothing that was acknowledged.
//!
//! Answers go through that task, not straight from the committer, so that a
//! whole group's callers wake inside the runtime together and each connection
//! writes their responses in one go (one wake and one write per group rather
//! than per call), and so that waking every watcher is a wake inside the
//! runtime, not a cross-thread wake-up per watcher.
//!
//! When the store fails for good (a flush, or the reload after a failed
//! write), nothing more can be acknowledged: the thread that met the failure
//! ends with it, and [`OwnerThread::failed`] hands it to the binary, which
//! stops the process. A panic of either thread is reported the same way.
use crate::intent::Encoded;
use crate::{
    error::{Error, Result},
    heavy::HeavyReads,
    intent::{IntentTracker, ResumeFrom, WatchStart},
    ipam::{IpamState, Loader, Prepared, Preparer},
};
use std::collections::BTreeSet;
use std::{
    sync::{Arc, Mutex, PoisonError},
    thread,
};
use tabby_store::{Mutation, Op, Store, StoreError, Written};
use tokio::sync::broadcast;
use tokio::sync::{mpsc, oneshot};

type Finish = Box<dyn FnOnce(std::result::Result<u64, &Error>) + Send>;
type Job = Box<dyn FnOnce(&mut Owned) -> (Mutation, Finish) + Send>;
/// A durable group on its way to the delivery task: the answers (finisher
/// and revision), then the intent deltas to broadcast.
struct Durable {
    /// The state after the group, for readers.
    view: Option<(Arc<IpamState>, u64)>,
    answers: Vec<(Finish, u64)>,
    deltas: Vec<(broadcast::Sender<Arc<Encoded>>, Arc<Encoded>)>,
}
type BeforeFlush = Box<dyn FnMut() + Send>;

/// What the owner thread owns.
struct Owned {
    ipam: IpamState,
    intent: IntentTracker,
}

impl Owned {
    /// State as `store` holds it; watchers of this store resume from its
    /// intent mark.
    fn load(store: &Store) -> Result<Owned> {
        // Streamed: each record is placed as it is read. Reading the store
        // and preparing each record (one thread) overlaps placing them in
        // the state (this one).
        let mut loader = Loader::default();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Prepared>>(LOAD_QUEUE);
        let ((revision, marked), index) = std::thread::scope(|sc| {
            let reading = sc.spawn(move || {
                let mut batch = Vec::with_capacity(LOAD_BATCH);
                let mut prep = Preparer::default();
                let mut indexing = None;
                let r = store.load_each(|r| {
                    // The handles are all in: their per-node index is built
                    // beside the reading and placing of the allocations.
                    if let Some(ix) = prep.handles_done(&r) {
                        indexing = Some(sc.spawn(move || ix.build()));
                    }
                    batch.push(prep.prepare(r));
                    if batch.len() == LOAD_BATCH {
                        // The receiver stops only when this thread is done.
                        let _ = tx.send(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(LOAD_BATCH),
                        ));
                    }
                });
                let _ = tx.send(batch);
                let mut built = vec![prep.take_index().build()];
                if let Some(t) = indexing {
                    built.push(t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                }
                r.map(|r| (r, built))
            });
            for batch in rx {
                batch.into_iter().for_each(|r| loader.take(r));
            }
            reading
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })?;
        let ipam = loader.finish(index);
        let intent =
            IntentTracker::new(&ipam, revision).resumable(store.id(), store.epochs(), marked);
        Ok(Owned { ipam, intent })
    }
}

/// Records handed from the store reader to the loader at a time, and how
/// many such batches may wait.
const LOAD_BATCH: usize = 1024;
const LOAD_QUEUE: usize = 16;

/// Most jobs folded into one group commit.
const MAX_GROUP: usize = 512;

/// Handle to the owner thread. Cloning is cheap.
#[derive(Clone)]
pub struct Ipam {
    tx: mpsc::Sender<Job>,
    view: Arc<View>,
    heavy: HeavyReads,
}

/// Reads the published snapshots, and nothing else (metrics).
#[derive(Clone)]
pub struct Reader {
    view: Arc<View>,
    heavy: HeavyReads,
}

impl Reader {
    /// Runs `f` on the state as of the last durable group, and its
    /// revision, on the admin read thread (as [`Ipam::read_heavy`]);
    /// `None` when `f` panicked.
    pub async fn read_heavy<T, F>(&self, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(&IpamState, u64) -> T + Send + 'static,
    {
        let (snap, rev) = self.view.get();
        self.heavy.run(move || f(&snap, rev)).await
    }
}

/// The state readers see: the owner's state as of the last durable group,
/// published before that group's answers (so a caller that heard of its
/// write reads it), with its revision.
struct View(
    std::sync::RwLock<(Arc<IpamState>, u64)>,
    /// The revision of each published state, for those that follow them.
    tokio::sync::watch::Sender<u64>,
);

impl Default for View {
    fn default() -> Self {
        View(Default::default(), tokio::sync::watch::Sender::new(0))
    }
}

impl View {
    fn get(&self) -> (Arc<IpamState>, u64) {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Publishes `st` at `rev`, unless a later state is out already.
    fn publish(&self, st: Arc<IpamState>, rev: u64) {
        let mut v = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if rev >= v.1 {
            *v = (st, rev);
            self.1.send_replace(rev);
        }
    }
}

/// The owner thread: tells when it failed, and joins it at shutdown.
pub struct OwnerThread {
    thread: thread::JoinHandle<()>,
    /// The first error that stopped the owner or the committer; `None` once
    /// [`OwnerThread::failed`] returned it.
    failed: Option<oneshot::Receiver<Error>>,
}

impl OwnerThread {
    /// Resolves with the error that stopped the owner's threads: the store
    /// could not be flushed or reloaded, the answer delivery task is gone, a
    /// thread could not start or panicked. Pending while they work and after
    /// a clean stop. Cancel-safe: select on it alongside the server. Nothing
    /// more will be acknowledged: the process should stop.
    pub async fn failed(&mut self) -> Error {
        let Some(rx) = self.failed.as_mut() else {
            return std::future::pending().await;
        };
        let r = rx.await;
        self.failed = None;
        match r {
            Ok(e) => e,
            // Both threads ended without an error: a clean stop.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits until every queued job is durable and its answer handed to the
    /// delivery task, and the store is flushed. All [`Ipam`] handles must
    /// have been dropped first. Blocks: call it off the runtime's threads.
    /// Fails with what stopped the threads, unless [`OwnerThread::failed`]
    /// returned it already.
    pub fn join(mut self) -> Result<()> {
        let joined = join(self.thread, OWNER);
        match self.failed.as_mut().map(|rx| rx.try_recv()) {
            Some(Ok(e)) => Err(e),
            _ => joined,
        }
    }
}

const OWNER: &str = "ipam-owner";
const COMMITTER: &str = "ipam-commit";

/// Carries the first error that stops one of the owner's threads to
/// [`OwnerThread`]; later ones are consequences of it.
#[derive(Clone)]
struct Failure(Arc<Mutex<Option<oneshot::Sender<Error>>>>);

impl Failure {
    fn report(&self, e: Error) {
        let first = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        match first {
            // Without an OwnerThread there is no one left to tell.
            Some(tx) => drop(tx.send(e)),
            None => tracing::debug!(error = %e, "IPAM owner: further failure"),
        }
    }
}

/// Reports a panic of the thread it lives on when unwinding drops it.
struct PanicReport(Failure, &'static str);

impl Drop for PanicReport {
    fn drop(&mut self) {
        if thread::panicking() {
            tracing::error!(thread = self.1, "thread panicked; the controller stops");
            self.0
                .report(Error::Internal(format!("thread {} panicked", self.1)));
        }
    }
}

/// Starts thread `name` running `f`; its error or panic goes to `failure`.
fn spawn(
    name: &'static str,
    failure: Failure,
    f: impl FnOnce() -> Result<()> + Send + 'static,
) -> Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _panic = PanicReport(failure.clone(), name);
            if let Err(e) = f() {
                failure.report(e);
            }
        })
        .map_err(|e| Error::Internal(format!("cannot start thread {name}: {e}")))
}

/// Joins a thread started by [`spawn`]: its own error went to the failure
/// report, a panic is an error here too.
fn join(t: thread::JoinHandle<()>, name: &str) -> Result<()> {
    t.join()
        .map_err(|_| Error::Internal(format!("thread {name} panicked")))
}

impl Ipam {
    /// Loads state from `store` and starts the owner thread. Must be called
    /// from within the Tokio runtime that serves the callers: the answer
    /// delivery task runs there.
    pub fn start(store: Arc<Store>) -> Result<(Ipam, OwnerThread)> {
        Self::start_with(store, None)
    }

    /// [`Ipam::start`], with `before_flush` run by the committer before each
    /// flush (tests hold a flush back with it).
    fn start_with(
        store: Arc<Store>,
        before_flush: Option<BeforeFlush>,
    ) -> Result<(Ipam, OwnerThread)> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Internal("the IPAM owner must be started inside a Tokio runtime".into())
        })?;
        let state = Owned::load(&store)?;
        let heavy = HeavyReads::start()
            .map_err(|e| Error::Internal(format!("starting the admin read thread: {e}")))?;
        let view = Arc::new(View::default());
        view.publish(Arc::new(state.ipam.clone()), store.revision());
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let (dtx, mut drx) = mpsc::unbounded_channel::<Durable>();
        let v2 = view.clone();
        rt.spawn(async move {
            while let Some(Durable {
                view,
                answers,
                deltas,
            }) = drx.recv().await
            {
                if let Some((st, rev)) = view {
                    v2.publish(st, rev);
                }
                // Answers first: woken before the watchers, the callers do
                // not queue behind the fan-out to every node. (Broadcasting
                // once written, before the flush, is safe thanks to the
                // epochs and was measured: 10-15% faster convergence, but the
                // answers then queue behind the fan-out on this thread; an
                // Assign took 3.8 ms instead of 1.4 with 30 watchers, 11
                // instead of 2 with 100.)
                for (finish, rev) in answers {
                    finish(Ok(rev));
                }
                // Broadcast from inside the runtime: waking every watcher
                // from the committer's thread costs one cross-thread wake
                // (a syscall) per watcher.
                for (tx, e) in deltas {
                    // No watchers is fine.
                    let _ = tx.send(e);
                }
            }
        });
        let (ftx, frx) = oneshot::channel();
        let failure = Failure(Arc::new(Mutex::new(Some(ftx))));
        let f2 = failure.clone();
        let v3 = view.clone();
        let thread = spawn(OWNER, failure, move || {
            run(state, store, rx, dtx, before_flush, f2, v3)
        })?;
        Ok((
            Ipam { tx, view, heavy },
            OwnerThread {
                thread,
                failed: Some(frx),
            },
        ))
    }

    /// Runs `f` on the state; answers with its output and the revision at
    /// which its mutation (if any) is durable.
    pub async fn call<T, F>(&self, f: F) -> Result<(T, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&mut IpamState) -> Result<(T, Mutation)> + Send + 'static,
    {
        let (otx, orx) = oneshot::channel::<Result<(T, u64)>>();
        let job: Job = Box::new(move |o| match f(&mut o.ipam) {
            Ok((t, m)) => (
                m,
                Box::new(move |r: std::result::Result<u64, &Error>| {
                    let _ = otx.send(match r {
                        Ok(rev) => Ok((t, rev)),
                        // A store failure is ours, not the caller's:
                        // INTERNAL; etcd out of reach or this controller
                        // deposed: UNAVAILABLE (try again, at the leader).
                        Err(Error::Store(e @ (StoreError::Etcd(_) | StoreError::Fenced(_)))) => {
                            Err(Error::StoreUnavailable(format!(
                                "not stored, nothing acknowledged: {e}"
                            )))
                        }
                        Err(e) => Err(Error::Internal(format!(
                            "not stored, nothing acknowledged: {e}"
                        ))),
                    });
                }),
            ),
            Err(e) => (
                Mutation::default(),
                Box::new(move |_| {
                    let _ = otx.send(Err(e));
                }),
            ),
        });
        self.tx.send(job).await.map_err(|_| Error::Unavailable)?;
        orx.await.map_err(|_| Error::Unavailable)?
    }

    /// Starts an intent watcher that has applied everything up to `since` of
    /// the history `from`: store id and epoch (None: this store, now).
    pub async fn watch(&self, since: u64, from: Option<ResumeFrom>) -> Result<WatchStart> {
        let (otx, orx) = oneshot::channel();
        let job: Job = Box::new(move |o| {
            let w = o.intent.watch(since, from.as_ref());
            (
                Mutation::default(),
                // A failed group write means memory ran ahead of the store:
                // no start then (dropping otx answers UNAVAILABLE).
                Box::new(move |r| {
                    if r.is_ok() {
                        let _ = otx.send(w);
                    }
                }),
            )
        });
        self.tx.send(job).await.map_err(|_| Error::Unavailable)?;
        orx.await.map_err(|_| Error::Unavailable)
    }

    /// A handle that reads snapshots only: it does not keep the owner
    /// alive (the owner stops once every [`Ipam`] is dropped).
    pub fn reader(&self) -> Reader {
        Reader {
            view: self.view.clone(),
            heavy: self.heavy.clone(),
        }
    }

    /// The state as of the last durable group, and its revision: every
    /// write answered before this call is in it. Taken without the owner
    /// (it publishes one after each group), so a read never queues behind
    /// writes and never holds one up.
    pub async fn snapshot(&self) -> Result<(Arc<IpamState>, u64)> {
        Ok(self.view.get())
    }

    /// Follows the published states: changes each time one is published
    /// (with its revision).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.view.1.subscribe()
    }

    /// Runs a cheap read-only `f` (a lookup) on a [`Ipam::snapshot`], on the
    /// calling task.
    pub async fn read<T, F>(&self, f: F) -> Result<(T, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&IpamState) -> T + Send + 'static,
    {
        let (snap, rev) = self.snapshot().await?;
        Ok((f(&snap), rev))
    }

    /// Runs a read-only `f` that walks the tables (a check, a summary, the
    /// route table) on a [`Ipam::snapshot`], on the admin read thread, at a
    /// lower CPU priority ([`HeavyReads`]): neither the owner nor the gRPC
    /// runtime waits for it, and pod starts get the CPU first.
    pub async fn read_heavy<T, F>(&self, f: F) -> Result<(T, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&IpamState) -> T + Send + 'static,
    {
        self.reader()
            .read_heavy(move |st, rev| (f(st), rev))
            .await
            .ok_or_else(|| Error::Internal("a read failed".into()))
    }
}

/// A written group on its way to the disk.
struct Flight {
    written: Written,
    view: Option<(Arc<IpamState>, u64)>,
    answers: Vec<(Finish, u64)>,
    delta: Option<(broadcast::Sender<Arc<Encoded>>, Arc<Encoded>)>,
}

/// Flushes written groups, then hands their answers and deltas to the
/// delivery task, in order. Fails when a flush fails or the
/// delivery task is gone: nothing more can be acknowledged then.
fn commit_loop(
    store: Arc<Store>,
    rx: std::sync::mpsc::Receiver<Flight>,
    deliver: mpsc::UnboundedSender<Durable>,
    mut before_flush: Option<BeforeFlush>,
) -> Result<()> {
    while let Ok(first) = rx.recv() {
        let mut flights = vec![first];
        flights.extend(rx.try_iter());
        let written = flights
            .iter_mut()
            .map(|f| std::mem::take(&mut f.written))
            .collect();
        if let Some(f) = before_flush.as_mut() {
            f();
        }
        let t0 = std::time::Instant::now();
        let flushed = store.make_durable(written);
        crate::metrics::metrics()
            .commit
            .observe(t0.elapsed().as_secs_f64());
        match flushed {
            Ok(()) => {
                let mut answers = Vec::new();
                let mut deltas = Vec::new();
                let mut view = None;
                for f in flights {
                    answers.extend(f.answers);
                    deltas.extend(f.delta);
                    view = f.view.or(view);
                }
                if deliver
                    .send(Durable {
                        view,
                        answers,
                        deltas,
                    })
                    .is_err()
                {
                    // Committed changes could no longer be acknowledged.
                    tracing::error!("the answer delivery task is gone; the controller stops");
                    return Err(Error::Internal("the answer delivery task is gone".into()));
                }
            }
            Err(e) => {
                // The disk refused: nothing more can be acknowledged. Answer
                // with the error and stop; a restart recovers what is durable.
                let e = Error::Store(e);
                tracing::error!(error = %e, "flush failed; the controller stops");
                for f in flights {
                    for (finish, _) in f.answers {
                        finish(Err(&e));
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

fn run(
    mut state: Owned,
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Job>,
    deliver: mpsc::UnboundedSender<Durable>,
    before_flush: Option<BeforeFlush>,
    failure: Failure,
    view: Arc<View>,
) -> Result<()> {
    let (ctx, crx) = std::sync::mpsc::channel::<Flight>();
    let s2 = store.clone();
    let committer = spawn(COMMITTER, failure, move || {
        commit_loop(s2, crx, deliver, before_flush)
    })?;
    let mut mutations = Vec::with_capacity(MAX_GROUP);
    let mut finishes: Vec<Finish> = Vec::with_capacity(MAX_GROUP);
    while let Some(job) = rx.blocking_recv() {
        let (m, f) = job(&mut state);
        mutations.push(m);
        finishes.push(f);
        while mutations.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => {
                    let (m, f) = job(&mut state);
                    mutations.push(m);
                    finishes.push(f);
                }
                Err(_) => break,
            }
        }
        crate::metrics::metrics()
            .group
            .observe(mutations.len() as f64);
        // Pods' handles never change intent: skip their keys. A tunnel
        // address's handle is part of its node's intent; the config carries
        // the VXLAN settings.
        let keys: BTreeSet<_> = mutations
            .iter()
            .flat_map(|m| m.ops.iter())
            .filter(|o| match o {
                Op::PutHandle(h, _) | Op::DeleteHandle(h) => {
                    crate::ipam::tunnel_handle_node(h).is_some()
                }
                _ => true,
            })
            .map(|o| o.key())
            .collect();
        // The delta is known before the write, so that the batch can carry
        // the store's intent mark atomically. This thread is the store's only
        // writer: the group ends at this revision.
        let last = store.revision_after(&mutations);
        let delta = if keys.is_empty() {
            None
        } else {
            state.intent.on_commit(&state.ipam, last, &keys)
        };
        match store.write_marked(&mutations, delta.is_some()) {
            Ok((revs, written)) => {
                let delta = if revs.last() == Some(&last) {
                    delta.map(|e| (state.intent.sender(), e))
                } else {
                    // Someone else wrote the store: the delta carries a wrong
                    // revision. Drop it and the tracker; watchers reconnect
                    // and get snapshots.
                    tracing::error!(
                        ?revs,
                        predicted = last,
                        "store revision out of step; watchers resync"
                    );
                    state.intent = IntentTracker::new(&state.ipam, store.revision()).resumable(
                        store.id(),
                        store.epochs(),
                        0,
                    );
                    None
                };
                // Readers get the state after this group once it is
                // durable: a clone of persistent maps, about nothing.
                let changed = mutations.iter().any(|m| !m.is_empty());
                let snap = changed.then(|| (Arc::new(state.ipam.clone()), last));
                let answers = finishes.drain(..).zip(revs).collect();
                if ctx
                    .send(Flight {
                        written,
                        view: snap,
                        answers,
                        delta,
                    })
                    .is_err()
                {
                    // The committer stopped and reported why: this group is
                    // never answered.
                    return join(committer, COMMITTER);
                }
            }
            Err(e) => {
                let e = Error::Store(e);
                tracing::error!(error = %e, jobs = finishes.len(), "group write failed; reloading state from the store");
                for f in finishes.drain(..) {
                    f(Err(&e));
                }
                // Memory ran ahead of the store: go back to what it holds.
                // Watchers reconnect (their feed closes) and resume from it.
                match Owned::load(&store) {
                    Ok(s) => {
                        state = s;
                        view.publish(Arc::new(state.ipam.clone()), store.revision());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot reload the store; the controller stops");
                        // Groups written before the failure are still
                        // answered once durable.
                        drop(ctx);
                        join(committer, COMMITTER)?;
                        return Err(e);
                    }
                }
            }
        }
        mutations.clear();
    }
    drop(ctx);
    join(committer, COMMITTER)?;
    if let Err(e) = store.flush() {
        tracing::error!(error = %e, "final flush failed");
    }
    // Freeing a large state is millions of small frees (1.8 s at 550,000
    // allocations): do it on a thread of its own, which a process that
    // exits next does not wait for.
    let _ = thread::Builder::new()
        .name("ipam-free".into())
        .spawn(move || drop(state));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::tests::pool;
    use std::time::Duration;

    /// No caller hears of a change, and no watcher sees it, before the flush
    /// that makes it durable has run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_answered_before_its_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (open_tx, open_rx) = std::sync::mpsc::channel::<()>();
        let (ipam, owner) = Ipam::start_with(
            store,
            Some(Box::new(move || {
                let _ = open_rx.recv();
            })),
        )
        .unwrap();
        // The watch itself goes through one commit: let that one flush run.
        open_tx.send(()).unwrap();
        let mut watch = ipam.watch(0, None).await.unwrap();
        let pool = pool("p", "10.0.0.0/16", 26);
        let i2 = ipam.clone();
        let call = tokio::spawn(async move { i2.call(move |s| s.create_pool(pool)).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!call.is_finished(), "answered before the flush ran");
        assert!(
            watch.live.try_recv().is_err(),
            "delta broadcast before the flush ran"
        );
        // Readers do not wait for the flush, and do not see the change yet.
        let (pools, _) = tokio::time::timeout(Duration::from_secs(1), ipam.read(|s| s.pools()))
            .await
            .expect("a read does not wait for a flush")
            .unwrap();
        assert!(pools.is_empty(), "read before the flush ran: {pools:?}");
        open_tx.send(()).unwrap();
        let (created, rev) = call.await.unwrap().unwrap();
        assert_eq!(created.name, "p");
        assert!(rev > 0);
        // Once answered, it is in what readers see, at its revision.
        let (pools, read_rev) = ipam.read(|s| s.pools()).await.unwrap();
        assert_eq!(pools.len(), 1, "read after the answer");
        assert!(read_rev >= rev);
        tokio::time::timeout(Duration::from_secs(5), watch.live.recv())
            .await
            .expect("delta after the flush")
            .expect("delta");
        drop(open_tx);
        drop((ipam, watch));
        owner.join().unwrap();
    }

    /// Starts an owner whose committer panics at its first flush, and makes
    /// one call, which must not be acknowledged.
    async fn dying_committer() -> (Ipam, OwnerThread, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (ipam, owner) = Ipam::start_with(store, Some(Box::new(|| panic!("injected")))).unwrap();
        let r = ipam
            .call(|s| s.create_pool(pool("p", "10.0.0.0/16", 26)))
            .await;
        assert!(matches!(r, Err(Error::Unavailable)), "{r:?}");
        (ipam, owner, dir)
    }

    /// The walks of the whole state, the admin reads' and the metrics
    /// scrape's, run on the admin read thread (nicer than pod starts'),
    /// at the revision of the published state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heavy_reads_and_the_metrics_walk_run_on_the_admin_read_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (ipam, owner) = Ipam::start(store).unwrap();
        let (_, rev) = ipam
            .call(|s| s.create_pool(pool("p", "10.0.0.0/16", 26)))
            .await
            .unwrap();
        let name = || std::thread::current().name().map(String::from);
        let (on, _) = ipam.read_heavy(move |_| name()).await.unwrap();
        assert_eq!(on.as_deref(), Some("tabby-admin-read"), "read_heavy");
        let (on, seen) = ipam
            .reader()
            .read_heavy(move |s, r| (name(), (s.pools().len(), r)))
            .await
            .unwrap();
        assert_eq!(
            on.as_deref(),
            Some("tabby-admin-read"),
            "Reader::read_heavy"
        );
        assert_eq!(seen, (1, rev));
        drop(ipam);
        owner.join().unwrap();
    }

    /// A thread that dies is reported at once to whoever watches `failed`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_committer_is_reported() {
        let (ipam, mut owner, _dir) = dying_committer().await;
        let e = tokio::time::timeout(Duration::from_secs(5), owner.failed())
            .await
            .expect("the failure is reported");
        assert!(e.to_string().contains("ipam-commit panicked"), "{e}");
        drop(ipam);
        tokio::task::spawn_blocking(move || owner.join())
            .await
            .unwrap()
            .unwrap();
    }

    /// Unless `failed` took it, `join` returns the failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn join_returns_the_failure() {
        let (ipam, owner, _dir) = dying_committer().await;
        drop(ipam);
        let r = tokio::task::spawn_blocking(move || owner.join())
            .await
            .unwrap();
        assert!(
            matches!(&r, Err(Error::Internal(m)) if m.contains("ipam-commit panicked")),
            "{r:?}"
        );
    }
}
