//! The `tabby` CNI plugin: reads the CNI environment and the network config,
//! forwards the verb to `tabby-node` over its Unix socket
//! (`tabby.v1.PodNetwork`), and prints the CNI result or error.
//!
//! Pure parts — [`verb`], [`env`], [`args`], [`config`], [`version`],
//! [`result`], [`error`] — take plain data and return plain data; so does
//! [`plan`], apart from its calls through [`plan::NodeApi`], which tests
//! replace. The edge — [`client`] and [`run`] — does the socket, stdin and
//! stdout; the binary alone ends the process.

pub mod args;
pub mod client;
pub mod config;
pub mod env;
pub mod error;
pub mod log;
pub mod plan;
pub mod result;
pub mod verb;
pub mod version;

use crate::env::Env;
use crate::error::{code, CniError};
use crate::log::{Level, Logger};
use crate::plan::{Invocation, Request};
use crate::verb::Verb;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Larger stdin is refused (code 5): a GC list for thousands of pods is
/// far below this.
pub const MAX_STDIN: u64 = 16 << 20;

/// Set once something has been printed on stdout, so a panic never adds a
/// second JSON document.
static STDOUT_USED: AtomicBool = AtomicBool::new(false);
/// `cniVersion` for an error printed by the panic hook.
static ERROR_VERSION: Mutex<String> = Mutex::new(String::new());

fn set_error_version(v: &str) {
    if let Ok(mut g) = ERROR_VERSION.lock() {
        *g = v.to_string();
    }
}

/// Print `text` and a newline on stdout, once. False if stdout failed.
fn emit(text: &str) -> bool {
    if STDOUT_USED.swap(true, Ordering::SeqCst) {
        return false;
    }
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush())
        .is_ok()
}

/// Log the error, print its JSON on stdout, and return the exit status.
fn fail(log: &Logger, e: &CniError, cni_version: &str) -> u8 {
    log.error(&e.to_string());
    emit(&e.to_json(cni_version));
    1
}

/// Report a panic as the CNI error it must end as: the message on stderr,
/// and on stdout the error JSON (code 999), unless a document was printed
/// already. Returns the exit status; the binary installs this as its panic
/// hook and exits with it, which also holds with `panic = "abort"`.
pub fn report_panic(info: &std::panic::PanicHookInfo<'_>) -> u8 {
    let _ = writeln!(std::io::stderr(), "tabby: internal error: {info}");
    let version = ERROR_VERSION.lock().map(|g| g.clone()).unwrap_or_default();
    let version = if version.is_empty() {
        version::SpecVersion::LATEST.as_str().to_string()
    } else {
        version
    };
    let e =
        CniError::internal("tabby plugin internal error (panic)").with_details(info.to_string());
    emit(&e.to_json(&version));
    1
}

fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            CniError::new(
                code::IO,
                "cannot read network config from stdin",
                e.to_string(),
            )
        })?;
    if buf.len() as u64 > MAX_STDIN {
        return Err(CniError::new(
            code::IO,
            format!("network config on stdin is larger than {MAX_STDIN} bytes"),
            "",
        ));
    }
    Ok(buf)
}

/// Whether `netns` is the network namespace this process runs in (the
/// host's): wiring "the pod" there would break the node. `None` when either
/// cannot be inspected (e.g. the namespace is already gone).
fn is_own_netns(netns: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(netns).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    Some(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

/// Refuse ADD/CHECK into our own namespace; DEL still releases the address
/// but is told there is no namespace to clean.
fn guard_netns(inv: &mut Invocation, log: &Logger) -> Result<(), CniError> {
    if inv.env.netns.is_empty() || is_own_netns(Path::new(&inv.env.netns)) != Some(true) {
        return Ok(());
    }
    match &mut inv.request {
        Request::Del(req) => {
            log.warn("CNI_NETNS is the plugin's own network namespace; deleting without it");
            req.netns.clear();
            Ok(())
        }
        _ => Err(CniError::new(
            code::INVALID_NETNS,
            "CNI_NETNS is the plugin's own network namespace",
            inv.env.netns.clone(),
        )),
    }
}

/// The whole plugin; returns the process exit status. The caller installs
/// [`report_panic`] as the panic hook first.
pub fn run() -> u8 {
    let started = Instant::now();
    let early_log = Logger::stderr(Level::Info);

    let env = match Env::from_lookup(|k| std::env::var_os(k)) {
        Ok(e) => e,
        Err(e) => return fail(&early_log, &e, version::SpecVersion::LATEST.as_str()),
    };
    // Debug builds only: lets the process tests prove that a panic still
    // ends as a CNI error on stdout.
    #[cfg(debug_assertions)]
    if std::env::var_os("TABBY_CNI_TEST_PANIC").is_some() {
        panic!("panic requested by TABBY_CNI_TEST_PANIC");
    }
    if env.verb == Verb::Version {
        return if emit(&version::version_json()) { 0 } else { 1 };
    }
    let stdin = match read_stdin() {
        Ok(b) => b,
        Err(e) => return fail(&early_log, &e, version::SpecVersion::LATEST.as_str()),
    };
    let mut inv = match plan::prepare(env, &stdin) {
        Ok(i) => i,
        Err(f) => return fail(&early_log, &f.error, &f.cni_version),
    };
    let version = inv.conf.version.as_str();
    set_error_version(version);

    let mut log = match &inv.conf.log_file {
        Some(p) => Logger::file(p, inv.conf.log_level),
        None => Logger::stderr(inv.conf.log_level),
    };
    let verb = inv.env.verb;
    log.set_context(&[
        ("verb", verb.as_str()),
        ("network", &inv.conf.name),
        ("container", &inv.env.container_id),
        ("ifname", &inv.env.ifname),
        ("pod_namespace", &inv.args.pod_namespace),
        ("pod", &inv.args.pod_name),
    ]);
    if log.enabled(Level::Debug) {
        log.debug(&format!(
            "netns={:?} cni_version={version} socket={} ignored_args={:?} request={:?}",
            inv.env.netns,
            inv.conf.socket.display(),
            inv.args.ignored,
            inv.request
        ));
    }
    if let Err(e) = guard_netns(&mut inv, &log) {
        return fail(&log, &e, version);
    }
    if let Request::NothingToDelete(why) = &inv.request {
        log.warn(&format!(
            "DEL succeeds without calling tabby-node: no ADD can have attached this ({why})"
        ));
        return 0;
    }

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = CniError::new(code::IO, "cannot start the I/O runtime", e.to_string());
            return fail(&log, &e, version);
        }
    };
    let socket = inv.conf.socket.clone();
    let outcome = rt.block_on(async {
        let mut node =
            client::NodeClient::connect(&socket, inv.conf.connect_timeout, inv.conf.timeout)
                .await
                .map_err(|detail| {
                    error::node_unreachable(verb, &socket.display().to_string(), &detail)
                })?;
        plan::execute(&inv, &mut node).await
    });
    // Drop the runtime (and its connection) before printing: nothing may run
    // after the result is out.
    drop(rt);
    match outcome {
        Ok(o) => {
            log.info(&format!(
                "ok in {:.1} ms {}",
                started.elapsed().as_secs_f64() * 1e3,
                o.summary
            ));
            match o.stdout {
                Some(s) if !emit(&s) => 1,
                _ => 0,
            }
        }
        Err(e) => fail(&log, &e, version),
    }
}
