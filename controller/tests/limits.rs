//! The server's limits (#12, hardening) against the real binary (32,000
//! allocations): a request
//! that runs past `--request-timeout` is cut off (and a quick one is not),
//! and `--max-concurrent-per-connection` makes a connection's calls wait for
//! each other (without it a quick call overtakes a slow one).
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

/// Which of a slow CheckIpam and a quick ListPools, sent on one connection
/// with the quick one 2 ms later, finished first.
async fn quick_finishes_first(c: &Controller) -> bool {
    let ch = c.admin_channel().await;
    let mut slow = tabby_proto::v1::ipam_admin_client::IpamAdminClient::new(ch.clone());
    let mut quick = tabby_proto::v1::ipam_admin_client::IpamAdminClient::new(ch);
    // Warm the connection up.
    quick.list_pools(ListPoolsRequest {}).await.unwrap();
    let s = tokio::spawn(async move {
        slow.check_ipam(CheckIpamRequest {}).await.unwrap();
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(2)).await;
    quick.list_pools(ListPoolsRequest {}).await.unwrap();
    let q = Instant::now();
    let s = s.await.unwrap();
    q < s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_timeouts_and_per_connection_concurrency_hold() {
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
    // Without a per-connection limit a quick call overtakes a slow one.
    assert!(
        quick_finishes_first(&c).await,
        "no overtaking with the default limit"
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

    // One call at a time per connection: the quick call waits.
    let mut c = Controller::start_bin(
        &common::controller_bin(),
        &data,
        &["--max-concurrent-per-connection", "1"],
    );
    assert!(
        !quick_finishes_first(&c).await,
        "a second call on the connection ran beside the first"
    );
    c.term();
}
