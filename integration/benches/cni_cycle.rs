//! CNI ADD+DEL cycle: each verb a separate process exactly as a
//! runtime runs it (`ip netns exec <node-ns> <plugin>` with the CNI env and
//! the network config on stdin; DEL carries the ADD result as prevResult),
//! for `tabby` (controller and tabby-node already running, in a one-node
//! lab) and for the reference `ptp` + `host-local` plugins from Debian's
//! containernetworking-plugins (in their own node namespace). Same run,
//! alternating, every pod in its own namespace made before the clock starts.
//!
//! Run (root, release binaries built): `cargo bench -p tabby-integration --bench cni_cycle`.
//! Env: CYCLES (default 150 per plugin). Prints; asserts nothing.
#![allow(clippy::unwrap_used)]
mod common;

use anyhow::{bail, Context, Result};
use common::*;
use serde_json::{json, Value};
use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use tabby_integration::{
    lab::{Lab, LabConfig},
    netns,
};

const NODE: &str = "bench";
const CNI_DIR: &str = "/usr/lib/cni";
const WARMUP: usize = 5;
const MTU: u32 = 1450;

/// One plugin under test: where it runs and what it is given.
struct Plugin {
    name: &'static str,
    /// Container-id tag (CNI allows only [A-Za-z0-9_.-]).
    tag: &'static str,
    node_ns: String,
    bin: PathBuf,
    cni_path: String,
    conf: Value,
}

/// One verb as one process, timed from spawn to exit.
fn invoke(
    p: &Plugin,
    verb: &str,
    cid: &str,
    pod_ns: &str,
    args: &str,
    conf: &Value,
) -> Result<(Duration, Value)> {
    let stdin = conf.to_string();
    let t0 = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &p.node_ns])
        .arg(&p.bin)
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns::path(pod_ns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &p.cni_path)
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", p.name))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let d = t0.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} {verb} failed ({}): {}{}",
            p.name,
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} printed {text:?}", p.name))?
    };
    Ok((d, v))
}

#[derive(Default)]
struct Times {
    add: Vec<Duration>,
    del: Vec<Duration>,
    cycle: Vec<Duration>,
}

fn cycle(p: &Plugin, i: usize, pod_ns: &str, pfx: &str, t: Option<&mut Times>) -> Result<()> {
    let cid = format!("{pfx}{}{i:05}", p.tag);
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{i};K8S_POD_INFRA_CONTAINER_ID={cid}"
    );
    let (add, result) = invoke(p, "ADD", &cid, pod_ns, &args, &p.conf)?;
    if result["ips"][0]["address"].as_str().is_none() {
        bail!("{} ADD gave no address: {result}", p.name);
    }
    let mut del_conf = p.conf.clone();
    del_conf["prevResult"] = result;
    let (del, _) = invoke(p, "DEL", &cid, pod_ns, &args, &del_conf)?;
    if let Some(t) = t {
        t.add.push(add);
        t.del.push(del);
        t.cycle.push(add + del);
    }
    Ok(())
}

fn line(name: &str, what: &str, v: &[Duration]) {
    println!(
        "  {name:<18} {what:<8} median {:>9}   p90 {:>9}   p99 {:>9}   max {:>9}",
        ms(median(v)),
        ms(pct(v, 0.90)),
        ms(pct(v, 0.99)),
        ms(*v.iter().max().unwrap())
    );
}

fn main() -> Result<()> {
    netns::require_root();
    catch_interrupts();
    let ptp = Path::new(CNI_DIR).join("ptp");
    if !ptp.exists() || !Path::new(CNI_DIR).join("host-local").exists() {
        eprintln!(
            "cni_cycle: the reference plugins {CNI_DIR}/ptp and {CNI_DIR}/host-local are missing.\n\
             Install Debian's containernetworking-plugins (as root: \
             `apt-get install -y containernetworking-plugins`, or `make deps`) and run again."
        );
        std::process::exit(2);
    }
    require_bins()?;
    let n: usize = std::env::var("CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
        .max(1);
    let dir = tempfile::Builder::new()
        .prefix("tabby-bench-cni-")
        .tempdir_in("/tmp")?;
    let pfx = prefix("tcc");
    let mut cfg = LabConfig::walkthrough(&pfx, dir.path().join("lab"));
    cfg.nodes = vec![(NODE.into(), Ipv4Addr::new(172, 18, 0, 5))];
    let lab = Lab::up(cfg).context("lab up")?;
    // Dropped before the lab.
    let mut nss = Namespaces::default();
    let ptp_node = nss.add(&format!("{pfx}ptpnode"))?;
    let t = Instant::now();
    let mut pods = |tag: &str| -> Result<Vec<String>> {
        (0..n + WARMUP)
            .map(|i| nss.add(&format!("{pfx}{tag}{i}")))
            .collect()
    };
    let tabby_pods = pods("t")?;
    let ptp_pods = pods("r")?;
    println!(
        "cni cycle: one-node lab up; {} pod namespaces made in {:.1} s (not timed)",
        tabby_pods.len() + ptp_pods.len(),
        t.elapsed().as_secs_f64()
    );

    let mut tabby_conf = lab.cni_config(NODE);
    tabby_conf["mtu"] = json!(MTU);
    let tabby = Plugin {
        name: "tabby",
        tag: "t",
        node_ns: lab.node_ns(NODE),
        bin: lab.cfg.bin_dir.join("tabby"),
        cni_path: lab.cfg.bin_dir.display().to_string(),
        conf: tabby_conf,
    };
    let ipam_dir = dir.path().join("host-local");
    let ptp = Plugin {
        name: "ptp+host-local",
        tag: "p",
        node_ns: ptp_node,
        bin: ptp,
        cni_path: CNI_DIR.into(),
        conf: json!({
            "cniVersion": "1.0.0",
            "name": "bench",
            "type": "ptp",
            "mtu": MTU,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.250.0.0/16"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir,
            },
        }),
    };

    let (mut tt, mut pt) = (Times::default(), Times::default());
    for i in 0..n + WARMUP {
        check_interrupted()?;
        let keep = i >= WARMUP;
        // Alternate which plugin goes first.
        if i % 2 == 0 {
            cycle(&tabby, i, &tabby_pods[i], &pfx, keep.then_some(&mut tt))?;
            cycle(&ptp, i, &ptp_pods[i], &pfx, keep.then_some(&mut pt))?;
        } else {
            cycle(&ptp, i, &ptp_pods[i], &pfx, keep.then_some(&mut pt))?;
            cycle(&tabby, i, &tabby_pods[i], &pfx, keep.then_some(&mut tt))?;
        }
    }

    println!(
        "CNI ADD+DEL, each verb one process via `ip netns exec <node-ns> <plugin>`, {n} cycles each after {WARMUP} warm-up, alternating:"
    );
    for (p, t) in [(&tabby, &tt), (&ptp, &pt)] {
        line(p.name, "ADD", &t.add);
        line(p.name, "DEL", &t.del);
        line(p.name, "ADD+DEL", &t.cycle);
    }
    let (mt, mp) = (median(&tt.cycle), median(&pt.cycle));
    println!(
        "  ratio tabby/ptp (ADD+DEL): median {:.2}x, p90 {:.2}x, p99 {:.2}x   target median <= 0.5x: {}",
        ratio(mt, mp),
        ratio(pct(&tt.cycle, 0.9), pct(&pt.cycle, 0.9)),
        ratio(pct(&tt.cycle, 0.99), pct(&pt.cycle, 0.99)),
        if ratio(mt, mp) <= 0.5 { "met" } else { "NOT met" }
    );
    drop(nss);
    drop(lab);
    Ok(())
}
