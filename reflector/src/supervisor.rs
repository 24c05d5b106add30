//! Driver VM processes: each driver VM is a separate `vmm` child process,
//! wired to its device and channel by windows (shared memory opened by
//! path), doorbells and interrupt lines (eventfds inherited by the child).
//! A watcher thread reaps the child, logs how its guest ended, and signals
//! the device.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::shm::SharedMemory;

/// Serialises spawns: the eventfds a child inherits are made inheritable
/// only for the moment of its spawn, so no other child inherits them.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

/// What to boot.
#[derive(Clone, Debug)]
pub struct DriverVmSpec {
    /// Name (console prefix, logs).
    pub name: String,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// Driver image: built-in name or path.
    pub image: String,
    /// Guest RAM, e.g. "16M".
    pub memory: String,
}

/// A window to map: guest address, memory, name.
pub struct Window<'a> {
    /// Driver guest-physical address.
    pub gpa: u64,
    /// The memory.
    pub memory: &'a SharedMemory,
    /// Name the driver looks up.
    pub name: &'a str,
}

/// A running driver VM process.
pub struct DriverVm {
    name: String,
    pid: libc::pid_t,
    reaped: Arc<AtomicBool>,
}

fn set_inheritable(fd: &EventFd, inheritable: bool) -> std::io::Result<()> {
    let flags = if inheritable { 0 } else { libc::FD_CLOEXEC };
    // SAFETY: F_SETFD on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl DriverVm {
    /// Starts `vmm run` for `spec`. `exited` is signalled when it exits.
    pub fn spawn(
        spec: &DriverVmSpec,
        windows: &[Window],
        doorbells: &[(u64, &EventFd)],
        interrupts: &[&EventFd],
        exited: EventFd,
    ) -> std::io::Result<DriverVm> {
        let mut command = Command::new(&spec.vmm);
        command.args(["run", "--json", "--image", &spec.image, "--name", &spec.name, "--memory", &spec.memory]);
        for window in windows {
            let path = window.memory.path();
            let spec = format!("{:#x},{},{},name={}", window.gpa, window.memory.size(), path.display(), window.name);
            command.arg("--window").arg(spec);
        }
        for (gpa, fd) in doorbells {
            command.arg("--doorbell").arg(format!("mmio={gpa:#x},fd={}", fd.as_raw_fd()));
        }
        for fd in interrupts {
            command.arg("--irq").arg(format!("fd={}", fd.as_raw_fd()));
        }
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let inherited: Vec<&EventFd> = doorbells.iter().map(|(_, fd)| *fd).chain(interrupts.iter().copied()).collect();
        let child = {
            let _guard = SPAWN_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            inherited.iter().try_for_each(|fd| set_inheritable(fd, true))?;
            let child = command.spawn();
            inherited.iter().try_for_each(|fd| set_inheritable(fd, false))?;
            child.map_err(|e| std::io::Error::new(e.kind(), format!("starting {}: {e}", spec.vmm.display())))?
        };
        let pid = child.id() as libc::pid_t;
        let reaped = Arc::new(AtomicBool::new(false));
        tracing::info!(driver_vm = %spec.name, pid, image = %spec.image, "driver VM started");
        let (name, flag) = (spec.name.clone(), reaped.clone());
        std::thread::Builder::new()
            .name(format!("{}-watch", spec.name))
            .spawn(move || watch(child, &name, &flag, &exited))?;
        Ok(DriverVm { name: spec.name.clone(), pid, reaped })
    }

    /// The process id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Kills the process (SIGKILL) if it is still running.
    pub fn kill(&self) {
        if !self.reaped.load(Ordering::Acquire) {
            // SAFETY: kill(2) on our own child, which is not reaped yet, so
            // the pid still names it.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            tracing::info!(driver_vm = %self.name, pid = self.pid, "driver VM killed");
        }
    }
}

fn watch(mut child: Child, name: &str, reaped: &AtomicBool, exited: &EventFd) {
    let mut report = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut report);
    }
    let status = child.wait();
    reaped.store(true, Ordering::Release);
    let report = report.lines().last().unwrap_or("").trim().to_owned();
    match status {
        Ok(status) => tracing::warn!(driver_vm = %name, %status, report = %report, "driver VM exited"),
        Err(error) => tracing::error!(driver_vm = %name, %error, "cannot wait for the driver VM"),
    }
    let _ = exited.write(1);
}

/// The `vmm` binary: `explicit` if given, else the one next to this
/// executable (both are built by `cargo build --release`).
pub fn find_vmm(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(format!("--vmm {}: no such file", path.display()))
        };
    }
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("vmm")));
    match beside {
        Some(path) if path.is_file() => Ok(path),
        _ => Err("cannot find the vmm binary next to the reflector: build both with `cargo build --release`, or pass --vmm PATH".into()),
    }
}
