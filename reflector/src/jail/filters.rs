//! The jail's seccomp filters: the calls no part of the project makes
//! ([`NEVER`], denied to the reflector and every vmm), what only a jailed
//! vmm may not do ([`JAIL_ONLY`]), and io_uring ([`IO_URING`]), which only
//! a QEMU whose drive asks for it may set up. These are deny lists,
//! installed before exec so that they bind whatever binary runs; the vmm
//! adds its own per-thread allow lists once its VM is built
//! (`vmm/src/seccomp.rs`).

use seccomp_index::X32_SYSCALL_BIT;

use super::JailError;

/// System calls neither the reflector nor a vmm makes, and a compromised
/// one would want: tracing and reading other processes, BPF, perf,
/// userfaultfd, keyrings, kernel modules, kexec, reboot, swap, file handles.
const NEVER: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
];

/// io_uring: what a process submits through a ring never passes a
/// seccomp filter, and the subsystem is a large kernel surface of its own.
/// Nothing of the project uses it; QEMU's block layer can (`aio=io_uring`
/// of a `device=nvme` disk, [`IoUring::Allowed`] for that QEMU's jail).
const IO_URING: &[libc::c_long] = &[libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register];

/// Whether a process may use io_uring ([`IO_URING`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoUring {
    /// The io_uring calls fail with EPERM.
    Denied,
    /// The io_uring calls are let through: the reflector's, when one of
    /// its devices' QEMU uses io_uring (its children inherit its filter),
    /// and that QEMU's jail.
    Allowed,
}

impl IoUring {
    fn denied(self) -> &'static [libc::c_long] {
        match self {
            IoUring::Denied => IO_URING,
            IoUring::Allowed => &[],
        }
    }
}

/// Why this kernel refuses io_uring to the reflector (`kernel.io_uring_disabled`,
/// a seccomp profile around it, a kernel without it), if it does: a disk's
/// QEMU asked to use io_uring then falls back to its thread pool.
pub fn io_uring_refused() -> Option<std::io::Error> {
    // struct io_uring_params: 120 bytes, zero but for what the kernel fills in.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) with a writable params buffer of its size.
    let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if ring < 0 {
        return Some(std::io::Error::last_os_error());
    }
    // SAFETY: the ring's descriptor, just made and ours alone.
    unsafe { libc::close(ring as libc::c_int) };
    None
}

/// What a vmm may not do besides [`NEVER`]: build or enter namespaces, and
/// mount (the reflector needs these to build jails, so only the jail denies
/// them; the reflector's own filter lets `setns` enter network namespaces
/// only, [`reflector_filter`]).
const JAIL_ONLY: &[libc::c_long] =
    &[libc::SYS_unshare, libc::SYS_setns, libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root, libc::SYS_chroot];

/// Native AIO, which no jailed process uses (QEMU is run with its thread
/// pool or io_uring): `io_setup` takes contexts from a host-wide limit
/// (`fs.aio-max-nr`, 65,536 events), so one call of a compromised vmm or
/// QEMU left none to the host, a reflector's start included, for as long
/// as it lived (an adversarial review found it).
const NATIVE_AIO: &[libc::c_long] =
    &[libc::SYS_io_setup, libc::SYS_io_submit, libc::SYS_io_getevents, libc::SYS_io_cancel, libc::SYS_io_destroy];

/// What a vmm may not do besides [`JAIL_ONLY`]: change a file's size. Its
/// windows' files are shared with the reflector (the channel, a memory
/// disk's image) and a shrunk one would make the reflector's next touch
/// fault; the vmm never resizes a file. (The memfds are sealed as well,
/// `hardware::shm`, against every holder.) QEMU keeps these: its block
/// layer may resize its disk image.
const VMM_ONLY: &[libc::c_long] = &[libc::SYS_ftruncate, libc::SYS_truncate, libc::SYS_fallocate];

/// Which process a jail's outer filter binds: what it may do besides the
/// rest of the filter differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inmate {
    /// A vmm: ftruncate, truncate and fallocate fail with EPERM
    /// ([`VMM_ONLY`]), and so does every process it would make with an
    /// address space of its own (`fork`, a `clone` without `CLONE_VM`):
    /// its threads and its address-space holder share its memory, and a
    /// forked copy would keep the channel mapped, writing there after the
    /// vmm's own threads had ended (when its supervisor takes the driver
    /// VM for gone, `supervisor::vmm_threads_ended`) until its PID
    /// namespace's end killed it.
    Vmm,
    /// A device model's QEMU: files' sizes change within the jail's
    /// `RLIMIT_FSIZE`, except by a `fallocate` that keeps the size without
    /// punching a hole: it may allocate blocks past a file's end, which no
    /// size limit sees (QEMU's block layer keeps the size only to punch
    /// holes, for discards and zeroed writes). QEMU's own `-sandbox`
    /// denies it new processes.
    DeviceModel,
}

/// Confines the reflector process (all its threads, and children before
/// their own jail adds more): [`NEVER`] fails with EPERM, and so do the
/// io_uring calls unless `io_uring` allows them. Call once at start,
/// before it starts threads.
pub fn confine_reflector(io_uring: IoUring) -> Result<(), JailError> {
    seccompiler::apply_filter_all_threads(&reflector_filter(io_uring)?).map_err(|e| JailError::Io {
        what: "confining the reflector with seccomp".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// The reflector's own filter (see [`confine_reflector`]): its deny list,
/// `setns` into anything but a network namespace (a keeper joins its
/// device's, `Jail::enter`; entering another process's mount, PID or user
/// namespace is what a compromised reflector would want), and x32 calls
/// ([`DenyList`]).
fn reflector_filter(io_uring: IoUring) -> Result<seccompiler::BpfProgram, JailError> {
    reflector_deny_list(io_uring)?.compile("the reflector's")
}

/// The rules of [`reflector_filter`].
fn reflector_deny_list(io_uring: IoUring) -> Result<DenyList, JailError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let fail = |e: &dyn std::fmt::Display| building("the reflector's", e);
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        NEVER.iter().chain(io_uring.denied()).map(|call| (*call, Vec::new())).collect();
    // setns(fd, nstype): denied unless nstype names a network namespace (0,
    // "whatever fd is", is denied too).
    let not_network = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::CLONE_NEWNET as u64)
        .map_err(|e| fail(&e))?;
    rules.insert(libc::SYS_setns, vec![SeccompRule::new(vec![not_network]).map_err(|e| fail(&e))?]);
    Ok(DenyList::new(rules, &[]))
}

/// Why a seccomp filter, `whose`, could not be built.
fn building(whose: &str, error: &dyn std::fmt::Display) -> JailError {
    JailError::Io { what: format!("building {whose} seccomp filter"), source: std::io::Error::other(error.to_string()) }
}

/// A deny list as one program (`seccomp_index`: its calls found by binary
/// search, so that the kernel's emulation of it for each system call
/// number at install is short): the calls `rules` match fail with EPERM,
/// each call of the early answers with its errno, every x32 system call
/// with EPERM, and everything else goes through.
///
/// x32: seccompiler's lists check the audit architecture, which x32
/// shares with x86-64, and match numbers without the x32 bit, so a deny
/// list alone lets `syscall(0x40000000 | nr)` through on a kernel built
/// with x32 (CONFIG_X86_X32_ABI). Nothing here uses x32.
struct DenyList {
    rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    early: Vec<seccomp_index::Early>,
}

impl DenyList {
    /// `rules` denied with EPERM; each call of `answers` with its errno.
    fn new(
        rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
        answers: &[(libc::c_long, i32)],
    ) -> Self {
        use seccomp_index::Early;
        use seccompiler::SeccompAction;
        let eperm = SeccompAction::Errno(libc::EPERM as u32);
        let early = std::iter::once(Early::From(X32_SYSCALL_BIT, eperm))
            .chain(answers.iter().map(|(call, errno)| Early::Call(*call, SeccompAction::Errno(*errno as u32))))
            .collect();
        DenyList { rules, early }
    }

    /// What a call its rules do not match gets, and what one they match.
    fn answers() -> (seccompiler::SeccompAction, seccompiler::SeccompAction) {
        (seccompiler::SeccompAction::Allow, seccompiler::SeccompAction::Errno(libc::EPERM as u32))
    }

    /// The program; `whose` names it in an error.
    fn compile(self, whose: &str) -> Result<seccompiler::BpfProgram, JailError> {
        let (otherwise, matched) = Self::answers();
        seccomp_index::compile(self.rules, otherwise, matched, &self.early).map_err(|e| building(whose, &e))
    }
}

/// The outer filter: [`NEVER`], [`JAIL_ONLY`], the io_uring calls unless
/// `io_uring` allows them, what `inmate` may not do besides ([`Inmate`]), and clone with any namespace flag fail with
/// EPERM; clone3 (whose flags sit in memory a filter cannot read) with
/// ENOSYS, so the C library falls back to clone; and x32 calls fail with
/// EPERM ([`DenyList`]). One program: the kernel prepares each filter it
/// attaches, and a cold restart installed three where one does.
pub(super) fn outer_filter(io_uring: IoUring, inmate: Inmate) -> Result<seccompiler::BpfProgram, JailError> {
    outer_deny_list(io_uring, inmate)?.compile("the jail's")
}

/// The rules of [`outer_filter`].
fn outer_deny_list(io_uring: IoUring, inmate: Inmate) -> Result<DenyList, JailError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let fail = |e: &dyn std::fmt::Display| building("the jail's", e);
    let fixed = match inmate {
        Inmate::Vmm => VMM_ONLY,
        Inmate::DeviceModel => &[],
    };
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = NEVER
        .iter()
        .chain(JAIL_ONLY)
        .chain(NATIVE_AIO)
        .chain(io_uring.denied())
        .chain(fixed)
        .map(|call| (*call, Vec::new()))
        .collect();
    let namespaces = [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ];
    // A rule matches (and so denies) when its flag is set.
    let mut clone_rules = namespaces
        .iter()
        .map(|flag| {
            let flag = *flag as u64;
            let set = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)
                .map_err(|e| fail(&e))?;
            SeccompRule::new(vec![set]).map_err(|e| fail(&e))
        })
        .collect::<Result<Vec<_>, JailError>>()?;
    if inmate == Inmate::Vmm {
        let own_memory =
            SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(libc::CLONE_VM as u64), 0)
                .map_err(|e| fail(&e))?;
        clone_rules.push(SeccompRule::new(vec![own_memory]).map_err(|e| fail(&e))?);
        rules.insert(libc::SYS_fork, Vec::new());
    }
    rules.insert(libc::SYS_clone, clone_rules);
    // socket(domain, ...) and socketpair: denied but for AF_UNIX. A jailed
    // process gets its sockets inherited (a trapped window's, QEMU's qtest
    // socket and cable) and makes none but local ones; its network
    // namespace is empty, but a vsock address family ignores namespaces
    // (it reaches the host's and the hypervisor's vsock services), and the
    // others are kernel surface it has no use for (AF_ALG, AF_KEY, AF_PACKET,
    // netlink...) (an adversarial review found `socket` allowed).
    for call in [libc::SYS_socket, libc::SYS_socketpair] {
        let not_unix = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64)
            .map_err(|e| fail(&e))?;
        rules.insert(call, vec![SeccompRule::new(vec![not_unix]).map_err(|e| fail(&e))?]);
    }
    // prctl(PR_SET_PDEATHSIG, sig) for any signal but SIGKILL: the jail's
    // last step sets SIGKILL, so that a jailed process dies with its
    // keeper, which is all that some of its ends wait for (a `--check` that
    // does not end, a QEMU killed while stuck); cleared, a compromised
    // process outlived them, holding its windows and images (an
    // adversarial review found it). The vmm's address-space holder sets
    // SIGKILL too.
    let pdeathsig = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::PR_SET_PDEATHSIG as u64)
        .map_err(|e| fail(&e))?;
    let not_sigkill = SeccompCondition::new(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Ne, libc::SIGKILL as u64)
        .map_err(|e| fail(&e))?;
    rules.insert(libc::SYS_prctl, vec![SeccompRule::new(vec![pdeathsig, not_sigkill]).map_err(|e| fail(&e))?]);
    // madvise(addr, len, MADV_REMOVE): a hole punched through a shared
    // mapping, as `fallocate` punches one, past the seals: in memory an
    // IOMMU pinned (a VFIO function's bounce slots) the host would get
    // fresh pages and the device keep the old, for every later driver
    // (`SharedMemory::pin`; an adversarial review found it allowed).
    let remove = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::MADV_REMOVE as u64)
        .map_err(|e| fail(&e))?;
    rules.insert(libc::SYS_madvise, vec![SeccompRule::new(vec![remove]).map_err(|e| fail(&e))?]);
    if inmate == Inmate::DeviceModel {
        // fallocate(fd, mode, ...): denied when mode keeps the size and
        // punches no hole.
        let mask = (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) as u64;
        let keeps_size_only = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            libc::FALLOC_FL_KEEP_SIZE as u64,
        )
        .map_err(|e| fail(&e))?;
        rules.insert(libc::SYS_fallocate, vec![SeccompRule::new(vec![keeps_size_only]).map_err(|e| fail(&e))?]);
    }
    Ok(DenyList::new(rules, &[(libc::SYS_clone3, libc::ENOSYS)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `call` in a thread of its own under `filter` (seccompiler's
    /// `apply_filter` binds the calling thread only): the errno it failed
    /// with, or 0.
    fn errno_under(filter: Option<seccompiler::BpfProgram>, call: impl FnOnce() -> i32 + Send + 'static) -> i32 {
        std::thread::spawn(move || {
            if let Some(filter) = &filter {
                seccompiler::apply_filter(filter).expect("installing the filter in the test thread");
            }
            call()
        })
        .join()
        .expect("the test thread")
    }

    /// io_uring_setup(2) for a ring of one entry.
    fn io_uring_setup() -> i32 {
        io_uring_refused().map_or(0, |error| error.raw_os_error().unwrap_or(-1))
    }

    /// getpid(2) by its x32 number.
    fn x32_getpid() -> i32 {
        // SAFETY: getpid(2) through the x32 ABI's number: no argument, no
        // effect; a kernel without x32 answers ENOSYS.
        let pid = unsafe { libc::syscall(libc::c_long::from(X32_SYSCALL_BIT) | libc::SYS_getpid) };
        if pid < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    /// Each real program answers every call tried (seccomp-index's
    /// `verify`: every path through each rule, past 2,000 numbers, six
    /// architectures) as seccompiler's own program of the same rules does.
    #[test]
    fn each_filter_answers_as_seccompilers_own_program_of_its_rules() {
        for (io_uring, inmate) in [(IoUring::Denied, Inmate::Vmm), (IoUring::Allowed, Inmate::DeviceModel)] {
            for (whose, list) in [
                ("jail", outer_deny_list(io_uring, inmate).unwrap()),
                ("reflector", reflector_deny_list(io_uring).unwrap()),
            ] {
                let (otherwise, matched) = DenyList::answers();
                let checked = seccomp_index::verify::against_seccompiler(list.rules, otherwise, matched, &list.early)
                    .unwrap_or_else(|error| panic!("the {whose}'s filter ({io_uring:?}): {error}"));
                assert!(checked.calls > 12_000, "{whose}: {checked:?}");
            }
        }
    }

    #[test]
    fn io_uring_is_denied_unless_a_qemu_of_the_reflectors_uses_it() {
        let reflector = |io_uring| Some(reflector_filter(io_uring).unwrap());
        assert_eq!(errno_under(Some(outer_filter(IoUring::Denied, Inmate::Vmm).unwrap()), io_uring_setup), libc::EPERM);
        assert_eq!(errno_under(reflector(IoUring::Denied), io_uring_setup), libc::EPERM);
        // Allowed: the kernel's own answer, not the filter's EPERM (a kernel
        // with io_uring turned off refuses it unfiltered, so this half needs
        // one that has it).
        let unfiltered = errno_under(None, io_uring_setup);
        if unfiltered == 0 {
            assert_eq!(
                errno_under(Some(outer_filter(IoUring::Allowed, Inmate::DeviceModel).unwrap()), io_uring_setup),
                0
            );
            assert_eq!(errno_under(reflector(IoUring::Allowed), io_uring_setup), 0);
        } else {
            eprintln!("this kernel refuses io_uring_setup unfiltered (errno {unfiltered}): only the denial is checked");
        }
    }

    /// setns(2) into this thread's own network namespace (which changes
    /// nothing) with `nstype`: the errno, or 0.
    fn setns_own_network(nstype: libc::c_int) -> i32 {
        let own = std::fs::File::open("/proc/thread-self/ns/net").expect("this thread's network namespace");
        // SAFETY: setns(2) with a descriptor this function holds; joining
        // the namespace the thread is already in.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&own), nstype) } < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    #[test]
    fn the_reflector_may_enter_network_namespaces_only_and_a_jail_none() {
        let reflector = || Some(reflector_filter(IoUring::Denied).unwrap());
        assert_eq!(errno_under(reflector(), || setns_own_network(libc::CLONE_NEWNET)), 0);
        // "Whatever the descriptor is" and every other kind: denied before
        // the kernel would look at the descriptor.
        for nstype in [0, libc::CLONE_NEWNS, libc::CLONE_NEWUSER, libc::CLONE_NEWPID, libc::CLONE_NEWIPC] {
            assert_eq!(errno_under(reflector(), move || setns_own_network(nstype)), libc::EPERM, "nstype {nstype:#x}");
        }
        for io_uring in [IoUring::Denied, IoUring::Allowed] {
            let jail = Some(outer_filter(io_uring, Inmate::DeviceModel).unwrap());
            assert_eq!(errno_under(jail, || setns_own_network(libc::CLONE_NEWNET)), libc::EPERM);
        }
    }

    /// `resize` (ftruncate or fallocate) on a fresh, empty memfd: the
    /// errno, or 0.
    fn on_a_memfd(resize: fn(libc::c_int) -> libc::c_int) -> i32 {
        // SAFETY: memfd_create(2), then `resize` and close(2) of the
        // descriptor this function makes and owns.
        unsafe {
            let fd = libc::memfd_create(c"size-probe".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            let result = errno_of(resize(fd).into());
            libc::close(fd);
            result
        }
    }

    /// ftruncate(2) of a memfd to its own size (0), which changes nothing.
    fn ftruncate_a_memfd() -> i32 {
        // SAFETY: ftruncate(2) of the probe's own descriptor.
        on_a_memfd(|fd| unsafe { libc::ftruncate(fd, 0) })
    }

    /// fallocate(2) of a memfd's first page (it grows it).
    fn fallocate_a_memfd() -> i32 {
        // SAFETY: fallocate(2) of the probe's own descriptor.
        on_a_memfd(|fd| unsafe { libc::fallocate(fd, 0, 0, 4096) })
    }

    /// fallocate(2) of a memfd's first page keeping its size (0): blocks
    /// past its end.
    fn fallocate_past_the_end_of_a_memfd() -> i32 {
        // SAFETY: fallocate(2) of the probe's own descriptor.
        on_a_memfd(|fd| unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 4096) })
    }

    /// fallocate(2) punching a hole in a memfd's first page (within its
    /// size of 0: nothing to punch), as QEMU's discards do.
    fn punch_a_hole_in_a_memfd() -> i32 {
        // SAFETY: fallocate(2) of the probe's own descriptor.
        on_a_memfd(|fd| unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE, 0, 4096) })
    }

    /// A jailed vmm changes no file's size (its windows' files are the
    /// reflector's too); QEMU's jail lets it resize its disk image (its
    /// file size limit bounds that) and punch holes in it, but not
    /// allocate past a file's end without growing it, which no limit sees.
    #[test]
    fn a_vmm_may_not_change_a_files_size_and_qemu_may() {
        assert_eq!(errno_under(None, ftruncate_a_memfd), 0);
        assert_eq!(errno_under(None, fallocate_a_memfd), 0);
        let vmm = || Some(outer_filter(IoUring::Denied, Inmate::Vmm).unwrap());
        assert_eq!(errno_under(vmm(), ftruncate_a_memfd), libc::EPERM);
        assert_eq!(errno_under(vmm(), fallocate_a_memfd), libc::EPERM);
        let qemu = || Some(outer_filter(IoUring::Denied, Inmate::DeviceModel).unwrap());
        assert_eq!(errno_under(qemu(), ftruncate_a_memfd), 0);
        assert_eq!(errno_under(None, fallocate_past_the_end_of_a_memfd), 0);
        assert_eq!(errno_under(qemu(), fallocate_past_the_end_of_a_memfd), libc::EPERM);
        assert_eq!(errno_under(qemu(), punch_a_hole_in_a_memfd), 0);
        assert_eq!(errno_under(qemu(), fallocate_a_memfd), 0);
    }

    #[test]
    fn x32_calls_are_denied_by_the_jail_and_the_reflector_whatever_the_kernel() {
        // The filters answer before the kernel looks at the number, so
        // this holds on kernels with x32 (where it would run) and without
        // (ENOSYS).
        assert_eq!(errno_under(Some(outer_filter(IoUring::Denied, Inmate::Vmm).unwrap()), x32_getpid), libc::EPERM);
        assert_eq!(
            errno_under(Some(outer_filter(IoUring::Allowed, Inmate::DeviceModel).unwrap()), x32_getpid),
            libc::EPERM
        );
        assert_eq!(errno_under(Some(reflector_filter(IoUring::Allowed).unwrap()), x32_getpid), libc::EPERM);
        assert_ne!(errno_under(None, x32_getpid), libc::EPERM, "unfiltered, the kernel answers for itself");
    }

    /// The errno of a system call's return `value` (-1 and errno), or 0.
    fn errno_of(value: libc::c_long) -> i32 {
        if value < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    /// clone3(2) with no arguments: the kernel refuses it (EINVAL: too
    /// small) before it makes anything.
    fn clone3_without_arguments() -> i32 {
        // SAFETY: clone3(2) with a null argument block of size 0, which the
        // kernel rejects without making a process.
        errno_of(unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) })
    }

    /// clone(2) into a new user namespace, with a flag the kernel refuses
    /// beside it (CLONE_FS: EINVAL), so that it makes nothing if let through.
    fn clone_into_a_new_user_namespace() -> i32 {
        let flags = (libc::CLONE_NEWUSER | libc::CLONE_FS | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: clone(2) with flags the kernel rejects (EINVAL) before
        // making a process; no stack or pointers are passed.
        errno_of(unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) })
    }

    /// clone(2) with flags the kernel refuses (EINVAL), so that it makes
    /// nothing if let through: CLONE_SIGHAND without CLONE_VM (`vm`
    /// false), or CLONE_VM and CLONE_THREAD without CLONE_SIGHAND.
    fn clone_refused_by_the_kernel(vm: bool) -> impl FnOnce() -> i32 + Send + 'static {
        move || {
            let flags = if vm { libc::CLONE_VM | libc::CLONE_THREAD } else { libc::CLONE_SIGHAND | libc::SIGCHLD };
            // SAFETY: clone(2) with flags the kernel rejects (EINVAL:
            // CLONE_SIGHAND needs CLONE_VM, CLONE_THREAD needs
            // CLONE_SIGHAND) before making a process; no stack or pointers.
            errno_of(unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) })
        }
    }

    /// A vmm makes no process with an address space of its own (a forked
    /// copy would keep its channel mapped past its threads' end); threads
    /// and its holder, which share its memory, it makes. QEMU's jail
    /// leaves that to QEMU's own sandbox.
    #[test]
    fn a_vmm_makes_no_process_with_memory_of_its_own() {
        let vmm = || Some(outer_filter(IoUring::Denied, Inmate::Vmm).unwrap());
        let qemu = || Some(outer_filter(IoUring::Denied, Inmate::DeviceModel).unwrap());
        for vm in [false, true] {
            assert_eq!(errno_under(None, clone_refused_by_the_kernel(vm)), libc::EINVAL, "CLONE_VM: {vm}");
            assert_eq!(errno_under(qemu(), clone_refused_by_the_kernel(vm)), libc::EINVAL, "CLONE_VM: {vm}");
        }
        assert_eq!(errno_under(vmm(), clone_refused_by_the_kernel(false)), libc::EPERM);
        assert_eq!(errno_under(vmm(), clone_refused_by_the_kernel(true)), libc::EINVAL, "a thread's clone was denied");
        // SAFETY: fork(2) by number; the filter refuses it before any
        // process is made (were it let through, the child exits at once).
        let fork = || match unsafe { libc::syscall(libc::SYS_fork) } {
            // SAFETY: _exit(2) in a child, touching nothing of the parent's.
            0 => unsafe { libc::_exit(0) },
            pid if pid > 0 => 0,
            _ => std::io::Error::last_os_error().raw_os_error().unwrap_or(-1),
        };
        assert_eq!(errno_under(vmm(), fork), libc::EPERM);
    }

    /// A jailed process keeps the parent-death signal the jail set
    /// (SIGKILL), and takes no native AIO context from the host's limit.
    #[test]
    fn an_inmate_keeps_its_death_signal_and_takes_no_aio_context() {
        let set_death_signal = |signal: libc::c_ulong| {
            move || {
                // SAFETY: prctl(2) PR_SET_PDEATHSIG on the test's own
                // thread, a plain value.
                errno_of(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) } as libc::c_long)
            }
        };
        let io_setup = || {
            let mut context: libc::c_ulong = 0;
            // SAFETY: io_setup(2) into a local context id; a context made
            // is destroyed at once.
            let made = unsafe { libc::syscall(libc::SYS_io_setup, 1u32, &raw mut context) };
            if made == 0 {
                // SAFETY: io_destroy(2) of the context just made.
                unsafe { libc::syscall(libc::SYS_io_destroy, context) };
            }
            errno_of(made)
        };
        for inmate in [Inmate::Vmm, Inmate::DeviceModel] {
            let filter = || Some(outer_filter(IoUring::Denied, inmate).unwrap());
            assert_eq!(errno_under(filter(), set_death_signal(0)), libc::EPERM, "{inmate:?}: cleared");
            assert_eq!(errno_under(filter(), set_death_signal(libc::SIGTERM as _)), libc::EPERM, "{inmate:?}");
            assert_eq!(errno_under(filter(), set_death_signal(libc::SIGKILL as _)), 0, "{inmate:?}: SIGKILL");
            assert_eq!(errno_under(filter(), io_setup), libc::EPERM, "{inmate:?}: io_setup");
        }
        assert_eq!(errno_under(None, set_death_signal(0)), 0);
        assert_eq!(errno_under(None, io_setup), 0);
    }

    #[test]
    fn one_program_gives_each_of_the_jails_answers_and_the_reflector_builds_jails() {
        /// madvise(2) with `advice` over a page of a shared mapping of a
        /// memfd, made here (a jail may not size a file): the errno it
        /// failed with, or 0.
        fn advise_a_shared_memfd(advice: libc::c_int) -> impl FnOnce() -> i32 + Send + 'static {
            let memory = std::sync::Arc::new(crate::shm::SharedMemory::new("advice", 4096).unwrap());
            move || {
                let page = memory.slice(0, 4096).unwrap().ptr_guard_mut().as_ptr();
                // SAFETY: madvise(2) over the page of a mapping this
                // closure holds; MADV_REMOVE and MADV_DONTNEED leave it
                // mapped (reading zeros).
                errno_of(unsafe { libc::madvise(page.cast(), 4096, advice) } as libc::c_long)
            }
        }
        /// socket(2): the errno it failed with, or 0 (the socket closed).
        fn socket(domain: libc::c_int, kind: libc::c_int) -> i32 {
            // SAFETY: socket(2) with plain arguments; the descriptor, if
            // any, is closed at once.
            let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
            }
            // SAFETY: the descriptor just made, ours alone.
            unsafe { libc::close(fd) };
            0
        }
        let jail = || Some(outer_filter(IoUring::Denied, Inmate::Vmm).unwrap());
        let reflector = || Some(reflector_filter(IoUring::Denied).unwrap());
        // Unfiltered, the kernel answers both for itself.
        assert_eq!(errno_under(None, clone3_without_arguments), libc::EINVAL);
        assert_eq!(errno_under(None, clone_into_a_new_user_namespace), libc::EINVAL);
        // The jail: clone3 is not there (the C library falls back to
        // clone), and clone with a namespace flag is not allowed.
        assert_eq!(errno_under(jail(), clone3_without_arguments), libc::ENOSYS);
        assert_eq!(errno_under(jail(), clone_into_a_new_user_namespace), libc::EPERM);
        assert_eq!(errno_under(jail(), x32_getpid), libc::EPERM);
        assert_eq!(errno_under(jail(), io_uring_setup), libc::EPERM);
        assert_eq!(errno_under(jail(), || setns_own_network(libc::CLONE_NEWNET)), libc::EPERM);
        // Sockets: local ones only (a vsock one would reach the host's and
        // the hypervisor's vsock services, whatever its namespace).
        for (domain, kind) in [(libc::AF_VSOCK, libc::SOCK_STREAM), (libc::AF_INET, libc::SOCK_DGRAM)] {
            assert_eq!(errno_under(jail(), move || socket(domain, kind)), libc::EPERM, "domain {domain}");
            assert_ne!(errno_under(None, move || socket(domain, kind)), libc::EPERM, "domain {domain}");
        }
        assert_eq!(errno_under(jail(), || socket(libc::AF_UNIX, libc::SOCK_STREAM)), 0);
        // No hole punched through a shared mapping (a pinned one's pages
        // would part from the device's); other advice passes.
        assert_eq!(errno_under(None, advise_a_shared_memfd(libc::MADV_REMOVE)), 0);
        assert_eq!(errno_under(jail(), advise_a_shared_memfd(libc::MADV_REMOVE)), libc::EPERM);
        assert_eq!(errno_under(jail(), advise_a_shared_memfd(libc::MADV_DONTNEED)), 0);
        // The reflector clones jails: both reach the kernel.
        assert_eq!(errno_under(reflector(), clone3_without_arguments), libc::EINVAL);
        assert_eq!(errno_under(reflector(), clone_into_a_new_user_namespace), libc::EINVAL);
        // What every other call meets: nothing (getpid is let through).
        // SAFETY: getpid(2) has no arguments and no effect.
        assert_eq!(errno_under(jail(), || errno_of(unsafe { libc::syscall(libc::SYS_getpid) })), 0);
    }
}
