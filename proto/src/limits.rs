//! Length limits on the identity of a pod attachment, in one place for the
//! CNI plugin, `tabby-node` and the controller, so that all three refuse the
//! same inputs, and before any address is assigned.
//!
//! The IPAM handle of an attachment is `<network name>.<container id>`.
//! `tabby-node` writes it into the host veth's interface alias
//! (`IFLA_IFALIAS`). The kernel caps the alias at `IFALIASZ` = 256 bytes
//! including the terminating NUL that netlink-packet-route sends with it;
//! measured on Linux 6.18: an alias of 254 bytes is set, one of 255 bytes
//! is refused with `ERANGE` ("Attribute failed policy validation"). A longer
//! handle can therefore never be attached.
//!
//! Pure constants and checks; lengths are in bytes (network names and
//! container ids are ASCII by the CNI spec's own rules).

use std::fmt;

/// Longest IPAM handle, `<network name>.<container id>`: the longest
/// interface alias the kernel accepts from tabby-node.
pub const MAX_HANDLE_LEN: usize = 254;

/// Longest network name (the config's `name`): leaves room in the handle for
/// the `.` and a container id of at least one byte.
pub const MAX_NETWORK_NAME_LEN: usize = MAX_HANDLE_LEN - 2;

/// Longest container id (`CNI_CONTAINERID`) on its own: leaves room for a
/// one-byte network name and the `.`. With a given network name the handle
/// limit is usually the tighter one (see [`max_container_id_len`]).
pub const MAX_CONTAINER_ID_LEN: usize = MAX_HANDLE_LEN - 2;

/// Longest interface name (`CNI_IFNAME`): the kernel's `IFNAMSIZ` (16)
/// without the NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// Which limit an attachment's identity is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// The network name is longer than [`MAX_NETWORK_NAME_LEN`].
    NetworkName {
        /// Its length in bytes.
        len: usize,
    },
    /// The container id is longer than [`MAX_CONTAINER_ID_LEN`].
    ContainerId {
        /// Its length in bytes.
        len: usize,
    },
    /// Each part is within its own limit, but the handle is longer than
    /// [`MAX_HANDLE_LEN`].
    Handle {
        /// Length of the network name.
        network_len: usize,
        /// Length of the container id.
        container_id_len: usize,
    },
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NetworkName { len } => write!(
                f,
                "network name is {len} bytes, longer than the limit of {MAX_NETWORK_NAME_LEN}"
            ),
            Self::ContainerId { len } => write!(
                f,
                "container id is {len} bytes, longer than the limit of {MAX_CONTAINER_ID_LEN}"
            ),
            Self::Handle {
                network_len,
                container_id_len,
            } => write!(
                f,
                "handle <network name>.<container id> would be {} bytes \
                 ({network_len} + 1 + {container_id_len}), longer than the limit of \
                 {MAX_HANDLE_LEN} (the host veth's interface alias holds it); with this \
                 network name a container id may have at most {} bytes",
                handle_len(network_len, container_id_len),
                max_container_id_len(network_len)
            ),
        }
    }
}

impl std::error::Error for LimitError {}

/// Length of the handle `<network name>.<container id>` for parts of these lengths.
pub const fn handle_len(network_len: usize, container_id_len: usize) -> usize {
    network_len + 1 + container_id_len
}

/// Longest container id that fits in a handle with a network name of
/// `network_len` bytes (0 if none fits).
pub const fn max_container_id_len(network_len: usize) -> usize {
    MAX_HANDLE_LEN.saturating_sub(network_len + 1)
}

/// `name` as a network name: within [`MAX_NETWORK_NAME_LEN`].
pub fn check_network_name(name: &str) -> Result<(), LimitError> {
    if name.len() > MAX_NETWORK_NAME_LEN {
        return Err(LimitError::NetworkName { len: name.len() });
    }
    Ok(())
}

/// `id` as a container id: within [`MAX_CONTAINER_ID_LEN`].
pub fn check_container_id(id: &str) -> Result<(), LimitError> {
    if id.len() > MAX_CONTAINER_ID_LEN {
        return Err(LimitError::ContainerId { len: id.len() });
    }
    Ok(())
}

/// The whole identity: the network name, the container id, then the
/// handle they make (in that order, so the error names the part that is
/// over on its own before blaming the combination).
pub fn check_attachment(network: &str, container_id: &str) -> Result<(), LimitError> {
    check_network_name(network)?;
    check_container_id(container_id)?;
    if handle_len(network.len(), container_id.len()) > MAX_HANDLE_LEN {
        return Err(LimitError::Handle {
            network_len: network.len(),
            container_id_len: container_id.len(),
        });
    }
    Ok(())
}

/// Whether an already formed handle is within [`MAX_HANDLE_LEN`] (for the
/// controller and the node, which receive handles whole).
pub fn handle_fits(handle: &str) -> bool {
    handle.len() <= MAX_HANDLE_LEN
}

/// Smallest MTU a pod interface may get: IPv4's minimum datagram size.
pub const MIN_MTU: u32 = 68;

/// Largest MTU a pod interface may get (the IPv4 total-length field).
pub const MAX_MTU: u32 = 65535;

/// `mtu` is within [`MIN_MTU`]..=[`MAX_MTU`]; the error says so.
pub fn check_mtu(mtu: u32) -> Result<(), String> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(format!("MTU {mtu} is out of range ({MIN_MTU}..={MAX_MTU})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_kernel_limit() {
        // "k8s-pod-network" (15) + "." + 238 = 254: attached in the lab;
        // one more byte failed with ERANGE after an address was assigned.
        let net = "k8s-pod-network";
        assert_eq!(max_container_id_len(net.len()), 238);
        assert!(check_attachment(net, &"a".repeat(238)).is_ok());
        assert_eq!(
            check_attachment(net, &"a".repeat(239)),
            Err(LimitError::Handle {
                network_len: 15,
                container_id_len: 239
            })
        );
        assert!(handle_fits(&format!("{net}.{}", "a".repeat(238))));
        assert!(!handle_fits(&format!("{net}.{}", "a".repeat(239))));
    }

    #[test]
    fn each_part_is_named_when_it_is_over_on_its_own() {
        let long = "n".repeat(MAX_NETWORK_NAME_LEN + 1);
        assert_eq!(
            check_attachment(&long, "c"),
            Err(LimitError::NetworkName { len: long.len() })
        );
        let id = "c".repeat(MAX_CONTAINER_ID_LEN + 1);
        assert_eq!(
            check_attachment("n", &id),
            Err(LimitError::ContainerId { len: id.len() })
        );
        // The longest of each still fits with the shortest of the other.
        assert!(check_attachment(&"n".repeat(MAX_NETWORK_NAME_LEN), "c").is_ok());
        assert!(check_attachment("n", &"c".repeat(MAX_CONTAINER_ID_LEN)).is_ok());
    }

    #[test]
    fn messages_state_the_limit() {
        let e = check_attachment("k8s-pod-network", &"a".repeat(239)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("255 bytes") && text.contains("254"), "{text}");
        assert!(text.contains("at most 238"), "{text}");
        assert_eq!(max_container_id_len(MAX_HANDLE_LEN), 0);
    }
}
