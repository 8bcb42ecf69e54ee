//! Netlink helpers of pod wiring: links, addresses, routes and neighbours.
use super::valid_ifname;
use crate::error::{Errno, NetlinkError};
use crate::netlink::socket::{NlError, NlSocket};
use crate::{Error, Result};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Opens a netlink socket in the calling thread's namespace; `op` names it
/// in the error (`opening netlink socket in pod`).
pub(super) fn open(op: &str) -> Result<NlSocket> {
    NlSocket::new().map_err(|e| e.into_error(op))
}

/// A link as far as wiring cares.
pub(super) struct Link {
    pub index: u32,
    pub mac: [u8; 6],
    pub up: bool,
    pub kind: Option<InfoKind>,
    pub alias: Option<String>,
}

pub(super) fn get_link(nl: &mut NlSocket, name: &str) -> Result<Option<Link>> {
    let mut req = LinkMessage::default();
    req.attributes.push(LinkAttribute::IfName(name.to_string()));
    let op = || format!("looking up link {name}");
    match nl.get(RouteNetlinkMessage::GetLink(req)) {
        Ok(RouteNetlinkMessage::NewLink(l)) => {
            let mut link = Link {
                index: l.header.index,
                mac: [0; 6],
                up: l.header.flags.contains(LinkFlags::Up),
                kind: None,
                alias: None,
            };
            for a in &l.attributes {
                match a {
                    LinkAttribute::Address(m) if m.len() == 6 => link.mac.copy_from_slice(m),
                    LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                    LinkAttribute::LinkInfo(infos) => {
                        for i in infos {
                            if let LinkInfo::Kind(k) = i {
                                link.kind = Some(k.clone());
                            }
                        }
                    }
                    _ => {}
                }
            }
            Ok(Some(link))
        }
        Ok(other) => Err(Error::Netlink(NetlinkError {
            note: Some(format!("unexpected reply {other:?}")),
            ..NetlinkError::new(op(), Errno::EIO)
        })),
        Err(e) if e.errno == Errno::ENODEV => Ok(None),
        Err(e) => Err(e.into_error(op())),
    }
}

/// Whether an interface of that name exists in the calling thread's network
/// namespace. Errors (no netlink) count as "no": [`super::wire_pod`] reports
/// them. Blocking, but a single quick netlink round trip.
pub fn link_exists(name: &str) -> bool {
    valid_ifname(name)
        && NlSocket::new()
            .ok()
            .and_then(|mut nl| get_link(&mut nl, name).ok())
            .flatten()
            .is_some()
}

pub(super) fn set_link_up(nl: &mut NlSocket, index: u32, name: &str) -> Result<()> {
    let mut req = LinkMessage::default();
    req.header.index = index;
    req.header.flags = LinkFlags::Up;
    req.header.change_mask = LinkFlags::Up;
    nl.request(RouteNetlinkMessage::SetLink(req), 0)
        .map_err(|e| e.into_error(format!("setting {name} up")))
}

pub(super) fn delete_link(nl: &mut NlSocket, index: u32) -> std::result::Result<(), NlError> {
    let mut req = LinkMessage::default();
    req.header.index = index;
    nl.request(RouteNetlinkMessage::DelLink(req), 0)
}

/// Deletes a link by name (with its veth peer). A missing link is fine.
///
/// Blocking.
pub fn delete_link_named(name: &str) -> Result<()> {
    let mut nl = open("opening netlink socket")?;
    let Some(link) = get_link(&mut nl, name)? else {
        return Ok(());
    };
    match delete_link(&mut nl, link.index) {
        Ok(()) => Ok(()),
        Err(e) if e.errno == Errno::ENODEV => Ok(()),
        Err(e) => Err(e.into_error(format!("deleting {name}"))),
    }
}

pub(super) fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub(super) fn add_address(nl: &mut NlSocket, index: u32, ifname: &str, addr: IpNet) -> Result<()> {
    let mut req = AddressMessage::default();
    req.header.family = family(addr.addr());
    req.header.prefix_len = addr.prefix_len();
    req.header.index = index;
    req.header.scope = AddressScope::Universe;
    match addr.addr() {
        IpAddr::V4(_) => {
            req.attributes.push(AddressAttribute::Local(addr.addr()));
            req.attributes.push(AddressAttribute::Address(addr.addr()));
        }
        IpAddr::V6(_) => {
            // No duplicate address detection: the address is usable at once
            // (IPAM guarantees uniqueness).
            req.header.flags = AddressHeaderFlags::Nodad;
            req.attributes.push(AddressAttribute::Address(addr.addr()));
            req.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
    }
    nl.request(
        RouteNetlinkMessage::NewAddress(req),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(|e| e.into_error(format!("adding address {addr} to {ifname}")))
}

/// A plain (non-tabby, protocol `boot` like `ip route add`) route through
/// `oif`, optionally via a gateway.
pub(super) fn add_device_route(
    nl: &mut NlSocket,
    dst: IpNet,
    gateway: Option<IpAddr>,
    oif: u32,
    ifname: &str,
) -> Result<()> {
    let mut req = RouteMessage::default();
    req.header.address_family = family(dst.addr());
    req.header.destination_prefix_length = dst.prefix_len();
    req.header.table = RouteHeader::RT_TABLE_MAIN;
    req.header.protocol = RouteProtocol::Boot;
    req.header.kind = RouteType::Unicast;
    req.header.scope = if gateway.is_none() && dst.addr().is_ipv4() {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    if dst.prefix_len() > 0 {
        req.attributes
            .push(RouteAttribute::Destination(dst.addr().into()));
    }
    if let Some(gw) = gateway {
        req.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    req.attributes.push(RouteAttribute::Oif(oif));
    nl.request(
        RouteNetlinkMessage::NewRoute(req),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(|e| {
        let what = match gateway {
            Some(gw) => format!("adding route {dst} via {gw} dev {ifname}"),
            None => format!("adding route {dst} dev {ifname}"),
        };
        // EEXIST here is a stale or foreign route, not our veth existing.
        if e.errno == Errno::EEXIST {
            let mut n = e.into_netlink(what);
            n.note = Some("route exists already".into());
            Error::Netlink(n)
        } else {
            e.into_error(what)
        }
    })
}

pub(super) fn add_permanent_neighbour(
    nl: &mut NlSocket,
    index: u32,
    ifname: &str,
    ip: IpAddr,
    mac: [u8; 6],
) -> Result<()> {
    let mut req = NeighbourMessage::default();
    req.header.family = family(ip);
    req.header.ifindex = index;
    req.header.state = NeighbourState::Permanent;
    req.attributes
        .push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    req.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    nl.request(
        RouteNetlinkMessage::NewNeighbour(req),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(|e| e.into_error(format!("adding neighbour {ip} on {ifname}")))
}

/// Addresses (global scope) of interface `index`.
pub(super) fn link_addresses(nl: &mut NlSocket, index: u32) -> Result<BTreeSet<IpNet>> {
    let mut out = BTreeSet::new();
    for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = AddressMessage::default();
        req.header.family = fam;
        req.header.index = index;
        let msgs = match nl.dump(RouteNetlinkMessage::GetAddress(req)) {
            Ok(m) => m,
            // IPv6 disabled in this namespace: no IPv6 addresses.
            Err(e) if fam == AddressFamily::Inet6 && e.errno == Errno::EAFNOSUPPORT => continue,
            Err(e) => return Err(e.into_error("listing addresses")),
        };
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != index || a.header.scope != AddressScope::Universe {
                continue;
            }
            let mut addr = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => addr = Some(*ip),
                    AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = addr {
                if let Ok(net) = IpNet::new(ip, a.header.prefix_len) {
                    out.insert(net);
                }
            }
        }
    }
    Ok(out)
}

/// A main-table route through one link.
pub(super) struct LinkRoute {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub protocol: RouteProtocol,
}

/// Main-table routes of `fam` through `oif`.
pub(super) fn link_routes(
    nl: &mut NlSocket,
    fam: AddressFamily,
    oif: u32,
) -> Result<Vec<LinkRoute>> {
    let mut req = RouteMessage::default();
    req.header.address_family = fam;
    req.header.table = RouteHeader::RT_TABLE_MAIN;
    req.attributes.push(RouteAttribute::Oif(oif));
    let msgs = nl
        .dump(RouteNetlinkMessage::GetRoute(req))
        .map_err(|e| e.into_error(format!("listing {fam:?} routes")))?;
    let mut out = Vec::new();
    for m in msgs {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        let (mut dst, mut gw, mut dev, mut table) = (None, None, None, u32::from(r.header.table));
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(d) => dst = route_ip(d),
                RouteAttribute::Gateway(g) => gw = route_ip(g),
                RouteAttribute::Oif(o) => dev = Some(*o),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        if dev != Some(oif) || table != u32::from(RouteHeader::RT_TABLE_MAIN) {
            continue;
        }
        let dst = dst.unwrap_or(match fam {
            AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        });
        if let Ok(net) = IpNet::new(dst, r.header.destination_prefix_length) {
            out.push(LinkRoute {
                dst: net,
                gateway: gw,
                protocol: r.header.protocol,
            });
        }
    }
    Ok(out)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// Every veth of this namespace: (name, ifindex, ifalias).
pub(super) fn veths() -> Result<Vec<(String, u32, Option<String>)>> {
    let mut nl = open("opening netlink socket")?;
    let msgs = nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(|e| e.into_error("listing links"))?;
    let mut out = Vec::new();
    for m in msgs {
        let RouteNetlinkMessage::NewLink(l) = m else {
            continue;
        };
        let (mut name, mut alias, mut veth) = (None, None, false);
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::IfAlias(a) => alias = Some(a.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    veth |= infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
                }
                _ => {}
            }
        }
        if let (Some(n), true) = (name, veth) {
            out.push((n, l.header.index, alias));
        }
    }
    Ok(out)
}

/// Veths whose (name, ifalias) satisfy `f`, as (name, ifindex).
pub(super) fn links_matching(f: impl Fn(&str, Option<&str>) -> bool) -> Result<Vec<(String, u32)>> {
    Ok(veths()?
        .into_iter()
        .filter(|(n, _, alias)| f(n, alias.as_deref()))
        .map(|(n, i, _)| (n, i))
        .collect())
}
