//! Helpers for the tests that run the `vmm` binary.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The `vmm` binary built for these tests.
pub fn vmm() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm"));
    command.stdin(Stdio::null());
    command
}

/// Whether KVM can be used. Without it, tests that boot guests skip with a
/// loud message, except under CI, where they fail.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(error) => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: /dev/kvm is unusable ({error}) and CI is set: KVM tests must run in CI");
            }
            eprintln!("\n*** SKIPPING {test}: /dev/kvm is unusable ({error}). Set CI=1 to make this a failure. ***\n");
            false
        }
    }
}

/// Runs the command; returns its output after checking it did not panic.
pub fn output(command: &mut Command) -> Output {
    let output = command.output().expect("run vmm");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "vmm panicked: {stderr}");
    output
}

/// The JSON report on stdout (the last line).
pub fn report(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no JSON report; stderr: {}", String::from_utf8_lossy(&output.stderr)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

/// Runs `vmm run --json ARGS` and returns (exit status, report).
pub fn run_json(args: &[&str]) -> (i32, Value) {
    let output = output(vmm().arg("run").arg("--json").args(args));
    (output.status.code().expect("exit status"), report(&output))
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("vmm-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An eventfd that child processes inherit (no CLOEXEC).
pub fn inheritable_eventfd() -> OwnedFd {
    // SAFETY: eventfd creates a new descriptor that we own.
    let fd = unsafe { libc::eventfd(0, 0) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A pipe, both ends close-on-exec (a child gets one through `Stdio`):
/// (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a two-element array.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(made, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Waits up to `timeout_ms` for the eventfd to be signalled; returns its
/// counter, or None on timeout (a hang guard, not a timing assertion).
pub fn wait_eventfd(fd: &OwnedFd, timeout_ms: i32) -> Option<u64> {
    let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
    if ready != 1 {
        return None;
    }
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into `value`.
    let n = unsafe { libc::read(fd.as_raw_fd(), &mut value as *mut u64 as *mut libc::c_void, 8) };
    (n == 8).then_some(value)
}

/// Signals an eventfd.
pub fn signal_eventfd(fd: &OwnedFd) {
    let value = 1u64;
    // SAFETY: writes 8 bytes from `value`.
    let n = unsafe { libc::write(fd.as_raw_fd(), &value as *const u64 as *const libc::c_void, 8) };
    assert_eq!(n, 8, "eventfd write: {}", std::io::Error::last_os_error());
}
