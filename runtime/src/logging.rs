//! Logging to stderr, human-readable or JSON, filtered like `RUST_LOG`.
use crate::{Error, Result};
use std::io::IsTerminal;

/// Shape of log lines (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event (colours only on a terminal).
    #[default]
    Human,
    /// One JSON object per event, for log collectors.
    Json,
}

/// Installs the global logger: events matching `filter` (tracing
/// `EnvFilter` syntax, e.g. `info,tabby_controller=debug`) go to stderr in
/// `format`. Call once, early in `main`.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    // stderr: stdout stays free for anything a caller may pipe.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    }
    .map_err(|e| Error::Logger(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filter_is_an_error() {
        assert!(matches!(
            init_logging("info,=[", LogFormat::Human),
            Err(Error::LogFilter(_))
        ));
    }
}
