//! A deliberately tiny logger: one line per event, to a file (appended,
//! one `write` per line so concurrent plugin processes do not interleave)
//! or to stderr. Never to stdout, which carries the CNI result.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Log level, ordered from quiet to verbose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings.
    Warn,
    /// One line per verb.
    Info,
    /// Requests and answers.
    Debug,
    /// Everything.
    Trace,
}

impl Level {
    /// Parse a level name, any case.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" | "none" => Self::Off,
            "error" => Self::Error,
            "warn" | "warning" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Self::Off => "OFF",
            Self::Error => "ERROR",
            Self::Warn => "WARN",
            Self::Info => "INFO",
            Self::Debug => "DEBUG",
            Self::Trace => "TRACE",
        }
    }
}

enum Sink {
    Stderr,
    File(File),
}

/// Where log lines go, at which level, with which identity.
pub struct Logger {
    level: Level,
    sink: Sink,
    /// `key=value` pairs identifying the work, put on every line.
    context: String,
}

impl Logger {
    /// Log to stderr.
    pub fn stderr(level: Level) -> Self {
        Self {
            level,
            sink: Sink::Stderr,
            context: String::new(),
        }
    }

    /// Log to `path` (parent directories created), falling back to stderr
    /// with a warning if it cannot be opened: logging never fails a verb.
    pub fn file(path: &Path, level: Level) -> Self {
        let open = || -> std::io::Result<File> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            OpenOptions::new().create(true).append(true).open(path)
        };
        match open() {
            Ok(f) => Self {
                level,
                sink: Sink::File(f),
                context: String::new(),
            },
            Err(e) => {
                let l = Self::stderr(level);
                l.warn(&format!(
                    "cannot open log file {}: {e}; logging to stderr",
                    path.display()
                ));
                l
            }
        }
    }

    /// Set the identity put on every following line.
    pub fn set_context(&mut self, pairs: &[(&str, &str)]) {
        let mut c = String::new();
        for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
            let _ = write!(c, " {k}={v:?}");
        }
        self.context = c;
    }

    /// Whether `level` is logged.
    pub fn enabled(&self, level: Level) -> bool {
        level != Level::Off && level <= self.level
    }

    /// Log one line.
    pub fn log(&self, level: Level, msg: &str) {
        if !self.enabled(level) {
            return;
        }
        let line = format!(
            "{} {:5} tabby[{}]{} {}\n",
            rfc3339(SystemTime::now()),
            level.label(),
            std::process::id(),
            self.context,
            msg.replace('\n', "\\n")
        );
        // A failed log write must not change the CNI outcome.
        let _ = match &self.sink {
            Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
            Sink::File(f) => (&*f).write_all(line.as_bytes()),
        };
    }

    /// Log at error level.
    pub fn error(&self, msg: &str) {
        self.log(Level::Error, msg)
    }
    /// Log at warn level.
    pub fn warn(&self, msg: &str) {
        self.log(Level::Warn, msg)
    }
    /// Log at info level.
    pub fn info(&self, msg: &str) {
        self.log(Level::Info, msg)
    }
    /// Log at debug level.
    pub fn debug(&self, msg: &str) {
        self.log(Level::Debug, msg)
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC, without a date library.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn levels() {
        assert_eq!(Level::parse("WARN"), Some(Level::Warn));
        assert_eq!(Level::parse("warning"), Some(Level::Warn));
        assert_eq!(Level::parse("off"), Some(Level::Off));
        assert_eq!(Level::parse("loud"), None);
        let l = Logger::stderr(Level::Info);
        assert!(l.enabled(Level::Error) && l.enabled(Level::Info));
        assert!(!l.enabled(Level::Debug) && !l.enabled(Level::Off));
        assert!(!Logger::stderr(Level::Off).enabled(Level::Error));
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // leap day 2000
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_767_225_599); // last second of 2025
        assert_eq!(rfc3339(t), "2025-12-31T23:59:59.000Z");
    }

    #[test]
    fn file_sink_appends_lines_with_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/cni.log");
        let mut l = Logger::file(&path, Level::Debug);
        l.set_context(&[("verb", "ADD"), ("container", "c1"), ("pod", "")]);
        l.info("hello\nworld");
        l.debug("second");
        l.log(Level::Trace, "not written");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("INFO"));
        assert!(
            lines[0].contains(r#"verb="ADD" container="c1" hello\nworld"#),
            "{}",
            lines[0]
        );
        assert!(!lines[0].contains("pod="));
    }
}
