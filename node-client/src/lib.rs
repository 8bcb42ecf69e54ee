//! tabby-node: applies the controller's route and NAT intent to this node's
//! kernel and wires pods for the CNI plugin.
//!
//! Layout: [`plan`] is pure (intent + actual kernel state in, list of changes
//! out); [`kernel`] defines what the executor can do, with the real netlink
//! implementation in [`netlink`] and the nftables one in [`nft`].

pub mod bgp;
pub mod cni_server;
pub mod controller;
pub mod daemon;
pub mod detect;
pub mod error;
pub mod install;
pub mod kernel;
pub mod metrics;
pub mod netlink;
pub mod nft;
pub mod nft_monitor;
pub mod peer;
pub mod plan;
pub mod reaper;
pub mod reconciler;

pub use error::{Error, Result};

/// Route protocol number on every route tabby installs (`ip route` shows
/// `proto 77`). Routes of any other protocol are never touched.
pub const ROUTE_PROTOCOL: u8 = 77;

/// Gateway the pod's default route points at (answered by proxy ARP).
pub const POD_GATEWAY_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

/// IPv6 gateway of pods.
pub const POD_GATEWAY_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// MAC of every host-side veth.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// Prefix of host-side veth names.
pub const VETH_PREFIX: &str = "tab";
