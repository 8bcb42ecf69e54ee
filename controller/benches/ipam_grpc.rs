//! Durable IPAM through gRPC on loopback, against the real release binary.
//!
//! Run: `cargo bench -p tabby-controller --bench ipam_grpc`. Prints figures
//! and PASS/MISS against the targets; asserts nothing.
//!
//! Client and server share the machine's CPUs, so the client runs on one
//! thread (Tokio's current-thread scheduler) to take as little from the
//! server as it can; the server CPU per call is printed beside each rate.
//!
//! The controller binary is, in order: `$TABBY_CONTROLLER_BIN`; the one cargo
//! built for this bench (`CARGO_BIN_EXE_tabby-controller`, release profile);
//! `tabby-controller` beside the bench's own directory; or
//! `<workspace>/target/release/tabby-controller`.
#![allow(clippy::unwrap_used)]
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "util/mod.rs"]
mod util;
use util::{find_binary, fs_type};

use common::{create_pool, node_client, register, Controller, NodeClient};
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tabby_proto::v1::{AssignRequest, ReleaseHandleRequest, ShowIpamRequest};
use tonic::transport::Channel;

const NODES: usize = 64;
const CONCURRENCY: usize = 64;
const THROUGHPUT_TIME: Duration = Duration::from_secs(5);
const WARMUP_TIME: Duration = Duration::from_millis(500);
const LATENCY_CALLS: usize = 3000;
const FLUSHES: usize = 1000;
const TARGET_RATE: f64 = 20_000.0;
const TARGET_P50: Duration = Duration::from_micros(500);

/// CPU time (user + system) of process `pid` ("self" for this one), from
/// /proc; zero where unavailable.
fn cpu_time(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    Duration::from_secs_f64(f.iter().sum::<u64>() as f64 / hz)
}

/// CPU use of the server and of this (client) process over a phase.
struct Cpu {
    server: Duration,
    client: Duration,
    wall: Duration,
}

impl Cpu {
    fn cores(&self) -> (f64, f64) {
        let w = self.wall.as_secs_f64().max(1e-9);
        (self.server.as_secs_f64() / w, self.client.as_secs_f64() / w)
    }
}

struct Pcts {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn pcts(mut v: Vec<Duration>) -> Pcts {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    Pcts {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: *v.last().unwrap(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Raw cost of one sled insert + flush, in a database next to `dir`.
fn sled_flush_cost(dir: &Path) -> Pcts {
    let db = sled::Config::new()
        .path(dir.join("sled-flush-probe"))
        .flush_every_ms(None)
        .open()
        .expect("open sled");
    let t = db.open_tree("probe").expect("tree");
    let mut v = Vec::with_capacity(FLUSHES);
    for i in 0..FLUSHES as u64 {
        let s = Instant::now();
        t.insert(i.to_be_bytes(), &[7u8; 64][..]).expect("insert");
        db.flush().expect("flush");
        v.push(s.elapsed());
    }
    pcts(v)
}

/// Assign + ReleaseHandle in a loop on CONCURRENCY tasks; returns the
/// number of Assign calls per second and the error count.
async fn throughput(clients: Vec<NodeClient>, tag: &str, server_pid: &str) -> (f64, u64, Cpu) {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (t, mut cl) in clients.into_iter().enumerate() {
        let (stop, measuring, count, errors) = (
            stop.clone(),
            measuring.clone(),
            count.clone(),
            errors.clone(),
        );
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let h = format!("bench.{tag}-{t}-{i}");
                i += 1;
                let ok = cl
                    .assign(AssignRequest {
                        handle: h.clone(),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if cl
                    .release_handle(ReleaseHandleRequest { handle: h })
                    .await
                    .is_err()
                    && measuring.load(Ordering::Relaxed)
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(WARMUP_TIME).await;
    measuring.store(true, Ordering::SeqCst);
    let (s0, c0) = (cpu_time(server_pid), cpu_time("self"));
    let t0 = Instant::now();
    tokio::time::sleep(THROUGHPUT_TIME).await;
    let n = count.load(Ordering::SeqCst);
    let el = t0.elapsed();
    let cpu = Cpu {
        server: cpu_time(server_pid).saturating_sub(s0),
        client: cpu_time("self").saturating_sub(c0),
        wall: el,
    };
    measuring.store(false, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    (
        n as f64 / el.as_secs_f64(),
        errors.load(Ordering::SeqCst),
        cpu,
    )
}

async fn latency(cl: &mut NodeClient) -> (Pcts, Pcts) {
    for i in 0..200 {
        let h = format!("bench.warm-{i}");
        cl.assign(AssignRequest {
            handle: h.clone(),
            ..Default::default()
        })
        .await
        .expect("warm-up Assign");
        cl.release_handle(ReleaseHandleRequest { handle: h })
            .await
            .expect("warm-up ReleaseHandle");
    }
    let mut a = Vec::with_capacity(LATENCY_CALLS);
    let mut r = Vec::with_capacity(LATENCY_CALLS);
    for i in 0..LATENCY_CALLS {
        let h = format!("bench.lat-{i}");
        let s = Instant::now();
        cl.assign(AssignRequest {
            handle: h.clone(),
            ..Default::default()
        })
        .await
        .expect("Assign");
        a.push(s.elapsed());
        let s = Instant::now();
        cl.release_handle(ReleaseHandleRequest { handle: h })
            .await
            .expect("ReleaseHandle");
        r.push(s.elapsed());
    }
    (pcts(a), pcts(r))
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

async fn run() -> std::process::ExitCode {
    let (bin, how) = find_binary();
    if !bin.is_file() {
        eprintln!(
            "ipam_grpc: no controller binary at {} ({how}); build it with \
             `cargo build --release -p tabby-controller` or set TABBY_CONTROLLER_BIN",
            bin.display()
        );
        return std::process::ExitCode::from(2);
    }
    let dir = tempfile::Builder::new()
        .prefix("tabby-bench")
        .tempdir()
        .expect("temp dir");
    let data = dir.path().join("data");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "tabby-controller IPAM over gRPC: loopback, every answer after a durable group commit"
    );
    println!("  binary   {} ({how})", bin.display());
    println!("  data dir {} ({})", data.display(), fs_type(dir.path()));
    println!("  cpus     {cpus} (client and server share them)");

    // Write back what the build just left dirty, so that its writeback does
    // not land on our fsyncs (it halved the rate when measured right after
    // a link).
    nix::unistd::sync();
    let flush = sled_flush_cost(dir.path());

    let mut c = Controller::start_bin(&bin, &data, &[]);
    {
        let mut admin = c.admin().await;
        create_pool(&mut admin, "bench", "10.0.0.0/8", 26).await;
    }
    for i in 0..NODES {
        register(&c, &format!("node-{i}"), i).await;
    }
    let node = |i: usize| format!("node-{}", i % NODES);

    // (a) throughput, own channel per task, then one shared channel.
    let mut own = Vec::new();
    for t in 0..CONCURRENCY {
        own.push(node_client(c.channel().await, &node(t)));
    }
    let pid = c.pid().to_string();
    let (rate_own, err_own, cpu_own) = throughput(own, "own", &pid).await;
    let shared: Channel = c.channel().await;
    let clients = (0..CONCURRENCY)
        .map(|t| node_client(shared.clone(), &node(t)))
        .collect();
    let (rate_shared, err_shared, cpu_shared) = throughput(clients, "shared", &pid).await;
    let (rate, which) = if rate_own >= rate_shared {
        (rate_own, "own channel per task")
    } else {
        (rate_shared, "one shared channel")
    };

    // (b) latency at concurrency 1.
    let mut one = node_client(c.channel().await, &node(0));
    let (la, lr) = latency(&mut one).await;

    let rev = c
        .admin()
        .await
        .show_ipam(ShowIpamRequest { show_blocks: false })
        .await
        .map(|r| r.into_inner().revision)
        .unwrap_or(0);
    drop(one);
    drop(shared);
    // The client runtime must keep running while the server shuts down: its
    // connections answer the server's graceful GOAWAY ping.
    tokio::task::spawn_blocking(move || c.term())
        .await
        .expect("stopping the controller");

    let row = |k: &str, v: String| println!("| {k:<48} | {v:<44} |");
    let cores = |c: &Cpu| {
        let (s, cl) = c.cores();
        format!("server {s:.2} cores, client {cl:.2} cores")
    };
    println!();
    println!("| {:<48} | {:<44} |", "measurement", "value");
    println!("|{:-<50}|{:-<46}|", "", "");
    row(
        &format!("Assign+Release, c={CONCURRENCY}, own channel per task"),
        format!("{rate_own:.0} assign/s ({err_own} errors)"),
    );
    row("  CPU busy", cores(&cpu_own));
    row(
        &format!("Assign+Release, c={CONCURRENCY}, one shared channel"),
        format!("{rate_shared:.0} assign/s ({err_shared} errors)"),
    );
    row("  CPU busy", cores(&cpu_shared));
    let per_pair = |rate: f64, c: &Cpu| {
        format!(
            "{:.1} us",
            c.server.as_secs_f64() * 1e6 / (rate * c.wall.as_secs_f64()).max(1.0)
        )
    };
    row(
        "server CPU per Assign+Release (own channels)",
        per_pair(rate_own, &cpu_own),
    );
    row(
        "server CPU per Assign+Release (shared channel)",
        per_pair(rate_shared, &cpu_shared),
    );
    let quad = |p: &Pcts| {
        format!(
            "{} / {} / {} / {}",
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.max)
        )
    };
    row(
        &format!("Assign  c=1, {LATENCY_CALLS} calls: p50 / p90 / p99 / max"),
        quad(&la),
    );
    row(
        &format!("Release c=1, {LATENCY_CALLS} calls: p50 / p90 / p99 / max"),
        quad(&lr),
    );
    row(
        &format!("sled insert+flush, {FLUSHES}x: p50 / p90 / p99 / max"),
        quad(&flush),
    );
    row("store revisions written", rev.to_string());
    println!();
    let trow = |t: &str, m: String, ok: bool| println!("| {t:<26} | {m:<46} | {:<6} |", pass(ok));
    println!(
        "| {:<26} | {:<46} | {:<6} |",
        "target", "measured", "result"
    );
    println!("|{:-<28}|{:-<48}|{:-<8}|", "", "", "");
    trow(
        ">= 20000 assign/s at c=64",
        format!("{rate:.0} assign/s ({which})"),
        rate >= TARGET_RATE,
    );
    trow(
        "p50 <= 0.5 ms at c=1",
        format!("Assign p50 {}", ms(la.p50)),
        la.p50 <= TARGET_P50,
    );
    println!();
    if la.p50 < flush.p50 * 2 {
        println!(
            "note: Assign p50 at c=1 is within 2x of one sled flush ({}): fsync bounds latency on this disk",
            ms(flush.p50)
        );
    } else {
        println!(
            "note: one sled flush costs {} (p50), {:.0}% of the Assign p50 at c=1: fsync does not bound latency on this disk",
            ms(flush.p50),
            100.0 * flush.p50.as_secs_f64() / la.p50.as_secs_f64()
        );
    }
    println!(
        "note: each counted Assign is followed by a ReleaseHandle, so the server answers twice as many calls; \
         client and server share {cpus} CPUs"
    );
    std::process::ExitCode::SUCCESS
}

fn main() -> std::process::ExitCode {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run())
}
