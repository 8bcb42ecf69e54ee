//! `CNI_ARGS`: `K=V;K=V` pairs, as libcni's `LoadArgs` reads them.
//!
//! Known keys: `IgnoreUnknown`, `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
//! `K8S_POD_INFRA_CONTAINER_ID`, `K8S_POD_UID`, `IP`. Keys are
//! case-sensitive. Any other key is an error unless `IgnoreUnknown` is true
//! (`1`/`true`, any case), wherever it appears in the string. A known key
//! given twice is an error (which value is meant is unknowable), and so is
//! a pair without a key (`=x`).

use crate::env::truncate;
use crate::error::CniError;
use std::net::IpAddr;

/// Parsed `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `IgnoreUnknown`.
    pub ignore_unknown: bool,
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME`.
    pub pod_name: String,
    /// `K8S_POD_INFRA_CONTAINER_ID` (logged only).
    pub infra_container_id: String,
    /// `K8S_POD_UID` (logged only).
    pub pod_uid: String,
    /// `IP`: one requested address.
    pub ip: Option<IpAddr>,
    /// Unknown keys that were ignored because of `IgnoreUnknown`.
    pub ignored: Vec<String>,
}

/// The keys tabby reads.
const KNOWN: [&str; 6] = [
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "IP",
];

fn parse_bool(key: &str, v: &str) -> Result<bool, CniError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(CniError::env(format!(
            "CNI_ARGS: {key} must be 1, 0, true or false, not {:?}",
            truncate(v, 40)
        ))),
    }
}

/// Parse `CNI_ARGS`. Errors are CNI code 4 (the variable is invalid).
pub fn parse(s: &str) -> Result<CniArgs, CniError> {
    let mut out = CniArgs::default();
    // The shape first (pairs, keys, repeats), then the values: a repeated
    // key is reported as such even when a value is bad as well.
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    // Empty segments (a trailing ';') are tolerated.
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => (key, value),
            _ => {
                return Err(CniError::env(format!(
                    "CNI_ARGS: invalid pair {:?} (want KEY=VALUE with a non-empty KEY)",
                    truncate(pair, 80)
                )))
            }
        };
        if KNOWN.contains(&key) && pairs.iter().any(|(k, _)| *k == key) {
            return Err(CniError::env(format!(
                "CNI_ARGS: {key} is given more than once"
            )));
        }
        pairs.push((key, value));
    }
    let mut unknown = Vec::new();
    for (key, value) in pairs {
        match key {
            "IgnoreUnknown" => out.ignore_unknown = parse_bool(key, value)?,
            "K8S_POD_NAMESPACE" => out.pod_namespace = value.to_string(),
            "K8S_POD_NAME" => out.pod_name = value.to_string(),
            "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = value.to_string(),
            "K8S_POD_UID" => out.pod_uid = value.to_string(),
            "IP" => {
                out.ip = if value.is_empty() {
                    None
                } else {
                    Some(value.parse().map_err(|_| {
                        CniError::env(format!(
                            "CNI_ARGS: IP={:?} is not an IP address",
                            truncate(value, 60)
                        ))
                    })?)
                }
            }
            _ => unknown.push(truncate(key, 60)),
        }
    }
    if !unknown.is_empty() && !out.ignore_unknown {
        return Err(CniError::env(format!(
            "CNI_ARGS: unknown args [{}] (set IgnoreUnknown=1 to ignore them)",
            unknown.join(",")
        )));
    }
    out.ignored = unknown;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::code;

    #[test]
    fn empty_is_default() {
        assert_eq!(parse("").unwrap(), CniArgs::default());
        assert_eq!(parse(";").unwrap(), CniArgs::default());
    }

    #[test]
    fn kubernetes_args() {
        let a = parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678",
        )
        .unwrap();
        assert!(a.ignore_unknown);
        assert_eq!(a.pod_namespace, "default");
        assert_eq!(a.pod_name, "web-0");
        assert_eq!(a.infra_container_id, "abc");
        assert_eq!(a.pod_uid, "1234-5678");
        assert_eq!(a.ip, None);
    }

    #[test]
    fn requested_ip() {
        assert_eq!(
            parse("IP=10.244.1.7").unwrap().ip,
            Some("10.244.1.7".parse().unwrap())
        );
        assert_eq!(
            parse("IP=fd00::7").unwrap().ip,
            Some("fd00::7".parse().unwrap())
        );
        assert_eq!(parse("IP=").unwrap().ip, None);
        for bad in ["IP=10.0.0.300", "IP=10.0.0.1/32", "IP=x"] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad}");
        }
    }

    #[test]
    fn unknown_keys_fail_without_ignore_unknown() {
        let e = parse("K8S_POD_NAME=a;FOO=bar").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("FOO"), "{}", e.msg);
        // Keys are case-sensitive, as in libcni.
        assert!(parse("k8s_pod_name=a").is_err());
    }

    #[test]
    fn ignore_unknown_anywhere_in_the_string() {
        for s in [
            "IgnoreUnknown=1;FOO=bar",
            "FOO=bar;IgnoreUnknown=true",
            "FOO=bar;IgnoreUnknown=TRUE",
            "IgnoreUnknown=True;FOO=bar;K8S_POD_NAME=p",
        ] {
            let a = parse(s).unwrap();
            assert!(a.ignore_unknown, "{s}");
            assert_eq!(a.ignored, vec!["FOO".to_string()]);
        }
        assert!(parse("IgnoreUnknown=0;FOO=bar").is_err());
        assert!(parse("IgnoreUnknown=false;FOO=bar").is_err());
    }

    #[test]
    fn ignore_unknown_value_must_be_boolean() {
        let e = parse("IgnoreUnknown=yes").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
    }

    #[test]
    fn malformed_pairs() {
        for bad in ["FOO", "IgnoreUnknown=1;novalue", "=;"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // A value may itself contain '='.
        assert_eq!(parse("K8S_POD_NAME=a=b").unwrap().pod_name, "a=b");
    }

    #[test]
    fn a_pair_without_a_key_is_named() {
        for (bad, pair) in [
            ("=x", "\"=x\""),
            ("IgnoreUnknown=1;=x", "\"=x\""),
            ("K8S_POD_NAME=a;=", "\"=\""),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad}");
            assert!(e.msg.contains(pair), "{bad}: {}", e.msg);
            assert!(!e.msg.contains("unknown args"), "{bad}: {}", e.msg);
        }
    }

    #[test]
    fn a_known_key_given_twice_is_code_4() {
        for bad in [
            "IP=10.0.0.1;IP=10.0.0.2",
            "IP=a;IP=b",
            "K8S_POD_NAME=a;K8S_POD_NAME=a",
            "IgnoreUnknown=1;IgnoreUnknown=0",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad}");
            assert!(e.msg.contains("more than once"), "{bad}: {}", e.msg);
        }
        // Unknown keys are not read, so repeating them changes nothing.
        assert_eq!(
            parse("IgnoreUnknown=1;FOO=a;FOO=b").unwrap().ignored,
            vec!["FOO", "FOO"]
        );
    }
}
