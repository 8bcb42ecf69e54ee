//! VTEP apply: 1,000 remote VXLAN endpoints programmed into a fresh
//! namespace by tabby's reconciler path, against `ip -batch` plus
//! `bridge -batch` of the same entries. Each remote node is three kernel
//! entries on `vxlan.tabby`: an FDB entry (VTEP MAC -> underlay address), a
//! permanent neighbour (tunnel address -> VTEP MAC) and the route to its /26
//! block via its tunnel address (`onlink`).
//!
//! tabby: on a dedicated thread inside the namespace, from the intent
//! (`desired`: routes and `overlay.vteps`), listing what the kernel holds,
//! `plan_vteps` + `NetlinkOverlay::add_fdb`/`add_neigh`, `plan_routes` +
//! `apply_plan` over `NetlinkRoutes`, until every entry is acked OK. Peer:
//! `bridge -n NS -batch` (FDB) then `ip -n NS -batch` (neighbours and
//! routes), each timed as a whole process, summed.
//!
//! Every round makes two fresh node namespaces, each with a veth to a peer
//! namespace (the underlay) and `vxlan.tabby` made by the same call
//! (`NetlinkOverlay::ensure_vxlan`) before any clock starts, so only the
//! entries are timed. Runs alternate which side goes first; after each
//! round both namespaces must hold N neighbours, N FDB entries and N routes,
//! the same ones.
//!
//! Run (root): `cargo bench -p tabby-integration --bench vtep_apply`.
//! Env: VTEPS (default 1000), ROUNDS (default 5). Prints; asserts nothing.
#![allow(clippy::unwrap_used)]
mod common;

use anyhow::{bail, Context, Result};
use common::*;
use ipnet::IpNet;
use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};
use tabby_integration::netns;
use tabby_node::{
    kernel::{OverlayTable, RouteTable},
    netlink::{NetlinkOverlay, NetlinkRoutes},
    plan,
};
use tabby_routing::{
    mac_string, vtep_mac, BlockIntent, Encapsulation, Intent, NodeIntent, PoolIntent, Tunnel, Vtep,
    VtepEntry, VxlanDevice,
};

/// The node's underlay address (and its peer's, the other end of the veth).
const NODE_V4: &str = "192.168.77.1";
const PEER_V4: &str = "192.168.77.2";
const UNDERLAY_LEN: u8 = 16;
/// This node's tunnel address (outside the pool: it owns no block here).
const ME_TUNNEL: &str = "10.127.255.1";
const ME: &str = "bench-node";
const DEV: &str = Tunnel::Vxlan.device();
/// The tunnel MTU tabby gives `vxlan.tabby` over a 1500-byte uplink.
const VXLAN_MTU: u32 = 1450;
const POOL: &str = "10.128.0.0/12";

/// The i-th remote node's /26 block; its first address is its tunnel address.
fn block(i: usize) -> IpNet {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    IpNet::new(IpAddr::V4(Ipv4Addr::from(base + (i as u32) * 64)), 26).unwrap()
}

fn tunnel_ip(i: usize) -> IpAddr {
    block(i).addr()
}

/// The i-th remote node's underlay address, on the node's /16 (never the
/// node's or its peer's).
fn underlay(i: usize) -> IpAddr {
    let base = u32::from(Ipv4Addr::new(192, 168, 128, 1));
    IpAddr::V4(Ipv4Addr::from(base + i as u32))
}

fn remote(i: usize) -> String {
    format!("remote-{i}")
}

/// The intent a node holds after the controller's snapshot: one VXLAN pool,
/// `n` remote nodes each with a VTEP and one block.
fn snapshot(n: usize) -> Intent {
    let mut intent = Intent {
        revision: 1,
        ..Default::default()
    };
    intent.pools.insert(
        "bench".into(),
        PoolIntent {
            cidr: POOL.parse().unwrap(),
            nat_outgoing: false,
            encapsulation: Encapsulation::Vxlan,
        },
    );
    let node = |addr: IpAddr, tunnel: IpAddr, name: &str| NodeIntent {
        addrs: vec![IpNet::new(addr, UNDERLAY_LEN).unwrap()],
        vtep: Some(Vtep {
            tunnel_ip: tunnel,
            mac: vtep_mac(name),
        }),
        ..Default::default()
    };
    intent.nodes.insert(
        ME.into(),
        node(NODE_V4.parse().unwrap(), ME_TUNNEL.parse().unwrap(), ME),
    );
    for i in 0..n {
        intent
            .nodes
            .insert(remote(i), node(underlay(i), tunnel_ip(i), &remote(i)));
    }
    intent.blocks = (0..n)
        .map(|i| {
            (
                block(i),
                BlockIntent {
                    node: Some(remote(i)),
                    pool: "bench".into(),
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    intent
}

/// A fresh node namespace with a veth to a fresh peer namespace (the
/// underlay) and `vxlan.tabby` made as tabby-node makes it.
fn fresh_node(nss: &mut Namespaces, name: &str, dev: VxlanDevice) -> Result<String> {
    let n = nss.add(name)?;
    let p = nss.add(&format!("{name}p"))?;
    netns::ip(
        &n,
        &format!("link add veth0 type veth peer name veth1 netns {p}"),
    )?;
    netns::ip(&n, &format!("addr add {NODE_V4}/{UNDERLAY_LEN} dev veth0"))?;
    netns::ip(&n, "link set veth0 up")?;
    netns::ip(&p, &format!("addr add {PEER_V4}/{UNDERLAY_LEN} dev veth1"))?;
    netns::ip(&p, "link set veth1 up")?;
    netns::within(&n, move || -> Result<()> {
        NetlinkOverlay::new()?.ensure_vxlan(&dev, VXLAN_MTU)?;
        Ok(())
    })??;
    Ok(n)
}

struct TabbyRun {
    total: Duration,
    planning: Duration,
    /// Time spent on each kind of entry (FDB, neighbours, routes).
    stages: [Duration; 3],
}

/// Fails with the first error of a batch of per-entry results, or when
/// fewer than `n` entries were sent.
fn all_ok(what: &str, res: Vec<tabby_node::Result<()>>, n: usize) -> Result<()> {
    let sent = res.len();
    if let Some(e) = res.into_iter().find_map(Result::err) {
        bail!("tabby {what}: {e}");
    }
    if sent != n {
        bail!("tabby {what}: {sent} entries planned, want {n}");
    }
    Ok(())
}

/// tabby's reconciler path on a dedicated thread inside the namespace; the
/// clock starts after setns, before the sockets, and stops after the last ack.
fn run_tabby(ns: &str, intent: Intent, n: usize) -> Result<TabbyRun> {
    netns::within(ns, move || -> Result<TabbyRun> {
        let t0 = Instant::now();
        let mut overlay = NetlinkOverlay::new()?;
        let mut table = NetlinkRoutes::new()?;
        let d = plan::desired(&intent, ME);
        let have = overlay.list_vteps(Tunnel::Vxlan)?;
        let vp = plan::plan_vteps(&d.overlay.vteps, &have, true);
        let actual = table.list()?;
        let rp = plan::plan_routes(&d.routes, &actual, true);
        let planning = t0.elapsed();
        // The reconciler's order: FDB, neighbours, then the routes.
        let fdb = overlay.add_fdb(Tunnel::Vxlan, &vp.add_fdb);
        let t_fdb = t0.elapsed();
        let neigh = overlay.add_neigh(Tunnel::Vxlan, &vp.add_neigh);
        let t_neigh = t0.elapsed();
        let rep = plan::apply_plan(&mut table, &rp);
        let total = t0.elapsed();
        let stages = [t_fdb - planning, t_neigh - t_fdb, total - t_neigh];
        all_ok("FDB", fdb, n)?;
        all_ok("neighbours", neigh, n)?;
        if !rep.failed.is_empty() || rep.applied != n {
            bail!(
                "tabby applied {} of {n} routes; first failure: {:?}",
                rep.applied,
                rep.failed.first()
            );
        }
        Ok(TabbyRun {
            total,
            planning,
            stages,
        })
    })?
}

/// `<tool> -n NS -batch FILE`, timed as a whole process.
fn run_batch(tool: &str, ns: &str, file: &Path) -> Result<Duration> {
    let t0 = Instant::now();
    let out = Command::new(tool)
        .args(["-n", ns, "-batch"])
        .arg(file)
        .output()
        .with_context(|| format!("running {tool} -batch"))?;
    let d = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{tool} -batch: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(d)
}

struct PeerRun {
    bridge: Duration,
    ip: Duration,
}

fn run_peer(ns: &str, files: &BatchFiles) -> Result<PeerRun> {
    // The same order as tabby's: FDB first.
    let bridge = run_batch("bridge", ns, &files.bridge)?;
    let ip = run_batch("ip", ns, &files.ip)?;
    Ok(PeerRun { bridge, ip })
}

struct BatchFiles {
    ip: PathBuf,
    bridge: PathBuf,
}

/// The peer's batch files, from the same entries tabby plans.
fn batch_files(dir: &Path, intent: &Intent, n: usize) -> Result<BatchFiles> {
    let d = tabby_routing::desired(intent, ME);
    let vteps: Vec<&VtepEntry> = d.overlay.vteps.iter().collect();
    if vteps.len() != n || d.routes.len() != n {
        bail!(
            "desired holds {} VTEPs and {} routes, want {n} of each ({:?} {:?})",
            vteps.len(),
            d.routes.len(),
            d.overlay.problems,
            d.unroutable.first()
        );
    }
    let files = BatchFiles {
        ip: dir.join("vteps.ip.batch"),
        bridge: dir.join("vteps.bridge.batch"),
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(&files.ip)?);
    for v in &vteps {
        writeln!(
            f,
            "neigh add {} lladdr {} dev {DEV} nud permanent proto 77",
            v.tunnel_ip,
            mac_string(&v.mac)
        )?;
    }
    for r in &d.routes {
        let Some(gw) = r.target.gateway() else {
            bail!("unexpected route {r}");
        };
        writeln!(f, "route add {} via {gw} dev {DEV} onlink proto 77", r.dst)?;
    }
    f.flush()?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(&files.bridge)?);
    for v in &vteps {
        writeln!(
            f,
            "fdb add {} dev {DEV} dst {} self permanent",
            mac_string(&v.mac),
            v.underlay
        )?;
    }
    f.flush()?;
    Ok(files)
}

/// What a namespace holds on `vxlan.tabby`, as sorted lines: permanent
/// neighbours, FDB entries with a destination, and routes of proto 77.
#[derive(PartialEq, Eq)]
struct Held {
    neigh: Vec<String>,
    fdb: Vec<String>,
    routes: Vec<String>,
}

fn held(ns: &str) -> Result<Held> {
    let lines = |cmd: &str, args: &str, keep: &dyn Fn(&str) -> bool| -> Result<Vec<String>> {
        let mut a = vec!["-n", ns];
        a.extend(args.split_whitespace());
        let out = netns::run(cmd, &a)?;
        let mut v: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|l| keep(l))
            .map(String::from)
            .collect();
        v.sort();
        Ok(v)
    };
    Ok(Held {
        neigh: lines("ip", &format!("-4 neigh show dev {DEV}"), &|l| {
            l.contains("PERMANENT")
        })?,
        // Without a destination: the device's own multicast addresses.
        fdb: lines("bridge", &format!("fdb show dev {DEV}"), &|l| {
            l.contains(" dst ")
        })?,
        routes: lines("ip", "-4 route show proto 77", &|l| l.contains(DEV))?,
    })
}

/// Fails unless both namespaces hold `n` of each entry, and the same ones.
fn verify(tn: &str, pn: &str, n: usize) -> Result<()> {
    let (t, p) = (held(tn)?, held(pn)?);
    for (side, h) in [("tabby", &t), ("ip/bridge -batch", &p)] {
        if h.neigh.len() != n || h.fdb.len() != n || h.routes.len() != n {
            bail!(
                "{side} namespace holds {} neighbours, {} FDB entries and {} routes on {DEV}, want {n} of each",
                h.neigh.len(),
                h.fdb.len(),
                h.routes.len()
            );
        }
    }
    for (what, a, b) in [
        ("neighbour", &t.neigh, &p.neigh),
        ("FDB", &t.fdb, &p.fdb),
        ("route", &t.routes, &p.routes),
    ] {
        if let Some((x, y)) = a.iter().zip(b).find(|(x, y)| x != y) {
            bail!("the two namespaces differ in a {what} entry: tabby {x:?}, peer {y:?}");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    netns::require_root();
    catch_interrupts();
    let n = env_usize("VTEPS", 1000).max(1);
    let rounds = env_usize("ROUNDS", 5).max(1);
    let dir = tempfile::Builder::new()
        .prefix("tabby-bench-vteps-")
        .tempdir_in("/tmp")?;
    let pfx = prefix("tbv");
    conditions(&["ip", "-V"]);
    println!(
        "vtep apply: {n} remote VTEPs (FDB + neighbour + route each) into a fresh namespace, \
         tabby (reconciler path over netlink) vs bridge -batch + ip -batch (process starts \
         included), alternating, {rounds} rounds"
    );
    let intent = snapshot(n);
    let files = batch_files(dir.path(), &intent, n)?;
    let dev = tabby_routing::desired(&intent, ME)
        .overlay
        .vxlan
        .context("the intent gives this node no vxlan.tabby")?;
    let mut nss = Namespaces::default();
    let (mut tabby, mut planning, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bridge, mut ipb) = (Vec::new(), Vec::new());
    let mut stages: [Vec<Duration>; 3] = Default::default();
    for round in 0..rounds {
        check_interrupted()?;
        let tag = format!("{pfx}r{round}");
        let tn = fresh_node(&mut nss, &format!("{tag}t"), dev)?;
        let pn = fresh_node(&mut nss, &format!("{tag}i"), dev)?;
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
                for (v, d) in stages.iter_mut().zip(r.stages) {
                    v.push(d);
                }
            } else {
                let r = run_peer(&pn, &files)?;
                bridge.push(r.bridge);
                ipb.push(r.ip);
                peer.push(r.bridge + r.ip);
            }
        }
        verify(&tn, &pn, n)?;
        println!(
            "  round {}: tabby {:>10} (plan {:>8})   bridge+ip -batch {:>10} (bridge {}, ip {})",
            round + 1,
            ms(*tabby.last().unwrap()),
            ms(*planning.last().unwrap()),
            ms(*peer.last().unwrap()),
            ms(*bridge.last().unwrap()),
            ms(*ipb.last().unwrap()),
        );
        nss.clear();
        std::thread::sleep(Duration::from_millis(300));
    }
    let (mt, mp) = (median(&tabby), median(&peer));
    let (nt, np) = (*tabby.iter().min().unwrap(), *peer.iter().min().unwrap());
    println!(
        "{n} VTEPs ({} kernel entries), {rounds} runs each\n  \
         tabby            median {:>10}  min {:>10}  (of which desired+list+plan: median {}; \
         FDB {}, neighbours {}, routes {})\n  \
         bridge+ip -batch median {:>10}  min {:>10}  (bridge median {}, ip median {})\n  \
         ratio tabby/peer: median {:.2}x, min {:.2}x   target <= 0.5x: {}",
        3 * n,
        ms(mt),
        ms(nt),
        ms(median(&planning)),
        ms(median(&stages[0])),
        ms(median(&stages[1])),
        ms(median(&stages[2])),
        ms(mp),
        ms(np),
        ms(median(&bridge)),
        ms(median(&ipb)),
        ratio(mt, mp),
        ratio(nt, np),
        if ratio(mt, mp) <= 0.5 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
