//! The controller's allocator (issue 17's memory budget): jemalloc, with
//! background purging and freed pages returned within about a second, as
//! `.cargo/config.toml` builds it. Read from the binary itself: jemalloc
//! prints its options at exit when asked through its environment.
#![allow(clippy::unwrap_used)]
use std::process::Command;

#[test]
fn controller_runs_on_jemalloc_with_quick_purging() {
    let out = Command::new(env!("CARGO_BIN_EXE_tabby-controller"))
        .arg("--version")
        .env(
            "_RJEM_MALLOC_CONF",
            "stats_print:true,stats_print_opts:mdablxe",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for opt in [
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
    ] {
        assert!(
            err.lines().any(|l| l.trim_start().starts_with(opt)),
            "{opt} not in jemalloc's options:\n{err}"
        );
    }
}
