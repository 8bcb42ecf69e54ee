//! The real `tabby` binary, run as a runtime runs it, against a tiny fake
//! `tabby.v1.PodNetwork` server on a Unix socket in a temp dir. The fake
//! only exercises the shim's own protocol handling; end-to-end tests against
//! a real `tabby-node` live with the root tests.
#![allow(clippy::unwrap_used)]

mod common;

use common::Cni;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tabby_proto::v1 as pb;
use tabby_proto::v1::pod_network_server::{PodNetwork, PodNetworkServer};
use tonic::{Request, Response, Status};

// ---------------------------------------------------------------------------
// Fake node
// ---------------------------------------------------------------------------

#[derive(Default)]
struct State {
    /// (container, ifname) -> address
    attached: BTreeMap<(String, String), String>,
    next: u8,
    adds: Vec<pb::PodAddRequest>,
    dels: Vec<pb::PodDelRequest>,
    checks: Vec<pb::PodCheckRequest>,
    gcs: Vec<pb::PodGcRequest>,
}

#[derive(Clone, Default)]
struct FakeNode {
    state: Arc<Mutex<State>>,
    not_ready: Arc<AtomicBool>,
}

fn key(a: &Option<pb::PodAttachment>) -> Result<(String, String), Status> {
    let a = a
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("no attachment"))?;
    Ok((a.container_id.clone(), a.ifname.clone()))
}

#[tonic::async_trait]
impl PodNetwork for FakeNode {
    async fn add(
        &self,
        req: Request<pb::PodAddRequest>,
    ) -> Result<Response<pb::PodAddResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.state.lock().unwrap();
        st.adds.push(req.clone());
        let k = key(&req.attachment)?;
        if k.0.starts_with("unavail") {
            return Err(Status::unavailable("controller unavailable"));
        }
        if st.attached.contains_key(&k) {
            return Err(Status::already_exists(format!(
                "{}/{} is attached",
                k.0, k.1
            )));
        }
        st.next += 1;
        let addr = format!("10.244.1.{}/32", st.next);
        st.attached.insert(k.clone(), addr.clone());
        Ok(Response::new(pb::PodAddResponse {
            host_ifname: format!("tab{:0>12}", st.next),
            host_mac: "ee:ee:ee:ee:ee:ee".into(),
            pod_ifname: k.1,
            pod_mac: "02:42:0a:f4:01:05".into(),
            addresses: vec![addr],
            gateways: vec!["169.254.1.1".into()],
            mtu: if req.mtu == 0 { 1500 } else { req.mtu },
        }))
    }

    async fn del(
        &self,
        req: Request<pb::PodDelRequest>,
    ) -> Result<Response<pb::PodDelResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.state.lock().unwrap();
        st.dels.push(req.clone());
        let k = key(&req.attachment)?;
        // Idempotent: no record is success.
        let released = st.attached.remove(&k).into_iter().collect();
        Ok(Response::new(pb::PodDelResponse { released }))
    }

    async fn check(
        &self,
        req: Request<pb::PodCheckRequest>,
    ) -> Result<Response<pb::PodCheckResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.state.lock().unwrap();
        st.checks.push(req.clone());
        let k = key(&req.attachment)?;
        match st.attached.get(&k) {
            None => Err(Status::not_found("no such attachment")),
            Some(a) if req.expected_addresses != vec![a.clone()] => {
                Err(Status::failed_precondition(format!(
                    "has {a}, expected {:?}",
                    req.expected_addresses
                )))
            }
            Some(_) => Ok(Response::new(pb::PodCheckResponse {})),
        }
    }

    async fn status(
        &self,
        _: Request<pb::PodStatusRequest>,
    ) -> Result<Response<pb::PodStatusResponse>, Status> {
        let ready = !self.not_ready.load(Ordering::SeqCst);
        Ok(Response::new(pb::PodStatusResponse {
            ready,
            reason: if ready {
                String::new()
            } else {
                "controller unreachable".into()
            },
            ..Default::default()
        }))
    }

    async fn gc(
        &self,
        req: Request<pb::PodGcRequest>,
    ) -> Result<Response<pb::PodGcResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.state.lock().unwrap();
        st.gcs.push(req.clone());
        let valid: Vec<(String, String)> = req
            .valid
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        let stale: Vec<(String, String)> = st
            .attached
            .keys()
            .filter(|k| !valid.contains(k))
            .cloned()
            .collect();
        for k in &stale {
            st.attached.remove(k);
        }
        Ok(Response::new(pb::PodGcResponse {
            released_handles: stale
                .iter()
                .map(|(c, _)| format!("{}.{c}", req.network))
                .collect(),
        }))
    }
}

/// A running fake node; stops when dropped.
struct Node {
    fake: FakeNode,
    dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        // Bound before the plugin can run: no race with the first call.
        let std_listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let fake = FakeNode::default();
        let svc = fake.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(std_listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(PodNetworkServer::new(svc))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        Self {
            fake,
            dir,
            socket,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.fake.state.lock().unwrap()
    }

    /// A file standing in for a pod's netns path (exists, not our netns).
    fn netns(&self, name: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, b"").unwrap();
        p.display().to_string()
    }

    fn conf(&self, version: &str) -> Value {
        conf(version, &self.socket)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn conf(version: &str, socket: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "tabby",
        "socket": socket,
        "mtu": 1450,
        "timeout_ms": 5000,
    })
}

fn missing_socket() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no-node-here.sock");
    (dir, p)
}

const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                        K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=0000-1111";

// ---------------------------------------------------------------------------
// Without a node
// ---------------------------------------------------------------------------

#[test]
fn version_prints_supported_versions() {
    let out = Cni::verb("VERSION").run();
    assert_eq!(out.status, Some(0), "{out:#?}");
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    assert_eq!(out.stderr, "", "VERSION logs nothing");
    // stdin is ignored for VERSION, whatever it holds.
    let out = Cni::verb("VERSION").stdin(&b"\x00garbage"[..]).run();
    assert_eq!(out.status, Some(0));
}

#[test]
fn malformed_stdin_is_code_6() {
    for bad in [
        &b"{not json"[..],
        b"",
        b"[1,2]",
        b"{\"cniVersion\":\"1.0.0\"} trailing",
    ] {
        let out = Cni::attachment("ADD", "c1", "/var/run/netns/x", "eth0")
            .stdin(bad)
            .run();
        out.expect_error(6);
        // Exactly one line on stdout: the error document.
        assert_eq!(out.stdout.lines().count(), 1, "{out:#?}");
    }
}

#[test]
fn missing_cni_command_is_code_4() {
    let out = Cni::default().stdin(&b"{}"[..]).run();
    let v = out.expect_error(4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"));
    let out = Cni::verb("FROB").stdin(&b"{}"[..]).run();
    out.expect_error(4);
}

#[test]
fn missing_attachment_env_is_code_4() {
    let (_d, sock) = missing_socket();
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0")
        .unset("CNI_NETNS")
        .config(&conf("1.0.0", &sock))
        .run();
    let v = out.expect_error(4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"), "{v}");
    let out = Cni::attachment("DEL", "c1", "/ns", "eth0")
        .unset("CNI_IFNAME")
        .config(&conf("1.0.0", &sock))
        .run();
    out.expect_error(4);
}

#[test]
fn unknown_cni_args_key_without_ignore_unknown_is_an_error() {
    let (_d, sock) = missing_socket();
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0")
        .env("CNI_ARGS", "K8S_POD_NAME=web-0;FOO=bar")
        .config(&conf("0.4.0", &sock))
        .run();
    let v = out.expect_error(4);
    assert!(v["msg"].as_str().unwrap().contains("FOO"), "{v}");
    assert_eq!(v["cniVersion"], "0.4.0");
    // With IgnoreUnknown the args pass and the plugin gets as far as the socket.
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0")
        .env("CNI_ARGS", "IgnoreUnknown=1;FOO=bar")
        .config(&conf("0.4.0", &sock))
        .run();
    out.expect_error(11);
}

#[test]
fn add_with_no_node_socket_is_try_again_later() {
    let (_d, sock) = missing_socket();
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0")
        .config(&conf("1.0.0", &sock))
        .run();
    let v = out.expect_error(11);
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(
        v["details"].as_str().unwrap().contains("No such file"),
        "{v}"
    );
    // The error is logged on stderr, never on stdout.
    assert!(out.stderr.contains("CNI error 11"), "{out:#?}");
    // DEL cannot reach the node either: an error the runtime retries.
    Cni::attachment("DEL", "c1", "", "eth0")
        .config(&conf("1.0.0", &sock))
        .run()
        .expect_error(11);
}

#[test]
fn status_with_node_down_is_code_50() {
    let (_d, sock) = missing_socket();
    let out = Cni::verb("STATUS").config(&conf("1.1.0", &sock)).run();
    out.expect_error(50);
    // STATUS does not exist before 1.1.0.
    Cni::verb("STATUS")
        .config(&conf("1.0.0", &sock))
        .run()
        .expect_error(1);
}

#[test]
fn unsupported_version_and_fields() {
    let (_d, sock) = missing_socket();
    let mut c = conf("0.2.0", &sock);
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0").config(&c).run();
    out.expect_error(1);
    c["cniVersion"] = json!("1.0.0");
    c["bridge"] = json!("cni0");
    let v = Cni::attachment("ADD", "c1", "/ns", "eth0")
        .config(&c)
        .run()
        .expect_error(2);
    assert!(v["details"].as_str().unwrap().contains("bridge"));
    Cni::attachment("CHECK", "c1", "/ns", "eth0")
        .config(&conf("0.3.1", &sock))
        .run()
        .expect_error(1);
}

#[test]
fn logs_go_to_the_configured_file_not_stdout() {
    let (d, sock) = missing_socket();
    let log = d.path().join("log/cni.log");
    let mut c = conf("1.0.0", &sock);
    c["log_file"] = json!(log);
    c["log_level"] = json!("debug");
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0").config(&c).run();
    out.expect_error(11);
    assert_eq!(out.stderr, "", "{out:#?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("DEBUG") && text.contains("CNI error 11"),
        "{text}"
    );
}

#[test]
fn garbage_never_panics() {
    let (_d, sock) = missing_socket();
    let sock = sock.display().to_string();
    let big = "9".repeat(5000);
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let stdins: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff, 0xfe, 0x00, 0x01, 0x80],
        (0..=255u8).cycle().take(70_000).collect(),
        nested.into_bytes(),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"tabby","mtu":{big}}}"#).into_bytes(),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"tabby","mtu":1e400,"socket":"{sock}"}}"#).into_bytes(),
        format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"tabby","timeout_ms":-1,"socket":"{sock}"}}"#).into_bytes(),
        format!(r#"{{"cniVersion":"{big}","name":"n","type":"tabby"}}"#).into_bytes(),
        br#"{"cniVersion":"1.0.0","name":"n","type":"tabby","prevResult":{"ips":[{"address":"x","interface":18446744073709551616}]}}"#.to_vec(),
        br#"{"cniVersion":"1.1.0","name":"n","type":"tabby","cni.dev/valid-attachments":[[[]]]}"#.to_vec(),
        b"\"\\ud800\"".to_vec(),
        b"{\"a\":\"\\u0000\"}".to_vec(),
    ];
    for verb in ["ADD", "DEL", "CHECK", "STATUS", "GC"] {
        for stdin in &stdins {
            let out = Cni::attachment(verb, "c1", "/ns", "eth0")
                .stdin(stdin.clone())
                .run();
            out.expect_no_panic();
            assert_ne!(out.status, Some(0), "{verb} {out:#?}");
        }
    }
    // Odd environments.
    let good = conf("1.0.0", Path::new(&sock)).to_string();
    let envs: Vec<Cni> = vec![
        Cni::attachment("ADD", &"a".repeat(100_000), "/ns", "eth0"),
        Cni::attachment("ADD", "c1", "/ns", &"e".repeat(1000)),
        Cni::attachment("ADD", "c1", "/ns", "eth0").env("CNI_ARGS", ";".repeat(10_000)),
        Cni::attachment("ADD", "c1", "/ns", "eth0").env("CNI_ARGS", "IP=".to_string() + &big),
        Cni::attachment("ADD", "c1", "/ns", "eth0").env(
            "CNI_ARGS",
            std::ffi::OsString::from_vec(vec![0xff, b'=', 0xfe]),
        ),
        // (Environment values cannot hold NUL; a newline and DEL can.)
        Cni::attachment("ADD", "c1", "/ns\n\u{7f}", "eth0"),
        Cni::verb("\u{1F600}"),
    ];
    for cni in envs {
        let out = cni.stdin(good.clone()).run();
        out.expect_no_panic();
        assert_ne!(out.status, Some(0), "{out:#?}");
    }
}

#[test]
fn a_panic_still_prints_a_cni_error() {
    // The hook is compiled into debug builds only.
    if !cfg!(debug_assertions) {
        return;
    }
    let out = Cni::verb("VERSION").env("TABBY_CNI_TEST_PANIC", "1").run();
    let v = out.expect_error(999);
    assert!(
        v["details"]
            .as_str()
            .unwrap()
            .contains("TABBY_CNI_TEST_PANIC"),
        "{v}"
    );
    assert_eq!(out.stdout.lines().count(), 1);
}

#[test]
fn a_node_that_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("hung.sock");
    // Bound, never accepted: connect succeeds, nothing ever answers.
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut c = conf("1.1.0", &sock);
    c["timeout_ms"] = json!(300);
    c["connect_timeout_ms"] = json!(300);
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0").config(&c).run();
    out.expect_error(11);
    assert!(out.elapsed < std::time::Duration::from_secs(3), "{out:#?}");
    Cni::verb("STATUS").config(&c).run().expect_error(50);
}

/// A socket that accepts connections and never says a word, as a wedged
/// tabby-node would. Stops accepting when dropped.
struct SilentListener {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentListener {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("silent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Self {
            _dir: dir,
            socket,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_node_that_accepts_and_never_speaks_http2_fails_within_connect_timeout() {
    let node = SilentListener::start();
    let mut c = conf("1.1.0", &node.socket);
    // The per-call timeout stays at its default; only the connect timeout
    // may bound the wait.
    c["timeout_ms"] = json!(30_000);
    c["connect_timeout_ms"] = json!(300);
    let limit = std::time::Duration::from_secs(2);
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0").config(&c).run();
    let v = out.expect_error(11);
    assert!(out.elapsed < limit, "{out:#?}");
    assert!(
        v["details"]
            .as_str()
            .unwrap()
            .contains("no HTTP/2 handshake"),
        "{v}"
    );
    let out = Cni::verb("STATUS").config(&c).run();
    out.expect_error(50);
    assert!(out.elapsed < limit, "{out:#?}");
    // With the defaults (2 s connect timeout), well before the 30 s call
    // timeout.
    c.as_object_mut().unwrap().remove("connect_timeout_ms");
    let out = Cni::attachment("ADD", "c1", "/ns", "eth0").config(&c).run();
    out.expect_error(11);
    assert!(out.elapsed < std::time::Duration::from_secs(4), "{out:#?}");
}

// ---------------------------------------------------------------------------
// Against the fake node
// ---------------------------------------------------------------------------

#[test]
fn add_result_in_0_3_1_schema() {
    let node = Node::start();
    let ns = node.netns("pod-a");
    let out = Cni::attachment("ADD", "ctr-a", &ns, "eth0")
        .env("CNI_ARGS", K8S_ARGS)
        .config(&node.conf("0.3.1"))
        .run();
    let v = out.expect_result();
    assert_eq!(
        v,
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                {"name": "tab000000000001", "mac": "ee:ee:ee:ee:ee:ee"},
                {"name": "eth0", "mac": "02:42:0a:f4:01:05", "sandbox": ns}
            ],
            "ips": [{"version": "4", "address": "10.244.1.1/32", "gateway": "169.254.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            "dns": {}
        })
    );
    let st = node.state();
    let req = &st.adds[0];
    assert_eq!(req.netns, ns);
    assert_eq!(
        (req.pod_namespace.as_str(), req.pod_name.as_str()),
        ("default", "web-0")
    );
    assert_eq!(req.mtu, 1450);
    assert_eq!(req.attachment.as_ref().unwrap().network, "k8s-pod-network");
}

#[test]
fn add_result_in_1_0_0_schema_and_requested_ip() {
    let node = Node::start();
    let ns = node.netns("pod-b");
    let out = Cni::attachment("ADD", "ctr-b", &ns, "eth0")
        .env("CNI_ARGS", "IgnoreUnknown=1;IP=10.244.1.77")
        .config(&node.conf("1.0.0"))
        .run();
    let v = out.expect_result();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(
        v["ips"],
        json!([{"address": "10.244.1.1/32", "gateway": "169.254.1.1", "interface": 1}])
    );
    assert_eq!(v["interfaces"][1]["sandbox"], json!(ns));
    assert!(v["interfaces"][0].get("sandbox").is_none());
    assert_eq!(
        v["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
    );
    assert_eq!(node.state().adds[0].requested_address, "10.244.1.77");
}

#[test]
fn add_check_del_cycle_with_prev_result() {
    let node = Node::start();
    let ns = node.netns("pod-c");
    let c = node.conf("1.0.0");
    let result = Cni::attachment("ADD", "ctr-c", &ns, "eth0")
        .config(&c)
        .run()
        .expect_result();

    // CHECK with the cached result as prevResult.
    let mut check = c.clone();
    check["prevResult"] = result.clone();
    Cni::attachment("CHECK", "ctr-c", &ns, "eth0")
        .config(&check)
        .run()
        .expect_silent_success();
    assert_eq!(
        node.state().checks[0].expected_addresses,
        vec!["10.244.1.1/32"]
    );

    // A prevResult naming another address fails the check.
    let mut wrong = check.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("10.244.1.99/32");
    Cni::attachment("CHECK", "ctr-c", &ns, "eth0")
        .config(&wrong)
        .run()
        .expect_error(101);

    // DEL with prevResult, then again: both succeed silently.
    for _ in 0..2 {
        Cni::attachment("DEL", "ctr-c", &ns, "eth0")
            .config(&check)
            .run()
            .expect_silent_success();
    }
    let st = node.state();
    assert_eq!(st.dels.len(), 2);
    assert!(st.attached.is_empty());
}

#[test]
fn del_with_empty_netns_succeeds() {
    let node = Node::start();
    let ns = node.netns("pod-d");
    Cni::attachment("ADD", "ctr-d", &ns, "eth0")
        .config(&node.conf("0.4.0"))
        .run()
        .expect_result();
    let out = Cni::attachment("DEL", "ctr-d", "", "eth0")
        .config(&node.conf("0.4.0"))
        .run();
    out.expect_silent_success();
    // Unset entirely, and for a container the node never saw.
    Cni::attachment("DEL", "never-added", "", "eth0")
        .unset("CNI_NETNS")
        .config(&node.conf("0.4.0"))
        .run()
        .expect_silent_success();
    let st = node.state();
    assert_eq!(st.dels[0].netns, "");
    assert!(st.attached.is_empty());
}

#[test]
fn gc_with_both_attachment_keys() {
    let node = Node::start();
    for (c, n) in [("keep-1", "p1"), ("gone-2", "p2"), ("keep-3", "p3")] {
        let ns = node.netns(n);
        Cni::attachment("ADD", c, &ns, "eth0")
            .config(&node.conf("1.1.0"))
            .run()
            .expect_result();
    }
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep-1", "ifname": "eth0"}]);
    gc["cni.dev/attachments"] = json!([{"containerID": "keep-1", "ifname": "eth0"}, {"containerID": "keep-3", "ifname": "eth0"}]);
    Cni::verb("GC")
        .env("CNI_PATH", "/opt/cni/bin")
        .config(&gc)
        .run()
        .expect_silent_success();
    {
        let st = node.state();
        assert_eq!(st.gcs[0].network, "k8s-pod-network");
        let ids: Vec<&str> = st.gcs[0]
            .valid
            .iter()
            .map(|a| a.container_id.as_str())
            .collect();
        assert_eq!(ids, vec!["keep-1", "keep-3"]);
        assert_eq!(st.attached.len(), 2);
    }
    // The older key alone.
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/attachments"] = json!([{"containerID": "keep-3", "ifname": "eth0"}]);
    Cni::verb("GC").config(&gc).run().expect_silent_success();
    let st = node.state();
    assert_eq!(st.gcs[1].valid.len(), 1);
    assert_eq!(st.attached.len(), 1);
}

#[test]
fn gc_without_a_list_releases_nothing() {
    let node = Node::start();
    Cni::verb("GC")
        .config(&node.conf("1.1.0"))
        .run()
        .expect_error(7);
    assert!(node.state().gcs.is_empty());
}

#[test]
fn controller_unavailable_is_code_11() {
    let node = Node::start();
    let ns = node.netns("pod-e");
    let v = Cni::attachment("ADD", "unavail-1", &ns, "eth0")
        .config(&node.conf("1.0.0"))
        .run()
        .expect_error(11);
    assert_eq!(v["details"], "controller unavailable");
}

#[test]
fn duplicate_add_is_an_error() {
    let node = Node::start();
    let ns = node.netns("pod-f");
    Cni::attachment("ADD", "ctr-f", &ns, "eth0")
        .config(&node.conf("1.0.0"))
        .run()
        .expect_result();
    let v = Cni::attachment("ADD", "ctr-f", &ns, "eth0")
        .config(&node.conf("1.0.0"))
        .run()
        .expect_error(100);
    assert!(v["details"].as_str().unwrap().contains("attached"));
    // Another interface of the same container is a different attachment.
    Cni::attachment("ADD", "ctr-f", &ns, "net1")
        .config(&node.conf("1.0.0"))
        .run()
        .expect_result();
}

#[test]
fn status_ready_and_not_ready() {
    let node = Node::start();
    Cni::verb("STATUS")
        .config(&node.conf("1.1.0"))
        .run()
        .expect_silent_success();
    node.fake.not_ready.store(true, Ordering::SeqCst);
    let v = Cni::verb("STATUS")
        .config(&node.conf("1.1.0"))
        .run()
        .expect_error(50);
    assert_eq!(v["details"], "controller unreachable");
}

#[test]
fn chained_after_another_plugin_keeps_prev_result() {
    let node = Node::start();
    let ns = node.netns("pod-g");
    let mut c = node.conf("1.0.0");
    c["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "dummy0", "mac": "00:11:22:33:44:55"}],
        "ips": [{"address": "192.168.50.2/24", "interface": 0}],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let v = Cni::attachment("ADD", "ctr-g", &ns, "eth0")
        .config(&c)
        .run()
        .expect_result();
    assert_eq!(v["interfaces"].as_array().unwrap().len(), 3);
    assert_eq!(v["ips"][0]["address"], "192.168.50.2/24");
    assert_eq!(v["ips"][1]["interface"], 2);
    assert_eq!(v["dns"]["nameservers"][0], "10.96.0.10");
}

#[test]
fn a_handle_too_long_for_the_host_veth_alias_is_refused_before_the_node() {
    // "k8s-pod-network" + "." + 238 = 254 bytes, the longest interface
    // alias the kernel takes; one byte more used to fail with code 999
    // after an address had been assigned.
    let node = Node::start();
    let ns = node.netns("pod-long");
    let c = node.conf("1.0.0");
    let v = Cni::attachment("ADD", &"a".repeat(239), &ns, "eth0")
        .config(&c)
        .run()
        .expect_error(4);
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("CNI_CONTAINERID") && msg.contains("254") && msg.contains("at most 238"),
        "{v}"
    );
    let mut check = c.clone();
    check["prevResult"] = json!({"ips": [{"address": "10.244.1.1/32"}]});
    Cni::attachment("CHECK", &"a".repeat(239), &ns, "eth0")
        .config(&check)
        .run()
        .expect_error(4);
    assert!(node.state().adds.is_empty() && node.state().checks.is_empty());
    // One byte less is attached.
    Cni::attachment("ADD", &"a".repeat(238), &ns, "eth0")
        .config(&c)
        .run()
        .expect_result();
    assert_eq!(node.state().adds.len(), 1);
}

#[test]
fn a_ten_megabyte_network_name_is_invalid_config() {
    let node = Node::start();
    let ns = node.netns("pod-name");
    let mut c = node.conf("1.1.0");
    c["name"] = json!("n".repeat(10 << 20));
    for cni in [
        Cni::attachment("ADD", "c1", &ns, "eth0"),
        Cni::verb("STATUS"),
    ] {
        let out = cni.config(&c).run();
        let v = out.expect_error(7);
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.contains("network name") && msg.contains("limit of 252"),
            "{v}"
        );
        assert!(out.stdout.len() < 1000, "the error stays short");
    }
    let mut gc = c.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    Cni::verb("GC").config(&gc).run().expect_error(7);
    let st = node.state();
    assert!(st.adds.is_empty() && st.gcs.is_empty());
}

#[test]
fn del_of_a_handle_no_add_can_have_attached_succeeds_without_the_node() {
    let node = Node::start();
    let mut long_name = node.conf("1.0.0");
    long_name["name"] = json!("n".repeat(1000));
    for (id, c) in [
        ("a".repeat(239), node.conf("1.0.0")),
        ("c1".to_string(), long_name),
    ] {
        let out = Cni::attachment("DEL", &id, "", "eth0").config(&c).run();
        out.expect_silent_success();
        assert!(
            out.stderr.contains("without calling tabby-node"),
            "{out:#?}"
        );
    }
    assert!(node.state().dels.is_empty());
}

#[test]
fn check_with_a_prev_result_address_that_is_not_an_address_is_code_6() {
    let node = Node::start();
    let ns = node.netns("pod-banana");
    let mut c = node.conf("1.0.0");
    c["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": ns}],
        "ips": [{"address": "banana", "interface": 0}]
    });
    let v = Cni::attachment("CHECK", "ctr-banana", &ns, "eth0")
        .config(&c)
        .run()
        .expect_error(6);
    assert!(v["msg"].as_str().unwrap().contains("banana"), "{v}");
    assert!(node.state().checks.is_empty());
}

#[test]
fn cni_args_with_a_repeated_key_or_a_pair_without_key_are_code_4() {
    let node = Node::start();
    let ns = node.netns("pod-args");
    let v = Cni::attachment("ADD", "ctr-args", &ns, "eth0")
        .env("CNI_ARGS", "IP=10.244.1.7;IP=10.244.1.8")
        .config(&node.conf("1.0.0"))
        .run()
        .expect_error(4);
    assert!(
        v["msg"]
            .as_str()
            .unwrap()
            .contains("IP is given more than once"),
        "{v}"
    );
    let v = Cni::attachment("ADD", "ctr-args", &ns, "eth0")
        .env("CNI_ARGS", "=x")
        .config(&node.conf("1.0.0"))
        .run()
        .expect_error(4);
    assert!(v["msg"].as_str().unwrap().contains("\"=x\""), "{v}");
    assert!(node.state().adds.is_empty());
}
