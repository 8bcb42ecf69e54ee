//! The intent stream over real gRPC: snapshot then deltas stamped with
//! revisions, resume from a revision (also across a controller restart), and
//! a slow watcher that neither stalls the others nor ends up wrong (bounded
//! buffering, then a resync).
#![allow(clippy::unwrap_used)]
mod common;

use common::{create_pool, register, Controller, NodeHeader};
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};
use tabby_proto::v1::{
    intent_stream_client::IntentStreamClient, AssignRequest, IntentUpdate, WatchRequest,
};
use tonic::{service::interceptor::InterceptedService, transport::Channel, Streaming};

type Client = IntentStreamClient<InterceptedService<Channel, NodeHeader>>;

async fn client(c: &Controller, name: &str) -> Client {
    IntentStreamClient::with_interceptor(
        c.node_channel(name).await,
        NodeHeader(name.parse().unwrap()),
    )
}

/// What a node rebuilds from the stream: blocks and their nodes.
#[derive(Default, Debug, PartialEq)]
struct Seen {
    revision: u64,
    snapshots: usize,
    deltas: usize,
    blocks: BTreeMap<String, String>,
}

impl Seen {
    fn apply(&mut self, u: &IntentUpdate) {
        assert!(
            u.revision >= self.revision,
            "revisions never go back: {} after {}",
            u.revision,
            self.revision
        );
        if u.snapshot {
            self.blocks.clear();
            self.snapshots += 1;
        } else {
            self.deltas += 1;
        }
        for c in &u.removed_blocks {
            self.blocks.remove(c);
        }
        for b in &u.blocks {
            self.blocks.insert(b.cidr.clone(), b.node.clone());
        }
        self.revision = u.revision;
    }
}

async fn next(s: &mut Streaming<IntentUpdate>) -> IntentUpdate {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an update within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

async fn claim(c: &Controller, k: usize) -> u64 {
    let mut n = c.node("claimer").await;
    // Each /26 is a new block: one delta per claim.
    n.assign(AssignRequest {
        handle: format!("claim-{k}"),
        requested: vec![format!("10.{}.{}.1", k / 256 + 1, k % 256)],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_deltas_resume_and_slow_watchers() {
    snapshot_deltas(&common::Datastore::Sled).await;
}

/// The same on etcd (three members started here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_deltas_resume_and_slow_watchers_on_etcd() {
    let etcd = tabby_integration::etcd::EtcdCluster::start(3).unwrap();
    snapshot_deltas(&common::Datastore::Etcd {
        endpoints: etcd.endpoints_flag(),
        prefix: "/deltas/".into(),
    })
    .await;
}

async fn snapshot_deltas(store: &common::Datastore) {
    let dir = common::temp_dir();
    let c = Controller::start_on(dir.path(), store);
    let mut admin = c.admin().await;
    create_pool(&mut admin, "p", "10.0.0.0/8", 26).await;
    register(&c, "claimer", 0).await;
    let first = claim(&c, 0).await;

    // A fresh watcher gets a snapshot at the current revision.
    let mut fast = client(&c, "fast")
        .await
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut a = Seen::default();
    let u = next(&mut fast).await;
    assert!(u.snapshot && u.revision == first, "{u:?}");
    let store_id = u.store_id.clone();
    assert!(!store_id.is_empty(), "a snapshot names its store");
    let epoch = u.epoch.clone();
    assert!(!epoch.is_empty(), "every update names its epoch");
    assert_eq!(u.nodes.len(), 1);
    assert_eq!(u.pools.len(), 1);
    a.apply(&u);
    assert_eq!(a.blocks.len(), 1);

    // A slow watcher connects, takes its snapshot, then stops reading.
    let mut slow = client(&c, "slow")
        .await
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut b = Seen::default();
    b.apply(&next(&mut slow).await);

    // 1,500 claims (more than the 1,024 updates buffered per watcher): the
    // fast watcher keeps up while the slow one reads nothing.
    const CLAIMS: usize = 1500;
    let reader = tokio::spawn(async move {
        let mut a = a;
        while a.blocks.len() < CLAIMS + 1 {
            a.apply(&next(&mut fast).await);
        }
        (a, fast)
    });
    let t = Instant::now();
    let mut last = 0;
    for k in 1..=CLAIMS {
        last = claim(&c, k).await;
    }
    let (a, mut fast) = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("fast watcher not stalled")
        .unwrap();
    println!(
        "{CLAIMS} claims in {:?}; fast watcher at revision {} with {} deltas",
        t.elapsed(),
        a.revision,
        a.deltas
    );
    assert_eq!(a.revision, last);
    assert_eq!(a.snapshots, 1, "the fast watcher never needed a resync");

    // The slow watcher now reads: it is resynchronised and ends up identical.
    while b.revision < last {
        b.apply(&next(&mut slow).await);
    }
    println!(
        "slow watcher: {} snapshots, {} deltas",
        b.snapshots, b.deltas
    );
    assert_eq!(
        b.blocks, a.blocks,
        "the slow watcher converges to the same intent"
    );

    // Resume: from the latest revision nothing is resent, only word that it
    // is up to date; the next change comes alone.
    let mut resumed = watch(&c, last, &store_id, &epoch).await;
    let u = next(&mut resumed).await;
    assert_eq!(u, caught_up(last, &epoch));
    let newest = claim(&c, CLAIMS + 1).await;
    let u = next(&mut resumed).await;
    assert!(
        !u.snapshot && u.revision == newest && u.blocks.len() == 1,
        "{u:?}"
    );
    let u = next(&mut fast).await;
    assert_eq!(u.revision, newest);

    // Resume from an older revision still in history: only the deltas after it.
    let mut older = watch(&c, last - 3, &store_id, &epoch).await;
    let mut o = Seen {
        revision: last - 3,
        ..Default::default()
    };
    while o.revision < newest {
        o.apply(&next(&mut older).await);
    }
    assert_eq!((o.snapshots, o.deltas), (0, 4));

    // Without an identity the stream is refused.
    let mut anon = IntentStreamClient::new(common::anonymous_channel(c.addr).await);
    let e = anon.watch(WatchRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
}

/// The update that tells a resuming watcher it is up to date.
fn caught_up(revision: u64, epoch: &str) -> IntentUpdate {
    IntentUpdate {
        revision,
        epoch: epoch.to_string(),
        ..Default::default()
    }
}

async fn watch(c: &Controller, since: u64, store_id: &str, epoch: &str) -> Streaming<IntentUpdate> {
    client(c, "resumer")
        .await
        .watch(WatchRequest {
            since_revision: since,
            store_id: store_id.to_string(),
            epoch: epoch.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A controller restart does not cost every watcher a snapshot: one that has
/// applied the last intent change of the same store resumes with nothing
/// resent, even though other changes (assignments inside a block) came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_a_controller_restart() {
    resume_across_restart(&common::Datastore::Sled).await;
}

/// The same on etcd (three members started here): a new leader on the
/// same prefix resumes its watchers as a restarted controller does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_a_controller_restart_on_etcd() {
    let etcd = tabby_integration::etcd::EtcdCluster::start(3).unwrap();
    resume_across_restart(&common::Datastore::Etcd {
        endpoints: etcd.endpoints_flag(),
        prefix: "/resume/".into(),
    })
    .await;
}

async fn resume_across_restart(store: &common::Datastore) {
    let dir = common::temp_dir();
    let mut c = Controller::start_on(dir.path(), store);
    let mut admin = c.admin().await;
    create_pool(&mut admin, "p", "10.0.0.0/8", 26).await;
    register(&c, "claimer", 0).await;
    claim(&c, 0).await;
    let mut w = watch(&c, 0, "", "").await;
    let u = next(&mut w).await;
    assert!(u.snapshot);
    let store_id = u.store_id;
    let mark = claim(&c, 1).await;
    let u = next(&mut w).await;
    assert_eq!(u.revision, mark);
    let epoch = u.epoch;
    // Not intent: more addresses from claimer's blocks.
    let mut n = c.node("claimer").await;
    let mut after = mark;
    for i in 0..5 {
        after = n
            .assign(AssignRequest {
                handle: format!("fill-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .revision;
    }
    assert!(after > mark);
    drop((w, n, admin));
    c.term();

    let c = Controller::start_on(dir.path(), store);
    let mut resumed = Vec::new();
    for since in [mark, after] {
        resumed.push((since, watch(&c, since, &store_id, &epoch).await));
    }
    let mut new_epoch = String::new();
    for (since, w) in &mut resumed {
        let u = next(w).await;
        new_epoch.clone_from(&u.epoch);
        assert_eq!(
            u,
            caught_up(after, &new_epoch),
            "since {since}: up to date, in the new epoch"
        );
    }
    assert_ne!(new_epoch, epoch, "the restart opened a new epoch");
    let newest = claim(&c, 2).await;
    for (since, mut w) in resumed {
        let u = next(&mut w).await;
        assert!(
            !u.snapshot && u.revision == newest && u.blocks.len() == 1,
            "since {since}: only the new change, no snapshot: {u:?}"
        );
        assert_eq!(u.epoch, new_epoch);
    }
    // Before the mark, another store, no store, or no epoch: a snapshot,
    // naming the store.
    for (since, id, ep) in [
        (mark - 1, store_id.as_str(), epoch.as_str()),
        (mark, "0123", epoch.as_str()),
        (mark, "", epoch.as_str()),
        (mark, store_id.as_str(), ""),
    ] {
        let u = next(&mut watch(&c, since, id, ep).await).await;
        assert!(u.snapshot, "since {since} of {id:?}/{ep:?}: {u:?}");
        assert_eq!(u.store_id, store_id);
    }
}

/// A data directory restored from a copy keeps its store id and goes on
/// counting revisions from the copy's. A watcher that saw revisions written
/// after the copy (gone now) must not resume from one of them once the
/// restored store has counted past it: it gets a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_data_directory_does_not_resume_lost_history() {
    let dir = common::temp_dir();
    let data = dir.path().join("data");
    let copy = dir.path().join("copy");
    let mut c = Controller::start(&data);
    let mut admin = c.admin().await;
    create_pool(&mut admin, "p", "10.0.0.0/8", 26).await;
    register(&c, "claimer", 0).await;
    let at_copy = claim(&c, 0).await;
    let u = next(&mut watch(&c, 0, "", "").await).await;
    let (store_id, copied_epoch) = (u.store_id, u.epoch);
    drop(admin);
    c.term();
    cp_dir(&data, &copy);

    // Life goes on after the copy: a block for claim 1, seen by a watcher.
    let mut c = Controller::start(&data);
    let mut w = watch(&c, at_copy, &store_id, &copied_epoch).await;
    assert_eq!(next(&mut w).await.revision, at_copy, "up to date");
    let lost = claim(&c, 1).await;
    let u = next(&mut w).await;
    assert_eq!(u.revision, lost);
    let lost_epoch = u.epoch;
    drop(w);
    c.term();

    // Restored: the block of claim 1 never happened, and new writes take the
    // revisions it had.
    std::fs::remove_dir_all(&data).unwrap();
    cp_dir(&copy, &data);
    let c = Controller::start(&data);
    let mut now = at_copy;
    while now < lost + 2 {
        now = claim(&c, now as usize + 10).await;
    }
    for ep in [&lost_epoch, &copied_epoch] {
        let u = next(&mut watch(&c, lost, &store_id, ep).await).await;
        assert!(u.snapshot, "since {lost} under {ep}: {u:?}");
        assert!(
            !u.blocks.iter().any(|b| b.cidr == "10.1.1.0/26"),
            "the lost block is gone: {u:?}"
        );
    }
    // Up to the copy, the history is the same: a resume.
    let u = next(&mut watch(&c, at_copy, &store_id, &copied_epoch).await).await;
    assert!(!u.snapshot && u.revision > at_copy, "{u:?}");
}

fn cp_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// SIGTERM with watchers connected: their streams end cleanly (the nodes
/// reconnect to the next controller) and the controller exits, flushed,
/// instead of waiting for streams that never end on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_watch_streams_and_exits() {
    let dir = common::temp_dir();
    let mut c = Controller::start(dir.path());
    let mut admin = c.admin().await;
    create_pool(&mut admin, "p", "10.0.0.0/8", 26).await;
    register(&c, "claimer", 0).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut w = watch(&c, 0, "", "").await;
        assert!(next(&mut w).await.snapshot);
        streams.push(w);
    }
    // `term` fails the test unless the controller exits 0 in time.
    tokio::task::block_in_place(|| c.term());
    for mut w in streams {
        let end = tokio::time::timeout(Duration::from_secs(5), w.message())
            .await
            .expect("the stream ends");
        assert!(
            matches!(end, Ok(None)),
            "ended cleanly, not broken: {end:?}"
        );
    }
}
