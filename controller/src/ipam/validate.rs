//! Validation of what requests name: CIDRs, addresses, object names and
//! handles. Each check says how to fix the input.
use crate::error::{Error, Result};
use ipnet::IpNet;
use std::net::IpAddr;

/// Parses a CIDR whose host bits must be zero.
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    let n: IpNet = s.trim().parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{s:?} is not a CIDR; write it as address/prefix, e.g. 10.244.0.0/16 or fd00:10:244::/48"
        ))
    })?;
    if n.trunc() != n {
        return Err(Error::InvalidArgument(format!(
            "{n} has host bits set; did you mean {}?",
            n.trunc()
        )));
    }
    Ok(n)
}

/// Parses an IP address.
pub fn parse_addr(s: &str) -> Result<IpAddr> {
    s.trim().parse().map_err(|_| {
        Error::InvalidArgument(format!("{s:?} is not an IP address (e.g. 10.244.1.5)"))
    })
}

pub(super) fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} name {s:?} is invalid: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        )))
    }
}

pub(super) fn check_handle(h: &str) -> Result<()> {
    use tabby_proto::limits::MAX_HANDLE_LEN;
    if h.len() > MAX_HANDLE_LEN {
        return Err(Error::InvalidArgument(format!(
            "handle of {} bytes is too long: at most {MAX_HANDLE_LEN} (a node keeps it in the pod's host veth alias)",
            h.len()
        )));
    }
    if h.is_empty() || h.chars().any(|c| c.is_control() || c == '/') {
        return Err(Error::InvalidArgument(format!(
            "handle {h:?} is invalid: want <network-name>.<container-id>, 1..{MAX_HANDLE_LEN} printable characters, no '/'"
        )));
    }
    Ok(())
}
