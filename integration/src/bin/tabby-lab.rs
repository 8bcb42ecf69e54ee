//! `tabby-lab`: the three-node lab (controller, control-plane, worker,
//! worker2, an outside host) in network namespaces on this machine (`make
//! lab`, `make lab-down`).
use anyhow::{bail, Context, Result};
use std::{net::SocketAddr, path::PathBuf, process::Command};
use tabby_integration::{
    echo,
    lab::{self, Lab, LabConfig, LabState, OUTSIDE},
    netns,
    podman::{self, Images},
};

const USAGE: &str =
    "usage: tabby-lab up [--containers] [--dual-stack] [--bgp] [--ha] [--topology flat|racks] [--mode none|vxlan|vxlan-cross-subnet|ipip|ipip-cross-subnet] | down | show [--dir DIR] | echo-server ADDR [COUNT] | echo-client ADDR";
const PREFIX: &str = "tlab";

fn dir_arg(args: &[String]) -> PathBuf {
    args.windows(2)
        .find(|w| w[0] == "--dir")
        .map(|w| PathBuf::from(&w[1]))
        .unwrap_or_else(|| PathBuf::from("/run/tabby-lab"))
}

fn load(dir: &std::path::Path) -> Option<LabState> {
    let s = std::fs::read_to_string(dir.join("state.json")).ok()?;
    serde_json::from_str(&s).ok()
}

fn section(title: &str, cmd: &str, out: &str) {
    println!("\n### {title}\n$ {cmd}\n{}", out.trim_end());
}

fn shell(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_else(|e| format!("({e})"));
    out
}

fn show(state: &LabState) -> Result<()> {
    let pod = |node: &str, i: usize| state.pods.iter().filter(|p| p.node == node).nth(i).cloned();
    let (Some(p), Some(remote)) = (pod("worker2", 0), pod("control-plane", 0)) else {
        bail!("lab has no pods on worker2 and control-plane");
    };
    let node_ns = format!("{PREFIX}-worker2");
    let fabric = format!("{PREFIX}-fabric");
    let addr_of = |node: &str| {
        shell(&format!("{PREFIX}-{node}"), "ip -4 -br addr show dev eth0")
            .split_whitespace()
            .nth(2)
            .unwrap_or("?")
            .to_string()
    };
    println!(
        "tabby lab: nodes control-plane {}, worker {}, worker2 {} (fabric router 172.18.0.1); pool 10.244.0.0/16",
        addr_of("control-plane"),
        addr_of("worker"),
        addr_of("worker2")
    );
    println!(
        "pods: {}",
        state
            .pods
            .iter()
            .map(|p| format!("{}@{}={}", p.name, p.node, p.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );
    section(
        &format!("1. pod {} on worker2: address", p.name),
        "ip -4 -br addr show dev eth0",
        &shell(&p.ns, "ip -4 -br addr show dev eth0"),
    );
    section("   pod routes", "ip route", &shell(&p.ns, "ip route"));
    section("   pod neighbours", "ip neigh", &shell(&p.ns, "ip neigh"));
    section(
        "2. worker2's routing table",
        "ip route",
        &shell(&node_ns, "ip route"),
    );
    // With a VXLAN pool: the tunnel device, its FDB and its neighbours.
    if shell(&node_ns, "ip link show vxlan.tabby").contains("vxlan.tabby:") {
        for (title, cmd) in [
            ("   worker2's VXLAN device", "ip -d link show vxlan.tabby"),
            (
                "   worker2's VXLAN forwarding database",
                "bridge fdb show dev vxlan.tabby",
            ),
            (
                "   worker2's VXLAN neighbours",
                "ip neigh show dev vxlan.tabby",
            ),
        ] {
            section(title, cmd, &shell(&node_ns, cmd));
        }
    }
    section(
        "   worker2's NAT table",
        "nft list table ip tabby",
        &shell(&node_ns, "nft list table ip tabby"),
    );
    let g = lab::grpcurl().display().to_string();
    let tls = lab::admin_tls_flags(&state.dir).join(" ");
    // An HA lab: which replica leads (the other answers NOT_SERVING), the
    // etcd members, and the leader key; the views below ask the leader.
    let mut ctl = lab::CONTROLLER;
    if state.procs.iter().any(|p| p.role == "controller-b") {
        let health = |addr: &str| {
            shell(
                &fabric,
                &format!(
                    "{g} {tls} -d '{{\"service\":\"tabby.v1.NodeAgent\"}}' {addr} grpc.health.v1.Health/Check"
                ),
            )
        };
        let mut out = String::new();
        for addr in [lab::CONTROLLER, lab::CONTROLLER_B] {
            let h = health(addr);
            let serving = h.contains("\"SERVING\"");
            if serving {
                ctl = addr;
            }
            let state = if serving {
                "SERVING (leads)"
            } else if h.contains("NOT_SERVING") {
                "NOT_SERVING (stands by)"
            } else {
                "not answering"
            };
            out.push_str(&format!("{addr}: {state}\n"));
        }
        section(
            "   controller replicas (etcd datastore): health of tabby.v1.NodeAgent",
            "grpcurl ... -d '{\"service\":\"tabby.v1.NodeAgent\"}' ADDR grpc.health.v1.Health/Check",
            &out,
        );
        let ep = lab::ha_etcd_endpoints();
        section(
            "   the etcd members",
            "etcdctl endpoint status -w table",
            &shell(
                &fabric,
                &format!("ETCDCTL_API=3 etcdctl --endpoints {ep} endpoint status -w table"),
            ),
        );
        section(
            "   the leader key (on the leader's lease)",
            "etcdctl get /tabby/m/leader",
            &shell(
                &fabric,
                &format!("ETCDCTL_API=3 etcdctl --endpoints {ep} get /tabby/m/leader"),
            ),
        );
    }
    section(
        "3. the controller's cluster route table",
        &format!("grpcurl {tls} {ctl} tabby.v1.IpamAdmin/ShowRoutes"),
        &shell(
            &fabric,
            &format!("{g} {tls} {ctl} tabby.v1.IpamAdmin/ShowRoutes"),
        ),
    );
    let rr = format!("{PREFIX}-rr");
    if state.namespaces.contains(&rr) {
        // Give the session a moment after `up`.
        let t = std::time::Instant::now();
        let mut out = shell(&rr, "gobgp -p 50051 global rib");
        while !out.contains("10.244.") && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            out = shell(&rr, "gobgp -p 50051 global rib");
        }
        section(
            "   the route reflector's table (GoBGP at 172.18.0.100, the controller its client)",
            "gobgp global rib",
            &out,
        );
        section(
            "   its session with the controller",
            "gobgp neighbor",
            &shell(&rr, "gobgp -p 50051 neighbor"),
        );
    }
    section(
        "   IPAM summary",
        &format!("grpcurl {tls} {ctl} tabby.v1.IpamAdmin/ShowIpam"),
        &shell(
            &fabric,
            &format!("{g} {tls} {ctl} tabby.v1.IpamAdmin/ShowIpam"),
        ),
    );
    section(
        &format!(
            "4. cross-node ping {} (worker2) -> {} (control-plane)",
            p.name, remote.name
        ),
        &format!("ping -c 3 {}", remote.ip),
        &shell(&p.ns, &format!("ping -c 3 -i 0.2 -W 1 {}", remote.ip)),
    );
    let addr: SocketAddr = format!("{OUTSIDE}:8080").parse()?;
    let server = netns::spawn_within(&format!("{PREFIX}-outside"), move || {
        let l = std::net::TcpListener::bind(addr)?;
        echo::serve(l, Some(1))
    })?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let seen = netns::within(&p.ns, move || echo::ask(addr))?;
    let _ = server.join();
    section(
        &format!(
            "5. egress: {} ({}) connects to the outside host {OUTSIDE}",
            p.name, p.ip
        ),
        "the outside host saw the source address",
        &match seen {
            Ok(s) => format!("{s}   (worker2's address: masqueraded by table ip tabby)"),
            Err(e) => format!("failed: {e}"),
        },
    );
    println!("\nExplore: ip netns exec {node_ns} ip route   |   ip netns exec {} sh   |   ip netns list | grep {PREFIX}", p.ns);
    println!(
        "Logs: {}/*.log     Remove everything: make lab-down",
        state.dir.display()
    );
    Ok(())
}

/// The value of `--name VALUE`, if given.
fn opt<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].as_str())
}

/// `up --containers`: the images `make images` built, run under podman.
/// `--topology racks`: two racks on subnets of their own. `--mode`: the
/// pool's encapsulation, set once the lab is up.
fn up(dir: PathBuf, args: &[String]) -> Result<()> {
    let containers = args.iter().any(|a| a == "--containers");
    let racks = match opt(args, "--topology") {
        None | Some("flat") => false,
        Some("racks") => true,
        Some(t) => bail!("--topology {t:?}: use flat or racks"),
    };
    let mode = match opt(args, "--mode") {
        None | Some("none") => None,
        Some("vxlan") => Some("ENCAPSULATION_VXLAN"),
        Some("vxlan-cross-subnet") => Some("ENCAPSULATION_VXLAN_CROSS_SUBNET"),
        Some("ipip") => Some("ENCAPSULATION_IPIP"),
        Some("ipip-cross-subnet") => Some("ENCAPSULATION_IPIP_CROSS_SUBNET"),
        Some(m) => {
            bail!("--mode {m:?}: use none, vxlan, vxlan-cross-subnet, ipip or ipip-cross-subnet")
        }
    };
    if let Some(s) = load(&dir) {
        if s.namespaces.iter().any(|n| netns::exists(n)) {
            println!(
                "the lab is already up (state in {}); showing it. `make lab-down` removes it.",
                dir.display()
            );
            return show(&s);
        }
        lab::teardown_state(&s);
    }
    let mut cfg = if racks {
        LabConfig::racks(PREFIX, dir.clone())
    } else {
        LabConfig::walkthrough(PREFIX, dir.clone())
    };
    if containers {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let images = Images::dev(&root);
        for i in [&images.controller, &images.node] {
            podman::podman(&images.containers_conf, &["image", "exists", i])
                .with_context(|| format!("no image {i}: run `make images` first"))?;
        }
        cfg.containers = Some(images);
    }
    cfg.dual_stack = args.iter().any(|a| a == "--dual-stack");
    // Three etcd members and two controller replicas (issue 16).
    cfg.ha = args.iter().any(|a| a == "--ha");
    let mut lab = Lab::up(cfg).context("building the lab")?;
    if args.iter().any(|a| a == "--bgp") {
        lab.add_route_reflector()
            .context("adding the route reflector")?;
    }
    if let Some(m) = mode {
        lab.grpcurl(&[
            "-d",
            &format!(r#"{{"name":"default-pool","encapsulation":"{m}"}}"#),
            "tabby.v1.IpamAdmin/UpdatePool",
        ])
        .context("setting the pool's encapsulation")?;
    }
    for node in ["control-plane", "worker", "worker2"] {
        for i in 1..=2 {
            lab.add_pod(
                node,
                &format!("net-tshoot-{}-{i}", node.replace("control-plane", "cp")),
            )?;
        }
    }
    lab.persist()?;
    let s = load(&dir).context("reading lab state")?;
    show(&s)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("up") => up(dir_arg(&args), &args),
        Some("show") => show(&load(&dir_arg(&args)).context("no lab is up")?),
        Some("down") => {
            let dir = dir_arg(&args);
            match load(&dir) {
                Some(s) => {
                    lab::teardown_state(&s);
                    println!(
                        "lab removed: {} processes, {} namespaces, {}",
                        s.procs.len(),
                        s.namespaces.len(),
                        dir.display()
                    );
                }
                None => println!("no lab state in {}; nothing to remove", dir.display()),
            }
            Ok(())
        }
        Some("echo-server") => {
            let addr: SocketAddr = args.get(1).context(USAGE)?.parse()?;
            let count = args.get(2).map(|c| c.parse()).transpose()?;
            echo::serve(std::net::TcpListener::bind(addr)?, count)
        }
        Some("echo-client") => {
            let addr: SocketAddr = args.get(1).context(USAGE)?.parse()?;
            println!("{}", echo::ask(addr)?);
            Ok(())
        }
        _ => bail!(USAGE),
    }
}
