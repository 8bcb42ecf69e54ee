//! Identities carried in certificates as a URI SAN.
use crate::{Error, Result};
use std::fmt;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

const NODE_PREFIX: &str = "tabby://node/";
const ADMIN_PREFIX: &str = "tabby://admin/";

/// Who a verified client certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A node client: `tabby://node/<node-name>`.
    Node(String),
    /// An operator: `tabby://admin/<name>`.
    Admin(String),
}

impl Identity {
    /// The URI SAN that names this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Node(n) => format!("{NODE_PREFIX}{n}"),
            Identity::Admin(n) => format!("{ADMIN_PREFIX}{n}"),
        }
    }

    /// Parses a `tabby://` URI; `Ok(None)` for a URI of another scheme.
    pub fn from_uri(uri: &str) -> Result<Option<Identity>> {
        let (ctor, name): (fn(String) -> Identity, &str) =
            if let Some(n) = uri.strip_prefix(NODE_PREFIX) {
                (Identity::Node, n)
            } else if let Some(n) = uri.strip_prefix(ADMIN_PREFIX) {
                (Identity::Admin, n)
            } else if uri.starts_with("tabby://") {
                return Err(Error::Identity(format!(
                    "{uri:?}: want tabby://node/<name> or tabby://admin/<name>"
                )));
            } else {
                return Ok(None);
            };
        check_name(name).map_err(|e| Error::Identity(format!("{uri:?}: {e}")))?;
        Ok(Some(ctor(name.to_string())))
    }

    /// The one tabby identity in a certificate's URI SANs: `Ok(None)` when it
    /// has none, an error when it has more than one or a malformed one (such
    /// a certificate is refused rather than guessed at).
    pub fn from_cert_der(der: &[u8]) -> Result<Option<Identity>> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| Error::Identity(format!("unparsable certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| Error::Identity(format!("subjectAltName: {e}")))?;
        let mut found = None;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(u) = name {
                if let Some(id) = Identity::from_uri(u)? {
                    if found.is_some() {
                        return Err(Error::Identity(
                            "the certificate names more than one tabby identity".into(),
                        ));
                    }
                    found = Some(id);
                }
            }
        }
        Ok(found)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// A node or admin name: what Kubernetes allows in a node name (a DNS
/// subdomain: lower-case alphanumerics, `-` and `.`, at most 253 bytes).
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("name must be 1 to 253 bytes, got {}", name.len()));
    }
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if !name.chars().all(ok) {
        return Err(format!(
            "name {name:?} may hold only lower-case letters, digits, '-' and '.'"
        ));
    }
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge(name.chars().next()) || !edge(name.chars().last()) {
        return Err(format!(
            "name {name:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_bad_ones_are_refused() {
        for id in [
            Identity::Node("node-1".into()),
            Identity::Admin("ops.a".into()),
        ] {
            assert_eq!(Identity::from_uri(&id.uri()).unwrap(), Some(id));
        }
        assert_eq!(Identity::from_uri("spiffe://x/y").unwrap(), None);
        for bad in [
            "tabby://node/",
            "tabby://node/A",
            "tabby://node/a/b",
            "tabby://other/x",
            "tabby://admin/-x",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad}");
        }
    }
}
