//! The node client's long-running parts: registration and the intent watch
//! (async, on tokio), and the reconciler (one dedicated OS thread that owns
//! the intent, the route table and nftables, and plans then applies).
use crate::{
    controller::{is_unavailable, Controller},
    kernel::RouteTable,
    nft::{NatSets, Nft},
    plan::{self, Desired, Intent},
    Result,
};
use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tabby_proto::v1 as pb;
use tabby_runtime::Backoff;

/// What the reconciler reacts to.
#[derive(Debug)]
pub enum Event {
    /// An intent update from the stream.
    Update(Box<pb::IntentUpdate>),
    /// Something may have changed under us (a tabby route was deleted).
    Poke,
    /// Stop the reconciler.
    Shutdown,
}

/// Observable state of this node client (health, Status RPC, logs).
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    /// Registered with the controller at least once.
    pub registered: bool,
    /// The intent stream is up right now.
    pub watching: bool,
    /// A full snapshot has been applied since start.
    pub synced: bool,
    /// Revision of the intent applied.
    pub revision: u64,
    /// tabby routes installed after the last reconcile.
    pub routes: usize,
    /// Pools whose encapsulation is not applied (reported, not programmed).
    pub unsupported: Vec<String>,
    /// Last reconcile error, if the last reconcile failed somewhere.
    pub last_error: Option<String>,
    /// When the controller last answered anything.
    pub controller_seen: Option<Instant>,
}

/// Shared status.
pub type SharedStatus = Arc<Mutex<NodeStatus>>;

/// Where the intent watch resumes: the last revision applied, of which
/// controller store and epoch (revision 0: ask for a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// Last applied revision.
    pub revision: u64,
    /// `store_id` of the last snapshot applied.
    pub store_id: String,
    /// `epoch` of the update that brought it to `revision`.
    pub epoch: String,
    /// An update could not be applied: the intent is suspect until the next
    /// snapshot, and the watch reconnects for one.
    pub resync: bool,
}

impl Resume {
    /// Records the outcome of applying `u`. After a bad update only a
    /// snapshot moves the resume point off 0 again.
    pub fn record(&mut self, u: &pb::IntentUpdate, applied: bool) {
        if !applied {
            self.revision = 0;
            self.resync = true;
            return;
        }
        if u.snapshot {
            self.resync = false;
            self.store_id.clone_from(&u.store_id);
        }
        if !self.resync {
            self.revision = u.revision;
            self.epoch.clone_from(&u.epoch);
        }
    }
}

/// The resume point, written by the reconciler and read by the watch.
pub type SharedResume = Arc<Mutex<Resume>>;

/// Locks the resume point (a poisoned lock still holds valid data).
fn lock_resume(r: &SharedResume) -> std::sync::MutexGuard<'_, Resume> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks the status (a poisoned lock still holds valid data).
pub fn lock_status(s: &SharedStatus) -> std::sync::MutexGuard<'_, NodeStatus> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every how many reconcile passes the nftables tables are compared with
/// what tabby last wrote.
const NFT_VERIFY_EVERY: u64 = 3;

/// Kernel knobs the reconciler sets. Abstracted so tests can run it in a netns.
pub trait Sysctl: Send {
    /// Writes `/proc/sys/<path>`.
    fn set(&mut self, path: &str, value: &str) -> Result<()>;
}

/// The reconciler: owns intent and kernel programming.
pub struct Reconciler<T: RouteTable> {
    /// This node's name.
    pub me: String,
    /// tabby's routes.
    pub table: T,
    /// nftables.
    pub nft: Nft,
    /// Sysctls.
    pub sysctl: Box<dyn Sysctl>,
    /// Shared status.
    pub status: SharedStatus,
    /// Where the watch resumes.
    pub resume: SharedResume,
    intent: Intent,
    have_intent: bool,
    synced: bool,
    nat_applied: Option<(NatSets, NatSets)>,
    /// `nft list table <family> tabby` right after our last write, per family.
    /// None: the listing failed, which counts as drift.
    nat_listing: Vec<(&'static str, Option<String>)>,
    passes: u64,
    v6_forwarding: bool,
}

impl<T: RouteTable> Reconciler<T> {
    /// A reconciler that has applied nothing yet.
    pub fn new(
        me: String,
        table: T,
        nft: Nft,
        sysctl: Box<dyn Sysctl>,
        status: SharedStatus,
        resume: SharedResume,
    ) -> Self {
        Reconciler {
            me,
            table,
            nft,
            sysctl,
            status,
            resume,
            intent: Intent::default(),
            have_intent: false,
            synced: false,
            nat_applied: None,
            nat_listing: Vec::new(),
            passes: 0,
            v6_forwarding: false,
        }
    }

    /// Runs until [`Event::Shutdown`] or the sender is gone. Reconciles on
    /// every batch of events and every `interval` (restoring routes deleted
    /// by hand even without a monitor event).
    pub fn run(mut self, rx: mpsc::Receiver<Event>, interval: Duration) {
        if let Err(e) = self.sysctl.set("net/ipv4/ip_forward", "1") {
            tracing::error!(error = %e, "cannot enable ip_forward");
        }
        loop {
            let first = match rx.recv_timeout(interval) {
                Ok(ev) => Some(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut events: Vec<Event> = first.into_iter().collect();
            events.extend(rx.try_iter());
            for ev in events {
                match ev {
                    Event::Shutdown => return,
                    Event::Poke => {}
                    Event::Update(u) => self.take_update(&u),
                }
            }
            if self.have_intent {
                self.reconcile();
            }
        }
    }

    fn take_update(&mut self, u: &pb::IntentUpdate) {
        match plan::intent_delta(u) {
            Ok(delta) => {
                self.intent.apply(delta);
                self.have_intent = true;
                if u.snapshot && !self.synced {
                    tracing::info!(revision = u.revision, "first full intent sync");
                    self.synced = true;
                }
                lock_resume(&self.resume).record(u, true);
            }
            Err(e) => {
                // The watch reconnects and asks for a snapshot.
                tracing::error!(error = %e, "bad intent update ignored; will resync");
                lock_resume(&self.resume).record(u, false);
            }
        }
    }

    /// One plan-then-apply pass.
    pub fn reconcile(&mut self) {
        let d: Desired = plan::desired(&self.intent, &self.me);
        let mut errors = Vec::new();
        let actual = match self.table.list() {
            Ok(a) => a,
            Err(e) => {
                self.finish(&d, 0, vec![format!("listing routes: {e}")]);
                return;
            }
        };
        let p = plan::plan_routes(&d.routes, &actual, self.synced);
        if !p.is_empty() {
            let rep = plan::apply_plan(&mut self.table, &p);
            tracing::info!(
                added = p.add.len(),
                deleted = p.del.len(),
                failed = rep.failed.len(),
                revision = self.intent.revision,
                "routes reconciled"
            );
            for (r, e) in rep.failed {
                errors.push(format!("{r}: {e}"));
            }
        }
        let nat = (d.nat_v4.clone(), d.nat_v6.clone());
        // Someone may have deleted or edited our tables: compare them with
        // what we wrote every few passes (a process spawn, so not every pass)
        // and rewrite them when they differ.
        self.passes += 1;
        if self.passes.is_multiple_of(NFT_VERIFY_EVERY) && self.nat_applied.is_some() {
            if let Some(family) = self.nat_drift() {
                tracing::warn!(
                    family,
                    "table {family} tabby is not what tabby wrote (deleted or edited by hand); rewriting it"
                );
                self.nat_applied = None;
            }
        }
        if self.nat_applied.as_ref() != Some(&nat) {
            let mut ok = true;
            let mut written = vec!["ip"];
            if let Err(e) = self.nft.sync("ip", &d.nat_v4) {
                errors.push(e.to_string());
                ok = false;
            }
            // An ip6 table we wrote stays ours to keep right, also once its
            // pools are gone (then it is written empty).
            let had_v6 = self.nat_listing.iter().any(|(f, _)| *f == "ip6");
            if d.ipv6 || had_v6 {
                written.push("ip6");
                if let Err(e) = self.nft.sync("ip6", &d.nat_v6) {
                    errors.push(e.to_string());
                    ok = false;
                }
            }
            if ok {
                self.nat_listing = written
                    .into_iter()
                    .map(|f| (f, self.nft.list(f).ok()))
                    .collect();
                tracing::info!(masq = ?d.nat_v4.masq, all = ?d.nat_v4.all, "nftables table ip tabby updated");
                self.nat_applied = Some(nat);
            }
        }
        if d.ipv6 && !self.v6_forwarding {
            match self.sysctl.set("net/ipv6/conf/all/forwarding", "1") {
                Ok(()) => self.v6_forwarding = true,
                Err(e) => errors.push(e.to_string()),
            }
        }
        self.finish(&d, d.routes.len(), errors);
    }

    /// The first family whose table no longer lists as it did after our
    /// last write.
    fn nat_drift(&self) -> Option<&'static str> {
        self.nat_listing
            .iter()
            .find(|(f, want)| want.is_none() || self.nft.list(f).ok() != *want)
            .map(|(f, _)| *f)
    }

    fn finish(&mut self, d: &Desired, routes: usize, errors: Vec<String>) {
        let mut st = lock_status(&self.status);
        if st.unsupported != d.unsupported {
            for u in &d.unsupported {
                tracing::warn!("{u}");
            }
        }
        st.synced = self.synced;
        st.revision = self.intent.revision;
        st.routes = routes;
        st.unsupported = d.unsupported.clone();
        if !errors.is_empty() {
            tracing::warn!(errors = ?errors, "reconcile incomplete; retrying at the next pass");
        }
        st.last_error = (!errors.is_empty()).then(|| errors.join("; "));
    }
}

/// Backoff for reconnects: 100 ms doubling to 5 s, ±25 % jitter so that
/// nodes cut off together do not reconnect in step.
fn reconnect_backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5)).with_jitter(0.25)
}

/// Registers this node, retrying until it works or `stop` is set.
pub async fn register(ctl: &Controller, node: pb::Node, status: &SharedStatus, stop: &AtomicBool) {
    let mut backoff = reconnect_backoff();
    while !stop.load(Ordering::Relaxed) {
        let mut agent = ctl.agent.clone();
        match agent
            .register_node(pb::RegisterNodeRequest {
                node: Some(node.clone()),
            })
            .await
        {
            Ok(r) => {
                tracing::info!(node = %node.name, addresses = ?node.addresses, revision = r.get_ref().revision, "registered with the controller");
                let mut st = lock_status(status);
                st.registered = true;
                st.controller_seen = Some(Instant::now());
                return;
            }
            Err(e) => {
                let d = backoff.next_delay();
                tracing::warn!(error = %e.message(), code = ?e.code(), retry_in = ?d, "registration failed");
                tokio::time::sleep(d).await;
            }
        }
    }
}

/// Watches intent forever: reconnects with backoff and jitter, resuming from
/// the last applied revision. Never removes anything while disconnected.
pub async fn watch(
    ctl: Controller,
    node: pb::Node,
    tx: mpsc::Sender<Event>,
    resume: SharedResume,
    status: SharedStatus,
    stop: Arc<AtomicBool>,
    snapshots: Arc<tokio::sync::Notify>,
) {
    let mut backoff = reconnect_backoff();
    while !stop.load(Ordering::Relaxed) {
        // Register before every watch: cheap when unchanged, and a restarted
        // controller with a fresh store learns about us again.
        register(&ctl, node.clone(), &status, &stop).await;
        let Resume {
            revision: since,
            store_id,
            epoch,
            ..
        } = lock_resume(&resume).clone();
        let mut client = ctl.intent.clone();
        match client
            .watch(pb::WatchRequest {
                since_revision: since,
                store_id,
                epoch,
            })
            .await
        {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                {
                    let mut st = lock_status(&status);
                    st.watching = true;
                    st.controller_seen = Some(Instant::now());
                }
                tracing::info!(since, "intent watch connected");
                backoff.reset();
                loop {
                    match stream.message().await {
                        Ok(Some(u)) => {
                            lock_status(&status).controller_seen = Some(Instant::now());
                            if !u.snapshot && lock_resume(&resume).resync {
                                tracing::warn!("intent needs a snapshot: reconnecting");
                                break;
                            }
                            let snapshot = u.snapshot;
                            if tx.send(Event::Update(Box::new(u))).is_err() {
                                return;
                            }
                            if snapshot {
                                snapshots.notify_one();
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("intent stream ended by the controller");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e.message(), "intent stream broken");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), code = ?e.code(), unavailable = is_unavailable(&e), "intent watch failed");
            }
        }
        lock_status(&status).watching = false;
        let d = backoff.next_delay();
        tokio::time::sleep(d).await;
    }
}

/// This node's registration record.
pub fn node_record(name: &str, addresses: &[IpAddr], labels: &[(String, String)]) -> pb::Node {
    pb::Node {
        name: name.to_string(),
        addresses: addresses.iter().map(ToString::to_string).collect(),
        labels: labels.iter().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(revision: u64, snapshot: bool) -> pb::IntentUpdate {
        pb::IntentUpdate {
            revision,
            snapshot,
            store_id: if snapshot { "s1".into() } else { String::new() },
            epoch: format!("e{}", revision / 100),
            ..Default::default()
        }
    }

    /// The resume point names the epoch of the update that brought it to its
    /// revision: a delta from a restarted controller moves it on.
    #[test]
    fn the_resume_point_follows_the_epoch_of_each_update() {
        let mut r = Resume::default();
        r.record(&update(5, true), true);
        assert_eq!((r.revision, r.epoch.as_str()), (5, "e0"));
        r.record(&update(150, false), true);
        assert_eq!((r.revision, r.epoch.as_str()), (150, "e1"));
        r.record(&update(250, false), false);
        r.record(&update(260, false), true);
        assert_eq!(r.revision, 0, "held at 0 until a snapshot");
        r.record(&update(300, true), true);
        assert_eq!(
            (r.revision, r.store_id.as_str(), r.epoch.as_str()),
            (300, "s1", "e3")
        );
    }

    /// After an update that could not be applied, later deltas do not move
    /// the resume point off 0: only a snapshot does.
    #[test]
    fn a_bad_update_holds_the_resume_point_until_a_snapshot() {
        let mut r = Resume::default();
        r.record(&update(5, true), true);
        r.record(&update(6, false), true);
        assert_eq!(
            (r.revision, r.store_id.as_str(), r.resync),
            (6, "s1", false)
        );
        r.record(&update(7, false), false);
        r.record(&update(8, false), true);
        assert_eq!(
            (r.revision, r.resync),
            (0, true),
            "still waiting for a snapshot"
        );
        r.record(&update(9, true), true);
        r.record(&update(10, false), true);
        assert_eq!((r.revision, r.resync), (10, false));
    }
}
