//! IP address management: pure logic.
//!
//! [`IpamState`] is the in-memory picture of pools, blocks, allocations,
//! handles, nodes and config. Every operation validates first and changes
//! nothing on error; on success it updates the state and returns the
//! [`Mutation`] that makes the same change durable. The owner task
//! ([`crate::owner`]) commits that mutation before anyone hears the answer.

//!
//! The logic is split by responsibility; every part adds methods to
//! [`IpamState`]:
//! - `addr`: address math (families, ordinals within blocks);
//! - `validate`: parsing and checking what requests name;
//! - `records`: per-block and per-pool records, request and answer types;
//! - `state`: the state itself, loading, indices and lookups;
//! - `free`: the unclaimed blocks of a pool, as ranges;
//! - `pools`, `nodes`: pools, nodes and configuration;
//! - `assign`, `release`: handing out and taking back addresses;
//! - `inspect`: utilization, the consistency check and repair;
//! - `routes`: the state as the routing model sees it (`ShowRoutes`);
//! - `tunnels`: VXLAN tunnel addresses, one per node a VXLAN pool selects.

mod addr;
mod assign;
mod free;
mod inspect;
mod nodes;
mod pools;
mod records;
mod release;
mod routes;
pub mod selector;
mod state;
mod tunnels;
mod validate;

pub use addr::Family;
pub use records::{
    AllocationView, AssignRequest, BlockUsage, ConfigUpdate, IpamUsage, LeakRelease, NodeDeletion,
    NodeUsage, PoolUpdate, PoolUsage, Problem, ProblemKind,
};
pub use state::{HandleIndex, IpamState, Loader, NodeHandles, Prepared, Preparer};
pub use tunnels::{
    tunnel_handle, tunnel_handle_node, tunnel_v6_handle, TUNNEL_HANDLE_PREFIX,
    TUNNEL_V6_HANDLE_PREFIX,
};
pub use validate::{parse_addr, parse_cidr};

#[cfg(test)]
pub(crate) mod tests;
