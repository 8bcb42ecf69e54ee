//! CNI spec versions: which ones tabby speaks, how the version of one
//! invocation is chosen (`cniVersion`, or the highest of `cniVersions`), and
//! which verbs exist in which version.

use crate::env::truncate;
use crate::error::{code, CniError};
use crate::verb::Verb;
use serde_json::{Map, Value};

/// A CNI spec version tabby supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpecVersion {
    /// 0.3.0: rich results, chaining.
    V0_3_0,
    /// 0.3.1: typo fixes only.
    V0_3_1,
    /// 0.4.0: CHECK, prevResult on DEL.
    V0_4_0,
    /// 1.0.0: `version` dropped from ips.
    V1_0_0,
    /// 1.1.0: STATUS, GC, `cniVersions`, interface `mtu`.
    V1_1_0,
}

impl SpecVersion {
    /// Every supported version, ascending.
    pub const ALL: [SpecVersion; 5] = [
        Self::V0_3_0,
        Self::V0_3_1,
        Self::V0_4_0,
        Self::V1_0_0,
        Self::V1_1_0,
    ];

    /// The newest supported version.
    pub const LATEST: SpecVersion = Self::V1_1_0;

    /// The dotted spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Parse an exact dotted version.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Results before 1.0.0 carry `"version": "4"|"6"` on each ip.
    pub fn ips_have_version(self) -> bool {
        self < Self::V1_0_0
    }

    /// Interfaces may carry `mtu` from 1.1.0.
    pub fn interfaces_have_mtu(self) -> bool {
        self >= Self::V1_1_0
    }

    /// The first version in which `verb` exists.
    pub fn first_with(verb: Verb) -> SpecVersion {
        match verb {
            Verb::Add | Verb::Del | Verb::Version => Self::V0_3_0,
            Verb::Check => Self::V0_4_0,
            Verb::Status | Verb::Gc => Self::V1_1_0,
        }
    }
}

fn supported_list() -> String {
    SpecVersion::ALL.map(SpecVersion::as_str).join(", ")
}

/// The VERSION result.
pub fn version_json() -> String {
    let v = serde_json::json!({
        "cniVersion": SpecVersion::LATEST.as_str(),
        "supportedVersions": SpecVersion::ALL.map(SpecVersion::as_str),
    });
    v.to_string()
}

/// Choose the version of this invocation from the config object.
///
/// `cniVersion` wins when present and non-empty (the runtime writes it into
/// every plugin's config). Otherwise the highest supported entry of the 1.1.0
/// `cniVersions` list is used. Neither means 0.1.0, as libcni reads it, which
/// tabby does not support.
pub fn negotiate(conf: &Map<String, Value>) -> Result<SpecVersion, CniError> {
    match conf.get("cniVersion") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => {
            return SpecVersion::parse(s).ok_or_else(|| {
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    "incompatible CNI versions",
                    format!(
                        "config is {:?}, plugin supports [{}]",
                        truncate(s, 40),
                        supported_list()
                    ),
                )
            })
        }
        Some(_) => return Err(CniError::decode("cniVersion must be a string")),
    }
    match conf.get("cniVersions") {
        None | Some(Value::Null) => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            format!(
                "config has no cniVersion (0.1.0 implied), plugin supports [{}]",
                supported_list()
            ),
        )),
        Some(Value::Array(list)) => {
            let mut best = None;
            for item in list {
                let Value::String(s) = item else {
                    return Err(CniError::decode("cniVersions must be a list of strings"));
                };
                best = best.max(SpecVersion::parse(s));
            }
            best.ok_or_else(|| {
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    "incompatible CNI versions",
                    format!(
                        "none of cniVersions is supported, plugin supports [{}]",
                        supported_list()
                    ),
                )
            })
        }
        Some(_) => Err(CniError::decode("cniVersions must be a list of strings")),
    }
}

/// CHECK exists from 0.4.0, STATUS and GC from 1.1.0 (code 1 otherwise,
/// as libcni's skeleton answers).
pub fn check_verb(verb: Verb, v: SpecVersion) -> Result<(), CniError> {
    let first = SpecVersion::first_with(verb);
    if v < first {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version does not allow {}", verb.as_str()),
            format!(
                "{} exists from CNI {}; config is {}",
                verb.as_str(),
                first.as_str(),
                v.as_str()
            ),
        ));
    }
    Ok(())
}

/// The `cniVersion` to put in an error: the spec says "the same value as
/// provided by the configuration". That is echoed when it looks like a
/// version (digits and dots, short); otherwise the negotiated or newest one.
pub fn for_error(conf: Option<&Map<String, Value>>) -> String {
    if let Some(Value::String(s)) = conf.and_then(|c| c.get("cniVersion")) {
        if !s.is_empty() && s.len() <= 16 && s.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return s.clone();
        }
    }
    conf.and_then(|c| negotiate(c).ok())
        .unwrap_or(SpecVersion::LATEST)
        .as_str()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn version_result() {
        let v: Value = serde_json::from_str(&version_json()).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
        );
    }

    #[test]
    fn every_supported_cni_version_is_taken_as_is() {
        for v in SpecVersion::ALL {
            assert_eq!(
                negotiate(&obj(json!({"cniVersion": v.as_str()}))).unwrap(),
                v
            );
        }
    }

    #[test]
    fn unsupported_versions_are_code_1() {
        for v in ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "1.0", "x"] {
            let e = negotiate(&obj(json!({"cniVersion": v}))).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v}");
            assert!(e.details.contains("1.1.0"));
        }
        let e = negotiate(&obj(json!({}))).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.details.contains("0.1.0 implied"));
    }

    #[test]
    fn cni_versions_picks_the_highest_supported() {
        let m = obj(json!({"cniVersions": ["0.3.1", "1.0.0", "2.0.0", "0.4.0"]}));
        assert_eq!(negotiate(&m).unwrap(), SpecVersion::V1_0_0);
        let m = obj(json!({"cniVersion": "", "cniVersions": ["1.1.0", "0.3.0"]}));
        assert_eq!(negotiate(&m).unwrap(), SpecVersion::V1_1_0);
        // cniVersion, written by the runtime, wins over the list.
        let m = obj(json!({"cniVersion": "0.4.0", "cniVersions": ["1.1.0"]}));
        assert_eq!(negotiate(&m).unwrap(), SpecVersion::V0_4_0);
        let e = negotiate(&obj(json!({"cniVersions": ["0.2.0", "9.9.9"]}))).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = negotiate(&obj(json!({"cniVersions": []}))).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn wrong_types_are_decode_errors() {
        assert_eq!(
            negotiate(&obj(json!({"cniVersion": 1}))).unwrap_err().code,
            code::DECODE
        );
        assert_eq!(
            negotiate(&obj(json!({"cniVersions": "1.0.0"})))
                .unwrap_err()
                .code,
            code::DECODE
        );
        assert_eq!(
            negotiate(&obj(json!({"cniVersions": [1]})))
                .unwrap_err()
                .code,
            code::DECODE
        );
    }

    #[test]
    fn verb_floors() {
        use SpecVersion::*;
        for v in SpecVersion::ALL {
            assert!(check_verb(Verb::Add, v).is_ok());
            assert!(check_verb(Verb::Del, v).is_ok());
        }
        for v in [V0_3_0, V0_3_1] {
            let e = check_verb(Verb::Check, v).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
            assert_eq!(e.msg, "config version does not allow CHECK");
        }
        assert!(check_verb(Verb::Check, V0_4_0).is_ok());
        for verb in [Verb::Status, Verb::Gc] {
            for v in [V0_3_0, V0_3_1, V0_4_0, V1_0_0] {
                assert_eq!(
                    check_verb(verb, v).unwrap_err().code,
                    code::INCOMPATIBLE_VERSION
                );
            }
            assert!(check_verb(verb, V1_1_0).is_ok());
        }
    }

    #[test]
    fn error_version_echoes_the_config_when_supported() {
        assert_eq!(for_error(None), "1.1.0");
        assert_eq!(
            for_error(Some(&obj(json!({"cniVersion":"0.3.1"})))),
            "0.3.1"
        );
        assert_eq!(
            for_error(Some(&obj(json!({"cniVersion":"0.2.0"})))),
            "0.2.0"
        );
        assert_eq!(
            for_error(Some(&obj(json!({"cniVersion":"<junk>"})))),
            "1.1.0"
        );
        assert_eq!(
            for_error(Some(&obj(json!({"cniVersions":["1.0.0"]})))),
            "1.0.0"
        );
    }

    #[test]
    fn schema_switches() {
        assert!(SpecVersion::V0_4_0.ips_have_version());
        assert!(!SpecVersion::V1_0_0.ips_have_version());
        assert!(!SpecVersion::V1_0_0.interfaces_have_mtu());
        assert!(SpecVersion::V1_1_0.interfaces_have_mtu());
    }
}
