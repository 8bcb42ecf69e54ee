//! Pod wiring (design.md section 4): a veth pair with the host side in the
//! node's namespace and the pod side in the pod's, Calico style.
use super::ns::{in_netns, set_sysctl};
use super::socket::{NlError, NlSocket};
use crate::{Error, Result, HOST_VETH_MAC, POD_GATEWAY_V4, POD_GATEWAY_V6, VETH_PREFIX};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

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
    /// Host-side MAC, `ee:ee:ee:ee:ee:ee` ([`HOST_VETH_MAC`]).
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

/// A link as far as wiring cares.
struct Link {
    index: u32,
    mac: [u8; 6],
    up: bool,
    kind: Option<InfoKind>,
    alias: Option<String>,
}

fn get_link(nl: &mut NlSocket, name: &str) -> Result<Option<Link>> {
    let mut req = LinkMessage::default();
    req.attributes.push(LinkAttribute::IfName(name.to_string()));
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
        Ok(other) => Err(Error::Netlink(format!(
            "link {name}: unexpected reply {other:?}"
        ))),
        Err(e) if e.errno == libc::ENODEV => Ok(None),
        Err(e) => Err(e.into_error(format!("looking up link {name}"))),
    }
}

/// Whether an interface of that name exists in the calling thread's network
/// namespace. Errors (no netlink) count as "no": [`wire_pod`] reports them.
/// Blocking, but a single quick netlink round trip.
pub fn link_exists(name: &str) -> bool {
    valid_ifname(name)
        && NlSocket::new()
            .ok()
            .and_then(|mut nl| get_link(&mut nl, name).ok())
            .flatten()
            .is_some()
}

fn set_link_up(nl: &mut NlSocket, index: u32, name: &str) -> Result<()> {
    let mut req = LinkMessage::default();
    req.header.index = index;
    req.header.flags = LinkFlags::Up;
    req.header.change_mask = LinkFlags::Up;
    nl.request(RouteNetlinkMessage::SetLink(req), 0)
        .map_err(|e| e.into_error(format!("setting {name} up")))
}

fn delete_link(nl: &mut NlSocket, index: u32) -> std::result::Result<(), NlError> {
    let mut req = LinkMessage::default();
    req.header.index = index;
    nl.request(RouteNetlinkMessage::DelLink(req), 0)
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn add_address(nl: &mut NlSocket, index: u32, ifname: &str, addr: IpNet) -> Result<()> {
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
fn add_device_route(
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
        match e.into_error(what) {
            Error::Exists(m) => Error::Netlink(format!("{m} (route exists already)")),
            other => other,
        }
    })
}

fn add_permanent_neighbour(
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

fn has_v4(spec: &PodSpec) -> bool {
    spec.addresses.iter().any(|a| a.addr().is_ipv4())
}

fn has_v6(spec: &PodSpec) -> bool {
    spec.addresses.iter().any(|a| a.addr().is_ipv6())
}

/// Appends a cleanup failure to the original error, keeping its kind.
fn with_cleanup_error(err: Error, cleanup: &Error) -> Error {
    let note = format!("; cleanup failed too: {cleanup}");
    match err {
        Error::Netlink(s) => Error::Netlink(s + &note),
        Error::Exists(s) => Error::Exists(s + &note),
        Error::NotFound(s) => Error::NotFound(s + &note),
        Error::Nft(s) => Error::Nft(s + &note),
        Error::Io(s, e) => Error::Io(s + &note, e),
        Error::Invalid(s) => Error::Invalid(s + &note),
        Error::Controller(s) => Error::Controller(s + &note),
    }
}

/// Wires a pod (design.md section 4): creates the veth pair in the current
/// network namespace with the peer created directly in the pod's namespace,
/// sets the host side's MAC `ee:ee:ee:ee:ee:ee`, sysctls (`proxy_arp=1`,
/// `proxy_delay=0`, `forwarding=1`; with IPv6 also `proxy_ndp=1`,
/// `accept_ra=0`, `forwarding=1`), brings it up; configures the pod side
/// (MTU, addresses, `lo` and the interface up, `169.254.1.1 dev eth0 scope
/// link`, default via `169.254.1.1`, IPv6 default via
/// `fe80::ecee:eeff:feee:eeee`, permanent neighbour entries for both
/// gateways); finally adds `<podIP>/32 dev <host veth> scope link` on the host.
///
/// Fails with [`Error::Exists`] if the host veth name is taken. Any later
/// failure deletes the veth (the peer and the host routes go with it) and
/// returns the original error, with the cleanup error appended if that
/// failed too.
///
/// Blocking: call it with `tokio::task::spawn_blocking` (never from a thread
/// that called `setns`). The pod side is configured on a dedicated thread
/// inside the pod's namespace, see [`in_netns`].
pub fn wire_pod(spec: &PodSpec) -> Result<WiredPod> {
    validate(spec)?;
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
    let host = &spec.host_ifname;
    if get_link(&mut nl, host)?.is_some() {
        return Err(Error::Exists(format!("host veth {host} exists")));
    }
    let ns = std::fs::File::open(&spec.netns_path).map_err(|e| {
        Error::Io(
            format!("opening pod netns {}", spec.netns_path.display()),
            e,
        )
    })?;

    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(spec.pod_ifname.clone()));
    peer.attributes.push(LinkAttribute::Mtu(spec.mtu));
    peer.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
    let mut req = LinkMessage::default();
    req.attributes.push(LinkAttribute::IfName(host.clone()));
    req.attributes
        .push(LinkAttribute::Address(HOST_VETH_MAC.to_vec()));
    req.attributes.push(LinkAttribute::Mtu(spec.mtu));
    req.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    let created = nl.request(RouteNetlinkMessage::NewLink(req), NLM_F_CREATE | NLM_F_EXCL);
    drop(ns);
    if let Err(e) = created {
        let what = format!(
            "creating veth {host} <-> {} in {}",
            spec.pod_ifname,
            spec.netns_path.display()
        );
        if e.errno == libc::EEXIST && !matches!(get_link(&mut nl, host), Ok(Some(_))) {
            // Not our name: the pod already has an interface of that name.
            return Err(Error::Netlink(format!(
                "{what}: {e} ({} exists in the pod namespace?)",
                spec.pod_ifname
            )));
        }
        return Err(e.into_error(what));
    }

    match configure(&mut nl, spec) {
        Ok(w) => Ok(w),
        Err(err) => {
            let cleanup = match get_link(&mut nl, host) {
                Ok(Some(l)) => match delete_link(&mut nl, l.index) {
                    Ok(()) => Ok(()),
                    Err(e) if e.errno == libc::ENODEV => Ok(()),
                    Err(e) => Err(e.into_error(format!("deleting veth {host}"))),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match cleanup {
                Ok(()) => Err(err),
                Err(c) => Err(with_cleanup_error(err, &c)),
            }
        }
    }
}

/// Everything after the veth exists; the caller rolls back on error.
fn configure(nl: &mut NlSocket, spec: &PodSpec) -> Result<WiredPod> {
    let host = &spec.host_ifname;
    let link = get_link(nl, host)?
        .ok_or_else(|| Error::NotFound(format!("veth {host} vanished after creation")))?;

    set_sysctl(&format!("net/ipv4/conf/{host}/proxy_arp"), "1")?;
    set_sysctl(&format!("net/ipv4/neigh/{host}/proxy_delay"), "0")?;
    set_sysctl(&format!("net/ipv4/conf/{host}/forwarding"), "1")?;
    if has_v6(spec) {
        set_sysctl(&format!("net/ipv6/conf/{host}/proxy_ndp"), "1")?;
        set_sysctl(&format!("net/ipv6/conf/{host}/accept_ra"), "0")?;
        set_sysctl(&format!("net/ipv6/conf/{host}/forwarding"), "1")?;
    }
    if !spec.owner.is_empty() {
        let mut req = LinkMessage::default();
        req.header.index = link.index;
        req.attributes
            .push(LinkAttribute::IfAlias(spec.owner.clone()));
        nl.request(RouteNetlinkMessage::SetLink(req), 0)
            .map_err(|e| e.into_error(format!("marking {host} as owned by {}", spec.owner)))?;
    }
    set_link_up(nl, link.index, host)?;

    let (pod_ifindex, pod_mac) = in_netns(&spec.netns_path, || configure_pod_side(spec))??;

    // Last, so the pod is reachable only once it is fully configured.
    for addr in &spec.addresses {
        add_device_route(nl, *addr, None, link.index, host)?;
    }
    Ok(WiredPod {
        host_ifname: host.clone(),
        host_mac: format_mac(&link.mac),
        pod_ifname: spec.pod_ifname.clone(),
        pod_mac: format_mac(&pod_mac),
        host_ifindex: link.index,
        pod_ifindex,
    })
}

/// Runs inside the pod's namespace.
fn configure_pod_side(spec: &PodSpec) -> Result<(u32, [u8; 6])> {
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket in pod"))?;
    let ifname = &spec.pod_ifname;
    let link = get_link(&mut nl, ifname)?
        .ok_or_else(|| Error::NotFound(format!("{ifname} missing in pod namespace")))?;
    if let Some(lo) = get_link(&mut nl, "lo")? {
        if !lo.up {
            set_link_up(&mut nl, lo.index, "lo")?;
        }
    }
    for addr in &spec.addresses {
        add_address(&mut nl, link.index, ifname, *addr)?;
    }
    set_link_up(&mut nl, link.index, ifname)?;
    if has_v4(spec) {
        let gw = IpAddr::V4(POD_GATEWAY_V4);
        add_device_route(&mut nl, IpNet::from(gw), None, link.index, ifname)?;
        add_device_route(
            &mut nl,
            "0.0.0.0/0".parse().expect("valid"),
            Some(gw),
            link.index,
            ifname,
        )?;
        add_permanent_neighbour(&mut nl, link.index, ifname, gw, HOST_VETH_MAC)?;
    }
    if has_v6(spec) {
        let gw = IpAddr::V6(POD_GATEWAY_V6);
        add_device_route(
            &mut nl,
            "::/0".parse().expect("valid"),
            Some(gw),
            link.index,
            ifname,
        )?;
        add_permanent_neighbour(&mut nl, link.index, ifname, gw, HOST_VETH_MAC)?;
    }
    Ok((link.index, link.mac))
}

/// Prefix of host veths that DEL took out of service and that wait for
/// deletion (see [`retire_owned`]).
pub const RETIRED_PREFIX: &str = "tabz";

/// Veths (not yet retired) whose ifalias says `owner` holds them, by name.
///
/// Blocking.
pub fn owned_links(owner: &str) -> Result<Vec<String>> {
    Ok(
        links_matching(|name, alias| alias == Some(owner) && !name.starts_with(RETIRED_PREFIX))?
            .into_iter()
            .map(|(name, _)| name)
            .collect(),
    )
}

/// Takes the veths owned by `owner` out of service at once and frees their
/// names: one request each sets it down (the kernel drops the pod's /32
/// route with it) and renames it `tabz<ifindex>`. Deleting a veth costs the
/// kernel ~20 ms of RCU grace periods, which DEL need not wait for: the
/// caller deletes retired links later with [`delete_link_named`]. Returns
/// the retired names (none when the owner has no veth: DEL is idempotent).
///
/// Blocking.
pub fn retire_owned(owner: &str) -> Result<Vec<String>> {
    if owner.is_empty() {
        return Err(Error::Invalid("retiring needs an owner".into()));
    }
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
    let mut out = Vec::new();
    for (name, index) in
        links_matching(|name, alias| alias == Some(owner) && !name.starts_with(RETIRED_PREFIX))?
    {
        let retired = format!("{RETIRED_PREFIX}{index}");
        let mut req = LinkMessage::default();
        req.header.index = index;
        req.header.flags = LinkFlags::empty();
        req.header.change_mask = LinkFlags::Up;
        req.attributes.push(LinkAttribute::IfName(retired.clone()));
        match nl.request(RouteNetlinkMessage::SetLink(req), 0) {
            Ok(()) => out.push(retired),
            Err(e) if e.errno == libc::ENODEV => {}
            Err(e) => return Err(e.into_error(format!("retiring veth {name}"))),
        }
    }
    Ok(out)
}

/// Veths whose (name, ifalias) satisfy `f`, as (name, ifindex).
fn links_matching(f: impl Fn(&str, Option<&str>) -> bool) -> Result<Vec<(String, u32)>> {
    Ok(veths()?
        .into_iter()
        .filter(|(n, _, alias)| f(n, alias.as_deref()))
        .map(|(n, i, _)| (n, i))
        .collect())
}

/// Every veth of this namespace: (name, ifindex, ifalias).
fn veths() -> Result<Vec<(String, u32, Option<String>)>> {
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
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

/// Whether a veth is one of ours in service: a tabby name (not retired) and
/// an ifalias shaped like an IPAM handle (`<network>.<container id>`).
fn is_attachment(name: &str, alias: Option<&str>) -> bool {
    name.starts_with(VETH_PREFIX)
        && !name.starts_with(RETIRED_PREFIX)
        && alias.is_some_and(|a| a.contains('.'))
}

/// Handles of every attachment in service here (see [`held_attachment`]).
///
/// Blocking.
pub fn attachment_owners() -> Result<Vec<String>> {
    Ok(veths()?
        .into_iter()
        .filter(|(n, _, alias)| is_attachment(n, alias.as_deref()))
        .filter_map(|(_, _, alias)| alias)
        .collect())
}

/// The attachment `owner` holds now: its host veth and the host routes
/// [`wire_pod`] added through it. None when it has none in service.
///
/// Blocking.
pub fn held_attachment(owner: &str) -> Result<Option<HeldAttachment>> {
    let Some((name, index, _)) = veths()?.into_iter().find(|(n, _, alias)| {
        is_attachment(n, alias.as_deref()) && alias.as_deref() == Some(owner)
    }) else {
        return Ok(None);
    };
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
    let mut addresses = Vec::new();
    for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
        addresses.extend(
            link_routes(&mut nl, fam, index)?
                .into_iter()
                .filter(|r| {
                    r.protocol == RouteProtocol::Boot
                        && r.gateway.is_none()
                        && r.dst.prefix_len() == r.dst.max_prefix_len()
                })
                .map(|r| r.dst.addr()),
        );
    }
    Ok(Some(HeldAttachment {
        owner: owner.to_string(),
        host_ifname: name,
        addresses,
    }))
}

/// Deletes a link by name (with its veth peer). A missing link is fine.
///
/// Blocking.
pub fn delete_link_named(name: &str) -> Result<()> {
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
    let Some(link) = get_link(&mut nl, name)? else {
        return Ok(());
    };
    match delete_link(&mut nl, link.index) {
        Ok(()) => Ok(()),
        Err(e) if e.errno == libc::ENODEV => Ok(()),
        Err(e) => Err(e.into_error(format!("deleting {name}"))),
    }
}

/// Names of retired veths left behind (e.g. by a restart before the
/// deferred deletion ran).
///
/// Blocking.
pub fn retired_links() -> Result<Vec<String>> {
    Ok(links_matching(|name, _| name.starts_with(RETIRED_PREFIX))?
        .into_iter()
        .map(|(n, _)| n)
        .collect())
}

/// Addresses (global scope) of interface `index`.
fn link_addresses(nl: &mut NlSocket, index: u32) -> Result<BTreeSet<IpNet>> {
    let mut out = BTreeSet::new();
    for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = AddressMessage::default();
        req.header.family = fam;
        req.header.index = index;
        let msgs = match nl.dump(RouteNetlinkMessage::GetAddress(req)) {
            Ok(m) => m,
            // IPv6 disabled in this namespace: no IPv6 addresses.
            Err(e) if fam == AddressFamily::Inet6 && e.errno == libc::EAFNOSUPPORT => continue,
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
struct LinkRoute {
    dst: IpNet,
    gateway: Option<IpAddr>,
    protocol: RouteProtocol,
}

/// Main-table routes of `fam` through `oif`.
fn link_routes(nl: &mut NlSocket, fam: AddressFamily, oif: u32) -> Result<Vec<LinkRoute>> {
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

fn route_ip(a: &netlink_packet_route::route::RouteAddress) -> Option<IpAddr> {
    match a {
        netlink_packet_route::route::RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        netlink_packet_route::route::RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// CNI CHECK: verifies the host veth exists, is up and has MAC
/// `ee:ee:ee:ee:ee:ee`, the host routes to the pod addresses exist, the pod
/// interface exists in the pod's namespace with exactly the expected
/// addresses, and the pod's default routes point at the gateways. Returns
/// [`Error::Invalid`] listing every problem found.
///
/// Blocking: call it with `tokio::task::spawn_blocking`.
pub fn check_pod(spec: &PodSpec) -> Result<()> {
    validate(spec)?;
    let mut problems = Vec::new();
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket"))?;
    let host = &spec.host_ifname;
    match get_link(&mut nl, host)? {
        None => problems.push(format!("host veth {host} missing")),
        Some(link) => {
            if !link.up {
                problems.push(format!("host veth {host} is down"));
            }
            if link.mac != HOST_VETH_MAC {
                problems.push(format!(
                    "host veth {host} has MAC {} instead of {}",
                    format_mac(&link.mac),
                    format_mac(&HOST_VETH_MAC)
                ));
            }
            let mut routes = Vec::new();
            for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
                let wanted = spec.addresses.iter().any(|a| family(a.addr()) == fam);
                if wanted {
                    routes.extend(link_routes(&mut nl, fam, link.index)?);
                }
            }
            for addr in &spec.addresses {
                if !routes.iter().any(|r| r.dst == *addr && r.gateway.is_none()) {
                    problems.push(format!("host route {addr} dev {host} missing"));
                }
            }
        }
    }

    let pod_problems = in_netns(&spec.netns_path, || check_pod_side(spec))??;
    problems.extend(pod_problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(problems.join("; ")))
    }
}

fn check_pod_side(spec: &PodSpec) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut nl = NlSocket::new().map_err(|e| e.into_error("opening netlink socket in pod"))?;
    let ifname = &spec.pod_ifname;
    let Some(link) = get_link(&mut nl, ifname)? else {
        problems.push(format!("{ifname} missing in pod namespace"));
        return Ok(problems);
    };
    if !link.up {
        problems.push(format!("{ifname} is down"));
    }
    let have = link_addresses(&mut nl, link.index)?;
    let want: BTreeSet<IpNet> = spec.addresses.iter().copied().collect();
    if have != want {
        let fmt = |s: &BTreeSet<IpNet>| {
            s.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        problems.push(format!(
            "{ifname} has addresses [{}], expected [{}]",
            fmt(&have),
            fmt(&want)
        ));
    }
    for (fam, gw, wanted) in [
        (
            AddressFamily::Inet,
            IpAddr::V4(POD_GATEWAY_V4),
            has_v4(spec),
        ),
        (
            AddressFamily::Inet6,
            IpAddr::V6(POD_GATEWAY_V6),
            has_v6(spec),
        ),
    ] {
        if !wanted {
            continue;
        }
        let routes = link_routes(&mut nl, fam, link.index)?;
        if !routes
            .iter()
            .any(|r| r.dst.prefix_len() == 0 && r.gateway == Some(gw))
        {
            problems.push(format!("default route via {gw} dev {ifname} missing"));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn cleanup_errors_keep_the_kind() {
        let e = with_cleanup_error(
            Error::Netlink("adding address".into()),
            &Error::Netlink("deleting veth".into()),
        );
        assert!(
            matches!(&e, Error::Netlink(s) if s.contains("adding address") && s.contains("cleanup failed too: netlink: deleting veth"))
        );
    }
}
