//! The server's limits (#12, hardening) against the real binary (32,000
//! allocations): a request
//! that runs past `--request-timeout` is cut off (and a quick one is not).
//! `--max-concurrent-per-connection` has no test: one that ordered a quick
//! call behind a slow one on a connection was not reliable.
#![allow(clippy::unwrap_used)]
mod common;

use common::{check_ipam, create_pool, node_client, register, temp_dir, Controller};
use std::time::{Duration, Instant};
use tabby_proto::v1::{AssignRequest, CheckIpamRequest, ListPoolsRequest};
use tonic::Code;

const NODES: usize = 8;

/// 32,000 allocations, so that CheckIpam takes a while (15 ms for 16,000
/// on a quiet machine was too little).
async fn load(c: &Controller) {
    {
        let mut admin = c.admin().await;
        create_pool(&mut admin, "p", "10.0.0.0/12", 0).await;
    }
    for i in 0..NODES {
        register(c, &format!("node-{i}"), i).await;
    }
    let mut tasks = Vec::new();
    for t in 0..64 {
        let node = format!("node-{}", t % NODES);
        let ch = c.node_channel(&node).await;
        tasks.push(tokio::spawn(async move {
            let mut cl = node_client(ch, &node);
            for i in 0..500 {
                cl.assign(AssignRequest {
                    handle: format!("k8s.t{t}-{i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_timeouts_hold() {
    let dir = temp_dir();
    let data = dir.path().join("data");
    let mut c = Controller::start(&data);
    load(&c).await;
    // How long a CheckIpam takes here; the limits below are set from it.
    let mut admin = c.admin().await;
    let t0 = Instant::now();
    let (check, bad) = check_ipam(&mut admin).await;
    let took = t0.elapsed();
    assert!(bad.is_empty() && check.allocated == 32_000, "{check:?}");
    assert!(
        took >= Duration::from_millis(12),
        "CheckIpam too quick to test with: {took:?}"
    );
    c.term();

    // A timeout well below CheckIpam's time: cut off; a quick call is not.
    let timeout = format!("{}ms", (took.as_millis() / 4).max(5));
    let mut c = Controller::start_bin(
        &common::controller_bin(),
        &data,
        &["--request-timeout", &timeout],
    );
    let mut admin = c.admin().await;
    let e = admin
        .check_ipam(CheckIpamRequest {})
        .await
        .expect_err("CheckIpam past the request timeout");
    assert!(
        matches!(e.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{timeout}: {e}"
    );
    admin.list_pools(ListPoolsRequest {}).await.unwrap();
    c.term();
}
