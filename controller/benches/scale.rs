//! Scale: the controller loaded to 5,000 nodes × 110 pods (550,000 Assigns,
//! about 10,000 /26 blocks of pool 10.0.0.0/8) through gRPC on loopback,
//! against the real release binary (issue 17).
//!
//! Run: `cargo bench -p tabby-controller --bench scale` (also part of
//! `make bench`). Prints figures and PASS/MISS against the targets; asserts
//! nothing. Exits 0 when it ran to the end; non-zero only on errors (a call
//! that failed, a wrong answer, CheckIpam reporting damage).
//!
//! What it does:
//! 1. Starts the controller (`--insecure`: thousands of node identities over
//!    a few shared connections; the cost of mutual TLS is measured by the
//!    `ipam_grpc` and `fanout` benches) on a fresh data dir in a temporary directory,
//!    creates pool 10.0.0.0/8 with /26 blocks (nat off) and registers
//!    `SCALE_NODES` nodes `s0001`, `s0002`, ..., each call as that node
//!    (the node identity header).
//! 2. Loads: one Assign per pod, round-robin across the nodes (allocation
//!    `k` is pod `j = k / NODES` of node `i = k % NODES`, handle `pod-i-j`
//!    with `i` numbered as in the node's name), `SCALE_CONC` calls in flight
//!    over a few HTTP/2 connections, each call as its node. Meanwhile a
//!    prober on its own thread (at SCHED_FIFO when allowed, so that it times
//!    the controller's answer rather than its own wait for a CPU), runtime
//!    and connection loops GetAllocation for the first address assigned
//!    (c=1, 1 ms pause between calls); a call
//!    counts towards every phase it overlaps, and each measured call waits
//!    for a prober call begun after the previous one to finish. The worst
//!    prober latency is printed for each load segment (with the allocation
//!    count at which it happened), for every call measured below, and over
//!    the whole run (restarts excepted: the prober pauses for them).
//! 3. At each checkpoint (`SCALE_CHECKPOINTS` allocations) the load pauses
//!    and it measures, the median of several calls each: CheckIpam,
//!    ShowRoutes (the cluster table), ShowIpam (no blocks), ListHandles as
//!    node `s0001`; the p50 of 20 block-claiming Assigns at c=1 (each by a
//!    freshly registered node, whose first Assign claims a block; these add
//!    20 nodes and 20 allocations per checkpoint); the controller's VmRSS
//!    (as the load pauses);
//!    SIGTERM → exit, and restart → serving: the time from starting the
//!    controller again on the same data dir until grpc.health.v1 Check says
//!    SERVING (and the RSS after that restart).
//! 4. Prints a table: a row per figure, a column per checkpoint, the growth
//!    between the last two checkpoints next to the growth of the allocation
//!    count, and PASS/MISS at the last checkpoint against the targets:
//!    prober ≤ 10 ms at all times, CheckIpam ≤ 300 ms, ShowRoutes and
//!    ShowIpam ≤ 20 ms, ListHandles ≤ 1 ms, block-claiming Assign p50 no
//!    slower than at the first checkpoint (10% allowed for noise), RSS ≤
//!    300 MiB, restart → serving < 1 s. Costs that grow faster than the
//!    allocation count are listed.
//!
//! Environment knobs (defaults in brackets):
//! - `SCALE_NODES` [5000]: registered nodes;
//! - `SCALE_PODS` [110]: pods per node;
//! - `SCALE_CONC` [64]: Assigns in flight during the load;
//! - `SCALE_ATTRS` [1]: 1, each Assign is a pod's as tabby-node makes it:
//!   handle `k8s-pod-network.<container id>` and the attributes it sends
//!   (the 64-digit container id, ifname, namespace, pod name); 0, handle
//!   `pod-<node>-<n>` and no attributes (as runs before 2026-12-02
//!   afternoon did);
//! - `SCALE_CHECKPOINTS` [22000,110000,550000]: allocation counts at which
//!   the figures are taken, ascending. When NODES × PODS is smaller than the
//!   last, all are scaled down in proportion so that the last is NODES ×
//!   PODS; the load stops at the last checkpoint.
//! - `SCALE_KEEP_DATA`: a path to copy the stopped controller's data dir to
//!   at the end (to profile a restart on it);
//! - `TABBY_CONTROLLER_BIN`: the controller binary. Otherwise, in order: the
//!   one cargo built for this bench (`CARGO_BIN_EXE_tabby-controller`,
//!   release profile); `tabby-controller` beside the bench's own directory;
//!   `<workspace>/target/release/tabby-controller`.
//!
//! Conditions: client and server share the machine's CPUs (printed), all
//! traffic is on loopback, the controller runs with its default options, and
//! every Assign is answered after its durable group commit, so the disk
//! under the temporary directory (printed) matters. The load client runs on
//! one thread (Tokio's current-thread scheduler); the prober on another. At
//! the default size a run takes about four minutes on 2 CPUs.
#![allow(clippy::unwrap_used)]
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "util/mod.rs"]
mod util;
use util::{cpu_time, find_binary, fs_type, rss_kib};

use anyhow::{anyhow, bail, Context};
use common::{create_pool, node_client, AdminClient, Controller};
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tabby_proto::v1::{
    ipam_admin_client::IpamAdminClient, ipam_problem::Kind, AssignRequest, CheckIpamRequest,
    GetAllocationRequest, ListHandlesRequest, Node, RegisterNodeRequest, ShowIpamRequest,
    ShowRoutesRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const DEFAULT_NODES: usize = 5000;
const DEFAULT_PODS: usize = 110;
const DEFAULT_CONC: usize = 64;
const DEFAULT_CHECKPOINTS: &str = "22000,110000,550000";
/// HTTP/2 connections the load's calls are spread over.
const LOAD_CHANNELS: usize = 4;
/// Repetitions of each admin read per checkpoint (the median is printed).
const ADMIN_REPS: usize = 5;
/// ListHandles is cheap: more repetitions.
const LIST_REPS: usize = 21;
/// Block-claiming Assigns per checkpoint (the p50 is printed).
const CLAIM_REPS: usize = 20;
/// Restarts per checkpoint (the median is printed).
const RESTART_REPS: usize = 3;
/// Pause between two prober calls.
const PROBE_GAP: Duration = Duration::from_millis(1);
/// How long a restarted controller may take to say SERVING.
const SERVING_TIMEOUT: Duration = Duration::from_secs(120);

const TARGET_PROBER: Duration = Duration::from_millis(10);
const TARGET_CHECK: Duration = Duration::from_millis(300);
const TARGET_SHOW: Duration = Duration::from_millis(20);
const TARGET_LIST: Duration = Duration::from_millis(1);
const TARGET_RSS_MIB: f64 = 300.0;
const TARGET_RESTART: Duration = Duration::from_secs(1);
/// "No slower than at the first checkpoint", give or take this much noise
/// of a p50 over 20 calls.
const CLAIM_TOLERANCE: f64 = 1.10;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

struct Cfg {
    nodes: usize,
    pods: usize,
    conc: usize,
    /// Whether Assigns carry a pod's handle and attributes as tabby-node
    /// makes them, or short handles and none.
    attrs: bool,
    checkpoints: Vec<u64>,
    /// Why the checkpoints differ from the ones asked for, if they do.
    scaled: Option<String>,
}

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => {
            let n: usize = v
                .trim()
                .parse()
                .with_context(|| format!("{name}={v:?} is not a number"))?;
            if n == 0 {
                bail!("{name} must be at least 1");
            }
            Ok(n)
        }
        Err(_) => Ok(default),
    }
}

fn config() -> anyhow::Result<Cfg> {
    let nodes = env_usize("SCALE_NODES", DEFAULT_NODES)?;
    let pods = env_usize("SCALE_PODS", DEFAULT_PODS)?;
    let conc = env_usize("SCALE_CONC", DEFAULT_CONC)?;
    if nodes > 99_999 {
        bail!("SCALE_NODES={nodes}: at most 99999");
    }
    let spec = std::env::var("SCALE_CHECKPOINTS").unwrap_or_else(|_| DEFAULT_CHECKPOINTS.into());
    let mut cps = Vec::new();
    for s in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let n: u64 = s
            .parse()
            .with_context(|| format!("SCALE_CHECKPOINTS: {s:?} is not a number"))?;
        if n == 0 || cps.last().is_some_and(|&l| n <= l) {
            bail!("SCALE_CHECKPOINTS={spec:?}: want ascending counts above 0");
        }
        cps.push(n);
    }
    let Some(&last) = cps.last() else {
        bail!("SCALE_CHECKPOINTS is empty");
    };
    let total = (nodes * pods) as u64;
    let mut scaled = None;
    if last > total {
        let asked = cps.clone();
        cps = cps
            .iter()
            .map(|&c| ((c as f64 * total as f64 / last as f64).round() as u64).max(1))
            .collect();
        cps.dedup();
        scaled = Some(format!(
            "{asked:?} scaled down to {cps:?}: SCALE_NODES × SCALE_PODS = {total}"
        ));
    }
    let attrs = match std::env::var("SCALE_ATTRS").as_deref() {
        Err(_) | Ok("1") => true,
        Ok("0") => false,
        Ok(v) => bail!("SCALE_ATTRS={v:?}: want 0 or 1"),
    };
    Ok(Cfg {
        nodes,
        pods,
        conc,
        attrs,
        checkpoints: cps,
        scaled,
    })
}

/// Name of load node `i` (0-based): `s0001`, ...
fn node_name(i: usize) -> String {
    format!("s{:04}", i + 1)
}

/// Pod `j` of node `i`: its handle and attributes. `real`: as tabby-node
/// makes them (`cni_server.rs`): handle `<network>.<container id>`,
/// attributes container id, interface, namespace, pod name. Otherwise
/// `pod-<node>-<j>` and none.
fn pod(i: usize, j: u64, real: bool) -> (String, std::collections::HashMap<String, String>) {
    if !real {
        return (format!("pod-{}-{j}", i + 1), Default::default());
    }
    // A container id is 64 hex digits; distinct per pod.
    let id = format!("{:016x}", (i as u64) << 32 | j).repeat(4);
    let handle = format!("k8s-pod-network.{id}");
    let attributes = [
        ("container_id", id),
        ("ifname", "eth0".to_string()),
        ("namespace", format!("team-{}", i % 40)),
        ("pod", format!("web-{i}-{j}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    (handle, attributes)
}

/// A made-up node address, distinct per index, outside the pool.
fn node_address(i: usize) -> String {
    format!(
        "172.{}.{}.{}",
        16 + i / 62_500,
        (i / 250) % 250,
        i % 250 + 2
    )
}

/// "22k" for 22000, "4k" for 4000, "800" for 800.
fn count_label(n: u64) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(endpoint.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))
}

/// Admin client that takes answers of any size (ShowRoutes at scale).
fn admin_client(ch: Channel) -> AdminClient {
    IpamAdminClient::new(ch).max_decoding_message_size(usize::MAX)
}

async fn register_node(ch: &Channel, name: &str, i: usize) -> anyhow::Result<()> {
    node_client(ch.clone(), name)
        .register_node(RegisterNodeRequest {
            node: Some(Node {
                name: name.into(),
                addresses: vec![node_address(i)],
                ..Default::default()
            }),
        })
        .await
        .with_context(|| format!("RegisterNode {name}"))?;
    Ok(())
}

/// Registers load nodes `0..n`, `conc` calls in flight.
async fn register_all(c: &Controller, n: usize, conc: usize) -> anyhow::Result<()> {
    let mut chans = Vec::new();
    for _ in 0..LOAD_CHANNELS.min(conc) {
        chans.push(connect(&c.endpoint()).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..conc {
        let ch = chans[t % chans.len()].clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                register_node(&ch, &node_name(i), i).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The prober
// ---------------------------------------------------------------------------

/// Worst prober latency seen in one phase ("window").
#[derive(Clone, Copy, Default)]
struct Worst {
    lat: Duration,
    /// Allocations done when that call ended.
    allocs: u64,
    calls: u64,
}

/// Shared between the main thread, which names the phases, and the prober
/// thread, which loops GetAllocation and charges each call's latency to
/// every phase the call overlapped.
struct Probe {
    /// Current phase; the main thread bumps it at every phase change.
    window: AtomicUsize,
    worst: Mutex<Vec<Worst>>,
    overall: Mutex<Worst>,
    over_target: AtomicU64,
    paused: AtomicBool,
    /// The prober saw `paused`, has no call in flight and no connection.
    idle: AtomicBool,
    stop: AtomicBool,
    /// The prober thread runs at SCHED_FIFO (root): its latency is the
    /// controller's answer, not its own wait for a CPU behind the load.
    realtime: AtomicBool,
    endpoint: Mutex<String>,
    /// Phase in which the last recorded call started.
    last_start: AtomicUsize,
    /// Every call: first and last phase it overlapped, latency.
    samples: Mutex<Vec<(usize, usize, Duration)>>,
    /// Allocations done by the load (for the "at N allocations" figures).
    allocs: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Probe {
    fn new(endpoint: String) -> Self {
        Probe {
            window: AtomicUsize::new(0),
            worst: Mutex::new(vec![Worst::default()]),
            overall: Mutex::new(Worst::default()),
            over_target: AtomicU64::new(0),
            realtime: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            endpoint: Mutex::new(endpoint),
            last_start: AtomicUsize::new(0),
            samples: Mutex::new(Vec::new()),
            allocs: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    /// Starts a new phase and returns its id.
    fn enter(&self) -> usize {
        self.window.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Worst latency charged to phase `w`.
    fn worst(&self, w: usize) -> Worst {
        self.worst
            .lock()
            .unwrap()
            .get(w)
            .copied()
            .unwrap_or_default()
    }

    /// Worst over several phases.
    fn worst_of(&self, ws: &[usize]) -> Worst {
        ws.iter()
            .map(|&w| self.worst(w))
            .max_by_key(|w| w.lat)
            .unwrap_or_default()
    }

    fn record(&self, w0: usize, w1: usize, lat: Duration) {
        let allocs = self.allocs.load(Ordering::SeqCst);
        let sample = Worst {
            lat,
            allocs,
            calls: 0,
        };
        {
            let mut v = self.worst.lock().unwrap();
            if v.len() <= w1 {
                v.resize(w1 + 1, Worst::default());
            }
            for w in &mut v[w0..=w1] {
                w.calls += 1;
                if lat > w.lat {
                    *w = Worst {
                        calls: w.calls,
                        ..sample
                    };
                }
            }
        }
        let mut o = self.overall.lock().unwrap();
        o.calls += 1;
        if lat > o.lat {
            *o = Worst {
                calls: o.calls,
                ..sample
            };
        }
        if lat > TARGET_PROBER {
            self.over_target.fetch_add(1, Ordering::Relaxed);
        }
        self.last_start.fetch_max(w0, Ordering::SeqCst);
        self.samples.lock().unwrap().push((w0, w1, lat));
    }

    /// Quantile `q` of the latencies of the calls overlapping phase `w`.
    fn quantile(&self, w: usize, q: f64) -> Duration {
        let mut v: Vec<Duration> = self
            .samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.0 <= w && w <= s.1)
            .map(|s| s.2)
            .collect();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v.sort();
        v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
    }

    /// Waits (at most a second) until the prober has finished a call that
    /// started in the current phase: no call still in flight from an
    /// earlier phase is then charged to the next one.
    async fn settle(&self) {
        let w = self.window.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.last_start.load(Ordering::SeqCst) < w && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::SeqCst);
        self.first_error.lock().unwrap().get_or_insert(e);
    }

    fn check(&self) -> anyhow::Result<()> {
        match self.first_error.lock().unwrap().clone() {
            Some(e) => Err(anyhow!(
                "prober: {} failed calls, the first: {e}",
                self.errors.load(Ordering::SeqCst)
            )),
            None => Ok(()),
        }
    }

    /// Stops the prober's calls and closes its connection (before a restart).
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        while !self.idle.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Resumes probing, against `endpoint`.
    fn resume(&self, endpoint: String) {
        *self.endpoint.lock().unwrap() = endpoint;
        self.idle.store(false, Ordering::SeqCst);
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// Loops GetAllocation{address} at c=1 on its own thread, runtime and
/// connection until `probe.stop`.
fn start_prober(probe: Arc<Probe>, address: String, handle: String) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("prober".into())
        .spawn(move || {
            // Like the convergence bench's monitors: on 2 CPUs shared with
            // the controller and the load, a prober at normal priority also
            // times its own wait to be scheduled.
            let fifo = tabby_integration::rtnl::make_thread_realtime(10);
            probe.realtime.store(fifo, Ordering::SeqCst);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("prober runtime");
            rt.block_on(async move {
                let mut client: Option<AdminClient> = None;
                while !probe.stop.load(Ordering::SeqCst) {
                    if probe.paused.load(Ordering::SeqCst) {
                        client = None;
                        probe.idle.store(true, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    let cl = match client.as_mut() {
                        Some(cl) => cl,
                        None => {
                            let ep = probe.endpoint.lock().unwrap().clone();
                            match connect(&ep).await {
                                Ok(ch) => client.insert(admin_client(ch)),
                                Err(e) => {
                                    probe.error(format!("{e:#}"));
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            }
                        }
                    };
                    let w0 = probe.window.load(Ordering::SeqCst);
                    let t = Instant::now();
                    let r = cl
                        .get_allocation(GetAllocationRequest {
                            address: address.clone(),
                            handle: String::new(),
                        })
                        .await;
                    let lat = t.elapsed();
                    let w1 = probe.window.load(Ordering::SeqCst);
                    match r {
                        Ok(r) => {
                            let r = r.into_inner();
                            if r.allocations.len() == 1 && r.allocations[0].handle == handle {
                                probe.record(w0, w1, lat);
                            } else {
                                probe.error(format!(
                                    "GetAllocation {address}: want handle {handle}, got {:?}",
                                    r.allocations
                                ));
                            }
                        }
                        Err(e) if probe.paused.load(Ordering::SeqCst) => drop(e),
                        Err(e) => {
                            probe.error(format!("GetAllocation {address}: {e}"));
                            client = None;
                        }
                    }
                    tokio::time::sleep(PROBE_GAP).await;
                }
            });
        })
        .expect("prober thread")
}

// ---------------------------------------------------------------------------
// Load and measurements
// ---------------------------------------------------------------------------

struct LoadStats {
    rate: f64,
    /// Worst Assign latency of the segment and the allocation count then.
    worst: Duration,
    worst_at: u64,
    window: usize,
    /// CPU cores busy in the controller and in this process.
    server_cores: f64,
    client_cores: f64,
}

/// Allocations `from..to`: round-robin across the nodes, `conc` in flight.
async fn load(
    c: &Controller,
    cfg: &Cfg,
    probe: &Arc<Probe>,
    from: u64,
    to: u64,
) -> anyhow::Result<LoadStats> {
    let mut chans = Vec::new();
    for _ in 0..LOAD_CHANNELS.min(cfg.conc) {
        chans.push(connect(&c.endpoint()).await?);
    }
    let pid = c.pid().to_string();
    let window = probe.enter();
    let (s0, c0) = (cpu_time(&pid), cpu_time("self"));
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(from));
    let nodes = cfg.nodes as u64;
    let mut tasks = Vec::new();
    for t in 0..cfg.conc {
        let ch = chans[t % chans.len()].clone();
        let (next, probe) = (next.clone(), probe.clone());
        let attrs = cfg.attrs;
        tasks.push(tokio::spawn(async move {
            let r = async {
                let mut worst = (Duration::ZERO, 0);
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= to {
                        return anyhow::Ok(worst);
                    }
                    let (i, j) = ((k % nodes) as usize, k / nodes);
                    let name = node_name(i);
                    let (handle, attributes) = pod(i, j, attrs);
                    let s = Instant::now();
                    let r = node_client(ch.clone(), &name)
                        .assign(AssignRequest {
                            handle: handle.clone(),
                            attributes,
                            ..Default::default()
                        })
                        .await
                        .with_context(|| format!("Assign {handle} as {name}"))?
                        .into_inner();
                    let lat = s.elapsed();
                    if r.allocations.len() != 1 {
                        bail!("Assign {handle} as {name}: {:?}", r.allocations);
                    }
                    let done = probe.allocs.fetch_add(1, Ordering::SeqCst) + 1;
                    if lat > worst.0 {
                        worst = (lat, done);
                    }
                }
            }
            .await;
            if r.is_err() {
                // Stop the other tasks.
                next.store(u64::MAX / 2, Ordering::SeqCst);
            }
            r
        }));
    }
    let mut worst = (Duration::ZERO, 0);
    let mut err = None;
    for t in tasks {
        match t.await.context("load task")? {
            Ok(w) => worst = worst.max(w),
            Err(e) => err = err.or(Some(e)),
        }
    }
    let el = t0.elapsed();
    probe.enter();
    let secs = el.as_secs_f64().max(1e-9);
    let server_cores = cpu_time(&pid).saturating_sub(s0).as_secs_f64() / secs;
    let client_cores = cpu_time("self").saturating_sub(c0).as_secs_f64() / secs;
    if let Some(e) = err {
        return Err(e);
    }
    Ok(LoadStats {
        rate: (to - from) as f64 / secs,
        worst: worst.0,
        worst_at: worst.1,
        window,
        server_cores,
        client_cores,
    })
}

/// Latencies of repeated calls, and the prober phases they ran in.
struct Measured {
    times: Vec<Duration>,
    windows: Vec<usize>,
}

impl Measured {
    fn median(&self) -> Duration {
        let mut v = self.times.clone();
        v.sort();
        v[v.len() / 2]
    }
}

/// Calls `f` `reps` times, each in a prober phase of its own; returns the
/// latencies and the last answer.
async fn measure<T>(
    probe: &Probe,
    reps: usize,
    mut f: impl AsyncFnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Measured, T)> {
    let mut m = Measured {
        times: Vec::with_capacity(reps),
        windows: Vec::with_capacity(reps),
    };
    let mut last = None;
    for _ in 0..reps {
        probe.settle().await;
        let w = probe.enter();
        let t = Instant::now();
        let r = f().await;
        let el = t.elapsed();
        probe.enter();
        last = Some(r?);
        m.times.push(el);
        m.windows.push(w);
    }
    Ok((m, last.context("no repetitions")?))
}

/// Polls grpc.health.v1 Check("") until SERVING.
async fn wait_serving(endpoint: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + SERVING_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match connect(endpoint).await {
            Ok(ch) => {
                let mut h = HealthClient::new(ch);
                loop {
                    match h
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                    {
                        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {
                            return Ok(())
                        }
                        Ok(r) => last = format!("status {}", r.get_ref().status),
                        Err(e) => last = e.to_string(),
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Err(e) => {
                last = format!("{e:#}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    bail!("not SERVING within {SERVING_TIMEOUT:?} at {endpoint}: {last}")
}

/// Everything taken at one checkpoint.
struct Point {
    allocs: u64,
    load: LoadStats,
    rss_kib: u64,
    check: Measured,
    check_allocated: u64,
    check_damage: usize,
    check_borrowed: usize,
    routes: Measured,
    n_routes: usize,
    ipam: Measured,
    list: Measured,
    n_handles: usize,
    claim: Measured,
    claim_not_new: usize,
    shutdown: Vec<Duration>,
    restart: Vec<Duration>,
    rss_restart_kib: u64,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// The measurements at checkpoint `idx` (load paused, `c` serving). Ends
/// with restarts: returns the controller started last.
async fn checkpoint(
    mut c: Controller,
    bin: &Path,
    cfg: &Cfg,
    probe: &Arc<Probe>,
    idx: usize,
    allocs: u64,
    load: LoadStats,
) -> anyhow::Result<(Controller, Point)> {
    let rss = rss_kib(c.pid());
    let mut admin = admin_client(connect(&c.endpoint()).await?);

    let (check, resp) = measure(probe, ADMIN_REPS, async || {
        Ok(admin.check_ipam(CheckIpamRequest {}).await?.into_inner())
    })
    .await
    .context("CheckIpam")?;
    let check_borrowed = resp
        .problems
        .iter()
        .filter(|p| p.kind == Kind::BorrowedAddress as i32)
        .count();
    let check_damage = resp.problems.len() - check_borrowed;

    let (routes, n_routes) = measure(probe, ADMIN_REPS, async || {
        Ok(admin
            .show_routes(ShowRoutesRequest::default())
            .await?
            .into_inner()
            .routes
            .len())
    })
    .await
    .context("ShowRoutes")?;

    let (ipam, ()) = measure(probe, ADMIN_REPS, async || {
        admin
            .show_ipam(ShowIpamRequest { show_blocks: false })
            .await?;
        Ok(())
    })
    .await
    .context("ShowIpam")?;

    let ch = connect(&c.endpoint()).await?;
    let mut one = node_client(ch.clone(), &node_name(0));
    let (list, n_handles) = measure(probe, LIST_REPS, async || {
        Ok(one
            .list_handles(ListHandlesRequest {})
            .await?
            .into_inner()
            .handles
            .len())
    })
    .await
    .context("ListHandles")?;

    // Fresh nodes, registered first; the first Assign of each claims a block.
    let fresh: Vec<String> = (0..CLAIM_REPS)
        .map(|k| format!("claim-{}-{k}", idx + 1))
        .collect();
    for (k, name) in fresh.iter().enumerate() {
        register_node(&ch, name, cfg.nodes + idx * CLAIM_REPS + k).await?;
    }
    let mut k = 0;
    let mut claim_not_new = 0;
    let (claim, ()) = measure(probe, CLAIM_REPS, async || {
        let name = &fresh[k];
        k += 1;
        let r = node_client(ch.clone(), name)
            .assign(AssignRequest {
                handle: format!("{name}-pod"),
                ..Default::default()
            })
            .await
            .with_context(|| format!("Assign as {name}"))?
            .into_inner();
        match r.allocations.first() {
            Some(a) if a.block_affinity == *name && !a.borrowed => {}
            Some(_) => claim_not_new += 1,
            None => bail!("Assign as {name}: no allocation"),
        }
        Ok(())
    })
    .await
    .context("block-claiming Assign")?;
    drop((admin, one, ch));

    // Restarts: the prober stops and drops its connection first.
    probe.pause().await;
    let mut shutdown = Vec::new();
    let mut restart = Vec::new();
    let data = c.data_dir.clone();
    for _ in 0..RESTART_REPS {
        let t = Instant::now();
        // The runtime keeps running meanwhile: the graceful shutdown's
        // GOAWAY ping needs the client's answers.
        let stopped = tokio::task::spawn_blocking(move || {
            c.term();
            c
        })
        .await
        .context("stopping the controller with SIGTERM")?;
        shutdown.push(t.elapsed());
        drop(stopped);
        let t = Instant::now();
        let (b, d) = (bin.to_path_buf(), data.clone());
        c = tokio::task::spawn_blocking(move || Controller::start_bin(&b, &d, &["--insecure"]))
            .await
            .context("restarting the controller")?;
        wait_serving(&c.endpoint()).await?;
        restart.push(t.elapsed());
    }
    let rss_restart_kib = rss_kib(c.pid());
    probe.resume(c.endpoint());

    Ok((
        c,
        Point {
            allocs,
            load,
            rss_kib: rss,
            check,
            check_allocated: resp.allocated,
            check_damage,
            check_borrowed,
            routes,
            n_routes,
            ipam,
            list,
            n_handles,
            claim,
            claim_not_new,
            shutdown,
            restart,
            rss_restart_kib,
        },
    ))
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Unit {
    Ms,
    Secs,
    MiB,
    Bytes,
    Count,
    Rate,
    Cores,
}

fn fmt_val(u: Unit, v: f64) -> String {
    match u {
        Unit::Ms if v < 1.0 => format!("{v:.3} ms"),
        Unit::Ms if v < 10.0 => format!("{v:.2} ms"),
        Unit::Ms if v < 100.0 => format!("{v:.1} ms"),
        Unit::Ms => format!("{v:.0} ms"),
        Unit::Secs => format!("{v:.3} s"),
        Unit::MiB => format!("{v:.0} MiB"),
        Unit::Bytes => format!("{v:.0} B"),
        Unit::Count => format!("{v:.0}"),
        Unit::Rate => format!("{v:.0}/s"),
        Unit::Cores => format!("{v:.2} cores"),
    }
}

struct Row {
    name: String,
    vals: Vec<f64>,
    unit: Unit,
    /// Larger is worse: checked against the growth of the allocation count.
    cost: bool,
    /// Whether a growth ratio means anything for this row.
    growth: bool,
    /// The target's text and whether the last value meets it.
    target: Option<(String, bool)>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// The rows of the report, one value per checkpoint.
fn rows(cfg: &Cfg, probe: &Probe, pts: &[Point], base_rss_kib: u64) -> Vec<Row> {
    let mut out = Vec::new();
    let mut row = |name: String,
                   unit: Unit,
                   cost: bool,
                   vals: Vec<f64>,
                   target: Option<(String, &dyn Fn(f64) -> bool)>| {
        let target = target.map(|(t, ok)| {
            let last = *vals.last().unwrap();
            (t, ok(last))
        });
        out.push(Row {
            growth: !name.ends_with("at allocation"),
            name,
            vals,
            unit,
            cost,
            target,
        });
    };
    let col = |f: &dyn Fn(&Point) -> f64| pts.iter().map(f).collect::<Vec<f64>>();
    let prober_ok = |v: f64| v <= ms(TARGET_PROBER);
    let prober_t = || Some(("<= 10 ms".to_string(), &prober_ok as &dyn Fn(f64) -> bool));
    let under = |d: Duration| move |v: f64| v <= ms(d);

    row(
        format!("Assign rate in the load segment, c={}", cfg.conc),
        Unit::Rate,
        false,
        col(&|p| p.load.rate),
        None,
    );
    row(
        "  worst Assign latency in the segment".into(),
        Unit::Ms,
        true,
        col(&|p| ms(p.load.worst)),
        None,
    );
    row(
        "  ... at allocation".into(),
        Unit::Count,
        false,
        col(&|p| p.load.worst_at as f64),
        None,
    );
    row(
        "  prober worst during the segment".into(),
        Unit::Ms,
        true,
        col(&|p| ms(probe.worst(p.load.window).lat)),
        prober_t(),
    );
    row(
        "  ... at allocation".into(),
        Unit::Count,
        false,
        col(&|p| probe.worst(p.load.window).allocs as f64),
        None,
    );
    row(
        "  prober p50 during the segment".into(),
        Unit::Ms,
        true,
        col(&|p| ms(probe.quantile(p.load.window, 0.5))),
        None,
    );
    row(
        "  prober p99 during the segment".into(),
        Unit::Ms,
        true,
        col(&|p| ms(probe.quantile(p.load.window, 0.99))),
        None,
    );
    row(
        "  controller CPU during the segment".into(),
        Unit::Cores,
        false,
        col(&|p| p.load.server_cores),
        None,
    );
    row(
        "  bench (client) CPU during the segment".into(),
        Unit::Cores,
        false,
        col(&|p| p.load.client_cores),
        None,
    );
    let check_ok = under(TARGET_CHECK);
    row(
        format!("CheckIpam, median of {ADMIN_REPS}"),
        Unit::Ms,
        true,
        col(&|p| ms(p.check.median())),
        Some(("<= 300 ms".into(), &check_ok)),
    );
    row(
        "  prober worst during CheckIpam".into(),
        Unit::Ms,
        true,
        col(&|p| ms(probe.worst_of(&p.check.windows).lat)),
        prober_t(),
    );
    row(
        "  allocated (CheckIpam)".into(),
        Unit::Count,
        false,
        col(&|p| p.check_allocated as f64),
        None,
    );
    let show_ok = under(TARGET_SHOW);
    row(
        format!("ShowRoutes (cluster), median of {ADMIN_REPS}"),
        Unit::Ms,
        true,
        col(&|p| ms(p.routes.median())),
        Some(("<= 20 ms".into(), &show_ok)),
    );
    row(
        "  prober worst during ShowRoutes".into(),
        Unit::Ms,
        true,
        col(&|p| ms(probe.worst_of(&p.routes.windows).lat)),
        prober_t(),
    );
    row(
        "  routes".into(),
        Unit::Count,
        false,
        col(&|p| p.n_routes as f64),
        None,
    );
    row(
        format!("ShowIpam, median of {ADMIN_REPS}"),
        Unit::Ms,
        true,
        col(&|p| ms(p.ipam.median())),
        Some(("<= 20 ms".into(), &show_ok)),
    );
    row(
        "  prober worst during ShowIpam".into(),
        Unit::Ms,
        true,
        col(&|p| ms(probe.worst_of(&p.ipam.windows).lat)),
        prober_t(),
    );
    let list_ok = under(TARGET_LIST);
    row(
        format!("ListHandles, one node, median of {LIST_REPS}"),
        Unit::Ms,
        true,
        col(&|p| ms(p.list.median())),
        Some(("<= 1 ms".into(), &list_ok)),
    );
    row(
        "  prober worst during ListHandles".into(),
        Unit::Ms,
        true,
        col(&|p| ms(probe.worst_of(&p.list.windows).lat)),
        prober_t(),
    );
    row(
        "  handles returned".into(),
        Unit::Count,
        false,
        col(&|p| p.n_handles as f64),
        None,
    );
    let first_claim = ms(pts[0].claim.median());
    let claim_ok = move |v: f64| v <= first_claim * CLAIM_TOLERANCE;
    row(
        format!("Assign claiming a block, c=1, p50 of {CLAIM_REPS}"),
        Unit::Ms,
        true,
        col(&|p| ms(p.claim.median())),
        Some((
            format!(
                "<= first +{:.0}% ({})",
                (CLAIM_TOLERANCE - 1.0) * 100.0,
                fmt_val(Unit::Ms, first_claim)
            ),
            &claim_ok,
        )),
    );
    row(
        "  prober worst during these Assigns".into(),
        Unit::Ms,
        true,
        col(&|p| ms(probe.worst_of(&p.claim.windows).lat)),
        prober_t(),
    );
    let rss_ok = |v: f64| v <= TARGET_RSS_MIB;
    row(
        "controller RSS".into(),
        Unit::MiB,
        true,
        col(&|p| p.rss_kib as f64 / 1024.0),
        Some(("<= 300 MiB".into(), &rss_ok)),
    );
    row(
        "  RSS per allocation, above the empty one".into(),
        Unit::Bytes,
        true,
        col(&|p| p.rss_kib.saturating_sub(base_rss_kib) as f64 * 1024.0 / p.allocs as f64),
        None,
    );
    row(
        "  RSS after a restart".into(),
        Unit::MiB,
        true,
        col(&|p| p.rss_restart_kib as f64 / 1024.0),
        None,
    );
    row(
        format!("SIGTERM -> exit, median of {RESTART_REPS}"),
        Unit::Secs,
        true,
        col(&|p| median(&p.shutdown).as_secs_f64()),
        None,
    );
    let restart_ok = |v: f64| v < TARGET_RESTART.as_secs_f64();
    row(
        format!("restart -> SERVING, median of {RESTART_REPS}"),
        Unit::Secs,
        true,
        col(&|p| median(&p.restart).as_secs_f64()),
        Some(("< 1 s".into(), &restart_ok)),
    );
    out
}

fn print_report(cfg: &Cfg, probe: &Probe, pts: &[Point], base_rss_kib: u64) {
    let rows = rows(cfg, probe, pts, base_rss_kib);
    let n = pts.len();
    let labels: Vec<String> = pts.iter().map(|p| count_label(p.allocs)).collect();
    let alloc_ratio = (n >= 2).then(|| pts[n - 1].allocs as f64 / pts[n - 2].allocs as f64);
    let growth_head = match alloc_ratio {
        Some(r) => format!(
            "growth {}->{} (allocs x{r:.1})",
            labels[n - 2],
            labels[n - 1]
        ),
        None => "growth".into(),
    };
    let (wn, wc, wg, wt) = (44, 11, growth_head.len().max(8), 26);
    let mut head = format!("| {:<wn$} |", "figure");
    let mut rule = format!("|{:-<w$}|", "", w = wn + 2);
    for l in &labels {
        head += &format!(" {l:>wc$} |");
        rule += &format!("{:-<w$}|", "", w = wc + 2);
    }
    head += &format!(
        " {growth_head:>wg$} | {:<wt$} | result |",
        "target at the last"
    );
    rule += &format!("{:-<w$}|{:-<x$}|--------|", "", "", w = wg + 2, x = wt + 2);
    println!("{head}");
    println!("{rule}");
    let mut faster = Vec::new();
    for r in &rows {
        let mut line = format!("| {:<wn$} |", r.name);
        for &v in &r.vals {
            line += &format!(" {:>wc$} |", fmt_val(r.unit, v));
        }
        let growth = match alloc_ratio {
            Some(ar) if r.growth && r.vals[n - 2] > 0.0 => {
                let g = r.vals[n - 1] / r.vals[n - 2];
                if r.cost && g > ar {
                    faster.push(format!("{} (x{g:.2})", r.name.trim()));
                }
                format!("x{g:.2}")
            }
            _ => "-".into(),
        };
        let (t, res) = match &r.target {
            Some((t, ok)) => (t.clone(), pass(*ok)),
            None => (String::new(), ""),
        };
        line += &format!(" {growth:>wg$} | {t:<wt$} | {res:<6} |");
        println!("{line}");
    }
    println!();
    let o = *probe.overall.lock().unwrap();
    let over = probe.over_target.load(Ordering::SeqCst);
    println!(
        "prober ({}), whole run: {} GetAllocation calls, worst {} at allocation {}, {over} over 10 ms \
         (restarts excluded): {}",
        if probe.realtime.load(Ordering::SeqCst) {
            "SCHED_FIFO"
        } else {
            "normal priority: SCHED_FIFO was refused"
        },
        o.calls,
        fmt_val(Unit::Ms, ms(o.lat)),
        o.allocs,
        pass(o.lat <= TARGET_PROBER)
    );
    if let Some(ar) = alloc_ratio {
        if faster.is_empty() {
            println!("no cost grows faster than the allocation count (x{ar:.2})");
        } else {
            println!(
                "growing faster than the allocation count (x{ar:.2}): {}",
                faster.join(", ")
            );
        }
    }
    let misses: Vec<&str> = rows
        .iter()
        .filter(|r| r.target.as_ref().is_some_and(|t| !t.1))
        .map(|r| r.name.trim())
        .collect();
    println!(
        "targets at {} allocations: {} of {} met{}",
        labels[n - 1],
        rows.iter().filter(|r| r.target.is_some()).count() - misses.len(),
        rows.iter().filter(|r| r.target.is_some()).count(),
        if misses.is_empty() {
            String::new()
        } else {
            format!("; missed: {}", misses.join(", "))
        }
    );
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

/// Ok(false) when the run finished but the answers were wrong.
async fn run() -> anyhow::Result<bool> {
    let cfg = config()?;
    let (bin, how) = find_binary();
    if !bin.is_file() {
        bail!(
            "no controller binary at {} ({how}); build it with \
             `cargo build --release -p tabby-controller` or set TABBY_CONTROLLER_BIN",
            bin.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("tabby-scale")
        .tempdir()
        .context("temp dir")?;
    let data = dir.path().join("data");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let last = *cfg.checkpoints.last().unwrap();
    println!("tabby-controller at scale: IPAM over gRPC on loopback, durable answers");
    println!("  binary      {} ({how})", bin.display());
    println!("  data dir    {} ({})", data.display(), fs_type(dir.path()));
    println!("  cpus        {cpus} (client and server share them)");
    println!(
        "  load        {} nodes x {} pods, {} Assigns in flight over {} connections; pool 10.0.0.0/8, /26 blocks",
        cfg.nodes,
        cfg.pods,
        cfg.conc,
        LOAD_CHANNELS.min(cfg.conc)
    );
    println!(
        "  attributes  {}",
        if cfg.attrs {
            "a pod's handle and attributes as tabby-node sends them (k8s-pod-network.<64 hex digits>; container_id, ifname, namespace, pod)"
        } else {
            "short handles (pod-<node>-<n>), no attributes (SCALE_ATTRS=0)"
        }
    );
    let labels: Vec<String> = cfg.checkpoints.iter().map(|&c| count_label(c)).collect();
    println!("  checkpoints {} allocations", labels.join(", "));
    if let Some(s) = &cfg.scaled {
        println!("              ({s})");
    }
    if last < (cfg.nodes * cfg.pods) as u64 {
        println!(
            "              (the load stops at {last}, before {} x {} = {})",
            cfg.nodes,
            cfg.pods,
            cfg.nodes * cfg.pods
        );
    }
    // Write back what the build left dirty, away from our fsyncs.
    nix::unistd::sync();

    let (b, d) = (bin.clone(), data.clone());
    let mut c = tokio::task::spawn_blocking(move || Controller::start_bin(&b, &d, &["--insecure"]))
        .await
        .context("starting the controller")?;
    {
        let mut admin = admin_client(connect(&c.endpoint()).await?);
        create_pool(&mut admin, "scale", "10.0.0.0/8", 26).await;
    }
    let base_rss_kib = rss_kib(c.pid());
    let t = Instant::now();
    register_all(&c, cfg.nodes, cfg.conc).await?;
    println!(
        "controller RSS {} MiB with the pool and no nodes; registered {} nodes in {:.2} s",
        base_rss_kib / 1024,
        cfg.nodes,
        t.elapsed().as_secs_f64()
    );

    // The prober's address: the first one assigned.
    let (first_handle, attributes) = pod(0, 0, cfg.attrs);
    let first = {
        let ch = connect(&c.endpoint()).await?;
        let r = node_client(ch, &node_name(0))
            .assign(AssignRequest {
                handle: first_handle.clone(),
                attributes,
                ..Default::default()
            })
            .await
            .with_context(|| format!("Assign {first_handle}"))?
            .into_inner();
        r.allocations
            .first()
            .with_context(|| format!("Assign {first_handle}: no allocation"))?
            .address
            .clone()
    };
    let probe = Arc::new(Probe::new(c.endpoint()));
    probe.allocs.store(1, Ordering::SeqCst);
    let prober = start_prober(probe.clone(), first.clone(), first_handle.clone());
    println!(
        "prober: GetAllocation {first} (held by {first_handle}) in a loop, c=1, own connection and thread"
    );

    let mut pts = Vec::new();
    let mut done = 1u64;
    for (idx, &cp) in cfg.checkpoints.iter().enumerate() {
        let t = Instant::now();
        let ls = load(&c, &cfg, &probe, done, cp).await?;
        done = cp;
        probe.check()?;
        println!(
            "{:>6} allocations: load {:.1} s ({:.0} assign/s); measuring...",
            count_label(cp),
            t.elapsed().as_secs_f64(),
            ls.rate
        );
        let t = Instant::now();
        let (nc, p) = checkpoint(c, &bin, &cfg, &probe, idx, cp, ls).await?;
        c = nc;
        probe.check()?;
        println!(
            "{:>6} allocations: measured in {:.1} s (CheckIpam {}, ShowRoutes {}, restart {:.3} s)",
            count_label(cp),
            t.elapsed().as_secs_f64(),
            fmt_val(Unit::Ms, ms(p.check.median())),
            fmt_val(Unit::Ms, ms(p.routes.median())),
            median(&p.restart).as_secs_f64()
        );
        pts.push(p);
    }

    probe.stop.store(true, Ordering::SeqCst);
    tokio::task::spawn_blocking(move || prober.join())
        .await
        .context("joining the prober")?
        .map_err(|_| anyhow!("the prober thread panicked"))?;
    probe.check()?;
    tokio::task::spawn_blocking(move || c.term())
        .await
        .context("stopping the controller")?;
    if let Ok(keep) = std::env::var("SCALE_KEEP_DATA") {
        // A loaded store to profile a restart on, without loading it again.
        let ok = std::process::Command::new("cp")
            .args(["-a", "--"])
            .arg(&data)
            .arg(&keep)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!(
                "SCALE_KEEP_DATA: could not copy {} to {keep}",
                data.display()
            );
        }
        println!("  data dir kept as {keep}");
    }

    println!();
    print_report(&cfg, &probe, &pts, base_rss_kib);

    // Answers that must hold whatever the speed.
    let mut ok = true;
    for (idx, p) in pts.iter().enumerate() {
        let want = p.allocs + (idx * CLAIM_REPS) as u64;
        if p.check_allocated != want {
            println!(
                "ERROR: CheckIpam at {} allocations counts {} allocated, want {want}",
                p.allocs, p.check_allocated
            );
            ok = false;
        }
        if p.check_damage > 0 {
            println!(
                "ERROR: CheckIpam at {} allocations reports {} problems",
                p.allocs, p.check_damage
            );
            ok = false;
        }
        if p.check_borrowed > 0 {
            println!(
                "note: {} borrowed addresses at {} allocations",
                p.check_borrowed, p.allocs
            );
        }
        if p.claim_not_new > 0 {
            println!(
                "note: {} of the {CLAIM_REPS} first Assigns of a fresh node at {} allocations did not claim a block",
                p.claim_not_new, p.allocs
            );
        }
    }
    println!(
        "note: {CLAIM_REPS} fresh nodes and their {CLAIM_REPS} addresses are added at each checkpoint \
         (not counted in the allocation counts); client and server share {cpus} CPUs"
    );
    Ok(ok)
}

fn main() -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("scale: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
