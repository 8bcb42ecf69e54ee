//! Fuzzing, on stable Rust with proptest, of what the controller does with
//! a request before it changes anything: the conversions from protobuf
//! ([`parse_addrs`], [`encap_from_pb`], [`pool_from_pb`], and Assign's,
//! RegisterNode's and UpdatePool's as the services make them), the
//! validation in `ipam::validate` ([`parse_cidr`], [`parse_addr`], and the
//! name and handle checks every [`IpamState`] operation starts with), and
//! the operations themselves on an in-memory state.
//!
//! Inputs are valid requests with fields mutated (bytes flipped, host bits
//! set, lengths around the limits, unknown enum values, control
//! characters) or random. A refusal must be a request error with a message
//! and must leave the state exactly as it was; an accepted request must
//! leave a state whose indexes, consistency check and durable mutations
//! agree. The case counts add up to over 100,000.
use super::*;
use crate::ipam::{IpamState, ProblemKind};
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm};
use std::sync::LazyLock;
use tabby_store::{Mutation, Snapshot};

/// The outcome of one property check (`Result` is the crate's here).
type Check = std::result::Result<(), TestCaseError>;

/// `cases` cases, a fast generator, and no regression files written next
/// to the sources.
fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        // ChaCha, the default, took a fifth of the run time in a debug build.
        rng_algorithm: RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// What every outcome must look like.

/// A refusal: an error that blames the request (never an internal or
/// store error), with a message.
fn assert_clear(e: &Error) -> Check {
    prop_assert!(
        matches!(
            e,
            Error::InvalidArgument(_)
                | Error::NotFound(_)
                | Error::AlreadyExists(_)
                | Error::FailedPrecondition(_)
                | Error::PermissionDenied(_)
                | Error::Exhausted(_)
        ),
        "not a request error: {:?}",
        e
    );
    prop_assert!(!e.to_string().trim().is_empty(), "no message: {:?}", e);
    Ok(())
}

fn assert_invalid(e: &Error) -> Check {
    prop_assert!(matches!(e, Error::InvalidArgument(_)), "{:?}", e);
    assert_clear(e)
}

/// Everything the state holds, private fields included.
fn fingerprint(st: &IpamState) -> String {
    format!("{st:?}")
}

/// The rules of `validate::check_name`, as documented in its message.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The rules of `validate::check_handle`, as documented in its message.
fn handle_ok(h: &str) -> bool {
    !h.is_empty()
        && tabby_proto::limits::handle_fits(h)
        && !h.chars().any(|c| c.is_control() || c == '/')
}

/// What must hold after every accepted operation: indexes that agree
/// with the tables, a clean consistency check, and mutations that rebuild
/// the same state.
fn assert_consistent(st: &IpamState, replica: &Snapshot) -> Check {
    let bad = st.index_problems();
    prop_assert!(bad.is_empty(), "indexes: {:?}", bad);
    let problems: Vec<_> = st
        .check()
        .into_iter()
        // Borrowing is allowed; DeleteNode leaves the node's blocks in use
        // behind (and reports them).
        .filter(|p| {
            !matches!(
                p.kind,
                ProblemKind::BorrowedAddress | ProblemKind::BlockOfUnknownNode
            )
        })
        .collect();
    prop_assert!(problems.is_empty(), "{:?}", problems);
    let re = IpamState::from_snapshot(replica.clone());
    prop_assert_eq!(re.allocations(), st.allocations());
    prop_assert_eq!(re.pools(), st.pools());
    prop_assert_eq!(re.nodes(), st.nodes());
    prop_assert_eq!(re.config(), st.config());
    prop_assert_eq!(re.usage(true), st.usage(true));
    for n in st.nodes() {
        prop_assert_eq!(re.handles_of(&n.name), st.handles_of(&n.name));
        for h in st.handles_of(&n.name) {
            prop_assert_eq!(re.handle(&h), st.handle(&h));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// A state to start from: two address families, a pool with a selector,
// two nodes, handles with and without released addresses.

fn pb_pool(name: &str, cidr: &str, block_size: u32, node_selector: &str) -> pb::Pool {
    pb::Pool {
        name: name.into(),
        cidr: cidr.into(),
        block_size,
        nat_outgoing: true,
        encapsulation: pb::Encapsulation::Vxlan as i32,
        disabled: false,
        node_selector: node_selector.into(),
    }
}

fn base() -> (IpamState, Snapshot) {
    let mut st = IpamState::default();
    let mut replica = Snapshot::default();
    let mut keep = |m: Mutation| replica.apply(&m);
    for p in [
        pb_pool("v4", "10.244.0.0/24", 28, ""),
        pb_pool("v6", "fd00:10:244::/120", 124, ""),
        pb_pool("zone-a", "10.245.0.0/24", 26, "zone == 'a'"),
    ] {
        keep(st.create_pool(pool_from_pb(p).unwrap()).unwrap().1);
    }
    for (name, zone) in [("n1", "a"), ("n2", "b")] {
        let n = pb::Node {
            name: name.into(),
            addresses: vec!["172.18.0.2".into()],
            labels: [("zone".to_string(), zone.to_string())].into(),
            ..Default::default()
        };
        keep(st.register_node(node_from_pb(n).unwrap()).unwrap().1);
    }
    for (node, handle, v4, v6) in [
        ("n1", "net.c1", 1, 0),
        ("n1", "net.c2", 1, 1),
        ("n2", "net.c3", 0, 1),
        ("n2", "net.c4", 1, 0),
    ] {
        let r = pb::AssignRequest {
            handle: handle.into(),
            num_v4: v4,
            num_v6: v6,
            ..Default::default()
        };
        keep(st.assign(node, assign_from_pb(r).unwrap()).unwrap().1);
    }
    keep(st.release_handle(Some("n2"), "net.c4").unwrap().1);
    (st, replica)
}

static BASE: LazyLock<(IpamState, Snapshot)> = LazyLock::new(base);

#[test]
fn the_base_state_is_consistent() {
    let (st, replica) = &*BASE;
    assert_consistent(st, replica).unwrap();
    // Four pod addresses, and a tunnel address of each family for each
    // node (the base state's pools use VXLAN, IPv4 and IPv6).
    assert_eq!(st.allocations().len(), 8);
    for n in ["n1", "n2"] {
        assert!(st.tunnel_address(n).is_some_and(|a| a.is_ipv4()), "{n}");
        assert!(st.tunnel_v6_address(n).is_some_and(|a| a.is_ipv6()), "{n}");
    }
}

// ---------------------------------------------------------------------------
// Generators.

/// Strings of up to `max` characters from `c` (regex strategies are slow
/// in a debug build).
fn chars(c: impl Strategy<Value = char>, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(c, 0..=max).prop_map(String::from_iter)
}

/// Strings that break things: control and non-ASCII characters, lengths
/// around the limits, huge ones.
fn garbage_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => chars(any::<char>(), 16),
        3 => chars(prop::sample::select("abcz019-._/: ".chars().collect::<Vec<_>>()), 20),
        1 => prop::sample::select(vec![
            "", " ", ".", "-", "\0", "\n", "\t", "é", "\u{7f}", "\u{202e}", "/", "a/b", "A",
            "a_b", "a..b", "-a", "a-", "all()", "'", "''", "\"\"", "has(", "!has()",
        ])
        .prop_map(str::to_string),
        1 => (
            prop::sample::select(vec![252usize, 253, 254, 255, 256, 4096]),
            prop::sample::select(vec!['a', '.', 'é', '/']),
        )
            .prop_map(|(n, c)| c.to_string().repeat(n / c.len_utf8())),
    ]
}

/// A string edited at the byte level (kept UTF-8 by lossy conversion).
fn mutated(valid: Vec<&'static str>) -> impl Strategy<Value = String> {
    (
        prop::sample::select(valid),
        prop::collection::vec((any::<Index>(), 0u8..5, any::<u8>()), 1..4),
    )
        .prop_map(|(s, edits)| {
            let mut b = s.as_bytes().to_vec();
            for (i, kind, x) in edits {
                let at = i.index(b.len() + 1);
                match kind {
                    0 if at < b.len() => b[at] ^= x.max(1),
                    1 => b.insert(at, x),
                    2 if at < b.len() => {
                        b.remove(at);
                    }
                    3 => b.truncate(at),
                    _ => b.insert(at, b" /.:0f9"[usize::from(x) % 7]),
                }
            }
            String::from_utf8_lossy(&b).into_owned()
        })
}

const CIDRS: [&str; 18] = [
    "10.244.0.0/24",
    "10.244.0.0/16",
    "10.246.0.0/24",
    "10.246.0.0/28",
    "10.246.0.16/28",
    "10.0.0.0/8",
    "0.0.0.0/0",
    "10.246.0.1/24",
    "10.246.0.0/33",
    "10.246.0.0",
    " 10.246.0.0/24 ",
    "fd00:10:244::/120",
    "fd00:10:246::/120",
    "fd00:10:246::/64",
    "::/0",
    "fd00::1/120",
    "fd00::/129",
    "::ffff:10.246.0.0/120",
];

const ADDRS: [&str; 14] = [
    "10.244.0.1",
    "10.244.0.17",
    "10.244.0.200",
    "10.245.0.9",
    "10.246.0.1",
    "192.168.1.1",
    "fd00:10:244::1",
    "fd00:10:244::33",
    "fd00:10:246::1",
    "::ffff:10.244.0.1",
    " 10.244.0.2 ",
    "10.244.0.256",
    "10.244.0.1/32",
    "0.0.0.0",
];

fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(CIDRS.to_vec()).prop_map(str::to_string),
        3 => mutated(CIDRS.to_vec()),
        1 => garbage_string(),
    ]
}

fn addr() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(ADDRS.to_vec()).prop_map(str::to_string),
        3 => mutated(ADDRS.to_vec()),
        1 => garbage_string(),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["v4", "v6", "zone-a", "p1", "pool-b", "a.b", "n1", "n2", "n3"])
            .prop_map(str::to_string),
        1 => prop::sample::select(vec![253usize, 254]).prop_map(|n| "a".repeat(n)),
        3 => garbage_string(),
    ]
}

fn node_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["n1", "n2", "n3"]).prop_map(str::to_string),
        2 => garbage_string(),
    ]
}

fn handle() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["net.c1", "net.c2", "net.c3", "net.c4", "net.c5", "k8s-pod-network.3f1c9e4a"])
            .prop_map(str::to_string),
        1 => prop::sample::select(vec![253usize, 254, 255]).prop_map(|n| "h".repeat(n)),
        3 => garbage_string(),
    ]
}

fn block_size() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => prop::sample::select(vec![
            0u32, 19, 20, 26, 28, 30, 32, 33, 115, 116, 122, 124, 128, 129, 255, 256, 65536, u32::MAX
        ]),
        1 => any::<u32>(),
    ]
}

fn encapsulation() -> impl Strategy<Value = i32> {
    prop_oneof![
        6 => -2i32..8,
        1 => prop::sample::select(vec![i32::MIN, i32::MAX]),
        1 => any::<i32>(),
    ]
}

fn selector() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "", "all()", "zone == 'a'", "zone == \"b\"", "has(zone)", "!has(zone)",
            "zone != 'b' && has(kubernetes.io/os)", "zone = a", "has(", "k == 'v",
            "k == 'a'b'", " && ", "&&", "zone == ''", "== 'a'", "é == 'a'",
        ])
        .prop_map(str::to_string),
        2 => mutated(vec!["zone == 'a'", "has(zone) && x != \"y\""]),
        2 => garbage_string(),
    ]
}

fn pool() -> impl Strategy<Value = pb::Pool> {
    (
        name(),
        cidr(),
        block_size(),
        any::<bool>(),
        encapsulation(),
        prop::bool::weighted(0.2),
        selector(),
    )
        .prop_map(
            |(name, cidr, block_size, nat_outgoing, encapsulation, disabled, node_selector)| {
                pb::Pool {
                    name,
                    cidr,
                    block_size,
                    nat_outgoing,
                    encapsulation,
                    disabled,
                    node_selector,
                }
            },
        )
}

fn assign_request() -> impl Strategy<Value = pb::AssignRequest> {
    (
        handle(),
        prop::collection::hash_map(garbage_string(), garbage_string(), 0..3),
        prop_oneof![4 => 0u32..3, 1 => any::<u32>()],
        prop_oneof![4 => 0u32..3, 1 => any::<u32>()],
        prop_oneof![3 => Just(Vec::new()), 2 => prop::collection::vec(addr(), 1..4)],
    )
        .prop_map(
            |(handle, attributes, num_v4, num_v6, requested)| pb::AssignRequest {
                handle,
                attributes,
                num_v4,
                num_v6,
                requested,
            },
        )
}

fn node() -> impl Strategy<Value = pb::Node> {
    let label = (
        prop_oneof![
            4 => prop::sample::select(vec!["zone", "kubernetes.io/os", "x"]).prop_map(str::to_string),
            1 => garbage_string(),
        ],
        prop_oneof![
            4 => prop::sample::select(vec!["a", "b", ""]).prop_map(str::to_string),
            1 => garbage_string(),
        ],
    );
    (
        node_name(),
        prop::collection::vec(addr(), 0..3),
        prop::collection::hash_map(label.0, label.1, 0..3),
    )
        .prop_map(|(name, addresses, labels)| pb::Node {
            name,
            addresses,
            labels,
            ..Default::default()
        })
}

fn update_request() -> impl Strategy<Value = pb::UpdatePoolRequest> {
    (
        name(),
        prop::option::of(any::<bool>()),
        prop::option::of(encapsulation()),
        prop::option::of(any::<bool>()),
        prop::option::of(selector()),
        prop::option::weighted(0.3, cidr()),
        prop::option::weighted(0.3, block_size()),
    )
        .prop_map(
            |(name, nat_outgoing, encapsulation, disabled, node_selector, cidr, block_size)| {
                pb::UpdatePoolRequest {
                    name,
                    nat_outgoing,
                    encapsulation,
                    disabled,
                    node_selector,
                    cidr,
                    block_size,
                }
            },
        )
}

/// One request to the state, in its protobuf form where it has one.
#[derive(Debug, Clone)]
enum Call {
    CreatePool(pb::Pool),
    UpdatePool(pb::UpdatePoolRequest),
    DeletePool(String),
    RegisterNode(pb::Node),
    DeleteNode(String),
    Assign(String, pb::AssignRequest),
    ReleaseHandle(Option<String>, String),
    ReleaseAddress(Option<String>, String),
    SetConfig(pb::SetIpamConfigRequest),
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        3 => pool().prop_map(Call::CreatePool),
        2 => update_request().prop_map(Call::UpdatePool),
        1 => name().prop_map(Call::DeletePool),
        2 => node().prop_map(Call::RegisterNode),
        1 => node_name().prop_map(Call::DeleteNode),
        6 => (node_name(), assign_request()).prop_map(|(n, r)| Call::Assign(n, r)),
        3 => (prop::option::of(node_name()), handle()).prop_map(|(n, h)| Call::ReleaseHandle(n, h)),
        2 => (prop::option::of(node_name()), addr()).prop_map(|(n, a)| Call::ReleaseAddress(n, a)),
        1 => (
            prop::option::of(any::<bool>()),
            prop::option::of(prop_oneof![0u32..3, any::<u32>()]),
            prop::option::of(prop_oneof![Just(0u32), Just(0x100_0000), 1u32..5, any::<u32>()]),
            prop::option::of(prop_oneof![Just(0u32), Just(65536), 4789u32..4790, any::<u32>()]),
        )
            .prop_map(|(s, m, vni, port)| Call::SetConfig(pb::SetIpamConfigRequest {
                strict_affinity: s,
                max_blocks_per_node: m,
                vxlan_vni: vni,
                vxlan_port: port,
            })),
    ]
}

/// Converts and applies one call as the services do; what an accepted
/// request returned is checked against the rules it had to pass.
fn apply(st: &mut IpamState, c: &Call) -> Result<Mutation> {
    Ok(match c.clone() {
        Call::CreatePool(p) => {
            let (p, m) = st.create_pool(pool_from_pb(p)?)?;
            assert!(name_ok(&p.name), "pool {:?} accepted", p.name);
            m
        }
        Call::UpdatePool(r) => {
            let (name, u) = update_from_pb(r)?;
            st.update_pool(&name, u)?.1
        }
        Call::DeletePool(name) => st.delete_pool(&name)?.1,
        Call::RegisterNode(n) => {
            let (n, m) = st.register_node(node_from_pb(n)?)?;
            assert!(name_ok(&n.name), "node {:?} accepted", n.name);
            m
        }
        Call::DeleteNode(name) => st.delete_node(&name)?.1,
        Call::Assign(node, r) => {
            let r = assign_from_pb(r)?;
            let handle = r.handle.clone();
            let (views, m) = st.assign(&node, r)?;
            assert!(handle_ok(&handle), "handle {handle:?} accepted");
            for v in &views {
                assert_eq!(v.handle, handle);
                assert_eq!(v.node, node);
            }
            m
        }
        Call::ReleaseHandle(node, h) => {
            let m = st.release_handle(node.as_deref(), &h)?.1;
            assert!(handle_ok(&h), "handle {h:?} accepted");
            m
        }
        Call::ReleaseAddress(node, a) => st.release_address(node.as_deref(), parse_addr(&a)?)?.1,
        Call::SetConfig(r) => {
            let (c, m) = st.set_config(config_update_from_pb(&r))?;
            // Only what the rules allow is kept.
            let v = vxlan_settings(&c);
            assert!((1..=0xff_ffff).contains(&v.vni) && v.port != 0, "{c:?}");
            m
        }
    })
}

// ---------------------------------------------------------------------------
// The properties. Case counts: 40,000 + 10,000 + 25,000 + 30,000 = 105,000.

proptest! {
    #![proptest_config(cases(40_000))]

    /// Addresses and CIDRs, valid ones edited byte by byte and garbage:
    /// accepted ones are what they say (a CIDR without host bits); refused
    /// ones are InvalidArgument, and a list fails on its first bad entry.
    #[test]
    fn addresses_and_cidrs(
        a in addr(),
        c in cidr(),
        list in prop::collection::vec(addr(), 0..4),
    ) {
        match parse_addr(&a) {
            Ok(ip) => {
                prop_assert_eq!(ip.to_string().parse::<std::net::IpAddr>().unwrap(), ip);
                prop_assert_eq!(a.trim().parse::<std::net::IpAddr>().unwrap(), ip);
            }
            Err(e) => assert_invalid(&e)?,
        }
        match parse_cidr(&c) {
            Ok(n) => {
                prop_assert_eq!(n.trunc(), n);
                prop_assert_eq!(n.to_string().parse::<IpNet>().unwrap(), n);
            }
            Err(e) => {
                assert_invalid(&e)?;
                if let Ok(n) = c.trim().parse::<IpNet>() {
                    prop_assert!(e.to_string().contains(&n.trunc().to_string()), "{}", e);
                }
            }
        }
        let first_bad = list.iter().find_map(|s| parse_addr(s).err());
        match (parse_addrs(&list), first_bad) {
            (Ok(v), None) => prop_assert_eq!(v.len(), list.len()),
            (Err(e), Some(want)) => {
                assert_invalid(&e)?;
                prop_assert_eq!(e.to_string(), want.to_string());
            }
            (got, want) => prop_assert!(false, "parse_addrs {:?}, first error {:?}", got, want),
        }
    }
}

proptest! {
    #![proptest_config(cases(10_000))]

    /// Encapsulations: the five known values and nothing else, both ways.
    #[test]
    fn encapsulations(v in encapsulation()) {
        match encap_from_pb(v) {
            Ok(e) => {
                prop_assert!((0..=4).contains(&v));
                prop_assert_eq!(encap_to_pb(e) as i32, v);
            }
            Err(e) => {
                prop_assert!(!(0..=4).contains(&v));
                assert_invalid(&e)?;
                prop_assert!(e.to_string().contains(&v.to_string()), "{}", e);
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(25_000))]

    /// CreatePool: the conversion, then the pool checks on a state that
    /// has pools. A refused pool changes nothing; an accepted one converts
    /// back to itself.
    #[test]
    fn pools_from_pb(p in pool()) {
        let (mut st, mut replica) = BASE.clone();
        let before = fingerprint(&st);
        let converted = pool_from_pb(p.clone());
        let created = converted.and_then(|pool| st.create_pool(pool));
        match created {
            Ok((pool, m)) => {
                prop_assert!(name_ok(&pool.name));
                prop_assert_eq!(&pool.name, &p.name);
                prop_assert_eq!(pool.cidr.trunc(), pool.cidr);
                prop_assert!(pool.block_size >= pool.cidr.prefix_len());
                prop_assert_eq!(pool_from_pb(pool_to_pb(&pool)).unwrap(), pool.clone());
                prop_assert_eq!(st.pools().len(), BASE.0.pools().len() + 1);
                replica.apply(&m);
                assert_consistent(&st, &replica)?;
            }
            Err(e) => {
                assert_clear(&e)?;
                prop_assert!(fingerprint(&st) == before, "refused {:?} ({}) but changed the state", p, e);
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(30_000))]

    /// Sequences of requests of every kind: each refused one changes
    /// nothing, and after the accepted ones the state is consistent and
    /// rebuilt exactly by their mutations.
    #[test]
    fn ipam_request_sequences(calls in prop::collection::vec(call(), 1..5)) {
        let (mut st, mut replica) = BASE.clone();
        let mut changed = false;
        for c in calls {
            let before = st.clone();
            match apply(&mut st, &c) {
                Ok(m) if m.is_empty() => prop_assert!(
                    fingerprint(&st) == fingerprint(&before),
                    "{:?} wrote nothing but changed the state",
                    c
                ),
                Ok(m) => {
                    changed = true;
                    replica.apply(&m);
                }
                Err(e) => {
                    assert_clear(&e)?;
                    prop_assert!(
                        fingerprint(&st) == fingerprint(&before),
                        "refused {:?} ({}) but changed the state",
                        c,
                        e
                    );
                }
            }
        }
        // Nothing written: the state is still the (consistent) base, as
        // the fingerprints show.
        if changed {
            assert_consistent(&st, &replica)?;
        }
    }
}
