use super::*;
use crate::model::{BlockIntent, IntentDelta, NodeIndex, NodeIntent, PoolIntent, Vtep};
use proptest::prelude::*;

fn n(s: &str) -> IpNet {
    s.parse().unwrap()
}
fn a(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn via(dst: &str, gw: &str) -> Route {
    Route {
        dst: n(dst),
        target: RouteTarget::Via(a(gw)),
    }
}
fn bh(dst: &str) -> Route {
    Route {
        dst: n(dst),
        target: RouteTarget::Blackhole,
    }
}
fn block(cidr: &str, node: &str) -> (IpNet, BlockIntent) {
    (
        n(cidr),
        BlockIntent {
            node: Some(node.into()),
            pool: "p".into(),
        },
    )
}

/// A three-node cluster (the lab's): a block each, one address borrowed
/// each way between worker and worker2.
fn walkthrough(encapsulation: Encapsulation) -> Intent {
    let mut i = Intent::default();
    i.apply(IntentDelta {
        snapshot: true,
        revision: 10,
        blocks: vec![
            block("10.244.0.0/26", "control-plane"),
            block("10.244.0.64/26", "worker"),
            block("10.244.0.128/26", "worker2"),
        ],
        borrowed: vec![
            (a("10.244.0.70"), "worker2".into()),
            (a("10.244.0.130"), "worker".into()),
        ],
        pools: Some(vec![(
            "p".into(),
            PoolIntent {
                cidr: n("10.244.0.0/16"),
                nat_outgoing: true,
                encapsulation,
            },
        )]),
        nodes: vec![
            (
                "control-plane".into(),
                NodeIntent::plain(&[a("172.18.0.2")]),
            ),
            ("worker".into(), NodeIntent::plain(&[a("172.18.0.3")])),
            ("worker2".into(), NodeIntent::plain(&[a("172.18.0.4")])),
        ],
        ..Default::default()
    });
    i
}

#[test]
fn desired_routes_like_the_walkthrough() {
    let d = desired(&walkthrough(Encapsulation::None), "worker");
    let want: BTreeSet<Route> = [
        via("10.244.0.0/26", "172.18.0.2"),
        bh("10.244.0.64/26"),
        via("10.244.0.128/26", "172.18.0.4"),
        // Borrowed from our block by worker2: /32 via worker2.
        via("10.244.0.70/32", "172.18.0.4"),
        // 10.244.0.130 is held by us: pod wiring routes it, not the planner.
    ]
    .into();
    assert_eq!(d.routes, want);
    assert_eq!(d.nat_v4.masq, vec![n("10.244.0.0/16")]);
    assert_eq!(d.nat_v4.all, vec![n("10.244.0.0/16")]);
    assert!(!d.ipv6);
    assert!(d.unsupported.is_empty() && d.unroutable.is_empty());
}

fn tunnel(dst: &str, gw: &str, t: Tunnel) -> Route {
    Route {
        dst: n(dst),
        target: RouteTarget::Tunnel(a(gw), t),
    }
}

/// The walkthrough's cluster with `enc`, nodes on two racks (control-plane
/// and worker on 172.18.0.0/24, worker2 on 172.18.1.0/24) and a VTEP each.
fn racks(enc: Encapsulation) -> Intent {
    let mut i = walkthrough(enc);
    let node = |addr: &str, tunnel: &str, name: &str| NodeIntent {
        addrs: vec![n(addr)],
        vtep: Some(Vtep {
            tunnel_ip: a(tunnel),
            mac: crate::model::vtep_mac(name),
        }),
        vtep_v6: None,
    };
    i.apply(IntentDelta {
        revision: 11,
        nodes: vec![
            (
                "control-plane".into(),
                node("172.18.0.2/24", "10.244.0.1", "control-plane"),
            ),
            (
                "worker".into(),
                node("172.18.0.3/24", "10.244.0.65", "worker"),
            ),
            (
                "worker2".into(),
                node("172.18.1.4/24", "10.244.0.129", "worker2"),
            ),
        ],
        ..Default::default()
    });
    i
}

#[test]
fn vxlan_routes_every_remote_destination_through_the_tunnel() {
    let i = racks(Encapsulation::Vxlan);
    let d = desired(&i, "worker");
    let v = Tunnel::Vxlan;
    let want: BTreeSet<Route> = [
        tunnel("10.244.0.0/26", "10.244.0.1", v),
        bh("10.244.0.64/26"),
        tunnel("10.244.0.128/26", "10.244.0.129", v),
        tunnel("10.244.0.70/32", "10.244.0.129", v),
    ]
    .into();
    assert_eq!(d.routes, want);
    assert!(d.unsupported.is_empty() && d.unroutable.is_empty(), "{d:?}");
    let dev = d.overlay.vxlan.expect("vxlan.tabby");
    assert_eq!(dev.local, a("172.18.0.3"));
    assert_eq!(dev.tunnel_ip, a("10.244.0.65"));
    assert_eq!(dev.mac, crate::model::vtep_mac("worker"));
    assert_eq!(dev.settings, VxlanSettings::default());
    let vteps: Vec<(IpAddr, IpAddr)> = d
        .overlay
        .vteps
        .iter()
        .map(|e| (e.tunnel_ip, e.underlay))
        .collect();
    assert_eq!(
        vteps,
        vec![
            (a("10.244.0.1"), a("172.18.0.2")),
            (a("10.244.0.129"), a("172.18.1.4"))
        ]
    );
    assert!(d.overlay.ipip.is_none() && d.overlay.problems.is_empty());
    // ShowRoutes{node} names the tunnel address as the next hop.
    let view = cluster_routes(&i, Some("worker"));
    assert!(view
        .iter()
        .any(|r| r.destination == n("10.244.0.128/26") && r.next_hop == Some(a("10.244.0.129"))));
}

#[test]
fn cross_subnet_tunnels_only_across_the_rack_boundary() {
    let i = racks(Encapsulation::VxlanCrossSubnet);
    let d = desired(&i, "worker");
    let want: BTreeSet<Route> = [
        // control-plane shares worker's /24: plain.
        via("10.244.0.0/26", "172.18.0.2"),
        bh("10.244.0.64/26"),
        tunnel("10.244.0.128/26", "10.244.0.129", Tunnel::Vxlan),
        tunnel("10.244.0.70/32", "10.244.0.129", Tunnel::Vxlan),
    ]
    .into();
    assert_eq!(d.routes, want);
    assert_eq!(d.overlay.vteps.len(), 1, "only worker2's VTEP");
    // From worker2 both others are across the boundary.
    let d2 = desired(&i, "worker2");
    assert!(d2
        .routes
        .iter()
        .all(|r| matches!(r.target, RouteTarget::Tunnel(..) | RouteTarget::Blackhole)));
    assert_eq!(d2.overlay.vteps.len(), 2);
    // A node that reported a bare address (a host prefix) shares a subnet
    // with nobody.
    let mut j = i.clone();
    j.nodes.get_mut("worker").unwrap().addrs = vec![n("172.18.0.3/32")];
    assert!(matches!(
        route_at(&j, "worker", &n("10.244.0.0/26")).unwrap().target,
        RouteTarget::Tunnel(..)
    ));
}

#[test]
fn ipip_routes_via_the_node_address_on_tunl0() {
    for enc in [Encapsulation::Ipip, Encapsulation::IpipCrossSubnet] {
        let i = racks(enc);
        let d = desired(&i, "worker");
        let cp = if enc == Encapsulation::Ipip {
            tunnel("10.244.0.0/26", "172.18.0.2", Tunnel::Ipip)
        } else {
            via("10.244.0.0/26", "172.18.0.2")
        };
        let want: BTreeSet<Route> = [
            cp,
            bh("10.244.0.64/26"),
            tunnel("10.244.0.128/26", "172.18.1.4", Tunnel::Ipip),
            tunnel("10.244.0.70/32", "172.18.1.4", Tunnel::Ipip),
        ]
        .into();
        assert_eq!(d.routes, want, "{enc:?}");
        assert_eq!(d.overlay.ipip, Some(a("172.18.0.3")));
        assert!(d.overlay.vxlan.is_none() && d.overlay.vteps.is_empty());
    }
}

#[test]
fn vxlan_without_tunnel_addresses_is_reported_not_routed() {
    let d = desired(&walkthrough(Encapsulation::Vxlan), "worker");
    assert_eq!(
        d.routes,
        [bh("10.244.0.64/26")].into(),
        "only our own blackhole"
    );
    assert_eq!(d.unroutable.len(), 3, "{:?}", d.unroutable);
    assert!(
        d.unroutable[0].contains("no VXLAN tunnel address"),
        "{:?}",
        d.unroutable
    );
    assert!(d.overlay.vxlan.is_none());
    assert_eq!(d.overlay.problems.len(), 1, "{:?}", d.overlay.problems);
}

#[test]
fn ipip_ipv6_pools_are_reported() {
    let mut i = walkthrough(Encapsulation::None);
    i.pools.insert(
        "v6".into(),
        PoolIntent {
            cidr: n("fd00:10::/64"),
            nat_outgoing: false,
            encapsulation: Encapsulation::Ipip,
        },
    );
    let d = desired(&i, "worker");
    assert_eq!(d.unsupported.len(), 1);
    assert!(d.unsupported[0].contains("ENCAPSULATION_IPIP"));
}

#[test]
fn ipv6_vxlan_pools_tunnel_over_vxlan_v6() {
    // Dual-stack nodes on two racks; an IPv6 VXLAN CrossSubnet pool.
    let mut i = Intent::default();
    let node = |v4: &str, v6: &str, t6: &str, name: &str| NodeIntent {
        addrs: vec![n(v4), n(v6)],
        vtep: None,
        vtep_v6: Some(Vtep {
            tunnel_ip: a(t6),
            mac: crate::model::vtep_mac_v6(name),
        }),
    };
    i.apply(IntentDelta {
        snapshot: true,
        revision: 1,
        pools: Some(vec![(
            "v6".into(),
            PoolIntent {
                cidr: n("fd00:10::/64"),
                nat_outgoing: false,
                encapsulation: Encapsulation::VxlanCrossSubnet,
            },
        )]),
        blocks: vec![
            (
                n("fd00:10::/122"),
                BlockIntent {
                    node: Some("a".into()),
                    pool: "v6".into(),
                },
            ),
            (
                n("fd00:10::40/122"),
                BlockIntent {
                    node: Some("b".into()),
                    pool: "v6".into(),
                },
            ),
            (
                n("fd00:10::80/122"),
                BlockIntent {
                    node: Some("c".into()),
                    pool: "v6".into(),
                },
            ),
        ],
        nodes: vec![
            (
                "a".into(),
                node("172.18.0.2/24", "fd00:18::2/64", "fd00:10::1", "a"),
            ),
            (
                "b".into(),
                node("172.18.0.3/24", "fd00:18::3/64", "fd00:10::41", "b"),
            ),
            (
                "c".into(),
                node("172.18.1.4/24", "fd00:18:1::4/64", "fd00:10::81", "c"),
            ),
        ],
        ..Default::default()
    });
    let d = desired(&i, "a");
    let want: BTreeSet<Route> = [
        bh("fd00:10::/122"),
        via("fd00:10::40/122", "fd00:18::3"),
        tunnel("fd00:10::80/122", "fd00:10::81", Tunnel::VxlanV6),
    ]
    .into();
    assert_eq!(d.routes, want);
    assert!(d.unsupported.is_empty() && d.unroutable.is_empty(), "{d:?}");
    let dev = d.overlay.vxlan_v6.expect("vxlan-v6.tabby");
    assert_eq!(
        (dev.local, dev.tunnel_ip),
        (a("fd00:18::2"), a("fd00:10::1"))
    );
    assert_eq!(dev.mac, crate::model::vtep_mac_v6("a"));
    assert_ne!(dev.mac, crate::model::vtep_mac("a"));
    assert_eq!(
        d.overlay
            .vteps_v6
            .iter()
            .map(|e| e.underlay)
            .collect::<Vec<_>>(),
        vec![a("fd00:18:1::4")]
    );
    assert!(d.overlay.vxlan.is_none() && d.overlay.vteps.is_empty());
    assert_eq!(Tunnel::VxlanV6.overhead(), 70);
}

#[test]
fn vtep_macs_are_stable_local_unicast_and_distinct() {
    let m = crate::model::vtep_mac("worker");
    assert_eq!(m, crate::model::vtep_mac("worker"));
    assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
    let all: BTreeSet<_> = (0..5000)
        .map(|k| crate::model::vtep_mac(&format!("node-{k}")))
        .collect();
    assert_eq!(all.len(), 5000);
    // Names one character apart differ in most bytes.
    let (a, b) = (
        crate::model::vtep_mac("node-a"),
        crate::model::vtep_mac("node-b"),
    );
    assert!(
        a.iter().zip(&b).filter(|(x, y)| x != y).count() >= 4,
        "{a:?} {b:?}"
    );
    let s = crate::model::mac_string(&m);
    assert_eq!(crate::model::parse_mac(&s), Some(m));
    assert_eq!(crate::model::parse_mac("02:00:00:00:00"), None);
    assert_eq!(crate::model::parse_mac("02:00:00:00:00:0g"), None);
}

#[test]
fn an_owner_without_an_address_of_the_family_is_unroutable() {
    let mut i = walkthrough(Encapsulation::None);
    i.apply(IntentDelta {
        revision: 11,
        nodes: vec![("worker2".into(), NodeIntent::plain(&[a("fd00::4")]))],
        ..Default::default()
    });
    let d = desired(&i, "worker");
    assert!(!d.routes.iter().any(|r| r.dst == n("10.244.0.128/26")));
    assert_eq!(d.unroutable.len(), 2, "{:?}", d.unroutable);
}

#[test]
fn deltas_upsert_and_remove_and_a_snapshot_replaces() {
    let mut i = walkthrough(Encapsulation::None);
    i.apply(IntentDelta {
        revision: 11,
        removed_blocks: vec![n("10.244.0.0/26")],
        removed_borrowed: vec![a("10.244.0.70")],
        blocks: vec![block("10.244.1.0/26", "worker3")],
        nodes: vec![("worker3".into(), NodeIntent::plain(&[a("172.18.0.9")]))],
        ..Default::default()
    });
    assert_eq!(i.revision, 11);
    let d = desired(&i, "worker");
    assert!(d.routes.contains(&via("10.244.1.0/26", "172.18.0.9")));
    assert!(!d
        .routes
        .iter()
        .any(|r| r.dst == n("10.244.0.0/26") || r.dst == n("10.244.0.70/32")));
    assert_eq!(i.pools.len(), 1, "pools unchanged by a delta without pools");
    i.apply(IntentDelta {
        snapshot: true,
        revision: 12,
        ..Default::default()
    });
    assert_eq!(
        i,
        Intent {
            revision: 12,
            ..Default::default()
        }
    );
}

#[test]
fn ipv6_pools_fill_the_ip6_sets_and_ask_for_forwarding() {
    let mut i = walkthrough(Encapsulation::None);
    let mut pools: Vec<_> = i.pools.clone().into_iter().collect();
    pools.push((
        "v6".into(),
        PoolIntent {
            cidr: n("fd00:10:244::/48"),
            nat_outgoing: false,
            encapsulation: Encapsulation::None,
        },
    ));
    i.apply(IntentDelta {
        revision: 11,
        pools: Some(pools),
        ..Default::default()
    });
    let d = desired(&i, "worker");
    assert!(d.ipv6);
    assert_eq!(d.nat_v6.all, vec![n("fd00:10:244::/48")]);
    assert!(d.nat_v6.masq.is_empty());
}

#[test]
fn the_cluster_table_lists_every_block_and_borrowed_address() {
    let t = cluster_routes(&walkthrough(Encapsulation::None), None);
    let rows: Vec<_> = t
        .iter()
        .map(|r| (r.destination.to_string(), r.node.as_str(), r.kind.as_str()))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("10.244.0.0/26".into(), "control-plane", "block"),
            ("10.244.0.64/26".into(), "worker", "block"),
            ("10.244.0.70/32".into(), "worker2", "borrowed"),
            ("10.244.0.128/26".into(), "worker2", "block"),
            ("10.244.0.130/32".into(), "worker", "borrowed"),
        ]
    );
    assert_eq!(t[0].next_hop, Some(a("172.18.0.2")));
}

#[test]
fn a_node_view_of_an_encapsulated_pool_holds_only_its_blackhole() {
    let i = walkthrough(Encapsulation::VxlanCrossSubnet);
    let t = cluster_routes(&i, Some("worker"));
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0].kind, ClusterRouteKind::Blackhole);
    assert_eq!(t[0].node, "worker");
    assert_eq!(t[0].next_hop, None);
    // The cluster table still names the blocks, with their encapsulation.
    let all = cluster_routes(&i, None);
    assert_eq!(all.len(), 5);
    assert!(all
        .iter()
        .all(|r| r.encapsulation == Encapsulation::VxlanCrossSubnet));
}

fn arb_intent() -> impl Strategy<Value = Intent> {
    let nodes = ["n0", "n1", "n2", "n3"];
    (
        proptest::collection::btree_map(0u8..64, (0usize..5, any::<bool>()), 0..20),
        proptest::collection::btree_map(0u16..4096, 0usize..4, 0..20),
        any::<bool>(),
    )
        .prop_map(move |(blocks, borrowed, encap)| {
            let mut i = Intent::default();
            i.pools.insert(
                "p".into(),
                PoolIntent {
                    cidr: n("10.0.0.0/16"),
                    nat_outgoing: true,
                    encapsulation: if encap {
                        Encapsulation::Vxlan
                    } else {
                        Encapsulation::None
                    },
                },
            );
            for (k, (owner, host)) in blocks {
                // Some /32 blocks, which a borrowed address can coincide with.
                let cidr = if host {
                    IpNet::new(IpAddr::from([10, 0, k, 1]), 32).unwrap()
                } else {
                    IpNet::new(IpAddr::from([10, 0, k, 0]), 26).unwrap()
                };
                i.blocks.insert(
                    cidr,
                    BlockIntent {
                        node: nodes.get(owner).map(|s| s.to_string()),
                        pool: "p".into(),
                    },
                );
            }
            for (k, holder) in borrowed {
                let addr = IpAddr::from([10, 0, (k >> 6) as u8, (k & 63) as u8 + 1]);
                i.borrowed.insert(addr, nodes[holder].into());
            }
            // n3 has no address: its destinations are unroutable.
            for (idx, name) in nodes.iter().take(3).enumerate() {
                i.nodes.insert(
                    name.to_string(),
                    NodeIntent::plain(&[IpAddr::from([172, 18, 0, idx as u8 + 2])]),
                );
            }
            i
        })
}

proptest! {
    /// The node view of the cluster table is exactly what the node installs.
    #[test]
    fn the_node_view_is_exactly_the_desired_routes(i in arb_intent(), me in 0usize..4) {
        let me = ["n0", "n1", "n2", "n3"][me];
        let d = desired(&i, me);
        let view = cluster_routes(&i, Some(me));
        let as_routes: BTreeSet<Route> = view
            .iter()
            .map(|r| Route {
                dst: r.destination,
                target: r.next_hop.map_or(RouteTarget::Blackhole, RouteTarget::Via),
            })
            .collect();
        prop_assert_eq!(as_routes, d.routes.clone());
        // Every blackhole is one of my blocks; every via leaves this node.
        for r in &view {
            match r.kind {
                ClusterRouteKind::Blackhole => prop_assert_eq!(r.node.as_str(), me),
                _ => prop_assert_ne!(r.node.as_str(), me),
            }
        }
    }
}

fn arb_delta() -> impl Strategy<Value = IntentDelta> {
    let nodes = ["n0", "n1", "n2", "n3"];
    (
        proptest::collection::vec((0u8..64, 0usize..5), 0..4),
        proptest::collection::vec(0u8..64, 0..3),
        proptest::collection::vec((0u16..4096, 0usize..4), 0..4),
        proptest::collection::vec(0u16..4096, 0..3),
        proptest::collection::vec((0usize..4, 0u8..3), 0..2),
        proptest::collection::vec(0usize..4, 0..2),
    )
        .prop_map(
            move |(blocks, rm_blocks, borrowed, rm_borrowed, nodes_ch, rm_nodes)| {
                let block = |k: u8| {
                    if k.is_multiple_of(4) {
                        IpNet::new(IpAddr::from([10, 0, k, 1]), 32).unwrap()
                    } else {
                        IpNet::new(IpAddr::from([10, 0, k, 0]), 26).unwrap()
                    }
                };
                let addr = |k: u16| IpAddr::from([10, 0, (k >> 6) as u8, (k & 63) as u8 + 1]);
                IntentDelta {
                    snapshot: false,
                    revision: 2,
                    blocks: blocks
                        .into_iter()
                        .map(|(k, o)| {
                            (
                                block(k),
                                BlockIntent {
                                    node: nodes.get(o).map(|s| s.to_string()),
                                    pool: "p".into(),
                                },
                            )
                        })
                        .collect(),
                    removed_blocks: rm_blocks.into_iter().map(block).collect(),
                    borrowed: borrowed
                        .into_iter()
                        .map(|(k, h)| (addr(k), nodes[h].to_string()))
                        .collect(),
                    removed_borrowed: rm_borrowed.into_iter().map(addr).collect(),
                    pools: None,
                    // A node's address moves (or, for 2, it loses its IPv4 one).
                    nodes: nodes_ch
                        .into_iter()
                        .map(|(n, v)| {
                            let a = match v {
                                2 => "fd00::9".parse().unwrap(),
                                v => IpAddr::from([172, 18, 1, v]),
                            };
                            (nodes[n].to_string(), NodeIntent::plain(&[a]))
                        })
                        .collect(),
                    removed_nodes: rm_nodes.into_iter().map(|n| nodes[n].to_string()).collect(),
                    vxlan: None,
                }
            },
        )
}

proptest! {
    /// Re-planning only the destinations a delta touched gives exactly the
    /// routes a full recomputation gives.
    #[test]
    fn a_delta_replanned_at_its_touched_destinations_equals_a_full_plan(
        before in arb_intent(),
        delta in arb_delta(),
        me in 0usize..4,
    ) {
        let me = ["n0", "n1", "n2", "n3"][me];
        let mut want: BTreeMap<IpNet, Route> =
            desired(&before, me).routes.into_iter().map(|r| (r.dst, r)).collect();
        let mut after = before.clone();
        after.apply(delta.clone());
        let touched = delta.touched(&after).expect("a delta without pools");
        for dst in &touched {
            match route_at(&after, me, dst) {
                Some(r) => want.insert(*dst, r),
                None => want.remove(dst),
            };
        }
        let full = desired(&after, me).routes;
        prop_assert_eq!(want.into_values().collect::<BTreeSet<_>>(), full);
    }
}

proptest! {
    /// A node index kept through a sequence of deltas equals the index of
    /// the intent they produced, and what a delta touches by the index is
    /// what it touches by a walk over every block.
    #[test]
    fn a_kept_node_index_agrees_with_a_fresh_one_and_with_the_walk(
        start in arb_intent(),
        deltas in proptest::collection::vec(arb_delta(), 1..8),
    ) {
        let mut intent = start.clone();
        let mut index = NodeIndex::of(&intent);
        for d in deltas {
            index.unlink(&intent, &d);
            intent.apply(d.clone());
            index.link(&intent, &d);
            prop_assert_eq!(&index, &NodeIndex::of(&intent));
            prop_assert_eq!(d.touched_indexed(&index), d.touched(&intent));
        }
    }
}

#[test]
fn snapshots_and_pool_changes_touch_everything() {
    let i = walkthrough(Encapsulation::None);
    assert!(IntentDelta {
        snapshot: true,
        ..Default::default()
    }
    .touched(&i)
    .is_none());
    assert!(IntentDelta {
        pools: Some(vec![]),
        ..Default::default()
    }
    .touched(&i)
    .is_none());
    let moved = IntentDelta {
        nodes: vec![("worker2".into(), NodeIntent::plain(&[a("172.18.0.40")]))],
        ..Default::default()
    };
    let t = moved.touched(&i).unwrap();
    assert_eq!(
        t,
        [n("10.244.0.128/26"), n("10.244.0.70/32")].into(),
        "worker2's block and the address it holds"
    );
}

#[test]
fn an_unroutable_borrowed_address_leaves_the_block_route_at_its_prefix() {
    // A /32 block of worker2's, whose one address node "far" (no IPv4
    // address) borrowed: the block route stays, in both functions.
    let mut i = walkthrough(Encapsulation::None);
    i.apply(IntentDelta {
        revision: 11,
        blocks: vec![block("10.244.1.5/32", "worker2")],
        borrowed: vec![(a("10.244.1.5"), "far".into())],
        nodes: vec![("far".into(), NodeIntent::plain(&[a("fd00::9")]))],
        ..Default::default()
    });
    let want = via("10.244.1.5/32", "172.18.0.4");
    assert!(desired(&i, "worker").routes.contains(&want));
    assert_eq!(route_at(&i, "worker", &n("10.244.1.5/32")), Some(want));
    // The holder itself also routes the block to its owner, and its view
    // names the rule that made the route: the block, worker2's.
    let view = cluster_routes(&i, Some("far"));
    let row = view
        .iter()
        .find(|r| r.destination == n("10.244.1.5/32"))
        .expect("the block route");
    assert_eq!(
        (row.node.as_str(), row.kind),
        ("worker2", ClusterRouteKind::Block)
    );
    // The cluster table lists both the block and the borrowed address.
    let all = cluster_routes(&i, None);
    assert_eq!(
        all.iter()
            .filter(|r| r.destination == n("10.244.1.5/32"))
            .count(),
        2
    );
}
