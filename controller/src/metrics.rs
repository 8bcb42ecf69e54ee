//! The controller's Prometheus metrics (`--metrics-listen`). Counters and
//! histograms are recorded where things happen; IPAM figures are read from
//! the published snapshot when scraped.
use crate::ipam::IpamState;
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use std::sync::OnceLock;
use tabby_runtime::metrics::{encode_registry, latency_buckets, GrpcMetrics, Labels};

/// Every metric of the controller.
pub struct Metrics {
    registry: Registry,
    /// gRPC calls by method and code, and their latency.
    pub grpc: GrpcMetrics,
    /// Time to make one group commit durable.
    pub commit: Histogram,
    /// Requests per group commit.
    pub group: Histogram,
    /// Lagging intent watchers resynchronised, by kind (`ring`, `snapshot`).
    pub resyncs: Family<Labels, Counter>,
    /// Open intent streams.
    pub watchers: Gauge,
    pool_addresses: Family<Labels, Gauge>,
    node_blocks: Family<Labels, Gauge>,
    node_addresses: Family<Labels, Gauge>,
    borrowed: Gauge,
    revision: Gauge,
}

/// The controller's metrics (one set per process).
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut r = Registry::default();
        let grpc = GrpcMetrics::register(&mut r, "tabby");
        let m = Metrics {
            grpc,
            commit: latency_buckets(),
            group: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            resyncs: Family::default(),
            watchers: Gauge::default(),
            pool_addresses: Family::default(),
            node_blocks: Family::default(),
            node_addresses: Family::default(),
            borrowed: Gauge::default(),
            revision: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "tabby_store_commit_duration_seconds",
            "Time to make one group commit durable (flush)",
            m.commit.clone(),
        );
        r.register(
            "tabby_store_commit_group_size",
            "Requests folded into one group commit",
            m.group.clone(),
        );
        r.register(
            "tabby_intent_resyncs",
            "Lagging intent watchers resynchronised, by kind (ring: from recent deltas; snapshot)",
            m.resyncs.clone(),
        );
        r.register(
            "tabby_intent_watchers",
            "Open intent streams",
            m.watchers.clone(),
        );
        r.register(
            "tabby_intent_revision",
            "Store revision of the state readers and watchers see",
            m.revision.clone(),
        );
        r.register(
            "tabby_ipam_pool_addresses",
            "Addresses of each pool, by state (used, free)",
            m.pool_addresses.clone(),
        );
        r.register(
            "tabby_ipam_node_blocks",
            "Blocks affine to each node",
            m.node_blocks.clone(),
        );
        r.register(
            "tabby_ipam_node_addresses",
            "Addresses each node holds",
            m.node_addresses.clone(),
        );
        r.register(
            "tabby_ipam_borrowed_addresses",
            "Addresses held by a node from another node's block",
            m.borrowed.clone(),
        );
        Metrics { registry: r, ..m }
    })
}

impl Metrics {
    /// The metrics text, with the IPAM figures of `st` at revision `rev`.
    pub fn render(&self, st: &IpamState, rev: u64) -> String {
        let u = st.usage(false);
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.revision.set(g(rev));
        // Pools and nodes come and go: start from empty each time.
        self.pool_addresses.clear();
        for p in &u.pools {
            for (state, v) in [("used", p.used), ("free", p.size.saturating_sub(p.used))] {
                self.pool_addresses
                    .get_or_create(&vec![
                        ("pool".into(), p.pool.name.clone()),
                        ("state".into(), state.into()),
                    ])
                    .set(g(v));
            }
        }
        self.node_blocks.clear();
        self.node_addresses.clear();
        let mut borrowed = 0;
        for n in &u.nodes {
            let l = vec![("node".into(), n.name.clone())];
            self.node_blocks
                .get_or_create(&l)
                .set(g(n.blocks.len() as u64));
            self.node_addresses.get_or_create(&l).set(g(n.addresses));
            borrowed += n.borrowed;
        }
        self.borrowed.set(g(borrowed));
        encode_registry(&self.registry)
    }
}
