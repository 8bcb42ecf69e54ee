//! Real etcd clusters for tests (issue 16): members of Debian's
//! `etcd-server` (3.4) on loopback, each with its own data directory and
//! free ports, started and stopped by the test itself (by pid). Removed,
//! processes and data, when dropped.
use anyhow::{bail, Context, Result};
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// One member.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A cluster of members on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Fails loudly when etcd is not installed: a test that needs it must not
/// pass without it.
pub fn etcd_bin() -> Result<PathBuf> {
    let p = PathBuf::from("/usr/bin/etcd");
    if !p.exists() {
        bail!("/usr/bin/etcd not found: install Debian etcd-server (scripts/install-deps.sh)");
    }
    Ok(p)
}

/// The flags of one member (`name`, data in `data`) listening on
/// 127.0.0.1 of its namespace at `client` and `peer`, in a new cluster
/// `cluster` (`name=http://127.0.0.1:PEER,...`).
pub fn member_args(name: &str, data: &Path, client: u16, peer: u16, cluster: &str) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client}");
    let peer = format!("http://127.0.0.1:{peer}");
    [
        "--name",
        name,
        "--data-dir",
        &data.display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        "tabby-test",
        // A group commit is one transaction.
        "--max-txn-ops",
        "10000",
        // Loopback: quick elections.
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
        "--log-level",
        "warn",
    ]
    .map(str::to_string)
    .to_vec()
}

/// Waits until a quorum of the cluster at `endpoints` (comma-separated)
/// answers a linearizable read, with etcdctl run in namespace `ns` when
/// given.
pub fn wait_healthy(endpoints: &str, ns: Option<&str>, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        let out = cmd
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                endpoints,
                "--command-timeout=1s",
                "get",
                "health-probe",
            ])
            .output();
        if out.is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!("etcd at {endpoints} did not become healthy in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> Result<EtcdCluster> {
        etcd_bin()?;
        // Ports are picked free and released until etcd binds them: another
        // process (a parallel test's client connections) can take one in
        // between, and that member never starts (seen once in CI). A new
        // set of ports then, said out loud; three failures fail the test.
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(n) {
                Ok(c) => return Ok(c),
                Err(e) if tries < 3 => {
                    eprintln!("etcd cluster did not start (try {tries} of 3), again on other ports: {e:#}")
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_once(n: usize) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new().prefix("tabby-etcd-").tempdir()?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client: free_port()?,
                peer: free_port()?,
                child: None,
            });
        }
        let mut c = EtcdCluster { members, dir };
        for i in 0..n {
            c.start_member(i)?;
        }
        if let Err(e) = c.wait_healthy(Duration::from_secs(20)) {
            // The logs go with the cluster's directory: keep their ends.
            let tails: Vec<String> = c
                .members
                .iter()
                .map(|m| {
                    let log = std::fs::read_to_string(c.dir.path().join(format!("{}.log", m.name)))
                        .unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    let from = lines.len().saturating_sub(5);
                    format!("{}: {}", m.name, lines[from..].join("\n    "))
                })
                .collect();
            return Err(e.context(tails.join("\n")));
        }
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The same, comma-separated (for `--etcd-endpoints`).
    pub fn endpoints_flag(&self) -> String {
        self.endpoints().join(",")
    }

    /// Where the cluster keeps its data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// (Re)starts member `i` on its data directory.
    pub fn start_member(&mut self, i: usize) -> Result<()> {
        let cluster = self.initial_cluster();
        let dir = self.dir.path().to_path_buf();
        let m = &mut self.members[i];
        if m.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", m.name)))?;
        let child = Command::new(etcd_bin()?)
            .args(member_args(
                &m.name,
                &dir.join(&m.name),
                m.client,
                m.peer,
                &cluster,
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        m.child = Some(child);
        Ok(())
    }

    /// Kills member `i` (SIGKILL, by its pid) and reaps it.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until a quorum answers a linearizable read.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        wait_healthy(&self.endpoints_flag(), None, timeout)
            .with_context(|| format!("logs in {}", self.dir.path().display()))
    }

    /// `etcdctl` against the cluster (API v3); its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints_flag()])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}
