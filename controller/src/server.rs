//! Assembles the controller's gRPC server: IpamAdmin, NodeAgent,
//! IntentStream, reflection v1 and v1alpha and grpc.health.v1, all behind the
//! one identity layer ([`AuthLayer`]), over mutual TLS or (`--insecure`)
//! plaintext.
use crate::{
    auth::{AuthLayer, Mode},
    error::{Error, Result},
    owner::Ipam,
    service::{AdminService, NodeService},
    watch::{IntentStreamServer, StreamLimit},
};
use std::{future::Future, time::Duration};
use tabby_proto::v1::{
    bgp_admin_server::BgpAdminServer, ipam_admin_server::IpamAdminServer,
    node_agent_server::NodeAgentServer,
};
use tabby_tls::{accept::AcceptLimits, Reloading, ServerMaterial};
use tokio::net::TcpListener;
use tonic::transport::{server::TcpIncoming, Server};

/// How the server is reached and what it bounds.
#[derive(Clone)]
pub struct ServeOptions {
    /// Mutual TLS material; `None` serves plaintext (`--insecure`).
    pub tls: Option<Reloading<ServerMaterial>>,
    /// Largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// Calls in progress at once on one connection; more wait.
    pub max_concurrent_per_connection: usize,
    /// A unary call (or the start of a stream) not answered in this time is
    /// DEADLINE_EXCEEDED.
    pub request_timeout: Duration,
    /// Intent streams one node identity may hold at once.
    pub max_streams_per_identity: usize,
    /// Node calls one node identity may have in progress at once.
    pub max_inflight_per_node: usize,
}

impl ServeOptions {
    /// Plaintext with the default limits (tests and `--insecure`).
    pub fn insecure() -> Self {
        ServeOptions {
            tls: None,
            max_request_bytes: 4 << 20,
            max_concurrent_per_connection: 256,
            request_timeout: Duration::from_secs(30),
            max_streams_per_identity: 4,
            max_inflight_per_node: 32,
        }
    }
}

/// Serves every controller service on `listener` until `shutdown` resolves,
/// then finishes in-flight calls and returns. `health`, if given, serves
/// grpc.health.v1 (and reflection) alone in plaintext: kubelet's native
/// gRPC probes cannot present a certificate, or speak TLS at all.
pub async fn serve(
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    ipam: Ipam,
    opts: ServeOptions,
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
            "tabby.v1.BgpAdmin",
        ],
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    health.set_serving::<IpamAdminServer<AdminService>>().await;
    health.set_serving::<NodeAgentServer<NodeService>>().await;

    let max = opts.max_request_bytes;
    let admin =
        IpamAdminServer::new(AdminService::new(ipam.clone())).max_decoding_message_size(max);
    let node = NodeAgentServer::new(NodeService::new(ipam.clone())).max_decoding_message_size(max);
    // Intent streams end when shutdown starts, so that the graceful
    // shutdown (which waits for open streams) can finish; nodes reconnect.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    if let Some(l) = health_listener {
        let mut stop = stop.clone();
        let probes = Server::builder()
            .timeout(Duration::from_secs(5))
            .add_routes(routes.clone())
            .serve_with_incoming_shutdown(TcpIncoming::from(l), async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        tokio::spawn(async move {
            if let Err(e) = probes.await {
                tracing::error!(error = %e, "the health listener stopped");
            }
        });
    }
    // The BGP speaker lives as long as the server.
    let speaker = crate::bgp::Speaker {
        listen: listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("listen address: {e}")))?,
    };
    let bgp_status = crate::bgp::SharedStatus::default();
    tokio::spawn(crate::bgp::run(
        ipam.clone(),
        speaker,
        bgp_status.clone(),
        stop.clone(),
    ));
    let bgp = BgpAdminServer::new(crate::bgp::service::BgpService::new(
        ipam.clone(),
        speaker,
        bgp_status,
    ))
    .max_decoding_message_size(max);
    let watch =
        IntentStreamServer::new(ipam, stop, StreamLimit::new(opts.max_streams_per_identity));
    let mode = if opts.tls.is_some() {
        Mode::Mtls
    } else {
        Mode::Insecure
    };
    let router = Server::builder()
        .concurrency_limit_per_connection(opts.max_concurrent_per_connection)
        .timeout(opts.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Outermost: refusals are counted too.
        .layer(tabby_runtime::metrics::GrpcMetricsLayer(
            crate::metrics::metrics().grpc.clone(),
        ))
        .layer(AuthLayer::new(mode, opts.max_inflight_per_node))
        .add_routes(routes)
        .add_service(admin)
        .add_service(node)
        .add_service(bgp)
        .add_service(watch);
    let r = match opts.tls {
        Some(tls) => {
            let incoming = tabby_tls::incoming(listener, tls, AcceptLimits::default());
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    r.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}
