//! High availability in the lab (issue 16): three etcd members and two
//! controller replicas in the fabric namespace, node clients given both
//! addresses. Killing the leader (SIGKILL) leaves every node's routes and
//! pod traffic untouched; the standby leads within the lease TTL + 1 s;
//! every node finds it and resumes its intent watch without a snapshot; a
//! pod added afterwards gets its address from the new leader and its route
//! reaches the other nodes.
#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use nix::sys::signal::Signal;
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use tabby_integration::lab::CONTROLLER_B;

const NODES: [&str; 3] = ["control-plane", "worker", "worker2"];

#[test]
fn killing_the_leader_keeps_routes_and_nodes_resume_from_the_new_one() {
    let (mut lab, _d) = lab_with(|c| c.ha = true);
    assert_eq!(lab.leader(), Some("controller"), "the first replica leads");
    let p = lab.add_pod("worker2", "p").unwrap();
    let q = lab.add_pod("worker", "q").unwrap();
    let before: Vec<Vec<String>> = NODES.iter().map(|n| tabby_routes(&lab, n)).collect();
    // Every route change on the nodes from here on, as the kernel tells it
    // (our own `ip monitor`, stopped by pid below).
    let monitors: Vec<_> = NODES
        .iter()
        .map(|n| {
            Command::new("ip")
                .args(["netns", "exec", &lab.node_ns(n), "ip", "monitor", "route"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mark_b = std::fs::metadata(lab.controller_log("controller-b"))
        .map(|m| m.len())
        .unwrap_or(0);
    let node_marks: Vec<u64> = NODES.iter().map(|n| lab.log_mark(n)).collect();

    let killed = Instant::now();
    lab.signal("controller", Signal::SIGKILL).unwrap();
    lab.wait_until("the standby leads", Duration::from_secs(10), || {
        lab.leader() == Some("controller-b")
    })
    .unwrap();
    let took = killed.elapsed();
    // Lease TTL 5 s (the default) + 1 s.
    assert!(took < Duration::from_secs(6), "failover took {took:?}");
    assert!(ping(&p, q.ip, 3), "pod traffic flows across the failover");

    // Each node moved its watch to the new leader and resumed it.
    lab.wait_until(
        "every node resumed its watch on the new leader",
        Duration::from_secs(15),
        || {
            NODES.iter().zip(&node_marks).all(|(n, m)| {
                let log = String::from_utf8_lossy(
                    &std::fs::read(lab.node_log(n)).unwrap_or_default()[*m as usize..],
                )
                .into_owned();
                log.lines()
                    .any(|l| l.contains("intent watch connected") && l.contains(CONTROLLER_B))
            })
        },
    )
    .unwrap();
    let log_b = String::from_utf8_lossy(
        &std::fs::read(lab.controller_log("controller-b")).unwrap()[mark_b as usize..],
    )
    .into_owned();
    let resumed: Vec<&str> = log_b
        .lines()
        .filter(|l| l.contains("intent watcher connected"))
        .collect();
    for n in NODES {
        assert!(
            resumed
                .iter()
                .any(|l| l.contains(&format!("node={n} ")) && l.contains("snapshot=false")),
            "{n} did not resume without a snapshot: {resumed:#?}"
        );
    }

    // A pod after the failover: its node's Assign reaches the new leader
    // (the node's client moves on from the dead address), and its block's
    // route reaches the others.
    let c = lab.add_pod("control-plane", "after").unwrap();
    lab.wait_until(
        "worker2 routes to the new pod",
        Duration::from_secs(10),
        || ping(&p, c.ip, 1),
    )
    .unwrap();

    // Nothing that was there was removed, not even for a moment.
    let mut deleted = Vec::new();
    for (n, mut m) in NODES.iter().zip(monitors) {
        let _ = m.kill();
        let out = m.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        deleted.extend(
            text.lines()
                .filter(|l| l.starts_with("Deleted") && l.contains("proto 77"))
                .map(|l| format!("{n}: {l}")),
        );
    }
    assert!(
        deleted.is_empty(),
        "routes removed during the failover: {deleted:#?}"
    );
    let after: Vec<Vec<String>> = NODES.iter().map(|n| tabby_routes(&lab, n)).collect();
    for (b, a) in before.iter().zip(&after) {
        for r in b {
            assert!(a.contains(r), "route {r:?} gone after the failover: {a:#?}");
        }
    }
}
