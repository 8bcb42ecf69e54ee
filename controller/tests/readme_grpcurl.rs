//! Runs every grpcurl example of the README, in order, with real grpcurl
//! against a fresh controller over mutual TLS, so the docs cannot rot: the
//! README's `tabby-controller certs` lines make the certificates (with the
//! binary under test), its `VAR="..."` lines set the variables the calls
//! use, and the controller serves with the certificates they made. grpcurl
//! comes from `make deps` (TABBY_GRPCURL); a missing grpcurl fails the test,
//! it never skips.
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

/// The lines between the markers.
fn block() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- grpcurl-examples:start -->")
        .expect("start marker");
    let end = readme
        .find("<!-- grpcurl-examples:end -->")
        .expect("end marker");
    readme[start..end].lines().map(str::to_string).collect()
}

/// The example commands: lines starting with `grpcurl`, with an optional
/// `# expect: Code` for calls that must fail.
fn examples() -> Vec<(String, Option<String>)> {
    block()
        .into_iter()
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

/// The README's shell prelude: its `tabby-controller certs` commands and
/// its variable assignments, in order.
fn prelude() -> String {
    block()
        .into_iter()
        .filter(|l| {
            l.starts_with("tabby-controller certs ")
                || (l.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                }) && !l.starts_with("TABBY="))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn readme_grpcurl_examples_run() {
    let grpcurl = grpcurl();
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_tabby-controller");
    let pre = prelude();
    assert!(pre.contains("certs init"), "no certs lines found:\n{pre}");
    // The certificates, made as the README makes them.
    // bash: dash refuses `-` in a function name.
    let made = Command::new("bash")
        .arg("-ec")
        .arg(format!("tabby-controller() {{ \"$BIN\" \"$@\"; }}; {pre}"))
        .env("BIN", bin)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "README certs lines failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let certs = dir.path().join("certs");
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(certs.join("server.pem"))
        .arg("--tls-key")
        .arg(certs.join("server-key.pem"))
        .arg("--client-ca")
        .arg(certs.join("ca.pem"))
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
        // Variables only: the certificates exist already.
        let vars: String = pre
            .lines()
            .filter(|l| !l.starts_with("tabby-controller"))
            .map(|l| format!("{l}; "))
            .collect();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("grpcurl() {{ \"$GRPCURL\" \"$@\"; }}; {vars}{cmd}"))
            .env("GRPCURL", &grpcurl)
            .current_dir(dir.path())
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
