//! What the tabby daemons (`tabby-controller`, `tabby-node`) share: logging
//! set-up, the shutdown signal, gRPC reflection and health wiring, retry
//! backoff and duration flags.
//!
//! No domain logic lives here, and nothing here imports another tabby crate:
//! callers pass in what is theirs (descriptor sets, service names, timings).

pub mod backoff;
pub mod duration;
pub mod grpc;
pub mod logging;
pub mod metrics;
pub mod signal;

pub use backoff::Backoff;
pub use duration::parse_duration;
pub use grpc::{introspection, Introspection};
pub use logging::{init_logging, LogFormat};
pub use signal::shutdown_signal;

/// Errors of the shared daemon runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log filter is not valid `tracing` EnvFilter syntax.
    #[error(transparent)]
    LogFilter(#[from] tracing_subscriber::filter::ParseError),
    /// A global logger was already installed.
    #[error("installing the logger: {0}")]
    Logger(String),
    /// A signal handler could not be installed.
    #[error("installing the {signal} handler: {source}")]
    Signal {
        /// Which signal.
        signal: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The reflection service could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A duration flag could not be parsed.
    #[error("{input:?}: {why} (want e.g. 500ms, 2s)")]
    Duration {
        /// What was given.
        input: String,
        /// What is wrong with it.
        why: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
