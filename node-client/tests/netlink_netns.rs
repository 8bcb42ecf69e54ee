//! Real-kernel tests of `tabby_node::netlink`, root only.
//!
//! Every test makes its own uniquely named namespaces (`tabby-n-<pid>-<n>`)
//! and removes them in a guard, even on failure. Code under test runs on a
//! thread inside the test's "node" namespace (via `in_netns`); checks use
//! `ip -n <ns>` from outside. Nothing is added to the machine's own
//! namespace. Connectivity is checked with TCP connects between namespaces,
//! so no `ping` is needed.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use ipnet::IpNet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tabby_node::kernel::{Route, RouteTable, RouteTarget};
use tabby_node::netlink::{
    check_pod, get_sysctl, host_veth_name, in_netns, link_exists, monitor_routes, set_sysctl,
    wire_pod, NetlinkRoutes, PodSpec, RouteEvent, RouteMonitor,
};
use tabby_node::Error;

fn ip_ok(args: &[&str]) -> bool {
    run("ip", args).0
}

/// Runs `f` in `ns` (a thread that joined it), unwrapping in_netns itself.
fn inside<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    in_netns(&path(ns), f).expect("entering test namespace")
}

/// A veth pair between two namespaces with addresses on both ends.
fn link_pair(a: &str, a_if: &str, b: &str, b_if: &str, a_addrs: &[&str], b_addrs: &[&str]) {
    ip(&[
        "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
    ]);
    for (ns, ifn, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ip(&["-n", ns, "addr", "add", addr, "dev", ifn, "nodad"]);
            } else {
                ip(&["-n", ns, "addr", "add", addr, "dev", ifn]);
            }
        }
        ip(&["-n", ns, "link", "set", ifn, "up"]);
    }
}

/// Whether a TCP connection from namespace `from` to `addr` (listened on in
/// namespace `to`) works, exchanging one byte each way.
fn tcp_works(from: &str, to: &str, addr: IpAddr) -> bool {
    let listener = inside(to, || TcpListener::bind(SocketAddr::new(addr, 0)))
        .unwrap_or_else(|e| panic!("listening on {addr} in {to}: {e}"));
    let target = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        s.write_all(&b)
    });
    let ok = inside(from, || -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    });
    match ok {
        Ok(()) => {
            server.join().unwrap().unwrap();
            true
        }
        Err(e) => {
            eprintln!("tcp {from} -> {target} failed: {e}");
            // Unblock the accept so the thread ends.
            let _ = inside(to, || {
                TcpStream::connect_timeout(&target, Duration::from_secs(1))
            });
            let _ = server.join();
            false
        }
    }
}

fn via(dst: &str, gw: &str) -> Route {
    Route {
        dst: dst.parse().unwrap(),
        target: RouteTarget::Via(gw.parse().unwrap()),
    }
}

fn blackhole(dst: &str) -> Route {
    Route {
        dst: dst.parse().unwrap(),
        target: RouteTarget::Blackhole,
    }
}

/// A node namespace `n` with `veth0` to a peer namespace (10.77.0.2,
/// fd00:77::2 are gateways).
fn node_with_peer(ns: &mut Netns) -> String {
    let n = ns.add();
    let p = ns.add();
    link_pair(
        &n,
        "veth0",
        &p,
        "veth1",
        &["10.77.0.1/24", "fd00:77::1/64"],
        &["10.77.0.2/24", "fd00:77::2/64"],
    );
    n
}

fn test_routes() -> Vec<Route> {
    let mut routes = Vec::new();
    for i in 0..25 {
        routes.push(via(&format!("10.200.{i}.0/24"), "10.77.0.2"));
        routes.push(via(&format!("fd00:200:{i:x}::/64"), "fd00:77::2"));
    }
    for i in 0..5 {
        routes.push(blackhole(&format!("10.201.{i}.0/26")));
        routes.push(blackhole(&format!("fd00:201:{i:x}::/122")));
    }
    routes
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn routes_add_list_del() {
    need_root();
    let mut ns = Netns::new();
    let n = node_with_peer(&mut ns);
    // Routes that are not tabby's: a static one and another protocol's.
    ip(&[
        "-n",
        &n,
        "route",
        "add",
        "10.210.0.0/24",
        "via",
        "10.77.0.2",
    ]);
    ip(&[
        "-n",
        &n,
        "route",
        "add",
        "10.211.0.0/24",
        "via",
        "10.77.0.2",
        "proto",
        "99",
    ]);
    ip(&[
        "-n",
        &n,
        "-6",
        "route",
        "add",
        "fd00:211::/64",
        "via",
        "fd00:77::2",
        "proto",
        "99",
    ]);
    let foreign_before = ip(&["-n", &n, "route", "show", "proto", "99"]);

    let routes = test_routes();
    let expected: std::collections::BTreeSet<Route> = routes.iter().copied().collect();
    inside(&n, || {
        let mut t = NetlinkRoutes::new().unwrap();
        assert!(t.list().unwrap().is_empty());
        for (r, res) in routes.iter().zip(t.add(&routes)) {
            res.unwrap_or_else(|e| panic!("adding {r}: {e}"));
        }
        let listed: std::collections::BTreeSet<Route> = t.list().unwrap().into_iter().collect();
        assert_eq!(listed, expected);
        // EEXIST maps to Exists, per route, in order.
        for (r, res) in routes.iter().zip(t.add(&routes)) {
            assert!(matches!(res, Err(Error::Exists(_))), "{r}: {res:?}");
        }
        let mixed = [
            via("10.202.0.0/24", "10.77.0.2"),
            routes[0],
            blackhole("10.202.1.0/24"),
        ];
        let res = t.add(&mixed);
        assert!(res[0].is_ok() && res[2].is_ok(), "{res:?}");
        assert!(matches!(res[1], Err(Error::Exists(_))), "{res:?}");
        assert!(t.del(&[mixed[0], mixed[2]]).iter().all(|r| r.is_ok()));
        // An unreachable gateway is a netlink error naming the route.
        let res = t.add(&[via("10.203.0.0/24", "10.250.0.1")]);
        match &res[0] {
            Err(Error::Netlink(e)) => {
                assert!(e.op.contains("10.203.0.0/24 via 10.250.0.1"), "{e}");
                assert_eq!(e.errno, tabby_node::error::Errno::ENETUNREACH, "{e}");
            }
            other => panic!("unreachable gateway: {other:?}"),
        }
        // Foreign routes are neither listed nor deletable by tabby.
        let foreign = [
            via("10.210.0.0/24", "10.77.0.2"),
            via("10.211.0.0/24", "10.77.0.2"),
            via("fd00:211::/64", "fd00:77::2"),
        ];
        for r in &foreign {
            assert!(!listed.contains(r));
        }
        for (r, res) in foreign.iter().zip(t.del(&foreign)) {
            assert!(matches!(res, Err(Error::NotFound(_))), "{r}: {res:?}");
        }
    });

    // `ip route show proto 77` lists exactly ours (and omits the protocol
    // it filtered on); the full table shows the protocol.
    let v4 = ip(&["-n", &n, "route", "show", "proto", "77"]);
    let v6 = ip(&["-n", &n, "-6", "route", "show", "proto", "77"]);
    assert_eq!(lines(&v4).len(), 30, "{v4}");
    assert_eq!(lines(&v6).len(), 30, "{v6}");
    let all4 = ip(&["-n", &n, "route", "show"]);
    let all6 = ip(&["-n", &n, "-6", "route", "show"]);
    assert_eq!(all4.matches(" proto 77").count(), 30, "{all4}");
    assert_eq!(all6.matches(" proto 77").count(), 30, "{all6}");
    assert!(
        all4.contains("10.200.0.0/24 via 10.77.0.2 dev veth0 proto 77"),
        "{all4}"
    );
    assert!(
        all4.contains("10.200.24.0/24 via 10.77.0.2 dev veth0 proto 77"),
        "{all4}"
    );
    assert!(all4.contains("blackhole 10.201.4.0/26 proto 77"), "{all4}");
    assert!(
        all6.contains("fd00:200:18::/64 via fd00:77::2 dev veth0 proto 77"),
        "{all6}"
    );
    assert!(
        all6.contains("blackhole fd00:201:4::/122 dev lo proto 77"),
        "{all6}"
    );

    inside(&n, || {
        let mut t = NetlinkRoutes::new().unwrap();
        for (r, res) in routes.iter().zip(t.del(&routes)) {
            res.unwrap_or_else(|e| panic!("deleting {r}: {e}"));
        }
        assert!(t.list().unwrap().is_empty());
        for (r, res) in routes.iter().zip(t.del(&routes)) {
            assert!(matches!(res, Err(Error::NotFound(_))), "{r}: {res:?}");
        }
    });
    assert_eq!(ip(&["-n", &n, "route", "show", "proto", "77"]).trim(), "");
    assert_eq!(
        ip(&["-n", &n, "-6", "route", "show", "proto", "77"]).trim(),
        ""
    );
    // The foreign routes are untouched.
    assert_eq!(
        ip(&["-n", &n, "route", "show", "proto", "99"]),
        foreign_before
    );
    assert!(ip(&["-n", &n, "route", "show", "10.210.0.0/24"]).contains("via 10.77.0.2"));
    assert!(ip(&["-n", &n, "-6", "route", "show", "proto", "99"]).contains("fd00:211::/64"));
}

/// Node `n` with an "ext" namespace behind `ext0` (10.99.0.2, fd00:99::2) as
/// its default gateway, forwarding on, routes back to the pod range.
fn node_with_ext(ns: &mut Netns) -> (String, String) {
    let n = ns.add();
    let e = ns.add();
    link_pair(
        &n,
        "ext0",
        &e,
        "ext1",
        &["10.99.0.1/24", "fd00:99::1/64"],
        &["10.99.0.2/24", "fd00:99::2/64"],
    );
    ip(&["-n", &n, "route", "add", "default", "via", "10.99.0.2"]);
    ip(&[
        "-n",
        &n,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:99::2",
    ]);
    ip(&["-n", &e, "route", "add", "10.88.0.0/16", "via", "10.99.0.1"]);
    ip(&[
        "-n",
        &e,
        "-6",
        "route",
        "add",
        "fd00:88::/64",
        "via",
        "fd00:99::1",
    ]);
    inside(&n, || {
        set_sysctl("net/ipv4/ip_forward", "1").unwrap();
        set_sysctl("net/ipv6/conf/all/forwarding", "1").unwrap();
    });
    (n, e)
}

fn pod_spec(pod_ns: &str, key: &str, addrs: &[&str]) -> PodSpec {
    PodSpec {
        owner: format!("net.{key}"),
        netns_path: path(pod_ns),
        host_ifname: host_veth_name(key),
        pod_ifname: "eth0".into(),
        addresses: addrs.iter().map(|a| a.parse::<IpNet>().unwrap()).collect(),
        mtu: 1400,
    }
}

#[test]
fn wire_pod_dual_stack() {
    need_root();
    let root_forward = get_sysctl("net/ipv4/ip_forward").unwrap();
    let mut ns = Netns::new();
    let (n, e) = node_with_ext(&mut ns);
    // set_sysctl acted on the thread's namespace, not the process's.
    assert_eq!(ns_cat(&n, "/proc/sys/net/ipv4/ip_forward"), "1");
    assert_eq!(get_sysctl("net/ipv4/ip_forward").unwrap(), root_forward);
    assert_eq!(
        inside(&n, || get_sysctl("net/ipv4/ip_forward")).unwrap(),
        "1"
    );

    let p = ns.add();
    let spec = pod_spec(
        &p,
        &format!("default.pod-{p}"),
        &["10.88.0.5/32", "fd00:88::5/128"],
    );
    let host = spec.host_ifname.clone();
    let started = Instant::now();
    let w = inside(&n, || wire_pod(&spec)).unwrap();
    eprintln!("wire_pod took {:?}", started.elapsed());
    assert_eq!(w.host_ifname, host);
    assert_eq!(w.host_mac, "ee:ee:ee:ee:ee:ee");
    assert_eq!(w.pod_ifname, "eth0");
    assert!(inside(&n, || link_exists(&host)));
    assert!(
        !link_exists(&host),
        "nothing in the machine's own namespace"
    );

    // Pod side.
    let addr4 = ip(&["-n", &p, "-4", "-br", "addr", "show", "dev", "eth0"]);
    assert!(
        addr4.contains("UP") && addr4.contains("10.88.0.5/32"),
        "{addr4}"
    );
    assert_eq!(addr4.matches('/').count(), 1, "{addr4}");
    let addr6 = ip(&[
        "-n", &p, "-6", "addr", "show", "dev", "eth0", "scope", "global",
    ]);
    assert!(addr6.contains("inet6 fd00:88::5/128"), "{addr6}");
    let link = ip(&["-n", &p, "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(
        link.contains(&format!("link/ether {}", w.pod_mac)),
        "{link}"
    );
    assert!(link.contains(&format!("{}:", w.pod_ifindex)), "{link}");
    assert!(ip(&["-n", &p, "link", "show", "lo"]).contains(",UP"));
    let r4 = ip(&["-n", &p, "route"]);
    assert!(r4.contains("default via 169.254.1.1 dev eth0"), "{r4}");
    assert!(r4.contains("169.254.1.1 dev eth0 scope link"), "{r4}");
    let r6 = ip(&["-n", &p, "-6", "route"]);
    assert!(
        r6.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{r6}"
    );
    let neigh = ip(&["-n", &p, "neigh"]);
    assert!(
        neigh.contains("169.254.1.1 dev eth0 lladdr ee:ee:ee:ee:ee:ee PERMANENT"),
        "{neigh}"
    );
    let neigh6 = ip(&["-n", &p, "-6", "neigh"]);
    assert!(
        neigh6.contains("fe80::ecee:eeff:feee:eeee dev eth0 lladdr ee:ee:ee:ee:ee:ee PERMANENT"),
        "{neigh6}"
    );

    // Host side.
    let hl = ip(&["-n", &n, "link", "show", &host]);
    assert!(hl.contains("link/ether ee:ee:ee:ee:ee:ee"), "{hl}");
    assert!(hl.contains("mtu 1400") && hl.contains(",UP"), "{hl}");
    assert!(
        hl.starts_with(&format!("{}: {host}@", w.host_ifindex)),
        "{hl}"
    );
    let ha = ip(&["-n", &n, "addr", "show", "dev", &host]);
    assert!(!ha.contains("inet "), "host side has no IPv4 address: {ha}");
    let nr = ip(&["-n", &n, "route"]);
    // Protocol boot (not shown by ip), not tabby's 77.
    assert!(
        nr.lines()
            .any(|l| l.trim() == format!("10.88.0.5 dev {host} scope link")),
        "{nr}"
    );
    let nr6 = ip(&["-n", &n, "-6", "route"]);
    assert!(nr6.contains(&format!("fd00:88::5 dev {host}")), "{nr6}");
    for (file, want) in [
        (format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp"), "1"),
        (format!("/proc/sys/net/ipv4/neigh/{host}/proxy_delay"), "0"),
        (format!("/proc/sys/net/ipv4/conf/{host}/forwarding"), "1"),
        (format!("/proc/sys/net/ipv6/conf/{host}/proxy_ndp"), "1"),
        (format!("/proc/sys/net/ipv6/conf/{host}/accept_ra"), "0"),
        (format!("/proc/sys/net/ipv6/conf/{host}/forwarding"), "1"),
    ] {
        assert_eq!(ns_cat(&n, &file), want, "{file}");
    }

    // Traffic: the node's own address, and through the node to ext.
    assert!(tcp_works(&p, &n, "10.99.0.1".parse().unwrap()));
    assert!(tcp_works(&p, &e, "10.99.0.2".parse().unwrap()));
    assert!(tcp_works(&p, &n, "fd00:99::1".parse().unwrap()));
    assert!(tcp_works(&p, &e, "fd00:99::2".parse().unwrap()));
    // Without the permanent entry, proxy ARP answers for the gateway.
    ip(&["-n", &p, "neigh", "del", "169.254.1.1", "dev", "eth0"]);
    assert!(tcp_works(&p, &e, "10.99.0.2".parse().unwrap()));
    let learned = ip(&["-n", &p, "neigh", "show", "169.254.1.1"]);
    assert!(learned.contains("lladdr ee:ee:ee:ee:ee:ee"), "{learned}");
    assert!(!learned.contains("PERMANENT"), "{learned}");

    inside(&n, || check_pod(&spec)).unwrap();

    // Wiring again: Exists, and the existing veth is left alone.
    match inside(&n, || wire_pod(&spec)) {
        Err(Error::Exists(_)) => {}
        other => panic!("second wire_pod: {other:?}"),
    }
    assert!(ip_ok(&["-n", &n, "link", "show", &host]));
    inside(&n, || check_pod(&spec)).unwrap();

    // CHECK notices a missing address.
    ip(&["-n", &p, "addr", "del", "10.88.0.5/32", "dev", "eth0"]);
    match inside(&n, || check_pod(&spec)) {
        Err(Error::Invalid(m)) => assert!(m.contains("addresses"), "{m}"),
        other => panic!("check after removing the address: {other:?}"),
    }
    // ... and a missing host route.
    ip(&[
        "-n",
        &n,
        "-6",
        "route",
        "del",
        "fd00:88::5/128",
        "dev",
        &host,
    ]);
    match inside(&n, || check_pod(&spec)) {
        Err(Error::Invalid(m)) => assert!(m.contains("host route fd00:88::5/128"), "{m}"),
        other => panic!("check after removing the route: {other:?}"),
    }

    let retired = inside(&n, || tabby_node::netlink::retire_owned(&spec.owner)).unwrap();
    inside(&n, || tabby_node::netlink::delete_link_named(&retired[0])).unwrap();
    assert!(!ip_ok(&["-n", &n, "link", "show", &host]));
    assert!(!ip_ok(&["-n", &p, "link", "show", "eth0"]));
    assert!(!ip(&["-n", &n, "route"]).contains("10.88.0.5"));
}

#[test]
fn retiring_is_idempotent_and_needs_no_netns() {
    use tabby_node::netlink::{delete_link_named, retire_owned};
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    let p = ns.add();
    let spec = pod_spec(&p, "container-a", &["10.88.0.6/32"]);
    let host = spec.host_ifname.clone();
    inside(&n, || wire_pod(&spec)).unwrap();
    assert!(ip(&["-n", &n, "route"]).contains(&format!("10.88.0.6 dev {host} scope link")));
    let r = inside(&n, || retire_owned(&spec.owner)).unwrap();
    assert_eq!(r.len(), 1);
    assert!(
        inside(&n, || retire_owned(&spec.owner)).unwrap().is_empty(),
        "DEL again: nothing to do"
    );
    assert!(!ip_ok(&["-n", &n, "link", "show", &host]));
    assert!(!ip(&["-n", &n, "route"]).contains("10.88.0.6"));
    inside(&n, || delete_link_named(&r[0])).unwrap();
    inside(&n, || delete_link_named(&r[0])).unwrap();

    // Netns gone first (the runtime deleted it, and the pair with it), then DEL.
    let p2 = ns.add();
    let spec2 = pod_spec(&p2, "container-b", &["10.88.0.7/32"]);
    inside(&n, || wire_pod(&spec2)).unwrap();
    ip(&["netns", "del", &p2]);
    let gone = Instant::now();
    while ip_ok(&["-n", &n, "link", "show", &spec2.host_ifname])
        && gone.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(inside(&n, || retire_owned(&spec2.owner))
        .unwrap()
        .is_empty());

    // Never wired: nothing to do. No owner: refused.
    assert!(inside(&n, || retire_owned("net.never")).unwrap().is_empty());
    match inside(&n, || retire_owned("")) {
        Err(Error::Invalid(_)) => {}
        other => panic!("retire without owner: {other:?}"),
    }
    let _ = host_veth_name("unused");
}

/// Interfaces of a namespace, by name.
fn links(ns: &str) -> Vec<String> {
    ip(&["-n", ns, "-br", "link"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|s| s.split('@').next().unwrap().to_string())
        .collect()
}

#[test]
fn wire_pod_failures_leave_nothing_behind() {
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    let p = ns.add();

    // No such netns; a path that is not a netns.
    let mut spec = pod_spec(&p, "bad-netns", &["10.88.0.9/32"]);
    spec.netns_path = PathBuf::from(format!("/var/run/netns/{p}-missing"));
    let err = inside(&n, || wire_pod(&spec)).unwrap_err();
    assert!(matches!(err, Error::Io(..)), "{err}");
    spec.netns_path = PathBuf::from("/proc/self/status");
    let err = inside(&n, || wire_pod(&spec)).unwrap_err();
    eprintln!("not a netns: {err}");
    spec.netns_path = PathBuf::new();
    assert!(inside(&n, || wire_pod(&spec)).is_err());
    assert_eq!(links(&n), ["lo"]);

    // Bad MTUs.
    for mtu in [0, 10, 70_000] {
        let mut spec = pod_spec(&p, "bad-mtu", &["10.88.0.9/32"]);
        spec.mtu = mtu;
        let err = inside(&n, || wire_pod(&spec)).unwrap_err();
        eprintln!("mtu {mtu}: {err}");
        assert_eq!(links(&n), ["lo"], "mtu {mtu}");
        assert_eq!(links(&p), ["lo"], "mtu {mtu}");
    }

    // Failure after the veth exists: IPv6 is disabled in the pod namespace,
    // so its address cannot be added; the veth must be rolled back.
    inside(&p, || {
        set_sysctl("net/ipv6/conf/all/disable_ipv6", "1").unwrap();
        set_sysctl("net/ipv6/conf/default/disable_ipv6", "1").unwrap();
    });
    let spec = pod_spec(&p, "midway", &["10.88.0.9/32", "fd00:88::9/128"]);
    let err = inside(&n, || wire_pod(&spec)).unwrap_err();
    eprintln!("midway: {err}");
    assert!(err.to_string().contains("fd00:88::9"), "{err}");
    assert!(!err.to_string().contains("cleanup failed"), "{err}");
    assert_eq!(links(&n), ["lo"]);
    assert_eq!(links(&p), ["lo"]);
    assert!(!ip(&["-n", &n, "route"]).contains("10.88.0.9"));
}

#[test]
fn monitor_reports_deleted_routes() {
    need_root();
    let mut ns = Netns::new();
    let n = node_with_peer(&mut ns);
    ip(&[
        "-n",
        &n,
        "route",
        "add",
        "10.212.0.0/24",
        "via",
        "10.77.0.2",
        "proto",
        "99",
    ]);
    let a = via("10.200.0.0/24", "10.77.0.2");
    let b = via("fd00:200::/64", "fd00:77::2");
    let c = blackhole("10.201.0.0/26");
    let ns_name = n.clone();
    inside(&n, move || {
        let mut t = NetlinkRoutes::new().unwrap();
        assert!(t.add(&[a, b, c]).iter().all(|r| r.is_ok()));

        // Async monitor.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut mon = RouteMonitor::new().unwrap();
        // A foreign route deletion produces no event; ours does.
        ip(&[
            "-n",
            &ns_name,
            "route",
            "del",
            "10.212.0.0/24",
            "proto",
            "99",
        ]);
        let started = Instant::now();
        ip(&[
            "-n",
            &ns_name,
            "route",
            "del",
            "10.200.0.0/24",
            "proto",
            "77",
        ]);
        let ev = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), mon.next()).await })
            .expect("no event within 5 s")
            .unwrap();
        eprintln!("deletion noticed after {:?}", started.elapsed());
        assert_eq!(ev, RouteEvent::Deleted(a));

        // Blocking variant, IPv6.
        let mut mon = RouteMonitor::new().unwrap();
        ip(&[
            "-n",
            &ns_name,
            "-6",
            "route",
            "del",
            "fd00:200::/64",
            "proto",
            "77",
        ]);
        assert_eq!(mon.next_blocking().unwrap(), RouteEvent::Deleted(b));
    });

    // The callback loop, on its own thread; keep deleting and re-adding a
    // route until it has seen one (it subscribes asynchronously).
    let n2 = n.clone();
    let watcher = std::thread::spawn(move || {
        inside(&n2, || {
            let mut seen = 0;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(monitor_routes(|ev| {
                seen += usize::from(matches!(ev, RouteEvent::Deleted(_)));
                seen == 0
            }))
            .map(|()| seen)
        })
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !watcher.is_finished() {
        assert!(Instant::now() < deadline, "monitor_routes saw no deletion");
        let _ = run(
            "ip",
            &["-n", &n, "route", "del", "10.201.0.0/26", "proto", "77"],
        );
        std::thread::sleep(Duration::from_millis(50));
        let _ = run(
            "ip",
            &[
                "-n",
                &n,
                "route",
                "add",
                "blackhole",
                "10.201.0.0/26",
                "proto",
                "77",
            ],
        );
    }
    assert_eq!(watcher.join().unwrap().unwrap(), 1);
}

#[test]
fn retire_takes_a_pod_out_of_service_and_reaper_deletes_it() {
    use tabby_node::netlink::{owned_links, retire_owned, retired_links, RETIRED_PREFIX};
    use tabby_node::reaper::Reaper;
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    let p = ns.add();
    let spec = pod_spec(&p, "container-r", &["10.88.0.9/32"]);
    let host = spec.host_ifname.clone();
    let owner = spec.owner.clone();
    inside(&n, || wire_pod(&spec)).unwrap();
    assert!(ip(&["-n", &n, "link", "show", &host]).contains(&format!("alias {owner}")));
    assert_eq!(
        inside(&n, || owned_links(&owner)).unwrap(),
        vec![host.clone()]
    );
    // Another owner retires nothing (a late DEL of an old sandbox).
    assert!(inside(&n, || retire_owned("net.someone-else"))
        .unwrap()
        .is_empty());
    assert!(ip_ok(&["-n", &n, "link", "show", &host]));
    let retired = inside(&n, || retire_owned(&owner)).unwrap();
    assert_eq!(retired.len(), 1);
    let retired = retired[0].clone();
    assert!(retired.starts_with(RETIRED_PREFIX));
    // At once: the name is free, the /32 route is gone, the link is down.
    assert!(!ip_ok(&["-n", &n, "link", "show", &host]));
    assert!(!ip(&["-n", &n, "route"]).contains("10.88.0.9"));
    let l = ip(&["-n", &n, "link", "show", &retired]);
    assert!(!l.contains("state UP") && !l.contains(",UP"), "{l}");
    assert_eq!(inside(&n, retired_links).unwrap(), vec![retired.clone()]);
    // Retiring again (DEL repeated) finds nothing.
    assert!(inside(&n, || retire_owned(&owner)).unwrap().is_empty());
    assert!(inside(&n, || owned_links(&owner)).unwrap().is_empty());
    // The reaper deletes it; settle() for the pod's netns waits for that.
    let pod_path = spec.netns_path.clone();
    inside(&n, move || {
        let r = Reaper::start().expect("starting the reaper");
        r.settle(&pod_path);
        assert_eq!(r.pending(), 0);
    });
    assert!(!ip_ok(&["-n", &n, "link", "show", &retired]));
    assert!(
        !ip_ok(&["-n", &p, "link", "show", "eth0"]),
        "the peer went with it"
    );
    // Wire, retire through the reaper, settle, and wire the same pod again.
    inside(&n, || wire_pod(&spec)).unwrap();
    inside(&n, || {
        let r = Reaper::start().expect("starting the reaper");
        assert_eq!(r.retire(&spec.owner, Some(&spec.netns_path)).unwrap(), 1);
        r.settle(&spec.netns_path);
        wire_pod(&spec).unwrap();
    });
}

/// What reclaim reads from the kernel: handles of tabby's attachments in
/// service, and for one of them the addresses of tabby's host routes. Not
/// foreign veths (even with an alias), not retired ones, not routes of
/// another protocol through the same veth.
#[test]
fn held_attachments_are_read_back_from_the_kernel() {
    use tabby_node::netlink::{attachment_owners, held_attachment, retire_owned};
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    let (p1, p2) = (ns.add(), ns.add());
    let a = pod_spec(&p1, "held-a", &["10.88.0.8/32", "fd00:88::8/128"]);
    let b = pod_spec(&p2, "held-b", &["10.88.0.9/32"]);
    inside(&n, || wire_pod(&a)).unwrap();
    inside(&n, || wire_pod(&b)).unwrap();
    // A foreign veth with an alias, and a foreign route through a's veth.
    ip(&[
        "-n", &n, "link", "add", "other0", "type", "veth", "peer", "name", "other1",
    ]);
    ip(&["-n", &n, "link", "set", "other0", "alias", "net.foreign"]);
    ip(&[
        "-n",
        &n,
        "route",
        "add",
        "10.99.0.1/32",
        "dev",
        &a.host_ifname,
        "proto",
        "static",
    ]);

    let mut owners = inside(&n, attachment_owners).unwrap();
    owners.sort();
    assert_eq!(owners, vec![a.owner.clone(), b.owner.clone()]);
    let held = inside(&n, || held_attachment(&a.owner)).unwrap().unwrap();
    assert_eq!(held.host_ifname, a.host_ifname);
    let mut addrs: Vec<String> = held.addresses.iter().map(ToString::to_string).collect();
    addrs.sort();
    assert_eq!(
        addrs,
        vec!["10.88.0.8", "fd00:88::8"],
        "tabby's routes only"
    );
    assert!(inside(&n, || held_attachment("net.foreign"))
        .unwrap()
        .is_none());

    // Retired by a DEL: no longer held.
    inside(&n, || retire_owned(&b.owner)).unwrap();
    assert!(inside(&n, || held_attachment(&b.owner)).unwrap().is_none());
    assert_eq!(
        inside(&n, attachment_owners).unwrap(),
        vec![a.owner.clone()]
    );
}

#[test]
fn the_node_address_comes_from_the_default_routes_interface() {
    need_root();
    let mut ns = Netns::new();
    let n = node_with_peer(&mut ns);
    // Another route of another table and protocol must not confuse it.
    ip(&[
        "-n",
        &n,
        "route",
        "add",
        "10.99.0.0/24",
        "via",
        "10.77.0.2",
        "proto",
        "99",
    ]);
    ip(&["-n", &n, "route", "add", "default", "via", "10.77.0.2"]);
    let addrs = inside(&n, || tabby_node::detect::node_addresses().unwrap());
    // With the prefix of their subnet: CrossSubnet compares subnets.
    assert_eq!(
        addrs,
        vec![
            "10.77.0.1/24".parse::<ipnet::IpNet>().unwrap(),
            "fd00:77::1/64".parse().unwrap()
        ]
    );
    // A bare --node-ip takes the prefix of the interface holding it.
    let n2 = n.clone();
    let given = inside(&n2, || {
        tabby_node::detect::with_prefix("10.77.0.1").unwrap()
    });
    assert_eq!(given, "10.77.0.1/24".parse::<ipnet::IpNet>().unwrap());
    let n3 = n.clone();
    let elsewhere = inside(&n3, || tabby_node::detect::with_prefix("10.1.2.3").unwrap());
    assert_eq!(elsewhere, "10.1.2.3/32".parse::<ipnet::IpNet>().unwrap());
    // Without a default route it says what to pass instead.
    ip(&["-n", &n, "route", "del", "default"]);
    let e = inside(&n, || tabby_node::detect::node_addresses().unwrap_err());
    assert!(e.to_string().contains("--node-ip"), "{e}");
}
