//! `tabby-controller`: IPAM and the control plane of tabby.
use anyhow::Context;
use clap::Parser;
use std::time::Duration;
use std::{path::PathBuf, process::ExitCode, sync::Arc};
use tabby_controller::{
    ipam::parse_cidr,
    owner::Ipam,
    server::{self, ServeOptions},
    Error,
};
use tabby_runtime::{parse_duration, LogFormat};
use tabby_store::{Encapsulation, Pool, Store};
use tabby_tls::{
    issue::{issue, Kind, Validity},
    material::Files,
    Identity, Reloading, ServerMaterial,
};

/// jemalloc: its size classes and background purging keep the state's RSS
/// near what it holds (issue 17; options in `.cargo/config.toml`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// tabby controller: owns IPAM and routes, serves gRPC (admin + node-facing),
/// reflection v1/v1alpha and grpc.health.v1.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Without a subcommand: serve.
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to serve gRPC on.
    #[arg(long, env = "TABBY_LISTEN", default_value = "127.0.0.1:5151")]
    listen: String,
    /// Directory of the embedded store (a snapshot and a log). Created if
    /// missing; a sled store left there by an older tabby is converted.
    #[arg(long, env = "TABBY_DATA_DIR", default_value = "./tabby-data")]
    data_dir: PathBuf,
    /// Where the state lives: `embedded` (in --data-dir, one controller;
    /// `sled` is accepted for it) or `etcd` (several controllers, one
    /// leading; see --etcd-endpoints).
    #[arg(long, env = "TABBY_DATASTORE", value_enum, default_value = "embedded")]
    datastore: Datastore,
    /// etcd members, comma-separated (`http://10.0.0.1:2379,...`; https
    /// with --etcd-cacert).
    #[arg(long, env = "TABBY_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    #[command(flatten)]
    etcd: EtcdAccess,
    /// The leader's lease: a leader that cannot renew it for this long is
    /// replaced, and its writes are refused from then on.
    #[arg(long, env = "TABBY_ETCD_LEASE_TTL", default_value = "5s", value_parser = parse_duration)]
    etcd_lease_ttl: Duration,
    /// The address other controllers send clients to while this one leads
    /// (default: --listen).
    #[arg(long, env = "TABBY_ADVERTISE")]
    advertise: Option<String>,
    /// Create this pool at start-up if no pool has that CIDR (e.g. 10.244.0.0/16).
    #[arg(long, env = "TABBY_BOOTSTRAP_POOL")]
    bootstrap_pool: Option<String>,
    /// Name of the bootstrap pool.
    #[arg(
        long,
        env = "TABBY_BOOTSTRAP_POOL_NAME",
        default_value = "default-pool"
    )]
    bootstrap_pool_name: String,
    /// Block size of the bootstrap pool (0: the family default, /26 or /122).
    #[arg(long, env = "TABBY_BOOTSTRAP_BLOCK_SIZE", default_value_t = 0)]
    bootstrap_block_size: u8,
    /// nat_outgoing of the bootstrap pool.
    #[arg(long, env = "TABBY_BOOTSTRAP_NAT_OUTGOING", default_value_t = true, action = clap::ArgAction::Set)]
    bootstrap_nat_outgoing: bool,
    /// Log format.
    #[arg(long, env = "TABBY_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Page cache, in MiB, for reading a sled store once while it is
    /// converted to the embedded store (which keeps no cache: the controller
    /// holds the state in its own memory and reads the store only at start).
    #[arg(long, env = "TABBY_STORE_CACHE_MB", default_value_t = 16)]
    store_cache_mb: u64,
    /// gRPC worker threads; 0 means one per CPU, so that a worker busy
    /// answering a group commit's callers never holds up a cheap read (a
    /// GetAllocation) that another worker can take. With one worker the
    /// runtime uses Tokio's current-thread scheduler, which writes the
    /// answers of one group commit to a connection together (less CPU per
    /// call, but every call then queues behind the whole group's answers).
    #[arg(long, env = "TABBY_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Log filter (tracing EnvFilter syntax, e.g. "info,tabby_controller=debug").
    #[arg(long, env = "TABBY_LOG", default_value = "info")]
    log: String,
    /// Also serve grpc.health.v1 (and reflection) alone, in plaintext, on
    /// this address: for kubelet's native gRPC probes, which cannot do TLS.
    #[arg(long, env = "TABBY_HEALTH_LISTEN")]
    health_listen: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "TABBY_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// The controller's certificate (PEM, leaf first) for mutual TLS.
    #[arg(long, env = "TABBY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "TABBY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that node and admin client certificates must chain to.
    #[arg(long, env = "TABBY_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC, taking node names from the `tabby-node` header
    /// and admin calls from anyone. Development only; logs a warning.
    #[arg(long, env = "TABBY_INSECURE")]
    insecure: bool,
    /// How often the TLS files are checked for changes; changed files are
    /// used for new connections without a restart.
    #[arg(long, env = "TABBY_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    tls_reload_interval: Duration,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "TABBY_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    max_request_bytes: usize,
    /// Calls in progress at once on one connection; more wait.
    #[arg(
        long,
        env = "TABBY_MAX_CONCURRENT_PER_CONNECTION",
        default_value_t = 256
    )]
    max_concurrent_per_connection: usize,
    /// A call not answered in this time fails with DEADLINE_EXCEEDED (an
    /// intent stream only has to start in it).
    #[arg(long, env = "TABBY_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Intent streams one node identity may hold at once.
    #[arg(long, env = "TABBY_MAX_STREAMS_PER_IDENTITY", default_value_t = 4)]
    max_streams_per_identity: usize,
    /// Node calls (Assign, Release...) one node may have in progress at
    /// once; more wait, so that one node's flood does not queue ahead of
    /// every other node's calls.
    #[arg(long, env = "TABBY_MAX_INFLIGHT_PER_NODE", default_value_t = 32)]
    max_inflight_per_node: usize,
}

/// How to reach tabby's keys in etcd, beside the endpoints.
#[derive(clap::Args, Debug, Clone)]
struct EtcdAccess {
    /// Key prefix of tabby's state in etcd.
    #[arg(long, env = "TABBY_ETCD_PREFIX", default_value = tabby_store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// CA bundle that signed etcd's certificates (makes the connection TLS).
    #[arg(long, env = "TABBY_ETCD_CACERT")]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate for etcd (with --etcd-key).
    #[arg(long, env = "TABBY_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// Client key for etcd (with --etcd-cert).
    #[arg(long, env = "TABBY_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
}

impl EtcdAccess {
    /// The store's etcd configuration for `endpoints`.
    fn config(&self, endpoints: &[String]) -> anyhow::Result<tabby_store::etcd::EtcdConfig> {
        use tabby_store::etcd::{EtcdConfig, EtcdTls};
        if endpoints.is_empty() {
            anyhow::bail!("no etcd endpoints given (--etcd-endpoints)");
        }
        if !self.etcd_prefix.ends_with('/') {
            anyhow::bail!("--etcd-prefix {:?} must end with /", self.etcd_prefix);
        }
        let tls = match (&self.etcd_cacert, &self.etcd_cert, &self.etcd_key) {
            (None, None, None) => None,
            (Some(ca), None, None) => Some(EtcdTls {
                ca: ca.clone(),
                identity: None,
            }),
            (Some(ca), Some(c), Some(k)) => Some(EtcdTls {
                ca: ca.clone(),
                identity: Some((c.clone(), k.clone())),
            }),
            _ => anyhow::bail!("--etcd-cert and --etcd-key go together, and need --etcd-cacert"),
        };
        Ok(EtcdConfig {
            endpoints: endpoints.to_vec(),
            prefix: self.etcd_prefix.clone(),
            tls,
        })
    }
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Make the certificates of a cluster (a CA, the controller's, nodes',
    /// operators').
    #[command(subcommand)]
    Certs(Certs),
    /// Copy an embedded (sled) store into an empty etcd prefix, to move a
    /// cluster onto etcd. Stop the controller first (its store is locked
    /// while it runs); the copy keeps the store's id, so node clients
    /// resume on the new controllers without a snapshot.
    Migrate {
        /// The embedded store's directory (the old --data-dir). A sled store
        /// there (older tabby) is converted first, as a start would.
        #[arg(long, alias = "from-sled")]
        from_dir: PathBuf,
        /// etcd members to copy into, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        to_etcd: Vec<String>,
        #[command(flatten)]
        etcd: EtcdAccess,
    },
}

/// `tabby-controller migrate`: every key of the sled store into an empty
/// etcd prefix; refused, with nothing written, when the prefix holds keys.
fn migrate(from: &std::path::Path, endpoints: &[String], etcd: &EtcdAccess) -> anyhow::Result<()> {
    use tabby_store::{etcd::EtcdBackend, migrate};
    let here = tabby_store::embedded_store_in(from)
        .with_context(|| format!("--from-dir {}: reading the directory", from.display()))?;
    if !here {
        anyhow::bail!("--from-dir {}: no embedded store there", from.display());
    }
    let cfg = etcd.config(endpoints)?;
    let src = tabby_store::open_embedded(from, 64 << 20).with_context(|| {
        format!(
            "opening the embedded store in {} (is its controller stopped?)",
            from.display()
        )
    })?;
    let dst = EtcdBackend::open(&cfg, None).context("connecting to etcd")?;
    // 100 keys per transaction: inside etcd's default --max-txn-ops (128).
    let n = migrate::copy(&src, &dst, 100)?;
    println!(
        "copied {} keys ({} bytes) from {} into etcd under {}",
        n.keys,
        n.bytes,
        from.display(),
        cfg.prefix
    );
    Ok(())
}

/// Where the state lives.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Datastore {
    /// The embedded store in --data-dir.
    #[value(alias = "sled")]
    Embedded,
    /// etcd v3 (--etcd-endpoints), with leader election.
    Etcd,
}

#[derive(clap::Subcommand, Debug)]
enum Certs {
    /// Make a CA: D/ca.pem and D/ca-key.pem. Refused if D has one.
    Init {
        /// The certificates directory.
        #[arg(long)]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Make the controller's certificate, D/server.pem, signed by D's CA.
    Server {
        /// The certificates directory.
        #[arg(long)]
        dir: PathBuf,
        /// A DNS name or IP address clients reach the controller by (repeatable).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Make a node's client certificate, D/node-NAME.pem (tabby://node/NAME).
    Node {
        /// The certificates directory.
        #[arg(long)]
        dir: PathBuf,
        /// The node's name (its Kubernetes node name).
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Make an operator's client certificate, D/admin-NAME.pem (tabby://admin/NAME).
    Admin {
        /// The certificates directory.
        #[arg(long)]
        dir: PathBuf,
        /// The operator's name.
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

fn certs(c: Certs) -> anyhow::Result<()> {
    let (dir, kind, days) = match c {
        Certs::Init { dir, days } => (dir, Kind::Ca, days),
        Certs::Server { dir, sans, days } => (dir, Kind::Server(sans), days),
        Certs::Node { dir, name, days } => (dir, Kind::Client(Identity::Node(name)), days),
        Certs::Admin { dir, name, days } => (dir, Kind::Client(Identity::Admin(name)), days),
    };
    let out = issue(&dir, &kind, Validity::days(days))?;
    println!("{}\n{}", out.cert.display(), out.key.display());
    Ok(())
}

/// The serving options from the flags: mutual TLS unless --insecure.
fn serve_options(a: &Args) -> anyhow::Result<ServeOptions> {
    let tls = match (&a.tls_cert, &a.tls_key, &a.client_ca, a.insecure) {
        (None, None, None, true) => {
            tracing::warn!("--insecure: serving plaintext gRPC; any client can claim any node name and use the admin services");
            None
        }
        (Some(cert), Some(key), Some(ca), false) => {
            let files = Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            };
            Some(Reloading::start(ServerMaterial(files), a.tls_reload_interval).context("loading --tls-cert, --tls-key and --client-ca")?)
        }
        (_, _, _, true) => anyhow::bail!("--insecure cannot be combined with --tls-cert, --tls-key or --client-ca"),
        _ => anyhow::bail!(
            "serving needs --tls-cert, --tls-key and --client-ca (make them with `tabby-controller certs`), or --insecure for plaintext"
        ),
    };
    Ok(ServeOptions {
        tls,
        max_request_bytes: a.max_request_bytes,
        max_concurrent_per_connection: a.max_concurrent_per_connection,
        request_timeout: a.request_timeout,
        max_streams_per_identity: a.max_streams_per_identity,
        max_inflight_per_node: a.max_inflight_per_node,
    })
}

async fn bootstrap(ipam: &Ipam, a: &Args) -> anyhow::Result<()> {
    let Some(cidr) = &a.bootstrap_pool else {
        return Ok(());
    };
    let cidr = parse_cidr(cidr).context("--bootstrap-pool")?;
    let pool = Pool {
        name: a.bootstrap_pool_name.clone(),
        cidr,
        block_size: a.bootstrap_block_size,
        nat_outgoing: a.bootstrap_nat_outgoing,
        encapsulation: Encapsulation::None,
        disabled: false,
        node_selector: String::new(),
    };
    let r = ipam
        .call(move |s| {
            if s.pools().iter().any(|p| p.cidr == pool.cidr) {
                return Ok((false, Default::default()));
            }
            s.create_pool(pool).map(|(_, m)| (true, m))
        })
        .await;
    match r {
        Ok((true, _)) => tracing::info!(%cidr, "bootstrap pool created"),
        Ok((false, _)) => tracing::info!(%cidr, "bootstrap pool exists"),
        Err(e @ Error::InvalidArgument(_)) | Err(e @ Error::AlreadyExists(_)) => {
            anyhow::bail!("--bootstrap-pool {cidr}: {e}")
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// EX_SOFTWARE: the IPAM owner failed.
const EXIT_OWNER_FAILED: u8 = 70;

/// gRPC worker threads for `--worker-threads flag` on a machine with `cpus`
/// CPUs (None: unknown): 0 means one per CPU.
fn worker_count(flag: usize, cpus: Option<usize>) -> usize {
    match flag {
        0 => cpus.unwrap_or(1).max(1),
        n => n,
    }
}

fn main() -> ExitCode {
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast::<OwnerFailed>() {
            Ok(OwnerFailed(e)) => {
                tracing::error!(error = %e, "the IPAM owner failed; exiting with code 70");
                ExitCode::from(EXIT_OWNER_FAILED)
            }
            // As `main` returning the error would print it.
            Err(e) => {
                eprintln!("Error: {e:?}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The IPAM owner stopped on an error (the store failed, a thread panicked):
/// nothing more can be acknowledged. `main` exits with EX_SOFTWARE (70) as
/// soon as it gets this; a restart recovers what is durable.
#[derive(Debug, thiserror::Error)]
#[error("the IPAM owner failed: {0}")]
struct OwnerFailed(Error);

fn start() -> anyhow::Result<()> {
    let mut args = Args::parse();
    match args.command.take() {
        Some(Command::Certs(c)) => return certs(c),
        Some(Command::Migrate {
            from_dir,
            to_etcd,
            etcd,
        }) => return migrate(&from_dir, &to_etcd, &etcd),
        None => {}
    }
    tabby_runtime::init_logging(&args.log, args.log_format).context("--log")?;
    let workers = worker_count(
        args.worker_threads,
        std::thread::available_parallelism().ok().map(|n| n.get()),
    );
    // Tokio's multi-thread scheduler runs a task woken by the running task
    // next (its LIFO slot), so each finished call wakes the connection task
    // and is written alone; the current-thread scheduler queues that wake
    // behind the group's other answers. Measured with `make bench`: about 25%
    // less server CPU per call on 2 CPUs.
    let mut rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    // (With the current-thread scheduler this names only blocking-pool threads.)
    let rt = rt
        .thread_name("tabby-grpc")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(run(args));
    if r.as_ref().is_err_and(|e| e.is::<OwnerFailed>()) {
        // Stop at once: no waiting for blocking tasks of a dead owner.
        rt.shutdown_background();
    }
    r
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Bad TLS material fails the start before anything else.
    let opts = serve_options(&args)?;
    // Bound first: a start that cannot serve leaves the store alone (each
    // open records an epoch).
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?
        .into_std()?;
    let health_listener = match &args.health_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding --health-listen {a}"))?
                .into_std()?,
        ),
        None => None,
    };
    if let Some(l) = &health_listener {
        tracing::info!(addr = %l.local_addr()?, "serving plaintext health checks");
    }
    let listeners = Listeners {
        grpc: listener,
        health: health_listener,
    };
    // SIGTERM/SIGINT, seen by every part that must stop.
    let (term_tx, term) = tokio::sync::watch::channel(false);
    let signal = tabby_runtime::shutdown_signal()?;
    tokio::spawn(async move {
        signal.await;
        let _ = term_tx.send(true);
    });
    match args.datastore {
        Datastore::Embedded => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
            let store = Arc::new(
                Store::open_with_cache(
                    &args.data_dir,
                    args.store_cache_mb.saturating_mul(1024 * 1024),
                )
                .with_context(|| format!("opening store in {}", args.data_dir.display()))?,
            );
            tracing::info!(
                data_dir = %args.data_dir.display(),
                revision = store.revision(),
                store_id = store.id(),
                epoch = store.epoch().id,
                "store open"
            );
            lead(&args, store, opts, &listeners, wait_true(term), None).await?;
            exit_now()
        }
        Datastore::Etcd => run_etcd(&args, opts, &listeners, term).await,
    }
}

/// The listening sockets, kept across leaderships: each server gets a clone.
struct Listeners {
    grpc: std::net::TcpListener,
    health: Option<std::net::TcpListener>,
}

impl Listeners {
    fn grpc(&self) -> std::io::Result<tokio::net::TcpListener> {
        clone_listener(&self.grpc)
    }

    fn health(&self) -> std::io::Result<Option<tokio::net::TcpListener>> {
        self.health.as_ref().map(clone_listener).transpose()
    }
}

fn clone_listener(l: &std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    let c = l.try_clone()?;
    c.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(c)
}

/// Resolves once `w` is true.
async fn wait_true(mut w: tokio::sync::watch::Receiver<bool>) {
    let _ = w.wait_for(|v| *v).await;
}

/// Everything is durable. Dropping the state, the store and the runtime
/// one allocation at a time would take seconds (2 s at 550,000
/// allocations) and change nothing on disk.
fn exit_now() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    #[allow(clippy::exit)]
    std::process::exit(0)
}

/// How a leadership ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// SIGTERM/SIGINT: everything flushed; exit.
    Stopped,
    /// The etcd lease was lost: step down.
    Lost,
}

/// With etcd: stand by until elected, lead until stopped or deposed (then
/// stand by again), and keep the state in etcd.
async fn run_etcd(
    args: &Args,
    opts: ServeOptions,
    listeners: &Listeners,
    term: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use tabby_store::etcd::{self, EtcdBackend};
    let cfg = args.etcd.config(&args.etcd_endpoints)?;
    let ttl = i64::try_from(args.etcd_lease_ttl.as_secs().max(1)).unwrap_or(5);
    let me = match &args.advertise {
        Some(a) => a.clone(),
        None => listeners.grpc.local_addr()?.to_string(),
    };
    let client = cfg.connect().await.context("connecting to etcd")?;
    let mut first = true;
    loop {
        // Stand by: health says NOT_SERVING, tabby calls are UNAVAILABLE
        // with the leader's address, until this one is elected.
        let now = etcd::leader(&client, &args.etcd.etcd_prefix)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "etcd: cannot read the leader");
                None
            });
        let (who_tx, who) = tokio::sync::watch::channel(now);
        let (stop_standby, standby_stopped) = tokio::sync::oneshot::channel::<()>();
        let standby = {
            let (l, h, opts) = (listeners.grpc()?, listeners.health()?, opts.clone());
            tokio::spawn(async move {
                tabby_controller::standby::serve(l, h, &opts, who, async move {
                    let _ = standby_stopped.await;
                })
                .await
            })
        };
        if std::mem::take(&mut first) {
            tracing::info!(
                listen = %listeners.grpc.local_addr()?,
                tls = opts.tls.is_some(),
                "serving gRPC as a standby until elected"
            );
        }
        tracing::info!(me = %me, ttl, "standing by: campaigning for leadership in etcd");
        // Warm state: a copy of the store that follows the leader's writes,
        // so that taking over does not read every key while nodes wait.
        let mirror = tabby_store::warm::Mirror::start(client.clone(), &args.etcd.etcd_prefix);
        let elected = tokio::select! {
            l = etcd::campaign(&client, &args.etcd.etcd_prefix, &me, ttl, &who_tx) => Some(l),
            () = wait_true(term.clone()) => None,
        };
        let _ = stop_standby.send(());
        if let Ok(Err(e)) = standby.await {
            tracing::warn!(error = %e, "the standby server stopped with an error");
        }
        let leadership = match elected {
            None => return Ok(()),
            Some(Ok(l)) => l,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "campaign failed; standing by again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        tracing::info!(lease = leadership.lease, "elected: leading");
        let lease = leadership.lease;
        let copy = mirror
            .take(&client, &args.etcd.etcd_prefix, Duration::from_secs(3))
            .await;
        match &copy {
            Some(c) => tracing::info!(
                keys = c.kvs.len(),
                revision = c.revision,
                "taking over with the warm copy"
            ),
            None => {
                tracing::warn!("the warm copy was not current in time: reading the store from etcd")
            }
        }
        let store = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || {
                let backend = match copy {
                    Some(c) => EtcdBackend::open_warm(&cfg, Some(lease), c)?,
                    None => EtcdBackend::open(&cfg, Some(lease))?,
                };
                Store::open_on(Box::new(backend))
            })
            .await
            .context("opening the etcd store")?
        };
        let ended = match store {
            Ok(store) => {
                let store = Arc::new(store);
                tracing::info!(
                    prefix = %args.etcd.etcd_prefix,
                    revision = store.revision(),
                    store_id = store.id(),
                    epoch = store.epoch().id,
                    "store open (etcd)"
                );
                lead(
                    args,
                    store,
                    opts.clone(),
                    listeners,
                    wait_true(term.clone()),
                    Some(leadership.lost),
                )
                .await
            }
            Err(e) => Err(anyhow::Error::from(e).context("opening the etcd store")),
        };
        // Whatever ended it, let a standby take over at once.
        let mut c = client.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(lease)).await;
        match ended {
            Ok(Ended::Stopped) => exit_now(),
            Ok(Ended::Lost) => tracing::error!("leadership lost; standing by"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "leading failed; standing by"),
        }
        if *term.borrow() {
            return Ok(());
        }
    }
}

/// How long calls in flight get to finish after the IPAM owner failed.
const FAILED_DRAIN: Duration = Duration::from_secs(2);

/// Leads on `store` until `shutdown` (then flushes and returns Stopped) or,
/// with etcd, until `lost` turns true (Lost). An owner failure is an error
/// (OwnerFailed).
async fn lead(
    args: &Args,
    store: Arc<Store>,
    opts: ServeOptions,
    listeners: &Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    lost: Option<tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<Ended> {
    let listener = listeners.grpc()?;
    let health_listener = listeners.health()?;
    let (ipam, mut owner) = Ipam::start(store.clone())?;
    tokio::select! {
        r = bootstrap(&ipam, args) => r?,
        e = owner.failed() => return Err(OwnerFailed(e).into()),
    }

    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(a) = &args.metrics_listen {
        let l = tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("binding --metrics-listen {a}"))?;
        tracing::info!(addr = %l.local_addr()?, "serving metrics");
        // A reader of snapshots only: it does not keep the owner alive.
        let reader = ipam.reader();
        let render: tabby_runtime::metrics::Render = std::sync::Arc::new(move || {
            let reader = reader.clone();
            Box::pin(async move {
                // A walk of the whole state, as ShowIpam's: on the admin
                // read thread, behind pod starts.
                reader
                    .read_heavy(|st, rev| tabby_controller::metrics::metrics().render(st, rev))
                    .await
                    .unwrap_or_default()
            })
        });
        tokio::spawn(tabby_runtime::metrics::serve(l, render, async move {
            let _ = metrics_stopped.await;
        }));
    }
    tracing::info!(listen = %listener.local_addr()?, tls = opts.tls.is_some(), "serving gRPC");
    // The server stops on a signal, or when the etcd lease is lost.
    let lost_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = {
        let lost_flag = lost_flag.clone();
        async move {
            match lost {
                Some(lost) => {
                    tokio::select! {
                        () = shutdown => {}
                        () = wait_true(lost) => {
                            lost_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                            tracing::error!("the etcd lease is lost: another controller may lead; stopping");
                        }
                    }
                }
                None => shutdown.await,
            }
        }
    };
    // An owner failure stops the server gracefully too: the calls it failed
    // have their answers (UNAVAILABLE, INTERNAL) on the way, and dropping
    // the server would reset their connections instead.
    let (failing, failed) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            _ = failed => {}
        }
    };
    let server = server::serve(listener, health_listener, ipam, opts, shutdown);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        e = owner.failed() => {
            let _ = failing.send(());
            if tokio::time::timeout(FAILED_DRAIN, server).await.is_err() {
                tracing::warn!("calls still open after an owner failure were dropped");
            }
            return Err(OwnerFailed(e).into());
        }
    }
    let _ = metrics_stop.send(());
    // The server dropped its Ipam handles: the owner commits what is queued,
    // flushes and exits. Joined off the runtime thread, which keeps running
    // the answer delivery task meanwhile.
    let joined = tokio::task::spawn_blocking(move || owner.join())
        .await
        .context("joining the IPAM owner")?;
    joined.map_err(OwnerFailed)?;
    if lost_flag.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(Ended::Lost);
    }
    store.flush()?;
    tracing::info!(
        revision = store.revision(),
        "shutdown complete, store flushed"
    );
    // Durable: the caller exits (after letting a standby take over). Freeing
    // the store's pages one at a time first would hold that up by seconds
    // at 550,000 allocations.
    std::mem::forget(store);
    Ok(Ended::Stopped)
}

#[cfg(test)]
mod tests {
    use super::{worker_count, Args, Datastore};
    use clap::Parser;

    /// `embedded` is the default; `sled`, the name the design and older
    /// manifests use, still selects it.
    #[test]
    fn the_embedded_store_answers_to_sled_too() {
        let parse = |a: &[&str]| {
            Args::try_parse_from([&["tabby-controller"], a].concat())
                .map(|a| a.datastore)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse(&[]), Ok(Datastore::Embedded));
        assert_eq!(parse(&["--datastore", "sled"]), Ok(Datastore::Embedded));
        assert_eq!(parse(&["--datastore", "embedded"]), Ok(Datastore::Embedded));
        assert_eq!(parse(&["--datastore", "etcd"]), Ok(Datastore::Etcd));
        assert!(parse(&["--datastore", "redis"]).is_err());
    }

    /// One worker per CPU by default: a worker busy answering a group never
    /// holds up a read another can take (on 2 CPUs, two workers).
    #[test]
    fn one_worker_per_cpu_by_default() {
        assert_eq!(worker_count(0, Some(2)), 2);
        assert_eq!(worker_count(0, Some(16)), 16);
        assert_eq!(worker_count(0, None), 1);
        assert_eq!(worker_count(1, Some(8)), 1);
        assert_eq!(worker_count(3, Some(2)), 3);
    }
}
