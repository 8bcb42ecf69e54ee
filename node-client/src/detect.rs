//! Finds this node's address from the interface of its default route, the way
//! Calico's autodetection does by default ("first-found" on the route's link).
use crate::{Error, Result};
use ipnet::IpNet;
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteType};
use netlink_packet_route::AddressFamily;
use std::net::IpAddr;

/// Index of the interface holding the IPv4 default route of the main table,
/// from a route dump (pure, for tests). Of several, the lowest metric wins,
/// as in the kernel's lookup; a multipath route counts by its first hop.
pub fn default_route_ifindex(routes: &[RouteMessage]) -> Option<u32> {
    routes
        .iter()
        .filter_map(|m| {
            let h = &m.header;
            if h.address_family != AddressFamily::Inet
                || h.destination_prefix_length != 0
                || h.kind != RouteType::Unicast
            {
                return None;
            }
            let (mut table, mut oif, mut metric) = (u32::from(h.table), None, 0);
            for a in &m.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => metric = *p,
                    RouteAttribute::MultiPath(hops) => {
                        oif = oif.or(hops.first().map(|n| n.interface_index))
                    }
                    _ => {}
                }
            }
            (table == u32::from(RouteHeader::RT_TABLE_MAIN)).then_some((metric, oif?))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, oif)| oif)
}

/// Addresses of the default route's interface (IPv4 first).
pub fn node_addresses() -> Result<Vec<IpNet>> {
    let index = default_route_ifindex(&crate::netlink::dump_ipv4_routes()?).ok_or_else(|| {
        Error::Invalid(
            "no IPv4 default route to autodetect the node address from; pass --node-ip".into(),
        )
    })?;
    let iface = nix::net::if_::if_indextoname(index)
        .map_err(|e| Error::Io(format!("name of interface {index}"), e.into()))?
        .to_string_lossy()
        .into_owned();
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (name, a) in interface_addresses()? {
        if name != iface {
            continue;
        }
        match a.addr() {
            IpAddr::V4(_) => v4.push(a),
            IpAddr::V6(ip) if ip.segments()[0] & 0xffc0 != 0xfe80 => v6.push(a),
            IpAddr::V6(_) => {}
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

/// Every interface address of the calling thread's namespace, with the
/// prefix of its subnet.
fn interface_addresses() -> Result<Vec<(String, IpNet)>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(|e| Error::Io("getifaddrs".into(), e.into()))? {
        let Some(addr) = ifa.address else { continue };
        let mask = ifa.netmask;
        let net = if let Some(s) = addr.as_sockaddr_in() {
            let len = mask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(32, |m| u32::from(m.ip()).count_ones() as u8);
            IpNet::new(IpAddr::V4(s.ip()), len).ok()
        } else if let Some(s) = addr.as_sockaddr_in6() {
            let len = mask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in6())
                .map_or(128, |m| u128::from(m.ip()).count_ones() as u8);
            IpNet::new(IpAddr::V6(s.ip()), len).ok()
        } else {
            None
        };
        out.extend(net.map(|n| (ifa.interface_name.clone(), n)));
    }
    Ok(out)
}

/// A `--node-ip` value: `ADDR/LEN` as given, or a bare address with the
/// prefix of the interface that holds it (a host prefix when none does:
/// then CrossSubnet counts every other node as remote).
pub fn with_prefix(s: &str) -> Result<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    let a: IpAddr = s
        .parse()
        .map_err(|_| Error::Invalid(format!("--node-ip {s:?} is not an address or ADDR/LEN")))?;
    Ok(interface_addresses()?
        .into_iter()
        .map(|(_, n)| n)
        .find(|n| n.addr() == a)
        .unwrap_or_else(|| IpNet::from(a)))
}

#[cfg(test)]
mod tests {
    use super::default_route_ifindex;
    use netlink_packet_route::route::{
        RouteAttribute, RouteHeader, RouteMessage, RouteNextHop, RouteType,
    };
    use netlink_packet_route::AddressFamily;

    fn route(prefix: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = prefix;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = RouteType::Unicast;
        m.attributes = attrs;
        m
    }

    #[test]
    fn finds_default_route_iface() {
        let routes = [
            route(16, vec![RouteAttribute::Oif(2)]),
            route(0, vec![RouteAttribute::Oif(3)]),
        ];
        assert_eq!(default_route_ifindex(&routes), Some(3));
        assert_eq!(default_route_ifindex(&routes[..1]), None);
        assert_eq!(default_route_ifindex(&[]), None);
    }

    #[test]
    fn lowest_metric_wins() {
        let routes = [
            route(
                0,
                vec![RouteAttribute::Oif(4), RouteAttribute::Priority(600)],
            ),
            route(
                0,
                vec![RouteAttribute::Oif(5), RouteAttribute::Priority(100)],
            ),
            route(
                0,
                vec![RouteAttribute::Oif(6), RouteAttribute::Priority(100)],
            ),
        ];
        assert_eq!(default_route_ifindex(&routes), Some(5));
    }

    #[test]
    fn only_unicast_in_the_main_table() {
        let mut other_table = route(0, vec![RouteAttribute::Oif(7)]);
        other_table.header.table = 100;
        let mut big_table = route(0, vec![RouteAttribute::Oif(8), RouteAttribute::Table(1000)]);
        big_table.header.table = 252;
        let mut unreachable = route(0, vec![]);
        unreachable.header.kind = RouteType::Unreachable;
        let mut v6 = route(0, vec![RouteAttribute::Oif(9)]);
        v6.header.address_family = AddressFamily::Inet6;
        let routes = [other_table, big_table, unreachable, v6];
        assert_eq!(default_route_ifindex(&routes), None);
    }

    #[test]
    fn multipath_counts_by_its_first_hop() {
        let hop = |i| {
            let mut h = RouteNextHop::default();
            h.interface_index = i;
            h
        };
        let routes = [route(
            0,
            vec![RouteAttribute::MultiPath(vec![hop(11), hop(12)])],
        )];
        assert_eq!(default_route_ifindex(&routes), Some(11));
    }
}
