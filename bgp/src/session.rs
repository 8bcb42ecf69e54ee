//! One BGP session over TCP: drives the [`crate::fsm`] with the socket and
//! its timers, keeps the routes to advertise (Adj-RIB-Out) and sends them
//! whole when the session comes up, then as changes, each family closed by
//! End-of-RIB.
use crate::{
    codec::{self, Afi, Message, Route, Update},
    fsm::{Action, Config, Event, Fsm, State, Timer},
};
use ipnet::IpNet;
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    time::Instant,
};

/// What the owner of a session tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Advertise (or change) these routes.
    Announce(Vec<Route>),
    /// Stop advertising these prefixes.
    Withdraw(Vec<IpNet>),
    /// Ask the peer to send its routes again (ROUTE-REFRESH, RFC 2918), for
    /// each family of the session, when it offered route refresh.
    Refresh,
    /// Close the session (Cease) and end.
    Stop,
}

/// What a session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The FSM entered a state.
    State(State),
    /// The session went down, and why.
    Down(String),
    /// The peer sent routes (or withdrew them).
    Received(Update),
    /// The routes sent so far (after each change): prefixes advertised.
    Sent(usize),
    /// The session came up with the peer's OPEN (its capabilities: graceful
    /// restart, route refresh, families).
    Opened(Box<codec::Open>),
}

/// How a session connects.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The peer's address and port.
    pub peer: SocketAddr,
    /// The FSM's configuration (our OPEN, the peer's AS, passive or not,
    /// retry backoff).
    pub fsm: Config,
    /// TCP-MD5 password (RFC 2385), if the peer has one. A listener that
    /// hands this session connections must carry the key too
    /// ([`crate::md5::set_key`]).
    pub password: Option<String>,
}

/// Opens the TCP connection to the peer, signed with the password if there
/// is one. The error says what went wrong in an operator's words.
async fn connect(cfg: &SessionConfig) -> Result<TcpStream, String> {
    let sock = if cfg.peer.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| format!("cannot make a socket: {e}"))?;
    if let Some(pw) = cfg.password.as_deref().filter(|p| !p.is_empty()) {
        crate::md5::set_key(&sock, cfg.peer.ip(), pw.as_bytes())
            .map_err(|e| format!("cannot set the TCP-MD5 password: {e}"))?;
    }
    let hint = if cfg.password.as_deref().is_some_and(|p| !p.is_empty()) {
        " (a TCP-MD5 password the peer does not share also looks like this)"
    } else {
        ""
    };
    match tokio::time::timeout(Duration::from_secs(5), sock.connect(cfg.peer)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("TCP connection to {} failed: {e}{hint}", cfg.peer)),
        Err(_) => Err(format!(
            "TCP connection to {} timed out after 5 s{hint}",
            cfg.peer
        )),
    }
}

/// The families a side offers: those of its multiprotocol capabilities, or
/// IPv4 unicast alone when it sent none (RFC 4760).
fn offered(c: &codec::Capabilities) -> (bool, bool) {
    if !c.ipv4_unicast && !c.ipv6_unicast {
        (true, false)
    } else {
        (c.ipv4_unicast, c.ipv6_unicast)
    }
}

/// Whether `p` is of a family the session negotiated (v4, v6).
fn carried(fam: (bool, bool), p: &IpNet) -> bool {
    if p.addr().is_ipv4() {
        fam.0
    } else {
        fam.1
    }
}

/// One BGP message's worth of routes sharing their attributes.
fn grouped(routes: &BTreeMap<IpNet, Route>) -> Vec<Update> {
    let mut groups: Vec<(Route, Vec<Route>)> = Vec::new();
    for r in routes.values() {
        let key = Route {
            prefix: r.prefix,
            ..r.clone()
        };
        match groups.iter_mut().find(|(k, v)| {
            k.next_hop == key.next_hop
                && k.as_path == key.as_path
                && k.communities == key.communities
                && k.local_pref == key.local_pref
                && k.origin == key.origin
                && v.len() < 500
                && k.prefix.addr().is_ipv4() == key.prefix.addr().is_ipv4()
        }) {
            Some((_, v)) => v.push(r.clone()),
            None => groups.push((key, vec![r.clone()])),
        }
    }
    groups
        .into_iter()
        .map(|(_, announce)| Update {
            announce,
            ..Default::default()
        })
        .collect()
}

/// Tells a session to go from advertising `sent` to advertising `want`:
/// withdrawals for what is gone, announcements for what is new or changed.
/// The controller's and the nodes' sessions both keep their sent table so.
pub fn advertise(
    cmds: &mpsc::UnboundedSender<Command>,
    sent: &BTreeMap<IpNet, Route>,
    want: &BTreeMap<IpNet, Route>,
) {
    let withdraw: Vec<IpNet> = sent
        .keys()
        .filter(|p| !want.contains_key(p))
        .copied()
        .collect();
    let announce: Vec<Route> = want
        .values()
        .filter(|x| sent.get(&x.prefix) != Some(x))
        .cloned()
        .collect();
    if !withdraw.is_empty() {
        let _ = cmds.send(Command::Withdraw(withdraw));
    }
    if !announce.is_empty() {
        let _ = cmds.send(Command::Announce(announce));
    }
}

/// Runs a session until [`Command::Stop`] or until `cmds` closes. Incoming
/// connections for this peer arrive on `incoming` (from the owner's
/// listener).
pub async fn run(
    cfg: SessionConfig,
    mut cmds: mpsc::UnboundedReceiver<Command>,
    mut incoming: mpsc::UnboundedReceiver<TcpStream>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let mut fsm = Fsm::new(cfg.fsm.clone());
    let mut rib: BTreeMap<IpNet, Route> = BTreeMap::new();
    let mut timers: HashMap<Timer, Instant> = HashMap::new();
    let mut sock: Option<TcpStream> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(65536);
    let mut state = fsm.state();
    // The families both sides offered, once the session is up.
    let mut fam = (false, false);
    // Whether the peer takes ROUTE-REFRESH requests.
    let mut refresh_ok = false;
    let mut pending = fsm.handle(Event::Start);
    loop {
        // Carry out what the FSM asked, which may give more events.
        while !pending.is_empty() {
            let mut next = Vec::new();
            for a in std::mem::take(&mut pending) {
                match a {
                    Action::Connect => match connect(&cfg).await {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            sock = Some(s);
                            buf.clear();
                            next.push(Event::Connected);
                        }
                        Err(why) => {
                            let _ = reports.send(Report::Down(why));
                            next.push(Event::ConnectionLost);
                        }
                    },
                    Action::Disconnect => {
                        if let Some(mut s) = sock.take() {
                            let _ = s.shutdown().await;
                        }
                    }
                    Action::Send(m) => {
                        if let Err(e) = send(&mut sock, &m).await {
                            next.push(e);
                        }
                    }
                    Action::StartTimer(t, d) => {
                        timers.insert(t, Instant::now() + d);
                    }
                    Action::StopTimer(t) => {
                        timers.remove(&t);
                    }
                    Action::Up { .. } | Action::Refresh => {
                        if let Action::Up { peer, .. } = &a {
                            let (o, p) = (
                                offered(&cfg.fsm.open.capabilities),
                                offered(&peer.capabilities),
                            );
                            fam = (o.0 && p.0, o.1 && p.1);
                            refresh_ok = peer.capabilities.route_refresh;
                            let _ = reports.send(Report::Opened(peer.clone()));
                        }
                        // The whole table, then End-of-RIB per family.
                        let table: BTreeMap<IpNet, Route> = rib
                            .iter()
                            .filter(|(p, _)| carried(fam, p))
                            .map(|(p, r)| (*p, r.clone()))
                            .collect();
                        let mut msgs: Vec<Message> =
                            grouped(&table).into_iter().map(Message::Update).collect();
                        let afis = [(Afi::Ipv4, fam.0), (Afi::Ipv6, fam.1)];
                        for afi in afis.into_iter().filter(|(_, on)| *on).map(|(a, _)| a) {
                            msgs.push(Message::Update(Update {
                                end_of_rib: Some(afi),
                                ..Default::default()
                            }));
                        }
                        for m in msgs {
                            if let Err(e) = send(&mut sock, &m).await {
                                next.push(e);
                                break;
                            }
                        }
                        let _ = reports.send(Report::Sent(rib.len()));
                    }
                    Action::Down(why) => {
                        let _ = reports.send(Report::Down(why));
                    }
                    Action::Update(u) => {
                        let _ = reports.send(Report::Received(u));
                    }
                }
            }
            for ev in next {
                pending.extend(fsm.handle(ev));
            }
            if fsm.state() != state {
                state = fsm.state();
                let _ = reports.send(Report::State(state));
            }
        }
        let deadline = timers.values().min().copied();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let read = async {
            match sock.as_mut() {
                Some(s) => {
                    let mut chunk = [0u8; 16384];
                    s.read(&mut chunk).await.map(|n| chunk[..n].to_vec())
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            c = cmds.recv() => match c {
                None | Some(Command::Stop) => {
                    for a in fsm.handle(Event::Stop) {
                        if let Action::Send(m) = a {
                            let _ = send(&mut sock, &m).await;
                        }
                    }
                    if let Some(mut s) = sock.take() {
                        let _ = s.shutdown().await;
                    }
                    let _ = reports.send(Report::State(State::Idle));
                    return;
                }
                Some(Command::Refresh) => {
                    if fsm.state() == State::Established && refresh_ok {
                        let afis = [(Afi::Ipv4, fam.0), (Afi::Ipv6, fam.1)];
                        for afi in afis.into_iter().filter(|(_, on)| *on).map(|(a, _)| a) {
                            let m = Message::RouteRefresh(codec::RouteRefresh { afi });
                            if let Err(e) = send(&mut sock, &m).await {
                                pending.extend(fsm.handle(e));
                                break;
                            }
                        }
                    }
                }
                Some(Command::Announce(routes)) => {
                    let changed: Vec<Route> = routes
                        .into_iter()
                        .filter(|r| rib.get(&r.prefix) != Some(r))
                        .collect();
                    for r in &changed {
                        rib.insert(r.prefix, r.clone());
                    }
                    if fsm.state() == State::Established && !changed.is_empty() {
                        let part: BTreeMap<IpNet, Route> = changed
                            .into_iter()
                            .filter(|r| carried(fam, &r.prefix))
                            .map(|r| (r.prefix, r))
                            .collect();
                        for u in grouped(&part) {
                            if let Err(e) = send(&mut sock, &Message::Update(u)).await {
                                pending.extend(fsm.handle(e));
                                break;
                            }
                        }
                        let _ = reports.send(Report::Sent(rib.len()));
                    }
                }
                Some(Command::Withdraw(prefixes)) => {
                    let gone: Vec<IpNet> =
                        prefixes.into_iter().filter(|p| rib.remove(p).is_some()).collect();
                    let gone: Vec<IpNet> = gone.into_iter().filter(|p| carried(fam, p)).collect();
                    if fsm.state() == State::Established && !gone.is_empty() {
                        let u = Update {
                            withdraw: gone,
                            ..Default::default()
                        };
                        if let Err(e) = send(&mut sock, &Message::Update(u)).await {
                            pending.extend(fsm.handle(e));
                        }
                        let _ = reports.send(Report::Sent(rib.len()));
                    }
                }
            },
            // A closed channel (no listener) disables this branch.
            Some(s) = incoming.recv() => {
                if sock.is_none() {
                    let _ = s.set_nodelay(true);
                    sock = Some(s);
                    buf.clear();
                    pending.extend(fsm.handle(Event::Accepted));
                }
                // Else: one connection at a time; the new one is dropped.
            }
            r = read => match r {
                Ok(bytes) if !bytes.is_empty() => {
                    buf.extend_from_slice(&bytes);
                    loop {
                        match codec::decode(&buf) {
                            Ok(Some((m, used))) => {
                                buf.drain(..used);
                                pending.extend(fsm.handle(Event::Received(m)));
                            }
                            Ok(None) => break,
                            Err(e) => {
                                buf.clear();
                                pending.extend(fsm.handle(Event::Malformed(e.notification())));
                                break;
                            }
                        }
                    }
                }
                _ => {
                    sock = None;
                    pending.extend(fsm.handle(Event::ConnectionLost));
                }
            },
            () = sleep => {
                let now = Instant::now();
                let due: Vec<Timer> = timers
                    .iter()
                    .filter(|(_, d)| **d <= now)
                    .map(|(t, _)| *t)
                    .collect();
                for t in due {
                    timers.remove(&t);
                    pending.extend(fsm.handle(Event::Expired(t)));
                }
            }
        }
    }
}

/// Writes one message (an UPDATE as as many messages as it takes); a write
/// failure is the connection's loss. A message that cannot be encoded is
/// our own bug: it is skipped (and said), the session stays.
async fn send(sock: &mut Option<TcpStream>, m: &Message) -> Result<(), Event> {
    let Some(s) = sock.as_mut() else {
        return Err(Event::ConnectionLost);
    };
    let frames = match m {
        Message::Update(u) => codec::encode_split(u),
        m => codec::encode(m).map(|b| vec![b]),
    };
    let frames = match frames {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "a BGP message could not be encoded; not sent");
            return Ok(());
        }
    };
    for b in frames {
        s.write_all(&b).await.map_err(|_| Event::ConnectionLost)?;
    }
    Ok(())
}

/// Incoming connections for this listener's peers, by peer address.
type PeerMap = std::sync::Arc<std::sync::Mutex<HashMap<std::net::IpAddr, PeerEntry>>>;

struct PeerEntry {
    to: mpsc::UnboundedSender<TcpStream>,
    password: Option<String>,
}

/// A BGP listening socket that hands each connection to its peer's session
/// (passive peers) and refuses others. Peers and their TCP-MD5 keys can
/// change while it listens.
pub struct Acceptor {
    addr: SocketAddr,
    /// A second handle on the listening socket, to set keys on.
    keys: std::net::TcpListener,
    peers: PeerMap,
    task: tokio::task::JoinHandle<()>,
}

impl Acceptor {
    /// Listens on `addr`.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Acceptor> {
        let l = tokio::net::TcpListener::bind(addr).await?.into_std()?;
        let keys = l.try_clone()?;
        let l = tokio::net::TcpListener::from_std(l)?;
        let peers: PeerMap = Default::default();
        let p = peers.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, from)) = l.accept().await else {
                    continue;
                };
                let to = p
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&from.ip())
                    .map(|e| e.to.clone());
                match to {
                    Some(tx) => {
                        let _ = tx.send(s);
                    }
                    None => tracing::warn!(%from, "BGP connection from an unknown peer refused"),
                }
            }
        });
        Ok(Acceptor {
            addr,
            keys,
            peers,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The peers whose connections it takes: each with its session's
    /// channel and its password. Keys of peers gone or changed are removed.
    pub fn set_peers(
        &self,
        peers: impl IntoIterator<
            Item = (
                std::net::IpAddr,
                mpsc::UnboundedSender<TcpStream>,
                Option<String>,
            ),
        >,
    ) {
        let new: HashMap<std::net::IpAddr, PeerEntry> = peers
            .into_iter()
            .map(|(a, to, password)| (a, PeerEntry { to, password }))
            .collect();
        let mut map = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (a, old) in map.iter() {
            let keep = new.get(a).map(|e| &e.password);
            if old.password.is_some() && keep != Some(&old.password) {
                let _ = crate::md5::set_key(&self.keys, *a, b"");
            }
        }
        for (a, e) in &new {
            if let Some(pw) = e.password.as_deref().filter(|p| !p.is_empty()) {
                if let Err(err) = crate::md5::set_key(&self.keys, *a, pw.as_bytes()) {
                    tracing::error!(peer = %a, error = %err, "cannot set the TCP-MD5 password on the BGP listener");
                }
            }
        }
        *map = new;
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.task.abort();
    }
}
