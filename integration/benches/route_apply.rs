//! Route apply: a snapshot of 10,000 remote blocks installed into a
//! fresh network namespace by tabby's reconciler path (intent -> `desired` ->
//! list -> `plan_routes` -> `apply_plan` over `NetlinkRoutes`, until every
//! ack is in), against `ip -batch` installing the same 10,000 routes
//! (`proto 77`) into another fresh namespace, timed as a whole process.
//! Runs alternate; each run gets fresh namespaces (a node with a veth to a
//! peer namespace, so the gateway is on-link). IPv4 /26 blocks, then IPv6 /122.
//!
//! Run (root): `cargo bench -p tabby-integration --bench route_apply`.
//! Env: ROUTES (default 10000), ROUNDS (default 5). Prints; asserts nothing.
#![allow(clippy::unwrap_used)]
mod common;

use anyhow::{bail, Context, Result};
use common::*;
use ipnet::IpNet;
use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};
use tabby_integration::netns;
use tabby_node::{kernel::RouteTable, netlink::NetlinkRoutes, plan};
use tabby_routing::{BlockIntent, Encapsulation, Intent, PoolIntent};

const NODE_V4: &str = "192.168.77.1";
const GW_V4: &str = "192.168.77.2";
const NODE_V6: &str = "fd00:77::1";
const GW_V6: &str = "fd00:77::2";
const ME: &str = "bench-node";
const PEER: &str = "peer-node";

/// The i-th remote block of the family.
fn block(i: usize, v6: bool) -> IpNet {
    if v6 {
        let base = u128::from(Ipv6Addr::new(0xfd00, 0x1000, 0, 0, 0, 0, 0, 0));
        IpNet::new(IpAddr::V6(Ipv6Addr::from(base + (i as u128) * 64)), 122).unwrap()
    } else {
        let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
        IpNet::new(IpAddr::V4(Ipv4Addr::from(base + (i as u32) * 64)), 26).unwrap()
    }
}

/// The intent a node holds after the controller's snapshot: one pool, `n`
/// blocks all affine to the peer node.
fn snapshot(n: usize, v6: bool) -> Intent {
    let pool: IpNet = if v6 {
        "fd00:1000::/96".parse().unwrap()
    } else {
        "10.128.0.0/12".parse().unwrap()
    };
    let mut intent = Intent {
        revision: 1,
        ..Default::default()
    };
    intent.pools.insert(
        "bench".into(),
        PoolIntent {
            cidr: pool,
            nat_outgoing: false,
            encapsulation: Encapsulation::None,
        },
    );
    let (me, gw) = if v6 {
        (NODE_V6, GW_V6)
    } else {
        (NODE_V4, GW_V4)
    };
    intent.nodes.insert(
        ME.into(),
        tabby_routing::NodeIntent::plain(&[me.parse::<IpAddr>().unwrap()]),
    );
    intent.nodes.insert(
        PEER.into(),
        tabby_routing::NodeIntent::plain(&[gw.parse::<IpAddr>().unwrap()]),
    );
    intent.blocks = (0..n)
        .map(|i| {
            (
                block(i, v6),
                BlockIntent {
                    node: Some(PEER.into()),
                    pool: "bench".into(),
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    intent
}

/// A fresh node namespace with a veth to a fresh peer namespace holding the
/// gateway addresses.
fn fresh_node(nss: &mut Namespaces, name: &str) -> Result<String> {
    let n = nss.add(name)?;
    let p = nss.add(&format!("{name}p"))?;
    netns::ip(
        &n,
        &format!("link add veth0 type veth peer name veth1 netns {p}"),
    )?;
    netns::ip(&n, &format!("addr add {NODE_V4}/24 dev veth0"))?;
    netns::ip(&n, &format!("addr add {NODE_V6}/64 dev veth0 nodad"))?;
    netns::ip(&n, "link set veth0 up")?;
    netns::ip(&p, &format!("addr add {GW_V4}/24 dev veth1"))?;
    netns::ip(&p, &format!("addr add {GW_V6}/64 dev veth1 nodad"))?;
    netns::ip(&p, "link set veth1 up")?;
    Ok(n)
}

struct TabbyRun {
    total: Duration,
    planning: Duration,
}

/// tabby's reconciler path on a dedicated thread inside the namespace; the
/// clock starts after setns, before the plan, and stops after the last ack.
fn run_tabby(ns: &str, intent: Intent, n: usize) -> Result<TabbyRun> {
    let r = netns::within(ns, move || -> Result<TabbyRun> {
        let t0 = Instant::now();
        let mut table = NetlinkRoutes::new()?;
        let d = plan::desired(&intent, ME);
        let actual = table.list()?;
        let p = plan::plan_routes(&d.routes, &actual, true);
        let planning = t0.elapsed();
        let rep = plan::apply_plan(&mut table, &p);
        let total = t0.elapsed();
        if !rep.failed.is_empty() || rep.applied != n {
            bail!(
                "tabby applied {} of {n}; first failure: {:?}",
                rep.applied,
                rep.failed.first()
            );
        }
        Ok(TabbyRun { total, planning })
    })??;
    Ok(r)
}

/// `ip -n NS -batch FILE`, timed as a whole process.
fn run_ip(ns: &str, file: &Path) -> Result<Duration> {
    let t0 = Instant::now();
    let out = Command::new("ip")
        .args(["-n", ns, "-batch"])
        .arg(file)
        .output()
        .context("running ip -batch")?;
    let d = t0.elapsed();
    if !out.status.success() {
        bail!("ip -batch: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(d)
}

fn batch_file(dir: &Path, n: usize, v6: bool) -> Result<std::path::PathBuf> {
    let path = dir.join(if v6 { "routes6.batch" } else { "routes4.batch" });
    let gw = if v6 { GW_V6 } else { GW_V4 };
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for i in 0..n {
        writeln!(f, "route add {} via {gw} proto 77", block(i, v6))?;
    }
    f.flush()?;
    Ok(path)
}

fn family(v6: bool, n: usize, rounds: usize, pfx: &str, dir: &Path) -> Result<()> {
    let fam = if v6 { "IPv6 /122" } else { "IPv4 /26" };
    let file = batch_file(dir, n, v6)?;
    let intent = snapshot(n, v6);
    let mut nss = Namespaces::default();
    let (mut tabby, mut planning, mut ipb) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        check_interrupted()?;
        let tag = format!("{pfx}{}{round}", if v6 { "s" } else { "f" });
        let tn = fresh_node(&mut nss, &format!("{tag}t"))?;
        let inn = fresh_node(&mut nss, &format!("{tag}i"))?;
        // Alternate which goes first, so neither always runs on a warmer cache.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_tabby in order {
            if is_tabby {
                let r = run_tabby(&tn, intent.clone(), n)?;
                tabby.push(r.total);
                planning.push(r.planning);
            } else {
                ipb.push(run_ip(&inn, &file)?);
            }
        }
        let (ct, ci) = (count_proto77(&tn, v6), count_proto77(&inn, v6));
        if ct != n || ci != n {
            bail!("route count after run: tabby {ct}, ip -batch {ci}, want {n}");
        }
        println!(
            "  {fam} round {}: tabby {:>10} (plan {:>8})   ip -batch {:>10}",
            round + 1,
            ms(*tabby.last().unwrap()),
            ms(*planning.last().unwrap()),
            ms(*ipb.last().unwrap())
        );
        // Namespaces holding 10k routes are torn down by the kernel in the
        // background; remove them now and let that finish before the next round.
        nss.clear();
        std::thread::sleep(Duration::from_millis(300));
    }
    let (mt, mi) = (median(&tabby), median(&ipb));
    println!(
        "{fam}: {n} routes, {rounds} runs each\n  tabby     median {:>10}  min {:>10}  (of which desired+list+plan: median {})\n  ip -batch median {:>10}  min {:>10}\n  ratio tabby/ip-batch: median {:.2}x, min {:.2}x   target <= 1.0x: {}",
        ms(mt),
        ms(*tabby.iter().min().unwrap()),
        ms(median(&planning)),
        ms(mi),
        ms(*ipb.iter().min().unwrap()),
        ratio(mt, mi),
        ratio(*tabby.iter().min().unwrap(), *ipb.iter().min().unwrap()),
        if mt <= mi { "met" } else { "NOT met" }
    );
    Ok(())
}

fn main() -> Result<()> {
    netns::require_root();
    catch_interrupts();
    let n = env_usize("ROUTES", 10_000);
    let rounds = env_usize("ROUNDS", 5).max(1);
    let dir = tempfile::Builder::new()
        .prefix("tabby-bench-routes-")
        .tempdir_in("/tmp")?;
    let pfx = prefix("tbr");
    println!(
        "route apply: {n} remote blocks into a fresh namespace, tabby (reconciler path over netlink) \
         vs ip -batch (process start included), alternating"
    );
    family(false, n, rounds, &pfx, dir.path())?;
    family(true, n, rounds, &pfx, dir.path())?;
    Ok(())
}
