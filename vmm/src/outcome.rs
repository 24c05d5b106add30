//! How a guest ended, as `vmm run` reports it: a process exit status and,
//! with `--json`, one JSON line a supervisor reads.

use serde::Serialize;

use crate::error::{status, Error};
use crate::symbols::{Location, Symbols};

/// One frame of a backtrace: an address in the image (the faulting
/// instruction first, then return addresses from the frame-pointer chain)
/// and where it is in the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// The instruction address.
    pub address: u64,
    /// Where it is in the driver's source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
}

impl Frame {
    /// A frame at `address`, not yet located.
    pub fn at(address: u64) -> Self {
        Frame { address, location: None }
    }
}

/// The general registers where the vCPU stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub struct Registers {
    pub rip: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

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
        /// The panic handler's callers, innermost first.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        backtrace: Vec<Frame>,
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
        location: Option<Location>,
        /// The fault hit the unmapped guard page below the ring-3 stack.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        stack_overflow: bool,
        /// `rip`, then the callers from the frame-pointer chain.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        backtrace: Vec<Frame>,
    },
    /// Stopped where it was because its supervisor asked (a byte `w` on
    /// standard input): the reflector asks a driver VM it is about to
    /// kill for missing its deadline.
    Stopped {
        /// Privilege level it was running in.
        ring: u8,
        /// Where `rip` is in the source.
        #[serde(skip_serializing_if = "Option::is_none")]
        location: Option<Location>,
        /// `rip`, then the callers from the frame-pointer chain.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        backtrace: Vec<Frame>,
        /// The general registers.
        registers: Box<Registers>,
    },
    /// A hosted driver (`--hosted`: a process, not a VM) died of a signal.
    Signalled {
        /// The signal number.
        signal: i32,
        /// Its name.
        name: String,
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
            Outcome::Stopped { .. } => status::STOPPED,
            Outcome::Signalled { .. } => status::EXCEPTION,
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
            Outcome::Panic { message, backtrace } => format!("panicked: {message}{}", describe_backtrace(backtrace)),
            Outcome::Exception {
                vector,
                name,
                rip,
                error_code,
                fault_address,
                ring,
                location,
                stack_overflow,
                backtrace,
            } => {
                let address = fault_address.map(|a| format!(" accessing {a:#x}")).unwrap_or_default();
                let place = location.as_ref().map(|l| format!(" in {l}")).unwrap_or_default();
                let what = if *stack_overflow {
                    "overflowed its stack (a page fault in the guard page below it)".to_owned()
                } else {
                    format!("took exception {vector} ({name})")
                };
                format!(
                    "{what} at rip {rip:#x}{place} in ring {ring}{address}, error code {error_code:#x}{}",
                    describe_backtrace(backtrace)
                )
            }
            Outcome::Stopped { ring, location, backtrace, registers } => {
                let place = location.as_ref().map(|l| format!(" in {l}")).unwrap_or_default();
                format!(
                    "was stopped by its supervisor at rip {:#x}{place} in ring {ring}{}",
                    registers.rip,
                    describe_backtrace(backtrace)
                )
            }
            Outcome::Signalled { signal, name } => format!("(hosted) died of signal {signal} ({name})"),
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

/// The backtrace as text: one `#N address in location` per frame.
fn describe_backtrace(frames: &[Frame]) -> String {
    frames
        .iter()
        .enumerate()
        .map(|(i, frame)| match &frame.location {
            Some(location) => format!("\n  #{i} {:#x} in {location}", frame.address),
            None => format!("\n  #{i} {:#x}", frame.address),
        })
        .collect()
}

impl Outcome {
    /// Fills in the source locations from the image's line tables.
    pub fn symbolize(&mut self, symbols: &Symbols<'_>) {
        let (location, rip, backtrace) = match self {
            Outcome::Exception { location, rip, backtrace, .. } => (Some(location), *rip, backtrace),
            Outcome::Stopped { location, registers, backtrace, .. } => (Some(location), registers.rip, backtrace),
            Outcome::Panic { backtrace, .. } => (None, 0, backtrace),
            _ => return,
        };
        if let Some(location) = location {
            *location = symbols.locate(rip);
        }
        for (i, frame) in backtrace.iter_mut().enumerate() {
            // A return address points after its call: look up the call.
            let address = if i == 0 { frame.address } else { frame.address.saturating_sub(1) };
            frame.location = symbols.locate(address);
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
    /// The image's build-id (hex), naming the exact build a report is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
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
                stack_overflow: false,
                backtrace: vec![Frame::at(0x10_0000)],
            },
            ready_us: Some(10),
            elapsed_us: 20,
            build_id: Some("ab12".into()),
        };
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["outcome"], "exception");
        assert_eq!(json["vector"], 14);
        assert_eq!(json["fault_address"], 0xdead_0000u64);
        assert_eq!(json["vm"], "vm0");
        assert_eq!(json["name"], "page_fault");
        assert_eq!(json["build_id"], "ab12");
        assert_eq!(json["backtrace"][0]["address"], 0x10_0000);
        assert!(json.get("stack_overflow").is_none(), "false is left out");
        let exit = serde_json::to_value(Outcome::Exit { code: 3 }).unwrap();
        assert_eq!(exit, serde_json::json!({"outcome": "exit", "code": 3}));
        assert_eq!(serde_json::to_value(Outcome::TripleFault).unwrap(), serde_json::json!({"outcome": "triple_fault"}));
    }

    #[test]
    fn exit_statuses_are_distinct() {
        let outcomes = [
            Outcome::Exit { code: 0 },
            Outcome::Exit { code: 5 },
            Outcome::Panic { message: String::new(), backtrace: Vec::new() },
            Outcome::Exception {
                vector: 6,
                name: String::new(),
                rip: 0,
                error_code: 0,
                fault_address: None,
                ring: 3,
                location: None,
                stack_overflow: false,
                backtrace: Vec::new(),
            },
            Outcome::Stopped { ring: 3, location: None, backtrace: Vec::new(), registers: Box::default() },
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
