//! Shared helpers of the benchmarks: namespaces removed on drop (also after a
//! panic or Ctrl-C), percentiles, and a unique name prefix per run.
#![allow(dead_code)]
use std::{
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, LazyLock,
    },
    time::Duration,
};
use tabby_integration::netns;

pub mod procs;

static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// Turns SIGINT/SIGTERM into a flag the measuring loops poll, so a stopped
/// bench still unwinds and its guards remove what it made.
pub fn catch_interrupts() {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&INTERRUPTED))
            .expect("SIGINT and SIGTERM accept handlers");
    }
}

/// Whether the bench was asked to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Fails with a message when the bench was asked to stop.
pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// A short prefix unique to this run (namespace names are limited in length
/// only by the filesystem, but interface names derived from them are not).
pub fn prefix(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

/// Namespaces this bench created; all are deleted when dropped.
#[derive(Default)]
pub struct Namespaces(Vec<String>);

impl Namespaces {
    /// Creates a namespace (lo up) and takes ownership of it.
    pub fn add(&mut self, name: &str) -> anyhow::Result<String> {
        // Record first: a half-made namespace is still removed.
        self.0.push(name.to_string());
        netns::add(name)?;
        Ok(name.to_string())
    }

    /// Deletes every namespace now.
    pub fn clear(&mut self) {
        for n in self.0.drain(..).rev() {
            netns::del(&n);
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The `p`-quantile (0..=1) of `v`, nearest rank.
pub fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

/// Median.
pub fn median(v: &[Duration]) -> Duration {
    pct(v, 0.5)
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// "a / b" as a ratio.
pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// `ip -n NS route show proto 77` line count for a family.
pub fn count_proto77(ns: &str, v6: bool) -> usize {
    let fam = if v6 { "-6" } else { "-4" };
    Command::new("ip")
        .args(["-n", ns, fam, "route", "show", "proto", "77"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0)
}

/// Fails with a hint when a release binary the lab needs is missing.
pub fn require_bins() -> anyhow::Result<()> {
    let dir = tabby_integration::lab::bin_dir();
    for b in ["tabby-controller", "tabby-node", "tabby"] {
        if !dir.join(b).exists() {
            anyhow::bail!(
                "{b} not found in {}: run `cargo build --release --workspace` first \
                 (or set TABBY_BIN_DIR)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// A usize from the environment, or `d`.
pub fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// What a command printed (trimmed), or nothing.
pub fn output_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Prints the machine, its CPUs and kernel (the figures depend on them),
/// and the peer tool's version line (`peer`: its command and arguments).
pub fn conditions(peer: &[&str]) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let version = peer
        .split_first()
        .map(|(c, a)| output_of(c, a))
        .unwrap_or_default();
    println!(
        "conditions: {} ({}), {} CPUs (nproc), kernel {}, {}",
        model,
        output_of("uname", &["-m"]),
        output_of("nproc", &[]),
        output_of("uname", &["-r"]),
        version.lines().next().unwrap_or("?")
    );
}
