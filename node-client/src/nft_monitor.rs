//! Kernel notifications of changes to tabby's nftables tables.
//!
//! tabby-node owns `ip tabby` and `ip6 tabby` ([`crate::nft`]). Instead of
//! spawning `nft list table` on every node at the same moment to find hand
//! edits, the reconciler listens here and compares a table with what it
//! wrote only after an [`NftEvent`] for it (or on a rare, jittered check).
//!
//! The monitor is a `NETLINK_NETFILTER` socket subscribed to the
//! `NFNLGRP_NFTABLES` multicast group, in the network namespace of the
//! thread that creates it. Every committed nftables change is announced
//! there, one message per table, chain, rule, set, element, object or
//! flowtable; each names its table in attribute 1, which is all this module
//! decodes. tabby's own `nft -f` transactions are announced too: the
//! reconciler sees them like any other change.
use crate::error::Errno;
use crate::nft::TABLE;
use crate::{Error, Result};
use netlink_packet_core::{NetlinkBuffer, NlasIterator, NLA_TYPE_MASK, NLMSG_OVERRUN};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::MsgFlags;
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd};

/// `NFNLGRP_NFTABLES`: the multicast group of nftables changes.
const NFNLGRP_NFTABLES: u32 = 7;
/// `NFNL_SUBSYS_NFTABLES`: the high byte of nftables message types.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Length of `struct nfgenmsg` (family, version, resource id).
const NFGENMSG_LEN: usize = 4;
/// Attribute 1 of every message that changes a table or something in it
/// (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`,
/// `NFTA_SET_TABLE`, `NFTA_SET_ELEM_LIST_TABLE`, `NFTA_OBJ_TABLE`,
/// `NFTA_FLOWTABLE_TABLE`).
const NFTA_TABLE: u16 = 1;
/// `NFPROTO_IPV4`.
pub const NFPROTO_IPV4: u8 = 2;
/// `NFPROTO_IPV6`.
pub const NFPROTO_IPV6: u8 = 10;
/// Receive queue we ask for: a whole-table reload announces every element.
const WANT_RCVBUF: usize = 8 * 1024 * 1024;
/// Larger than any datagram the kernel sends (notifications are batched
/// into skbs of at most a few pages).
const RECV_BUF: usize = 256 * 1024;
/// Datagrams read per wake-up before handing out events, so that a burst
/// (one notification per element of a reloaded set) becomes one event.
const MAX_READS_PER_WAKE: usize = 256;

/// Whether an nftables message type (`enum nf_tables_msg_types`, low byte)
/// is a change of a table or of something in it, naming its table in
/// attribute 1: NEW/DEL of tables (0, 2), chains (3, 5), rules (6, 8), sets
/// (9, 11), set elements (12, 14), objects (18, 20), flowtables (22, 24),
/// and the DESTROY variants (26..=32). Not the GET requests, `NEWGEN` (15,
/// which follows every transaction and names no table) or `TRACE` (17).
fn names_table(msg: u8) -> bool {
    matches!(
        msg,
        0 | 2 | 3 | 5 | 6 | 8 | 9 | 11 | 12 | 14 | 18 | 20 | 22 | 24 | 26..=32
    )
}

/// What the nftables monitor reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NftEvent {
    /// A table named `tabby`, or something in it, was added, changed or
    /// deleted, in this nftables family ([`NFPROTO_IPV4`] for `ip tabby`,
    /// [`NFPROTO_IPV6`] for `ip6 tabby`; other families are reported as the
    /// kernel sent them, e.g. 1 for an `inet tabby` that is not ours).
    Changed {
        /// The nftables family (`nfgenmsg.nfgen_family`).
        family: u8,
    },
    /// Notifications were lost (receive queue overrun) or could not be
    /// read: assume both tables changed.
    Lost,
}

/// Queues `ev` unless an identical event is still waiting: events carry
/// nothing but "compare this table", so duplicates add nothing.
fn push_unique(pending: &mut VecDeque<NftEvent>, ev: NftEvent) {
    if !pending.contains(&ev) {
        pending.push_back(ev);
    }
}

/// The events of one notification datagram: one [`NftEvent::Changed`] per
/// family in which a message concerns a table named exactly `tabby`, and
/// [`NftEvent::Lost`] if part of the datagram is malformed (after the
/// events of the messages before it). Messages of other tables, of other
/// subsystems, and `NEWGEN` produce nothing.
pub(crate) fn tabby_events(datagram: &[u8]) -> Vec<NftEvent> {
    let mut out = VecDeque::new();
    let mut off = 0;
    while off < datagram.len() {
        let Ok(msg) = NetlinkBuffer::new_checked(&datagram[off..]) else {
            tracing::debug!(off, len = datagram.len(), "nft monitor: malformed message");
            push_unique(&mut out, NftEvent::Lost);
            break;
        };
        let ty = msg.message_type();
        let len = msg.length() as usize;
        if ty == NLMSG_OVERRUN {
            push_unique(&mut out, NftEvent::Lost);
        } else if ty >> 8 == NFNL_SUBSYS_NFTABLES && names_table((ty & 0xff) as u8) {
            match message_table(msg.payload()) {
                Some((family, true)) => push_unique(&mut out, NftEvent::Changed { family }),
                Some((_, false)) => {}
                None => {
                    tracing::debug!(ty, "nft monitor: malformed nftables message");
                    push_unique(&mut out, NftEvent::Lost);
                }
            }
        }
        // The header's length is at least a header (checked above).
        off = off.saturating_add((len + 3) & !3);
    }
    out.into()
}

/// The family of an nftables change message (payload after the netlink
/// header) and whether its table attribute names `tabby`; `None` when the
/// payload is too short or its attributes are malformed.
fn message_table(payload: &[u8]) -> Option<(u8, bool)> {
    let family = *payload.first()?;
    let attrs = payload.get(NFGENMSG_LEN..)?;
    for nla in NlasIterator::new(attrs) {
        let nla = nla.ok()?;
        if nla.kind() & NLA_TYPE_MASK == NFTA_TABLE {
            // NLA_STRING: NUL-terminated.
            let v = nla.value();
            let name = v.split(|b| *b == 0).next().unwrap_or(v);
            return Some((family, name == TABLE.as_bytes()));
        }
    }
    // A change without its table: not ours to guess.
    None
}

/// Watches nftables changes to tables named `tabby` in the network
/// namespace of the thread that called [`NftMonitor::new`].
///
/// Blocking, for a dedicated thread ([`NftMonitor::next_blocking`]); `Send`,
/// so it can be created on a thread inside another namespace and driven
/// from anywhere.
pub struct NftMonitor {
    sock: Socket,
    buf: Vec<u8>,
    pending: VecDeque<NftEvent>,
}

impl NftMonitor {
    /// Subscribes to nftables changes (`NFNLGRP_NFTABLES`) of the calling
    /// thread's network namespace. Changes committed after `new` returns are
    /// reported. Needs CAP_NET_ADMIN.
    pub fn new() -> Result<Self> {
        let io = |what: &str, e: std::io::Error| Error::Io(format!("nft monitor: {what}"), e);
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| io("socket", e))?;
        sock.bind(&SocketAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)))
            .map_err(|e| io("bind to NFNLGRP_NFTABLES", e))?;
        sock.set_non_blocking(true)
            .map_err(|e| io("set non-blocking", e))?;
        // Best effort: a small queue only means more [`NftEvent::Lost`].
        crate::netlink::grow_rcvbuf(&sock, WANT_RCVBUF);
        Ok(NftMonitor {
            sock,
            buf: vec![0; RECV_BUF],
            pending: VecDeque::new(),
        })
    }

    /// Blocks until a table named `tabby` changed (or notifications were
    /// lost). Events waiting together are coalesced: at most one per family,
    /// plus one [`NftEvent::Lost`].
    pub fn next_blocking(&mut self) -> Result<NftEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            let mut pfd = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::Io("nft monitor: poll".into(), e.into())),
            }
            // Read the whole burst before handing out its first event.
            for _ in 0..MAX_READS_PER_WAKE {
                match self.read_datagram() {
                    Ok(()) => {}
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => break,
                    Err(e) => return Err(Error::Io("nft monitor: recv".into(), e.into())),
                }
            }
        }
    }

    /// Reads one datagram without blocking and queues its events.
    fn read_datagram(&mut self) -> std::result::Result<(), Errno> {
        // MSG_TRUNC: the datagram's real length, even if it did not fit.
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC;
        match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut self.buf, flags) {
            Ok(n) if n > self.buf.len() => push_unique(&mut self.pending, NftEvent::Lost),
            Ok(n) => {
                for ev in tabby_events(&self.buf[..n]) {
                    push_unique(&mut self.pending, ev);
                }
            }
            Err(Errno::ENOBUFS) => {
                tracing::debug!("nft monitor: receive queue overrun");
                push_unique(&mut self.pending, NftEvent::Lost);
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Blocking loop for a dedicated thread: calls `on_change` for every
/// [`NftEvent`] of the calling thread's network namespace; returns `Ok(())`
/// once `on_change` returns false, or the error that stopped the monitor.
pub fn monitor_nft_tables(mut on_change: impl FnMut(NftEvent) -> bool) -> Result<()> {
    let mut mon = NftMonitor::new()?;
    loop {
        let ev = mon.next_blocking()?;
        if !on_change(ev) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEWTABLE: u8 = 0;
    const DELTABLE: u8 = 2;
    const NEWCHAIN: u8 = 3;
    const NEWRULE: u8 = 6;
    const NEWSETELEM: u8 = 12;
    const NEWGEN: u8 = 15;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    fn string(kind: u16, s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        attr(kind, &v)
    }

    /// One nfnetlink message: header, nfgenmsg, attributes.
    fn nfmsg(subsys: u16, msg: u8, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![family, 0, 0, 0];
        for a in attrs {
            payload.extend_from_slice(a);
        }
        let ty = (subsys << 8) | u16::from(msg);
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&payload);
        m
    }

    fn nft(msg: u8, family: u8, table: &str) -> Vec<u8> {
        // Table first, then whatever else the message carries.
        nfmsg(
            NFNL_SUBSYS_NFTABLES,
            msg,
            family,
            &[string(1, table), string(2, "all-pools"), attr(3, &[0; 8])],
        )
    }

    fn newgen() -> Vec<u8> {
        let attrs = [
            attr(1, &7u32.to_be_bytes()),
            attr(2, &1234u32.to_be_bytes()),
            string(3, "nft"),
        ];
        nfmsg(NFNL_SUBSYS_NFTABLES, NEWGEN, 0, &attrs)
    }

    const V4: NftEvent = NftEvent::Changed {
        family: NFPROTO_IPV4,
    };
    const V6: NftEvent = NftEvent::Changed {
        family: NFPROTO_IPV6,
    };

    #[test]
    fn tabby_changes_are_reported() {
        assert_eq!(tabby_events(&nft(NEWSETELEM, 2, "tabby")), [V4]);
        assert_eq!(tabby_events(&nft(DELTABLE, 10, "tabby")), [V6]);
        // The table name is the only attribute of a table message.
        let t = nfmsg(NFNL_SUBSYS_NFTABLES, NEWTABLE, 2, &[string(1, "tabby")]);
        assert_eq!(tabby_events(&t), [V4]);
        // Attribute type flags are ignored.
        let t = nfmsg(
            NFNL_SUBSYS_NFTABLES,
            NEWCHAIN,
            10,
            &[string(0x8001, "tabby")],
        );
        assert_eq!(tabby_events(&t), [V6]);
    }

    #[test]
    fn other_tables_and_messages_are_ignored() {
        assert!(tabby_events(&nft(NEWRULE, 2, "filter")).is_empty());
        assert!(tabby_events(&nft(NEWRULE, 2, "tabby2")).is_empty());
        assert!(tabby_events(&nft(NEWRULE, 2, "tabb")).is_empty());
        assert!(tabby_events(&newgen()).is_empty());
        // A GET echoes nothing to the group, but would not count.
        assert!(tabby_events(&nft(13, 2, "tabby")).is_empty());
        // Another nfnetlink subsystem (conntrack, 1) with attribute 1 "tabby".
        assert!(tabby_events(&nfmsg(1, 0, 2, &[string(1, "tabby")])).is_empty());
        assert!(tabby_events(&[]).is_empty());
    }

    #[test]
    fn one_event_per_family_per_datagram() {
        let mut d = nft(NEWTABLE, 2, "tabby");
        d.extend(nft(NEWRULE, 2, "filter"));
        d.extend(nft(NEWSETELEM, 2, "tabby"));
        d.extend(nft(NEWSETELEM, 10, "tabby"));
        d.extend(nft(DELTABLE, 2, "tabby"));
        d.extend(newgen());
        assert_eq!(tabby_events(&d), [V4, V6]);
    }

    #[test]
    fn malformed_datagrams_are_lost_not_panics() {
        let mut d = nft(NEWRULE, 2, "filter");
        let first = d.len();
        d.extend(nft(NEWSETELEM, 2, "tabby"));
        for cut in 1..d.len() {
            let evs = tabby_events(&d[..cut]);
            if cut == first {
                assert!(evs.is_empty(), "cut at {cut}");
            } else {
                assert_eq!(evs, [NftEvent::Lost], "cut at {cut}");
            }
        }
        // Messages before the damage still count.
        let mut d = nft(NEWSETELEM, 10, "tabby");
        d.extend_from_slice(&[1, 2, 3]);
        assert_eq!(tabby_events(&d), [V6, NftEvent::Lost]);
        // A length field shorter than a header.
        let mut d = nft(NEWSETELEM, 2, "tabby");
        d[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(tabby_events(&d), [NftEvent::Lost]);
        // No room for nfgenmsg; an attribute longer than the message; no table.
        let mut short = nfmsg(NFNL_SUBSYS_NFTABLES, NEWRULE, 2, &[]);
        short[..4].copy_from_slice(&18u32.to_ne_bytes());
        assert_eq!(tabby_events(&short[..18]), [NftEvent::Lost]);
        let mut bad = nft(NEWRULE, 2, "tabby");
        bad[20..22].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(tabby_events(&bad), [NftEvent::Lost]);
        let no_table = nfmsg(NFNL_SUBSYS_NFTABLES, NEWRULE, 2, &[string(2, "x")]);
        assert_eq!(tabby_events(&no_table), [NftEvent::Lost]);
    }
}
