//! One route model: what the controller says a node installs
//! (`ShowRoutes{node}`) is what that node's kernel holds under tabby's route
//! protocol, for every node, with plain blocks, a borrowed address and a
//! VXLAN pool in the cluster.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::{collections::BTreeSet, net::IpAddr, time::Duration};
use tabby_integration::lab::Lab;

/// A route as (destination with prefix, next hop or "blackhole").
type Row = (String, String);

fn with_prefix(dst: &str) -> String {
    if dst.contains('/') {
        return dst.to_string();
    }
    match dst.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => format!("{dst}/32"),
        Ok(IpAddr::V6(_)) => format!("{dst}/128"),
        Err(_) => dst.to_string(),
    }
}

/// The node's `proto 77` routes, both families, from `ip -j route`.
fn kernel(lab: &Lab, node: &str) -> BTreeSet<Row> {
    let mut rows = BTreeSet::new();
    for fam in ["-4", "-6"] {
        let out = sh(
            &lab.node_ns(node),
            &format!("ip {fam} -j route show proto 77"),
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!("ip -j route on {node}: {e}: {out}");
        });
        for r in v.as_array().cloned().unwrap_or_default() {
            let dst = with_prefix(r["dst"].as_str().unwrap_or(""));
            let target = if r["type"] == "blackhole" {
                "blackhole".to_string()
            } else {
                r["gateway"].as_str().unwrap_or("?").to_string()
            };
            rows.insert((dst, target));
        }
    }
    rows
}

/// What the controller says `node` installs.
fn show_routes(lab: &Lab, node: &str) -> BTreeSet<Row> {
    let out = lab
        .grpcurl(&[
            "-d",
            &format!(r#"{{"node":"{node}"}}"#),
            "tabby.v1.IpamAdmin/ShowRoutes",
        ])
        .unwrap_or_else(|e| panic!("ShowRoutes{{node: {node}}}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["routes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let dst = r["destination"].as_str().unwrap_or("").to_string();
            let target = if r["kind"] == "blackhole" {
                "blackhole".to_string()
            } else {
                r["nextHop"].as_str().unwrap_or("").to_string()
            };
            (dst, target)
        })
        .collect()
}

#[test]
fn show_routes_for_a_node_is_what_its_kernel_holds() {
    let (mut lab, _d) = lab();
    let cp = lab.add_pod("control-plane", "a").unwrap();
    lab.add_pod("worker", "b").unwrap();
    lab.add_pod("worker2", "c").unwrap();
    // A VXLAN pool with a block on worker2: the other nodes route it
    // through vxlan.tabby to worker2's tunnel address.
    lab.grpcurl(&[
        "-d",
        r#"{"pool":{"name":"overlay","cidr":"10.50.0.0/16","encapsulation":"ENCAPSULATION_VXLAN"}}"#,
        "tabby.v1.IpamAdmin/CreatePool",
    ])
    .unwrap();
    lab.grpcurl_as(
        "worker2",
        &[
            "-d",
            r#"{"handle":"x.overlay","requested":["10.50.0.5"]}"#,
            "tabby.v1.NodeAgent/Assign",
        ],
    )
    .unwrap();
    // An address of control-plane's block held by worker: a borrowed /32.
    let IpAddr::V4(v4) = cp.ip else {
        panic!("v4 pod")
    };
    let borrowed = std::net::Ipv4Addr::from(u32::from(v4) + 10);
    lab.grpcurl_as(
        "worker",
        &[
            "-d",
            &format!(r#"{{"handle":"x.borrowed","requested":["{borrowed}"]}}"#),
            "tabby.v1.NodeAgent/Assign",
        ],
    )
    .unwrap();
    let alloc = allocation(&lab, &borrowed.to_string()).expect("allocated");
    assert_eq!(alloc["allocations"][0]["borrowed"], true, "{alloc}");

    for node in ["control-plane", "worker", "worker2"] {
        let mut last = (BTreeSet::new(), BTreeSet::new());
        let agreed = lab.wait_until(
            &format!("{node}: ShowRoutes equals the kernel"),
            Duration::from_secs(10),
            || {
                last = (show_routes(&lab, node), kernel(&lab, node));
                last.0 == last.1
            },
        );
        assert!(
            agreed.is_ok(),
            "{node}: controller says {:?}, kernel holds {:?}",
            last.0,
            last.1
        );
        let (view, _) = &last;
        assert!(
            view.iter().any(|(_, t)| t == "blackhole"),
            "{node}: its own blocks are blackholed: {view:?}"
        );
        if node != "worker2" {
            let r = sh(&lab.node_ns(node), "ip route show 10.50.0.0/26 proto 77");
            assert!(
                r.contains("dev vxlan.tabby") && r.contains("onlink"),
                "{node}: {r}"
            );
        }
        let b = (format!("{borrowed}/32"), lab.node_ip("worker").to_string());
        assert_eq!(
            view.contains(&b),
            node != "worker",
            "{node}: the borrowed /32 via its holder, except on the holder: {view:?}"
        );
    }
    // The cluster table still lists the encapsulated block, marked as such.
    let all = lab.grpcurl(&["tabby.v1.IpamAdmin/ShowRoutes"]).unwrap();
    assert!(
        all.contains("10.50.0.0/26") && all.contains("ENCAPSULATION_VXLAN"),
        "{all}"
    );
    // An unknown node is an error, not an empty table.
    let e = lab
        .grpcurl(&["-d", r#"{"node":"nope"}"#, "tabby.v1.IpamAdmin/ShowRoutes"])
        .unwrap_err();
    assert!(e.to_string().contains("NotFound"), "{e}");
}
