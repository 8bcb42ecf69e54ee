//! Raw rtnetlink for labs and benchmarks: a monitor of IPv4 route changes
//! (the RTM_NEWROUTE/RTM_DELROUTE multicast group) and blackhole routes added
//! and deleted with an acknowledged request. Deliberately independent of
//! tabby-node's own netlink code, whose behaviour the benchmarks measure.
//!
//! A netlink socket belongs to the network namespace of the thread that
//! creates it: create these on a thread that entered the namespace
//! ([`crate::netns::spawn_within`]), never on an async runtime's thread.
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

const NETLINK_ROUTE: libc::c_int = 0;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTA_DST: u16 = 1;
const RTA_TABLE: u16 = 15;
const RTN_BLACKHOLE: u8 = 6;
const AF_INET: u8 = libc::AF_INET as u8;
const HDR: usize = 16;
const RTMSG: usize = 12;

/// The main routing table.
pub const RT_TABLE_MAIN: u32 = 254;
/// Route protocol `static` (what `ip route add ... proto static` sets).
pub const RTPROT_STATIC: u8 = 4;

/// One IPv4 route added (or replaced) or deleted, as the monitor saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteEvent {
    /// RTM_NEWROUTE (true) or RTM_DELROUTE (false).
    pub add: bool,
    /// Destination network.
    pub dst: Ipv4Addr,
    /// Destination prefix length.
    pub plen: u8,
    /// Routing table.
    pub table: u32,
    /// Route protocol (e.g. 77 for tabby, 12 for BIRD, 4 for static).
    pub protocol: u8,
    /// When `recv` returned the message holding it.
    pub at: Instant,
}

/// A NETLINK_ROUTE socket.
pub struct NlSocket {
    fd: OwnedFd,
    seq: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Puts the calling thread at SCHED_FIFO priority `prio` (needs root or
/// CAP_SYS_NICE), so a route monitor timestamps a message when the kernel
/// sends it rather than when a CPU frees up behind busy daemons. False when
/// refused.
pub fn make_thread_realtime(prio: i32) -> bool {
    let p = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: changes only the calling thread's scheduling policy; p is a
    // valid sched_param.
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &p) == 0 }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl NlSocket {
    fn open(groups: u32) -> io::Result<NlSocket> {
        // SAFETY: plain socket(2); the fd is owned from here on.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_ROUTE,
            )
        })?;
        // SAFETY: fd was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid; we set family and groups.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        sa.nl_groups = groups;
        // SAFETY: sa is a valid sockaddr_nl of the given length.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        Ok(NlSocket { fd, seq: 1 })
    }

    /// A socket subscribed to IPv4 route changes, with a large receive
    /// buffer (forced past rmem_max when root) so bursts are not dropped.
    pub fn monitor_v4_routes() -> io::Result<NlSocket> {
        let s = NlSocket::open(RTMGRP_IPV4_ROUTE)?;
        let size: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt with a c_int value of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    s.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &size as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
        Ok(s)
    }

    /// A socket for requests (no multicast groups).
    pub fn request() -> io::Result<NlSocket> {
        NlSocket::open(0)
    }

    /// Makes `recv` return `ErrorKind::WouldBlock` after `d` without data.
    pub fn set_recv_timeout(&self, d: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Receives one datagram and appends the IPv4 route events in it to
    /// `out`. A timeout is `WouldBlock`; a receive-queue overflow is the
    /// `ENOBUFS` error (events were lost; the socket stays usable).
    pub fn recv_route_events(&self, buf: &mut [u8], out: &mut Vec<RouteEvent>) -> io::Result<()> {
        let n = self.recv(buf)?;
        let at = Instant::now();
        parse_route_events(&buf[..n], at, out);
        Ok(())
    }

    /// Adds (`add`) or deletes a blackhole route `dst/plen` in the main
    /// table with protocol `proto`, and waits for the kernel's answer.
    pub fn blackhole(&mut self, add: bool, dst: Ipv4Addr, plen: u8, proto: u8) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut m = Vec::with_capacity(HDR + RTMSG + 8);
        let len = (HDR + RTMSG + 8) as u32;
        let (ty, flags) = if add {
            (
                RTM_NEWROUTE,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            )
        } else {
            (RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK)
        };
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
        m.extend_from_slice(&[
            AF_INET,
            plen,
            0,
            0,
            RT_TABLE_MAIN as u8,
            proto,
            0,
            RTN_BLACKHOLE,
        ]);
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&RTA_DST.to_ne_bytes());
        m.extend_from_slice(&dst.octets());
        // SAFETY: m is a valid buffer of m.len() bytes.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                m.as_ptr() as *const libc::c_void,
                m.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf)?;
            let mut off = 0;
            while off + HDR <= n {
                let mlen = u32_at(&buf, off) as usize;
                let mty = u16_at(&buf, off + 4);
                let mseq = u32_at(&buf, off + 8);
                if mlen < HDR || off + mlen > n {
                    break;
                }
                if mseq == seq && mty == NLMSG_ERROR && mlen >= HDR + 4 {
                    let err = u32_at(&buf, off + HDR) as i32;
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-err))
                    };
                }
                off += (mlen + 3) & !3;
            }
        }
    }
}

/// Parses the IPv4 route messages of one netlink datagram.
pub fn parse_route_events(buf: &[u8], at: Instant, out: &mut Vec<RouteEvent>) {
    let mut off = 0;
    while off + HDR <= buf.len() {
        let mlen = u32_at(buf, off) as usize;
        let mty = u16_at(buf, off + 4);
        if mlen < HDR || off + mlen > buf.len() || mty == NLMSG_DONE {
            break;
        }
        let body = &buf[off + HDR..off + mlen];
        if (mty == RTM_NEWROUTE || mty == RTM_DELROUTE) && body.len() >= RTMSG && body[0] == AF_INET
        {
            let plen = body[1];
            let mut table = body[4] as u32;
            let protocol = body[5];
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut a = RTMSG;
            while a + 4 <= body.len() {
                let alen = u16_at(body, a) as usize;
                let aty = u16_at(body, a + 2) & 0x3fff;
                if alen < 4 || a + alen > body.len() {
                    break;
                }
                let v = &body[a + 4..a + alen];
                match aty {
                    RTA_DST if v.len() == 4 => dst = Ipv4Addr::new(v[0], v[1], v[2], v[3]),
                    RTA_TABLE if v.len() == 4 => table = u32_at(v, 0),
                    _ => {}
                }
                a += (alen + 3) & !3;
            }
            out.push(RouteEvent {
                add: mty == RTM_NEWROUTE,
                dst,
                plen,
                table,
                protocol,
                at,
            });
        }
        off += (mlen + 3) & !3;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_route_message() {
        // RTM_NEWROUTE for 10.1.2.0/26, table 254, proto 77, with RTA_TABLE.
        let mut m = Vec::new();
        let len = (HDR + RTMSG + 8 + 8) as u32;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[AF_INET, 26, 0, 0, 254, 77, 0, 1]);
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&RTA_DST.to_ne_bytes());
        m.extend_from_slice(&[10, 1, 2, 0]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&RTA_TABLE.to_ne_bytes());
        m.extend_from_slice(&254u32.to_ne_bytes());
        let at = Instant::now();
        let mut out = Vec::new();
        parse_route_events(&m, at, &mut out);
        assert_eq!(
            out,
            vec![RouteEvent {
                add: true,
                dst: Ipv4Addr::new(10, 1, 2, 0),
                plen: 26,
                table: 254,
                protocol: 77,
                at
            }]
        );
    }
}
