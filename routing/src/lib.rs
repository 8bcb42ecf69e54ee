//! The cluster intent model and the one function from intent to what a node
//! installs.
//!
//! The controller evaluates [`desired`] to answer `ShowRoutes` for a node;
//! every `tabby-node` evaluates the same function for itself and installs the
//! result. Nothing here does I/O: plain data in, plain data out.
mod desired;
mod model;

pub use desired::{
    cluster_routes, desired, node_view, route_at, ClusterRoute, ClusterRouteKind, Desired, NatSets,
};
pub use model::{
    BlockIntent, Encapsulation, Intent, IntentDelta, NodeIndex, PoolIntent, Route, RouteTarget,
};
