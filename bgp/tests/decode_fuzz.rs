//! `decode` reads whatever a peer (or an attacker on the wire) sends: it must
//! answer every input with a message, a request for more bytes or an error,
//! and never panic. Fed here with arbitrary bytes and with valid messages
//! that are mutated, 100,000 cases each (`FUZZ_CASES` to change that).
#![allow(clippy::unwrap_used)]

use ipnet::IpNet;
use proptest::prelude::*;
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::OnceLock,
};
use tabby_bgp::codec::{
    decode, encode, Afi, Capabilities, GracefulRestart, Message, Notification, Open, Origin, Route,
    RouteRefresh, Update, HEADER_LEN,
};

/// Decodes `buf` as a stream: message after message until it needs more
/// bytes or fails. Checks what a caller relies on.
fn drain(buf: &[u8]) {
    let mut at = 0;
    while let Ok(Some((_, used))) = decode(&buf[at..]) {
        assert!(used >= HEADER_LEN && at + used <= buf.len());
        at += used;
    }
}

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(make_seeds)
}

fn make_seeds() -> Vec<Vec<u8>> {
    let route = |p: &str, nh: &str| Route {
        prefix: p.parse::<IpNet>().unwrap(),
        next_hop: nh.parse::<IpAddr>().unwrap(),
        origin: Origin::Igp,
        as_path: vec![64512, 4_200_000_000],
        communities: vec![0xfc00_0064],
        local_pref: Some(100),
    };
    let messages = [
        Message::Keepalive,
        Message::Open(Open {
            asn: 64512,
            hold_time: 90,
            router_id: Ipv4Addr::new(10, 0, 0, 1),
            capabilities: Capabilities {
                four_octet_as: Some(64512),
                ipv4_unicast: true,
                ipv6_unicast: true,
                route_refresh: true,
                graceful_restart: Some(GracefulRestart {
                    restart_time: 120,
                    restarting: false,
                    families: vec![(Afi::Ipv4, true), (Afi::Ipv6, true)],
                }),
            },
        }),
        Message::Update(Update {
            announce: vec![
                route("10.244.1.0/26", "192.168.1.11"),
                route("10.244.7.9/32", "192.168.1.11"),
            ],
            withdraw: vec!["10.244.2.0/26".parse().unwrap()],
            end_of_rib: None,
        }),
        Message::Update(Update {
            announce: vec![route("fd00:10:244:1::/122", "fd00::11")],
            withdraw: vec!["fd00:10:244:2::/122".parse().unwrap()],
            end_of_rib: None,
        }),
        Message::Update(Update {
            end_of_rib: Some(Afi::Ipv6),
            ..Update::default()
        }),
        Message::Notification(Notification {
            code: 6,
            subcode: 2,
            data: b"shutdown".to_vec(),
        }),
        Message::RouteRefresh(RouteRefresh { afi: Afi::Ipv6 }),
    ];
    messages.iter().map(|m| encode(m).unwrap()).collect()
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite one byte.
    Set(usize, u8),
    /// Flip some bits of one byte.
    Xor(usize, u8),
    /// Insert a byte.
    Insert(usize, u8),
    /// Remove a byte.
    Remove(usize),
    /// Cut the message short.
    Truncate(usize),
    /// Rewrite the header's length field (keeping the bytes).
    Length(u16),
}

fn apply(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = b.len().max(1);
        match *m {
            Mutation::Set(i, v) => {
                if let Some(x) = b.get_mut(i % n) {
                    *x = v;
                }
            }
            Mutation::Xor(i, v) => {
                if let Some(x) = b.get_mut(i % n) {
                    *x ^= v;
                }
            }
            Mutation::Insert(i, v) => {
                let i = i % (b.len() + 1);
                b.insert(i, v);
            }
            Mutation::Remove(i) => {
                if !b.is_empty() {
                    b.remove(i % b.len());
                }
            }
            Mutation::Truncate(i) => b.truncate(i % n),
            Mutation::Length(l) => {
                if b.len() >= 18 {
                    b[16..18].copy_from_slice(&l.to_be_bytes());
                }
            }
        }
    }
    b
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Xor(i, v)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => any::<usize>().prop_map(Mutation::Remove),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => any::<u16>().prop_map(Mutation::Length),
    ]
}

/// A BGP-looking start (marker, a length, a type) then arbitrary bytes, so
/// that arbitrary input reaches the message parsers and not just the marker
/// check.
fn framed() -> impl Strategy<Value = Vec<u8>> {
    (0u8..=6, prop::collection::vec(any::<u8>(), 0..200)).prop_map(|(kind, body)| {
        let mut b = vec![0xff; 16];
        b.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
        b.push(kind);
        b.extend(body);
        b
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        // FUZZ_CASES=n runs more (or fewer) cases.
        cases: std::env::var("FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(
        b in prop_oneof![prop::collection::vec(any::<u8>(), 0..600), framed()]
    ) {
        drain(&b);
    }

    #[test]
    fn mutated_messages_never_panic(
        seed in 0usize..7,
        muts in prop::collection::vec(mutation(), 1..6),
        tail in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut b = apply(seeds()[seed].clone(), &muts);
        b.extend(tail);
        drain(&b);
    }
}
