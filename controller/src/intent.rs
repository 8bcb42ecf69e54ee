//! The intent stream: what every node client needs to program its routes and
//! NAT, as a snapshot plus deltas stamped with store revisions.
//!
//! [`IntentTracker`] lives on the IPAM owner thread. After each group commit
//! it compares the keys the commit touched against its view, encodes one
//! delta (once, for every watcher) and broadcasts it. Watchers that fall
//! behind the bounded broadcast buffer are resynchronised from the tracker's
//! ring of recent deltas, or with a fresh snapshot.
use crate::{
    convert::{intent_block, intent_pool, node_pb},
    ipam::tunnel_handle_node,
    ipam::IpamState,
};
use prost::Message;
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    sync::Arc,
};
use tabby_proto::v1 as pb;
use tabby_store::{Epoch, Key};
use tokio::sync::broadcast;

/// Deltas kept for watchers that resume with a recent revision.
pub const RING: usize = 4096;
/// Deltas buffered per watcher before it is resynchronised.
pub const WATCH_BUFFER: usize = 1024;

/// One update, encoded once and shared by every watcher.
#[derive(Debug)]
pub struct Encoded {
    /// Revision the update brings a client to.
    pub revision: u64,
    /// A full snapshot, not a delta.
    pub snapshot: bool,
    /// An empty delta that tells a resuming watcher it is up to date at
    /// `revision`, in the current epoch: sent even when that is the revision
    /// it already has, so that it learns the epoch.
    pub caught_up: bool,
    /// The encoded `IntentUpdate`.
    pub bytes: bytes::Bytes,
}

/// A prost message that is already encoded: encoding it copies its bytes.
/// Lets tonic send one shared encoding to thousands of streams.
#[derive(Debug, Clone, Default)]
pub struct PreEncoded(pub bytes::Bytes);

impl Message for PreEncoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Send-only: nothing decodes into it, but stay well-formed.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct View {
    blocks: BTreeMap<String, pb::IntentBlock>,
    borrowed: BTreeMap<IpAddr, String>,
    pools: Vec<pb::IntentPool>,
    nodes: BTreeMap<String, pb::Node>,
    vxlan: pb::IntentVxlan,
    /// The BGP configuration the generation stands for.
    bgp: tabby_store::BgpConfig,
    /// Changes with the BGP configuration. It starts from a random value, so
    /// that a node resuming across a controller restart sees a change made
    /// meanwhile as a new value.
    bgp_generation: u64,
}

/// A nonzero start for the BGP generation, different in every process.
fn first_generation() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    // splitmix64's finaliser spreads nearby start times apart.
    let mut z = t.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

fn intent_vxlan(s: &IpamState) -> pb::IntentVxlan {
    let v = crate::convert::vxlan_settings(&s.config());
    pb::IntentVxlan {
        vni: v.vni,
        port: u32::from(v.port),
    }
}

fn borrowed_holder(s: &IpamState, a: IpAddr) -> Option<String> {
    s.allocation_of(a).filter(|v| v.borrowed()).map(|v| v.node)
}

impl View {
    fn of(s: &IpamState) -> View {
        View {
            blocks: s
                .blocks()
                .map(|b| (b.cidr.to_string(), intent_block(b)))
                .collect(),
            borrowed: s
                .borrowed_addresses()
                .map(|(a, n)| (a, n.to_string()))
                .collect(),
            pools: s.pools().iter().map(intent_pool).collect(),
            nodes: s
                .nodes()
                .iter()
                .map(|n| (n.name.clone(), node_pb(s, n)))
                .collect(),
            vxlan: intent_vxlan(s),
            bgp: s.bgp().clone(),
            bgp_generation: first_generation(),
        }
    }

    fn snapshot(&self, revision: u64) -> pb::IntentUpdate {
        pb::IntentUpdate {
            revision,
            snapshot: true,
            blocks: self.blocks.values().cloned().collect(),
            borrowed: self
                .borrowed
                .iter()
                .map(|(a, n)| pb::IntentBorrowed {
                    address: a.to_string(),
                    node: n.clone(),
                })
                .collect(),
            pools: self.pools.clone(),
            pools_changed: true,
            nodes: self.nodes.values().cloned().collect(),
            vxlan: Some(self.vxlan),
            bgp_generation: self.bgp_generation,
            ..Default::default()
        }
    }

    fn update_node(&mut self, s: &IpamState, n: &str, d: &mut pb::IntentUpdate) {
        match s.node(n).map(|x| node_pb(s, x)) {
            Some(pn) if self.nodes.get(n) != Some(&pn) => {
                self.nodes.insert(n.to_string(), pn.clone());
                // Twice in one delta (record and tunnel address): once.
                d.nodes.retain(|x| x.name != n);
                d.nodes.push(pn);
            }
            None if self.nodes.remove(n).is_some() => d.removed_nodes.push(n.to_string()),
            _ => {}
        }
    }

    /// Brings the view up to `s` for `keys`; returns the delta, if any.
    fn update(&mut self, s: &IpamState, keys: &BTreeSet<Key>) -> Option<pb::IntentUpdate> {
        let mut d = pb::IntentUpdate::default();
        let mut pools_touched = false;
        for k in keys {
            match k {
                Key::Block(c) => {
                    let ck = c.to_string();
                    match s.block(c).map(intent_block) {
                        Some(b) if self.blocks.get(&ck) != Some(&b) => {
                            self.blocks.insert(ck, b.clone());
                            d.blocks.push(b);
                        }
                        None if self.blocks.remove(&ck).is_some() => d.removed_blocks.push(ck),
                        _ => {}
                    }
                }
                Key::Address(a) => match borrowed_holder(s, *a) {
                    Some(n) if self.borrowed.get(a) != Some(&n) => {
                        self.borrowed.insert(*a, n.clone());
                        d.borrowed.push(pb::IntentBorrowed {
                            address: a.to_string(),
                            node: n,
                        });
                    }
                    None if self.borrowed.remove(a).is_some() => {
                        d.removed_borrowed.push(a.to_string())
                    }
                    _ => {}
                },
                Key::Pool(_) => pools_touched = true,
                Key::Node(n) => self.update_node(s, n, &mut d),
                // A tunnel address is part of its node's record here.
                Key::Handle(h) => {
                    if let Some(n) = tunnel_handle_node(h) {
                        self.update_node(s, n, &mut d);
                    }
                }
                Key::Bgp => {
                    if *s.bgp() != self.bgp {
                        self.bgp = s.bgp().clone();
                        self.bgp_generation = self.bgp_generation.wrapping_add(1).max(1);
                        d.bgp_generation = self.bgp_generation;
                    }
                }
                Key::Config => {
                    let v = intent_vxlan(s);
                    if v != self.vxlan {
                        self.vxlan = v;
                        d.vxlan = Some(v);
                    }
                }
            }
        }
        if pools_touched {
            let pools: Vec<pb::IntentPool> = s.pools().iter().map(intent_pool).collect();
            if pools != self.pools {
                self.pools = pools.clone();
                d.pools = pools;
                d.pools_changed = true;
            }
        }
        (d != pb::IntentUpdate::default()).then_some(d)
    }
}

/// Keeps the streamed view, the ring of recent deltas and the broadcast.
pub struct IntentTracker {
    view: View,
    revision: u64,
    /// The store's identity: resumes are honoured only for it.
    store_id: String,
    /// The store's epochs, oldest first; the last is the current one, which
    /// every update carries.
    epochs: Vec<Epoch>,
    ring: VecDeque<Arc<Encoded>>,
    /// Every intent change after this revision is in the ring.
    ring_base: u64,
    snapshot: Option<Arc<Encoded>>,
    tx: broadcast::Sender<Arc<Encoded>>,
}

/// Where a resuming watcher's revisions come from.
#[derive(Debug, Clone, Default)]
pub struct ResumeFrom {
    /// The store's id, from the last snapshot the watcher applied.
    pub store_id: String,
    /// The epoch of the last update it applied.
    pub epoch: String,
}

/// How a watcher starts: updates to send first, then the live feed.
pub struct WatchStart {
    /// Snapshot, or the deltas after the requested revision.
    pub initial: Vec<Arc<Encoded>>,
    /// Live updates after those.
    pub live: broadcast::Receiver<Arc<Encoded>>,
}

impl IntentTracker {
    /// Starts from the current state at `revision`.
    pub fn new(s: &IpamState, revision: u64) -> IntentTracker {
        let (tx, _) = broadcast::channel(WATCH_BUFFER);
        IntentTracker {
            view: View::of(s),
            revision,
            store_id: String::new(),
            epochs: Vec::new(),
            ring: VecDeque::new(),
            ring_base: revision,
            snapshot: None,
            tx,
        }
    }

    /// Lets watchers of store `store_id` resume across a restart: nothing
    /// changed the intent after `unchanged_since` (the store's intent mark),
    /// so a watcher that has applied that revision or a later one, in an
    /// epoch of `epochs` and not past that epoch's end, needs nothing, not a
    /// snapshot.
    pub fn resumable(
        mut self,
        store_id: &str,
        epochs: &[Epoch],
        unchanged_since: u64,
    ) -> IntentTracker {
        self.store_id = store_id.to_string();
        self.epochs = epochs.to_vec();
        if unchanged_since > 0 && unchanged_since <= self.revision {
            self.ring_base = unchanged_since;
        }
        self
    }

    /// Records a written group: `revision` is its last revision, `keys`
    /// everything it touched. Returns the delta when the intent changed; the
    /// caller broadcasts it (through [`IntentTracker::sender`]) once the group
    /// is durable.
    pub fn on_commit(
        &mut self,
        s: &IpamState,
        revision: u64,
        keys: &BTreeSet<Key>,
    ) -> Option<Arc<Encoded>> {
        self.revision = revision;
        let mut d = self.view.update(s, keys)?;
        d.revision = revision;
        d.epoch = self.epoch().to_string();
        d.commit_unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX));
        let e = Arc::new(Encoded {
            revision,
            snapshot: false,
            caught_up: false,
            bytes: d.encode_to_vec().into(),
        });
        self.snapshot = None;
        if self.ring.len() == RING {
            if let Some(old) = self.ring.pop_front() {
                self.ring_base = old.revision;
            }
        }
        self.ring.push_back(e.clone());
        Some(e)
    }

    /// The live feed's sender, for broadcasting what [`IntentTracker::on_commit`] returned.
    pub fn sender(&self) -> broadcast::Sender<Arc<Encoded>> {
        self.tx.clone()
    }

    fn snapshot(&mut self) -> Arc<Encoded> {
        if let Some(s) = &self.snapshot {
            return s.clone();
        }
        let s = Arc::new(Encoded {
            revision: self.revision,
            snapshot: true,
            caught_up: false,
            bytes: pb::IntentUpdate {
                store_id: self.store_id.clone(),
                epoch: self.epoch().to_string(),
                ..self.view.snapshot(self.revision)
            }
            .encode_to_vec()
            .into(),
        });
        self.snapshot = Some(s.clone());
        s
    }

    /// The current epoch's id (empty before [`IntentTracker::resumable`]).
    fn epoch(&self) -> &str {
        self.epochs.last().map_or("", |e| e.id.as_str())
    }

    /// Whether revision `since`, applied under epoch `epoch`, belongs to this
    /// store's history: the epoch is known and `since` is not past its end
    /// (the next epoch's start).
    fn in_history(&self, epoch: &str, since: u64) -> bool {
        match self.epochs.iter().position(|e| e.id == epoch) {
            None => false,
            Some(i) => self
                .epochs
                .get(i + 1)
                .is_none_or(|next| since <= next.start),
        }
    }

    /// Starts a watcher that has applied everything up to `since` (0: nothing)
    /// of the history `from` (None: this tracker's, for the controller's own
    /// resynchronisation).
    pub fn watch(&mut self, since: u64, from: Option<&ResumeFrom>) -> WatchStart {
        let live = self.tx.subscribe();
        let since = match from {
            Some(f) if f.store_id != self.store_id || !self.in_history(&f.epoch, since) => 0,
            _ => since,
        };
        let mut initial = if since > 0 && since == self.revision {
            Vec::new()
        } else if since > 0 && since >= self.ring_base && since < self.revision {
            self.ring
                .iter()
                .filter(|e| e.revision > since)
                .cloned()
                .collect()
        } else {
            vec![self.snapshot()]
        };
        if initial.is_empty() {
            // Nothing changed the intent after `since`: the watcher is up to
            // date at this revision. Saying so moves it to this epoch, so
            // that epochs of restarts without intent changes do not pile up
            // under it (an epoch dropped from the store costs a snapshot).
            initial.push(Arc::new(Encoded {
                revision: self.revision,
                snapshot: false,
                caught_up: true,
                bytes: pb::IntentUpdate {
                    revision: self.revision,
                    epoch: self.epoch().to_string(),
                    ..Default::default()
                }
                .encode_to_vec()
                .into(),
            }));
        }
        WatchStart { initial, live }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{tests::pool, AssignRequest};
    use tabby_store::{Mutation, Node};

    fn keys(m: &Mutation) -> BTreeSet<Key> {
        m.ops.iter().map(|o| o.key()).collect()
    }

    fn decode(e: &Encoded) -> pb::IntentUpdate {
        pb::IntentUpdate::decode(e.bytes.clone()).unwrap()
    }

    #[test]
    fn deltas_only_for_route_relevant_changes_and_resume() {
        let mut s = IpamState::default();
        let mut t = IntentTracker::new(&s, 0);
        let mut rev = 0;
        let mut step = |s: &mut IpamState, t: &mut IntentTracker, m: Mutation| {
            rev += 1;
            if let Some(e) = t.on_commit(s, rev, &keys(&m)) {
                let _ = t.sender().send(e);
            }
        };
        let (_, m) = s.create_pool(pool("p", "10.0.0.0/24", 30)).unwrap();
        step(&mut s, &mut t, m);
        for n in ["a", "b"] {
            let (_, m) = s
                .register_node(Node {
                    name: n.into(),
                    addresses: vec!["172.18.0.2".parse().unwrap()],
                    ..Default::default()
                })
                .unwrap();
            step(&mut s, &mut t, m);
        }
        let mut live = t.watch(0, None);
        assert_eq!(decode(&live.initial[0]).nodes.len(), 2);
        let assign = |s: &mut IpamState, n: &str, h: &str| {
            s.assign(
                n,
                AssignRequest {
                    handle: h.into(),
                    ..Default::default()
                },
            )
            .unwrap()
            .1
        };
        // First assignment claims a block: a delta. Second one does not.
        let m = assign(&mut s, "a", "h1");
        step(&mut s, &mut t, m);
        let d = decode(&live.live.try_recv().unwrap());
        assert_eq!(d.blocks.len(), 1);
        assert_eq!(d.revision, 4);
        let m = assign(&mut s, "a", "h2");
        step(&mut s, &mut t, m);
        assert!(
            live.live.try_recv().is_err(),
            "no delta for a plain assignment"
        );
        // Fill a's /30 and the rest of the pool is free: b claims its own; under
        // strict-free borrowing nothing is borrowed yet. Release to test removal.
        let (_, m) = s.release_handle(None, "h1").unwrap();
        step(&mut s, &mut t, m);
        assert!(live.live.try_recv().is_err());
        // Resume from revision 4: the deltas after it (none) — not a snapshot,
        // but word that it is up to date at the current revision.
        assert_eq!(caught_up(&t.watch(4, None)), Some(6));
        // Resume from 3 gets exactly the block delta.
        let r = t.watch(3, None);
        assert_eq!(r.initial.len(), 1);
        assert_eq!(decode(&r.initial[0]).revision, 4);
        // History from before this tracker (a controller restart): snapshot.
        let r = IntentTracker::new(&s, 5).watch(3, None);
        assert!(decode(&r.initial[0]).snapshot);
        // Node removal and pool change are deltas.
        let (_, m) = s.delete_node("b").unwrap();
        step(&mut s, &mut t, m);
        assert_eq!(
            decode(&live.live.try_recv().unwrap()).removed_nodes,
            vec!["b".to_string()]
        );
        let (_, m) = s
            .update_pool(
                "p",
                crate::ipam::PoolUpdate {
                    nat_outgoing: Some(false),
                    ..Default::default()
                },
            )
            .unwrap();
        step(&mut s, &mut t, m);
        let d = decode(&live.live.try_recv().unwrap());
        assert!(d.pools_changed && !d.pools[0].nat_outgoing);
    }

    /// The revision a watch start says the watcher is up to date at, when
    /// that is all it says.
    fn caught_up(w: &WatchStart) -> Option<u64> {
        match w.initial.as_slice() {
            [e] if e.caught_up && !e.snapshot => Some(e.revision),
            _ => None,
        }
    }

    fn epochs(list: &[(&str, u64)]) -> Vec<Epoch> {
        list.iter()
            .map(|(id, start)| Epoch {
                id: id.to_string(),
                start: *start,
            })
            .collect()
    }

    fn from(store_id: &str, epoch: &str) -> ResumeFrom {
        ResumeFrom {
            store_id: store_id.into(),
            epoch: epoch.into(),
        }
    }

    /// After a restart, a watcher of the same store that has applied the
    /// store's intent mark (or later) resumes with nothing; an older one, one
    /// of another store, or one without a store id gets a snapshot.
    #[test]
    fn resume_across_a_restart_needs_the_mark_and_the_store() {
        let s = IpamState::default();
        // Restarted at revision 10 (epoch e2); the last intent change was at 6.
        let ep = epochs(&[("e1", 0), ("e2", 10)]);
        let mut t = IntentTracker::new(&s, 10).resumable("s1", &ep, 6);
        for since in [6, 8, 10] {
            let w = t.watch(since, Some(&from("s1", "e1")));
            assert_eq!(caught_up(&w), Some(10), "since {since}: nothing to send");
            let u = decode(&w.initial[0]);
            assert_eq!(
                (u.revision, u.epoch.as_str(), u.snapshot),
                (10, "e2", false),
                "moved to the current epoch"
            );
            assert_eq!(
                u.encoded_len(),
                pb::IntentUpdate {
                    revision: 10,
                    epoch: "e2".into(),
                    ..Default::default()
                }
                .encoded_len(),
                "nothing else: {u:?}"
            );
        }
        for (since, id) in [(5, "s1"), (8, "s2"), (8, ""), (0, "s1"), (11, "s1")] {
            let w = t.watch(since, Some(&from(id, "e1")));
            let u = decode(&w.initial[0]);
            assert!(u.snapshot, "since {since} of {id:?}: snapshot");
            assert_eq!(
                (u.revision, u.store_id.as_str(), u.epoch.as_str()),
                (10, "s1", "e2")
            );
        }
        // The first change after the restart keeps the mark's reach: a
        // watcher at the mark gets exactly that change, stamped with the
        // current epoch.
        let mut s = s;
        let (_, m) = s.create_pool(pool("p", "10.0.0.0/24", 26)).unwrap();
        assert!(t.on_commit(&s, 11, &keys(&m)).is_some());
        let w = t.watch(6, Some(&from("s1", "e1")));
        assert_eq!(w.initial.len(), 1);
        let u = decode(&w.initial[0]);
        assert!(!u.snapshot && u.revision == 11 && u.pools_changed);
        assert_eq!(u.epoch, "e2");
        // A mark beyond the revision (cannot happen) is not trusted.
        let mut t = IntentTracker::new(&s, 10).resumable("s1", &ep, 12);
        assert!(decode(&t.watch(8, Some(&from("s1", "e2"))).initial[0]).snapshot);
    }

    /// A data directory restored from a copy keeps its id but forgets what
    /// followed the copy: revisions seen past the end of an epoch, or under an
    /// epoch it never had, get a snapshot even when the revision exists here.
    #[test]
    fn a_resume_must_come_from_this_stores_history() {
        let mut s = IpamState::default();
        // The copy was taken during e2 at revision 12; restored, the store
        // opened e9 at 12 and has since moved on to 20. The intent last
        // changed at 8 before the restore.
        let ep = epochs(&[("e1", 0), ("e2", 10), ("e9", 12)]);
        let mut t = IntentTracker::new(&s, 12).resumable("s1", &ep, 8);
        for rev in 13..=20 {
            let (_, m) = s
                .register_node(Node {
                    name: format!("n{rev}"),
                    ..Default::default()
                })
                .unwrap();
            t.on_commit(&s, rev, &keys(&m));
        }
        let snap = |t: &mut IntentTracker, since, epoch| {
            let w = t.watch(since, Some(&from("s1", epoch)));
            w.initial.first().is_some_and(|e| e.snapshot)
        };
        // Within the history: deltas (or nothing).
        assert!(!snap(&mut t, 12, "e2"), "e2 up to its end at 12");
        assert!(!snap(&mut t, 10, "e1"), "e1 up to its end at 10");
        assert!(!snap(&mut t, 15, "e9"), "the current epoch");
        assert!(!snap(&mut t, 20, "e9"));
        // Not in it: the revision exists, but it meant something else.
        assert!(snap(&mut t, 15, "e2"), "e2 past its end");
        assert!(snap(&mut t, 11, "e1"), "e1 past its end");
        assert!(snap(&mut t, 15, "e5"), "an epoch opened after the copy");
        assert!(snap(&mut t, 15, ""), "no epoch");
        // The controller's own resynchronisation is always in its history.
        assert!(!t.watch(15, None).initial.first().unwrap().snapshot);
    }
}
