//! The node client's long-running parts: registration and the intent watch
//! (async, on tokio), and the reconciler (one dedicated OS thread that owns
//! the intent, the route table and nftables, and plans then applies; the
//! watch and the route monitor run on that thread's own runtime, so an
//! update is read, applied and its echo dropped in one wake-up).
use crate::controller::{is_unavailable, Controller};
pub use crate::reconciler::{EchoFilter, Event, Reconciler, Sysctl, Timers};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tabby_proto::v1 as pb;
use tabby_runtime::Backoff;

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
    /// The smallest MTU of the tunnel devices in use (an overlay pool
    /// exists): new pods get no larger an MTU, so their packets fit the
    /// tunnel. Existing pods keep theirs.
    pub tunnel_mtu: Option<u32>,
    /// The BGP sessions this node holds itself, by peer.
    pub bgp: std::collections::BTreeMap<std::net::IpAddr, crate::bgp::SessionState>,
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
pub(crate) fn lock_resume(r: &SharedResume) -> std::sync::MutexGuard<'_, Resume> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks the status (a poisoned lock still holds valid data).
pub fn lock_status(s: &SharedStatus) -> std::sync::MutexGuard<'_, NodeStatus> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Backoff for reconnects: 100 ms doubling to 5 s, ±25 % jitter so that
/// nodes cut off together do not reconnect in step.
fn reconnect_backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5)).with_jitter(0.25)
}

/// Registers this node, retrying until it works or `stop` is set.
pub async fn register(ctl: &Controller, node: pb::Node, status: &SharedStatus, stop: &AtomicBool) {
    let mut backoff = reconnect_backoff();
    // Moves to another replica without waiting, once round the list.
    let mut hops = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut agent = ctl.agent();
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
                // Another replica may lead: try it at once.
                if ctl.failed(&e) && hops < ctl.replicas() {
                    hops += 1;
                    continue;
                }
                hops = 0;
                let d = backoff.next_delay();
                tracing::warn!(error = %e.message(), code = ?e.code(), controller = %ctl.address(), retry_in = ?d, "registration failed");
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
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
    resume: SharedResume,
    status: SharedStatus,
    stop: Arc<AtomicBool>,
    snapshots: Arc<tokio::sync::Notify>,
) {
    let mut backoff = reconnect_backoff();
    let mut hops = 0;
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
        let mut client = ctl.intent();
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
                tracing::info!(since, controller = %ctl.address(), "intent watch connected");
                backoff.reset();
                hops = 0;
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
                            // A leader that stepped down or died: the
                            // next try goes to another replica.
                            ctl.failed(&e);
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), code = ?e.code(), unavailable = is_unavailable(&e), controller = %ctl.address(), "intent watch failed");
                if ctl.failed(&e) && hops < ctl.replicas() {
                    hops += 1;
                    lock_status(&status).watching = false;
                    continue;
                }
            }
        }
        lock_status(&status).watching = false;
        let d = backoff.next_delay();
        tokio::time::sleep(d).await;
    }
}

/// This node's registration record.
pub fn node_record(
    name: &str,
    addresses: &[ipnet::IpNet],
    labels: &[(String, String)],
) -> pb::Node {
    pb::Node {
        name: name.to_string(),
        addresses: addresses.iter().map(ToString::to_string).collect(),
        labels: labels.iter().cloned().collect(),
        ..Default::default()
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
