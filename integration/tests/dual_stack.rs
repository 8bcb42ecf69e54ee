//! Dual stack (#14): with an IPv4 and an IPv6 pool, every pod gets an
//! address of each family (IPv6 gateway fe80::ecee:eeff:feee:eeee, as in
//! Calico); ping and ping6 cross nodes, with plain routing and with the IPv4
//! pool on VXLAN; IPv6 egress is masqueraded by `ip6 tabby`.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use tabby_integration::lab::{Pod, OUTSIDE_V6, POOL_V6};

/// The pod's addresses from its CNI result, IPv4 then IPv6.
fn addrs(p: &Pod) -> (IpAddr, IpAddr) {
    let ips: Vec<IpAddr> = p.result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let v4 = *ips
        .iter()
        .find(|a| a.is_ipv4())
        .unwrap_or_else(|| panic!("no IPv4 in {}", p.result));
    let v6 = *ips
        .iter()
        .find(|a| a.is_ipv6())
        .unwrap_or_else(|| panic!("no IPv6 in {}", p.result));
    (v4, v6)
}

/// Once the routes to a just-made pod are in (a few ms after its ADD),
/// every echo comes back.
fn ping_any(from: &Pod, to: IpAddr) -> bool {
    let t = std::time::Instant::now();
    while !ping(from, to, 1) {
        if t.elapsed() > Duration::from_secs(5) {
            return false;
        }
    }
    ping(from, to, 3)
}

#[test]
fn pods_get_both_families_and_reach_each_other_and_the_outside() {
    let (mut lab, _d) = lab_with(|c| c.dual_stack = true);
    let a = lab.add_pod("worker", "a").unwrap();
    let b = lab.add_pod("worker2", "b").unwrap();
    let c = lab.add_pod("control-plane", "c").unwrap();
    let (a4, a6) = addrs(&a);
    let (b4, b6) = addrs(&b);
    let (_, c6) = addrs(&c);
    let pool6: ipnet::IpNet = POOL_V6.parse().unwrap();
    assert!(pool6.contains(&a6) && pool6.contains(&b6), "{a6} {b6}");
    assert!(a4.is_ipv4());

    // The pod's IPv6 view: its /128 and the gateway Calico uses.
    let r6 = sh(&a.ns, "ip -6 route");
    assert!(
        r6.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{r6}"
    );
    let addr6 = sh(&a.ns, "ip -6 -br addr show dev eth0");
    assert!(addr6.contains(&format!("{a6}/128")), "{addr6}");

    // Across nodes, both families.
    assert!(ping_any(&a, b4), "ping worker -> worker2");
    assert!(ping_any(&a, b6), "ping6 worker -> worker2");
    assert!(ping_any(&b, a6), "ping6 worker2 -> worker");
    assert!(ping_any(&b, c6), "ping6 worker2 -> control-plane");

    // IPv6 egress leaves with the node's IPv6 address (ip6 tabby).
    let nft = sh(&lab.node_ns("worker2"), "nft list table ip6 tabby");
    assert!(nft.contains(POOL_V6), "{nft}");
    let out: SocketAddr = format!("[{OUTSIDE_V6}]:8080").parse().unwrap();
    let seen = seen_source(&lab.outside(), &b.ns, out).unwrap();
    assert_eq!(seen, lab.node_ip6("worker2").to_string());
    // Pod to pod is never masqueraded.
    let to_a: SocketAddr = format!("[{a6}]:8081").parse().unwrap();
    assert_eq!(seen_source(&a.ns, &b.ns, to_a).unwrap(), b6.to_string());

    // The IPv4 pool on VXLAN: both families still cross nodes (IPv6 stays
    // plain: its pool has no encapsulation).
    lab.grpcurl(&[
        "-d",
        r#"{"name":"default-pool","encapsulation":"ENCAPSULATION_VXLAN"}"#,
        "tabby.v1.IpamAdmin/UpdatePool",
    ])
    .unwrap();
    lab.wait_until(
        "v4 routes through vxlan.tabby",
        Duration::from_secs(10),
        || sh(&lab.node_ns("worker"), "ip route show proto 77").contains("dev vxlan.tabby"),
    )
    .unwrap();
    assert!(ping_any(&a, b4), "ping over VXLAN");
    assert!(ping_any(&a, b6), "ping6 alongside VXLAN");
    // A pod made now gets both families too.
    let d = lab.add_pod("worker2", "d").unwrap();
    let (_, d6) = addrs(&d);
    assert!(ping_any(&a, d6), "ping6 to a new pod");
}

#[test]
fn ipv6_vxlan_carries_both_families_across_racks() {
    let (mut lab, _d) = lab_with(|c| {
        *c = tabby_integration::lab::LabConfig::racks(&c.prefix, c.dir.clone());
        c.dual_stack = true;
    });
    let a = lab.add_pod("worker", "a").unwrap();
    let b = lab.add_pod("worker2", "b").unwrap();
    let (a4, a6) = addrs(&a);
    let (b4, b6) = addrs(&b);
    // Plain: the router drops pod traffic of both families between racks.
    assert!(
        !ping(&a, b6, 2),
        "ping6 across racks without a tunnel must fail"
    );
    assert!(
        !ping(&a, b4, 2),
        "ping across racks without a tunnel must fail"
    );
    for (pool, enc) in [
        ("default-pool-v6", "ENCAPSULATION_VXLAN_CROSS_SUBNET"),
        ("default-pool", "ENCAPSULATION_VXLAN"),
    ] {
        lab.grpcurl(&[
            "-d",
            &format!(r#"{{"name":"{pool}","encapsulation":"{enc}"}}"#),
            "tabby.v1.IpamAdmin/UpdatePool",
        ])
        .unwrap();
    }
    lab.wait_until(
        "IPv6 routes through vxlan-v6.tabby",
        Duration::from_secs(10),
        || {
            sh(&lab.node_ns("worker"), "ip -6 route show proto 77").contains("dev vxlan-v6.tabby")
                && sh(&lab.node_ns("worker2"), "ip -6 route show proto 77")
                    .contains("dev vxlan-v6.tabby")
        },
    )
    .unwrap();
    assert!(
        ping_any(&a, b6),
        "ping6 worker -> worker2 over vxlan-v6.tabby"
    );
    assert!(
        ping_any(&b, a6),
        "ping6 worker2 -> worker over vxlan-v6.tabby"
    );
    assert!(ping_any(&a, b4), "ping worker -> worker2 over vxlan.tabby");
    assert!(ping_any(&b, a4), "ping worker2 -> worker over vxlan.tabby");
    // The device: over the node's IPv6 address, 70 bytes below the uplink.
    let ns = lab.node_ns("worker");
    let link = sh(&ns, "ip -d link show vxlan-v6.tabby");
    let mac = tabby_routing::mac_string(&tabby_routing::vtep_mac_v6("worker"));
    for want in [
        "vxlan id 4096",
        "local fd00:18::4",
        "mtu 1430",
        "nolearning",
        mac.as_str(),
    ] {
        assert!(link.contains(want), "{want:?} not in {link}");
    }
    let fdb = sh(&ns, "bridge fdb show dev vxlan-v6.tabby");
    let mac2 = tabby_routing::mac_string(&tabby_routing::vtep_mac_v6("worker2"));
    assert!(
        fdb.contains(&format!("{mac2} dst fd00:18:1::3 self permanent")),
        "{fdb}"
    );
    // Its tunnel address is an IPv6 allocation under its own handle.
    let out = lab
        .grpcurl(&[
            "-d",
            r#"{"handle":"vxlan-v6-tunnel-addr.worker2"}"#,
            "tabby.v1.IpamAdmin/GetAllocation",
        ])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let t6: IpAddr = v["allocations"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(t6.is_ipv6() && POOL_V6.parse::<ipnet::IpNet>().unwrap().contains(&t6));
    let neigh = sh(&ns, "ip -6 neigh show dev vxlan-v6.tabby");
    assert!(
        neigh.contains(&format!("{t6} lladdr {mac2} PERMANENT proto 77")),
        "{neigh}"
    );
}
