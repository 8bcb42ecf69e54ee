//! The CNI server's ADD/DEL logic (handle locking, assign -> wire ->
//! rollback and release, DEL idempotence) against a fake controller and a
//! fake kernel with injected failures. No root needed.
#![allow(clippy::unwrap_used)]
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tabby_node::cni_server::PodNetworkService;
use tabby_node::controller::Ipam;
use tabby_node::daemon::{NodeStatus, SharedStatus};
use tabby_node::error::{Errno, NetlinkError};
use tabby_node::kernel::PodWiring;
use tabby_node::netlink::{HeldAttachment, PodSpec, WiredPod};
use tabby_node::{Error, Result};
use tabby_proto::v1 as pb;
use tabby_proto::v1::pod_network_server::PodNetwork;
use tonic::{Code, Request, Status};

/// What happened, in order, across the fake controller and kernel.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn has(&self, prefix: &str) -> bool {
        self.all().iter().any(|l| l.starts_with(prefix))
    }
    fn pos(&self, entry: &str) -> usize {
        let all = self.all();
        all.iter()
            .position(|l| l == entry)
            .unwrap_or_else(|| panic!("{entry:?} not in {all:?}"))
    }
}

/// A controller holding handles in memory.
#[derive(Default)]
struct FakeIpam {
    log: Log,
    held: Mutex<BTreeMap<String, Vec<String>>>,
    next: Mutex<u8>,
    fail_assign: Mutex<Option<Status>>,
    fail_release: Mutex<Option<Status>>,
}

impl FakeIpam {
    fn holds(&self, handle: &str) -> bool {
        self.held.lock().unwrap().contains_key(handle)
    }
}

#[tonic::async_trait]
impl Ipam for FakeIpam {
    async fn assign(
        &self,
        req: pb::AssignRequest,
    ) -> std::result::Result<Vec<pb::Allocation>, Status> {
        self.log.push(format!("assign {}", req.handle));
        if let Some(st) = self.fail_assign.lock().unwrap().take() {
            return Err(st);
        }
        let mut held = self.held.lock().unwrap();
        let addrs = held.entry(req.handle.clone()).or_insert_with(|| {
            let mut n = self.next.lock().unwrap();
            *n += 1;
            vec![format!("10.244.0.{n}")]
        });
        Ok(addrs
            .iter()
            .map(|a| pb::Allocation {
                address: a.clone(),
                handle: req.handle.clone(),
                ..Default::default()
            })
            .collect())
    }

    async fn release_handle(&self, handle: &str) -> std::result::Result<Vec<String>, Status> {
        self.log.push(format!("release {handle}"));
        if let Some(st) = self.fail_release.lock().unwrap().take() {
            return Err(st);
        }
        Ok(self.held.lock().unwrap().remove(handle).unwrap_or_default())
    }

    async fn list_handles(&self) -> std::result::Result<Vec<pb::HandleEntry>, Status> {
        Ok(self
            .held
            .lock()
            .unwrap()
            .keys()
            .map(|h| pb::HandleEntry {
                handle: h.clone(),
                container_id: String::new(),
            })
            .collect())
    }
}

/// A kernel holding host veths (by owner) in memory.
#[derive(Default)]
struct FakePods {
    log: Log,
    /// owner -> host veth.
    links: Mutex<BTreeMap<String, String>>,
    /// The next wire() fails with this; a Cleanup leaves the veth behind,
    /// as a real wiring whose own cleanup failed does.
    wire_error: Mutex<Option<Error>>,
    retire_error: Mutex<Option<Error>>,
    /// When set, wire() waits for a message before it does anything.
    gate: Mutex<Option<mpsc::Receiver<()>>>,
}

impl FakePods {
    fn has_link(&self, owner: &str) -> bool {
        self.links.lock().unwrap().contains_key(owner)
    }
}

impl PodWiring for FakePods {
    fn owned_links(&self, owner: &str) -> Result<Vec<String>> {
        Ok(self
            .links
            .lock()
            .unwrap()
            .get(owner)
            .cloned()
            .into_iter()
            .collect())
    }
    fn link_exists(&self, name: &str) -> bool {
        self.links.lock().unwrap().values().any(|l| l == name)
    }
    fn wire(&self, spec: &PodSpec) -> Result<WiredPod> {
        self.log.push(format!("wire {}", spec.owner));
        let gate = self.gate.lock().unwrap().take();
        if let Some(g) = gate {
            g.recv_timeout(Duration::from_secs(10))
                .expect("gate opened");
        }
        if let Some(e) = self.wire_error.lock().unwrap().take() {
            if matches!(e, Error::Cleanup { .. }) {
                self.links
                    .lock()
                    .unwrap()
                    .insert(spec.owner.clone(), spec.host_ifname.clone());
            }
            self.log.push(format!("wire failed {}", spec.owner));
            return Err(e);
        }
        self.links
            .lock()
            .unwrap()
            .insert(spec.owner.clone(), spec.host_ifname.clone());
        self.log.push(format!("wired {}", spec.owner));
        Ok(WiredPod {
            host_ifname: spec.host_ifname.clone(),
            host_mac: "ee:ee:ee:ee:ee:ee".into(),
            pod_ifname: spec.pod_ifname.clone(),
            pod_mac: "02:00:00:00:00:01".into(),
            host_ifindex: 7,
            pod_ifindex: 2,
        })
    }
    fn check(&self, _: &PodSpec) -> Result<()> {
        Ok(())
    }
    fn retire(&self, owner: &str, _: Option<&Path>) -> Result<usize> {
        self.log.push(format!("retire {owner}"));
        if let Some(e) = self.retire_error.lock().unwrap().take() {
            return Err(e);
        }
        Ok(usize::from(
            self.links.lock().unwrap().remove(owner).is_some(),
        ))
    }
    fn retired_pending(&self) -> usize {
        0
    }
    fn settle(&self, _: &Path) {}
    fn attachment_owners(&self) -> Result<Vec<String>> {
        Ok(self.links.lock().unwrap().keys().cloned().collect())
    }
    fn held_attachment(&self, _: &str) -> Result<Option<HeldAttachment>> {
        Ok(None)
    }
}

struct Fixture {
    svc: Arc<PodNetworkService>,
    ipam: Arc<FakeIpam>,
    pods: Arc<FakePods>,
    log: Log,
}

fn fixture() -> Fixture {
    let log = Log::default();
    let ipam = Arc::new(FakeIpam {
        log: log.clone(),
        ..Default::default()
    });
    let pods = Arc::new(FakePods {
        log: log.clone(),
        ..Default::default()
    });
    let status: SharedStatus = Arc::new(Mutex::new(NodeStatus::default()));
    let svc = PodNetworkService::with_parts(ipam.clone(), pods.clone(), status, 1500);
    Fixture {
        svc: Arc::new(svc),
        ipam,
        pods,
        log,
    }
}

const NET: &str = "net";

fn handle(cid: &str) -> String {
    format!("{NET}.{cid}")
}

fn attachment(cid: &str) -> Option<pb::PodAttachment> {
    Some(pb::PodAttachment {
        container_id: cid.into(),
        ifname: "eth0".into(),
        network: NET.into(),
    })
}

/// A network namespace file any process can see (ADD checks the path).
const NETNS: &str = "/proc/self/ns/net";

async fn add(
    svc: &PodNetworkService,
    cid: &str,
) -> std::result::Result<pb::PodAddResponse, Status> {
    svc.add(Request::new(pb::PodAddRequest {
        attachment: attachment(cid),
        netns: NETNS.into(),
        pod_namespace: "default".into(),
        pod_name: cid.into(),
        ..Default::default()
    }))
    .await
    .map(|r| r.into_inner())
}

async fn del(
    svc: &PodNetworkService,
    cid: &str,
) -> std::result::Result<pb::PodDelResponse, Status> {
    svc.del(Request::new(pb::PodDelRequest {
        attachment: attachment(cid),
        netns: NETNS.into(),
        pod_namespace: "default".into(),
        pod_name: cid.into(),
    }))
    .await
    .map(|r| r.into_inner())
}

fn netlink_error(op: &str, errno: Errno) -> Error {
    Error::Netlink(NetlinkError::new(op, errno))
}

#[tokio::test]
async fn add_then_del_and_del_again() {
    let f = fixture();
    let r = add(&f.svc, "c1").await.unwrap();
    assert_eq!(r.addresses, ["10.244.0.1/32"]);
    assert!(f.ipam.holds(&handle("c1")) && f.pods.has_link(&handle("c1")));
    let d = del(&f.svc, "c1").await.unwrap();
    assert_eq!(d.released, ["10.244.0.1"]);
    assert!(!f.ipam.holds(&handle("c1")) && !f.pods.has_link(&handle("c1")));
    // DEL is idempotent.
    assert!(del(&f.svc, "c1").await.unwrap().released.is_empty());
}

#[tokio::test]
async fn del_of_an_unknown_handle_succeeds() {
    let f = fixture();
    let d = del(&f.svc, "never").await.unwrap();
    assert!(d.released.is_empty());
    assert_eq!(f.log.all(), ["retire net.never", "release net.never"]);
}

#[tokio::test]
async fn a_duplicate_add_is_refused_and_releases_nothing() {
    let f = fixture();
    add(&f.svc, "c1").await.unwrap();
    let st = add(&f.svc, "c1").await.unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");
    assert!(f.ipam.holds(&handle("c1")));
    assert!(!f.log.has("release"), "{:?}", f.log.all());
}

#[tokio::test]
async fn failed_wiring_releases_the_address_and_says_so() {
    let f = fixture();
    *f.pods.wire_error.lock().unwrap() = Some(netlink_error(
        "adding address 10.244.0.1/32 to eth0",
        Errno::EACCES,
    ));
    let st = add(&f.svc, "c1").await.unwrap_err();
    assert_eq!(st.code(), Code::Internal, "{st:?}");
    assert_eq!(
        st.message(),
        "wiring failed: netlink: adding address 10.244.0.1/32 to eth0: Permission denied \
         (os error 13) (address released)"
    );
    assert!(!f.ipam.holds(&handle("c1")), "the address is released");
    assert!(f.log.pos("wire failed net.c1") < f.log.pos("retire net.c1"));
    assert!(f.log.pos("retire net.c1") < f.log.pos("release net.c1"));
}

#[tokio::test]
async fn failed_wiring_keeps_the_kind_of_its_error() {
    let f = fixture();
    *f.pods.wire_error.lock().unwrap() = Some(Error::Exists("host veth tab1 exists".into()));
    let st = add(&f.svc, "c1").await.unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");
    assert!(st.message().ends_with("(address released)"), "{st:?}");
    assert!(!f.ipam.holds(&handle("c1")));
}

#[tokio::test]
async fn failed_wiring_whose_cleanup_failed_is_retired_and_released() {
    let f = fixture();
    *f.pods.wire_error.lock().unwrap() = Some(Error::cleanup(
        netlink_error(
            "adding route 0.0.0.0/0 via 169.254.1.1 dev eth0",
            Errno::ENETUNREACH,
        ),
        netlink_error("deleting veth tab1", Errno::EBUSY),
    ));
    let st = add(&f.svc, "c1").await.unwrap_err();
    assert_eq!(st.code(), Code::Internal, "{st:?}");
    let m = st.message();
    assert!(
        m.starts_with("wiring failed: netlink: adding route 0.0.0.0/0"),
        "{m}"
    );
    assert!(
        m.contains("; cleanup failed too: netlink: deleting veth tab1: Device or resource busy"),
        "{m}"
    );
    assert!(m.ends_with("(address released)"), "{m}");
    // What the wiring left behind was retired before the address went.
    assert!(!f.pods.has_link(&handle("c1")), "{:?}", f.log.all());
    assert!(!f.ipam.holds(&handle("c1")));
}

#[tokio::test]
async fn a_failed_release_after_failed_wiring_reports_both() {
    let f = fixture();
    *f.pods.wire_error.lock().unwrap() = Some(netlink_error("setting tab1 up", Errno::ENOBUFS));
    *f.ipam.fail_release.lock().unwrap() = Some(Status::unavailable("controller down"));
    let st = add(&f.svc, "c1").await.unwrap_err();
    // The code is the wiring failure's, not the controller's.
    assert_eq!(st.code(), Code::Internal, "{st:?}");
    let m = st.message();
    assert!(
        m.starts_with("wiring failed: netlink: setting tab1 up: "),
        "{m}"
    );
    assert!(
        m.ends_with("; cleanup failed too: controller: releasing net.c1: controller down"),
        "{m}"
    );
    assert!(!m.contains("address released"), "{m}");
    assert!(f.log.has("release net.c1"), "the release was tried");
}

#[tokio::test]
async fn a_failed_retire_after_failed_wiring_is_reported_and_the_address_released() {
    let f = fixture();
    *f.pods.wire_error.lock().unwrap() = Some(netlink_error("setting tab1 up", Errno::ENOBUFS));
    *f.pods.retire_error.lock().unwrap() = Some(netlink_error("listing links", Errno::EINTR));
    let st = add(&f.svc, "c1").await.unwrap_err();
    let m = st.message();
    assert!(
        m.contains("; cleanup failed too: netlink: listing links: Interrupted system call"),
        "{m}"
    );
    assert!(m.ends_with("(address released)"), "{m}");
    assert!(!f.ipam.holds(&handle("c1")));
}

#[tokio::test]
async fn controller_failures_on_assign_wire_nothing() {
    let f = fixture();
    *f.ipam.fail_assign.lock().unwrap() = Some(Status::unavailable("no route to controller"));
    let st = add(&f.svc, "c1").await.unwrap_err();
    assert_eq!(st.code(), Code::Unavailable);
    assert_eq!(
        st.message(),
        "controller unavailable during Assign: no route to controller"
    );
    // "Requested address taken" is a bad request, not an existing attachment.
    *f.ipam.fail_assign.lock().unwrap() = Some(Status::already_exists("10.244.0.9 is taken"));
    let st = add(&f.svc, "c1").await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(
        st.message(),
        "controller refused Assign: 10.244.0.9 is taken"
    );
    assert!(!f.log.has("wire"), "{:?}", f.log.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_del_of_one_handle_are_serialised() {
    let f = fixture();
    let (open, gate) = mpsc::channel();
    *f.pods.gate.lock().unwrap() = Some(gate);
    let svc = f.svc.clone();
    let adding = tokio::spawn(async move { add(&svc, "c1").await });
    let t = Instant::now();
    while !f.log.has("wire net.c1") {
        assert!(t.elapsed() < Duration::from_secs(5), "ADD never wired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let svc = f.svc.clone();
    let deleting = tokio::spawn(async move { del(&svc, "c1").await });
    // While ADD is wiring, DEL waits for the handle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !f.log.has("retire"),
        "DEL ran during ADD: {:?}",
        f.log.all()
    );
    // Another handle is not held up.
    del(&f.svc, "other").await.unwrap();
    open.send(()).unwrap();
    add_ok(adding.await.unwrap());
    let d = deleting.await.unwrap().unwrap();
    assert_eq!(d.released, ["10.244.0.1"]);
    assert!(f.log.pos("wired net.c1") < f.log.pos("retire net.c1"));
    assert!(!f.ipam.holds(&handle("c1")) && !f.pods.has_link(&handle("c1")));
}

fn add_ok(r: std::result::Result<pb::PodAddResponse, Status>) {
    let r = r.unwrap();
    assert_eq!(r.addresses, ["10.244.0.1/32"]);
}

/// A container id that makes the handle `net.<id>` exactly `len` bytes.
fn cid_for_handle_len(len: usize) -> String {
    "c".repeat(len - NET.len() - 1)
}

#[tokio::test]
async fn an_add_whose_handle_cannot_be_attached_is_refused_before_any_assign() {
    let f = fixture();
    let longest = cid_for_handle_len(tabby_proto::limits::MAX_HANDLE_LEN);
    let over = cid_for_handle_len(tabby_proto::limits::MAX_HANDLE_LEN + 1);
    let st = add(&f.svc, &over).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("handle"), "{st:?}");
    assert!(
        f.log.all().is_empty(),
        "nothing assigned: {:?}",
        f.log.all()
    );
    // One byte less is attached.
    add(&f.svc, &longest).await.unwrap();
}

#[tokio::test]
async fn a_del_no_add_could_have_made_succeeds_without_calls() {
    let f = fixture();
    let over = cid_for_handle_len(tabby_proto::limits::MAX_HANDLE_LEN + 1);
    assert!(del(&f.svc, &over).await.unwrap().released.is_empty());
    assert!(f.log.all().is_empty(), "{:?}", f.log.all());
}

#[tokio::test]
async fn a_del_whose_handle_the_controller_refuses_succeeds() {
    let f = fixture();
    *f.ipam.fail_release.lock().unwrap() = Some(Status::invalid_argument("handle is invalid"));
    assert!(del(&f.svc, "c1").await.unwrap().released.is_empty());
    // Any other refusal still fails the DEL, so kubelet retries it.
    *f.ipam.fail_release.lock().unwrap() = Some(Status::unavailable("controller away"));
    assert_eq!(
        del(&f.svc, "c1").await.unwrap_err().code(),
        Code::Unavailable
    );
}

#[tokio::test]
async fn check_of_a_missing_netns_answers_as_add_does() {
    let f = fixture();
    let missing = "/run/netns/tabby-test-no-such-netns";
    let add_st = f
        .svc
        .add(Request::new(pb::PodAddRequest {
            attachment: attachment("c1"),
            netns: missing.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let check_st = f
        .svc
        .check(Request::new(pb::PodCheckRequest {
            attachment: attachment("c1"),
            netns: missing.into(),
            expected_addresses: vec!["10.244.0.1/32".into()],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(add_st.code(), Code::InvalidArgument, "{add_st:?}");
    assert_eq!(check_st.code(), add_st.code(), "{check_st:?}");
    assert_eq!(check_st.message(), add_st.message());
}
