//! The walkthrough's step 3 with a real route reflector (#15): GoBGP
//! (Debian `gobgpd`) on the lab's fabric, the controller peering with it
//! through `tabby.v1.BgpAdmin`; `gobgp global rib` lists every node's block
//! with that node as next hop, exactly the controller's cluster route table;
//! a new block appears there; removing the peer takes the routes away.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::{collections::BTreeSet, time::Duration};
use tabby_integration::lab::Lab;

/// (prefix, next hop) of `gobgp -j global rib`.
fn rr_rib(lab: &Lab) -> BTreeSet<(String, String)> {
    let out = lab.gobgp(&["-j", "global", "rib"]).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let mut rows = BTreeSet::new();
    for (prefix, paths) in v.as_object().cloned().unwrap_or_default() {
        for p in paths.as_array().cloned().unwrap_or_default() {
            for a in p["attrs"].as_array().cloned().unwrap_or_default() {
                if let Some(nh) = a["nexthop"].as_str() {
                    rows.insert((prefix.clone(), nh.to_string()));
                }
            }
        }
    }
    rows
}

/// The controller's cluster route table as (destination, next hop).
fn cluster_table(lab: &Lab) -> BTreeSet<(String, String)> {
    let out = lab.grpcurl(&["tabby.v1.IpamAdmin/ShowRoutes"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["routes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["destination"].as_str().unwrap().to_string(),
                r["nextHop"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn gobgp_route_reflector_learns_every_nodes_blocks() {
    let (mut lab, _d) = lab();
    for node in ["control-plane", "worker", "worker2"] {
        lab.add_pod(node, &format!("{}-a", node.replace("control-plane", "cp")))
            .unwrap();
    }
    // The route reflector on the fabric; BGP enabled and the reflector
    // added through tabby.v1.BgpAdmin.
    lab.add_route_reflector().unwrap();
    // Bad input changes nothing.
    let e = lab
        .grpcurl(&[
            "-d",
            r#"{"peer":{"address":"172.18.0.101","remote_asn":0}}"#,
            "tabby.v1.BgpAdmin/AddPeer",
        ])
        .unwrap_err();
    assert!(e.to_string().contains("InvalidArgument"), "{e}");

    // Every node's block, via that node: the cluster route table.
    let want = cluster_table(&lab);
    assert_eq!(want.len(), 3, "{want:?}");
    let mut last = BTreeSet::new();
    let r = lab.wait_until("the reflector's RIB", Duration::from_secs(20), || {
        last = rr_rib(&lab);
        last == want
    });
    assert!(
        r.is_ok(),
        "gobgp global rib {last:?}, cluster table {want:?}\ncontroller: {}\ngobgp neighbor: {}\ngobgpd: {}",
        lab.controller_log_since(0)
            .lines()
            .filter(|l| l.contains("BGP") || l.contains("bgp"))
            .collect::<Vec<_>>()
            .join("\n"),
        lab.gobgp(&["neighbor"]).unwrap(),
        std::fs::read_to_string(lab.cfg.dir.join("gobgpd.log")).unwrap_or_default()
    );
    for node in ["control-plane", "worker", "worker2"] {
        let ip = lab.node_ip(node).to_string();
        assert!(last.iter().any(|(_, nh)| *nh == ip), "{node}: {last:?}");
    }
    let st = lab
        .grpcurl(&[
            "-d",
            r#"{"show_advertised":true}"#,
            "tabby.v1.BgpAdmin/GetStatus",
        ])
        .unwrap();
    assert!(st.contains("\"state\": \"Established\""), "{st}");
    assert!(st.contains("\"prefixesSent\": \"3\""), "{st}");
    let nb = lab.gobgp(&["neighbor"]).unwrap();
    assert!(nb.contains("172.18.0.1") && nb.contains("Establ"), "{nb}");

    // Graceful restart: the controller dies (SIGKILL); the reflector keeps
    // its routes (stale) instead of dropping them, and after the restart
    // they are refreshed and the session is back.
    lab.kill_controller().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let kept = rr_rib(&lab);
    assert_eq!(
        kept, want,
        "the reflector dropped the routes of a restarting controller"
    );
    let nb = lab.gobgp(&["neighbor"]).unwrap();
    assert!(!nb.contains("Establ"), "{nb}");
    lab.start_controller().unwrap();
    lab.wait_until("the session back", Duration::from_secs(20), || {
        lab.gobgp(&["neighbor"])
            .unwrap_or_default()
            .contains("Establ")
    })
    .unwrap();
    lab.wait_until("the refreshed routes", Duration::from_secs(10), || {
        rr_rib(&lab) == want
            && !lab
                .gobgp(&["global", "rib"])
                .unwrap_or_default()
                .contains("stale")
    })
    .unwrap();

    // A new block (another pool, on worker2) reaches the reflector.
    lab.grpcurl(&[
        "-d",
        r#"{"pool":{"name":"extra","cidr":"10.99.0.0/16"}}"#,
        "tabby.v1.IpamAdmin/CreatePool",
    ])
    .unwrap();
    lab.grpcurl_as(
        "worker2",
        &[
            "-d",
            r#"{"handle":"x.extra","requested":["10.99.0.5"]}"#,
            "tabby.v1.NodeAgent/Assign",
        ],
    )
    .unwrap();
    let w2 = lab.node_ip("worker2").to_string();
    lab.wait_until(
        "the new block at the reflector",
        Duration::from_secs(10),
        || rr_rib(&lab).contains(&("10.99.0.0/26".to_string(), w2.clone())),
    )
    .unwrap();

    // Removing the peer closes the session: the reflector drops the routes.
    lab.grpcurl(&[
        "-d",
        r#"{"address":"172.18.0.100"}"#,
        "tabby.v1.BgpAdmin/DeletePeer",
    ])
    .unwrap();
    lab.wait_until(
        "the reflector's RIB to empty",
        Duration::from_secs(10),
        || rr_rib(&lab).is_empty(),
    )
    .unwrap();
}
