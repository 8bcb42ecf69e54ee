use super::*;
use crate::model::{BlockIntent, IntentDelta, NodeIndex, PoolIntent};
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
            ("control-plane".into(), vec![a("172.18.0.2")]),
            ("worker".into(), vec![a("172.18.0.3")]),
            ("worker2".into(), vec![a("172.18.0.4")]),
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

#[test]
fn encapsulated_pools_get_no_remote_routes_and_are_reported() {
    let d = desired(&walkthrough(Encapsulation::Vxlan), "worker");
    assert_eq!(
        d.routes,
        [bh("10.244.0.64/26")].into(),
        "only our own blackhole"
    );
    assert_eq!(d.unsupported.len(), 1);
    assert!(d.unsupported[0].contains("ENCAPSULATION_VXLAN"));
}

#[test]
fn an_owner_without_an_address_of_the_family_is_unroutable() {
    let mut i = walkthrough(Encapsulation::None);
    i.apply(IntentDelta {
        revision: 11,
        nodes: vec![("worker2".into(), vec![a("fd00::4")])],
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
        nodes: vec![("worker3".into(), vec![a("172.18.0.9")])],
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
                    vec![IpAddr::from([172, 18, 0, idx as u8 + 2])],
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
                            (nodes[n].to_string(), vec![a])
                        })
                        .collect(),
                    removed_nodes: rm_nodes.into_iter().map(|n| nodes[n].to_string()).collect(),
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
        nodes: vec![("worker2".into(), vec![a("172.18.0.40")])],
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
        nodes: vec![("far".into(), vec![a("fd00::9")])],
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
