//! The tabby controller: IPAM (pure logic in [`ipam`]), the single owner of
//! IPAM state ([`owner`]), and the gRPC services ([`service`]).

pub mod error;
pub mod ipam;
pub mod owner;
pub mod server;
pub mod service;

pub use error::{Error, Result};
