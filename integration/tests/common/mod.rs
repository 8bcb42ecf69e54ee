//! Shared helpers of the end-to-end tests: each test gets its own lab with a
//! unique namespace prefix, removed even when the test fails.
#![allow(dead_code)]
use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};
use tabby_integration::{
    echo,
    lab::{Lab, LabConfig, Pod},
    netns,
};

static N: AtomicU32 = AtomicU32::new(0);

/// The three-node lab with a unique prefix; `tweak` adjusts the config.
pub fn lab_with(tweak: impl FnOnce(&mut LabConfig)) -> (Lab, tempfile::TempDir) {
    netns::require_root();
    let dir = tempfile::Builder::new()
        .prefix("tabby-lab-")
        .tempdir_in("/tmp")
        .unwrap();
    let prefix = format!(
        "te{}x{}",
        std::process::id() % 100000,
        N.fetch_add(1, Ordering::Relaxed)
    );
    let mut cfg = LabConfig::walkthrough(&prefix, dir.path().join("lab"));
    tweak(&mut cfg);
    let lab = Lab::up(cfg).expect("lab up");
    (lab, dir)
}

/// The three-node lab.
pub fn lab() -> (Lab, tempfile::TempDir) {
    lab_with(|_| {})
}

/// Runs a shell command in a namespace and returns stdout+stderr.
pub fn sh(ns: &str, cmd: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `ip route show proto 77` lines of a node, sorted.
pub fn tabby_routes(lab: &Lab, node: &str) -> Vec<String> {
    let mut v: Vec<String> = sh(
        &lab.node_ns(node),
        "ip route show proto 77; ip -6 route show proto 77",
    )
    .lines()
    .map(|l| l.trim().to_string())
    .filter(|l| !l.is_empty())
    .collect();
    v.sort();
    v
}

/// Ping from a pod; true when every echo came back.
pub fn ping(from: &Pod, to: IpAddr, count: u32) -> bool {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &from.ns,
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            &to.to_string(),
        ])
        .output()
        .unwrap();
    out.status.success()
}

/// Address the server in `server_ns` saw when `client_ns` connected to `addr`.
pub fn seen_source(server_ns: &str, client_ns: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let server = netns::spawn_within(server_ns, move || {
        let l = std::net::TcpListener::bind(addr)?;
        echo::serve(l, Some(1))
    })?;
    std::thread::sleep(Duration::from_millis(100));
    let seen = netns::within(client_ns, move || echo::ask(addr))?;
    if seen.is_err() {
        // Unblock the server so its thread ends.
        let _ = netns::within(server_ns, move || echo::ask(addr));
    }
    let _ = server.join();
    seen
}

/// Block CIDRs affine to each node, from the controller.
pub fn blocks(lab: &Lab) -> Vec<(String, String)> {
    let out = lab
        .grpcurl(&[
            "-d",
            "{\"show_blocks\":true}",
            "tabby.v1.IpamAdmin/ShowIpam",
        ])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["blocks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["cidr"].as_str().unwrap_or("").to_string(),
                b["affinity"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A network namespace a test made itself (outside [`Lab::add_pod`]),
/// removed when dropped, even when the test fails.
pub struct TestNs {
    /// Its name.
    pub name: String,
}

impl TestNs {
    /// Creates `<lab prefix>-t-<suffix>` with `lo` up.
    pub fn new(lab: &Lab, suffix: &str) -> TestNs {
        let name = format!("{}-t-{suffix}", lab.cfg.prefix);
        netns::add(&name).unwrap();
        TestNs { name }
    }

    /// Its path, as a runtime passes it in CNI_NETNS.
    pub fn path(&self) -> String {
        netns::path(&self.name).display().to_string()
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        netns::del(&self.name);
    }
}

/// What one plugin process did.
#[derive(Debug)]
pub struct PluginRun {
    /// Exit status was 0.
    pub ok: bool,
    /// stdout as JSON (Null when empty).
    pub out: serde_json::Value,
    /// stderr, for failure messages.
    pub stderr: String,
}

/// Runs any CNI plugin binary inside `node`'s namespace as libcni does: the
/// given `CNI_*` variables (and only those) on top of our environment, the
/// config on stdin. stdout must be empty or one JSON document.
pub fn run_plugin(
    lab: &Lab,
    node: &str,
    plugin: &std::path::Path,
    env: &[(&str, &str)],
    config: &serde_json::Value,
) -> PluginRun {
    use std::io::Write;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &lab.node_ns(node)])
        .arg(plugin)
        .env("CNI_PATH", &lab.cfg.bin_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "{} printed non-JSON ({e}): {text:?}; stderr {stderr}",
                plugin.display()
            )
        })
    };
    PluginRun {
        ok: out.status.success(),
        out: json,
        stderr,
    }
}

/// The allocation record of `ip` (GetAllocation), or None when the controller
/// answers NotFound. Any other failure panics.
pub fn allocation(lab: &Lab, ip: &str) -> Option<serde_json::Value> {
    match lab.grpcurl(&[
        "-d",
        &format!(r#"{{"address":"{ip}"}}"#),
        "tabby.v1.IpamAdmin/GetAllocation",
    ]) {
        Ok(out) => Some(serde_json::from_str(&out).unwrap()),
        Err(e) if e.to_string().contains("NotFound") => None,
        Err(e) => panic!("GetAllocation {ip}: {e}"),
    }
}

/// The handle holding `ip`, or None when it is free.
pub fn holder(lab: &Lab, ip: &str) -> Option<String> {
    allocation(lab, ip).map(|a| {
        a["allocations"][0]["handle"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    })
}

/// Handles the controller says `node` holds (NodeAgent/ListHandles as that node).
pub fn node_handles(lab: &Lab, node: &str) -> Vec<String> {
    let out = lab
        .grpcurl_as(node, &["-d", "{}", "tabby.v1.NodeAgent/ListHandles"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["handles"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect()
}

/// The first address of a CNI result, without its prefix length.
pub fn result_ip(result: &serde_json::Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no ips in {result}"))
        .split('/')
        .next()
        .unwrap()
        .to_string()
}
