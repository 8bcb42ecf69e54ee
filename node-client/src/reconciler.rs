//! The reconciler: one dedicated OS thread that owns the intent, tabby's
//! routes and its nftables tables, and plans then applies.
//!
//! A delta from the stream is applied as the change it is: only the
//! destinations it touched are re-planned, against the reconciler's view of
//! its routes in the kernel, which the route monitor keeps current. A full
//! pass (dump, plan, apply) runs at start, after a snapshot or a pool change,
//! when notifications were lost, a link changed or an address was removed
//! (the kernel flushes IPv4 routes with them silently), something else
//! changed one of our destinations, after a failed change, and on a
//! jittered timer. The NAT
//! tables are compared with what tabby wrote when nftables reports a change
//! to them, and on a rarer jittered timer. The node's own changes never
//! trigger another pass.
use crate::{
    daemon::{lock_resume, lock_status, SharedResume, SharedStatus},
    kernel::{NatTables, OverlayTable, Route, RouteTable},
    netlink::RouteEvent,
    nft::NatSets,
    nft_monitor::NftEvent,
    plan::{self, Intent},
    Result,
};
use ipnet::IpNet;
use std::{
    collections::{hash_map::Entry, BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tabby_proto::v1 as pb;
use tabby_routing::{RouteTarget, Tunnel};
use tokio::sync::mpsc;

/// What the reconciler reacts to.
#[derive(Debug)]
pub enum Event {
    /// An intent update from the stream.
    Update(Box<pb::IntentUpdate>),
    /// The route monitor saw a change in the kernel.
    Route(RouteEvent),
    /// nftables reported a change to a `tabby` table.
    Nft(NftEvent),
    /// Something may have changed under us: run a full pass.
    Poke,
    /// The routes this node's BGP sessions import (all of them, each with
    /// its next hop), already filtered (never inside a pool).
    Imported(BTreeMap<IpNet, std::net::IpAddr>),
    /// Stop the reconciler.
    Shutdown,
}

/// Kernel knobs the reconciler sets. Abstracted so tests can run it in a netns.
pub trait Sysctl: Send {
    /// Writes `/proc/sys/<path>`.
    fn set(&mut self, path: &str, value: &str) -> Result<()>;
}

/// How often the reconciler checks on its own.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    /// Mean period of the full pass (each period jittered by ±20%).
    pub resync: Duration,
    /// Mean period of the NAT table comparison without an nftables event.
    pub nft_verify: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            resync: Duration::from_secs(90),
            nft_verify: Duration::from_secs(60),
        }
    }
}

/// Expected echoes kept at most (more means no monitor reads them).
const MAX_ECHOES: usize = 100_000;

/// What a full pass logs.
const FULL: &str = "routes reconciled";

/// The notifications the node's own route changes will cause, so that their
/// echoes are dropped where they arrive (the route monitor's thread) and
/// never wake the reconciler, even when they come after later changes.
#[derive(Debug, Default)]
pub struct EchoFilter(Mutex<HashMap<(bool, Route), u32>>);

impl EchoFilter {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(bool, Route), u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Expects the echoes of every change in `p`.
    fn expect(&self, p: &plan::RoutePlan) {
        let mut m = self.lock();
        if m.len() > MAX_ECHOES {
            // No monitor is consuming them.
            m.clear();
        }
        for key in Self::keys(p) {
            *m.entry(key).or_default() += 1;
        }
    }

    /// Withdraws the expected echoes of those changes of `p` that the kernel
    /// will not announce (they failed, or changed nothing).
    fn withdraw(&self, p: &plan::RoutePlan, unannounced: &BTreeSet<Route>) {
        let mut m = self.lock();
        for key in Self::keys(p).filter(|(_, r)| unannounced.contains(r)) {
            if let Entry::Occupied(mut e) = m.entry(key) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// (added, route) of each change in `p`, as the monitor reports them.
    fn keys(p: &plan::RoutePlan) -> impl Iterator<Item = (bool, Route)> + '_ {
        p.del
            .iter()
            .map(|r| (false, *r))
            .chain(p.add.iter().map(|r| (true, *r)))
    }

    /// Whether `ev` is the echo of one of our own changes (then consumed).
    pub fn take(&self, ev: &RouteEvent) -> bool {
        let key = match ev {
            RouteEvent::Deleted(r) => (false, *r),
            RouteEvent::Added(r) => (true, *r),
            _ => return false,
        };
        let mut m = self.lock();
        match m.entry(key) {
            Entry::Occupied(mut e) => {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
                true
            }
            Entry::Vacant(_) => false,
        }
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

/// What the overlay says when the kernel cannot make `tunl0`.
const NO_IPIP: &str = "the kernel has no ipip support";

/// Mean delay before a failed full pass is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// `d` ±20%, so that nodes that started or changed together drift apart.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}

/// How many passes of each kind ran (for tests and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Passes {
    /// Dump, plan and apply over everything.
    pub full: u64,
    /// Re-plans of the destinations deltas or the monitor touched.
    pub incremental: u64,
    /// `nft list` comparisons.
    pub nft_checks: u64,
}

/// The tunnel devices as last made: what was asked, and whether it worked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tunnels {
    /// The VXLAN devices as made (`vxlan.tabby`, `vxlan-v6.tabby`), with
    /// their MTUs.
    vxlan: BTreeMap<Tunnel, (tabby_routing::VxlanDevice, u32)>,
    /// `tunl0` made with this local address and MTU.
    ipip: Option<(std::net::IpAddr, u32)>,
}

/// The reconciler: owns intent and kernel programming.
pub struct Reconciler<T: RouteTable> {
    me: String,
    table: T,
    overlay: Box<dyn OverlayTable>,
    /// The tunnel devices in the kernel, as far as we know.
    tunnels: Tunnels,
    /// Tunnel devices that could not be made: routes through them are left
    /// out (and reported) instead of failing every pass.
    tunnels_down: BTreeSet<Tunnel>,
    /// Why an overlay cannot be applied here (for `Status`).
    overlay_problems: Vec<String>,
    /// The overlay (devices, VTEPs) must be brought up to the intent.
    overlay_due: bool,
    /// VXLAN devices that may exist (made by us, or by an earlier run).
    vxlan_maybe: BTreeSet<Tunnel>,
    nft: Box<dyn NatTables>,
    sysctl: Box<dyn Sysctl>,
    status: SharedStatus,
    resume: SharedResume,
    timers: Timers,
    intent: Intent,
    /// What each node holds in `intent`, kept with every delta.
    node_index: tabby_routing::NodeIndex,
    have_intent: bool,
    synced: bool,
    /// The routes this node should hold, by destination.
    want: BTreeMap<IpNet, Route>,
    /// tabby's routes in the kernel as far as we know: the last dump, our
    /// own successful changes, and what the monitor reported since.
    installed: BTreeMap<IpNet, Route>,
    /// Destinations to re-plan at the next incremental pass.
    touched: BTreeSet<IpNet>,
    /// Commit times (Unix ns) of the deltas taken and not yet known to be
    /// in the kernel: for the convergence-delay metric.
    committed_at: Vec<u64>,
    /// Notifications our own changes will cause, shared with the route
    /// monitor's thread, which drops them there.
    echoes: Arc<EchoFilter>,
    full_due: bool,
    next_full: Instant,
    /// When a failed full pass is tried again.
    retry_at: Instant,
    /// Full passes in a row that left something to retry.
    failed_passes: u32,
    /// Whether the IPv6 routes were dumped by the last full pass.
    v6_listed: bool,
    nat: (NatSets, NatSets),
    ipv6: bool,
    unsupported: Vec<String>,
    nat_applied: Option<(NatSets, NatSets)>,
    /// `nft list table <family> tabby` right after our last write, per family.
    /// None: the listing failed, which counts as drift.
    nat_listing: Vec<(&'static str, Option<String>)>,
    nft_check_due: bool,
    next_nft_check: Instant,
    v6_forwarding: bool,
    errors: Vec<String>,
    passes: Passes,
    /// Routes learned over BGP to install (below the cluster's routes).
    imported: BTreeMap<IpNet, std::net::IpAddr>,
    /// The intent's BGP generation, last seen.
    bgp_generation: u64,
    /// Where the BGP sessions' view of the intent is published.
    bgp_view: Option<tokio::sync::watch::Sender<Arc<crate::bgp::BgpView>>>,
}

impl<T: RouteTable> Reconciler<T> {
    /// A reconciler that has applied nothing yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: String,
        table: T,
        overlay: Box<dyn OverlayTable>,
        nft: Box<dyn NatTables>,
        sysctl: Box<dyn Sysctl>,
        status: SharedStatus,
        resume: SharedResume,
        timers: Timers,
    ) -> Self {
        let now = Instant::now();
        Reconciler {
            me,
            table,
            overlay,
            tunnels: Tunnels::default(),
            tunnels_down: BTreeSet::new(),
            overlay_problems: Vec::new(),
            overlay_due: false,
            vxlan_maybe: [Tunnel::Vxlan, Tunnel::VxlanV6].into(),
            nft,
            sysctl,
            status,
            resume,
            timers,
            intent: Intent::default(),
            node_index: tabby_routing::NodeIndex::default(),
            have_intent: false,
            synced: false,
            want: BTreeMap::new(),
            installed: BTreeMap::new(),
            touched: BTreeSet::new(),
            committed_at: Vec::new(),
            echoes: Arc::new(EchoFilter::default()),
            full_due: true,
            next_full: now + jittered(timers.resync),
            retry_at: now,
            failed_passes: 0,
            v6_listed: false,
            nat: Default::default(),
            ipv6: false,
            unsupported: Vec::new(),
            nat_applied: None,
            nat_listing: Vec::new(),
            nft_check_due: false,
            next_nft_check: now + jittered(timers.nft_verify),
            v6_forwarding: false,
            errors: Vec::new(),
            passes: Passes::default(),
            imported: BTreeMap::new(),
            bgp_generation: 0,
            bgp_view: None,
        }
    }

    /// Publishes the BGP sessions' view of the intent on `tx` after every
    /// update that changes it.
    pub fn publish_bgp_view(&mut self, tx: tokio::sync::watch::Sender<Arc<crate::bgp::BgpView>>) {
        self.bgp_view = Some(tx);
    }

    fn publish(&self) {
        if let Some(tx) = &self.bgp_view {
            let v = crate::bgp::BgpView::of(
                &self.intent,
                &self.node_index,
                &self.me,
                self.bgp_generation,
            );
            tx.send_if_modified(|old| {
                let changed = **old != v;
                if changed {
                    *old = Arc::new(v);
                }
                changed
            });
        }
    }

    /// A BGP-learned route at `dst`, if one is imported and it is not in a
    /// pool (the cluster's routes always win).
    fn imported_at(&self, dst: &IpNet) -> Option<Route> {
        let gw = self.imported.get(dst)?;
        let in_pool = self.intent.pools.values().any(|p| p.cidr.contains(dst));
        (!in_pool).then_some(Route {
            dst: *dst,
            target: RouteTarget::Via(*gw),
        })
    }

    fn take_imported(&mut self, new: BTreeMap<IpNet, std::net::IpAddr>) {
        let changed: Vec<IpNet> = self
            .imported
            .iter()
            .filter(|(d, g)| new.get(d) != Some(g))
            .map(|(d, _)| *d)
            .chain(
                new.iter()
                    .filter(|(d, g)| self.imported.get(d) != Some(g))
                    .map(|(d, _)| *d),
            )
            .collect();
        self.imported = new;
        // Before the first intent the first full pass takes them.
        if self.have_intent {
            self.touched.extend(changed);
        }
    }

    /// The echo filter, for the route monitor's thread.
    pub fn echo_filter(&self) -> Arc<EchoFilter> {
        self.echoes.clone()
    }

    /// Passes run so far.
    pub fn passes(&self) -> Passes {
        self.passes
    }

    /// The route table (tests inspect their fake).
    pub fn table(&self) -> &T {
        &self.table
    }

    /// Runs until [`Event::Shutdown`] or every sender is gone.
    ///
    /// Meant for a current-thread runtime of the reconciler's own thread
    /// that also runs the intent watch and the route monitor: an update then
    /// wakes one thread, which reads it, applies it and reads the echo of
    /// its own change without another wake-up. Passes block that thread
    /// while they talk to the kernel, which is what it is for.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        if let Err(e) = self.sysctl.set("net/ipv4/ip_forward", "1") {
            tracing::error!(error = %e, "cannot enable ip_forward");
        }
        loop {
            let wait = if self.have_intent {
                let mut wake = self.next_full.min(self.next_nft_check);
                if self.full_due {
                    // A failed pass is retried soon, not at the next period.
                    wake = wake.min(self.retry_at);
                }
                wake
            } else {
                // Nothing to do before the first intent but wait for it.
                Instant::now() + self.timers.resync
            };
            let first = match tokio::time::timeout_at(wait.into(), rx.recv()).await {
                Ok(Some(ev)) => Some(ev),
                Ok(None) => return,
                Err(_elapsed) => None,
            };
            let mut events: Vec<Event> = first.into_iter().collect();
            while let Ok(ev) = rx.try_recv() {
                events.push(ev);
            }
            if !self.handle(events) {
                return;
            }
        }
    }

    /// Takes a batch of events, then runs whatever pass is due. False on
    /// [`Event::Shutdown`].
    pub fn handle(&mut self, events: Vec<Event>) -> bool {
        for ev in events {
            match ev {
                Event::Shutdown => return false,
                Event::Poke => self.full_due = true,
                Event::Update(u) => self.take_update(&u),
                Event::Imported(r) => self.take_imported(r),
                Event::Route(r) => self.take_route_event(r),
                Event::Nft(_) => self.nft_check_due = true,
            }
        }
        self.step(Instant::now());
        true
    }

    /// Runs what is due at `now`.
    pub fn step(&mut self, now: Instant) {
        if !self.have_intent {
            return;
        }
        if self.full_due || now >= self.next_full {
            self.full_pass();
            self.next_full = now + jittered(self.timers.resync);
            // Failing again and again (a foreign route holds one of our
            // destinations, a gateway is unreachable): back off, up to the
            // resync period.
            self.failed_passes = if self.full_due {
                self.failed_passes.saturating_add(1)
            } else {
                0
            };
            let backoff = RETRY
                .saturating_mul(1 << self.failed_passes.min(10))
                .min(self.timers.resync);
            self.retry_at = now + jittered(backoff);
        } else {
            if self.overlay_due {
                self.errors.clear();
                self.sync_overlay();
                self.finish();
            }
            if !self.touched.is_empty() {
                self.incremental_pass();
            }
        }
        // The changes taken are in the kernel unless a pass failed (then
        // they are counted once a later pass succeeds).
        if !self.committed_at.is_empty() && !self.full_due {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX));
            let h = &crate::metrics::metrics().convergence;
            for t in self.committed_at.drain(..) {
                h.observe(now.saturating_sub(t) as f64 / 1e9);
            }
        }
        if self.nft_check_due || now >= self.next_nft_check {
            self.check_nat();
            self.next_nft_check = now + jittered(self.timers.nft_verify);
        }
    }

    fn take_update(&mut self, u: &pb::IntentUpdate) {
        match plan::intent_delta(u) {
            Ok(delta) => {
                self.node_index.unlink(&self.intent, &delta);
                self.intent.apply(delta.clone());
                self.node_index.link(&self.intent, &delta);
                // A snapshot or a pool change (NAT sets, families) is
                // planned whole; anything else at the destinations it
                // touched (a node's, from the index: no walk over every block).
                match delta.touched_indexed(&self.node_index) {
                    Some(t) if self.have_intent => self.touched.extend(t),
                    _ => self.full_due = true,
                }
                // Nodes (addresses, VTEPs) and VXLAN settings shape the
                // tunnels and their FDB and neighbour entries.
                if !delta.nodes.is_empty()
                    || !delta.removed_nodes.is_empty()
                    || delta.vxlan.is_some()
                {
                    self.overlay_due = true;
                }
                self.have_intent = true;
                if u.snapshot && !self.synced {
                    tracing::info!(revision = u.revision, "first full intent sync");
                    self.synced = true;
                }
                if u.bgp_generation != 0 {
                    self.bgp_generation = u.bgp_generation;
                }
                self.publish();
                lock_resume(&self.resume).record(u, true);
                // Bounded: passes that keep failing must not grow it.
                if !u.snapshot && u.commit_unix_nanos > 0 && self.committed_at.len() < 4096 {
                    self.committed_at.push(u.commit_unix_nanos);
                }
            }
            Err(e) => {
                // The watch reconnects and asks for a snapshot.
                tracing::error!(error = %e, "bad intent update ignored; will resync");
                lock_resume(&self.resume).record(u, false);
            }
        }
    }

    /// A kernel change: our own changes (echoed back) are already in
    /// `installed` and cause nothing.
    fn take_route_event(&mut self, ev: RouteEvent) {
        if self.echoes.take(&ev) {
            return;
        }
        let dst = match &ev {
            RouteEvent::Deleted(r) | RouteEvent::Added(r) => Some(r.dst),
            RouteEvent::Foreign(d) => Some(*d),
            RouteEvent::Resync => None,
        };
        if dst.is_some_and(|d| d.addr().is_ipv6()) {
            // Something changed in the IPv6 table: the next full pass looks.
            self.v6_listed = false;
        }
        match ev {
            RouteEvent::Deleted(r) => {
                if self.installed.get(&r.dst) == Some(&r) {
                    self.installed.remove(&r.dst);
                    if self.want.get(&r.dst) == Some(&r) {
                        // Deleted by hand (or by the kernel): put it back.
                        self.touched.insert(r.dst);
                    }
                }
            }
            RouteEvent::Added(r) => match self.want.get(&r.dst) {
                Some(w) if *w == r => {
                    self.installed.insert(r.dst, r);
                }
                // Another tabby route at one of our destinations, or a
                // stale one: only a full pass knows what else is there.
                _ if self.installed.get(&r.dst) != Some(&r) => self.full_due = true,
                _ => {}
            },
            RouteEvent::Foreign(dst) => {
                if self.want.contains_key(&dst) {
                    self.full_due = true;
                }
            }
            RouteEvent::Resync => {
                self.echoes.clear();
                self.full_due = true;
            }
        }
    }

    /// Dump, plan and apply everything; also NAT and sysctls.
    fn full_pass(&mut self) {
        self.passes.full += 1;
        self.full_due = false;
        self.touched.clear();
        self.errors.clear();
        let d = tabby_routing::desired(&self.intent, &self.me);
        // Tunnel devices first: routes through them need them.
        self.sync_overlay();
        self.want = d
            .routes
            .iter()
            .filter(|r| self.routable(r))
            .map(|r| (r.dst, *r))
            .collect();
        let imported: Vec<Route> = self
            .imported
            .keys()
            .filter(|d| !self.want.contains_key(d))
            .filter_map(|d| self.imported_at(d))
            .collect();
        self.want.extend(imported.into_iter().map(|r| (r.dst, r)));
        let wanted: BTreeSet<Route> = self.want.values().copied().collect();
        self.nat = (d.nat_v4.clone(), d.nat_v6.clone());
        self.ipv6 = d.ipv6;
        if self.unsupported != d.unsupported {
            for u in &d.unsupported {
                tracing::warn!("{u}");
            }
            self.unsupported.clone_from(&d.unsupported);
        }
        // IPv6 routes are dumped while an IPv6 pool exists, and once more
        // after it is gone (and at start) so stale ones are found.
        let v6 = d.ipv6 || !self.v6_listed || self.installed.keys().any(|d| d.addr().is_ipv6());
        let actual = match self.table.list_families(v6) {
            Ok(a) => a,
            Err(e) => {
                self.errors.push(format!("listing routes: {e}"));
                self.full_due = true;
                self.finish();
                return;
            }
        };
        self.v6_listed = !d.ipv6 && v6;
        self.installed = actual.iter().map(|r| (r.dst, *r)).collect();
        let p = plan::plan_routes(&wanted, &actual, self.synced);
        self.apply(&p, FULL);
        self.sync_nat();
        if self.ipv6 && !self.v6_forwarding {
            match self.sysctl.set("net/ipv6/conf/all/forwarding", "1") {
                Ok(()) => self.v6_forwarding = true,
                Err(e) => self.errors.push(e.to_string()),
            }
        }
        self.finish();
    }

    /// Re-plans the touched destinations against `installed`.
    fn incremental_pass(&mut self) {
        self.passes.incremental += 1;
        self.errors.clear();
        let mut want = BTreeSet::new();
        let mut have = Vec::new();
        for dst in std::mem::take(&mut self.touched) {
            match tabby_routing::route_at(&self.intent, &self.me, &dst)
                .filter(|r| self.routable(r))
                .or_else(|| self.imported_at(&dst))
            {
                Some(r) => {
                    self.want.insert(dst, r);
                    want.insert(r);
                }
                None => {
                    self.want.remove(&dst);
                }
            }
            have.extend(self.installed.get(&dst).copied());
        }
        let p = plan::plan_routes(&want, &have, self.synced);
        self.apply(&p, "routes updated");
        self.finish();
    }

    /// Whether a route can go in: not through a tunnel device that could
    /// not be made.
    fn routable(&self, r: &Route) -> bool {
        match r.target {
            RouteTarget::Tunnel(_, t) => !self.tunnels_down.contains(&t),
            _ => true,
        }
    }

    /// Brings the tunnel devices and the VTEP entries up to the intent.
    /// Before the first full sync nothing is removed.
    fn sync_overlay(&mut self) {
        self.overlay_due = false;
        let o = tabby_routing::overlay(&self.intent, &self.me);
        let mut problems = o.problems.clone();
        let mut down = BTreeSet::new();
        for (t, want, vteps) in [
            (Tunnel::Vxlan, o.vxlan, &o.vteps),
            (Tunnel::VxlanV6, o.vxlan_v6, &o.vteps_v6),
        ] {
            self.sync_vxlan(t, want, vteps, &mut problems, &mut down);
        }
        // tunl0: IP-in-IP, where the kernel has it.
        if let Some(local) = o.ipip {
            let pool = self
                .intent
                .pools
                .iter()
                .find(|(_, p)| {
                    p.cidr.addr().is_ipv4()
                        && matches!(
                            p.encapsulation,
                            tabby_routing::Encapsulation::Ipip
                                | tabby_routing::Encapsulation::IpipCrossSubnet
                        )
                })
                .map(|(n, _)| n.clone())
                .unwrap_or_default();
            let mtu = self
                .overlay
                .uplink_mtu(local)
                .map(|m| m.saturating_sub(Tunnel::Ipip.overhead()));
            match mtu.and_then(|mtu| self.overlay.ensure_ipip(local, mtu).map(|()| mtu)) {
                Ok(mtu) => self.tunnels.ipip = Some((local, mtu)),
                Err(e) => {
                    // Said plainly in Status; the log keeps the kernel's words.
                    let e = e.to_string();
                    if e.contains(NO_IPIP) {
                        tracing::debug!(error = %e, "tunl0 not made");
                        problems.push(format!("IPIP pool {pool}: {NO_IPIP}"));
                    } else {
                        problems.push(format!("IPIP pool {pool}: {e}"));
                    }
                    down.insert(Tunnel::Ipip);
                    self.tunnels.ipip = None;
                }
            }
        } else {
            self.tunnels.ipip = None;
        }
        if problems != self.overlay_problems {
            for p in &problems {
                tracing::warn!("{p}");
            }
            self.overlay_problems = problems;
        }
        if down != self.tunnels_down {
            // Routes through a device that came or went: plan them all.
            self.tunnels_down = down;
            self.full_due = true;
        }
    }

    /// One VXLAN device (`t`): made as `want` says, with an MTU below its
    /// uplink's, and its entries those of `vteps`; or removed.
    fn sync_vxlan(
        &mut self,
        t: Tunnel,
        want: Option<tabby_routing::VxlanDevice>,
        vteps: &BTreeSet<tabby_routing::VtepEntry>,
        problems: &mut Vec<String>,
        down: &mut BTreeSet<Tunnel>,
    ) {
        let name = t.device();
        let Some(dev) = want else {
            // Removed once known unwanted: after the first full sync (one
            // left by an earlier run), and when its last pool went.
            if self.synced && self.vxlan_maybe.contains(&t) {
                match self.overlay.remove_vxlan(t) {
                    Ok(()) => {
                        if self.tunnels.vxlan.remove(&t).is_some() {
                            tracing::info!("no VXLAN pool of its family: {name} removed");
                        }
                        self.vxlan_maybe.remove(&t);
                    }
                    Err(e) => self.errors.push(format!("removing {name}: {e}")),
                }
            }
            return;
        };
        let mtu = match self.overlay.uplink_mtu(dev.local) {
            Ok(m) => m.saturating_sub(t.overhead()),
            Err(e) => {
                problems.push(format!(
                    "VXLAN: no usable uplink for {name} (the interface with {}): {e}",
                    dev.local
                ));
                down.insert(t);
                return;
            }
        };
        self.vxlan_maybe.insert(t);
        if let Err(e) = self.overlay.ensure_vxlan(&dev, mtu) {
            self.errors.push(format!("{name}: {e}"));
            down.insert(t);
            self.tunnels.vxlan.remove(&t);
            return;
        }
        if self.tunnels.vxlan.get(&t) != Some(&(dev, mtu)) {
            tracing::info!(vni = dev.settings.vni, port = dev.settings.port, local = %dev.local, mtu, "{name} up");
        }
        self.tunnels.vxlan.insert(t, (dev, mtu));
        self.sync_vteps(t, vteps);
    }

    /// Makes the neighbour and FDB entries on the VXLAN device `t` those of
    /// `vteps`.
    fn sync_vteps(&mut self, t: Tunnel, vteps: &BTreeSet<tabby_routing::VtepEntry>) {
        let have = match self.overlay.list_vteps(t) {
            Ok(h) => h,
            Err(e) => {
                self.errors.push(format!("listing VTEP entries: {e}"));
                self.full_due = true;
                return;
            }
        };
        let p = plan::plan_vteps(vteps, &have, self.synced);
        if p.is_empty() {
            return;
        }
        let results = [
            self.overlay.del_neigh(t, &p.del_neigh),
            self.overlay.del_fdb(t, &p.del_fdb),
            self.overlay.add_fdb(t, &p.add_fdb),
            self.overlay.add_neigh(t, &p.add_neigh),
        ];
        let mut failed = 0;
        for r in results.into_iter().flatten() {
            match r {
                Ok(()) | Err(crate::Error::NotFound(_)) => {}
                Err(e) => {
                    failed += 1;
                    self.errors.push(format!("VTEP entry: {e}"));
                }
            }
        }
        if failed > 0 {
            self.full_due = true;
        }
        tracing::info!(
            device = t.device(),
            added = p.add_neigh.len(),
            removed = p.del_neigh.len(),
            failed,
            "VTEP entries updated"
        );
    }

    fn apply(&mut self, p: &plan::RoutePlan, what: &str) {
        if p.is_empty() {
            return;
        }
        // Expected before the kernel can announce them.
        self.echoes.expect(p);
        let t0 = Instant::now();
        let rep = plan::apply_plan(&mut self.table, p);
        crate::metrics::metrics()
            .route_apply
            .observe(t0.elapsed().as_secs_f64());
        let failed: BTreeSet<Route> = rep.failed.iter().map(|(r, _)| *r).collect();
        let unannounced = failed.iter().chain(&rep.noops).copied().collect();
        self.echoes.withdraw(p, &unannounced);
        // Only what was done changes the view; a failed IPv6 change has the
        // next full pass dump IPv6 again.
        for r in p.del.iter().filter(|r| !failed.contains(r)) {
            if self.installed.get(&r.dst) == Some(r) {
                self.installed.remove(&r.dst);
            }
        }
        for r in p.add.iter().filter(|r| !failed.contains(r)) {
            self.installed.insert(r.dst, *r);
        }
        if failed.iter().any(|r| r.dst.addr().is_ipv6()) {
            self.v6_listed = false;
        }
        // Routine updates at debug: one line per route change on every node
        // would be most of a node's work; full passes stay at info.
        if what == FULL || !rep.failed.is_empty() {
            tracing::info!(
                added = p.add.len(),
                deleted = p.del.len(),
                failed = rep.failed.len(),
                revision = self.intent.revision,
                "{what}"
            );
        }
        tracing::debug!(
            added = p.add.len(),
            deleted = p.del.len(),
            failed = rep.failed.len(),
            revision = self.intent.revision,
            "{what}"
        );
        if !rep.failed.is_empty() {
            // What failed is not what `installed` says: re-read it all.
            self.full_due = true;
            for (r, e) in rep.failed {
                self.errors.push(format!("{r}: {e}"));
            }
        }
    }

    /// Writes the NAT tables when the sets changed or were found edited.
    fn sync_nat(&mut self) {
        if self.nat_applied.as_ref() == Some(&self.nat) {
            return;
        }
        let mut ok = true;
        let mut written = vec!["ip"];
        if let Err(e) = self.nft.sync("ip", &self.nat.0) {
            self.errors.push(e.to_string());
            ok = false;
        }
        // An ip6 table we wrote stays ours to keep right, also once its
        // pools are gone (then it is written empty).
        let had_v6 = self.nat_listing.iter().any(|(f, _)| *f == "ip6");
        if self.ipv6 || had_v6 {
            written.push("ip6");
            if let Err(e) = self.nft.sync("ip6", &self.nat.1) {
                self.errors.push(e.to_string());
                ok = false;
            }
        }
        if !ok {
            // Retried by the next full pass (soon, with backoff).
            self.full_due = true;
        }
        if ok {
            self.nat_listing = written
                .into_iter()
                .map(|f| (f, self.nft.list(f).ok()))
                .collect();
            tracing::info!(masq = ?self.nat.0.masq, all = ?self.nat.0.all, "nftables table ip tabby updated");
            self.nat_applied = Some(self.nat.clone());
        }
    }

    /// Someone may have deleted or edited our tables: compare them with what
    /// we wrote, and rewrite them when they differ.
    fn check_nat(&mut self) {
        self.nft_check_due = false;
        if self.nat_applied.is_none() {
            return;
        }
        self.passes.nft_checks += 1;
        let drift = self
            .nat_listing
            .iter()
            .find(|(f, want)| want.is_none() || self.nft.list(f).ok() != *want)
            .map(|(f, _)| *f);
        if let Some(family) = drift {
            tracing::warn!(
                family,
                "table {family} tabby is not what tabby wrote (deleted or edited by hand); rewriting it"
            );
            crate::metrics::metrics().nft_repairs.inc();
            self.nat_applied = None;
            self.errors.clear();
            self.sync_nat();
            self.finish();
        }
    }

    fn finish(&mut self) {
        let mut st = lock_status(&self.status);
        st.synced = self.synced;
        st.revision = self.intent.revision;
        st.routes = self.want.len();
        st.tunnel_mtu = [
            self.tunnels.vxlan.values().map(|(_, m)| *m).min(),
            self.tunnels.ipip.map(|(_, m)| m),
        ]
        .into_iter()
        .flatten()
        .min();
        st.unsupported = self
            .unsupported
            .iter()
            .chain(&self.overlay_problems)
            .cloned()
            .collect();
        if !self.errors.is_empty() {
            tracing::warn!(errors = ?self.errors, "reconcile incomplete; retrying at the next pass");
        }
        st.last_error = (!self.errors.is_empty()).then(|| self.errors.join("; "));
    }
}

#[cfg(test)]
mod tests;
