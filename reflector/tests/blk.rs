//! The reflector serving a disk through a real driver VM, driven by the
//! project's vhost-user frontend (`blk-load`) with data verification.
//!
//! Needs /dev/kvm and the workspace's binaries (`vmm`, `blk-load`) built
//! next to the reflector (`cargo build --release`; `ci/test.sh` does it).
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for anything to start (a hang guard, not a timing assertion).
const START_TIMEOUT: Duration = Duration::from_secs(30);

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

    /// The driver VM's pid, from the reflector's log.
    fn driver_pid(&self) -> i32 {
        let log = self.log_text();
        let line = log.lines().rev().find(|l| l.contains("driver VM started")).expect("driver VM start logged");
        // The last started driver VM is the current one.
        let pid = line.split("pid=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap();
        pid.parse().unwrap()
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

/// Runs blk-load; returns its output and the parsed JSON job lines.
fn blk_load(socket: &Path, args: &[&str]) -> (Output, Vec<serde_json::Value>) {
    let output = Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(socket)
        .args(["--json", "--queue-size", "256", "--timeout", "20"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let jobs = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (output, jobs)
}

fn blk_arg(socket: &Path, image: &Path, extra: &str) -> Vec<String> {
    vec!["--blk".into(), format!("socket={},image={}{extra}", socket.display(), image.display())]
}

#[test]
fn verified_reads_and_writes_through_a_driver_vm() {
    if !kvm_available("verified_reads_and_writes_through_a_driver_vm") {
        return;
    }
    let scratch = Scratch::new("verify");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let reflector = Reflector::start(&blk_arg(&socket, &image, ",size=32M,name=disk0"), scratch.join("log"), &socket);
    let (output, jobs) = blk_load(
        &socket,
        &[
            "--job",
            "randwrite,randread,write,read",
            "--bs",
            "4k,128k",
            "--qd",
            "1,4",
            "--ios",
            "300",
            "--verify",
            "--size",
            "16M",
            "--get-id",
            "--flush",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "blk-load failed: {stderr}");
    assert_eq!(jobs.len(), 16, "{stderr}");
    for job in &jobs {
        assert_eq!(job["errors"], 0, "{job}");
        assert_eq!(job["mismatches"], 0, "{job}");
        assert!(job["ios"].as_u64().unwrap() >= 300, "{job}");
    }
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("drvm-disk0"), "GET_ID must return the device id: {all}");
    assert!(all.contains("flush OK"), "{all}");
    reflector.stop();
    let written = std::fs::read(&image).unwrap();
    assert_eq!(written.len(), 32 << 20, "the image was created with the requested size");
    assert!(written[..16 << 20].iter().any(|b| *b != 0), "the writes must have reached the image");
    assert!(written[16 << 20..].iter().all(|b| *b == 0), "nothing may be written outside the region used");
}

#[test]
fn a_client_can_reconnect_and_a_read_only_disk_refuses_writes() {
    if !kvm_available("a_client_can_reconnect_and_a_read_only_disk_refuses_writes") {
        return;
    }
    let scratch = Scratch::new("reconnect");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    std::fs::write(&image, vec![0x5au8; 4 << 20]).unwrap();
    let reflector = Reflector::start(&blk_arg(&socket, &image, ",readonly=on"), scratch.join("log"), &socket);
    for round in 0..2 {
        let (output, jobs) = blk_load(&socket, &["--job", "randread", "--bs", "4k", "--qd", "2", "--ios", "100"]);
        assert!(output.status.success(), "round {round}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(jobs[0]["errors"], 0);
    }
    let (output, jobs) = blk_load(&socket, &["--job", "randwrite", "--bs", "4k", "--qd", "1", "--ios", "10"]);
    assert!(!output.status.success(), "writes to a read-only disk must fail");
    assert!(jobs.first().is_none_or(|job| job["errors"].as_u64().unwrap_or(0) > 0));
    let log = reflector.stop();
    assert!(log.matches("client connected").count() >= 3, "{log}");
    assert_eq!(std::fs::read(&image).unwrap(), vec![0x5au8; 4 << 20], "a read-only image must not change");
}

#[test]
fn killed_driver_vms_are_replaced_without_client_errors() {
    if !kvm_available("killed_driver_vms_are_replaced_without_client_errors") {
        return;
    }
    let scratch = Scratch::new("kill");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let mut reflector = Reflector::start(&blk_arg(&socket, &image, ",size=16M"), scratch.join("log"), &socket);
    let load = Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "--queue-size", "1024", "--timeout", "20", "--job", "randwrite,randread", "--bs", "4k"])
        .args(["--qd", "8", "--ios", "200000", "--size", "8M", "--verify"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut killed = 0;
    while killed < 10 {
        let log = reflector.log_text();
        let started = log.matches("driver VM started").count();
        if started > killed {
            // SAFETY: kill(2) on the current driver VM, our reflector's child.
            unsafe { libc::kill(reflector.driver_pid(), libc::SIGKILL) };
            killed += 1;
        }
        reflector.wait_for(|r| r.log_text().matches("driver VM started").count() > killed, "a replacement driver VM");
    }
    let output = load.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "blk-load: {}", String::from_utf8_lossy(&output.stderr));
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let job: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(job["errors"], 0, "{job}");
        assert_eq!(job["mismatches"], 0, "{job}");
    }
    let log = reflector.stop();
    assert!(log.matches("driver VM restarted").count() >= 10, "{log}");
    assert!(log.contains("errors=0"), "the reflector completed no request with an error: {log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn bad_configuration_names_the_file_line_and_key() {
    let scratch = Scratch::new("bad-config");
    let config = scratch.join("r.toml");
    std::fs::write(&config, "[[blk]]\nsocket = \"/tmp/x.sock\"\nimage = \"/tmp/x.img\"\nsize = \"huge\"\n").unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_reflector")).args(["serve", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("r.toml, line 4") && stderr.contains("size"), "{stderr}");

    let output =
        Command::new(env!("CARGO_BIN_EXE_reflector")).args(["serve", "--blk", "socket=/tmp/x.sock"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("image=PATH is required"), "{stderr}");

    let missing = scratch.join("missing.img");
    let spec = format!("socket={},image={}", scratch.join("s").display(), missing.display());
    let output = Command::new(env!("CARGO_BIN_EXE_reflector")).args(["serve", "--blk", &spec]).output().unwrap();
    let mut stderr = String::new();
    output.stderr.as_slice().read_to_string(&mut stderr).unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("does not exist: add size=SIZE"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}
