//! The shutdown signal of a daemon.
use crate::{Error, Result};
use std::future::Future;
use tokio::signal::unix::{signal, SignalKind};

/// A future that resolves at the first SIGTERM or SIGINT, logging which.
///
/// The handlers are installed now, not when the future is first polled, so
/// a signal that arrives in between is not lost (and, once installed, no
/// longer kills the process). Must be called within a tokio runtime.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static> {
    let install = |kind, name| {
        signal(kind).map_err(|source| Error::Signal {
            signal: name,
            source,
        })
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn resolves_on_sigterm() {
        let shutdown = super::shutdown_signal().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise SIGTERM");
        tokio::time::timeout(std::time::Duration::from_secs(5), shutdown)
            .await
            .expect("SIGTERM ends the future");
    }
}
