//! The BGP sessions a node holds itself (issue 15), like Calico's
//! node-specific BGPPeer: the peers whose `node_selector` selects this node.
//! The node advertises its own blocks and borrowed addresses with itself as
//! next hop, and hands what each peer's import filter accepts (never a route
//! inside a pool) to the reconciler, which installs it like any tabby route
//! (proto 77). It helps a peer that restarts gracefully (RFC 4724): the
//! peer's routes stay, marked stale, for its restart time or until its
//! End-of-RIB.
//!
//! The pure parts (the view, the exports, the Adj-RIB-In, the imports) are
//! apart from [`run`], which fetches the sessions from the controller and
//! drives them.
use crate::{
    controller::Controller,
    daemon::{lock_status, SharedStatus},
    reconciler::Event,
};
use ipnet::IpNet;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};
use tabby_bgp::{
    codec::{self, Afi, Capabilities, GracefulRestart, Open, Origin, Route, Update},
    fsm::{Config, State},
    session::{self, Command, Report, SessionConfig},
};
use tabby_proto::v1 as pb;
use tokio::sync::{mpsc, watch};

/// BGP's port.
const BGP_PORT: u16 = 179;

/// Seconds peers keep this node's routes while tabby-node restarts (its
/// routes stay in the kernel meanwhile).
const RESTART_TIME: u16 = 120;

/// The sessions are fetched again this often (jittered) even without a new
/// generation: a level-triggered safety net.
const REFETCH: Duration = Duration::from_secs(300);

/// What the sessions need from the intent. The reconciler publishes it after
/// every update that changes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgpView {
    /// The intent's `bgp_generation` (0: none seen yet).
    pub generation: u64,
    /// This node's blocks and borrowed addresses.
    pub own: BTreeSet<IpNet>,
    /// Pools by name.
    pub pools: BTreeMap<String, IpNet>,
    /// This node's addresses, with their interface prefixes.
    pub addrs: Vec<IpNet>,
}

impl BgpView {
    /// The view of node `me` in `intent`, whose index is `index`.
    pub fn of(
        intent: &tabby_routing::Intent,
        index: &tabby_routing::NodeIndex,
        me: &str,
        generation: u64,
    ) -> BgpView {
        BgpView {
            generation,
            own: index.of_node(me).collect(),
            pools: intent
                .pools
                .iter()
                .map(|(n, p)| (n.clone(), p.cidr))
                .collect(),
            addrs: intent
                .nodes
                .get(me)
                .map(|n| n.addrs.clone())
                .unwrap_or_default(),
        }
    }

    /// This node's address of `v4`'s family: the next hop it advertises.
    fn addr(&self, v4: bool) -> Option<IpAddr> {
        self.addrs
            .iter()
            .map(IpNet::addr)
            .find(|a| a.is_ipv4() == v4)
    }

    /// Whether `p` is inside a pool (such a route is never imported).
    fn in_pool(&self, p: &IpNet) -> bool {
        self.pools.values().any(|pool| pool.contains(p))
    }
}

/// A peer as the node holds it, parsed from `GetBgpSessions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePeer {
    /// The peer's address.
    pub address: IpAddr,
    /// Its AS.
    pub remote_asn: u32,
    /// Wait for it to connect.
    pub passive: bool,
    /// Proposed hold time.
    pub hold_time: u16,
    /// TCP-MD5 password.
    pub password: Option<String>,
    /// Export filter: pool names (empty: all).
    pub export_pools: Vec<String>,
    /// Export filter: prefixes (empty: no restriction).
    pub export_prefixes: Vec<IpNet>,
    /// Communities attached to what is advertised.
    pub communities: Vec<u32>,
    /// Import filter (empty: nothing is imported).
    pub import_prefixes: Vec<IpNet>,
}

/// Parses a peer of `GetBgpSessions` (the controller checked it already;
/// a peer that still does not parse is reported and skipped).
pub fn parse_peer(p: &pb::BgpPeer) -> Result<NodePeer, String> {
    let nets = |v: &[String]| -> Result<Vec<IpNet>, String> {
        v.iter()
            .map(|s| s.parse().map_err(|_| format!("{s:?} is not a prefix")))
            .collect()
    };
    Ok(NodePeer {
        address: p
            .address
            .parse()
            .map_err(|_| format!("peer address {:?} is not an address", p.address))?,
        remote_asn: p.remote_asn,
        passive: p.passive,
        hold_time: u16::try_from(p.hold_time).map_err(|_| "hold_time out of range".to_string())?,
        password: (!p.password.is_empty()).then(|| p.password.clone()),
        export_pools: p.export_pools.clone(),
        export_prefixes: nets(&p.export_prefixes)?,
        communities: p
            .communities
            .iter()
            .map(|c| codec::parse_community(c).ok_or_else(|| format!("community {c:?}")))
            .collect::<Result<_, _>>()?,
        import_prefixes: nets(&p.import_prefixes)?,
    })
}

/// What this node advertises to `peer`: each of its own destinations with
/// its own address of that family as next hop (next-hop self), through the
/// peer's export filter.
pub fn exports(view: &BgpView, peer: &NodePeer, asn: u32) -> BTreeMap<IpNet, Route> {
    let ibgp = peer.remote_asn == asn;
    view.own
        .iter()
        .filter(|d| {
            peer.export_pools.is_empty()
                || view
                    .pools
                    .iter()
                    .any(|(n, c)| c.contains(*d) && peer.export_pools.contains(n))
        })
        .filter(|d| {
            peer.export_prefixes.is_empty() || peer.export_prefixes.iter().any(|p| p.contains(*d))
        })
        .filter_map(|d| {
            let nh = view.addr(d.addr().is_ipv4())?;
            Some((
                *d,
                Route {
                    prefix: *d,
                    next_hop: nh,
                    origin: Origin::Igp,
                    as_path: if ibgp { vec![] } else { vec![asn] },
                    communities: peer.communities.clone(),
                    local_pref: ibgp.then_some(100),
                },
            ))
        })
        .collect()
}

/// One peer's Adj-RIB-In: prefix → next hop, with the routes kept across
/// the peer's graceful restart marked stale.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RibIn {
    /// The peer's routes.
    pub routes: BTreeMap<IpNet, IpAddr>,
    /// Routes kept from before the peer's restart, not yet re-announced.
    pub stale: BTreeSet<IpNet>,
    /// When the stale routes go, if the peer has not sent them again.
    pub stale_until: Option<Instant>,
}

impl RibIn {
    /// Takes an UPDATE: announcements (a re-announced stale route is fresh
    /// again), withdrawals, and End-of-RIB, after which the family's routes
    /// still stale are gone.
    pub fn update(&mut self, u: &Update) {
        for p in &u.withdraw {
            self.routes.remove(p);
            self.stale.remove(p);
        }
        for r in &u.announce {
            // A next hop of the other family cannot be installed.
            if r.next_hop.is_ipv4() == r.prefix.addr().is_ipv4() {
                self.routes.insert(r.prefix, r.next_hop);
            } else {
                self.routes.remove(&r.prefix);
            }
            self.stale.remove(&r.prefix);
        }
        if let Some(afi) = u.end_of_rib {
            let v4 = afi == Afi::Ipv4;
            let gone: Vec<IpNet> = self
                .stale
                .iter()
                .filter(|p| p.addr().is_ipv4() == v4)
                .copied()
                .collect();
            for p in gone {
                self.stale.remove(&p);
                self.routes.remove(&p);
            }
            if self.stale.is_empty() {
                self.stale_until = None;
            }
        }
    }

    /// The session went down. A peer that offered graceful restart keeps
    /// its routes, stale, for `restart` (RFC 4724 helper); otherwise they go.
    pub fn down(&mut self, restart: Option<Duration>, now: Instant) {
        match restart.filter(|d| !d.is_zero()) {
            Some(d) if !self.routes.is_empty() => {
                self.stale = self.routes.keys().copied().collect();
                self.stale_until = Some(now + d);
            }
            _ => self.clear(),
        }
    }

    /// Drops stale routes whose time ran out.
    pub fn expire(&mut self, now: Instant) {
        if self.stale_until.is_some_and(|t| now >= t) {
            for p in std::mem::take(&mut self.stale) {
                self.routes.remove(&p);
            }
            self.stale_until = None;
        }
    }

    fn clear(&mut self) {
        self.routes.clear();
        self.stale.clear();
        self.stale_until = None;
    }
}

/// Whether `import` (a peer's import filter) accepts `p`, given the view
/// (never a route inside a pool).
pub fn accepts(import: &[IpNet], view: &BgpView, p: &IpNet) -> bool {
    import.iter().any(|i| i.contains(p)) && !view.in_pool(p)
}

/// The routes to install: each peer's accepted routes; where two peers
/// offer a prefix, the lower peer address wins (a stable choice).
pub fn imports<'a>(
    peers: impl IntoIterator<Item = (&'a RibIn, &'a [IpNet])>,
    view: &BgpView,
) -> BTreeMap<IpNet, IpAddr> {
    let mut out = BTreeMap::new();
    for (rib, import) in peers {
        for (p, nh) in &rib.routes {
            if accepts(import, view, p) {
                out.entry(*p).or_insert(*nh);
            }
        }
    }
    out
}

/// One session as the node's Status shows it.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    /// The peer's AS.
    pub remote_asn: u32,
    /// FSM state.
    pub state: Option<State>,
    /// When it came up.
    pub since: Option<Instant>,
    /// Why it last went down.
    pub last_error: String,
    /// Prefixes advertised.
    pub sent: usize,
    /// Prefixes received (stale ones included).
    pub received: usize,
    /// Of those, accepted by the import filter.
    pub accepted: usize,
}

impl SessionState {
    /// As the Status RPC shows it.
    pub fn to_pb(&self, peer: IpAddr) -> pb::BgpSessionStatus {
        pb::BgpSessionStatus {
            peer: peer.to_string(),
            remote_asn: self.remote_asn,
            state: self.state.map_or("Idle", State::as_str).into(),
            uptime_seconds: self.since.map_or(0, |t| t.elapsed().as_secs()),
            last_error: self.last_error.clone(),
            prefixes_sent: self.sent as u64,
            prefixes_received: self.received as u64,
            prefixes_accepted: self.accepted as u64,
            advertised: Vec::new(),
        }
    }
}

struct Running {
    peer: NodePeer,
    asn: u32,
    router_id: Ipv4Addr,
    serial: u64,
    cmds: mpsc::UnboundedSender<Command>,
    incoming: mpsc::UnboundedSender<tokio::net::TcpStream>,
    sent: BTreeMap<IpNet, Route>,
    rib: RibIn,
    /// The peer's restart time, from its OPEN.
    peer_restart: Option<Duration>,
    was_up: bool,
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}

/// Holds this node's sessions until the process ends: fetches them from the
/// controller whenever the view's generation changes (and now and then),
/// advertises the node's own destinations, and sends the imported routes to
/// the reconciler as [`Event::Imported`].
pub async fn run(
    ctl: Controller,
    mut view_rx: watch::Receiver<Arc<BgpView>>,
    to_rec: mpsc::UnboundedSender<Event>,
    status: SharedStatus,
) {
    let started = Instant::now();
    let (rep_tx, mut rep_rx) = mpsc::unbounded_channel::<(IpAddr, u64, Report)>();
    let mut serial = 0u64;
    let mut sessions: BTreeMap<IpAddr, Running> = BTreeMap::new();
    let mut listener: Option<session::Acceptor> = None;
    let mut fetched: Option<(u64, pb::GetBgpSessionsResponse)> = None;
    let mut fetch_at = Instant::now();
    let mut retry =
        tabby_runtime::Backoff::exponential(Duration::from_millis(200), Duration::from_secs(30))
            .with_jitter(0.2);
    // While fetching fails, the next try waits until then.
    let mut retry_at: Option<Instant> = None;
    let mut imported: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
    loop {
        let view = view_rx.borrow_and_update().clone();
        let now = Instant::now();
        // Fetch the sessions when the generation moved (or the safety net
        // is due); not before the first intent.
        let stale_gen = fetched.as_ref().map(|(g, _)| *g) != Some(view.generation);
        let failing = retry_at.is_some_and(|t| now < t);
        if view.generation != 0 && ((stale_gen && !failing) || now >= fetch_at) {
            match ctl
                .agent()
                .get_bgp_sessions(pb::GetBgpSessionsRequest {})
                .await
            {
                Ok(r) => {
                    fetched = Some((view.generation, r.into_inner()));
                    retry.reset();
                    retry_at = None;
                    fetch_at = Instant::now() + jittered(REFETCH);
                }
                Err(e) => {
                    ctl.failed(&e);
                    let wait = retry.next_delay();
                    tracing::warn!(error = %e.message(), retry_in = ?wait, "cannot fetch this node's BGP sessions");
                    fetch_at = Instant::now() + wait;
                    retry_at = Some(fetch_at);
                }
            }
        }
        let (enabled, asn, peers) = match &fetched {
            Some((_, r)) => (r.enabled, r.asn, r.peers.clone()),
            None => (false, 0, Vec::new()),
        };
        let router_id = view.addr(true).and_then(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        });
        let mut wanted: BTreeMap<IpAddr, NodePeer> = BTreeMap::new();
        if enabled {
            for p in &peers {
                match parse_peer(p) {
                    Ok(p) => {
                        wanted.insert(p.address, p);
                    }
                    Err(e) => tracing::error!(peer = %p.address, error = %e, "BGP peer skipped"),
                }
            }
            if router_id.is_none() && !wanted.is_empty() {
                tracing::warn!(
                    "this node has no IPv4 address for a BGP router id: its BGP sessions wait"
                );
                wanted.clear();
            }
        }
        // Sessions whose peer went or changed stop.
        let gone: Vec<IpAddr> = sessions
            .iter()
            .filter(|(a, r)| {
                wanted.get(a) != Some(&r.peer) || r.asn != asn || Some(r.router_id) != router_id
            })
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            if let Some(r) = sessions.remove(&a) {
                tracing::info!(peer = %a, "BGP session stopping");
                let _ = r.cmds.send(Command::Stop);
            }
            lock_status(&status).bgp.remove(&a);
        }
        for (a, peer) in &wanted {
            let Some(rid) = router_id else { break };
            if sessions.contains_key(a) {
                continue;
            }
            serial += 1;
            let (cmds, cmd_rx) = mpsc::unbounded_channel();
            let (incoming, in_rx) = mpsc::unbounded_channel();
            let (s_tx, mut s_rx) = mpsc::unbounded_channel();
            let cfg = SessionConfig {
                peer: SocketAddr::new(*a, BGP_PORT),
                fsm: Config {
                    open: Open {
                        asn,
                        hold_time: peer.hold_time,
                        router_id: rid,
                        capabilities: Capabilities {
                            four_octet_as: Some(asn),
                            ipv4_unicast: true,
                            ipv6_unicast: true,
                            route_refresh: true,
                            // The node's routes stay in its kernel while
                            // tabby-node restarts (F bit), and it helps a
                            // restarting peer.
                            graceful_restart: Some(GracefulRestart {
                                restart_time: RESTART_TIME,
                                restarting: started.elapsed()
                                    < Duration::from_secs(u64::from(RESTART_TIME)),
                                families: vec![(Afi::Ipv4, true), (Afi::Ipv6, true)],
                            }),
                        },
                    },
                    peer_asn: peer.remote_asn,
                    passive: peer.passive,
                    connect_retry: Duration::from_secs(1),
                    connect_retry_max: Duration::from_secs(60),
                },
                password: peer.password.clone(),
            };
            tracing::info!(peer = %a, remote_asn = peer.remote_asn, passive = peer.passive, "BGP session starting (held by this node)");
            tokio::spawn(session::run(cfg, cmd_rx, in_rx, s_tx));
            let (tx, a2, sn) = (rep_tx.clone(), *a, serial);
            tokio::spawn(async move {
                while let Some(r) = s_rx.recv().await {
                    if tx.send((a2, sn, r)).is_err() {
                        return;
                    }
                }
            });
            lock_status(&status).bgp.insert(
                *a,
                SessionState {
                    remote_asn: peer.remote_asn,
                    ..Default::default()
                },
            );
            sessions.insert(
                *a,
                Running {
                    peer: peer.clone(),
                    asn,
                    router_id: rid,
                    serial,
                    cmds,
                    incoming,
                    sent: BTreeMap::new(),
                    rib: RibIn::default(),
                    peer_restart: None,
                    was_up: false,
                },
            );
        }
        // Passive peers connect to this node's address of their family.
        let want_listen = sessions
            .values()
            .find(|r| r.peer.passive)
            .and_then(|r| view.addr(r.peer.address.is_ipv4()))
            .map(|a| SocketAddr::new(a, BGP_PORT));
        if listener.as_ref().map(session::Acceptor::addr) != want_listen {
            listener = None;
            if let Some(addr) = want_listen {
                match session::Acceptor::bind(addr).await {
                    Ok(l) => listener = Some(l),
                    Err(e) => tracing::error!(%addr, error = %e, "BGP cannot listen"),
                }
            }
        }
        if let Some(l) = &listener {
            l.set_peers(
                sessions
                    .iter()
                    .filter(|(_, r)| r.peer.passive)
                    .map(|(a, r)| (*a, r.incoming.clone(), r.peer.password.clone())),
            );
        }
        // Advertise the node's own destinations.
        for (a, r) in sessions.iter_mut() {
            let want = exports(&view, &r.peer, r.asn);
            session::advertise(&r.cmds, &r.sent, &want);
            if let Some(s) = lock_status(&status).bgp.get_mut(a) {
                s.sent = want.len();
            }
            r.sent = want;
        }
        // Imports: stale routes past their time go first.
        let now = Instant::now();
        for r in sessions.values_mut() {
            r.rib.expire(now);
        }
        let want_imports = imports(
            sessions
                .values()
                .map(|r| (&r.rib, r.peer.import_prefixes.as_slice())),
            &view,
        );
        if want_imports != imported {
            tracing::info!(routes = want_imports.len(), "BGP imports changed");
            imported.clone_from(&want_imports);
            if to_rec.send(Event::Imported(want_imports)).is_err() {
                return;
            }
        }
        {
            let mut st = lock_status(&status);
            for (a, r) in &sessions {
                if let Some(s) = st.bgp.get_mut(a) {
                    s.received = r.rib.routes.len();
                    s.accepted = r
                        .rib
                        .routes
                        .keys()
                        .filter(|p| accepts(&r.peer.import_prefixes, &view, p))
                        .count();
                }
            }
        }
        // Wait for a new view, a session's report, or a timer.
        // Before the first intent there is nothing to fetch.
        let mut wake = if view.generation == 0 {
            Instant::now() + REFETCH
        } else {
            fetch_at
        };
        if let Some(t) = sessions.values().filter_map(|r| r.rib.stale_until).min() {
            wake = wake.min(t);
        }
        tokio::select! {
            r = view_rx.changed() => if r.is_err() { return },
            Some((a, sn, rep)) = rep_rx.recv() => {
                let mut batch = vec![(a, sn, rep)];
                while let Ok(x) = rep_rx.try_recv() {
                    batch.push(x);
                }
                for (a, sn, rep) in batch {
                    take_report(&mut sessions, &status, a, sn, rep);
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// A session's report: its state and Adj-RIB-In.
fn take_report(
    sessions: &mut BTreeMap<IpAddr, Running>,
    status: &SharedStatus,
    a: IpAddr,
    sn: u64,
    rep: Report,
) {
    let Some(r) = sessions.get_mut(&a).filter(|r| r.serial == sn) else {
        return;
    };
    let mut st = lock_status(status);
    let s = st.bgp.entry(a).or_default();
    match rep {
        Report::State(state) => {
            s.state = Some(state);
            if state == State::Established {
                s.since = Some(Instant::now());
                r.was_up = true;
                tracing::info!(peer = %a, "BGP session established");
            } else {
                s.since = None;
                if r.was_up {
                    r.was_up = false;
                    r.rib.down(r.peer_restart, Instant::now());
                }
            }
        }
        Report::Down(why) => {
            tracing::warn!(peer = %a, reason = %why, "BGP session down");
            s.last_error = why;
        }
        Report::Opened(open) => {
            r.peer_restart = open
                .capabilities
                .graceful_restart
                .as_ref()
                .map(|g| Duration::from_secs(u64::from(g.restart_time)));
        }
        Report::Received(u) => r.rib.update(&u),
        Report::Sent(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> BgpView {
        BgpView {
            generation: 1,
            own: [
                "10.244.1.0/26".parse().unwrap(),
                "10.244.9.7/32".parse().unwrap(),
                "fd00:10:244:1::/122".parse().unwrap(),
                "10.99.0.0/26".parse().unwrap(),
            ]
            .into(),
            pools: [
                ("default".to_string(), "10.244.0.0/16".parse().unwrap()),
                ("v6".to_string(), "fd00:10:244::/48".parse().unwrap()),
                ("other".to_string(), "10.99.0.0/16".parse().unwrap()),
            ]
            .into(),
            addrs: vec![
                "172.18.0.3/16".parse().unwrap(),
                "fc00:f853:ccd:e793::3/64".parse().unwrap(),
            ],
        }
    }

    fn peer(asn: u32) -> NodePeer {
        NodePeer {
            address: "172.18.0.200".parse().unwrap(),
            remote_asn: asn,
            passive: false,
            hold_time: 9,
            password: None,
            export_pools: vec![],
            export_prefixes: vec![],
            communities: vec![],
            import_prefixes: vec![
                "192.0.2.0/24".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn exports_are_the_nodes_own_with_itself_as_next_hop_through_the_filter() {
        let v = view();
        let e = exports(&v, &peer(65001), 64512);
        assert_eq!(e.len(), 4);
        let r = &e[&net("10.244.1.0/26")];
        assert_eq!(r.next_hop, "172.18.0.3".parse::<IpAddr>().unwrap());
        assert_eq!((r.as_path.clone(), r.local_pref), (vec![64512], None));
        let r6 = &e[&net("fd00:10:244:1::/122")];
        assert_eq!(
            r6.next_hop,
            "fc00:f853:ccd:e793::3".parse::<IpAddr>().unwrap()
        );
        // iBGP: no AS prepended, local-pref 100.
        let i = exports(&v, &peer(64512), 64512);
        assert_eq!(
            (
                i[&net("10.244.1.0/26")].as_path.len(),
                i[&net("10.244.1.0/26")].local_pref
            ),
            (0, Some(100))
        );
        // Export filters.
        let p = NodePeer {
            export_pools: vec!["other".into()],
            ..peer(65001)
        };
        assert_eq!(
            exports(&v, &p, 64512).keys().copied().collect::<Vec<_>>(),
            vec![net("10.99.0.0/26")]
        );
        let p = NodePeer {
            export_prefixes: vec![net("10.244.9.0/24")],
            ..peer(65001)
        };
        assert_eq!(
            exports(&v, &p, 64512).keys().copied().collect::<Vec<_>>(),
            vec![net("10.244.9.7/32")]
        );
        // No IPv6 address: no IPv6 route.
        let v4only = BgpView {
            addrs: vec![net("172.18.0.3/16")],
            ..v
        };
        assert!(!exports(&v4only, &peer(65001), 64512).contains_key(&net("fd00:10:244:1::/122")));
    }

    fn announce(p: &str, nh: &str) -> Route {
        Route {
            prefix: net(p),
            next_hop: nh.parse().unwrap(),
            origin: Origin::Igp,
            as_path: vec![65001],
            communities: vec![],
            local_pref: None,
        }
    }

    #[test]
    fn imports_take_the_filter_and_never_a_route_inside_a_pool() {
        let v = view();
        let mut rib = RibIn::default();
        rib.update(&Update {
            announce: vec![
                announce("192.0.2.0/24", "172.18.0.200"),
                announce("10.244.5.0/24", "172.18.0.200"),
                announce("198.51.100.0/24", "172.18.0.200"),
                announce("10.0.0.0/8", "172.18.0.200"),
                // A next hop of the other family is not kept.
                announce("10.1.0.0/16", "fc00::1"),
            ],
            ..Default::default()
        });
        let p = peer(65001);
        let got = imports([(&rib, p.import_prefixes.as_slice())], &v);
        let want: BTreeMap<IpNet, IpAddr> = [
            (net("192.0.2.0/24"), "172.18.0.200".parse().unwrap()),
            // Covers pools but is not inside one: a default-like route.
            (net("10.0.0.0/8"), "172.18.0.200".parse().unwrap()),
        ]
        .into();
        assert_eq!(got, want);
        // Nothing without an import filter.
        assert!(imports([(&rib, &[][..])], &v).is_empty());
    }

    #[test]
    fn a_gracefully_restarting_peer_keeps_its_routes_until_its_end_of_rib_or_time() {
        let t0 = Instant::now();
        let mut rib = RibIn::default();
        rib.update(&Update {
            announce: vec![
                announce("192.0.2.0/24", "172.18.0.200"),
                announce("198.51.100.0/24", "172.18.0.200"),
            ],
            ..Default::default()
        });
        rib.down(Some(Duration::from_secs(120)), t0);
        assert_eq!(rib.routes.len(), 2, "kept while the peer restarts");
        rib.expire(t0 + Duration::from_secs(60));
        assert_eq!(rib.routes.len(), 2);
        // Back: one route again, then End-of-RIB: the other goes.
        rib.update(&Update {
            announce: vec![announce("192.0.2.0/24", "172.18.0.201")],
            ..Default::default()
        });
        rib.update(&Update {
            end_of_rib: Some(Afi::Ipv4),
            ..Default::default()
        });
        assert_eq!(
            rib.routes,
            [(net("192.0.2.0/24"), "172.18.0.201".parse().unwrap())].into()
        );
        assert!(rib.stale.is_empty() && rib.stale_until.is_none());
        // A peer that does not come back in time loses them.
        rib.down(Some(Duration::from_secs(120)), t0);
        rib.expire(t0 + Duration::from_secs(121));
        assert!(rib.routes.is_empty());
        // Without graceful restart they go at once.
        rib.update(&Update {
            announce: vec![announce("192.0.2.0/24", "172.18.0.200")],
            ..Default::default()
        });
        rib.down(None, t0);
        assert!(rib.routes.is_empty());
    }
}
