use super::*;
use crate::kernel::RouteTarget;
use std::collections::HashMap;

/// A kernel routing table in memory with failure injection.
#[derive(Default)]
struct FakeKernel {
    /// Tabby's routes.
    ours: BTreeSet<Route>,
    /// Destinations held by routes of other protocols.
    foreign: BTreeSet<IpNet>,
    /// Fail the n-th operation (0-based, adds and dels counted together).
    fail_at: HashMap<usize, Error>,
    ops: usize,
    fail_list: bool,
}

impl FakeKernel {
    fn next_fail(&mut self) -> Option<Error> {
        let n = self.ops;
        self.ops += 1;
        self.fail_at.remove(&n)
    }
}

impl RouteTable for FakeKernel {
    fn list(&mut self) -> Result<Vec<Route>> {
        if self.fail_list {
            return Err(Error::Netlink("dump interrupted".into()));
        }
        Ok(self.ours.iter().copied().collect())
    }
    fn add(&mut self, routes: &[Route]) -> Vec<Result<()>> {
        routes
            .iter()
            .map(|r| {
                if let Some(e) = self.next_fail() {
                    return Err(e);
                }
                if self.foreign.contains(&r.dst) || self.ours.iter().any(|o| o.dst == r.dst) {
                    return Err(Error::Exists(r.to_string()));
                }
                self.ours.insert(*r);
                Ok(())
            })
            .collect()
    }
    fn del(&mut self, routes: &[Route]) -> Vec<Result<()>> {
        routes
            .iter()
            .map(|r| {
                if let Some(e) = self.next_fail() {
                    return Err(e);
                }
                if self.ours.remove(r) {
                    Ok(())
                } else {
                    Err(Error::NotFound(r.to_string()))
                }
            })
            .collect()
    }
}

pub(crate) fn n(s: &str) -> IpNet {
    s.parse().unwrap()
}
pub(crate) fn a(s: &str) -> IpAddr {
    s.parse().unwrap()
}
pub(crate) fn via(dst: &str, gw: &str) -> Route {
    Route {
        dst: n(dst),
        target: RouteTarget::Via(a(gw)),
    }
}
pub(crate) fn bh(dst: &str) -> Route {
    Route {
        dst: n(dst),
        target: RouteTarget::Blackhole,
    }
}

fn snapshot() -> pb::IntentUpdate {
    let block = |cidr: &str, node: &str| pb::IntentBlock {
        cidr: cidr.into(),
        node: node.into(),
        pool: "p".into(),
    };
    let node = |name: &str, ip: &str| pb::Node {
        name: name.into(),
        addresses: vec![ip.into()],
        ..Default::default()
    };
    pb::IntentUpdate {
        revision: 10,
        snapshot: true,
        blocks: vec![
            block("10.244.0.0/26", "control-plane"),
            block("10.244.0.64/26", "worker"),
            block("10.244.0.128/26", "worker2"),
        ],
        borrowed: vec![
            pb::IntentBorrowed {
                address: "10.244.0.70".into(),
                node: "worker2".into(),
            },
            pb::IntentBorrowed {
                address: "10.244.0.130".into(),
                node: "worker".into(),
            },
        ],
        pools: vec![pb::IntentPool {
            name: "p".into(),
            cidr: "10.244.0.0/16".into(),
            nat_outgoing: true,
            encapsulation: 0,
            disabled: false,
        }],
        pools_changed: true,
        nodes: vec![
            node("control-plane", "172.18.0.2"),
            node("worker", "172.18.0.3"),
            node("worker2", "172.18.0.4"),
        ],
        ..Default::default()
    }
}

fn parsed(u: &pb::IntentUpdate) -> Intent {
    let mut i = Intent::default();
    i.apply(intent_delta(u).unwrap());
    i
}

#[test]
fn a_snapshot_parses_into_the_routing_model() {
    let i = parsed(&snapshot());
    assert_eq!(i.revision, 10);
    assert_eq!(i.blocks.len(), 3);
    assert_eq!(
        i.blocks[&n("10.244.0.64/26")].node.as_deref(),
        Some("worker")
    );
    assert_eq!(i.borrowed[&a("10.244.0.70")], "worker2");
    assert_eq!(i.nodes["worker2"], NodeIntent::plain(&[a("172.18.0.4")]));
    let d = desired(&i, "worker");
    assert!(d.routes.contains(&via("10.244.0.70/32", "172.18.0.4")));
    assert!(d.routes.contains(&bh("10.244.0.64/26")));
}

#[test]
fn deltas_update_and_snapshot_replaces() {
    let mut i = parsed(&snapshot());
    i.apply(
        intent_delta(&pb::IntentUpdate {
            revision: 11,
            removed_blocks: vec!["10.244.0.0/26".into()],
            removed_borrowed: vec!["10.244.0.70".into()],
            blocks: vec![pb::IntentBlock {
                cidr: "10.244.1.0/26".into(),
                node: "worker3".into(),
                pool: "p".into(),
            }],
            nodes: vec![pb::Node {
                name: "worker3".into(),
                addresses: vec!["172.18.0.9".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap(),
    );
    assert_eq!(i.revision, 11);
    let d = desired(&i, "worker");
    assert!(d.routes.contains(&via("10.244.1.0/26", "172.18.0.9")));
    assert!(!d
        .routes
        .iter()
        .any(|r| r.dst == n("10.244.0.0/26") || r.dst == n("10.244.0.70/32")));
    assert_eq!(
        d.nat_v4.all.len(),
        1,
        "pools unchanged by a delta without pools_changed"
    );
    i.apply(intent_delta(&snapshot()).unwrap());
    assert!(
        !i.blocks.contains_key(&n("10.244.1.0/26")),
        "snapshot drops what it does not list"
    );
}

#[test]
fn a_malformed_field_fails_the_whole_update() {
    for bad in [
        pb::IntentUpdate {
            blocks: vec![pb::IntentBlock {
                cidr: "nope".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        pb::IntentUpdate {
            removed_borrowed: vec!["10.0.0.300".into()],
            ..Default::default()
        },
        pb::IntentUpdate {
            nodes: vec![pb::Node {
                name: "x".into(),
                addresses: vec!["banana".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
    ] {
        assert!(
            matches!(intent_delta(&bad), Err(Error::Invalid(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn proto_encapsulations_map_to_the_model() {
    let mut u = snapshot();
    u.pools[0].encapsulation = pb::Encapsulation::VxlanCrossSubnet as i32;
    let i = parsed(&u);
    assert_eq!(i.pools["p"].encapsulation, Encapsulation::VxlanCrossSubnet);
    assert_eq!(
        encapsulation(99),
        Encapsulation::None,
        "unknown values are plain"
    );
}

#[test]
fn stale_routes_removed_only_after_full_sync() {
    let want: BTreeSet<Route> = [via("10.0.1.0/26", "172.18.0.3"), bh("10.0.0.0/26")].into();
    let actual = vec![
        via("10.0.9.0/26", "172.18.0.9"),
        via("10.0.1.0/26", "172.18.0.99"),
    ];
    let p = plan_routes(&want, &actual, false);
    assert_eq!(
        p.del,
        vec![via("10.0.1.0/26", "172.18.0.99")],
        "only the changed one before sync"
    );
    assert_eq!(p.add.len(), 2);
    let p = plan_routes(&want, &actual, true);
    assert_eq!(p.del.len(), 2);
    assert!(plan_routes(&want, &want.iter().copied().collect::<Vec<_>>(), true).is_empty());
}

#[test]
fn apply_converges_through_injected_failures() {
    let want: BTreeSet<Route> = (0..20)
        .map(|i| via(&format!("10.1.{i}.0/26"), "172.18.0.3"))
        .collect();
    let mut k = FakeKernel::default();
    k.ours.insert(via("10.9.0.0/26", "172.18.0.9")); // stale
    k.foreign.insert(n("10.1.5.0/26")); // another protocol holds it
    k.fail_at.insert(0, Error::Netlink("ENOBUFS".into())); // the stale delete fails
    k.fail_at.insert(3, Error::Netlink("EINTR".into())); // partial apply
    let mut rounds = 0;
    loop {
        rounds += 1;
        let actual = k.list().unwrap();
        let plan = plan_routes(&want, &actual, true);
        let rep = apply_plan(&mut k, &plan);
        let only_foreign = rep
            .failed
            .iter()
            .all(|(r, e)| r.dst == n("10.1.5.0/26") && matches!(e, Error::Exists(_)));
        if only_foreign {
            break;
        }
        assert!(rounds < 5, "does not converge: {:?}", rep.failed);
    }
    assert_eq!(rounds, 2, "one failed round, then converged");
    assert_eq!(k.ours.len(), 19);
    assert!(!k.ours.contains(&via("10.9.0.0/26", "172.18.0.9")));
}

#[test]
fn enoent_on_delete_and_eexist_on_same_add_are_success() {
    let mut k = FakeKernel::default();
    k.ours.insert(via("10.1.0.0/26", "172.18.0.3"));
    let plan = RoutePlan {
        del: vec![via("10.2.0.0/26", "172.18.0.3")],
        add: vec![via("10.1.0.0/26", "172.18.0.3")],
    };
    let rep = apply_plan(&mut k, &plan);
    assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    assert_eq!(rep.applied, 2);
    k.fail_list = true;
    let rep = apply_plan(&mut k, &plan);
    assert_eq!(
        rep.failed.len(),
        1,
        "EEXIST without a way to verify is a failure"
    );
}
