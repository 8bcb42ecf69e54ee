//! The `CNI_*` environment: which verb, which attachment, validated once.

use crate::error::CniError;
use crate::verb::Verb;
use std::ffi::OsString;
use tabby_proto::limits::MAX_IFNAME_LEN;

/// The validated `CNI_*` environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub verb: Verb,
    /// `CNI_CONTAINERID` (empty for VERSION/STATUS/GC).
    pub container_id: String,
    /// `CNI_NETNS`; may be empty for DEL (and is unused by VERSION/STATUS/GC).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, unparsed (see [`crate::args`]).
    pub args: String,
    /// `CNI_PATH`; tabby delegates to no other plugin, so it is only logged.
    pub path: String,
}

/// Names of the variables, in the order they are reported.
const VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

impl Env {
    /// Read and validate the environment through `get` (normally
    /// `std::env::var_os`). Errors are CNI code 4 and name the variables.
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>) -> Result<Self, CniError> {
        let mut vals: [String; 6] = Default::default();
        let mut not_utf8 = Vec::new();
        for (i, name) in VARS.iter().enumerate() {
            match get(name).map(OsString::into_string) {
                None => {}
                Some(Ok(v)) => vals[i] = v,
                Some(Err(_)) => not_utf8.push(*name),
            }
        }
        if !not_utf8.is_empty() {
            return Err(CniError::env(format!(
                "env variables [{}] are not valid UTF-8",
                not_utf8.join(",")
            )));
        }
        let [command, container_id, netns, ifname, args, path] = vals;
        if command.is_empty() {
            return Err(CniError::env(
                "required env variables [CNI_COMMAND] missing",
            ));
        }
        let verb = Verb::parse(&command)
            .ok_or_else(|| CniError::env(format!("unknown CNI_COMMAND: {command:?}")))?;

        let required: &[(&str, &String)] = match verb {
            Verb::Add | Verb::Check => &[
                ("CNI_CONTAINERID", &container_id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", &ifname),
            ],
            // DEL must work when the namespace is already gone.
            Verb::Del => &[("CNI_CONTAINERID", &container_id), ("CNI_IFNAME", &ifname)],
            Verb::Version | Verb::Status | Verb::Gc => &[],
        };
        let missing: Vec<&str> = required
            .iter()
            .filter(|(_, v)| v.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(CniError::env(format!(
                "required env variables [{}] missing for {}",
                missing.join(","),
                verb.as_str()
            )));
        }
        if verb.is_attachment_verb() {
            validate_container_id(&container_id)?;
            validate_ifname(&ifname)?;
        }
        Ok(Self {
            verb,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// The spec: starts with an alphanumeric character, then alphanumerics,
/// `_`, `.` or `-`.
pub fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn validate_container_id(id: &str) -> Result<(), CniError> {
    if valid_identifier(id) {
        Ok(())
    } else {
        Err(CniError::env(format!(
            "invalid characters in CNI_CONTAINERID {:?}",
            truncate(id, 80)
        )))
    }
}

/// Linux interface-name rules, as the spec states them.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes (IFNAMSIZ)")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are not interface names")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("contains '/', ':', whitespace or a control character")
    } else {
        None
    };
    match bad {
        None => Ok(()),
        Some(why) => Err(CniError::env(format!(
            "invalid CNI_IFNAME {:?}: {why}",
            truncate(name, 80)
        ))),
    }
}

/// At most `max` characters of `s`, for error messages.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::code;
    use std::collections::HashMap;
    use std::os::unix::ffi::OsStringExt;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", "IgnoreUnknown=1"),
    ];

    #[test]
    fn full_add_environment() {
        let e = env(ADD).unwrap();
        assert_eq!(e.verb, Verb::Add);
        assert_eq!(e.container_id, "abc123");
        assert_eq!(e.netns, "/var/run/netns/x");
        assert_eq!(e.ifname, "eth0");
        assert_eq!(e.args, "IgnoreUnknown=1");
        assert_eq!(e.path, "/opt/cni/bin");
    }

    #[test]
    fn missing_command_is_code_4() {
        let e = env(&[]).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_COMMAND"));
        let e = env(&[("CNI_COMMAND", "")]).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
    }

    #[test]
    fn unknown_or_lower_case_command_is_code_4() {
        for c in ["add", "GET", "DELETE", "x"] {
            let e = env(&[("CNI_COMMAND", c)]).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{c}");
            assert!(e.msg.contains("unknown CNI_COMMAND"));
        }
    }

    #[test]
    fn add_and_check_need_container_netns_ifname() {
        for verb in ["ADD", "CHECK"] {
            let e = env(&[("CNI_COMMAND", verb)]).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV);
            assert!(
                e.msg.contains("CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn del_does_not_need_netns() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ])
        .unwrap();
        assert_eq!(e.verb, Verb::Del);
        assert_eq!(e.netns, "");
        let e = env(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")]).unwrap_err();
        assert!(e.msg.contains("CNI_CONTAINERID") && !e.msg.contains("CNI_NETNS"));
    }

    #[test]
    fn version_status_gc_need_nothing_else() {
        for verb in ["VERSION", "STATUS", "GC"] {
            assert!(env(&[("CNI_COMMAND", verb)]).is_ok(), "{verb}");
        }
        // CNI_PATH is optional: tabby delegates to nothing.
        let mut add: Vec<_> = ADD.to_vec();
        add.retain(|(k, _)| *k != "CNI_PATH");
        assert!(env(&add).is_ok());
    }

    #[test]
    fn container_id_characters() {
        for ok in ["a", "0abc", "a_b.c-d", "3f6940ab5ab43bc522569d15b23f8c1b"] {
            assert!(valid_identifier(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", ".a", "a/b", "a b", "a;b", "ä"] {
            assert!(!valid_identifier(bad), "{bad}");
        }
        let mut add: Vec<_> = ADD.to_vec();
        add[1] = ("CNI_CONTAINERID", "../../etc");
        let e = env(&add).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_CONTAINERID"));
    }

    #[test]
    fn ifname_rules() {
        for bad in [
            ".",
            "..",
            "eth/0",
            "eth:0",
            "eth 0",
            "a\tb",
            "0123456789abcdef",
        ] {
            let mut add: Vec<_> = ADD.to_vec();
            add[3] = ("CNI_IFNAME", bad);
            let e = env(&add).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad:?}");
            assert!(e.msg.contains("CNI_IFNAME"));
        }
        let mut add: Vec<_> = ADD.to_vec();
        add[3] = ("CNI_IFNAME", "0123456789abcde");
        assert!(env(&add).is_ok());
    }

    #[test]
    fn non_utf8_variable_is_code_4() {
        let e = Env::from_lookup(|k| {
            if k == "CNI_COMMAND" {
                Some(OsString::from("ADD"))
            } else if k == "CNI_ARGS" {
                Some(OsString::from_vec(vec![0xff, 0xfe]))
            } else {
                None
            }
        })
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_ARGS"));
    }

    #[test]
    fn truncate_is_char_safe() {
        assert_eq!(truncate("äöü", 2), "äö…");
        assert_eq!(truncate("ab", 2), "ab");
    }
}
