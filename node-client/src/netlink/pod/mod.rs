//! Pod wiring: a veth pair with the host side in the
//! node's namespace and the pod side in the pod's, Calico style.
//!
//! [`link`] holds the netlink helpers (links, addresses, routes,
//! neighbours), [`wire`] ADD, [`check`] CHECK, [`attachments`] what DEL, GC
//! and reclaim read and retire.
mod attachments;
mod check;
mod link;
mod wire;

use crate::{Error, Result, VETH_PREFIX};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

pub use attachments::{
    attachment_owners, held_attachment, owned_links, retire_owned, retired_links,
};
pub use check::check_pod;
pub use link::{delete_link_named, link_exists};
pub use wire::wire_pod;

/// What to wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's network namespace (`/var/run/netns/x`, `/proc/<pid>/ns/net`).
    pub netns_path: PathBuf,
    /// Host-side veth name, from [`host_veth_name`].
    pub host_ifname: String,
    /// Pod-side interface name (`CNI_IFNAME`, usually `eth0`).
    pub pod_ifname: String,
    /// Pod addresses: host prefixes only (`/32`, `/128`).
    pub addresses: Vec<IpNet>,
    /// MTU of both ends.
    pub mtu: u32,
    /// The IPAM handle owning this attachment, kept as the host veth's
    /// ifalias: DEL and GC remove only veths their handle owns, so a late DEL
    /// of an old sandbox cannot remove the new sandbox's veth of the same name.
    pub owner: String,
}

/// What [`wire_pod`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WiredPod {
    /// Host-side veth name.
    pub host_ifname: String,
    /// Host-side MAC, `ee:ee:ee:ee:ee:ee` ([`crate::HOST_VETH_MAC`]).
    pub host_mac: String,
    /// Pod-side interface name.
    pub pod_ifname: String,
    /// Pod-side MAC (chosen by the kernel), `aa:bb:cc:dd:ee:ff` form.
    pub pod_mac: String,
    /// Host-side interface index (in the node's namespace).
    pub host_ifindex: u32,
    /// Pod-side interface index (in the pod's namespace).
    pub pod_ifindex: u32,
}

/// A pod attachment as this node's kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldAttachment {
    /// The IPAM handle in the host veth's ifalias.
    pub owner: String,
    /// The host veth.
    pub host_ifname: String,
    /// Destinations of tabby's host routes through it (the pod's addresses).
    pub addresses: Vec<IpAddr>,
}

/// Prefix of host veths that DEL took out of service and that wait for
/// deletion (see [`retire_owned`]).
pub const RETIRED_PREFIX: &str = "tabz";

/// `tab` + the first 12 hex digits of sha1(`key`): 15 characters, the
/// kernel's limit. `key` is `<namespace>.<pod>` for Kubernetes pods and the
/// container id otherwise.
pub fn host_veth_name(key: &str) -> String {
    let hex = sha1_smol::Sha1::from(key).digest().to_string();
    format!("{VETH_PREFIX}{}", &hex[..12])
}

/// `ee:ee:ee:ee:ee:ee` formatting, as CNI results want it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

fn validate(spec: &PodSpec) -> Result<()> {
    for (what, name) in [("host", &spec.host_ifname), ("pod", &spec.pod_ifname)] {
        if !valid_ifname(name) {
            return Err(Error::Invalid(format!(
                "bad {what} interface name {name:?}"
            )));
        }
    }
    if spec.addresses.is_empty() {
        return Err(Error::Invalid("pod has no addresses".into()));
    }
    let mut seen = BTreeSet::new();
    for a in &spec.addresses {
        if a.prefix_len() != a.max_prefix_len() {
            return Err(Error::Invalid(format!(
                "pod address {a} is not a host prefix (/32 or /128)"
            )));
        }
        if !seen.insert(a.addr()) {
            return Err(Error::Invalid(format!("pod address {a} given twice")));
        }
    }
    Ok(())
}

fn has_v4(spec: &PodSpec) -> bool {
    spec.addresses.iter().any(|a| a.addr().is_ipv4())
}

fn has_v6(spec: &PodSpec) -> bool {
    spec.addresses.iter().any(|a| a.addr().is_ipv6())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HOST_VETH_MAC;

    #[test]
    fn veth_names() {
        // printf default.nginx | sha1sum -> c440f455693b69cd...
        assert_eq!(host_veth_name("default.nginx"), "tabc440f455693b");
        assert_eq!(host_veth_name("abc").len(), 15);
    }

    #[test]
    fn macs() {
        assert_eq!(format_mac(&HOST_VETH_MAC), "ee:ee:ee:ee:ee:ee");
        assert_eq!(format_mac(&[0, 1, 2, 0xa, 0xb, 0xff]), "00:01:02:0a:0b:ff");
    }

    fn spec(addrs: &[&str]) -> PodSpec {
        PodSpec {
            owner: String::new(),
            netns_path: "/var/run/netns/x".into(),
            host_ifname: host_veth_name("x"),
            pod_ifname: "eth0".into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            mtu: 1500,
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&spec(&["10.0.0.1/32", "fd00::1/128"])).is_ok());
        assert!(matches!(validate(&spec(&[])), Err(Error::Invalid(_))));
        assert!(matches!(
            validate(&spec(&["10.0.0.1/24"])),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            validate(&spec(&["10.0.0.1/32", "10.0.0.1/32"])),
            Err(Error::Invalid(_))
        ));
        let mut s = spec(&["10.0.0.1/32"]);
        s.host_ifname = "this-name-is-too-long".into();
        assert!(matches!(validate(&s), Err(Error::Invalid(_))));
        s.host_ifname = "a/b".into();
        assert!(matches!(validate(&s), Err(Error::Invalid(_))));
    }
}
