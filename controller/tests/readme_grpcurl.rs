//! Runs every grpcurl example of the README, in order, with real grpcurl
//! against a fresh controller, so the docs cannot rot. grpcurl comes from
//! `make deps` (TABBY_GRPCURL); a missing grpcurl fails the test, it never skips.
#![allow(clippy::unwrap_used)]
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

fn grpcurl() -> PathBuf {
    let p = std::env::var_os("TABBY_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tools/grpcurl-venv/bin/grpcurl")
        });
    assert!(
        p.exists(),
        "grpcurl not found at {} (run `make deps`, or set TABBY_GRPCURL)",
        p.display()
    );
    p
}

/// The example commands: lines starting with `grpcurl` between the markers,
/// with an optional `# expect: Code` for calls that must fail.
fn examples() -> Vec<(String, Option<String>)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- grpcurl-examples:start -->")
        .expect("start marker");
    let end = readme
        .find("<!-- grpcurl-examples:end -->")
        .expect("end marker");
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with("grpcurl "))
        .map(|l| match l.split_once(" # expect: ") {
            Some((cmd, code)) => (cmd.to_string(), Some(code.trim().to_string())),
            None => (l.to_string(), None),
        })
        .collect()
}

struct Controller(std::process::Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readme_grpcurl_examples_run() {
    let grpcurl = grpcurl();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tabby-controller"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let ctl = Controller(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listen=") {
                let _ = tx.send(
                    line[i + 7..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                );
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("controller did not start");

    let ex = examples();
    assert!(ex.len() >= 20, "only {} examples found", ex.len());
    for (cmd, expect) in ex {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("grpcurl() {{ \"$GRPCURL\" \"$@\"; }}; {cmd}"))
            .env("GRPCURL", &grpcurl)
            .env("TABBY", &addr)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match expect {
            None => assert!(
                out.status.success(),
                "README example failed: {cmd}\nstdout: {stdout}\nstderr: {stderr}"
            ),
            Some(code) => {
                assert!(
                    !out.status.success(),
                    "README example should fail with {code}: {cmd}"
                );
                assert!(
                    stderr.contains(&format!("Code: {code}")),
                    "README example {cmd}: want {code}, got {stderr}"
                );
            }
        }
    }
    drop(ctl);
}
