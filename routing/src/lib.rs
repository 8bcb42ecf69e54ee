//! The cluster intent model and the one function from intent to what a node
//! installs.
//!
//! The controller evaluates [`desired`] to answer `ShowRoutes` for a node;
//! every `tabby-node` evaluates the same function for itself and installs the
//! result. Nothing here does I/O: plain data in, plain data out.
mod desired;
mod model;

pub use desired::{
    cluster_routes, desired, node_view, overlay, route_at, ClusterRoute, ClusterRouteKind, Desired,
    NatSets, Overlay, VtepEntry, VxlanDevice,
};
pub use model::{
    mac_string, parse_mac, vtep_mac, vtep_mac_v6, BlockIntent, Encapsulation, Intent, IntentDelta,
    Mac, NodeIndex, NodeIntent, PoolIntent, Route, RouteTarget, Tunnel, Vtep, VxlanSettings,
};
