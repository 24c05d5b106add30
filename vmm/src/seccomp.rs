//! Seccomp filters for the two threads that run once a VM is set up: the
//! vCPU thread (which runs untrusted guest code through KVM_RUN) and the
//! main thread (which waits for the vCPU, the watchdog and the supervisor's
//! lifeline, then writes the report).
//!
//! Every file, socket and VM object is created before the filters go on,
//! so neither thread may open, create, map executable code from, or
//! otherwise reach anything new. Anything not listed kills the process
//! (SIGSYS): its supervisor sees the exit and replaces the driver VM.
//!
//! How the lists were derived: `strace -f` of driver VMs serving block and
//! net load, killed by their supervisor (stdin closed), and of `vmm run` of
//! the test images ending in every way (exit, panic, page fault, illegal
//! instruction, hang and spin under `--timeout`); the syscalls each thread
//! made after its first KVM_RUN (vCPU) or after starting the vCPU thread
//! (main), plus what the allocator and the standard library's panic path
//! may need (mmap without PROT_EXEC, brk, mprotect, madvise, tgkill for
//! abort); and, for the static production vmm on musl, what its C library
//! makes differently (tkill for pthread_kill, ioctl requests
//! sign-extended), found by running the whole test suite with it. The list
//! is in docs/threat-model.md.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A rule did not compile.
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    /// The filter did not compile.
    #[error("building the seccomp filter: {0}")]
    Index(#[from] seccomp_index::IndexError),
    /// The kernel refused it.
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// `_IOR(KVMIO, nr, size)`: the KVM ioctls the vCPU thread may issue.
const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}

/// KVM_RUN, `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// KVM_GET_REGS (exception reports).
const KVM_GET_REGS: u64 = kvm_ior(0x81, size_of::<kvm_bindings::kvm_regs>());
/// KVM_GET_SREGS (exception reports).
const KVM_GET_SREGS: u64 = kvm_ior(0x83, size_of::<kvm_bindings::kvm_sregs>());
/// KVM_GET_VCPU_EVENTS (exception reports).
const KVM_GET_VCPU_EVENTS: u64 = kvm_ior(0x9f, size_of::<kvm_bindings::kvm_vcpu_events>());

/// Syscalls both threads make: memory, signals, locks, time, ending.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    // musl's pthread_kill and raise (the static production vmm): the same
    // reach as tgkill, only this process's threads in its PID namespace.
    libc::SYS_tkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Only the main thread: its event loop (epoll on the vCPU's done event,
/// the watchdog timer and standard input).
const MAIN_ONLY: &[libc::c_long] =
    &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_epoll_ctl, libc::SYS_timerfd_settime];

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)?)
}

/// An ioctl's request is `request`, compared as the kernel reads it: an
/// `unsigned int`, the register's low 32 bits. musl declares `ioctl`'s
/// request an `int`, so a request with bit 31 set (every `_IOR`, such as
/// KVM_GET_REGS) reaches the kernel sign-extended; a 64-bit comparison
/// killed the static production vmm at its first exception report.
fn ioctl_request(request: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?)
}

/// mmap and mprotect, never with PROT_EXEC: no new code in a running vmm.
fn no_exec(rules: &mut BTreeMap<i64, Vec<SeccompRule>>) -> Result<(), SeccompError> {
    let exec = libc::PROT_EXEC as u64;
    for call in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(call, vec![SeccompRule::new(vec![condition(2, SeccompCmpOp::MaskedEq(exec), 0)?])?]);
    }
    Ok(())
}

/// `write`, to any descriptor but those in `not_to` (the files behind the
/// guest's windows: the vmm never writes them, the guest reaches them
/// through memory; a memory disk's image is a regular file no seal keeps
/// from growing, and a vmm taken over could otherwise `write` past its end).
fn write_rule(rules: &mut BTreeMap<i64, Vec<SeccompRule>>, not_to: &[RawFd]) -> Result<(), SeccompError> {
    let allowed = match not_to {
        [] => Vec::new(),
        fds => {
            let other = |fd: &RawFd| {
                Ok(SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *fd as u32 as u64)?)
            };
            let conditions = fds.iter().map(other).collect::<Result<Vec<_>, SeccompError>>()?;
            vec![SeccompRule::new(conditions)?]
        }
    };
    rules.insert(libc::SYS_write, allowed);
    Ok(())
}

/// An allow list: `rules` let through, anything else kills the process.
/// Indexed (`seccomp_index`): installing a filter makes the kernel run it
/// once for each system call number, and behind seccompiler's chain each
/// unlisted number ran past all 30-odd calls, on every cold restart.
fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SeccompError> {
    let (otherwise, matched) = answers();
    Ok(seccomp_index::compile(rules, otherwise, matched, &[])?)
}

/// What a call the rules do not match gets (the process is killed), and
/// what one they match.
fn answers() -> (SeccompAction, SeccompAction) {
    (SeccompAction::KillProcess, SeccompAction::Allow)
}

/// Only the vCPU thread: a warm spare's wait for its go signal
/// (`port::WAIT_GO`) and the guest's sleep on its interrupt lines
/// (`port::WAIT_LINES`): eventfds polled, then read.
const VCPU_ONLY: &[libc::c_long] = &[libc::SYS_poll, libc::SYS_ppoll];

/// The vCPU thread's filter: KVM_RUN and reading registers for reports,
/// console and eventfd writes (none to `no_writes_to`), a spare's wait and
/// the guest's sleep, and what every thread needs.
pub fn vcpu_filter(no_writes_to: &[RawFd]) -> Result<BpfProgram, SeccompError> {
    compile(vcpu_rules(no_writes_to)?)
}

/// The rules of [`vcpu_filter`].
fn vcpu_rules(no_writes_to: &[RawFd]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().chain(VCPU_ONLY).map(|call| (*call, Vec::new())).collect();
    no_exec(&mut rules)?;
    write_rule(&mut rules, no_writes_to)?;
    let ioctls = [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_VCPU_EVENTS]
        .into_iter()
        .map(|request| Ok(SeccompRule::new(vec![ioctl_request(request)?])?))
        .collect::<Result<Vec<_>, SeccompError>>()?;
    rules.insert(libc::SYS_ioctl, ioctls);
    Ok(rules)
}

/// The main thread's filter: its event loop, writes (none to
/// `no_writes_to`) and what every thread needs; no ioctl at all.
pub fn main_filter(no_writes_to: &[RawFd]) -> Result<BpfProgram, SeccompError> {
    compile(main_rules(no_writes_to)?)
}

/// The rules of [`main_filter`].
fn main_rules(no_writes_to: &[RawFd]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().chain(MAIN_ONLY).map(|call| (*call, Vec::new())).collect();
    no_exec(&mut rules)?;
    write_rule(&mut rules, no_writes_to)?;
    Ok(rules)
}

/// Installs `filter` on the calling thread (with no_new_privs).
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    Ok(seccompiler::apply_filter(filter)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each real program answers every call tried (seccomp-index's
    /// `verify`: every path through each rule, past 2,000 numbers, six
    /// architectures) as seccompiler's own program of the same rules does.
    #[test]
    fn each_filter_answers_as_seccompilers_own_program_of_its_rules() {
        for (whose, rules) in [
            ("vCPU", vcpu_rules(&[]).unwrap()),
            ("main", main_rules(&[]).unwrap()),
            ("vCPU with windows", vcpu_rules(&[5, 6]).unwrap()),
            ("main with windows", main_rules(&[5, 6]).unwrap()),
        ] {
            let (otherwise, matched) = answers();
            let checked = seccomp_index::verify::against_seccompiler(rules, otherwise, matched, &[])
                .unwrap_or_else(|error| panic!("the {whose} thread's filter: {error}"));
            assert!(checked.calls > 12_000, "{whose}: {checked:?}");
        }
    }

    #[test]
    fn the_filters_compile() {
        assert!(!vcpu_filter(&[]).unwrap().is_empty());
        assert!(!main_filter(&[]).unwrap().is_empty());
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
    }

    /// Whether a child `in_child` waited for was killed by its filter.
    fn killed(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    /// Forks a child that installs `filter` and makes `call`; how it ended.
    fn in_child(filter: &BpfProgram, call: impl Fn()) -> libc::c_int {
        // SAFETY: fork; the child only makes system calls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if apply(filter).is_err() {
                // SAFETY: ending the child.
                unsafe { libc::_exit(3) };
            }
            call();
            // SAFETY: ending the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn a_filtered_thread_is_killed_when_it_opens_a_file_or_maps_code() {
        let open = || {
            // SAFETY: openat of "/" with a static C string.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) };
        };
        let map_code = || {
            // SAFETY: an anonymous mapping request; the filter kills first.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        };
        let map_data = || {
            // SAFETY: as above, without PROT_EXEC: allowed.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        };
        for filter in [vcpu_filter(&[]).unwrap(), main_filter(&[]).unwrap()] {
            assert!(killed(in_child(&filter, open)), "openat must kill");
            assert!(killed(in_child(&filter, map_code)), "mmap with PROT_EXEC must kill");
            let fine = in_child(&filter, map_data);
            assert!(libc::WIFEXITED(fine) && libc::WEXITSTATUS(fine) == 0, "status {fine:#x}");
        }
    }
    /// The files behind the guest's windows are never written by the vmm:
    /// a vmm taken over could otherwise grow a memory disk's image (a
    /// regular file, which no seal covers) by writing past its end. Other
    /// writes (standard error, eventfds, a trapped window's socket) pass,
    /// even with the window's number in a register's upper half.
    #[test]
    fn a_filtered_thread_is_killed_when_it_writes_a_window_file() {
        let window = a_memfd();
        let other = a_memfd();
        let (window_fd, other_fd) = (std::os::fd::AsRawFd::as_raw_fd(&window), std::os::fd::AsRawFd::as_raw_fd(&other));
        let write_to = |fd: u64| {
            move || {
                // SAFETY: write(2) of one byte from a static buffer.
                unsafe { libc::syscall(libc::SYS_write, fd, b"x".as_ptr(), 1usize) };
            }
        };
        for filter in [vcpu_filter(&[window_fd]).unwrap(), main_filter(&[window_fd]).unwrap()] {
            assert!(killed(in_child(&filter, write_to(window_fd as u64))), "a write to the window's file must kill");
            let upper = (1u64 << 32) | window_fd as u64;
            assert!(killed(in_child(&filter, write_to(upper))), "the kernel reads only the low half");
            let fine = in_child(&filter, write_to(other_fd as u64));
            assert!(libc::WIFEXITED(fine) && libc::WEXITSTATUS(fine) == 0, "status {fine:#x}");
        }
        // Without windows, every descriptor may be written.
        let fine = in_child(&vcpu_filter(&[]).unwrap(), write_to(window_fd as u64));
        assert!(libc::WIFEXITED(fine) && libc::WEXITSTATUS(fine) == 0, "status {fine:#x}");
    }

    /// A memfd standing in for a window's file.
    fn a_memfd() -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a static C string; the new descriptor
        // is owned by the File.
        unsafe {
            let fd = libc::memfd_create(c"window".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            std::fs::File::from_raw_fd(fd)
        }
    }

    #[test]
    fn the_vcpu_thread_may_read_registers_whether_its_c_library_sign_extends_the_request_or_not() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
        let get_regs = |request: u64| {
            move || {
                let mut regs = kvm_bindings::kvm_regs::default();
                // SAFETY: an ioctl on /dev/null, which answers ENOTTY
                // without touching the buffer; the filter decides first.
                unsafe { libc::syscall(libc::SYS_ioctl, fd, request, &mut regs as *mut kvm_bindings::kvm_regs) };
            }
        };
        let filter = vcpu_filter(&[]).unwrap();
        // glibc passes the request zero-extended, musl (an int) sign-extended.
        for request in [KVM_GET_REGS, KVM_GET_REGS as u32 as i32 as i64 as u64] {
            let status = in_child(&filter, get_regs(request));
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{request:#x}: status {status:#x}");
        }
        // A request the thread may not make still kills, whatever its upper half.
        let status = in_child(&filter, get_regs(0xffff_ffff_0000_ae01));
        assert!(killed(status), "status {status:#x}");
    }

    /// The reflector takes a killed vmm for ended once each of its threads
    /// is past its end (`reflector::supervisor`): that holds only if guest
    /// code that escaped into the vmm cannot make another thread, nor a
    /// process sharing its memory (the channel's bounce slots are mapped
    /// there), that would outlive those threads and write on into a
    /// replay. So once its filters are in, every way to clone kills.
    #[test]
    fn a_filtered_thread_is_killed_when_it_makes_a_thread_or_a_process() {
        let clone = |flags: libc::c_long| {
            move || {
                // SAFETY: a raw clone with a null stack: where the filter
                // let it through, the child runs on a copy of (or, with
                // CLONE_VM, on) this stack until it `_exit`s in `in_child`,
                // and the test fails on the status; it never returns here
                // into Rust code that shares state.
                unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
            }
        };
        let clone3 = || {
            let mut args = [0u64; 11];
            // Its exit_signal.
            args[4] = libc::SIGCHLD as u64;
            // SAFETY: clone3 with a valid, sized argument block; the filter
            // decides before the kernel reads it.
            unsafe { libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), std::mem::size_of_val(&args)) };
        };
        let fork = || {
            // SAFETY: fork; the filter kills first (a child would `_exit`).
            unsafe { libc::fork() };
        };
        let thread = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM;
        for (whose, filter) in [("vCPU", vcpu_filter(&[]).unwrap()), ("main", main_filter(&[]).unwrap())] {
            for (what, status) in [
                ("a process", in_child(&filter, clone(libc::SIGCHLD as libc::c_long))),
                ("a process sharing its memory", in_child(&filter, clone((libc::CLONE_VM | libc::SIGCHLD) as _))),
                ("a thread", in_child(&filter, clone(thread as _))),
                ("anything through clone3", in_child(&filter, clone3)),
                ("a process through fork", in_child(&filter, fork)),
            ] {
                assert!(killed(status), "the {whose} thread's filter let it make {what}: status {status:#x}");
            }
        }
    }
}
