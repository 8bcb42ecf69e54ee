//! The store on a real etcd (Debian etcd-server 3.4, three members on
//! loopback, started here): records, revisions, the intent mark and epochs
//! survive a reopen; a group commit larger than etcd's default transaction
//! is one transaction; unknown keys are damage; a deposed leader's writes
//! land nowhere (fencing); one member down changes nothing, two stop writes
//! with a clear error and nothing acknowledged is lost.
#![allow(clippy::unwrap_used)]

use std::{net::IpAddr, time::Duration};
use tabby_integration::etcd::EtcdCluster;
use tabby_store::{
    etcd::{self, EtcdBackend, EtcdConfig},
    Allocation, Encapsulation, Mutation, Op, Pool, Store, StoreError,
};

fn cfg(c: &EtcdCluster, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: c.endpoints(),
        prefix: prefix.into(),
        tls: None,
    }
}

fn open(c: &EtcdCluster, prefix: &str, fence: Option<i64>) -> Store {
    Store::open_on(Box::new(EtcdBackend::open(&cfg(c, prefix), fence).unwrap())).unwrap()
}

/// [`open`], tried again for up to `within` as a supervisor restarts a
/// controller whose store did not open.
fn open_retrying(c: &EtcdCluster, prefix: &str, within: Duration) -> Store {
    let t = std::time::Instant::now();
    loop {
        let r = EtcdBackend::open(&cfg(c, prefix), None).and_then(|b| Store::open_on(Box::new(b)));
        match r {
            Ok(s) => return s,
            Err(e) if t.elapsed() < within => {
                eprintln!("opening the store failed ({e}); again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("the store did not open within {within:?}: {e}"),
        }
    }
}

fn pool(name: &str) -> Pool {
    Pool {
        name: name.into(),
        cidr: "10.0.0.0/16".parse().unwrap(),
        block_size: 26,
        nat_outgoing: true,
        encapsulation: Encapsulation::None,
        disabled: false,
        node_selector: String::new(),
    }
}

fn alloc(i: u32) -> Mutation {
    let a: IpAddr = std::net::Ipv4Addr::from(0x0a00_0000 + i).into();
    Mutation {
        ops: vec![Op::PutAllocation(
            a,
            Allocation {
                handle: format!("h{i}"),
                node: "n1".into(),
            },
        )],
    }
}

#[test]
fn records_revisions_and_epochs_survive_a_reopen() {
    let c = EtcdCluster::start(3).unwrap();
    let s = open(&c, "/t1/", None);
    assert_eq!(s.revision(), 0);
    let id = s.id().to_string();
    let revs = s
        .commit(&[
            Mutation {
                ops: vec![Op::PutPool(pool("p"))],
            },
            alloc(1),
        ])
        .unwrap();
    assert_eq!(revs, vec![1, 2]);
    let (revs, w) = s.write_marked(&[alloc(2)], true).unwrap();
    s.make_durable(vec![w]).unwrap();
    assert_eq!(revs, vec![3]);
    // One group of 1,000 mutations: far past etcd's default of 128
    // operations, still one transaction.
    let many: Vec<Mutation> = (10..1010).map(alloc).collect();
    s.commit(&many).unwrap();
    drop(s);
    let s = open(&c, "/t1/", None);
    assert_eq!(s.id(), id);
    assert_eq!(s.epochs().len(), 2);
    let snap = s.load().unwrap();
    assert_eq!((snap.revision, snap.intent_revision), (1003, 3));
    assert_eq!(snap.pools.len(), 1);
    assert_eq!(snap.allocations.len(), 1002);
    // Another prefix is another store.
    let other = open(&c, "/t2/", None);
    assert_ne!(other.id(), id);
    assert_eq!(other.load().unwrap().allocations.len(), 0);
    // A key under the prefix that is not the store's is damage.
    c.etcdctl(&["put", "/t1/zz", "x"]).unwrap();
    match s.load() {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "zz"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_deposed_leaders_writes_land_nowhere() {
    let c = EtcdCluster::start(3).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cl = rt.block_on(cfg(&c, "/f/").connect()).unwrap();
    let (who, _) = tokio::sync::watch::channel(None);
    let first = rt
        .block_on(etcd::campaign(&cl, "/f/", "10.0.0.1:5151", 2, &who))
        .unwrap();
    assert_eq!(
        rt.block_on(etcd::leader(&cl, "/f/")).unwrap().as_deref(),
        Some("10.0.0.1:5151")
    );
    let s = open(&c, "/f/", Some(first.lease));
    s.commit(&[alloc(1)]).unwrap();
    // The leader's lease ends (as when it pauses past its TTL); another
    // campaigner takes over.
    rt.block_on(async {
        let mut cl = cl.clone();
        cl.lease_revoke(first.lease).await.unwrap();
    });
    let (who2, _) = tokio::sync::watch::channel(None);
    let second = rt
        .block_on(etcd::campaign(&cl, "/f/", "10.0.0.2:5151", 2, &who2))
        .unwrap();
    match s.commit(&[alloc(2)]) {
        Err(StoreError::Fenced(_)) => {}
        other => panic!("a deposed leader's write: {other:?}"),
    }
    let s2 = open(&c, "/f/", Some(second.lease));
    let snap = s2.load().unwrap();
    assert_eq!(
        snap.allocations.len(),
        1,
        "only the write made while leading"
    );
    s2.commit(&[alloc(3)]).unwrap();
}

#[test]
fn one_member_down_changes_nothing_two_stop_writes_until_they_return() {
    let mut c = EtcdCluster::start(3).unwrap();
    let s = open(&c, "/q/", None);
    s.commit(&[alloc(1)]).unwrap();
    c.kill_member(0);
    s.commit(&[alloc(2)]).unwrap();
    c.kill_member(1);
    let t = std::time::Instant::now();
    let e = s.commit(&[alloc(3)]).unwrap_err();
    assert!(matches!(e, StoreError::Etcd(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    c.start_member(0).unwrap();
    c.start_member(1).unwrap();
    c.wait_healthy(Duration::from_secs(20)).unwrap();
    // The store failed a write: a controller would exit and start again,
    // and again while etcd, just back from a lost quorum, still settles
    // (on a loaded machine its first answers can outlast a request's
    // timeout).
    let s = open_retrying(&c, "/q/", Duration::from_secs(30));
    let snap = s.load().unwrap();
    assert!(snap.allocations.len() >= 2, "acknowledged writes kept");
    s.commit(&[alloc(4)]).unwrap();
}

/// A standby's warm copy follows the leader's writes (puts and deletes,
/// with writes to another prefix moving etcd's revision without events for
/// it) and, taken at election, holds exactly what etcd holds; a store
/// opened on it loads the same state as one that reads every key.
#[test]
fn a_warm_copy_follows_writes_and_loads_as_a_cold_read_does() {
    let c = EtcdCluster::start(3).unwrap();
    let s = open(&c, "/w/", None);
    let other = open(&c, "/other/", None);
    s.commit(&[Mutation {
        ops: vec![Op::PutPool(pool("p"))],
    }])
    .unwrap();
    for i in 0..50 {
        s.commit(&[alloc(i)]).unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(cfg(&c, "/w/").connect()).unwrap();
    let mirror = rt.block_on(async { tabby_store::warm::Mirror::start(client.clone(), "/w/") });
    // While it follows: more, some removed, and writes elsewhere.
    for i in 50..120 {
        s.commit(&[alloc(i)]).unwrap();
        if i % 3 == 0 {
            let a: IpAddr = std::net::Ipv4Addr::from(0x0a00_0000 + i - 40).into();
            s.commit(&[Mutation {
                ops: vec![Op::DeleteAllocation(a)],
            }])
            .unwrap();
        }
        other.commit(&[alloc(i)]).unwrap();
    }
    let copy = rt
        .block_on(mirror.take(&client, "/w/", Duration::from_secs(5)))
        .expect("the warm copy caught up");
    let cold = EtcdBackend::open(&cfg(&c, "/w/"), None).unwrap();
    let mut all = std::collections::BTreeMap::new();
    tabby_store::Backend::scan(&cold, b"", &mut |k, v| {
        all.insert(k.to_vec(), v.to_vec());
        Ok(())
    })
    .unwrap();
    assert_eq!(copy.kvs, all, "the copy is what etcd holds");
    assert!(all.len() > 100);
    drop((s, other));
    let warm = Store::open_on(Box::new(
        EtcdBackend::open_warm(&cfg(&c, "/w/"), None, copy).unwrap(),
    ))
    .unwrap()
    .load()
    .unwrap();
    let cold = open(&c, "/w/", None).load().unwrap();
    assert_eq!(warm, cold);
    assert_eq!(
        warm.allocations.len(),
        120 - (50..120).filter(|i| i % 3 == 0).count()
    );
}
