//! The walkthrough's step 3 with a real route reflector (#15): GoBGP
//! (Debian `gobgpd`) on the lab's fabric, the controller peering with it
//! through `tabby.v1.BgpAdmin`; `gobgp global rib` lists every node's block
//! (IPv4 and IPv6) with that node as next hop, exactly the controller's
//! cluster route table; a controller restart with graceful restart makes
//! gobgp record no withdrawal; a new block appears there; removing the peer
//! takes the routes away. And BIRD as a top-of-rack router for sessions
//! held by nodes.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::{collections::BTreeSet, time::Duration};
use tabby_integration::lab::Lab;

/// (prefix, next hop) of `gobgp -j global rib`, both families.
fn rr_rib(lab: &Lab) -> BTreeSet<(String, String)> {
    let mut rows = BTreeSet::new();
    for family in ["ipv4", "ipv6"] {
        rows.extend(rr_rib_of(lab, family));
    }
    rows
}

fn rr_rib_of(lab: &Lab, family: &str) -> BTreeSet<(String, String)> {
    let mut rows = BTreeSet::new();
    for (prefix, attrs) in rr_paths(lab, family) {
        for a in attrs {
            if let Some(nh) = a["nexthop"].as_str() {
                rows.insert((prefix.clone(), nh.to_string()));
            }
        }
    }
    rows
}

/// Every path of `gobgp -j global rib` for `family`: its prefix and its
/// path attributes (as gobgp prints them).
fn rr_paths(lab: &Lab, family: &str) -> Vec<(String, Vec<serde_json::Value>)> {
    let out = lab
        .gobgp(&["-j", "global", "rib", "-a", family])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let mut paths = Vec::new();
    for (prefix, ps) in v.as_object().cloned().unwrap_or_default() {
        for p in ps.as_array().cloned().unwrap_or_default() {
            paths.push((
                prefix.clone(),
                p["attrs"].as_array().cloned().unwrap_or_default(),
            ));
        }
    }
    paths
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

/// `gobgp monitor global rib` of one family, printing into a file: what the
/// reflector's RIB went through (killed on drop).
struct Monitor(std::process::Child, std::path::PathBuf);

impl Monitor {
    fn start(lab: &Lab, family: &str) -> Monitor {
        let path = lab.cfg.dir.join(format!("monitor-{family}.json"));
        let out = std::fs::File::create(&path).unwrap();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.rr(), "gobgp", "-p", "50051"])
            .args(["monitor", "global", "rib", "-j", "-a", family])
            .stdout(out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Monitor(child, path)
    }

    /// The withdrawals it saw.
    fn withdrawals(&self) -> Vec<String> {
        std::fs::read_to_string(&self.1)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"withdrawal\":true"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn gobgp_route_reflector_learns_every_nodes_blocks() {
    let (mut lab, _d) = common::lab_with(|c| c.dual_stack = true);
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
    // A block of each family per node.
    assert_eq!(want.len(), 6, "{want:?}");
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
    assert!(st.contains("\"prefixesSent\": \"6\""), "{st}");
    let nb = lab.gobgp(&["neighbor"]).unwrap();
    assert!(nb.contains("172.18.0.1") && nb.contains("Establ"), "{nb}");

    // Route refresh (RFC 2918): RefreshPeer sends the reflector one request
    // per family of the session; an unknown peer is NOT_FOUND.
    let refreshes = || {
        lab.gobgp(&["neighbor", "172.18.0.1"])
            .unwrap_or_default()
            .lines()
            .find(|l| l.trim_start().starts_with("Route Refresh:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = refreshes();
    lab.grpcurl(&[
        "-d",
        r#"{"address":"172.18.0.100"}"#,
        "tabby.v1.BgpAdmin/RefreshPeer",
    ])
    .unwrap();
    lab.wait_until(
        "the refresh requests at the reflector",
        Duration::from_secs(10),
        || refreshes() == before + 2,
    )
    .unwrap();
    let e = lab
        .grpcurl(&[
            "-d",
            r#"{"address":"172.18.0.99"}"#,
            "tabby.v1.BgpAdmin/RefreshPeer",
        ])
        .unwrap_err();
    assert!(e.to_string().contains("NotFound"), "{e}");

    // Graceful restart: the controller dies (SIGKILL); the reflector keeps
    // its routes (stale) instead of dropping them, and after the restart
    // they are refreshed and the session is back.
    let monitors = [Monitor::start(&lab, "ipv4"), Monitor::start(&lab, "ipv6")];
    std::thread::sleep(Duration::from_millis(300));
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
    for m in &monitors {
        assert_eq!(
            m.withdrawals(),
            Vec::<String>::new(),
            "gobgp recorded withdrawals across the restart"
        );
    }
    // The monitors see withdrawals (checked at the end, where the peer goes).

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

    // Every path as in the walkthrough: origin IGP, local-pref 100.
    for family in ["ipv4", "ipv6"] {
        let paths = rr_paths(&lab, family);
        assert!(!paths.is_empty(), "no {family} paths at the reflector");
        for (prefix, attrs) in paths {
            let has = |t: u64, val: u64| {
                attrs
                    .iter()
                    .any(|a| a["type"].as_u64() == Some(t) && a["value"].as_u64() == Some(val))
            };
            assert!(has(1, 0), "{prefix}: origin not IGP: {attrs:?}");
            assert!(has(5, 100), "{prefix}: local-pref not 100: {attrs:?}");
        }
    }

    // A borrowed address (worker's pod in worker2's block) goes out as a /32
    // via worker, and its release withdraws it within 1 s.
    lab.grpcurl_as(
        "worker",
        &[
            "-d",
            r#"{"handle":"x.borrow","requested":["10.99.0.9"]}"#,
            "tabby.v1.NodeAgent/Assign",
        ],
    )
    .unwrap();
    let w = lab.node_ip("worker").to_string();
    let host = ("10.99.0.9/32".to_string(), w);
    lab.wait_until(
        "the borrowed /32 at the reflector",
        Duration::from_secs(10),
        || rr_rib(&lab).contains(&host),
    )
    .unwrap();
    lab.grpcurl_as(
        "worker",
        &[
            "-d",
            r#"{"handle":"x.borrow"}"#,
            "tabby.v1.NodeAgent/ReleaseHandle",
        ],
    )
    .unwrap();
    lab.wait_until(
        "the /32 withdrawn on release",
        Duration::from_secs(1),
        || !rr_rib(&lab).contains(&host),
    )
    .unwrap();
    // A pool change (the pool deleted once empty) withdraws its block within 1 s.
    lab.grpcurl_as(
        "worker2",
        &[
            "-d",
            r#"{"handle":"x.extra"}"#,
            "tabby.v1.NodeAgent/ReleaseHandle",
        ],
    )
    .unwrap();
    lab.grpcurl(&["-d", r#"{"name":"extra"}"#, "tabby.v1.IpamAdmin/DeletePool"])
        .unwrap();
    lab.wait_until("the pool's block withdrawn", Duration::from_secs(1), || {
        !rr_rib(&lab).iter().any(|(p, _)| p.starts_with("10.99."))
    })
    .unwrap();
    assert_eq!(
        rr_rib(&lab),
        want,
        "the reflector's RIB after the pool went"
    );

    // A node removal (its pods' addresses released first, as a drain does)
    // withdraws its blocks, both families, within 1 s.
    let listed = lab
        .grpcurl_as("worker2", &["tabby.v1.NodeAgent/ListHandles"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    for h in v["handles"].as_array().cloned().unwrap_or_default() {
        let h = h.as_str().unwrap();
        lab.grpcurl_as(
            "worker2",
            &[
                "-d",
                &format!(r#"{{"handle":"{h}"}}"#),
                "tabby.v1.NodeAgent/ReleaseHandle",
            ],
        )
        .unwrap();
    }
    let w2_addrs = [w2.clone(), lab.node_ip6("worker2").to_string()];
    assert_eq!(
        want.iter().filter(|(_, nh)| w2_addrs.contains(nh)).count(),
        2,
        "{want:?}"
    );
    let freed = lab
        .grpcurl(&[
            "-d",
            r#"{"name":"worker2"}"#,
            "tabby.v1.IpamAdmin/DeleteNode",
        ])
        .unwrap();
    assert!(freed.contains("blocksFreed"), "{freed}");
    lab.wait_until("worker2's blocks withdrawn", Duration::from_secs(1), || {
        !rr_rib(&lab).iter().any(|(_, nh)| w2_addrs.contains(nh))
    })
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
    // Without graceful restart's help the same monitors record withdrawals:
    // the check above could fail.
    let seen: usize = monitors.iter().map(|m| m.withdrawals().len()).sum();
    assert!(seen > 0, "the monitors recorded no withdrawal at all");
}

/// BIRD's routes learned from protocol `proto` (one per node): (prefix,
/// next hop), from `birdc show route protocol <proto>`.
fn bird_routes(lab: &Lab, proto: &str) -> BTreeSet<(String, String)> {
    let out = lab
        .birdc(&["show", "route", "protocol", proto])
        .unwrap_or_default();
    let mut rows = BTreeSet::new();
    let mut prefix: Option<String> = None;
    for l in out.lines() {
        let first = l.split_whitespace().next().unwrap_or_default();
        if !l.starts_with(char::is_whitespace) && first.contains('/') {
            prefix = Some(first.to_string());
        } else if let (Some(p), Some(rest)) = (&prefix, l.trim().strip_prefix("via ")) {
            let nh = rest.split_whitespace().next().unwrap_or_default();
            rows.insert((p.clone(), nh.to_string()));
        }
    }
    rows
}

/// The routes of `table` (the cluster table) whose next hop is one of
/// `node`'s addresses (IPv4 or IPv6).
fn of_node(
    table: &BTreeSet<(String, String)>,
    lab: &Lab,
    node: &str,
) -> BTreeSet<(String, String)> {
    let ip = lab.node_ip(node);
    let ips = [
        ip.to_string(),
        tabby_integration::lab::node_ip_v6(ip).to_string(),
    ];
    table
        .iter()
        .filter(|(_, nh)| ips.contains(nh))
        .cloned()
        .collect()
}

/// A node's kernel route to `dst` (`ip route show <dst>`), or "".
fn kernel_route(lab: &Lab, node: &str, dst: &str) -> String {
    let family = if dst.contains(':') { "-6" } else { "-4" };
    sh(&lab.node_ns(node), &format!("ip {family} route show {dst}"))
        .trim()
        .to_string()
}

/// Sessions held by nodes (Calico's node-specific BGPPeer) with BIRD as a
/// top-of-rack router, in a dual-stack lab: a peer whose node_selector picks
/// control-plane and worker (not worker2). BIRD learns each selected node's
/// IPv4 and IPv6 blocks with that node as next hop (next-hop self); a static
/// route of each family that BIRD exports and the import filter allows
/// reaches the selected nodes' kernels (proto 77), while one inside a pool
/// and one outside the filter do not; a route BIRD withdraws leaves the
/// kernels; a new block reaches BIRD.
#[test]
fn bird_top_of_rack_peers_with_the_selected_nodes() {
    let (mut lab, _d) = common::lab_with(|c| c.dual_stack = true);
    for node in ["control-plane", "worker", "worker2"] {
        lab.add_pod(node, &format!("{}-a", node.replace("control-plane", "cp")))
            .unwrap();
    }
    let selected = ["control-plane", "worker"];
    // 192.0.2.0/24 and 2001:db8:1::/48: allowed; 203.0.113.0/24: not in
    // the filter; 10.244.250.0/24 and fd00:10:244::ff00/120: in the filter
    // but inside a pool (10.244.0.0/16, fd00:10:244::/64).
    let statics = [
        "192.0.2.0/24",
        "203.0.113.0/24",
        "10.244.250.0/24",
        "2001:db8:1::/48",
        "fd00:10:244::ff00/120",
    ];
    lab.add_tor(
        &selected,
        &statics,
        "kubernetes.io/hostname != 'worker2'",
        &["192.0.2.0/24", "10.0.0.0/8", "2001:db8::/32", "fd00::/8"],
    )
    .unwrap();
    let tor6 = tabby_integration::lab::node_ip_v6(tabby_integration::lab::TOR).to_string();
    let table = cluster_table(&lab);
    let tor = tabby_integration::lab::TOR.to_string();
    for node in selected {
        let proto = node.replace('-', "_");
        let want = of_node(&table, &lab, node);
        assert!(
            want.iter().any(|(p, _)| p.contains(':')) && want.iter().any(|(p, _)| !p.contains(':')),
            "{node} holds no block of each family: {table:?}"
        );
        let mut last = BTreeSet::new();
        let r = lab.wait_until(
            &format!("BIRD to learn {node}'s blocks"),
            Duration::from_secs(30),
            || {
                last = bird_routes(&lab, &proto);
                last == want
            },
        );
        assert!(
            r.is_ok(),
            "BIRD from {node}: {last:?}, want {want:?}\nbirdc: {}\nnode log: {}",
            lab.birdc(&["show", "protocols", "all", &proto])
                .unwrap_or_default(),
            std::fs::read_to_string(lab.node_log(node))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("BGP"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let r = lab.wait_until(
            &format!("the imported routes in {node}'s kernel"),
            Duration::from_secs(20),
            || {
                let r = kernel_route(&lab, node, "192.0.2.0/24");
                let r6 = kernel_route(&lab, node, "2001:db8:1::/48");
                r.contains(&format!("via {tor}"))
                    && r.contains("proto 77")
                    && r6.contains(&format!("via {tor6}"))
                    && r6.contains("proto 77")
            },
        );
        assert!(
            r.is_ok(),
            "{node}: ip route: {}\nip -6 route: {}\nBIRD exports: {}\nnode log: {}",
            sh(&lab.node_ns(node), "ip route"),
            sh(&lab.node_ns(node), "ip -6 route"),
            lab.birdc(&["show", "route", "export", &proto])
                .unwrap_or_default(),
            std::fs::read_to_string(lab.node_log(node))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("BGP") || l.contains("WARN") || l.contains("ERROR"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Not imported: outside the filter, inside a pool; nothing on worker2,
    // which holds no session.
    std::thread::sleep(Duration::from_millis(500));
    for node in selected {
        assert_eq!(kernel_route(&lab, node, "203.0.113.0/24"), "", "{node}");
        let r = kernel_route(&lab, node, "10.244.250.0/24");
        assert!(!r.contains(&tor), "{node}: {r}");
        let r = kernel_route(&lab, node, "fd00:10:244::ff00/120");
        assert!(!r.contains(&tor6), "{node}: {r}");
    }
    assert_eq!(kernel_route(&lab, "worker2", "192.0.2.0/24"), "");
    assert_eq!(kernel_route(&lab, "worker2", "2001:db8:1::/48"), "");
    assert!(bird_routes(&lab, "worker2").is_empty());
    let st = lab.grpcurl(&["tabby.v1.BgpAdmin/GetStatus"]).unwrap();
    assert!(st.contains("\"state\": \"NodeHeld\""), "{st}");

    // A new block on worker reaches BIRD, via worker.
    lab.grpcurl(&[
        "-d",
        r#"{"pool":{"name":"extra","cidr":"10.99.0.0/16"}}"#,
        "tabby.v1.IpamAdmin/CreatePool",
    ])
    .unwrap();
    lab.grpcurl_as(
        "worker",
        &[
            "-d",
            r#"{"handle":"x.extra","requested":["10.99.0.5"]}"#,
            "tabby.v1.NodeAgent/Assign",
        ],
    )
    .unwrap();
    let w = lab.node_ip("worker").to_string();
    lab.wait_until("the new block at BIRD", Duration::from_secs(10), || {
        bird_routes(&lab, "worker").contains(&("10.99.0.0/26".to_string(), w.clone()))
    })
    .unwrap();

    // BIRD withdraws the allowed routes: they leave the kernels.
    lab.set_tor_statics(&selected, &["203.0.113.0/24"]).unwrap();
    for node in selected {
        lab.wait_until(
            &format!("the withdrawn routes to leave {node}'s kernel"),
            Duration::from_secs(10),
            || {
                kernel_route(&lab, node, "192.0.2.0/24").is_empty()
                    && kernel_route(&lab, node, "2001:db8:1::/48").is_empty()
            },
        )
        .unwrap();
    }
}
