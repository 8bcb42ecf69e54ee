//! CNI error results: the spec's well-known codes, tabby's own codes, the
//! error JSON printed on stdout, and the one mapping from `tonic::Status`
//! (what `tabby-node` answers) to CNI codes.

use crate::verb::Verb;
use serde::Serialize;
use std::fmt;

/// Well-known CNI error codes (spec section "Error") and tabby's own (100+).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration (message names key and value).
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Invalid or missing CNI_* environment variables (message names them).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure, e.g. reading stdin.
    pub const IO: u32 = 5;
    /// Failed to decode content (malformed JSON, wrong types).
    pub const DECODE: u32 = 6;
    /// Invalid network configuration (values that decode but do not validate).
    pub const INVALID_CONFIG: u32 = 7;
    /// CNI_NETNS is unusable, e.g. it is the plugin's own network namespace.
    pub const INVALID_NETNS: u32 = 8;
    /// Transient condition: the runtime should retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// tabby: ADD for a (container, ifname) that already has an attachment.
    pub const ALREADY_EXISTS: u32 = 100;
    /// tabby: CHECK found the attachment missing or different from prevResult.
    pub const CHECK_FAILED: u32 = 101;
    /// Anything else (the value Go's libcni uses for internal errors).
    pub const INTERNAL: u32 = 999;
}

/// One CNI error: what is printed on stdout, with a non-zero exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// Numeric code (see [`code`]).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer description; may be empty.
    pub details: String,
}

/// Longest `msg` or `details` an error carries, in bytes.
pub const MAX_TEXT: usize = 1024;

/// `s` cut at a character boundary to at most [`MAX_TEXT`] bytes, saying
/// how much was left out.
fn excerpt(mut s: String) -> String {
    if s.len() <= MAX_TEXT {
        return s;
    }
    let total = s.len();
    let mut end = MAX_TEXT - 40;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(&format!("... ({total} bytes in all)"));
    s
}

impl CniError {
    /// An error with a code, a message and details, each cut to
    /// [`MAX_TEXT`] bytes: a message that quotes a huge input (a 1 MiB
    /// value of the wrong type) stays readable in the runtime's log.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: excerpt(msg.into()),
            details: excerpt(details.into()),
        }
    }

    /// Invalid environment (code 4).
    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, msg, "")
    }

    /// Decode failure (code 6).
    pub fn decode(msg: impl Into<String>) -> Self {
        Self::new(code::DECODE, msg, "")
    }

    /// Invalid configuration (code 7).
    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg, "")
    }

    /// Internal error (code 999).
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg, "")
    }

    /// Same error with details set.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = excerpt(details.into());
        self
    }

    /// The error JSON the spec asks for, one line, for the given `cniVersion`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        let out = Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        // Serializing plain strings and integers cannot fail; keep a literal
        // fallback anyway so the error path itself never panics.
        serde_json::to_string(&out).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"1.1.0","code":{},"msg":"internal error","details":""}}"#,
                self.code
            )
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, "; {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// The node client's socket could not be reached (not there, refused, or
/// the HTTP/2 handshake timed out). ADD/DEL/CHECK/GC: try again later;
/// STATUS: not available.
pub fn node_unreachable(verb: Verb, socket: &str, detail: &str) -> CniError {
    let code = if verb == Verb::Status {
        code::NOT_AVAILABLE
    } else {
        code::TRY_AGAIN_LATER
    };
    CniError::new(
        code,
        format!("tabby-node is not reachable on {socket}"),
        detail.to_string(),
    )
}

/// Map a gRPC status from `tabby-node` to a CNI error for `verb`.
pub fn from_status(verb: Verb, status: &tonic::Status) -> CniError {
    use tonic::Code;
    let details = status.message().to_string();
    if verb == Verb::Status {
        // Whatever the reason, the node cannot confirm that ADD would work.
        return CniError::new(
            code::NOT_AVAILABLE,
            format!("tabby-node cannot serve ADD ({:?})", status.code()),
            details,
        );
    }
    let (code, msg) = match status.code() {
        Code::Unavailable => (
            code::TRY_AGAIN_LATER,
            "controller or node client unavailable, try again later",
        ),
        Code::DeadlineExceeded => (
            code::TRY_AGAIN_LATER,
            "tabby-node did not answer in time, try again later",
        ),
        // tonic reports its own client-side timeout as CANCELLED.
        Code::Cancelled => (
            code::TRY_AGAIN_LATER,
            "call to tabby-node cancelled or timed out, try again later",
        ),
        Code::Aborted => (
            code::TRY_AGAIN_LATER,
            "operation aborted by a conflict, try again later",
        ),
        Code::AlreadyExists => (
            code::ALREADY_EXISTS,
            "an attachment for this container and interface already exists",
        ),
        Code::InvalidArgument => (
            code::INVALID_CONFIG,
            "tabby-node rejected the request as invalid",
        ),
        Code::FailedPrecondition | Code::NotFound if verb == Verb::Check => (
            code::CHECK_FAILED,
            "the attachment does not match prevResult",
        ),
        Code::ResourceExhausted => (code::INTERNAL, "no address available"),
        Code::PermissionDenied | Code::Unauthenticated => (
            code::INTERNAL,
            "tabby-node refused the request (permission denied)",
        ),
        _ => (code::INTERNAL, "tabby-node failed the request"),
    };
    CniError::new(code, format!("{msg} ({})", verb.as_str()), details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    #[test]
    fn error_json_has_the_four_spec_keys() {
        let e = CniError::new(code::INVALID_CONFIG, "bad \"mtu\"", "details\nhere");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"0.4.0","code":7,"msg":"bad \"mtu\"","details":"details\nhere"})
        );
        // One line, so a runtime reading stdout sees exactly one document.
        assert!(!e.to_json("1.0.0").contains('\n'));
    }

    #[test]
    fn unavailable_is_try_again_later_for_add_and_not_available_for_status() {
        let st = Status::unavailable("controller down");
        assert_eq!(from_status(Verb::Add, &st).code, 11);
        assert_eq!(from_status(Verb::Del, &st).code, 11);
        assert_eq!(from_status(Verb::Status, &st).code, 50);
        assert_eq!(from_status(Verb::Add, &st).details, "controller down");
        assert_eq!(
            from_status(Verb::Add, &Status::deadline_exceeded("t")).code,
            11
        );
    }

    #[test]
    fn status_codes_map_to_fitting_cni_codes() {
        assert_eq!(
            from_status(Verb::Add, &Status::already_exists("dup")).code,
            100
        );
        assert_eq!(
            from_status(Verb::Add, &Status::invalid_argument("x")).code,
            7
        );
        assert_eq!(
            from_status(Verb::Check, &Status::failed_precondition("x")).code,
            101
        );
        assert_eq!(from_status(Verb::Check, &Status::not_found("x")).code, 101);
        assert_eq!(from_status(Verb::Add, &Status::not_found("x")).code, 999);
        assert_eq!(from_status(Verb::Add, &Status::internal("x")).code, 999);
        assert_eq!(
            from_status(Verb::Gc, &Status::resource_exhausted("x")).code,
            999
        );
    }

    #[test]
    fn unreachable_node_per_verb() {
        assert_eq!(node_unreachable(Verb::Add, "/s", "ENOENT").code, 11);
        assert_eq!(node_unreachable(Verb::Del, "/s", "ENOENT").code, 11);
        assert_eq!(node_unreachable(Verb::Check, "/s", "ENOENT").code, 11);
        assert_eq!(node_unreachable(Verb::Gc, "/s", "ENOENT").code, 11);
        assert_eq!(node_unreachable(Verb::Status, "/s", "ENOENT").code, 50);
    }

    #[test]
    fn display_includes_details() {
        let e = CniError::env("missing").with_details("CNI_IFNAME");
        assert_eq!(e.to_string(), "CNI error 4: missing; CNI_IFNAME");
    }
}
