//! A kind-like cluster in network namespaces: a fabric namespace with a bridge
//! (the "docker network" 172.18.0.0/16, router 172.18.0.1), node namespaces, an
//! "outside" host beyond the fabric router, the controller on the fabric, a
//! `tabby-node` per node, and pods made by running the real `tabby` CNI plugin.
use crate::{netns, podman, podman::Images};
use anyhow::{anyhow, bail, Context, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The fabric router address: every node's default gateway.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
/// Where the controller listens (on the fabric bridge).
pub const CONTROLLER: &str = "172.18.0.1:5151";
/// The fabric bridge's fixed MAC (locally administered; 172.18.0.1 in hex).
pub const FABRIC_MAC: &str = "02:00:ac:12:00:01";
/// The outside host's address.
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The route reflector's address on the fabric.
pub const RR: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// The top-of-rack router's (BIRD) address on the fabric.
pub const TOR: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 101);
/// The top-of-rack router's AS (eBGP with the cluster's 64512).
pub const TOR_ASN: u32 = 65001;
/// The CNI network name.
pub const NETWORK: &str = "k8s-pod-network";

/// The standard lab's three nodes (kind's names) and their fabric addresses.
pub fn walkthrough_nodes() -> Vec<(String, Ipv4Addr)> {
    vec![
        ("control-plane".into(), Ipv4Addr::new(172, 18, 0, 5)),
        ("worker".into(), Ipv4Addr::new(172, 18, 0, 4)),
        ("worker2".into(), Ipv4Addr::new(172, 18, 0, 3)),
    ]
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Prefix of every namespace name; unique per lab.
    pub prefix: String,
    /// Nodes and their fabric addresses.
    pub nodes: Vec<(String, Ipv4Addr)>,
    /// Bootstrap pool (nat_outgoing on), e.g. "10.244.0.0/16".
    pub pool: String,
    /// Block size of the pool.
    pub block_size: u8,
    /// Directory for logs, sockets and the controller's store.
    pub dir: PathBuf,
    /// Directory holding tabby-controller, tabby-node, tabby and grpcurl.
    pub bin_dir: PathBuf,
    /// grpcurl binary.
    pub grpcurl: PathBuf,
    /// tabby-node resync interval.
    pub resync: String,
    /// Run the controller and the node clients as containers of these images
    /// (podman, runc, the manifests' mounts) instead of as processes.
    pub containers: Option<Images>,
    /// The fabric's shape.
    pub topology: Topology,
    /// Dual stack: IPv6 on the fabric, the nodes and the outside host
    /// (`fd00:18:<rack>::<host>/64`, the outside host `fd00:198:51:100::10`),
    /// and a second pool, [`POOL_V6`] with `nat_outgoing`, so every pod gets
    /// an address of each family.
    pub dual_stack: bool,
    /// High availability (issue 16): a three-member etcd on the fabric's
    /// loopback, two controller replicas on it ([`CONTROLLER`] and
    /// [`CONTROLLER_B`], the first started leads), and node clients given
    /// both addresses. Off: one controller on its embedded store.
    pub ha: bool,
}

/// The second controller replica of an HA lab.
pub const CONTROLLER_B: &str = "172.18.0.1:5152";

/// An HA lab's etcd members: (client, peer) ports on the fabric's loopback.
const ETCD_PORTS: [(u16, u16); 3] = [(2379, 2380), (22379, 22380), (32379, 32380)];

/// The etcd endpoints of an HA lab, in its fabric namespace.
pub fn ha_etcd_endpoints() -> String {
    ETCD_PORTS
        .iter()
        .map(|(c, _)| format!("http://127.0.0.1:{c}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The controller replicas of a lab: (role, address, metrics port).
fn replicas(ha: bool) -> &'static [(&'static str, &'static str, u16)] {
    const ALL: [(&str, &str, u16); 2] = [
        ("controller", CONTROLLER, 9100),
        ("controller-b", CONTROLLER_B, 9102),
    ];
    if ha {
        &ALL
    } else {
        &ALL[..1]
    }
}

/// The IPv6 pool of a dual-stack lab.
pub const POOL_V6: &str = "fd00:10:244::/64";
/// The outside host's IPv6 address.
pub const OUTSIDE_V6: &str = "fd00:198:51:100::10";

/// The IPv6 fabric address of a node whose IPv4 address is `ip`: its rack
/// (the third octet) and host number under `fd00:18::/48`.
pub fn node_ip_v6(ip: Ipv4Addr) -> std::net::Ipv6Addr {
    let o = ip.octets();
    std::net::Ipv6Addr::new(0xfd00, 0x18, u16::from(o[2]), 0, 0, 0, 0, u16::from(o[3]))
}

/// How the nodes are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Topology {
    /// One L2 segment, 172.18.0.0/16 (kind's docker network).
    #[default]
    Flat,
    /// Racks on subnets of their own, joined by the fabric router, which
    /// knows no pod routes: rack k is 172.18.k.0/24 with router 172.18.k.1,
    /// and a node's rack is the third octet of its address.
    Racks,
}

impl Topology {
    /// The node's prefix length and gateway for address `ip`.
    pub fn subnet_of(self, ip: Ipv4Addr) -> (u8, Ipv4Addr) {
        match self {
            Topology::Flat => (16, ROUTER),
            Topology::Racks => {
                let o = ip.octets();
                (24, Ipv4Addr::new(o[0], o[1], o[2], 1))
            }
        }
    }

    /// The fabric bridge of the rack holding `ip`.
    fn bridge_of(self, ip: Ipv4Addr) -> String {
        match self {
            Topology::Flat => "br0".into(),
            Topology::Racks => format!("br{}", ip.octets()[2]),
        }
    }
}

impl LabConfig {
    /// The standard lab (three nodes, pool 10.244.0.0/16 in /26 blocks) with
    /// a unique prefix under `dir`.
    pub fn walkthrough(prefix: &str, dir: PathBuf) -> LabConfig {
        LabConfig {
            prefix: prefix.to_string(),
            nodes: walkthrough_nodes(),
            pool: "10.244.0.0/16".into(),
            block_size: 26,
            dir,
            bin_dir: bin_dir(),
            grpcurl: grpcurl(),
            resync: "1s".into(),
            containers: None,
            topology: Topology::Flat,
            dual_stack: false,
            ha: false,
        }
    }

    /// The walkthrough's lab on two racks: control-plane and worker on rack 0
    /// (172.18.0.0/24), worker2 on rack 1 (172.18.1.0/24).
    pub fn racks(prefix: &str, dir: PathBuf) -> LabConfig {
        LabConfig {
            topology: Topology::Racks,
            nodes: vec![
                ("control-plane".into(), Ipv4Addr::new(172, 18, 0, 5)),
                ("worker".into(), Ipv4Addr::new(172, 18, 0, 4)),
                ("worker2".into(), Ipv4Addr::new(172, 18, 1, 3)),
            ],
            ..LabConfig::walkthrough(prefix, dir)
        }
    }
}

/// Directory of the workspace binaries (TABBY_BIN_DIR, else next to the
/// running test or binary).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TABBY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut d = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if d.ends_with("deps") {
        d.pop();
    }
    d
}

/// grpcurl from `make deps` (TABBY_GRPCURL overrides).
pub fn grpcurl() -> PathBuf {
    std::env::var_os("TABBY_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tools/grpcurl-venv/bin/grpcurl")
        })
}

/// grpcurl's flags for calling the controller of the lab in `dir` as its
/// admin (`tabby://admin/lab`).
pub fn admin_tls_flags(dir: &Path) -> Vec<String> {
    let d = dir.join("certs");
    vec![
        "-cacert".into(),
        d.join("ca.pem").display().to_string(),
        "-cert".into(),
        d.join("admin-lab.pem").display().to_string(),
        "-key".into(),
        d.join("admin-lab-key.pem").display().to_string(),
    ]
}

/// A process the lab started.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ProcInfo {
    /// What it is ("controller", "node:worker").
    pub role: String,
    /// Its pid.
    pub pid: u32,
}

/// A pod the lab made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Node it runs on.
    pub node: String,
    /// Its network namespace.
    pub ns: String,
    /// CNI container id.
    pub container_id: String,
    /// Its address.
    pub ip: IpAddr,
    /// The CNI ADD result.
    pub result: serde_json::Value,
}

/// What `tabby-lab down` needs to remove a lab it did not create in-process.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct LabState {
    /// Namespaces, in creation order.
    pub namespaces: Vec<String>,
    /// Processes.
    pub procs: Vec<ProcInfo>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Lab directory.
    pub dir: PathBuf,
    /// Containers (by name) of a container lab.
    #[serde(default)]
    pub containers: Vec<String>,
    /// The containers.conf those containers run with.
    #[serde(default)]
    pub podman_conf: Option<PathBuf>,
}

/// A running lab. Dropping it removes everything unless [`Lab::persist`] was called.
pub struct Lab {
    /// Its configuration.
    pub cfg: LabConfig,
    state: LabState,
    children: BTreeMap<String, Child>,
    node_ips: BTreeMap<String, Ipv4Addr>,
    persist: bool,
}

impl Lab {
    /// Builds the lab: fabric, outside host, nodes, controller, node clients.
    pub fn up(cfg: LabConfig) -> Result<Lab> {
        netns::require_root();
        for b in ["tabby-controller", "tabby-node", "tabby"] {
            if !cfg.bin_dir.join(b).exists() {
                bail!(
                    "{} not found in {} (build the workspace first)",
                    b,
                    cfg.bin_dir.display()
                );
            }
        }
        if cfg.ha && cfg.containers.is_some() {
            bail!("an HA lab runs its controllers as processes: --ha cannot be combined with --containers");
        }
        fs::create_dir_all(&cfg.dir)?;
        let mut lab = Lab {
            state: LabState {
                dir: cfg.dir.clone(),
                ..Default::default()
            },
            cfg,
            children: BTreeMap::new(),
            node_ips: BTreeMap::new(),
            persist: false,
        };
        lab.make_certs()?;
        lab.build_fabric()?;
        if lab.cfg.ha {
            lab.start_etcd()?;
        }
        lab.start_controller()?;
        for (n, ip) in lab.cfg.nodes.clone() {
            lab.add_node(&n, ip)?;
        }
        for (n, _) in lab.cfg.nodes.clone() {
            if let Err(e) = lab.wait_node_synced(&n, 0, Duration::from_secs(20)) {
                let d = lab.diagnostics(&n);
                bail!("{e:#}\n--- diagnostics ---\n{d}");
            }
        }
        lab.save()?;
        Ok(lab)
    }

    /// The lab's certificates: a CA, the controller's (for its fabric
    /// address), an admin's (`tabby://admin/lab`) and one per node.
    pub fn certs_dir(&self) -> PathBuf {
        self.cfg.dir.join("certs")
    }

    /// Runs `tabby-controller certs <args> --dir <certs_dir>`: the lab makes
    /// its certificates the way an operator does.
    fn certs(&self, args: &[&str]) -> Result<()> {
        let bin = self.cfg.bin_dir.join("tabby-controller");
        let out = Command::new(&bin)
            .arg("certs")
            .args(args)
            .arg("--dir")
            .arg(self.certs_dir())
            .output()
            .with_context(|| format!("running {} certs", bin.display()))?;
        if !out.status.success() {
            bail!(
                "tabby-controller certs {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn make_certs(&self) -> Result<()> {
        if self.certs_dir().join("ca.pem").exists() {
            return Ok(());
        }
        let host = CONTROLLER.split(':').next().unwrap_or_default();
        self.certs(&["init"])?;
        self.certs(&["server", "--san", host])?;
        self.certs(&["admin", "lab"])
    }

    /// grpcurl's flags for calling the controller as the lab's admin.
    pub fn admin_tls_flags(&self) -> Vec<String> {
        admin_tls_flags(&self.cfg.dir)
    }

    /// Name of the fabric namespace.
    pub fn fabric(&self) -> String {
        format!("{}-fabric", self.cfg.prefix)
    }
    /// Name of the outside host's namespace.
    pub fn outside(&self) -> String {
        format!("{}-outside", self.cfg.prefix)
    }
    /// Name of a node's namespace.
    pub fn node_ns(&self, node: &str) -> String {
        format!("{}-{}", self.cfg.prefix, node)
    }
    /// A node's fabric address.
    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.node_ips[node]
    }
    /// The node's CNI socket.
    pub fn socket(&self, node: &str) -> PathBuf {
        if self.cfg.containers.is_some() {
            // The host side of the DaemonSet's /run/tabby.
            return self.node_dir(node).join("run-tabby/cni.sock");
        }
        self.cfg.dir.join(format!("{node}.sock"))
    }
    /// A node client's log file.
    pub fn node_log(&self, node: &str) -> PathBuf {
        self.cfg.dir.join(format!("{node}.log"))
    }
    /// Pods made so far.
    pub fn pods(&self) -> &[Pod] {
        &self.state.pods
    }
    /// A pod by name.
    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.state
            .pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("no pod {name}"))
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        netns::add(ns)?;
        self.state.namespaces.push(ns.to_string());
        Ok(())
    }

    fn build_fabric(&mut self) -> Result<()> {
        let f = self.fabric();
        let o = self.outside();
        self.add_ns(&f)?;
        // A bridge without a set address takes the lowest MAC of its ports, so
        // a node joining could change it under the others' ARP caches: frames
        // to the old MAC that enter through another port are dropped as
        // PACKET_OTHERHOST and the controller is unreachable until ARP
        // re-resolves (tens of seconds; seen as a lab-up flake in CI).
        netns::ip(
            &f,
            &format!("link add br0 address {FABRIC_MAC} type bridge"),
        )?;
        let (len, _) = self.cfg.topology.subnet_of(ROUTER);
        netns::ip(&f, &format!("addr add {ROUTER}/{len} dev br0"))?;
        netns::ip(&f, "link set br0 up")?;
        // Racks: one more bridge (and subnet) per rack, routed by the fabric.
        let racks: BTreeSet<u8> = self
            .cfg
            .nodes
            .iter()
            .map(|(_, ip)| ip.octets()[2])
            .collect();
        if self.cfg.dual_stack {
            netns::exec(&f, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            netns::ip(&f, "addr add fd00:18::1/64 dev br0 nodad")?;
        }
        if self.cfg.topology == Topology::Racks {
            for k in racks.into_iter().filter(|k| *k != 0) {
                let br = format!("br{k}");
                // Fixed MACs for the reason above.
                netns::ip(
                    &f,
                    &format!("link add {br} address 02:00:ac:12:{k:02x}:01 type bridge"),
                )?;
                netns::ip(&f, &format!("addr add 172.18.{k}.1/24 dev {br}"))?;
                if self.cfg.dual_stack {
                    netns::ip(&f, &format!("addr add fd00:18:{k:x}::1/64 dev {br} nodad"))?;
                }
                netns::ip(&f, &format!("link set {br} up"))?;
            }
        }
        netns::exec(&f, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // The outside host: reachable through the fabric router, with a route
        // back to node addresses only (pod addresses must be masqueraded).
        self.add_ns(&o)?;
        netns::ip(
            &f,
            &format!("link add out0 type veth peer name eth0 netns {o}"),
        )?;
        netns::ip(&f, "addr add 198.51.100.1/24 dev out0")?;
        netns::ip(&f, "link set out0 up")?;
        netns::ip(&o, &format!("addr add {OUTSIDE}/24 dev eth0"))?;
        netns::ip(&o, "link set eth0 up")?;
        netns::ip(&o, "route add 172.18.0.0/16 via 198.51.100.1")?;
        if self.cfg.dual_stack {
            netns::ip(&f, "addr add fd00:198:51:100::1/64 dev out0 nodad")?;
            netns::ip(&o, &format!("addr add {OUTSIDE_V6}/64 dev eth0 nodad"))?;
            // Back to node addresses only, as for IPv4.
            netns::ip(&o, "-6 route add fd00:18::/48 via fd00:198:51:100::1")?;
        }
        Ok(())
    }

    /// A node's directory in a container lab: its host paths for the
    /// DaemonSet's hostPath volumes (`opt-cni-bin`, `etc-cni-net.d`,
    /// `run-tabby`) and the plugin's log directory.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.cfg.dir.join("nodes").join(node)
    }

    fn container_name(&self, role: &str) -> String {
        format!("{}-{}", self.cfg.prefix, role.replace(':', "-"))
    }

    /// Starts a container of `image` in namespace `ns` (podman run in the
    /// foreground, so the child is the container's lifetime): `opts` are
    /// podman's options, `args` the entrypoint's.
    fn spawn_container(
        &mut self,
        role: &str,
        ns: &str,
        image: &str,
        opts: &[String],
        args: &[String],
        log: &Path,
    ) -> Result<()> {
        let conf = self.podman_conf()?;
        let name = self.container_name(role);
        // A container of this name left by a lab that crashed.
        podman::remove(&conf, std::slice::from_ref(&name));
        if !self.state.containers.contains(&name) {
            self.state.containers.push(name.clone());
        }
        self.state.podman_conf = Some(conf.clone());
        self.save()?;
        let logf = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let network = format!("ns:{}", netns::path(ns).display());
        let child = podman::command(&conf)
            .args(["run", "--rm", "--name", &name, "--network", &network])
            // The container writes straight to the log file, no relay.
            .args(["--log-driver", "passthrough"])
            .args(opts)
            .arg(image)
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting container {name}"))?;
        self.track(role, child);
        Ok(())
    }

    /// Keeps a started process under its role (replacing an earlier one's
    /// record), for signals and teardown.
    fn track(&mut self, role: &str, child: Child) {
        self.state.procs.retain(|p| p.role != role);
        self.state.procs.push(ProcInfo {
            role: role.into(),
            pid: child.id(),
        });
        self.children.insert(role.to_string(), child);
    }

    fn podman_conf(&self) -> Result<PathBuf> {
        self.cfg
            .containers
            .as_ref()
            .map(|i| i.containers_conf.clone())
            .ok_or_else(|| anyhow!("not a container lab"))
    }

    /// A Secret volume's directory: `files` (name in the Secret, file in
    /// the lab's certificates) copied in, readable by `uid` only as keys are.
    fn secret_dir(&self, name: &str, files: &[(String, String)], uid: u32) -> Result<PathBuf> {
        use std::os::unix::fs::{chown, PermissionsExt};
        let d = self.cfg.dir.join("secrets").join(name);
        fs::create_dir_all(&d)?;
        for (key, src) in files {
            let to = d.join(key);
            fs::copy(self.certs_dir().join(src), &to)
                .with_context(|| format!("copying {src} into secret {name}"))?;
            chown(&to, Some(uid), Some(uid))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(0o400))?;
        }
        Ok(d)
    }

    fn start_controller_container(&mut self, images: &Images) -> Result<()> {
        use std::os::unix::fs::chown;
        // The Deployment's pod security: uid 65532, read-only root, no
        // capabilities; the PersistentVolumeClaim is a directory it owns.
        const UID: u32 = 65532;
        let data = self.cfg.dir.join("controller-data");
        fs::create_dir_all(&data)?;
        chown(&data, Some(UID), Some(UID))?;
        let tls = self.secret_dir(
            "controller",
            &[
                ("tls.crt".into(), "server.pem".into()),
                ("tls.key".into(), "server-key.pem".into()),
                ("ca.crt".into(), "ca.pem".into()),
            ],
            UID,
        )?;
        let host = CONTROLLER.split(':').next().unwrap_or_default();
        let env = [
            format!("TABBY_LISTEN={CONTROLLER}"),
            "TABBY_DATA_DIR=/var/lib/tabby".into(),
            format!("TABBY_HEALTH_LISTEN={host}:5152"),
            "TABBY_METRICS_LISTEN=127.0.0.1:9100".into(),
            "TABBY_TLS_CERT=/etc/tabby/tls/tls.crt".into(),
            "TABBY_TLS_KEY=/etc/tabby/tls/tls.key".into(),
            "TABBY_CLIENT_CA=/etc/tabby/tls/ca.crt".into(),
            format!("TABBY_BOOTSTRAP_POOL={}", self.cfg.pool),
            format!("TABBY_BOOTSTRAP_BLOCK_SIZE={}", self.cfg.block_size),
            "TABBY_BOOTSTRAP_NAT_OUTGOING=true".into(),
        ];
        let mut opts: Vec<String> = vec![
            "--user".into(),
            format!("{UID}:{UID}"),
            "--read-only".into(),
            "--cap-drop".into(),
            "all".into(),
            "--security-opt".into(),
            "no-new-privileges".into(),
            "-v".into(),
            format!("{}:/var/lib/tabby", data.display()),
            "-v".into(),
            format!("{}:/etc/tabby/tls:ro", tls.display()),
        ];
        for e in env {
            opts.push("-e".into());
            opts.push(e);
        }
        let log = self.cfg.dir.join("controller.log");
        let f = self.fabric();
        self.spawn_container("controller", &f, &images.controller, &opts, &[], &log)
    }

    /// The DaemonSet's init container: `tabby-node install-cni` from the node
    /// image into the node's CNI directories (root, no capabilities, no
    /// network, read-only root).
    fn install_cni(&mut self, node: &str, images: &Images) -> Result<()> {
        let d = self.node_dir(node);
        let (bin, conf) = (d.join("opt-cni-bin"), d.join("etc-cni-net.d"));
        fs::create_dir_all(&bin)?;
        fs::create_dir_all(&conf)?;
        podman::podman(
            &images.containers_conf,
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "--read-only",
                "--cap-drop",
                "all",
                "--user",
                "0:0",
                "-v",
                &format!("{}:/host/opt/cni/bin", bin.display()),
                "-v",
                &format!("{}:/host/etc/cni/net.d", conf.display()),
                &images.node,
                "install-cni",
                "--cni-bin-dir",
                "/host/opt/cni/bin",
                "--cni-conf-dir",
                "/host/etc/cni/net.d",
            ],
        )
        .with_context(|| format!("install-cni on {node}"))?;
        Ok(())
    }

    fn start_node_container(&mut self, node: &str, images: &Images) -> Result<()> {
        let d = self.node_dir(node);
        if !d.join("opt-cni-bin/tabby").exists() {
            self.install_cni(node, images)?;
        }
        let run = d.join("run-tabby");
        fs::create_dir_all(&run)?;
        fs::create_dir_all(d.join("var-log-tabby"))?;
        // One Secret for every node, as make-secrets.sh makes it.
        let tls = self.secret_dir(
            "node",
            &[
                (format!("{node}.crt"), format!("node-{node}.pem")),
                (format!("{node}.key"), format!("node-{node}-key.pem")),
                ("ca.crt".into(), "ca.pem".into()),
            ],
            0,
        )?;
        let env = [
            format!("NODE_NAME={node}"),
            format!("TABBY_CONTROLLER={CONTROLLER}"),
            format!("TABBY_TLS_CERT=/etc/tabby/tls/{node}.crt"),
            format!("TABBY_TLS_KEY=/etc/tabby/tls/{node}.key"),
            "TABBY_CONTROLLER_CA=/etc/tabby/tls/ca.crt".into(),
            "TABBY_CNI_SOCKET=/run/tabby/cni.sock".into(),
            "TABBY_METRICS_LISTEN=0.0.0.0:9101".into(),
            format!("TABBY_RESYNC_INTERVAL={}", self.cfg.resync),
        ];
        let netns_dir = "/run/netns";
        let mut opts: Vec<String> = vec![
            // The DaemonSet's securityContext (see deploy/20-node.yaml).
            "--privileged".into(),
            "--read-only".into(),
            "-v".into(),
            format!("{}:/run/tabby", run.display()),
            // HostToContainer: pods' namespaces made after the start appear.
            "-v".into(),
            format!("{netns_dir}:/run/netns:rslave"),
            "-v".into(),
            format!("{netns_dir}:/var/run/netns:rslave"),
            "-v".into(),
            format!("{}:/etc/tabby/tls:ro", tls.display()),
        ];
        for e in env {
            opts.push("-e".into());
            opts.push(e);
        }
        let ns = self.node_ns(node);
        let log = self.node_log(node);
        self.spawn_container(&format!("node:{node}"), &ns, &images.node, &opts, &[], &log)
    }

    fn spawn(
        &mut self,
        role: &str,
        ns: &str,
        bin: &str,
        args: &[String],
        log: &Path,
    ) -> Result<()> {
        let logf = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(self.cfg.bin_dir.join(bin))
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            // Own process group: a Ctrl-C on `make lab` does not reach the daemons.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        self.track(role, child);
        Ok(())
    }

    /// The etcd endpoints of an HA lab (on the fabric's loopback).
    pub fn etcd_endpoints(&self) -> String {
        ha_etcd_endpoints()
    }

    /// Starts an HA lab's three etcd members in the fabric namespace, as
    /// processes of the lab (roles `etcd-0`..`etcd-2`).
    fn start_etcd(&mut self) -> Result<()> {
        let bin = crate::etcd::etcd_bin()?;
        let cluster = ETCD_PORTS
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let f = self.fabric();
        for (i, (client, peer)) in ETCD_PORTS.into_iter().enumerate() {
            let name = format!("m{i}");
            let data = self.cfg.dir.join(format!("etcd-{i}"));
            let log = self.cfg.dir.join(format!("etcd-{i}.log"));
            let logf = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let child = Command::new("ip")
                .args(["netns", "exec", &f])
                .arg(&bin)
                .args(crate::etcd::member_args(
                    &name, &data, client, peer, &cluster,
                ))
                .stdin(Stdio::null())
                .stdout(logf.try_clone()?)
                .stderr(logf)
                .process_group(0)
                .spawn()
                .context("starting etcd")?;
            self.track(&format!("etcd-{i}"), child);
        }
        self.save()?;
        crate::etcd::wait_healthy(&self.etcd_endpoints(), Some(&f), Duration::from_secs(20))
    }

    /// The address of a controller replica's role (`controller`,
    /// `controller-b`).
    pub fn controller_addr(&self, role: &str) -> Result<&'static str> {
        replicas(self.cfg.ha)
            .iter()
            .find(|r| r.0 == role)
            .map(|r| r.1)
            .ok_or_else(|| anyhow!("no controller replica {role:?} in this lab"))
    }

    /// A replica's log file.
    pub fn controller_log(&self, role: &str) -> PathBuf {
        self.cfg.dir.join(format!("{role}.log"))
    }

    /// The role of the replica that serves (its health says SERVING for
    /// NodeAgent), if one does.
    pub fn leader(&self) -> Option<&'static str> {
        replicas(self.cfg.ha).iter().map(|r| r.0).find(|role| {
            let Ok(addr) = self.controller_addr(role) else {
                return false;
            };
            self.grpcurl_at(
                addr,
                self.admin_tls_flags(),
                &[
                    "-d",
                    r#"{"service":"tabby.v1.NodeAgent"}"#,
                    "grpc.health.v1.Health/Check",
                ],
            )
            .is_ok_and(|o| o.contains("\"SERVING\""))
        })
    }

    /// Starts (or restarts) the controller on the fabric; in an HA lab,
    /// every replica not running, the first to start leading.
    pub fn start_controller(&mut self) -> Result<()> {
        for &(role, addr, metrics) in replicas(self.cfg.ha) {
            if self.children.contains_key(role) {
                continue;
            }
            self.start_replica(role, addr, metrics)?;
        }
        let first = !self.cfg.dir.join("pool-v6").exists();
        if first && self.cfg.dual_stack {
            self.grpcurl(&[
                "-d",
                &format!(r#"{{"pool":{{"name":"default-pool-v6","cidr":"{POOL_V6}","nat_outgoing":true}}}}"#),
                "tabby.v1.IpamAdmin/CreatePool",
            ])
            .context("creating the IPv6 pool")?;
            fs::write(self.cfg.dir.join("pool-v6"), POOL_V6)?;
        }
        self.save()
    }

    fn start_replica(&mut self, role: &str, addr: &str, metrics: u16) -> Result<()> {
        let log = self.controller_log(role);
        let mut args = vec![
            "--listen".into(),
            addr.into(),
            "--bootstrap-pool".into(),
            self.cfg.pool.clone(),
            "--bootstrap-block-size".into(),
            self.cfg.block_size.to_string(),
            // Metrics on the fabric's loopback (see Lab::metrics).
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
            "--tls-cert".into(),
            self.certs_dir().join("server.pem").display().to_string(),
            "--tls-key".into(),
            self.certs_dir()
                .join("server-key.pem")
                .display()
                .to_string(),
            "--client-ca".into(),
            self.certs_dir().join("ca.pem").display().to_string(),
        ];
        if self.cfg.ha {
            args.extend([
                "--datastore".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                self.etcd_endpoints(),
                "--advertise".into(),
                addr.into(),
            ]);
        } else {
            args.extend([
                "--data-dir".into(),
                self.cfg.dir.join("controller-data").display().to_string(),
            ]);
        }
        let mark = log_len(&log);
        if let Some(images) = self.cfg.containers.clone() {
            self.start_controller_container(&images)?;
        } else {
            let f = self.fabric();
            self.spawn(role, &f, "tabby-controller", &args, &log)?;
        }
        wait_log(&log, mark, "serving gRPC", Duration::from_secs(20))?;
        if self.cfg.ha && self.leader().is_none() {
            // The first replica: let it win the election before the next
            // starts, so that the lab's leader is known.
            wait_log(&log, mark, "elected: leading", Duration::from_secs(20))?;
            let t = Instant::now();
            while self.leader().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// A node's IPv6 fabric address (dual-stack labs).
    pub fn node_ip6(&self, node: &str) -> std::net::Ipv6Addr {
        node_ip_v6(self.node_ip(node))
    }

    /// Kills a lab process with `sig` and waits for it.
    pub fn signal(&mut self, role: &str, sig: Signal) -> Result<()> {
        let mut c = self
            .children
            .remove(role)
            .ok_or_else(|| anyhow!("{role} is not running"))?;
        // Our own child, not yet reaped: the pid cannot have been reused.
        let pid = child_pid(&c);
        if let Some(images) = &self.cfg.containers {
            // The container's process, not podman's client.
            let name = self.container_name(role);
            let _ = podman::podman(
                &images.containers_conf,
                &["kill", "--signal", sig.as_str(), &name],
            );
        } else {
            let _ = kill(pid, sig);
        }
        // Bounded: a process that ignores the signal fails the caller rather
        // than hanging the test run.
        let deadline = Instant::now() + Duration::from_secs(20);
        let exited = loop {
            if !matches!(c.try_wait(), Ok(None)) {
                break true;
            }
            if Instant::now() > deadline {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = c.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.state.procs.retain(|p| p.role != role);
        self.save()?;
        if !exited {
            bail!("{role} did not exit within 20 s of signal {sig}; killed");
        }
        Ok(())
    }

    /// Stops the controller (SIGKILL: an outage, not a shutdown).
    pub fn kill_controller(&mut self) -> Result<()> {
        self.signal("controller", Signal::SIGKILL)
    }

    /// Adds a node: namespace, fabric link, address, default route, tabby-node.
    pub fn add_node(&mut self, node: &str, ip: Ipv4Addr) -> Result<()> {
        let ns = self.node_ns(node);
        let f = self.fabric();
        self.add_ns(&ns)?;
        let port = format!("v-{}", short(node));
        netns::ip(
            &f,
            &format!("link add {port} type veth peer name eth0 netns {ns}"),
        )?;
        let br = self.cfg.topology.bridge_of(ip);
        let (len, gw) = self.cfg.topology.subnet_of(ip);
        netns::ip(&f, &format!("link set {port} master {br} up"))?;
        netns::ip(&ns, &format!("addr add {ip}/{len} dev eth0"))?;
        netns::ip(&ns, "link set eth0 up")?;
        netns::ip(&ns, &format!("route add default via {gw}"))?;
        if self.cfg.dual_stack {
            let k = ip.octets()[2];
            netns::ip(
                &ns,
                &format!("addr add {}/64 dev eth0 nodad", node_ip_v6(ip)),
            )?;
            netns::ip(&ns, &format!("-6 route add default via fd00:18:{k:x}::1"))?;
        }
        self.node_ips.insert(node.to_string(), ip);
        self.start_node(node)
    }

    /// Starts (or restarts) a node's tabby-node.
    pub fn start_node(&mut self, node: &str) -> Result<()> {
        let ns = self.node_ns(node);
        let d = self.certs_dir();
        if !d.join(format!("node-{node}.pem")).exists() {
            self.certs(&["node", node])?;
        }
        if let Some(images) = self.cfg.containers.clone() {
            self.start_node_container(node, &images)?;
            return self.save();
        }
        let args = vec![
            // On every address of the node's own namespace: the lab's
            // Prometheus scrapes it from the fabric.
            "--metrics-listen".into(),
            "0.0.0.0:9101".into(),
            "--tls-cert".into(),
            d.join(format!("node-{node}.pem")).display().to_string(),
            "--tls-key".into(),
            d.join(format!("node-{node}-key.pem")).display().to_string(),
            "--controller-ca".into(),
            d.join("ca.pem").display().to_string(),
            "--controller".into(),
            replicas(self.cfg.ha)
                .iter()
                .map(|r| r.1)
                .collect::<Vec<_>>()
                .join(","),
            "--node-name".into(),
            node.into(),
            // As a kubelet labels its node; BGP peers select nodes by it.
            "--node-label".into(),
            format!("kubernetes.io/hostname={node}"),
            "--cni-socket".into(),
            self.socket(node).display().to_string(),
            "--resync-interval".into(),
            self.cfg.resync.clone(),
        ];
        let log = self.node_log(node);
        self.spawn(&format!("node:{node}"), &ns, "tabby-node", &args, &log)?;
        self.save()
    }

    /// Waits until a node client has applied its first full sync after log
    /// offset `mark` (0 for a node started once; [`Lab::log_mark`] before a
    /// restart).
    pub fn wait_node_synced(&self, node: &str, mark: u64, timeout: Duration) -> Result<()> {
        wait_log(
            &self.node_log(node),
            mark,
            "first full intent sync",
            timeout,
        )
    }

    /// What a failed wait needs to be understood: which lab processes are
    /// still alive, the controller's last log lines, and the node's view of
    /// the fabric (neighbours, sockets) next to the bridge's.
    pub fn diagnostics(&mut self, node: &str) -> String {
        let mut out = String::new();
        for (role, c) in self.children.iter_mut() {
            let st = match c.try_wait() {
                Ok(None) => "running".to_string(),
                Ok(Some(s)) => format!("exited: {s}"),
                Err(e) => format!("unknown: {e}"),
            };
            out += &format!("{role} (pid {}): {st}\n", c.id());
        }
        let log = self.controller_log_since(0);
        let lines: Vec<&str> = log.lines().collect();
        out += "controller.log (last 30 lines):\n";
        for l in &lines[lines.len().saturating_sub(30)..] {
            out += l;
            out += "\n";
        }
        // A diagnostic that fails still says why.
        let show = |ns: &str, cmd: &str| {
            let o = netns::exec(ns, &["sh", "-c", cmd]).unwrap_or_else(|e| format!("{e:#}\n"));
            format!("[{ns}] {cmd}:\n{o}")
        };
        let ns = self.node_ns(node);
        out += &show(&ns, "ip -br addr; ip route; ip neigh; ss -tni");
        out += &show(
            &self.fabric(),
            "ip -br link; ip neigh; bridge fdb show br br0; ss -tlni; ss -tni",
        );
        out
    }

    /// Controller log length now, for [`Lab::controller_log_since`].
    pub fn controller_log_mark(&self) -> u64 {
        log_len(&self.cfg.dir.join("controller.log"))
    }

    /// What the controller logged after `mark`.
    pub fn controller_log_since(&self, mark: u64) -> String {
        let all = std::fs::read(self.cfg.dir.join("controller.log")).unwrap_or_default();
        let from = (mark as usize).min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }

    /// Log length now, to wait for lines written after it.
    pub fn log_mark(&self, node: &str) -> u64 {
        log_len(&self.node_log(node))
    }

    /// Waits for `needle` in a node's log after `mark`.
    pub fn wait_node_log(
        &self,
        node: &str,
        mark: u64,
        needle: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_log(&self.node_log(node), mark, needle, timeout)
    }

    /// Kills a node's tabby-node with SIGKILL.
    pub fn kill_node(&mut self, node: &str) -> Result<()> {
        self.signal(&format!("node:{node}"), Signal::SIGKILL)
    }

    /// The network config the lab gives the plugin.
    pub fn cni_config(&self, node: &str) -> serde_json::Value {
        if self.cfg.containers.is_some() {
            // What the installer put where the kubelet reads it, as libcni
            // hands it to the plugin: the first plugin of the conflist with
            // the list's name and version.
            let path = self.node_dir(node).join("etc-cni-net.d/10-tabby.conflist");
            let list: serde_json::Value = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let mut conf = list["plugins"][0].clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            return conf;
        }
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "tabby",
            "socket": self.socket(node),
            "mtu": 1500,
            "log_file": self.cfg.dir.join(format!("cni-{node}.log")),
        })
    }

    /// Runs the real `tabby` plugin on `node` exactly as a runtime does.
    /// Returns (exit success, stdout JSON).
    pub fn cni(
        &self,
        node: &str,
        verb: &str,
        container_id: &str,
        netns_path: &str,
        args: &str,
        config: &serde_json::Value,
    ) -> Result<(bool, serde_json::Value)> {
        use std::io::Write;
        let mut cmd = if self.cfg.containers.is_some() {
            self.installed_plugin(node)
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.node_ns(node)])
                .arg(self.cfg.bin_dir.join("tabby"))
                .env("CNI_PATH", &self.cfg.bin_dir);
            c
        };
        let mut child = cmd
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(config.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "plugin printed non-JSON: {text:?}; stderr {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?
        };
        Ok((out.status.success(), v))
    }

    /// The plugin `install-cni` put in the node's CNI bin directory, run in
    /// the node's namespace as the node's kubelet would: in a mount
    /// namespace of its own where the host paths of the DaemonSet's volumes
    /// are at the node's paths (/run/tabby, /var/log/tabby), so the conflist
    /// is used as installed. /run/netns stays visible for `ip netns exec`.
    fn installed_plugin(&self, node: &str) -> Command {
        const SCRIPT: &str = r#"set -e
mkdir -p "$1"
mount --rbind /run/netns "$1"
mount -t tmpfs tabby-lab-run /run
mkdir -p /run/netns /run/tabby
mount --move "$1" /run/netns
mount --bind "$2/run-tabby" /run/tabby
mount -t tmpfs tabby-lab-log /var/log
mkdir -p /var/log/tabby
mount --bind "$2/var-log-tabby" /var/log/tabby
exec ip netns exec "$3" "$2/opt-cni-bin/tabby"
"#;
        let d = self.node_dir(node);
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .arg(d.join("netns-hold"))
        .arg(&d)
        .arg(self.node_ns(node))
        .env("CNI_PATH", d.join("opt-cni-bin"));
        c
    }

    /// The route reflector's namespace ([`Lab::add_route_reflector`]).
    pub fn rr(&self) -> String {
        format!("{}-rr", self.cfg.prefix)
    }

    /// `gobgp` against the lab's route reflector.
    pub fn gobgp(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["gobgp", "-p", "50051"];
        a.extend_from_slice(args);
        netns::exec(&self.rr(), &a)
    }

    /// The walkthrough's external route reflector: GoBGP (AS 64512) at
    /// [`RR`] on the fabric, the controller its client, configured through
    /// `tabby.v1.BgpAdmin` as an operator would.
    pub fn add_route_reflector(&mut self) -> Result<()> {
        let rr = self.rr();
        self.add_router_ns(&rr, "v-rr", RR, false)?;
        let host = CONTROLLER.split(':').next().unwrap_or_default();
        let conf = self.cfg.dir.join("gobgpd.toml");
        // Dual stack: IPv6 unicast over the same (IPv4) session.
        let v6 = if self.cfg.dual_stack {
            r#"  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
"#
        } else {
            ""
        };
        fs::write(
            &conf,
            format!(
                r#"[global.config]
  as = 64512
  router-id = "{RR}"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{host}"
    peer-as = 64512
  [neighbors.route-reflector.config]
    route-reflector-client = true
    route-reflector-cluster-id = "{RR}"
  [neighbors.graceful-restart.config]
    enabled = true
    restart-time = 120
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
{v6}"#
            ),
        )?;
        let args = vec![
            "-f".to_string(),
            conf.display().to_string(),
            "--api-hosts".into(),
            "127.0.0.1:50051".into(),
        ];
        let log = self.cfg.dir.join("gobgpd.log");
        self.spawn("gobgpd", &rr, "/usr/bin/gobgpd", &args, &log)?;
        wait_answer("gobgpd", &log, || {
            self.gobgp(&["global"])
                .unwrap_or_default()
                .contains("64512")
        })?;
        self.peer_with(serde_json::json!({
            "address": RR.to_string(),
            "remote_asn": 64512,
            "hold_time": 9,
        }))
    }

    /// A router's namespace `ns` on the fabric at `ip` (and its IPv6
    /// address in a dual-stack lab when `v6`), its fabric end `port`.
    fn add_router_ns(&mut self, ns: &str, port: &str, ip: Ipv4Addr, v6: bool) -> Result<()> {
        let f = self.fabric();
        self.add_ns(ns)?;
        netns::ip(
            &f,
            &format!("link add {port} type veth peer name eth0 netns {ns}"),
        )?;
        netns::ip(&f, &format!("link set {port} master br0 up"))?;
        let (len, _) = self.cfg.topology.subnet_of(ip);
        netns::ip(ns, &format!("addr add {ip}/{len} dev eth0"))?;
        if v6 && self.cfg.dual_stack {
            netns::ip(
                ns,
                &format!("addr add {}/64 dev eth0 nodad", node_ip_v6(ip)),
            )?;
        }
        netns::ip(ns, "link set eth0 up")?;
        netns::ip(ns, "link set lo up")?;
        Ok(())
    }

    /// Turns BGP on and adds `peer` (a `BgpPeer` as JSON) through
    /// `tabby.v1.BgpAdmin`, as an operator would.
    fn peer_with(&self, peer: serde_json::Value) -> Result<()> {
        self.grpcurl(&[
            "-d",
            r#"{"enabled":true}"#,
            "tabby.v1.BgpAdmin/SetBgpConfig",
        ])?;
        let req = serde_json::json!({ "peer": peer });
        self.grpcurl(&["-d", &req.to_string(), "tabby.v1.BgpAdmin/AddPeer"])?;
        self.save()
    }

    /// The top-of-rack router's namespace ([`Lab::add_tor`]).
    pub fn tor(&self) -> String {
        format!("{}-tor", self.cfg.prefix)
    }

    /// `birdc` against the lab's top-of-rack router.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let sock = self.cfg.dir.join("bird-tor.ctl").display().to_string();
        let mut a = vec!["birdc", "-s", sock.as_str()];
        a.extend_from_slice(args);
        netns::exec(&self.tor(), &a)
    }

    /// BIRD's configuration for [`Lab::add_tor`]: an eBGP session (AS
    /// [`TOR_ASN`]) with each of `nodes`, importing what they advertise and
    /// exporting its static routes `statics` (next hop: itself). In a
    /// dual-stack lab the session also carries IPv6 (MP-BGP over the IPv4
    /// session, IPv6 next hops).
    pub fn tor_conf(&self, nodes: &[&str], statics: &[&str]) -> String {
        let routes = |v4: bool| {
            statics
                .iter()
                .filter(|r| r.contains(':') != v4)
                .map(|r| format!("  route {r} blackhole;\n"))
                .collect::<String>()
        };
        let v6 = if self.cfg.dual_stack {
            format!(
                "protocol static statics6 {{\n  ipv6;\n{}}}\n",
                routes(false)
            )
        } else {
            String::new()
        };
        let v6_channel = if self.cfg.dual_stack {
            format!(
                "  ipv6 {{ import all; export where source = RTS_STATIC; next hop address {}; }};\n",
                node_ip_v6(TOR)
            )
        } else {
            String::new()
        };
        let mut c = format!(
            r#"router id {TOR};
log "{log}" all;
protocol device {{ }}
protocol static statics {{
  ipv4;
{routes4}}}
{v6}template bgp nodes {{
  local {TOR} as {TOR_ASN};
  direct;
  hold time 9;
  ipv4 {{ import all; export where source = RTS_STATIC; }};
{v6_channel}}}
"#,
            log = self.cfg.dir.join("bird-tor.log").display(),
            routes4 = routes(true),
        );
        for n in nodes {
            let ip = self
                .cfg
                .nodes
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, ip)| *ip)
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            c += &format!(
                "protocol bgp {} from nodes {{ neighbor {ip} as 64512; }}\n",
                n.replace('-', "_")
            );
        }
        c
    }

    /// A top-of-rack router on the fabric: BIRD 2 (Debian `bird2`) at
    /// [`TOR`], peering with each of `nodes` itself (Calico's node-specific
    /// BGPPeer), with the static routes `statics` to offer them. tabby's side
    /// is configured through `tabby.v1.BgpAdmin` as an operator would: a peer
    /// with `node_selector` and `import_prefixes`.
    pub fn add_tor(
        &mut self,
        nodes: &[&str],
        statics: &[&str],
        node_selector: &str,
        import_prefixes: &[&str],
    ) -> Result<()> {
        let tor = self.tor();
        self.add_router_ns(&tor, "v-tor", TOR, true)?;
        let conf = self.cfg.dir.join("bird-tor.conf");
        fs::write(&conf, self.tor_conf(nodes, statics))?;
        let args = vec![
            "-f".to_string(),
            "-c".into(),
            conf.display().to_string(),
            "-s".into(),
            self.cfg.dir.join("bird-tor.ctl").display().to_string(),
            "-P".into(),
            self.cfg.dir.join("bird-tor.pid").display().to_string(),
        ];
        let log = self.cfg.dir.join("bird-tor.out");
        self.spawn("bird-tor", &tor, "/usr/sbin/bird", &args, &log)?;
        wait_answer("BIRD", &log, || {
            self.birdc(&["show", "status"])
                .unwrap_or_default()
                .contains("Daemon is up")
        })?;
        self.peer_with(serde_json::json!({
            "address": TOR.to_string(),
            "remote_asn": TOR_ASN,
            "hold_time": 9,
            "node_selector": node_selector,
            "import_prefixes": import_prefixes,
        }))
    }

    /// Gives the top-of-rack router new static routes (`birdc configure`).
    pub fn set_tor_statics(&self, nodes: &[&str], statics: &[&str]) -> Result<()> {
        fs::write(
            self.cfg.dir.join("bird-tor.conf"),
            self.tor_conf(nodes, statics),
        )?;
        let out = self.birdc(&["configure"])?;
        if !out.contains("Reconfigured") && !out.contains("Reconfiguration in progress") {
            bail!("birdc configure: {out}");
        }
        Ok(())
    }

    /// Makes a pod: a namespace plus CNI ADD through the real plugin.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Pod> {
        let ns = format!("{}-p-{}-{}", self.cfg.prefix, short(node), name);
        self.add_ns(&ns)?;
        let container_id = format!("{}{}{}", self.cfg.prefix, short(node), name).replace('-', "");
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}");
        let cfg = self.cni_config(node);
        let (ok, result) = self.cni(
            node,
            "ADD",
            &container_id,
            &netns::path(&ns).display().to_string(),
            &args,
            &cfg,
        )?;
        if !ok {
            bail!("CNI ADD for {name} on {node} failed: {result}");
        }
        let addr = result["ips"][0]["address"]
            .as_str()
            .ok_or_else(|| anyhow!("no ips in {result}"))?;
        let ip: IpAddr = addr.split('/').next().unwrap_or_default().parse()?;
        let pod = Pod {
            name: name.into(),
            node: node.into(),
            ns,
            container_id,
            ip,
            result,
        };
        self.state.pods.push(pod.clone());
        self.save()?;
        Ok(pod)
    }

    /// CNI DEL of a pod (keeps its namespace unless `remove_ns`).
    pub fn del_pod(&mut self, name: &str, remove_ns: bool) -> Result<()> {
        let p = self.pod(name)?.clone();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={}",
            p.name
        );
        let mut cfg = self.cni_config(&p.node);
        cfg["prevResult"] = p.result.clone();
        let (ok, out) = self.cni(
            &p.node,
            "DEL",
            &p.container_id,
            &netns::path(&p.ns).display().to_string(),
            &args,
            &cfg,
        )?;
        if !ok {
            bail!("CNI DEL for {name} failed: {out}");
        }
        self.state.pods.retain(|x| x.name != name);
        if remove_ns {
            netns::del(&p.ns);
            self.state.namespaces.retain(|n| *n != p.ns);
        }
        self.save()
    }

    /// The Prometheus text of the controller (`None`) or of a node's
    /// tabby-node, fetched from inside its namespace.
    pub fn metrics(&self, node: Option<&str>) -> Result<String> {
        let (ns, port) = match node {
            None => (self.fabric(), 9100),
            Some(n) => (self.node_ns(n), 9101),
        };
        let py = format!(
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
        );
        netns::exec(&ns, &["python3", "-c", &py])
    }

    /// Runs grpcurl against the controller from inside the fabric as the
    /// lab's admin.
    pub fn grpcurl(&self, args: &[&str]) -> Result<String> {
        self.grpcurl_with(self.admin_tls_flags(), args)
    }

    /// Runs grpcurl against the controller from inside the fabric as node
    /// `node` (its certificate, issued if the lab has none for it yet).
    pub fn grpcurl_as(&self, node: &str, args: &[&str]) -> Result<String> {
        let d = self.certs_dir();
        if !d.join(format!("node-{node}.pem")).exists() {
            self.certs(&["node", node])?;
        }
        let tls = vec![
            "-cacert".into(),
            d.join("ca.pem").display().to_string(),
            "-cert".into(),
            d.join(format!("node-{node}.pem")).display().to_string(),
            "-key".into(),
            d.join(format!("node-{node}-key.pem")).display().to_string(),
        ];
        self.grpcurl_with(tls, args)
    }

    /// Against the leader: in an HA lab, a replica that is out of reach
    /// or a standby is passed over for the next.
    fn grpcurl_with(&self, tls: Vec<String>, args: &[&str]) -> Result<String> {
        let mut last = None;
        for &(_, addr, _) in replicas(self.cfg.ha) {
            match self.grpcurl_at(addr, tls.clone(), args) {
                Err(e)
                    if self.cfg.ha
                        && ["standby", "connection refused", "Failed to dial"]
                            .iter()
                            .any(|m| format!("{e:#}").contains(m)) =>
                {
                    last = Some(e);
                }
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no controller replica")))
    }

    /// grpcurl against the controller replica at `addr`.
    pub fn grpcurl_at(&self, addr: &str, tls: Vec<String>, args: &[&str]) -> Result<String> {
        let g = self.cfg.grpcurl.display().to_string();
        let mut cmd = vec![g.as_str()];
        cmd.extend(tls.iter().map(String::as_str));
        let last = args.len().saturating_sub(1);
        cmd.extend_from_slice(&args[..last]);
        cmd.push(addr);
        cmd.extend_from_slice(&args[last..]);
        netns::exec(&self.fabric(), &cmd)
    }

    /// Polls `f` until it returns true or `timeout` passes.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> bool,
    ) -> Result<Duration> {
        let t = Instant::now();
        loop {
            if f() {
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Keeps the lab after this value is dropped (for `make lab`).
    pub fn persist(mut self) -> Result<()> {
        self.save()?;
        self.persist = true;
        // Children keep running; forget the handles without killing.
        self.children.clear();
        Ok(())
    }

    fn save(&self) -> Result<()> {
        let s = serde_json::to_string_pretty(&self.state)?;
        fs::write(self.cfg.dir.join("state.json"), s)?;
        Ok(())
    }

    /// Removes every process, namespace and file of the lab.
    pub fn teardown(&mut self) {
        // Containers first: their podman clients then exit on their own.
        if let Some(conf) = &self.state.podman_conf {
            podman::remove(conf, &self.state.containers);
        }
        for (_, mut c) in std::mem::take(&mut self.children) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Those pids are reaped now and may already belong to another lab's
        // processes: never signal them again.
        self.state.procs.clear();
        teardown_state(&self.state);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.persist {
            self.teardown();
        }
    }
}

/// A child's pid for kill(2) (pid_max is at most 2^22, so it fits).
fn child_pid(c: &Child) -> Pid {
    Pid::from_raw(c.id() as i32)
}

/// Removes what a saved lab state lists: processes (only if the pid still
/// runs one of our binaries), namespaces (pods first), and the lab directory.
pub fn teardown_state(s: &LabState) {
    if let Some(conf) = &s.podman_conf {
        podman::remove(conf, &s.containers);
    }
    for p in &s.procs {
        let cmdline = fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmdline);
        // The route reflector's cmdline names no tabby path when the lab
        // directory does not.
        if cmd.contains("tabby")
            || (p.role == "gobgpd" && cmd.contains("gobgpd"))
            || (p.role == "bird-tor" && cmd.contains("bird"))
            || (p.role.starts_with("etcd-") && cmd.contains("etcd"))
        {
            // A pid we started (checked by its cmdline).
            if let Ok(pid) = i32::try_from(p.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{}", p.pid)).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    for ns in s.namespaces.iter().rev() {
        netns::del(ns);
    }
    if !s.dir.as_os_str().is_empty() {
        let _ = fs::remove_dir_all(&s.dir);
    }
}

/// Waits up to 10 s until `up` says daemon `what` answers (its log: `log`).
fn wait_answer(what: &str, log: &Path, up: impl Fn() -> bool) -> Result<()> {
    let t = Instant::now();
    while !up() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{what} did not answer; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn short(node: &str) -> String {
    match node {
        "control-plane" => "cp".into(),
        n => n.chars().filter(|c| c.is_ascii_alphanumeric()).collect(),
    }
}

fn log_len(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn wait_log(p: &Path, from: u64, needle: &str, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let s = fs::read(p).unwrap_or_default();
        let tail = String::from_utf8_lossy(s.get(from as usize..).unwrap_or(&[]));
        if tail.contains(needle) {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!(
                "timed out waiting for {needle:?} in {}:\n{}",
                p.display(),
                tail
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
