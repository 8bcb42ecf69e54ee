//! What the controller's benchmarks share: finding the binary under test,
//! and reading the machine and the process they measure.
// Each bench uses part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The controller binary, and where it was found: `$TABBY_CONTROLLER_BIN`;
/// the one cargo built for this bench; `tabby-controller` beside the bench's
/// own directory; or `<workspace>/target/release/tabby-controller`.
pub fn find_binary() -> (PathBuf, &'static str) {
    if let Some(p) = std::env::var_os("TABBY_CONTROLLER_BIN") {
        return (PathBuf::from(p), "$TABBY_CONTROLLER_BIN");
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tabby-controller"));
    if built.is_file() {
        return (built, "built by cargo for this bench");
    }
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("tabby-controller")))
        .filter(|p| p.is_file())
    {
        return (p, "beside the bench executable");
    }
    (
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tabby-controller"),
        "<workspace>/target/release",
    )
}

/// File system type of the mount holding `p` (from /proc/mounts).
pub fn fs_type(p: &Path) -> String {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && p.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} on {}", f[2], f[1])))
        })
        .max()
        .map(|(_, s)| s)
        .unwrap_or_else(|| "unknown".into())
}

/// VmRSS of process `pid` in KiB (0 if unreadable).
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of process `pid` ("self" for this one), from
/// /proc; zero where unavailable.
pub fn cpu_time(pid: &str) -> std::time::Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return std::time::Duration::ZERO;
    };
    // utime and stime: the 14th and 15th fields, counted from after the
    // parenthesised command name as the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse::<u64>().ok())
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    std::time::Duration::from_secs_f64(ticks as f64 / hz)
}
