//! Test harness: runs the real `tabby-controller` binary as a child process
//! and hands out gRPC clients to it.
//!
//! Every test binary compiles this module separately and uses a different
//! part of it.
#![allow(dead_code)]

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};
use tabby_proto::v1::{ipam_admin_client::IpamAdminClient, node_agent_client::NodeAgentClient};
use tabby_tls::{
    issue::{issue, Kind, Validity},
    material::Files,
    ClientMaterial, Connector, Identity, Reloading,
};
use tonic::{
    metadata::{AsciiMetadataValue, MetadataKey},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Channel, Endpoint},
    Request, Status,
};

/// How long the controller may take to print its `serving gRPC` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the controller may take to exit after SIGTERM.
const TERM_TIMEOUT: Duration = Duration::from_secs(20);

/// Client of the node-facing service, sending the `tabby-node` header.
pub type NodeClient = NodeAgentClient<InterceptedService<Channel, NodeHeader>>;
/// Client of the admin service.
pub type AdminClient = IpamAdminClient<Channel>;

/// Adds `tabby-node: <name>` to every call.
#[derive(Clone)]
pub struct NodeHeader(pub AsciiMetadataValue);

impl Interceptor for NodeHeader {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(
            MetadataKey::from_static(tabby_proto::NODE_IDENTITY_HEADER),
            self.0.clone(),
        );
        Ok(req)
    }
}

/// This test binary's certificates directory: a CA, the controller's
/// certificate for 127.0.0.1, and client certificates issued on demand.
pub fn certs_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "certs-{}-{}",
            std::process::id(),
            unique_suffix()
        ));
        let _ = std::fs::remove_dir_all(&d);
        let v = Validity::days(2);
        issue(&d, &Kind::Ca, v).expect("issuing the test CA");
        issue(
            &d,
            &Kind::Server(vec!["127.0.0.1".into(), "localhost".into()]),
            v,
        )
        .expect("issuing the controller's certificate");
        d
    })
    .clone()
}

fn unique_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The certificate files of `id` in [`certs_dir`], issued on first use.
pub fn client_files(id: &Identity) -> Files {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let dir = certs_dir();
    let f = tabby_tls::issue::client_files(&dir, id);
    if !f.cert.exists() {
        issue(&dir, &Kind::Client(id.clone()), Validity::days(2))
            .expect("issuing a client certificate");
    }
    f
}

/// The flags that make the controller serve mTLS with [`certs_dir`].
pub fn tls_flags() -> Vec<String> {
    let f = tabby_tls::issue::server_files(&certs_dir());
    vec![
        "--tls-cert".into(),
        f.cert.display().to_string(),
        "--tls-key".into(),
        f.key.display().to_string(),
        "--client-ca".into(),
        f.ca.display().to_string(),
    ]
}

/// A channel (its own HTTP/2 connection) to `addr` over mTLS as `files`
/// (which must verify a server certificate for 127.0.0.1).
pub async fn tls_channel(
    addr: SocketAddr,
    files: Files,
) -> Result<Channel, tonic::transport::Error> {
    let tls = Reloading::start(ClientMaterial(files), Duration::from_secs(3600))
        .expect("loading client TLS material");
    reloading_channel(addr, tls).await
}

/// A channel over mTLS with `tls`, which may follow its files: each new
/// connection of the channel uses what `tls` holds then.
pub async fn reloading_channel(
    addr: SocketAddr,
    tls: Reloading<ClientMaterial>,
) -> Result<Channel, tonic::transport::Error> {
    let conn = Connector::new(tls, "127.0.0.1", Duration::from_secs(5)).expect("connector");
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_with_connector(conn)
        .await
}

/// A channel over TLS that presents no client certificate.
pub async fn anonymous_channel(addr: SocketAddr) -> Channel {
    let tls = Reloading::start(
        tabby_tls::material::AnonymousClient(certs_dir().join(tabby_tls::issue::CA_CERT)),
        Duration::from_secs(3600),
    )
    .expect("loading the CA");
    let conn = Connector::new(tls, "127.0.0.1", Duration::from_secs(5)).expect("connector");
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_with_connector(conn)
        .await
        .expect("a TLS connection without a client certificate")
}

/// A running `tabby-controller` child process.
pub struct Controller {
    /// Whether it serves mTLS (else it runs `--insecure`).
    pub tls: bool,
    /// The address it serves gRPC on.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The child process. Stop it with [`Controller::term`] or
    /// [`Controller::kill9`] (which track its exit), not by waiting on it here.
    pub child: Child,
    stderr: Arc<Mutex<String>>,
    exited: Option<ExitStatus>,
}

/// Removes ANSI escape sequences (`ESC [ ... letter`) from a log line.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address in a `serving gRPC listen=ADDR` log line.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("serving gRPC").nth(1)?;
    let v = rest.split("listen=").nth(1)?;
    v.split_whitespace().next()?.parse().ok()
}

/// Where a test controller keeps its state: the suites that hold for any
/// backend (IPAM under concurrency, crash, intent resume) run on both.
#[derive(Debug, Clone)]
pub enum Datastore {
    /// The embedded store in the test's data directory.
    Sled,
    /// etcd (a cluster the test started), under `prefix`.
    Etcd {
        /// `--etcd-endpoints`.
        endpoints: String,
        /// `--etcd-prefix`.
        prefix: String,
    },
}

/// Path of the controller binary under test.
pub fn controller_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tabby-controller"))
}

impl Controller {
    /// Starts the controller on a free loopback port with `data_dir`.
    pub fn start(data_dir: &Path) -> Controller {
        Self::start_bin(&controller_bin(), data_dir, &[])
    }

    /// Starts the controller on `store` (the embedded one in `data_dir`,
    /// or etcd) and, on etcd, waits until it leads: the suites that run
    /// against both backends then call it as they would a sled controller.
    pub fn start_on(data_dir: &Path, store: &Datastore) -> Controller {
        match store {
            Datastore::Sled => Self::start(data_dir),
            Datastore::Etcd { endpoints, prefix } => {
                let c = Self::start_bin(
                    &controller_bin(),
                    data_dir,
                    &[
                        "--datastore",
                        "etcd",
                        "--etcd-endpoints",
                        endpoints,
                        "--etcd-prefix",
                        prefix,
                        // A killed leader's lease outlives it: short, so
                        // that a restart leads again soon.
                        "--etcd-lease-ttl",
                        "1s",
                    ],
                );
                let t = Instant::now();
                while !c.stderr().contains("elected: leading") {
                    assert!(
                        t.elapsed() < Duration::from_secs(20),
                        "the controller on etcd was not elected; stderr:\n{}",
                        c.stderr()
                    );
                    thread::sleep(Duration::from_millis(20));
                }
                c
            }
        }
    }

    /// Starts `bin` with `--listen 127.0.0.1:0 --data-dir <data_dir>`, the
    /// harness's TLS flags (unless `extra` has `--insecure`) and `extra`
    /// arguments, and waits until it serves gRPC.
    pub fn start_bin(bin: &Path, data_dir: &Path, extra: &[&str]) -> Controller {
        let tls = !extra.contains(&"--insecure");
        // A test that brings its own material passes --tls-cert itself.
        let own = extra.contains(&"--tls-cert");
        let mut child = Command::new(bin)
            .args(if tls && !own { tls_flags() } else { Vec::new() })
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--log-format", "human", "--log", "info"])
            .args(extra)
            .env("NO_COLOR", "1")
            .env_remove("TABBY_BOOTSTRAP_POOL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel::<Option<SocketAddr>>();
        {
            let stderr = stderr.clone();
            // Drains stderr until EOF so the child never blocks on a full
            // pipe; reports the listen address once, or None at EOF.
            thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut buf = Vec::new();
                let mut reported = false;
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let line = strip_ansi(&String::from_utf8_lossy(&buf));
                    stderr.lock().unwrap().push_str(&line);
                    if !reported {
                        if let Some(a) = listen_addr(&line) {
                            reported = true;
                            let _ = tx.send(Some(a));
                        }
                    }
                }
                let _ = tx.send(None);
            });
        }
        let mut c = Controller {
            tls,
            addr: "0.0.0.0:0".parse().unwrap(),
            data_dir: data_dir.to_path_buf(),
            child,
            stderr,
            exited: None,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(a)) => c.addr = a,
            Ok(None) => {
                // EOF: give the exit status a moment to appear.
                let deadline = Instant::now() + Duration::from_secs(2);
                let mut st = None;
                while Instant::now() < deadline {
                    if let Ok(Some(s)) = c.child.try_wait() {
                        st = Some(s);
                        break;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                if let Some(s) = st {
                    c.exited = Some(s);
                }
                panic!(
                    "tabby-controller closed stderr before serving gRPC (exit: {st:?}); stderr so far:\n{}",
                    c.stderr()
                );
            }
            Err(_) => panic!(
                "tabby-controller did not print `serving gRPC listen=` within {START_TIMEOUT:?}; stderr so far:\n{}",
                c.stderr()
            ),
        }
        c
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Process id of the child.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `http://ADDR`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new channel (its own HTTP/2 connection) as `id`: with `id`'s
    /// certificate under mTLS; with `--insecure`, a plain one (node clients
    /// add the header).
    pub async fn channel_as(&self, id: &Identity) -> Channel {
        let r = if self.tls {
            tls_channel(self.addr, client_files(id)).await
        } else {
            Endpoint::from_shared(self.endpoint())
                .expect("valid endpoint")
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
        };
        r.unwrap_or_else(|e| {
            panic!(
                "cannot connect to {}: {e}; stderr:\n{}",
                self.addr,
                self.stderr()
            )
        })
    }

    /// A channel as the harness's admin, `tabby://admin/test`.
    pub async fn admin_channel(&self) -> Channel {
        self.channel_as(&Identity::Admin("test".into())).await
    }

    /// A channel as node `name`.
    pub async fn node_channel(&self, name: &str) -> Channel {
        self.channel_as(&Identity::Node(name.into())).await
    }

    /// An admin client on a new channel.
    pub async fn admin(&self) -> AdminClient {
        IpamAdminClient::new(self.admin_channel().await)
    }

    /// A node-facing client for node `name` on a new channel.
    pub async fn node(&self, name: &str) -> NodeClient {
        node_client(self.node_channel(name).await, name)
    }

    /// Sends SIGTERM, waits for the exit and asserts it was status 0.
    pub fn term(&mut self) {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + TERM_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.exited = Some(s);
                    assert!(
                        s.success(),
                        "tabby-controller exited with {s} after SIGTERM; stderr:\n{}",
                        self.stderr()
                    );
                    return;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    self.kill9();
                    panic!(
                        "tabby-controller did not exit within {TERM_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                        self.stderr()
                    );
                }
                Err(e) => panic!("waiting for tabby-controller: {e}"),
            }
        }
    }

    /// SIGKILL (kill -9) by pid, then reaps the child.
    pub fn kill9(&mut self) {
        if self.exited.is_some() {
            return;
        }
        self.signal(Signal::SIGKILL);
        match self.child.wait() {
            Ok(s) => self.exited = Some(s),
            Err(e) => panic!("waiting for tabby-controller: {e}"),
        }
    }

    fn signal(&self, sig: Signal) {
        if self.exited.is_some() {
            return;
        }
        // Our own, not yet reaped child: the pid cannot have been reused by
        // another process.
        if let Err(e) = kill(Pid::from_raw(self.pid()), sig) {
            panic!("kill({}, {sig}): {e}", self.pid());
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.exited.is_none() {
            if let Ok(None) = self.child.try_wait() {
                // As in `signal`: our own unreaped child.
                let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// A node-facing client for node `name` over `ch`.
pub fn node_client(ch: Channel, name: &str) -> NodeClient {
    let v: AsciiMetadataValue = name.parse().expect("node name is ASCII");
    NodeAgentClient::with_interceptor(ch, NodeHeader(v))
}

/// A pool message for CreatePool.
pub fn pool(name: &str, cidr: &str, block_size: u32) -> tabby_proto::v1::Pool {
    tabby_proto::v1::Pool {
        name: name.into(),
        cidr: cidr.into(),
        block_size,
        ..Default::default()
    }
}

/// Creates a pool through the admin service.
pub async fn create_pool(admin: &mut AdminClient, name: &str, cidr: &str, block_size: u32) {
    admin
        .create_pool(tabby_proto::v1::CreatePoolRequest {
            pool: Some(pool(name, cidr, block_size)),
        })
        .await
        .unwrap_or_else(|e| panic!("CreatePool {name} {cidr}: {e}"));
}

/// Registers node `name` with a made-up node address.
pub async fn register(c: &Controller, name: &str, i: usize) {
    let mut n = c.node(name).await;
    n.register_node(tabby_proto::v1::RegisterNodeRequest {
        node: Some(tabby_proto::v1::Node {
            name: name.into(),
            addresses: vec![format!("172.18.{}.{}", i / 250, i % 250 + 2)],
            ..Default::default()
        }),
    })
    .await
    .unwrap_or_else(|e| panic!("RegisterNode {name}: {e}"));
}

/// A fresh temporary directory; the store lives in its `data` subdirectory.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tabby-controller-test")
        .tempdir()
        .expect("temp dir")
}

/// A small deterministic PRNG (xorshift64*), so failures can be replayed.
pub struct XorShift(u64);

impl XorShift {
    /// Seeded generator (a zero seed is replaced).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// CheckIpam, with the problems other than borrowed addresses (borrowing is
/// valid; everything else is damage).
pub async fn check_ipam(
    admin: &mut AdminClient,
) -> (
    tabby_proto::v1::CheckIpamResponse,
    Vec<tabby_proto::v1::IpamProblem>,
) {
    use tabby_proto::v1::ipam_problem::Kind;
    let check = admin
        .check_ipam(tabby_proto::v1::CheckIpamRequest {})
        .await
        .expect("CheckIpam")
        .into_inner();
    let bad = check
        .problems
        .iter()
        .filter(|p| p.kind != Kind::BorrowedAddress as i32)
        .cloned()
        .collect();
    (check, bad)
}
