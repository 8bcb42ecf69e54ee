//! BGP configuration: protobuf to the stored form and back, checked. Pure:
//! a refused request changes nothing because nothing here writes.
use crate::error::{Error, Result};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tabby_proto::v1 as pb;
use tabby_store::{BgpConfig, BgpPeer};

/// The AS number when none is set.
pub const DEFAULT_ASN: u32 = 64512;
/// BGP's port.
pub const BGP_PORT: u16 = 179;

fn invalid(m: String) -> Error {
    Error::InvalidArgument(m)
}

/// The AS number in effect.
pub fn asn(c: &BgpConfig) -> u32 {
    if c.asn == 0 {
        DEFAULT_ASN
    } else {
        c.asn
    }
}

/// The router id in effect: the configured one, else `fallback` (the
/// controller's IPv4 listen address).
pub fn router_id(c: &BgpConfig, fallback: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    c.router_id.or(fallback)
}

/// The global settings as the API shows them.
pub fn global_to_pb(
    c: &BgpConfig,
    listen: SocketAddr,
    fallback: Option<Ipv4Addr>,
) -> pb::BgpGlobal {
    let l = c.listen.unwrap_or(SocketAddr::new(listen.ip(), BGP_PORT));
    pb::BgpGlobal {
        enabled: c.enabled,
        asn: asn(c),
        router_id: router_id(c, fallback)
            .map(|r| r.to_string())
            .unwrap_or_default(),
        listen_address: l.ip().to_string(),
        listen_port: u32::from(l.port()),
    }
}

/// Applies a SetBgpConfig request to `c`.
pub fn apply_global(
    mut c: BgpConfig,
    r: &pb::SetBgpConfigRequest,
    listen: SocketAddr,
) -> Result<BgpConfig> {
    if let Some(e) = r.enabled {
        c.enabled = e;
    }
    if let Some(a) = r.asn {
        if a == 0 {
            return Err(invalid("asn 0 is reserved: use 1..4294967295".into()));
        }
        c.asn = a;
    }
    if let Some(id) = &r.router_id {
        c.router_id = if id.is_empty() {
            None
        } else {
            let a: Ipv4Addr = id
                .parse()
                .map_err(|_| invalid(format!("router_id {id:?} is not an IPv4 address")))?;
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                return Err(invalid(format!("router_id {a} cannot identify a router")));
            }
            Some(a)
        };
    }
    let mut l = c.listen.unwrap_or(SocketAddr::new(listen.ip(), BGP_PORT));
    if let Some(a) = &r.listen_address {
        l.set_ip(if a.is_empty() {
            listen.ip()
        } else {
            a.parse()
                .map_err(|_| invalid(format!("listen_address {a:?} is not an address")))?
        });
    }
    if let Some(p) = r.listen_port {
        l.set_port(
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("listen_port {p} is out of range: use 1..65535")))?,
        );
    }
    c.listen = (l != SocketAddr::new(listen.ip(), BGP_PORT)).then_some(l);
    Ok(c)
}

fn prefixes(what: &str, v: &[String]) -> Result<Vec<IpNet>> {
    v.iter()
        .map(|s| {
            let n: IpNet = s.parse().map_err(|_| {
                invalid(format!(
                    "{what}: {s:?} is not a prefix (e.g. 10.244.0.0/16)"
                ))
            })?;
            if n.trunc() != n {
                return Err(invalid(format!(
                    "{what}: {s} has host bits set; did you mean {}?",
                    n.trunc()
                )));
            }
            Ok(n)
        })
        .collect()
}

/// "asn:value" as one 32-bit community.
fn community(s: &str) -> Result<u32> {
    tabby_bgp::codec::parse_community(s).ok_or_else(|| {
        invalid(format!(
            "community {s:?}: write it as asn:value, each 0..65535"
        ))
    })
}

pub use tabby_bgp::codec::community_string;

/// Checks an AddPeer request against the configuration `c` and the pools
/// that exist.
pub fn peer_from_pb(p: pb::BgpPeer, c: &BgpConfig, pools: &[String]) -> Result<BgpPeer> {
    let address: IpAddr = p
        .address
        .parse()
        .map_err(|_| invalid(format!("peer address {:?} is not an address", p.address)))?;
    if let Some(o) = c.peers.iter().find(|o| o.address == address) {
        return Err(invalid(format!(
            "peer {address} overlaps the configured peer {} (AS {}): delete it first to change it",
            o.address, o.remote_asn
        )));
    }
    if p.remote_asn == 0 {
        return Err(invalid(
            "remote_asn 0 is reserved: use 1..4294967295".into(),
        ));
    }
    let hold = u16::try_from(p.hold_time)
        .ok()
        .filter(|h| *h == 0 || *h >= 3)
        .ok_or_else(|| invalid(format!("hold_time {} must be 0 or 3..65535", p.hold_time)))?;
    let keepalive = u16::try_from(p.keepalive)
        .ok()
        .filter(|k| hold == 0 || *k <= hold)
        .ok_or_else(|| {
            invalid(format!(
                "keepalive {} must be at most the hold time",
                p.keepalive
            ))
        })?;
    if p.password.len() > tabby_bgp::md5::MAX_KEY_LEN {
        return Err(invalid(format!(
            "password: a TCP-MD5 password has at most {} bytes",
            tabby_bgp::md5::MAX_KEY_LEN
        )));
    }
    if !p.node_selector.is_empty() {
        crate::ipam::selector::Selector::parse(&p.node_selector)
            .map_err(|e| invalid(format!("node_selector {:?}: {e}", p.node_selector)))?;
    }
    for name in &p.export_pools {
        if !pools.contains(name) {
            return Err(invalid(format!(
                "export_pools: no pool {name:?}; ListPools shows the pools"
            )));
        }
    }
    Ok(BgpPeer {
        address,
        remote_asn: p.remote_asn,
        passive: p.passive,
        hold_time: hold,
        keepalive,
        password: p.password,
        node_selector: p.node_selector,
        export_pools: p.export_pools,
        export_prefixes: prefixes("export_prefixes", &p.export_prefixes)?,
        communities: p
            .communities
            .iter()
            .map(|s| community(s))
            .collect::<Result<_>>()?,
        import_prefixes: prefixes("import_prefixes", &p.import_prefixes)?,
    })
}

/// The sessions `node` holds itself: the peers whose selector matches its
/// labels, with their passwords (for that node only). Nothing when BGP is
/// off or the node is unknown.
pub fn node_sessions(
    c: &BgpConfig,
    node: Option<&tabby_store::Node>,
) -> pb::GetBgpSessionsResponse {
    let peers = match node {
        Some(n) if c.enabled => c
            .peers
            .iter()
            .filter(|p| {
                !p.node_selector.is_empty()
                    && crate::ipam::selector::Selector::parse(&p.node_selector)
                        .is_ok_and(|s| s.matches(&n.labels))
            })
            .map(|p| pb::BgpPeer {
                password: p.password.clone(),
                ..peer_to_pb(p)
            })
            .collect(),
        _ => Vec::new(),
    };
    pb::GetBgpSessionsResponse {
        enabled: c.enabled,
        asn: asn(c),
        peers,
    }
}

/// A stored peer as the API shows it.
pub fn peer_to_pb(p: &BgpPeer) -> pb::BgpPeer {
    pb::BgpPeer {
        address: p.address.to_string(),
        remote_asn: p.remote_asn,
        passive: p.passive,
        hold_time: u32::from(p.hold_time),
        keepalive: u32::from(p.keepalive),
        // Never shown: only whether there is one.
        password: String::new(),
        has_password: !p.password.is_empty(),
        node_selector: p.node_selector.clone(),
        export_pools: p.export_pools.clone(),
        export_prefixes: p.export_prefixes.iter().map(ToString::to_string).collect(),
        communities: p.communities.iter().map(|c| community_string(*c)).collect(),
        import_prefixes: p.import_prefixes.iter().map(ToString::to_string).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(addr: &str, asn: u32) -> pb::BgpPeer {
        pb::BgpPeer {
            address: addr.into(),
            remote_asn: asn,
            hold_time: 90,
            ..Default::default()
        }
    }

    #[test]
    fn bad_peers_are_refused_with_the_reason() {
        let mut c = BgpConfig::default();
        let pools = vec!["default-pool".to_string()];
        let ok = peer_from_pb(peer("172.18.0.100", 64512), &c, &pools).unwrap();
        c.peers.push(ok);
        let cases: Vec<(pb::BgpPeer, &str)> = vec![
            (peer("172.18.0.101", 0), "remote_asn 0"),
            (peer("172.18.0.100", 65000), "overlaps"),
            (peer("nope", 65000), "not an address"),
            (
                pb::BgpPeer {
                    hold_time: 2,
                    ..peer("172.18.0.102", 65000)
                },
                "hold_time",
            ),
            (
                pb::BgpPeer {
                    export_prefixes: vec!["10.0.0.1/8".into()],
                    ..peer("172.18.0.103", 65000)
                },
                "host bits",
            ),
            (
                pb::BgpPeer {
                    import_prefixes: vec!["banana".into()],
                    ..peer("172.18.0.103", 65000)
                },
                "not a prefix",
            ),
            (
                pb::BgpPeer {
                    communities: vec!["65536:1".into()],
                    ..peer("172.18.0.103", 65000)
                },
                "community",
            ),
            (
                pb::BgpPeer {
                    export_pools: vec!["nope".into()],
                    ..peer("172.18.0.103", 65000)
                },
                "no pool",
            ),
            (
                pb::BgpPeer {
                    password: "x".repeat(81),
                    ..peer("172.18.0.103", 65000)
                },
                "TCP-MD5",
            ),
            (
                pb::BgpPeer {
                    node_selector: "rack ==".into(),
                    ..peer("172.18.0.103", 65000)
                },
                "node_selector",
            ),
        ];
        for (p, want) in cases {
            let e = peer_from_pb(p.clone(), &c, &pools).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{p:?}: {e}");
            assert!(e.to_string().contains(want), "{p:?}: {e}");
        }
        let p = peer_from_pb(
            pb::BgpPeer {
                communities: vec!["64512:100".into()],
                export_prefixes: vec!["10.244.0.0/16".into()],
                ..peer("fd00::1", 65000)
            },
            &c,
            &pools,
        )
        .unwrap();
        assert_eq!(peer_to_pb(&p).communities, vec!["64512:100"]);
        // A password is kept but never shown; a selector is kept.
        let p = peer_from_pb(
            pb::BgpPeer {
                password: "s3cret".into(),
                node_selector: "rack == 'a'".into(),
                ..peer("172.18.0.104", 65000)
            },
            &c,
            &pools,
        )
        .unwrap();
        assert_eq!(p.password, "s3cret");
        let shown = peer_to_pb(&p);
        assert!(shown.password.is_empty() && shown.has_password);
        assert_eq!(shown.node_selector, "rack == 'a'");
    }

    #[test]
    fn global_settings_default_and_validate() {
        let listen: SocketAddr = "172.18.0.1:5151".parse().unwrap();
        let fallback = Some(Ipv4Addr::new(172, 18, 0, 1));
        let g = global_to_pb(&BgpConfig::default(), listen, fallback);
        assert_eq!(
            (g.enabled, g.asn, g.router_id.as_str(), g.listen_port),
            (false, 64512, "172.18.0.1", 179)
        );
        for r in [
            pb::SetBgpConfigRequest {
                asn: Some(0),
                ..Default::default()
            },
            pb::SetBgpConfigRequest {
                router_id: Some("fd00::1".into()),
                ..Default::default()
            },
            pb::SetBgpConfigRequest {
                listen_port: Some(0),
                ..Default::default()
            },
            pb::SetBgpConfigRequest {
                listen_address: Some("x".into()),
                ..Default::default()
            },
        ] {
            assert!(
                apply_global(BgpConfig::default(), &r, listen).is_err(),
                "{r:?}"
            );
        }
        let c = apply_global(
            BgpConfig::default(),
            &pb::SetBgpConfigRequest {
                enabled: Some(true),
                asn: Some(4_200_000_000),
                listen_port: Some(1179),
                ..Default::default()
            },
            listen,
        )
        .unwrap();
        let g = global_to_pb(&c, listen, fallback);
        assert_eq!(
            (g.enabled, g.asn, g.listen_port),
            (true, 4_200_000_000, 1179)
        );
    }
}
