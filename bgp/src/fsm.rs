//! The BGP finite state machine of RFC 4271 section 8, as a pure function
//! of events to actions: no sockets, no clocks. The session driver
//! ([`crate::session`]) turns socket and timer happenings into [`Event`]s and
//! carries out the [`Action`]s; tests drive it with plain values.
use crate::codec::{Message, Notification, Open};
use std::time::Duration;

/// Session states (RFC 4271 8.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Not trying.
    Idle,
    /// Waiting for an outgoing TCP connection to complete.
    Connect,
    /// Waiting for the peer to connect (or for the retry timer).
    Active,
    /// Our OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for the first KEEPALIVE.
    OpenConfirm,
    /// Exchanging routes.
    Established,
}

impl State {
    /// The name `gobgp neighbor` and `calicoctl node status` use.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        }
    }
}

/// The timers the FSM asks the driver to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// ConnectRetryTimer.
    ConnectRetry,
    /// HoldTimer.
    Hold,
    /// KeepaliveTimer.
    Keepalive,
}

/// What happens to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// ManualStart (active or passive, by the configuration).
    Start,
    /// ManualStop: close with a Cease.
    Stop,
    /// A timer ran out.
    Expired(Timer),
    /// Our outgoing TCP connection is up.
    Connected,
    /// The peer connected to us.
    Accepted,
    /// The TCP connection failed or closed.
    ConnectionLost,
    /// A message arrived.
    Received(Message),
    /// A message could not be decoded: answer with this NOTIFICATION.
    Malformed(Notification),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer.
    Connect,
    /// Close the TCP connection (after sending what came before).
    Disconnect,
    /// Send a message.
    Send(Message),
    /// (Re)start a timer.
    StartTimer(Timer, Duration),
    /// Stop a timer.
    StopTimer(Timer),
    /// The session is up with this hold time (0: no keepalives): send the
    /// routes.
    Up {
        /// The peer's OPEN.
        peer: Box<Open>,
        /// The negotiated hold time.
        hold: Duration,
    },
    /// The session went down (it was up, or trying): why.
    Down(String),
    /// An UPDATE to hand to the RIB.
    Update(crate::codec::Update),
    /// The peer asked for our routes again (route refresh).
    Refresh,
}

/// Configuration of one session's FSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Our OPEN.
    pub open: Open,
    /// The AS the peer must have.
    pub peer_asn: u32,
    /// Passive: never connect, wait for the peer.
    pub passive: bool,
    /// First connect-retry interval (RFC 4271 suggests 120 s; doubled after
    /// each failure up to `connect_retry_max`).
    pub connect_retry: Duration,
    /// Upper bound of the backoff.
    pub connect_retry_max: Duration,
}

/// RFC 4271's large hold time while waiting for the peer's OPEN.
const OPEN_HOLD: Duration = Duration::from_secs(240);

/// NOTIFICATION codes used here (RFC 4271 section 4.5).
mod code {
    pub const OPEN_ERROR: u8 = 2;
    pub const HOLD_EXPIRED: u8 = 4;
    pub const FSM_ERROR: u8 = 5;
    pub const CEASE: u8 = 6;
    /// OPEN error subcodes.
    pub const BAD_PEER_AS: u8 = 2;
    pub const UNACCEPTABLE_HOLD: u8 = 6;
    pub const UNSUPPORTED_CAPABILITY: u8 = 7;
    /// Cease subcode: administrative shutdown (RFC 4486).
    pub const ADMIN_SHUTDOWN: u8 = 2;
}

/// One session's FSM.
#[derive(Debug, Clone)]
pub struct Fsm {
    cfg: Config,
    state: State,
    retry: Duration,
    hold: Duration,
    /// The peer's OPEN, between OpenSent and Established.
    pending_open: Option<Open>,
    /// Why the session last went down (for status).
    pub last_error: Option<String>,
}

fn notify(code: u8, subcode: u8) -> Message {
    Message::Notification(Notification {
        code,
        subcode,
        data: Vec::new(),
    })
}

impl Fsm {
    /// An FSM in Idle.
    pub fn new(cfg: Config) -> Fsm {
        let retry = cfg.connect_retry;
        Fsm {
            cfg,
            state: State::Idle,
            retry,
            hold: Duration::ZERO,
            pending_open: None,
            last_error: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The negotiated hold time (Established only).
    pub fn hold(&self) -> Duration {
        self.hold
    }

    fn open_sent(&mut self) -> Vec<Action> {
        self.state = State::OpenSent;
        vec![
            Action::StopTimer(Timer::ConnectRetry),
            Action::Send(Message::Open(self.cfg.open.clone())),
            Action::StartTimer(Timer::Hold, OPEN_HOLD),
        ]
    }

    /// Back to Idle-then-retry after a failure: the connection goes, timers
    /// stop, and the next attempt waits for the backed-off retry interval.
    fn fail(&mut self, why: String, mut before: Vec<Action>) -> Vec<Action> {
        let was_up = self.state == State::Established;
        self.last_error = Some(why.clone());
        before.extend([
            Action::Disconnect,
            Action::StopTimer(Timer::Hold),
            Action::StopTimer(Timer::Keepalive),
        ]);
        // Active keeps waiting for the peer; an active session retries.
        self.state = State::Active;
        before.push(Action::StartTimer(Timer::ConnectRetry, self.retry));
        self.retry = (self.retry * 2).min(self.cfg.connect_retry_max);
        if was_up || !why.is_empty() {
            before.push(Action::Down(why));
        }
        before
    }

    /// Takes one event; returns what to do, in order.
    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        use Event as E;
        use State as S;
        match (self.state, ev) {
            (S::Idle, E::Start) => {
                self.retry = self.cfg.connect_retry;
                if self.cfg.passive {
                    self.state = S::Active;
                    vec![]
                } else {
                    self.state = S::Connect;
                    vec![
                        Action::Connect,
                        Action::StartTimer(Timer::ConnectRetry, self.retry),
                    ]
                }
            }
            (S::Idle, _) => vec![],
            (_, E::Stop) => {
                let mut a = Vec::new();
                if matches!(self.state, S::OpenSent | S::OpenConfirm | S::Established) {
                    a.push(Action::Send(notify(code::CEASE, code::ADMIN_SHUTDOWN)));
                }
                let was_up = self.state == S::Established;
                self.state = S::Idle;
                a.extend([
                    Action::Disconnect,
                    Action::StopTimer(Timer::ConnectRetry),
                    Action::StopTimer(Timer::Hold),
                    Action::StopTimer(Timer::Keepalive),
                ]);
                if was_up {
                    a.push(Action::Down("stopped".into()));
                }
                a
            }
            (S::Connect | S::Active, E::Expired(Timer::ConnectRetry)) => {
                if self.cfg.passive {
                    return vec![];
                }
                self.state = S::Connect;
                vec![
                    Action::Disconnect,
                    Action::Connect,
                    Action::StartTimer(Timer::ConnectRetry, self.retry),
                ]
            }
            (S::Connect | S::Active, E::Connected | E::Accepted) => self.open_sent(),
            (S::Connect, E::ConnectionLost) => {
                // Try again when the retry timer runs out.
                self.state = S::Active;
                vec![Action::Disconnect]
            }
            (S::Active, E::ConnectionLost) => vec![],
            (S::OpenSent, E::Received(Message::Open(o))) => {
                // AS_PATHs are read with 4-octet AS numbers (RFC 6793).
                if o.capabilities.four_octet_as.is_none() {
                    return self.fail(
                        "peer does not support 4-octet AS numbers".into(),
                        vec![Action::Send(notify(
                            code::OPEN_ERROR,
                            code::UNSUPPORTED_CAPABILITY,
                        ))],
                    );
                }
                if o.asn != self.cfg.peer_asn {
                    return self.fail(
                        format!(
                            "peer AS {} is not the configured {}",
                            o.asn, self.cfg.peer_asn
                        ),
                        vec![Action::Send(notify(code::OPEN_ERROR, code::BAD_PEER_AS))],
                    );
                }
                // 1 and 2 seconds are unacceptable (RFC 4271 4.2).
                if o.hold_time == 1 || o.hold_time == 2 {
                    return self.fail(
                        format!("peer hold time {} s is unacceptable", o.hold_time),
                        vec![Action::Send(notify(
                            code::OPEN_ERROR,
                            code::UNACCEPTABLE_HOLD,
                        ))],
                    );
                }
                let hold = o.hold_time.min(self.cfg.open.hold_time);
                self.hold = Duration::from_secs(u64::from(hold));
                self.state = S::OpenConfirm;
                let mut a = vec![Action::Send(Message::Keepalive)];
                if hold > 0 {
                    a.push(Action::StartTimer(Timer::Keepalive, self.hold / 3));
                    a.push(Action::StartTimer(Timer::Hold, self.hold));
                } else {
                    a.push(Action::StopTimer(Timer::Hold));
                }
                self.pending_open = Some(o);
                a
            }
            (S::OpenConfirm, E::Received(Message::Keepalive)) => {
                self.state = S::Established;
                // A session that came up resets the backoff.
                self.retry = self.cfg.connect_retry;
                self.last_error = None;
                let peer = Box::new(
                    self.pending_open
                        .take()
                        .unwrap_or_else(|| self.cfg.open.clone()),
                );
                let mut a = Vec::new();
                if self.hold > Duration::ZERO {
                    a.push(Action::StartTimer(Timer::Hold, self.hold));
                }
                a.push(Action::Up {
                    peer,
                    hold: self.hold,
                });
                a
            }
            (S::OpenConfirm | S::Established, E::Expired(Timer::Keepalive)) => {
                vec![
                    Action::Send(Message::Keepalive),
                    Action::StartTimer(Timer::Keepalive, self.hold / 3),
                ]
            }
            (S::Established, E::Received(Message::Keepalive)) => {
                if self.hold > Duration::ZERO {
                    vec![Action::StartTimer(Timer::Hold, self.hold)]
                } else {
                    vec![]
                }
            }
            (S::Established, E::Received(Message::Update(u))) => {
                let mut a = Vec::new();
                if self.hold > Duration::ZERO {
                    a.push(Action::StartTimer(Timer::Hold, self.hold));
                }
                a.push(Action::Update(u));
                a
            }
            (S::Established, E::Received(Message::RouteRefresh(_))) => vec![Action::Refresh],
            (_, E::Expired(Timer::Hold)) => self.fail(
                "hold timer expired".into(),
                vec![Action::Send(notify(code::HOLD_EXPIRED, 0))],
            ),
            (_, E::Received(Message::Notification(n))) => self.fail(
                format!("peer sent NOTIFICATION {}/{}", n.code, n.subcode),
                vec![],
            ),
            (_, E::Malformed(n)) => {
                let why = format!(
                    "malformed message from the peer (NOTIFICATION {}/{})",
                    n.code, n.subcode
                );
                self.fail(why, vec![Action::Send(Message::Notification(n))])
            }
            (_, E::ConnectionLost) => self.fail("connection lost".into(), vec![]),
            // Anything else in these states is an FSM error (RFC 4271 8.2.2).
            (S::OpenSent | S::OpenConfirm | S::Established, E::Received(m)) => self.fail(
                format!("unexpected {} in {}", kind(&m), self.state.as_str()),
                vec![Action::Send(notify(code::FSM_ERROR, 0))],
            ),
            // A second connection while one is being set up or up: refused
            // (collision detection keeps the existing one).
            (_, E::Accepted | E::Connected) => vec![],
            (_, _) => vec![],
        }
    }
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Open(_) => "OPEN",
        Message::Update(_) => "UPDATE",
        Message::Keepalive => "KEEPALIVE",
        Message::Notification(_) => "NOTIFICATION",
        Message::RouteRefresh(_) => "ROUTE-REFRESH",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Capabilities, Update};

    fn open(asn: u32, hold: u16) -> Open {
        Open {
            asn,
            hold_time: hold,
            router_id: std::net::Ipv4Addr::new(10, 0, 0, 1),
            capabilities: Capabilities {
                four_octet_as: Some(asn),
                ipv4_unicast: true,
                ..Default::default()
            },
        }
    }

    fn fsm(passive: bool) -> Fsm {
        Fsm::new(Config {
            open: open(64512, 90),
            peer_asn: 64512,
            passive,
            connect_retry: Duration::from_secs(5),
            connect_retry_max: Duration::from_secs(60),
        })
    }

    fn up(f: &mut Fsm, peer_hold: u16) -> Vec<Action> {
        f.handle(Event::Start);
        f.handle(Event::Connected);
        f.handle(Event::Received(Message::Open(open(64512, peer_hold))));
        f.handle(Event::Received(Message::Keepalive))
    }

    #[test]
    fn an_active_session_connects_opens_and_comes_up() {
        let mut f = fsm(false);
        assert_eq!(
            f.handle(Event::Start),
            vec![
                Action::Connect,
                Action::StartTimer(Timer::ConnectRetry, Duration::from_secs(5))
            ]
        );
        assert_eq!(f.state(), State::Connect);
        let a = f.handle(Event::Connected);
        assert!(
            a.contains(&Action::Send(Message::Open(open(64512, 90)))),
            "{a:?}"
        );
        assert!(a.contains(&Action::StartTimer(Timer::Hold, OPEN_HOLD)));
        assert_eq!(f.state(), State::OpenSent);
        // The peer's smaller hold time wins; keepalives at a third of it.
        let a = f.handle(Event::Received(Message::Open(open(64512, 30))));
        assert_eq!(f.state(), State::OpenConfirm);
        assert!(a.contains(&Action::Send(Message::Keepalive)));
        assert!(a.contains(&Action::StartTimer(
            Timer::Keepalive,
            Duration::from_secs(10)
        )));
        let a = f.handle(Event::Received(Message::Keepalive));
        assert_eq!(f.state(), State::Established);
        assert!(
            matches!(a.last(), Some(Action::Up { hold, .. }) if *hold == Duration::from_secs(30))
        );
        // Keepalives keep it up; updates are handed on.
        assert_eq!(
            f.handle(Event::Received(Message::Keepalive)),
            vec![Action::StartTimer(Timer::Hold, Duration::from_secs(30))]
        );
        let a = f.handle(Event::Received(Message::Update(Update::default())));
        assert_eq!(a.last(), Some(&Action::Update(Update::default())));
        assert_eq!(
            f.handle(Event::Expired(Timer::Keepalive)),
            vec![
                Action::Send(Message::Keepalive),
                Action::StartTimer(Timer::Keepalive, Duration::from_secs(10))
            ]
        );
    }

    #[test]
    fn a_passive_session_waits_for_the_peer() {
        let mut f = fsm(true);
        assert!(f.handle(Event::Start).is_empty());
        assert_eq!(f.state(), State::Active);
        assert!(f.handle(Event::Expired(Timer::ConnectRetry)).is_empty());
        let a = f.handle(Event::Accepted);
        assert_eq!(f.state(), State::OpenSent);
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::Send(Message::Open(_)))));
    }

    #[test]
    fn hold_expiry_notifies_and_retries_with_backoff() {
        let mut f = fsm(false);
        up(&mut f, 90);
        let a = f.handle(Event::Expired(Timer::Hold));
        assert_eq!(a[0], Action::Send(notify(code::HOLD_EXPIRED, 0)));
        assert!(a.contains(&Action::Disconnect));
        assert!(a.contains(&Action::StartTimer(
            Timer::ConnectRetry,
            Duration::from_secs(5)
        )));
        assert!(matches!(a.last(), Some(Action::Down(w)) if w.contains("hold timer")));
        assert_eq!(f.state(), State::Active);
        assert_eq!(f.last_error.as_deref(), Some("hold timer expired"));
        // Failures back off: 5, 10, 20, 40, 60, 60 s.
        let mut seen = Vec::new();
        for _ in 0..5 {
            f.handle(Event::Expired(Timer::ConnectRetry));
            let a = f.handle(Event::ConnectionLost);
            assert_eq!(a, vec![Action::Disconnect]);
            f.handle(Event::Expired(Timer::ConnectRetry));
            f.handle(Event::Connected);
            let a = f.handle(Event::Expired(Timer::Hold));
            seen.extend(a.iter().filter_map(|x| match x {
                Action::StartTimer(Timer::ConnectRetry, d) => Some(d.as_secs()),
                _ => None,
            }));
        }
        assert_eq!(seen, vec![10, 20, 40, 60, 60]);
        // Coming up resets it.
        f.handle(Event::Expired(Timer::ConnectRetry));
        f.handle(Event::Connected);
        f.handle(Event::Received(Message::Open(open(64512, 90))));
        f.handle(Event::Received(Message::Keepalive));
        let a = f.handle(Event::ConnectionLost);
        assert!(a.contains(&Action::StartTimer(
            Timer::ConnectRetry,
            Duration::from_secs(5)
        )));
    }

    #[test]
    fn a_wrong_peer_as_or_hold_time_is_refused_with_an_open_error() {
        for (asn, hold, sub) in [
            (65000, 90, code::BAD_PEER_AS),
            (64512, 2, code::UNACCEPTABLE_HOLD),
        ] {
            let mut f = fsm(false);
            f.handle(Event::Start);
            f.handle(Event::Connected);
            let a = f.handle(Event::Received(Message::Open(open(asn, hold))));
            assert_eq!(
                a[0],
                Action::Send(notify(code::OPEN_ERROR, sub)),
                "{asn} {hold}"
            );
            assert_ne!(f.state(), State::OpenConfirm);
        }
    }

    #[test]
    fn a_peer_without_4_octet_as_numbers_is_refused() {
        let mut f = fsm(false);
        f.handle(Event::Start);
        f.handle(Event::Connected);
        let mut o = open(64512, 90);
        o.capabilities.four_octet_as = None;
        let a = f.handle(Event::Received(Message::Open(o)));
        assert_eq!(
            a[0],
            Action::Send(notify(code::OPEN_ERROR, code::UNSUPPORTED_CAPABILITY))
        );
    }

    #[test]
    fn hold_time_zero_means_no_keepalives() {
        let mut f = fsm(false);
        let a = up(&mut f, 0);
        assert!(matches!(a.last(), Some(Action::Up { hold, .. }) if hold.is_zero()));
        assert!(f.handle(Event::Received(Message::Keepalive)).is_empty());
    }

    #[test]
    fn stop_ceases_and_unexpected_messages_are_fsm_errors() {
        let mut f = fsm(false);
        up(&mut f, 90);
        let a = f.handle(Event::Stop);
        assert_eq!(
            a[0],
            Action::Send(notify(code::CEASE, code::ADMIN_SHUTDOWN))
        );
        assert_eq!(a.last(), Some(&Action::Down("stopped".into())));
        assert_eq!(f.state(), State::Idle);
        // An UPDATE before the session is up.
        let mut f = fsm(false);
        f.handle(Event::Start);
        f.handle(Event::Connected);
        let a = f.handle(Event::Received(Message::Update(Update::default())));
        assert_eq!(a[0], Action::Send(notify(code::FSM_ERROR, 0)));
        // A peer's NOTIFICATION takes it down, with the reason kept.
        let mut f = fsm(false);
        up(&mut f, 90);
        f.handle(Event::Received(Message::Notification(Notification {
            code: 6,
            subcode: 4,
            data: vec![],
        })));
        assert_eq!(f.last_error.as_deref(), Some("peer sent NOTIFICATION 6/4"));
        // A malformed message is answered with the codec's NOTIFICATION.
        let mut f = fsm(false);
        up(&mut f, 90);
        let n = Notification {
            code: 3,
            subcode: 1,
            data: vec![],
        };
        let a = f.handle(Event::Malformed(n.clone()));
        assert_eq!(a[0], Action::Send(Message::Notification(n)));
        assert_eq!(f.state(), State::Active);
    }
}
