//! The network configuration on stdin: standard CNI keys plus tabby's own,
//! decoded strictly and validated once.

use crate::env::{truncate, valid_identifier};
use crate::error::{code, CniError};
use crate::log::Level;
use crate::result::{CniResult, Dns};
use crate::verb::Verb;
use crate::version::{self, SpecVersion};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use tabby_proto::limits;

/// Where `tabby-node` listens unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tabby/cni.sock";
/// Default per-call timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Default connect (and HTTP/2 handshake) timeout.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;

/// Keys of the spec and of tabby. Any other key is CNI error 2, except
/// `cni.dev/*`, which the spec reserves for runtimes.
const KNOWN_KEYS: &[&str] = &[
    // spec: set by runtimes or well known
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "runtimeConfig",
    "capabilities",
    "args",
    "prevResult",
    "ipam",
    "dns",
    "disableCheck",
    "disableGC",
    // tabby
    "socket",
    "mtu",
    "log_file",
    "log_level",
    "timeout_ms",
    "connect_timeout_ms",
];

/// One `{containerID, ifname}` of GC's valid-attachments list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct GcAttachment {
    /// Container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// The decoded, validated configuration of one invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// Negotiated spec version.
    pub version: SpecVersion,
    /// Network name (part of the IPAM handle).
    pub name: String,
    /// `tabby-node`'s socket.
    pub socket: PathBuf,
    /// Pod MTU; 0 leaves it to the node.
    pub mtu: u32,
    /// Log file; stderr when absent.
    pub log_file: Option<PathBuf>,
    /// Log level.
    pub log_level: Level,
    /// Per-call timeout.
    pub timeout: Duration,
    /// Connect and handshake timeout.
    pub connect_timeout: Duration,
    /// `prevResult`, decoded (CHECK and a chained ADD use it).
    pub prev_result: Option<CniResult>,
    /// The single address requested through `runtimeConfig.ips` or
    /// `args.cni.ips` (CNI_ARGS `IP=` takes precedence).
    pub requested_ip: Option<IpAddr>,
    /// DNS to report in the ADD result.
    pub dns: Dns,
    /// GC's valid attachments (union of both key spellings, sorted, unique).
    pub valid_attachments: Option<Vec<GcAttachment>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(rename = "cniVersion")]
    _cni_version: Option<String>,
    #[serde(rename = "cniVersions")]
    _cni_versions: Option<Vec<String>>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "runtimeConfig")]
    runtime_config: Option<Map<String, Value>>,
    #[serde(rename = "capabilities")]
    _capabilities: Option<Map<String, Value>>,
    args: Option<Map<String, Value>>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    #[serde(rename = "ipam")]
    _ipam: Option<Value>,
    dns: Option<Dns>,
    #[serde(rename = "disableCheck")]
    _disable_check: Option<bool>,
    #[serde(rename = "disableGC")]
    _disable_gc: Option<bool>,
    socket: Option<String>,
    mtu: Option<u32>,
    log_file: Option<String>,
    log_level: Option<String>,
    timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    // `present` keeps an explicit null apart from a missing key.
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        deserialize_with = "present"
    )]
    valid_attachments: Option<Value>,
    #[serde(rename = "cni.dev/attachments", default, deserialize_with = "present")]
    attachments: Option<Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Decode stdin into a JSON object (code 6 otherwise).
pub fn parse_object(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::decode("no network config on stdin"));
    }
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CniError::decode("network config must be a JSON object")),
        Err(e) => Err(CniError::decode(format!(
            "cannot decode network config: {e}"
        ))),
    }
}

/// Validate and decode the config object for `verb`.
///
/// Order, as libcni's skeleton does it: version (1), then unsupported keys
/// (2), types (6), values (7).
pub fn parse(verb: Verb, obj: Map<String, Value>) -> Result<NetConf, CniError> {
    let version = version::negotiate(&obj)?;
    version::check_verb(verb, version)?;

    if let Some((k, v)) = obj
        .iter()
        .find(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()) && !k.starts_with("cni.dev/"))
    {
        return Err(CniError::new(
            code::UNSUPPORTED_FIELD,
            format!("unsupported field {:?} in network config", truncate(k, 60)),
            format!("{}={}", truncate(k, 60), truncate(&v.to_string(), 200)),
        ));
    }
    let mut obj = obj;
    obj.retain(|k, _| {
        !k.starts_with("cni.dev/") || k == "cni.dev/valid-attachments" || k == "cni.dev/attachments"
    });
    let raw: Raw = serde_json::from_value(Value::Object(obj))
        .map_err(|e| CniError::decode(format!("cannot decode network config: {e}")))?;

    let name = raw.name.unwrap_or_default();
    if name.is_empty() {
        return Err(CniError::config("missing network name"));
    }
    // DEL is spared: an over-long name means nothing can exist to delete,
    // which plan::plan turns into a success.
    if verb != Verb::Del {
        limits::check_network_name(&name).map_err(|e| {
            CniError::config(format!(
                "invalid network name {:?}: {e}",
                truncate(&name, 60)
            ))
        })?;
    }
    if !valid_identifier(&name) {
        return Err(CniError::config(format!(
            "invalid characters in network name {:?}",
            truncate(&name, 60)
        )));
    }
    match raw.kind.as_deref() {
        Some("tabby") => {}
        Some(t) => {
            return Err(CniError::config(format!(
                "type is {:?}, this plugin is \"tabby\"",
                truncate(t, 60)
            )))
        }
        None => return Err(CniError::config("missing type")),
    }

    let socket = PathBuf::from(raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.to_string()));
    if !socket.is_absolute() || socket.as_os_str().len() > 107 {
        return Err(CniError::config(
            "socket must be an absolute path of at most 107 bytes",
        ));
    }
    let mtu = raw.mtu.unwrap_or(0);
    if mtu != 0 {
        tabby_proto::limits::check_mtu(mtu).map_err(CniError::config)?;
    }
    let log_file = match raw.log_file {
        None => None,
        Some(f) if f.is_empty() => None,
        Some(f) => {
            let p = PathBuf::from(f);
            if !p.is_absolute() {
                return Err(CniError::config("log_file must be an absolute path"));
            }
            Some(p)
        }
    };
    let log_level = match raw.log_level {
        None => Level::Info,
        Some(l) => Level::parse(&l).ok_or_else(|| {
            CniError::config(format!(
                "log_level {:?} is not one of off, error, warn, info, debug, trace",
                truncate(&l, 40)
            ))
        })?,
    };
    let ms = |v: Option<u64>, default: u64, max: u64, what: &str| -> Result<Duration, CniError> {
        let v = v.unwrap_or(default);
        if v == 0 || v > max {
            return Err(CniError::config(format!("{what} must be within 1..={max}")));
        }
        Ok(Duration::from_millis(v))
    };
    let timeout = ms(raw.timeout_ms, DEFAULT_TIMEOUT_MS, 600_000, "timeout_ms")?;
    let connect_timeout = ms(
        raw.connect_timeout_ms,
        DEFAULT_CONNECT_TIMEOUT_MS,
        60_000,
        "connect_timeout_ms",
    )?;

    // DEL accepts any prevResult (it must succeed even if the cache is odd);
    // CHECK and ADD use it, so it must decode for them.
    let prev_result = match (&raw.prev_result, verb) {
        (None | Some(Value::Null), _) => None,
        (Some(_), Verb::Del | Verb::Status | Verb::Gc | Verb::Version) => None,
        (Some(v), _) => Some(CniResult::from_prev(v)?),
    };

    let requested_ip = requested_ip(raw.runtime_config.as_ref(), raw.args.as_ref())?;

    let valid_attachments = if verb == Verb::Gc {
        let mut all = Vec::new();
        let mut seen_key = false;
        for (key, v) in [
            ("cni.dev/valid-attachments", &raw.valid_attachments),
            ("cni.dev/attachments", &raw.attachments),
        ] {
            if let Some(v) = v {
                seen_key = true;
                all.extend(attachments(key, v)?);
            }
        }
        if !seen_key {
            // Releasing every handle because a key is missing would be a
            // disaster; an explicit empty list is fine.
            return Err(CniError::config(
                "GC needs cni.dev/valid-attachments (or cni.dev/attachments)",
            ));
        }
        all.sort();
        all.dedup();
        Some(all)
    } else {
        None
    };

    Ok(NetConf {
        version,
        name,
        socket,
        mtu,
        log_file,
        log_level,
        timeout,
        connect_timeout,
        prev_result,
        requested_ip,
        dns: raw.dns.unwrap_or_default(),
        valid_attachments,
    })
}

fn attachments(key: &str, v: &Value) -> Result<Vec<GcAttachment>, CniError> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    let list: Vec<GcAttachment> = serde_json::from_value(v.clone())
        .map_err(|e| CniError::decode(format!("cannot decode {key}: {e}")))?;
    for a in &list {
        if !valid_identifier(&a.container_id) || a.ifname.is_empty() {
            return Err(CniError::config(format!(
                "{key}: invalid attachment {{containerID: {:?}, ifname: {:?}}}",
                truncate(&a.container_id, 80),
                truncate(&a.ifname, 20)
            )));
        }
    }
    Ok(list)
}

/// `runtimeConfig.ips` (capability `ips`) or `args.cni.ips` (convention):
/// strings, with or without a prefix length. tabby assigns one address per
/// attachment, so at most one may be requested.
fn requested_ip(
    runtime: Option<&Map<String, Value>>,
    args: Option<&Map<String, Value>>,
) -> Result<Option<IpAddr>, CniError> {
    let from_runtime = runtime.and_then(|m| m.get("ips"));
    let from_args = args
        .and_then(|m| m.get("cni"))
        .and_then(|c| c.as_object())
        .and_then(|c| c.get("ips"));
    let (src, list) = match (from_runtime, from_args) {
        (Some(l), _) if !l.is_null() => ("runtimeConfig.ips", l),
        (_, Some(l)) if !l.is_null() => ("args.cni.ips", l),
        _ => return Ok(None),
    };
    let list: Vec<String> = serde_json::from_value(list.clone())
        .map_err(|e| CniError::decode(format!("{src} must be a list of strings: {e}")))?;
    match list.as_slice() {
        [] => Ok(None),
        [one] => {
            let addr = one.split_once('/').map_or(one.as_str(), |(a, _)| a);
            addr.parse().map(Some).map_err(|_| {
                CniError::config(format!(
                    "{src}: {:?} is not an IP address",
                    truncate(one, 60)
                ))
            })
        }
        _ => Err(CniError::config(format!(
            "{src}: tabby assigns one address per attachment, {} were requested",
            list.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(verb: Verb, v: Value) -> Result<NetConf, CniError> {
        let s = v.to_string();
        parse(verb, parse_object(s.as_bytes())?)
    }

    fn base() -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tabby"})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b[k] = v;
        b
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = conf(Verb::Add, base()).unwrap();
        assert_eq!(c.version, SpecVersion::V1_0_0);
        assert_eq!(c.name, "k8s-pod-network");
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.mtu, 0);
        assert_eq!(c.log_file, None);
        assert_eq!(c.log_level, Level::Info);
        assert_eq!(c.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert_eq!(
            c.connect_timeout,
            Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS)
        );
        assert_eq!(c.prev_result, None);
        assert_eq!(c.requested_ip, None);
        assert_eq!(c.valid_attachments, None);
    }

    #[test]
    fn full_config() {
        let c = conf(
            Verb::Add,
            json!({
                "cniVersion": "0.3.1", "name": "net", "type": "tabby",
                "socket": "/tmp/t/cni.sock", "mtu": 1450,
                "log_file": "/var/log/tabby/cni.log", "log_level": "DEBUG",
                "timeout_ms": 5000, "connect_timeout_ms": 100,
                "capabilities": {"ips": true}, "runtimeConfig": {"ips": ["10.244.3.3/24"]},
                "args": {"cni": {"labels": []}}, "ipam": {"type": "ignored"},
                "dns": {"nameservers": ["10.96.0.10"]}, "disableCheck": false,
                "cni.dev/some-future-key": 1
            }),
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/t/cni.sock"));
        assert_eq!(c.mtu, 1450);
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/tabby/cni.log")));
        assert_eq!(c.log_level, Level::Debug);
        assert_eq!(c.timeout, Duration::from_millis(5000));
        assert_eq!(c.connect_timeout, Duration::from_millis(100));
        assert_eq!(c.requested_ip, Some("10.244.3.3".parse().unwrap()));
        assert_eq!(c.dns.nameservers, Some(vec!["10.96.0.10".to_string()]));
    }

    #[test]
    fn unknown_keys_are_code_2_with_key_and_value() {
        let e = conf(Verb::Add, with("bridge", json!("cni0"))).unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_FIELD);
        assert!(e.msg.contains("bridge"));
        assert_eq!(e.details, "bridge=\"cni0\"");
        // Not even plugins of a conflist.
        assert_eq!(
            conf(Verb::Add, with("plugins", json!([])))
                .unwrap_err()
                .code,
            2
        );
        assert_eq!(
            conf(Verb::Add, with("ipMasq", json!(true)))
                .unwrap_err()
                .code,
            2
        );
    }

    #[test]
    fn wrong_types_are_code_6() {
        for (k, v) in [
            ("mtu", json!("1450")),
            ("mtu", json!(-1)),
            ("mtu", json!(1e30)),
            ("mtu", json!(99999999999u64)),
            ("name", json!(7)),
            ("socket", json!(["/x"])),
            ("runtimeConfig", json!("x")),
            ("timeout_ms", json!(1.5)),
            ("dns", json!({"nameserver": "x"})),
        ] {
            assert_eq!(
                conf(Verb::Add, with(k, v.clone())).unwrap_err().code,
                6,
                "{k}={v}"
            );
        }
    }

    #[test]
    fn invalid_values_are_code_7() {
        for (k, v) in [
            ("name", json!("")),
            ("name", json!("-bad")),
            ("name", json!("a/b")),
            ("type", json!("bridge")),
            ("socket", json!("relative.sock")),
            ("socket", json!(format!("/{}", "x".repeat(200)))),
            ("mtu", json!(67)),
            ("mtu", json!(65536)),
            ("log_level", json!("loud")),
            ("log_file", json!("rel.log")),
            ("timeout_ms", json!(0)),
            ("timeout_ms", json!(600_001)),
            ("connect_timeout_ms", json!(0)),
        ] {
            assert_eq!(
                conf(Verb::Add, with(k, v.clone())).unwrap_err().code,
                7,
                "{k}={v}"
            );
        }
        let mut b = base();
        b.as_object_mut().unwrap().remove("name");
        assert_eq!(conf(Verb::Add, b).unwrap_err().code, 7);
        let mut b = base();
        b.as_object_mut().unwrap().remove("type");
        assert_eq!(conf(Verb::Add, b).unwrap_err().code, 7);
    }

    #[test]
    fn malformed_stdin_is_code_6() {
        for bad in [
            &b""[..],
            b"   \n",
            b"{",
            b"[]",
            b"\"x\"",
            b"null",
            b"\xff\xfe",
            b"{\"a\":1}x",
        ] {
            assert_eq!(parse_object(bad).unwrap_err().code, 6, "{bad:?}");
        }
    }

    #[test]
    fn version_comes_first() {
        // An unknown key in a config of an unsupported version reports the version.
        let mut b = with("bridge", json!(1));
        b["cniVersion"] = json!("0.2.0");
        assert_eq!(conf(Verb::Add, b).unwrap_err().code, 1);
        // cniVersions alone.
        let mut b = base();
        b.as_object_mut().unwrap().remove("cniVersion");
        b["cniVersions"] = json!(["0.4.0", "1.1.0"]);
        assert_eq!(conf(Verb::Add, b).unwrap().version, SpecVersion::V1_1_0);
    }

    #[test]
    fn verbs_need_their_version() {
        let mut b = base();
        b["cniVersion"] = json!("0.3.1");
        assert_eq!(conf(Verb::Check, b.clone()).unwrap_err().code, 1);
        b["cniVersion"] = json!("1.0.0");
        assert_eq!(conf(Verb::Status, b.clone()).unwrap_err().code, 1);
        assert_eq!(conf(Verb::Gc, b).unwrap_err().code, 1);
    }

    #[test]
    fn prev_result_is_decoded_for_check_and_ignored_for_del() {
        let prev = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/ns"}],
            "ips": [{"address": "10.244.1.5/32", "interface": 0}]});
        let c = conf(Verb::Check, with("prevResult", prev)).unwrap();
        assert_eq!(
            c.prev_result.unwrap().expected_addresses("eth0"),
            vec!["10.244.1.5/32"]
        );
        let odd = json!({"ips": "garbage"});
        assert_eq!(
            conf(Verb::Check, with("prevResult", odd.clone()))
                .unwrap_err()
                .code,
            6
        );
        let c = conf(Verb::Del, with("prevResult", odd)).unwrap();
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn gc_attachments_under_both_keys() {
        let mut b = base();
        b["cniVersion"] = json!("1.1.0");
        let a = json!([{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "eth0"}]);
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let mut x = b.clone();
            x[key] = a.clone();
            let c = conf(Verb::Gc, x).unwrap();
            let got = c.valid_attachments.unwrap();
            assert_eq!(got.len(), 2, "{key}");
            assert_eq!(got[0].container_id, "c1");
        }
        // libcni sends both with the same value: the union has no duplicates.
        let mut x = b.clone();
        x["cni.dev/valid-attachments"] = a.clone();
        x["cni.dev/attachments"] = json!([{"containerID": "c3", "ifname": "net1"}, {"containerID": "c1", "ifname": "eth0"}]);
        assert_eq!(
            conf(Verb::Gc, x).unwrap().valid_attachments.unwrap().len(),
            3
        );
        // null is an empty list; a missing key is refused.
        let mut x = b.clone();
        x["cni.dev/valid-attachments"] = Value::Null;
        assert_eq!(conf(Verb::Gc, x).unwrap().valid_attachments, Some(vec![]));
        assert_eq!(conf(Verb::Gc, b.clone()).unwrap_err().code, 7);
        // Malformed entries.
        let mut x = b.clone();
        x["cni.dev/valid-attachments"] = json!([{"containerID": "c1"}]);
        assert_eq!(conf(Verb::Gc, x).unwrap_err().code, 6);
        let mut x = b;
        x["cni.dev/valid-attachments"] = json!([{"containerID": "../x", "ifname": "eth0"}]);
        assert_eq!(conf(Verb::Gc, x).unwrap_err().code, 7);
    }

    /// The shipped example, turned into one plugin's config the way libcni
    /// does it (`name` and `cniVersion` copied in), must parse.
    #[test]
    fn example_conflist_is_valid() {
        let list: Value = serde_json::from_str(include_str!("../10-tabby.conflist")).unwrap();
        let mut plugin = list["plugins"][0].clone();
        plugin["name"] = list["name"].clone();
        plugin["cniVersion"] = list["cniVersion"].clone();
        let c = conf(Verb::Add, plugin).unwrap();
        assert_eq!(c.name, "k8s-pod-network");
        assert_eq!(c.version, SpecVersion::V1_0_0);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.mtu, 1450);
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/tabby/cni.log")));
    }

    #[test]
    fn requested_ip_sources() {
        let c = conf(
            Verb::Add,
            with("args", json!({"cni": {"ips": ["10.244.9.9"]}})),
        )
        .unwrap();
        assert_eq!(c.requested_ip, Some("10.244.9.9".parse().unwrap()));
        let e = conf(
            Verb::Add,
            with(
                "runtimeConfig",
                json!({"ips": ["10.0.0.1/24", "fd00::1/64"]}),
            ),
        )
        .unwrap_err();
        assert_eq!(e.code, 7);
        let e = conf(Verb::Add, with("runtimeConfig", json!({"ips": ["nope"]}))).unwrap_err();
        assert_eq!(e.code, 7);
        let e = conf(Verb::Add, with("runtimeConfig", json!({"ips": [1]}))).unwrap_err();
        assert_eq!(e.code, 6);
    }
}
