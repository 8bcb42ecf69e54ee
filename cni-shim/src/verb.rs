//! The CNI verb (`CNI_COMMAND`). Its own module so that [`crate::env`]
//! (which parses it) and [`crate::error`] (whose mapping depends on it)
//! both depend on it rather than on each other.

/// A CNI verb (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Attach the container.
    Add,
    /// Detach; idempotent.
    Del,
    /// Verify against prevResult (0.4.0+).
    Check,
    /// Report supported versions.
    Version,
    /// Can ADD be served now (1.1.0).
    Status,
    /// Release everything not listed (1.1.0).
    Gc,
}

impl Verb {
    /// Parse the exact upper-case spelling the spec uses.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }

    /// The `CNI_COMMAND` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }

    /// Whether the verb is about one attachment (container id + ifname).
    pub fn is_attachment_verb(self) -> bool {
        matches!(self, Self::Add | Self::Del | Self::Check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_spelling_round_trip() {
        for v in [
            Verb::Add,
            Verb::Del,
            Verb::Check,
            Verb::Version,
            Verb::Status,
            Verb::Gc,
        ] {
            assert_eq!(Verb::parse(v.as_str()), Some(v));
        }
        assert_eq!(Verb::parse("add"), None);
        assert!(Verb::Del.is_attachment_verb() && !Verb::Gc.is_attachment_verb());
    }
}
