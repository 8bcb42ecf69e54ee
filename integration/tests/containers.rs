//! The lab with its components as containers (#13): `make images` builds the
//! two images; the controller image runs in the fabric namespace and the node
//! image in each node's namespace under podman (runc), with the Deployment's
//! and DaemonSet's mounts, environment and security settings; the init
//! container installs the plugin and its conflist into each node's CNI
//! directories, and the lab runs that installed plugin with that conflist.
//! Then the walkthrough's checks: pod addresses, cross-node ping, masquerade
//! to the outside host; and nothing landed in the machine's own namespace.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::{collections::BTreeSet, net::SocketAddr, path::Path};
use tabby_integration::{
    lab::{CONTROLLER, OUTSIDE},
    netns,
    podman::{self, Images},
};

/// The machine's own namespace, as the kernel shows it: tabby's routes,
/// nft table and veths must never appear here.
fn host_view() -> String {
    let run = |c: &str, a: &[&str]| {
        std::process::Command::new(c)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut v = run("ip", &["route", "show", "proto", "77"]);
    v += &run("ip", &["-6", "route", "show", "proto", "77"]);
    v += &run("nft", &["list", "tables"]);
    v += &run("ip", &["-br", "link"]);
    v
}

#[test]
fn lab_runs_as_containers() {
    netns::require_root();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let images = Images::build(root).unwrap();
    let before = host_view();
    let (mut lab, _dir) = lab_with(|c| c.containers = Some(images.clone()));

    // The components are containers of the images, each in its namespace.
    let conf = &images.containers_conf;
    let want = [
        ("controller".to_string(), lab.fabric(), &images.controller),
        (
            "node-control-plane".into(),
            lab.node_ns("control-plane"),
            &images.node,
        ),
        ("node-worker".into(), lab.node_ns("worker"), &images.node),
        ("node-worker2".into(), lab.node_ns("worker2"), &images.node),
    ];
    for (role, ns, image) in &want {
        let name = format!("{}-{role}", lab.cfg.prefix);
        let out = podman::podman(
            conf,
            &[
                "inspect",
                "--format",
                "{{.State.Status}} {{.HostConfig.NetworkMode}} {{.ImageName}} {{.HostConfig.ReadonlyRootfs}}",
                &name,
            ],
        )
        .unwrap();
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(
            (f[0], f[2], f[3]),
            ("running", image.as_str(), "true"),
            "{name}: {out}"
        );
        // Podman names the namespace file by a path of its own (/var/run).
        let joined = f[1].strip_prefix("ns:").unwrap_or_default();
        assert_eq!(
            std::fs::canonicalize(joined).unwrap(),
            std::fs::canonicalize(netns::path(ns)).unwrap(),
            "{name}: {out}"
        );
    }

    // The init container installed the image's plugin and conflist, whole,
    // into each node's CNI directories, and left nothing else there.
    let image_root = root.join("target/images/node/rootfs/opt/tabby");
    let plugin = std::fs::read(image_root.join("bin/tabby")).unwrap();
    let conflist = std::fs::read(root.join("cni-shim/10-tabby.conflist")).unwrap();
    for node in ["control-plane", "worker", "worker2"] {
        let d = lab.node_dir(node);
        let names = |p: &str| -> BTreeSet<String> {
            std::fs::read_dir(d.join(p))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names("opt-cni-bin"), BTreeSet::from(["tabby".to_string()]));
        assert_eq!(
            names("etc-cni-net.d"),
            BTreeSet::from(["10-tabby.conflist".to_string()])
        );
        assert!(std::fs::read(d.join("opt-cni-bin/tabby")).unwrap() == plugin);
        assert!(std::fs::read(d.join("etc-cni-net.d/10-tabby.conflist")).unwrap() == conflist);
    }

    // The probes the manifests declare answer: the controller's plaintext
    // gRPC health port, and `tabby-node ready` in each node container.
    let health = netns::exec(
        &lab.fabric(),
        &[
            &lab.cfg.grpcurl.display().to_string(),
            "-plaintext",
            &format!("{}:5152", CONTROLLER.split(':').next().unwrap()),
            "grpc.health.v1.Health/Check",
        ],
    )
    .unwrap();
    assert!(health.contains("SERVING"), "{health}");
    for node in ["control-plane", "worker", "worker2"] {
        let name = format!("{}-node-{node}", lab.cfg.prefix);
        podman::podman(
            conf,
            &[
                "exec",
                &name,
                "/tabby-node",
                "ready",
                "--cni-socket",
                "/run/tabby/cni.sock",
            ],
        )
        .unwrap();
    }

    // Pods through the installed plugin, two per node.
    for node in ["control-plane", "worker", "worker2"] {
        let short = node.replace("control-plane", "cp");
        lab.add_pod(node, &format!("{short}-a")).unwrap();
        lab.add_pod(node, &format!("{short}-b")).unwrap();
    }
    let pool: ipnet::IpNet = lab.cfg.pool.parse().unwrap();
    let ips: BTreeSet<_> = lab.pods().iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), 6, "distinct addresses: {ips:?}");
    assert!(ips.iter().all(|ip| pool.contains(ip)), "{ips:?}");
    for p in lab.pods() {
        let addr = sh(&p.ns, "ip -4 -br addr show dev eth0");
        assert!(addr.contains(&format!("{}/32", p.ip)), "{addr}");
    }
    // The plugin logged where the conflist says, on its node.
    let cni_log = lab.node_dir("worker").join("var-log-tabby/cni.log");
    assert!(
        std::fs::metadata(&cni_log)
            .map(|m| m.len() > 0)
            .unwrap_or(false),
        "{} is empty",
        cni_log.display()
    );

    // Cross-node traffic, both directions.
    let p = lab.pod("worker2-a").unwrap().clone();
    let q = lab.pod("cp-a").unwrap().clone();
    let w = lab.pod("worker-a").unwrap().clone();
    assert!(ping(&p, q.ip, 3), "worker2 -> control-plane");
    assert!(ping(&q, p.ip, 3), "control-plane -> worker2");
    assert!(ping(&w, p.ip, 3), "worker -> worker2");

    // Egress is masqueraded (nft in the node image) to the node's address.
    let out: SocketAddr = format!("{OUTSIDE}:8080").parse().unwrap();
    assert_eq!(
        seen_source(&lab.outside(), &p.ns, out).unwrap(),
        lab.node_ip("worker2").to_string()
    );

    // DEL through the installed plugin releases the address.
    lab.del_pod("worker-b", true).unwrap();
    let m = lab.metrics(None).unwrap();
    let used: f64 = m
        .lines()
        .filter(|l| l.starts_with("tabby_ipam_pool_addresses{") && l.contains(r#"state="used""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(used, 5.0, "{m}");

    // Nothing of the lab in the machine's own namespace.
    assert_eq!(host_view(), before);

    // Teardown removes the containers.
    let names: Vec<String> = want
        .iter()
        .map(|(r, _, _)| format!("{}-{r}", lab.cfg.prefix))
        .collect();
    lab.teardown();
    for n in &names {
        assert!(
            podman::podman(conf, &["container", "exists", n]).is_err(),
            "{n} still exists"
        );
    }
}
