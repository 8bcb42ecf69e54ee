//! The crash test: SIGKILL the controller while Assign and ReleaseHandle
//! calls are in flight, restart it on the same data directory, and check
//! that everything it acknowledged is still there, and nothing else broke.
//!
//! The random schedule comes from a fixed seed (printed); set
//! TABBY_CRASH_SEED to replay another one.
#![allow(clippy::unwrap_used)]
mod common;

use common::{create_pool, node_client, register, temp_dir, Controller, Datastore, XorShift};
use futures::future::join_all;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tabby_proto::v1::{
    AssignRequest, GetAllocationRequest, ListHandlesRequest, ReleaseHandleRequest,
};
use tonic::Code;

const ROUNDS: usize = 24;
const TASKS: usize = 12;
const NODES: usize = 4;
const POOL: &str = "10.0.0.0/12";
const DEFAULT_SEED: u64 = 0x7ab_b1e5_eed5;
/// One call in RELEASE_EVERY (on average) is a release.
const RELEASE_EVERY: u64 = 4;
/// Older live handles re-read by GetAllocation after each restart.
const OLD_SAMPLE: usize = 150;
/// Concurrent readers during verification.
const READERS: usize = 4;

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// What the test knows about one handle.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    node: String,
    addr: String,
}

/// A call whose outcome the test does not know (in flight at the kill).
#[derive(Debug, Clone)]
enum InFlight {
    Assign { handle: String, node: String },
    Release { handle: String, held: Held },
}

/// What one client task saw.
#[derive(Default)]
struct TaskLog {
    assigned: Vec<(String, Held)>,
    released: Vec<String>,
    in_flight: Option<InFlight>,
}

async fn client_task(
    c_ch: tonic::transport::Channel,
    node: String,
    prefix: String,
    seed: u64,
    killed: Arc<AtomicBool>,
) -> TaskLog {
    let mut cl = node_client(c_ch, &node);
    let mut rng = XorShift::new(seed);
    let mut log = TaskLog::default();
    // Handles acknowledged to this task and not yet released by it.
    let mut mine: Vec<(String, Held)> = Vec::new();
    let mut i = 0u64;
    loop {
        let release = !mine.is_empty() && rng.range(1, RELEASE_EVERY) == 1;
        if release {
            let k = (rng.next_u64() % mine.len() as u64) as usize;
            let (h, held) = mine.swap_remove(k);
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                cl.release_handle(ReleaseHandleRequest { handle: h.clone() }),
            )
            .await;
            match r {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    assert_eq!(
                        r.released,
                        vec![held.addr.clone()],
                        "ReleaseHandle {h}: released the wrong addresses"
                    );
                    log.released.push(h);
                }
                other => {
                    assert!(
                        killed.load(Ordering::SeqCst),
                        "ReleaseHandle {h} failed before the kill: {other:?}"
                    );
                    log.in_flight = Some(InFlight::Release { handle: h, held });
                    return log;
                }
            }
        } else {
            let h = format!("k8s-pod-network.{prefix}-{i}");
            i += 1;
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                cl.assign(AssignRequest {
                    handle: h.clone(),
                    attributes: attributes_of(&h),
                    ..Default::default()
                }),
            )
            .await;
            match r {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    assert_eq!(r.allocations.len(), 1, "Assign {h}: {:?}", r.allocations);
                    let a = &r.allocations[0];
                    assert_eq!(a.handle, h);
                    assert_eq!(a.node, node);
                    let held = Held {
                        node: node.clone(),
                        addr: a.address.clone(),
                    };
                    mine.push((h.clone(), held.clone()));
                    log.assigned.push((h, held));
                }
                other => {
                    assert!(
                        killed.load(Ordering::SeqCst),
                        "Assign {h} failed before the kill: {other:?}"
                    );
                    log.in_flight = Some(InFlight::Assign {
                        handle: h,
                        node: node.clone(),
                    });
                    return log;
                }
            }
        }
    }
}

/// The attributes every Assign of handle `h` carries (as tabby-node's do),
/// which must come back with it after any crash.
fn attributes_of(h: &str) -> HashMap<String, String> {
    HashMap::from([
        ("container_id".to_string(), h.to_string()),
        ("ifname".to_string(), "eth0".to_string()),
        ("pod".to_string(), format!("web-{}", h.len())),
    ])
}

/// The handle's allocation as the controller reports it, or None when the
/// handle does not exist.
async fn lookup(admin: &mut common::AdminClient, h: &str) -> Option<Held> {
    match admin
        .get_allocation(GetAllocationRequest {
            handle: h.to_string(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            assert_eq!(r.allocations.len(), 1, "handle {h}: {:?}", r.allocations);
            let a = &r.allocations[0];
            assert_eq!(a.handle, h);
            assert_eq!(r.attributes, attributes_of(h), "handle {h}: attributes");
            Some(Held {
                node: a.node.clone(),
                addr: a.address.clone(),
            })
        }
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => panic!("GetAllocation {h}: {s}"),
    }
}

/// Who holds `addr`, by address.
async fn holder_of(admin: &mut common::AdminClient, addr: &str) -> Option<String> {
    match admin
        .get_allocation(GetAllocationRequest {
            address: addr.to_string(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let h = r.allocations.first().map(|a| a.handle.clone())?;
            assert_eq!(r.attributes, attributes_of(&h), "{addr} ({h}): attributes");
            Some(h)
        }
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => panic!("GetAllocation {addr}: {s}"),
    }
}

/// The test's model of the durable state.
#[derive(Default)]
struct Model {
    /// Acknowledged assignments without an acknowledged release.
    live: BTreeMap<String, Held>,
    /// Acknowledged releases.
    released: BTreeSet<String>,
    /// Address -> handle of `live`.
    addrs: HashMap<String, String>,
}

impl Model {
    /// Records a held handle; panics when its address is held already.
    fn hold(&mut self, h: String, held: Held, what: &str) {
        if let Some(h2) = self.addrs.insert(held.addr.clone(), h.clone()) {
            panic!("{what} {h} holds {}, acknowledged to {h2}", held.addr);
        }
        self.live.insert(h, held);
    }

    /// Records a release; the handle must be held.
    fn release(&mut self, h: String) {
        let held = self
            .live
            .remove(&h)
            .unwrap_or_else(|| panic!("released unknown {h}"));
        self.addrs.remove(&held.addr);
        self.released.insert(h);
    }
}

/// Checks the restarted controller against the model. `recent`: handles
/// acknowledged in the round just killed (all re-read); `in_flight`: calls
/// whose outcome is unknown, resolved here into the model.
async fn verify(
    c: &Controller,
    m: &mut Model,
    recent: &[String],
    recent_released: &[String],
    in_flight: Vec<InFlight>,
    rng: &mut XorShift,
    full: bool,
) -> (usize, usize, usize) {
    let mut admin = c.admin().await;

    // 1. Calls in flight at the kill: either done or not, never half.
    // Releases first: an in-flight Assign may have been given the address of
    // a handle whose release was in flight too.
    let (mut found, mut gone) = (0, 0);
    let mut in_flight = in_flight;
    in_flight.sort_by_key(|f| matches!(f, InFlight::Assign { .. }));
    for f in in_flight {
        match f {
            InFlight::Assign { handle, node } => match lookup(&mut admin, &handle).await {
                Some(held) => {
                    assert_eq!(held.node, node, "in-flight {handle} on another node");
                    found += 1;
                    m.hold(handle, held, "in-flight Assign");
                }
                None => gone += 1,
            },
            InFlight::Release { handle, held } => match lookup(&mut admin, &handle).await {
                Some(now) => {
                    assert_eq!(now, held, "in-flight release of {handle} changed it");
                    found += 1;
                }
                None => {
                    gone += 1;
                    m.release(handle);
                }
            },
        }
    }

    // 2. Consistency as the controller sees it.
    let (check, bad) = common::check_ipam(&mut admin).await;
    assert!(bad.is_empty(), "CheckIpam after SIGKILL: {bad:?}");

    // 3. Exactly the live handles exist, node by node (covers every release).
    for n in 0..NODES {
        let name = node_name(n);
        let mut cl = c.node(&name).await;
        let listed = cl
            .list_handles(ListHandlesRequest {})
            .await
            .expect("ListHandles")
            .into_inner();
        // Each entry names its handle's container (what CNI GC tells
        // networks apart by), in the order of the names.
        assert_eq!(listed.entries.len(), listed.handles.len(), "{name}");
        for (e, h) in listed.entries.iter().zip(&listed.handles) {
            assert_eq!(&e.handle, h);
            assert_eq!(
                Some(e.container_id.as_str()),
                attributes_of(h).get("container_id").map(String::as_str)
            );
        }
        let got: BTreeSet<String> = listed.handles.into_iter().collect();
        let want: BTreeSet<String> = m
            .live
            .iter()
            .filter(|(_, h)| h.node == name)
            .map(|(k, _)| k.clone())
            .collect();
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(&want).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: acknowledged handles missing {missing:?}, unexpected handles {extra:?}"
        );
        let resurrected: Vec<_> = got.intersection(&m.released).take(5).collect();
        assert!(
            resurrected.is_empty(),
            "{name}: released handles are back: {resurrected:?}"
        );
    }

    assert_eq!(
        check.allocated,
        m.live.len() as u64,
        "allocated addresses != acknowledged live handles"
    );
    assert_eq!(check.handles, m.live.len() as u64, "handle count");

    // 4. Addresses: the recent ones, a sample of older ones (all at the end),
    // by handle and by address.
    let mut to_read: Vec<String> = recent
        .iter()
        .filter(|h| m.live.contains_key(*h))
        .cloned()
        .collect();
    if full {
        to_read = m.live.keys().cloned().collect();
    } else if !m.live.is_empty() {
        let keys: Vec<&String> = m.live.keys().collect();
        for _ in 0..OLD_SAMPLE {
            to_read.push(keys[(rng.next_u64() % keys.len() as u64) as usize].clone());
        }
    }
    let mut readers = Vec::new();
    for part in to_read.chunks(to_read.len().div_ceil(READERS).max(1)) {
        let mut admin = c.admin().await;
        let live = &m.live;
        readers.push(async move {
            for h in part {
                let want = &live[h];
                let got = lookup(&mut admin, h).await;
                assert_eq!(
                    got.as_ref(),
                    Some(want),
                    "acknowledged assignment {h} lost or changed after SIGKILL"
                );
                assert_eq!(
                    holder_of(&mut admin, &want.addr).await.as_deref(),
                    Some(h.as_str()),
                    "{} is not held by {h}",
                    want.addr
                );
            }
        });
    }
    join_all(readers).await;
    let read = to_read.len();
    for h in recent_released {
        assert_eq!(
            lookup(&mut admin, h).await,
            None,
            "acknowledged release of {h} undone by SIGKILL"
        );
    }
    (found, gone, read)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_nothing_acknowledged() {
    crash(&Datastore::Sled, ROUNDS).await;
}

/// The same on etcd (three members started here), fewer rounds: each
/// restart waits for the killed leader's lease (1 s) to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_nothing_acknowledged_on_etcd() {
    let etcd = tabby_integration::etcd::EtcdCluster::start(3).unwrap();
    let store = Datastore::Etcd {
        endpoints: etcd.endpoints_flag(),
        prefix: "/crash/".into(),
    };
    crash(&store, 8).await;
}

async fn crash(store: &Datastore, rounds: usize) {
    let seed = std::env::var("TABBY_CRASH_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(DEFAULT_SEED);
    println!("crash test seed {seed:#x} (replay: TABBY_CRASH_SEED={seed:x})");
    let mut rng = XorShift::new(seed);
    let dir = temp_dir();
    let data = dir.path().join("data");
    let mut m = Model::default();
    let mut recent: Vec<String> = Vec::new();
    let mut recent_released: Vec<String> = Vec::new();
    let mut in_flight: Vec<InFlight> = Vec::new();
    let t0 = Instant::now();
    let (mut total_assigned, mut total_released) = (0usize, 0usize);

    for round in 0..=rounds {
        let ts = Instant::now();
        let mut c = Controller::start_on(&data, store);
        if round == 0 {
            let mut admin = c.admin().await;
            create_pool(&mut admin, "crash-pool", POOL, 0).await;
            for n in 0..NODES {
                register(&c, &node_name(n), n).await;
            }
        }
        let n_in_flight = in_flight.len();
        let (found, gone, read) = verify(
            &c,
            &mut m,
            &recent,
            &recent_released,
            std::mem::take(&mut in_flight),
            &mut rng,
            round == rounds,
        )
        .await;
        let verify_time = ts.elapsed();
        if round > 0 {
            println!(
                "  restart + verify {verify_time:.2?}: {} live handles listed, {read} re-read; of {n_in_flight} calls in flight at the kill, {found} took effect, {gone} did not",
                m.live.len()
            );
        }
        if round == rounds {
            c.term();
            break;
        }

        // Load, then SIGKILL after a random delay.
        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let ch = c.node_channel(&node_name(t % NODES)).await;
            tasks.push(tokio::spawn(client_task(
                ch,
                node_name(t % NODES),
                format!("r{round:02}-t{t:02}"),
                rng.next_u64(),
                killed.clone(),
            )));
        }
        let delay = Duration::from_millis(rng.range(20, 300));
        tokio::time::sleep(delay).await;
        killed.store(true, Ordering::SeqCst);
        c.kill9();
        let logs = join_all(tasks).await;

        recent.clear();
        recent_released.clear();
        // Tasks release only handles acknowledged to them in this round. The
        // order of acknowledgements across tasks is unknown (a freed address
        // may go to another task at once), so handles assigned and released
        // within the round never enter `live`; the rest must be disjoint.
        let logs: Vec<TaskLog> = logs
            .into_iter()
            .map(|l| l.expect("client task panicked"))
            .collect();
        // One more case: a handle whose release was in flight, and whose
        // address was acknowledged to another handle before the kill: that
        // release took effect, though its answer never arrived.
        let freed: BTreeSet<&String> = logs.iter().flat_map(|l| &l.released).collect();
        let mut releasing: BTreeSet<String> = logs
            .iter()
            .filter_map(|l| match &l.in_flight {
                Some(InFlight::Release { handle, .. }) => Some(handle.clone()),
                _ => None,
            })
            .collect();
        let mut implied: Vec<String> = Vec::new();
        let (mut a, mut r) = (0, 0);
        for log in &logs {
            for (h, held) in &log.assigned {
                a += 1;
                if freed.contains(h) {
                    continue;
                }
                if let Some(other) = m.addrs.get(&held.addr).cloned() {
                    if releasing.remove(&other) {
                        m.release(other.clone());
                        implied.push(other);
                    } else if releasing.remove(h) {
                        // `h` itself is the one released; it never held
                        // the address alongside `other`.
                        m.released.insert(h.clone());
                        implied.push(h.clone());
                        continue;
                    } else {
                        panic!(
                            "{} acknowledged to {h} while held by {other} (acknowledged, not released)",
                            held.addr
                        );
                    }
                }
                recent.push(h.clone());
                m.hold(h.clone(), held.clone(), "Assign");
            }
            r += log.released.len();
            recent_released.extend(log.released.iter().cloned());
        }
        m.released.extend(recent_released.iter().cloned());
        in_flight.extend(logs.iter().filter_map(|l| l.in_flight.clone()).filter(
            |f| !matches!(f, InFlight::Release { handle, .. } if implied.contains(handle)),
        ));
        if !implied.is_empty() {
            println!("  releases in flight whose address was already reassigned: {implied:?}");
        }
        recent_released.extend(implied);
        total_assigned += a;
        total_released += r;
        println!(
            "round {round:2}: SIGKILL after {:3} ms: {a:4} Assign and {r:3} ReleaseHandle acknowledged, {} in flight",
            delay.as_millis(),
            in_flight.len()
        );
    }
    println!(
        "{rounds} crashes in {:.2?}: {total_assigned} assignments and {total_released} releases acknowledged, {} live at the end",
        t0.elapsed(),
        m.live.len()
    );
}
