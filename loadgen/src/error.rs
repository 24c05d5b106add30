//! Errors of the load generator. Every failure mode has its own variant with a message that
//! says what happened and, where it helps, what to do about it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while driving a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path does not exist.
    #[error("vhost-user socket {0} does not exist (is the backend running?)")]
    SocketMissing(PathBuf),
    /// Connecting to the socket failed for another reason.
    #[error("cannot connect to vhost-user socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A vhost-user control message got no answer in time.
    #[error("backend did not answer {op} within {} s{hint}", .timeout.as_secs_f64())]
    ControlTimeout {
        /// The message that was being exchanged.
        op: &'static str,
        /// The configured timeout.
        timeout: Duration,
        /// What may be going on (may be empty).
        hint: &'static str,
    },
    /// The backend closed the control socket.
    #[error("backend closed the connection during {op}")]
    BackendClosed {
        /// What we were doing.
        op: &'static str,
    },
    /// The backend answered a control message with a failure.
    #[error("backend rejected {op}")]
    BackendRejected {
        /// The message the backend rejected.
        op: &'static str,
    },
    /// Any other vhost-user protocol error.
    #[error("vhost-user {op} failed: {source}")]
    Vhost {
        /// The message that failed.
        op: &'static str,
        /// The error from the vhost crate.
        source: vhost::Error,
    },
    /// The backend lacks something we need.
    #[error("backend does not support {0}")]
    Unsupported(String),
    /// The device configuration space is unusable.
    #[error("bad device configuration: {0}")]
    BadConfig(String),
    /// The device is smaller than what the job needs.
    #[error("device too small: {0}")]
    DeviceTooSmall(String),
    /// A job parameter is invalid.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The backend broke the virtio ring protocol.
    #[error("virtio protocol violation by the backend: {0}")]
    Protocol(String),
    /// Requests are outstanding and nothing completed within the timeout.
    #[error("backend stopped answering: {outstanding} request(s) outstanding, no completion for {} s", .timeout.as_secs_f64())]
    IoTimeout {
        /// Requests in flight when we gave up.
        outstanding: usize,
        /// The configured timeout.
        timeout: Duration,
    },
    /// An error on one of several connections, with the socket it happened on.
    #[error("{}: {source}", .socket.display())]
    AtSocket {
        /// The backend's socket.
        socket: PathBuf,
        /// What went wrong.
        source: Box<Error>,
    },
    /// Waiting for a network backend to do something timed out.
    #[error("{}: {what} within {} s", .socket.display(), .timeout.as_secs_f64())]
    NetTimeout {
        /// The backend's socket.
        socket: PathBuf,
        /// What did not happen, e.g. "the backend completed no TX frame (4 outstanding)".
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What we tried to do.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// Wraps the current `errno` as a [`Error::Sys`].
    pub fn last_os(what: &'static str) -> Self {
        Error::Sys { what, source: io::Error::last_os_error() }
    }

    /// Names the socket the error happened on (once: an error that already names one is kept).
    pub fn at(self, socket: &std::path::Path) -> Self {
        match self {
            e @ (Error::AtSocket { .. }
            | Error::NetTimeout { .. }
            | Error::SocketMissing(_)
            | Error::Connect { .. }) => e,
            e => Error::AtSocket { socket: socket.to_path_buf(), source: Box::new(e) },
        }
    }

    /// Wraps an `io::Error` as a [`Error::Sys`].
    pub fn sys(what: &'static str, source: io::Error) -> Self {
        Error::Sys { what, source }
    }
}
