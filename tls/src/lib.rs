//! tabby's mutual TLS, shared by `tabby-controller` and `tabby-node`.
//!
//! - [`identity`]: who a certificate speaks for (`tabby://node/<name>` or
//!   `tabby://admin/<name>` in its URI SAN), read once per connection.
//! - [`material`]: PEM files into rustls configs (ring provider, ALPN `h2`),
//!   reloaded from disk while the daemon runs.
//! - [`accept`]: the server side, a stream of handshaken connections that
//!   carry their peer's identity into every request (tonic's `Connected`).
//! - [`connect`]: the client side, a connector for tonic's `Endpoint` that
//!   uses the newest material on every new connection.
//! - [`issue`]: a CA and the server, node and admin certificates (rcgen).
//!
//! tonic's own `ServerTlsConfig`/`ClientTlsConfig` are fixed when the server
//! or channel is built; rotation without a restart needs the acceptor and
//! connector here, over the same rustls and ring.

pub mod accept;
pub mod connect;
pub mod identity;
pub mod issue;
pub mod material;

pub use accept::{incoming, PeerInfo, TlsConn};
pub use connect::Connector;
pub use identity::Identity;
pub use material::{ClientMaterial, Reloading, ServerMaterial};

use std::path::PathBuf;

/// Errors of loading, reloading and issuing TLS material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the material (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificates cannot verify clients.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// A certificate names no usable tabby identity.
    #[error("identity: {0}")]
    Identity(String),
    /// Issuing a certificate failed.
    #[error("issuing a certificate: {0}")]
    Issue(String),
    /// An argument is not valid (a SAN, a name, a server name).
    #[error("{0}")]
    Invalid(String),
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;

/// The one crypto provider tabby uses.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
