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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for anything to start (a hang guard, not a timing assertion).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a whole probe run: every case is bounded by blk-load's
/// own --timeout, this only guards against blk-load itself hanging.
const PROBE_TIMEOUT: Duration = Duration::from_secs(300);

fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(error) => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: /dev/kvm is unusable ({error}) and CI is set");
            }
            eprintln!("\n*** SKIPPING {test}: /dev/kvm is unusable ({error}). ***\n");
            false
        }
    }
}

fn sibling(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_reflector")).with_file_name(name);
    assert!(path.is_file(), "{} is missing: build the workspace first (cargo build --release)", path.display());
    path
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("reflector-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running reflector, stopped (SIGTERM, then SIGKILL) on drop.
struct Reflector {
    child: Child,
    log: PathBuf,
}

impl Reflector {
    fn start(args: &[String], log: PathBuf, socket: &Path) -> Reflector {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_reflector"))
            .arg("serve")
            .args(args)
            .env("REFLECTOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut reflector = Reflector { child, log };
        reflector.wait_for(|r| socket.exists() && r.log_text().contains("controller ready"), "the device to be served");
        reflector
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a condition on the reflector's observable state (its log,
    /// its socket), bounded by START_TIMEOUT.
    fn wait_for(&mut self, ready: impl Fn(&Reflector) -> bool, what: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !ready(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the reflector exited ({status}) before {what}:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{}", self.log_text());
            std::thread::yield_now();
        }
    }

    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + START_TIMEOUT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the reflector ignored SIGTERM");
            std::thread::yield_now();
        }
        self.log_text()
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn blk_arg(socket: &Path, image: &Path, extra: &str) -> Vec<String> {
    vec!["--blk".into(), format!("socket={},image={}{extra}", socket.display(), image.display())]
}

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
