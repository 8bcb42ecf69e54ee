//! Assembles the controller's gRPC server: IpamAdmin, NodeAgent (behind the
//! node identity layer), reflection v1 and v1alpha, and grpc.health.v1.
use crate::{
    auth::node_identity_interceptor,
    error::{Error, Result},
    owner::Ipam,
    service::{AdminService, NodeService},
    watch::IntentStreamServer,
};
use std::future::Future;
use tabby_proto::v1::{ipam_admin_server::IpamAdminServer, node_agent_server::NodeAgentServer};
use tokio::net::TcpListener;
use tonic::transport::{server::TcpIncoming, Server};

/// Serves every controller service on `listener` until `shutdown` resolves,
/// then finishes in-flight calls and returns.
pub async fn serve(
    listener: TcpListener,
    ipam: Ipam,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    // The descriptor set also holds tabby-node's PodNetwork: list only what
    // this server serves.
    let tabby_runtime::Introspection { health, routes } = tabby_runtime::introspection(
        tabby_proto::FILE_DESCRIPTOR_SET,
        &[
            "tabby.v1.IpamAdmin",
            "tabby.v1.NodeAgent",
            "tabby.v1.IntentStream",
        ],
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    health.set_serving::<IpamAdminServer<AdminService>>().await;
    health.set_serving::<NodeAgentServer<NodeService>>().await;

    let admin = IpamAdminServer::new(AdminService::new(ipam.clone()));
    let node = NodeAgentServer::with_interceptor(
        NodeService::new(ipam.clone()),
        node_identity_interceptor,
    );
    // Intent streams end when shutdown starts, so that the graceful
    // shutdown (which waits for open streams) can finish; nodes reconnect.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let watch = tonic::service::interceptor::InterceptedService::new(
        IntentStreamServer::new(ipam, stop),
        node_identity_interceptor,
    );
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .add_routes(routes)
        .add_service(admin)
        .add_service(node)
        .add_service(watch)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}
