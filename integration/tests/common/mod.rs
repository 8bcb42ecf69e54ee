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

/// A walkthrough lab with a unique prefix; `tweak` adjusts the config.
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

/// A walkthrough lab.
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
