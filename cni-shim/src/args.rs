//! `CNI_ARGS`: `K=V;K=V` pairs, as libcni's `LoadArgs` reads them.
//!
//! Known keys: `IgnoreUnknown`, `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
//! `K8S_POD_INFRA_CONTAINER_ID`, `K8S_POD_UID`, `IP`. Keys are
//! case-sensitive. Any other key is an error unless `IgnoreUnknown` is true
//! (`1`/`true`, any case), wherever it appears in the string.

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
    let mut unknown = Vec::new();
    // Empty segments (a trailing ';') are tolerated.
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::env(format!(
                "CNI_ARGS: invalid pair {:?} (want KEY=VALUE)",
                truncate(pair, 80)
            )));
        };
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
            // "=;" has an empty key: unknown, and IgnoreUnknown is not set.
            assert!(parse(bad).is_err(), "{bad}");
        }
        // A value may itself contain '='.
        assert_eq!(parse("K8S_POD_NAME=a=b").unwrap().pod_name, "a=b");
    }
}
