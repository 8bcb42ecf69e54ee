//! Sessions held by nodes (#15) over real gRPC with real certificates: a
//! peer with a node selector is given (password included) only to the nodes
//! it selects, through NodeAgent.GetBgpSessions; every BGP change moves the
//! intent's bgp_generation, which is how nodes know to ask again; admins
//! see whether a password is set, never the password.
#![allow(clippy::unwrap_used)]
mod common;

use common::{temp_dir, Controller};
use std::time::Duration;
use tabby_proto::v1::{
    bgp_admin_client::BgpAdminClient, intent_stream_client::IntentStreamClient,
    node_agent_client::NodeAgentClient, AddBgpPeerRequest, BgpPeer, GetBgpSessionsRequest,
    GetBgpStatusRequest, ListBgpPeersRequest, Node, RegisterNodeRequest, SetBgpConfigRequest,
    WatchRequest,
};

async fn register(c: &Controller, name: &str, rack: &str, ip: &str) {
    c.node(name)
        .await
        .register_node(RegisterNodeRequest {
            node: Some(Node {
                name: name.into(),
                addresses: vec![ip.into()],
                labels: [("rack".to_string(), rack.to_string())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

async fn sessions(c: &Controller, name: &str) -> Vec<BgpPeer> {
    c.node(name)
        .await
        .get_bgp_sessions(GetBgpSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .peers
}

async fn next(
    w: &mut tonic::Streaming<tabby_proto::v1::IntentUpdate>,
) -> tabby_proto::v1::IntentUpdate {
    tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

// Multi-threaded: term() blocks its thread while the client's connections
// must still close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_held_peers_go_to_the_selected_nodes_only() {
    let dir = temp_dir();
    let mut c = Controller::start(&dir.path().join("data"));
    register(&c, "a1", "a", "172.18.0.2").await;
    register(&c, "b1", "b", "172.18.0.3").await;
    let mut watch = IntentStreamClient::new(c.node_channel("a1").await)
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let snap = next(&mut watch).await;
    assert!(snap.snapshot && snap.bgp_generation != 0, "{snap:?}");

    let mut bgp = BgpAdminClient::new(c.admin_channel().await);
    bgp.set_bgp_config(SetBgpConfigRequest {
        enabled: Some(true),
        ..Default::default()
    })
    .await
    .unwrap();
    let d = next(&mut watch).await;
    assert!(
        !d.snapshot && d.bgp_generation != 0 && d.bgp_generation != snap.bgp_generation,
        "{d:?}"
    );
    assert!(sessions(&c, "a1").await.is_empty(), "no peer yet");
    bgp.add_peer(AddBgpPeerRequest {
        peer: Some(BgpPeer {
            address: "172.18.0.101".into(),
            remote_asn: 65001,
            hold_time: 9,
            password: "s3cret".into(),
            node_selector: "rack == 'a'".into(),
            import_prefixes: vec!["192.0.2.0/24".into()],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let d2 = next(&mut watch).await;
    assert!(
        d2.bgp_generation != 0 && d2.bgp_generation != d.bgp_generation,
        "{d2:?}"
    );

    // The selected node gets the peer with its password; the other nothing.
    let a = sessions(&c, "a1").await;
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(
        (
            a[0].address.as_str(),
            a[0].password.as_str(),
            a[0].remote_asn
        ),
        ("172.18.0.101", "s3cret", 65001)
    );
    assert_eq!(a[0].import_prefixes, vec!["192.0.2.0/24"]);
    assert!(sessions(&c, "b1").await.is_empty());

    // Admins see that a password is set, not the password; the controller
    // itself holds no session for the peer.
    let peers = bgp
        .list_peers(ListBgpPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .peers;
    assert!(
        peers[0].password.is_empty() && peers[0].has_password,
        "{peers:?}"
    );
    let st = bgp
        .get_status(GetBgpStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.sessions[0].state, "NodeHeld", "{st:?}");

    // An admin identity may not ask as a node.
    let e = NodeAgentClient::new(c.admin_channel().await)
        .get_bgp_sessions(GetBgpSessionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    drop((watch, bgp));
    c.term();
}
