//! tabby on etcd (#16), against a per-assignment compare-and-swap client on
//! the same etcd cluster, and failover between two controllers.
//!
//! Run: `cargo bench -p tabby-controller --bench etcd_ha`. Starts a
//! three-member etcd 3.4 on loopback (Debian etcd-server, data in a temp
//! dir), then, in one run against that cluster:
//!
//! 1. durable Assigns per second at concurrency 64 through one release
//!    controller with `--datastore etcd` (its group commit: one etcd
//!    transaction for many assignments);
//! 2. the same for a Calico-style client doing one compare-and-swap
//!    transaction per assignment (see [`cas`]), and the ratio of the two;
//! 3. Assign latency at concurrency 1, both (and tabby in plaintext,
//!    `--insecure`, for reference: the CAS client's etcd is plaintext), with
//!    the CPU each spends per assignment (etcd's members, the controller,
//!    this client) and the controller's group commits (size, time) read from
//!    its `--metrics-listen`;
//! 4. failover: the leading controller of two is SIGKILLed ten times under a
//!    concurrency-1 client, from the last acknowledged assignment before the
//!    kill to the first one after it.
//!
//! Prints figures and PASS/MISS against the targets; asserts nothing.
//! Absolute figures depend on the machine (etcd's three members, the
//! controller and this client share its CPUs and disk); the ratio is the
//! claim.
//!
//! The controller binary is found as in `ipam_grpc` (`$TABBY_CONTROLLER_BIN`,
//! then the one cargo built for this bench, ...).
#![allow(clippy::unwrap_used)]
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "util/mod.rs"]
mod util;
use util::{cpu_time, find_binary, fs_type};

use common::{create_pool, register, Controller, NodeClient, XorShift};
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tabby_integration::etcd::EtcdCluster;
use tabby_proto::v1::{AssignRequest, ListHandlesRequest};

const NODES: usize = 64;
const CONCURRENCY: usize = 64;
const THROUGHPUT_TIME: Duration = Duration::from_secs(5);
const WARMUP_TIME: Duration = Duration::from_millis(500);
const LATENCY_CALLS: usize = 3000;
const CAS_LATENCY_CALLS: usize = 1000;
const LATENCY_WARMUP: usize = 200;
/// The lease TTL of the failover pair.
const TTL: Duration = Duration::from_secs(2);
const KILLS: usize = 10;
const TARGET_RATIO: f64 = 10.0;
/// Each controller's own key prefix: the phases do not see each other's keys.
const TABBY_PREFIX: &str = "/bench-tabby/";
const TABBY_PLAIN_PREFIX: &str = "/bench-tabby-plain/";
const CALICO_PREFIX: &str = "/bench-calico/";
const HA_PREFIX: &str = "/bench-ha/";

/// CPU time of this process's etcd children (the cluster's members).
fn etcd_cpu() -> Duration {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let comm = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')'));
            comm.is_some_and(|(name, rest)| {
                name == "etcd" && rest.split_whitespace().nth(1) == Some(me.as_str())
            })
        })
        .map(|p| cpu_time(&p))
        .sum()
}

/// GET /metrics of a controller's `--metrics-listen`, the body ("" if it
/// cannot be read).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string())
}

/// Sums and counts of the controller's group-commit histograms.
#[derive(Default, Clone, Copy)]
struct Commits {
    groups: f64,
    requests: f64,
    seconds: f64,
}

impl Commits {
    fn read(addr: Option<&str>) -> Commits {
        let Some(addr) = addr else {
            return Commits::default();
        };
        let m = scrape(addr);
        let v = |series: &str| {
            m.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0)
        };
        Commits {
            groups: v("tabby_store_commit_group_size_count"),
            requests: v("tabby_store_commit_group_size_sum"),
            seconds: v("tabby_store_commit_duration_seconds_sum"),
        }
    }

    fn since(self, before: Commits) -> Commits {
        Commits {
            groups: self.groups - before.groups,
            requests: self.requests - before.requests,
            seconds: self.seconds - before.seconds,
        }
    }
}

struct Pcts {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn pcts(mut v: Vec<Duration>) -> Pcts {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    Pcts {
        p50: at(0.50),
        p99: at(0.99),
        max: *v.last().unwrap(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// What a throughput phase measured: acknowledged assignments per second,
/// errors (and CAS conflicts) in the window, and this process's CPU cores.
struct Rate {
    rate: f64,
    errors: u64,
    conflicts: u64,
    server_cores: Option<f64>,
    client_cores: f64,
    etcd_cores: f64,
    /// The controller's group commits in the window.
    commits: Commits,
}

/// Runs `tasks` (which count into `count`/`errors` while `measuring`) for
/// the warm-up and the measured window; stops them.
async fn window(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    flags: &Flags,
    server_pid: Option<&str>,
    metrics: Option<&str>,
) -> Rate {
    tokio::time::sleep(WARMUP_TIME).await;
    let m0 = Commits::read(metrics);
    flags.measuring.store(true, Ordering::SeqCst);
    let s0 = server_pid.map(cpu_time);
    let c0 = cpu_time("self");
    let e0 = etcd_cpu();
    let t0 = Instant::now();
    tokio::time::sleep(THROUGHPUT_TIME).await;
    let n = flags.count.load(Ordering::SeqCst);
    let el = t0.elapsed();
    flags.measuring.store(false, Ordering::SeqCst);
    let w = el.as_secs_f64();
    let server_cores = server_pid.map(|p| {
        cpu_time(p)
            .saturating_sub(s0.unwrap_or_default())
            .as_secs_f64()
            / w
    });
    let client_cores = cpu_time("self").saturating_sub(c0).as_secs_f64() / w;
    let etcd_cores = etcd_cpu().saturating_sub(e0).as_secs_f64() / w;
    let commits = Commits::read(metrics).since(m0);
    flags.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    Rate {
        rate: n as f64 / w,
        errors: flags.errors.load(Ordering::SeqCst),
        conflicts: flags.conflicts.load(Ordering::SeqCst),
        server_cores,
        client_cores,
        etcd_cores,
        commits,
    }
}

#[derive(Default)]
struct Flags {
    stop: AtomicBool,
    measuring: AtomicBool,
    count: AtomicU64,
    errors: AtomicU64,
    conflicts: AtomicU64,
}

impl Flags {
    fn done(&self, ok: bool) {
        if self.measuring.load(Ordering::Relaxed) {
            if ok {
                self.count.fetch_add(1, Ordering::Relaxed);
            } else {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------- tabby --

fn etcd_flags<'a>(endpoints: &'a str, prefix: &'a str, ttl: &'a str) -> Vec<&'a str> {
    vec![
        "--datastore",
        "etcd",
        "--etcd-endpoints",
        endpoints,
        "--etcd-prefix",
        prefix,
        "--etcd-lease-ttl",
        ttl,
    ]
}

/// Whether `c` leads: it takes a node-facing call.
async fn leads(c: &Controller) -> bool {
    let mut n = c.node("probe").await;
    n.list_handles(ListHandlesRequest {}).await.is_ok()
}

/// Index of the first of `cs` that leads, waiting up to `within`.
async fn wait_leader(cs: &[&Controller], within: Duration) -> Option<usize> {
    let t = Instant::now();
    loop {
        for (i, c) in cs.iter().enumerate() {
            if leads(c).await {
                return Some(i);
            }
        }
        if t.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// New handles on CONCURRENCY tasks, each its own node and channel.
async fn tabby_throughput(clients: Vec<NodeClient>, server_pid: &str, metrics: &str) -> Rate {
    let flags = Arc::new(Flags::default());
    let mut tasks = Vec::new();
    for (t, mut cl) in clients.into_iter().enumerate() {
        let flags = flags.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !flags.stop.load(Ordering::Relaxed) {
                let ok = cl
                    .assign(AssignRequest {
                        handle: format!("bench.t{t}-{i}"),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                i += 1;
                flags.done(ok);
            }
        }));
    }
    window(tasks, &flags, Some(server_pid), Some(metrics)).await
}

async fn tabby_latency(cl: &mut NodeClient) -> Pcts {
    for i in 0..LATENCY_WARMUP {
        cl.assign(AssignRequest {
            handle: format!("bench.warm-{i}"),
            ..Default::default()
        })
        .await
        .expect("warm-up Assign");
    }
    let mut v = Vec::with_capacity(LATENCY_CALLS);
    for i in 0..LATENCY_CALLS {
        let s = Instant::now();
        cl.assign(AssignRequest {
            handle: format!("bench.lat-{i}"),
            ..Default::default()
        })
        .await
        .expect("Assign");
        v.push(s.elapsed());
    }
    pcts(v)
}

// ------------------------------------------------------------------ cas --

/// The peer: a Calico-style IPAM client on etcd, one compare-and-swap
/// transaction per assignment.
///
/// Modelled on Calico's etcd datastore (`/calico/ipam/v2/...`): an
/// allocation block is ONE key, a /26 holding the 64-entry `allocations`
/// array (index into `attributes`, or null), the `unallocated` ordinals, the
/// `attributes` (handle and pod per allocation), the block's affinity and a
/// sequence number, as JSON; each assignment also writes a handle key. One
/// assignment is: a linearizable GET of the node's block (with its
/// mod_revision), the first free ordinal, and one Txn that compares the
/// block's mod_revision with what was read and PUTs the updated block and
/// the handle; a failed compare re-reads and tries again. A full block sends
/// the node to its next block, claimed with a Txn on create_revision == 0
/// that writes the empty block and the node's affinity key.
///
/// This is generous to the peer: Calico also reads the host's affinities
/// and writes the handle in a CAS of its own before the block's, i.e. more
/// round trips per assignment than the one Get + one Txn here.
///
/// Concurrency: 64 nodes with one client each, as 64 hosts each running one
/// CNI ADD at a time: the clients of a node share its affine block (as with
/// Calico's per-host affinity), so conflicts come only from a node's own
/// clients; with one per node there are none, which is the peer's best case
/// (conflicts are counted and printed). Each client has its own etcd
/// connection to all three members, as each host's calico-ipam has.
mod cas {
    use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
    use serde_json::{json, Value};
    use std::net::Ipv4Addr;

    /// Blocks of 64 in 10.0.0.0/8; node `n` owns blocks `n`, `n + STRIDE`,
    /// ... (its affinity), so no two nodes claim the same block.
    const BLOCK: u32 = 64;
    const STRIDE: u32 = 128;

    pub struct Node {
        pub client: Client,
        prefix: String,
        name: String,
        index: u32,
        /// Its current block: the k-th of its own.
        k: u32,
    }

    /// Why an assignment took more than one attempt.
    #[derive(Default)]
    pub struct Outcome {
        pub conflicts: u64,
    }

    fn cidr(block: u32) -> String {
        format!("{}/26", Ipv4Addr::from(0x0A00_0000 + block * BLOCK))
    }

    impl Node {
        pub async fn connect(
            endpoints: &[String],
            prefix: &str,
            name: String,
            index: u32,
        ) -> Result<Node, etcd_client::Error> {
            Ok(Node {
                client: Client::connect(endpoints, None).await?,
                prefix: prefix.to_string(),
                name,
                index,
                k: 0,
            })
        }

        fn block(&self) -> u32 {
            self.index + self.k * STRIDE
        }

        fn block_key(&self) -> String {
            format!(
                "{}ipam/v2/assignment/ipv4/block/{}",
                self.prefix,
                cidr(self.block()).replace('/', "-")
            )
        }

        /// Claims the node's current block: the empty block and the host's
        /// affinity, if nobody created the block yet. Whether it did.
        async fn claim(&mut self, key: &str) -> Result<bool, etcd_client::Error> {
            let c = cidr(self.block());
            let block = json!({
                "cidr": c,
                "affinity": format!("host:{}", self.name),
                "strictAffinity": false,
                "allocations": vec![Value::Null; BLOCK as usize],
                "unallocated": (0..BLOCK).collect::<Vec<_>>(),
                "attributes": [],
                "deleted": false,
                "sequenceNumber": 0,
            });
            let affinity = format!(
                "{}ipam/v2/host/{}/ipv4/block/{}",
                self.prefix,
                self.name,
                c.replace('/', "-")
            );
            let r = self
                .client
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                        .and_then([
                            TxnOp::put(key, block.to_string(), None),
                            TxnOp::put(
                                affinity,
                                json!({"state": "confirmed", "deleted": "false"}).to_string(),
                                None,
                            ),
                        ]),
                )
                .await?;
            Ok(r.succeeded())
        }

        /// Assigns one address to `handle`: its address.
        pub async fn assign(
            &mut self,
            handle: &str,
            out: &mut Outcome,
        ) -> Result<Ipv4Addr, etcd_client::Error> {
            loop {
                let key = self.block_key();
                let r = self.client.get(key.as_str(), None).await?;
                let Some(kv) = r.kvs().first() else {
                    // Not created yet: claim it (or another did), read again.
                    if !self.claim(&key).await? {
                        out.conflicts += 1;
                    }
                    continue;
                };
                let rev = kv.mod_revision();
                let mut block: Value = serde_json::from_slice(kv.value()).expect("a block is JSON");
                if block["affinity"] != json!(format!("host:{}", self.name)) {
                    // Somebody else's (an earlier run's): the next one.
                    self.k += 1;
                    continue;
                }
                let free = block["unallocated"].as_array().expect("unallocated");
                let Some(ord) = free.first().and_then(Value::as_u64) else {
                    self.k += 1;
                    continue;
                };
                let attr = block["attributes"].as_array().map_or(0, Vec::len);
                block["unallocated"]
                    .as_array_mut()
                    .expect("unallocated")
                    .remove(0);
                block["allocations"][ord as usize] = json!(attr);
                block["attributes"]
                    .as_array_mut()
                    .expect("attributes")
                    .push(json!({
                        "handle_id": handle,
                        "secondary": {"node": self.name, "namespace": "bench", "pod": handle},
                    }));
                let seq = block["sequenceNumber"].as_u64().unwrap_or(0);
                block["sequenceNumber"] = json!(seq + 1);
                let c = cidr(self.block());
                let handle_key = format!("{}ipam/v2/handle/{handle}", self.prefix);
                let h = json!({"handleID": handle, "block": {c.as_str(): 1}, "deleted": false});
                let r = self
                    .client
                    .txn(
                        Txn::new()
                            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                            .and_then([
                                TxnOp::put(key.as_str(), block.to_string(), None),
                                TxnOp::put(handle_key, h.to_string(), None),
                            ]),
                    )
                    .await?;
                if r.succeeded() {
                    return Ok(Ipv4Addr::from(
                        0x0A00_0000 + self.block() * BLOCK + ord as u32,
                    ));
                }
                out.conflicts += 1;
            }
        }
    }
}

async fn cas_throughput(endpoints: &[String]) -> Rate {
    let mut nodes = Vec::new();
    for i in 0..CONCURRENCY {
        let name = format!("node-{}", i % NODES);
        nodes.push(
            cas::Node::connect(endpoints, CALICO_PREFIX, name, (i % NODES) as u32)
                .await
                .expect("connecting to etcd"),
        );
    }
    let flags = Arc::new(Flags::default());
    let mut tasks = Vec::new();
    for (t, mut node) in nodes.into_iter().enumerate() {
        let flags = flags.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !flags.stop.load(Ordering::Relaxed) {
                let mut out = cas::Outcome::default();
                let r = node.assign(&format!("bench.t{t}-{i}"), &mut out).await;
                i += 1;
                if flags.measuring.load(Ordering::Relaxed) {
                    flags.conflicts.fetch_add(out.conflicts, Ordering::Relaxed);
                }
                flags.done(r.is_ok());
                if r.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    window(tasks, &flags, None, None).await
}

async fn cas_latency(endpoints: &[String]) -> Pcts {
    // Node 64: its own blocks, beside the throughput phase's 0..63.
    let mut node = cas::Node::connect(endpoints, CALICO_PREFIX, "lat".into(), NODES as u32)
        .await
        .expect("connecting to etcd");
    let mut out = cas::Outcome::default();
    for i in 0..LATENCY_WARMUP {
        node.assign(&format!("bench.warm-{i}"), &mut out)
            .await
            .expect("warm-up CAS assignment");
    }
    let mut v = Vec::with_capacity(CAS_LATENCY_CALLS);
    for i in 0..CAS_LATENCY_CALLS {
        let s = Instant::now();
        node.assign(&format!("bench.lat-{i}"), &mut out)
            .await
            .expect("CAS assignment");
        v.push(s.elapsed());
    }
    pcts(v)
}

// ------------------------------------------------------------- failover --

/// Acknowledgements seen by the failover client: (when, which controller).
#[derive(Default)]
struct Acks {
    log: Vec<(Instant, usize)>,
}

/// Assigns at concurrency 1 against `clients[leader]`, moving to the other
/// on any error (or no answer within 2 s) and sending the same handle again
/// (Assign is idempotent per handle).
fn failover_client(
    mut clients: [NodeClient; 2],
    leader: usize,
    round: usize,
    acks: Arc<Mutex<Acks>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut k = leader;
        let mut i = 0u64;
        let mut errors = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let call = clients[k].assign(AssignRequest {
                handle: format!("fo.{round}-{i}"),
                ..Default::default()
            });
            match tokio::time::timeout(Duration::from_secs(2), call).await {
                Ok(Ok(_)) => {
                    acks.lock().unwrap().log.push((Instant::now(), k));
                    i += 1;
                }
                _ => {
                    errors += 1;
                    k = 1 - k;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        errors
    })
}

struct Failover {
    gaps: Vec<Option<Duration>>,
    notes: Vec<String>,
}

async fn failover(bin: &Path, dir: &Path, endpoints: &str) -> Failover {
    let ttl = format!("{}s", TTL.as_secs());
    let flags = etcd_flags(endpoints, HA_PREFIX, &ttl);
    let mut gen = 0;
    let mut start = |name: &str| {
        gen += 1;
        Controller::start_bin(bin, &dir.join(format!("{name}-{gen}")), &flags)
    };
    let first = start("a");
    let mut notes = Vec::new();
    if wait_leader(&[&first], Duration::from_secs(20))
        .await
        .is_none()
    {
        notes.push(format!(
            "the first controller never led; stderr:\n{}",
            first.stderr()
        ));
        return Failover {
            gaps: Vec::new(),
            notes,
        };
    }
    let mut cs = [first, start("b")];
    create_pool(&mut cs[0].admin().await, "ha", "10.0.0.0/8", 26).await;
    register(&cs[0], "fo-node", 0).await;
    let mut leader = 0usize;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut rng = XorShift::new(seed);
    let mut gaps = Vec::new();
    for round in 0..KILLS {
        let clients = [cs[0].node("fo-node").await, cs[1].node("fo-node").await];
        let acks = Arc::new(Mutex::new(Acks::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = failover_client(clients, leader, round, acks.clone(), stop.clone());
        // Settle: 1 s and a jitter, so that kills fall at random points of
        // the lease's keep-alive cycle.
        tokio::time::sleep(Duration::from_millis(1000 + rng.range(0, 300))).await;
        let before = acks.lock().unwrap().log.len();
        // SIGKILL by pid and reap (synchronous: on this single-threaded
        // runtime the client cannot run in between).
        cs[leader].kill9();
        let killed_at = Instant::now();
        if before == 0 {
            notes.push(format!("round {round}: no acknowledgement before the kill"));
        }
        let survivor = 1 - leader;
        let gap = loop {
            {
                let a = acks.lock().unwrap();
                // The old leader's last acknowledgement (its answer may
                // arrive just after the kill) and the survivor's first.
                let last_old = a.log.iter().rev().find(|x| x.1 == leader).map(|x| x.0);
                let first_new = a.log[before..]
                    .iter()
                    .find(|x| x.1 == survivor)
                    .map(|x| x.0);
                if let (Some(o), Some(n)) = (last_old, first_new) {
                    break Some(n.saturating_duration_since(o));
                }
            }
            if killed_at.elapsed() > Duration::from_secs(20) {
                notes.push(format!(
                    "round {round}: no assignment acknowledged 20 s after the kill; survivor's stderr (tail):\n{}",
                    tail(&cs[survivor].stderr(), 20)
                ));
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        stop.store(true, Ordering::SeqCst);
        let _ = task.await;
        gaps.push(gap);
        if gap.is_none() {
            break;
        }
        // The killed one comes back as a standby (a new process, a new port).
        cs[leader] = start(if leader == 0 { "a" } else { "b" });
        leader = survivor;
    }
    for c in cs {
        let mut c = c;
        tokio::task::spawn_blocking(move || c.term())
            .await
            .expect("stopping a controller");
    }
    Failover { gaps, notes }
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------- main --

/// Before each phase: etcd compacted to its current revision (as a
/// production etcd's auto-compaction would, every few minutes), so that no
/// phase pays for the history of the ones before it; then dirty pages
/// written back, so that their writeback does not land on the phase's
/// fsyncs. Says what went wrong, if anything.
async fn between_phases(endpoints: &[String]) -> Option<String> {
    let r = async {
        let mut c = etcd_client::Client::connect(endpoints, None).await?;
        let rev = c
            .get("compaction-probe", None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        c.compact(
            rev,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
    }
    .await;
    nix::unistd::sync();
    r.err().map(|e| format!("compacting etcd: {e}"))
}

async fn run() -> std::process::ExitCode {
    let (bin, how) = find_binary();
    if !bin.is_file() {
        eprintln!(
            "etcd_ha: no controller binary at {} ({how}); build it with \
             `cargo build --release -p tabby-controller` or set TABBY_CONTROLLER_BIN",
            bin.display()
        );
        return std::process::ExitCode::from(2);
    }
    let etcd_version = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown (etcd --version failed)".into());
    let etcd = match EtcdCluster::start(3) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("etcd_ha: cannot start etcd: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("tabby-bench")
        .tempdir()
        .expect("temp dir");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let endpoints = etcd.endpoints();
    let endpoints_flag = etcd.endpoints_flag();
    println!(
        "tabby-controller on etcd: group commit against a per-assignment CAS client on the same \
         etcd cluster, and failover between two controllers"
    );
    println!("  etcd     {etcd_version}, 3 members on 127.0.0.1 of this machine");
    println!(
        "  etcd dir {} ({}), a temp dir; members --heartbeat-interval 50 --election-timeout 500",
        etcd.dir().display(),
        fs_type(etcd.dir())
    );
    println!("  binary   {} ({how})", bin.display());
    println!(
        "  cpus     {cpus} (etcd's members, the controller and this client share them; \
         the client runs on one thread)"
    );
    println!(
        "  tabby    mTLS between client and controller (and plaintext, for reference); \
         etcd in plaintext for the controllers and the CAS client"
    );
    println!("  phases   each on its own key prefix; etcd compacted to its revision before each");

    // 1 + 3: tabby over mTLS; 2 + 3: the CAS client; then tabby in
    // plaintext, for reference (the CAS client's etcd is plaintext too).
    let mut notes = Vec::new();
    notes.extend(between_phases(&endpoints).await);
    let Some((tabby_rate, tabby_lat)) = tabby(&bin, dir.path(), &endpoints_flag, true).await else {
        return std::process::ExitCode::from(1);
    };
    notes.extend(between_phases(&endpoints).await);
    let cas_rate = cas_throughput(&endpoints).await;
    let cas_lat = cas_latency(&endpoints).await;
    notes.extend(between_phases(&endpoints).await);
    let Some((plain_rate, plain_lat)) = tabby(&bin, dir.path(), &endpoints_flag, false).await
    else {
        return std::process::ExitCode::from(1);
    };
    // 4: failover.
    notes.extend(between_phases(&endpoints).await);
    let fo = failover(&bin, dir.path(), &endpoints_flag).await;
    notes.extend(fo.notes.iter().cloned());

    let ratio = tabby_rate.rate / cas_rate.rate.max(1e-9);
    let plain_ratio = plain_rate.rate / cas_rate.rate.max(1e-9);
    let row = |k: &str, v: String| println!("| {k:<56} | {v:<78} |");
    println!();
    println!("| {:<56} | {:<78} |", "measurement", "value");
    println!("|{:-<58}|{:-<80}|", "", "");
    for (mode, r) in [("mTLS", &tabby_rate), ("plaintext", &plain_rate)] {
        row(
            &format!("tabby {mode}: new-handle Assign, c={CONCURRENCY}"),
            format!(
                "{:.0} assign/s ({} errors); cores: etcd {:.2}, controller {:.2}, client {:.2}",
                r.rate,
                r.errors,
                r.etcd_cores,
                r.server_cores.unwrap_or(0.0),
                r.client_cores
            ),
        );
        let c = r.commits;
        row(
            "  its group commits (etcd txns) in the window",
            format!(
                "{:.0}/s, {:.1} Assigns each, {:.2} ms each (mean)",
                c.groups / THROUGHPUT_TIME.as_secs_f64(),
                c.requests / c.groups.max(1.0),
                c.seconds * 1e3 / c.groups.max(1.0)
            ),
        );
    }
    row(
        &format!("CAS client: one Txn per assignment, c={CONCURRENCY}"),
        format!(
            "{:.0} assign/s ({} errors, {} CAS retries); cores: etcd {:.2}, client {:.2}",
            cas_rate.rate,
            cas_rate.errors,
            cas_rate.conflicts,
            cas_rate.etcd_cores,
            cas_rate.client_cores
        ),
    );
    row(
        "tabby / CAS client",
        format!("{ratio:.1}x over mTLS, {plain_ratio:.1}x in plaintext"),
    );
    // CPU per acknowledged assignment: on a machine this small every phase
    // is CPU-bound, so this is what the rates come down to.
    let per = |r: &Rate, cores: f64| format!("{:.0} us", cores * 1e6 / r.rate.max(1e-9));
    row(
        "CPU per assignment, etcd: tabby mTLS / plaintext / CAS",
        format!(
            "{} / {} / {}",
            per(&tabby_rate, tabby_rate.etcd_cores),
            per(&plain_rate, plain_rate.etcd_cores),
            per(&cas_rate, cas_rate.etcd_cores)
        ),
    );
    let all = |r: &Rate| r.etcd_cores + r.server_cores.unwrap_or(0.0) + r.client_cores;
    row(
        "CPU per assignment, all processes: same",
        format!(
            "{} / {} / {}",
            per(&tabby_rate, all(&tabby_rate)),
            per(&plain_rate, all(&plain_rate)),
            per(&cas_rate, all(&cas_rate))
        ),
    );
    let lat = |p: &Pcts| format!("{} / {} / {}", ms(p.p50), ms(p.p99), ms(p.max));
    row(
        &format!("tabby mTLS: Assign c=1, {LATENCY_CALLS} calls: p50/p99/max"),
        lat(&tabby_lat),
    );
    row("tabby plaintext: Assign c=1: p50/p99/max", lat(&plain_lat));
    row(
        &format!("CAS client: c=1, {CAS_LATENCY_CALLS} calls: p50/p99/max"),
        lat(&cas_lat),
    );
    for (i, g) in fo.gaps.iter().enumerate() {
        row(
            &format!("failover {}: last ack before SIGKILL -> first after", i + 1),
            g.map_or_else(|| "none within 20 s".into(), ms),
        );
    }
    let mut measured: Vec<Duration> = fo.gaps.iter().flatten().copied().collect();
    measured.sort();
    let complete = measured.len() == KILLS;
    let median = match measured.len() {
        0 => None,
        n if n % 2 == 1 => Some(measured[n / 2]),
        n => Some((measured[n / 2 - 1] + measured[n / 2]) / 2),
    };
    let max = measured.last().copied();
    row(
        &format!(
            "failover over {} kills (lease TTL {}s): median / max",
            measured.len(),
            TTL.as_secs()
        ),
        format!(
            "{} / {}",
            median.map_or("-".into(), ms),
            max.map_or("-".into(), ms)
        ),
    );
    println!();
    let trow = |t: &str, m: String, ok: bool| println!("| {t:<42} | {m:<46} | {:<6} |", pass(ok));
    println!(
        "| {:<42} | {:<46} | {:<6} |",
        "target", "measured", "result"
    );
    println!("|{:-<44}|{:-<48}|{:-<8}|", "", "", "");
    trow(
        &format!("tabby (mTLS) >= {TARGET_RATIO:.0}x the CAS client, c={CONCURRENCY}"),
        format!(
            "{ratio:.1}x ({:.0} / {:.0} assign/s)",
            tabby_rate.rate, cas_rate.rate
        ),
        ratio >= TARGET_RATIO,
    );
    let limit = TTL + Duration::from_secs(1);
    trow(
        &format!("failover max <= TTL + 1 s ({})", ms(limit)),
        format!(
            "max {} over {}/{KILLS} kills",
            max.map_or("-".into(), ms),
            measured.len()
        ),
        complete && max.is_some_and(|m| m <= limit),
    );
    for n in &notes {
        println!("note: {n}");
    }
    println!();
    println!(
        "note: a SIGKILLed leader does not revoke its lease, so the standby leads once the lease \
         expires (up to the TTL after the leader's last keep-alive) and its campaign, which \
         retries every 200 ms, wins"
    );
    std::process::ExitCode::SUCCESS
}

/// One controller on etcd (mTLS, or plaintext with `--insecure`) under its
/// own prefix: throughput at c=64 with new handles, then latency at c=1.
async fn tabby(bin: &Path, dir: &Path, endpoints: &str, tls: bool) -> Option<(Rate, Pcts)> {
    let prefix = if tls {
        TABBY_PREFIX
    } else {
        TABBY_PLAIN_PREFIX
    };
    let mut flags = etcd_flags(endpoints, prefix, "5s");
    flags.extend(["--metrics-listen", "127.0.0.1:0"]);
    if !tls {
        flags.push("--insecure");
    }
    let name = if tls { "tabby-mtls" } else { "tabby-plain" };
    let mut c = Controller::start_bin(bin, &dir.join(name), &flags);
    if wait_leader(&[&c], Duration::from_secs(20)).await.is_none() {
        eprintln!("etcd_ha: the controller never led; stderr:\n{}", c.stderr());
        return None;
    }
    // Served once it leads.
    let t = Instant::now();
    let metrics = loop {
        let log = c.stderr();
        let a = log
            .lines()
            .find(|l| l.contains("serving metrics"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_string);
        if let Some(a) = a {
            break a;
        }
        if t.elapsed() > Duration::from_secs(5) {
            eprintln!("etcd_ha: no metrics address in:\n{log}");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    create_pool(&mut c.admin().await, "bench", "10.0.0.0/8", 26).await;
    for i in 0..NODES {
        register(&c, &format!("node-{i}"), i).await;
    }
    let mut own = Vec::new();
    for t in 0..CONCURRENCY {
        own.push(c.node(&format!("node-{}", t % NODES)).await);
    }
    let pid = c.pid().to_string();
    let rate = tabby_throughput(own, &pid, &metrics).await;
    let mut one = c.node("node-0").await;
    let lat = tabby_latency(&mut one).await;
    drop(one);
    // The client runtime keeps running while the server shuts down: its
    // connections answer the server's graceful GOAWAY ping.
    tokio::task::spawn_blocking(move || c.term())
        .await
        .expect("stopping the controller");
    Some((rate, lat))
}

fn main() -> std::process::ExitCode {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run())
}
