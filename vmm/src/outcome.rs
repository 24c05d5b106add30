//! How a guest ended, as `vmm run` reports it: a process exit status and,
//! with `--json`, one JSON line a supervisor reads.

use serde::Serialize;

use crate::error::{status, Error};

/// How the guest ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The guest called exit.
    Exit {
        /// Its exit code.
        code: u32,
    },
    /// The guest panicked.
    Panic {
        /// The panic message (untrusted text, control characters escaped).
        message: String,
    },
    /// The guest took an exception it does not handle.
    Exception {
        /// Vector number.
        vector: u64,
        /// Vector name, e.g. `page_fault`.
        name: String,
        /// Faulting instruction.
        rip: u64,
        /// Error code (0 for vectors without one).
        error_code: u64,
        /// The address that faulted, for page faults (CR2).
        #[serde(skip_serializing_if = "Option::is_none")]
        fault_address: Option<u64>,
        /// Privilege level the fault happened in (3: the driver, 0: a handler).
        ring: u8,
        /// Where `rip` is in the driver's source, from the image's line
        /// tables (`symbols`).
        #[serde(skip_serializing_if = "Option::is_none")]
        location: Option<crate::symbols::Location>,
    },
    /// A fault occurred while delivering a double fault; the CPU shut down.
    TripleFault,
    /// KVM could not run the guest.
    InternalError {
        /// What KVM reported.
        reason: String,
    },
    /// The watchdog expired.
    Timeout {
        /// The `--timeout` that expired, in milliseconds.
        after_ms: u64,
    },
    /// The guest touched an address or port it was not given.
    InvalidAccess {
        /// `mmio_read`, `mmio_write`, `port_read` or `port_write`.
        access: &'static str,
        /// Guest physical address or port.
        address: u64,
        /// Access width in bytes.
        size: usize,
    },
    /// The guest halted with no interrupt line that could wake it.
    Halted,
}

impl Outcome {
    /// The process exit status for this outcome.
    pub fn exit_status(&self) -> u8 {
        match self {
            Outcome::Exit { code: 0 } => status::GUEST_EXIT_OK,
            Outcome::Exit { .. } => status::GUEST_EXIT_NONZERO,
            Outcome::Panic { .. } => status::PANIC,
            Outcome::Exception { .. } => status::EXCEPTION,
            Outcome::TripleFault => status::TRIPLE_FAULT,
            Outcome::InternalError { .. } => status::INTERNAL_ERROR,
            Outcome::Timeout { .. } | Outcome::Halted => status::TIMEOUT,
            Outcome::InvalidAccess { .. } => status::INVALID_ACCESS,
        }
    }

    /// One human-readable line.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Exit { code } => format!("exited with code {code}"),
            Outcome::Panic { message } => format!("panicked: {message}"),
            Outcome::Exception { vector, name, rip, error_code, fault_address, ring, location } => {
                let address = fault_address.map(|a| format!(" accessing {a:#x}")).unwrap_or_default();
                let place = location.as_ref().map(|l| format!(" in {l}")).unwrap_or_default();
                format!(
                    "took exception {vector} ({name}) at rip {rip:#x}{place} in ring {ring}{address}, error code {error_code:#x}"
                )
            }
            Outcome::TripleFault => "triple-faulted".into(),
            Outcome::InternalError { reason } => format!("stopped on a KVM internal error: {reason}"),
            Outcome::Timeout { after_ms } => format!("did not finish within the {after_ms} ms timeout"),
            Outcome::InvalidAccess { access, address, size } => {
                format!("made an invalid {access} of {size} bytes at {address:#x}")
            }
            Outcome::Halted => "halted with no interrupt line to wake it".into(),
        }
    }
}

/// The JSON line `vmm run --json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The VM's name.
    #[serde(rename = "vm")]
    pub name: String,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Microseconds from the start of setup to the guest's ready signal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_us: Option<u64>,
    /// Microseconds from the start of setup to the end.
    pub elapsed_us: u64,
}

/// The JSON line for a setup error.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorReport {
    /// The VM's name.
    #[serde(rename = "vm")]
    pub name: String,
    /// Always `setup_error`.
    pub outcome: &'static str,
    /// Machine-readable kind (see [`Error::kind`]).
    pub kind: &'static str,
    /// The message.
    pub message: String,
}

impl ErrorReport {
    /// Describes `error`.
    pub fn new(name: &str, error: &Error) -> Self {
        ErrorReport { name: name.into(), outcome: "setup_error", kind: error.kind(), message: error.to_string() }
    }
}

/// Makes untrusted guest text safe for a terminal and a log: control
/// characters (terminal escapes included) are shown escaped.
pub fn sanitize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .flat_map(|c| {
            let escape = c.is_control() && c != '\t';
            let shown: Vec<char> = if escape { c.escape_default().collect() } else { vec![c] };
            shown
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_outcome_tag_and_fields() {
        let report = Report {
            name: "vm0".into(),
            outcome: Outcome::Exception {
                vector: 14,
                name: "page_fault".into(),
                rip: 0x10_0000,
                error_code: 4,
                fault_address: Some(0xdead_0000),
                ring: 3,
                location: None,
            },
            ready_us: Some(10),
            elapsed_us: 20,
        };
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["outcome"], "exception");
        assert_eq!(json["vector"], 14);
        assert_eq!(json["fault_address"], 0xdead_0000u64);
        assert_eq!(json["vm"], "vm0");
        assert_eq!(json["name"], "page_fault");
        let exit = serde_json::to_value(Outcome::Exit { code: 3 }).unwrap();
        assert_eq!(exit, serde_json::json!({"outcome": "exit", "code": 3}));
        assert_eq!(serde_json::to_value(Outcome::TripleFault).unwrap(), serde_json::json!({"outcome": "triple_fault"}));
    }

    #[test]
    fn exit_statuses_are_distinct() {
        let outcomes = [
            Outcome::Exit { code: 0 },
            Outcome::Exit { code: 5 },
            Outcome::Panic { message: String::new() },
            Outcome::Exception {
                vector: 6,
                name: String::new(),
                rip: 0,
                error_code: 0,
                fault_address: None,
                ring: 3,
                location: None,
            },
            Outcome::TripleFault,
            Outcome::InternalError { reason: String::new() },
            Outcome::Timeout { after_ms: 1 },
            Outcome::InvalidAccess { access: "mmio_read", address: 0, size: 4 },
        ];
        let mut statuses: Vec<u8> = outcomes.iter().map(Outcome::exit_status).collect();
        statuses.sort_unstable();
        statuses.dedup();
        assert_eq!(statuses.len(), outcomes.len());
    }

    #[test]
    fn sanitize_escapes_terminal_controls() {
        assert_eq!(sanitize(b"ok\x1b[31mred"), "ok\\u{1b}[31mred");
        assert_eq!(sanitize(b"tab\there"), "tab\there");
        assert_eq!(sanitize(&[0xff, b'a']), "\u{fffd}a");
    }
}
