//! The node client's one error enum.

/// Errors of the node client library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink request failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// The kernel said the object exists already (EEXIST).
    #[error("exists: {0}")]
    Exists(String),
    /// The kernel said the object does not exist (ESRCH / ENOENT / ENODEV).
    #[error("not found: {0}")]
    NotFound(String),
    /// nft failed.
    #[error("nftables: {0}")]
    Nft(String),
    /// Reading or writing a file (sysctl, netns) failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Bad input from the CNI plugin or the intent stream.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The controller could not be reached or refused.
    #[error("controller: {0}")]
    Controller(String),
}

/// Result type of the node client.
pub type Result<T> = std::result::Result<T, Error>;
