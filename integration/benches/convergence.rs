//! Convergence: a new block for node 1, then the time until its
//! route is in every other node's kernel (add→all); then the block is
//! withdrawn, and the time until the route is gone from every other node
//! (withdraw→all). tabby (one `tabby-controller`, N `tabby-node`s) against
//! Calico's mechanism (BIRD 2 on every node, iBGP to one BIRD route
//! reflector), each on a fresh copy of the same netns fabric, in the same run.
//!
//! The fabric: a namespace with a bridge (pinned MAC, 172.30.0.1/16; the
//! controller and the route reflector listen there), N node namespaces with
//! a veth into it (172.30.1.i, fixed MACs), permanent neighbour entries for
//! every address a namespace talks to (the kernel's neighbour table is
//! shared by all namespaces and holds 1,024 entries that are not permanent),
//! and a netlink route monitor in every node namespace: a dedicated thread
//! that entered the namespace before creating its socket, at SCHED_FIFO
//! when allowed so its timestamps are not queued behind busy daemons.
//!
//! Nodes 2..N each own one /26 block of 10.192.0.0/12 (so every node holds
//! N-1 routes); node 1 owns none until a rep gives it one.
//! - tabby: add = `NodeAgent.Assign` as node 1 of an address in a fresh
//!   block (the controller claims the block); the clock starts just before
//!   the call. Release does not free a block's affinity, so withdraw =
//!   `ReleaseHandle` (untimed, no route change), then `IpamAdmin.DeleteNode`
//!   of node 1, which frees its empty blocks (node 1 holds only that one);
//!   node 1 is registered again afterwards, outside the CPU window.
//! - BIRD: add = a blackhole route `proto static` added on node 1 over
//!   netlink (clock starts just before the request); node 1's BIRD learns it
//!   from the kernel (`protocol kernel { learn; }`, async netlink) and exports
//!   it to the reflector: the fastest realistic path (no config reload, no
//!   process start). Withdraw = delete that route. Timers at BIRD's minimum
//!   (hold 3, keepalive 1, connect delay/retry 1, error wait 1).
//!
//! Per rep: add, pause, withdraw, pause, [tabby: register node 1 again],
//! pause; pauses are uniform random in 300–900 ms. CPU per update: the
//! on-CPU time of every node process (all threads, from schedstat in ns,
//! plus reaped children such as `nft`) from the add to the end of the
//! second pause (the re-registration pause is left out for both systems),
//! divided by the two updates of each rep; the whole-loop figure and the
//! same from `/proc/<pid>/stat` utime+stime ticks (10 ms, too coarse for
//! one BIRD update) are printed beside it. Memory: `/proc/<pid>/smaps_rollup`
//! Rss and Private_Clean+Private_Dirty after the reps.
//!
//! Also: one tabby-node holding 10 vs 10,000 remote routes (blocks of a
//! fake node preloaded through Assign before the nodes start), the CPU one
//! update costs it.
//!
//! Run (root, after `cargo build --release --workspace`):
//! `cargo bench -p tabby-integration --bench convergence`.
//! Env: CONV_NODES (default "30,100"), CONV_REPS (10), CONV_TIMEOUT_MS
//! (5000, per rep and direction), CONV_PAUSE_MS ("300-900"), CONV_SYSTEMS
//! ("bird,tabby"), CONV_BULK ("10,10000"; "0" skips that section),
//! CONV_BULK_REPS (CONV_REPS). Prints; asserts nothing.
mod common;

use anyhow::{anyhow, bail, Context, Result};
use common::{procs::*, *};
use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};
use tabby_integration::{
    netns,
    rtnl::{make_thread_realtime, NlSocket, RouteEvent, RTPROT_STATIC, RT_TABLE_MAIN},
};
use tabby_proto::v1 as pb;

/// The bridge in the fabric namespace: every node's gateway; the controller
/// and the route reflector listen on it.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
const BR_MAC: &str = "02:00:ac:1e:00:01";
const CTL_PORT: u16 = 5151;
const POOL: &str = "10.192.0.0/12";
const POOL_BASE: Ipv4Addr = Ipv4Addr::new(10, 192, 0, 0);
const BLOCK_LEN: u8 = 26;
/// Block index of rep r's trigger block: TRIGGER_BLOCK + r.
const TRIGGER_BLOCK: u32 = 1024;
/// Block index of the fake node's k-th block: BULK_BLOCK + k.
const BULK_BLOCK: u32 = 2048;
/// The fake node holding the preloaded blocks (no process, no namespace).
const BULK_NODE: &str = "bulk";
const BULK_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 250, 1);
const TABBY_PROTO: u8 = 77;
const BIRD_PROTO: &str = "bird";
const AS: u32 = 64512;
const IDLE: Duration = Duration::from_secs(2);
/// The unit of /proc/<pid>/stat times: fixed at 100 per second by the
/// kernel's ABI (what sysconf(_SC_CLK_TCK) answers).
const USER_HZ: f64 = 100.0;

// ---------------------------------------------------------------------------
// Configuration, addresses, small helpers
// ---------------------------------------------------------------------------

struct Cfg {
    nodes: Vec<usize>,
    reps: usize,
    timeout: Duration,
    pause: (u64, u64),
    bird: bool,
    tabby: bool,
    bulk: Vec<usize>,
    bulk_reps: usize,
}

fn env_str(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn env_list(k: &str, d: &str) -> Result<Vec<usize>> {
    env_str(k, d)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .with_context(|| format!("{k}: {s:?} is not a number"))
        })
        .collect()
}

impl Cfg {
    fn from_env() -> Result<Cfg> {
        let nodes = env_list("CONV_NODES", "30,100")?;
        if nodes.iter().any(|&n| !(3..=1000).contains(&n)) {
            bail!("CONV_NODES: each N must be 3..=1000");
        }
        let reps = env_list("CONV_REPS", "10")?
            .first()
            .copied()
            .unwrap_or(10)
            .max(1);
        if reps > 1000 {
            bail!("CONV_REPS: at most 1000");
        }
        let timeout = Duration::from_millis(env_list("CONV_TIMEOUT_MS", "5000")?[0] as u64);
        let p = env_str("CONV_PAUSE_MS", "300-900");
        let (lo, hi) = p
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
            .ok_or_else(|| anyhow!("CONV_PAUSE_MS: want LO-HI in ms, got {p:?}"))?;
        if lo > hi {
            bail!("CONV_PAUSE_MS: {lo} > {hi}");
        }
        let systems = env_str("CONV_SYSTEMS", "bird,tabby");
        let bulk: Vec<usize> = env_list("CONV_BULK", "10,10000")?
            .into_iter()
            .filter(|&b| b > 0)
            .collect();
        if bulk.iter().any(|&b| b > 14_000) {
            bail!("CONV_BULK: at most 14000 blocks fit the pool");
        }
        let bulk_reps = env_list("CONV_BULK_REPS", &reps.to_string())?
            .first()
            .copied()
            .unwrap_or(reps)
            .max(1);
        Ok(Cfg {
            nodes,
            reps,
            timeout,
            pause: (lo, hi),
            bird: systems.contains("bird"),
            tabby: systems.contains("tabby"),
            bulk,
            bulk_reps,
        })
    }
}

/// Node i's (1-based) fabric address.
fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 30, 1, 0)) + i as u32)
}

fn node_mac(i: usize) -> String {
    format!("02:cc:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff)
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Network address of block `k` of the pool.
fn block(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POOL_BASE) + k * (1 << (32 - BLOCK_LEN)))
}

fn block_cidr(k: u32) -> String {
    format!("{}/{BLOCK_LEN}", block(k))
}

/// The first address of block `k` that tabby hands out for it.
fn block_addr(k: u32) -> String {
    Ipv4Addr::from(u32::from(block(k)) + 1).to_string()
}

/// A small xorshift generator: pauses need to be irregular, not secure.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(t ^ ((std::process::id() as u64) << 32) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn pause(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// Sleeps, but wakes for Ctrl-C.
fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// /proc: CPU and memory of the processes we started
// ---------------------------------------------------------------------------

/// Fields 14..=17 of `/proc/<pid>/stat`: utime, stime, cutime, cstime
/// (clock ticks; children count once reaped).
fn stat_ticks(pid: u32) -> Result<[u64; 4]> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    // After the command comes field 3 (state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let g = |i: usize| -> Result<u64> {
        f.get(i - 3)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
            .parse::<i64>()
            .map(|v| v.max(0) as u64)
            .map_err(Into::into)
    };
    Ok([g(14)?, g(15)?, g(16)?, g(17)?])
}

/// On-CPU nanoseconds of each live thread of `pid` (schedstat).
fn thread_ns(pid: u32) -> Result<BTreeMap<u32, u64>> {
    let mut m = BTreeMap::new();
    let dir = fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("process {pid} is gone"))?;
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        // A thread that exits between the listing and the read is skipped.
        if let Ok(s) = fs::read_to_string(e.path().join("schedstat")) {
            if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
                m.insert(tid, ns);
            }
        }
    }
    Ok(m)
}

/// CPU time of the processes we measure, as deltas between samples.
///
/// The main figure is precise: the on-CPU time of every live thread
/// (`/proc/<pid>/task/<tid>/schedstat`, ns; a thread that exits loses only
/// its time since the previous sample) plus the reaped children's
/// cutime+cstime (a daemon's `nft` runs are its cost too; clock ticks).
/// `/proc/<pid>/stat` utime+stime(+children) alone counts in 10 ms ticks,
/// too coarse for a BIRD update; it is kept as a cross-check.
struct CpuMeter {
    pids: Vec<u32>,
    threads: Vec<BTreeMap<u32, u64>>,
    stat: Vec<[u64; 4]>,
    ns_per_tick: f64,
}

/// One delta: per pid, precise ns and the stat-tick figure in ns.
struct CpuDelta {
    ns: Vec<u64>,
    stat_ns: Vec<u64>,
}

impl CpuMeter {
    fn new(pids: &[u32]) -> Result<CpuMeter> {
        let mut m = CpuMeter {
            pids: pids.to_vec(),
            threads: vec![BTreeMap::new(); pids.len()],
            stat: vec![[0; 4]; pids.len()],
            ns_per_tick: 1e9 / USER_HZ,
        };
        m.delta()?;
        Ok(m)
    }

    /// CPU used since the previous call.
    fn delta(&mut self) -> Result<CpuDelta> {
        let mut out = CpuDelta {
            ns: Vec::new(),
            stat_ns: Vec::new(),
        };
        for (k, &pid) in self.pids.iter().enumerate() {
            let th = thread_ns(pid)?;
            let st = stat_ticks(pid)?;
            let mut ns: u64 = th
                .iter()
                .map(|(tid, v)| v.saturating_sub(*self.threads[k].get(tid).unwrap_or(&0)))
                .sum();
            let d: Vec<u64> = (0..4)
                .map(|i| st[i].saturating_sub(self.stat[k][i]))
                .collect();
            ns += ((d[2] + d[3]) as f64 * self.ns_per_tick) as u64;
            out.ns.push(ns);
            out.stat_ns
                .push((d.iter().sum::<u64>() as f64 * self.ns_per_tick) as u64);
            self.threads[k] = th;
            self.stat[k] = st;
        }
        Ok(out)
    }
}

fn add_to(acc: &mut [u64], d: &[u64]) {
    for (a, x) in acc.iter_mut().zip(d) {
        *a += x;
    }
}

/// (Rss, Private_Clean + Private_Dirty) in KiB.
fn mem_kib(pid: u32) -> Result<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((
        field("Rss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    ))
}

// ---------------------------------------------------------------------------
// Processes, namespaces, the fabric
// ---------------------------------------------------------------------------

/// Number of IPv4 routes with protocol `proto` (number or name) in `ns`.
fn count_routes(ns: &str, proto: &str) -> usize {
    Command::new("ip")
        .args(["-n", ns, "-4", "route", "show", "proto", proto])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0)
}

/// Waits until every namespace holds `want` routes of `proto`.
fn wait_routes(nss: &[String], proto: &str, want: usize, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        check_interrupted()?;
        let short: Vec<(String, usize)> = nss
            .iter()
            .map(|ns| (ns.clone(), count_routes(ns, proto)))
            .filter(|(_, c)| *c != want)
            .collect();
        if short.is_empty() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            let some: Vec<String> = short
                .iter()
                .take(5)
                .map(|(n, c)| format!("{n}: {c}"))
                .collect();
            bail!(
                "timed out after {timeout:?}: {} namespace(s) do not hold {want} proto {proto} routes ({})",
                short.len(),
                some.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A fabric: bridge namespace, node namespaces 1..=n, the route monitors.
/// Dropped in field order: processes first, then client threads, monitors,
/// namespaces, the directory.
struct Lab {
    procs: Procs,
    ctl: Option<Ctl>,
    trigger: Option<Trigger>,
    mon: Option<Monitors>,
    nss: Namespaces,
    fabric: String,
    nodes: Vec<String>,
    dir: tempfile::TempDir,
}

impl Lab {
    /// Node i's namespace (1-based).
    fn ns(&self, i: usize) -> &str {
        &self.nodes[i - 1]
    }

    fn build(tag: &str, n: usize) -> Result<Lab> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tabby-conv-{tag}-"))
            .tempdir_in("/tmp")?;
        let mut lab = Lab {
            procs: Procs::new(dir.path()),
            ctl: None,
            trigger: None,
            mon: None,
            nss: Namespaces::default(),
            fabric: format!("{tag}-f"),
            nodes: (1..=n).map(|i| format!("{tag}-{i}")).collect(),
            dir,
        };
        let f = lab.fabric.clone();
        lab.nss.add(&f)?;
        // Pinned bridge MAC: an unpinned bridge takes its lowest port MAC and
        // would move under the nodes' neighbour entries as ports join.
        netns::ip(&f, &format!("link add br0 address {BR_MAC} type bridge"))?;
        netns::ip(&f, &format!("addr add {GATEWAY}/16 dev br0"))?;
        netns::ip(&f, "link set br0 up")?;
        let mut fb = String::new();
        for i in 1..=n {
            check_interrupted()?;
            let ns = lab.nodes[i - 1].clone();
            lab.nss.add(&ns)?;
            fb += &format!(
                "link add v{i} type veth peer name eth0 address {} netns {ns}\nlink set v{i} master br0 up\n\
                 neigh replace {} lladdr {} dev br0 nud permanent\n",
                node_mac(i),
                node_ip(i),
                node_mac(i)
            );
        }
        netns::run_stdin("ip", &["-n", &f, "-batch", "-"], &fb)?;
        for i in 1..=n {
            check_interrupted()?;
            let ns = lab.nodes[i - 1].clone();
            let mut b = format!(
                "addr add {}/16 dev eth0\nlink set eth0 up\nroute add default via {GATEWAY}\n\
                 neigh replace {GATEWAY} lladdr {BR_MAC} dev eth0 nud permanent\n",
                node_ip(i)
            );
            for j in (1..=n).filter(|&j| j != i) {
                b += &format!(
                    "neigh replace {} lladdr {} dev eth0 nud permanent\n",
                    node_ip(j),
                    node_mac(j)
                );
            }
            netns::run_stdin("ip", &["-n", &ns, "-batch", "-"], &b)?;
        }
        lab.mon = Some(Monitors::start(&lab.nodes)?);
        Ok(lab)
    }
}

// ---------------------------------------------------------------------------
// Route monitors: one thread per node namespace
// ---------------------------------------------------------------------------

struct Monitors {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
    rx: mpsc::Receiver<(usize, RouteEvent)>,
    overflow: Arc<AtomicUsize>,
    realtime: bool,
}

impl Monitors {
    /// One monitor per namespace; node i (1-based) is `nss[i-1]`. Returns
    /// once every socket is subscribed.
    fn start(nss: &[String]) -> Result<Monitors> {
        let stop = Arc::new(AtomicBool::new(false));
        let overflow = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<bool>();
        let mut mon = Monitors {
            stop: stop.clone(),
            threads: Vec::new(),
            rx,
            overflow: overflow.clone(),
            realtime: true,
        };
        for (k, ns) in nss.iter().enumerate() {
            let (tx, ready, stop, overflow) =
                (tx.clone(), ready_tx.clone(), stop.clone(), overflow.clone());
            let node = k + 1;
            let h = netns::spawn_within(ns, move || -> Result<()> {
                let rt = make_thread_realtime(10);
                let s = NlSocket::monitor_v4_routes().context("route monitor socket")?;
                s.set_recv_timeout(Duration::from_millis(200))?;
                let _ = ready.send(rt);
                let mut buf = vec![0u8; 1 << 16];
                let mut evs = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    evs.clear();
                    match s.recv_route_events(&mut buf, &mut evs) {
                        Ok(()) => {
                            for e in evs.drain(..) {
                                if tx.send((node, e)).is_err() {
                                    return Ok(());
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            overflow.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => return Err(e).context("route monitor recv"),
                    }
                }
                Ok(())
            })?;
            mon.threads.push(h);
        }
        drop(ready_tx);
        for _ in nss {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(rt) => mon.realtime &= rt,
                Err(_) => bail!("a route monitor did not start"),
            }
        }
        Ok(mon)
    }

    fn drain(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Waits until each node of `nodes` reports the add (`add`) or delete
    /// of `dst/plen` in its main table after `t0`. Per node: the delay, or
    /// None when `timeout` passed first.
    fn wait(
        &self,
        dst: Ipv4Addr,
        plen: u8,
        add: bool,
        nodes: &[usize],
        t0: Instant,
        timeout: Duration,
    ) -> Result<Vec<Option<Duration>>> {
        let max = nodes.iter().copied().max().unwrap_or(0);
        let mut want = vec![false; max + 1];
        for &i in nodes {
            want[i] = true;
        }
        let mut got: Vec<Option<Duration>> = vec![None; max + 1];
        let mut left = nodes.len();
        let deadline = t0 + timeout;
        while left > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self
                .rx
                .recv_timeout((deadline - now).min(Duration::from_millis(100)))
            {
                Ok((i, e)) => {
                    if i <= max
                        && want[i]
                        && got[i].is_none()
                        && e.add == add
                        && e.dst == dst
                        && e.plen == plen
                        && e.table == RT_TABLE_MAIN
                        && e.at >= t0
                    {
                        got[i] = Some(e.at - t0);
                        left -= 1;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => check_interrupted()?,
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("route monitors stopped"),
            }
        }
        Ok(nodes.iter().map(|&i| got[i]).collect())
    }
}

impl Drop for Monitors {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The gRPC client: a current-thread runtime on a thread inside the fabric
// ---------------------------------------------------------------------------

enum Req {
    Register(pb::Node),
    Assign {
        node: String,
        handle: String,
        addr: String,
    },
    Release {
        node: String,
        handle: String,
    },
    DeleteNode(String),
    ListNodes,
    /// Assign each (handle, address) as `node`, `conc` calls in flight.
    Bulk {
        node: String,
        items: Vec<(String, String)>,
        conc: usize,
    },
}

enum Resp {
    /// When the call left, how long the answer took, and what it said
    /// (blocks of an Assign, blocks freed by DeleteNode).
    Call {
        t0: Instant,
        took: Duration,
        blocks: Vec<String>,
    },
    Nodes(Vec<pb::Node>),
}

type Reply = mpsc::Sender<Result<Resp>>;

/// Client of the controller: the calls run on a dedicated thread that entered
/// the fabric namespace (its sockets live there); the bench waits for each
/// answer.
struct Ctl {
    tx: Option<tokio::sync::mpsc::UnboundedSender<(Req, Reply)>>,
    thread: Option<JoinHandle<Result<()>>>,
}

fn as_node<T>(node: &str, m: T) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert(tabby_proto::NODE_IDENTITY_HEADER, node.parse()?);
    r.set_timeout(Duration::from_secs(30));
    Ok(r)
}

async fn serve(ch: tonic::transport::Channel, req: Req) -> Result<Resp> {
    use pb::{ipam_admin_client::IpamAdminClient, node_agent_client::NodeAgentClient};
    let mut agent = NodeAgentClient::new(ch.clone());
    let mut admin = IpamAdminClient::new(ch.clone());
    Ok(match req {
        Req::Register(n) => {
            let r = as_node(&n.name.clone(), pb::RegisterNodeRequest { node: Some(n) })?;
            let t0 = Instant::now();
            agent.register_node(r).await?;
            Resp::Call {
                t0,
                took: t0.elapsed(),
                blocks: vec![],
            }
        }
        Req::Assign { node, handle, addr } => {
            let r = as_node(
                &node,
                pb::AssignRequest {
                    handle,
                    requested: vec![addr],
                    ..Default::default()
                },
            )?;
            let t0 = Instant::now();
            let a = agent.assign(r).await?.into_inner();
            let took = t0.elapsed();
            Resp::Call {
                t0,
                took,
                blocks: a.allocations.into_iter().map(|a| a.block).collect(),
            }
        }
        Req::Release { node, handle } => {
            let r = as_node(&node, pb::ReleaseHandleRequest { handle })?;
            let t0 = Instant::now();
            agent.release_handle(r).await?;
            Resp::Call {
                t0,
                took: t0.elapsed(),
                blocks: vec![],
            }
        }
        Req::DeleteNode(name) => {
            let mut r = tonic::Request::new(pb::DeleteNodeRequest { name });
            r.set_timeout(Duration::from_secs(30));
            let t0 = Instant::now();
            let d = admin.delete_node(r).await?.into_inner();
            Resp::Call {
                t0,
                took: t0.elapsed(),
                blocks: d.blocks_freed,
            }
        }
        Req::ListNodes => Resp::Nodes(
            admin
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes,
        ),
        Req::Bulk { node, items, conc } => {
            let t0 = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            let mut it = items.into_iter();
            let mut spawn_next = |set: &mut tokio::task::JoinSet<Result<()>>| -> Result<bool> {
                let Some((handle, addr)) = it.next() else {
                    return Ok(false);
                };
                let r = as_node(
                    &node,
                    pb::AssignRequest {
                        handle,
                        requested: vec![addr],
                        ..Default::default()
                    },
                )?;
                let mut a = agent.clone();
                set.spawn(async move {
                    a.assign(r).await?;
                    Ok::<(), anyhow::Error>(())
                });
                Ok(true)
            };
            for _ in 0..conc.max(1) {
                if !spawn_next(&mut set)? {
                    break;
                }
            }
            while let Some(r) = set.join_next().await {
                r??;
                spawn_next(&mut set)?;
            }
            Resp::Call {
                t0,
                took: t0.elapsed(),
                blocks: vec![],
            }
        }
    })
}

impl Ctl {
    fn start(fabric: &str, endpoint: String) -> Result<Ctl> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Req, Reply)>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let thread = netns::spawn_within(fabric, move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let t = Instant::now();
                let ch = loop {
                    let ep = tonic::transport::Endpoint::from_shared(endpoint.clone())?
                        .tcp_nodelay(true)
                        .connect_timeout(Duration::from_secs(2));
                    match ep.connect().await {
                        Ok(ch) => break ch,
                        Err(e) if t.elapsed() > Duration::from_secs(20) => {
                            let _ = ready_tx.send(Err(anyhow!("connecting to {endpoint}: {e}")));
                            return Ok(());
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Some((req, reply)) = rx.recv().await {
                    let r = serve(ch.clone(), req).await;
                    let _ = reply.send(r);
                }
                Ok(())
            })
        })?;
        let ctl = Ctl {
            tx: Some(tx),
            thread: Some(thread),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("controller client thread did not start"))??;
        Ok(ctl)
    }

    fn call(&self, req: Req, timeout: Duration) -> Result<Resp> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("open")
            .send((req, rtx))
            .map_err(|_| anyhow!("controller client thread is gone"))?;
        let t = Instant::now();
        loop {
            check_interrupted()?;
            match rrx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Timeout) if t.elapsed() < timeout => {}
                Err(_) => bail!("controller call got no answer within {timeout:?}"),
            }
        }
    }

    /// A call's (start, answer time, blocks).
    fn timed(&self, req: Req) -> Result<(Instant, Duration, Vec<String>)> {
        match self.call(req, Duration::from_secs(30))? {
            Resp::Call { t0, took, blocks } => Ok((t0, took, blocks)),
            Resp::Nodes(_) => unreachable!("not a list"),
        }
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// BIRD's trigger: blackhole routes added and deleted on node 1 over netlink
// ---------------------------------------------------------------------------

/// Add (true) or delete a blackhole for a block; the answer is when the
/// request left.
type RouteCmd = (bool, Ipv4Addr, mpsc::Sender<Result<Instant>>);

struct Trigger {
    tx: Option<mpsc::Sender<RouteCmd>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Trigger {
    fn start(ns: &str) -> Result<Trigger> {
        let (tx, rx) = mpsc::channel::<RouteCmd>();
        let thread = netns::spawn_within(ns, move || -> Result<()> {
            let mut s = NlSocket::request()?;
            s.set_recv_timeout(Duration::from_secs(5))?;
            while let Ok((add, dst, reply)) = rx.recv() {
                let t0 = Instant::now();
                let r = s
                    .blackhole(add, dst, BLOCK_LEN, RTPROT_STATIC)
                    .map(|()| t0)
                    .with_context(|| {
                        format!(
                            "{} blackhole {dst}/{BLOCK_LEN}",
                            if add { "adding" } else { "deleting" }
                        )
                    });
                let _ = reply.send(r);
            }
            Ok(())
        })?;
        Ok(Trigger {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn route(&self, add: bool, dst: Ipv4Addr) -> Result<Instant> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .as_ref()
            .expect("open")
            .send((add, dst, rtx))
            .map_err(|_| anyhow!("trigger thread is gone"))?;
        rrx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("trigger thread did not answer"))?
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The measuring loop, shared by both systems
// ---------------------------------------------------------------------------

/// What a system does for one rep.
trait Driver {
    /// Makes rep `r`'s block appear on node 1; returns when the clock started.
    fn add(&mut self, r: usize) -> Result<Instant>;
    /// Untimed work between add and withdraw (inside the CPU window).
    fn between(&mut self, _r: usize) -> Result<()> {
        Ok(())
    }
    /// Withdraws rep `r`'s block; returns when the clock started.
    fn withdraw(&mut self, r: usize) -> Result<Instant>;
    /// Untimed work after the rep, outside the CPU window.
    fn after(&mut self, _r: usize) -> Result<()> {
        Ok(())
    }
    /// Answer times of the trigger calls (tabby's Assign), if any.
    fn acks(&self) -> Vec<Duration> {
        Vec::new()
    }
}

/// One direction of one rep: the last node's delay (None: timed out) and
/// the median over nodes that got it.
#[derive(Clone, Copy)]
struct Rep {
    all: Option<Duration>,
    node_median: Option<Duration>,
    /// The first node to have it: the central path, before the fan-out.
    first: Option<Duration>,
    missing: usize,
}

fn rep_of(d: &[Option<Duration>]) -> Rep {
    let got: Vec<Duration> = d.iter().flatten().copied().collect();
    let missing = d.len() - got.len();
    Rep {
        all: if missing == 0 {
            got.iter().max().copied()
        } else {
            None
        },
        node_median: (!got.is_empty()).then(|| median(&got)),
        first: got.iter().min().copied(),
        missing,
    }
}

struct Measured {
    add: Vec<Rep>,
    wd: Vec<Rep>,
    /// CPU ns per measured pid inside the windows, and the windows' time.
    win_ns: Vec<u64>,
    win_time: Duration,
    /// Over the whole loop (re-registration pauses included): precise, and
    /// from /proc/<pid>/stat ticks.
    loop_ns: Vec<u64>,
    loop_stat_ns: Vec<u64>,
    /// CPU ns per pid over an idle window of `idle_time` before the reps.
    idle_ns: Vec<u64>,
    idle_time: Duration,
    updates: usize,
    acks: Vec<Duration>,
}

#[allow(clippy::too_many_arguments)]
fn measure(
    label: &str,
    d: &mut dyn Driver,
    mon: &Monitors,
    receivers: &[usize],
    pids: &[u32],
    reps: usize,
    cfg: &Cfg,
    rng: &mut Rng,
) -> Result<Measured> {
    let mut cpu = CpuMeter::new(pids)?;
    let ti = Instant::now();
    sleep(IDLE)?;
    let idle_ns = cpu.delta()?.ns;
    let idle_time = ti.elapsed();
    let z = || vec![0u64; pids.len()];
    let (mut win_ns, mut loop_ns, mut loop_stat_ns) = (z(), z(), z());
    let mut win_time = Duration::ZERO;
    let (mut add, mut wd) = (Vec::new(), Vec::new());
    for r in 0..reps {
        check_interrupted()?;
        let dst = block(TRIGGER_BLOCK + r as u32);
        let out = cpu.delta()?;
        if r > 0 {
            add_to(&mut loop_ns, &out.ns);
            add_to(&mut loop_stat_ns, &out.stat_ns);
        }
        let tw = Instant::now();
        mon.drain();
        let t0 = d.add(r)?;
        let a = rep_of(&mon.wait(dst, BLOCK_LEN, true, receivers, t0, cfg.timeout)?);
        sleep(rng.pause(cfg.pause))?;
        d.between(r)?;
        mon.drain();
        let t0 = d.withdraw(r)?;
        let w = rep_of(&mon.wait(dst, BLOCK_LEN, false, receivers, t0, cfg.timeout)?);
        sleep(rng.pause(cfg.pause))?;
        let win = cpu.delta()?;
        win_time += tw.elapsed();
        add_to(&mut win_ns, &win.ns);
        add_to(&mut loop_ns, &win.ns);
        add_to(&mut loop_stat_ns, &win.stat_ns);
        d.after(r)?;
        sleep(rng.pause(cfg.pause))?;
        let f = |x: &Rep| match x.all {
            Some(v) => format!("{:>9}", ms(v)),
            None => format!("TIMEOUT ({} nodes missing)", x.missing),
        };
        println!(
            "  {label} rep {:>2}: add→all {} (node median {:>9})   withdraw→all {} (node median {:>9})",
            r + 1,
            f(&a),
            a.node_median.map(ms).unwrap_or_else(|| "-".into()),
            f(&w),
            w.node_median.map(ms).unwrap_or_else(|| "-".into()),
        );
        add.push(a);
        wd.push(w);
    }
    let out = cpu.delta()?;
    add_to(&mut loop_ns, &out.ns);
    add_to(&mut loop_stat_ns, &out.stat_ns);
    Ok(Measured {
        add,
        wd,
        win_ns,
        win_time,
        loop_ns,
        loop_stat_ns,
        idle_ns,
        idle_time,
        updates: 2 * reps,
        acks: d.acks(),
    })
}

/// The figures of one system at one N.
struct Summary {
    add_med: Option<Duration>,
    add_max: Option<Duration>,
    add_node_med: Option<Duration>,
    add_first_med: Option<Duration>,
    add_timeouts: usize,
    wd_med: Option<Duration>,
    wd_max: Option<Duration>,
    wd_node_med: Option<Duration>,
    wd_first_med: Option<Duration>,
    wd_timeouts: usize,
    /// Mean per node, ms of CPU per update (windows).
    cpu_update: f64,
    /// The same less what the node burns idle over the windows' time.
    cpu_update_net: f64,
    /// Mean per node, ms of CPU per update (whole loop).
    cpu_update_loop: f64,
    /// The same from /proc/<pid>/stat utime+stime+cutime+cstime ticks.
    cpu_update_stat: f64,
    /// Mean per node, ms of CPU per second while idle.
    cpu_idle: f64,
    rss_med: u64,
    rss_max: u64,
    priv_med: u64,
    priv_max: u64,
    /// The central process (controller / route reflector).
    central_cpu_update: f64,
    central_rss: u64,
    central_priv: u64,
    ack_med: Option<Duration>,
    overflow: usize,
}

fn med_opt(v: Vec<Duration>) -> Option<Duration> {
    (!v.is_empty()).then(|| median(&v))
}

fn med_u64(v: &mut [u64]) -> u64 {
    v.sort();
    v[v.len() / 2]
}

/// `pids[..nodes]` are the node daemons, `pids[nodes]` the central one.
fn summarize(m: &Measured, pids: &[u32], nodes: usize, overflow: usize) -> Result<Summary> {
    let ms_of = |ns: u64| ns as f64 / 1e6;
    let per_node = |ns: &[u64]| ms_of(ns[..nodes].iter().sum()) / nodes as f64;
    let upd = m.updates.max(1) as f64;
    let mut rss = Vec::new();
    let mut prv = Vec::new();
    for &p in &pids[..nodes] {
        let (r, q) = mem_kib(p)?;
        rss.push(r);
        prv.push(q);
    }
    let (crss, cpriv) = mem_kib(pids[nodes])?;
    let all = |v: &[Rep]| -> Vec<Duration> { v.iter().filter_map(|r| r.all).collect() };
    let nmed = |v: &[Rep]| med_opt(v.iter().filter_map(|r| r.node_median).collect());
    let fmed = |v: &[Rep]| med_opt(v.iter().filter_map(|r| r.first).collect());
    let (a, w) = (all(&m.add), all(&m.wd));
    Ok(Summary {
        add_med: med_opt(a.clone()),
        add_max: a.iter().max().copied(),
        add_node_med: nmed(&m.add),
        add_first_med: fmed(&m.add),
        add_timeouts: m.add.len() - a.len(),
        wd_med: med_opt(w.clone()),
        wd_max: w.iter().max().copied(),
        wd_node_med: nmed(&m.wd),
        wd_first_med: fmed(&m.wd),
        wd_timeouts: m.wd.len() - w.len(),
        cpu_update: per_node(&m.win_ns) / upd,
        cpu_update_net: (per_node(&m.win_ns)
            - per_node(&m.idle_ns) / m.idle_time.as_secs_f64() * m.win_time.as_secs_f64())
            / upd,
        cpu_update_loop: per_node(&m.loop_ns) / upd,
        cpu_update_stat: per_node(&m.loop_stat_ns) / upd,
        cpu_idle: per_node(&m.idle_ns) / m.idle_time.as_secs_f64(),
        rss_med: med_u64(&mut rss.clone()),
        rss_max: *rss.iter().max().unwrap_or(&0),
        priv_med: med_u64(&mut prv.clone()),
        priv_max: *prv.iter().max().unwrap_or(&0),
        central_cpu_update: ms_of(m.win_ns[nodes]) / upd,
        central_rss: crss,
        central_priv: cpriv,
        ack_med: med_opt(m.acks.clone()),
        overflow,
    })
}

// ---------------------------------------------------------------------------
// BIRD
// ---------------------------------------------------------------------------

const BIRD_TIMERS: &str =
    "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; error wait time 1, 1;";

fn bird_node_conf(i: usize) -> String {
    let statics = if i == 1 {
        String::new()
    } else {
        format!(
            "protocol static blocks {{\n  ipv4;\n  route {} blackhole;\n}}\n",
            block_cidr(i as u32)
        )
    };
    format!(
        r#"router id {ip};
log stderr {{ warning, error, fatal, bug }};
protocol device {{ }}
# Learns node-local routes from the kernel (async netlink), programs BGP
# routes and its own blocks' blackholes.
protocol kernel {{
  ipv4 {{ import all; export where source ~ [ RTS_BGP, RTS_STATIC ]; }};
  learn;
}}
{statics}protocol bgp reflector {{
  local {ip} as {AS};
  neighbor {GATEWAY} as {AS};
  direct;
  {BIRD_TIMERS}
  ipv4 {{
    import all;
    export where net ~ [ {POOL}+ ] && source ~ [ RTS_STATIC, RTS_INHERIT ];
    gateway direct;
  }};
}}
"#,
        ip = node_ip(i),
    )
}

fn bird_rr_conf(n: usize) -> String {
    let mut s = format!(
        r#"router id {GATEWAY};
log stderr {{ warning, error, fatal, bug }};
protocol device {{ }}
template bgp rrclients {{
  local {GATEWAY} as {AS};
  rr client;
  direct;
  {BIRD_TIMERS}
  ipv4 {{ import all; export all; gateway direct; }};
}}
"#
    );
    for i in 1..=n {
        s += &format!(
            "protocol bgp c{i} from rrclients {{ neighbor {} as {AS}; }}\n",
            node_ip(i)
        );
    }
    s
}

fn which(bin: &str) -> Result<PathBuf> {
    for d in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = Path::new(d).join(bin);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{bin} not found: install Debian bird2 (scripts/install-deps.sh)")
}

struct BirdDriver<'a> {
    trigger: &'a Trigger,
}

impl Driver for BirdDriver<'_> {
    fn add(&mut self, r: usize) -> Result<Instant> {
        self.trigger.route(true, block(TRIGGER_BLOCK + r as u32))
    }
    fn withdraw(&mut self, r: usize) -> Result<Instant> {
        self.trigger.route(false, block(TRIGGER_BLOCK + r as u32))
    }
}

fn run_bird(pfx: &str, n: usize, cfg: &Cfg, rng: &mut Rng) -> Result<Summary> {
    let bird = which("bird")?;
    let t = Instant::now();
    let mut lab = Lab::build(&format!("{pfx}b{n}"), n)?;
    let dir = lab.dir.path().to_path_buf();
    let mut pids = Vec::new();
    for i in 1..=n {
        let conf = dir.join(format!("n{i}.conf"));
        fs::write(&conf, bird_node_conf(i))?;
        let ns = lab.ns(i).to_string();
        pids.push(lab.procs.spawn(
            &format!("bird-n{i}"),
            &ns,
            &bird,
            &[
                "-f".into(),
                "-c".into(),
                conf.display().to_string(),
                "-s".into(),
                dir.join(format!("n{i}.ctl")).display().to_string(),
                "-P".into(),
                dir.join(format!("n{i}.pid")).display().to_string(),
            ],
            &[],
        )?);
    }
    let conf = dir.join("rr.conf");
    fs::write(&conf, bird_rr_conf(n))?;
    let f = lab.fabric.clone();
    pids.push(lab.procs.spawn(
        "bird-rr",
        &f,
        &bird,
        &[
            "-f".into(),
            "-c".into(),
            conf.display().to_string(),
            "-s".into(),
            dir.join("rr.ctl").display().to_string(),
            "-P".into(),
            dir.join("rr.pid").display().to_string(),
        ],
        &[],
    )?);
    // Every node: N-1 routes (N-2 remote blocks and its own blackhole;
    // node 1: N-1 remote blocks).
    let waited = wait_routes(&lab.nodes, BIRD_PROTO, n - 1, Duration::from_secs(60));
    lab.procs.check_alive()?;
    waited?;
    lab.trigger = Some(Trigger::start(lab.ns(1))?);
    println!(
        "BIRD N={n}: {n} BIRD nodes + route reflector up and converged in {:.1} s{}",
        t.elapsed().as_secs_f64(),
        rt_note(&lab)
    );
    let receivers: Vec<usize> = (2..=n).collect();
    let mon = lab.mon.as_ref().expect("started");
    let mut d = BirdDriver {
        trigger: lab.trigger.as_ref().expect("started"),
    };
    let m = measure(
        &format!("BIRD  N={n}"),
        &mut d,
        mon,
        &receivers,
        &pids,
        cfg.reps,
        cfg,
        rng,
    )?;
    lab.procs.check_alive()?;
    summarize(&m, &pids, n, mon.overflow.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// tabby
// ---------------------------------------------------------------------------

struct TabbyDriver<'a> {
    ctl: &'a Ctl,
    node1: pb::Node,
    acks: Vec<Duration>,
}

fn handle_of(r: usize) -> String {
    format!("conv.rep{r}")
}

impl Driver for TabbyDriver<'_> {
    fn add(&mut self, r: usize) -> Result<Instant> {
        let k = TRIGGER_BLOCK + r as u32;
        let (t0, took, blocks) = self.ctl.timed(Req::Assign {
            node: self.node1.name.clone(),
            handle: handle_of(r),
            addr: block_addr(k),
        })?;
        if blocks != vec![block_cidr(k)] {
            bail!(
                "Assign for {} got blocks {blocks:?}, want [{}]",
                block_addr(k),
                block_cidr(k)
            );
        }
        self.acks.push(took);
        Ok(t0)
    }
    fn between(&mut self, r: usize) -> Result<()> {
        self.ctl.timed(Req::Release {
            node: self.node1.name.clone(),
            handle: handle_of(r),
        })?;
        Ok(())
    }
    fn withdraw(&mut self, r: usize) -> Result<Instant> {
        let k = TRIGGER_BLOCK + r as u32;
        let (t0, _, freed) = self.ctl.timed(Req::DeleteNode(self.node1.name.clone()))?;
        if freed != vec![block_cidr(k)] {
            bail!(
                "DeleteNode {} freed {freed:?}, want [{}]",
                self.node1.name,
                block_cidr(k)
            );
        }
        Ok(t0)
    }
    fn after(&mut self, _r: usize) -> Result<()> {
        self.ctl.timed(Req::Register(self.node1.clone()))?;
        Ok(())
    }
    fn acks(&self) -> Vec<Duration> {
        self.acks.clone()
    }
}

/// A tabby lab: controller in the fabric, tabby-nodes on nodes 1..=n; nodes
/// 2..=n own one block each; a fake node owns `bulk` more blocks. Returns the
/// lab, the pids (nodes, then the controller) and node 1 as registered.
fn tabby_lab(tag: &str, n: usize, bulk: usize) -> Result<(Lab, Vec<u32>, pb::Node)> {
    let bins = tabby_integration::lab::bin_dir();
    for b in ["tabby-controller", "tabby-node"] {
        if !bins.join(b).exists() {
            bail!(
                "{b} not found in {}: run `cargo build --release --workspace` first (or set TABBY_BIN_DIR)",
                bins.display()
            );
        }
    }
    let mut lab = Lab::build(tag, n)?;
    let dir = lab.dir.path().to_path_buf();
    let f = lab.fabric.clone();
    let listen = format!("{GATEWAY}:{CTL_PORT}");
    let ctl_pid = lab.procs.spawn(
        "controller",
        &f,
        &bins.join("tabby-controller"),
        &[
            "--listen".into(),
            listen.clone(),
            "--data-dir".into(),
            dir.join("controller-data").display().to_string(),
            "--bootstrap-pool".into(),
            POOL.into(),
            "--bootstrap-block-size".into(),
            BLOCK_LEN.to_string(),
            // Plaintext: this bench times route convergence against BIRD
            // (which runs its sessions unauthenticated here too); the cost
            // of mTLS is measured by the controller's ipam_grpc and fanout
            // benches.
            "--insecure".into(),
        ],
        &[],
    )?;
    let waited = wait_log(
        &lab.procs.log("controller"),
        "serving gRPC",
        Duration::from_secs(20),
    );
    lab.procs.check_alive()?;
    waited?;
    lab.ctl = Some(Ctl::start(&f, format!("http://{listen}"))?);
    let ctl = lab.ctl.as_ref().expect("started");
    // Register the nodes as tabby-node will (its registration is then no
    // change), and give nodes 2..=n their blocks before any node runs: the
    // nodes start from one snapshot instead of n-1 deltas.
    for i in 1..=n {
        ctl.timed(Req::Register(pb::Node {
            name: node_name(i),
            addresses: vec![node_ip(i).to_string()],
            ..Default::default()
        }))?;
    }
    for i in 2..=n {
        let k = i as u32;
        let (_, _, blocks) = ctl.timed(Req::Assign {
            node: node_name(i),
            handle: format!("conv.base{i}"),
            addr: block_addr(k),
        })?;
        if blocks != vec![block_cidr(k)] {
            bail!(
                "base Assign for node {i} got blocks {blocks:?}, want [{}]",
                block_cidr(k)
            );
        }
    }
    if bulk > 0 {
        ctl.timed(Req::Register(pb::Node {
            name: BULK_NODE.into(),
            addresses: vec![BULK_IP.to_string()],
            ..Default::default()
        }))?;
        let items = (0..bulk)
            .map(|k| (format!("conv.bulk{k}"), block_addr(BULK_BLOCK + k as u32)))
            .collect();
        let took = match ctl.call(
            Req::Bulk {
                node: BULK_NODE.into(),
                items,
                conc: 64,
            },
            Duration::from_secs(300),
        )? {
            Resp::Call { took, .. } => took,
            Resp::Nodes(_) => unreachable!("not a list"),
        };
        println!(
            "  preloaded {bulk} blocks of node {BULK_NODE:?} in {}",
            ms(took)
        );
    }
    let mut pids = Vec::new();
    for i in 1..=n {
        let ns = lab.ns(i).to_string();
        pids.push(lab.procs.spawn(
            &format!("node-n{i}"),
            &ns,
            &bins.join("tabby-node"),
            &[
                "--controller".into(),
                listen.clone(),
                "--node-name".into(),
                node_name(i),
                "--cni-socket".into(),
                dir.join(format!("n{i}.sock")).display().to_string(),
                "--insecure".into(),
            ],
            &[],
        )?);
    }
    pids.push(ctl_pid);
    // Every node: N-1 routes (+ the fake node's blocks).
    let waited = wait_routes(
        &lab.nodes,
        &TABBY_PROTO.to_string(),
        n - 1 + bulk,
        Duration::from_secs(90),
    );
    lab.procs.check_alive()?;
    waited?;
    let ctl = lab.ctl.as_ref().expect("started");
    let node1 = match ctl.call(Req::ListNodes, Duration::from_secs(30))? {
        Resp::Nodes(v) => v
            .into_iter()
            .find(|x| x.name == node_name(1))
            .ok_or_else(|| anyhow!("node 1 is not registered"))?,
        Resp::Call { .. } => unreachable!("a list"),
    };
    Ok((lab, pids, node1))
}

/// Says when the route monitors could not get real-time priority (their
/// timestamps then include waiting for a CPU behind busy daemons).
fn rt_note(lab: &Lab) -> &'static str {
    match &lab.mon {
        Some(m) if !m.realtime => {
            " (route monitors NOT at SCHED_FIFO: delays include their scheduling)"
        }
        _ => "",
    }
}

fn run_tabby(pfx: &str, n: usize, cfg: &Cfg, rng: &mut Rng) -> Result<Summary> {
    let t = Instant::now();
    let (mut lab, pids, node1) = tabby_lab(&format!("{pfx}t{n}"), n, 0)?;
    println!(
        "tabby N={n}: controller + {n} tabby-nodes up and converged in {:.1} s{}",
        t.elapsed().as_secs_f64(),
        rt_note(&lab)
    );
    let receivers: Vec<usize> = (2..=n).collect();
    let mut d = TabbyDriver {
        ctl: lab.ctl.as_ref().expect("started"),
        node1,
        acks: Vec::new(),
    };
    let mon = lab.mon.as_ref().expect("started");
    let m = measure(
        &format!("tabby N={n}"),
        &mut d,
        mon,
        &receivers,
        &pids,
        cfg.reps,
        cfg,
        rng,
    )?;
    let overflow = mon.overflow.load(Ordering::Relaxed);
    lab.procs.check_alive()?;
    summarize(&m, &pids, n, overflow)
}

// ---------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------

fn od(d: Option<Duration>) -> String {
    d.map(ms).unwrap_or_else(|| "-".into())
}

fn ratio_d(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}x", ratio(a, b)),
        _ => "-".into(),
    }
}

fn ratio_f(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn mib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}

fn print_summary(n: usize, reps: usize, t: Option<&Summary>, b: Option<&Summary>) {
    println!("\nconvergence, N={n} nodes, {reps} reps (receivers: nodes 2..{n}):");
    println!(
        "  {:<40} {:>14} {:>14} {:>11}",
        "", "tabby", "BIRD RR", "tabby/BIRD"
    );
    let row_d = |name: &str, f: &dyn Fn(&Summary) -> Option<Duration>| {
        let (x, y) = (t.and_then(f), b.and_then(f));
        println!(
            "  {:<40} {:>14} {:>14} {:>11}",
            name,
            od(x),
            od(y),
            ratio_d(x, y)
        );
    };
    let row_f = |name: &str, f: &dyn Fn(&Summary) -> f64, fmt: &dyn Fn(f64) -> String| {
        let (x, y) = (t.map(f), b.map(f));
        let r = match (x, y) {
            (Some(x), Some(y)) => ratio_f(x, y),
            _ => "-".into(),
        };
        println!(
            "  {:<40} {:>14} {:>14} {:>11}",
            name,
            x.map(fmt).unwrap_or_else(|| "-".into()),
            y.map(fmt).unwrap_or_else(|| "-".into()),
            r
        );
    };
    let msf = |v: f64| format!("{v:.3} ms");
    let mibf = |v: f64| mib(v as u64);
    row_d("add→all median", &|s| s.add_med);
    row_d("add→all max", &|s| s.add_max);
    row_d("add, node-median delay (median of reps)", &|s| {
        s.add_node_med
    });
    row_d("add, first node's delay (median of reps)", &|s| {
        s.add_first_med
    });
    row_d("withdraw→all median", &|s| s.wd_med);
    row_d("withdraw→all max", &|s| s.wd_max);
    row_d("withdraw, node-median delay", &|s| s.wd_node_med);
    row_d("withdraw, first node's delay", &|s| s.wd_first_med);
    let to = |s: Option<&Summary>| {
        s.map(|s| format!("{}/{}", s.add_timeouts, s.wd_timeouts))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "  {:<40} {:>14} {:>14}",
        "timed-out reps (add/withdraw)",
        to(t),
        to(b)
    );
    row_f("CPU per node per update", &|s| s.cpu_update, &msf);
    row_f("  same, net of idle CPU", &|s| s.cpu_update_net, &msf);
    row_f(
        "  same, whole loop (incl. re-register)",
        &|s| s.cpu_update_loop,
        &msf,
    );
    row_f(
        "  same, whole loop, /proc stat ticks",
        &|s| s.cpu_update_stat,
        &msf,
    );
    row_f("  idle CPU per node per second", &|s| s.cpu_idle, &msf);
    row_f("RSS per node (median)", &|s| s.rss_med as f64, &mibf);
    row_f("RSS per node (max)", &|s| s.rss_max as f64, &mibf);
    row_f(
        "private memory per node (median)",
        &|s| s.priv_med as f64,
        &mibf,
    );
    row_f(
        "private memory per node (max)",
        &|s| s.priv_max as f64,
        &mibf,
    );
    row_f(
        "controller / reflector CPU per update",
        &|s| s.central_cpu_update,
        &msf,
    );
    row_f(
        "controller / reflector RSS",
        &|s| s.central_rss as f64,
        &mibf,
    );
    row_f(
        "controller / reflector private memory",
        &|s| s.central_priv as f64,
        &mibf,
    );
    if let Some(t) = t {
        println!("  tabby Assign answered after (median): {}", od(t.ack_med));
    }
    let ov: usize = t.map_or(0, |s| s.overflow) + b.map_or(0, |s| s.overflow);
    if ov > 0 {
        println!("  WARNING: route monitors overflowed {ov} time(s): some events were lost");
    }
}

// ---------------------------------------------------------------------------
// One tabby-node holding 10 vs 10,000 routes
// ---------------------------------------------------------------------------

struct BulkResult {
    routes: usize,
    add_med: Option<Duration>,
    wd_med: Option<Duration>,
    cpu_update: f64,
    cpu_idle: f64,
    cpu_net: f64,
    rss: u64,
}

fn run_bulk(pfx: &str, bulk: usize, cfg: &Cfg, rng: &mut Rng) -> Result<BulkResult> {
    let t = Instant::now();
    // Node 1 triggers, node 2 is measured.
    let (mut lab, pids, node1) = tabby_lab(&format!("{pfx}k{bulk}"), 2, bulk)?;
    let routes = count_routes(lab.ns(2), &TABBY_PROTO.to_string());
    println!(
        "tabby, one node holding {routes} routes: up in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut d = TabbyDriver {
        ctl: lab.ctl.as_ref().expect("started"),
        node1,
        acks: Vec::new(),
    };
    let mon = lab.mon.as_ref().expect("started");
    // Measured: node 2's tabby-node (pids[1]); pids[2] is the controller.
    let m = measure(
        &format!("{routes:>5} routes"),
        &mut d,
        mon,
        &[2],
        &[pids[1], pids[2]],
        cfg.bulk_reps,
        cfg,
        rng,
    )?;
    lab.procs.check_alive()?;
    let upd = m.updates as f64;
    let cpu_update = m.win_ns[0] as f64 / 1e6 / upd;
    let idle_rate = m.idle_ns[0] as f64 / 1e6 / m.idle_time.as_secs_f64();
    let all = |v: &[Rep]| med_opt(v.iter().filter_map(|r| r.all).collect());
    Ok(BulkResult {
        routes,
        add_med: all(&m.add),
        wd_med: all(&m.wd),
        cpu_update,
        cpu_idle: idle_rate,
        cpu_net: cpu_update - idle_rate * m.win_time.as_secs_f64() / upd,
        rss: mem_kib(pids[1])?.0,
    })
}

fn print_bulk(rs: &[BulkResult], reps: usize) {
    println!("\none tabby-node, CPU of one update against the routes it holds ({reps} reps, 2 updates each):");
    println!(
        "  {:>7} {:>12} {:>14} {:>18} {:>16} {:>22} {:>10}",
        "routes",
        "add median",
        "withdraw med.",
        "CPU per update",
        "idle CPU per s",
        "CPU/update net of idle",
        "RSS"
    );
    for r in rs {
        println!(
            "  {:>7} {:>12} {:>14} {:>18} {:>16} {:>22} {:>10}",
            r.routes,
            od(r.add_med),
            od(r.wd_med),
            format!("{:.3} ms", r.cpu_update),
            format!("{:.3} ms", r.cpu_idle),
            format!("{:.3} ms", r.cpu_net),
            mib(r.rss)
        );
    }
    if let (Some(a), Some(b)) = (rs.first(), rs.last()) {
        if rs.len() > 1 {
            println!(
                "  ratio {} routes / {} routes: CPU per update {}, net of idle {}",
                b.routes,
                a.routes,
                ratio_f(b.cpu_update, a.cpu_update),
                ratio_f(b.cpu_net, a.cpu_net)
            );
        }
    }
}

// ---------------------------------------------------------------------------

fn main() -> Result<()> {
    netns::require_root();
    catch_interrupts();
    let cfg = Cfg::from_env()?;
    let mut rng = Rng::new();
    let pfx = prefix("cv");
    println!(
        "convergence: a new block on node 1 until its route is in every other node's kernel, and its withdrawal; \
         tabby (controller + tabby-nodes) vs BIRD 2 (node BIRDs + one route reflector); \
         pauses {}–{} ms random; timeout {:?} per rep and direction",
        cfg.pause.0, cfg.pause.1, cfg.timeout
    );
    let t = Instant::now();
    let mut results: BTreeMap<usize, (Option<Summary>, Option<Summary>)> = BTreeMap::new();
    for &n in &cfg.nodes {
        let b = if cfg.bird {
            Some(run_bird(&pfx, n, &cfg, &mut rng)?)
        } else {
            None
        };
        let tb = if cfg.tabby {
            Some(run_tabby(&pfx, n, &cfg, &mut rng)?)
        } else {
            None
        };
        print_summary(n, cfg.reps, tb.as_ref(), b.as_ref());
        results.insert(n, (tb, b));
    }
    if cfg.tabby && !cfg.bulk.is_empty() {
        let mut rs = Vec::new();
        for &b in &cfg.bulk {
            rs.push(run_bulk(&pfx, b, &cfg, &mut rng)?);
        }
        print_bulk(&rs, cfg.bulk_reps);
    }
    if results.len() > 1 {
        for (n, (tb, b)) in &results {
            print_summary(*n, cfg.reps, tb.as_ref(), b.as_ref());
        }
    }
    println!("\ntotal {:.0} s", t.elapsed().as_secs_f64());
    Ok(())
}
