use super::*;
use crate::error::{Error, Result};
use ipnet::IpNet;
use proptest::prelude::*;
use std::{collections::BTreeMap, net::IpAddr};
use tabby_store::{Allocation, Block, Encapsulation, Handle, Node, Pool, Snapshot};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A pool with nat_outgoing, no encapsulation, every node (tests across the crate).
pub(crate) fn pool(name: &str, cidr: &str, bs: u8) -> Pool {
    Pool {
        name: name.into(),
        cidr: cidr.parse().unwrap(),
        block_size: bs,
        nat_outgoing: true,
        encapsulation: Encapsulation::None,
        disabled: false,
        node_selector: String::new(),
    }
}

fn node(name: &str) -> Node {
    Node {
        name: name.into(),
        addresses: vec![ip("172.18.0.2")],
        labels: BTreeMap::new(),
        prefix_lens: vec![],
    }
}

/// State plus a replica rebuilt from the mutations alone: every operation's
/// mutation must describe exactly the change it made.
struct Harness {
    st: IpamState,
    replica: Snapshot,
}

impl Harness {
    fn new(pools: &[Pool], nodes: &[&str]) -> Harness {
        let mut h = Harness {
            st: IpamState::default(),
            replica: Snapshot::default(),
        };
        for p in pools {
            let (_, m) = h.st.create_pool(p.clone()).unwrap();
            h.replica.apply(&m);
        }
        for n in nodes {
            let (_, m) = h.st.register_node(node(n)).unwrap();
            h.replica.apply(&m);
        }
        h
    }
    fn assign(&mut self, n: &str, handle: &str) -> Result<Vec<AllocationView>> {
        self.assign_req(
            n,
            AssignRequest {
                handle: handle.into(),
                ..Default::default()
            },
        )
    }
    fn assign_req(&mut self, n: &str, r: AssignRequest) -> Result<Vec<AllocationView>> {
        let strict = self.st.config.strict_affinity;
        let (v, m) = self.st.assign(n, r)?;
        self.replica.apply(&m);
        if strict && !m.is_empty() {
            assert!(
                v.iter().all(|a| !a.borrowed()),
                "borrowed under strict affinity: {v:?}"
            );
        }
        Ok(v)
    }
    fn release(&mut self, handle: &str) -> Vec<IpAddr> {
        let (v, m) = self.st.release_handle(None, handle).unwrap();
        self.replica.apply(&m);
        v
    }
    fn set_config(&mut self, strict: bool, max: u32) {
        let (_, m) = self
            .st
            .set_config(ConfigUpdate {
                strict_affinity: Some(strict),
                max_blocks_per_node: Some(max),
                ..Default::default()
            })
            .unwrap();
        self.replica.apply(&m);
    }
    /// Invariants that must hold after every operation.
    fn check_invariants(&self) {
        let allocs = self.st.allocations();
        let mut by_addr = BTreeMap::new();
        for a in &allocs {
            assert!(
                by_addr.insert(a.address, a.handle.clone()).is_none(),
                "{} twice",
                a.address
            );
            assert!(
                self.st
                    .pools
                    .values()
                    .any(|p| p.rec.cidr.contains(&a.address)),
                "{} outside pools",
                a.address
            );
        }
        for (hid, h) in &self.st.handles {
            for a in &h.addresses {
                assert_eq!(
                    by_addr.get(a).map(String::as_str),
                    Some(&**hid),
                    "handle {hid} lists {a}"
                );
            }
        }
        let problems: Vec<_> = self
            .st
            .check()
            .into_iter()
            .filter(|p| p.kind != ProblemKind::BorrowedAddress)
            .collect();
        assert!(problems.is_empty(), "{problems:?}");
        let bad = self.st.index_problems();
        assert!(bad.is_empty(), "indexes: {bad:?}");
        // The durable picture rebuilds the same state.
        let re = IpamState::from_snapshot(self.replica.clone());
        let bad = re.index_problems();
        assert!(bad.is_empty(), "indexes after a reload: {bad:?}");
        assert_eq!(re.allocations(), allocs);
        assert_eq!(re.handles, self.st.handles);
        assert_eq!(re.usage(true), self.st.usage(true));
        let free = |s: &IpamState| -> Vec<Vec<(u64, u32)>> {
            s.blocks
                .values()
                .map(|b| b.free.iter().copied().collect())
                .collect()
        };
        assert_eq!(free(&re), free(&self.st), "FIFO order survives reload");
        // Loaded in the store's order, a slot shares its handle's name with
        // the handle table (memory, #17).
        for b in re.blocks.values() {
            for s in &b.slots {
                if let super::records::Slot::Used(al) = s {
                    let (k, _) = re.handles.get_key_value(&al.handle).expect("listed");
                    assert!(
                        std::sync::Arc::ptr_eq(k, &al.handle),
                        "{} not shared",
                        al.handle
                    );
                }
            }
        }
        // And one name per node: a handle's, a slot's and the per-node
        // index's are the same `Arc`.
        let shared = |node: &super::state::Name| {
            let (k, _) = re.node_handles.get_key_value(&**node).expect("indexed");
            assert!(std::sync::Arc::ptr_eq(k, node), "node {node} not shared");
        };
        re.handles.values().for_each(|h| shared(&h.node));
        for b in re.blocks.values() {
            for s in &b.slots {
                if let super::records::Slot::Used(al) = s {
                    shared(&al.node);
                }
            }
        }
        // Allocations before handles: the same state, only without sharing.
        let other = IpamState::from_snapshot_in_order(self.replica.clone(), true);
        assert!(
            other.index_problems().is_empty(),
            "{:?}",
            other.index_problems()
        );
        assert_eq!(other.allocations(), allocs);
        assert_eq!(other.handles, self.st.handles);
        assert_eq!(other.usage(true), self.st.usage(true));
        assert_eq!(free(&other), free(&self.st));
    }
}

#[test]
fn pool_validation() {
    let mut st = IpamState::default();
    let bad = [
        (pool("a", "10.0.0.1/16", 26), "host bits"),
        (pool("a", "10.0.0.0/16", 19), "out of range"),
        (pool("a", "10.0.0.0/16", 33), "out of range"),
        (pool("a", "fd00::/48", 26), "out of range"),
        (pool("a", "10.0.0.0/28", 26), "larger than the pool"),
        (pool("A_b", "10.0.0.0/16", 26), "name"),
    ];
    for (p, msg) in bad {
        let e = st.create_pool(p).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains(msg), "{e}");
    }
    let (p, _) = st.create_pool(pool("v4", "10.244.0.0/16", 0)).unwrap();
    assert_eq!(p.block_size, 26);
    let (p, _) = st.create_pool(pool("v6", "fd00:10:244::/48", 0)).unwrap();
    assert_eq!(p.block_size, 122);
    let e = st
        .create_pool(pool("x", "10.244.128.0/17", 26))
        .unwrap_err();
    assert!(e.to_string().contains("overlaps pool \"v4\""), "{e}");
    let e = st.create_pool(pool("x", "10.0.0.0/8", 26)).unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
    assert!(matches!(
        st.create_pool(pool("v4", "10.9.0.0/16", 26)),
        Err(Error::AlreadyExists(_))
    ));
    let mut p = pool("sel", "10.9.0.0/16", 26);
    p.node_selector = "zone = a".into();
    assert!(matches!(st.create_pool(p), Err(Error::InvalidArgument(_))));
    assert_eq!(st.pools().len(), 2, "failed creates change nothing");
}

#[test]
fn pool_update_immutables_and_delete_rules() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/24", 26)], &["n1"]);
    let e =
        h.st.update_pool(
            "p",
            PoolUpdate {
                cidr: Some("10.0.1.0/24".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("immutable"), "{e}");
    let e =
        h.st.update_pool(
            "p",
            PoolUpdate {
                block_size: Some(28),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("immutable"), "{e}");
    assert!(matches!(
        h.st.update_pool("nope", PoolUpdate::default()),
        Err(Error::NotFound(_))
    ));
    let (p, _) =
        h.st.update_pool(
            "p",
            PoolUpdate {
                nat_outgoing: Some(false),
                encapsulation: Some(Encapsulation::VxlanCrossSubnet),
                cidr: Some("10.0.0.0/24".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(!p.nat_outgoing && p.encapsulation == Encapsulation::VxlanCrossSubnet);

    h.assign("n1", "h1").unwrap();
    let e = h.st.delete_pool("p").unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)));
    assert!(e.to_string().contains("disable it"), "{e}");
    h.st.update_pool(
        "p",
        PoolUpdate {
            disabled: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        matches!(h.assign("n1", "h2"), Err(Error::FailedPrecondition(_))),
        "disabled pool hands out nothing"
    );
    h.release("h1");
    let ((_, blocks), m) = h.st.delete_pool("p").unwrap();
    h.replica.apply(&m);
    assert_eq!(blocks, 1);
    assert!(h.replica.blocks.is_empty() && h.replica.released.is_empty());
    h.check_invariants();
}

#[test]
fn assigns_from_affine_block_then_claims_then_borrows() {
    // 10.0.0.0/27 with /28 blocks: two blocks of 16.
    let mut h = Harness::new(&[pool("p", "10.0.0.0/27", 28)], &["n1", "n2"]);
    let a = h.assign("n1", "h0").unwrap();
    assert_eq!(a[0].address, ip("10.0.0.0"));
    assert_eq!(a[0].block, "10.0.0.0/28".parse::<IpNet>().unwrap());
    assert!(!a[0].borrowed());
    for i in 1..16 {
        h.assign("n1", &format!("h{i}")).unwrap();
    }
    let b = h.assign("n2", "n2-0").unwrap();
    assert_eq!(
        b[0].block,
        "10.0.0.16/28".parse::<IpNet>().unwrap(),
        "n2 claims the second block"
    );
    // n1's block is full and no block is left: n1 borrows from n2's block.
    let c = h.assign("n1", "h16").unwrap();
    assert!(c[0].borrowed());
    assert_eq!(c[0].block_affinity.as_deref(), Some("n2"));
    h.check_invariants();
    let problems = h.st.check();
    assert!(problems
        .iter()
        .any(|p| p.kind == ProblemKind::BorrowedAddress && p.address == Some(c[0].address)));

    // Strict affinity: no borrowing, and a clear error naming pool and node.
    h.set_config(true, 0);
    let e = h.assign("n1", "h17").unwrap_err();
    assert!(matches!(e, Error::Exhausted(_)));
    let msg = e.to_string();
    assert!(
        msg.contains("\"n1\"")
            && msg.contains("p (10.0.0.0/27)")
            && msg.contains("strict_affinity"),
        "{msg}"
    );
    h.check_invariants();
}

#[test]
fn same_handle_same_address_and_handle_belongs_to_node() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/24", 26)], &["n1", "n2"]);
    let a = h.assign("n1", "net.c1").unwrap();
    let b = h.assign("n1", "net.c1").unwrap();
    assert_eq!(a, b);
    assert!(matches!(
        h.assign("n2", "net.c1"),
        Err(Error::PermissionDenied(_))
    ));
    assert!(matches!(
        h.assign("ghost", "net.c2"),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(h.assign("n1", ""), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        h.st.release_handle(Some("n2"), "net.c1"),
        Err(Error::PermissionDenied(_))
    ));
    assert!(matches!(
        h.st.release_address(Some("n2"), a[0].address),
        Err(Error::PermissionDenied(_))
    ));
    h.check_invariants();
}

#[test]
fn released_addresses_are_reused_least_recently_released_first() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/28", 30)], &["n1"]);
    // One /30 block: 4 addresses.
    for i in 0..4 {
        h.assign("n1", &format!("h{i}")).unwrap();
    }
    h.set_config(true, 1);
    assert_eq!(h.release("h2"), vec![ip("10.0.0.2")]);
    assert_eq!(h.release("h0"), vec![ip("10.0.0.0")]);
    assert!(h.release("h0").is_empty(), "release is idempotent");
    // Released first (10.0.0.2) comes back first, not the lowest address.
    assert_eq!(h.assign("n1", "x").unwrap()[0].address, ip("10.0.0.2"));
    // Survives a reload.
    let mut re = IpamState::from_snapshot(h.replica.clone());
    let (v, _) = re
        .assign(
            "n1",
            AssignRequest {
                handle: "y".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(v[0].address, ip("10.0.0.0"));
    h.check_invariants();
}

#[test]
fn max_blocks_per_node_gives_a_clear_error() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/24", 30)], &["n1"]);
    h.set_config(true, 2);
    for i in 0..8 {
        h.assign("n1", &format!("h{i}")).unwrap();
    }
    let e = h.assign("n1", "h8").unwrap_err();
    assert!(matches!(e, Error::Exhausted(_)));
    assert!(
        e.to_string().contains("max_blocks_per_node limit (2)"),
        "{e}"
    );
    h.set_config(true, 0);
    h.assign("n1", "h8").unwrap();
    h.check_invariants();
}

#[test]
fn specific_address_requests() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/24", 26)], &["n1", "n2"]);
    let req = |handle: &str, a: &str| AssignRequest {
        handle: handle.into(),
        requested: vec![ip(a)],
        ..Default::default()
    };
    let v = h.assign_req("n1", req("a", "10.0.0.77")).unwrap();
    assert_eq!(v[0].address, ip("10.0.0.77"));
    assert_eq!(v[0].block, "10.0.0.64/26".parse::<IpNet>().unwrap());
    assert!(!v[0].borrowed(), "the block was claimed for n1");
    let e = h.assign_req("n2", req("b", "10.0.0.77")).unwrap_err();
    assert!(
        matches!(e, Error::AlreadyExists(_)) && e.to_string().contains("\"a\""),
        "{e}"
    );
    let e = h.assign_req("n2", req("b", "192.168.0.1")).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("outside every pool"),
        "{e}"
    );
    // In n1's block from n2: borrowed.
    let v = h.assign_req("n2", req("c", "10.0.0.78")).unwrap();
    assert!(v[0].borrowed());
    h.check_invariants();
}

#[test]
fn dual_stack_and_partial_failure_changes_nothing() {
    let mut h = Harness::new(
        &[pool("v4", "10.0.0.0/24", 26), pool("v6", "fd00::/120", 122)],
        &["n1"],
    );
    let v = h
        .assign_req(
            "n1",
            AssignRequest {
                handle: "d".into(),
                num_v4: 1,
                num_v6: 1,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!(v[1].address, ip("fd00::"));
    // v4 is fine but v6 is impossible (requested outside): nothing assigned.
    let before = h.st.allocations();
    let e = h
        .assign_req(
            "n1",
            AssignRequest {
                handle: "e".into(),
                num_v4: 1,
                requested: vec![ip("fd01::1")],
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
    assert_eq!(h.st.allocations(), before);
    assert!(h.st.handle("e").is_none());
    h.check_invariants();
}

#[test]
fn node_selector_limits_pools() {
    let mut p = pool("gpu", "10.1.0.0/24", 26);
    p.node_selector = "gpu == 'yes'".into();
    let mut h = Harness::new(&[p], &["plain"]);
    let e = h.assign("plain", "x").unwrap_err();
    assert!(
        e.to_string().contains("no enabled IPv4 pool selects node"),
        "{e}"
    );
    let mut n = node("g1");
    n.labels.insert("gpu".into(), "yes".into());
    let (_, m) = h.st.register_node(n).unwrap();
    h.replica.apply(&m);
    h.assign("g1", "y").unwrap();
    h.check_invariants();
}

#[test]
fn delete_node_frees_empty_blocks_and_reports_used_ones() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/24", 28)], &["n1", "n2"]);
    h.assign_req(
        "n1",
        AssignRequest {
            handle: "a".into(),
            requested: vec![ip("10.0.0.1")],
            ..Default::default()
        },
    )
    .unwrap();
    h.assign_req(
        "n1",
        AssignRequest {
            handle: "b".into(),
            requested: vec![ip("10.0.0.17")],
            ..Default::default()
        },
    )
    .unwrap();
    h.release("b");
    let (d, m) = h.st.delete_node("n1").unwrap();
    h.replica.apply(&m);
    assert_eq!(
        d.blocks_freed,
        vec!["10.0.0.16/28".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        d.blocks_in_use,
        vec!["10.0.0.0/28".parse::<IpNet>().unwrap()]
    );
    assert!(h
        .st
        .check()
        .iter()
        .any(|p| p.kind == ProblemKind::BlockOfUnknownNode));
    assert!(matches!(h.st.delete_node("zzz"), Err(Error::NotFound(_))));
}

/// On a table large enough to be checked in parts over threads, the check
/// finds the same damage, in the same order, as in one part.
#[test]
fn a_large_check_in_parts_finds_what_one_part_finds() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/16", 26)], &["n1", "n2"]);
    for i in 0..5000 {
        h.assign(if i % 2 == 0 { "n1" } else { "n2" }, &format!("h{i:05}"))
            .unwrap();
    }
    let mut snap = h.replica.clone();
    for (i, a) in ["10.0.3.1", "10.0.40.7", "10.0.70.3"].iter().enumerate() {
        snap.handles.insert(
            format!("dangling{i}"),
            Handle {
                node: "n1".into(),
                addresses: vec![ip(a)],
                attributes: Default::default(),
            },
        );
    }
    snap.handles.remove("h00007");
    let st = IpamState::from_snapshot(snap);
    let blocks: Vec<_> = st.blocks.values().map(|b| &**b).collect();
    let handles: Vec<_> = st.handles.iter().map(|(k, v)| (&**k, &**v)).collect();
    assert!(
        blocks.len() + handles.len() >= 4096,
        "large enough for parts"
    );
    let got = st.check();
    let problems = |v: &[Problem]| {
        v.iter()
            .filter(|p| p.kind != ProblemKind::BorrowedAddress)
            .map(|p| (p.kind, p.address, p.handle.clone()))
            .collect::<Vec<_>>()
    };
    // One part, every allocation looked up in its handle.
    let (mut one, _) = st.check_blocks(&blocks, true);
    let (mut stale, _, _) = st.check_handles(&handles);
    stale.sort_by(|x, y| (&x.handle, x.address).cmp(&(&y.handle, y.address)));
    one.append(&mut stale);
    assert_eq!(problems(&got), problems(&one));
    let kinds: Vec<_> = problems(&got).into_iter().map(|p| p.0).collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == ProblemKind::HandlePointsNowhere)
            .count(),
        3
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == ProblemKind::AddressWithoutHandle)
            .count(),
        1
    );
}

/// The check's shortcut (count the addresses handles hold instead of
/// looking up every allocation's handle) is not fooled by a handle that
/// lists an address twice while another address leaked.
#[test]
fn a_repeated_address_does_not_hide_a_leak() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/24", 26)], &["n1"]);
    let a = h.assign("n1", "a").unwrap()[0].address;
    let b = h.assign("n1", "b").unwrap()[0].address;
    let mut snap = h.replica.clone();
    snap.handles.get_mut("a").unwrap().addresses = vec![a, a];
    snap.handles.remove("b");
    let st = IpamState::from_snapshot(snap);
    let leaked: Vec<_> = st
        .check()
        .into_iter()
        .filter(|p| p.kind == ProblemKind::AddressWithoutHandle)
        .map(|p| p.address)
        .collect();
    assert_eq!(leaked, vec![Some(b)]);
}

#[test]
fn check_finds_damage_and_repair_fixes_it() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/24", 26)], &["n1"]);
    h.assign("n1", "good").unwrap();
    let mut snap = h.replica.clone();
    // Damage: an allocation without handle, a handle pointing nowhere, a block outside pools.
    snap.allocations.insert(
        ip("10.0.0.9"),
        Allocation {
            handle: "gone".into(),
            node: "n1".into(),
        },
    );
    snap.handles.insert(
        "dangling".into(),
        Handle {
            node: "n1".into(),
            addresses: vec![ip("10.0.0.10")],
            attributes: Default::default(),
        },
    );
    snap.blocks.insert(
        "10.9.0.0/26".parse().unwrap(),
        Block {
            cidr: "10.9.0.0/26".parse().unwrap(),
            pool: "old".into(),
            affinity: Some("n1".into()),
        },
    );
    let mut st = IpamState::from_snapshot(snap.clone());
    let kinds: Vec<ProblemKind> = st.check().iter().map(|p| p.kind).collect();
    assert!(kinds.contains(&ProblemKind::AddressWithoutHandle));
    assert!(kinds.contains(&ProblemKind::HandlePointsNowhere));
    assert!(kinds.contains(&ProblemKind::BlockOutsidePools));
    let (r, m) = st.release_leaked(&[ip("10.0.0.200")], true).unwrap();
    assert_eq!(r.released, vec![ip("10.0.0.9")]);
    assert_eq!(r.not_allocated, vec![ip("10.0.0.200")]);
    assert_eq!(r.handles_removed, vec!["dangling".to_string()]);
    snap.apply(&m);
    let re = IpamState::from_snapshot(snap);
    let kinds: Vec<ProblemKind> = re.check().iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        vec![ProblemKind::BlockOutsidePools],
        "only the unrepairable one is left"
    );
}

#[test]
fn usage_reports_pools_nodes_blocks() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/24", 26)], &["n1", "n2"]);
    h.assign("n1", "a").unwrap();
    h.assign("n1", "b").unwrap();
    h.assign("n2", "c").unwrap();
    let u = h.st.usage(true);
    assert_eq!(
        (u.pools[0].size, u.pools[0].blocks, u.pools[0].used),
        (256, 2, 3)
    );
    assert_eq!(
        u.nodes.iter().map(|n| n.addresses).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(u.blocks.len(), 2);
    assert_eq!(u.blocks[0].used, 2);
}

#[derive(Debug, Clone)]
enum Action {
    Assign {
        node: usize,
        handle: usize,
    },
    AssignAt {
        node: usize,
        handle: usize,
        offset: u8,
    },
    Release {
        handle: usize,
    },
    ReleaseAddr {
        offset: u8,
    },
    Strict(bool),
    /// DeleteNode (frees its empty blocks), then the node registers again.
    DeleteNode {
        node: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0..3usize, 0..40usize).prop_map(|(node, handle)| Action::Assign { node, handle }),
        1 => (0..3usize, 0..40usize, any::<u8>()).prop_map(|(node, handle, offset)| Action::AssignAt { node, handle, offset }),
        4 => (0..40usize).prop_map(|handle| Action::Release { handle }),
        1 => any::<u8>().prop_map(|offset| Action::ReleaseAddr { offset }),
        1 => any::<bool>().prop_map(Action::Strict),
        1 => (0..3usize).prop_map(|node| Action::DeleteNode { node }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random workloads on a small pool: no address twice, nothing outside
    /// pools, no borrowing under strict affinity, mutations replay to the
    /// same state, and release-then-assign round-trips.
    #[test]
    fn allocator_invariants(actions in proptest::collection::vec(action(), 1..120)) {
        // 10.0.0.0/26 in /29 blocks: 8 blocks of 8, 64 addresses for 40 handles.
        let mut h = Harness::new(&[pool("p", "10.0.0.0/26", 29)], &["n0", "n1", "n2"]);
        for a in actions {
            match a {
                Action::Assign { node, handle } => {
                    let hid = format!("h{handle}");
                    let existed = h.st.handle(&hid);
                    match h.assign(&format!("n{node}"), &hid) {
                        Ok(v) => {
                            if let Some(e) = existed {
                                prop_assert_eq!(v.iter().map(|x| x.address).collect::<Vec<_>>(), e.addresses);
                            }
                        }
                        Err(Error::PermissionDenied(_)) => prop_assert!(existed.is_some()),
                        Err(Error::Exhausted(_)) => {
                            // Only when no free address is usable.
                            let (used, _) = h.st.counts();
                            let strict = h.st.config.strict_affinity;
                            prop_assert!(used == 64 || strict, "exhausted with {} used", used);
                        }
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Action::AssignAt { node, handle, offset } => {
                    let a = IpAddr::from([10, 0, 0, offset % 70]);
                    let _ = h.assign_req(
                        &format!("n{node}"),
                        AssignRequest { handle: format!("h{handle}"), requested: vec![a], ..Default::default() },
                    );
                }
                Action::Release { handle } => {
                    let hid = format!("h{handle}");
                    let held = h.st.handle(&hid).map(|x| x.addresses).unwrap_or_default();
                    let node = h.st.handle(&hid).map(|x| x.node);
                    let released = h.release(&hid);
                    prop_assert_eq!(&released, &held);
                    // Round trip: a fresh handle on the same node gets an address again.
                    if let (Some(n), false, false) = (node, released.is_empty(), h.st.config.strict_affinity) {
                        let again = h.assign(&n, "roundtrip").unwrap();
                        prop_assert_eq!(again.len(), 1);
                        h.release("roundtrip");
                    }
                }
                Action::ReleaseAddr { offset } => {
                    let a = IpAddr::from([10, 0, 0, offset % 64]);
                    let (_, m) = h.st.release_address(None, a).unwrap();
                    h.replica.apply(&m);
                    prop_assert!(h.st.allocation_of(a).is_none());
                }
                Action::Strict(s) => h.set_config(s, 0),
                Action::DeleteNode { node } => {
                    let name = format!("n{node}");
                    if let Ok((_, m)) = h.st.delete_node(&name) {
                        h.replica.apply(&m);
                    }
                    let (_, m) = h.st.register_node(self::node(&name)).unwrap();
                    h.replica.apply(&m);
                }
            }
            h.check_invariants();
        }
    }
}

#[test]
fn route_table_lists_blocks_and_borrowed_addresses_via_their_nodes() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/27", 28)], &["n1"]);
    let mut n2 = node("n2");
    n2.addresses = vec![ip("172.18.0.3")];
    let (_, m) = h.st.register_node(n2).unwrap();
    h.replica.apply(&m);
    for i in 0..16 {
        h.assign("n1", &format!("a{i}")).unwrap();
    }
    h.assign("n2", "b0").unwrap();
    let borrowed = h.assign("n1", "a16").unwrap()[0].address;
    let table = |node: Option<&str>| -> Vec<(IpNet, String, Option<IpAddr>, &'static str)> {
        tabby_routing::cluster_routes(&h.st.routing_intent(0), node)
            .into_iter()
            .map(|r| (r.destination, r.node, r.next_hop, r.kind.as_str()))
            .collect()
    };
    let n1 = Some(ip("172.18.0.2"));
    let n2 = Some(ip("172.18.0.3"));
    assert_eq!(
        table(None),
        vec![
            ("10.0.0.0/28".parse().unwrap(), "n1".into(), n1, "block"),
            ("10.0.0.16/28".parse().unwrap(), "n2".into(), n2, "block"),
            (IpNet::from(borrowed), "n1".into(), n1, "borrowed"),
        ]
    );
    // What n2 installs: n1's block and the address n1 borrowed from n2's
    // block via n1, and a blackhole for its own block.
    assert_eq!(
        table(Some("n2")),
        vec![
            ("10.0.0.0/28".parse().unwrap(), "n1".into(), n1, "block"),
            (
                "10.0.0.16/28".parse().unwrap(),
                "n2".into(),
                None,
                "blackhole"
            ),
            (IpNet::from(borrowed), "n1".into(), n1, "borrowed"),
        ]
    );
}

fn vxlan_pool(name: &str, cidr: &str) -> Pool {
    Pool {
        encapsulation: Encapsulation::Vxlan,
        ..pool(name, cidr, 26)
    }
}

#[test]
fn nodes_hold_a_tunnel_address_exactly_while_a_vxlan_pool_exists() {
    let mut h = Harness::new(&[pool("p", "10.244.0.0/16", 26)], &["n1"]);
    assert_eq!(h.st.tunnel_address("n1"), None, "plain pool: none");
    // Switching the pool to VXLAN gives every node one, under its handle.
    let (_, m) =
        h.st.update_pool(
            "p",
            PoolUpdate {
                encapsulation: Some(Encapsulation::VxlanCrossSubnet),
                ..Default::default()
            },
        )
        .unwrap();
    h.replica.apply(&m);
    let t1 = h.st.tunnel_address("n1").expect("n1's tunnel address");
    assert!(h.st.handle("vxlan-tunnel-addr.n1").is_some());
    // A node registering later gets one too; registering again keeps it.
    let (_, m) = h.st.register_node(node("n2")).unwrap();
    h.replica.apply(&m);
    let t2 = h.st.tunnel_address("n2").expect("n2's tunnel address");
    assert_ne!(t1, t2);
    let (_, m) = h.st.register_node(node("n2")).unwrap();
    assert!(m.is_empty(), "{m:?}");
    h.check_invariants();
    // The routing model sees the VTEPs, and the intent stream's nodes carry them.
    let i = h.st.routing_intent(1);
    let v = i.nodes["n1"].vtep.expect("vtep");
    assert_eq!((v.tunnel_ip, v.mac), (t1, tabby_routing::vtep_mac("n1")));
    let pn = crate::convert::node_pb(&h.st, h.st.node("n1").unwrap());
    assert_eq!(pn.vxlan_tunnel_address, t1.to_string());
    assert_eq!(
        pn.vxlan_mac,
        tabby_routing::mac_string(&tabby_routing::vtep_mac("n1"))
    );
    // A pod address is never a tunnel address.
    let pod = h.assign("n1", "net.c1").unwrap();
    assert!(pod.iter().all(|a| a.address != t1 && a.address != t2));
    h.release("net.c1");
    // Deleting a node gives its tunnel address back (and so its block).
    let (d, m) = h.st.delete_node("n2").unwrap();
    h.replica.apply(&m);
    assert!(d.blocks_in_use.is_empty(), "{d:?}");
    assert!(h.st.handle("vxlan-tunnel-addr.n2").is_none());
    // Back to plain routing: released.
    let (_, m) =
        h.st.update_pool(
            "p",
            PoolUpdate {
                encapsulation: Some(Encapsulation::None),
                ..Default::default()
            },
        )
        .unwrap();
    h.replica.apply(&m);
    assert_eq!(h.st.tunnel_address("n1"), None);
    h.check_invariants();
}

#[test]
fn a_pool_holding_only_tunnel_addresses_can_be_deleted() {
    let mut h = Harness::new(
        &[
            vxlan_pool("a", "10.244.0.0/16"),
            pool("b", "10.245.0.0/16", 26),
        ],
        &["n1"],
    );
    let t = h.st.tunnel_address("n1").unwrap();
    assert!("10.244.0.0/16".parse::<IpNet>().unwrap().contains(&t));
    let (_, m) = h.st.delete_pool("a").unwrap();
    h.replica.apply(&m);
    // No VXLAN pool remains: no tunnel address either.
    assert_eq!(h.st.tunnel_address("n1"), None);
    h.check_invariants();
    // With a pod in it, deleting is refused and changes nothing.
    let mut h = Harness::new(&[vxlan_pool("a", "10.244.0.0/16")], &["n1"]);
    h.assign("n1", "net.c1").unwrap();
    let before = h.st.allocations();
    assert!(matches!(
        h.st.delete_pool("a"),
        Err(Error::FailedPrecondition(_))
    ));
    assert_eq!(h.st.allocations(), before);
}

#[test]
fn vxlan_settings_are_validated_and_bad_ones_change_nothing() {
    let mut h = Harness::new(&[], &[]);
    let before = h.st.config();
    for u in [
        ConfigUpdate {
            vxlan_vni: Some(0),
            ..Default::default()
        },
        ConfigUpdate {
            vxlan_vni: Some(16_777_216),
            ..Default::default()
        },
        ConfigUpdate {
            vxlan_port: Some(0),
            ..Default::default()
        },
        ConfigUpdate {
            vxlan_port: Some(65_536),
            ..Default::default()
        },
        // One bad field refuses the whole update.
        ConfigUpdate {
            strict_affinity: Some(true),
            vxlan_port: Some(0),
            ..Default::default()
        },
    ] {
        let e = h.st.set_config(u).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{u:?}: {e}");
        assert_eq!(h.st.config(), before);
    }
    let (c, m) =
        h.st.set_config(ConfigUpdate {
            vxlan_vni: Some(16_777_215),
            vxlan_port: Some(8472),
            ..Default::default()
        })
        .unwrap();
    h.replica.apply(&m);
    assert_eq!((c.vxlan_vni, c.vxlan_port), (16_777_215, 8472));
    let v = h.st.routing_intent(1).vxlan;
    assert_eq!((v.vni, v.port), (16_777_215, 8472));
    // Unset: the defaults.
    let v = IpamState::default().routing_intent(1).vxlan;
    assert_eq!((v.vni, v.port), (4096, 4789));
}

#[test]
fn node_addresses_keep_their_interface_prefix() {
    let n = crate::convert::node_from_pb(tabby_proto::v1::Node {
        name: "n1".into(),
        addresses: vec!["172.18.0.3/24".into(), "fd00::3".into()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(n.prefix_lens, vec![24, 128]);
    let mut h = Harness::new(&[], &[]);
    h.st.register_node(n.clone()).unwrap();
    let i = h.st.routing_intent(1);
    assert_eq!(
        i.nodes["n1"].addrs,
        vec![
            "172.18.0.3/24".parse::<IpNet>().unwrap(),
            "fd00::3/128".parse().unwrap()
        ]
    );
    let pn = crate::convert::node_to_pb(&n, None, None);
    assert_eq!(pn.addresses, vec!["172.18.0.3/24", "fd00::3"]);
    for bad in ["172.18.0.3/33", "172.18.0.3/x", "fd00::3/129", "banana/24"] {
        let e = crate::convert::node_from_pb(tabby_proto::v1::Node {
            name: "n1".into(),
            addresses: vec![bad.into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
    }
}

/// The cluster table kept up to date from [`IpamState::route_changes`] (as
/// the BGP speaker keeps what it advertises), starting from `prev`'s table.
fn table_after(
    prev: &IpamState,
    table: &mut BTreeMap<IpNet, tabby_routing::ClusterRoute>,
    now: &IpamState,
) -> bool {
    match now.route_changes(prev) {
        Some((blocks, addrs)) => {
            let part =
                tabby_routing::cluster_routes(&now.routing_intent_part(0, &blocks, &addrs), None);
            for d in blocks
                .iter()
                .copied()
                .chain(addrs.iter().map(|a| IpNet::from(*a)))
            {
                table.remove(&d);
            }
            table.extend(part.into_iter().map(|r| (r.destination, r)));
            true
        }
        None => {
            *table = full_table(now);
            false
        }
    }
}

fn full_table(s: &IpamState) -> BTreeMap<IpNet, tabby_routing::ClusterRoute> {
    tabby_routing::cluster_routes(&s.routing_intent(0), None)
        .into_iter()
        .map(|r| (r.destination, r))
        .collect()
}

#[test]
fn route_changes_name_exactly_what_a_claim_or_borrow_changed() {
    let mut h = Harness::new(&[pool("p", "10.0.0.0/27", 28)], &["n1", "n2"]);
    let before = h.st.clone();
    h.assign("n1", "a0").unwrap();
    let (blocks, addrs) =
        h.st.route_changes(&before)
            .expect("an assign changes no node");
    assert_eq!(blocks, ["10.0.0.0/28".parse().unwrap()].into());
    assert!(addrs.is_empty());
    // Another address in the same block: the block's state changed, its route not.
    let before = h.st.clone();
    h.assign("n1", "a1").unwrap();
    let mut table = full_table(&before);
    assert!(table_after(&before, &mut table, &h.st));
    assert_eq!(table, full_table(&h.st));
    // A node's address change touches every route through it: a full pass.
    let before = h.st.clone();
    let mut n1 = node("n1");
    n1.addresses = vec![ip("172.18.0.9")];
    h.st.register_node(n1).unwrap();
    assert!(h.st.route_changes(&before).is_none());
    // Unchanged: nothing to do.
    assert_eq!(h.st.route_changes(&h.st.clone()), Some(Default::default()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Kept up to date from route_changes alone, the table always equals a
    /// full recomputation (claims, borrows, releases, node removals).
    #[test]
    fn incremental_route_table_equals_the_full_one(actions in proptest::collection::vec(action(), 1..80)) {
        let mut h = Harness::new(&[pool("p", "10.0.0.0/26", 29)], &["n0", "n1", "n2"]);
        let mut table = full_table(&h.st);
        for a in actions {
            let prev = h.st.clone();
            match a {
                Action::Assign { node, handle } => { let _ = h.assign(&format!("n{node}"), &format!("h{handle}")); }
                Action::AssignAt { node, handle, offset } => {
                    let _ = h.assign_req(
                        &format!("n{node}"),
                        AssignRequest { handle: format!("h{handle}"), requested: vec![IpAddr::from([10, 0, 0, offset % 70])], ..Default::default() },
                    );
                }
                Action::Release { handle } => { h.release(&format!("h{handle}")); }
                Action::ReleaseAddr { offset } => { let _ = h.st.release_address(None, IpAddr::from([10, 0, 0, offset % 64])); }
                Action::Strict(s) => h.set_config(s, 0),
                Action::DeleteNode { node } => {
                    let name = format!("n{node}");
                    let _ = h.st.delete_node(&name);
                    h.st.register_node(self::node(&name)).unwrap();
                }
            }
            table_after(&prev, &mut table, &h.st);
            prop_assert_eq!(&table, &full_table(&h.st));
        }
    }
}

/// A handle kept in the state's compact form gives back exactly what was
/// stored: with attributes or none, one address, several or none.
#[test]
fn compact_handle_round_trip() {
    use super::records::HandleState;
    let cases = [
        Handle {
            node: "n1".into(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            attributes: Default::default(),
        },
        Handle {
            node: "n1".into(),
            addresses: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            attributes: [("ifname", "eth0"), ("pod", "web-0")].into_iter().collect(),
        },
        Handle {
            node: "n2".into(),
            addresses: vec![],
            attributes: [("k", "")].into_iter().collect(),
        },
    ];
    for h in cases {
        let c = HandleState::new(h.node.as_str().into(), h.clone());
        assert_eq!(c.record(), h);
    }
}
