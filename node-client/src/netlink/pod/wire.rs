//! ADD: creating and configuring the veth pair, and undoing it on failure.
use super::link::{
    add_address, add_device_route, add_permanent_neighbour, delete_link, get_link, open,
    set_link_up,
};
use super::{format_mac, has_v4, has_v6, validate, PodSpec, WiredPod};
use crate::error::Errno;
use crate::netlink::ns::{in_netns, set_sysctl};
use crate::netlink::socket::NlSocket;
use crate::{Error, Result, HOST_VETH_MAC, POD_GATEWAY_V4, POD_GATEWAY_V6};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

/// Wires a pod the way Calico does: creates the veth pair in the current
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
/// returns the original error, or [`Error::Cleanup`] with both if the
/// deletion failed too.
///
/// Blocking: call it with `tokio::task::spawn_blocking` (never from a thread
/// that called `setns`). The pod side is configured on a dedicated thread
/// inside the pod's namespace, see [`in_netns`].
pub fn wire_pod(spec: &PodSpec) -> Result<WiredPod> {
    validate(spec)?;
    let mut nl = open("opening netlink socket")?;
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
        if e.errno == Errno::EEXIST && !matches!(get_link(&mut nl, host), Ok(Some(_))) {
            // Not our name: the pod already has an interface of that name.
            let mut n = e.into_netlink(what);
            n.note = Some(format!("{} exists in the pod namespace?", spec.pod_ifname));
            return Err(Error::Netlink(n));
        }
        return Err(e.into_error(what));
    }

    match configure(&mut nl, spec) {
        Ok(w) => Ok(w),
        Err(err) => {
            let cleanup = match get_link(&mut nl, host) {
                Ok(Some(l)) => match delete_link(&mut nl, l.index) {
                    Ok(()) => Ok(()),
                    Err(e) if e.errno == Errno::ENODEV => Ok(()),
                    Err(e) => Err(e.into_error(format!("deleting veth {host}"))),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match cleanup {
                Ok(()) => Err(err),
                Err(c) => Err(Error::cleanup(err, c)),
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
        // No duplicate address detection on a point-to-point veth: its
        // link-local address would stay tentative for a second or two,
        // during which the first packets to the pod are lost.
        set_sysctl(&format!("net/ipv6/conf/{host}/accept_dad"), "0")?;
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
    let mut nl = open("opening netlink socket in pod")?;
    let ifname = &spec.pod_ifname;
    let link = get_link(&mut nl, ifname)?
        .ok_or_else(|| Error::NotFound(format!("{ifname} missing in pod namespace")))?;
    if let Some(lo) = get_link(&mut nl, "lo")? {
        if !lo.up {
            set_link_up(&mut nl, lo.index, "lo")?;
        }
    }
    if has_v6(spec) {
        // As on the host side: nothing else is on this link.
        set_sysctl(&format!("net/ipv6/conf/{ifname}/accept_dad"), "0")?;
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
