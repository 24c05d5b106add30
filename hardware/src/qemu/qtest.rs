//! A client of QEMU's qtest protocol (docs/devel/testing/qtest.rst): one
//! line per command, one line per answer, and asynchronous `IRQ raise N`
//! lines in between once interrupts are intercepted.
//!
//! Everything QEMU sends is parsed here and nowhere else; an answer that
//! is not one the protocol defines is an error, never a panic.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

/// Longest wait for QEMU's answer to one command. Commands take about
/// 13 us here; one that takes seconds is a QEMU that hangs, and its device
/// is then declared dead rather than blocking the reflector.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QtestError {
    /// The connection failed or closed (QEMU exited).
    #[error("the qtest connection to QEMU is gone: {0}")]
    Gone(String),
    /// No answer within [`ANSWER_TIMEOUT`].
    #[error("QEMU did not answer {command:?} within {ANSWER_TIMEOUT:?}")]
    Timeout {
        /// The command.
        command: String,
    },
    /// QEMU refused the command or answered something unexpected.
    #[error("QEMU answered {answer:?} to {command:?}")]
    Refused {
        /// The command.
        command: String,
        /// The answer.
        answer: String,
    },
}

/// One qtest connection: commands one at a time, answers in order.
pub struct Qtest {
    writer: Mutex<(UnixStream, Receiver<String>)>,
}

impl Qtest {
    /// Talks qtest over `stream`; `interrupt(line, raised)` is called from
    /// a reader thread for each intercepted interrupt change, and `closed`
    /// once QEMU's end closed (it exited).
    pub fn new(
        stream: UnixStream,
        interrupt: impl Fn(u32, bool) + Send + 'static,
        closed: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Self> {
        let reader = BufReader::new(stream.try_clone()?);
        let (answers, answered) = mpsc::channel();
        std::thread::Builder::new().name("qtest-reader".into()).spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                match parse_irq(&line) {
                    Some((irq, raised)) => interrupt(irq, raised),
                    None => {
                        if answers.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
            closed();
        })?;
        Ok(Qtest { writer: Mutex::new((stream, answered)) })
    }

    /// Sends `command` and returns the words of QEMU's `OK` answer after
    /// `OK`.
    pub fn command(&self, command: &str) -> Result<String, QtestError> {
        let mut guard = self.writer.lock().map_err(|_| QtestError::Gone("lock poisoned".into()))?;
        let (stream, answered) = &mut *guard;
        stream.write_all(format!("{command}\n").as_bytes()).map_err(|e| QtestError::Gone(e.to_string()))?;
        let answer = match answered.recv_timeout(ANSWER_TIMEOUT) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => return Err(QtestError::Timeout { command: command.into() }),
            Err(RecvTimeoutError::Disconnected) => return Err(QtestError::Gone("QEMU closed the connection".into())),
        };
        match answer.strip_prefix("OK") {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => Err(QtestError::Refused { command: command.into(), answer }),
        }
    }

    fn value(&self, command: &str) -> Result<u64, QtestError> {
        let answer = self.command(command)?;
        answer
            .strip_prefix("0x")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| QtestError::Refused { command: command.into(), answer })
    }

    /// A 32-bit read of guest-physical `address` (MMIO or RAM).
    pub fn readl(&self, address: u64) -> Result<u32, QtestError> {
        Ok(self.value(&format!("readl {address:#x}"))? as u32)
    }

    /// A 32-bit write to guest-physical `address`.
    pub fn writel(&self, address: u64, value: u32) -> Result<(), QtestError> {
        self.command(&format!("writel {address:#x} {value:#x}")).map(drop)
    }

    /// A 32-bit read of I/O port `port`.
    pub fn inl(&self, port: u16) -> Result<u32, QtestError> {
        Ok(self.value(&format!("inl {port:#x}"))? as u32)
    }

    /// A 32-bit write to I/O port `port`.
    pub fn outl(&self, port: u16, value: u32) -> Result<(), QtestError> {
        self.command(&format!("outl {port:#x} {value:#x}")).map(drop)
    }
}

/// `IRQ raise N` / `IRQ lower N`.
fn parse_irq(line: &str) -> Option<(u32, bool)> {
    let mut words = line.split_whitespace();
    if words.next()? != "IRQ" {
        return None;
    }
    let raised = match words.next()? {
        "raise" => true,
        "lower" => false,
        _ => return None,
    };
    Some((words.next()?.parse().ok()?, raised))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_lines_are_told_from_answers() {
        assert_eq!(parse_irq("IRQ raise 16"), Some((16, true)));
        assert_eq!(parse_irq("IRQ lower 3"), Some((3, false)));
        for other in ["OK 0x1", "IRQ", "IRQ raise", "IRQ raise x", "IRQ blink 1", "FAIL"] {
            assert_eq!(parse_irq(other), None, "{other}");
        }
    }
}
