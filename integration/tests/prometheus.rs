//! A real Prometheus server (Debian's `prometheus`) scrapes the lab's
//! controller and node clients from inside the fabric namespace, and PromQL
//! answers what an operator would ask: the addresses used equal the pods,
//! and the convergence histogram has counts from every node.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use tabby_integration::netns;

/// The Prometheus server this test started; killed by its pid on drop.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The scalar value of a PromQL query (None while it has no result).
fn query(fabric: &str, q: &str) -> Option<f64> {
    let py = format!(
        "import json, urllib.parse, urllib.request\n\
         u = 'http://127.0.0.1:9090/api/v1/query?query=' + urllib.parse.quote({q:?})\n\
         r = json.load(urllib.request.urlopen(u, timeout=5))['data']['result']\n\
         print(r[0]['value'][1] if r else 'none')"
    );
    let out = netns::exec(fabric, &["python3", "-c", &py]).ok()?;
    out.trim().parse().ok()
}

#[test]
fn promql_sees_every_pod_and_every_node_converging() {
    let prom = std::path::Path::new("/usr/bin/prometheus");
    assert!(
        prom.exists(),
        "prometheus not found (run `make deps`: Debian's prometheus package)"
    );
    let (mut lab, dir) = lab();
    for (node, pod) in [
        ("control-plane", "cp-a"),
        ("worker", "w-a"),
        ("worker2", "w2-a"),
    ] {
        lab.add_pod(node, pod).unwrap();
    }
    let targets: Vec<String> = ["control-plane", "worker", "worker2"]
        .iter()
        .map(|n| format!("'{}:9101'", lab.node_ip(n)))
        .collect();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: tabby-controller\n    static_configs:\n      - targets: ['127.0.0.1:9100']\n\
             \x20 - job_name: tabby-node\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let data = dir.path().join("prometheus-data");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _server = Prometheus(
        Command::new("ip")
            .args(["netns", "exec", &lab.fabric()])
            .arg(prom)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let fabric = lab.fabric();
    let used = r#"sum(tabby_ipam_pool_addresses{state="used"})"#;
    let converging = "count(tabby_node_convergence_delay_seconds_count > 0)";
    let up = r#"sum(up{job=~"tabby-.*"})"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut u, mut c, mut n) = (None, None, None);
    while Instant::now() < deadline {
        (u, c, n) = (
            query(&fabric, used),
            query(&fabric, converging),
            query(&fabric, up),
        );
        if u == Some(lab.pods().len() as f64) && c == Some(3.0) && n == Some(4.0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let plog = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    panic!(
        "PromQL: {used} = {u:?} (want {}), {converging} = {c:?} (want 3), {up} = {n:?} (want 4)\n\
         prometheus log tail:\n{}",
        lab.pods().len(),
        plog.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
}
