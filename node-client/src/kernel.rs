//! What the reconciler needs from the kernel, as plain data and a trait, so
//! the planner and executor can be tested against a fake kernel.
use ipnet::IpNet;
use std::net::IpAddr;

/// Where a tabby route sends traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteTarget {
    /// `<dst> via <gateway>` (resolved on-link by the kernel).
    Via(IpAddr),
    /// `blackhole <dst>`.
    Blackhole,
}

/// A route tabby owns (protocol [`crate::ROUTE_PROTOCOL`], main table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Target.
    pub target: RouteTarget,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.target {
            RouteTarget::Via(gw) => write!(f, "{} via {}", self.dst, gw),
            RouteTarget::Blackhole => write!(f, "blackhole {}", self.dst),
        }
    }
}

/// Route operations on one network namespace.
pub trait RouteTable {
    /// Every route of protocol [`crate::ROUTE_PROTOCOL`] in the main table (both families).
    fn list(&mut self) -> crate::Result<Vec<Route>>;
    /// Installs routes; returns one result per route, in order.
    fn add(&mut self, routes: &[Route]) -> Vec<crate::Result<()>>;
    /// Removes routes; returns one result per route, in order.
    fn del(&mut self, routes: &[Route]) -> Vec<crate::Result<()>>;
}
