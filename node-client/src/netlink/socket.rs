//! A small synchronous rtnetlink socket: batched requests, single requests,
//! gets and dumps. Blocking; callers run it on a blocking thread.
use crate::error::{Errno, NetlinkError};
use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NlasIterator, Parseable, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN,
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt::RcvBufForce, MsgFlags};
use std::fmt;
use std::os::fd::AsRawFd;

/// `NLMSGERR_ATTR_MSG`: the kernel's human readable error string.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Length of a netlink message header.
const NLMSG_HDRLEN: usize = 16;
/// Receive buffer: larger than any datagram the kernel sends (dump skbs are
/// at most 32 KiB).
const RECV_BUF: usize = 256 * 1024;
/// Receive queue we ask for (SO_RCVBUFFORCE when privileged) so a whole batch
/// of error replies fits.
const WANT_RCVBUF: usize = 8 * 1024 * 1024;
/// Kernel memory one queued reply costs (skb truesize), generously rounded.
const REPLY_TRUESIZE: usize = 1536;
/// Upper bound of requests per `send` in a batch.
const MAX_BATCH: usize = 2048;
/// Upper bound of bytes per `send` (the default send buffer is 208 KiB).
const MAX_BATCH_BYTES: usize = 128 * 1024;
/// How often a dump interrupted by concurrent changes is retried.
const DUMP_RETRIES: usize = 5;

/// A failed netlink request before the caller said what it was doing: an
/// errno, the kernel's extended ack message, or where it failed locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NlError {
    /// The errno.
    pub errno: Errno,
    /// The kernel's extended ack message.
    pub ext_ack: Option<String>,
    /// Where it failed on this side, when the kernel's answer was not the problem.
    pub local: Option<&'static str>,
}

impl NlError {
    /// A failure on this side (`what`), with the errno it stands for.
    pub(crate) fn local(errno: Errno, what: &'static str) -> Self {
        NlError {
            errno,
            ext_ack: None,
            local: Some(what),
        }
    }

    /// The kernel's answer: a negative errno and maybe an extended ack message.
    fn kernel(code: i32, ext_ack: Option<String>) -> Self {
        NlError {
            errno: Errno::from_raw(code.saturating_neg()),
            ext_ack: ext_ack.filter(|m| !m.is_empty()),
            local: None,
        }
    }

    fn io(e: std::io::Error, what: &'static str) -> Self {
        NlError::local(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)), what)
    }

    /// The typed error of `op` (what was being done, to what object).
    pub(crate) fn into_netlink(self, op: impl fmt::Display) -> NetlinkError {
        NetlinkError {
            op: op.to_string(),
            errno: self.errno,
            ext_ack: self.ext_ack,
            note: self.local.map(str::to_string),
        }
    }

    /// Maps to the crate error: EEXIST -> Exists, ESRCH/ENOENT/ENODEV ->
    /// NotFound, everything else -> Netlink; `op` says what was being done
    /// to which object.
    pub(crate) fn into_error(self, op: impl fmt::Display) -> crate::Error {
        let errno = self.errno;
        let e = self.into_netlink(op);
        match errno {
            Errno::EEXIST => crate::Error::Exists(e.to_string()),
            Errno::ESRCH | Errno::ENOENT | Errno::ENODEV => crate::Error::NotFound(e.to_string()),
            _ => crate::Error::Netlink(e),
        }
    }
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = std::io::Error::from_raw_os_error(self.errno as i32);
        match self.ext_ack.as_deref().or(self.local) {
            None => write!(f, "{os}"),
            Some(d) => write!(f, "{os} ({d})"),
        }
    }
}

/// One decoded message of a datagram.
pub(crate) enum Reply {
    /// `NLMSG_ERROR`: `None` is an ack.
    Status(u32, Option<NlError>),
    /// `NLMSG_DONE` of a dump, with the dump's own error if any.
    Done(u32, Option<NlError>),
    /// A payload message, with its header flags.
    Msg(u32, u16, Box<RouteNetlinkMessage>),
    /// Something we do not care about (noop, overrun, undecodable).
    Other,
}

/// Parses every netlink message in one datagram (headers and error
/// messages through `netlink-packet-core`'s checked buffers).
pub(crate) fn parse_datagram(buf: &[u8], mut f: impl FnMut(Reply)) -> Result<(), NlError> {
    let malformed = || NlError::local(Errno::EIO, "malformed netlink message");
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let msg = NetlinkBuffer::new_checked(&buf[off..]).map_err(|_| malformed())?;
        let hdr = NetlinkHeader::parse(&msg).map_err(|_| malformed())?;
        let len = hdr.length as usize;
        let payload = msg.payload();
        let (ty, flags, seq) = (hdr.message_type, hdr.flags, hdr.sequence_number);
        match ty {
            NLMSG_ERROR => {
                // A truncated error message is an error we cannot read.
                let e = ErrorBuffer::new_checked(payload).map_err(|_| malformed())?;
                let err = e
                    .code()
                    .map(|code| NlError::kernel(code.get(), error_ext_ack(flags, e.payload())));
                f(Reply::Status(seq, err));
            }
            NLMSG_DONE => {
                // A bare done (no error code) ends a dump successfully.
                let err = DoneBuffer::new_checked(payload).ok().and_then(|d| {
                    (d.code() != 0).then(|| {
                        let ack = (flags & NLM_F_ACK_TLVS != 0)
                            .then(|| ext_ack_message(d.extended_ack()))
                            .flatten();
                        NlError::kernel(d.code(), ack)
                    })
                });
                f(Reply::Done(seq, err));
            }
            NLMSG_NOOP | NLMSG_OVERRUN => f(Reply::Other),
            _ => match RouteNetlinkMessage::deserialize(&hdr, payload) {
                Ok(m) => f(Reply::Msg(seq, flags, Box::new(m))),
                Err(e) => {
                    tracing::debug!(ty, "undecodable netlink message: {e}");
                    f(Reply::Other)
                }
            },
        }
        off += (len + 3) & !3;
    }
    Ok(())
}

/// The extended ack message of an `NLMSG_ERROR` whose payload after the
/// error code is `rest`: the request's header (capped) or the whole request,
/// then the attributes.
fn error_ext_ack(flags: u16, rest: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let orig_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        NetlinkBuffer::new_checked(rest).ok()?.length() as usize
    };
    ext_ack_message(rest.get((orig_len + 3) & !3..)?)
}

/// The `NLMSGERR_ATTR_MSG` string among extended ack attributes.
fn ext_ack_message(attrs: &[u8]) -> Option<String> {
    for nla in NlasIterator::new(attrs) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let v = nla.value();
            let v = v.split(|b| *b == 0).next().unwrap_or(v);
            return Some(String::from_utf8_lossy(v).into_owned());
        }
    }
    None
}

/// An rtnetlink socket bound to the network namespace of the thread that
/// created it.
pub(crate) struct NlSocket {
    sock: Socket,
    seq: u32,
    rbuf: Vec<u8>,
    /// Requests per send in [`NlSocket::execute`], sized to the receive queue.
    batch: usize,
}

impl NlSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub(crate) fn new() -> Result<Self, NlError> {
        let mut sock =
            Socket::new(NETLINK_ROUTE).map_err(|e| NlError::io(e, "socket(NETLINK_ROUTE)"))?;
        sock.bind_auto()
            .map_err(|e| NlError::io(e, "bind netlink socket"))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| NlError::io(e, "connect netlink socket"))?;
        // Best effort: nicer errors, small acks, kernel-side dump filters.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_netlink_get_strict_chk(true);
        let rcvbuf = grow_rcvbuf(&sock, WANT_RCVBUF);
        let batch = (rcvbuf / REPLY_TRUESIZE).clamp(16, MAX_BATCH);
        Ok(NlSocket {
            sock,
            seq: 0,
            rbuf: vec![0; RECV_BUF],
            batch,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, buf: &[u8]) -> Result<(), NlError> {
        loop {
            match self.sock.send(buf, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NlError::io(e, "netlink send")),
            }
        }
    }

    /// Receives one datagram into `self.rbuf`; returns its length.
    fn recv(&mut self, flags: MsgFlags) -> Result<usize, std::io::Error> {
        loop {
            // MSG_TRUNC: the datagram's real length, even if it did not fit.
            let n = match nix::sys::socket::recv(
                self.sock.as_raw_fd(),
                &mut self.rbuf,
                flags | MsgFlags::MSG_TRUNC,
            ) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if n > self.rbuf.len() {
                // Cannot happen with a 256 KiB buffer; do not parse garbage.
                self.rbuf.resize(n, 0);
                return Err(std::io::Error::other("netlink datagram truncated"));
            }
            return Ok(n);
        }
    }

    /// Sends many requests with few syscalls and returns one result per
    /// request, in order. Requests are packed into large datagrams; only the
    /// last of each datagram asks for an ack (the kernel always answers
    /// failures), so replies are just the errors plus one ack per datagram.
    pub(crate) fn execute(
        &mut self,
        reqs: Vec<(RouteNetlinkMessage, u16)>,
    ) -> Vec<Result<(), NlError>> {
        let total = reqs.len();
        let mut results: Vec<Result<(), NlError>> = Vec::with_capacity(total);
        let mut buf = Vec::with_capacity(MAX_BATCH_BYTES + 4096);
        let mut reqs = reqs.into_iter().peekable();
        while reqs.peek().is_some() {
            buf.clear();
            let first = results.len();
            let base = self.seq.wrapping_add(1);
            let mut n = 0usize;
            while let Some((msg, flags)) = reqs.next() {
                let last =
                    n + 1 == self.batch || buf.len() >= MAX_BATCH_BYTES || reqs.peek().is_none();
                let seq = self.next_seq();
                let flags = flags | NLM_F_REQUEST | if last { NLM_F_ACK } else { 0 };
                push_msg(&mut buf, msg, flags, seq);
                results.push(Ok(()));
                n += 1;
                if last {
                    break;
                }
            }
            let last_seq = self.seq;
            if let Err(e) = self.send(&buf) {
                for r in &mut results[first..] {
                    *r = Err(e.clone());
                }
                continue;
            }
            self.collect_batch(&mut results[first..], base, last_seq);
        }
        results
    }

    /// Reads the replies of one batch (sequence numbers `base..=last`).
    fn collect_batch(&mut self, results: &mut [Result<(), NlError>], base: u32, last: u32) {
        let mut done = false;
        let mut nonblocking = false;
        while !done {
            let flags = if nonblocking {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::empty()
            };
            let n = match self.recv(flags) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && !nonblocking => {
                    // Replies were dropped: outcomes we have not seen are
                    // unknown. Say so, then drain what is still queued (the
                    // kernel answers a request before `send` returns).
                    for r in results.iter_mut().filter(|r| r.is_ok()) {
                        *r = Err(NlError::local(
                            Errno::ENOBUFS,
                            "reply lost (netlink receive queue overrun); state unknown",
                        ));
                    }
                    nonblocking = true;
                    continue;
                }
                Err(e) if nonblocking && e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let err = NlError::io(e, "netlink recv");
                    for r in results.iter_mut().filter(|r| r.is_ok()) {
                        *r = Err(err.clone());
                    }
                    return;
                }
            };
            let rbuf = std::mem::take(&mut self.rbuf);
            let parsed = parse_datagram(&rbuf[..n], |reply| {
                if let Reply::Status(seq, status) = reply {
                    let idx = seq.wrapping_sub(base) as usize;
                    if idx < results.len() {
                        match status {
                            Some(e) => results[idx] = Err(e),
                            None => {
                                if matches!(&results[idx], Err(e) if e.errno == Errno::ENOBUFS) {
                                    results[idx] = Ok(());
                                }
                            }
                        }
                        if seq == last {
                            done = true;
                        }
                    }
                }
            });
            self.rbuf = rbuf;
            if let Err(e) = parsed {
                tracing::warn!("bad netlink reply: {e}");
            }
        }
    }

    /// One request that only needs an ack.
    pub(crate) fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        let seq = self.send_one(msg, flags | NLM_F_ACK)?;
        let mut out = None;
        self.read_until(|reply| match reply {
            Reply::Status(s, st) if s == seq => {
                out = Some(st);
                true
            }
            _ => false,
        })?;
        match out.flatten() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// A get request answered by one message.
    pub(crate) fn get(&mut self, msg: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, NlError> {
        let seq = self.send_one(msg, 0)?;
        let mut out: Option<Result<RouteNetlinkMessage, NlError>> = None;
        self.read_until(|reply| match reply {
            Reply::Status(s, st) if s == seq => {
                if out.is_none() {
                    out = Some(Err(st.unwrap_or_else(|| {
                        NlError::local(Errno::EIO, "kernel acked a get without answering")
                    })));
                }
                true
            }
            Reply::Msg(s, _, m) if s == seq => {
                out = Some(Ok(*m));
                true
            }
            _ => false,
        })?;
        out.unwrap_or_else(|| Err(NlError::local(Errno::EIO, "no reply")))
    }

    /// A dump; retried when the kernel says it was interrupted by changes.
    pub(crate) fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let seq = self.send_one(msg.clone(), NLM_F_DUMP)?;
            let mut out = Vec::new();
            let mut intr = false;
            let mut failed = None;
            self.read_until(|reply| match reply {
                Reply::Msg(s, flags, m) if s == seq => {
                    intr |= flags & NLM_F_DUMP_INTR != 0;
                    out.push(*m);
                    false
                }
                Reply::Done(s, err) if s == seq => {
                    failed = err;
                    true
                }
                Reply::Status(s, st) if s == seq => {
                    failed =
                        Some(st.unwrap_or_else(|| {
                            NlError::local(Errno::EIO, "dump acked without data")
                        }));
                    true
                }
                _ => false,
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            if !intr || attempt > DUMP_RETRIES {
                return Ok(out);
            }
        }
    }

    fn send_one(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, NlError> {
        let seq = self.next_seq();
        let mut buf = Vec::with_capacity(256);
        push_msg(&mut buf, msg, flags | NLM_F_REQUEST, seq);
        self.send(&buf)?;
        Ok(seq)
    }

    /// Reads replies, handing each to `f`, until `f` returns true.
    fn read_until(&mut self, mut f: impl FnMut(Reply) -> bool) -> Result<(), NlError> {
        let mut done = false;
        while !done {
            let n = self
                .recv(MsgFlags::empty())
                .map_err(|e| NlError::io(e, "netlink recv"))?;
            let rbuf = std::mem::take(&mut self.rbuf);
            let r = parse_datagram(&rbuf[..n], |reply| {
                if !done {
                    done = f(reply);
                }
            });
            self.rbuf = rbuf;
            r?;
        }
        Ok(())
    }
}

/// Serializes one request at the end of `buf` (4-byte aligned).
fn push_msg(buf: &mut Vec<u8>, msg: RouteNetlinkMessage, flags: u16, seq: u32) {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = flags;
    hdr.sequence_number = seq;
    let mut m = NetlinkMessage::new(hdr, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    let len = m.buffer_len();
    let start = buf.len();
    buf.resize(start + ((len + 3) & !3), 0);
    m.serialize(&mut buf[start..start + len]);
}

/// Raises the socket's receive queue (SO_RCVBUFFORCE when privileged, else
/// SO_RCVBUF, capped by the kernel at rmem_max) and returns what the kernel
/// granted.
pub(crate) fn grow_rcvbuf(sock: &Socket, want: usize) -> usize {
    if setsockopt(sock, RcvBufForce, &want).is_err() {
        // An int, as SO_RCVBUF wants it.
        let _ = sock.set_rx_buf_sz(libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX));
    }
    sock.get_rx_buf_sz().unwrap_or(212_992)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message: header, then `payload` (padded).
    fn msg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize((m.len() + 3) & !3, 0);
        m
    }

    fn ext_ack_attr(text: &str) -> Vec<u8> {
        let mut v = text.as_bytes().to_vec();
        v.push(0);
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        a.extend_from_slice(&v);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    fn replies(buf: &[u8]) -> Result<Vec<(char, u32, Option<NlError>)>, NlError> {
        let mut out = Vec::new();
        parse_datagram(buf, |r| match r {
            Reply::Status(s, e) => out.push(('s', s, e)),
            Reply::Done(s, e) => out.push(('d', s, e)),
            Reply::Msg(s, _, _) => out.push(('m', s, None)),
            Reply::Other => out.push(('o', 0, None)),
        })?;
        Ok(out)
    }

    #[test]
    fn errors_acks_and_extended_acks() {
        // An ack, then EEXIST with a capped request header and an ext ack.
        let mut buf = msg(NLMSG_ERROR, 0, 7, &[0; 20]);
        let mut p = (-libc::EEXIST).to_ne_bytes().to_vec();
        p.extend_from_slice(&msg(24, 0, 8, &[])); // the request's header
        p.extend(ext_ack_attr("Route exists"));
        buf.extend(msg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 8, &p));
        // An uncapped error carries the whole request before the attributes.
        let mut p = (-libc::ERANGE).to_ne_bytes().to_vec();
        p.extend_from_slice(&msg(16, 0, 9, &[1, 2, 3, 4, 5]));
        p.extend(ext_ack_attr("MTU too large"));
        buf.extend(msg(NLMSG_ERROR, NLM_F_ACK_TLVS, 9, &p));
        // A dump that failed, and a bare done.
        let mut p = (-libc::EINTR).to_ne_bytes().to_vec();
        p.extend(ext_ack_attr("dump interrupted"));
        buf.extend(msg(NLMSG_DONE, NLM_F_ACK_TLVS, 10, &p));
        buf.extend(msg(NLMSG_DONE, 0, 11, &[]));
        buf.extend(msg(NLMSG_NOOP, 0, 0, &[]));

        let r = replies(&buf).unwrap();
        assert_eq!(r.len(), 6);
        assert_eq!(r[0], ('s', 7, None));
        let e = r[1].2.clone().unwrap();
        assert_eq!((r[1].1, e.errno), (8, Errno::EEXIST));
        assert_eq!(e.ext_ack.as_deref(), Some("Route exists"));
        let e = r[2].2.clone().unwrap();
        assert_eq!(
            (e.errno, e.ext_ack.as_deref()),
            (Errno::ERANGE, Some("MTU too large"))
        );
        assert_eq!(
            e.into_error("creating veth x").to_string(),
            "netlink: creating veth x: Numerical result out of range (os error 34) (MTU too large)"
        );
        let e = r[3].2.clone().unwrap();
        assert_eq!((r[3].0, e.errno), ('d', Errno::EINTR));
        assert_eq!(e.ext_ack.as_deref(), Some("dump interrupted"));
        assert_eq!(r[4], ('d', 11, None));
        assert_eq!(r[5].0, 'o');
    }

    #[test]
    fn kinds_of_errno() {
        let k = |errno| NlError::local(errno, "x").into_error("op");
        assert!(
            matches!(k(Errno::EEXIST), crate::Error::Exists(m) if m == "op: File exists (os error 17) (x)")
        );
        for errno in [Errno::ESRCH, Errno::ENOENT, Errno::ENODEV] {
            assert!(matches!(k(errno), crate::Error::NotFound(_)));
        }
        assert!(
            matches!(k(Errno::ENETUNREACH), crate::Error::Netlink(n) if n.errno == Errno::ENETUNREACH && n.op == "op")
        );
    }

    #[test]
    fn malformed_datagrams_are_refused() {
        let mut m = msg(NLMSG_ERROR, 0, 1, &[0; 4]);
        m[0] = 200; // length beyond the datagram
        assert!(replies(&m).is_err());
        let mut m = msg(NLMSG_ERROR, 0, 1, &[0; 4]);
        m[0] = 8; // shorter than a header
        assert!(replies(&m).is_err());
        // An error message too short for its code.
        assert!(replies(&msg(NLMSG_ERROR, 0, 1, &[])).is_err());
        // Trailing bytes shorter than a header are ignored.
        assert!(replies(&[0; 8]).unwrap().is_empty());
    }
}
