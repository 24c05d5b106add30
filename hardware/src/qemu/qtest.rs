//! A client of QEMU's qtest protocol (docs/devel/testing/qtest.rst): one
//! line per command, one line per answer, and asynchronous `IRQ raise N`
//! lines in between once interrupts are intercepted.
//!
//! Everything QEMU sends is parsed here and nowhere else; an answer that
//! is not one the protocol defines is an error, never a panic.
//!
//! The thread that sends a command reads its answer from the socket itself
//! (the `IRQ` lines before it included, in order), for some devices
//! spinning for it briefly before it sleeps ([`ANSWER_SPIN`]); a watcher
//! thread reads while no command is in flight (the `IRQ` lines that come
//! alone). Every register access of an emulated device's driver is a
//! command, so this is on the path of each: with one reader thread handing
//! answers to a sleeping sender, a `readl` took p50 83-135 us here; with
//! the sender spinning for the reader's hand-over, 19-29 us; reading its
//! answer itself, spinning, 10-14 us.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest wait for QEMU's answer to one command. Commands take about
/// 13 us here; one that takes seconds is a QEMU that hangs, and its device
/// is then declared dead rather than blocking the reflector.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the sender of a command may spin for its answer before it
/// sleeps (`Qtest::new`'s `answer_spin`, chosen per device model): QEMU
/// answers a spinning sender within 10-14 us (p50), while a
/// sleeping thread's wake-up took about 100 us here (`readl` p50 112-135 us
/// asleep; a driver's NVMe bring-up from the host, 25 commands, p50
/// 2.2-2.9 ms asleep against 0.42-0.62 ms spinning). Bounded, so a command
/// that QEMU takes long over costs at most this much more CPU. Only here:
/// spinning as well in the BAR proxy for a driver's next access and in the
/// vmm for a trapped read's answer made NVMe failovers slower (device reset
/// p50 5.4-5.5 against 4.1 ms, 200 kills twice): on two cores, the
/// spinners took the time of the threads they waited for.
pub const ANSWER_SPIN: Duration = Duration::from_micros(100);

/// The longest line QEMU may send: its answers and notices are tens of
/// bytes; a longer one is a broken QEMU, not a line to buffer without end.
const MAX_LINE: usize = 4096;

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

/// Called for each intercepted interrupt change: line, raised.
type OnInterrupt = dyn Fn(u32, bool) + Send + Sync;

/// The connection, read by whoever holds it.
struct Conversation {
    stream: UnixStream,
    /// Bytes received and not yet parsed.
    received: Vec<u8>,
    /// Why the connection is unusable (closed, or a line too long).
    broken: Option<String>,
    /// Answers no command waited for, so far (a QEMU flooding them cannot
    /// flood the log).
    unasked: crate::LogEvery,
}

/// What one read without waiting found.
enum Fill {
    Data,
    Nothing,
    Closed(String),
}

impl Conversation {
    /// The next complete line received, if any.
    fn next_line(&mut self) -> Option<String> {
        let end = self.received.iter().position(|&byte| byte == b'\n')?;
        let line = String::from_utf8_lossy(&self.received[..end]).into_owned();
        self.received.drain(..=end);
        Some(line)
    }

    /// Takes what QEMU has sent, without waiting.
    fn fill(&mut self) -> Fill {
        let mut chunk = [0u8; 1024];
        // SAFETY: recv(2) into a local buffer of its length, without
        // blocking; the descriptor is the stream's, open while it lives.
        let read =
            unsafe { libc::recv(self.stream.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len(), libc::MSG_DONTWAIT) };
        match usize::try_from(read) {
            Ok(0) => Fill::Closed("QEMU closed the connection".into()),
            Ok(read) => {
                self.received.extend_from_slice(&chunk[..read.min(chunk.len())]);
                let partial = self.received.iter().rposition(|&byte| byte == b'\n').map_or(0, |end| end + 1);
                if self.received.len() - partial > MAX_LINE {
                    return Fill::Closed(format!("QEMU sent a line longer than {MAX_LINE} bytes"));
                }
                Fill::Data
            }
            Err(_) => {
                let error = std::io::Error::last_os_error();
                match error.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Fill::Nothing,
                    _ => Fill::Closed(error.to_string()),
                }
            }
        }
    }

    /// Takes what QEMU has sent; an error if the connection is unusable.
    fn fill_or_break(&mut self) -> Result<(), QtestError> {
        if let Some(why) = &self.broken {
            return Err(QtestError::Gone(why.clone()));
        }
        if let Fill::Closed(why) = self.fill() {
            self.broken = Some(why.clone());
            return Err(QtestError::Gone(why));
        }
        Ok(())
    }
}

/// One qtest connection: commands one at a time, answers in order.
pub struct Qtest {
    conversation: Arc<Mutex<Conversation>>,
    interrupt: Arc<OnInterrupt>,
    /// How long a command's sender spins for the answer before it sleeps.
    answer_spin: Duration,
}

impl Qtest {
    /// Talks qtest over `stream`, a command's sender spinning at most
    /// `answer_spin` for its answer before it sleeps ([`ANSWER_SPIN`]);
    /// `interrupt(line, raised)` is called for each intercepted interrupt
    /// change (from the thread that reads it), and `closed` once QEMU's end
    /// closed (it exited) or broke the protocol.
    pub fn new(
        stream: UnixStream,
        answer_spin: Duration,
        interrupt: impl Fn(u32, bool) + Send + Sync + 'static,
        closed: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Self> {
        let fd = stream.as_raw_fd();
        // A QEMU that stops reading its commands must not hold a sender,
        // and the locks it holds (the device's admission, a driver VM's
        // access gate), for ever: its socket's send buffer fills, and the
        // write times out as a late answer does.
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let conversation = Arc::new(Mutex::new(Conversation {
            stream,
            received: Vec::new(),
            broken: None,
            unasked: crate::LogEvery::default(),
        }));
        let interrupt: Arc<OnInterrupt> = Arc::new(interrupt);
        let (watched, notify) = (conversation.clone(), interrupt.clone());
        std::thread::Builder::new().name("qtest-watch".into()).spawn(move || {
            watch(&watched, fd, &*notify);
            closed();
        })?;
        Ok(Qtest { conversation, interrupt, answer_spin })
    }

    /// Sends `command` and returns the words of QEMU's `OK` answer after
    /// `OK`.
    pub fn command(&self, command: &str) -> Result<String, QtestError> {
        let mut conversation = self.conversation.lock().map_err(|_| QtestError::Gone("lock poisoned".into()))?;
        if let Some(why) = &conversation.broken {
            return Err(QtestError::Gone(why.clone()));
        }
        if let Err(error) = conversation.stream.write_all(format!("{command}\n").as_bytes()) {
            // A command sent in part, or not at all: nothing is asked of
            // this QEMU again.
            let why = format!("sending `{command}`: {error}");
            conversation.broken = Some(why.clone());
            return Err(QtestError::Gone(why));
        }
        let sent = Instant::now();
        let deadline = sent + ANSWER_TIMEOUT;
        loop {
            while let Some(line) = conversation.next_line() {
                if let Some((irq, raised)) = parse_irq(&line) {
                    (self.interrupt)(irq, raised);
                    continue;
                }
                // What came with the answer is told now: the watcher wakes
                // only for new bytes.
                dispatch(&mut conversation, &*self.interrupt);
                return match line.strip_prefix("OK") {
                    Some(rest) => Ok(rest.trim().to_owned()),
                    None => Err(QtestError::Refused { command: command.into(), answer: line }),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Its answer may still come, and would be taken for the
                // next command's: nothing is asked of this QEMU again.
                let timeout = QtestError::Timeout { command: command.into() };
                conversation.broken = Some(timeout.to_string());
                return Err(timeout);
            }
            if sent.elapsed() < self.answer_spin {
                // Yielding: QEMU, which owes the answer, may be waiting
                // for this very core.
                std::thread::yield_now();
            } else {
                crate::wait_readable(conversation.stream.as_raw_fd(), Some(left));
            }
            conversation.fill_or_break()?;
        }
    }

    /// Whether QEMU's end of the connection is gone: every descriptor of
    /// it closed, which a process's exit does only after its threads and
    /// memory are gone. Looks at the socket itself (hang-up), not at what
    /// the watcher read, which also stops at a broken protocol.
    pub fn peer_gone(&self) -> bool {
        // Not waiting for a command under way: it ends once QEMU is gone.
        let Ok(conversation) = self.conversation.try_lock() else { return false };
        let mut poll = libc::pollfd { fd: conversation.stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: poll(2) on one pollfd on the stack, without waiting.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready == 1 && poll.revents & libc::POLLHUP != 0
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

/// Reads what QEMU sends while no command is in flight (a command's
/// sender reads its own answer; this waits for the connection meanwhile):
/// interrupt changes go to `interrupt`, and an answer nothing waits for (a
/// command's that timed out) is dropped. Returns once the connection
/// closed or broke.
fn watch(conversation: &Mutex<Conversation>, fd: RawFd, interrupt: &OnInterrupt) {
    loop {
        crate::wait_readable(fd, None);
        let Ok(mut conversation) = conversation.lock() else { return };
        if conversation.fill_or_break().is_err() {
            return;
        }
        dispatch(&mut conversation, interrupt);
    }
}

/// Tells `interrupt` of every complete line received while no command
/// waits; an answer among them (a command's that timed out) is dropped.
fn dispatch(conversation: &mut Conversation, interrupt: &OnInterrupt) {
    while let Some(line) = conversation.next_line() {
        match parse_irq(&line) {
            Some((irq, raised)) => interrupt(irq, raised),
            None => {
                if let Some(so_far) = conversation.unasked.note() {
                    tracing::warn!(
                        line = %line.chars().take(80).collect::<String>(),
                        so_far,
                        "QEMU answered no command; dropped (logged at each power of two)"
                    )
                }
            }
        }
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
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc;

    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    /// A client on one end of a socket pair (the test plays QEMU on the
    /// other), with what it reports.
    fn client() -> (Qtest, UnixStream, mpsc::Receiver<(u32, bool)>, mpsc::Receiver<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (interrupts, interrupted) = mpsc::channel();
        let (closing, closed) = mpsc::channel();
        let qtest = Qtest::new(
            ours,
            ANSWER_SPIN,
            move |irq, raised| {
                let _ = interrupts.send((irq, raised));
            },
            move || {
                let _ = closing.send(());
            },
        )
        .unwrap();
        (qtest, theirs, interrupted, closed)
    }

    /// QEMU's end gone is seen on the socket itself, also after the
    /// watcher stopped at a broken protocol (before, a kill reaped a jailed
    /// QEMU's keeper and went on while QEMU itself still ran).
    #[test]
    fn the_peer_is_gone_only_once_its_end_is_closed() {
        let (qtest, qemu, _, closed) = client();
        // A line longer than any answer: the watcher stops reading.
        (&qemu).write_all(&[b'x'; MAX_LINE + 1]).unwrap();
        closed.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(!qtest.peer_gone(), "the watcher stopped, but QEMU's end is still open");
        drop(qemu);
        assert!(qtest.peer_gone());
    }

    #[test]
    fn answers_come_in_order_after_the_interrupts_sent_before_them() {
        let (qtest, qemu, interrupts, closed) = client();
        let fake = std::thread::spawn(move || {
            let mut commands = BufReader::new(qemu.try_clone().unwrap());
            let mut writer = qemu;
            let mut line = String::new();
            commands.read_line(&mut line).unwrap();
            assert_eq!(line, "readl 0x10\n");
            // An interrupt first, the answer split across two writes.
            writer.write_all(b"IRQ raise 20\nOK 0x").unwrap();
            writer.write_all(b"2a\n").unwrap();
            line.clear();
            commands.read_line(&mut line).unwrap();
            assert_eq!(line, "writel 0x10 0x1\n");
            // Behind the answer, in the same write: a stray answer and a
            // notice, which no command waits for.
            writer.write_all(b"FAIL bad address\nOK stray\nIRQ lower 20\n").unwrap();
            writer
        });
        assert_eq!(qtest.readl(0x10).unwrap(), 0x2a);
        // Reported before the answer returned (a driver's write relies on it).
        assert_eq!(interrupts.try_recv(), Ok((20, true)));
        assert!(matches!(qtest.writel(0x10, 1), Err(QtestError::Refused { .. })));
        let qemu = fake.join().unwrap();
        assert_eq!(interrupts.recv_timeout(BOUND), Ok((20, false)), "a notice behind an answer is told");
        (&qemu).write_all(b"IRQ raise 21\n").unwrap();
        assert_eq!(interrupts.recv_timeout(BOUND), Ok((21, true)), "a notice alone reaches the watcher");
        drop(qemu);
        closed.recv_timeout(BOUND).expect("QEMU's end closing is reported");
        assert!(matches!(qtest.readl(0), Err(QtestError::Gone(_))));
    }

    #[test]
    fn a_line_without_end_breaks_the_connection_instead_of_growing() {
        let (qtest, mut qemu, _interrupts, closed) = client();
        let flood = std::thread::spawn(move || {
            let _ = qemu.write_all(&[b'x'; 64 * 1024]);
            qemu
        });
        closed.recv_timeout(BOUND).expect("a line longer than any answer breaks the connection");
        assert!(matches!(qtest.readl(0), Err(QtestError::Gone(_))));
        drop(flood.join());
    }

    /// A QEMU that answers after the timeout: its late answer would have
    /// been taken for the next command's (a write that never happened
    /// reported done, the rest of the conversation one answer off). The
    /// connection is broken instead, and the device model replaced.
    #[test]
    fn an_answer_after_the_timeout_is_never_taken_for_the_next_commands() {
        let (qtest, qemu, _interrupts, _closed) = client();
        let (asked, answer) = (mpsc::channel(), mpsc::channel::<()>());
        let fake = std::thread::spawn(move || {
            let mut commands = BufReader::new(qemu.try_clone().unwrap());
            let mut line = String::new();
            commands.read_line(&mut line).unwrap();
            let _ = asked.0.send(());
            // Answers only once told the client gave up.
            let _ = answer.1.recv_timeout(BOUND);
            (&qemu).write_all(b"OK\n").unwrap();
            qemu
        });
        assert!(matches!(qtest.writel(0x14, 1), Err(QtestError::Timeout { .. })));
        asked.1.recv_timeout(BOUND).unwrap();
        answer.0.send(()).unwrap();
        let qemu = fake.join().unwrap();
        assert!(
            matches!(qtest.writel(0x14, 0), Err(QtestError::Gone(_))),
            "a QEMU that missed its deadline was asked again"
        );
        drop(qemu);
    }

    /// A QEMU taken over that answers every command without reading it:
    /// once its socket's buffer is full, the sender's write blocked for
    /// ever, holding the device's admission and a driver VM's access gate,
    /// so that its device never failed over. The write now has the
    /// answer's deadline, and the connection breaks.
    #[test]
    fn a_qemu_that_stops_reading_its_commands_breaks_the_connection_instead_of_blocking_it() {
        let (qtest, qemu, _interrupts, _closed) = client();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let answers = b"OK 0x0\n".repeat(512);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && (&qemu).write_all(&answers).is_ok() {}
                qemu
            })
        };
        let (result, outcome) = mpsc::channel();
        std::thread::spawn(move || {
            let mut answered = 0u64;
            let error = loop {
                match qtest.readl(0x1000) {
                    Ok(_) => answered += 1,
                    Err(error) => break error,
                }
            };
            let _ = result.send((answered, error, qtest.readl(0x1000).err()));
        });
        // A hang guard, not a timing assertion: the deadline is 5 s.
        let (answered, error, after) = outcome.recv_timeout(6 * BOUND).expect("a sender blocked for ever");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(answered > 0, "{error}");
        assert!(matches!(error, QtestError::Gone(_)), "{error}");
        assert!(matches!(after, Some(QtestError::Gone(_))), "a QEMU whose command was cut off was asked again");
        drop(flood);
    }

    #[test]
    fn interrupt_lines_are_told_from_answers() {
        assert_eq!(parse_irq("IRQ raise 16"), Some((16, true)));
        assert_eq!(parse_irq("IRQ lower 3"), Some((3, false)));
        for other in ["OK 0x1", "IRQ", "IRQ raise", "IRQ raise x", "IRQ blink 1", "FAIL"] {
            assert_eq!(parse_irq(other), None, "{other}");
        }
    }
}
