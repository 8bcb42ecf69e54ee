//! `tabby-node`: the per-node client of tabby.
use anyhow::Context;
use clap::Parser;
use std::{
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::Duration,
};
use tabby_node::{
    cni_server::PodNetworkService,
    controller::{controller_addresses, controller_host, Controller, Transport},
    daemon::{self, lock_status, Event, NodeStatus, Reconciler, SharedResume, Sysctl, Timers},
    detect, netlink,
    nft::Nft,
    nft_monitor,
    peer::PeerCheckLayer,
};
use tabby_proto::v1::pod_network_server::PodNetworkServer;
use tabby_runtime::{parse_duration, LogFormat};

/// tabby node client: registers this node, applies the controller's route and
/// NAT intent, and wires pods for the `tabby` CNI plugin.
#[derive(Parser, Debug)]
#[command(version, subcommand_negates_reqs = true)]
struct Args {
    /// Without a subcommand: run the node client.
    #[command(subcommand)]
    command: Option<Command>,
    /// Controller gRPC address (host:port), or several replicas' addresses
    /// separated by commas: the node finds the one that leads, and moves
    /// when another takes over.
    #[arg(long, env = "TABBY_CONTROLLER", required = true)]
    controller: Option<String>,
    /// This node's name (Kubernetes node name).
    #[arg(long, env = "NODE_NAME", required = true)]
    node_name: Option<String>,
    /// This node's address(es); autodetected from the default route's interface when absent.
    /// Each `ADDR/LEN`, or a bare address (its interface's prefix is used):
    /// CrossSubnet pools compare subnets.
    #[arg(long, env = "TABBY_NODE_IP", value_delimiter = ',')]
    node_ip: Vec<String>,
    /// Node label for pool selectors, `key=value` (repeatable).
    #[arg(long = "node-label", env = "TABBY_NODE_LABELS", value_delimiter = ',')]
    node_labels: Vec<String>,
    /// Unix socket the CNI plugin calls (mode 0600).
    #[arg(long, env = "TABBY_CNI_SOCKET", default_value = "/run/tabby/cni.sock")]
    cni_socket: PathBuf,
    /// Pod MTU when the network config does not set one.
    #[arg(long, env = "TABBY_MTU", default_value_t = 1500)]
    mtu: u32,
    /// Mean period of the full reconcile (dump, plan, apply; each period
    /// jittered by ±20%). Deltas, hand changes, link changes and address
    /// removals the route monitor reports are acted on at once; this
    /// catches what it cannot see.
    #[arg(long, env = "TABBY_RESYNC_INTERVAL", default_value = "90s", value_parser = parse_duration)]
    resync_interval: Duration,
    /// Mean period of comparing the `tabby` nftables tables with what was
    /// written, when nftables reported no change to them (jittered ±20%).
    #[arg(long, env = "TABBY_NFT_VERIFY_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    nft_verify_interval: Duration,
    /// Log format.
    #[arg(long, env = "TABBY_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "TABBY_LOG", default_value = "info")]
    log: String,
    /// This node's client certificate (PEM), naming tabby://node/<node-name>.
    #[arg(long, env = "TABBY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "TABBY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) the controller's certificate must chain to.
    #[arg(long, env = "TABBY_CONTROLLER_CA")]
    controller_ca: Option<PathBuf>,
    /// The name the controller's certificate must carry; default: the host
    /// of --controller.
    #[arg(long, env = "TABBY_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// How often the TLS files are checked for changes; new connections use
    /// changed files without a restart.
    #[arg(long, env = "TABBY_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    tls_reload_interval: Duration,
    /// Talk to the controller in plaintext, naming this node in a header.
    /// Development only; logs a warning.
    #[arg(long, env = "TABBY_INSECURE")]
    insecure: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "TABBY_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Uids besides root that may call the CNI socket (comma-separated).
    #[arg(long, env = "TABBY_CNI_ALLOWED_UIDS", value_delimiter = ',')]
    cni_allowed_uids: Vec<u32>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Install the `tabby` plugin and its conflist into the host's CNI
    /// directories (a DaemonSet's init container). Each file is written
    /// beside its destination and renamed over it.
    InstallCni {
        /// The plugin binary to install.
        #[arg(long, default_value = "/opt/tabby/bin/tabby")]
        plugin: PathBuf,
        /// The conflist to install (its file name is kept).
        #[arg(long, default_value = "/opt/tabby/10-tabby.conflist")]
        conflist: PathBuf,
        /// The host's CNI binary directory, as mounted.
        #[arg(long, default_value = "/host/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// The host's CNI config directory, as mounted.
        #[arg(long, default_value = "/host/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
    },
    /// Exit 0 when the node client on the socket is ready (registered and
    /// watching intent), 1 otherwise: a readiness probe.
    Ready {
        /// The node client's CNI socket.
        #[arg(long, env = "TABBY_CNI_SOCKET", default_value = "/run/tabby/cni.sock")]
        cni_socket: PathBuf,
    },
}

/// `tabby-node ready`: asks the node's own socket for its Status.
async fn ready(socket: PathBuf) -> anyhow::Result<()> {
    use tabby_proto::v1::{pod_network_client::PodNetworkClient, PodStatusRequest};
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .context("connecting to the CNI socket")?;
    let st = PodNetworkClient::new(ch)
        .status(PodStatusRequest {})
        .await
        .context("Status")?
        .into_inner();
    if st.ready {
        println!("ready (intent revision {})", st.revision);
        Ok(())
    } else {
        anyhow::bail!("not ready: {}", st.reason)
    }
}

/// How to reach the controller, from the flags: mutual TLS unless --insecure.
fn transport(a: &Args, controller: &str, node_name: &str) -> anyhow::Result<Transport> {
    use tabby_tls::{material::Files, ClientMaterial, Connector, Identity, Reloading};
    match (&a.tls_cert, &a.tls_key, &a.controller_ca, a.insecure) {
        (None, None, None, true) => {
            tracing::warn!("--insecure: talking to the controller in plaintext; the node's name is only a header");
            Ok(Transport::Plaintext)
        }
        (Some(cert), Some(key), Some(ca), false) => {
            // A certificate for another node would be refused on every
            // call: say so at start instead.
            let want = Identity::Node(node_name.to_string());
            let have = tabby_tls::material::identity_of(cert)?;
            if have.as_ref() != Some(&want) {
                anyhow::bail!(
                    "--tls-cert {} names {}, but this node is {want}",
                    cert.display(),
                    have.map_or("no tabby identity".to_string(), |i| i.to_string())
                );
            }
            let files = Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            };
            let tls = Reloading::start(ClientMaterial(files), a.tls_reload_interval)
                .context("loading --tls-cert, --tls-key and --controller-ca")?;
            // Without --tls-server-name each replica is verified against
            // its own address's host (Controller::new).
            let first = &controller_addresses(controller)?[0];
            let name = match &a.tls_server_name {
                Some(n) => n.clone(),
                None => controller_host(first)?,
            };
            Ok(Transport::Tls {
                connector: Connector::new(tls, &name, Duration::from_secs(2))?,
                server_name: a.tls_server_name.clone(),
            })
        }
        (_, _, _, true) => anyhow::bail!("--insecure cannot be combined with --tls-cert, --tls-key or --controller-ca"),
        _ => anyhow::bail!(
            "reaching the controller needs --tls-cert, --tls-key and --controller-ca (tabby-controller certs node ...), or --insecure"
        ),
    }
}

struct ProcSysctl;

impl Sysctl for ProcSysctl {
    fn set(&mut self, path: &str, value: &str) -> tabby_node::Result<()> {
        netlink::set_sysctl(path, value)
    }
}

fn labels(v: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    v.iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("--node-label {s:?}: want key=value"))
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    match a.command.take() {
        Some(Command::InstallCni {
            plugin,
            conflist,
            cni_bin_dir,
            cni_conf_dir,
        }) => {
            let (p, c) = tabby_node::install::install(&tabby_node::install::Install {
                plugin,
                conflist,
                bin_dir: cni_bin_dir,
                conf_dir: cni_conf_dir,
            })?;
            println!("installed {} and {}", p.display(), c.display());
            return Ok(());
        }
        Some(Command::Ready { cni_socket }) => return ready(cni_socket).await,
        None => {}
    }
    // Required unless a subcommand was given (clap checked).
    let (Some(controller), Some(node_name)) = (a.controller.clone(), a.node_name.clone()) else {
        anyhow::bail!("--controller and --node-name are required");
    };
    tabby_runtime::init_logging(&a.log, a.log_format).context("--log")?;
    tabby_proto::limits::check_mtu(a.mtu).map_err(|e| anyhow::anyhow!("--mtu: {e}"))?;
    let addrs = if a.node_ip.is_empty() {
        detect::node_addresses().context("autodetecting --node-ip")?
    } else {
        a.node_ip
            .iter()
            .map(|s| detect::with_prefix(s))
            .collect::<Result<Vec<_>, _>>()
            .context("--node-ip")?
    };
    let node = daemon::node_record(&node_name, &addrs, &labels(&a.node_labels)?);
    let transport = transport(&a, &controller, &node_name)?;
    let ctl = Controller::new(&controller, &node_name, &transport)?;
    let st = Arc::new(Mutex::new(NodeStatus::default()));
    let resume = SharedResume::default();
    let stop = Arc::new(AtomicBool::new(false));
    tracing::info!(node = %node_name, addresses = ?addrs, controller = %controller, "tabby-node starting");

    // The reconciler owns intent and kernel programming on its own thread.
    // That thread runs its own single-threaded runtime with the intent watch
    // (over a connection of its own) and the route monitor beside it, so an
    // update wakes one thread, which reads it, applies it and drops the
    // echo of its own change; the CNI socket below never waits for a pass.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let table = netlink::NetlinkRoutes::new().context("opening netlink")?;
    let rec = Reconciler::new(
        node_name.clone(),
        table,
        Box::new(netlink::NetlinkOverlay::new().context("opening netlink")?),
        Box::new(Nft::new()),
        Box::new(ProcSysctl),
        st.clone(),
        resume.clone(),
        Timers {
            resync: a.resync_interval,
            nft_verify: a.nft_verify_interval,
        },
    );
    // The BGP sessions this node holds follow the reconciler's view of the
    // intent (its own destinations, the pools, the BGP generation).
    let (bgp_view_tx, bgp_view_rx) = tokio::sync::watch::channel(Arc::default());
    let mut rec = rec;
    rec.publish_bgp_view(bgp_view_tx);
    let rec_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the reconciler's runtime")?;
    // After every intent snapshot (start, or a controller that could not
    // resume us: perhaps restored from an older copy), the controller is
    // told again which addresses our pods hold.
    let snapshots = Arc::new(tokio::sync::Notify::new());
    // The reconciler's end, however it comes (a panic included), is seen by
    // the server loop below: a node that no longer reconciles must not keep
    // serving pods.
    let (rec_done, mut rec_ended) = tokio::sync::oneshot::channel::<()>();
    let rec_thread = {
        let (addr, name, transport) = (controller.clone(), node_name.clone(), transport.clone());
        let (tx, st, stop, snapshots) = (tx.clone(), st.clone(), stop.clone(), snapshots.clone());
        std::thread::Builder::new()
            .name("reconciler".into())
            .spawn(move || {
                let _done = rec_done;
                rec_rt.block_on(async move {
                    // Created inside this runtime, so that the watch's
                    // connection runs on this thread.
                    match Controller::new(&addr, &name, &transport) {
                        Ok(ctl) => {
                            tokio::spawn(daemon::watch(ctl, node, tx.clone(), resume, st, stop, snapshots));
                        }
                        Err(e) => tracing::error!(error = %e, "intent watch not started"),
                    }
                    // Route changes by others reach the reconciler at once;
                    // its own are dropped here.
                    let echoes = rec.echo_filter();
                    tokio::spawn(async move {
                        let others = |ev| echoes.take(&ev) || tx.send(Event::Route(ev)).is_ok();
                        if let Err(e) = netlink::monitor_routes(others).await {
                            tracing::warn!(error = %e, "route monitor unavailable; relying on the periodic resync");
                        }
                    });
                    rec.run(rx).await;
                });
            })
            .context("starting the reconciler thread")?
    };
    // Changes to our nftables tables are rare (our own writes, or a hand
    // edit): a thread of their own.
    {
        let nft_tx = tx.clone();
        std::thread::Builder::new()
            .name("nft-monitor".into())
            .spawn(move || {
                if let Err(e) = nft_monitor::monitor_nft_tables(move |ev| nft_tx.send(Event::Nft(ev)).is_ok()) {
                    tracing::warn!(error = %e, "nftables monitor unavailable; relying on the periodic check");
                }
            })
            .context("starting the nftables monitor thread")?;
    }
    tokio::spawn(tabby_node::bgp::run(
        ctl.clone(),
        bgp_view_rx,
        tx.clone(),
        st.clone(),
    ));
    let pods = PodNetworkService::new(ctl, st.clone(), a.mtu);
    tokio::spawn(pods.clone().reclaim_after_snapshots(snapshots));

    // The CNI socket.
    if let Some(dir) = a.cni_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&a.cni_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale {}", a.cni_socket.display()))
        }
    }
    let listener = tokio::net::UnixListener::bind(&a.cni_socket)
        .with_context(|| format!("binding {}", a.cni_socket.display()))?;
    std::fs::set_permissions(&a.cni_socket, std::fs::Permissions::from_mode(0o600))?;
    // Reflection, so an operator can ask a node with grpcurl -unix.
    let tabby_runtime::Introspection { health, routes } =
        tabby_runtime::introspection(tabby_proto::FILE_DESCRIPTOR_SET, &["tabby.v1.PodNetwork"])?;
    {
        let st = st.clone();
        tokio::spawn(async move {
            loop {
                let ready = {
                    let s = lock_status(&st);
                    s.registered && s.watching
                };
                if ready {
                    health
                        .set_serving::<PodNetworkServer<PodNetworkService>>()
                        .await;
                } else {
                    health
                        .set_not_serving::<PodNetworkServer<PodNetworkService>>()
                        .await;
                }
                // Serving soon after start; after that a rarer, jittered look
                // (probes come every few seconds) costs an idle node less.
                let ms = if ready { 1500 } else { 100 };
                tokio::time::sleep(Duration::from_millis(ms + fastrand::u64(0..ms))).await;
            }
        });
    }
    if let Some(addr) = &a.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-listen {addr}"))?;
        tracing::info!(addr = %l.local_addr()?, "serving metrics");
        let st = st.clone();
        let render: tabby_runtime::metrics::Render = Arc::new(move || {
            let st = st.clone();
            Box::pin(async move { tabby_node::metrics::metrics().render(&st) })
        });
        tokio::spawn(tabby_runtime::metrics::serve(
            l,
            render,
            std::future::pending(),
        ));
    }
    tracing::info!(socket = %a.cni_socket.display(), "serving the CNI socket");
    let signal = tabby_runtime::shutdown_signal()?;
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tabby_runtime::metrics::GrpcMetricsLayer(
                tabby_node::metrics::metrics().cni.clone(),
            ))
            .layer(PeerCheckLayer::new(a.cni_allowed_uids.clone()))
            .add_routes(routes)
            .add_service(PodNetworkServer::new(pods))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async move {
                    let _ = serving_stopped.await;
                },
            ),
    );
    let rec_failed = tokio::select! {
        () = signal => false,
        _ = &mut rec_ended => true,
    };
    let _ = stop_serving.send(());
    let served = server.await;
    // Routes and NAT stay in place: pods keep working while we are away.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tx.send(Event::Shutdown);
    let joined = rec_thread.join();
    let _ = std::fs::remove_file(&a.cni_socket);
    served.context("CNI socket server task")??;
    if joined.is_err() {
        anyhow::bail!("the reconciler thread panicked");
    }
    if rec_failed {
        anyhow::bail!("the reconciler thread stopped unexpectedly");
    }
    tracing::info!("tabby-node stopped");
    Ok(())
}
