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
