//! A small synchronous rtnetlink socket: batched requests, single requests,
//! gets and dumps. Blocking; callers run it on a blocking thread.
use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_ACK, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::fmt;
use std::os::fd::AsRawFd;

/// `NLM_F_ACK_TLVS`: the error message carries extended-ack attributes.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's human readable error string.
const NLMSGERR_ATTR_MSG: u16 = 1;
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

/// A failed netlink operation: an errno and the kernel's (or our) explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NlError {
    /// Positive errno.
    pub errno: i32,
    /// Extended ack message or local context; may be empty.
    pub detail: String,
}

impl NlError {
    pub(crate) fn new(errno: i32, detail: impl Into<String>) -> Self {
        NlError {
            errno,
            detail: detail.into(),
        }
    }

    fn io(e: std::io::Error, what: &str) -> Self {
        NlError::new(e.raw_os_error().unwrap_or(libc::EIO), what)
    }

    /// Maps to the crate error: EEXIST -> Exists, ESRCH/ENOENT/ENODEV ->
    /// NotFound, everything else -> Netlink; `what` says which object.
    pub(crate) fn into_error(self, what: impl fmt::Display) -> crate::Error {
        let text = format!("{what}: {self}");
        match self.errno {
            libc::EEXIST => crate::Error::Exists(text),
            libc::ESRCH | libc::ENOENT | libc::ENODEV => crate::Error::NotFound(text),
            _ => crate::Error::Netlink(text),
        }
    }
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = std::io::Error::from_raw_os_error(self.errno);
        if self.detail.is_empty() {
            write!(f, "{os}")
        } else {
            write!(f, "{os} ({})", self.detail)
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

/// Parses every netlink message in one datagram.
pub(crate) fn parse_datagram(buf: &[u8], mut f: impl FnMut(Reply)) -> Result<(), NlError> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(NlError::new(libc::EIO, "malformed netlink message"));
        }
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().unwrap());
        let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
        let payload = &buf[off + NLMSG_HDRLEN..off + len];
        match ty {
            NLMSG_ERROR | NLMSG_DONE => {
                let code = if payload.len() >= 4 {
                    i32::from_ne_bytes(payload[0..4].try_into().unwrap())
                } else {
                    0
                };
                let err = (code != 0).then(|| {
                    NlError::new(
                        -code,
                        ext_ack_message(ty, flags, payload).unwrap_or_default(),
                    )
                });
                f(if ty == NLMSG_ERROR {
                    Reply::Status(seq, err)
                } else {
                    Reply::Done(seq, err)
                });
            }
            NLMSG_NOOP | NLMSG_OVERRUN => f(Reply::Other),
            _ => {
                let mut hdr = NetlinkHeader::default();
                hdr.length = len as u32;
                hdr.message_type = ty;
                hdr.flags = flags;
                hdr.sequence_number = seq;
                match RouteNetlinkMessage::deserialize(&hdr, payload) {
                    Ok(m) => f(Reply::Msg(seq, flags, Box::new(m))),
                    Err(e) => {
                        tracing::debug!(ty, "undecodable netlink message: {e}");
                        f(Reply::Other)
                    }
                }
            }
        }
        off += (len + 3) & !3;
    }
    Ok(())
}

/// The `NLMSGERR_ATTR_MSG` string of an error (or done) message, if present.
fn ext_ack_message(ty: u16, flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let mut off = if ty == NLMSG_ERROR {
        // error code, then the request's header (capped) or whole request.
        let orig_len = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            let l = payload.get(4..8)?;
            u32::from_ne_bytes(l.try_into().ok()?) as usize
        };
        4 + ((orig_len + 3) & !3)
    } else {
        4
    };
    while off + 4 <= payload.len() {
        let nla_len = u16::from_ne_bytes(payload[off..off + 2].try_into().ok()?) as usize;
        let nla_ty = u16::from_ne_bytes(payload[off + 2..off + 4].try_into().ok()?) & 0x3fff;
        if nla_len < 4 || off + nla_len > payload.len() {
            return None;
        }
        if nla_ty == NLMSGERR_ATTR_MSG {
            let v = &payload[off + 4..off + nla_len];
            let v = v.split(|b| *b == 0).next().unwrap_or(v);
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        off += (nla_len + 3) & !3;
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
    fn recv(&mut self, flags: libc::c_int) -> Result<usize, std::io::Error> {
        loop {
            // SAFETY: rbuf is a valid writable buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    self.rbuf.as_mut_ptr().cast(),
                    self.rbuf.len(),
                    flags | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
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
            let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
            let n = match self.recv(flags) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && !nonblocking => {
                    // Replies were dropped: outcomes we have not seen are
                    // unknown. Say so, then drain what is still queued (the
                    // kernel answers a request before `send` returns).
                    for r in results.iter_mut().filter(|r| r.is_ok()) {
                        *r = Err(NlError::new(
                            libc::ENOBUFS,
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
                                if matches!(&results[idx], Err(e) if e.errno == libc::ENOBUFS) {
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
                        NlError::new(libc::EIO, "kernel acked a get without answering")
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
        out.unwrap_or_else(|| Err(NlError::new(libc::EIO, "no reply")))
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
                    failed = Some(
                        st.unwrap_or_else(|| NlError::new(libc::EIO, "dump acked without data")),
                    );
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
            let n = self.recv(0).map_err(|e| NlError::io(e, "netlink recv"))?;
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
/// up to rmem_max) and returns what the kernel granted.
pub(crate) fn grow_rcvbuf(sock: &Socket, want: usize) -> usize {
    let val = want as libc::c_int;
    // SAFETY: plain setsockopt with a c_int option value.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = sock.set_rx_buf_sz(val);
    }
    sock.get_rx_buf_sz().unwrap_or(212_992)
}
