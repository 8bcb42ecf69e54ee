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
    // Lines read `  opt.dirty_decay_ms: 1000 (arenas.dirty_decay_ms: 1000)`:
    // the name and the value as whole words (10000 is not 1000).
    let value = |name: &str| {
        err.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == format!("opt.{name}:")).then(|| w.next().map(str::to_string))?
        })
    };
    for (name, want) in [
        ("background_thread", "true"),
        ("dirty_decay_ms", "1000"),
        ("muzzy_decay_ms", "0"),
    ] {
        assert_eq!(
            value(name).as_deref(),
            Some(want),
            "jemalloc's {name}; its options:\n{err}"
        );
    }
}
