//! tabby's routes (protocol [`crate::ROUTE_PROTOCOL`], main table) and the
//! monitor that reports their deletion.
use super::socket::{grow_rcvbuf, parse_datagram, NlError, NlSocket, Reply};
use crate::kernel::{Route, RouteTable, RouteTarget};
use crate::{error::Errno, Error, Result, ROUTE_PROTOCOL};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType, RouteVia,
};
use netlink_packet_route::{
    address::AddressScope,
    link::{LinkAttribute, LinkMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::MsgFlags;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use tabby_routing::Tunnel;
use tokio::io::unix::{AsyncFd, AsyncFdRegisterError};

const RT_TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;
/// Multicast groups of IPv4 and IPv6 route changes (RTMGRP_IPV4_ROUTE,
/// RTMGRP_IPV6_ROUTE).
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
/// Link changes (RTMGRP_LINK) and address removals (RTMGRP_IPV4_IFADDR,
/// RTMGRP_IPV6_IFADDR): the kernel flushes IPv4 routes with a link or an
/// address without a per-route notification, so these stand for them.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// [`RouteTable`] on the real kernel, for the network namespace of the
/// thread that called [`NetlinkRoutes::new`] (the node's own namespace when
/// called from any ordinary thread of `tabby-node`).
///
/// Blocking: from async code, move it into `tokio::task::spawn_blocking`
/// (it is `Send`). `add` and `del` pack thousands of requests into a few
/// datagrams, so large route sets apply in a handful of syscalls.
///
/// Tunnel routes name their device by index: it is looked up by name when
/// first needed and kept, and looked up again when the kernel says the
/// index is stale (the device was recreated).
pub struct NetlinkRoutes {
    nl: NlSocket,
    tunnels: BTreeMap<Tunnel, u32>,
}

impl NetlinkRoutes {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
        Ok(NetlinkRoutes {
            nl,
            tunnels: BTreeMap::new(),
        })
    }

    /// The index of tunnel `t`'s device (`None`: no such device), from the
    /// cache or by name.
    fn tunnel_index(&mut self, t: Tunnel) -> std::result::Result<Option<u32>, NlError> {
        if let Some(i) = self.tunnels.get(&t) {
            return Ok(Some(*i));
        }
        let mut req = LinkMessage::default();
        req.attributes
            .push(LinkAttribute::IfName(t.device().to_string()));
        match self.nl.get(RouteNetlinkMessage::GetLink(req)) {
            Ok(RouteNetlinkMessage::NewLink(l)) => {
                self.tunnels.insert(t, l.header.index);
                Ok(Some(l.header.index))
            }
            Ok(_) => Err(NlError::local(
                Errno::EIO,
                "unexpected reply to a link lookup",
            )),
            Err(e) if e.errno == Errno::ENODEV => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Adds (or with `delete` removes) routes in batches. A tunnel route
    /// whose device index turns out stale (ENODEV on add, ESRCH on delete)
    /// is sent once more if the device's index changed.
    fn apply(&mut self, routes: &[Route], delete: bool) -> Vec<Result<()>> {
        let op = |r: &Route| {
            if delete {
                format!("deleting route {r}")
            } else {
                format!("adding route {r}")
            }
        };
        let flags = if delete { 0 } else { NLM_F_CREATE | NLM_F_EXCL };
        let stale = if delete { Errno::ESRCH } else { Errno::ENODEV };
        let mut results: Vec<Result<()>> = routes.iter().map(|_| Ok(())).collect();
        let mut todo: Vec<usize> = (0..routes.len()).collect();
        for attempt in 0..2 {
            // One lookup per device and pass, however many routes use it.
            let mut oifs: BTreeMap<Tunnel, std::result::Result<Option<u32>, NlError>> =
                BTreeMap::new();
            let mut reqs = Vec::with_capacity(todo.len());
            let mut sent = Vec::with_capacity(todo.len());
            for i in todo.drain(..) {
                let r = &routes[i];
                let oif = match r.target {
                    RouteTarget::Tunnel(_, t) => {
                        let found = match oifs.get(&t) {
                            Some(f) => f.clone(),
                            None => {
                                let f = self.tunnel_index(t);
                                oifs.insert(t, f.clone());
                                f
                            }
                        };
                        match found {
                            Ok(Some(index)) => Some(index),
                            Ok(None) => {
                                results[i] = Err(Error::NotFound(format!(
                                    "{}: device {} does not exist",
                                    op(r),
                                    t.device()
                                )));
                                continue;
                            }
                            Err(e) => {
                                results[i] = Err(e.into_error(format!(
                                    "{}: looking up device {}",
                                    op(r),
                                    t.device()
                                )));
                                continue;
                            }
                        }
                    }
                    _ => None,
                };
                let m = route_message(r, delete, oif);
                reqs.push(if delete {
                    (RouteNetlinkMessage::DelRoute(m), flags)
                } else {
                    (RouteNetlinkMessage::NewRoute(m), flags)
                });
                sent.push(i);
            }
            let mut retry: BTreeMap<Tunnel, Vec<usize>> = BTreeMap::new();
            for (res, i) in self.nl.execute(reqs).into_iter().zip(sent) {
                let r = &routes[i];
                if let (Err(e), RouteTarget::Tunnel(_, t)) = (&res, r.target) {
                    if attempt == 0 && e.errno == stale {
                        retry.entry(t).or_default().push(i);
                    }
                }
                results[i] = res.map_err(|e| e.into_error(op(r)));
            }
            for (t, idx) in retry {
                let old = self.tunnels.remove(&t);
                // Kept in the cache when found again; a missing device
                // keeps the kernel's answer.
                if let Ok(Some(new)) = self.tunnel_index(t) {
                    if Some(new) != old {
                        todo.extend(idx);
                    }
                }
            }
            if todo.is_empty() {
                break;
            }
        }
        results
    }

    fn dump_family(&mut self, family: AddressFamily) -> Result<Vec<Route>> {
        // With strict checking these header fields are kernel-side filters:
        // protocol 77 in the main table, any type.
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        req.header.table = RouteHeader::RT_TABLE_MAIN;
        req.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
        req.header.kind = RouteType::Unspec;
        req.header.scope = RouteScope::Universe;
        let msgs = self
            .nl
            .dump(RouteNetlinkMessage::GetRoute(req))
            .map_err(|e| e.into_error(format!("listing {family:?} routes")))?;
        // Thousands of tunnel routes share a device or two: one name
        // lookup per device.
        let mut names: BTreeMap<u32, Option<String>> = BTreeMap::new();
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_from_message_with(r, |i| {
                    names.entry(i).or_insert_with(|| if_name(i)).clone()
                }),
                _ => None,
            })
            .collect())
    }
}

/// Every IPv4 route of the calling thread's network namespace, all tables
/// and protocols, by one dump (what the node-address autodetection reads).
pub fn dump_ipv4_routes() -> Result<Vec<RouteMessage>> {
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
    // With strict checking these header fields are kernel-side filters:
    // leave every one open.
    let mut req = RouteMessage::default();
    req.header.address_family = AddressFamily::Inet;
    req.header.table = RouteHeader::RT_TABLE_UNSPEC;
    req.header.protocol = RouteProtocol::Unspec;
    req.header.kind = RouteType::Unspec;
    req.header.scope = RouteScope::Universe;
    let msgs = nl
        .dump(RouteNetlinkMessage::GetRoute(req))
        .map_err(|e| e.into_error("listing IPv4 routes".to_string()))?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        })
        .collect())
}

impl RouteTable for NetlinkRoutes {
    fn list(&mut self) -> Result<Vec<Route>> {
        self.list_families(true)
    }

    fn list_families(&mut self, v6: bool) -> Result<Vec<Route>> {
        let mut out = self.dump_family(AddressFamily::Inet)?;
        if v6 {
            out.extend(self.dump_family(AddressFamily::Inet6)?);
        }
        Ok(out)
    }

    fn add(&mut self, routes: &[Route]) -> Vec<Result<()>> {
        self.apply(routes, false)
    }

    fn del(&mut self, routes: &[Route]) -> Vec<Result<()>> {
        self.apply(routes, true)
    }
}

fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// Puts the gateway `gw` on `m`.
fn push_gateway(m: &mut RouteMessage, gw: IpAddr) {
    if family_of(gw) == m.header.address_family {
        m.attributes.push(RouteAttribute::Gateway(gw.into()));
    } else {
        // e.g. an IPv4 route via an IPv6 next hop (RFC 5549).
        m.attributes.push(RouteAttribute::Via(match gw {
            IpAddr::V4(a) => RouteVia::Inet(a),
            IpAddr::V6(a) => RouteVia::Inet6(a),
        }));
    }
}

/// The request for adding (or, with `delete`, removing) one tabby route;
/// `oif` is the index of a tunnel route's device.
fn route_message(route: &Route, delete: bool, oif: Option<u32>) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family_of(route.dst.addr());
    m.header.destination_prefix_length = route.dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    // The protocol is a match criterion on delete: routes of other
    // protocols can never be removed by tabby.
    m.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    // NOWHERE on delete means "any scope" to the kernel.
    m.header.scope = if delete {
        RouteScope::NoWhere
    } else {
        RouteScope::Universe
    };
    if route.dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(route.dst.addr().into()));
    }
    match route.target {
        RouteTarget::Blackhole => m.header.kind = RouteType::BlackHole,
        RouteTarget::Via(gw) => {
            m.header.kind = RouteType::Unicast;
            push_gateway(&mut m, gw);
        }
        RouteTarget::Tunnel(gw, _) => {
            // The gateway is the remote end's tunnel (or node) address,
            // reachable only through the tunnel: on-link by decree. On
            // delete the device and gateway make the match exact.
            m.header.kind = RouteType::Unicast;
            m.header.flags |= RouteFlags::Onlink;
            push_gateway(&mut m, gw);
            if let Some(oif) = oif {
                m.attributes.push(RouteAttribute::Oif(oif));
            }
        }
    }
    m
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// A tabby route from a kernel route message; `None` for routes that are not
/// tabby's (other protocol or table) or not of a shape tabby installs.
/// The device of an on-link route is looked up by index in the calling
/// thread's network namespace.
pub(crate) fn route_from_message(m: &RouteMessage) -> Option<Route> {
    route_from_message_with(m, if_name)
}

/// The name of interface `index` in the calling thread's network namespace.
fn if_name(index: u32) -> Option<String> {
    nix::net::if_::if_indextoname(index)
        .ok()
        .and_then(|n| n.into_string().ok())
}

/// [`route_from_message`] with `name_of` giving an interface's name by index.
fn route_from_message_with(
    m: &RouteMessage,
    name_of: impl FnOnce(u32) -> Option<String>,
) -> Option<Route> {
    if u8::from(m.header.protocol) != ROUTE_PROTOCOL {
        return None;
    }
    let dst = main_table_dst(m)?;
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Gateway(g) => gw = ip_of(g),
            RouteAttribute::Via(RouteVia::Inet(a)) => gw = Some(IpAddr::V4(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => gw = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    let target = match m.header.kind {
        RouteType::BlackHole => RouteTarget::Blackhole,
        RouteType::Unicast if m.header.flags.contains(RouteFlags::Onlink) => {
            let gw = gw?;
            // A device gone by now leaves the route's shape unknown; the
            // link's removal makes the monitor re-list anyway.
            let name = name_of(oif?)?;
            match [Tunnel::Vxlan, Tunnel::Ipip]
                .into_iter()
                .find(|t| t.device() == name)
            {
                Some(t) => RouteTarget::Tunnel(gw, t),
                None => RouteTarget::Via(gw),
            }
        }
        RouteType::Unicast => RouteTarget::Via(gw?),
        _ => return None,
    };
    Some(Route { dst, target })
}

/// What the route monitor reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteEvent {
    /// A tabby route (protocol 77, main table) was deleted: by hand, by the
    /// kernel, or by tabby itself (the reconciler filters its own deletions
    /// by comparing with what it holds).
    Deleted(Route),
    /// A tabby route was added or replaced (by tabby itself, or by hand).
    Added(Route),
    /// A route of another protocol (or shape) was added or replaced in the
    /// main table at this destination: it may have taken one of ours.
    Foreign(IpNet),
    /// Notifications were lost (receive queue overrun), or a link (not a
    /// pod's host veth) changed or an address was removed, which may have
    /// flushed routes silently: re-list everything.
    Resync,
}

/// Registers the monitor's socket with the tokio reactor, for reading.
/// Must be called within a tokio runtime.
#[allow(unsafe_code)]
fn register_readable(
    sock: Socket,
) -> std::result::Result<AsyncFd<Socket>, AsyncFdRegisterError<Socket>> {
    // SAFETY: the Socket owns its fd and keeps it open and unchanged for as
    // long as the AsyncFd holds it (it is only given back by `into_inner`).
    unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }
}

/// Watches route deletions in the network namespace of the thread that
/// called [`RouteMonitor::new`].
///
/// [`RouteMonitor::next`] is async (tokio reactor); [`RouteMonitor::next_blocking`]
/// blocks the calling thread. `new` is synchronous and needs no runtime, so
/// the monitor can be created on a thread inside another namespace and then
/// driven from anywhere.
///
/// The kernel sends no per-route notification when IPv4 routes vanish
/// because their link went down, so a periodic re-list is still needed.
pub struct RouteMonitor {
    raw: Option<Socket>,
    fd: Option<AsyncFd<Socket>>,
    buf: Vec<u8>,
    pending: VecDeque<RouteEvent>,
}

impl RouteMonitor {
    /// Subscribes to IPv4 and IPv6 route changes of the calling thread's
    /// network namespace.
    pub fn new() -> Result<Self> {
        let io = |what: &str, e: std::io::Error| Error::Io(format!("route monitor: {what}"), e);
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| io("socket", e))?;
        sock.bind(&SocketAddr::new(
            0,
            RTMGRP_IPV4_ROUTE
                | RTMGRP_IPV6_ROUTE
                | RTMGRP_LINK
                | RTMGRP_IPV4_IFADDR
                | RTMGRP_IPV6_IFADDR,
        ))
        .map_err(|e| io("bind", e))?;
        sock.set_non_blocking(true)
            .map_err(|e| io("set non-blocking", e))?;
        grow_rcvbuf(&sock, 4 * 1024 * 1024);
        Ok(RouteMonitor {
            raw: Some(sock),
            fd: None,
            buf: vec![0; 256 * 1024],
            pending: VecDeque::new(),
        })
    }

    fn socket_fd(&self) -> BorrowedFd<'_> {
        match (&self.raw, &self.fd) {
            (Some(s), _) => s.as_fd(),
            (None, Some(fd)) => fd.get_ref().as_fd(),
            (None, None) => unreachable!("monitor always holds its socket"),
        }
    }

    fn raw_fd(&self) -> i32 {
        self.socket_fd().as_raw_fd()
    }

    /// The next deletion of a tabby route (or a request to re-list).
    /// Cancel-safe. Must be called within a tokio runtime.
    pub async fn next(&mut self) -> Result<RouteEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            if self.fd.is_none() {
                let sock = self.raw.take().expect("socket present until registered");
                match register_readable(sock) {
                    Ok(fd) => self.fd = Some(fd),
                    Err(e) => {
                        let (sock, e) = e.into_parts();
                        self.raw = Some(sock);
                        return Err(Error::Io("route monitor: register with tokio".into(), e));
                    }
                }
            }
            let RouteMonitor {
                fd, buf, pending, ..
            } = self;
            let fd = fd.as_ref().expect("registered above");
            let mut guard = fd
                .readable()
                .await
                .map_err(|e| Error::Io("route monitor: poll".into(), e))?;
            match read_datagram(fd.get_ref().as_raw_fd(), buf, pending) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io("route monitor: recv".into(), e)),
            }
        }
    }

    /// Blocking variant of [`RouteMonitor::next`], for a dedicated thread.
    pub fn next_blocking(&mut self) -> Result<RouteEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            let mut pfd = [PollFd::new(self.socket_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::Io("route monitor: poll".into(), e.into())),
            }
            let fd = self.raw_fd();
            match read_datagram(fd, &mut self.buf, &mut self.pending) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Error::Io("route monitor: recv".into(), e)),
            }
        }
    }
}

/// Reads one datagram without blocking and queues its events.
fn read_datagram(
    fd: i32,
    buf: &mut [u8],
    pending: &mut VecDeque<RouteEvent>,
) -> std::io::Result<()> {
    let n = match nix::sys::socket::recv(fd, buf, MsgFlags::MSG_DONTWAIT) {
        Ok(n) => n,
        Err(Errno::ENOBUFS) => {
            pending.push_back(RouteEvent::Resync);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let parsed = parse_datagram(&buf[..n.min(buf.len())], |reply| {
        if let Reply::Msg(_, _, m) = reply {
            match *m {
                RouteNetlinkMessage::DelRoute(r) => {
                    if let Some(route) = route_from_message(&r) {
                        pending.push_back(RouteEvent::Deleted(route));
                    }
                }
                RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
                    let pod_side = l.attributes.iter().any(|a| {
                        matches!(a, LinkAttribute::IfName(n) if n.starts_with(crate::VETH_PREFIX))
                    });
                    if !pod_side {
                        pending.push_back(RouteEvent::Resync);
                    }
                }
                // A link-local address goes with every pod's host veth;
                // only the removal of a wider one can take routes with it.
                RouteNetlinkMessage::DelAddress(a) if a.header.scope != AddressScope::Link => {
                    pending.push_back(RouteEvent::Resync)
                }
                RouteNetlinkMessage::NewRoute(r) => match route_from_message(&r) {
                    Some(route) => pending.push_back(RouteEvent::Added(route)),
                    None => {
                        if let Some(dst) = main_table_dst(&r) {
                            pending.push_back(RouteEvent::Foreign(dst));
                        }
                    }
                },
                _ => {}
            }
        }
    });
    if let Err(e) = parsed {
        tracing::warn!("route monitor: bad datagram: {e}");
        pending.push_back(RouteEvent::Resync);
    }
    Ok(())
}

/// Calls `on_change` with every route change the monitor reports in the
/// namespace of the thread that first polls it (a task of a current-thread
/// runtime, as `tabby-node`'s reconciler runs it); returns `Ok(())` once
/// `on_change` returns false, or the error that stopped the monitor.
pub async fn monitor_routes(mut on_change: impl FnMut(RouteEvent) -> bool) -> Result<()> {
    let mut mon = RouteMonitor::new()?;
    loop {
        if !on_change(mon.next().await?) {
            return Ok(());
        }
    }
}

/// The destination of a unicast-family route message in the main table.
fn main_table_dst(m: &RouteMessage) -> Option<IpNet> {
    let mut table = u32::from(m.header.table);
    let mut dst = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = ip_of(d),
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN {
        return None;
    }
    let dst = match (dst, m.header.address_family) {
        (Some(d), _) => d,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    IpNet::new(dst, m.header.destination_prefix_length).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(r: Route) {
        let m = route_message(&r, false, None);
        assert_eq!(route_from_message(&m), Some(r));
    }

    /// Names of a fake namespace: 7 is vxlan.tabby, 8 tunl0, 9 eth0.
    fn fake_name(i: u32) -> Option<String> {
        match i {
            7 => Some("vxlan.tabby".into()),
            8 => Some("tunl0".into()),
            9 => Some("eth0".into()),
            _ => None,
        }
    }

    #[test]
    fn tunnel_routes_round_trip() {
        for (t, oif) in [(Tunnel::Vxlan, 7), (Tunnel::Ipip, 8)] {
            let r = Route {
                dst: "10.1.2.0/26".parse().unwrap(),
                target: RouteTarget::Tunnel("10.98.0.2".parse().unwrap(), t),
            };
            let m = route_message(&r, false, Some(oif));
            assert!(m.header.flags.contains(RouteFlags::Onlink));
            assert_eq!(m.header.kind, RouteType::Unicast);
            assert!(m.attributes.contains(&RouteAttribute::Oif(oif)));
            assert_eq!(route_from_message_with(&m, fake_name), Some(r));
            // Deleting names the device and the gateway: an exact match.
            let d = route_message(&r, true, Some(oif));
            assert!(d.attributes.contains(&RouteAttribute::Oif(oif)));
            assert!(d.attributes.contains(&RouteAttribute::Gateway(
                "10.98.0.2".parse::<IpAddr>().unwrap().into()
            )));
        }
    }

    #[test]
    fn only_onlink_routes_on_tunnel_devices_are_tunnel_routes() {
        let gw: IpAddr = "10.98.0.2".parse().unwrap();
        let tunnel = Route {
            dst: "10.1.2.0/26".parse().unwrap(),
            target: RouteTarget::Tunnel(gw, Tunnel::Vxlan),
        };
        let via = Route {
            target: RouteTarget::Via(gw),
            ..tunnel
        };
        // On-link through another device: a plain route.
        let m = route_message(&tunnel, false, Some(9));
        assert_eq!(route_from_message_with(&m, fake_name), Some(via));
        // Through vxlan.tabby but not on-link: a plain route, and no lookup.
        let mut m = route_message(&tunnel, false, Some(7));
        m.header.flags = RouteFlags::empty();
        assert_eq!(
            route_from_message_with(&m, |_| panic!("looked up a plain route's device")),
            Some(via)
        );
        // The device is gone: shape unknown.
        let m = route_message(&tunnel, false, Some(42));
        assert_eq!(route_from_message_with(&m, fake_name), None);
    }

    #[test]
    fn messages_round_trip() {
        roundtrip(Route {
            dst: "10.1.2.0/26".parse().unwrap(),
            target: RouteTarget::Via("192.168.1.2".parse().unwrap()),
        });
        roundtrip(Route {
            dst: "fd00:1::/122".parse().unwrap(),
            target: RouteTarget::Blackhole,
        });
        roundtrip(Route {
            dst: "10.1.2.0/26".parse().unwrap(),
            target: RouteTarget::Via("fd00::2".parse().unwrap()),
        });
        roundtrip(Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            target: RouteTarget::Via("192.168.1.2".parse().unwrap()),
        });
    }

    #[test]
    fn foreign_routes_are_ignored() {
        let r = Route {
            dst: "10.1.2.0/26".parse().unwrap(),
            target: RouteTarget::Blackhole,
        };
        let mut m = route_message(&r, false, None);
        m.header.protocol = RouteProtocol::Static;
        assert_eq!(route_from_message(&m), None);
        let mut m = route_message(&r, false, None);
        m.header.table = 100;
        assert_eq!(route_from_message(&m), None);
        let mut m = route_message(&r, false, None);
        m.header.kind = RouteType::Unreachable;
        assert_eq!(route_from_message(&m), None);
    }
}
