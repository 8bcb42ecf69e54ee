//! Real-kernel tests of the overlay: `NetlinkOverlay` (vxlan.tabby, tunl0,
//! neighbour and FDB entries) and tunnel routes of `NetlinkRoutes`. Root
//! only: they fail, not skip, without it.
//!
//! Every test makes its own uniquely named namespaces (`tabby-o-<pid>-<n>`)
//! and removes them in a guard, even on failure. Code under test runs on a
//! thread inside a test namespace (via `in_netns`); checks use `ip`,
//! `bridge` and `ping` in the namespace, independently of the code under
//! test. Nothing is added to the machine's own namespace.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;
use tabby_node::kernel::{OverlayTable, Route, RouteTable, RouteTarget, VtepTables};
use tabby_node::netlink::{in_netns, NetlinkOverlay, NetlinkRoutes, RouteEvent, RouteMonitor};
use tabby_node::Error;
use tabby_routing::{mac_string, vtep_mac, Mac, Tunnel, VxlanDevice, VxlanSettings};

/// Runs `bridge -n ns args`, panics on failure, returns stdout.
fn bridge(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    let (ok, out, err) = run("bridge", &all);
    assert!(ok, "bridge {} failed: {err}", all.join(" "));
    out
}

fn ifindex(ns: &str, dev: &str) -> u32 {
    ns_cat(ns, &format!("/sys/class/net/{dev}/ifindex"))
        .parse()
        .unwrap()
}

fn counter(ns: &str, dev: &str, name: &str) -> u64 {
    ns_cat(ns, &format!("/sys/class/net/{dev}/statistics/{name}"))
        .parse()
        .unwrap()
}

/// Runs `f` in `ns` (a thread that joined it), unwrapping in_netns itself.
fn inside<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    in_netns(&path(ns), f).expect("entering test namespace")
}

/// Runs `f` with a fresh `NetlinkOverlay` inside `ns`.
fn overlay<T: Send>(ns: &str, f: impl FnOnce(&mut NetlinkOverlay) -> T + Send) -> T {
    inside(ns, || f(&mut NetlinkOverlay::new().unwrap()))
}

/// A veth pair between two namespaces with addresses on both ends.
fn link_pair(a: &str, a_if: &str, b: &str, b_if: &str, a_addr: &str, b_addr: &str) {
    ip(&[
        "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
    ]);
    for (ns, ifn, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ip(&["-n", ns, "addr", "add", addr, "dev", ifn]);
        ip(&["-n", ns, "link", "set", ifn, "up"]);
    }
}

fn dev(vni: u32, local: &str, node: &str, tunnel_ip: &str) -> VxlanDevice {
    VxlanDevice {
        settings: VxlanSettings { vni, port: 4789 },
        local: local.parse().unwrap(),
        mac: vtep_mac(node),
        tunnel_ip: tunnel_ip.parse().unwrap(),
    }
}

fn show_vxlan(ns: &str) -> String {
    ip(&["-n", ns, "-d", "link", "show", "vxlan.tabby"])
}

fn addrs_vxlan(ns: &str) -> String {
    ip(&["-n", ns, "addr", "show", "dev", "vxlan.tabby"])
}

fn tunnel(dst: &str, gw: &str, t: Tunnel) -> Route {
    Route {
        dst: dst.parse().unwrap(),
        target: RouteTarget::Tunnel(gw.parse().unwrap(), t),
    }
}

fn ipaddr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `ip monitor` of links and addresses in `ns`, for checking that something
/// sends no change requests.
struct Monitor(std::process::Child);

impl Monitor {
    fn start(ns: &str) -> Self {
        let child = Command::new("ip")
            .args(["-n", ns, "monitor", "link", "address", "neigh"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it subscribe.
        std::thread::sleep(Duration::from_millis(300));
        Monitor(child)
    }

    fn stop(mut self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn vxlan_device_is_created_as_asked_and_idempotent() {
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    // No DAD: the kernel's own link-local address then settles at once and
    // makes no notification while the monitor below listens.
    ip(&[
        "netns",
        "exec",
        &n,
        "sysctl",
        "-qw",
        "net.ipv6.conf.default.accept_dad=0",
    ]);
    let d = dev(4096, "10.99.0.1", "node-a", "10.98.0.1");
    overlay(&n, |o| o.ensure_vxlan(&d, 1450)).unwrap();

    let link = show_vxlan(&n);
    eprintln!("{link}");
    let first = link.lines().next().unwrap();
    assert!(
        first.contains("<BROADCAST,MULTICAST,UP,LOWER_UP>"),
        "{link}"
    );
    assert!(first.contains(" mtu 1450 "), "{link}");
    assert!(
        link.contains(&format!("link/ether {} ", mac_string(&vtep_mac("node-a")))),
        "{link}"
    );
    assert!(
        link.contains("vxlan id 4096 local 10.99.0.1 srcport 0 0 dstport 4789 nolearning "),
        "{link}"
    );
    // No underlying device, no group or remote.
    let vx = link.lines().find(|l| l.contains("vxlan id")).unwrap();
    for word in [" dev ", " group ", " remote "] {
        assert!(!vx.contains(word), "{word}: {link}");
    }
    let addrs = addrs_vxlan(&n);
    assert!(
        addrs.contains("inet 10.98.0.1/32 scope global vxlan.tabby"),
        "{addrs}"
    );
    assert_eq!(addrs.matches("inet ").count(), 1, "{addrs}");

    // A second call changes nothing: same device, no notifications.
    let index = ifindex(&n, "vxlan.tabby");
    std::thread::sleep(Duration::from_millis(500));
    let mon = Monitor::start(&n);
    overlay(&n, |o| o.ensure_vxlan(&d, 1450)).unwrap();
    let events = mon.stop();
    assert_eq!(events, "", "a second ensure_vxlan changed something");
    assert_eq!(ifindex(&n, "vxlan.tabby"), index);
    assert_eq!(show_vxlan(&n), link);
    assert_eq!(addrs_vxlan(&n), addrs);
    // The monitor does see a change (an MTU in place).
    let mon = Monitor::start(&n);
    overlay(&n, |o| o.ensure_vxlan(&d, 1440)).unwrap();
    let events = mon.stop();
    assert!(events.contains("vxlan.tabby"), "{events:?}");
    assert_eq!(ifindex(&n, "vxlan.tabby"), index);

    // Over an IPv6 underlay (IPv6 pools) it is vxlan-v6.tabby, made the
    // same way, beside vxlan.tabby.
    let n6 = ns.add();
    let d6 = VxlanDevice {
        local: ipaddr("fd00:99::1"),
        tunnel_ip: ipaddr("fd00:98::1"),
        ..d
    };
    overlay(&n6, |o| o.ensure_vxlan(&d6, 1430)).unwrap();
    let link6 = ip(&["-n", &n6, "-d", "link", "show", "vxlan-v6.tabby"]);
    assert!(link6.contains("vxlan id 4096 local fd00:99::1 "), "{link6}");
    assert!(link6.contains("mtu 1430"), "{link6}");
    let addrs6 = ip(&["-n", &n6, "addr", "show", "dev", "vxlan-v6.tabby"]);
    assert!(
        addrs6.contains("inet6 fd00:98::1/128 scope global"),
        "{addrs6}"
    );
    assert!(!addrs6.contains("inet "), "{addrs6}");
    // Its entries are its own; removing it leaves vxlan.tabby alone.
    overlay(&n6, |o| o.ensure_vxlan(&d, 1450)).unwrap();
    let mac = tabby_routing::vtep_mac_v6("peer");
    let res = overlay(&n6, |o| {
        o.add_fdb(Tunnel::VxlanV6, &[(mac, ipaddr("fd00:99::2"))])
    });
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    let listed = overlay(&n6, |o| o.list_vteps(Tunnel::VxlanV6)).unwrap();
    assert_eq!(listed.fdb, vec![(mac, ipaddr("fd00:99::2"))]);
    assert!(overlay(&n6, |o| o.list_vteps(Tunnel::Vxlan))
        .unwrap()
        .fdb
        .is_empty());
    overlay(&n6, |o| o.remove_vxlan(Tunnel::VxlanV6)).unwrap();
    assert!(show_vxlan(&n6).contains("vxlan.tabby"));
}

#[test]
fn vxlan_device_changes_in_place_or_is_recreated() {
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    // Something else under our name is replaced (no dummy driver here).
    ip(&[
        "-n",
        &n,
        "link",
        "add",
        "vxlan.tabby",
        "type",
        "veth",
        "peer",
        "name",
        "other",
    ]);
    let d = dev(4096, "10.99.0.1", "node-a", "10.98.0.1");
    overlay(&n, |o| o.ensure_vxlan(&d, 1450)).unwrap();
    assert!(show_vxlan(&n).contains("vxlan id 4096 "));
    let index = ifindex(&n, "vxlan.tabby");

    // MTU, MAC, learning, up and addresses change in place.
    ip(&["-n", &n, "link", "set", "vxlan.tabby", "down"]);
    ip(&[
        "-n",
        &n,
        "link",
        "set",
        "vxlan.tabby",
        "type",
        "vxlan",
        "learning",
    ]);
    ip(&[
        "-n",
        &n,
        "addr",
        "add",
        "10.98.9.9/24",
        "dev",
        "vxlan.tabby",
    ]);
    ip(&[
        "-n",
        &n,
        "addr",
        "add",
        "fd00:98::9/64",
        "dev",
        "vxlan.tabby",
        "nodad",
    ]);
    assert!(!show_vxlan(&n).contains("nolearning"));
    let d2 = VxlanDevice {
        mac: vtep_mac("node-b"),
        tunnel_ip: ipaddr("10.98.0.7"),
        ..d
    };
    overlay(&n, |o| o.ensure_vxlan(&d2, 1400)).unwrap();
    assert_eq!(ifindex(&n, "vxlan.tabby"), index, "recreated needlessly");
    let link = show_vxlan(&n);
    assert!(
        link.contains(",UP,") && link.contains(" mtu 1400 "),
        "{link}"
    );
    assert!(link.contains(" nolearning "), "{link}");
    assert!(
        link.contains(&format!("link/ether {} ", mac_string(&vtep_mac("node-b")))),
        "{link}"
    );
    let addrs = addrs_vxlan(&n);
    assert!(addrs.contains("inet 10.98.0.7/32 "), "{addrs}");
    assert!(!addrs.contains("10.98.0.1/32"), "{addrs}");
    assert!(!addrs.contains("10.98.9.9"), "{addrs}");
    assert!(!addrs.contains("fd00:98::9"), "{addrs}");

    // VNI, port and local address need a new device.
    for (i, changed) in [
        VxlanDevice {
            settings: VxlanSettings {
                vni: 4097,
                port: 4789,
            },
            ..d2
        },
        VxlanDevice {
            settings: VxlanSettings {
                vni: 4097,
                port: 8472,
            },
            ..d2
        },
        VxlanDevice {
            local: ipaddr("10.99.0.5"),
            settings: VxlanSettings {
                vni: 4097,
                port: 8472,
            },
            ..d2
        },
    ]
    .into_iter()
    .enumerate()
    {
        let before = ifindex(&n, "vxlan.tabby");
        overlay(&n, |o| o.ensure_vxlan(&changed, 1400)).unwrap();
        assert_ne!(ifindex(&n, "vxlan.tabby"), before, "change {i} not applied");
        let link = show_vxlan(&n);
        let want = format!(
            "vxlan id {} local {} srcport 0 0 dstport {} nolearning ",
            changed.settings.vni, changed.local, changed.settings.port
        );
        assert!(link.contains(&want), "{want}: {link}");
        assert!(
            link.contains(",UP,") && link.contains(" mtu 1400 "),
            "{link}"
        );
        assert!(addrs_vxlan(&n).contains("inet 10.98.0.7/32 "));
    }

    // A VNI beyond 24 bits is refused before the kernel sees it.
    let bad = VxlanDevice {
        settings: VxlanSettings {
            vni: 1 << 24,
            port: 4789,
        },
        ..d
    };
    let err = overlay(&n, |o| o.ensure_vxlan(&bad, 1400)).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");

    // Removing twice is fine.
    overlay(&n, |o| {
        o.remove_vxlan(Tunnel::Vxlan).unwrap();
        o.remove_vxlan(Tunnel::Vxlan).unwrap();
    });
    assert!(!ip(&["-n", &n, "link", "show"]).contains("vxlan.tabby"));
}

#[test]
fn vtep_entries_round_trip() {
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    let mac_b = vtep_mac("node-b");
    let mac_c = vtep_mac("node-c");
    let mac_d = vtep_mac("node-d");

    // Without the device: nothing to list, nothing to add to.
    overlay(&n, |o| {
        assert_eq!(o.list_vteps(Tunnel::Vxlan).unwrap(), VtepTables::default());
        let res = o.add_neigh(Tunnel::Vxlan, &[(ipaddr("10.98.0.2"), mac_b)]);
        match &res[..] {
            [Err(Error::NotFound(m))] => assert!(m.contains("vxlan.tabby"), "{m}"),
            other => panic!("{other:?}"),
        }
        let res = o.add_fdb(Tunnel::Vxlan, &[(mac_b, ipaddr("10.99.0.2"))]);
        assert!(matches!(&res[..], [Err(Error::NotFound(_))]), "{res:?}");
        assert!(o.add_fdb(Tunnel::Vxlan, &[]).is_empty());
    });

    let d = dev(4096, "10.99.0.1", "node-a", "10.98.0.1");
    let neigh = vec![
        (ipaddr("10.98.0.2"), mac_b),
        (ipaddr("10.98.0.3"), mac_c),
        (ipaddr("fd00:98::2"), mac_b),
    ];
    let fdb = vec![(mac_b, ipaddr("10.99.0.2")), (mac_c, ipaddr("10.99.0.3"))];
    let listed = overlay(&n, |o| {
        o.ensure_vxlan(&d, 1450).unwrap();
        assert_eq!(o.list_vteps(Tunnel::Vxlan).unwrap(), VtepTables::default());
        for r in o.add_neigh(Tunnel::Vxlan, &neigh) {
            r.unwrap();
        }
        for r in o.add_fdb(Tunnel::Vxlan, &fdb) {
            r.unwrap();
        }
        // Adding again is a no-op, not an error.
        assert!(o.add_neigh(Tunnel::Vxlan, &neigh).iter().all(|r| r.is_ok()));
        assert!(o.add_fdb(Tunnel::Vxlan, &fdb).iter().all(|r| r.is_ok()));
        o.list_vteps(Tunnel::Vxlan).unwrap()
    });
    let set = |v: &[(IpAddr, Mac)]| v.iter().copied().collect::<BTreeSet<_>>();
    let fset = |v: &[(Mac, IpAddr)]| v.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(set(&listed.neigh), set(&neigh));
    assert_eq!(fset(&listed.fdb), fset(&fdb));

    let shown = ip(&["-n", &n, "neigh", "show", "dev", "vxlan.tabby"]);
    let shown6 = ip(&["-n", &n, "-6", "neigh", "show", "dev", "vxlan.tabby"]);
    eprintln!("{shown}{shown6}");
    for (ip_, mac) in &neigh {
        let want = format!("{ip_} lladdr {} PERMANENT proto 77", mac_string(mac));
        assert!(
            shown.contains(&want) || shown6.contains(&want),
            "{want}: {shown}{shown6}"
        );
    }
    let fdb_shown = bridge(&n, &["fdb", "show", "dev", "vxlan.tabby"]);
    eprintln!("{fdb_shown}");
    for (mac, under) in &fdb {
        let want = format!("{} dst {under} self permanent", mac_string(mac));
        assert!(fdb_shown.contains(&want), "{want}: {fdb_shown}");
    }
    assert_eq!(
        fdb_shown.lines().count(),
        2,
        "no default or other entries: {fdb_shown}"
    );

    // Replacing: a new MAC for a tunnel address, a new underlay for a MAC.
    let listed = overlay(&n, |o| {
        assert!(o
            .add_neigh(Tunnel::Vxlan, &[(ipaddr("10.98.0.2"), mac_d)])
            .iter()
            .all(|r| r.is_ok()));
        assert!(o
            .add_fdb(Tunnel::Vxlan, &[(mac_c, ipaddr("10.99.0.33"))])
            .iter()
            .all(|r| r.is_ok()));
        o.list_vteps(Tunnel::Vxlan).unwrap()
    });
    assert_eq!(
        set(&listed.neigh),
        set(&[
            (ipaddr("10.98.0.2"), mac_d),
            (ipaddr("10.98.0.3"), mac_c),
            (ipaddr("fd00:98::2"), mac_b),
        ])
    );
    assert_eq!(
        fset(&listed.fdb),
        fset(&[(mac_b, ipaddr("10.99.0.2")), (mac_c, ipaddr("10.99.0.33"))])
    );
    let fdb_shown = bridge(&n, &["fdb", "show", "dev", "vxlan.tabby"]);
    assert!(
        fdb_shown.contains(&format!(
            "{} dst 10.99.0.33 self permanent",
            mac_string(&mac_c)
        )),
        "{fdb_shown}"
    );
    assert_eq!(fdb_shown.lines().count(), 2, "{fdb_shown}");

    // Entries tabby did not make but on its device are listed too (the
    // reconciler removes them); neighbours that are not permanent are not.
    ip(&[
        "-n",
        &n,
        "neigh",
        "add",
        "10.98.0.9",
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        "vxlan.tabby",
        "nud",
        "reachable",
    ]);

    // Deleting: one result per entry, in order; missing ones are NotFound.
    let now_neigh = vec![
        (ipaddr("10.98.0.2"), mac_d),
        (ipaddr("10.98.0.3"), mac_c),
        (ipaddr("fd00:98::2"), mac_b),
    ];
    let now_fdb = vec![(mac_b, ipaddr("10.99.0.2")), (mac_c, ipaddr("10.99.0.33"))];
    overlay(&n, |o| {
        let listed = o.list_vteps(Tunnel::Vxlan).unwrap();
        assert_eq!(set(&listed.neigh), set(&now_neigh));
        for r in o.del_neigh(Tunnel::Vxlan, &now_neigh) {
            r.unwrap();
        }
        for r in o.del_fdb(Tunnel::Vxlan, &now_fdb) {
            r.unwrap();
        }
        assert_eq!(o.list_vteps(Tunnel::Vxlan).unwrap(), VtepTables::default());
        let res = o.del_neigh(Tunnel::Vxlan, &now_neigh[..1]);
        assert!(matches!(&res[..], [Err(Error::NotFound(_))]), "{res:?}");
        let res = o.del_fdb(Tunnel::Vxlan, &now_fdb[..1]);
        match &res[..] {
            [Err(Error::NotFound(m))] => {
                assert!(
                    m.contains("deleting FDB entry") && m.contains("vxlan.tabby"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    });
    let shown = ip(&["-n", &n, "neigh", "show", "dev", "vxlan.tabby"]);
    assert!(!shown.contains("PERMANENT"), "{shown}");
    assert_eq!(
        bridge(&n, &["fdb", "show", "dev", "vxlan.tabby"]).trim(),
        ""
    );
}

#[test]
fn tunnel_routes_add_list_del() {
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    let p = ns.add();
    link_pair(&n, "veth0", &p, "veth1", "10.99.0.1/24", "10.99.0.2/24");
    let d = dev(4096, "10.99.0.1", "node-a", "10.98.0.1");
    let routes = vec![
        tunnel("10.97.2.0/26", "10.98.0.2", Tunnel::Vxlan),
        tunnel("10.97.3.0/26", "10.98.0.3", Tunnel::Vxlan),
        tunnel("fd00:97:2::/122", "fd00:98::2", Tunnel::Vxlan),
        Route {
            dst: "10.96.0.0/24".parse().unwrap(),
            target: RouteTarget::Via(ipaddr("10.99.0.2")),
        },
    ];
    let nn = n.clone();
    let routes2 = routes.clone();
    inside(&n, move || {
        let mut o = NetlinkOverlay::new().unwrap();
        let mut t = NetlinkRoutes::new().unwrap();
        // No device: the error names it.
        let res = t.add(&routes2[..1]);
        match &res[..] {
            [Err(Error::NotFound(m))] => assert!(
                m.contains("adding route 10.97.2.0/26 via 10.98.0.2 dev vxlan.tabby onlink")
                    && m.contains("device vxlan.tabby does not exist"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        let res = t.add(&[tunnel("10.97.9.0/26", "10.99.0.9", Tunnel::Ipip)]);
        match &res[..] {
            [Err(Error::NotFound(m))] => assert!(m.contains("device tunl0"), "{m}"),
            other => panic!("{other:?}"),
        }

        o.ensure_vxlan(&d, 1450).unwrap();
        for (r, res) in routes2.iter().zip(t.add(&routes2)) {
            res.unwrap_or_else(|e| panic!("adding {r}: {e}"));
        }
        let listed: BTreeSet<Route> = t.list().unwrap().into_iter().collect();
        assert_eq!(listed, routes2.iter().copied().collect());
        for res in t.add(&routes2) {
            assert!(matches!(res, Err(Error::Exists(_))), "{res:?}");
        }

        // The route monitor sees tunnel routes as such.
        let mut mon = RouteMonitor::new().unwrap();
        ip(&[
            "-n",
            &nn,
            "route",
            "del",
            "10.97.3.0/26",
            "via",
            "10.98.0.3",
            "dev",
            "vxlan.tabby",
        ]);
        loop {
            match mon.next_blocking().unwrap() {
                RouteEvent::Deleted(r) => {
                    assert_eq!(r, routes2[1]);
                    break;
                }
                other => eprintln!("monitor: {other:?}"),
            }
        }
        assert!(t.add(&routes2[1..2])[0].is_ok());
    });

    let v4 = ip(&["-n", &n, "route", "show"]);
    let v6 = ip(&["-n", &n, "-6", "route", "show"]);
    eprintln!("{v4}{v6}");
    assert!(
        v4.contains("10.97.2.0/26 via 10.98.0.2 dev vxlan.tabby proto 77 onlink"),
        "{v4}"
    );
    assert!(
        v4.contains("10.97.3.0/26 via 10.98.0.3 dev vxlan.tabby proto 77 onlink"),
        "{v4}"
    );
    assert!(
        v4.contains("10.96.0.0/24 via 10.99.0.2 dev veth0 proto 77"),
        "{v4}"
    );
    assert!(
        v6.contains("fd00:97:2::/122 via fd00:98::2 dev vxlan.tabby proto 77"),
        "{v6}"
    );

    // A route via the same gateway on another device is not a tunnel
    // route, and deleting the tunnel route leaves it alone.
    ip(&[
        "-n",
        &n,
        "route",
        "add",
        "10.97.4.0/26",
        "via",
        "10.98.0.2",
        "dev",
        "veth0",
        "onlink",
        "proto",
        "77",
    ]);
    let nn = n.clone();
    inside(&n, move || {
        let mut o = NetlinkOverlay::new().unwrap();
        let mut t = NetlinkRoutes::new().unwrap();
        let listed = t.list().unwrap();
        assert!(listed.contains(&Route {
            dst: "10.97.4.0/26".parse().unwrap(),
            target: RouteTarget::Via(ipaddr("10.98.0.2")),
        }));
        let res = t.del(&[tunnel("10.97.4.0/26", "10.98.0.2", Tunnel::Vxlan)]);
        assert!(matches!(&res[..], [Err(Error::NotFound(_))]), "{res:?}");
        assert!(ip(&["-n", &nn, "route", "show"]).contains("10.97.4.0/26 via 10.98.0.2 dev veth0"));

        // This add caches the device's index (and finds the route there).
        assert!(matches!(t.add(&routes[..1])[0], Err(Error::Exists(_))));
        // The device is recreated (its routes go with it): the cached
        // index is stale, and adding still works.
        let d2 = VxlanDevice {
            settings: VxlanSettings {
                vni: 4097,
                port: 4789,
            },
            ..d
        };
        o.ensure_vxlan(&d2, 1450).unwrap();
        let after: Vec<Route> = t
            .list()
            .unwrap()
            .into_iter()
            .filter(|r| matches!(r.target, RouteTarget::Tunnel(..)))
            .collect();
        assert_eq!(after, vec![]);
        for (r, res) in routes.iter().zip(t.add(&routes[..3])) {
            res.unwrap_or_else(|e| panic!("re-adding {r}: {e}"));
        }
        for (r, res) in routes.iter().zip(t.del(&routes)) {
            res.unwrap_or_else(|e| panic!("deleting {r}: {e}"));
        }
        for res in t.del(&routes) {
            assert!(matches!(res, Err(Error::NotFound(_))), "{res:?}");
        }
        // Without the device, deleting is NotFound as well.
        o.remove_vxlan(Tunnel::Vxlan).unwrap();
        let res = t.del(&routes[..1]);
        assert!(matches!(&res[..], [Err(Error::NotFound(_))]), "{res:?}");
    });
    let v4 = ip(&["-n", &n, "route", "show", "proto", "77"]);
    assert_eq!(
        v4.trim(),
        "10.97.4.0/26 via 10.98.0.2 dev veth0 onlink",
        "{v4}"
    );
}

#[test]
fn ipip_without_kernel_support_fails_cleanly() {
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    ip(&[
        "-n", &n, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    let before = ip(&["-n", &n, "-d", "link", "show"]);
    let res = overlay(&n, |o| o.ensure_ipip(ipaddr("10.99.0.1"), 1480));
    let after = ip(&["-n", &n, "-d", "link", "show"]);
    match res {
        Err(e) => {
            let text = e.to_string();
            eprintln!("{text}");
            assert!(text.contains("the kernel has no ipip support"), "{text}");
            assert!(text.contains("tunl0"), "{text}");
            assert_eq!(before, after, "a failed ensure_ipip changed links");
        }
        // A kernel with ipip: tunl0 is up with the MTU.
        Ok(()) => {
            let link = ip(&["-n", &n, "-d", "link", "show", "tunl0"]);
            eprintln!("this kernel has ipip: {link}");
            assert!(
                link.contains(",UP") && link.contains(" mtu 1480 "),
                "{link}"
            );
            overlay(&n, |o| o.ensure_ipip(ipaddr("10.99.0.1"), 1480)).unwrap();
        }
    }
    let err = overlay(&n, |o| o.ensure_ipip(ipaddr("fd00::1"), 1480)).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
}

#[test]
fn uplink_mtu_is_the_mtu_of_the_address_holder() {
    need_root();
    let mut ns = Netns::new();
    let n = ns.add();
    let p = ns.add();
    link_pair(&n, "veth0", &p, "veth1", "10.99.0.1/24", "10.99.0.2/24");
    ip(&["-n", &n, "link", "set", "veth0", "mtu", "1400"]);
    ip(&[
        "-n",
        &n,
        "addr",
        "add",
        "fd00:99::1/64",
        "dev",
        "veth0",
        "nodad",
    ]);
    overlay(&n, |o| {
        assert_eq!(o.uplink_mtu(ipaddr("10.99.0.1")).unwrap(), 1400);
        assert_eq!(o.uplink_mtu(ipaddr("fd00:99::1")).unwrap(), 1400);
        assert_eq!(o.uplink_mtu(ipaddr("127.0.0.1")).unwrap(), 65536);
        // The peer's address is not ours.
        let err = o.uplink_mtu(ipaddr("10.99.0.2")).unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        assert!(err.to_string().contains("10.99.0.2"), "{err}");
    });
}

/// One node of the data path test.
struct Node {
    ns: String,
    underlay: &'static str,
    tunnel_ip: &'static str,
    mac: Mac,
    pod: &'static str,
}

#[test]
fn vxlan_carries_pod_traffic_between_namespaces() {
    need_root();
    let mut ns = Netns::new();
    let a = Node {
        ns: ns.add(),
        underlay: "10.99.0.1",
        tunnel_ip: "10.98.0.1",
        mac: vtep_mac("node-a"),
        pod: "10.97.1.1",
    };
    let b = Node {
        ns: ns.add(),
        underlay: "10.99.0.2",
        tunnel_ip: "10.98.0.2",
        mac: vtep_mac("node-b"),
        pod: "10.97.2.1",
    };
    link_pair(&a.ns, "eth0", &b.ns, "eth0", "10.99.0.1/24", "10.99.0.2/24");
    for (me, peer) in [(&a, &b), (&b, &a)] {
        let pod = format!("{}/32", me.pod);
        // The "pod": an address on one end of a veth pair (no dummy
        // driver here).
        ip(&[
            "-n", &me.ns, "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
        ]);
        ip(&["-n", &me.ns, "addr", "add", &pod, "dev", "pod0"]);
        ip(&["-n", &me.ns, "link", "set", "pod0", "up"]);
        let d = VxlanDevice {
            settings: VxlanSettings::default(),
            local: ipaddr(me.underlay),
            mac: me.mac,
            tunnel_ip: ipaddr(me.tunnel_ip),
        };
        inside(&me.ns, || {
            let mut o = NetlinkOverlay::new().unwrap();
            let mtu = o.uplink_mtu(d.local).unwrap() - Tunnel::Vxlan.overhead();
            o.ensure_vxlan(&d, mtu).unwrap();
            assert!(o
                .add_neigh(Tunnel::Vxlan, &[(ipaddr(peer.tunnel_ip), peer.mac)])
                .iter()
                .all(|r| r.is_ok()));
            assert!(o
                .add_fdb(Tunnel::Vxlan, &[(peer.mac, ipaddr(peer.underlay))])
                .iter()
                .all(|r| r.is_ok()));
            let mut t = NetlinkRoutes::new().unwrap();
            let r = tunnel(&format!("{}/32", peer.pod), peer.tunnel_ip, Tunnel::Vxlan);
            for res in t.add(&[r]) {
                res.unwrap();
            }
        });
        assert!(show_vxlan(&me.ns).contains(" mtu 1450 "));
    }

    let (tx_before, rx_before) = (
        counter(&a.ns, "vxlan.tabby", "tx_packets"),
        counter(&a.ns, "vxlan.tabby", "rx_packets"),
    );
    let eth_before = counter(&a.ns, "eth0", "tx_packets");
    let (ok, out, err) = run(
        "ip",
        &[
            "netns", "exec", &a.ns, "ping", "-c", "2", "-W", "2", "-I", a.pod, b.pod,
        ],
    );
    eprintln!("{out}{err}");
    assert!(ok, "ping {} -> {} failed: {out}{err}", a.pod, b.pod);
    assert!(out.contains("2 received"), "{out}");
    let tx = counter(&a.ns, "vxlan.tabby", "tx_packets") - tx_before;
    let rx = counter(&a.ns, "vxlan.tabby", "rx_packets") - rx_before;
    let eth = counter(&a.ns, "eth0", "tx_packets") - eth_before;
    eprintln!(
        "{}",
        ip(&["-n", &a.ns, "-s", "link", "show", "vxlan.tabby"])
    );
    // Both echo requests left through the tunnel and both replies came
    // back through it; the underlay carried the encapsulated requests.
    assert!(tx >= 2 && rx >= 2, "vxlan.tabby tx {tx} rx {rx}");
    assert!(eth >= 2, "eth0 tx {eth}");
    // No ARP over the tunnel: the neighbour entry is the permanent one.
    let neigh = ip(&["-n", &a.ns, "neigh", "show", "dev", "vxlan.tabby"]);
    assert_eq!(
        neigh.trim(),
        format!(
            "{} lladdr {} PERMANENT proto 77",
            b.tunnel_ip,
            mac_string(&b.mac)
        ),
        "{neigh}"
    );
}
