//! A tiny TCP echo-of-source service: the outside host tells each client the
//! source address it saw, which shows whether egress was masqueraded.
use anyhow::{Context, Result};
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

/// Serves forever (or `count` connections): replies "<peer ip>\n".
pub fn serve(listener: TcpListener, count: Option<usize>) -> Result<()> {
    for (n, conn) in listener.incoming().enumerate() {
        let mut c = conn?;
        let peer = c.peer_addr()?;
        let _ = writeln!(c, "{}", peer.ip());
        if count.is_some_and(|max| n + 1 >= max) {
            break;
        }
    }
    Ok(())
}

/// Connects and returns the address the server saw.
pub fn ask(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}
