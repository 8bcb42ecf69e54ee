//! The controller's one error enum and its one mapping to `tonic::Status`.
use tabby_store::StoreError;

/// Everything that can go wrong in the controller library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (bad CIDR, wrong family, bad name...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A named pool, node or handle does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already (pool name, taken address).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the current state forbids it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not act on this object (another node's handle).
    #[error("{0}")]
    PermissionDenied(String),
    /// No address is left for the request.
    #[error("{0}")]
    Exhausted(String),
    /// The caller did not say who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// The IPAM owner task is gone (shutting down).
    #[error("controller is shutting down")]
    Unavailable,
    /// The store cannot take writes now (etcd out of reach, or this
    /// controller deposed); nothing was acknowledged.
    #[error("{0}")]
    StoreUnavailable(String),
    /// A local resource failed (thread, socket).
    #[error("internal: {0}")]
    Internal(String),
    /// The durable store failed; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result type of the controller library.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Exhausted(_) => Code::ResourceExhausted,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            // etcd out of reach, or this controller deposed: try again
            // (at the leader).
            Error::Unavailable
            | Error::StoreUnavailable(_)
            | Error::Store(StoreError::Etcd(_) | StoreError::Fenced(_)) => Code::Unavailable,
            Error::Store(_) | Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
