//! 16,000 concurrent Assign calls through gRPC against the real binary: no
//! failures, no duplicate addresses, affinity respected, and the state is
//! identical after a clean restart.
#![allow(clippy::unwrap_used)]
mod common;

use common::{create_pool, node_client, register, temp_dir, Controller, Datastore};
use ipnet::Ipv4Net;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    time::Instant,
};
use tabby_proto::v1::{
    AssignRequest, CheckIpamRequest, GetAllocationRequest, ShowIpamRequest, ShowIpamResponse,
};

const TASKS: usize = 32;
const PER_TASK: usize = 500;
const NODES: usize = 8;
const POOL: &str = "10.244.0.0/16";

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

fn handle(task: usize, i: usize) -> String {
    format!("k8s-pod-network.t{task:02}-{i:04}")
}

/// One acknowledged assignment.
#[derive(Debug, Clone)]
struct Got {
    node: String,
    addr: Ipv4Addr,
    block: Ipv4Net,
}

fn without_revision(mut s: ShowIpamResponse) -> ShowIpamResponse {
    s.revision = 0;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_assignments_are_unique_affine_and_survive_restart() {
    concurrent_assignments(&Datastore::Sled).await;
}

/// The same on etcd (three members started here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_assignments_are_unique_affine_and_survive_restart_on_etcd() {
    let etcd = tabby_integration::etcd::EtcdCluster::start(3).unwrap();
    concurrent_assignments(&Datastore::Etcd {
        endpoints: etcd.endpoints_flag(),
        prefix: "/concurrency/".into(),
    })
    .await;
}

async fn concurrent_assignments(store: &Datastore) {
    let dir = temp_dir();
    let data = dir.path().join("data");
    let mut c = Controller::start_on(&data, store);
    let pool: Ipv4Net = POOL.parse().unwrap();
    {
        let mut admin = c.admin().await;
        create_pool(&mut admin, "default-ipv4", POOL, 0).await;
    }
    for i in 0..NODES {
        register(&c, &node_name(i), i).await;
    }

    // --- 32 tasks x 500 Assign, each task on its own channel ------------
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let node = node_name(t % NODES);
        let ch = c.node_channel(&node).await;
        tasks.push(tokio::spawn(async move {
            let mut cl = node_client(ch, &node);
            let mut out = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let h = handle(t, i);
                let r = cl
                    .assign(AssignRequest {
                        handle: h.clone(),
                        ..Default::default()
                    })
                    .await;
                out.push((h, r.map(|r| r.into_inner())));
            }
            (node, out)
        }));
    }
    let mut got: BTreeMap<String, Got> = BTreeMap::new();
    let mut by_addr: HashMap<Ipv4Addr, String> = HashMap::new();
    let mut failures = Vec::new();
    for t in tasks {
        let (node, out) = t.await.expect("task panicked");
        for (h, r) in out {
            let r = match r {
                Ok(r) => r,
                Err(s) => {
                    failures.push(format!("{h}: {s}"));
                    continue;
                }
            };
            assert_eq!(
                r.allocations.len(),
                1,
                "{h}: want one IPv4 allocation, got {:?}",
                r.allocations
            );
            let a = &r.allocations[0];
            let addr: Ipv4Addr = a
                .address
                .parse()
                .unwrap_or_else(|e| panic!("{h}: address {:?}: {e}", a.address));
            let block: Ipv4Net = a
                .block
                .parse()
                .unwrap_or_else(|e| panic!("{h}: block {:?}: {e}", a.block));
            assert!(pool.contains(&addr), "{h}: {addr} is outside {POOL}");
            assert!(
                pool.contains(&block),
                "{h}: block {block} is outside {POOL}"
            );
            assert!(
                block.contains(&addr),
                "{h}: {addr} is outside its block {block}"
            );
            assert_eq!(a.handle, h, "{h}: allocation names another handle");
            assert_eq!(a.node, node, "{h}: allocation names another node");
            assert_eq!(
                a.block_affinity, node,
                "{h}: {addr} comes from block {block} affine to {:?}, not to the caller {node:?}",
                a.block_affinity
            );
            assert!(!a.borrowed, "{h}: {addr} was borrowed");
            if let Some(other) = by_addr.insert(addr, h.clone()) {
                panic!("duplicate address {addr}: handed to {other} and to {h}");
            }
            got.insert(
                h,
                Got {
                    node: node.clone(),
                    addr,
                    block,
                },
            );
        }
    }
    let el = t0.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {} Assign calls failed, first: {:?}",
        failures.len(),
        TASKS * PER_TASK,
        &failures[..failures.len().min(5)]
    );
    assert_eq!(got.len(), TASKS * PER_TASK);
    assert_eq!(by_addr.len(), TASKS * PER_TASK);
    println!(
        "{} Assign calls from {TASKS} tasks in {:.2?} ({:.0}/s)",
        got.len(),
        el,
        got.len() as f64 / el.as_secs_f64()
    );

    // --- the controller's own view agrees ----------------------------------
    let mut admin = c.admin().await;
    let show = admin
        .show_ipam(ShowIpamRequest { show_blocks: true })
        .await
        .expect("ShowIpam")
        .into_inner();
    let block_aff: HashMap<Ipv4Net, String> = show
        .blocks
        .iter()
        .map(|b| (b.cidr.parse().expect("block cidr"), b.affinity.clone()))
        .collect();
    for (h, g) in &got {
        assert_eq!(
            block_aff.get(&g.block),
            Some(&g.node),
            "{h}: ShowIpam does not list block {} as affine to {}",
            g.block,
            g.node
        );
    }
    assert_eq!(show.pools.len(), 1);
    assert_eq!(show.pools[0].used, (TASKS * PER_TASK) as u64);
    assert_eq!(show.nodes.len(), NODES);
    for n in &show.nodes {
        assert_eq!(
            n.addresses,
            (TASKS * PER_TASK / NODES) as u64,
            "node {}",
            n.name
        );
        assert_eq!(n.borrowed, 0, "node {} borrowed addresses", n.name);
    }
    let used_blocks: HashSet<Ipv4Net> = got.values().map(|g| g.block).collect();
    let per_node_blocks = (TASKS * PER_TASK / NODES).div_ceil(64);
    assert_eq!(
        used_blocks.len(),
        NODES * per_node_blocks,
        "blocks are not packed: {} blocks hold {} addresses",
        used_blocks.len(),
        got.len()
    );

    let (check, bad) = common::check_ipam(&mut admin).await;
    assert!(bad.is_empty(), "CheckIpam problems: {bad:?}");
    assert!(
        check.problems.is_empty(),
        "borrowed addresses at this size: {:?}",
        check.problems
    );
    assert_eq!(check.allocated, (TASKS * PER_TASK) as u64);
    assert_eq!(check.handles, (TASKS * PER_TASK) as u64);

    // --- asking again returns the same address -----------------------------
    let mut again = Vec::new();
    for n in 0..NODES {
        again.push(c.node(&node_name(n)).await);
    }
    for (i, (h, g)) in got.iter().enumerate().filter(|(i, _)| i % 53 == 0) {
        let n = g.node.trim_start_matches("node-").parse::<usize>().unwrap();
        let r = again[n]
            .assign(AssignRequest {
                handle: h.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("Assign again #{i} {h}: {e}"))
            .into_inner();
        assert_eq!(r.allocations.len(), 1, "{h}");
        assert_eq!(
            r.allocations[0].address,
            g.addr.to_string(),
            "{h}: asked again, got another address"
        );
    }
    // The handle belongs to its node: another node asking for it is refused.
    let (h0, g0) = got.iter().next().unwrap();
    let other = (g0
        .node
        .trim_start_matches("node-")
        .parse::<usize>()
        .unwrap()
        + 1)
        % NODES;
    let e = again[other]
        .assign(AssignRequest {
            handle: h0.clone(),
            ..Default::default()
        })
        .await
        .expect_err("another node got the handle");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    drop(again);
    drop(admin);

    // --- clean restart: identical state --------------------------------------
    c.term();
    assert!(
        c.stderr().contains("shutdown complete"),
        "no clean shutdown line:\n{}",
        c.stderr()
    );
    let mut c = Controller::start_on(&data, store);
    let mut admin = c.admin().await;
    let show2 = admin
        .show_ipam(ShowIpamRequest { show_blocks: true })
        .await
        .expect("ShowIpam after restart")
        .into_inner();
    assert!(
        show2.revision >= show.revision,
        "revision went back: {} -> {}",
        show.revision,
        show2.revision
    );
    assert_eq!(
        without_revision(show2),
        without_revision(show),
        "ShowIpam differs after restart"
    );
    let mut sampled = 0;
    for (h, g) in got.iter().step_by(got.len() / 200) {
        let r = admin
            .get_allocation(GetAllocationRequest {
                handle: h.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("GetAllocation {h} after restart: {e}"))
            .into_inner();
        assert_eq!(r.allocations.len(), 1, "{h}");
        let a = &r.allocations[0];
        assert_eq!(a.address, g.addr.to_string(), "{h}: address changed");
        assert_eq!(a.node, g.node, "{h}: node changed");
        assert_eq!(a.handle, *h);
        sampled += 1;
    }
    assert!(sampled >= 200, "sampled {sampled}");
    let check2 = admin
        .check_ipam(CheckIpamRequest {})
        .await
        .expect("CheckIpam after restart")
        .into_inner();
    assert!(check2.problems.is_empty(), "{:?}", check2.problems);
    assert_eq!(check2.allocated, check.allocated);
    assert_eq!(check2.handles, check.handles);

    // New assignments after the restart never reuse a held address.
    let mut fresh = HashSet::new();
    for n in 0..NODES {
        let mut cl = c.node(&node_name(n)).await;
        for k in 0..4 {
            let h = format!("k8s-pod-network.after-restart-{n}-{k}");
            let r = cl
                .assign(AssignRequest {
                    handle: h.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("Assign {h} after restart: {e}"))
                .into_inner();
            let addr: Ipv4Addr = r.allocations[0].address.parse().unwrap();
            assert!(
                !by_addr.contains_key(&addr),
                "{h} got {addr}, held by {}",
                by_addr[&addr]
            );
            assert!(fresh.insert(addr), "{h} got {addr} twice after restart");
            assert_eq!(r.allocations[0].block_affinity, node_name(n));
        }
    }
    drop(admin);
    c.term();
}
