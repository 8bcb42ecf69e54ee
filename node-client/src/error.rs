//! The node client's one error enum, and its one mapping to `tonic::Status`
//! (which the CNI plugin turns into CNI error codes).
use std::sync::Arc;

pub use nix::errno::Errno;

/// A failed netlink request: what was being done, the errno, and the
/// kernel's extended ack message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetlinkError {
    /// What was being done, to what object (`adding route 10.1.0.0/24 via
    /// 192.0.2.1`, `creating veth tab0123 <-> eth0 in /run/netns/x`).
    pub op: String,
    /// The errno: the kernel's answer, or what the socket call failed with.
    pub errno: Errno,
    /// The kernel's extended ack message (`NLMSGERR_ATTR_MSG`), when it sent one.
    pub ext_ack: Option<String>,
    /// What this side adds: where it failed locally (`netlink recv`), or what
    /// the errno means here (`route exists already`).
    pub note: Option<String>,
}

impl NetlinkError {
    /// `op` failed with `errno`, without further detail.
    pub fn new(op: impl Into<String>, errno: Errno) -> Self {
        NetlinkError {
            op: op.into(),
            errno,
            ext_ack: None,
            note: None,
        }
    }
}

/// For fakes in unit tests: a failure described by text alone (EIO).
#[cfg(test)]
impl From<&str> for NetlinkError {
    fn from(op: &str) -> Self {
        NetlinkError::new(op, Errno::EIO)
    }
}

impl std::fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The strerror text, as `ip` and the CNI plugin's users know it
        // ("Numerical result out of range (os error 34)").
        let os = std::io::Error::from_raw_os_error(self.errno as i32);
        write!(f, "{}: {os}", self.op)?;
        for d in [&self.ext_ack, &self.note].into_iter().flatten() {
            if !d.is_empty() {
                write!(f, " ({d})")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for NetlinkError {}

/// Errors of the node client library.
///
/// [`std::error::Error::source`] walks the chain (a wrapper's source is its
/// boxed inner error, a [`Error::Netlink`]'s its [`NetlinkError`]);
/// [`Error::primary`] is the typed way to the original failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink request failed with an errno other than those of
    /// [`Error::Exists`] and [`Error::NotFound`].
    #[error("netlink: {0}")]
    Netlink(#[source] NetlinkError),
    /// The object exists already: the kernel said EEXIST (the text is the
    /// [`NetlinkError`]'s), or a lookup found it.
    #[error("exists: {0}")]
    Exists(String),
    /// The object does not exist: the kernel said ESRCH, ENOENT or ENODEV
    /// (the text is the [`NetlinkError`]'s), or a lookup missed it.
    #[error("not found: {0}")]
    NotFound(String),
    /// `nft` failed.
    #[error("nftables: {stderr}{}", transaction(.script))]
    Nft {
        /// What nft printed on stderr.
        stderr: String,
        /// The transaction it refused, if it was one.
        script: Option<String>,
    },
    /// Reading or writing a file (sysctl, netns) or running a program failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Bad input from the CNI plugin or the intent stream, or a CHECK that
    /// found the attachment not as expected.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A controller call failed.
    #[error("controller: {op}: {}", .status.message())]
    Controller {
        /// The call (`Assign`, `ReleaseHandle`), or what it was for.
        op: String,
        /// What the controller (or the transport) answered.
        #[source]
        status: Box<tonic::Status>,
    },
    /// A thread could not be started.
    #[error("starting thread {name}: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// Why not.
        source: std::io::Error,
    },
    /// A thread or blocking task panicked.
    #[error("{name} panicked: {message}")]
    Panicked {
        /// The thread's (or task's) name.
        name: String,
        /// The panic message.
        message: String,
    },
    /// Wiring a pod failed after its address was assigned. `released`: the
    /// address was released again; when that failed, this is the primary
    /// error of an [`Error::Cleanup`] whose cleanup error says why.
    #[error("wiring failed: {source}{}", if *.released { " (address released)" } else { "" })]
    Wiring {
        /// Why wiring failed.
        source: Box<Error>,
        /// Whether the address was released.
        released: bool,
    },
    /// An operation failed, and undoing what it did failed too.
    #[error("{primary}; cleanup failed too: {cleanup}")]
    Cleanup {
        /// The original failure ([`std::error::Error::source`]).
        #[source]
        primary: Box<Error>,
        /// The failure of the cleanup.
        cleanup: Box<Error>,
    },
    /// `op` failed because of `source`, which may be the cause of several
    /// failures (hence shared).
    #[error("{op}: {source}")]
    Context {
        /// What failed.
        op: String,
        /// Why.
        source: Arc<Error>,
    },
}

fn transaction(script: &Option<String>) -> String {
    script
        .as_deref()
        .map(|s| format!("; transaction was:\n{s}"))
        .unwrap_or_default()
}

/// Result type of the node client.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// `primary` failed, and so did the `cleanup` after it.
    pub fn cleanup(primary: Error, cleanup: Error) -> Error {
        Error::Cleanup {
            primary: Box::new(primary),
            cleanup: Box::new(cleanup),
        }
    }

    /// The controller answered `status` to `op`.
    pub fn controller(op: impl Into<String>, status: tonic::Status) -> Error {
        Error::Controller {
            op: op.into(),
            status: Box::new(status),
        }
    }

    /// The original failure: through wrappers ([`Error::Wiring`],
    /// [`Error::Cleanup`], [`Error::Context`]) to the error that decides
    /// what kind of failure this is.
    pub fn primary(&self) -> &Error {
        match self {
            Error::Wiring { source, .. } => source.primary(),
            Error::Cleanup { primary, .. } => primary.primary(),
            Error::Context { source, .. } => source.primary(),
            e => e,
        }
    }

    /// The gRPC code this error is answered with (see the `From` impl for
    /// `tonic::Status`).
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self.primary() {
            Error::Exists(_) => Code::AlreadyExists,
            Error::NotFound(_) => Code::NotFound,
            // What CHECK reports (the plugin maps it to "does not match").
            Error::Invalid(_) => Code::FailedPrecondition,
            Error::Controller { status, .. } => controller_code(status),
            _ => Code::Internal,
        }
    }
}

/// What a controller failure means to the CNI plugin.
fn controller_code(status: &tonic::Status) -> tonic::Code {
    if crate::controller::is_unavailable(status) {
        tonic::Code::Unavailable
    } else if status.code() == tonic::Code::AlreadyExists {
        // "Requested address taken" is a bad request, not an existing
        // attachment (what AlreadyExists means to the plugin).
        tonic::Code::InvalidArgument
    } else {
        status.code()
    }
}

/// The one mapping from node client errors to what the CNI plugin sees.
/// Kernel kinds keep their text without the kind prefix; controller failures
/// say whether the controller was out of reach or refused; everything else,
/// wrappers included, is answered with the code of its primary error and
/// the whole text.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        match e {
            Error::Exists(m) | Error::NotFound(m) | Error::Invalid(m) => {
                tonic::Status::new(code, m)
            }
            Error::Controller { op, status } => {
                let how = if code == tonic::Code::Unavailable {
                    "controller unavailable during"
                } else {
                    "controller refused"
                };
                tonic::Status::new(code, format!("{how} {op}: {}", status.message()))
            }
            e => tonic::Status::new(code, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    fn nl(op: &str, errno: Errno) -> Error {
        Error::Netlink(NetlinkError::new(op, errno))
    }

    #[test]
    fn netlink_text_keeps_strerror_and_ext_ack() {
        let mut e = NetlinkError::new("creating veth tab1 <-> eth0", Errno::ERANGE);
        assert_eq!(
            e.to_string(),
            "creating veth tab1 <-> eth0: Numerical result out of range (os error 34)"
        );
        e.ext_ack = Some("MTU too large".into());
        e.note = Some("route exists already".into());
        assert!(e
            .to_string()
            .ends_with("(os error 34) (MTU too large) (route exists already)"));
    }

    #[test]
    fn cleanup_chains_and_keeps_the_primary_kind() {
        let e = Error::cleanup(
            Error::Exists("host veth tab1 exists".into()),
            nl("deleting veth tab1", Errno::EBUSY),
        );
        assert_eq!(
            e.to_string(),
            "exists: host veth tab1 exists; cleanup failed too: netlink: deleting veth tab1: \
             Device or resource busy (os error 16)"
        );
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        // Wrappers' sources are boxed errors; primary() is the typed walk.
        let source = e.source().and_then(|s| s.downcast_ref::<Box<Error>>());
        assert!(matches!(source.map(|b| &**b), Some(Error::Exists(_))));
        assert!(matches!(e.primary(), Error::Exists(_)));
        let Error::Cleanup { cleanup, .. } = &e else {
            unreachable!()
        };
        let inner = cleanup
            .source()
            .and_then(|s| s.downcast_ref::<NetlinkError>());
        assert_eq!(inner.map(|n| n.errno), Some(Errno::EBUSY));
    }

    #[test]
    fn wiring_reports_the_release() {
        let wired = |released| Error::Wiring {
            source: Box::new(nl("adding address 10.0.0.1/32 to eth0", Errno::EACCES)),
            released,
        };
        let e = wired(true);
        assert!(e
            .to_string()
            .starts_with("wiring failed: netlink: adding address"));
        assert!(e.to_string().ends_with("(address released)"));
        let st = tonic::Status::from(e);
        assert_eq!(st.code(), tonic::Code::Internal);
        assert!(st.message().contains("address released"));
        let e = Error::cleanup(
            wired(false),
            Error::controller("releasing net.c1", tonic::Status::unavailable("down")),
        );
        assert_eq!(
            e.to_string(),
            "wiring failed: netlink: adding address 10.0.0.1/32 to eth0: Permission denied \
             (os error 13); cleanup failed too: controller: releasing net.c1: down"
        );
        // The code is the wiring failure's, not the controller's.
        assert_eq!(e.code(), tonic::Code::Internal);
        // source(): Cleanup -> Wiring -> Netlink -> NetlinkError.
        let mut chain = Vec::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cur {
            chain.push(c.to_string());
            cur = c.source();
        }
        assert_eq!(chain.len(), 4, "{chain:#?}");
        assert!(chain[3].starts_with("adding address"), "{chain:#?}");
    }

    #[test]
    fn status_mapping() {
        let st = |e: Error| {
            let s = tonic::Status::from(e);
            (s.code(), s.message().to_string())
        };
        assert_eq!(
            st(Error::Exists("x".into())),
            (tonic::Code::AlreadyExists, "x".into())
        );
        assert_eq!(
            st(Error::NotFound("x".into())),
            (tonic::Code::NotFound, "x".into())
        );
        assert_eq!(
            st(Error::Invalid("x".into())),
            (tonic::Code::FailedPrecondition, "x".into())
        );
        assert_eq!(
            st(Error::controller(
                "Assign",
                tonic::Status::unavailable("no route")
            )),
            (
                tonic::Code::Unavailable,
                "controller unavailable during Assign: no route".into()
            )
        );
        assert_eq!(
            st(Error::controller(
                "Assign",
                tonic::Status::already_exists("taken")
            )),
            (
                tonic::Code::InvalidArgument,
                "controller refused Assign: taken".into()
            )
        );
        assert_eq!(
            st(Error::controller(
                "ReleaseHandle",
                tonic::Status::permission_denied("who")
            )),
            (
                tonic::Code::PermissionDenied,
                "controller refused ReleaseHandle: who".into()
            )
        );
        let (code, msg) = st(nl("listing links", Errno::ENOBUFS));
        assert_eq!(code, tonic::Code::Internal);
        assert!(msg.starts_with("netlink: listing links: "), "{msg}");
        let shared = Arc::new(Error::NotFound("gone".into()));
        let e = Error::Context {
            op: "listing after EEXIST".into(),
            source: shared,
        };
        assert_eq!(e.to_string(), "listing after EEXIST: not found: gone");
        assert_eq!(e.code(), tonic::Code::NotFound);
    }
}
