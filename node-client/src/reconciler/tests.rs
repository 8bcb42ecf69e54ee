use super::*;
use crate::{
    daemon::NodeStatus,
    plan::tests::{bh, n, via},
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

/// Tunnel devices and VTEP entries in memory. `ipip` false: the kernel has
/// no ipip support; `uplink` None: no interface holds the node address.
#[derive(Clone)]
struct FakeOverlay(Arc<Mutex<OverlayState>>);

struct OverlayState {
    vxlan: Option<(tabby_routing::VxlanDevice, u32)>,
    vxlan_v6: Option<(tabby_routing::VxlanDevice, u32)>,
    ipip_ok: bool,
    ipip: Option<(std::net::IpAddr, u32)>,
    uplink: Option<u32>,
    neigh: BTreeSet<(std::net::IpAddr, tabby_routing::Mac)>,
    fdb: BTreeSet<(tabby_routing::Mac, std::net::IpAddr)>,
    neigh6: BTreeSet<(std::net::IpAddr, tabby_routing::Mac)>,
    fdb6: BTreeSet<(tabby_routing::Mac, std::net::IpAddr)>,
    ensures: u64,
}

type Neigh = BTreeSet<(std::net::IpAddr, tabby_routing::Mac)>;
type Fdb = BTreeSet<(tabby_routing::Mac, std::net::IpAddr)>;

impl OverlayState {
    fn dev(&mut self, t: Tunnel) -> &mut Option<(tabby_routing::VxlanDevice, u32)> {
        if t == Tunnel::Vxlan {
            &mut self.vxlan
        } else {
            &mut self.vxlan_v6
        }
    }
    fn tables(&mut self, t: Tunnel) -> (&mut Neigh, &mut Fdb) {
        if t == Tunnel::Vxlan {
            (&mut self.neigh, &mut self.fdb)
        } else {
            (&mut self.neigh6, &mut self.fdb6)
        }
    }
}

impl Default for FakeOverlay {
    fn default() -> Self {
        FakeOverlay(Arc::new(Mutex::new(OverlayState {
            vxlan: None,
            vxlan_v6: None,
            ipip_ok: true,
            ipip: None,
            uplink: Some(1500),
            neigh: BTreeSet::new(),
            fdb: BTreeSet::new(),
            neigh6: BTreeSet::new(),
            fdb6: BTreeSet::new(),
            ensures: 0,
        })))
    }
}

impl FakeOverlay {
    fn st(&self) -> std::sync::MutexGuard<'_, OverlayState> {
        self.0.lock().unwrap()
    }
}

fn each<T: Clone>(v: &[T], f: impl FnMut(&T) -> Result<()>) -> Vec<Result<()>> {
    v.iter().map(f).collect()
}

impl OverlayTable for FakeOverlay {
    fn ensure_vxlan(&mut self, dev: &tabby_routing::VxlanDevice, mtu: u32) -> Result<()> {
        let t = Tunnel::vxlan_for(dev.local);
        let mut s = self.st();
        s.ensures += 1;
        if s.dev(t)
            .is_some_and(|(d, _)| d.settings != dev.settings || d.local != dev.local)
        {
            // Recreated: its entries go with it.
            let (n, f) = s.tables(t);
            n.clear();
            f.clear();
        }
        *s.dev(t) = Some((*dev, mtu));
        Ok(())
    }
    fn remove_vxlan(&mut self, t: Tunnel) -> Result<()> {
        let mut s = self.st();
        *s.dev(t) = None;
        let (n, f) = s.tables(t);
        n.clear();
        f.clear();
        Ok(())
    }
    fn ensure_ipip(&mut self, local: std::net::IpAddr, mtu: u32) -> Result<()> {
        let mut s = self.st();
        if !s.ipip_ok {
            return Err(Error::Invalid(
                "creating tunl0: the kernel has no ipip support".into(),
            ));
        }
        s.ipip = Some((local, mtu));
        Ok(())
    }
    fn uplink_mtu(&mut self, a: std::net::IpAddr) -> Result<u32> {
        self.st()
            .uplink
            .ok_or_else(|| Error::NotFound(format!("no interface holds {a}")))
    }
    fn list_vteps(&mut self, t: Tunnel) -> Result<crate::kernel::VtepTables> {
        let mut s = self.st();
        let (n, f) = s.tables(t);
        Ok(crate::kernel::VtepTables {
            neigh: n.iter().copied().collect(),
            fdb: f.iter().copied().collect(),
        })
    }
    fn add_neigh(
        &mut self,
        t: Tunnel,
        e: &[(std::net::IpAddr, tabby_routing::Mac)],
    ) -> Vec<Result<()>> {
        each(e, |(a, m)| {
            let mut s = self.st();
            let (n, _) = s.tables(t);
            n.retain(|(x, _)| x != a);
            n.insert((*a, *m));
            Ok(())
        })
    }
    fn del_neigh(
        &mut self,
        t: Tunnel,
        e: &[(std::net::IpAddr, tabby_routing::Mac)],
    ) -> Vec<Result<()>> {
        each(e, |x| {
            self.st().tables(t).0.remove(x);
            Ok(())
        })
    }
    fn add_fdb(
        &mut self,
        t: Tunnel,
        e: &[(tabby_routing::Mac, std::net::IpAddr)],
    ) -> Vec<Result<()>> {
        each(e, |x| {
            self.st().tables(t).1.insert(*x);
            Ok(())
        })
    }
    fn del_fdb(
        &mut self,
        t: Tunnel,
        e: &[(tabby_routing::Mac, std::net::IpAddr)],
    ) -> Vec<Result<()>> {
        each(e, |x| {
            self.st().tables(t).1.remove(x);
            Ok(())
        })
    }
}

struct NoSysctl;
impl Sysctl for NoSysctl {
    fn set(&mut self, _: &str, _: &str) -> Result<()> {
        Ok(())
    }
}

fn reconciler(nat: FakeNat) -> Reconciler<FakeRoutes> {
    reconciler_with(nat, FakeOverlay::default())
}

fn reconciler_with(nat: FakeNat, overlay: FakeOverlay) -> Reconciler<FakeRoutes> {
    Reconciler::new(
        "worker".into(),
        FakeRoutes::default(),
        Box::new(overlay),
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
        ..Default::default()
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

/// A node on the /24 of `ip`, with a tunnel address and its VTEP MAC.
fn vnode(name: &str, ip: &str, tunnel: &str) -> pb::Node {
    pb::Node {
        name: name.into(),
        addresses: vec![format!("{ip}/24")],
        vxlan_tunnel_address: tunnel.into(),
        vxlan_mac: tabby_routing::mac_string(&tabby_routing::vtep_mac(name)),
        ..Default::default()
    }
}

fn pool(enc: pb::Encapsulation) -> pb::IntentPool {
    pb::IntentPool {
        name: "p".into(),
        cidr: "10.244.0.0/16".into(),
        nat_outgoing: true,
        encapsulation: enc as i32,
        ..Default::default()
    }
}

/// Two racks: control-plane and worker on 172.18.0.0/24, worker2 on
/// 172.18.1.0/24; a block each; pool `p` with `enc`.
fn racks(enc: pb::Encapsulation) -> Event {
    Event::Update(Box::new(pb::IntentUpdate {
        revision: 10,
        snapshot: true,
        blocks: vec![
            block("10.244.0.0/26", "control-plane"),
            block("10.244.0.64/26", "worker"),
            block("10.244.0.128/26", "worker2"),
        ],
        pools: vec![pool(enc)],
        pools_changed: true,
        nodes: vec![
            vnode("control-plane", "172.18.0.2", "10.244.0.1"),
            vnode("worker", "172.18.0.3", "10.244.0.65"),
            vnode("worker2", "172.18.1.4", "10.244.0.129"),
        ],
        vxlan: Some(pb::IntentVxlan {
            vni: 4096,
            port: 4789,
        }),
        ..Default::default()
    }))
}

fn tunnel(dst: &str, gw: &str, t: Tunnel) -> Route {
    Route {
        dst: n(dst),
        target: RouteTarget::Tunnel(gw.parse().unwrap(), t),
    }
}

fn mac(node: &str) -> tabby_routing::Mac {
    tabby_routing::vtep_mac(node)
}

#[test]
fn vxlan_makes_the_device_the_vteps_and_the_tunnel_routes() {
    let o = FakeOverlay::default();
    let mut r = reconciler_with(FakeNat::default(), o.clone());
    r.handle(vec![racks(pb::Encapsulation::Vxlan)]);
    let (dev, mtu) = o.st().vxlan.expect("vxlan.tabby");
    assert_eq!(mtu, 1450, "uplink MTU - 50");
    assert_eq!(dev.local, "172.18.0.3".parse::<std::net::IpAddr>().unwrap());
    assert_eq!(dev.mac, mac("worker"));
    assert_eq!(
        o.st().neigh,
        BTreeSet::from([
            ("10.244.0.1".parse().unwrap(), mac("control-plane")),
            ("10.244.0.129".parse().unwrap(), mac("worker2")),
        ])
    );
    assert_eq!(
        o.st().fdb,
        BTreeSet::from([
            (mac("control-plane"), "172.18.0.2".parse().unwrap()),
            (mac("worker2"), "172.18.1.4".parse().unwrap()),
        ])
    );
    assert!(kernel(&r).contains(&tunnel("10.244.0.128/26", "10.244.0.129", Tunnel::Vxlan)));
    assert_eq!(kernel(&r), full_state(&r));
    assert!(r.status.lock().unwrap().unsupported.is_empty());
    // New pods are given the tunnel's MTU.
    assert_eq!(r.status.lock().unwrap().tunnel_mtu, Some(1450));
}

#[test]
fn cross_subnet_tunnels_only_to_the_other_rack() {
    let o = FakeOverlay::default();
    let mut r = reconciler_with(FakeNat::default(), o.clone());
    r.handle(vec![racks(pb::Encapsulation::VxlanCrossSubnet)]);
    assert!(
        kernel(&r).contains(&via("10.244.0.0/26", "172.18.0.2")),
        "same rack: plain"
    );
    assert!(kernel(&r).contains(&tunnel("10.244.0.128/26", "10.244.0.129", Tunnel::Vxlan)));
    assert_eq!(o.st().fdb.len(), 1, "only worker2's VTEP");
}

#[test]
fn a_node_removed_or_moved_takes_its_vtep_entries_along() {
    let o = FakeOverlay::default();
    let mut r = reconciler_with(FakeNat::default(), o.clone());
    r.handle(vec![racks(pb::Encapsulation::Vxlan)]);
    // worker2 changes its address: the FDB entry follows, the old one goes.
    r.handle(vec![delta(11, |u| {
        u.nodes
            .push(vnode("worker2", "172.18.1.40", "10.244.0.129"))
    })]);
    assert!(o
        .st()
        .fdb
        .contains(&(mac("worker2"), "172.18.1.40".parse().unwrap())));
    assert!(!o
        .st()
        .fdb
        .contains(&(mac("worker2"), "172.18.1.4".parse().unwrap())));
    // control-plane leaves: its neighbour, FDB entry and routes go.
    r.handle(vec![delta(12, |u| {
        u.removed_nodes.push("control-plane".into());
        u.removed_blocks.push("10.244.0.0/26".into());
    })]);
    assert!(!o.st().neigh.iter().any(|(_, m)| *m == mac("control-plane")));
    assert!(!o.st().fdb.iter().any(|(m, _)| *m == mac("control-plane")));
    assert!(!kernel(&r).iter().any(|x| x.dst == n("10.244.0.0/26")));
    assert_eq!(kernel(&r), full_state(&r));
    assert_eq!(r.passes().full, 1, "node changes need no full pass");
}

#[test]
fn switching_modes_live_converges_both_ways() {
    let o = FakeOverlay::default();
    let mut r = reconciler_with(FakeNat::default(), o.clone());
    r.handle(vec![racks(pb::Encapsulation::None)]);
    assert!(o.st().vxlan.is_none());
    for (rev, enc) in [
        (11, pb::Encapsulation::Vxlan),
        (12, pb::Encapsulation::VxlanCrossSubnet),
        (13, pb::Encapsulation::None),
    ] {
        r.handle(vec![delta(rev, |u| {
            u.pools = vec![pool(enc)];
            u.pools_changed = true;
        })]);
        assert_eq!(kernel(&r), full_state(&r), "{enc:?}");
        assert_eq!(
            o.st().vxlan.is_some(),
            enc != pb::Encapsulation::None,
            "{enc:?}"
        );
    }
    assert!(o.st().neigh.is_empty() && o.st().fdb.is_empty());
    assert!(kernel(&r).contains(&via("10.244.0.128/26", "172.18.1.4")));
    assert_eq!(
        r.status.lock().unwrap().tunnel_mtu,
        None,
        "plain again: full MTU"
    );
}

#[test]
fn ipip_without_kernel_support_is_reported_and_breaks_nothing_else() {
    let o = FakeOverlay::default();
    o.st().ipip_ok = false;
    let mut r = reconciler_with(FakeNat::default(), o.clone());
    r.handle(vec![racks(pb::Encapsulation::IpipCrossSubnet)]);
    let st = r.status.lock().unwrap().clone();
    assert!(
        st.unsupported
            .iter()
            .any(|u| u == "IPIP pool p: the kernel has no ipip support"),
        "{:?}",
        st.unsupported
    );
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    // Same rack: plain, installed; the other rack's tunl0 routes are left out.
    let k = kernel(&r);
    assert!(k.contains(&via("10.244.0.0/26", "172.18.0.2")));
    assert!(!k
        .iter()
        .any(|x| matches!(x.target, RouteTarget::Tunnel(..))));
    // Not retried in a loop: later steps run no further full pass.
    let full = r.passes().full;
    r.step(Instant::now());
    r.step(Instant::now());
    assert!(r.passes().full <= full + 1);
    // Where the kernel has it, tunl0 is made and the routes use it.
    let o2 = FakeOverlay::default();
    let mut r2 = reconciler_with(FakeNat::default(), o2.clone());
    r2.handle(vec![racks(pb::Encapsulation::Ipip)]);
    assert_eq!(o2.st().ipip.map(|(_, m)| m), Some(1480));
    assert!(kernel(&r2).contains(&tunnel("10.244.0.128/26", "172.18.1.4", Tunnel::Ipip)));
    assert!(kernel(&r2).contains(&tunnel("10.244.0.0/26", "172.18.0.2", Tunnel::Ipip)));
}

#[test]
fn no_uplink_for_the_tunnel_is_reported_and_other_routes_stay() {
    let o = FakeOverlay::default();
    o.st().uplink = None;
    let mut r = reconciler_with(FakeNat::default(), o.clone());
    r.handle(vec![racks(pb::Encapsulation::VxlanCrossSubnet)]);
    let st = r.status.lock().unwrap().clone();
    assert!(
        st.unsupported
            .iter()
            .any(|u| u.contains("no usable uplink")),
        "{:?}",
        st.unsupported
    );
    assert!(o.st().vxlan.is_none());
    assert!(kernel(&r).contains(&via("10.244.0.0/26", "172.18.0.2")));
    assert!(kernel(&r).contains(&bh("10.244.0.64/26")));
}

#[test]
fn vxlan_settings_change_without_a_restart() {
    let o = FakeOverlay::default();
    let mut r = reconciler_with(FakeNat::default(), o.clone());
    r.handle(vec![racks(pb::Encapsulation::Vxlan)]);
    r.handle(vec![delta(11, |u| {
        u.vxlan = Some(pb::IntentVxlan { vni: 7, port: 8472 })
    })]);
    let (dev, _) = o.st().vxlan.unwrap();
    assert_eq!((dev.settings.vni, dev.settings.port), (7, 8472));
    assert_eq!(o.st().fdb.len(), 2, "entries put back on the new device");
}

#[test]
fn ipv6_vxlan_pools_get_vxlan_v6_beside_vxlan() {
    let o = FakeOverlay::default();
    let mut r = reconciler_with(FakeNat::default(), o.clone());
    let node6 = |name: &str, v4: &str, v6: &str, t4: &str, t6: &str| pb::Node {
        name: name.into(),
        addresses: vec![format!("{v4}/24"), format!("{v6}/64")],
        vxlan_tunnel_address: t4.into(),
        vxlan_mac: tabby_routing::mac_string(&tabby_routing::vtep_mac(name)),
        vxlan_v6_tunnel_address: t6.into(),
        vxlan_v6_mac: tabby_routing::mac_string(&tabby_routing::vtep_mac_v6(name)),
        ..Default::default()
    };
    r.handle(vec![Event::Update(Box::new(pb::IntentUpdate {
        revision: 10,
        snapshot: true,
        blocks: vec![
            block("10.244.0.64/26", "worker"),
            block("10.244.0.128/26", "worker2"),
            pb::IntentBlock {
                cidr: "fd00:10::40/122".into(),
                node: "worker2".into(),
                pool: "p6".into(),
            },
        ],
        pools: vec![
            pool(pb::Encapsulation::Vxlan),
            pb::IntentPool {
                name: "p6".into(),
                cidr: "fd00:10::/64".into(),
                encapsulation: pb::Encapsulation::Vxlan as i32,
                ..Default::default()
            },
        ],
        pools_changed: true,
        nodes: vec![
            node6(
                "worker",
                "172.18.0.3",
                "fd00:18::3",
                "10.244.0.65",
                "fd00:10::1",
            ),
            node6(
                "worker2",
                "172.18.1.4",
                "fd00:18:1::4",
                "10.244.0.129",
                "fd00:10::41",
            ),
        ],
        vxlan: Some(pb::IntentVxlan {
            vni: 4096,
            port: 4789,
        }),
        ..Default::default()
    }))]);
    let (dev6, mtu6) = o.st().vxlan_v6.expect("vxlan-v6.tabby");
    assert_eq!(mtu6, 1430, "uplink MTU - 70");
    assert_eq!(dev6.mac, tabby_routing::vtep_mac_v6("worker"));
    assert!(o.st().vxlan.is_some());
    assert_eq!(
        o.st().fdb6,
        BTreeSet::from([(
            tabby_routing::vtep_mac_v6("worker2"),
            "fd00:18:1::4".parse().unwrap()
        )])
    );
    assert!(kernel(&r).contains(&tunnel("fd00:10::40/122", "fd00:10::41", Tunnel::VxlanV6)));
    assert_eq!(kernel(&r), full_state(&r));
    // Pods fit both tunnels.
    assert_eq!(r.status.lock().unwrap().tunnel_mtu, Some(1430));
}

fn imported(routes: &[(&str, &str)]) -> Event {
    Event::Imported(
        routes
            .iter()
            .map(|(d, g)| (d.parse().unwrap(), g.parse().unwrap()))
            .collect(),
    )
}

#[test]
fn bgp_imports_are_installed_beside_the_cluster_routes_never_inside_a_pool() {
    let mut r = reconciler(FakeNat::default());
    // Before the first intent: kept for the first full pass.
    r.handle(vec![imported(&[("192.0.2.0/24", "172.18.0.101")])]);
    r.handle(vec![snapshot()]);
    assert!(kernel(&r).contains(&via("192.0.2.0/24", "172.18.0.101")));
    // Later changes are incremental: one added, one moved, one inside the
    // pool (refused), one where the cluster has a route (the cluster wins).
    r.handle(vec![imported(&[
        ("192.0.2.0/24", "172.18.0.102"),
        ("198.51.100.0/24", "172.18.0.101"),
        ("10.244.9.0/24", "172.18.0.101"),
        ("10.244.0.0/26", "172.18.0.101"),
    ])]);
    let k = kernel(&r);
    assert!(k.contains(&via("192.0.2.0/24", "172.18.0.102")), "{k:?}");
    assert!(k.contains(&via("198.51.100.0/24", "172.18.0.101")), "{k:?}");
    assert!(
        !k.iter().any(|x| x.dst == "10.244.9.0/24".parse().unwrap()),
        "{k:?}"
    );
    assert!(k.contains(&via("10.244.0.0/26", "172.18.0.2")), "{k:?}");
    assert_eq!(r.passes().full, 1, "imports need no full pass");
    // A full pass keeps them, and withdrawn ones go.
    r.handle(vec![Event::Poke]);
    assert_eq!(kernel(&r), k);
    r.handle(vec![imported(&[("198.51.100.0/24", "172.18.0.101")])]);
    let k = kernel(&r);
    assert!(
        !k.iter().any(|x| x.dst == "192.0.2.0/24".parse().unwrap()),
        "{k:?}"
    );
    assert!(k.contains(&via("198.51.100.0/24", "172.18.0.101")));
}

#[test]
fn the_bgp_view_is_published_with_the_generation_and_the_nodes_own() {
    let mut r = reconciler(FakeNat::default());
    let (tx, rx) = tokio::sync::watch::channel(Arc::default());
    r.publish_bgp_view(tx);
    r.handle(vec![Event::Update(Box::new(pb::IntentUpdate {
        bgp_generation: 7,
        ..match snapshot() {
            Event::Update(u) => *u,
            _ => unreachable!(),
        }
    }))]);
    let v = rx.borrow().clone();
    assert_eq!(v.generation, 7);
    assert_eq!(v.own, ["10.244.0.64/26".parse().unwrap()].into());
    assert_eq!(v.addrs, vec!["172.18.0.3/32".parse().unwrap()]);
    // A delta without a BGP change keeps the generation.
    r.handle(vec![delta(11, |u| {
        u.blocks.push(block("10.244.0.192/26", "worker"))
    })]);
    let v = rx.borrow().clone();
    assert_eq!((v.generation, v.own.len()), (7, 2));
}
