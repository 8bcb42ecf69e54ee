//! tabby's tunnel devices (`vxlan.tabby`, `tunl0`) and the remote VTEP
//! entries on `vxlan.tabby`.
//!
//! `vxlan.tabby` learns nothing: each remote VTEP is two permanent entries
//! written here, a neighbour entry (tunnel address -> VTEP MAC, so no ARP
//! crosses the tunnel) and an FDB entry (VTEP MAC -> underlay address, so
//! nothing is flooded).
use super::socket::{NlError, NlSocket};
use crate::error::{Errno, NetlinkError};
use crate::kernel::{OverlayTable, VtepTables};
use crate::{Error, Result, ROUTE_PROTOCOL};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoIpTunnel, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use tabby_routing::{mac_string, Mac, Tunnel, VxlanDevice};

/// The device of a VXLAN endpoint: `vxlan.tabby` over an IPv4 underlay,
/// `vxlan-v6.tabby` over IPv6, as Calico names them.
fn vxlan_name(dev: &VxlanDevice) -> &'static str {
    Tunnel::vxlan_for(dev.local).device()
}
const IPIP: &str = Tunnel::Ipip.device();
/// VNIs are 24 bits.
const MAX_VNI: u32 = (1 << 24) - 1;

/// [`OverlayTable`] on the real kernel, for the network namespace of the
/// thread that called [`NetlinkOverlay::new`].
///
/// Blocking, like [`super::NetlinkRoutes`]: neighbour and FDB changes are
/// batched into few datagrams.
pub struct NetlinkOverlay {
    nl: NlSocket,
}

/// A link as the overlay cares about it.
struct Link {
    index: u32,
    kind: Option<InfoKind>,
    data: Option<InfoData>,
    mac: Vec<u8>,
    mtu: Option<u32>,
    up: bool,
}

impl Link {
    fn from_message(l: LinkMessage) -> Self {
        let mut link = Link {
            index: l.header.index,
            kind: None,
            data: None,
            mac: Vec::new(),
            mtu: None,
            up: l.header.flags.contains(LinkFlags::Up),
        };
        for a in l.attributes {
            match a {
                LinkAttribute::Address(m) => link.mac = m,
                LinkAttribute::Mtu(m) => link.mtu = Some(m),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => link.kind = Some(k),
                            LinkInfo::Data(d) => link.data = Some(d),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    fn vxlan_info(&self) -> &[InfoVxlan] {
        match &self.data {
            Some(InfoData::Vxlan(v)) => v,
            _ => &[],
        }
    }

    /// Whether this is a VXLAN device with `dev`'s VNI, port and local
    /// address and nothing the kernel cannot change in place that tabby does
    /// not set (a multicast group or remote, an underlying link).
    fn is_vxlan_like(&self, dev: &VxlanDevice) -> bool {
        if self.kind != Some(InfoKind::Vxlan) {
            return false;
        }
        let (mut vni, mut port, mut local, mut extra) = (None, None, None, false);
        for i in self.vxlan_info() {
            match i {
                InfoVxlan::Id(v) => vni = Some(*v),
                InfoVxlan::Port(p) => port = Some(*p),
                InfoVxlan::Local(a) => local = Some(IpAddr::V4(*a)),
                InfoVxlan::Local6(a) => local = Some(IpAddr::V6(*a)),
                // The kernel reports these only when set.
                InfoVxlan::Link(l) => extra |= *l != 0,
                InfoVxlan::Group(g) => extra |= !g.is_unspecified(),
                InfoVxlan::Group6(g) => extra |= !g.is_unspecified(),
                _ => {}
            }
        }
        !extra
            && vni == Some(dev.settings.vni)
            && port == Some(dev.settings.port)
            && local == Some(dev.local)
    }

    fn learning(&self) -> Option<bool> {
        self.vxlan_info().iter().find_map(|i| match i {
            InfoVxlan::Learning(l) => Some(*l),
            _ => None,
        })
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// The address of an address message: IFA_LOCAL when present (the local
/// end of a point-to-point address), else IFA_ADDRESS.
fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    let mut addr = None;
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Local(ip) => addr = Some(*ip),
            AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
            _ => {}
        }
    }
    addr
}

/// The IP address of an `NDA_DST`: typed for AF_INET/AF_INET6 messages,
/// raw bytes (4 or 16) for AF_BRIDGE ones.
fn neigh_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice())
                .ok()
                .map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            16 => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(|o| IpAddr::V6(Ipv6Addr::from(o))),
            _ => None,
        },
        _ => None,
    }
}

fn lladdr(attrs: &[NeighbourAttribute]) -> Option<Mac> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) => Mac::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

fn dst(attrs: &[NeighbourAttribute]) -> Option<IpAddr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(d) => neigh_ip(d),
        _ => None,
    })
}

/// A neighbour entry on `vxlan.tabby` (AF_INET/AF_INET6): with `mac` the
/// request to add it, without it the request to delete it.
fn neigh_message(index: u32, ip: IpAddr, mac: Option<&Mac>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family(ip);
    m.header.ifindex = index;
    m.attributes
        .push(NeighbourAttribute::Destination(ip.into()));
    if let Some(mac) = mac {
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        // Marks the entry as tabby's (`ip neigh` shows `proto 77`).
        m.attributes
            .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                ROUTE_PROTOCOL,
            )));
    }
    m
}

/// An FDB entry of `vxlan.tabby` (AF_BRIDGE, NTF_SELF: the VXLAN device's
/// own table, not a bridge's). No NDA_PROTOCOL: the kernel accepts it on
/// FDB requests but VXLAN neither keeps nor reports it.
fn fdb_message(index: u32, mac: &Mac, underlay: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(underlay.into()));
    m
}

impl NetlinkOverlay {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
        Ok(NetlinkOverlay { nl })
    }

    fn link(&mut self, name: &str) -> Result<Option<Link>> {
        let mut req = LinkMessage::default();
        req.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(req, || format!("looking up link {name}"))
    }

    fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut req = LinkMessage::default();
        req.header.index = index;
        self.get_link(req, || format!("looking up link {index}"))
    }

    fn get_link(&mut self, req: LinkMessage, op: impl Fn() -> String) -> Result<Option<Link>> {
        match self.nl.get(RouteNetlinkMessage::GetLink(req)) {
            Ok(RouteNetlinkMessage::NewLink(l)) => Ok(Some(Link::from_message(l))),
            Ok(other) => Err(Error::Netlink(NetlinkError {
                note: Some(format!("unexpected reply {other:?}")),
                ..NetlinkError::new(op(), Errno::EIO)
            })),
            Err(e) if e.errno == Errno::ENODEV => Ok(None),
            Err(e) => Err(e.into_error(op())),
        }
    }

    fn delete_link(&mut self, index: u32, name: &str) -> Result<()> {
        let mut req = LinkMessage::default();
        req.header.index = index;
        match self.nl.request(RouteNetlinkMessage::DelLink(req), 0) {
            Err(e) if e.errno != Errno::ENODEV => Err(e.into_error(format!("deleting {name}"))),
            _ => Ok(()),
        }
    }

    fn create_vxlan(&mut self, dev: &VxlanDevice, mtu: u32) -> Result<()> {
        let name = vxlan_name(dev);
        let mut info = vec![
            InfoVxlan::Id(dev.settings.vni),
            InfoVxlan::Port(dev.settings.port),
        ];
        info.push(match dev.local {
            IpAddr::V4(a) => InfoVxlan::Local(a),
            IpAddr::V6(a) => InfoVxlan::Local6(a),
        });
        // Every remote is programmed; learning would only add stale entries.
        info.push(InfoVxlan::Learning(false));
        let mut req = LinkMessage::default();
        req.header.flags = LinkFlags::Up;
        req.header.change_mask = LinkFlags::Up;
        req.attributes.push(LinkAttribute::IfName(name.into()));
        req.attributes
            .push(LinkAttribute::Address(dev.mac.to_vec()));
        req.attributes.push(LinkAttribute::Mtu(mtu));
        req.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(info)),
        ]));
        self.nl
            .request(RouteNetlinkMessage::NewLink(req), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|e| {
                e.into_error(format!(
                    "creating {name} (vni {}, port {}, local {})",
                    dev.settings.vni, dev.settings.port, dev.local
                ))
            })
    }

    /// Sets what the kernel can change in place, and only what differs.
    fn update_vxlan(&mut self, link: &Link, dev: &VxlanDevice, mtu: u32) -> Result<()> {
        let name = vxlan_name(dev);
        if link.learning() != Some(false) {
            // With IFLA_INFO_DATA, RTM_NEWLINK on an existing device is the
            // driver's changelink: only the attributes sent change. A
            // request of its own: VXLAN's changelink refuses IFLA_MTU
            // ("Cannot change mtu") in the same request.
            let mut req = LinkMessage::default();
            req.header.index = link.index;
            req.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vxlan),
                LinkInfo::Data(InfoData::Vxlan(vec![InfoVxlan::Learning(false)])),
            ]));
            self.nl
                .request(RouteNetlinkMessage::NewLink(req), 0)
                .map_err(|e| e.into_error(format!("setting {name} nolearning")))?;
        }
        self.set_link(link, name, Some(&dev.mac), mtu)
    }

    /// Sets `link`'s MAC (if given), MTU and up state, sending only what
    /// differs, in one request (nothing when all is right).
    fn set_link(&mut self, link: &Link, name: &str, mac: Option<&Mac>, mtu: u32) -> Result<()> {
        let mut req = LinkMessage::default();
        req.header.index = link.index;
        let mut what = Vec::new();
        if let Some(mac) = mac.filter(|m| link.mac != **m) {
            req.attributes.push(LinkAttribute::Address(mac.to_vec()));
            what.push(format!("mac {}", mac_string(mac)));
        }
        if link.mtu != Some(mtu) {
            req.attributes.push(LinkAttribute::Mtu(mtu));
            what.push(format!("mtu {mtu}"));
        }
        if !link.up {
            req.header.flags = LinkFlags::Up;
            req.header.change_mask = LinkFlags::Up;
            what.push("up".into());
        }
        if what.is_empty() {
            return Ok(());
        }
        self.nl
            .request(RouteNetlinkMessage::SetLink(req), 0)
            .map_err(|e| e.into_error(format!("setting {name} {}", what.join(" "))))
    }

    /// Makes `ip` (as a host prefix) the one address of link `index`,
    /// leaving IPv6 link-local addresses (the kernel's own) alone.
    fn ensure_host_address(&mut self, index: u32, name: &str, ip: IpAddr) -> Result<()> {
        let want = IpNet::from(ip);
        let mut present = false;
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = AddressMessage::default();
            req.header.family = fam;
            req.header.index = index;
            let msgs = match self.nl.dump(RouteNetlinkMessage::GetAddress(req)) {
                Ok(m) => m,
                // IPv6 disabled here: no IPv6 addresses.
                Err(e) if fam == AddressFamily::Inet6 && e.errno == Errno::EAFNOSUPPORT => continue,
                Err(e) => return Err(e.into_error(format!("listing addresses of {name}"))),
            };
            for m in msgs {
                let RouteNetlinkMessage::NewAddress(a) = m else {
                    continue;
                };
                let Some(addr) = address_of(&a) else {
                    continue;
                };
                if a.header.index != index {
                    continue;
                }
                if IpNet::new(addr, a.header.prefix_len).ok() == Some(want) {
                    present = true;
                    continue;
                }
                if matches!(addr, IpAddr::V6(v6) if v6.is_unicast_link_local()) {
                    continue;
                }
                let net = format!("{addr}/{}", a.header.prefix_len);
                // The dumped header and addresses identify it exactly.
                let mut del = AddressMessage::default();
                del.header = a.header.clone();
                del.attributes = a
                    .attributes
                    .into_iter()
                    .filter(|x| {
                        matches!(x, AddressAttribute::Local(_) | AddressAttribute::Address(_))
                    })
                    .collect();
                match self.nl.request(RouteNetlinkMessage::DelAddress(del), 0) {
                    Err(e) if e.errno != Errno::EADDRNOTAVAIL => {
                        return Err(e.into_error(format!("removing address {net} from {name}")))
                    }
                    _ => {}
                }
            }
        }
        if present {
            return Ok(());
        }
        let mut req = AddressMessage::default();
        req.header.family = family(ip);
        req.header.prefix_len = want.prefix_len();
        req.header.index = index;
        req.header.scope = AddressScope::Universe;
        match ip {
            IpAddr::V4(_) => {
                req.attributes.push(AddressAttribute::Local(ip));
                req.attributes.push(AddressAttribute::Address(ip));
            }
            IpAddr::V6(_) => {
                // Unique by IPAM: usable at once, without DAD.
                req.header.flags = AddressHeaderFlags::Nodad;
                req.attributes.push(AddressAttribute::Address(ip));
                req.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
        }
        self.nl
            .request(
                RouteNetlinkMessage::NewAddress(req),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map_err(|e| e.into_error(format!("adding address {want} to {name}")))
    }

    /// Sends one request per entry to device `name`, in batches; `what`
    /// names an entry's operation in its error.
    fn batch<T>(
        &mut self,
        name: &str,
        entries: &[T],
        what: impl Fn(&T) -> String,
        msg: impl Fn(u32, &T) -> (RouteNetlinkMessage, u16),
    ) -> Vec<Result<()>> {
        if entries.is_empty() {
            return Vec::new();
        }
        let index = match self.link(name) {
            Ok(Some(l)) => l.index,
            Ok(None) => {
                return entries
                    .iter()
                    .map(|e| {
                        Err(Error::NotFound(format!(
                            "{}: device {name} does not exist",
                            what(e)
                        )))
                    })
                    .collect()
            }
            Err(err) => {
                let err = Arc::new(err);
                return entries
                    .iter()
                    .map(|e| {
                        Err(Error::Context {
                            op: what(e),
                            source: err.clone(),
                        })
                    })
                    .collect();
            }
        };
        let reqs = entries.iter().map(|e| msg(index, e)).collect();
        self.nl
            .execute(reqs)
            .into_iter()
            .zip(entries)
            .map(|(r, e)| r.map_err(|err| err.into_error(what(e))))
            .collect()
    }

    fn dump_neigh(
        &mut self,
        name: &str,
        req: NeighbourMessage,
        what: &str,
    ) -> Result<Vec<NeighbourMessage>> {
        let msgs = self
            .nl
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .map_err(|e| e.into_error(format!("listing {what} of {name}")))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            .collect())
    }
}

/// What `ensure_ipip` reports when the kernel cannot make `tunl0`.
fn no_ipip(e: NlError) -> Error {
    let mut n = e.into_netlink(format!("creating ipip device {IPIP}"));
    n.note = Some("the kernel has no ipip support".into());
    Error::Netlink(n)
}

impl OverlayTable for NetlinkOverlay {
    fn ensure_vxlan(&mut self, dev: &VxlanDevice, mtu: u32) -> Result<()> {
        if dev.settings.vni > MAX_VNI {
            return Err(Error::Invalid(format!(
                "VXLAN VNI {} is out of range (at most {MAX_VNI})",
                dev.settings.vni
            )));
        }
        let name = vxlan_name(dev);
        let mut link = self.link(name)?;
        if let Some(l) = &link {
            if !l.is_vxlan_like(dev) {
                // VNI, port and local address are fixed at creation.
                tracing::info!(
                    device = name,
                    vni = dev.settings.vni,
                    port = dev.settings.port,
                    local = %dev.local,
                    "recreating the VXLAN device with new settings"
                );
                self.delete_link(l.index, name)?;
                link = None;
            }
        }
        let link = match link {
            Some(l) => {
                self.update_vxlan(&l, dev, mtu)?;
                l
            }
            None => {
                self.create_vxlan(dev, mtu)?;
                self.link(name)?.ok_or_else(|| {
                    Error::NotFound(format!("{name} vanished right after it was created"))
                })?
            }
        };
        self.ensure_host_address(link.index, name, dev.tunnel_ip)
    }

    fn remove_vxlan(&mut self, t: Tunnel) -> Result<()> {
        let name = t.device();
        match self.link(name)? {
            Some(l) => self.delete_link(l.index, name),
            None => Ok(()),
        }
    }

    fn ensure_ipip(&mut self, local: IpAddr, mtu: u32) -> Result<()> {
        let IpAddr::V4(local4) = local else {
            return Err(Error::Invalid(format!(
                "IP-in-IP needs an IPv4 local address, not {local}"
            )));
        };
        let link = match self.link(IPIP)? {
            Some(l) => l,
            None => {
                // Creating a link of kind ipip loads the module, whose
                // fallback device `tunl0` then appears in every namespace:
                // EEXIST means that happened, and that device is the one.
                let mut req = LinkMessage::default();
                req.header.flags = LinkFlags::Up;
                req.header.change_mask = LinkFlags::Up;
                req.attributes.push(LinkAttribute::IfName(IPIP.into()));
                req.attributes.push(LinkAttribute::Mtu(mtu));
                req.attributes.push(LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::IpIp),
                    LinkInfo::Data(InfoData::IpTunnel(vec![InfoIpTunnel::Local(IpAddr::V4(
                        local4,
                    ))])),
                ]));
                match self
                    .nl
                    .request(RouteNetlinkMessage::NewLink(req), NLM_F_CREATE | NLM_F_EXCL)
                {
                    Ok(()) => {}
                    Err(e) if e.errno == Errno::EEXIST => {}
                    // "Unknown device type": no ipip module to load.
                    Err(e) if e.errno == Errno::EOPNOTSUPP => return Err(no_ipip(e)),
                    Err(e) => {
                        return Err(e.into_error(format!("creating ipip device {IPIP}")));
                    }
                }
                self.link(IPIP)?.ok_or_else(|| {
                    Error::NotFound(format!("{IPIP} vanished right after it was created"))
                })?
            }
        };
        if link.kind != Some(InfoKind::IpIp) {
            return Err(Error::Invalid(format!(
                "{IPIP} exists but is not an ipip device (kind {:?})",
                link.kind
            )));
        }
        // The fallback device's local address cannot be changed (the kernel
        // refuses): it is left as it is.
        self.set_link(&link, IPIP, None, mtu)
    }

    fn uplink_mtu(&mut self, addr: IpAddr) -> Result<u32> {
        let mut req = AddressMessage::default();
        req.header.family = family(addr);
        let msgs = self
            .nl
            .dump(RouteNetlinkMessage::GetAddress(req))
            .map_err(|e| e.into_error("listing addresses"))?;
        let index = msgs.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if address_of(a) == Some(addr) => {
                Some(a.header.index)
            }
            _ => None,
        });
        let not_found = || Error::NotFound(format!("no interface holds address {addr}"));
        let index = index.ok_or_else(not_found)?;
        let link = self.link_by_index(index)?.ok_or_else(not_found)?;
        link.mtu.ok_or_else(|| {
            Error::Netlink(NetlinkError {
                note: Some("the kernel reported no MTU".into()),
                ..NetlinkError::new(format!("looking up link {index}"), Errno::EIO)
            })
        })
    }

    fn list_vteps(&mut self, t: Tunnel) -> Result<VtepTables> {
        let name = t.device();
        let Some(link) = self.link(name)? else {
            return Ok(VtepTables::default());
        };
        let index = link.index;
        let mut out = VtepTables::default();
        // Both neighbour tables; with strict checking NDA_IFINDEX filters
        // in the kernel (the header's ifindex must be 0).
        let mut req = NeighbourMessage::default();
        req.attributes.push(NeighbourAttribute::IfIndex(index));
        for n in self.dump_neigh(name, req, "neighbours")? {
            let h = &n.header;
            if h.ifindex != index
                || h.state != NeighbourState::Permanent
                || !matches!(h.family, AddressFamily::Inet | AddressFamily::Inet6)
            {
                continue;
            }
            if let (Some(ip), Some(mac)) = (dst(&n.attributes), lladdr(&n.attributes)) {
                out.neigh.push((ip, mac));
            }
        }
        // The FDB dump takes the port's ifindex in the header.
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Bridge;
        req.header.ifindex = index;
        for n in self.dump_neigh(name, req, "FDB entries")? {
            let h = &n.header;
            if h.ifindex != index
                || h.state != NeighbourState::Permanent
                || !h.flags.contains(NeighbourFlags::Own)
            {
                continue;
            }
            let (Some(mac), Some(ip)) = (lladdr(&n.attributes), dst(&n.attributes)) else {
                continue;
            };
            // The all-zeros MAC is the default (flooding) destination;
            // tabby makes none.
            if mac != [0; 6] {
                out.fdb.push((mac, ip));
            }
        }
        Ok(out)
    }

    fn add_neigh(&mut self, t: Tunnel, entries: &[(IpAddr, Mac)]) -> Vec<Result<()>> {
        let name = t.device();
        self.batch(
            name,
            entries,
            |(ip, mac)| format!("adding neighbour {ip} lladdr {} on {name}", mac_string(mac)),
            |index, (ip, mac)| {
                (
                    RouteNetlinkMessage::NewNeighbour(neigh_message(index, *ip, Some(mac))),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
            },
        )
    }

    fn del_neigh(&mut self, t: Tunnel, entries: &[(IpAddr, Mac)]) -> Vec<Result<()>> {
        let name = t.device();
        self.batch(
            name,
            entries,
            |(ip, _)| format!("deleting neighbour {ip} on {name}"),
            |index, (ip, _)| {
                (
                    RouteNetlinkMessage::DelNeighbour(neigh_message(index, *ip, None)),
                    0,
                )
            },
        )
    }

    fn add_fdb(&mut self, t: Tunnel, entries: &[(Mac, IpAddr)]) -> Vec<Result<()>> {
        // CREATE|REPLACE is `bridge fdb replace`: for a unicast MAC the
        // kernel replaces the entry's (first) destination; APPEND would add
        // destinations only to the all-zeros and multicast entries.
        let name = t.device();
        self.batch(
            name,
            entries,
            |(mac, ip)| format!("adding FDB entry {} dst {ip} on {name}", mac_string(mac)),
            |index, (mac, ip)| {
                (
                    RouteNetlinkMessage::NewNeighbour(fdb_message(index, mac, *ip)),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
            },
        )
    }

    fn del_fdb(&mut self, t: Tunnel, entries: &[(Mac, IpAddr)]) -> Vec<Result<()>> {
        // With NDA_DST the kernel removes only that destination of the MAC;
        // note it answers success, removing nothing, when the MAC is there
        // with another destination.
        let name = t.device();
        self.batch(
            name,
            entries,
            |(mac, ip)| format!("deleting FDB entry {} dst {ip} on {name}", mac_string(mac)),
            |index, (mac, ip)| {
                let mut m = fdb_message(index, mac, *ip);
                m.header.state = NeighbourState::None;
                (RouteNetlinkMessage::DelNeighbour(m), 0)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_destinations_parse_by_length() {
        assert_eq!(
            neigh_ip(&NeighbourAddress::Other(vec![10, 99, 0, 2])),
            Some("10.99.0.2".parse().unwrap())
        );
        let v6: Ipv6Addr = "fd00::2".parse().unwrap();
        assert_eq!(
            neigh_ip(&NeighbourAddress::Other(v6.octets().to_vec())),
            Some(IpAddr::V6(v6))
        );
        assert_eq!(neigh_ip(&NeighbourAddress::Other(vec![1, 2, 3])), None);
    }

    #[test]
    fn fdb_requests_are_the_devices_own() {
        let mac = [2, 0, 0, 0, 0, 2];
        let m = fdb_message(7, &mac, "10.99.0.2".parse().unwrap());
        assert_eq!(m.header.family, AddressFamily::Bridge);
        assert_eq!(m.header.ifindex, 7);
        assert_eq!(m.header.flags, NeighbourFlags::Own);
        assert_eq!(m.header.state, NeighbourState::Permanent);
        assert_eq!(lladdr(&m.attributes), Some(mac));
        assert_eq!(dst(&m.attributes), Some("10.99.0.2".parse().unwrap()));
    }

    #[test]
    fn neighbour_requests_carry_the_protocol_on_add_only() {
        let ip: IpAddr = "10.98.0.2".parse().unwrap();
        let add = neigh_message(3, ip, Some(&[2, 0, 0, 0, 0, 2]));
        assert_eq!(add.header.family, AddressFamily::Inet);
        assert_eq!(add.header.state, NeighbourState::Permanent);
        assert!(add
            .attributes
            .contains(&NeighbourAttribute::Protocol(RouteProtocol::from(77))));
        let del = neigh_message(3, ip, None);
        assert_eq!(del.attributes.len(), 1);
        assert_eq!(dst(&del.attributes), Some(ip));
    }
}
