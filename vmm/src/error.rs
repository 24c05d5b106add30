//! Setup errors: everything that can stop a VM before its first instruction.
//!
//! Each variant names one failure and says what to do about it; each maps to
//! a distinct process exit status so that a supervisor can tell them apart
//! without parsing text (see [`Error::exit_status`] and `vmm run --help`).

use std::io;
use std::path::PathBuf;

/// Process exit statuses of `vmm run`. Guest outcomes use 0, 1 and 10-19;
/// setup errors use 20-29; 2 is a command-line usage error (from clap).
pub mod status {
    /// The guest exited with code 0.
    pub const GUEST_EXIT_OK: u8 = 0;
    /// The guest exited with a nonzero code (the code is in the JSON report).
    pub const GUEST_EXIT_NONZERO: u8 = 1;
    /// Command-line syntax error.
    pub const USAGE: u8 = 2;
    /// The guest panicked.
    pub const PANIC: u8 = 10;
    /// The guest took an exception it could not handle.
    pub const EXCEPTION: u8 = 11;
    /// The guest triple-faulted.
    pub const TRIPLE_FAULT: u8 = 12;
    /// KVM reported an internal error or could not enter the guest.
    pub const INTERNAL_ERROR: u8 = 13;
    /// The watchdog (`--timeout`) expired.
    pub const TIMEOUT: u8 = 14;
    /// The guest accessed an address or port it was not given.
    pub const INVALID_ACCESS: u8 = 15;
    /// The guest was stopped where it was at its supervisor's request.
    pub const STOPPED: u8 = 16;
    /// The image was not found.
    pub const IMAGE_NOT_FOUND: u8 = 20;
    /// The image is not a valid driver VM image.
    pub const IMAGE_INVALID: u8 = 21;
    /// The image does not fit in guest RAM.
    pub const IMAGE_TOO_LARGE: u8 = 22;
    /// Two memory ranges overlap.
    pub const OVERLAP: u8 = 23;
    /// An address, size or offset is not aligned.
    pub const UNALIGNED: u8 = 24;
    /// A window file cannot be opened, is too small or cannot be mapped.
    pub const WINDOW_FILE: u8 = 25;
    /// A value is malformed or out of range.
    pub const INVALID_VALUE: u8 = 26;
    /// KVM is unavailable or refused an operation.
    pub const KVM: u8 = 27;
    /// Another I/O failure (console file, ready fd, threads).
    pub const IO: u8 = 28;
}

/// Why a VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--image` names neither a built-in image nor a file.
    #[error("image {name:?} not found: it is not a built-in image ({builtins}) and no such file exists")]
    ImageNotFound {
        /// What was asked for.
        name: String,
        /// The built-in names, comma separated.
        builtins: String,
    },
    /// The image file exists but cannot be read.
    #[error("cannot read image {path}: {source}")]
    ImageRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The image is not a driver VM image.
    #[error("image {image} is not a valid driver VM image: {reason}")]
    ImageInvalid {
        /// Image name or path.
        image: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The image (plus stack and a minimal heap) does not fit in RAM.
    #[error("image {image} needs {needed} bytes of guest RAM but --memory is {available}: raise --memory")]
    ImageTooLarge {
        /// Image name or path.
        image: String,
        /// RAM the image needs.
        needed: u64,
        /// RAM configured.
        available: u64,
    },
    /// Two ranges of guest physical memory or ports overlap.
    #[error("{what} [{start:#x}, {end:#x}) overlaps {other}: move it")]
    Overlap {
        /// The range being placed.
        what: String,
        /// Its start.
        start: u64,
        /// Its end (exclusive).
        end: u64,
        /// What it collides with.
        other: String,
    },
    /// A value that must be aligned is not.
    #[error("{what} {value:#x} is not a multiple of {align:#x}")]
    Unaligned {
        /// Which value.
        what: String,
        /// The value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// A window's file cannot be used.
    #[error("window file {path}: {reason}")]
    WindowFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A malformed or out-of-range value.
    #[error("invalid {what}: {reason}")]
    InvalidValue {
        /// Which option or field.
        what: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// KVM failed.
    #[error("KVM: {operation} failed: {source}")]
    Kvm {
        /// The operation.
        operation: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Another I/O operation failed.
    #[error("{operation}: {source}")]
    Io {
        /// The operation.
        operation: String,
        /// The error.
        source: io::Error,
    },
}

impl Error {
    /// The process exit status for this error.
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::ImageNotFound { .. } => status::IMAGE_NOT_FOUND,
            Error::ImageRead { .. } | Error::ImageInvalid { .. } => status::IMAGE_INVALID,
            Error::ImageTooLarge { .. } => status::IMAGE_TOO_LARGE,
            Error::Overlap { .. } => status::OVERLAP,
            Error::Unaligned { .. } => status::UNALIGNED,
            Error::WindowFile { .. } => status::WINDOW_FILE,
            Error::InvalidValue { .. } => status::INVALID_VALUE,
            Error::Kvm { .. } => status::KVM,
            Error::Io { .. } => status::IO,
        }
    }

    /// A short machine-readable name for the JSON report.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ImageNotFound { .. } => "image_not_found",
            Error::ImageRead { .. } | Error::ImageInvalid { .. } => "image_invalid",
            Error::ImageTooLarge { .. } => "image_too_large",
            Error::Overlap { .. } => "overlap",
            Error::Unaligned { .. } => "unaligned",
            Error::WindowFile { .. } => "window_file",
            Error::InvalidValue { .. } => "invalid_value",
            Error::Kvm { .. } => "kvm",
            Error::Io { .. } => "io",
        }
    }

    /// An [`Error::InvalidValue`] for option or field `what`.
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidValue { what: what.into(), reason: reason.into() }
    }

    pub(crate) fn kvm(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Error::Kvm { operation, source }
    }
}

/// Result of setup operations.
pub type Result<T> = std::result::Result<T, Error>;
