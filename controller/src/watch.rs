//! `tabby.v1.IntentStream`, written by hand instead of generated so that its
//! responses are [`PreEncoded`]: each update is encoded once on the owner
//! thread and every stream only copies the bytes. On the wire it is exactly
//! the generated `IntentUpdate` stream (clients use the generated client).
use crate::{
    auth::caller,
    intent::{Encoded, PreEncoded, ResumeFrom},
    owner::Ipam,
};
use futures::{stream, Stream};
use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex},
};
use tabby_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tonic::{
    codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError},
    server::{NamedService, ServerStreamingService},
    Request, Response, Status,
};

type WatchStream = Pin<Box<dyn Stream<Item = Result<PreEncoded, Status>> + Send>>;

/// The IntentStream server. Serve it behind [`AuthLayer`](crate::auth::AuthLayer).
#[derive(Clone)]
pub struct IntentStreamServer {
    ipam: Ipam,
    stop: StopSignal,
    limit: StreamLimit,
}

/// Bounds the intent streams one node identity holds at once: a node needs
/// one (two while it reconnects), so a client opening more is refused
/// RESOURCE_EXHAUSTED rather than growing the controller's fan-out.
#[derive(Clone)]
pub struct StreamLimit {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamLimit {
    /// At most `max` streams per identity.
    pub fn new(max: usize) -> Self {
        StreamLimit {
            max: max.max(1),
            open: Arc::default(),
        }
    }

    fn acquire(&self, node: &str) -> Result<StreamSlot, Status> {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(node.to_string()).or_insert(0);
        if *n >= self.max {
            tracing::warn!(%node, open = *n, "intent stream refused: too many open for this node");
            return Err(Status::resource_exhausted(format!(
                "node {node:?} already holds {} intent streams, the most one node may hold",
                self.max
            )));
        }
        *n += 1;
        crate::metrics::metrics().watchers.inc();
        Ok(StreamSlot {
            limit: self.clone(),
            node: node.to_string(),
        })
    }
}

/// One open stream, counted until it ends.
struct StreamSlot {
    limit: StreamLimit,
    node: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        crate::metrics::metrics().watchers.dec();
        let mut m = self.limit.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.node);
            }
        }
    }
}

/// Ends every intent stream once it reads true. Watch streams never end on
/// their own, and a graceful server shutdown waits for open streams.
pub type StopSignal = tokio::sync::watch::Receiver<bool>;

impl IntentStreamServer {
    /// Serves intent from the IPAM owner until `stop` turns true.
    pub fn new(ipam: Ipam, stop: StopSignal, limit: StreamLimit) -> Self {
        IntentStreamServer { ipam, stop, limit }
    }
}

impl NamedService for IntentStreamServer {
    const NAME: &'static str = "tabby.v1.IntentStream";
}

struct Watcher {
    ipam: Ipam,
    stop: StopSignal,
    node: String,
    _slot: StreamSlot,
    pending: VecDeque<Arc<Encoded>>,
    live: tokio::sync::broadcast::Receiver<Arc<Encoded>>,
    last: u64,
}

async fn next(mut w: Watcher) -> Option<(Result<PreEncoded, Status>, Watcher)> {
    loop {
        if let Some(e) = w.pending.pop_front() {
            // Skip what the client already has (a delta racing a resync).
            if !e.snapshot && !e.caught_up && e.revision <= w.last {
                continue;
            }
            w.last = e.revision;
            return Some((Ok(PreEncoded(e.bytes.clone())), w));
        }
        let recv = tokio::select! {
            r = w.live.recv() => r,
            _ = w.stop.wait_for(|s| *s) => {
                tracing::info!(node = %w.node, "controller stopping: intent stream ended");
                return None;
            }
        };
        match recv {
            Ok(e) => w.pending.push_back(e),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(node = %w.node, missed = n, "slow intent watcher: resynchronising");
                // `last` is the client's validated resume point or a
                // revision this process sent: this store and epoch.
                match w.ipam.watch(w.last, None).await {
                    Ok(s) => {
                        let kind = if s.initial.first().is_some_and(|e| e.snapshot) {
                            "snapshot"
                        } else {
                            "ring"
                        };
                        crate::metrics::metrics()
                            .resyncs
                            .get_or_create(&vec![("kind".into(), kind.into())])
                            .inc();
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

struct WatchSvc(Ipam, StopSignal, StreamLimit);

impl ServerStreamingService<pb::WatchRequest> for WatchSvc {
    type Response = PreEncoded;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<Response<WatchStream>, Status>;

    fn call(&mut self, req: Request<pb::WatchRequest>) -> Self::Future {
        let (ipam, stop, limit) = (self.0.clone(), self.1.clone(), self.2.clone());
        Box::pin(async move {
            let node = caller(&req)?;
            let slot = limit.acquire(&node)?;
            let req = req.into_inner();
            let since = req.since_revision;
            let from = ResumeFrom {
                store_id: req.store_id,
                epoch: req.epoch,
            };
            let start = ipam.watch(since, Some(from)).await?;
            let snapshot = start.initial.first().is_some_and(|e| e.snapshot);
            tracing::info!(%node, since, snapshot, initial = start.initial.len(), "intent watcher connected");
            let w = Watcher {
                ipam,
                stop,
                node,
                _slot: slot,
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
        let (ipam, stop, limit) = (self.ipam.clone(), self.stop.clone(), self.limit.clone());
        match req.uri().path() {
            "/tabby.v1.IntentStream/Watch" => Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<PreEncoded, pb::WatchRequest>::default();
                // A WatchRequest is a few dozen bytes.
                let mut grpc = tonic::server::Grpc::new(codec).max_decoding_message_size(64 << 10);
                Ok(grpc
                    .server_streaming(WatchSvc(ipam, stop, limit), req)
                    .await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        intent::{RING, WATCH_BUFFER},
        ipam::{tests::pool, AssignRequest},
    };
    use futures::StreamExt;
    use prost::Message;
    use tabby_store::{Node, Store};

    /// A watcher that reads nothing while more than its buffer of updates is
    /// published lags; on its next read it is resynchronised: from the ring of
    /// recent deltas while they reach back far enough, else with a snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lagging_watchers_are_resynced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (ipam, owner) = Ipam::start(store).unwrap();
        ipam.call(|s| s.create_pool(pool("p", "10.0.0.0/8", 30)))
            .await
            .unwrap();
        ipam.call(|s| {
            s.register_node(Node {
                name: "n".into(),
                ..Default::default()
            })
        })
        .await
        .unwrap();
        let claim = |k: usize| {
            let ipam = ipam.clone();
            async move {
                // Every 4th address of a /30 pool is a new block: one delta per claim.
                let a = std::net::Ipv4Addr::from(0x0a00_0000u32 + 4 * k as u32 + 1);
                ipam.call(move |s| {
                    s.assign(
                        "n",
                        AssignRequest {
                            handle: format!("h{k}"),
                            requested: vec![a.into()],
                            ..Default::default()
                        },
                    )
                })
                .await
                .unwrap()
                .1
            }
        };
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let limit = StreamLimit::new(8);
        let watcher = |since: u64, start: crate::intent::WatchStart| Watcher {
            ipam: ipam.clone(),
            stop: stop.clone(),
            node: "w".into(),
            _slot: limit.acquire("w").unwrap(),
            pending: start.initial.into(),
            live: start.live,
            last: since,
        };
        let drain = |w: Watcher, upto: u64| async move {
            let mut s = Box::pin(stream::unfold(w, next));
            let mut got = Vec::new();
            loop {
                let u = pb::IntentUpdate::decode(s.next().await.unwrap().unwrap().0).unwrap();
                let rev = u.revision;
                got.push(u);
                if rev >= upto {
                    return got;
                }
            }
        };

        // Lag past the buffer but within the ring: resynced with deltas.
        let w1 = watcher(0, ipam.watch(0, None).await.unwrap());
        let mut last = 0;
        for k in 0..WATCH_BUFFER + 100 {
            last = claim(k).await;
        }
        let got = drain(w1, last).await;
        assert!(got[0].snapshot, "first the snapshot");
        let blocks: usize = got.iter().map(|u| u.blocks.len()).sum();
        assert_eq!(
            blocks,
            WATCH_BUFFER + 100,
            "every block arrives exactly once"
        );
        assert!(got[1..].iter().all(|u| !u.snapshot));

        // Lag past the ring too: resynced with a snapshot.
        let w2 = watcher(last, ipam.watch(last, None).await.unwrap());
        for k in WATCH_BUFFER + 100..WATCH_BUFFER + 100 + RING + 10 {
            last = claim(k).await;
        }
        let got = drain(w2, last).await;
        assert!(
            got.iter().any(|u| u.snapshot),
            "a snapshot replaces the lost history"
        );
        let snap = got.iter().rposition(|u| u.snapshot).unwrap();
        let total: usize = got[snap..].iter().map(|u| u.blocks.len()).sum();
        assert_eq!(
            total,
            WATCH_BUFFER + 100 + RING + 10,
            "after it, the complete block set"
        );
        drop(ipam);
        owner.join().unwrap();
    }
}

#[cfg(test)]
mod limit_tests {
    use super::StreamLimit;

    #[test]
    fn streams_per_identity_are_bounded_and_freed() {
        let l = StreamLimit::new(2);
        let a = l.acquire("n1").unwrap();
        let _b = l.acquire("n1").unwrap();
        let e = l.acquire("n1").err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let _c = l.acquire("n2").expect("another node has its own bound");
        drop(a);
        let _d = l.acquire("n1").expect("an ended stream frees its slot");
    }
}
