//! Fuzzing, on stable Rust with proptest, of everything the plugin reads
//! before it talks to `tabby-node`: the `CNI_*` environment
//! ([`Env::from_lookup`]), `CNI_ARGS` ([`args::parse`]), the network config
//! on stdin ([`config::parse_object`], [`config::parse`],
//! [`version::negotiate`], [`CniResult::from_prev`]) and the whole
//! preparation ([`plan::prepare`]).
//!
//! Inputs are fully random, or valid invocations with one or more
//! mutations (a variable missing or garbage, a byte flipped, a field
//! deleted, given the wrong type or a huge value), so that the parsers get
//! past their first checks. Every input must end in an accepted invocation
//! that holds to the limits, or in a CNI error with a fitting code and a
//! message; never in a panic. The case counts add up to over 100,000.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::IpAddr;
use std::os::unix::ffi::OsStringExt;
use tabby_cni::args;
use tabby_cni::config;
use tabby_cni::env::{valid_identifier, Env};
use tabby_cni::error::{code, CniError};
use tabby_cni::plan::{self, Request};
use tabby_cni::result::{parse_cidr, CniResult};
use tabby_cni::verb::Verb;
use tabby_cni::version::{self, SpecVersion};
use tabby_proto::limits;

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

// ---------------------------------------------------------------------------
// What every outcome must look like.

/// Codes a refusal of the environment or the config may carry: the spec's
/// well-known ones for these cases, and tabby's CHECK_FAILED for a
/// prevResult that lists no address of the interface.
const PARSE_CODES: [u32; 6] = [
    code::INCOMPATIBLE_VERSION,
    code::UNSUPPORTED_FIELD,
    code::INVALID_ENV,
    code::DECODE,
    code::INVALID_CONFIG,
    code::CHECK_FAILED,
];

/// A refusal: an allowed code, a message, and an error document a runtime
/// can read (one line, the spec's four keys).
fn assert_clear(e: &CniError, allowed: &[u32]) -> Result<(), TestCaseError> {
    prop_assert!(
        allowed.contains(&e.code),
        "code {} is not one of {:?}: {}",
        e.code,
        allowed,
        e
    );
    prop_assert!(!e.msg.trim().is_empty(), "no message: {:?}", e);
    let text = e.to_json("1.0.0");
    prop_assert!(!text.contains('\n'), "error JSON is not one line");
    let doc: Value = serde_json::from_str(&text).unwrap();
    prop_assert_eq!(doc["code"].as_u64(), Some(u64::from(e.code)));
    prop_assert_eq!(doc["msg"].as_str(), Some(e.msg.as_str()));
    prop_assert!(doc["details"].is_string() && doc["cniVersion"] == "1.0.0");
    Ok(())
}

/// The `cniVersion` an error is printed in: the config's own when it looks
/// like a version, else a supported one; never empty or garbage.
fn assert_error_version(v: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !v.is_empty() && v.len() <= 16 && v.chars().all(|c| c.is_ascii_digit() || c == '.'),
        "error cniVersion {:?}",
        v
    );
    Ok(())
}

/// An accepted environment holds to the spec's rules.
fn assert_env_ok(e: &Env) -> Result<(), TestCaseError> {
    if e.verb.is_attachment_verb() {
        prop_assert!(valid_identifier(&e.container_id), "{:?}", e);
        prop_assert!(
            !e.ifname.is_empty()
                && e.ifname.len() <= limits::MAX_IFNAME_LEN
                && e.ifname != "."
                && e.ifname != ".."
                && !e
                    .ifname
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()),
            "{:?}",
            e
        );
        if e.verb != Verb::Del {
            prop_assert!(!e.netns.is_empty(), "{:?}", e);
        }
    }
    Ok(())
}

fn assert_attachment(
    a: &Option<tabby_proto::v1::PodAttachment>,
    env: &Env,
    network: &str,
) -> Result<(), TestCaseError> {
    let a = a.as_ref().unwrap();
    prop_assert_eq!(&a.container_id, &env.container_id);
    prop_assert_eq!(&a.ifname, &env.ifname);
    prop_assert_eq!(&a.network, network);
    prop_assert!(
        limits::check_attachment(&a.network, &a.container_id).is_ok(),
        "over the limits: {:?}",
        a
    );
    Ok(())
}

/// An accepted invocation: a config within its ranges and a request the
/// node can take.
fn assert_invocation_ok(inv: &plan::Invocation) -> Result<(), TestCaseError> {
    let c = &inv.conf;
    prop_assert!(valid_identifier(&c.name), "name {:?}", c.name);
    prop_assert!(c.socket.is_absolute() && c.socket.as_os_str().len() <= 107);
    prop_assert!(
        c.mtu == 0 || limits::check_mtu(c.mtu).is_ok(),
        "mtu {}",
        c.mtu
    );
    prop_assert!(c.log_file.as_ref().is_none_or(|p| p.is_absolute()));
    prop_assert!(c.timeout.as_millis() >= 1 && c.timeout.as_millis() <= 600_000);
    prop_assert!(c.connect_timeout.as_millis() >= 1 && c.connect_timeout.as_millis() <= 60_000);
    prop_assert!(c.version >= SpecVersion::first_with(inv.env.verb));
    match &inv.request {
        Request::Add(r) => {
            prop_assert_eq!(inv.env.verb, Verb::Add);
            assert_attachment(&r.attachment, &inv.env, &c.name)?;
            prop_assert_eq!(r.mtu, c.mtu);
            prop_assert!(
                r.requested_address.is_empty() || r.requested_address.parse::<IpAddr>().is_ok(),
                "requested {:?}",
                r.requested_address
            );
        }
        Request::Del(r) => {
            prop_assert_eq!(inv.env.verb, Verb::Del);
            assert_attachment(&r.attachment, &inv.env, &c.name)?;
        }
        Request::NothingToDelete(why) => {
            prop_assert_eq!(inv.env.verb, Verb::Del);
            prop_assert!(!why.is_empty());
            prop_assert!(limits::check_attachment(&c.name, &inv.env.container_id).is_err());
        }
        Request::Check(r) => {
            prop_assert_eq!(inv.env.verb, Verb::Check);
            assert_attachment(&r.attachment, &inv.env, &c.name)?;
            prop_assert!(!r.expected_addresses.is_empty());
            for a in &r.expected_addresses {
                prop_assert!(parse_cidr(a).is_some(), "expected address {:?}", a);
            }
        }
        Request::Status => prop_assert_eq!(inv.env.verb, Verb::Status),
        Request::Gc(r) => {
            prop_assert_eq!(inv.env.verb, Verb::Gc);
            prop_assert_eq!(&r.network, &c.name);
            for a in &r.valid {
                prop_assert!(valid_identifier(&a.container_id) && !a.ifname.is_empty());
                prop_assert_eq!(&a.network, &c.name);
            }
        }
    }
    Ok(())
}

/// The plugin's path through its inputs, as `tabby_cni::run` takes it:
/// the environment, then (except for VERSION, answered before stdin is
/// read) the config, `CNI_ARGS` and the plan.
fn run_inputs(vars: &BTreeMap<String, OsString>, stdin: &[u8]) -> Result<(), TestCaseError> {
    let env = match Env::from_lookup(|k| vars.get(k).cloned()) {
        Ok(e) => e,
        Err(e) => return assert_clear(&e, &[code::INVALID_ENV]),
    };
    assert_env_ok(&env)?;
    if env.verb == Verb::Version {
        return Ok(());
    }
    match plan::prepare(env, stdin) {
        Ok(inv) => assert_invocation_ok(&inv),
        Err(f) => {
            assert_clear(&f.error, &PARSE_CODES)?;
            assert_error_version(&f.cni_version)
        }
    }
}

// ---------------------------------------------------------------------------
// Valid inputs to start from.

const VERBS: [Verb; 6] = [
    Verb::Add,
    Verb::Del,
    Verb::Check,
    Verb::Version,
    Verb::Status,
    Verb::Gc,
];

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "tab0123456789ab", "mac": "ee:ee:ee:ee:ee:ee"},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/p1", "mtu": 1450}
        ],
        "ips": [
            {"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1},
            {"address": "fd00:10:244::5/128", "gateway": "fe80::ecee:eeff:feee:eeee", "interface": 1, "version": "6"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0"}],
        "dns": {"nameservers": ["10.96.0.10"]}
    })
}

/// A valid network config for `verb` (several shapes per verb).
fn seed_config(verb: Verb, shape: usize) -> Value {
    let mut c = match (verb, shape % 3) {
        (_, 0) => json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tabby"}),
        (_, 1) => json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tabby",
            "socket": "/run/tabby/cni.sock", "mtu": 1450,
            "log_file": "/var/log/tabby/cni.log", "log_level": "debug",
            "timeout_ms": 5000, "connect_timeout_ms": 100,
            "capabilities": {"ips": true}, "runtimeConfig": {"ips": ["10.244.3.3/24"]},
            "args": {"cni": {"ips": ["10.244.9.9"], "labels": []}},
            "ipam": {"type": "ignored"},
            "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
                    "search": ["svc.cluster.local"], "options": ["ndots:5"]},
            "disableCheck": false, "disableGC": false,
            "cni.dev/some-future-key": {"a": [1, 2]}
        }),
        _ => json!({
            "cniVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"], "name": "net-1.a_b",
            "type": "tabby", "mtu": 9000, "log_level": "WARN", "prevResult": prev_result()
        }),
    };
    let o = c.as_object_mut().unwrap();
    match verb {
        Verb::Check => {
            o.insert("prevResult".into(), prev_result());
        }
        Verb::Status | Verb::Gc => {
            o.insert("cniVersion".into(), json!("1.1.0"));
            if verb == Verb::Gc {
                o.insert(
                    "cni.dev/valid-attachments".into(),
                    json!([{"containerID": "c1", "ifname": "eth0"},
                           {"containerID": "a-b.c_d", "ifname": "net1"}]),
                );
                if shape % 2 == 1 {
                    o.insert(
                        "cni.dev/attachments".into(),
                        json!([{"containerID": "c1", "ifname": "eth0"}]),
                    );
                }
            }
        }
        Verb::Add | Verb::Del | Verb::Version => {}
    }
    c
}

/// A valid environment for `verb`.
fn seed_env(verb: Verb) -> BTreeMap<String, OsString> {
    let mut m = BTreeMap::new();
    m.insert("CNI_COMMAND".into(), verb.as_str().into());
    m.insert("CNI_PATH".into(), "/opt/cni/bin:/usr/lib/cni".into());
    if verb.is_attachment_verb() {
        m.insert(
            "CNI_CONTAINERID".into(),
            "3f1c9e4a7b2d8c6f0e5a9b3c7d1f2e4a6b8c0d9e7f5a3b1c2d4e6f8a0b9c7d5e".into(),
        );
        m.insert("CNI_NETNS".into(), "/var/run/netns/p1".into());
        m.insert("CNI_IFNAME".into(), "eth0".into());
        m.insert(
            "CNI_ARGS".into(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=3f1c9e;K8S_POD_UID=1234-5678;IP=10.244.1.9"
                .into(),
        );
    }
    m
}

#[test]
fn every_seed_is_accepted() {
    for verb in VERBS {
        for shape in 0..3 {
            let stdin = serde_json::to_vec(&seed_config(verb, shape)).unwrap();
            let env = Env::from_lookup(|k| seed_env(verb).get(k).cloned()).unwrap();
            if verb != Verb::Version {
                let inv = plan::prepare(env, &stdin)
                    .unwrap_or_else(|f| panic!("{verb:?} shape {shape}: {:?}", f.error));
                assert_invocation_ok(&inv).unwrap();
            }
        }
    }
}

/// Every field of the fullest ADD config, and every variable, replaced by
/// a 1 MiB string (huge values are rare in the fuzzing below), and stdin at
/// the plugin's limit.
#[test]
fn huge_values_everywhere() {
    let huge = "x".repeat(1 << 20);
    for verb in [Verb::Add] {
        let conf = seed_config(verb, 1);
        let mut all = Vec::new();
        paths(&conf, &mut Vec::new(), &mut all);
        for p in all {
            let mut c = conf.clone();
            *node_at(&mut c, &p) = Value::String(huge.clone());
            run_inputs(&seed_env(verb), &serde_json::to_vec(&c).unwrap()).unwrap();
        }
        for name in ENV_NAMES {
            let mut env = seed_env(verb);
            env.insert(name.into(), huge.clone().into());
            run_inputs(&env, &serde_json::to_vec(&conf).unwrap()).unwrap();
        }
    }
    let mut big = serde_json::to_vec(&seed_config(Verb::Add, 0)).unwrap();
    big.pop();
    let pad = tabby_cni::MAX_STDIN as usize - big.len() - 8;
    big.extend_from_slice(format!(",\"x\":\"{}\"}}", "y".repeat(pad)).as_bytes());
    run_inputs(&seed_env(Verb::Add), &big).unwrap();
}

/// Found with `huge_values_everywhere`: a refusal quotes the whole
/// offending value. serde's "invalid type: string \"...\"" is passed on
/// as it is (config.rs: `parse`, `attachments`, `requested_ip`; result.rs:
/// `from_prev`), and env.rs quotes an unknown `CNI_COMMAND` whole, where
/// every other message truncates to 40-80 characters: a 1 MiB `mtu`
/// string gives a 1 MiB `msg` on stdout and in the log.
#[test]
fn refusals_quote_only_an_excerpt_of_a_huge_value() {
    let huge = "x".repeat(1 << 20);
    let mut env = seed_env(Verb::Add);
    env.insert("CNI_COMMAND".into(), huge.clone().into());
    let e = Env::from_lookup(|k| env.get(k).cloned()).unwrap_err();
    assert!(
        e.msg.len() <= 1024,
        "CNI_COMMAND: msg of {} bytes",
        e.msg.len()
    );
    let mut conf = seed_config(Verb::Add, 0);
    conf["mtu"] = Value::String(huge);
    let env = Env::from_lookup(|k| seed_env(Verb::Add).get(k).cloned()).unwrap();
    let f = plan::prepare(env, &serde_json::to_vec(&conf).unwrap()).unwrap_err();
    assert_eq!(f.error.code, code::DECODE);
    assert!(
        f.error.msg.len() <= 1024,
        "mtu: msg of {} bytes",
        f.error.msg.len()
    );
}

// ---------------------------------------------------------------------------
// Generators.

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
            "", ".", "..", "/", ":", " ", "\0", "\n", "eth0\n", "eth 0", "a/b", "-a", "_a",
            "é", "ééééééééé", "\u{202e}eth0", "\u{7f}", "0", "-1", "1e3", "true", "null",
            "ADD", "add", "DEL ", "1.0.0", "0.1.0", "10.244.1.7", "fd00::7", "10.0.0.1/32",
            "10.0.0.300", "::ffff:1.2.3.4", "IgnoreUnknown=1", "=", ";", "=;=",
        ])
        .prop_map(str::to_string),
        1 => (prop::sample::select(vec![14usize, 15, 16, 106, 107, 108, 238, 239, 252, 253, 254, 255]),
              prop::sample::select(vec!['a', '0', '.', '-', 'é']))
            .prop_map(|(n, c)| c.to_string().repeat(n)),
        1 => (300usize..=2_000).prop_map(|n| "x".repeat(n)),
    ]
}

/// A huge string: rare, as each one costs milliseconds in a debug build
/// (`huge_values_everywhere` tries 1 MiB ones in every place).
fn huge_string() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![16usize << 10, 64 << 10]),
        prop::sample::select(vec!['x', 'é', '"', '\\']),
    )
        .prop_map(|(n, c)| c.to_string().repeat(n / c.len_utf8()))
}

/// A `CNI_ARGS` string: pairs of known and unknown keys, good and bad
/// values, and malformed separators.
fn cni_args_string() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        6 => prop::sample::select(vec![
            "IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME",
            "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "IP", "ignoreunknown", "FOO", "",
        ])
        .prop_map(str::to_string),
        1 => garbage_string(),
    ];
    let value = prop_oneof![
        4 => prop::sample::select(vec![
            "1", "0", "true", "TRUE", "false", "yes", "", "default", "web-0",
            "10.244.1.9", "fd00::9", "10.244.1.9/32", "10.0.0.300", "a=b",
        ])
        .prop_map(str::to_string),
        1 => garbage_string(),
    ];
    let pair = prop_oneof![
        8 => (key, value).prop_map(|(k, v)| format!("{k}={v}")),
        1 => garbage_string(),
    ];
    (prop::collection::vec(pair, 0..8), prop::bool::ANY)
        .prop_map(|(pairs, trail)| pairs.join(";") + if trail { ";" } else { "" })
}

/// What to do to one environment variable.
#[derive(Debug, Clone)]
enum EnvEdit {
    Remove(Index),
    Set(Index, String),
    NotUtf8(Index, Vec<u8>),
    Command(String),
    Args(String),
    FlipByte(Index, Index, u8),
}

const ENV_NAMES: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

fn env_edit() -> impl Strategy<Value = EnvEdit> {
    prop_oneof![
        2 => any::<Index>().prop_map(EnvEdit::Remove),
        4 => (any::<Index>(), garbage_string()).prop_map(|(i, s)| EnvEdit::Set(i, s)),
        1 => (any::<Index>(), huge_string()).prop_map(|(i, s)| EnvEdit::Set(i, s)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(i, mut b)| {
                // An invalid UTF-8 byte somewhere.
                b.push(0xff);
                EnvEdit::NotUtf8(i, b)
            }),
        1 => prop_oneof![
            prop::sample::select(vec!["add", "Del", "CHECK ", "VERSION\0", "GET", "", "GC"])
                .prop_map(str::to_string),
            garbage_string(),
        ]
        .prop_map(EnvEdit::Command),
        3 => cni_args_string().prop_map(EnvEdit::Args),
        2 => (any::<Index>(), any::<Index>(), any::<u8>())
            .prop_map(|(i, at, b)| EnvEdit::FlipByte(i, at, b)),
    ]
}

fn apply_env_edit(m: &mut BTreeMap<String, OsString>, e: EnvEdit) {
    let name = |i: &Index| ENV_NAMES[i.index(ENV_NAMES.len())].to_string();
    match e {
        EnvEdit::Remove(i) => {
            m.remove(&name(&i));
        }
        EnvEdit::Set(i, s) => {
            m.insert(name(&i), s.into());
        }
        EnvEdit::NotUtf8(i, b) => {
            m.insert(name(&i), OsString::from_vec(b));
        }
        EnvEdit::Command(s) => {
            m.insert("CNI_COMMAND".into(), s.into());
        }
        EnvEdit::Args(s) => {
            m.insert("CNI_ARGS".into(), s.into());
        }
        EnvEdit::FlipByte(i, at, b) => {
            let n = name(&i);
            let mut bytes = m.remove(&n).unwrap_or_default().into_vec();
            if bytes.is_empty() {
                bytes.push(b);
            } else {
                let at = at.index(bytes.len());
                bytes[at] ^= b.max(1);
            }
            m.insert(n, OsString::from_vec(bytes));
        }
    }
}

/// A JSON value of any type, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and inf become null
        prop::sample::select(vec![
            0i64, -1, 1, 67, 68, 1450, 65535, 65536, 600_000, 600_001
        ])
        .prop_map(Value::from),
        garbage_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(some_key(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value of an unexpected kind or size for whatever field it replaces.
fn wrong_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => any_json(),
        1 => prop::sample::select(vec![1usize, 2, 64, 126, 127, 128, 129, 300]).prop_map(|depth| {
            // Nesting around serde_json's recursion limit (128).
            let mut v = json!(1);
            for _ in 0..depth {
                v = Value::Array(vec![v]);
            }
            v
        }),
        1 => (1usize..500).prop_map(|n| Value::Array(vec![json!("10.0.0.1"); n])),
    ]
}

/// A wrong value, now and then a huge string.
fn wrong_or_huge_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        60 => wrong_value(),
        1 => huge_string().prop_map(Value::String),
    ]
}

/// A key for an inserted field: the config's own keys, reserved ones and
/// garbage.
fn some_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "cniVersion", "cniVersions", "name", "type", "runtimeConfig", "capabilities",
            "args", "prevResult", "ipam", "dns", "disableCheck", "disableGC", "socket",
            "mtu", "log_file", "log_level", "timeout_ms", "connect_timeout_ms",
            "cni.dev/valid-attachments", "cni.dev/attachments", "cni.dev/x", "plugins",
            "ips", "interfaces", "routes", "address", "gateway", "interface", "containerID",
            "ifname", "nameservers", "cni", "version", "sandbox",
        ])
        .prop_map(str::to_string),
        1 => garbage_string(),
    ]
}

/// What to do to one node of a JSON document.
#[derive(Debug, Clone)]
enum JsonEdit {
    Replace(Index, Value),
    Delete(Index),
    Insert(Index, String, Value),
    Rename(Index, String),
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        5 => (any::<Index>(), wrong_or_huge_value()).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        3 => any::<Index>().prop_map(JsonEdit::Delete),
        2 => (any::<Index>(), some_key(), wrong_value())
            .prop_map(|(i, k, v)| JsonEdit::Insert(i, k, v)),
        1 => (any::<Index>(), some_key()).prop_map(|(i, k)| JsonEdit::Rename(i, k)),
    ]
}

/// One step of a path into a JSON document.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    At(usize),
}

fn paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(Step::Key(k.clone()));
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (n, c) in a.iter().enumerate() {
                here.push(Step::At(n));
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn node_at<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Step::Key(k) => &mut v[k.as_str()],
        Step::At(n) => &mut v[*n],
    })
}

fn apply_json_edit(doc: &mut Value, e: JsonEdit) {
    let mut all = Vec::new();
    paths(doc, &mut Vec::new(), &mut all);
    let pick = |i: &Index| all[i.index(all.len())].clone();
    match e {
        JsonEdit::Replace(i, v) => *node_at(doc, &pick(&i)) = v,
        JsonEdit::Delete(i) => {
            let mut p = pick(&i);
            if let Some(last) = p.pop() {
                match (node_at(doc, &p), last) {
                    (Value::Object(m), Step::Key(k)) => {
                        m.remove(&k);
                    }
                    (Value::Array(a), Step::At(n)) => {
                        a.remove(n);
                    }
                    _ => {}
                }
            }
        }
        JsonEdit::Insert(i, k, v) => match node_at(doc, &pick(&i)) {
            Value::Object(m) => {
                m.insert(k, v);
            }
            Value::Array(a) => a.push(v),
            other => *other = v,
        },
        JsonEdit::Rename(i, k) => {
            let mut p = pick(&i);
            if let Some(Step::Key(old)) = p.pop() {
                if let Value::Object(m) = node_at(doc, &p) {
                    if let Some(v) = m.remove(&old) {
                        m.insert(k, v);
                    }
                }
            }
        }
    }
}

/// What to do to the bytes of a document.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
    Splice(Index, Vec<u8>),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        2 => (any::<Index>(), prop_oneof![any::<u8>(), prop::sample::select(b"{}[]\",:\\0-.e \xff".to_vec())])
            .prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        2 => any::<Index>().prop_map(ByteEdit::Delete),
        1 => any::<Index>().prop_map(ByteEdit::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| ByteEdit::Splice(i, b)),
    ]
}

fn apply_byte_edit(b: &mut Vec<u8>, e: ByteEdit) {
    if b.is_empty() {
        b.push(b'{');
    }
    match e {
        ByteEdit::Flip(i, x) => {
            let at = i.index(b.len());
            b[at] ^= x;
        }
        ByteEdit::Insert(i, x) => b.insert(i.index(b.len() + 1), x),
        ByteEdit::Delete(i) => {
            b.remove(i.index(b.len()));
        }
        ByteEdit::Truncate(i) => b.truncate(i.index(b.len())),
        ByteEdit::Splice(i, x) => {
            let at = i.index(b.len() + 1);
            b.splice(at..at, x);
        }
    }
}

fn verb() -> impl Strategy<Value = Verb> {
    prop::sample::select(VERBS.to_vec())
}

/// Structural edits for a config.
fn config_edits() -> impl Strategy<Value = (usize, Vec<JsonEdit>)> {
    (0usize..3, prop::collection::vec(json_edit(), 0..4))
}

/// A valid config of `shape` for a verb, with the edits made.
fn mutated_config(verb: Verb, (shape, edits): (usize, Vec<JsonEdit>)) -> Value {
    let mut c = seed_config(verb, shape);
    for e in edits {
        apply_json_edit(&mut c, e);
    }
    c
}

/// A whole invocation: environment and stdin, each valid or mutated.
fn invocation() -> impl Strategy<Value = (BTreeMap<String, OsString>, Vec<u8>)> {
    (
        verb(),
        prop::collection::vec(env_edit(), 0..3),
        config_edits(),
        prop::collection::vec(byte_edit(), 0..3),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(v, env_edits, conf_edits, byte_edits, bytes)| {
            let mut env = seed_env(v);
            for e in env_edits {
                apply_env_edit(&mut env, e);
            }
            let mut stdin = serde_json::to_vec(&mutated_config(v, conf_edits)).unwrap();
            if bytes {
                for e in byte_edits {
                    apply_byte_edit(&mut stdin, e);
                }
            }
            (env, stdin)
        })
}

// ---------------------------------------------------------------------------
// The properties. Case counts: 25,000 + 18,000 + 20,000 + 10,000 + 15,000
// + 8,000 + 6,000 = 102,000.

proptest! {
    #![proptest_config(cases(25_000))]

    /// Whole invocations: a valid environment and config with edits to
    /// either or both.
    #[test]
    fn mutated_invocations((env, stdin) in invocation()) {
        run_inputs(&env, &stdin)?;
    }
}

proptest! {
    #![proptest_config(cases(18_000))]

    /// Structural edits of a valid config (a field deleted, renamed, given
    /// the wrong type or a huge value, an unknown key added), parsed for
    /// every verb, not only the one it was written for.
    #[test]
    fn mutated_configs_for_every_verb(
        (conf, as_verb) in (verb(), verb(), config_edits())
            .prop_map(|(v, as_verb, edits)| (mutated_config(v, edits), as_verb))
    ) {
        let stdin = serde_json::to_vec(&conf).unwrap();
        let obj = match config::parse_object(&stdin) {
            Ok(o) => o,
            Err(e) => return assert_clear(&e, &[code::DECODE]),
        };
        assert_error_version(&version::for_error(Some(&obj)))?;
        if let Err(e) = version::negotiate(&obj) {
            assert_clear(&e, &[code::INCOMPATIBLE_VERSION, code::DECODE])?;
        }
        match config::parse(as_verb, obj) {
            Ok(c) => {
                prop_assert!(c.version >= SpecVersion::first_with(as_verb));
                prop_assert_eq!(c.valid_attachments.is_some(), as_verb == Verb::Gc);
                if as_verb != Verb::Del {
                    prop_assert!(limits::check_network_name(&c.name).is_ok());
                }
            }
            Err(e) => assert_clear(&e, &PARSE_CODES)?,
        }
    }
}

proptest! {
    #![proptest_config(cases(20_000))]

    /// Byte-level edits of a valid config's text (flipped, inserted,
    /// deleted bytes, truncation), with a valid environment.
    #[test]
    fn byte_mutated_stdin(
        (v, stdin) in (verb(), 0usize..3, prop::collection::vec(byte_edit(), 1..6))
            .prop_map(|(v, shape, edits)| {
                let mut b = serde_json::to_vec_pretty(&seed_config(v, shape)).unwrap();
                for e in edits {
                    apply_byte_edit(&mut b, e);
                }
                (v, b)
            })
    ) {
        run_inputs(&seed_env(v), &stdin)?;
    }
}

proptest! {
    #![proptest_config(cases(10_000))]

    /// Environments: valid ones with variables removed, replaced by
    /// garbage or by bytes that are not UTF-8, and random ones.
    #[test]
    fn mutated_environments(
        (v, edits, random) in (
            verb(),
            prop::collection::vec(env_edit(), 1..5),
            prop::collection::btree_map(
                prop::sample::select(ENV_NAMES.to_vec()).prop_map(str::to_string),
                garbage_string().prop_map(OsString::from),
                0..6,
            ),
        )
    ) {
        let mut env = seed_env(v);
        for e in edits {
            apply_env_edit(&mut env, e);
        }
        let stdin = serde_json::to_vec(&seed_config(v, 1)).unwrap();
        run_inputs(&env, &stdin)?;
        run_inputs(&random, &stdin)?;
    }
}

proptest! {
    #![proptest_config(cases(15_000))]

    /// `CNI_ARGS` on its own: accepted ones hold what they say.
    #[test]
    fn cni_args(s in prop_oneof![3 => cni_args_string(), 1 => garbage_string()]) {
        match args::parse(&s) {
            Ok(a) => {
                // Every value read comes from the one pair of its key.
                let values = |key: &str| -> Vec<&str> {
                    s.split(';').filter_map(|p| p.strip_prefix(key)?.strip_prefix('=')).collect()
                };
                for (key, got) in [
                    ("K8S_POD_NAMESPACE", &a.pod_namespace),
                    ("K8S_POD_NAME", &a.pod_name),
                    ("K8S_POD_UID", &a.pod_uid),
                ] {
                    let v = values(key);
                    prop_assert!(v.len() <= 1, "{} given {} times", key, v.len());
                    prop_assert_eq!(v.first().copied().unwrap_or(""), got.as_str());
                }
                let ip = values("IP");
                prop_assert!(ip.len() <= 1);
                prop_assert_eq!(
                    a.ip,
                    ip.first().filter(|v| !v.is_empty()).map(|v| v.parse::<IpAddr>().unwrap())
                );
                prop_assert!(a.ignored.is_empty() || a.ignore_unknown);
            }
            Err(e) => assert_clear(&e, &[code::INVALID_ENV])?,
        }
    }
}

proptest! {
    #![proptest_config(cases(8_000))]

    /// Random bytes and random JSON documents on stdin.
    #[test]
    fn random_stdin(
        v in verb(),
        stdin in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            any_json().prop_map(|j| serde_json::to_vec(&j).unwrap()),
            prop::collection::btree_map(some_key(), any_json(), 0..8)
                .prop_map(|m| serde_json::to_vec(&Value::Object(m.into_iter().collect::<Map<_, _>>())).unwrap()),
        ]
    ) {
        run_inputs(&seed_env(v), &stdin)?;
    }
}

proptest! {
    #![proptest_config(cases(6_000))]

    /// `prevResult` (what CHECK verifies and a chained ADD extends),
    /// mutated: an accepted one renders in every version.
    #[test]
    fn mutated_prev_results(
        prev in prop::collection::vec(json_edit(), 0..5).prop_map(|edits| {
            let mut p = prev_result();
            for e in edits {
                apply_json_edit(&mut p, e);
            }
            p
        })
    ) {
        match CniResult::from_prev(&prev) {
            Ok(r) => {
                for a in r.expected_addresses("eth0") {
                    prop_assert!(parse_cidr(&a).is_some(), "{:?}", a);
                }
                for v in SpecVersion::ALL {
                    let out = r.render(v);
                    prop_assert_eq!(out["cniVersion"].as_str(), Some(v.as_str()));
                }
            }
            Err(e) => assert_clear(&e, &[code::DECODE])?,
        }
    }
}
