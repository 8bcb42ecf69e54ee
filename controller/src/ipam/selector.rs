//! Node selectors over labels: a small subset of Calico's selector language.
use std::collections::BTreeMap;

/// A parsed selector: every term must match.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Has(String),
    NotHas(String),
}

fn label_key(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a valid label key"))
    }
}

fn quoted(s: &str) -> Result<String, String> {
    let s = s.trim();
    let q = s.chars().next().filter(|c| *c == '\'' || *c == '"');
    match q {
        Some(q) if s.len() >= 2 && s.ends_with(q) && !s[1..s.len() - 1].contains(q) => {
            Ok(s[1..s.len() - 1].to_string())
        }
        _ => Err(format!("{s:?} must be a quoted value, e.g. 'zone-a'")),
    }
}

impl Selector {
    /// Parses `""`, `all()`, or terms joined by `&&`: `k == 'v'`, `k != 'v'`,
    /// `has(k)`, `!has(k)`.
    pub fn parse(src: &str) -> Result<Selector, String> {
        let src = src.trim();
        if src.is_empty() || src == "all()" {
            return Ok(Selector::default());
        }
        let mut terms = Vec::new();
        for raw in src.split("&&") {
            let t = raw.trim();
            let term = if let Some(inner) =
                t.strip_prefix("!has(").and_then(|r| r.strip_suffix(')'))
            {
                Term::NotHas(label_key(inner)?)
            } else if let Some(inner) = t.strip_prefix("has(").and_then(|r| r.strip_suffix(')')) {
                Term::Has(label_key(inner)?)
            } else if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(label_key(k)?, quoted(v)?)
            } else if let Some((k, v)) = t.split_once("==") {
                Term::Eq(label_key(k)?, quoted(v)?)
            } else {
                return Err(format!(
                    "selector term {t:?} not understood; use k == 'v', k != 'v', has(k), !has(k) or all()"
                ));
            };
            terms.push(term);
        }
        Ok(Selector { terms })
    }

    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Has(k) => labels.contains_key(k),
            Term::NotHas(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_matches() {
        let s = Selector::parse("zone == 'a' && has(gpu) && !has(edge) && tier != \"db\"").unwrap();
        assert!(s.matches(&labels(&[("zone", "a"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("zone", "b"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("zone", "a"), ("gpu", ""), ("edge", "1")])));
        assert!(!s.matches(&labels(&[("zone", "a"), ("gpu", ""), ("tier", "db")])));
        assert!(Selector::parse("all()").unwrap().matches(&labels(&[])));
        assert!(Selector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "zone = 'a'",
            "zone == a",
            "has()",
            "zone == 'a' &&",
            "a b == 'c'",
            "zone == 'a",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }
}
