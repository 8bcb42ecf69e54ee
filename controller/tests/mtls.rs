//! Issue #12 over real gRPC with real certificates: who may call what, which
//! certificates are refused, header spoofing, the per-identity stream bound,
//! and rotating soon-to-expire certificates under load.
#![allow(clippy::unwrap_used)]
mod common;

use common::{
    anonymous_channel, create_pool, node_client, register, reloading_channel, temp_dir,
    tls_channel, Controller, NodeHeader,
};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tabby_proto::v1::{
    intent_stream_client::IntentStreamClient, node_agent_client::NodeAgentClient, AssignRequest,
    CreatePoolRequest, DeleteNodeRequest, GetAllocationRequest, ListHandlesRequest,
    ListPoolsRequest, RegisterNodeRequest, ReleaseAddressRequest, ReleaseHandleRequest,
    WatchRequest,
};
use tabby_tls::{
    issue::{client_files, issue, server_files, Kind, Validity},
    ClientMaterial, Identity, Reloading,
};
use tonic::Code;

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call should be refused").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_may_do_only_its_own_part() {
    let dir = temp_dir();
    let c = Controller::start(&dir.path().join("data"));
    let mut admin = c.admin().await;
    create_pool(&mut admin, "p", "10.244.0.0/16", 26).await;
    register(&c, "node-a", 1).await;
    register(&c, "node-b", 2).await;
    let mut a = c.node("node-a").await;
    let mut b = c.node("node-b").await;
    let held = a
        .assign(AssignRequest {
            handle: "net.pod-a".into(),
            num_v4: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .allocations[0]
        .address
        .clone();

    // --- node B on node A's handle -----------------------------------------
    let assign = AssignRequest {
        handle: "net.pod-a".into(),
        num_v4: 1,
        ..Default::default()
    };
    assert_eq!(code(b.assign(assign).await), Code::PermissionDenied);
    let rel = ReleaseHandleRequest {
        handle: "net.pod-a".into(),
    };
    assert_eq!(code(b.release_handle(rel).await), Code::PermissionDenied);
    let rel = ReleaseAddressRequest {
        address: held.clone(),
    };
    assert_eq!(code(b.release_address(rel).await), Code::PermissionDenied);
    let listed = b.list_handles(ListHandlesRequest {}).await.unwrap();
    assert!(
        listed.into_inner().handles.is_empty(),
        "B lists only its own"
    );
    let mut as_a = tabby_proto::v1::Node {
        name: "node-a".into(),
        addresses: vec!["172.18.0.99".into()],
        ..Default::default()
    };
    let reg = RegisterNodeRequest {
        node: Some(as_a.clone()),
    };
    assert_eq!(code(b.register_node(reg).await), Code::PermissionDenied);
    // ...and none of that changed anything.
    let still = admin
        .get_allocation(GetAllocationRequest {
            handle: "net.pod-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.allocations.len(), 1);
    assert_eq!(still.allocations[0].address, held);
    assert_eq!(still.allocations[0].node, "node-a");

    // --- header spoofing with a valid node certificate ----------------------
    let ch_b = c.node_channel("node-b").await;
    let mut spoof = node_client(ch_b.clone(), "node-a");
    let rel = ReleaseHandleRequest {
        handle: "net.pod-a".into(),
    };
    assert_eq!(
        code(spoof.release_handle(rel).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(spoof.list_handles(ListHandlesRequest {}).await),
        Code::PermissionDenied
    );
    // Without the header the certificate alone names the node.
    let mut bare = NodeAgentClient::new(ch_b.clone());
    bare.list_handles(ListHandlesRequest {}).await.unwrap();
    as_a.name = String::new();
    let reg = RegisterNodeRequest { node: Some(as_a) };
    let r = bare.register_node(reg).await.unwrap().into_inner();
    assert_eq!(
        r.node.unwrap().name,
        "node-b",
        "the certificate's name counts"
    );

    // --- node on admin ------------------------------------------------------
    let mut node_admin =
        tabby_proto::v1::ipam_admin_client::IpamAdminClient::new(c.node_channel("node-a").await);
    let pools_before = admin.list_pools(ListPoolsRequest {}).await.unwrap();
    assert_eq!(
        code(node_admin.list_pools(ListPoolsRequest {}).await),
        Code::PermissionDenied
    );
    let create = CreatePoolRequest {
        pool: Some(common::pool("evil", "10.99.0.0/16", 26)),
    };
    assert_eq!(
        code(node_admin.create_pool(create).await),
        Code::PermissionDenied
    );
    let del = DeleteNodeRequest {
        name: "node-b".into(),
    };
    assert_eq!(
        code(node_admin.delete_node(del).await),
        Code::PermissionDenied
    );
    let pools_after = admin.list_pools(ListPoolsRequest {}).await.unwrap();
    assert_eq!(pools_before.into_inner(), pools_after.into_inner());

    // --- admin on NodeAgent and IntentStream --------------------------------
    let ch_admin = c.admin_channel().await;
    let mut admin_as_node = node_client(ch_admin.clone(), "node-a");
    let assign = AssignRequest {
        handle: "net.admin".into(),
        num_v4: 1,
        ..Default::default()
    };
    assert_eq!(
        code(admin_as_node.assign(assign).await),
        Code::PermissionDenied
    );
    let mut admin_watch = IntentStreamClient::new(ch_admin);
    assert_eq!(
        code(admin_watch.watch(WatchRequest::default()).await),
        Code::PermissionDenied
    );

    // --- no certificate: health and reflection only -------------------------
    let anon = anonymous_channel(c.addr).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(anon.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let mut anon_node = node_client(anon.clone(), "node-a");
    assert_eq!(
        code(anon_node.list_handles(ListHandlesRequest {}).await),
        Code::Unauthenticated
    );
    let mut anon_admin = tabby_proto::v1::ipam_admin_client::IpamAdminClient::new(anon);
    assert_eq!(
        code(anon_admin.list_pools(ListPoolsRequest {}).await),
        Code::Unauthenticated
    );

    // --- each refusal is one log line naming the identity and the call ------
    let want = [
        ("tabby://node/node-a", "/tabby.v1.IpamAdmin/CreatePool"),
        ("tabby://admin/test", "/tabby.v1.NodeAgent/Assign"),
        ("tabby://node/node-b", "/tabby.v1.NodeAgent/ReleaseHandle"),
        ("no identity", "/tabby.v1.IpamAdmin/ListPools"),
    ];
    let found = |log: &str, (who, call): (&str, &str)| {
        log.lines()
            .any(|l| l.contains("call refused") && l.contains(who) && l.contains(call))
    };
    // stderr is read by a thread of the harness: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = c.stderr();
    while !want.iter().all(|w| found(&log, *w)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        log = c.stderr();
    }
    for (who, call) in want {
        assert!(
            found(&log, (who, call)),
            "no refusal line naming {who} and {call} in:\n{log}"
        );
    }
}

/// A connection whose client certificate does not verify is refused at the
/// handshake: the call fails without reaching any service.
async fn refused(c: &Controller, files: tabby_tls::material::Files, what: &str) {
    let mark = c.stderr().len();
    // With TLS 1.3 the client may finish its side of the handshake before
    // the server checks its certificate: the refusal then shows on the
    // first call.
    let r = match tls_channel(c.addr, files).await {
        Err(_) => None,
        Ok(ch) => Some(
            node_client(ch, "n1")
                .list_handles(ListHandlesRequest {})
                .await,
        ),
    };
    if let Some(r) = r {
        let e = r.expect_err(what);
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            ),
            "{what}: want a transport failure, got {e:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.stderr()[mark..].contains("TLS handshake refused") {
        assert!(
            Instant::now() < deadline,
            "{what}: the controller logged no refused handshake:\n{}",
            c.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_do_not_verify_are_refused() {
    let dir = temp_dir();
    let c = Controller::start(&dir.path().join("data"));
    register(&c, "n1", 1).await;
    let id = Identity::Node("n1".into());
    let ca = common::certs_dir().join(tabby_tls::issue::CA_CERT);

    // Another CA's certificate for the same name.
    let other = dir.path().join("other-ca");
    issue(&other, &Kind::Ca, Validity::days(1)).unwrap();
    let mut f = client_files(&other, &id);
    issue(&other, &Kind::Client(id.clone()), Validity::days(1)).unwrap();
    f.ca = ca.clone();
    refused(&c, f, "a certificate from another CA").await;

    // Expired, and not yet valid, from the right CA.
    let now = time::OffsetDateTime::now_utc();
    for (name, v) in [
        (
            "expired",
            Validity {
                not_before: now - time::Duration::days(2),
                not_after: now - time::Duration::days(1),
            },
        ),
        (
            "not-yet-valid",
            Validity {
                not_before: now + time::Duration::days(1),
                not_after: now + time::Duration::days(2),
            },
        ),
    ] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in [tabby_tls::issue::CA_CERT, tabby_tls::issue::CA_KEY] {
            std::fs::copy(common::certs_dir().join(f), d.join(f)).unwrap();
        }
        issue(&d, &Kind::Client(id.clone()), v).unwrap();
        refused(&c, client_files(&d, &id), name).await;
    }

    // The same name with a valid certificate works.
    let mut ok = c.node("n1").await;
    ok.list_handles(ListHandlesRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intent_streams_per_identity_are_bounded() {
    let dir = temp_dir();
    let c = Controller::start_bin(
        &common::controller_bin(),
        &dir.path().join("data"),
        &["--max-streams-per-identity", "2"],
    );
    register(&c, "n1", 1).await;
    let ch = c.node_channel("n1").await;
    let mut w = IntentStreamClient::with_interceptor(ch, NodeHeader("n1".parse().unwrap()));
    let s1 = w.watch(WatchRequest::default()).await.unwrap();
    let s2 = w.watch(WatchRequest::default()).await.unwrap();
    assert_eq!(
        code(w.watch(WatchRequest::default()).await),
        Code::ResourceExhausted
    );
    // Another node has a bound of its own.
    register(&c, "n2", 2).await;
    let mut w2 = IntentStreamClient::new(c.node_channel("n2").await);
    let _s3 = w2.watch(WatchRequest::default()).await.unwrap();
    // An ended stream frees its place.
    drop(s1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match w.watch(WatchRequest::default()).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("after a stream ended: {e}"),
        }
    }
    drop(s2);
}

/// The controller's and a node's certificates are about to expire; new ones
/// are written over them while a node keeps calling and watching. Nothing
/// fails, the open stream goes on, and after the old certificates expired a
/// new connection works, which needs the new material on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soon_to_expire_certificates_are_replaced_under_load() {
    const LIFE: i64 = 6;
    let dir = temp_dir();
    let certs = dir.path().join("certs");
    let now = time::OffsetDateTime::now_utc();
    let short = Validity {
        not_before: now - time::Duration::minutes(1),
        not_after: now + time::Duration::seconds(LIFE),
    };
    issue(&certs, &Kind::Ca, Validity::days(1)).unwrap();
    let srv = server_files(&certs);
    issue(&certs, &Kind::Server(vec!["127.0.0.1".into()]), short).unwrap();
    let (n1, admin_id) = (Identity::Node("n1".into()), Identity::Admin("ops".into()));
    for id in [&n1, &admin_id] {
        issue(&certs, &Kind::Client(id.clone()), short).unwrap();
    }
    // A copy of the node's old material, to show that it really expires.
    let old = dir.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    let n1_files = client_files(&certs, &n1);
    let mut old_files = n1_files.clone();
    for (from, to) in [(&n1_files.cert, "cert.pem"), (&n1_files.key, "key.pem")] {
        std::fs::copy(from, old.join(to)).unwrap();
    }
    old_files.cert = old.join("cert.pem");
    old_files.key = old.join("key.pem");

    let (cert, key, ca) = (
        srv.cert.display().to_string(),
        srv.key.display().to_string(),
        srv.ca.display().to_string(),
    );
    let c = Controller::start_bin(
        &common::controller_bin(),
        &dir.path().join("data"),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &ca,
            "--tls-reload-interval",
            "200ms",
        ],
    );
    let reload = |id: &Identity| {
        Reloading::start(
            ClientMaterial(client_files(&certs, id)),
            Duration::from_millis(200),
        )
        .unwrap()
    };
    let (node_tls, admin_tls) = (reload(&n1), reload(&admin_id));
    let mut admin = tabby_proto::v1::ipam_admin_client::IpamAdminClient::new(
        reloading_channel(c.addr, admin_tls.clone()).await.unwrap(),
    );
    create_pool(&mut admin, "p", "10.0.0.0/8", 26).await;
    let node_ch = reloading_channel(c.addr, node_tls.clone()).await.unwrap();
    let mut node = node_client(node_ch.clone(), "n1");
    node.register_node(RegisterNodeRequest {
        node: Some(tabby_proto::v1::Node {
            name: "n1".into(),
            addresses: vec!["172.18.0.2".into()],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let mut stream = IntentStreamClient::new(node_ch.clone())
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();

    // Load: Assign + Release in a loop on the node's connection.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, calls, errors, mut cl) =
            (stop.clone(), calls.clone(), errors.clone(), node.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let h = format!("net.load-{i}");
                i += 1;
                let a = cl
                    .assign(AssignRequest {
                        handle: h.clone(),
                        num_v4: 1,
                        ..Default::default()
                    })
                    .await;
                let r = cl.release_handle(ReleaseHandleRequest { handle: h }).await;
                if a.is_err() || r.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Rotate: new certificates, valid for a day, written over the old ones.
    issue(
        &certs,
        &Kind::Server(vec!["127.0.0.1".into()]),
        Validity::days(1),
    )
    .unwrap();
    for id in [&n1, &admin_id] {
        issue(&certs, &Kind::Client(id.clone()), Validity::days(1)).unwrap();
    }
    // Until the old ones have expired.
    let expiry = std::time::SystemTime::UNIX_EPOCH
        + Duration::from_secs(short.not_after.unix_timestamp() as u64 + 1);
    while std::time::SystemTime::now() < expiry {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (n, e) = (
        calls.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    assert!(n > 100, "the load made only {n} calls");
    assert_eq!(e, 0, "{e} of {n} calls failed during the rotation");

    // The open stream goes on: a new block reaches it.
    node.assign(AssignRequest {
        handle: "net.after".into(),
        requested: vec!["10.200.0.1".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(u) = stream.message().await.unwrap() {
            if u.blocks.iter().any(|b| b.cidr == "10.200.0.0/26") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        got,
        Ok(true),
        "the stream opened before the rotation saw the new block"
    );

    // New connections: with the old node material they fail (it expired);
    // with the reloaded material on both sides they work.
    let stale = tls_channel(c.addr, old_files).await;
    if let Ok(ch) = stale {
        node_client(ch, "n1")
            .list_handles(ListHandlesRequest {})
            .await
            .expect_err("the expired certificate was accepted");
    }
    let fresh = reloading_channel(c.addr, node_tls).await.unwrap();
    node_client(fresh, "n1")
        .list_handles(ListHandlesRequest {})
        .await
        .unwrap();
    assert!(
        c.stderr().contains("TLS material reloaded"),
        "the controller did not log its reload:\n{}",
        c.stderr()
    );
}

/// `--health-listen` serves grpc.health.v1 in plaintext for kubelet's
/// probes, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plaintext_health_listener_serves_health_only() {
    let dir = temp_dir();
    let c = Controller::start_bin(
        &common::controller_bin(),
        &dir.path().join("data"),
        &["--health-listen", "127.0.0.1:0"],
    );
    let log = c.stderr();
    let addr = log
        .lines()
        .find(|l| l.contains("serving plaintext health checks"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no health listener line in:\n{log}"))
        .to_string();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tabby.v1.IpamAdmin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut admin = tabby_proto::v1::ipam_admin_client::IpamAdminClient::new(ch);
    assert_eq!(
        code(admin.list_pools(ListPoolsRequest {}).await),
        Code::Unimplemented,
        "the plaintext port serves no tabby service"
    );
}

/// A request over `--max-request-bytes` is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused() {
    let dir = temp_dir();
    let c = Controller::start_bin(
        &common::controller_bin(),
        &dir.path().join("data"),
        &["--max-request-bytes", "1024"],
    );
    let mut admin = c.admin().await;
    let mut big = common::pool("p", "10.244.0.0/16", 26);
    big.node_selector = format!("zone == '{}'", "a".repeat(2000));
    let e = admin
        .create_pool(CreatePoolRequest { pool: Some(big) })
        .await
        .expect_err("a 2 KB request with a 1 KB limit");
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    let pools = admin.list_pools(ListPoolsRequest {}).await.unwrap();
    assert!(pools.into_inner().pools.is_empty(), "nothing was created");
    // A request under the limit works.
    create_pool(&mut admin, "p", "10.244.0.0/16", 26).await;
}
