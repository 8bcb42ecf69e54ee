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
}

/// How a session connects.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The peer's address and port.
    pub peer: SocketAddr,
    /// The FSM's configuration (our OPEN, the peer's AS, passive or not,
    /// retry backoff).
    pub fsm: Config,
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
    let mut pending = fsm.handle(Event::Start);
    loop {
        // Carry out what the FSM asked, which may give more events.
        while !pending.is_empty() {
            let mut next = Vec::new();
            for a in std::mem::take(&mut pending) {
                match a {
                    Action::Connect => {
                        let c = tokio::time::timeout(
                            Duration::from_secs(5),
                            TcpStream::connect(cfg.peer),
                        )
                        .await;
                        match c {
                            Ok(Ok(s)) => {
                                let _ = s.set_nodelay(true);
                                sock = Some(s);
                                buf.clear();
                                next.push(Event::Connected);
                            }
                            _ => next.push(Event::ConnectionLost),
                        }
                    }
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
            s = incoming.recv() => {
                if let Some(s) = s {
                    if sock.is_none() {
                        let _ = s.set_nodelay(true);
                        sock = Some(s);
                        buf.clear();
                        pending.extend(fsm.handle(Event::Accepted));
                    }
                    // Else: one connection at a time; the new one is dropped.
                }
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
