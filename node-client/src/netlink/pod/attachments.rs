//! The attachments this node's kernel holds: what DEL and GC retire and
//! reclaim reads back.
use super::link::{link_routes, links_matching, open, veths};
use super::{HeldAttachment, RETIRED_PREFIX};
use crate::error::Errno;
use crate::{Error, Result, VETH_PREFIX};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

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
/// caller deletes retired links later with [`super::delete_link_named`].
/// Returns the retired names (none when the owner has no veth: DEL is
/// idempotent).
///
/// Blocking.
pub fn retire_owned(owner: &str) -> Result<Vec<String>> {
    if owner.is_empty() {
        return Err(Error::Invalid("retiring needs an owner".into()));
    }
    let mut nl = open("opening netlink socket")?;
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
            Err(e) if e.errno == Errno::ENODEV => {}
            Err(e) => return Err(e.into_error(format!("retiring veth {name}"))),
        }
    }
    Ok(out)
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
/// [`super::wire_pod`] added through it. None when it has none in service.
///
/// Blocking.
pub fn held_attachment(owner: &str) -> Result<Option<HeldAttachment>> {
    let Some((name, index, _)) = veths()?.into_iter().find(|(n, _, alias)| {
        is_attachment(n, alias.as_deref()) && alias.as_deref() == Some(owner)
    }) else {
        return Ok(None);
    };
    let mut nl = open("opening netlink socket")?;
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
