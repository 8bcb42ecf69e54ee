//! CHECK: does the kernel hold the attachment as ADD made it?
use super::link::{family, get_link, link_addresses, link_routes, open};
use super::{format_mac, has_v4, has_v6, validate, PodSpec};
use crate::netlink::ns::in_netns;
use crate::{Error, Result, HOST_VETH_MAC, POD_GATEWAY_V4, POD_GATEWAY_V6};
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use std::collections::BTreeSet;
use std::net::IpAddr;

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
    let mut nl = open("opening netlink socket")?;
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
    let mut nl = open("opening netlink socket in pod")?;
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
