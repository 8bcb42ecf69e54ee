//! tabby-node's Prometheus metrics (`--metrics-listen`): the CNI socket's
//! calls by verb and code with latency (one layer), and, read from the
//! node's status when scraped, the applied intent revision, the routes
//! installed, whether the intent stream is up, and whether the last
//! reconcile failed.
use crate::daemon::{lock_status, SharedStatus};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::OnceLock;
use tabby_runtime::metrics::{encode_registry, latency_buckets, GrpcMetrics};

/// Every metric of tabby-node.
pub struct Metrics {
    registry: Registry,
    /// CNI socket calls (`/tabby.v1.PodNetwork/Add`, ...) by code, and latency.
    pub cni: GrpcMetrics,
    /// From the controller's commit of a change to that change being in
    /// this node's kernel.
    pub convergence: Histogram,
    /// Time to apply one route plan over netlink.
    pub route_apply: Histogram,
    /// `tabby` nftables tables rewritten because they differed from what
    /// tabby wrote.
    pub nft_repairs: Counter,
    revision: Gauge,
    routes: Gauge,
    connected: Gauge,
    registered: Gauge,
    failing: Gauge,
}

/// tabby-node's metrics (one set per process).
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut r = Registry::default();
        let cni = GrpcMetrics::register(&mut r, "tabby_node_cni");
        let m = Metrics {
            cni,
            convergence: latency_buckets(),
            route_apply: latency_buckets(),
            nft_repairs: Counter::default(),
            revision: Gauge::default(),
            routes: Gauge::default(),
            connected: Gauge::default(),
            registered: Gauge::default(),
            failing: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "tabby_node_convergence_delay_seconds",
            "From the controller's commit of an intent change (carried in the update) to the change being in this node's kernel",
            m.convergence.clone(),
        );
        r.register(
            "tabby_node_route_apply_duration_seconds",
            "Time to apply one route plan over netlink",
            m.route_apply.clone(),
        );
        r.register(
            "tabby_node_nft_repairs",
            "tabby nftables tables rewritten because they differed from what tabby wrote",
            m.nft_repairs.clone(),
        );
        r.register(
            "tabby_node_intent_revision",
            "Revision of the controller's intent applied to this node's kernel",
            m.revision.clone(),
        );
        r.register(
            "tabby_node_routes",
            "tabby routes (proto 77) wanted after the last reconcile",
            m.routes.clone(),
        );
        r.register(
            "tabby_node_controller_connected",
            "1 while the intent stream from the controller is up",
            m.connected.clone(),
        );
        r.register(
            "tabby_node_registered",
            "1 once this node registered with the controller",
            m.registered.clone(),
        );
        r.register(
            "tabby_node_reconcile_failing",
            "1 while the last reconcile left an error (see the Status call)",
            m.failing.clone(),
        );
        Metrics { registry: r, ..m }
    })
}

impl Metrics {
    /// The metrics text, with the status figures of now.
    pub fn render(&self, st: &SharedStatus) -> String {
        {
            let s = lock_status(st);
            self.revision
                .set(i64::try_from(s.revision).unwrap_or(i64::MAX));
            self.routes.set(i64::try_from(s.routes).unwrap_or(i64::MAX));
            self.connected.set(i64::from(s.watching));
            self.registered.set(i64::from(s.registered));
            self.failing.set(i64::from(s.last_error.is_some()));
        }
        encode_registry(&self.registry)
    }
}
