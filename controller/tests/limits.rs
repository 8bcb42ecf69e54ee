//! The server's limits (#12, hardening) against the real binary: a request
//! that runs past `--request-timeout` is cut off (and a quick one is not),
//! over 32,000 allocations; `--max-concurrent-per-connection` holds a
//! connection's second call while its first is still in the server.
//!
//! The concurrency check does not race two calls: over a raw HTTP/2
//! connection, the first call's request body is held back, so the server
//! holds that call (and its permit) until the test sends the body.
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

/// An empty gRPC message: uncompressed, length 0.
const EMPTY_MESSAGE: [u8; 5] = [0; 5];

fn list_pools_request(addr: std::net::SocketAddr) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/tabby.v1.IpamAdmin/ListPools"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Waits for a call's answer and its grpc-status (from the headers of a
/// trailers-only answer, else from the trailers).
async fn grpc_status(resp: h2::client::ResponseFuture) -> String {
    let resp = resp.await.unwrap();
    if let Some(s) = resp.headers().get("grpc-status") {
        return s.to_str().unwrap().to_string();
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    trailers["grpc-status"].to_str().unwrap().to_string()
}

/// Whether a complete ListPools, sent on one connection after a ListPools
/// whose body is held back, is answered while the first is held. The first
/// is released afterwards and must succeed too.
async fn second_call_answered_while_first_held(c: &Controller) -> bool {
    let tcp = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    // The first call: headers only, so the server waits for its body.
    let (first, mut first_body) = client
        .send_request(list_pools_request(c.addr), false)
        .unwrap();
    // Let the server take the first call (and, under a limit, its permit)
    // before the second arrives: with a multi-thread runtime the stream
    // task spawned last runs first (Tokio's LIFO slot), so two calls sent
    // back to back could take the permit in either order.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = client.ready().await.unwrap();
    // The second, complete; its frames follow the first's on the wire.
    let (second, mut second_body) = client
        .send_request(list_pools_request(c.addr), false)
        .unwrap();
    second_body
        .send_data(bytes::Bytes::from_static(&EMPTY_MESSAGE), true)
        .unwrap();
    let second = tokio::spawn(grpc_status(second));
    // Held by a limit, the second call can never finish here; unheld, it
    // takes milliseconds, so a second is ample.
    let answered = tokio::time::timeout(Duration::from_secs(1), async {
        while !second.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .is_ok();
    first_body
        .send_data(bytes::Bytes::from_static(&EMPTY_MESSAGE), true)
        .unwrap();
    assert_eq!(grpc_status(first).await, "0", "the held call");
    assert_eq!(second.await.unwrap(), "0", "the second call");
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_concurrency_holds() {
    let dir = temp_dir();
    let data = dir.path().join("data");
    // Plaintext, so a raw HTTP/2 client can speak to it; the limit is the
    // same layer with or without TLS.
    let mut c = Controller::start_bin(&common::controller_bin(), &data, &["--insecure"]);
    assert!(
        second_call_answered_while_first_held(&c).await,
        "with the default limit a second call waits for a held one"
    );
    c.term();
    let mut c = Controller::start_bin(
        &common::controller_bin(),
        &data,
        &["--insecure", "--max-concurrent-per-connection", "1"],
    );
    assert!(
        !second_call_answered_while_first_held(&c).await,
        "with --max-concurrent-per-connection 1 a second call ran beside a held one"
    );
    // Another connection is not held by this one's call.
    let mut admin = c.admin().await;
    admin.list_pools(ListPoolsRequest {}).await.unwrap();
    c.term();
}
