//! Fuzzing, on stable Rust with proptest, of what `tabby-node` does with a
//! request on its CNI socket before it touches anything: the conversion of
//! `PodAddRequest`, `PodDelRequest`, `PodCheckRequest` and `PodGcRequest`
//! into a handle, a host veth name and a pod spec, and their validation
//! against `tabby_proto::limits`. Driven through the public
//! `PodNetwork` handlers of [`PodNetworkService`], over a fake controller
//! and a fake kernel that record every call: no root, no kernel.
//!
//! Requests are valid ones with fields mutated (garbage, lengths around
//! the limits, control characters, empty) or fully random. A refused
//! request must be `InvalidArgument` with a message and must have assigned,
//! wired or released nothing; an accepted one must hold to the limits. The
//! case counts add up to over 100,000.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, TestRunner};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tabby_node::cni_server::PodNetworkService;
use tabby_node::controller::Ipam;
use tabby_node::daemon::{NodeStatus, SharedStatus};
use tabby_node::kernel::PodWiring;
use tabby_node::netlink::{host_veth_name, HeldAttachment, PodSpec, WiredPod};
use tabby_node::Result;
use tabby_proto::limits;
use tabby_proto::v1 as pb;
use tabby_proto::v1::pod_network_server::PodNetwork;
use tonic::{Code, Request, Status};

/// `cases` cases, a fast generator, and no regression files written next
/// to the sources.
fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        // ChaCha, the default, took a fifth of the run time in a debug build.
        rng_algorithm: RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    }
}

/// Runs `test` on `n` inputs of `strategy` on one runtime; panics with
/// the smallest failing input.
fn fuzz<S: Strategy>(
    n: u32,
    strategy: S,
    test: impl Fn(&tokio::runtime::Runtime, S::Value) -> std::result::Result<(), TestCaseError>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(cases(n));
    if let Err(e) = runner.run(&strategy, |v| test(&rt, v)) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------
// Fakes: every call is recorded; nothing fails.

#[derive(Default)]
struct Calls(Mutex<Vec<String>>);

impl Calls {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    /// Calls that change something (reads excluded).
    fn changes(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|c| !c.starts_with("read "))
            .collect()
    }
}

#[derive(Default)]
struct FakeIpam {
    calls: Arc<Calls>,
    /// What ListHandles answers.
    handles: Vec<pb::HandleEntry>,
}

#[tonic::async_trait]
impl Ipam for FakeIpam {
    async fn assign(
        &self,
        req: pb::AssignRequest,
    ) -> std::result::Result<Vec<pb::Allocation>, Status> {
        self.calls.push(format!("assign {}", req.handle));
        let address = req
            .requested
            .first()
            .cloned()
            .unwrap_or_else(|| "10.244.0.7".into());
        Ok(vec![pb::Allocation {
            address,
            handle: req.handle,
            ..Default::default()
        }])
    }
    async fn release_handle(&self, handle: &str) -> std::result::Result<Vec<String>, Status> {
        self.calls.push(format!("release {handle}"));
        Ok(Vec::new())
    }
    async fn list_handles(&self) -> std::result::Result<Vec<pb::HandleEntry>, Status> {
        self.calls.push("read handles".into());
        Ok(self.handles.clone())
    }
}

#[derive(Default)]
struct FakePods {
    calls: Arc<Calls>,
    /// The specs given to wire() and check().
    specs: Mutex<Vec<PodSpec>>,
}

impl PodWiring for FakePods {
    fn owned_links(&self, owner: &str) -> Result<Vec<String>> {
        self.calls.push(format!("read links {owner}"));
        Ok(Vec::new())
    }
    fn link_exists(&self, name: &str) -> bool {
        self.calls.push(format!("read link {name}"));
        false
    }
    fn wire(&self, spec: &PodSpec) -> Result<WiredPod> {
        self.calls.push(format!("wire {}", spec.owner));
        self.specs.lock().unwrap().push(spec.clone());
        Ok(WiredPod {
            host_ifname: spec.host_ifname.clone(),
            host_mac: "ee:ee:ee:ee:ee:ee".into(),
            pod_ifname: spec.pod_ifname.clone(),
            pod_mac: "02:00:00:00:00:01".into(),
            host_ifindex: 7,
            pod_ifindex: 2,
        })
    }
    fn check(&self, spec: &PodSpec) -> Result<()> {
        self.calls.push(format!("check {}", spec.owner));
        self.specs.lock().unwrap().push(spec.clone());
        Ok(())
    }
    fn retire(&self, owner: &str, _: Option<&Path>) -> Result<usize> {
        self.calls.push(format!("retire {owner}"));
        Ok(0)
    }
    fn retired_pending(&self) -> usize {
        0
    }
    fn settle(&self, _: &Path) {}
    fn attachment_owners(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn held_attachment(&self, _: &str) -> Result<Option<HeldAttachment>> {
        Ok(None)
    }
}

const DEFAULT_MTU: u32 = 1500;

struct Fixture {
    svc: PodNetworkService,
    calls: Arc<Calls>,
    pods: Arc<FakePods>,
}

fn fixture(handles: Vec<pb::HandleEntry>) -> Fixture {
    let calls = Arc::new(Calls::default());
    let ipam = Arc::new(FakeIpam {
        calls: calls.clone(),
        handles,
    });
    let pods = Arc::new(FakePods {
        calls: calls.clone(),
        ..Default::default()
    });
    let status: SharedStatus = Arc::new(Mutex::new(NodeStatus::default()));
    Fixture {
        svc: PodNetworkService::with_parts(ipam, pods.clone(), status, DEFAULT_MTU),
        calls,
        pods,
    }
}

// ---------------------------------------------------------------------------
// The rules the node states for a request (cni_server.rs), as a model.

/// A network namespace file any process can see.
const NETNS: &str = "/proc/self/ns/net";

/// A namespace file that is not a network namespace: the node takes it
/// as one (see `a_namespace_file_that_is_not_a_network_namespace_is_refused`).
const MNT_NS: &str = "/proc/self/ns/mnt";

/// Whether the node takes `netns` (a namespace file as it sees it).
fn netns_ok(netns: &str) -> bool {
    netns == NETNS || netns == MNT_NS
}

/// The identity checks of every attachment verb: the container id's
/// characters, the interface name, a network name, and the limits.
fn identity_ok(a: &Option<pb::PodAttachment>) -> bool {
    let Some(a) = a else { return false };
    !a.container_id.is_empty()
        && a.container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !a.ifname.is_empty()
        && a.ifname.len() <= limits::MAX_IFNAME_LEN
        && a.ifname != "."
        && a.ifname != ".."
        && !a
            .ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        && !a.network.is_empty()
        && limits::check_attachment(&a.network, &a.container_id).is_ok()
}

fn handle_of(a: &Option<pb::PodAttachment>) -> String {
    let a = a.as_ref().unwrap();
    format!("{}.{}", a.network, a.container_id)
}

/// The host veth name the node derives (the pod's name when known).
fn host_if_of(a: &Option<pb::PodAttachment>, ns: &str, pod: &str) -> String {
    let key = if !ns.is_empty() && !pod.is_empty() {
        format!("{ns}.{pod}")
    } else {
        a.as_ref().unwrap().container_id.clone()
    };
    host_veth_name(&key)
}

/// A refusal: InvalidArgument, with a message.
fn assert_refusal(st: &Status) -> std::result::Result<(), TestCaseError> {
    prop_assert_eq!(st.code(), Code::InvalidArgument, "{:?}", st);
    prop_assert!(!st.message().trim().is_empty(), "no message: {:?}", st);
    Ok(())
}

// ---------------------------------------------------------------------------
// Generators: each field valid most of the time, else garbage.

/// Letters, digits and the separators of identifiers.
const IDENT_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-";

/// Strings of up to `max` characters from `c` (regex strategies are slow
/// in a debug build).
fn chars(c: impl Strategy<Value = char>, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(c, 0..=max).prop_map(String::from_iter)
}

/// Strings that break things: empty, dots, separators, control and
/// non-ASCII characters, lengths around every limit, huge ones.
fn garbage_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => chars(any::<char>(), 16),
        3 => chars(prop::sample::select(IDENT_CHARS.chars().collect::<Vec<_>>()), 20),
        2 => chars(prop::char::range(' ', '~'), 40),
        1 => prop::sample::select(vec![
            "", ".", "..", "/", ":", " ", "\0", "\n", "\t", "eth0\n", "eth 0", "a/b", "-a",
            "é", "ééééééééé", "\u{202e}eth0", "\u{7f}", "\u{a0}", "\u{85}", "eth0\0",
            "10.244.0.9", "fd00::9", "10.244.0.9/32", "10.0.0.300", " 10.244.0.9", "::",
            "/proc/self/ns/net\0", MNT_NS, "/proc/self/ns", "/", "/tmp",
            "proc/self/ns/net", "/nonexistent/netns", "/dev/null",
        ])
        .prop_map(str::to_string),
        1 => (prop::sample::select(vec![14usize, 15, 16, 237, 238, 239, 251, 252, 253, 254, 255]),
              prop::sample::select(vec!['a', '0', '.', '-', 'é']))
            .prop_map(|(n, c)| c.to_string().repeat(n)),
        1 => (300usize..=2_000).prop_map(|n| "x".repeat(n)),
        1 => prop::sample::select(vec![16usize << 10, 64 << 10]).prop_map(|n| "x".repeat(n)),
    ]
}

fn container_id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::collection::vec(prop::sample::select(b"0123456789abcdef".to_vec()), 64)
            .prop_map(|b| String::from_utf8(b).unwrap()),
        2 => (prop::sample::select(b"a0Z".to_vec()), chars(prop::sample::select(IDENT_CHARS.chars().collect::<Vec<_>>()), 30))
            .prop_map(|(first, rest)| format!("{}{rest}", first as char)),
        1 => prop::sample::select(vec![1usize, 237, 238, 239, 252, 253])
            .prop_map(|n| "c".repeat(n)),
        3 => garbage_string(),
    ]
}

fn ifname() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["eth0", "net1", "e", "eth0.100", "a-b_c", "x23456789012345"])
            .prop_map(str::to_string),
        3 => garbage_string(),
    ]
}

fn network() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["k8s-pod-network", "net", "n", "a.b"]).prop_map(str::to_string),
        1 => prop::sample::select(vec![1usize, 15, 251, 252, 253]).prop_map(|n| "n".repeat(n)),
        3 => garbage_string(),
    ]
}

fn attachment() -> impl Strategy<Value = Option<pb::PodAttachment>> {
    prop_oneof![
        1 => Just(None),
        12 => (container_id(), ifname(), network()).prop_map(|(container_id, ifname, network)| {
            Some(pb::PodAttachment { container_id, ifname, network })
        }),
    ]
}

fn netns() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just(NETNS.to_string()),
        3 => garbage_string(),
    ]
}

fn pod_field() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["default", "web-0", "kube-system", ""]).prop_map(str::to_string),
        2 => garbage_string(),
    ]
}

fn requested_address() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        3 => prop::sample::select(vec!["10.244.0.9", "fd00:10:244::9", "::ffff:10.0.0.1", "0.0.0.0"])
            .prop_map(str::to_string),
        3 => garbage_string(),
    ]
}

fn mtu() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => Just(0u32),
        3 => prop::sample::select(vec![1450u32, 1500, 9000, 67, 68, 65535, 65536, u32::MAX]),
        2 => any::<u32>(),
    ]
}

fn expected_addresses() -> impl Strategy<Value = Vec<String>> {
    let one = prop_oneof![
        6 => prop::sample::select(vec!["10.244.0.9/32", "fd00:10:244::9/128", "10.244.0.0/24"])
            .prop_map(str::to_string),
        3 => garbage_string(),
    ];
    prop_oneof![
        1 => Just(Vec::new()),
        8 => prop::collection::vec(one, 1..4),
    ]
}

fn add_request() -> impl Strategy<Value = pb::PodAddRequest> {
    (
        attachment(),
        netns(),
        pod_field(),
        pod_field(),
        requested_address(),
        mtu(),
    )
        .prop_map(
            |(attachment, netns, pod_namespace, pod_name, requested_address, mtu)| {
                pb::PodAddRequest {
                    attachment,
                    netns,
                    pod_namespace,
                    pod_name,
                    requested_address,
                    mtu,
                }
            },
        )
}

// ---------------------------------------------------------------------------
// The properties. Case counts: 40,000 + 25,000 + 20,000 + 15,000 = 100,000.

/// ADD: accepted exactly when the node's stated rules hold; an accepted
/// one assigns and wires the handle `<network>.<container id>` once, with
/// the effective MTU; a refused one is InvalidArgument and changes nothing.
#[test]
fn add_requests() {
    fuzz(40_000, add_request(), |rt, r| {
        let f = fixture(Vec::new());
        let got = rt.block_on(f.svc.add(Request::new(r.clone())));
        let mtu = if r.mtu == 0 { DEFAULT_MTU } else { r.mtu };
        let requested_ok = r.requested_address.is_empty()
            || r.requested_address.parse::<std::net::IpAddr>().is_ok();
        let valid = identity_ok(&r.attachment)
            && netns_ok(&r.netns)
            && requested_ok
            && limits::check_mtu(mtu).is_ok();
        match got {
            Ok(resp) => {
                let resp = resp.into_inner();
                prop_assert!(valid, "accepted: {:?}", r);
                let h = handle_of(&r.attachment);
                prop_assert!(limits::handle_fits(&h));
                prop_assert_eq!(
                    f.calls.changes(),
                    vec![format!("assign {h}"), format!("wire {h}")]
                );
                let spec = f.pods.specs.lock().unwrap()[0].clone();
                prop_assert_eq!(
                    &spec.host_ifname,
                    &host_if_of(&r.attachment, &r.pod_namespace, &r.pod_name)
                );
                prop_assert_eq!(&spec.pod_ifname, &r.attachment.as_ref().unwrap().ifname);
                prop_assert_eq!(spec.netns_path.as_os_str(), r.netns.as_str());
                prop_assert_eq!(spec.mtu, mtu);
                prop_assert_eq!(resp.mtu, mtu);
                prop_assert_eq!(resp.addresses.len(), 1);
            }
            Err(st) => {
                assert_refusal(&st)?;
                prop_assert!(!valid, "refused ({}): {:?}", st.message(), r);
                prop_assert!(f.calls.changes().is_empty(), "{:?}", f.calls.all());
                prop_assert!(f.pods.specs.lock().unwrap().is_empty());
            }
        }
        Ok(())
    });
}

/// DEL: always succeeds. Of an attachment ADD would have refused it does
/// nothing (no ADD can have made it); otherwise it retires and releases
/// exactly the handle ADD would have used.
#[test]
fn del_requests() {
    let strategy = (attachment(), netns(), pod_field(), pod_field()).prop_map(
        |(attachment, netns, pod_namespace, pod_name)| pb::PodDelRequest {
            attachment,
            netns,
            pod_namespace,
            pod_name,
        },
    );
    fuzz(25_000, strategy, |rt, r| {
        let f = fixture(Vec::new());
        let got = rt.block_on(f.svc.del(Request::new(r.clone())));
        let resp = match got {
            Ok(resp) => resp.into_inner(),
            Err(st) => return Err(TestCaseError::fail(format!("DEL failed: {st:?} for {r:?}"))),
        };
        prop_assert!(resp.released.is_empty());
        if identity_ok(&r.attachment) {
            let h = handle_of(&r.attachment);
            prop_assert!(limits::handle_fits(&h));
            prop_assert_eq!(
                f.calls.changes(),
                vec![format!("retire {h}"), format!("release {h}")]
            );
        } else {
            prop_assert!(f.calls.changes().is_empty(), "{:?}", f.calls.all());
        }
        Ok(())
    });
}

/// CHECK: accepted exactly when the identity, the netns and every
/// expected address (a CIDR) are; the kernel is asked only then.
#[test]
fn check_requests() {
    let strategy = (
        attachment(),
        netns(),
        pod_field(),
        pod_field(),
        expected_addresses(),
    )
        .prop_map(
            |(attachment, netns, pod_namespace, pod_name, expected_addresses)| {
                pb::PodCheckRequest {
                    attachment,
                    netns,
                    pod_namespace,
                    pod_name,
                    expected_addresses,
                }
            },
        );
    fuzz(20_000, strategy, |rt, r| {
        let f = fixture(Vec::new());
        let got = rt.block_on(f.svc.check(Request::new(r.clone())));
        let valid = identity_ok(&r.attachment)
            && netns_ok(&r.netns)
            && !r.expected_addresses.is_empty()
            && r.expected_addresses
                .iter()
                .all(|a| a.parse::<ipnet::IpNet>().is_ok());
        match got {
            Ok(_) => {
                prop_assert!(valid, "accepted: {:?}", r);
                let h = handle_of(&r.attachment);
                prop_assert_eq!(f.calls.changes(), vec![format!("check {h}")]);
                let spec = f.pods.specs.lock().unwrap()[0].clone();
                prop_assert_eq!(spec.addresses.len(), r.expected_addresses.len());
                prop_assert_eq!(
                    &spec.host_ifname,
                    &host_if_of(&r.attachment, &r.pod_namespace, &r.pod_name)
                );
            }
            Err(st) => {
                assert_refusal(&st)?;
                prop_assert!(!valid, "refused ({}): {:?}", st.message(), r);
                prop_assert!(f.calls.changes().is_empty(), "{:?}", f.calls.all());
            }
        }
        Ok(())
    });
}

/// A handle as ListHandles lists it: `cid` is its container id attribute.
fn entry(handle: String, cid: &str) -> pb::HandleEntry {
    pb::HandleEntry {
        handle,
        container_id: cid.into(),
    }
}

/// GC: needs a network name; releases exactly the held handles of that
/// network (`<network>.<its container id>`, or `<network>.<anything>` when
/// the container id is not known) that no valid attachment names, each
/// after retiring its veths, and nothing else: never a handle of a network
/// whose name extends this one's (`<network>.v2`).
#[test]
fn gc_requests() {
    let handle = prop_oneof![
        3 => (network(), container_id()).prop_map(|(n, c)| entry(format!("{n}.{c}"), &c)),
        1 => garbage_string().prop_map(|h| entry(h, "")),
    ];
    let strategy = (
        network(),
        prop::collection::vec(attachment(), 0..5),
        prop::collection::vec(handle, 0..6),
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
    )
        .prop_map(|(network, valid, mut held, also_valid)| {
            // Some held handles of this network are listed as valid.
            let mut valid: Vec<pb::PodAttachment> = valid.into_iter().flatten().collect();
            // A pod of another network whose name extends this one's.
            held.push(entry(format!("{network}.v2.c9"), "c9"));
            for i in also_valid {
                let cid = format!("v{}", i.index(1000));
                held.push(entry(format!("{network}.{cid}"), &cid));
                valid.push(pb::PodAttachment {
                    container_id: cid,
                    ifname: "eth0".into(),
                    network: network.clone(),
                });
            }
            (pb::PodGcRequest { network, valid }, held)
        });
    fuzz(15_000, strategy, |rt, (r, held)| {
        let f = fixture(held.clone());
        let got = rt.block_on(f.svc.gc(Request::new(r.clone())));
        if r.network.is_empty() {
            let st = got.unwrap_err();
            assert_refusal(&st)?;
            prop_assert!(f.calls.all().is_empty(), "{:?}", f.calls.all());
            return Ok(());
        }
        let released = match got {
            Ok(resp) => resp.into_inner().released_handles,
            Err(st) => return Err(TestCaseError::fail(format!("GC failed: {st:?} for {r:?}"))),
        };
        let prefix = format!("{}.", r.network);
        let valid: BTreeSet<String> = r
            .valid
            .iter()
            .map(|a| format!("{}{}", prefix, a.container_id))
            .collect();
        let want: Vec<String> = held
            .iter()
            .filter(|e| {
                let ours = if e.container_id.is_empty() {
                    e.handle.starts_with(&prefix)
                } else {
                    e.handle == format!("{prefix}{}", e.container_id)
                };
                ours && !valid.contains(&e.handle)
            })
            .map(|e| e.handle.clone())
            .collect();
        prop_assert_eq!(&released, &want);
        let changes: Vec<String> = want
            .iter()
            .flat_map(|h| [format!("retire {h}"), format!("release {h}")])
            .collect();
        prop_assert_eq!(f.calls.changes(), changes);
        Ok(())
    });
}

/// Seen while modelling ADD's checks for `add_requests`: a NUL in the
/// interface name passes them (the plugin refuses control characters, and
/// the wiring refuses a NUL), so ADD assigns an address before the wiring
/// refuses the name.
#[test]
fn an_interface_name_with_a_nul_is_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let f = fixture(Vec::new());
    let req = pb::PodAddRequest {
        attachment: Some(pb::PodAttachment {
            container_id: "c1".into(),
            ifname: "eth\0".into(),
            network: "net".into(),
        }),
        netns: NETNS.into(),
        ..Default::default()
    };
    let st = rt.block_on(f.svc.add(Request::new(req))).unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(f.calls.changes().is_empty(), "{:?}", f.calls.all());
}
