//! Pod Add+Del through the node's socket, no shim: a one-node lab
//! (controller + tabby-node in namespaces), then N pods, each with its own
//! namespace made before the clock starts, wired and unwired by calling
//! `tabby.v1.PodNetwork` Add and Del over the Unix socket with one tonic
//! client. Add, Del and the whole cycle are timed separately.
//!
//! Run (root, release binaries built): `cargo bench -p tabby-integration --bench pod_socket`.
//! Env: PODS (default 300). Prints; asserts nothing.
#![allow(clippy::unwrap_used)]
mod common;

use anyhow::{bail, Context, Result};
use common::*;
use hyper_util::rt::TokioIo;
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};
use tabby_integration::{
    lab::{Lab, LabConfig, NETWORK},
    netns,
};
use tabby_proto::v1::{self as pb, pod_network_client::PodNetworkClient};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

const NODE: &str = "bench";
const WARMUP: usize = 5;

async fn connect(socket: PathBuf) -> Result<PodNetworkClient<Channel>> {
    let ch = Endpoint::from_static("http://tabby-node")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .context("connecting to the node socket")?;
    Ok(PodNetworkClient::new(ch))
}

fn attachment(cid: &str) -> Option<pb::PodAttachment> {
    Some(pb::PodAttachment {
        container_id: cid.into(),
        ifname: "eth0".into(),
        network: NETWORK.into(),
    })
}

struct Sample {
    add: Duration,
    del: Duration,
    cycle: Duration,
}

async fn cycle(c: &mut PodNetworkClient<Channel>, i: usize, ns: &str, pfx: &str) -> Result<Sample> {
    let cid = format!("{pfx}pod{i:05}");
    let name = format!("pod-{i}");
    let add = pb::PodAddRequest {
        attachment: attachment(&cid),
        netns: netns::path(ns).display().to_string(),
        pod_namespace: "default".into(),
        pod_name: name.clone(),
        requested_address: String::new(),
        mtu: 1450,
    };
    let del = pb::PodDelRequest {
        attachment: attachment(&cid),
        netns: netns::path(ns).display().to_string(),
        pod_namespace: "default".into(),
        pod_name: name,
    };
    let t0 = Instant::now();
    let a = c.add(add).await.context("Add")?.into_inner();
    let t_add = t0.elapsed();
    let t1 = Instant::now();
    let d = c.del(del).await.context("Del")?.into_inner();
    let t_del = t1.elapsed();
    let total = t0.elapsed();
    // Add answers "10.244.0.5/32", Del lists "10.244.0.5".
    let added: Vec<&str> = a
        .addresses
        .iter()
        .map(|x| x.split('/').next().unwrap_or(x))
        .collect();
    if added.is_empty() || d.released != added {
        bail!(
            "pod {i}: added {:?}, released {:?}",
            a.addresses,
            d.released
        );
    }
    Ok(Sample {
        add: t_add,
        del: t_del,
        cycle: total,
    })
}

fn line(what: &str, v: &[Duration]) {
    println!(
        "  {what:<10} median {:>9}   p99 {:>9}   max {:>9}   min {:>9}",
        ms(median(v)),
        ms(pct(v, 0.99)),
        ms(*v.iter().max().unwrap()),
        ms(*v.iter().min().unwrap())
    );
}

fn main() -> Result<()> {
    netns::require_root();
    catch_interrupts();
    require_bins()?;
    let n: usize = std::env::var("PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
        .max(1);
    let dir = tempfile::Builder::new()
        .prefix("tabby-bench-pods-")
        .tempdir_in("/tmp")?;
    let pfx = prefix("tps");
    let mut cfg = LabConfig::walkthrough(&pfx, dir.path().join("lab"));
    cfg.nodes = vec![(NODE.into(), Ipv4Addr::new(172, 18, 0, 5))];
    let lab = Lab::up(cfg).context("lab up")?;
    // Dropped before the lab: pod namespaces go first.
    let mut pods = Namespaces::default();
    let t = Instant::now();
    let names: Vec<String> = (0..n + WARMUP)
        .map(|i| pods.add(&format!("{pfx}q{i}")))
        .collect::<Result<_>>()?;
    println!(
        "pod socket: one-node lab up; {} pod namespaces made in {:.1} s (not timed)",
        names.len(),
        t.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let samples = rt.block_on(async {
        let mut c = connect(lab.socket(NODE)).await?;
        let mut out = Vec::with_capacity(n);
        for (i, ns) in names.iter().enumerate() {
            check_interrupted()?;
            let s = cycle(&mut c, i, ns, &pfx).await?;
            if i >= WARMUP {
                out.push(s);
            }
        }
        anyhow::Ok(out)
    })?;
    let adds: Vec<Duration> = samples.iter().map(|s| s.add).collect();
    let dels: Vec<Duration> = samples.iter().map(|s| s.del).collect();
    let cycles: Vec<Duration> = samples.iter().map(|s| s.cycle).collect();
    let total: Duration = cycles.iter().sum();
    println!(
        "pod Add+Del over the node's Unix socket (gRPC, one client), {n} cycles after {WARMUP} warm-up, each pod in its own namespace:"
    );
    line("Add", &adds);
    line("Del", &dels);
    line("Add+Del", &cycles);
    println!(
        "  throughput {:.0} cycles/s",
        n as f64 / total.as_secs_f64()
    );
    drop(pods);
    drop(lab);
    Ok(())
}
