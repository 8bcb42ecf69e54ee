//! Finds this node's address from the interface of its default route, the way
//! Calico's autodetection does by default ("first-found" on the route's link).
use crate::{Error, Result};
use std::net::IpAddr;

/// Name of the interface holding the IPv4 default route, from `/proc/net/route`
/// text (pure, for tests).
pub fn default_iface(proc_net_route: &str) -> Option<String> {
    proc_net_route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask
        (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// Addresses of the default route's interface (IPv4 first).
pub fn node_addresses() -> Result<Vec<IpAddr>> {
    let routes = std::fs::read_to_string("/proc/net/route")
        .map_err(|e| Error::Io("/proc/net/route".into(), e))?;
    let iface = default_iface(&routes).ok_or_else(|| {
        Error::Invalid(
            "no IPv4 default route to autodetect the node address from; pass --node-ip".into(),
        )
    })?;
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(|e| Error::Io("getifaddrs".into(), e.into()))? {
        if ifa.interface_name != iface {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        if let Some(s) = addr.as_sockaddr_in() {
            v4.push(IpAddr::V4(s.ip()));
        } else if let Some(s) = addr.as_sockaddr_in6() {
            let ip = s.ip();
            if ip.segments()[0] & 0xffc0 != 0xfe80 {
                v6.push(IpAddr::V6(ip));
            }
        }
    }
    v4.extend(v6);
    if v4.is_empty() {
        return Err(Error::Invalid(format!(
            "interface {iface} (default route) has no address; pass --node-ip"
        )));
    }
    Ok(v4)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_default_route_iface() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                 eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(super::default_iface(t).as_deref(), Some("eth0"));
        assert_eq!(super::default_iface("Iface\n"), None);
    }
}
