//! Real bytes from real routers: BGP streams captured between GoBGP 3.10 and
//! BIRD 2.0.12 (Debian packages) in network namespaces on this kind of
//! machine (see the header of each file in `captures/`). Every message must
//! decode to what the routers were told to send, and what tabby encodes from
//! it must decode to the same.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use tabby_bgp::codec::{
    decode, encode, Afi, Capabilities, GracefulRestart, Message, Notification, Open, Origin, Route,
    RouteRefresh, Update,
};

/// The messages of one capture, checking that each line is one whole
/// message and that the stream, fed whole or byte by byte, gives the same.
fn messages(capture: &str) -> Vec<Message> {
    let mut stream = Vec::new();
    let mut out = Vec::new();
    for line in capture
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let bytes: Vec<u8> = (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
            .collect();
        let (m, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "{line}");
        // What tabby can encode of it comes back the same.
        if let Ok(again) = encode(&m) {
            assert_eq!(decode(&again).unwrap().unwrap().0, m, "{line}");
        }
        stream.extend(bytes);
        out.push(m);
    }
    // As it came from the socket: a growing buffer, drained message by message.
    let mut buf = Vec::new();
    let mut again = Vec::new();
    for b in stream {
        buf.push(b);
        if let Some((m, used)) = decode(&buf).unwrap() {
            buf.drain(..used);
            again.push(m);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(again, out);
    out
}

fn route(prefix: &str, nh: &str, origin: Origin, as_path: &[u32]) -> Route {
    Route {
        prefix: prefix.parse().unwrap(),
        next_hop: nh.parse().unwrap(),
        origin,
        as_path: as_path.to_vec(),
        communities: vec![],
        local_pref: None,
    }
}

fn eor(afi: Afi) -> Message {
    Message::Update(Update {
        end_of_rib: Some(afi),
        ..Update::default()
    })
}

fn announce(routes: Vec<Route>) -> Message {
    Message::Update(Update {
        announce: routes,
        ..Update::default()
    })
}

fn withdraw(prefix: &str) -> Message {
    Message::Update(Update {
        withdraw: vec![prefix.parse().unwrap()],
        ..Update::default()
    })
}

fn cease_shutdown() -> Message {
    Message::Notification(Notification {
        code: 6,
        subcode: 2,
        data: vec![],
    })
}

fn open(asn: u32, hold_time: u16, id: [u8; 4], afi: Afi, rr: bool) -> Message {
    Message::Open(Open {
        asn,
        hold_time,
        router_id: Ipv4Addr::from(id),
        capabilities: Capabilities {
            four_octet_as: Some(asn),
            ipv4_unicast: afi == Afi::Ipv4,
            ipv6_unicast: afi == Afi::Ipv6,
            route_refresh: rr,
            graceful_restart: Some(GracefulRestart {
                restart_time: 120,
                restarting: false,
                families: vec![(afi, false)],
            }),
        },
    })
}

#[test]
fn gobgp_over_ipv4() {
    let mut a = route("10.244.1.0/26", "10.99.0.1", Origin::Incomplete, &[]);
    a.local_pref = Some(100);
    let mut b = a.clone();
    a.communities = vec![(64512 << 16) | 100];
    b.prefix = "10.244.2.7/32".parse().unwrap();
    assert_eq!(
        messages(include_str!("captures/gobgp-ipv4.hex")),
        vec![
            // GoBGP also sends FQDN and extended-next-hop capabilities: skipped.
            open(64512, 90, [10, 99, 0, 1], Afi::Ipv4, true),
            Message::Keepalive,
            announce(vec![a.clone()]),
            announce(vec![b]),
            eor(Afi::Ipv4),
            withdraw("10.244.2.7/32"),
            announce(vec![a]),
            eor(Afi::Ipv4),
            cease_shutdown(),
        ]
    );
}

#[test]
fn bird_over_ipv4() {
    let mut a = route("10.250.1.0/24", "10.99.0.2", Origin::Igp, &[]);
    a.local_pref = Some(100);
    a.communities = vec![(64512 << 16) | 200];
    let mut b = a.clone();
    b.prefix = "10.250.2.0/25".parse().unwrap();
    assert_eq!(
        messages(include_str!("captures/bird-ipv4.hex")),
        vec![
            // BIRD also sends enhanced route refresh and long-lived GR: skipped.
            open(64512, 240, [10, 99, 0, 2], Afi::Ipv4, true),
            Message::Keepalive,
            announce(vec![a, b]),
            eor(Afi::Ipv4),
            Message::RouteRefresh(RouteRefresh { afi: Afi::Ipv4 }),
        ]
    );
}

#[test]
fn gobgp_over_ipv6() {
    let mut a = route(
        "fd00:10:244:1::/122",
        "fd99::1",
        Origin::Incomplete,
        &[64512],
    );
    a.communities = vec![(64512 << 16) | 100];
    assert_eq!(
        messages(include_str!("captures/gobgp-ipv6.hex")),
        vec![
            open(64512, 90, [10, 99, 0, 1], Afi::Ipv6, true),
            Message::Keepalive,
            announce(vec![a]),
            eor(Afi::Ipv6),
            withdraw("fd00:10:244:1::/122"),
            eor(Afi::Ipv6),
        ]
    );
}

#[test]
fn bird_over_ipv6() {
    // BIRD sends the global and the link-local next hop: tabby keeps the global.
    assert_eq!(
        messages(include_str!("captures/bird-ipv6.hex")),
        vec![
            open(64513, 240, [10, 99, 0, 2], Afi::Ipv6, true),
            Message::Keepalive,
            announce(vec![
                route("fd50:2::/56", "fd99::2", Origin::Igp, &[64513]),
                route("fd50:1::/64", "fd99::2", Origin::Igp, &[64513]),
            ]),
            eor(Afi::Ipv6),
            Message::RouteRefresh(RouteRefresh { afi: Afi::Ipv6 }),
            cease_shutdown(),
        ]
    );
}

#[test]
fn simple_messages_encode_as_the_routers_do() {
    // KEEPALIVE, the IPv4 End-of-RIB, ROUTE-REFRESH and NOTIFICATION have
    // one form only: tabby's bytes are the routers' bytes.
    for (capture, line) in [
        (include_str!("captures/gobgp-ipv4.hex"), 1),
        (include_str!("captures/gobgp-ipv4.hex"), 4),
        (include_str!("captures/gobgp-ipv4.hex"), 8),
        (include_str!("captures/bird-ipv4.hex"), 4),
        (include_str!("captures/bird-ipv6.hex"), 4),
        (include_str!("captures/bird-ipv6.hex"), 5),
    ] {
        let hex = capture
            .lines()
            .filter(|l| !l.starts_with('#'))
            .nth(line)
            .unwrap();
        let (m, _) = decode(
            &(0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>(),
        )
        .unwrap()
        .unwrap();
        let ours: String = encode(&m)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(ours, hex, "{m:?}");
    }
}
