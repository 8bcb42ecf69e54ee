//! What an operator with grpcurl relies on: reflection v1 and v1alpha, the
//! health service, node identity enforcement, and clean errors for bad
//! input that change nothing.
#![allow(clippy::unwrap_used)]
mod common;

use common::{create_pool, node_client, pool, register, temp_dir, Controller};
use tabby_proto::v1::{
    node_agent_client::NodeAgentClient, AssignRequest, CreatePoolRequest, DeletePoolRequest,
    ListHandlesRequest, ListPoolsRequest, Pool,
};
use tonic::{transport::Channel, Code};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const SERVICES: [&str; 3] = [
    "tabby.v1.IpamAdmin",
    "tabby.v1.NodeAgent",
    "grpc.health.v1.Health",
];

/// One reflection query per supported version: the listed services, and
/// whether each of `symbols` resolves to file descriptors (`Ok(n files)`)
/// or to an error response (`Err(code)`).
macro_rules! reflection_query {
    ($name:ident, $m:path) => {
        async fn $name(ch: Channel, symbols: &[&str]) -> (Vec<String>, Vec<Result<usize, i32>>) {
            use $m::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let mut reqs = vec![ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }];
            for s in symbols {
                reqs.push(ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::FileContainingSymbol(s.to_string())),
                });
            }
            let n = reqs.len();
            let mut cl = ServerReflectionClient::new(ch);
            let mut stream = cl
                .server_reflection_info(tokio_stream::iter(reqs))
                .await
                .expect(concat!(stringify!($m), ": ServerReflectionInfo"))
                .into_inner();
            let mut services = None;
            let mut files = Vec::new();
            for i in 0..n {
                let r = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => panic!("reflection stream ended after {i} of {n}"),
                    // tonic-reflection ends the stream with a status (rather
                    // than an ErrorResponse) for an unknown symbol.
                    Err(s) if i + 1 == n => {
                        files.push(Err(s.code() as i32));
                        break;
                    }
                    Err(s) => panic!("reflection stream: {s}"),
                };
                match r.message_response.expect("a response") {
                    MessageResponse::ListServicesResponse(l) => {
                        services = Some(l.service.into_iter().map(|s| s.name).collect())
                    }
                    MessageResponse::FileDescriptorResponse(f) => {
                        assert!(
                            f.file_descriptor_proto.iter().all(|b| !b.is_empty()),
                            "empty file descriptor"
                        );
                        files.push(Ok(f.file_descriptor_proto.len()))
                    }
                    MessageResponse::ErrorResponse(e) => files.push(Err(e.error_code)),
                    other => panic!("unexpected reflection response {other:?}"),
                }
            }
            (services.expect("a ListServices answer"), files)
        }
    };
}

reflection_query!(reflect_v1, tonic_reflection::pb::v1);
reflection_query!(reflect_v1alpha, tonic_reflection::pb::v1alpha);

fn check_reflection(version: &str, services: &[String], files: &[Result<usize, i32>]) {
    for s in SERVICES {
        assert!(
            services.iter().any(|x| x == s),
            "reflection {version} does not list {s}: {services:?}"
        );
    }
    // The first three symbols are the services, which must resolve; the
    // last is made up and must not (as an ErrorResponse or a stream status).
    for (s, f) in SERVICES.iter().zip(files) {
        assert!(
            matches!(f, Ok(n) if *n > 0),
            "reflection {version}: FileContainingSymbol {s}: {f:?}"
        );
    }
    assert_eq!(
        files.last(),
        Some(&Err(Code::NotFound as i32)),
        "reflection {version}: an unknown symbol must give NOT_FOUND"
    );
}

async fn list_pools(admin: &mut common::AdminClient) -> Vec<Pool> {
    admin
        .list_pools(ListPoolsRequest {})
        .await
        .expect("ListPools")
        .into_inner()
        .pools
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_health_identity_and_bad_input() {
    let dir = temp_dir();
    let mut c = Controller::start(&dir.path().join("data"));
    // Reflection and health need no client certificate.
    let ch = common::anonymous_channel(c.addr).await;

    // --- reflection, both versions --------------------------------------
    let symbols = [
        SERVICES[0],
        SERVICES[1],
        SERVICES[2],
        "tabby.v1.NoSuchService",
    ];
    let (services, files) = reflect_v1(ch.clone(), &symbols).await;
    check_reflection("v1", &services, &files);
    let (services_a, files_a) = reflect_v1alpha(ch.clone(), &symbols).await;
    check_reflection("v1alpha", &services_a, &files_a);
    println!("reflection v1 lists {services:?}");

    // --- health ----------------------------------------------------------
    let mut health = HealthClient::new(ch.clone());
    for s in ["", "tabby.v1.IpamAdmin", "tabby.v1.NodeAgent"] {
        let r = health
            .check(HealthCheckRequest {
                service: s.to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("health Check {s:?}: {e}"))
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "health of {s:?} is not SERVING"
        );
    }
    let e = health
        .check(HealthCheckRequest {
            service: "tabby.v1.NoSuchService".into(),
        })
        .await
        .expect_err("health of an unknown service");
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // --- node identity ------------------------------------------------------
    register(&c, "worker1", 1).await;
    let mut anon = NodeAgentClient::new(ch.clone());
    let e = anon
        .assign(AssignRequest {
            handle: "k8s-pod-network.anon".into(),
            ..Default::default()
        })
        .await
        .expect_err("Assign without a client certificate");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(
        e.message().contains("tabby://node/"),
        "the error should say what certificate is needed: {e}"
    );
    let e = anon
        .list_handles(ListHandlesRequest {})
        .await
        .expect_err("ListHandles without a client certificate");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = node_client(ch.clone(), "worker1")
        .assign(AssignRequest {
            handle: "k8s-pod-network.anon".into(),
            ..Default::default()
        })
        .await
        .expect_err("Assign with a header but no certificate");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // --- bad input changes nothing -----------------------------------------
    let mut admin = c.admin().await;
    create_pool(&mut admin, "pool-a", "10.244.0.0/16", 0).await;
    let before = list_pools(&mut admin).await;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].block_size, 26, "default block size");

    let create = |name: &str, cidr: &str, bs: u32| CreatePoolRequest {
        pool: Some(pool(name, cidr, bs)),
    };
    let e = admin
        .create_pool(create("pool-b", "10.0.0.1/16", 0))
        .await
        .expect_err("CreatePool with host bits set");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("host bits"), "{e}");

    for cidr in ["10.244.128.0/17", "10.0.0.0/8", "10.244.0.0/16"] {
        let e = admin
            .create_pool(create("pool-b", cidr, 0))
            .await
            .expect_err("overlapping CreatePool");
        assert_eq!(e.code(), Code::InvalidArgument, "{cidr}: {e}");
        assert!(e.message().contains("overlap"), "{cidr}: {e}");
    }
    let e = admin
        .create_pool(create("pool-b", "10.245.0.0/16", 19))
        .await
        .expect_err("block size /19");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = admin
        .create_pool(create("pool-b", "not-a-cidr", 0))
        .await
        .expect_err("CreatePool with garbage");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = admin
        .create_pool(CreatePoolRequest { pool: None })
        .await
        .expect_err("CreatePool without a pool");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = admin
        .create_pool(create("pool-a", "10.245.0.0/16", 0))
        .await
        .expect_err("CreatePool with a taken name");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    let e = admin
        .delete_pool(DeletePoolRequest {
            name: "no-such-pool".into(),
        })
        .await
        .expect_err("DeletePool of an unknown pool");
    assert_eq!(e.code(), Code::NotFound, "{e}");

    let e = c
        .node("ghost")
        .await
        .assign(AssignRequest {
            handle: "k8s-pod-network.ghost".into(),
            ..Default::default()
        })
        .await
        .expect_err("Assign on an unregistered node");
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // An unknown encapsulation, on create and on update.
    let mut p9 = pool("pool-b", "10.245.0.0/16", 0);
    p9.encapsulation = 9;
    let e = admin
        .create_pool(CreatePoolRequest { pool: Some(p9) })
        .await
        .expect_err("CreatePool with encapsulation 9");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = admin
        .update_pool(tabby_proto::v1::UpdatePoolRequest {
            name: "pool-a".into(),
            encapsulation: Some(9),
            ..Default::default()
        })
        .await
        .expect_err("UpdatePool with encapsulation 9");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("is unknown: use ENCAPSULATION_NONE"),
        "{e}"
    );
    // VXLAN settings out of range: the VNI is 24 bits, the port not 0.
    let cfg_before = admin
        .get_ipam_config(tabby_proto::v1::GetIpamConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((cfg_before.vxlan_vni, cfg_before.vxlan_port), (4096, 4789));
    for (vni, port) in [
        (Some(0), None),
        (Some(1 << 24), None),
        (None, Some(0)),
        (None, Some(65_536)),
    ] {
        let e = admin
            .set_ipam_config(tabby_proto::v1::SetIpamConfigRequest {
                vxlan_vni: vni,
                vxlan_port: port,
                strict_affinity: Some(true),
                ..Default::default()
            })
            .await
            .expect_err("SetIpamConfig out of range");
        assert_eq!(e.code(), Code::InvalidArgument, "{vni:?} {port:?}: {e}");
    }
    let cfg_after = admin
        .get_ipam_config(tabby_proto::v1::GetIpamConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cfg_after, cfg_before, "refused settings changed the config");

    let after = list_pools(&mut admin).await;
    assert_eq!(after, before, "bad requests changed the pools");

    // A registered node still gets an address afterwards.
    let r = c
        .node("worker1")
        .await
        .assign(AssignRequest {
            handle: "k8s-pod-network.ok".into(),
            ..Default::default()
        })
        .await
        .expect("Assign on worker1")
        .into_inner();
    assert!(r.allocations[0].address.starts_with("10.244."), "{r:?}");

    drop((admin, health, anon, ch));
    c.term();
}
