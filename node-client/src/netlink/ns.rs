//! Network namespaces and sysctls.
use crate::{Error, Result};
use nix::sched::CloneFlags;
use std::path::{Component, Path, PathBuf};

/// Runs `f` on a fresh, dedicated OS thread that first joins the network
/// namespace at `path` (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`), and
/// returns its result. Netlink sockets created in `f` stay bound to that
/// namespace; `/proc/sys/net` read or written in `f` is that namespace's.
///
/// Blocking (it joins the thread). The thread exits afterwards, so no thread
/// of the process is ever left in a foreign namespace; the caller's thread
/// never calls `setns`. A thread that cannot be started is
/// [`Error::Spawn`]; a panic in `f` is [`Error::Panicked`] (so a caller
/// that must undo something on failure still gets to).
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    const NAME: &str = "tabby-netns";
    let ns = std::fs::File::open(path)
        .map_err(|e| Error::Io(format!("opening netns {}", path.display()), e))?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(NAME.into())
            .spawn_scoped(s, move || {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::Io(format!("setns {}", path.display()), e.into()))?;
                drop(ns);
                Ok(f())
            })
            .map_err(|source| Error::Spawn {
                name: NAME.into(),
                source,
            })?;
        handle.join().unwrap_or_else(|panic| {
            Err(Error::Panicked {
                name: format!("thread {NAME} ({})", path.display()),
                message: panic_message(panic.as_ref()),
            })
        })
    })
}

/// The message of a panic payload (`panic!` with a literal or a format).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn sysctl_path(path: &str) -> Result<PathBuf> {
    let rel = Path::new(path.trim_start_matches("/proc/sys/"));
    if path.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Error::Invalid(format!("bad sysctl path {path:?}")));
    }
    Ok(Path::new("/proc/sys").join(rel))
}

/// Writes a sysctl, given as a path under `/proc/sys` (`net/ipv4/ip_forward`,
/// `net/ipv4/conf/<if>/proxy_arp`; a leading `/proc/sys/` is accepted).
///
/// `/proc/sys/net` shows the network namespace of the *calling thread* (the
/// kernel resolves it from the opener's namespace, not the process's), so
/// this acts on the current thread's namespace: the node's own in
/// `tabby-node`, the target one inside [`in_netns`]. Blocking but fast.
pub fn set_sysctl(path: &str, value: &str) -> Result<()> {
    let p = sysctl_path(path)?;
    std::fs::write(&p, value)
        .map_err(|e| Error::Io(format!("writing {value:?} to {}", p.display()), e))
}

/// Reads a sysctl (see [`set_sysctl`]), trimmed.
pub fn get_sysctl(path: &str) -> Result<String> {
    let p = sysctl_path(path)?;
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::Io(format!("reading {}", p.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            sysctl_path("net/ipv4/ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("/proc/sys/net/ipv4/conf/tab0123456789a/proxy_arp").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/tab0123456789a/proxy_arp")
        );
        assert!(sysctl_path("net/../../etc/passwd").is_err());
        assert!(sysctl_path("/etc/passwd").is_err());
        assert!(sysctl_path("").is_err());
    }

    #[test]
    fn in_netns_reports_a_panic() {
        let err = in_netns(Path::new("/proc/self/ns/net"), || -> u32 {
            panic!("boom {}", 7)
        });
        match err {
            Err(Error::Panicked { name, message }) => {
                assert_eq!(message, "boom 7");
                assert!(name.contains("tabby-netns"), "{name}");
            }
            // Without CAP_SYS_ADMIN, setns itself is refused first.
            Err(Error::Io(m, _)) if m.starts_with("setns") => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn in_netns_reports_missing_path() {
        let err = in_netns(Path::new("/nonexistent/netns"), || ()).unwrap_err();
        assert!(matches!(err, Error::Io(..)), "{err}");
        let err = in_netns(Path::new(""), || ()).unwrap_err();
        assert!(matches!(err, Error::Io(..)), "{err}");
    }
}
