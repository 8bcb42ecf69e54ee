//! Benchmark: installs, lists and deletes N tabby routes (protocol 77, via a
//! gateway) in a fresh network namespace with `NetlinkRoutes`, and does the
//! same with `ip -batch`, printing wall times.
//!
//! Usage (root): `route_apply [N] [ROUNDS]`, default 10000 routes, 3 rounds.
//! Creates namespaces `tabby-bench-<pid>-<n>` and removes them on exit.
#![allow(clippy::unwrap_used)]
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tabby_node::kernel::{Route, RouteTable, RouteTarget};
use tabby_node::netlink::{in_netns, NetlinkRoutes};

struct Namespaces(Vec<String>, usize);

impl Namespaces {
    fn add(&mut self) -> String {
        self.1 += 1;
        let name = format!("tabby-bench-{}-{}", std::process::id(), self.1);
        ip(&["netns", "add", &name]);
        self.0.push(name.clone());
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh node namespace with a veth to a peer holding the gateways.
fn fresh_node(ns: &mut Namespaces) -> String {
    let n = ns.add();
    let p = ns.add();
    ip(&[
        "-n", &n, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &p,
    ]);
    ip(&["-n", &n, "addr", "add", "192.168.77.1/24", "dev", "veth0"]);
    ip(&[
        "-n",
        &n,
        "addr",
        "add",
        "fd00:77::1/64",
        "dev",
        "veth0",
        "nodad",
    ]);
    ip(&["-n", &n, "link", "set", "veth0", "up"]);
    ip(&["-n", &p, "link", "set", "veth1", "up"]);
    n
}

fn routes(n: usize, v6: bool) -> Vec<Route> {
    (0..n)
        .map(|i| {
            if v6 {
                let dst = Ipv6Addr::new(0xfd00, 0x1000, (i >> 16) as u16, i as u16, 0, 0, 0, 0);
                Route {
                    dst: ipnet::IpNet::new(IpAddr::V6(dst), 64).unwrap(),
                    target: RouteTarget::Via("fd00:77::2".parse().unwrap()),
                }
            } else {
                let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
                let dst = Ipv4Addr::from(base + (i as u32) * 64);
                Route {
                    dst: ipnet::IpNet::new(IpAddr::V4(dst), 26).unwrap(),
                    target: RouteTarget::Via("192.168.77.2".parse().unwrap()),
                }
            }
        })
        .collect()
}

fn count_ours(ns: &str, v6: bool) -> usize {
    let fam = if v6 { "-6" } else { "-4" };
    ip(&["-n", ns, fam, "route", "show", "proto", "77"])
        .lines()
        .count()
}

fn ms(d: Duration) -> String {
    format!("{:8.1} ms", d.as_secs_f64() * 1000.0)
}

struct Times {
    add: Duration,
    list: Duration,
    del: Duration,
}

fn bench_tabby(ns: &mut Namespaces, rs: &[Route], v6: bool) -> Times {
    let node = fresh_node(ns);
    let path = Path::new("/var/run/netns").join(&node);
    let (add, list) = in_netns(&path, || {
        let t0 = Instant::now();
        let mut t = NetlinkRoutes::new().expect("netlink");
        let res = t.add(rs);
        let add = t0.elapsed();
        let failed = res.iter().filter(|r| r.is_err()).count();
        assert_eq!(
            failed,
            0,
            "first error: {:?}",
            res.iter().find(|r| r.is_err())
        );
        let t1 = Instant::now();
        let listed = t.list().expect("list");
        let list = t1.elapsed();
        assert_eq!(listed.len(), rs.len());
        // Untimed sanity check of the error path: every reply is an error.
        let again = t.add(rs);
        assert!(again
            .iter()
            .all(|r| matches!(r, Err(tabby_node::Error::Exists(_)))));
        (add, list)
    })
    .expect("netns");
    assert_eq!(count_ours(&node, v6), rs.len());
    let del = in_netns(&path, || {
        let t0 = Instant::now();
        let mut t = NetlinkRoutes::new().expect("netlink");
        let res = t.del(rs);
        let d = t0.elapsed();
        assert!(res.iter().all(|r| r.is_ok()));
        d
    })
    .expect("netns");
    assert_eq!(count_ours(&node, v6), 0);
    Times { add, list, del }
}

fn bench_ip(ns: &mut Namespaces, rs: &[Route], v6: bool) -> Times {
    let node = fresh_node(ns);
    let dir = std::env::temp_dir();
    let write = |verb: &str| {
        let file = dir.join(format!("tabby-bench-{}-{verb}", std::process::id()));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for r in rs {
            match r.target {
                RouteTarget::Via(gw) => {
                    writeln!(f, "route {verb} {} via {gw} proto 77", r.dst).unwrap()
                }
                RouteTarget::Blackhole => {
                    writeln!(f, "route {verb} blackhole {} proto 77", r.dst).unwrap()
                }
                RouteTarget::Tunnel(gw, t) => writeln!(
                    f,
                    "route {verb} {} via {gw} dev {} onlink proto 77",
                    r.dst,
                    t.device()
                )
                .unwrap(),
            }
        }
        f.flush().unwrap();
        file
    };
    let add_file = write("add");
    let del_file = write("del");
    let run = |file: &Path| {
        let t0 = Instant::now();
        ip(&["-n", &node, "-batch", file.to_str().unwrap()]);
        t0.elapsed()
    };
    let add = run(&add_file);
    assert_eq!(count_ours(&node, v6), rs.len());
    let fam = if v6 { "-6" } else { "-4" };
    let t0 = Instant::now();
    ip(&["-n", &node, fam, "route", "show", "proto", "77"]);
    let list = t0.elapsed();
    let del = run(&del_file);
    assert_eq!(count_ours(&node, v6), 0);
    let _ = std::fs::remove_file(add_file);
    let _ = std::fs::remove_file(del_file);
    Times { add, list, del }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(10_000, |a| a.parse().expect("N"));
    let rounds: usize = args.next().map_or(3, |a| a.parse().expect("ROUNDS"));
    if !nix::unistd::geteuid().is_root() {
        eprintln!("route_apply needs root (it creates network namespaces)");
        std::process::exit(2);
    }
    let mut ns = Namespaces(Vec::new(), 0);
    println!("{n} routes per run, each run in a fresh namespace");
    println!("{:<22}{:>12}{:>12}{:>12}", "", "add", "list", "del");
    for v6 in [false, true] {
        let fam = if v6 { "IPv6 /64" } else { "IPv4 /26" };
        let rs = routes(n, v6);
        let (mut best_t, mut best_i) = (Duration::MAX, Duration::MAX);
        for round in 1..=rounds {
            let t = bench_tabby(&mut ns, &rs, v6);
            let i = bench_ip(&mut ns, &rs, v6);
            println!(
                "{:<22}{}{}{}",
                format!("{fam} tabby #{round}"),
                ms(t.add),
                ms(t.list),
                ms(t.del)
            );
            println!(
                "{:<22}{}{}{}",
                format!("{fam} ip -batch #{round}"),
                ms(i.add),
                ms(i.list),
                ms(i.del)
            );
            best_t = best_t.min(t.add);
            best_i = best_i.min(i.add);
            // Keep the number of live namespaces small.
            for name in ns.0.drain(..) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
        println!(
            "{fam}: best add tabby {} vs ip -batch {} = {:.2}x",
            ms(best_t).trim(),
            ms(best_i).trim(),
            best_t.as_secs_f64() / best_i.as_secs_f64()
        );
    }
}
