//! Pods, nodes, node clients and the controller coming and going.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use tabby_integration::netns;

#[test]
fn deleting_a_pod_removes_its_route_and_does_not_reuse_its_address_at_once() {
    let (mut lab, _d) = lab();
    let a = lab.add_pod("worker", "a").unwrap();
    let node = lab.node_ns("worker");
    assert!(sh(&node, "ip route").contains(&format!("{} dev tab", a.ip)));
    lab.del_pod("a", true).unwrap();
    assert!(
        !sh(&node, "ip route").contains(&format!("{} dev tab", a.ip)),
        "the /32 is gone"
    );
    lab.wait_until("the host veth is gone", Duration::from_secs(2), || {
        !sh(&node, "ip link").contains("tab")
    })
    .unwrap();
    assert!(
        allocation(&lab, &a.ip.to_string()).is_none(),
        "address released"
    );
    let b = lab.add_pod("worker", "b").unwrap();
    assert_ne!(
        b.ip, a.ip,
        "a just-freed address is not handed out again at once"
    );
}

#[test]
fn a_port_joining_the_fabric_does_not_cut_nodes_off_the_controller() {
    let (lab, _d) = lab();
    let (f, w) = (lab.fabric(), lab.node_ns("worker"));
    let br0_mac = || {
        sh(&f, "ip -br link show br0")
            .split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string()
    };
    let join = |port: &str, mac: &str| {
        netns::ip(
            &f,
            &format!("link add {port} address {mac} type veth peer name {port}-p"),
        )
        .unwrap();
        netns::ip(&f, &format!("link set {port} master br0 up")).unwrap();
        netns::ip(&f, &format!("link set {port}-p up")).unwrap();
    };
    let ping = || sh(&w, "ping -c1 -W1 172.18.0.1");
    // The worker resolves the controller's address while the lowest port MAC
    // is 02:..:02, then a port with 02:..:01 joins. An unpinned bridge moves
    // to the new MAC, and the worker's frames to the cached one are dropped
    // until its ARP entry expires: a node joining cuts another one off.
    join("low2", "02:00:00:00:00:02");
    netns::ip(&w, "neigh flush dev eth0").unwrap();
    let out = ping();
    assert!(out.contains(" 0% packet loss"), "{out}");
    join("low1", "02:00:00:00:00:01");
    assert_eq!(br0_mac(), tabby_integration::lab::FABRIC_MAC);
    let out = ping();
    assert!(out.contains(" 0% packet loss"), "{out}");
}

/// A controller whose data directory is restored from a copy forgets the
/// addresses assigned after it. The node clients hold those pods: the resume
/// they ask for is refused (its epoch is unknown to the copy), and after the
/// snapshot they assign their pods' addresses again, so the restored
/// controller cannot hand them to new pods.
#[test]
fn a_controller_restored_from_an_older_copy_learns_the_pods_again() {
    let (mut lab, _d) = lab();
    let before = lab.add_pod("worker", "before").unwrap();
    let data = lab.cfg.dir.join("controller-data");
    let copy = lab.cfg.dir.join("controller-copy");
    let restart = |lab: &mut tabby_integration::lab::Lab| {
        lab.signal("controller", nix::sys::signal::Signal::SIGTERM)
            .unwrap();
    };
    restart(&mut lab);
    netns::run(
        "cp",
        &["-a", data.to_str().unwrap(), copy.to_str().unwrap()],
    )
    .unwrap();
    lab.start_controller().unwrap();
    let after = lab.add_pod("worker2", "after").unwrap();
    let handle = holder(&lab, &after.ip.to_string()).expect("assigned");

    restart(&mut lab);
    std::fs::remove_dir_all(&data).unwrap();
    netns::run(
        "cp",
        &["-a", copy.to_str().unwrap(), data.to_str().unwrap()],
    )
    .unwrap();
    let mark = lab.log_mark("worker2");
    lab.start_controller().unwrap();
    lab.wait_node_log(
        "worker2",
        mark,
        "attachments reclaimed confirmed=1 problems=0",
        Duration::from_secs(15),
    )
    .unwrap();
    assert_eq!(holder(&lab, &after.ip.to_string()), Some(handle.clone()));
    let alloc = allocation(&lab, &after.ip.to_string()).unwrap();
    let id = handle.rsplit_once('.').unwrap().1;
    assert_eq!(alloc["attributes"]["container_id"], id, "{alloc}");
    // Known all along: still there.
    assert!(holder(&lab, &before.ip.to_string()).is_some());
    // A new pod on the same node (the restored store had no block for it)
    // gets another address.
    let new = lab.add_pod("worker2", "new").unwrap();
    assert_ne!(new.ip, after.ip);
}

#[test]
fn a_node_added_later_converges_within_a_second() {
    let (mut lab, _d) = lab();
    for n in ["control-plane", "worker", "worker2"] {
        lab.add_pod(n, &format!("p-{}", n.len())).unwrap();
    }
    lab.add_node("worker3", Ipv4Addr::new(172, 18, 0, 6))
        .unwrap();
    lab.wait_node_synced("worker3", 0, Duration::from_secs(10))
        .unwrap();
    let t = Instant::now();
    let p = lab.add_pod("worker3", "late").unwrap();
    let block = blocks(&lab)
        .into_iter()
        .find(|(_, n)| n == "worker3")
        .expect("worker3 claimed a block")
        .0;
    let others: Vec<(String, String)> = blocks(&lab)
        .into_iter()
        .filter(|(_, n)| n != "worker3")
        .collect();
    let elapsed = lab
        .wait_until(
            "every node routes worker3's block and worker3 routes every block",
            Duration::from_secs(5),
            || {
                let to_new = ["control-plane", "worker", "worker2"].iter().all(|n| {
                    sh(&lab.node_ns(n), "ip route show proto 77")
                        .contains(&format!("{block} via 172.18.0.6"))
                });
                let from_new = sh(&lab.node_ns("worker3"), "ip route show proto 77");
                to_new
                    && others
                        .iter()
                        .all(|(c, _)| from_new.contains(&format!("{c} via")))
            },
        )
        .unwrap();
    println!(
        "converged {:?} after the ADD returned ({:?} including ADD)",
        elapsed,
        t.elapsed()
    );
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert!(
        ping(&p, lab.pod("p-13").unwrap().ip, 2),
        "worker3 pod reaches control-plane pod"
    );
}

#[test]
fn killing_a_node_client_keeps_traffic_and_its_restart_changes_nothing() {
    let (mut lab, _d) = lab();
    let p = lab.add_pod("worker2", "p").unwrap();
    let q = lab.add_pod("control-plane", "q").unwrap();
    let before = tabby_routes(&lab, "worker2");
    let nft_before = sh(&lab.node_ns("worker2"), "nft list table ip tabby");
    // 60 pings over ~3 s across the kill and the restart.
    let pinger = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p.ns,
            "ping",
            "-c",
            "60",
            "-i",
            "0.05",
            "-W",
            "1",
            &q.ip.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lab.kill_node("worker2").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        tabby_routes(&lab, "worker2"),
        before,
        "routes stay while tabby-node is down"
    );
    let mark = lab.log_mark("worker2");
    lab.start_node("worker2").unwrap();
    lab.wait_node_synced("worker2", mark, Duration::from_secs(10))
        .unwrap();
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" 0% packet loss"),
        "continuous ping lost packets:\n{text}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let after = tabby_routes(&lab, "worker2");
    assert_eq!(after, before, "no duplicate or stale routes after restart");
    assert_eq!(
        sh(&lab.node_ns("worker2"), "nft list table ip tabby"),
        nft_before
    );
}

#[test]
fn controller_outage_keeps_routes_and_traffic_and_add_fails_with_code_11() {
    let (mut lab, _d) = lab();
    let p = lab.add_pod("worker2", "p").unwrap();
    let q = lab.add_pod("worker", "q").unwrap();
    let before: Vec<Vec<String>> = ["control-plane", "worker", "worker2"]
        .iter()
        .map(|n| tabby_routes(&lab, n))
        .collect();
    lab.kill_controller().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let during: Vec<Vec<String>> = ["control-plane", "worker", "worker2"]
        .iter()
        .map(|n| tabby_routes(&lab, n))
        .collect();
    assert_eq!(
        during, before,
        "no route removed while the controller is away"
    );
    assert!(ping(&p, q.ip, 3), "pod traffic flows during the outage");
    // ADD during the outage: CNI error 11, try again later; nothing left behind.
    let ns = TestNs::new(&lab, "outage");
    let cfg = lab.cni_config("worker");
    let (ok, err) = lab
        .cni(
            "worker",
            "ADD",
            "outage1",
            &ns.path(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=outage",
            &cfg,
        )
        .unwrap();
    drop(ns);
    assert!(!ok);
    assert_eq!(err["code"], 11, "{err}");
    // The controller returns: every node resumes its watch where it left off
    // (nothing changed the intent), without a snapshot; ADD works again.
    let mark = lab.controller_log_mark();
    lab.start_controller().unwrap();
    lab.wait_until(
        "the three nodes resumed without a snapshot",
        Duration::from_secs(15),
        || {
            let log = lab.controller_log_since(mark);
            let resumed = log
                .lines()
                .filter(|l| l.contains("intent watcher connected"))
                .collect::<Vec<_>>();
            assert!(
                resumed.iter().all(|l| l.contains("snapshot=false")),
                "a node got a snapshot: {resumed:#?}"
            );
            resumed.len() >= 3
        },
    )
    .unwrap();
    let c = lab.add_pod("control-plane", "after").unwrap();
    lab.wait_until("worker2 routes again", Duration::from_secs(10), || {
        ping(&p, c.ip, 1)
    })
    .unwrap();
}

#[test]
fn borrowed_address_works_across_nodes_via_its_host_route() {
    // 10.245.0.0/29 in /30 blocks: two blocks for three nodes.
    let (mut lab, _d) = lab_with(|c| {
        c.pool = "10.245.0.0/29".into();
        c.block_size = 30;
    });
    let a = lab.add_pod("control-plane", "a").unwrap();
    let b = lab.add_pod("worker", "b").unwrap();
    // worker2 finds no block left: it borrows from another node's block.
    let c = lab.add_pod("worker2", "c").unwrap();
    let alloc = allocation(&lab, &c.ip.to_string()).expect("allocated");
    assert_eq!(alloc["allocations"][0]["borrowed"], true, "{alloc}");
    let w2 = lab.node_ip("worker2");
    for n in ["control-plane", "worker"] {
        lab.wait_until(
            "the /32 of the borrowed address",
            Duration::from_secs(5),
            || {
                tabby_routes(&lab, n)
                    .iter()
                    .any(|l| l.starts_with(&format!("{} via {w2}", c.ip)))
            },
        )
        .unwrap();
    }
    assert!(
        ping(&a, c.ip, 3) && ping(&c, a.ip, 3),
        "borrowed <-> block owner"
    );
    assert!(
        ping(&b, c.ip, 3) && ping(&c, b.ip, 3),
        "borrowed <-> third node"
    );
}

#[test]
fn restart_cleans_stale_tabby_routes_only_and_hand_changes_are_undone() {
    let (mut lab, _d) = lab();
    lab.add_pod("worker", "w").unwrap();
    let ns = lab.node_ns("worker2");
    lab.kill_node("worker2").unwrap();
    // A stale tabby route, a static route and another protocol's route.
    netns::ip(&ns, "route add 10.99.0.0/26 via 172.18.0.4 proto 77").unwrap();
    netns::ip(&ns, "route add 10.98.0.0/24 via 172.18.0.4").unwrap();
    netns::ip(&ns, "route add 10.97.0.0/24 via 172.18.0.4 proto 99").unwrap();
    let mark = lab.log_mark("worker2");
    lab.start_node("worker2").unwrap();
    lab.wait_node_synced("worker2", mark, Duration::from_secs(10))
        .unwrap();
    lab.wait_until("stale tabby route removed", Duration::from_secs(5), || {
        !sh(&ns, "ip route").contains("10.99.0.0/26")
    })
    .unwrap();
    let r = sh(&ns, "ip route");
    assert!(
        r.contains("10.98.0.0/24 via 172.18.0.4"),
        "static route untouched: {r}"
    );
    let p99 = sh(&ns, "ip route show proto 99");
    assert!(
        p99.contains("10.97.0.0/24 via 172.18.0.4"),
        "other protocol untouched: {p99}"
    );
    // Delete a tabby route by hand: it comes back.
    let victim = tabby_routes(&lab, "worker2")
        .into_iter()
        .find(|l| l.contains(" via "))
        .expect("a remote route");
    let dst = victim.split_whitespace().next().unwrap().to_string();
    netns::ip(&ns, &format!("route del {dst}")).unwrap();
    let t = lab
        .wait_until(
            "hand-deleted route restored",
            Duration::from_secs(5),
            || tabby_routes(&lab, "worker2").contains(&victim),
        )
        .unwrap();
    println!("restored after {t:?}");
    // Delete tabby's nftables table by hand: it comes back too.
    netns::exec(&ns, &["nft", "delete", "table", "ip", "tabby"]).unwrap();
    lab.wait_until("table ip tabby restored", Duration::from_secs(10), || {
        sh(&ns, "nft list table ip tabby").contains("masquerade fully-random")
    })
    .unwrap();
    // Edit it by hand (empty a set, add a rule, add a chain): each edit is
    // reported by nftables, noticed, and undone (long before the periodic
    // check, which is a minute away).
    let want = sh(&ns, "nft list table ip tabby");
    assert!(want.contains("10."), "masq-pools has elements: {want}");
    for edit in [
        "flush set ip tabby masq-pools",
        "add rule ip tabby postrouting counter accept",
        "add chain ip tabby extra",
    ] {
        let mark = lab.log_mark("worker2");
        let args: Vec<&str> = std::iter::once("nft")
            .chain(edit.split_whitespace())
            .collect();
        netns::exec(&ns, &args).unwrap();
        lab.wait_node_log(
            "worker2",
            mark,
            "is not what tabby wrote",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{edit}: not noticed: {e}"));
        let t = lab
            .wait_until(
                "hand edits of table ip tabby undone",
                Duration::from_secs(10),
                || sh(&ns, "nft list table ip tabby") == want,
            )
            .unwrap();
        println!("{edit}: undone after {t:?}");
    }
}

#[test]
fn ipip_without_kernel_support_is_reported_not_routed() {
    // This kernel has no ipip module: an IPIP pool cannot be applied.
    let (lab, _d) = lab();
    let mark = lab.log_mark("worker");
    lab.grpcurl(&[
        "-d",
        r#"{"pool":{"name":"overlay","cidr":"10.50.0.0/16","encapsulation":"ENCAPSULATION_IPIP"}}"#,
        "tabby.v1.IpamAdmin/CreatePool",
    ])
    .unwrap();
    lab.wait_node_log("worker", mark, "IPIP pool overlay:", Duration::from_secs(5))
        .unwrap();
    let log = std::fs::read_to_string(lab.node_log("worker")).unwrap();
    assert!(log.contains("the kernel has no ipip support"), "{log}");
    // A block of it on worker2: worker gets no (failing) route for it.
    lab.grpcurl_as(
        "worker2",
        &[
            "-d",
            r#"{"handle":"x.overlay","requested":["10.50.0.5"]}"#,
            "tabby.v1.NodeAgent/Assign",
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The node's status says so too (grpcurl over the node's socket).
    let g = lab.cfg.grpcurl.display().to_string();
    let sock = lab.socket("worker").display().to_string();
    let st = tabby_integration::netns::run(
        &g,
        &[
            "-plaintext",
            "-authority",
            "localhost",
            "-unix",
            &sock,
            "tabby.v1.PodNetwork/Status",
        ],
    )
    .unwrap();
    assert!(
        st.contains("\"unsupported\"")
            && st.contains("\"IPIP pool overlay: the kernel has no ipip support\""),
        "{st}"
    );
    assert!(st.contains("\"ready\": true"), "{st}");
    // Nothing else broke: the route reconciled without an error.
    assert!(!st.contains("lastError"), "{st}");
    // gRPC health on the node's socket, for the service and the server.
    for svc in [r#"{"service":"tabby.v1.PodNetwork"}"#, "{}"] {
        let h = tabby_integration::netns::run(
            &g,
            &[
                "-plaintext",
                "-authority",
                "localhost",
                "-d",
                svc,
                "-unix",
                &sock,
                "grpc.health.v1.Health/Check",
            ],
        )
        .unwrap();
        assert!(
            h.contains("SERVING") && !h.contains("NOT_SERVING"),
            "{svc}: {h}"
        );
    }
    // Its CIDR is in the NAT "all pools" set, but no route points into it.
    let nft = sh(&lab.node_ns("worker"), "nft list set ip tabby all-pools");
    assert!(nft.contains("10.50.0.0/16"), "{nft}");
    assert!(!sh(&lab.node_ns("worker"), "ip route").contains("10.50."));
}

#[test]
fn a_failed_add_rolls_back_and_the_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (lab, _d) = lab();
    let mode = std::fs::metadata(lab.socket("worker"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the CNI socket is for root only");
    // Made reachable by mistake (a chmod here), the socket still answers
    // only root: tabby-node checks each caller's uid (SO_PEERCRED).
    let sock = lab.socket("worker");
    let mut p = sock.parent().map(std::path::Path::to_path_buf);
    while let Some(d) = p {
        if !d.starts_with(_d.path()) {
            break;
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        p = d.parent().map(std::path::Path::to_path_buf);
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let status = |uid: Option<u32>| {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(lab.cfg.bin_dir.join("tabby"));
        cmd.env("CNI_COMMAND", "STATUS")
            .env("CNI_PATH", &lab.cfg.bin_dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(u) = uid {
            cmd.uid(u).gid(u);
        }
        let mut child = cmd.spawn().unwrap();
        let mut cfg = lab.cni_config("worker");
        cfg["cniVersion"] = "1.1.0".into();
        let cfg = cfg.to_string();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(cfg.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = status(Some(65534));
    assert!(
        !ok && out.contains("65534"),
        "uid 65534 was not refused: {out}"
    );
    let (ok, out) = status(None);
    assert!(ok, "root was refused: {out}");
    // The DaemonSet's readiness probe: `tabby-node ready` on the socket.
    let r = std::process::Command::new(lab.cfg.bin_dir.join("tabby-node"))
        .args(["ready", "--cni-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(r.status.success(), "tabby-node ready: {r:?}");
    let log = std::fs::read_to_string(lab.node_log("worker")).unwrap();
    assert!(
        log.contains("CNI socket call refused"),
        "the node did not log the refusal:\n{log}"
    );
    // The pod namespace already has an eth0: wiring fails after the address
    // was assigned, so ADD must release it and leave no veth behind.
    let ns = TestNs::new(&lab, "rollback");
    netns::ip(&ns.name, "link add eth0 type veth peer name other0").unwrap();
    let cfg = lab.cni_config("worker");
    let (ok, err) = lab
        .cni(
            "worker",
            "ADD",
            "rollback1",
            &ns.path(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=rollback",
            &cfg,
        )
        .unwrap();
    drop(ns);
    assert!(!ok, "ADD must fail: {err}");
    let msg = err["msg"].as_str().unwrap_or_default().to_string()
        + err["details"].as_str().unwrap_or_default();
    assert!(msg.contains("address released"), "{err}");
    let handles = node_handles(&lab, "worker");
    assert!(
        !handles.iter().any(|h| h.ends_with(".rollback1")),
        "handle released: {handles:?}"
    );
    assert!(
        !sh(&lab.node_ns("worker"), "ip link").contains("tab"),
        "no veth left"
    );
    let ipam = lab.grpcurl(&["tabby.v1.IpamAdmin/CheckIpam"]).unwrap();
    assert!(!ipam.contains("\"allocated\""), "nothing allocated: {ipam}");
}
