//! `tabby.v1.IntentStream`, written by hand instead of generated so that its
//! responses are [`PreEncoded`]: each update is encoded once on the owner
//! thread and every stream only copies the bytes. On the wire it is exactly
//! the generated `IntentUpdate` stream (clients use the generated client).
use crate::{
    intent::{Encoded, PreEncoded},
    owner::Ipam,
};
use futures::{stream, Stream};
use std::{collections::VecDeque, pin::Pin, sync::Arc};
use tabby_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tonic::{
    codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError},
    server::{NamedService, ServerStreamingService},
    Request, Response, Status,
};

type WatchStream = Pin<Box<dyn Stream<Item = Result<PreEncoded, Status>> + Send>>;

/// The IntentStream server. Wrap it in the node identity interceptor.
#[derive(Clone)]
pub struct IntentStreamServer {
    ipam: Ipam,
}

impl IntentStreamServer {
    /// Serves intent from the IPAM owner.
    pub fn new(ipam: Ipam) -> Self {
        IntentStreamServer { ipam }
    }
}

impl NamedService for IntentStreamServer {
    const NAME: &'static str = "tabby.v1.IntentStream";
}

struct Watcher {
    ipam: Ipam,
    node: String,
    pending: VecDeque<Arc<Encoded>>,
    live: tokio::sync::broadcast::Receiver<Arc<Encoded>>,
    last: u64,
}

async fn next(mut w: Watcher) -> Option<(Result<PreEncoded, Status>, Watcher)> {
    loop {
        if let Some(e) = w.pending.pop_front() {
            // Skip what the client already has (a delta racing a resync).
            if e.base != 0 && e.revision <= w.last {
                continue;
            }
            w.last = e.revision;
            return Some((Ok(PreEncoded(e.bytes.clone())), w));
        }
        match w.live.recv().await {
            Ok(e) => w.pending.push_back(e),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(node = %w.node, missed = n, "slow intent watcher: resynchronising");
                match w.ipam.watch(w.last).await {
                    Ok(s) => {
                        w.pending = s.initial.into();
                        w.live = s.live;
                    }
                    Err(e) => return Some((Err(e.into()), w)),
                }
            }
            // The tracker was replaced (store reload) or the controller stops.
            Err(RecvError::Closed) => return None,
        }
    }
}

struct WatchSvc(Ipam);

impl ServerStreamingService<pb::WatchRequest> for WatchSvc {
    type Response = PreEncoded;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<Response<WatchStream>, Status>;

    fn call(&mut self, req: Request<pb::WatchRequest>) -> Self::Future {
        let ipam = self.0.clone();
        Box::pin(async move {
            let node = req
                .extensions()
                .get::<crate::service::NodeIdentity>()
                .map(|n| n.0.clone())
                .ok_or_else(|| Status::unauthenticated("no node identity on this call"))?;
            let since = req.into_inner().since_revision;
            let start = ipam.watch(since).await?;
            tracing::info!(%node, since, initial = start.initial.len(), "intent watcher connected");
            let w = Watcher {
                ipam,
                node,
                pending: start.initial.into(),
                live: start.live,
                last: since,
            };
            let s: WatchStream = Box::pin(stream::unfold(w, next));
            Ok(Response::new(s))
        })
    }
}

impl<B> Service<http::Request<B>> for IntentStreamServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ipam = self.ipam.clone();
        match req.uri().path() {
            "/tabby.v1.IntentStream/Watch" => Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<PreEncoded, pb::WatchRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.server_streaming(WatchSvc(ipam), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}
