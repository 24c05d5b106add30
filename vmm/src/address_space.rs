//! Keeps a supervised vmm's address space alive past its end, so that a
//! killed vmm releases its standard output (its supervisor's sign that the
//! guest can no longer run) before the address space is torn down, and the
//! teardown then yields to the recovery.
//!
//! Why: the kernel ends a process's last thread by first tearing down its
//! address space and namespaces (`exit_mm`, then the namespaces: unmapping
//! guest memory, KVM's MMU-notifier release, the RCU grace periods and
//! workqueue flushes they wait for) and only then closing its files. In a
//! kernel trace of SIGKILLed driver VMs under load that took 350-1,050 us
//! of the time between the signal and the end-of-file, all of it stall.
//!
//! How: [`hold`] starts a *holder*, a process that shares this address
//! space (`CLONE_VM`) and, being a plain child, its namespaces, but nothing
//! else: no descriptors but the VM's and the vCPU's (it closes the rest of
//! the copy it got) and no thread group (a signal to the vmm does not reach
//! it). While it lives, the vmm's last
//! thread only drops its references and goes on to close its files. The
//! holder ends when the vmm does (its parent-death signal; also, the vmm is
//! process 1 of its PID namespace in a jail, whose end kills every other
//! process in it), and the teardown happens in the holder's exit, at the
//! lowest priority (nice 19) so that the replacement driver's reset and
//! replay, on the same cores, go first. Measured (`ci/bench-recovery.sh
//! --spare`, 150 kills per run, alternated, four pairs): detection p50
//! 0.82-0.88 to 0.48-0.51 ms and kill to first completion p50 2.06-2.11 to
//! 1.70-1.80 ms; the p99 moved within the noise. At normal priority the
//! whole failover did not improve: the teardown ran during the replay
//! instead.
//!
//! What the holder can do: nothing. It blocks every signal, closes every
//! descriptor but those two, and confines itself with a seccomp filter allowing `read`,
//! `exit` and `exit_group` only, blocked forever in a `read` of a pipe of
//! its own; [`Holder::confined`] tells the vmm when that is done, before any
//! guest code runs. It shares the vmm's memory, so it runs only code that
//! touches no thread-local storage and no allocator: raw system calls, no
//! libc wrappers (which would write `errno` in the thread-local block of the
//! vmm thread that cloned it).
//!
//! Why it keeps the VM's and the vCPU's descriptors (`hold`'s `keep`,
//! which is why it starts once they exist): the VM is then destroyed in
//! its exit too, not in the vmm's last thread after its files close, where
//! KVM's teardown (about 0.25 ms of CPU a kill in `perf`, `kvm_destroy_vm`
//! under the vCPU's release) ran at the vmm's priority beside the
//! recovery. Its filter lets it do nothing with them.
//!
//! What it is not: needed. If it cannot be started or confined, the vmm
//! runs without it and its end is only seen later.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Bytes of the holder's stack: a handful of system calls from one frame.
const STACK_SIZE: usize = 64 * 1024;

/// Set by the holder once its filter is in place (a plain store to shared
/// memory: no thread-local state involved).
static CONFINED: AtomicBool = AtomicBool::new(false);

/// The most descriptors a holder keeps (`hold`'s `keep`).
pub const MAX_KEPT: usize = 4;

/// The descriptors the holder keeps open, ascending, -1 past the last:
/// written before the clone, only read after it.
static KEEP: [AtomicI32; MAX_KEPT] = [const { AtomicI32::new(-1) }; MAX_KEPT];

/// A started holder.
#[derive(Debug)]
pub struct Holder {
    pid: libc::pid_t,
}

impl Holder {
    /// Waits at most `bound` for the holder to have confined itself; if it
    /// has not, kills it (the vmm then goes on without one). Call before any
    /// guest code runs: until confined, the holder could be steered through
    /// the memory it shares.
    pub fn confined(&self, bound: Duration) -> io::Result<()> {
        let deadline = Instant::now() + bound;
        while !CONFINED.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                // SAFETY: kill(2) of our own child, which has not been
                // waited for (its pid cannot have been reused).
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                return Err(io::Error::other("the holder did not confine itself in time; killed"));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
}

/// Starts the holder, which keeps the descriptors `keep` (the VM's and the
/// vCPU's, at most [`MAX_KEPT`]) and closes the others. Call while this
/// process has only one thread (the holder's descriptor table is a copy of
/// this process's, which it closes; one another thread opened meanwhile
/// would be closed all the same, but it would be held open until then) and
/// before any seccomp filter of the vmm's own (they allow no process
/// creation).
pub fn hold(keep: &[RawFd]) -> io::Result<Holder> {
    let mut kept: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd >= 0).collect();
    kept.sort_unstable();
    kept.dedup();
    if kept.len() > MAX_KEPT {
        return Err(io::Error::other(format!("a holder keeps at most {MAX_KEPT} descriptors")));
    }
    for (slot, fd) in KEEP.iter().zip(kept.iter().copied().chain(std::iter::repeat(-1))) {
        slot.store(fd, Ordering::Release);
    }
    // SAFETY: an anonymous private mapping at a kernel-chosen address; no
    // existing memory is affected. It is never unmapped: the holder runs on
    // it for as long as this address space exists.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getpid(2) cannot fail.
    let parent = unsafe { libc::getpid() };
    // The stack grows down from the mapping's end (16-byte aligned: mmap
    // returns page-aligned memory and STACK_SIZE is a multiple of 16).
    let top = (stack as usize + STACK_SIZE) as *mut libc::c_void;
    // SAFETY: clone(2) through glibc's wrapper with CLONE_VM: the child runs
    // `holder` on its own stack (`top`, mapped above and never unmapped) with
    // `parent` as its argument (passed by value in the pointer). The child
    // gets a copy of this process's descriptors, which it closes, and shares
    // memory; `holder` touches no state a thread of this process uses.
    let pid = unsafe { libc::clone(holder, top, libc::CLONE_VM | libc::SIGCHLD, parent as usize as *mut libc::c_void) };
    if pid < 0 {
        let error = io::Error::last_os_error();
        // SAFETY: the mapping made above, unused since the clone failed.
        unsafe { libc::munmap(stack, STACK_SIZE) };
        return Err(error);
    }
    Ok(Holder { pid })
}

/// The holder's life: confine itself, say so, then wait to be killed. Raw
/// system calls only (see the module documentation).
extern "C" fn holder(parent: *mut libc::c_void) -> libc::c_int {
    let parent = parent as usize as i64;
    let all_signals: u64 = !0;
    // Nothing interrupts it: no handler of the vmm's ever runs here.
    syscall(libc::SYS_rt_sigprocmask, [libc::SIG_SETMASK as i64, &all_signals as *const u64 as i64, 0, 8]);
    // It ends with the thread that cloned it (the vmm's main thread, which
    // outlives the others) ...
    syscall(libc::SYS_prctl, [libc::PR_SET_PDEATHSIG as i64, libc::SIGKILL as i64, 0, 0]);
    // ... or at once if the vmm already ended before it could ask.
    if syscall(libc::SYS_getppid, [0; 4]) != parent {
        exit();
    }
    // No descriptor of the vmm's stays open here but the VM's and the
    // vCPU's: its standard output must close when the vmm's own table does.
    let mut first = 0i64;
    for slot in &KEEP {
        let fd = i64::from(slot.load(Ordering::Acquire));
        if fd < 0 {
            break;
        }
        if fd > first {
            syscall(libc::SYS_close_range, [first, fd - 1, 0, 0]);
        }
        first = fd + 1;
    }
    syscall(libc::SYS_close_range, [first, i64::from(u32::MAX), 0, 0]);
    // Its exit (the teardown) waits for the recovery, not the other way.
    syscall(libc::SYS_setpriority, [libc::PRIO_PROCESS as i64, 0, 19, 0]);
    let mut pipe = [0i32; 2];
    if syscall(libc::SYS_pipe2, [pipe.as_mut_ptr() as i64, libc::O_CLOEXEC as i64, 0, 0]) != 0 {
        exit();
    }
    // A filter, not strict mode: a jailed vmm already has a filter, and a
    // process's seccomp mode cannot change from filter to strict.
    let program =
        libc::sock_fprog { len: ONLY_READ_AND_EXIT.len() as u16, filter: ONLY_READ_AND_EXIT.as_ptr().cast_mut() };
    if syscall(libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS as i64, 1, 0, 0]) != 0
        || syscall(libc::SYS_seccomp, [libc::SECCOMP_SET_MODE_FILTER as i64, 0, &program as *const _ as i64, 0]) != 0
    {
        exit();
    }
    CONFINED.store(true, Ordering::Release);
    // Its own pipe, whose write end it holds: the read never returns.
    let mut byte = 0u8;
    loop {
        syscall(libc::SYS_read, [i64::from(pipe[0]), &mut byte as *mut u8 as i64, 1, 0]);
    }
}

/// The holder's seccomp filter: `read`, `exit` and `exit_group` on x86-64;
/// anything else kills it.
const ONLY_READ_AND_EXIT: [libc::sock_filter; 9] = [
    // The architecture (seccomp_data.arch, offset 4).
    bpf_statement(BPF_LD_W_ABS, 4),
    bpf_jump(BPF_JEQ_K, seccomp_index::AUDIT_ARCH_X86_64, 1, 0),
    bpf_statement(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    // The call's number (seccomp_data.nr, offset 0).
    bpf_statement(BPF_LD_W_ABS, 0),
    bpf_jump(BPF_JEQ_K, libc::SYS_read as u32, 3, 0),
    bpf_jump(BPF_JEQ_K, libc::SYS_exit as u32, 2, 0),
    bpf_jump(BPF_JEQ_K, libc::SYS_exit_group as u32, 1, 0),
    bpf_statement(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    bpf_statement(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
];
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const fn bpf_statement(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

const fn bpf_jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Ends the holder (`_exit`, which its filter allows).
fn exit() -> ! {
    loop {
        syscall(libc::SYS_exit, [0; 4]);
    }
}

/// A system call with up to four arguments (the fifth and sixth zero, which
/// `prctl` checks); its raw result, a negative errno on failure. Not libc's
/// `syscall`, which writes `errno`.
fn syscall(number: libc::c_long, [a, b, c, d]: [i64; 4]) -> i64 {
    let result: i64;
    // SAFETY: the x86-64 `syscall` instruction with the kernel's calling
    // convention (number in rax, arguments in rdi, rsi, rdx, r10, r8, r9;
    // rcx and r11 clobbered). Each caller passes arguments valid for its
    // call: numbers, or pointers to locals that outlive it.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") number => result,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            in("r8") 0i64,
            in("r9") 0i64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result
}
