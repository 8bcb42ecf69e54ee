//! Overlays in real namespaces (#14): the lab on two racks joined by a
//! router that knows no pod routes. Plain routing cannot cross the racks;
//! VXLAN can, both ways; CrossSubnet encapsulates only what crosses racks
//! (the tunnel's counters say so); nodes that leave or move take their FDB,
//! neighbour and route entries along; modes change live under a running
//! ping.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::time::{Duration, Instant};
use tabby_integration::lab::{Lab, LabConfig, Pod};

fn racks() -> (Lab, tempfile::TempDir) {
    lab_with(|c| *c = LabConfig::racks(&c.prefix, c.dir.clone()))
}

fn set_encapsulation(lab: &Lab, enc: &str) {
    lab.grpcurl(&[
        "-d",
        &format!(r#"{{"name":"default-pool","encapsulation":"{enc}"}}"#),
        "tabby.v1.IpamAdmin/UpdatePool",
    ])
    .unwrap();
}

/// The controller's view of what `node` installs, as `dst -> next hop`.
fn show_routes(lab: &Lab, node: &str) -> Vec<(String, String)> {
    let out = lab
        .grpcurl(&[
            "-d",
            &format!(r#"{{"node":"{node}"}}"#),
            "tabby.v1.IpamAdmin/ShowRoutes",
        ])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["routes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|r| r["kind"] != "blackhole")
        .map(|r| {
            (
                r["destination"].as_str().unwrap_or("").to_string(),
                r["nextHop"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// What the controller says each node installs (asked once: its answer is
/// final when UpdatePool returns), as the `ip route` line each route must
/// be, through vxlan.tabby exactly when `tunnelled(node, next hop)`.
fn expected(lab: &Lab, tunnelled: impl Fn(&str, &str) -> bool) -> Vec<(String, Vec<String>)> {
    NODES
        .iter()
        .map(|n| {
            let lines = show_routes(lab, n)
                .into_iter()
                .map(|(dst, gw)| {
                    // As `ip route show proto 77` prints them.
                    let dst = dst.strip_suffix("/32").unwrap_or(&dst);
                    if tunnelled(n, &gw) {
                        format!("{dst} via {gw} dev vxlan.tabby onlink")
                    } else {
                        format!("{dst} via {gw} dev eth0")
                    }
                })
                .collect();
            (n.to_string(), lines)
        })
        .collect()
}

/// Whether every node's kernel holds exactly `want` under proto 77 (its
/// own blackholes apart).
fn converged(lab: &Lab, want: &[(String, Vec<String>)]) -> bool {
    want.iter().all(|(n, lines)| {
        let have: std::collections::BTreeSet<String> =
            sh(&lab.node_ns(n), "ip route show proto 77")
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.starts_with("blackhole"))
                .collect();
        have == lines.iter().cloned().collect()
    })
}

/// TX packets of a node's vxlan.tabby.
fn vxlan_tx(lab: &Lab, node: &str) -> u64 {
    let out = sh(&lab.node_ns(node), "ip -j -s link show vxlan.tabby");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
}

fn tunnel_address(lab: &Lab, node: &str) -> String {
    let out = lab
        .grpcurl(&[
            "-d",
            &format!(r#"{{"handle":"vxlan-tunnel-addr.{node}"}}"#),
            "tabby.v1.IpamAdmin/GetAllocation",
        ])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["allocations"][0]["address"].as_str().unwrap().to_string()
}

const NODES: [&str; 3] = ["control-plane", "worker", "worker2"];

/// A ping that may need a moment: a recreated device takes its routes and
/// entries with it until the node has put them back.
fn ping_retry(from: &Pod, to: std::net::IpAddr) -> bool {
    let t = Instant::now();
    while !ping(from, to, 1) {
        if t.elapsed() > Duration::from_secs(5) {
            return false;
        }
    }
    ping(from, to, 3)
}

#[test]
fn vxlan_crosses_racks_and_cross_subnet_encapsulates_only_across() {
    let (mut lab, _d) = racks();
    let cp = lab.add_pod("control-plane", "cp").unwrap();
    let w = lab.add_pod("worker", "w").unwrap();
    let w2 = lab.add_pod("worker2", "w2").unwrap();

    // Plain routing: same rack works, across racks the router drops it.
    assert!(ping(&w, cp.ip, 2), "same rack, plain");
    assert!(
        !ping(&w, w2.ip, 2),
        "across racks without a tunnel must fail"
    );
    assert!(
        !ping(&w2, cp.ip, 2),
        "across racks without a tunnel must fail"
    );

    // VXLAN: everything through vxlan.tabby.
    set_encapsulation(&lab, "ENCAPSULATION_VXLAN");
    let want = expected(&lab, |_, _| true);
    lab.wait_until("VXLAN on every node", Duration::from_secs(10), || {
        converged(&lab, &want)
    })
    .unwrap();
    assert!(ping(&w, w2.ip, 3), "worker -> worker2 over VXLAN");
    assert!(ping(&w2, w.ip, 3), "worker2 -> worker over VXLAN");
    assert!(ping(&w2, cp.ip, 3), "worker2 -> control-plane over VXLAN");

    // The seed-style views on worker.
    let ns = lab.node_ns("worker");
    let link = sh(&ns, "ip -d link show vxlan.tabby");
    for want in [
        "vxlan id 4096",
        "dstport 4789",
        "nolearning",
        "local 172.18.0.4",
        "mtu 1450",
        &tabby_routing::mac_string(&tabby_routing::vtep_mac("worker")),
    ] {
        assert!(link.contains(want), "{want:?} not in {link}");
    }
    let t_w2 = tunnel_address(&lab, "worker2");
    let mac_w2 = tabby_routing::mac_string(&tabby_routing::vtep_mac("worker2"));
    let fdb = sh(&ns, "bridge fdb show dev vxlan.tabby");
    assert!(
        fdb.contains(&format!("{mac_w2} dst 172.18.1.3 self permanent")),
        "{fdb}"
    );
    let neigh = sh(&ns, "ip neigh show dev vxlan.tabby");
    assert!(
        neigh.contains(&format!("{t_w2} lladdr {mac_w2} PERMANENT proto 77")),
        "{neigh}"
    );
    let addr = sh(&ns, "ip -br addr show dev vxlan.tabby");
    assert!(
        addr.contains(&format!("{}/32", tunnel_address(&lab, "worker"))),
        "{addr}"
    );
    // New pods get the tunnel's MTU; existing ones keep theirs.
    let mtu = |p: &Pod| sh(&p.ns, "cat /sys/class/net/eth0/mtu").trim().to_string();
    let w_new = lab.add_pod("worker", "w-new").unwrap();
    assert_eq!(mtu(&w_new), "1450");
    assert_eq!(mtu(&w), "1500");
    assert!(ping(&w_new, w2.ip, 2), "new pod over VXLAN");
    // The tunnel address is an IPAM allocation under its handle.
    let alloc = allocation(&lab, &t_w2).unwrap();
    assert_eq!(
        alloc["allocations"][0]["handle"],
        "vxlan-tunnel-addr.worker2"
    );
    // ShowIpam lists it with its node.
    let ipam = lab.grpcurl(&["tabby.v1.IpamAdmin/ShowIpam"]).unwrap();
    let ipam: serde_json::Value = serde_json::from_str(&ipam).unwrap();
    let listed = ipam["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "worker2")
        .cloned()
        .unwrap();
    assert_eq!(listed["vxlanTunnelAddress"], t_w2.as_str(), "{listed}");

    // CrossSubnet: worker <-> control-plane plain (same rack), anything to
    // or from worker2 through the tunnel.
    set_encapsulation(&lab, "ENCAPSULATION_VXLAN_CROSS_SUBNET");
    let same_rack = |a: &str, gw: &str| a != "worker2" && gw.starts_with("172.18.0.");
    let want = expected(&lab, |n, gw| !same_rack(n, gw));
    lab.wait_until("CrossSubnet on every node", Duration::from_secs(10), || {
        converged(&lab, &want)
    })
    .unwrap();
    let before = vxlan_tx(&lab, "worker");
    assert!(ping(&w, cp.ip, 5), "same rack, plain");
    assert_eq!(
        vxlan_tx(&lab, "worker"),
        before,
        "same-rack traffic was encapsulated"
    );
    assert!(ping(&w, w2.ip, 5), "across racks, tunnelled");
    assert!(
        vxlan_tx(&lab, "worker") >= before + 5,
        "cross-rack traffic did not go through the tunnel"
    );
    assert!(ping(&w2, w.ip, 3), "worker2 -> worker");

    // New VXLAN settings reach every node without a restart.
    lab.grpcurl(&[
        "-d",
        r#"{"vxlan_vni":7,"vxlan_port":8472}"#,
        "tabby.v1.IpamAdmin/SetIpamConfig",
    ])
    .unwrap();
    lab.wait_until(
        "VNI 7 on port 8472 everywhere",
        Duration::from_secs(10),
        || {
            NODES.iter().all(|n| {
                let l = sh(&lab.node_ns(n), "ip -d link show vxlan.tabby");
                l.contains("vxlan id 7 ") && l.contains("dstport 8472")
            })
        },
    )
    .unwrap();
    assert!(
        ping_retry(&w, w2.ip),
        "across racks on the new VNI and port"
    );
    assert!(ping_retry(&w2, w.ip), "back on the new VNI and port");

    // Back to plain: the device goes, cross-rack fails again.
    set_encapsulation(&lab, "ENCAPSULATION_NONE");
    lab.wait_until("vxlan.tabby removed", Duration::from_secs(10), || {
        NODES
            .iter()
            .all(|n| !sh(&lab.node_ns(n), "ip link show").contains("vxlan.tabby"))
    })
    .unwrap();
    assert!(ping(&w, cp.ip, 2));
    assert!(!ping(&w, w2.ip, 2));
}

#[test]
fn vtep_entries_follow_nodes_that_move_or_leave() {
    let (lab, _d) = racks();
    set_encapsulation(&lab, "ENCAPSULATION_VXLAN");
    // A node that registers (as a real one would, with its certificate).
    let register = |addr: &str| {
        lab.grpcurl_as(
            "ghost",
            &[
                "-d",
                &format!(r#"{{"node":{{"addresses":["{addr}/24"]}}}}"#),
                "tabby.v1.NodeAgent/RegisterNode",
            ],
        )
        .unwrap()
    };
    register("172.18.1.99");
    let mac = tabby_routing::mac_string(&tabby_routing::vtep_mac("ghost"));
    let t = tunnel_address(&lab, "ghost");
    let fdb = |n: &str| sh(&lab.node_ns(n), "bridge fdb show dev vxlan.tabby");
    let neigh = |n: &str| sh(&lab.node_ns(n), "ip neigh show dev vxlan.tabby");
    lab.wait_until("ghost's VTEP everywhere", Duration::from_secs(10), || {
        NODES.iter().all(|n| {
            fdb(n).contains(&format!("{mac} dst 172.18.1.99 "))
                && neigh(n).contains(&format!("{t} lladdr {mac}"))
        })
    })
    .unwrap();
    // It moves: the FDB entries follow, the old destination goes.
    register("172.18.1.98");
    lab.wait_until(
        "ghost's new address everywhere",
        Duration::from_secs(10),
        || {
            NODES.iter().all(|n| {
                let f = fdb(n);
                f.contains(&format!("{mac} dst 172.18.1.98 ")) && !f.contains("172.18.1.99")
            })
        },
    )
    .unwrap();
    // It leaves: its entries go from every node.
    lab.grpcurl(&["-d", r#"{"name":"ghost"}"#, "tabby.v1.IpamAdmin/DeleteNode"])
        .unwrap();
    lab.wait_until("ghost gone everywhere", Duration::from_secs(10), || {
        NODES
            .iter()
            .all(|n| !fdb(n).contains(&mac) && !neigh(n).contains(&mac))
    })
    .unwrap();
    // The other nodes' entries stayed.
    assert!(
        fdb("worker").contains("dst 172.18.1.3"),
        "{}",
        fdb("worker")
    );
}

/// Sent and received of a finished `ping` run.
fn ping_counts(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no summary in {out}"));
    let num = |word: &str| -> u64 {
        let i = line.find(word).unwrap();
        line[..i]
            .trim_end()
            .rsplit([' ', ','])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num("packets transmitted"), num("received"))
}

#[test]
fn modes_change_live_under_a_running_ping() {
    // One L2 segment: every mode can carry the traffic.
    let (mut lab, _d) = lab();
    let a: Pod = lab.add_pod("worker", "a").unwrap();
    let b: Pod = lab.add_pod("worker2", "b").unwrap();
    // Every node holds a block before the changes (a tunnel address then
    // claims none).
    lab.add_pod("control-plane", "c").unwrap();
    let ping = std::process::Command::new("ip")
        .args([
            "netns", "exec", &a.ns, "ping", "-i", "0.05", "-W", "1", "-w", "9",
        ])
        .arg(b.ip.to_string())
        .output();
    let pinger = std::thread::spawn(move || ping);
    std::thread::sleep(Duration::from_millis(1000));
    // Each node's remote routes, counted before: a mode change moves them,
    // it neither adds nor removes any.
    let remote = |n: &str| -> Vec<String> {
        sh(&lab.node_ns(n), "ip route show proto 77")
            .lines()
            .filter(|l| !l.starts_with("blackhole"))
            .map(str::to_string)
            .collect()
    };
    let counts: Vec<usize> = NODES.iter().map(|n| remote(n).len()).collect();
    assert!(counts.iter().all(|c| *c > 0), "{counts:?}");
    let mut took = Vec::new();
    for (enc, tunnelled) in [
        ("ENCAPSULATION_VXLAN", true),
        ("ENCAPSULATION_VXLAN_CROSS_SUBNET", false),
        ("ENCAPSULATION_NONE", false),
    ] {
        set_encapsulation(&lab, enc);
        // Timed from the controller's answer, on the kernels alone (fast to
        // poll): every remote route through the tunnel, or none.
        let t0 = Instant::now();
        lab.wait_until(enc, Duration::from_secs(10), || {
            NODES.iter().zip(&counts).all(|(n, c)| {
                let r = remote(n);
                r.len() == *c && r.iter().all(|l| l.contains("dev vxlan.tabby") == tunnelled)
            })
        })
        .unwrap();
        took.push((enc, t0.elapsed()));
        // Then exactly what the controller says.
        let want = expected(&lab, |_, _| tunnelled);
        assert!(converged(&lab, &want), "{enc}: {want:?}");
        std::thread::sleep(Duration::from_millis(1500));
    }
    let out = pinger.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (sent, received) = ping_counts(&text);
    println!("mode changes converged: {took:?}; ping: {sent} sent, {received} received");
    assert!(sent > 100, "{text}");
    assert!(
        sent - received <= 2,
        "lost {} packets across three mode changes: {text}",
        sent - received
    );
    for (enc, t) in took {
        assert!(
            t < Duration::from_secs(1),
            "{enc} took {t:?} to reach every node"
        );
    }
}
