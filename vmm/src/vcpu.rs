//! The vCPU run loop: the one place that interprets what the guest does when
//! it exits to the vmm (hypercalls, console, faults) and turns it into an
//! [`Outcome`]; what a guest that ends left in its memory (panic message,
//! exception frame, backtrace) is read by [`crate::guest_ending`].
//!
//! Everything read here comes from the guest and is untrusted: lengths are
//! clamped, guest memory reads are bounds-checked by vm-memory, and text is
//! sanitised.
//!
//! Stopping a running vCPU from another thread ([`Kicker`]) uses a signal
//! whose handler sets `immediate_exit` in the vCPU's `kvm_run`, so a kick
//! that lands just before `KVM_RUN` is not lost.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use guest_abi::{self as abi, port};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::console::Console;
use crate::guest_ending;
use crate::outcome::{Outcome, Registers};

/// COM1 line status: transmitter holding register and shift register empty.
const LSR_TX_EMPTY: u8 = 0x60;

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU `kvm_run` mapping, set
        // for exactly as long as the vCPU runs on this thread; a single byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Where to stop running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunUntil {
    /// Return when the guest signals ready (benchmarks, warm spares).
    Ready,
    /// Run until the guest ends.
    End,
}

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest ended.
    Ended(Outcome),
    /// The guest signalled ready and `RunUntil::Ready` was asked.
    Ready,
    /// The stop flag was raised (watchdog or supervisor).
    Stopped,
}

/// A vCPU with what it needs to handle exits.
pub struct Vcpu {
    fd: VcpuFd,
    memory: GuestMemoryMmap,
    console: Console,
    traps: Vec<Trap>,
    /// Guest RAM size: the ring-3 stack and its guard are at its top.
    ram_size: u64,
    /// A warm spare's go signal (`--go-fd`), until used.
    go: Option<EventFd>,
    /// A standby's start signal (`--start-fd`), until used.
    start: Option<EventFd>,
    /// The interrupt lines (`--irq`): each eventfd with the bit it sets in
    /// the answer to `WAIT_LINES`.
    lines: Vec<(EventFd, u32)>,
}

/// What a wait found on a go or start signal's eventfd `fd` (`revents`
/// from its poll): its count consumed, `Some(Ok)`; its descriptor
/// unusable, `Some(Err)`; nothing yet, `None`. Shared by the vCPU's waits
/// and the hosted mode's start wait.
pub(crate) fn take_signal(fd: std::os::fd::RawFd, revents: libc::c_short) -> Option<std::io::Result<()>> {
    if revents & libc::POLLIN != 0 {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local buffer.
        let read = unsafe { libc::read(fd, count.as_mut_ptr().cast(), count.len()) };
        if read == 8 {
            return Some(Ok(()));
        }
        let error = std::io::Error::last_os_error();
        return match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
            _ => Some(Err(error)),
        };
    }
    if revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0 {
        return Some(Err(std::io::Error::other(format!("the signal's descriptor {fd} is not usable"))));
    }
    None
}

/// Blocks the vCPU thread until one of `fds` is ready: true; false once
/// `stop` is set. The kick signal (which a stopper sends after setting
/// `stop`) is blocked while `stop` is looked at and unblocked only inside
/// the wait (`ppoll`), so a kick that lands between the two interrupts the
/// wait instead of being lost before it: no stop request is missed.
fn wait_readable(fds: &mut [libc::pollfd], stop: &AtomicBool) -> std::io::Result<bool> {
    // SAFETY: sigset_t is plain data; sigemptyset and sigaddset initialise
    // and fill it.
    let mut kick: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on a local set.
    unsafe {
        libc::sigemptyset(&mut kick);
        libc::sigaddset(&mut kick, kick_signal());
    }
    // SAFETY: as above; filled by pthread_sigmask.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: changes this thread's mask with valid sets.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &kick, &mut previous) };
    if blocked != 0 {
        return Err(std::io::Error::from_raw_os_error(blocked));
    }
    let mut during = previous;
    // SAFETY: on a local, initialised set.
    unsafe { libc::sigdelset(&mut during, kick_signal()) };
    let result = loop {
        if stop.load(Ordering::Acquire) {
            break Ok(false);
        }
        // SAFETY: ppoll on valid pollfds we own, as many as the slice
        // holds, with this thread's mask minus the kick while it waits.
        let ready = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, std::ptr::null(), &during) };
        if ready > 0 {
            break Ok(true);
        }
        let error = std::io::Error::last_os_error();
        if ready < 0 && error.kind() != std::io::ErrorKind::Interrupted {
            break Err(error);
        }
    };
    // SAFETY: restores this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    result
}

/// What a vCPU waits for besides its interrupt lines.
#[derive(Default)]
pub struct Signals {
    /// A warm spare's go signal (`--go-fd`): the guest's `WAIT_GO` blocks
    /// until it is written.
    pub go: Option<EventFd>,
    /// A standby's start signal (`--start-fd`): the guest's first
    /// instruction waits until it is written.
    pub start: Option<EventFd>,
}

/// A trapped window: its accesses go over a socket to the supervisor
/// (`guest_abi::trap`), which performs them.
pub struct Trap {
    start: u64,
    end: u64,
    socket: std::fs::File,
    name: String,
}

impl Trap {
    /// The window `[gpa, gpa + size)` served over `socket`.
    pub fn new(gpa: u64, size: u64, socket: std::fs::File, name: &str) -> Self {
        Trap { start: gpa, end: gpa.saturating_add(size), socket, name: name.to_owned() }
    }

    fn covers(&self, address: u64, len: usize) -> bool {
        address >= self.start && address.saturating_add(len as u64) <= self.end
    }

    /// Forwards one access; for a read, fills `data` with the answer.
    fn forward(&self, kind: u8, address: u64, data: &mut [u8]) -> std::io::Result<()> {
        use std::io::{Read, Write};
        if !matches!(data.len(), 1 | 2 | 4 | 8) {
            return Err(std::io::Error::other(format!("a {}-byte access", data.len())));
        }
        let mut value = [0u8; 8];
        if kind == abi::trap::WRITE {
            value[..data.len()].copy_from_slice(data);
        }
        let access = abi::trap::Access {
            kind,
            size: data.len() as u8,
            offset: (address - self.start) as u32,
            value: u64::from_le_bytes(value),
        };
        (&self.socket).write_all(&access.encode())?;
        if kind == abi::trap::READ {
            let mut reply = [0u8; abi::trap::REPLY_LEN];
            (&self.socket).read_exact(&mut reply)?;
            let len = data.len();
            data.copy_from_slice(&reply[..len]);
        }
        Ok(())
    }
}

/// An exit copied out of `kvm_run`, so that handling it may use the vCPU.
enum Exit {
    PortWrite(u16, Vec<u8>),
    Handled,
    Ended(Outcome),
}

impl Vcpu {
    /// The descriptors of the files behind guest memory (its windows; RAM
    /// is anonymous): the vmm never `write`s them (`seccomp`).
    pub fn memory_files(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let files = self.memory.iter().filter_map(|region| region.file_offset().map(|f| f.file().as_raw_fd()));
        files.collect()
    }

    /// The vCPU's descriptor (for the address-space holder to keep).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Wraps a configured vCPU.
    pub fn new(
        fd: VcpuFd,
        memory: GuestMemoryMmap,
        console: Console,
        traps: Vec<Trap>,
        ram_size: u64,
        signals: Signals,
        lines: Vec<(EventFd, u32)>,
    ) -> Self {
        let Signals { go, start } = signals;
        Vcpu { fd, memory, console, traps, ram_size, go, start, lines }
    }

    /// The guest's `WAIT_LINES`: blocks until one of its interrupt lines
    /// fires and returns their bits (consuming the eventfds' counts), or 0
    /// when a kick asks the vCPU to stop (or the guest has no line: it
    /// would wait forever).
    fn wait_lines(lines: &[(EventFd, u32)], stop: &AtomicBool) -> u32 {
        // No allocation per sleep: at most MAX_IRQS lines (the config
        // checks), the rest of the array unused.
        let unused = libc::pollfd { fd: -1, events: 0, revents: 0 };
        let mut all = [unused; abi::MAX_IRQS];
        for (slot, (fd, _)) in all.iter_mut().zip(lines) {
            *slot = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        }
        let fds = &mut all[..lines.len().min(abi::MAX_IRQS)];
        while !fds.is_empty() {
            match wait_readable(fds, stop) {
                Ok(true) => {
                    let fired = fds
                        .iter()
                        .zip(lines)
                        .filter(|(fd, (line, _))| fd.revents & libc::POLLIN != 0 && line.read().is_ok())
                        .fold(0, |bits, (_, (_, bit))| bits | bit);
                    if fired != 0 {
                        return fired;
                    }
                }
                Ok(false) => return 0,
                Err(error) => {
                    tracing::warn!(%error, "waiting for the interrupt lines failed; waking the guest");
                    return lines.iter().fold(0, |bits, (_, bit)| bits | bit);
                }
            }
        }
        0
    }

    /// Blocks until `signal` is written (consuming it): true; false when a
    /// kick asks the vCPU to stop. A wait that fails is an error.
    fn wait_for(signal: &EventFd, stop: &AtomicBool) -> std::io::Result<bool> {
        let mut fds = [libc::pollfd { fd: signal.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        loop {
            if !wait_readable(&mut fds, stop)? {
                return Ok(false);
            }
            if let Some(taken) = take_signal(signal.as_raw_fd(), fds[0].revents) {
                return taken.map(|()| true);
            }
        }
    }

    /// The guest's `WAIT_GO`: blocks until the go eventfd is signalled (at
    /// once without one), or until a kick asks the vCPU to stop. Used
    /// once: a later `WAIT_GO` returns at once.
    fn wait_for_go(&mut self, stop: &AtomicBool) {
        if let Some(go) = self.go.take() {
            if let Err(error) = Self::wait_for(&go, stop) {
                tracing::warn!(%error, "waiting for the go signal failed; letting the guest go");
            }
        }
    }

    /// Where the vCPU is (it must not be running): for a supervisor that
    /// asked before killing it.
    pub fn stopped_here(&self) -> Outcome {
        let regs = self.fd.get_regs().unwrap_or_default();
        let ring = self.fd.get_sregs().map(|s| (s.cs.selector & 3) as u8).unwrap_or(0);
        let registers = Box::new(Registers {
            rip: regs.rip,
            rsp: regs.rsp,
            rbp: regs.rbp,
            rflags: regs.rflags,
            rax: regs.rax,
            rbx: regs.rbx,
            rcx: regs.rcx,
            rdx: regs.rdx,
            rsi: regs.rsi,
            rdi: regs.rdi,
            r8: regs.r8,
            r9: regs.r9,
            r10: regs.r10,
            r11: regs.r11,
            r12: regs.r12,
            r13: regs.r13,
            r14: regs.r14,
            r15: regs.r15,
        });
        Outcome::Stopped {
            ring,
            location: None,
            backtrace: guest_ending::backtrace(&self.memory, self.ram_size, regs.rip, regs.rbp),
            registers,
        }
    }

    /// Runs until the guest ends, signals ready (if asked), or `stop` is set.
    /// `on_ready` is called when the guest signals ready.
    pub fn run(&mut self, until: RunUntil, stop: &AtomicBool, on_ready: &mut dyn FnMut()) -> VcpuStop {
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run()));
        let result = self.run_loop(until, stop, on_ready);
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        self.console.flush();
        result
    }

    fn run_loop(&mut self, until: RunUntil, stop: &AtomicBool, on_ready: &mut dyn FnMut()) -> VcpuStop {
        // A standby: built and confined (this thread's filter is in place),
        // it waits here until it is wanted; no guest code has run yet.
        // A failed wait ends the VM: a standby's guest never runs unasked.
        if let Some(start) = self.start.take() {
            tracing::info!("standing by: the guest starts when the start signal is written");
            match Self::wait_for(&start, stop) {
                Ok(true) => {}
                Ok(false) => return VcpuStop::Stopped,
                Err(error) => {
                    let reason = format!("waiting for the start signal failed: {error}");
                    return VcpuStop::Ended(Outcome::InternalError { reason });
                }
            }
        }
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuStop::Stopped;
            }
            match self.next_exit(stop) {
                Exit::Handled => {}
                Exit::Ended(outcome) => return VcpuStop::Ended(outcome),
                Exit::PortWrite(port::READY, _) => {
                    on_ready();
                    if until == RunUntil::Ready {
                        return VcpuStop::Ready;
                    }
                }
                Exit::PortWrite(port::WAIT_GO, _) => self.wait_for_go(stop),
                Exit::PortWrite(port, data) => {
                    if let Some(outcome) = self.port_write(port, &data) {
                        return VcpuStop::Ended(outcome);
                    }
                }
            }
        }
    }

    fn next_exit(&mut self, stop: &AtomicBool) -> Exit {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Exit::Handled;
            }
            Err(error) => return Exit::Ended(Outcome::InternalError { reason: format!("KVM_RUN failed: {error}") }),
        };
        match exit {
            VcpuExit::IoOut(port, data) => Exit::PortWrite(port, data.to_vec()),
            VcpuExit::IoIn(port, data) if (port::CONSOLE_BLOCK.0..=port::CONSOLE_BLOCK.1).contains(&port) => {
                data.fill(0);
                if port == port::CONSOLE_LSR {
                    data[0] = LSR_TX_EMPTY;
                }
                Exit::Handled
            }
            VcpuExit::IoIn(port::WAIT_LINES, data) if data.len() == 4 => {
                data.copy_from_slice(&Self::wait_lines(&self.lines, stop).to_le_bytes());
                Exit::Handled
            }
            VcpuExit::IoIn(port, data) => Exit::Ended(invalid("port_read", port.into(), data.len())),
            VcpuExit::MmioRead(address, data) => match self.traps.iter().find(|t| t.covers(address, data.len())) {
                Some(trap) => trapped(trap, abi::trap::READ, address, data),
                None => Exit::Ended(invalid("mmio_read", address, data.len())),
            },
            VcpuExit::MmioWrite(address, data) => match self.traps.iter().find(|t| t.covers(address, data.len())) {
                Some(trap) => {
                    let mut bytes = [0u8; 8];
                    let len = data.len().min(8);
                    bytes[..len].copy_from_slice(&data[..len]);
                    trapped(trap, abi::trap::WRITE, address, &mut bytes[..data.len().min(8)])
                }
                None => Exit::Ended(invalid("mmio_write", address, data.len())),
            },
            VcpuExit::Hlt => Exit::Ended(Outcome::Halted),
            VcpuExit::Shutdown => Exit::Ended(Outcome::TripleFault),
            VcpuExit::InternalError => Exit::Ended(self.internal_error()),
            VcpuExit::FailEntry(reason, _) => Exit::Ended(Outcome::InternalError {
                reason: format!("KVM could not enter the guest (hardware entry failure reason {reason:#x})"),
            }),
            VcpuExit::Intr => Exit::Handled,
            other => Exit::Ended(Outcome::InternalError { reason: format!("unexpected exit {other:?}") }),
        }
    }

    /// Handles an `out`; returns the outcome if the guest ended.
    fn port_write(&mut self, port: u16, data: &[u8]) -> Option<Outcome> {
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(word);
        match port {
            port::CONSOLE => {
                self.console.write(data);
                None
            }
            port::CONSOLE_LINE => {
                let mut line = vec![0; (value as usize).min(abi::PANIC_BUF_LEN)];
                if self.memory.read_slice(&mut line, GuestAddress(abi::PANIC_BUF_GPA)).is_ok() {
                    self.console.write(&line);
                }
                None
            }
            port::EXIT => Some(Outcome::Exit { code: value }),
            port::PANIC => Some(self.panic(value)),
            port::EXCEPTION => Some(self.exception()),
            _ if (port::CONSOLE_BLOCK.0..=port::CONSOLE_BLOCK.1).contains(&port) => None,
            _ => Some(invalid("port_write", port.into(), data.len())),
        }
    }

    fn panic(&self, length: u32) -> Outcome {
        let regs = self.fd.get_regs().unwrap_or_default();
        guest_ending::panic(&self.memory, self.ram_size, length, regs.rip, regs.rbp)
    }

    /// Reads the frame the exception stub left on the ring-0 stack.
    fn exception(&self) -> Outcome {
        let regs = self.fd.get_regs().unwrap_or_default();
        guest_ending::exception(&self.memory, self.ram_size, regs.rsp, regs.rbp, || {
            self.fd.get_sregs().map(|s| s.cr2).unwrap_or(0)
        })
    }

    fn internal_error(&mut self) -> Outcome {
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, `internal` is the
        // active member of the exit union.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let rip = self.fd.get_regs().map(|regs| regs.rip).unwrap_or(0);
        let kind = match internal.suberror {
            1 => "instruction emulation failed",
            2 => "simultaneous exceptions",
            3 => "delivery event failed",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        Outcome::InternalError { reason: format!("{kind} (suberror {}) at rip {rip:#x}", internal.suberror) }
    }
}

fn invalid(access: &'static str, address: u64, size: usize) -> Outcome {
    Outcome::InvalidAccess { access, address, size }
}

/// Performs a trapped access; a supervisor that stopped answering ends the
/// VM (it is being replaced, or the device behind the window is gone).
fn trapped(trap: &Trap, kind: u8, address: u64, data: &mut [u8]) -> Exit {
    match trap.forward(kind, address, data) {
        Ok(()) => Exit::Handled,
        Err(error) => Exit::Ended(Outcome::InternalError {
            reason: format!(
                "the supervisor of trapped window {:?} did not serve an access at {address:#x}: {error}",
                trap.name
            ),
        }),
    }
}
