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
use util::{cpu_time, find_binary, fs_type};

use common::{create_pool, node_client, register, Controller, NodeClient};
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tabby_proto::v1::{AssignRequest, ReleaseHandleRequest};

const NODES: usize = 64;
const CONCURRENCY: usize = 64;
const THROUGHPUT_TIME: Duration = Duration::from_secs(5);
const WARMUP_TIME: Duration = Duration::from_millis(500);
const LATENCY_CALLS: usize = 3000;
const FLUSHES: usize = 1000;
const TARGET_RATE: f64 = 20_000.0;
const TARGET_TLS_P50: Duration = Duration::from_micros(600);

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

/// Raw cost of one commit of the embedded store (a log append and its
/// fdatasync), in a store next to `dir`.
fn store_commit_cost(dir: &Path) -> Pcts {
    use tabby_store::Backend;
    let b = tabby_store::LogBackend::open(&dir.join("store-commit-probe")).expect("open store");
    b.loaded();
    let mut v = Vec::with_capacity(FLUSHES);
    for i in 0..FLUSHES as u64 {
        let s = Instant::now();
        b.apply(vec![(i.to_be_bytes().to_vec(), Some(vec![7u8; 64]))])
            .expect("apply");
        b.sync().expect("sync");
        v.push(s.elapsed());
    }
    pcts(v)
}

/// Raw cost of one sled insert + flush (the embedded store before the log
/// store), in a database next to `dir`.
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

/// What one controller run measured.
struct Run {
    rate: f64,
    errors: u64,
    cpu: Cpu,
    assign: Pcts,
    release: Pcts,
}

/// Starts a controller (`--insecure` when `!tls`), measures throughput at
/// c=64 (a channel per task, each its own node) and latency at c=1.
async fn measure(bin: &Path, data: &Path, tls: bool) -> Run {
    let extra: &[&str] = if tls { &[] } else { &["--insecure"] };
    let mut c = Controller::start_bin(bin, data, extra);
    {
        let mut admin = c.admin().await;
        create_pool(&mut admin, "bench", "10.0.0.0/8", 26).await;
    }
    for i in 0..NODES {
        register(&c, &format!("node-{i}"), i).await;
    }
    let mut own = Vec::new();
    for t in 0..CONCURRENCY {
        own.push(c.node(&format!("node-{}", t % NODES)).await);
    }
    let pid = c.pid().to_string();
    let (rate, errors, cpu) = throughput(own, if tls { "tls" } else { "plain" }, &pid).await;
    let mut one = c.node("node-0").await;
    let (assign, release) = latency(&mut one).await;
    drop(one);
    // The client runtime must keep running while the server shuts down: its
    // connections answer the server's graceful GOAWAY ping.
    tokio::task::spawn_blocking(move || c.term())
        .await
        .expect("stopping the controller");
    Run {
        rate,
        errors,
        cpu,
        assign,
        release,
    }
}

/// One node floods Assign+Release at c=64 over mTLS while another node
/// makes one Assign+Release at a time; returns the victim's Assign latency.
async fn flood(bin: &Path, data: &Path, per_node: usize) -> Pcts {
    let limit = per_node.to_string();
    let c = Controller::start_bin(bin, data, &["--max-inflight-per-node", &limit]);
    {
        let mut admin = c.admin().await;
        create_pool(&mut admin, "bench", "10.0.0.0/8", 26).await;
    }
    register(&c, "flooder", 0).await;
    register(&c, "victim", 1).await;
    let flooder = c.node_channel("flooder").await;
    let clients = (0..CONCURRENCY)
        .map(|_| node_client(flooder.clone(), "flooder"))
        .collect();
    let pid = c.pid().to_string();
    let load = tokio::spawn(async move { throughput(clients, "flood", &pid).await });
    tokio::time::sleep(WARMUP_TIME).await;
    let mut victim = c.node("victim").await;
    let mut v = Vec::new();
    let t0 = Instant::now();
    let mut i = 0;
    while t0.elapsed() < THROUGHPUT_TIME - Duration::from_millis(300) {
        let h = format!("bench.victim-{i}");
        i += 1;
        let s = Instant::now();
        victim
            .assign(AssignRequest {
                handle: h.clone(),
                ..Default::default()
            })
            .await
            .expect("victim Assign");
        v.push(s.elapsed());
        victim
            .release_handle(ReleaseHandleRequest { handle: h })
            .await
            .expect("victim ReleaseHandle");
    }
    let _ = load.await;
    drop(victim);
    let mut c = c;
    tokio::task::spawn_blocking(move || c.term())
        .await
        .expect("stopping the controller");
    pcts(v)
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
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "tabby-controller IPAM over gRPC: loopback, every answer after a durable group commit; \
         mutual TLS against plaintext (--insecure) in the same run, alternating"
    );
    println!("  binary   {} ({how})", bin.display());
    println!(
        "  data dir {} ({})",
        dir.path().display(),
        fs_type(dir.path())
    );
    println!("  cpus     {cpus} (client and server share them)");

    // Write back what the build just left dirty, so that its writeback does
    // not land on our fsyncs (it halved the rate when measured right after
    // a link).
    nix::unistd::sync();
    let flush = sled_flush_cost(dir.path());
    let commit = store_commit_cost(dir.path());

    let mut runs: Vec<(bool, Run)> = Vec::new();
    for (k, tls) in [false, true, false, true].into_iter().enumerate() {
        let data = dir.path().join(format!("data-{k}"));
        runs.push((tls, measure(&bin, &data, tls).await));
    }
    let flood_bounded = flood(&bin, &dir.path().join("flood-32"), 32).await;
    let flood_unbounded = flood(&bin, &dir.path().join("flood-max"), 100_000).await;

    let row = |k: &str, v: String| println!("| {k:<52} | {v:<56} |");
    let quad = |p: &Pcts| {
        format!(
            "{} / {} / {} / {}",
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.max)
        )
    };
    println!();
    println!("| {:<52} | {:<56} |", "measurement", "value");
    println!("|{:-<54}|{:-<58}|", "", "");
    for (tls, r) in &runs {
        let mode = if *tls { "mTLS" } else { "plaintext" };
        let (s, cl) = r.cpu.cores();
        let per = r.cpu.server.as_secs_f64() * 1e6 / (r.rate * r.cpu.wall.as_secs_f64()).max(1.0);
        row(
            &format!("{mode}: Assign+Release, c={CONCURRENCY}"),
            format!(
                "{:.0} assign/s ({} errors), server {per:.0} us/pair, cores {s:.2}+{cl:.2}",
                r.rate, r.errors
            ),
        );
        row(
            &format!("{mode}: Assign c=1 p50 / p90 / p99 / max"),
            quad(&r.assign),
        );
        row(
            &format!("{mode}: Release c=1 p50 / p90 / p99 / max"),
            quad(&r.release),
        );
    }
    row(
        "victim Assign while one node floods (c=64), bound 32",
        quad(&flood_bounded),
    );
    row(
        "  the same without a per-node bound",
        quad(&flood_unbounded),
    );
    row(
        &format!("store append+fdatasync, {FLUSHES}x: p50/p90/p99/max"),
        quad(&commit),
    );
    row(
        &format!("sled insert+flush, {FLUSHES}x: p50 / p90 / p99 / max"),
        quad(&flush),
    );
    println!();
    let mean = |tls: bool, f: &dyn Fn(&Run) -> f64| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.0 == tls)
            .map(|r| f(&r.1))
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let p50 = |r: &Run| r.assign.p50.as_secs_f64();
    let rate = |r: &Run| r.rate;
    let (tls_p50, plain_p50) = (mean(true, &p50), mean(false, &p50));
    let (tls_rate, plain_rate) = (mean(true, &rate), mean(false, &rate));
    println!(
        "mTLS / plaintext, mean of the two runs each: Assign p50 {:.3} / {:.3} ms ({:.2}x), \
         throughput {tls_rate:.0} / {plain_rate:.0} assign/s ({:.2}x)",
        tls_p50 * 1e3,
        plain_p50 * 1e3,
        tls_p50 / plain_p50.max(1e-9),
        tls_rate / plain_rate.max(1.0)
    );
    println!();
    let trow = |t: &str, m: String, ok: bool| println!("| {t:<34} | {m:<46} | {:<6} |", pass(ok));
    println!(
        "| {:<34} | {:<46} | {:<6} |",
        "target", "measured", "result"
    );
    println!("|{:-<36}|{:-<48}|{:-<8}|", "", "", "");
    trow(
        "mTLS Assign p50 <= 0.6 ms at c=1",
        format!("{:.3} ms (mean of two runs)", tls_p50 * 1e3),
        tls_p50 <= TARGET_TLS_P50.as_secs_f64(),
    );
    trow(
        ">= 20000 assign/s at c=64 (mTLS)",
        format!("{tls_rate:.0} assign/s"),
        tls_rate >= TARGET_RATE,
    );
    trow(
        "victim p99 under flood, bounded",
        format!(
            "{} (unbounded {})",
            ms(flood_bounded.p99),
            ms(flood_unbounded.p99)
        ),
        flood_bounded.p99 <= flood_unbounded.p99,
    );
    println!();
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
