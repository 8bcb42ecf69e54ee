//! The tabby controller: IPAM (pure logic in [`ipam`]), the single owner of
//! IPAM state ([`owner`]), and the gRPC services ([`service`]).

pub mod auth;
pub mod bgp;
pub mod convert;
pub mod error;
pub mod heavy;
pub mod intent;
pub mod ipam;
pub mod metrics;
pub mod owner;
pub mod server;
pub mod service;
pub mod standby;
pub mod watch;

pub use error::{Error, Result};
