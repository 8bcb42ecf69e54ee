//! A controller that does not lead (issue 16: etcd datastore, several
//! replicas) serves only this: gRPC health saying NOT_SERVING for the IPAM
//! services (so a Kubernetes Service with readiness sends traffic to the
//! leader), reflection, and UNAVAILABLE for every tabby call, naming the
//! leader's address so that a client can go there.
use crate::{error::Result, server::ServeOptions};
use std::{
    convert::Infallible,
    future::Future,
    task::{Context, Poll},
};
use tabby_tls::accept::AcceptLimits;
use tokio::{net::TcpListener, sync::watch};
use tonic::{
    codegen::{http, BoxFuture, Service},
    transport::{server::TcpIncoming, Server},
};

/// The services a leader serves; NOT_SERVING on a standby.
const SERVICES: [&str; 4] = [
    "tabby.v1.IpamAdmin",
    "tabby.v1.NodeAgent",
    "tabby.v1.IntentStream",
    "tabby.v1.BgpAdmin",
];

/// What a standby answers a tabby call with.
/// The leader's address also goes in the `tabby-leader` metadata (empty
/// while none leads), which tells a client that nothing was done.
pub fn unavailable(leader: Option<&str>) -> tonic::Status {
    let mut st = tonic::Status::unavailable(match leader {
        Some(l) => format!("this controller is a standby; the leader is {l}"),
        None => "this controller is a standby and no controller leads yet (etcd unreachable, or an election under way); try again".into(),
    });
    // An address that is not a valid header value is only in the message.
    if let Ok(v) = leader.unwrap_or_default().parse() {
        st.metadata_mut().insert(tabby_proto::LEADER_HEADER, v);
    }
    st
}

/// Answers every `tabby.v1` call with [`unavailable`]; health and
/// reflection pass.
#[derive(Clone)]
struct Gate<S> {
    inner: S,
    leader: watch::Receiver<Option<String>>,
}

impl<S, B> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path().starts_with("/tabby.v1.") {
            let st = unavailable(self.leader.borrow().as_deref());
            return Box::pin(async move { Ok(st.into_http()) });
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}

#[derive(Clone)]
struct GateLayer(watch::Receiver<Option<String>>);

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            leader: self.0.clone(),
        }
    }
}

/// Serves the standby's answers on `listener` (and health on
/// `health_listener`) until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    opts: &ServeOptions,
    leader: watch::Receiver<Option<String>>,
    stop: impl Future<Output = ()> + Send,
) -> Result<()> {
    let tabby_runtime::Introspection { health, routes } =
        tabby_runtime::introspection(tabby_proto::FILE_DESCRIPTOR_SET, &SERVICES)
            .map_err(|e| crate::error::Error::Internal(e.to_string()))?;
    for s in SERVICES.into_iter().chain([""]) {
        health
            .set_service_status(s, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(l) = health_listener {
        let mut stop_rx = stop_rx.clone();
        let probes = Server::builder()
            .timeout(std::time::Duration::from_secs(5))
            .add_routes(routes.clone())
            .serve_with_incoming_shutdown(TcpIncoming::from(l), async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            });
        tokio::spawn(probes);
    }
    let stop = async move {
        stop.await;
        let _ = stop_tx.send(true);
    };
    let router = Server::builder()
        .timeout(opts.request_timeout)
        .layer(GateLayer(leader))
        .add_routes(routes);
    let r = match opts.tls.clone() {
        Some(tls) => {
            let incoming = tabby_tls::incoming(listener, tls, AcceptLimits::default());
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
    };
    r.map_err(|e| crate::error::Error::Internal(format!("standby gRPC server: {e}")))
}
