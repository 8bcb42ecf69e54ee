use super::*;
use crate::{
    daemon::NodeStatus,
    plan::tests::{n, via},
    Error,
};
use std::sync::{Arc, Mutex};

/// A kernel route table in memory that counts dumps.
#[derive(Default)]
struct FakeRoutes {
    routes: BTreeMap<IpNet, Route>,
    dumps: u64,
    v6_dumps: u64,
}

impl RouteTable for FakeRoutes {
    fn list(&mut self) -> Result<Vec<Route>> {
        self.list_families(true)
    }
    fn list_families(&mut self, v6: bool) -> Result<Vec<Route>> {
        self.dumps += 1;
        self.v6_dumps += u64::from(v6);
        Ok(self
            .routes
            .values()
            .filter(|r| v6 || r.dst.addr().is_ipv4())
            .copied()
            .collect())
    }
    fn add(&mut self, routes: &[Route]) -> Vec<Result<()>> {
        routes
            .iter()
            .map(|r| {
                if self.routes.contains_key(&r.dst) {
                    return Err(Error::Exists(r.to_string()));
                }
                self.routes.insert(r.dst, *r);
                Ok(())
            })
            .collect()
    }
    fn del(&mut self, routes: &[Route]) -> Vec<Result<()>> {
        routes
            .iter()
            .map(|r| match self.routes.get(&r.dst) {
                Some(have) if have == r => {
                    self.routes.remove(&r.dst);
                    Ok(())
                }
                _ => Err(Error::NotFound(r.to_string())),
            })
            .collect()
    }
}

/// nftables in memory: the listing is the rendered sets.
#[derive(Default, Clone)]
struct FakeNat(
    Arc<Mutex<(BTreeMap<String, String>, u64)>>,
    /// Writes fail while set.
    Arc<std::sync::atomic::AtomicBool>,
);

impl FakeNat {
    fn lists(&self) -> u64 {
        self.0.lock().unwrap().1
    }
    fn edit(&self, family: &str, text: &str) {
        self.0.lock().unwrap().0.insert(family.into(), text.into());
    }
    fn table(&self, family: &str) -> Option<String> {
        self.0.lock().unwrap().0.get(family).cloned()
    }
}

impl NatTables for FakeNat {
    fn sync(&self, family: &str, sets: &NatSets) -> Result<()> {
        if self.1.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(crate::Error::Invalid("nft: write refused".into()));
        }
        self.edit(family, &crate::nft::render(family, sets));
        Ok(())
    }
    fn list(&self, family: &str) -> Result<String> {
        let mut g = self.0.lock().unwrap();
        g.1 += 1;
        Ok(g.0.get(family).cloned().unwrap_or_default())
    }
}

struct NoSysctl;
impl Sysctl for NoSysctl {
    fn set(&mut self, _: &str, _: &str) -> Result<()> {
        Ok(())
    }
}

fn reconciler(nat: FakeNat) -> Reconciler<FakeRoutes> {
    Reconciler::new(
        "worker".into(),
        FakeRoutes::default(),
        Box::new(nat),
        Box::new(NoSysctl),
        Arc::new(Mutex::new(NodeStatus::default())),
        Default::default(),
        // Long timers: only events drive these tests.
        Timers {
            resync: Duration::from_secs(3600),
            nft_verify: Duration::from_secs(3600),
        },
    )
}

fn block(cidr: &str, node: &str) -> pb::IntentBlock {
    pb::IntentBlock {
        cidr: cidr.into(),
        node: node.into(),
        pool: "p".into(),
    }
}
fn node(name: &str, ip: &str) -> pb::Node {
    pb::Node {
        name: name.into(),
        addresses: vec![ip.into()],
        labels: Default::default(),
    }
}

fn snapshot() -> Event {
    Event::Update(Box::new(pb::IntentUpdate {
        revision: 10,
        snapshot: true,
        blocks: vec![
            block("10.244.0.0/26", "control-plane"),
            block("10.244.0.64/26", "worker"),
        ],
        pools: vec![pb::IntentPool {
            name: "p".into(),
            cidr: "10.244.0.0/16".into(),
            nat_outgoing: true,
            ..Default::default()
        }],
        pools_changed: true,
        nodes: vec![
            node("control-plane", "172.18.0.2"),
            node("worker", "172.18.0.3"),
            node("worker2", "172.18.0.4"),
        ],
        ..Default::default()
    }))
}

fn delta(rev: u64, f: impl FnOnce(&mut pb::IntentUpdate)) -> Event {
    let mut u = pb::IntentUpdate {
        revision: rev,
        ..Default::default()
    };
    f(&mut u);
    Event::Update(Box::new(u))
}

/// What a full reconcile of the same intent gives.
fn full_state(r: &Reconciler<FakeRoutes>) -> BTreeSet<Route> {
    tabby_routing::desired(&r.intent, "worker").routes
}

fn kernel(r: &Reconciler<FakeRoutes>) -> BTreeSet<Route> {
    r.table().routes.values().copied().collect()
}

#[test]
fn deltas_are_applied_incrementally_to_the_state_a_full_reconcile_gives() {
    let mut r = reconciler(FakeNat::default());
    r.handle(vec![snapshot()]);
    assert_eq!(r.passes().full, 1);
    let deltas = [
        delta(11, |u| u.blocks.push(block("10.244.0.128/26", "worker2"))),
        delta(12, |u| {
            u.borrowed.push(pb::IntentBorrowed {
                address: "10.244.0.70".into(),
                node: "worker2".into(),
            })
        }),
        // worker2 moves: its block and the address it holds follow.
        delta(13, |u| u.nodes.push(node("worker2", "172.18.0.40"))),
        delta(14, |u| u.removed_blocks.push("10.244.0.0/26".into())),
        delta(15, |u| u.removed_borrowed.push("10.244.0.70".into())),
    ];
    for (i, d) in deltas.into_iter().enumerate() {
        r.handle(vec![d]);
        assert_eq!(kernel(&r), full_state(&r), "after delta {i}");
        assert_eq!(r.passes().incremental, i as u64 + 1);
    }
    assert_eq!(r.passes().full, 1, "no delta needed a full pass");
    assert_eq!(
        r.table().dumps,
        1,
        "the kernel was dumped once, at the start"
    );
    assert!(kernel(&r).contains(&via("10.244.0.128/26", "172.18.0.40")));
}

#[test]
fn the_nodes_own_changes_cause_no_further_pass() {
    let mut r = reconciler(FakeNat::default());
    r.handle(vec![snapshot()]);
    r.handle(vec![delta(11, |u| {
        u.blocks.push(block("10.244.0.128/26", "worker2"))
    })]);
    r.handle(vec![delta(12, |u| {
        u.removed_blocks.push("10.244.0.0/26".into())
    })]);
    let before = r.passes();
    // The monitor echoes what the reconciler did itself.
    r.handle(vec![
        Event::Route(RouteEvent::Added(via("10.244.0.0/26", "172.18.0.2"))),
        Event::Route(RouteEvent::Added(via("10.244.0.128/26", "172.18.0.4"))),
        Event::Route(RouteEvent::Deleted(via("10.244.0.0/26", "172.18.0.2"))),
    ]);
    assert_eq!(r.passes(), before, "echoes of our own changes");
    assert_eq!(r.table().dumps, 1);
}

#[test]
fn a_route_deleted_by_hand_is_put_back_without_a_dump() {
    let mut r = reconciler(FakeNat::default());
    r.handle(vec![snapshot()]);
    let gone = via("10.244.0.0/26", "172.18.0.2");
    r.table.routes.remove(&gone.dst);
    r.handle(vec![Event::Route(RouteEvent::Deleted(gone))]);
    assert!(kernel(&r).contains(&gone));
    assert_eq!(r.passes().incremental, 1);
    assert_eq!(r.table().dumps, 1);
}

#[test]
fn a_route_changed_by_hand_between_deltas_is_repaired() {
    let mut r = reconciler(FakeNat::default());
    r.handle(vec![snapshot()]);
    r.handle(vec![delta(11, |u| {
        u.blocks.push(block("10.244.0.128/26", "worker2"))
    })]);
    // `ip route replace 10.244.0.128/26 via 172.18.0.99 proto 77`
    let changed = via("10.244.0.128/26", "172.18.0.99");
    r.table.routes.insert(changed.dst, changed);
    r.handle(vec![Event::Route(RouteEvent::Added(changed))]);
    assert!(kernel(&r).contains(&via("10.244.0.128/26", "172.18.0.4")));
    assert_eq!(kernel(&r), full_state(&r));
    // The next delta still applies incrementally.
    r.handle(vec![delta(12, |u| {
        u.blocks.push(block("10.244.1.0/26", "worker2"))
    })]);
    assert_eq!(kernel(&r), full_state(&r));
}

#[test]
fn lost_notifications_or_a_failed_change_bring_a_full_pass() {
    let mut r = reconciler(FakeNat::default());
    r.handle(vec![snapshot()]);
    r.handle(vec![Event::Route(RouteEvent::Resync)]);
    assert_eq!(r.passes().full, 2);
    // Someone else's route holds a destination we want: the add fails, and
    // the failure makes the next step a full pass.
    r.table
        .routes
        .insert(n("10.244.0.128/26"), via("10.244.0.128/26", "172.18.0.77"));
    r.handle(vec![delta(11, |u| {
        u.blocks.push(block("10.244.0.128/26", "worker2"))
    })]);
    assert!(r.full_due);
    assert!(lock_status(&r.status).last_error.is_some());
    r.table.routes.remove(&n("10.244.0.128/26"));
    r.handle(vec![]);
    assert_eq!(kernel(&r), full_state(&r));
    assert!(lock_status(&r.status).last_error.is_none());
}

#[test]
fn ipv6_is_dumped_only_while_an_ipv6_pool_exists() {
    let mut r = reconciler(FakeNat::default());
    r.handle(vec![snapshot()]);
    assert_eq!(
        r.table().v6_dumps,
        1,
        "the first pass looks for stale IPv6 routes"
    );
    r.handle(vec![Event::Poke]);
    assert_eq!(r.table().dumps, 2);
    assert_eq!(r.table().v6_dumps, 1, "no IPv6 pool: IPv4 only");
    r.handle(vec![delta(11, |u| {
        u.pools_changed = true;
        u.pools = vec![
            pb::IntentPool {
                name: "p".into(),
                cidr: "10.244.0.0/16".into(),
                nat_outgoing: true,
                ..Default::default()
            },
            pb::IntentPool {
                name: "p6".into(),
                cidr: "fd00:10:244::/48".into(),
                ..Default::default()
            },
        ];
    })]);
    assert_eq!(r.table().v6_dumps, 2);
}

#[test]
fn nat_tables_are_compared_after_an_nftables_event_not_on_every_pass() {
    let nat = FakeNat::default();
    let mut r = reconciler(nat.clone());
    r.handle(vec![snapshot()]);
    let written = nat.table("ip").unwrap();
    let lists = nat.lists();
    for rev in 11..20 {
        r.handle(vec![delta(rev, |u| {
            u.blocks
                .push(block(&format!("10.244.{}.0/26", rev), "worker2"))
        })]);
        r.handle(vec![Event::Poke]);
    }
    assert_eq!(
        nat.lists(),
        lists,
        "no nft listing without an nftables event"
    );
    // A hand edit: nftables reports it, the table is compared and rewritten.
    nat.edit("ip", "table ip tabby { }");
    r.handle(vec![Event::Nft(NftEvent::Changed { family: 2 })]);
    assert_eq!(r.passes().nft_checks, 1);
    assert_eq!(nat.table("ip").unwrap(), written);
}

#[test]
fn the_nat_check_also_runs_on_its_timer() {
    let nat = FakeNat::default();
    let mut r = reconciler(nat.clone());
    r.handle(vec![snapshot()]);
    nat.edit("ip", "");
    r.step(Instant::now() + Duration::from_secs(2 * 3600));
    assert_eq!(r.passes().nft_checks, 1);
    assert_ne!(nat.table("ip").unwrap(), "");
}

#[test]
fn jitter_stays_within_a_fifth() {
    for _ in 0..1000 {
        let j = jittered(Duration::from_secs(10));
        assert!(
            j >= Duration::from_secs(8) && j <= Duration::from_secs(12),
            "{j:?}"
        );
    }
}

/// A NAT write that failed stays in the node's status until a NAT write
/// works: route deltas applied meanwhile do not hide it.
#[test]
fn a_nat_failure_stays_reported_across_route_deltas() {
    let nat = FakeNat::default();
    nat.1.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut r = reconciler(nat.clone());
    r.handle(vec![snapshot()]);
    let err = || lock_status(&r.status).last_error.clone();
    assert!(
        err().is_some_and(|e| e.contains("write refused")),
        "{:?}",
        err()
    );
    // A route delta, applied incrementally.
    r.handle(vec![delta(11, |u| {
        u.blocks = vec![block("10.244.1.0/26", "worker2")];
    })]);
    let err = lock_status(&r.status).last_error.clone();
    assert!(
        err.as_deref().is_some_and(|e| e.contains("write refused")),
        "the NAT failure vanished: {err:?}"
    );
    // nftables works again: the retried full pass writes it, and the
    // report goes.
    nat.1.store(false, std::sync::atomic::Ordering::Relaxed);
    r.handle(vec![Event::Poke]);
    assert!(nat.table("ip").is_some());
    assert!(lock_status(&r.status).last_error.is_none());
}
