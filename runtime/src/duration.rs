//! Duration flags (`--resync-interval 500ms`).
use crate::{Error, Result};
use std::time::Duration;

/// Parses a duration flag: `500ms`, `2s`, `1m30s` (humantime syntax), or a
/// bare number of seconds (`5`), which earlier releases accepted.
///
/// Usable as a clap `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|e| Error::Duration {
                input: s.to_string(),
                why: e.to_string(),
            });
    }
    humantime::parse_duration(s).map_err(|e| Error::Duration {
        input: s.to_string(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn accepts_what_the_flags_document() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn bare_numbers_are_seconds() {
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn humantime_forms() {
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("1s 500ms").unwrap(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "s",
            "ms",
            "-1s",
            "1x",
            "1.5.s",
            "fast",
            "99999999999999999999",
        ] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.to_string().contains("want e.g. 500ms, 2s"), "{e}");
        }
    }
}
