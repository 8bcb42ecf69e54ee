//! Harness for running the real `tabby` binary exactly as a container
//! runtime does: a clean environment with only `CNI_*` variables, the
//! network config on stdin, the result or error read back from stdout.
//!
//! Used by `shim_process.rs` against a fake `PodNetwork` server; meant to be
//! reused by the root tests against a real `tabby-node`.
#![allow(dead_code)]

use serde_json::Value;
use std::ffi::OsString;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the plugin binary cargo built for these tests.
pub fn tabby_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tabby")
}

/// One plugin invocation.
#[derive(Debug, Clone, Default)]
pub struct Cni {
    env: Vec<(String, OsString)>,
    stdin: Vec<u8>,
}

/// What the plugin did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Exit status (`None` if killed by a signal).
    pub status: Option<i32>,
    /// Raw stdout.
    pub stdout: String,
    /// Raw stderr (logs).
    pub stderr: String,
    /// Wall-clock time of the process.
    pub elapsed: Duration,
}

impl Cni {
    /// A verb with nothing else set.
    pub fn verb(verb: &str) -> Self {
        Self::default().env("CNI_COMMAND", verb)
    }

    /// An attachment verb with container id, netns and ifname, plus
    /// `CNI_PATH` as runtimes set it.
    pub fn attachment(verb: &str, container_id: &str, netns: &str, ifname: &str) -> Self {
        Self::verb(verb)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", "/opt/cni/bin")
    }

    /// Set (or replace) an environment variable.
    pub fn env(mut self, k: &str, v: impl Into<OsString>) -> Self {
        self.env.retain(|(n, _)| n != k);
        self.env.push((k.to_string(), v.into()));
        self
    }

    /// Remove an environment variable.
    pub fn unset(mut self, k: &str) -> Self {
        self.env.retain(|(n, _)| n != k);
        self
    }

    /// Network config as JSON.
    pub fn config(mut self, v: &Value) -> Self {
        self.stdin = v.to_string().into_bytes();
        self
    }

    /// Raw stdin bytes.
    pub fn stdin(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.stdin = b.into();
        self
    }

    /// Run the binary and wait for it.
    pub fn run(&self) -> Outcome {
        self.run_with(tabby_bin())
    }

    /// Run another CNI plugin binary the same way (e.g. a chained one).
    pub fn run_with(&self, binary: &str) -> Outcome {
        let started = Instant::now();
        let mut child = Command::new(binary)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn plugin");
        let mut stdin = child.stdin.take().expect("stdin");
        let data = self.stdin.clone();
        // VERSION does not read stdin; a write error (EPIPE) is fine then.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output().expect("wait plugin");
        let _ = writer.join();
        Outcome {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }
}

impl Outcome {
    /// stdout as exactly one JSON document (panics with context otherwise).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }

    /// Assert a CNI error with `code` and a non-zero exit; returns the JSON.
    pub fn expect_error(&self, code: u64) -> Value {
        assert_ne!(self.status, Some(0), "expected failure: {self:#?}");
        assert!(self.status.is_some(), "killed by a signal: {self:#?}");
        let v = self.json();
        assert_eq!(v["code"].as_u64(), Some(code), "wrong code: {self:#?}");
        assert!(v["msg"].is_string() && v["cniVersion"].is_string(), "{v}");
        assert!(v.get("details").is_some(), "{v}");
        v
    }

    /// Assert success with nothing on stdout (DEL, CHECK, STATUS, GC).
    pub fn expect_silent_success(&self) {
        assert_eq!(self.status, Some(0), "expected success: {self:#?}");
        assert_eq!(self.stdout, "", "stdout must be empty: {self:#?}");
    }

    /// Assert success and return the printed result.
    pub fn expect_result(&self) -> Value {
        assert_eq!(self.status, Some(0), "expected success: {self:#?}");
        self.json()
    }

    /// Assert the plugin ended normally: exit 0 or 1, stdout empty or one
    /// JSON object, and no panic text on stderr.
    pub fn expect_no_panic(&self) {
        assert!(matches!(self.status, Some(0) | Some(1)), "{self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        assert!(!self.stderr.contains("internal error (panic)"), "{self:#?}");
        if !self.stdout.is_empty() {
            assert!(self.json().is_object(), "{self:#?}");
        }
    }
}
