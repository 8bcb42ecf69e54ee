//! Prometheus metrics: the `/metrics` endpoint both daemons serve on
//! `--metrics-listen`, and the gRPC request metrics both record with one
//! layer. Each daemon owns its registry; this module owns none.
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};
use tonic::codegen::{http, BoxFuture, Service};

/// A metric's labels, in order.
pub type Labels = Vec<(String, String)>;

/// Latency buckets from 100 µs to about 13 s, doubling.
pub fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// gRPC calls served, by method and status code, and their latency (to the
/// response headers: for a stream, its start).
#[derive(Clone)]
pub struct GrpcMetrics {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl GrpcMetrics {
    /// Registers `<prefix>_grpc_requests_total` and
    /// `<prefix>_grpc_request_duration_seconds` in `r`.
    pub fn register(r: &mut Registry, prefix: &str) -> Self {
        let m = GrpcMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_buckets),
        };
        r.register(
            format!("{prefix}_grpc_requests"),
            "gRPC calls served, by method and status code",
            m.requests.clone(),
        );
        r.register(
            format!("{prefix}_grpc_request_duration_seconds"),
            "Time from a gRPC call's arrival to its response headers, by method",
            m.duration.clone(),
        );
        m
    }

    /// Records one call.
    pub fn record(&self, method: &str, code: tonic::Code, seconds: f64) {
        let code = format!("{code:?}");
        self.requests
            .get_or_create(&vec![
                ("method".into(), method.to_string()),
                ("code".into(), code),
            ])
            .inc();
        self.duration
            .get_or_create(&vec![("method".into(), method.to_string())])
            .observe(seconds);
    }
}

/// The status code of a response: from its headers when the call ended
/// there (every refusal), else OK.
pub fn response_code<B>(resp: &http::Response<B>) -> tonic::Code {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

/// Records every call of a server in [`GrpcMetrics`].
#[derive(Clone)]
pub struct GrpcMetricsLayer(pub GrpcMetrics);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            m: self.0.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] makes.
#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    m: GrpcMetrics,
}

impl<S, B> Service<http::Request<B>> for GrpcMetricsService<S>
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let m = self.m.clone();
        let method = req.uri().path().to_string();
        let t0 = Instant::now();
        Box::pin(async move {
            let resp = inner.call(req).await?;
            m.record(&method, response_code(&resp), t0.elapsed().as_secs_f64());
            Ok(resp)
        })
    }
}

/// Renders the metrics text (values that are read at scrape time are
/// updated by the render function first).
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// `registry` in the text exposition format.
pub fn encode_registry(registry: &Registry) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut s, registry);
    s
}

/// Serves `GET /metrics` on `listener` with what `render` returns, until
/// `shutdown` resolves. Any other path is 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()> + Send,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let render = render.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let render = render.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            http::Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(render().await)))
                        } else {
                            http::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                        };
                        Ok::<_, http::Error>(resp.unwrap_or_default())
                    }
                });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
