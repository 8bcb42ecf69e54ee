//! `--metrics-listen`: the controller's Prometheus metrics over real HTTP,
//! after real gRPC calls.
#![allow(clippy::unwrap_used)]
mod common;

use common::{create_pool, register, temp_dir, Controller};
use std::io::{Read, Write};
use tabby_proto::v1::{
    intent_stream_client::IntentStreamClient, AssignRequest, ListPoolsRequest, WatchRequest,
};

/// GET /metrics, the body.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the sample named exactly `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_ipam_grpc_and_watchers() {
    let dir = temp_dir();
    let mut c = Controller::start_bin(
        &common::controller_bin(),
        &dir.path().join("data"),
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let log = c.stderr();
    let addr = log
        .lines()
        .find(|l| l.contains("serving metrics"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics line in:\n{log}"))
        .to_string();
    let mut admin = c.admin().await;
    create_pool(&mut admin, "p", "10.244.0.0/24", 26).await;
    register(&c, "n1", 1).await;
    register(&c, "n2", 2).await;
    let mut n1 = c.node("n1").await;
    for h in ["a", "b", "c"] {
        n1.assign(AssignRequest {
            handle: format!("net.{h}"),
            num_v4: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // A refused call: a node on the admin service.
    let mut as_node =
        tabby_proto::v1::ipam_admin_client::IpamAdminClient::new(c.node_channel("n2").await);
    as_node.list_pools(ListPoolsRequest {}).await.unwrap_err();
    let mut w = IntentStreamClient::new(c.node_channel("n2").await);
    let _stream = w.watch(WatchRequest::default()).await.unwrap();

    let m = scrape(&addr);
    let v = |s: &str| value(&m, s).unwrap_or_else(|| panic!("no {s} in:\n{m}"));
    assert_eq!(
        v(r#"tabby_ipam_pool_addresses{pool="p",state="used"}"#),
        3.0
    );
    assert_eq!(
        v(r#"tabby_ipam_pool_addresses{pool="p",state="free"}"#),
        253.0
    );
    assert_eq!(v(r#"tabby_ipam_node_blocks{node="n1"}"#), 1.0);
    assert_eq!(v(r#"tabby_ipam_node_blocks{node="n2"}"#), 0.0);
    assert_eq!(v(r#"tabby_ipam_node_addresses{node="n1"}"#), 3.0);
    assert_eq!(v("tabby_ipam_borrowed_addresses"), 0.0);
    assert_eq!(
        v(r#"tabby_grpc_requests_total{method="/tabby.v1.NodeAgent/Assign",code="Ok"}"#),
        3.0
    );
    assert_eq!(
        v(
            r#"tabby_grpc_requests_total{method="/tabby.v1.IpamAdmin/ListPools",code="PermissionDenied"}"#
        ),
        1.0
    );
    assert_eq!(v("tabby_intent_watchers"), 1.0);
    assert!(v("tabby_intent_revision") >= 5.0);
    assert!(v("tabby_store_commit_duration_seconds_count") >= 5.0);
    assert!(v("tabby_store_commit_group_size_count") >= 5.0);
    assert!(m.contains("# HELP tabby_ipam_pool_addresses "), "help text");

    // An idle keep-alive scrape connection (as Prometheus keeps) does not
    // hold up a clean shutdown.
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    drop((_stream, w, as_node, n1, admin));
    tokio::task::spawn_blocking(move || c.term()).await.unwrap();
    drop(idle);
}
