//! Hosted mode (`vmm run --hosted`): the driver as a plain Linux process
//! instead of a driver VM, wired to the same resources: each window's file
//! is passed as a descriptor it maps, doorbells and interrupt lines are the
//! same eventfds (guest-kernel's hosted backend reads its command line).
//! For developing and debugging a driver (gdb, `println!`): nothing is
//! isolated, and the reflector offers it only without its jail.
//!
//! The image is a hosted build of a driver (`cargo build` in `driver-vm`,
//! without `--config isolated.toml`), given by path or inherited
//! descriptor. The vmm stays the supervisor's child: it waits for the
//! driver, ends it when standard input closes (or on `w`), and reports how
//! it ended like a driver VM's outcome.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::config::{DoorbellConfig, VmConfig};
use crate::error::{Error, Result};
use crate::outcome::Outcome;

/// A hosted driver executable.
pub struct HostedImage {
    /// What to execute.
    program: PathBuf,
    /// The image as given, for messages.
    pub name: String,
}

/// Reads `--image` for hosted mode: a path, or `fd=N`. The file must be an
/// x86-64 Linux executable, not an isolated driver VM image.
pub fn resolve(arg: &str) -> Result<HostedImage> {
    let invalid = |reason: String| Error::ImageInvalid { image: arg.into(), reason };
    let is_builtin = crate::image::builtin_names().any(|name| name == arg);
    if is_builtin && std::fs::symlink_metadata(arg).is_err() {
        // Before, "not a built-in image" among the very names it listed.
        return Err(Error::invalid(
            "--image",
            format!(
                "{arg:?} is a built-in image, which runs only in a driver VM: --hosted runs a hosted build of the \
                 driver, given by its path (cargo build --release in driver-vm builds them: \
                 driver-vm/target/release/{arg})"
            ),
        ));
    }
    let bytes = crate::image::read_file(arg)?;
    let program = match arg.strip_prefix("fd=") {
        Some(fd) => PathBuf::from(format!("/proc/self/fd/{fd}")),
        None => PathBuf::from(arg),
    };
    let field = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let (e_type, machine) = (field(16), field(18));
    if !bytes.starts_with(b"\x7fELF")
        || bytes.get(4) != Some(&2)
        || machine != Some(62)
        || !matches!(e_type, Some(2 | 3))
    {
        return Err(invalid("not an x86-64 Linux executable".into()));
    }
    if crate::image::parse_elf(&bytes).is_ok() {
        return Err(invalid(
            "an isolated driver VM image: --hosted runs a hosted build of the driver (cargo build --release in \
             driver-vm, without --config isolated.toml)"
                .into(),
        ));
    }
    Ok(HostedImage { program, name: arg.into() })
}

/// The driver's command line and the descriptors it keeps, for `config`.
fn driver_args(config: &VmConfig) -> Result<(Vec<String>, Vec<File>, Vec<RawFd>)> {
    if let Some(trap) = config.traps.first() {
        return Err(Error::invalid(
            "--hosted",
            format!(
                "window {:?} is trapped (a QEMU device model's registers): hosted drivers reach memory windows only",
                trap.name
            ),
        ));
    }
    let mut args = vec!["--cmdline".to_owned(), config.cmdline.clone(), "--memory".into(), config.memory.to_string()];
    let (mut files, mut kept) = (Vec::new(), Vec::new());
    for window in &config.windows {
        let file = crate::memory::open_window_file(window)?;
        let ro = if window.read_only { ",ro" } else { "" };
        args.push("--window".into());
        args.push(format!(
            "name={},gpa={:#x},size={:#x},offset={:#x},fd={}{ro}",
            window.name,
            window.gpa,
            window.size,
            window.offset,
            file.as_raw_fd()
        ));
        kept.push(file.as_raw_fd());
        files.push(file);
    }
    for DoorbellConfig { fd, .. } in &config.doorbells {
        args.push("--doorbell".into());
        args.push(format!("fd={fd}"));
        kept.push(*fd);
    }
    for irq in &config.irqs {
        args.push("--irq".into());
        args.push(format!("fd={}", irq.fd));
        kept.push(irq.fd);
    }
    if let Some(go) = config.go {
        args.push("--go".into());
        args.push(format!("fd={go}"));
        kept.push(go);
    }
    Ok((args, files, kept))
}

/// How to run a hosted driver.
pub struct HostedOptions {
    /// End (and end the driver) when standard input closes; a `w` on it
    /// ends the driver (outcome `signalled`, 9).
    pub exit_on_stdin_close: bool,
    /// Written when the driver has started.
    pub ready_file: Option<File>,
    /// End the driver after this long (outcome `timeout`).
    pub timeout: Option<std::time::Duration>,
}

/// Checks that `config` can be served hosted (no trapped windows, every
/// window file usable).
pub fn check(config: &VmConfig) -> Result<()> {
    driver_args(config).map(|_| ())
}

/// A hosted standby (`--start-fd`): waits, before the driver process
/// exists, until `start` is written (None: start it). A `w` on standard
/// input (watched with `watch_stdin`) ends the wait with the outcome a
/// hosted driver ended by one has; a closed standard input ends this
/// process, as it would the running driver's. A wait that fails ends it
/// too (an internal error): the driver never starts unasked.
pub fn wait_for_start(start: RawFd, watch_stdin: bool) -> Option<Outcome> {
    let failed = |reason: String| Some(Outcome::InternalError { reason });
    loop {
        let mut fds = [
            libc::pollfd { fd: start, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: if watch_stdin { 0 } else { -1 }, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll on two pollfds we own (a negative fd is ignored).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return failed(format!("waiting for the start signal failed: {error}"));
        }
        match crate::vcpu::take_signal(start, fds[0].revents) {
            Some(Ok(())) => return None,
            Some(Err(error)) => return failed(format!("reading the start signal: {error}")),
            None => {}
        }
        if fds[1].revents != 0 && crate::runner::read_lifeline(fds[1].revents & libc::POLLHUP != 0) {
            return Some(Outcome::Signalled { signal: libc::SIGKILL, name: signal_name(libc::SIGKILL).into() });
        }
    }
}

/// Starts `image` with `config`'s resources and waits for its end.
pub fn run(config: &VmConfig, image: &HostedImage, options: HostedOptions) -> Result<Outcome> {
    let io = |operation: &str| {
        let operation = operation.to_owned();
        move |source| Error::Io { operation, source }
    };
    let (args, _files, kept) = driver_args(config)?;
    let stdout = std::io::stderr().as_raw_fd();
    // SAFETY: F_DUPFD_CLOEXEC on standard error.
    let console = unsafe { libc::fcntl(stdout, libc::F_DUPFD_CLOEXEC, 3) };
    if console < 0 {
        return Err(io("duplicating standard error")(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor this process owns.
    let console = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(console) };
    let mut command = Command::new(&image.program);
    command.args(&args).stdin(Stdio::null()).stdout(Stdio::from(console));
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe system calls (prctl, close_range, fcntl) on a list
    // built before the fork.
    unsafe {
        command.pre_exec(move || {
            // The driver never outlives this vmm (killed with it).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing but its resources crosses the exec.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            for fd in &kept {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(io(&format!("starting the hosted driver {}", image.name)))?;
    if let Some(mut file) = options.ready_file {
        use std::io::Write;
        let _ = file.write_all(&1u64.to_ne_bytes());
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: pidfd_open on our own unreaped child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if pidfd < 0 {
        let error = std::io::Error::last_os_error();
        let _ = child.kill();
        return Err(io("watching the hosted driver (pidfd_open)")(error));
    }
    // SAFETY: a fresh descriptor this process owns.
    let pidfd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
    let deadline = options.timeout.map(|timeout| std::time::Instant::now() + timeout);
    loop {
        let mut fds = vec![libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if options.exit_on_stdin_close {
            fds.push(libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 });
        }
        let wait_ms = match deadline {
            Some(deadline) => deadline.saturating_duration_since(std::time::Instant::now()).as_millis() as i32,
            None => -1,
        };
        // SAFETY: poll(2) on an array this function owns.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if ready == 0 && deadline.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Outcome::Timeout { after_ms: options.timeout.unwrap_or_default().as_millis() as u64 });
        }
        if let Some(stdin) = fds.get(1).filter(|stdin| stdin.revents != 0) {
            // A process has no registers to report from here (a debugger
            // attached to it has them: gdb -p PID): asked where it is, it
            // ends. A supervisor gone ends this vmm, and with it the driver
            // (PR_SET_PDEATHSIG).
            if crate::runner::read_lifeline(stdin.revents & libc::POLLHUP != 0) {
                let _ = child.kill();
            }
        }
        if fds[0].revents != 0 {
            let status = child.wait().map_err(io("waiting for the hosted driver"))?;
            return Ok(match (status.code(), status.signal()) {
                (Some(code), _) => Outcome::Exit { code: code as u32 },
                (None, Some(signal)) => Outcome::Signalled { signal, name: signal_name(signal).into() },
                (None, None) => Outcome::InternalError { reason: format!("the hosted driver ended with {status}") },
            });
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT (a panic, or abort)",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        _ => "another signal",
    }
}
