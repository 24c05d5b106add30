//! Malformed client requests against the reflector: `blk-load --malformed`
//! sends deliberately malformed virtio-blk chains one at a time (bad
//! headers, wrong directions, bad lengths, sectors beyond the capacity,
//! addresses outside client memory, too many segments, unknown types, a
//! read-only status byte...) and checks each completes as the virtio spec
//! asks; afterwards normal I/O must still work. The reflector must count
//! every one of them as malformed, and never panic.
//!
//! Needs /dev/kvm and the workspace's binaries (`vmm`, `blk-load`) built
//! next to the reflector (`cargo build --release`; `ci/test.sh` does it).
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for a whole probe run: every case is bounded by blk-load's
/// own --timeout, this only guards against blk-load itself hanging.
const PROBE_TIMEOUT: Duration = Duration::from_secs(300);

mod common;

use common::{blk_arg, kvm_available, sibling, Reflector, Scratch};

/// What `blk-load --malformed --json` reported.
struct Probe {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    cases: Vec<serde_json::Value>,
}

impl Probe {
    /// Runs the probe, bounded by PROBE_TIMEOUT (killed by pid on overrun).
    fn run(socket: &Path) -> Probe {
        let mut child = Command::new(sibling("blk-load"))
            .arg("--socket")
            .arg(socket)
            .args(["--malformed", "--json", "--timeout", "10"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + PROBE_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("blk-load --malformed did not finish within {PROBE_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
        let cases = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
        eprintln!("--- blk-load --malformed -> {status}\n{stdout}{stderr}");
        Probe { status, stdout, stderr, cases }
    }

    /// Malformed chains that reached the reflector.
    fn sent(&self) -> u64 {
        self.cases.iter().filter(|c| c["malformed"] == true && c["sent"] == true).count() as u64
    }

    /// Asserts that every case passed; `may_skip` lists the cases that may
    /// be skipped on this device.
    fn assert_all_passed(&self, may_skip: &[&str]) {
        assert!(self.cases.len() > 20, "too few cases reported:\n{}{}", self.stdout, self.stderr);
        let failed: Vec<String> = self
            .cases
            .iter()
            .filter(|c| {
                let skipped_ok = c["result"] == "skip" && may_skip.iter().any(|name| c["case"] == *name);
                c["result"] != "pass" && !skipped_ok
            })
            .map(|c| format!("{}: expected {}, got {} ({})", c["case"], c["expected"], c["got"], c["result"]))
            .collect();
        assert!(failed.is_empty(), "cases that did not pass:\n  {}", failed.join("\n  "));
        let health = self.cases.last().unwrap();
        assert_eq!(health["case"], "healthy-after-malformed", "the health check comes last");
        assert_eq!(health["result"], "pass", "{health}");
        assert!(self.status.success(), "blk-load --malformed exited with {}:\n{}", self.status, self.stderr);
    }
}

/// The `malformed=` counter of the reflector's shutdown log line.
fn malformed_counter(log: &str) -> u64 {
    let line = log.lines().rev().find(|l| l.contains("device counters")).expect("device counters logged at shutdown");
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("malformed="))
        .unwrap_or_else(|| panic!("no malformed= in {line}"));
    value.parse().unwrap()
}

#[test]
fn malformed_requests_complete_with_the_spec_status() {
    if !kvm_available("malformed_requests_complete_with_the_spec_status") {
        return;
    }
    let scratch = Scratch::new("malformed");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let reflector = Reflector::start(&blk_arg(&socket, &image, ",size=32M,name=disk0"), scratch.join("log"), &socket);
    let probe = Probe::run(&socket);
    let log = reflector.stop();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(malformed_counter(&log), probe.sent(), "every malformed chain must be counted once:\n{log}");
    probe.assert_all_passed(&["write-to-read-only-device"]);
    let written = std::fs::read(&image).unwrap();
    assert!(written[4096..].iter().all(|b| *b == 0), "only the health check's 4 KiB at sector 0 may be written");
}

#[test]
fn malformed_requests_on_a_read_only_disk() {
    if !kvm_available("malformed_requests_on_a_read_only_disk") {
        return;
    }
    let scratch = Scratch::new("malformed-ro");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    std::fs::write(&image, vec![0x5au8; 4 << 20]).unwrap();
    let reflector = Reflector::start(&blk_arg(&socket, &image, ",readonly=on"), scratch.join("log"), &socket);
    let probe = Probe::run(&socket);
    let log = reflector.stop();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(malformed_counter(&log), probe.sent(), "every malformed chain must be counted once:\n{log}");
    assert!(
        probe.cases.iter().any(|c| c["case"] == "write-to-read-only-device" && c["sent"] == true),
        "a read-only device gets the read-only case"
    );
    probe.assert_all_passed(&[]);
    assert_eq!(std::fs::read(&image).unwrap(), vec![0x5au8; 4 << 20], "a read-only image must not change");
}
