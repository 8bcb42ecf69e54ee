//! Intent fan-out: 5,000 simulated node watchers over real gRPC with mutual
//! TLS on loopback against the real release controller. Measures, for block claims, the time
//! from the Assign call until every watcher has received the delta, and the
//! controller's resident memory with all watchers attached.
//!
//! Run: `cargo bench -p tabby-controller --bench fanout`. Prints; asserts nothing.
#![allow(clippy::unwrap_used)]
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "util/mod.rs"]
mod util;
use util::rss_kib;

use common::{create_pool, register, Controller};
use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tabby_proto::v1::{intent_stream_client::IntentStreamClient, AssignRequest, WatchRequest};
use tokio::sync::Notify;

const WATCHERS: usize = 5000;
/// Watchers share this many mTLS connections, each with a node certificate
/// of its own (each real node has its own connection, but 5,000 sockets on
/// one 2-core machine measure the kernel, not tabby). The controller is
/// started allowing that many streams per node identity. Set FANOUT_CONNS
/// to change.
const DEFAULT_CONNS: usize = 500;
const CLAIMS: usize = 30;
const TARGET_P99: Duration = Duration::from_millis(250);

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let conns: usize = std::env::var("FANOUT_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CONNS);
    let dir = common::temp_dir();
    let bin = common::controller_bin();
    let per_identity = WATCHERS.div_ceil(conns).to_string();
    let ctl = Controller::start_bin(
        &bin,
        dir.path(),
        &["--max-streams-per-identity", &per_identity],
    );
    let mut admin = ctl.admin().await;
    create_pool(&mut admin, "p", "10.0.0.0/8", 26).await;
    register(&ctl, "claimer", 0).await;
    let rss0 = rss_kib(ctl.pid());

    // Each watcher records the revision it has seen; the claim loop waits
    // until all have seen the claim's revision.
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..WATCHERS).map(|_| AtomicU64::new(0)).collect());
    let arrivals: Arc<Vec<AtomicU64>> =
        Arc::new((0..WATCHERS).map(|_| AtomicU64::new(0)).collect());
    let connected = Arc::new(AtomicUsize::new(0));
    let notify = Arc::new(Notify::new());
    let epoch = Instant::now();
    let mut channels = Vec::new();
    for k in 0..conns {
        channels.push(ctl.node_channel(&format!("sim-{k}")).await);
    }
    let t_connect = Instant::now();
    for i in 0..WATCHERS {
        let ch = channels[i % conns].clone();
        let (seen, arrivals, connected, notify) = (
            seen.clone(),
            arrivals.clone(),
            connected.clone(),
            notify.clone(),
        );
        tokio::spawn(async move {
            let name = format!("sim-{}", i % conns);
            let mut c =
                IntentStreamClient::with_interceptor(ch, common::NodeHeader(name.parse().unwrap()));
            let mut s = c.watch(WatchRequest::default()).await.unwrap().into_inner();
            let mut first = true;
            while let Ok(Some(u)) = s.message().await {
                arrivals[i].store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                seen[i].store(u.revision, Ordering::Release);
                if first {
                    first = false;
                    connected.fetch_add(1, Ordering::Relaxed);
                }
                notify.notify_one();
            }
        });
    }
    while connected.load(Ordering::Relaxed) < WATCHERS {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = t_connect.elapsed();
    let rss1 = rss_kib(ctl.pid());

    let mut node = ctl.node("claimer").await;
    let mut all = Vec::new();
    let mut slowest = Vec::new();
    for k in 0..CLAIMS {
        // 64 addresses per /26: asking for address k*64 forces a new block each time.
        let t0 = epoch.elapsed().as_nanos() as u64;
        let r = node
            .assign(AssignRequest {
                handle: format!("claim-{k}"),
                requested: vec![format!("10.{}.0.1", k + 1)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let rev = r.revision;
        loop {
            if seen.iter().all(|s| s.load(Ordering::Acquire) >= rev) {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), notify.notified()).await;
        }
        let mut lat: Vec<Duration> = arrivals
            .iter()
            .map(|a| Duration::from_nanos(a.load(Ordering::Relaxed).saturating_sub(t0)))
            .collect();
        slowest.push(*lat.iter().max().unwrap());
        all.append(&mut lat);
    }
    let rss2 = rss_kib(ctl.pid());
    let p50 = pct(&mut all, 0.50);
    let p99 = pct(&mut all, 0.99);
    let max_all = *all.iter().max().unwrap();
    let p50_last = pct(&mut slowest, 0.5);
    println!("intent fan-out: {WATCHERS} watchers over {conns} mutual-TLS HTTP/2 connections on loopback, {CLAIMS} block claims");
    println!("  all {WATCHERS} connected with their snapshot in {connect_time:?}");
    println!("  claim -> delivery, over every (watcher, claim): p50 {p50:?}  p99 {p99:?}  max {max_all:?}");
    println!("  claim -> last watcher, median over claims: {p50_last:?}");
    println!(
        "  target p99 <= {TARGET_P99:?}: {}",
        if p99 <= TARGET_P99 { "PASS" } else { "MISS" }
    );
    println!(
        "  controller RSS: {} MiB before watchers, {} MiB with {WATCHERS} watchers, {} MiB after the claims",
        rss0 / 1024,
        rss1 / 1024,
        rss2 / 1024
    );
    drop(ctl);
}
