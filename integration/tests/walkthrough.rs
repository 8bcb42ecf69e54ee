//! What a pod and a node look like, asserted from the kernel's own views in
//! the three-node lab (the pod's /32 and its 169.254.1.1 gateway, the node's
//! block routes, blackhole and per-pod routes), plus the data path: cross-node traffic both ways,
//! masquerade to the outside, never between pods, and not for a pool with
//! nat_outgoing off.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::{net::SocketAddr, time::Duration};
use tabby_integration::lab::OUTSIDE;

#[test]
fn walkthrough_views_and_data_path() {
    let (mut lab, _dir) = lab();
    for node in ["control-plane", "worker", "worker2"] {
        lab.add_pod(node, &format!("{}-a", node.replace("control-plane", "cp")))
            .unwrap();
        lab.add_pod(node, &format!("{}-b", node.replace("control-plane", "cp")))
            .unwrap();
    }
    // Metrics: the controller counts as many addresses as there are pods,
    // and every node counts its two ADDs and is connected.
    let m = lab.metrics(None).unwrap();
    let used: f64 = m
        .lines()
        .filter(|l| l.starts_with("tabby_ipam_pool_addresses{") && l.contains(r#"state="used""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(used, lab.pods().len() as f64, "{m}");
    for node in ["control-plane", "worker", "worker2"] {
        let m = lab.metrics(Some(node)).unwrap();
        let has = |s: &str| m.lines().any(|l| l == s);
        assert!(
            has(
                r#"tabby_node_cni_grpc_requests_total{method="/tabby.v1.PodNetwork/Add",code="Ok"} 2"#
            ),
            "{node}: {m}"
        );
        assert!(has("tabby_node_controller_connected 1"), "{node}: {m}");
        // Every node applied the other nodes' new blocks: deltas with the
        // controller's commit time, measured into the kernel.
        let converged = m
            .lines()
            .find_map(|l| l.strip_prefix("tabby_node_convergence_delay_seconds_count "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(converged >= 1.0, "{node}: no convergence samples: {m}");
        assert!(!has("tabby_node_intent_revision 0"), "{node}: {m}");
    }
    let p = lab.pod("worker2-a").unwrap().clone();
    let q = lab.pod("cp-a").unwrap().clone();
    let w = lab.pod("worker-a").unwrap().clone();

    // 1. The pod: a /32, default via 169.254.1.1, the gateway at ee:ee:...
    let addr = sh(&p.ns, "ip -4 -br addr show dev eth0");
    assert!(
        addr.contains(&format!("{}/32", p.ip)) && addr.contains("UP"),
        "{addr}"
    );
    let routes = sh(&p.ns, "ip route");
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0 scope link"),
        "{routes}"
    );
    let neigh = sh(&p.ns, "ip neigh");
    assert!(
        neigh.contains("169.254.1.1 dev eth0 lladdr ee:ee:ee:ee:ee:ee PERMANENT"),
        "{neigh}"
    );

    // 2. The node: other nodes' blocks via their addresses with tabby's
    // protocol, a blackhole for its own block, a /32 per local pod.
    let blocks = blocks(&lab);
    let node_routes = sh(&lab.node_ns("worker2"), "ip route");
    for (cidr, owner) in &blocks {
        if owner == "worker2" {
            assert!(
                node_routes.contains(&format!("blackhole {cidr} proto 77")),
                "{cidr}: {node_routes}"
            );
        } else {
            let hop = lab.node_ip(owner);
            assert!(
                node_routes.contains(&format!("{cidr} via {hop} dev eth0 proto 77")),
                "{cidr}: {node_routes}"
            );
        }
    }
    for pod in lab.pods().iter().filter(|x| x.node == "worker2") {
        let line = node_routes
            .lines()
            .find(|l| l.starts_with(&format!("{} dev tab", pod.ip)));
        assert!(
            line.is_some_and(|l| l.contains("scope link")),
            "{}: {node_routes}",
            pod.ip
        );
    }
    assert!(
        node_routes.contains("default via 172.18.0.1 dev eth0"),
        "{node_routes}"
    );

    // 3. NAT: one table, two interval sets, one rule.
    let nft = sh(&lab.node_ns("worker2"), "nft list table ip tabby");
    assert!(
        nft.contains("set masq-pools")
            && nft.contains("set all-pools")
            && nft.contains("flags interval"),
        "{nft}"
    );
    assert!(nft.contains("elements = { 10.244.0.0/16 }"), "{nft}");
    assert!(
        nft.contains("type nat hook postrouting priority srcnat"),
        "{nft}"
    );
    assert!(
        nft.contains("ip saddr @masq-pools ip daddr != @all-pools masquerade fully-random"),
        "{nft}"
    );

    // 4. Cross-node traffic, both directions.
    assert!(ping(&p, q.ip, 3), "worker2 -> control-plane");
    assert!(ping(&q, p.ip, 3), "control-plane -> worker2");
    assert!(ping(&w, p.ip, 3), "worker -> worker2");

    // 5. Egress is masqueraded to the node's address.
    let out: SocketAddr = format!("{OUTSIDE}:8080").parse().unwrap();
    let seen = seen_source(&lab.outside(), &p.ns, out).unwrap();
    assert_eq!(seen, lab.node_ip("worker2").to_string());

    // 6. Pod to pod is never masqueraded.
    let to_w: SocketAddr = format!("{}:8081", w.ip).parse().unwrap();
    assert_eq!(seen_source(&w.ns, &p.ns, to_w).unwrap(), p.ip.to_string());

    // 7. nat_outgoing off: the set empties and egress is no longer masqueraded
    // (the outside host has no route back to pod addresses, so it fails).
    lab.grpcurl(&[
        "-d",
        r#"{"name":"default-pool","nat_outgoing":false}"#,
        "tabby.v1.IpamAdmin/UpdatePool",
    ])
    .unwrap();
    lab.wait_until("masq set to empty", Duration::from_secs(5), || {
        let t = sh(&lab.node_ns("worker2"), "nft list set ip tabby masq-pools");
        !t.contains("elements")
    })
    .unwrap();
    assert!(
        seen_source(&lab.outside(), &p.ns, out).is_err(),
        "unmasqueraded egress must not reach back"
    );
    assert!(ping(&p, q.ip, 2), "pod to pod still fine");
}
