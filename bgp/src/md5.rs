//! TCP-MD5 signatures (RFC 2385) for BGP sessions with a password: the
//! kernel signs and checks every segment to and from a peer once the key
//! is set on the socket (before `connect`, or on the listening socket for
//! connections it accepts).
use std::{io, net::IpAddr, os::fd::AsRawFd};

/// The kernel's longest key (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_KEY_LEN: usize = 80;

/// `struct tcp_md5sig` of `<linux/tcp.h>`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MAX_KEY_LEN],
}

/// Sets (or, with an empty key, removes) the TCP-MD5 key for segments
/// exchanged with `peer` on `sock`.
pub fn set_key(sock: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a TCP-MD5 password has at most {MAX_KEY_LEN} bytes"),
        ));
    }
    // SAFETY: sockaddr_storage and the rest are plain integers and byte
    // arrays, for which all zeroes is a valid value.
    #[allow(unsafe_code)]
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in; the write stays inside `sig.addr`.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(sig.addr).cast::<libc::sockaddr_in>(),
                    sin,
                );
            }
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(sig.addr).cast::<libc::sockaddr_in6>(),
                    sin6,
                );
            }
        }
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: the fd is a live socket borrowed from `sock`; the option value
    // points at a properly sized, initialised tcp_md5sig for the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            std::ptr::addr_of!(sig).cast::<libc::c_void>(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_set_on_sockets_of_both_families_and_long_ones_refused() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_key(&v4, "127.0.0.2".parse().unwrap(), b"s3cret").unwrap();
        set_key(&v4, "127.0.0.2".parse().unwrap(), b"").unwrap();
        if let Ok(v6) = std::net::TcpListener::bind("[::1]:0") {
            set_key(&v6, "::2".parse().unwrap(), b"s3cret").unwrap();
        }
        let e = set_key(&v4, "127.0.0.2".parse().unwrap(), &[b'x'; 81]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
