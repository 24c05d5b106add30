//! QEMU's qtest answers, as the reflector's qtest client (`hardware::qemu::
//! Qtest`) reads them: a device model is fed by its driver's DMA, and a
//! QEMU that a hostile driver took over through a bug in its model may
//! send anything on its socket. Here a fake QEMU answers each command with
//! the next piece of the input: everything up to and including the next
//! complete line that is not an interrupt notice, the rest once no such
//! line is left, and then hangs up.
//!
//! Besides "no panic": an answer the client takes is the one sent for
//! that command, never another's; interrupts are reported in the order
//! they were sent, none made up; and once a command fails for a broken
//! connection, every later one fails too.
#![no_main]

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use reflector::hw::qemu::{Qtest, QtestError};

/// Bound on the fake's and the watcher's ends (a hang guard: the client's
/// own deadline is 5 s, and every answer here is already sent).
const BOUND: Duration = Duration::from_secs(30);

/// A line as the protocol has it, judged independently of the client.
enum Line {
    Irq(u32, bool),
    Other(String),
}

fn judge(bytes: &[u8]) -> Line {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    if let ["IRQ", direction @ ("raise" | "lower"), line, ..] = words[..] {
        if let Ok(line) = line.parse() {
            return Line::Irq(line, direction == "raise");
        }
    }
    Line::Other(text)
}

/// The input cut into the fake's answers: each ends after the next
/// complete line that is not an interrupt notice; the last may have none.
/// With the interrupts each piece carries, and its answer line.
fn pieces(bytes: &[u8]) -> Vec<(&[u8], Vec<(u32, bool)>, Option<String>)> {
    let mut pieces = Vec::new();
    let (mut start, mut irqs) = (0, Vec::new());
    let mut line_start = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if byte != b'\n' {
            continue;
        }
        match judge(&bytes[line_start..at]) {
            Line::Irq(line, raised) => irqs.push((line, raised)),
            Line::Other(answer) => {
                pieces.push((&bytes[start..=at], std::mem::take(&mut irqs), Some(answer)));
                start = at + 1;
            }
        }
        line_start = at + 1;
    }
    if start < bytes.len() || !irqs.is_empty() {
        pieces.push((&bytes[start..], irqs, None));
    }
    pieces
}

/// Lines no longer than this never break the connection (the client's
/// limit is 4 KiB): their answers must all be taken.
const SHORT_LINE: usize = 1024;

fuzz_target!(|input: &[u8]| {
    static IGNORE_SIGPIPE: std::sync::Once = std::sync::Once::new();
    // SAFETY: signal(2) setting SIGPIPE ignored, as the reflector's Rust
    // runtime does (libFuzzer's main is not Rust's): a write to the hung-up
    // fake fails instead of killing the process.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let Some((&kinds, sent)) = input.split_first() else { return };
    let pieces = pieces(sent);
    let short_lines = sent.split(|&byte| byte == b'\n').all(|line| line.len() <= SHORT_LINE);
    let (client_end, qemu_end) = UnixStream::pair().expect("a socket pair");
    let hang_up = qemu_end.try_clone().expect("a descriptor");
    let interrupts = Arc::new(Mutex::new(Vec::new()));
    let (closing, closed) = mpsc::channel();
    let told = interrupts.clone();
    let qtest = Qtest::new(
        client_end,
        Duration::ZERO,
        move |line, raised| told.lock().unwrap().push((line, raised)),
        move || {
            let _ = closing.send(());
        },
    )
    .expect("a qtest client");

    let fake = std::thread::spawn({
        let answers: Vec<Vec<u8>> = pieces.iter().map(|(bytes, _, _)| bytes.to_vec()).collect();
        move || {
            let mut commands = BufReader::new(qemu_end.try_clone().expect("a descriptor"));
            let mut writer = qemu_end;
            let mut line = String::new();
            for answer in answers {
                line.clear();
                if commands.read_line(&mut line).unwrap_or(0) == 0 || writer.write_all(&answer).is_err() {
                    return;
                }
            }
            let _ = writer.shutdown(Shutdown::Both);
        }
    });

    let mut broken = false;
    for (index, (_, _, answer)) in pieces.iter().enumerate() {
        let read = kinds & (1 << (index % 8)) != 0;
        let result = if read { qtest.readl(0x1000).map(u64::from) } else { qtest.writel(0x1000, 1).map(|()| 0) };
        match (&result, answer) {
            (Err(QtestError::Gone(_) | QtestError::Timeout { .. }), answer) => {
                assert!(
                    answer.is_none() || !short_lines,
                    "command {index} failed ({result:?}) though its answer was sent on lines within the limit"
                );
                broken = true;
            }
            _ if broken => panic!("command {index} was answered ({result:?}) after the connection broke"),
            (Ok(value), Some(answer)) => {
                let rest = answer.strip_prefix("OK").unwrap_or_else(|| panic!("{answer:?} taken for OK"));
                if read {
                    let hex = rest.trim().strip_prefix("0x").expect("a value answered without 0x");
                    let sent = u64::from_str_radix(hex, 16).expect("a value that is not hex");
                    assert_eq!(*value, sent & 0xffff_ffff, "command {index} was given another answer");
                }
            }
            // Refused: not OK, or (a read) OK with no value.
            (Err(QtestError::Refused { answer: refused, .. }), Some(answer)) => assert!(
                refused == answer || (read && answer.strip_prefix("OK").map(str::trim) == Some(refused)),
                "command {index} was refused with {refused:?}, answered {answer:?}"
            ),
            (_, None) => panic!("command {index} ended ({result:?}) with no answer sent"),
        }
    }
    // QEMU hung up: nothing more is answered.
    assert!(matches!(qtest.readl(0x1000), Err(QtestError::Gone(_))), "a command was answered after QEMU hung up");

    // Every notice sent is told, in order; a prefix of them if the
    // connection broke on a line past the client's limit.
    let _ = hang_up.shutdown(Shutdown::Both);
    closed.recv_timeout(BOUND).expect("the watcher saw the hang-up");
    drop(qtest);
    fake.join().expect("the fake QEMU");
    let sent: Vec<(u32, bool)> = pieces.iter().flat_map(|(_, irqs, _)| irqs.iter().copied()).collect();
    let told = interrupts.lock().unwrap();
    assert!(told.len() <= sent.len() && told[..] == sent[..told.len()], "interrupts told {told:?}, sent {sent:?}");
    if short_lines {
        assert_eq!(told.len(), sent.len(), "a notice sent was not told");
    }
});
