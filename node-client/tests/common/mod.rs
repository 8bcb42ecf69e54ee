//! Namespaces and commands shared by the root-only kernel tests of
//! `tabby_node`: every test makes its own uniquely named namespaces
//! (`tabby-<t>-<pid>-<n>`, `<t>` the test binary's initial) and removes them
//! in a guard, even on failure.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Fails loudly without root: these tests never skip.
pub fn need_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (CI runs as root)");
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Namespaces of one test, deleted on drop.
pub struct Netns {
    names: Vec<String>,
}

impl Netns {
    /// None yet.
    pub fn new() -> Self {
        Netns { names: Vec::new() }
    }

    /// A new namespace with `lo` up.
    pub fn add(&mut self) -> String {
        let tag = env!("CARGO_CRATE_NAME").chars().next().unwrap_or('t');
        let name = format!(
            "tabby-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// The namespace's file.
pub fn path(ns: &str) -> PathBuf {
    Path::new("/var/run/netns").join(ns)
}

/// Runs a command: (success, stdout, stderr).
pub fn run(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `ip args`, panics on failure, returns stdout.
pub fn ip(args: &[&str]) -> String {
    let (ok, out, err) = run("ip", args);
    assert!(ok, "ip {} failed: {err}", args.join(" "));
    out
}

/// Cat a file inside a namespace (its /proc/sys/net and sysfs are the
/// namespace's there), independently of the code under test.
pub fn ns_cat(ns: &str, file: &str) -> String {
    let (ok, out, err) = run("ip", &["netns", "exec", ns, "cat", file]);
    assert!(ok, "cat {file} in {ns}: {err}");
    out.trim().to_string()
}
