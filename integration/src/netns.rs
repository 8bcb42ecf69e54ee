//! Network namespaces for labs and tests, driven with iproute2. Everything a
//! lab does happens inside namespaces it created; nothing touches the
//! machine's own namespace.
use anyhow::{bail, Context, Result};
use std::{
    fs::File,
    path::PathBuf,
    process::{Command, Output},
};

/// Runs a command and fails with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    check(cmd, args, out)
}

/// Runs a command with stdin.
pub fn run_stdin(cmd: &str, args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())?;
    check(cmd, args, child.wait_with_output()?)
}

fn check(cmd: &str, args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip` inside a namespace (`ip -n NS ...`).
pub fn ip(ns: &str, args: &str) -> Result<String> {
    let mut a = vec!["-n", ns];
    a.extend(args.split_whitespace());
    run("ip", &a)
}

/// A command inside a namespace (`ip netns exec NS ...`).
pub fn exec(ns: &str, cmd: &[&str]) -> Result<String> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(cmd);
    run("ip", &a)
}

/// Path of a named namespace.
pub fn path(ns: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{ns}"))
}

/// Creates a namespace with `lo` up.
pub fn add(ns: &str) -> Result<()> {
    run("ip", &["netns", "add", ns])?;
    ip(ns, "link set lo up")?;
    Ok(())
}

/// Deletes a namespace; a missing one is fine.
pub fn del(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Whether a namespace exists.
pub fn exists(ns: &str) -> bool {
    path(ns).exists()
}

/// Runs `f` on a fresh OS thread inside namespace `ns`: sockets it creates
/// belong to that namespace. The calling thread is never moved.
pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    spawn_within(ns, move || Ok(f()))?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// Fails loudly when not root: root-only tests must never skip silently.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces); CI runs it as root");
    }
}

/// Like [`within`] but returns at once with the thread's handle.
pub fn spawn_within<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let file = File::open(path(ns)).with_context(|| format!("opening netns {ns}"))?;
    Ok(std::thread::spawn(move || {
        // On this dedicated thread only.
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow::anyhow!("setns: {e}"))?;
        f()
    }))
}
