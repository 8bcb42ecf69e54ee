//! Assembles the controller's gRPC server: IpamAdmin, NodeAgent (behind the
//! node identity layer), reflection v1 and v1alpha, and grpc.health.v1.
use crate::{
    error::{Error, Result},
    owner::Ipam,
    service::{node_identity_interceptor, AdminService, NodeService},
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
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        // The descriptor set also holds tabby-node's PodNetwork: list only
        // what this server serves.
        b.register_encoded_file_descriptor_set(tabby_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("tabby.v1.IpamAdmin")
            .with_service_name("tabby.v1.NodeAgent")
            .with_service_name("tabby.v1.IntentStream")
            .with_service_name("grpc.health.v1.Health")
    };
    let refl_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let refl_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
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
        .add_service(health_svc)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .add_service(admin)
        .add_service(node)
        .add_service(watch)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}
