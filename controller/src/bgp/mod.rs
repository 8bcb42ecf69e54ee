//! The controller as the cluster's BGP speaker (issue 15): one session per
//! configured peer, advertising what the route model says every node holds
//! (each block and borrowed address with its node's address as next hop),
//! filtered per peer. It follows the published IPAM state: a change to the
//! blocks, the nodes or the BGP configuration becomes announcements and
//! withdrawals on every session.
pub mod config;
pub mod service;

use crate::owner::Ipam;
use ipnet::IpNet;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};
use tabby_bgp::{
    codec::{Afi, Capabilities, GracefulRestart, Open, Origin, Route},
    fsm::{Config, State},
    session::{self, Command, Report, SessionConfig},
};
use tabby_store::{BgpConfig, BgpPeer};
use tokio::sync::mpsc;

/// Seconds peers keep our routes after our session drops (RFC 4724), long
/// enough for a controller restart.
const RESTART_TIME: u16 = 120;

/// The least time between two passes over the cluster table.
const MIN_RECOMPUTE: Duration = Duration::from_millis(20);

/// How soon a failed export pass is tried again.
const RETRY_PASS: Duration = Duration::from_secs(1);

/// When this process started: sessions opened within the restart time say
/// "restarting" (the R bit), so a helping peer waits for our End-of-RIB.
static STARTED: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn restarted_recently() -> bool {
    STARTED.elapsed() < Duration::from_secs(u64::from(RESTART_TIME))
}

/// One session as `GetStatus` shows it.
#[derive(Debug, Clone, Default)]
pub struct SessionStatus {
    /// FSM state.
    pub state: Option<State>,
    /// When it came up.
    pub since: Option<Instant>,
    /// Why it last went down.
    pub last_error: String,
    /// Prefixes the peer advertised to us (current).
    pub received: BTreeSet<IpNet>,
    /// Of those, the ones the import filter accepts.
    pub accepted: usize,
    /// What we advertise to the peer.
    pub advertised: BTreeMap<IpNet, Route>,
    /// Whether the peer takes ROUTE-REFRESH requests (from its OPEN).
    pub refresh_ok: bool,
    /// The session's commands (RefreshPeer sends on it).
    pub cmds: Option<mpsc::UnboundedSender<Command>>,
}

/// Status of every session, by peer address.
pub type SharedStatus = Arc<Mutex<BTreeMap<IpAddr, SessionStatus>>>;

fn lock(s: &SharedStatus) -> std::sync::MutexGuard<'_, BTreeMap<IpAddr, SessionStatus>> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the speaker was started with.
#[derive(Debug, Clone, Copy)]
pub struct Speaker {
    /// The controller's gRPC listen address (the default BGP listen
    /// address, and the router id's fallback).
    pub listen: SocketAddr,
}

impl Speaker {
    /// The router id when none is configured: the listen address, if it is
    /// a usable IPv4 address.
    pub fn fallback_router_id(&self) -> Option<Ipv4Addr> {
        match self.listen.ip() {
            IpAddr::V4(a) if !a.is_unspecified() => Some(a),
            _ => None,
        }
    }
}

/// One session's share of a full pass: its peer, commands and what it was
/// sent.
type FullPass = (
    IpAddr,
    BgpPeer,
    mpsc::UnboundedSender<Command>,
    BTreeMap<IpNet, Route>,
);

/// A session's peer and routes: what a full pass advertised, or what it was
/// sent before a pass that failed.
type PeerRoutes = (IpAddr, BTreeMap<IpNet, Route>);

/// A full pass over `work`: `compute` gives each session's exports (in
/// order), and only once all are known does any session get commands. When
/// `compute` panics nothing is sent and each session's record of what it
/// was sent comes back unchanged (Err), so that the next pass still
/// withdraws what the peer holds; taking them and losing them would leave
/// the peer's routes stale.
fn full_pass(
    work: Vec<FullPass>,
    status: &SharedStatus,
    compute: impl FnOnce(&[FullPass]) -> Vec<BTreeMap<IpNet, Route>>,
) -> Result<Vec<PeerRoutes>, Vec<PeerRoutes>> {
    let wants = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compute(&work)));
    match wants {
        Ok(wants) if wants.len() == work.len() => Ok(work
            .into_iter()
            .zip(wants)
            .map(|((a, _, cmds, sent), want)| {
                session::advertise(&cmds, &sent, &want);
                if let Some(s) = lock(status).get_mut(&a) {
                    s.advertised.clone_from(&want);
                }
                (a, want)
            })
            .collect()),
        _ => Err(work.into_iter().map(|(a, _, _, sent)| (a, sent)).collect()),
    }
}

struct Running {
    peer: BgpPeer,
    asn: u32,
    router_id: Ipv4Addr,
    cmds: mpsc::UnboundedSender<Command>,
    incoming: mpsc::UnboundedSender<tokio::net::TcpStream>,
    sent: BTreeMap<IpNet, Route>,
}

/// What `peer` should be advertised: every route of the cluster table with
/// a next hop, through the peer's export filter.
fn exports(
    table: &[tabby_routing::ClusterRoute],
    intent: &tabby_routing::Intent,
    peer: &BgpPeer,
    asn: u32,
) -> BTreeMap<IpNet, Route> {
    table
        .iter()
        .filter_map(|r| {
            let nh = r.next_hop?;
            let pool_ok = peer.export_pools.is_empty()
                || intent
                    .pool_of(&r.destination)
                    .is_some_and(|(n, _)| peer.export_pools.contains(n));
            let prefix_ok = peer.export_prefixes.is_empty()
                || peer
                    .export_prefixes
                    .iter()
                    .any(|p| p.contains(&r.destination));
            (pool_ok && prefix_ok).then(|| {
                let ibgp = peer.remote_asn == asn;
                (
                    r.destination,
                    Route {
                        prefix: r.destination,
                        next_hop: nh,
                        origin: Origin::Igp,
                        as_path: if ibgp { vec![] } else { vec![asn] },
                        communities: peer.communities.clone(),
                        local_pref: ibgp.then_some(100),
                    },
                )
            })
        })
        .collect()
}

/// Runs the speaker until `stop` turns true (the server's shutdown): then
/// every session closes with a Cease and the speaker lets go of the owner.
pub async fn run(
    ipam: Ipam,
    sp: Speaker,
    status: SharedStatus,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    std::sync::LazyLock::force(&STARTED);
    let mut changes = ipam.changes();
    let mut sessions: BTreeMap<IpAddr, Running> = BTreeMap::new();
    let mut listener: Option<session::Acceptor> = None;
    let mut last_pass = Instant::now();
    // The state the last pass advertised, and whether the set of sessions
    // changed since (a new session needs the whole table).
    let mut prev: Option<Arc<crate::ipam::IpamState>> = None;
    let mut sessions_changed = true;
    let mut retry = false;
    loop {
        let Ok((snap, rev)) = ipam.snapshot().await else {
            return;
        };
        let cfg: BgpConfig = snap.bgp().clone();
        let asn = config::asn(&cfg);
        let router_id = config::router_id(&cfg, sp.fallback_router_id());
        // Peers with a node selector are the selected nodes' to hold.
        let wanted: BTreeMap<IpAddr, BgpPeer> = if cfg.enabled && router_id.is_some() {
            cfg.peers
                .iter()
                .filter(|p| p.node_selector.is_empty())
                .map(|p| (p.address, p.clone()))
                .collect()
        } else {
            BTreeMap::new()
        };
        if cfg.enabled && router_id.is_none() {
            tracing::warn!("BGP is enabled but has no router id: set router_id (the listen address is not an IPv4 address)");
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
            sessions_changed = true;
            if let Some(r) = sessions.remove(&a) {
                let _ = r.cmds.send(Command::Stop);
            }
            lock(&status).remove(&a);
        }
        // New ones start.
        for (a, peer) in &wanted {
            if sessions.contains_key(a) {
                continue;
            }
            let Some(rid) = router_id else { continue };
            let (cmds, cmd_rx) = mpsc::unbounded_channel();
            let (incoming, in_rx) = mpsc::unbounded_channel();
            let (rep_tx, rep_rx) = mpsc::unbounded_channel();
            let cfg = SessionConfig {
                peer: SocketAddr::new(*a, config::BGP_PORT),
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
                            // Peers keep our routes while the controller
                            // restarts (the nodes keep forwarding on theirs),
                            // until our End-of-RIB after the restart.
                            graceful_restart: Some(GracefulRestart {
                                restart_time: RESTART_TIME,
                                restarting: restarted_recently(),
                                families: vec![(Afi::Ipv4, true), (Afi::Ipv6, true)],
                            }),
                        },
                    },
                    peer_asn: peer.remote_asn,
                    passive: peer.passive,
                    connect_retry: Duration::from_secs(1),
                    connect_retry_max: Duration::from_secs(60),
                },
                password: (!peer.password.is_empty()).then(|| peer.password.clone()),
            };
            tracing::info!(peer = %a, remote_asn = peer.remote_asn, passive = peer.passive, "BGP session starting");
            lock(&status).insert(
                *a,
                SessionStatus {
                    cmds: Some(cmds.clone()),
                    ..Default::default()
                },
            );
            sessions_changed = true;
            tokio::spawn(session::run(cfg, cmd_rx, in_rx, rep_tx));
            tokio::spawn(follow(*a, peer.clone(), rep_rx, status.clone()));
            sessions.insert(
                *a,
                Running {
                    peer: peer.clone(),
                    asn,
                    router_id: rid,
                    cmds,
                    incoming,
                    sent: BTreeMap::new(),
                },
            );
        }
        // Passive peers need a listener.
        let want_listen = sessions.values().any(|r| r.peer.passive).then(|| {
            cfg.listen
                .unwrap_or(SocketAddr::new(sp.listen.ip(), config::BGP_PORT))
        });
        if listener.as_ref().map(session::Acceptor::addr) != want_listen {
            listener = None;
            if let Some(addr) = want_listen {
                match session::Acceptor::bind(addr).await {
                    Ok(l) => {
                        tracing::info!(%addr, "BGP listening");
                        listener = Some(l);
                    }
                    Err(e) => tracing::error!(%addr, error = %e, "BGP cannot listen"),
                }
            }
        }
        // The listener takes the passive peers' connections, with their keys.
        if let Some(l) = &listener {
            l.set_peers(
                sessions
                    .iter()
                    .filter(|(_, r)| r.peer.passive)
                    .map(|(a, r)| {
                        (
                            *a,
                            r.incoming.clone(),
                            (!r.peer.password.is_empty()).then(|| r.peer.password.clone()),
                        )
                    }),
            );
        }
        // What each session advertises follows the cluster table: only the
        // entries that changed since the last pass, when that is all that
        // changed and no session started; else the whole table, off the
        // async workers (10,000 blocks take milliseconds; gRPC answers must
        // not wait behind them).
        let part = match (&prev, sessions_changed) {
            (Some(p), false) => snap.route_changes(p),
            _ => None,
        };
        sessions_changed = false;
        if sessions.is_empty() {
            // Nothing to advertise to.
        } else if let Some((blocks, addrs)) = part {
            if !blocks.is_empty() || !addrs.is_empty() {
                let intent = snap.routing_intent_part(rev, &blocks, &addrs);
                let table = tabby_routing::cluster_routes(&intent, None);
                let dsts: Vec<IpNet> = blocks
                    .iter()
                    .copied()
                    .chain(addrs.iter().map(|a| IpNet::from(*a)))
                    .collect();
                for (a, r) in sessions.iter_mut() {
                    let want = exports(&table, &intent, &r.peer, asn);
                    let had: BTreeMap<IpNet, Route> = dsts
                        .iter()
                        .filter_map(|d| r.sent.remove(d).map(|x| (*d, x)))
                        .collect();
                    session::advertise(&r.cmds, &had, &want);
                    if let Some(s) = lock(&status).get_mut(a) {
                        for d in &dsts {
                            s.advertised.remove(d);
                        }
                        s.advertised
                            .extend(want.iter().map(|(k, v)| (*k, v.clone())));
                    }
                    r.sent.extend(want);
                }
            }
        } else {
            let work: Vec<FullPass> = sessions
                .iter_mut()
                .map(|(a, r)| {
                    (
                        *a,
                        r.peer.clone(),
                        r.cmds.clone(),
                        std::mem::take(&mut r.sent),
                    )
                })
                .collect();
            let (snap2, status2) = (snap.clone(), status.clone());
            let done = tokio::task::spawn_blocking(move || {
                full_pass(work, &status2, |work| {
                    let intent = snap2.routing_intent(rev);
                    let table = tabby_routing::cluster_routes(&intent, None);
                    work.iter()
                        .map(|(_, peer, _, _)| exports(&table, &intent, peer, asn))
                        .collect()
                })
            })
            .await;
            match done {
                Ok(Ok(done)) => {
                    for (a, want) in done {
                        if let Some(r) = sessions.get_mut(&a) {
                            r.sent = want;
                        }
                    }
                }
                Ok(Err(kept)) => {
                    // Not expected (the pass does not panic on any state).
                    // Nothing was sent: try again from what each session
                    // still advertises.
                    tracing::error!("BGP export pass failed; trying again");
                    for (a, sent) in kept {
                        if let Some(r) = sessions.get_mut(&a) {
                            r.sent = sent;
                        }
                    }
                    sessions_changed = true;
                    retry = true;
                }
                Err(e) => {
                    // The task itself failed: what the sessions advertise is
                    // not known. Restart them, so that peers drop our routes
                    // and the next pass starts from nothing sent.
                    tracing::error!(error = %e, "BGP export pass failed; restarting the sessions");
                    for (a, r) in std::mem::take(&mut sessions) {
                        let _ = r.cmds.send(Command::Stop);
                        lock(&status).remove(&a);
                    }
                    sessions_changed = true;
                    retry = true;
                }
            }
        }
        prev = Some(snap);
        // The next published state. The first change after a quiet spell
        // goes out at once; within MIN_RECOMPUTE of the last pass, changes
        // wait for its end and are taken as one (a burst of claims costs
        // one pass per interval, not one each). A failed pass is tried
        // again after RETRY_PASS without waiting for a change.
        let again = std::mem::take(&mut retry);
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RETRY_PASS), if again => {}
            _ = stop.wait_for(|s| *s) => {
                for r in sessions.values() {
                    let _ = r.cmds.send(Command::Stop);
                }
                drop(listener.take());
                return;
            }
        }
        tokio::time::sleep_until((last_pass + MIN_RECOMPUTE).into()).await;
        changes.borrow_and_update();
        last_pass = Instant::now();
    }
}

/// Keeps a session's status from its reports.
async fn follow(
    a: IpAddr,
    peer: BgpPeer,
    mut rx: mpsc::UnboundedReceiver<Report>,
    status: SharedStatus,
) {
    while let Some(r) = rx.recv().await {
        let mut st = lock(&status);
        let Some(s) = st.get_mut(&a) else { return };
        match r {
            Report::State(state) => {
                if state == State::Established {
                    s.since = Some(Instant::now());
                    tracing::info!(peer = %a, "BGP session established");
                } else {
                    s.since = None;
                }
                if state != State::Established {
                    s.received.clear();
                    s.accepted = 0;
                }
                s.state = Some(state);
            }
            Report::Down(why) => {
                tracing::warn!(peer = %a, reason = %why, "BGP session down");
                s.last_error = why;
            }
            Report::Received(u) => {
                for p in u.withdraw {
                    s.received.remove(&p);
                }
                for r in u.announce {
                    s.received.insert(r.prefix);
                }
                s.accepted = s
                    .received
                    .iter()
                    .filter(|p| peer.import_prefixes.iter().any(|i| i.contains(*p)))
                    .count();
            }
            Report::Opened(open) => s.refresh_ok = open.capabilities.route_refresh,
            Report::Sent(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(p: &str) -> (IpNet, Route) {
        let prefix: IpNet = p.parse().unwrap();
        (
            prefix,
            Route {
                prefix,
                next_hop: "172.18.0.2".parse().unwrap(),
                origin: Origin::Igp,
                as_path: vec![],
                communities: vec![],
                local_pref: Some(100),
            },
        )
    }

    fn work(sent: &[&str]) -> (Vec<FullPass>, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let peer = BgpPeer {
            address: "172.18.0.9".parse().unwrap(),
            remote_asn: 64512,
            passive: false,
            hold_time: 9,
            keepalive: 3,
            password: String::new(),
            node_selector: String::new(),
            export_pools: vec![],
            export_prefixes: vec![],
            communities: vec![],
            import_prefixes: vec![],
        };
        let sent = sent.iter().map(|p| route(p)).collect();
        (vec![(peer.address, peer, tx, sent)], rx)
    }

    /// A pass whose computation panics sends nothing and gives back what
    /// each session was sent, so the next pass withdraws what the peer
    /// still holds (a lost record left withdrawn blocks at the peer).
    #[test]
    fn a_failed_full_pass_keeps_what_was_sent() {
        let status = SharedStatus::default();
        let (w, mut rx) = work(&["10.0.0.0/26", "10.0.0.64/26"]);
        let r = full_pass(w, &status, |_| {
            panic!("injected: the export computation fails")
        });
        let kept = r.expect_err("the pass failed");
        assert_eq!(kept.len(), 1);
        assert_eq!(
            kept[0]
                .1
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.0/26", "10.0.0.64/26"]
        );
        assert!(rx.try_recv().is_err(), "nothing sent");

        // The next pass, from the record kept, withdraws the block gone
        // meanwhile and announces the new one.
        let (mut w, mut rx) = work(&[]);
        w[0].3 = kept.into_iter().next().unwrap().1;
        let want: BTreeMap<IpNet, Route> = [route("10.0.0.0/26"), route("10.0.0.128/26")]
            .into_iter()
            .collect();
        let done = full_pass(w, &status, |_| vec![want.clone()]).expect("a pass");
        assert_eq!(done[0].1, want);
        match rx.try_recv() {
            Ok(Command::Withdraw(p)) => assert_eq!(p, ["10.0.0.64/26".parse::<IpNet>().unwrap()]),
            _ => panic!("a withdrawal first"),
        }
        match rx.try_recv() {
            Ok(Command::Announce(r)) => {
                assert_eq!(
                    r.iter().map(|r| r.prefix.to_string()).collect::<Vec<_>>(),
                    ["10.0.0.128/26"]
                );
            }
            _ => panic!("then the new block"),
        }
    }
}
