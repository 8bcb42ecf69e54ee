//! Address math: families, and addresses as ordinals within blocks.
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Family of a network.
    pub fn of_net(n: &IpNet) -> Family {
        match n {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
    /// Family of an address.
    pub fn of(a: &IpAddr) -> Family {
        match a {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    pub(super) fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    /// Allowed block sizes and the default.
    pub(super) fn block_sizes(self) -> (std::ops::RangeInclusive<u8>, u8) {
        match self {
            Family::V4 => (20..=32, 26),
            Family::V6 => (116..=128, 122),
        }
    }
}

pub(super) fn addr_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

pub(super) fn u128_addr(f: Family, v: u128) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// Number of addresses in a block (blocks are /20../32 or /116../128, so it fits).
pub(super) fn block_len(cidr: &IpNet) -> u32 {
    1u32 << (cidr.max_prefix_len() - cidr.prefix_len())
}

pub(super) fn addr_at(cidr: &IpNet, ordinal: u32) -> IpAddr {
    u128_addr(
        Family::of_net(cidr),
        addr_u128(cidr.network()) + ordinal as u128,
    )
}

pub(super) fn ordinal_of(cidr: &IpNet, a: IpAddr) -> u32 {
    (addr_u128(a) - addr_u128(cidr.network())) as u32
}

/// The block of size `prefix` that contains `a`.
pub(super) fn block_of(a: IpAddr, prefix: u8) -> IpNet {
    IpNet::new(a, prefix).expect("prefix validated").trunc()
}

pub(super) fn host_net(a: IpAddr) -> IpNet {
    IpNet::from(a)
}
