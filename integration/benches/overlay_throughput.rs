//! Overlay throughput: pod-to-pod TCP throughput across nodes with VXLAN
//! against plain routing, on the same three-node lab (the walkthrough's
//! flat fabric, real controller, real tabby-node, pods through the real CNI
//! plugin), measured with iperf3 (one stream, `-t 5`, JSON receiver rate).
//!
//! A pod's MTU is fixed when it is made: pods made under plain routing get
//! the configured 1500, pods made while a VXLAN pool exists get the tunnel's
//! 1450. So each mode has its own pair (server on `worker`, client on
//! `worker2`), made while that mode was set, and is measured only in it.
//! Rounds alternate which mode goes first; switching the pool's
//! encapsulation (IpamAdmin/UpdatePool) is waited out until both nodes route
//! the other pod through the mode's path (`ip route get`: `dev vxlan.tabby`
//! or `dev eth0`) and a ping gets through.
//!
//! Client and server, both node stacks and the fabric share this machine's
//! CPUs (printed): the figures are the kernel's forwarding cost on one host,
//! not a NIC's.
//!
//! Run (root, release binaries built, iperf3 installed):
//! `cargo bench -p tabby-integration --bench overlay_throughput`.
//! Env: ROUNDS (default 3), IPERF_SECS (default 5). Prints; asserts nothing.
#![allow(clippy::unwrap_used)]
mod common;

use anyhow::{anyhow, bail, Context, Result};
use common::*;
use std::{
    net::IpAddr,
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use tabby_integration::{
    lab::{Lab, LabConfig, Pod},
    netns,
};

const SERVER_NODE: &str = "worker";
const CLIENT_NODE: &str = "worker2";
const PORT: &str = "5201";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    None,
    Vxlan,
}

impl Mode {
    fn encapsulation(self) -> &'static str {
        match self {
            Mode::None => "ENCAPSULATION_NONE",
            Mode::Vxlan => "ENCAPSULATION_VXLAN",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::None => "plain",
            Mode::Vxlan => "VXLAN",
        }
    }

    /// The device a node's route to a remote pod uses in this mode.
    fn dev(self) -> &'static str {
        match self {
            Mode::None => "dev eth0",
            Mode::Vxlan => "dev vxlan.tabby",
        }
    }
}

/// A server pod and a client pod made under one mode.
struct Pair {
    mode: Mode,
    server: Pod,
    client: Pod,
    server_mtu: u32,
    client_mtu: u32,
}

fn set_mode(lab: &Lab, mode: Mode) -> Result<()> {
    lab.grpcurl(&[
        "-d",
        &format!(
            r#"{{"name":"default-pool","encapsulation":"{}"}}"#,
            mode.encapsulation()
        ),
        "tabby.v1.IpamAdmin/UpdatePool",
    ])
    .with_context(|| format!("switching the pool to {}", mode.encapsulation()))?;
    Ok(())
}

/// Whether `node` routes `to` through the path of `mode`.
fn routed(lab: &Lab, node: &str, to: IpAddr, mode: Mode) -> bool {
    netns::ip(&lab.node_ns(node), &format!("route get {to}"))
        .map(|r| r.contains(mode.dev()))
        .unwrap_or(false)
}

/// Waits until both nodes route the pods (given by address) through the
/// path of `mode`.
fn wait_mode(lab: &Lab, mode: Mode, server: IpAddr, client: IpAddr) -> Result<Duration> {
    lab.wait_until(
        &format!("routes {} on both nodes", mode.dev()),
        Duration::from_secs(30),
        || {
            // A stop ends the wait; the caller checks for it.
            interrupted()
                || (routed(lab, SERVER_NODE, client, mode)
                    && routed(lab, CLIENT_NODE, server, mode))
        },
    )
    .map_err(|e| {
        let show =
            |n: &str| netns::ip(&lab.node_ns(n), "route").unwrap_or_else(|e| format!("{e:#}"));
        anyhow!(
            "{e:#}\n{SERVER_NODE}:\n{}\n{CLIENT_NODE}:\n{}",
            show(SERVER_NODE),
            show(CLIENT_NODE)
        )
    })
}

fn pod_mtu(p: &Pod) -> Result<u32> {
    let s = netns::exec(&p.ns, &["cat", "/sys/class/net/eth0/mtu"])?;
    s.trim()
        .parse()
        .with_context(|| format!("MTU of {}: {s:?}", p.name))
}

fn make_pair(lab: &mut Lab, mode: Mode) -> Result<Pair> {
    let tag = match mode {
        Mode::None => "plain",
        Mode::Vxlan => "vxlan",
    };
    let server = lab.add_pod(SERVER_NODE, &format!("srv-{tag}"))?;
    let client = lab.add_pod(CLIENT_NODE, &format!("cli-{tag}"))?;
    let (server_mtu, client_mtu) = (pod_mtu(&server)?, pod_mtu(&client)?);
    Ok(Pair {
        mode,
        server,
        client,
        server_mtu,
        client_mtu,
    })
}

/// Pings until one gets through (ARP and the new routes settled).
fn reachable(pair: &Pair) -> Result<()> {
    let ip = pair.server.ip.to_string();
    for _ in 0..20 {
        check_interrupted()?;
        if netns::exec(&pair.client.ns, &["ping", "-c", "1", "-W", "1", &ip]).is_ok() {
            return Ok(());
        }
    }
    bail!(
        "{} ({}) cannot reach {} ({ip}) in {} mode",
        pair.client.name,
        pair.client.ip,
        pair.server.name,
        pair.mode.label()
    )
}

/// An iperf3 server in a pod, killed when dropped (our own child, by its
/// handle).
struct Server(Child);

impl Server {
    fn start(pod: &Pod) -> Result<Server> {
        let child = Command::new("ip")
            .args(["netns", "exec", &pod.ns, "iperf3", "-s", "-1", "-p", PORT])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C reaches only the bench, which
            // then stops it here.
            .process_group(0)
            .spawn()
            .context("starting iperf3 -s")?;
        let s = Server(child);
        let t = Instant::now();
        loop {
            let listening = netns::exec(&pod.ns, &["ss", "-Hltn", &format!("sport = :{PORT}")])
                .map(|o| !o.trim().is_empty())
                .unwrap_or(false);
            if listening {
                return Ok(s);
            }
            if t.elapsed() > Duration::from_secs(5) {
                bail!("iperf3 -s in {} did not listen within 5 s", pod.ns);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // `-1` makes it exit after one test; give it a moment, then kill.
        for _ in 0..100 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One measurement.
struct Sample {
    /// Receiver's rate, bits/s.
    bps: f64,
    /// Sender's TCP retransmissions.
    retransmits: u64,
    /// Bytes the client sent.
    sent: u64,
}

/// One iperf3 test from the pair's client to its server.
fn measure(pair: &Pair, secs: usize) -> Result<Sample> {
    let _server = Server::start(&pair.server)?;
    let out = Command::new("ip")
        .args(["netns", "exec", &pair.client.ns, "iperf3", "-c"])
        .arg(pair.server.ip.to_string())
        .args(["-p", PORT, "-t", &secs.to_string(), "-J"])
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .context("running iperf3 -c")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("iperf3 -c printed non-JSON: {text:?}"))?;
    if !out.status.success() || v.get("error").is_some() {
        bail!(
            "iperf3 -c failed ({}): {}",
            out.status,
            v.get("error").unwrap_or(&v)
        );
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second in iperf3's JSON"))?;
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let sent = v["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    Ok(Sample {
        bps,
        retransmits,
        sent,
    })
}

/// Bytes sent by a node's `vxlan.tabby` (`None` without the device).
fn vxlan_tx(lab: &Lab, node: &str) -> Option<u64> {
    let out = netns::ip(&lab.node_ns(node), "-j -s link show vxlan.tabby").ok()?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
    v[0]["stats64"]["tx"]["bytes"].as_u64()
}

/// Fails unless the test's traffic took the mode's path: through the
/// client node's `vxlan.tabby` in VXLAN mode, not through it otherwise.
fn check_path(mode: Mode, before: Option<u64>, after: Option<u64>, sent: u64) -> Result<()> {
    let through = after.unwrap_or(0).saturating_sub(before.unwrap_or(0));
    match mode {
        Mode::Vxlan if through < sent => bail!(
            "VXLAN mode: {CLIENT_NODE}'s vxlan.tabby sent {through} bytes, iperf3 {sent}: \
             the test did not go through the tunnel"
        ),
        Mode::None if through > sent / 100 => {
            bail!("plain mode: {CLIENT_NODE}'s vxlan.tabby sent {through} bytes of iperf3's {sent}")
        }
        _ => Ok(()),
    }
}

fn gbit(bps: f64) -> String {
    format!("{:.2} Gbit/s", bps / 1e9)
}

/// Median of rates.
fn median_f(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    // Nearest rank, as `common::median`.
    s[((s.len() as f64 - 1.0) * 0.5).round() as usize]
}

fn main() -> Result<()> {
    netns::require_root();
    catch_interrupts();
    if Command::new("iperf3").arg("--version").output().is_err() {
        eprintln!(
            "overlay_throughput: iperf3 is missing. Install Debian's iperf3 (as root: \
             `apt-get install -y iperf3`, or `make deps`) and run again."
        );
        std::process::exit(2);
    }
    require_bins()?;
    let rounds = env_usize("ROUNDS", 3).max(1);
    let secs = env_usize("IPERF_SECS", 5).max(1);
    conditions(&["iperf3", "--version"]);
    let dir = tempfile::Builder::new()
        .prefix("tabby-bench-overlay-")
        .tempdir_in("/tmp")?;
    let pfx = prefix("tot");
    let mut lab =
        Lab::up(LabConfig::walkthrough(&pfx, dir.path().join("lab"))).context("lab up")?;

    // A pair made under each mode (the pool starts plain).
    let plain = make_pair(&mut lab, Mode::None)?;
    wait_mode(&lab, Mode::None, plain.server.ip, plain.client.ip)?;
    set_mode(&lab, Mode::Vxlan)?;
    wait_mode(&lab, Mode::Vxlan, plain.server.ip, plain.client.ip)?;
    check_interrupted()?;
    // The node caps new pods at the tunnel's MTU once its device is up.
    std::thread::sleep(Duration::from_millis(500));
    let vxlan = make_pair(&mut lab, Mode::Vxlan)?;
    let mut current = Mode::Vxlan;
    let tunnel_mtu = netns::exec(
        &lab.node_ns(SERVER_NODE),
        &["cat", "/sys/class/net/vxlan.tabby/mtu"],
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_else(|_| "?".into());
    println!(
        "overlay throughput: 3-node flat lab, iperf3 TCP (1 stream, {secs} s) from a pod on \
         {CLIENT_NODE} to a pod on {SERVER_NODE}, {rounds} rounds alternating plain and VXLAN"
    );
    for p in [&plain, &vxlan] {
        println!(
            "  {:<5} pair (made under {}): server {} MTU {}, client {} MTU {}",
            p.mode.label(),
            p.mode.encapsulation(),
            p.server.ip,
            p.server_mtu,
            p.client.ip,
            p.client_mtu
        );
    }
    println!("  vxlan.tabby MTU on {SERVER_NODE}: {tunnel_mtu}; node uplinks 1500");
    if vxlan.server_mtu >= plain.server_mtu || vxlan.client_mtu >= plain.client_mtu {
        println!(
            "  note: the VXLAN pair did not get a smaller MTU than the plain pair; its \
             traffic relies on fragmentation or PMTU discovery"
        );
    }

    let (mut none_bps, mut vx_bps) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::None, Mode::Vxlan]
        } else {
            [Mode::Vxlan, Mode::None]
        };
        let mut line = format!("  round {}:", round + 1);
        for mode in order {
            check_interrupted()?;
            let pair = if mode == Mode::None { &plain } else { &vxlan };
            let switched = if current != mode {
                set_mode(&lab, mode)?;
                current = mode;
                true
            } else {
                false
            };
            let waited = wait_mode(&lab, mode, pair.server.ip, pair.client.ip)?;
            check_interrupted()?;
            reachable(pair)?;
            let before = vxlan_tx(&lab, CLIENT_NODE);
            let s = measure(pair, secs)?;
            check_path(mode, before, vxlan_tx(&lab, CLIENT_NODE), s.sent)?;
            line += &format!(
                "  {} {} ({} retransmits{})",
                mode.label(),
                gbit(s.bps),
                s.retransmits,
                if switched {
                    format!("; switched, routes in {} ms", waited.as_millis())
                } else {
                    String::new()
                }
            );
            if mode == Mode::None {
                none_bps.push(s.bps);
            } else {
                vx_bps.push(s.bps);
            }
        }
        println!("{line}");
    }
    let (mn, mv) = (median_f(&none_bps), median_f(&vx_bps));
    let max = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
    println!(
        "pod-to-pod TCP across nodes, {rounds} runs each\n  \
         plain  median {:>13}  max {:>13}\n  \
         VXLAN  median {:>13}  max {:>13}\n  \
         VXLAN overhead: {:.1}% below plain (median VXLAN/plain {:.2}x)",
        gbit(mn),
        gbit(max(&none_bps)),
        gbit(mv),
        gbit(max(&vx_bps)),
        (1.0 - mv / mn) * 100.0,
        mv / mn
    );
    drop(lab);
    Ok(())
}
