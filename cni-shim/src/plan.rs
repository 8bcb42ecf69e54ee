//! From environment and stdin to one request for `tabby-node` (pure), and
//! from its answer to what the plugin prints (pure apart from the
//! [`NodeApi`] calls, which tests replace).

use crate::args::{self, CniArgs};
use crate::config::{self, NetConf};
use crate::env::{truncate, Env};
use crate::error::{self, code, CniError};
use crate::result::CniResult;
use crate::verb::Verb;
use crate::version;
use std::future::Future;
use tabby_proto::limits::{self, LimitError};
use tabby_proto::v1 as pb;
use tonic::Status;

/// The calls the shim makes; implemented by the socket client and by fakes.
pub trait NodeApi {
    /// `PodNetwork.Add`.
    fn add(
        &mut self,
        req: pb::PodAddRequest,
    ) -> impl Future<Output = Result<pb::PodAddResponse, Status>>;
    /// `PodNetwork.Del`.
    fn del(
        &mut self,
        req: pb::PodDelRequest,
    ) -> impl Future<Output = Result<pb::PodDelResponse, Status>>;
    /// `PodNetwork.Check`.
    fn check(
        &mut self,
        req: pb::PodCheckRequest,
    ) -> impl Future<Output = Result<pb::PodCheckResponse, Status>>;
    /// `PodNetwork.Status`.
    fn status(&mut self) -> impl Future<Output = Result<pb::PodStatusResponse, Status>>;
    /// `PodNetwork.Gc`.
    fn gc(
        &mut self,
        req: pb::PodGcRequest,
    ) -> impl Future<Output = Result<pb::PodGcResponse, Status>>;
}

/// The one request an invocation sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// ADD.
    Add(pb::PodAddRequest),
    /// DEL.
    Del(pb::PodDelRequest),
    /// DEL of an attachment that cannot exist (its handle is over the
    /// limits every ADD is held to): succeed without calling the node, so
    /// the runtime does not retry it forever. Carries the reason to log.
    NothingToDelete(String),
    /// CHECK.
    Check(pb::PodCheckRequest),
    /// STATUS.
    Status,
    /// GC.
    Gc(pb::PodGcRequest),
}

/// A validated invocation, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// The environment.
    pub env: Env,
    /// Parsed `CNI_ARGS` (default for STATUS/GC, which do not read it).
    pub args: CniArgs,
    /// The network config.
    pub conf: NetConf,
    /// What to send.
    pub request: Request,
}

/// A failed preparation: the error and the `cniVersion` to report it in.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The error.
    pub error: CniError,
    /// `cniVersion` of the error JSON.
    pub cni_version: String,
}

/// Validate stdin against the environment and plan the request.
pub fn prepare(env: Env, stdin: &[u8]) -> Result<Invocation, Failure> {
    let obj = config::parse_object(stdin).map_err(|error| Failure {
        error,
        cni_version: version::for_error(None),
    })?;
    let cni_version = version::for_error(Some(&obj));
    let fail = |error| Failure {
        error,
        cni_version: cni_version.clone(),
    };
    let conf = config::parse(env.verb, obj).map_err(fail)?;
    let args = if env.verb.is_attachment_verb() {
        args::parse(&env.args).map_err(fail)?
    } else {
        CniArgs::default()
    };
    let request = plan(&env, &args, &conf).map_err(fail)?;
    Ok(Invocation {
        env,
        args,
        conf,
        request,
    })
}

fn attachment(env: &Env, conf: &NetConf) -> Option<pb::PodAttachment> {
    Some(pb::PodAttachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        network: conf.name.clone(),
    })
}

/// The attachment's identity against the limits shared with the node and
/// the controller ([`limits`]): checked before anything is assigned. A
/// network name over its own limit is the config's fault (7); a container
/// id over its own limit, or too long for this network's name, the
/// environment's (4).
pub fn check_limits(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    limits::check_attachment(&conf.name, &env.container_id).map_err(|e| match e {
        LimitError::NetworkName { .. } => CniError::config(format!(
            "invalid network name {:?}: {e}",
            truncate(&conf.name, 60)
        )),
        LimitError::ContainerId { .. } => CniError::env(format!(
            "invalid CNI_CONTAINERID {:?}: {e}",
            truncate(&env.container_id, 60)
        )),
        LimitError::Handle { .. } => CniError::env(format!(
            "CNI_CONTAINERID {:?} is too long for network {:?}: {e}",
            truncate(&env.container_id, 60),
            truncate(&conf.name, 60)
        )),
    })
}

/// The request for this verb.
pub fn plan(env: &Env, args: &CniArgs, conf: &NetConf) -> Result<Request, CniError> {
    if matches!(env.verb, Verb::Add | Verb::Check) {
        check_limits(env, conf)?;
    }
    Ok(match env.verb {
        Verb::Add => Request::Add(pb::PodAddRequest {
            attachment: attachment(env, conf),
            netns: env.netns.clone(),
            pod_namespace: args.pod_namespace.clone(),
            pod_name: args.pod_name.clone(),
            requested_address: args
                .ip
                .or(conf.requested_ip)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            mtu: conf.mtu,
        }),
        Verb::Del => match check_limits(env, conf) {
            // No ADD can have attached it: nothing to remove.
            Err(e) => Request::NothingToDelete(e.msg),
            Ok(()) => Request::Del(pb::PodDelRequest {
                attachment: attachment(env, conf),
                netns: env.netns.clone(),
                pod_namespace: args.pod_namespace.clone(),
                pod_name: args.pod_name.clone(),
            }),
        },
        Verb::Check => {
            let prev = conf
                .prev_result
                .as_ref()
                .ok_or_else(|| CniError::config("CHECK needs prevResult in the network config"))?;
            let expected = prev.expected_addresses(&env.ifname);
            if expected.is_empty() {
                return Err(CniError::new(
                    code::CHECK_FAILED,
                    format!("prevResult lists no address for interface {}", env.ifname),
                    "",
                ));
            }
            Request::Check(pb::PodCheckRequest {
                attachment: attachment(env, conf),
                netns: env.netns.clone(),
                pod_namespace: args.pod_namespace.clone(),
                pod_name: args.pod_name.clone(),
                expected_addresses: expected,
            })
        }
        Verb::Status => Request::Status,
        Verb::Gc => Request::Gc(pb::PodGcRequest {
            network: conf.name.clone(),
            valid: conf
                .valid_attachments
                .iter()
                .flatten()
                .map(|a| pb::PodAttachment {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                    network: conf.name.clone(),
                })
                .collect(),
        }),
        Verb::Version => return Err(CniError::internal("VERSION sends no request")),
    })
}

/// What a successful verb leaves behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// What to print on stdout (ADD's result; nothing for the others).
    pub stdout: Option<String>,
    /// One line for the log.
    pub summary: String,
}

/// Send the planned request and turn the answer into the plugin's output.
pub async fn execute<A: NodeApi>(inv: &Invocation, api: &mut A) -> Result<Outcome, CniError> {
    let verb = inv.env.verb;
    let st = |s: Status| error::from_status(verb, &s);
    match &inv.request {
        Request::Add(req) => {
            let resp = api.add(req.clone()).await.map_err(st)?;
            let result = CniResult::from_add(
                &resp,
                &inv.env.ifname,
                &inv.env.netns,
                inv.conf.prev_result.clone(),
                &inv.conf.dns,
            )?;
            Ok(Outcome {
                stdout: Some(result.render(inv.conf.version).to_string()),
                summary: format!(
                    "addresses={} host_ifname={} mtu={}",
                    resp.addresses.join(","),
                    resp.host_ifname,
                    resp.mtu
                ),
            })
        }
        Request::NothingToDelete(why) => Ok(Outcome {
            stdout: None,
            summary: format!("nothing to delete, tabby-node not called: {why}"),
        }),
        Request::Del(req) => {
            let resp = api.del(req.clone()).await.map_err(st)?;
            Ok(Outcome {
                stdout: None,
                summary: format!("released=[{}]", resp.released.join(",")),
            })
        }
        Request::Check(req) => {
            api.check(req.clone()).await.map_err(st)?;
            Ok(Outcome {
                stdout: None,
                summary: format!("verified=[{}]", req.expected_addresses.join(",")),
            })
        }
        Request::Status => {
            let resp = api.status().await.map_err(st)?;
            if !resp.ready && !resp.last_error.is_empty() {
                // Its last reconcile failed too: routes or NAT that existing
                // pods rely on may be missing.
                return Err(CniError::new(
                    code::LIMITED_CONNECTIVITY,
                    "tabby-node cannot serve ADD now, and existing pods may have limited connectivity",
                    format!("{}; last reconcile: {}", resp.reason, resp.last_error),
                ));
            }
            if !resp.ready {
                return Err(CniError::new(
                    code::NOT_AVAILABLE,
                    "tabby-node cannot serve ADD now",
                    resp.reason,
                ));
            }
            Ok(Outcome {
                stdout: None,
                summary: "ready".into(),
            })
        }
        Request::Gc(req) => {
            let resp = api.gc(req.clone()).await.map_err(st)?;
            Ok(Outcome {
                stdout: None,
                summary: format!(
                    "valid={} released=[{}]",
                    req.valid.len(),
                    resp.released_handles.join(",")
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::SpecVersion;
    use serde_json::{json, Value};
    use std::collections::VecDeque;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_lookup(|k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        })
        .unwrap()
    }

    fn add_env(cni_args: &str) -> Env {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", cni_args),
        ])
    }

    fn stdin(v: Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    fn conf(version: &str) -> Value {
        json!({"cniVersion": version, "name": "k8s-pod-network", "type": "tabby", "mtu": 1450})
    }

    /// Answers from a queue; records what was sent.
    #[derive(Default)]
    struct Fake {
        sent: Vec<Request>,
        add: VecDeque<Result<pb::PodAddResponse, Status>>,
        status: VecDeque<Result<pb::PodStatusResponse, Status>>,
        fail_all: Option<Status>,
    }

    impl Fake {
        fn fail(&self) -> Result<(), Status> {
            self.fail_all.clone().map_or(Ok(()), Err)
        }
    }

    impl NodeApi for Fake {
        async fn add(&mut self, req: pb::PodAddRequest) -> Result<pb::PodAddResponse, Status> {
            self.sent.push(Request::Add(req));
            self.fail()?;
            self.add
                .pop_front()
                .unwrap_or_else(|| Err(Status::internal("no canned answer")))
        }
        async fn del(&mut self, req: pb::PodDelRequest) -> Result<pb::PodDelResponse, Status> {
            self.sent.push(Request::Del(req));
            self.fail()?;
            Ok(pb::PodDelResponse { released: vec![] })
        }
        async fn check(
            &mut self,
            req: pb::PodCheckRequest,
        ) -> Result<pb::PodCheckResponse, Status> {
            self.sent.push(Request::Check(req));
            self.fail()?;
            Ok(pb::PodCheckResponse {})
        }
        async fn status(&mut self) -> Result<pb::PodStatusResponse, Status> {
            self.sent.push(Request::Status);
            self.fail()?;
            self.status.pop_front().unwrap_or(Ok(pb::PodStatusResponse {
                ready: true,
                ..Default::default()
            }))
        }
        async fn gc(&mut self, req: pb::PodGcRequest) -> Result<pb::PodGcResponse, Status> {
            self.sent.push(Request::Gc(req));
            self.fail()?;
            Ok(pb::PodGcResponse {
                released_handles: vec!["k8s-pod-network.old".into()],
            })
        }
    }

    fn run<A: NodeApi>(inv: &Invocation, api: &mut A) -> Result<Outcome, CniError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(execute(inv, api))
    }

    fn answer() -> pb::PodAddResponse {
        pb::PodAddResponse {
            host_ifname: "tabaaaaaaaaaaaa".into(),
            host_mac: "ee:ee:ee:ee:ee:ee".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "02:00:00:00:00:01".into(),
            addresses: vec!["10.244.1.5/32".into()],
            gateways: vec!["169.254.1.1".into()],
            mtu: 1450,
        }
    }

    #[test]
    fn add_request_carries_kubernetes_identity_and_requested_ip() {
        let inv = prepare(
            add_env("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;IP=10.244.1.9;X=y"),
            &stdin(conf("1.0.0")),
        )
        .unwrap();
        let Request::Add(req) = &inv.request else {
            panic!()
        };
        assert_eq!(
            req.attachment,
            Some(pb::PodAttachment {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                network: "k8s-pod-network".into()
            })
        );
        assert_eq!(req.netns, "/var/run/netns/p1");
        assert_eq!(
            (req.pod_namespace.as_str(), req.pod_name.as_str()),
            ("ns", "web")
        );
        assert_eq!(req.requested_address, "10.244.1.9");
        assert_eq!(req.mtu, 1450);
    }

    #[test]
    fn add_prints_the_result_in_the_requested_version() {
        for v in SpecVersion::ALL {
            let inv = prepare(add_env(""), &stdin(conf(v.as_str()))).unwrap();
            let mut fake = Fake {
                add: [Ok(answer())].into(),
                ..Default::default()
            };
            let out = run(&inv, &mut fake).unwrap();
            let printed: Value = serde_json::from_str(&out.stdout.unwrap()).unwrap();
            assert_eq!(printed["cniVersion"], v.as_str());
            assert_eq!(
                printed["ips"][0].get("version").is_some(),
                v < SpecVersion::V1_0_0
            );
        }
    }

    #[test]
    fn add_errors_map_to_cni_codes() {
        let inv = prepare(add_env(""), &stdin(conf("1.0.0"))).unwrap();
        for (st, want) in [
            (Status::unavailable("controller down"), 11),
            (Status::already_exists("dup"), 100),
            (Status::invalid_argument("bad"), 7),
            (Status::internal("boom"), 999),
        ] {
            let mut fake = Fake {
                add: [Err(st)].into(),
                ..Default::default()
            };
            assert_eq!(run(&inv, &mut fake).unwrap_err().code, want);
        }
    }

    #[test]
    fn unknown_cni_args_fail_before_any_request() {
        let f = prepare(add_env("FOO=bar"), &stdin(conf("0.4.0"))).unwrap_err();
        assert_eq!(f.error.code, code::INVALID_ENV);
        assert_eq!(f.cni_version, "0.4.0");
    }

    #[test]
    fn del_without_netns_and_with_any_prev_result() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let mut c = conf("0.4.0");
        c["prevResult"] = json!({"ips": "whatever a cache held"});
        let inv = prepare(e, &stdin(c)).unwrap();
        let mut fake = Fake::default();
        let out = run(&inv, &mut fake).unwrap();
        assert_eq!(out.stdout, None);
        let Request::Del(req) = &fake.sent[0] else {
            panic!()
        };
        assert_eq!(req.netns, "");
        assert_eq!(req.attachment.as_ref().unwrap().container_id, "c1");
    }

    #[test]
    fn check_sends_prev_result_addresses_for_this_interface() {
        let e = env(&[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let mut c = conf("1.0.0");
        c["prevResult"] = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "tabaaaaaaaaaaaa"}, {"name": "eth0", "sandbox": "/var/run/netns/p1"}],
            "ips": [{"address": "10.244.1.5/32", "interface": 1}]
        });
        let inv = prepare(e.clone(), &stdin(c)).unwrap();
        let mut fake = Fake::default();
        assert_eq!(run(&inv, &mut fake).unwrap().stdout, None);
        let Request::Check(req) = &fake.sent[0] else {
            panic!()
        };
        assert_eq!(req.expected_addresses, vec!["10.244.1.5/32"]);

        // No prevResult: invalid config, nothing sent.
        assert_eq!(
            prepare(e.clone(), &stdin(conf("1.0.0")))
                .unwrap_err()
                .error
                .code,
            7
        );
        // prevResult without our interface: check failed.
        let mut c = conf("1.0.0");
        c["prevResult"] = json!({"interfaces": [{"name": "net1", "sandbox": "/x"}],
                                 "ips": [{"address": "10.0.0.1/32", "interface": 0}]});
        assert_eq!(
            prepare(e, &stdin(c)).unwrap_err().error.code,
            code::CHECK_FAILED
        );
    }

    #[test]
    fn status_ready_not_ready_and_unreachable() {
        let e = env(&[("CNI_COMMAND", "STATUS")]);
        let inv = prepare(e, &stdin(conf("1.1.0"))).unwrap();
        assert!(run(&inv, &mut Fake::default()).is_ok());
        let mut fake = Fake {
            status: [Ok(pb::PodStatusResponse {
                ready: false,
                reason: "controller unreachable".into(),
                ..Default::default()
            })]
            .into(),
            ..Default::default()
        };
        let err = run(&inv, &mut fake).unwrap_err();
        assert_eq!(
            (err.code, err.details.as_str()),
            (50, "controller unreachable")
        );
        // Not ready, and the kernel is not as intended: 51.
        let mut fake = Fake {
            status: [Ok(pb::PodStatusResponse {
                ready: false,
                reason: "controller unreachable".into(),
                last_error: "10.244.1.0/26: Network is unreachable".into(),
                ..Default::default()
            })]
            .into(),
            ..Default::default()
        };
        let err = run(&inv, &mut fake).unwrap_err();
        assert_eq!(err.code, 51);
        assert!(err.details.contains("Network is unreachable"), "{err:?}");
        // Ready with a reconcile error: ADD still works, STATUS succeeds.
        let mut fake = Fake {
            status: [Ok(pb::PodStatusResponse {
                ready: true,
                last_error: "10.244.1.0/26: Network is unreachable".into(),
                ..Default::default()
            })]
            .into(),
            ..Default::default()
        };
        assert!(run(&inv, &mut fake).is_ok());
        let mut fake = Fake {
            fail_all: Some(Status::unavailable("x")),
            ..Default::default()
        };
        assert_eq!(run(&inv, &mut fake).unwrap_err().code, 50);
    }

    #[test]
    fn gc_sends_the_valid_list_in_this_network() {
        let e = env(&[("CNI_COMMAND", "GC"), ("CNI_ARGS", "NOT=parsed-for-gc")]);
        let mut c = conf("1.1.0");
        c["cni.dev/attachments"] = json!([{"containerID": "c9", "ifname": "eth0"}]);
        let inv = prepare(e, &stdin(c)).unwrap();
        let mut fake = Fake::default();
        let out = run(&inv, &mut fake).unwrap();
        assert!(out.summary.contains("k8s-pod-network.old"));
        let Request::Gc(req) = &fake.sent[0] else {
            panic!()
        };
        assert_eq!(req.network, "k8s-pod-network");
        assert_eq!(
            req.valid,
            vec![pb::PodAttachment {
                container_id: "c9".into(),
                ifname: "eth0".into(),
                network: "k8s-pod-network".into()
            }]
        );
    }

    #[test]
    fn errors_before_negotiation_use_a_sane_version() {
        let f = prepare(add_env(""), b"{not json").unwrap_err();
        assert_eq!((f.error.code, f.cni_version.as_str()), (6, "1.1.0"));
        let f = prepare(
            add_env(""),
            &stdin(json!({"cniVersion": "0.2.0", "name": "n", "type": "tabby"})),
        )
        .unwrap_err();
        assert_eq!((f.error.code, f.cni_version.as_str()), (1, "0.2.0"));
    }

    fn attach_env(verb: &str, container_id: &str) -> Env {
        env(&[
            ("CNI_COMMAND", verb),
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", "/var/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
        ])
    }

    #[test]
    fn a_handle_over_the_alias_limit_is_refused_before_any_request() {
        // "k8s-pod-network" + "." + 238 = 254 bytes: the longest alias.
        let fits = "a".repeat(238);
        let over = "a".repeat(239);
        for verb in ["ADD", "CHECK"] {
            let mut c = conf("1.0.0");
            c["prevResult"] = json!({"ips": [{"address": "10.244.1.5/32"}]});
            assert!(prepare(attach_env(verb, &fits), &stdin(c.clone())).is_ok());
            let f = prepare(attach_env(verb, &over), &stdin(c)).unwrap_err();
            assert_eq!(f.error.code, code::INVALID_ENV, "{verb}");
            assert!(
                f.error.msg.contains("255 bytes") && f.error.msg.contains("at most 238"),
                "{}",
                f.error.msg
            );
        }
        // Over the container id's own limit, whatever the network name.
        let f = prepare(attach_env("ADD", &"a".repeat(300)), &stdin(conf("1.0.0"))).unwrap_err();
        assert_eq!(f.error.code, code::INVALID_ENV);
        assert!(f.error.msg.contains("CNI_CONTAINERID"), "{}", f.error.msg);
    }

    #[test]
    fn a_network_name_over_its_limit_is_invalid_config() {
        for len in [limits::MAX_NETWORK_NAME_LEN + 1, 10 << 20] {
            let mut c = conf("1.1.0");
            c["name"] = json!("n".repeat(len));
            for verb in [attach_env("ADD", "c1"), env(&[("CNI_COMMAND", "STATUS")])] {
                let f = prepare(verb, &stdin(c.clone())).unwrap_err();
                assert_eq!(f.error.code, code::INVALID_CONFIG);
                assert!(
                    f.error.msg.contains(&format!("{len} bytes")) && f.error.msg.contains("252"),
                    "{}",
                    f.error.msg
                );
                assert!(f.error.msg.len() < 300, "the message stays short");
            }
        }
    }

    #[test]
    fn del_of_a_handle_no_add_can_have_attached_succeeds_without_the_node() {
        let mut long_name = conf("1.0.0");
        long_name["name"] = json!("n".repeat(10 << 20));
        for (id, c) in [
            ("a".repeat(239), conf("1.0.0")),
            ("a".repeat(300), conf("1.0.0")),
            ("c1".to_string(), long_name),
        ] {
            let inv = prepare(attach_env("DEL", &id), &stdin(c)).unwrap();
            let Request::NothingToDelete(why) = &inv.request else {
                panic!("{:?}", inv.request)
            };
            assert!(why.contains("limit"), "{why}");
            let mut fake = Fake::default();
            assert_eq!(run(&inv, &mut fake).unwrap().stdout, None);
            assert!(fake.sent.is_empty());
        }
        // Within the limits, DEL goes to the node as always.
        let inv = prepare(attach_env("DEL", &"a".repeat(238)), &stdin(conf("1.0.0"))).unwrap();
        assert!(matches!(inv.request, Request::Del(_)));
    }

    #[test]
    fn check_with_a_prev_result_address_that_is_not_one_is_code_6() {
        let mut c = conf("1.0.0");
        c["prevResult"] = json!({
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p1"}],
            "ips": [{"address": "banana", "interface": 0}]
        });
        let f = prepare(attach_env("CHECK", "c1"), &stdin(c)).unwrap_err();
        assert_eq!(f.error.code, code::DECODE);
        assert!(f.error.msg.contains("banana"), "{}", f.error.msg);
    }
}
