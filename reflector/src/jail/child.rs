//! What runs between fork and exec: the keeper, and the process it clones
//! into the jail's namespaces, which confines itself and returns to exec
//! the vmm.
//!
//! Why a keeper: a process cannot move itself into a new PID namespace
//! (unshare(CLONE_NEWPID) affects only its children), and a user
//! namespace's id maps must be written by a process outside it. The forked
//! child therefore clones the vmm-to-be with every namespace flag, writes
//! its id maps, and stays as its parent until it ends.
//!
//! Everything here is async-signal-safe: system calls on data prepared
//! before the fork, numbers formatted into stack buffers, no allocation.

use std::os::fd::{AsRawFd, RawFd};

use super::{mount, Jail, JailIds, MAX_FILES, MAX_TASKS};

/// The namespaces every vmm starts in, new; and a network namespace, new
/// unless its device has one (`Jail::network`).
const NAMESPACES: libc::c_int =
    libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

/// A failed step: its name (written to standard error, since an errno alone
/// would not say which of twenty calls failed) and the error.
fn failed(step: &'static [u8]) -> std::io::Error {
    let error = std::io::Error::last_os_error();
    say(&[b"reflector: driver VM jail: ", step, b" failed\n"]);
    error
}

/// Writes `parts` to standard error (async-signal-safe).
fn say(parts: &[&[u8]]) {
    for part in parts {
        // SAFETY: write(2) of a byte slice to descriptor 2; a failure
        // changes nothing.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
}

/// Runs `call`; on failure, names `step`.
fn step(result: libc::c_int, what: &'static [u8]) -> std::io::Result<()> {
    if result < 0 {
        return Err(failed(what));
    }
    Ok(())
}

/// Moves this process (0 = the writer; single-threaded, so its one thread
/// is all of it) into the cgroup whose `tasks` or `cgroup.procs` is
/// `procs`; the vmm, cloned next, starts there.
fn join(procs: RawFd) -> std::io::Result<()> {
    step(
        // SAFETY: write(2) of a static buffer to a descriptor we hold.
        unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) } as libc::c_int,
        b"joining the cgroup",
    )
}

/// `struct clone_args` of clone3(2), up to `cgroup` (its second version).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3(2)'s flag: the child starts in the cgroup `cgroup` names.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Clones the vmm-to-be into the jail's namespaces and straight into the
/// cgroup v2 directory `cgroup`, as fork(2) would (the child runs on a
/// copy of this single-threaded process): the pid, 0 in the child, or -1.
///
/// Why not join it first as on v1: on v2 a process moves only with its
/// whole thread group (`cgroup.procs`), which takes the kernel's global
/// threadgroup lock for writing and first waits for an RCU grace period
/// (19.6 ms of a 22 ms cold restart, measured through v1's `cgroup.procs`);
/// a child cloned into its cgroup is never moved.
fn clone_into(cgroup: RawFd, namespaces: libc::c_int) -> libc::c_long {
    let args = CloneArgs {
        flags: namespaces as u64 | CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup as u64,
    };
    // SAFETY: clone3(2) with a fully initialised argument block of the
    // size given, no stack (fork semantics, as above) and no pointers the
    // kernel writes through.
    unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, size_of::<CloneArgs>()) }
}

/// A NUL-terminated text built in place (for paths and id maps).
struct Text {
    bytes: [u8; 64],
    len: usize,
}

impl Text {
    fn new() -> Self {
        Text { bytes: [0; 64], len: 0 }
    }

    fn push(&mut self, part: &[u8]) -> &mut Self {
        let room = self.bytes.len() - 1 - self.len;
        let take = part.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&part[..take]);
        self.len += take;
        self
    }

    fn number(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[at..])
    }

    fn text(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Always NUL-terminated: `push` keeps the last byte free.
    fn c_str(&self) -> *const libc::c_char {
        self.bytes.as_ptr().cast()
    }
}

impl Jail {
    /// In the forked child, before exec: builds the jail and returns, in the
    /// process that is to exec the vmm, once it is confined. The forked
    /// child itself becomes the keeper (module doc) and never returns: it
    /// writes the vmm's pid (as seen by the reflector, a native-endian
    /// i32) to `report` and ends as the vmm ends. `memory_slot`: which of
    /// the device's memory cgroups it joins ([`super::Jail::lease`]).
    pub fn enter(&self, report: RawFd, memory_slot: usize) -> std::io::Result<()> {
        let leaf = self.memory_leaves.get(memory_slot);
        // On cgroup v2 the vmm is cloned straight into its memory cgroup
        // (`clone_into`); else this process joins it first.
        let into = leaf.and_then(|leaf| leaf.dir.as_ref()).map(AsRawFd::as_raw_fd);
        let memory = leaf.filter(|_| into.is_none()).map(|leaf| &leaf.join);
        for procs in self.cgroups.iter().chain(memory) {
            join(procs.as_raw_fd())?;
        }
        // SAFETY: geteuid(2) and getegid(2) cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let (uid, gid) = match self.ids {
            JailIds::Device { id } if euid == 0 => (id, id),
            JailIds::Reflector { uid, gid } => (uid, gid),
            // Not root: only our own ids can be mapped.
            JailIds::Device { .. } => (euid, egid),
        };
        let may_set_groups = euid == 0;
        // A keeper started while a reflector that will become `uid` is still
        // root becomes `uid` too, so that the reflector can still kill it.
        let keeper_becomes = matches!(self.ids, JailIds::Reflector { .. } if euid == 0).then_some((uid, gid));
        // The vmm-to-be must be dumpable while the keeper writes its id maps:
        // /proc files of an undumpable process (as every process of a
        // reflector that switched users is) belong to root. It inherits the
        // flag from here; both clear it again at once.
        // SAFETY: prctl(2) with constant arguments.
        step(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) }, b"making the vmm's maps writable")?;
        // The vmm is cloned into its device's network namespace, joined
        // here (the keeper stays in it too, and needs no network), or into
        // a new one.
        let namespaces = match &self.network {
            Some(network) => {
                step(
                    // SAFETY: setns(2) with a descriptor the jail holds.
                    unsafe { libc::setns(network.as_raw_fd(), libc::CLONE_NEWNET) },
                    b"joining the device's network namespace",
                )?;
                NAMESPACES
            }
            None => NAMESPACES | libc::CLONE_NEWNET,
        };
        let mut lifeline = [-1; 2];
        // SAFETY: pipe2(2) into a local array.
        step(unsafe { libc::pipe2(lifeline.as_mut_ptr(), libc::O_CLOEXEC) }, b"creating the keeper's pipe")?;
        let mut pid = match into {
            Some(cgroup) => clone_into(cgroup, namespaces),
            None => -1,
        };
        if pid < 0 {
            // No clone3, or a cgroup this user may not clone into (a
            // reflector that became an unprivileged user: the kernel judges
            // CLONE_INTO_CGROUP by the caller's credentials, a write by the
            // opener's): joining first still works.
            if let (Some(_), Some(leaf)) = (into, leaf) {
                join(leaf.join.as_raw_fd())?;
            }
            // SAFETY: clone(2) without CLONE_VM and with a null stack behaves
            // as fork(2): the child runs on a copy of this single-threaded
            // process.
            pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (namespaces | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
        }
        if pid < 0 {
            return Err(failed(b"cloning into new namespaces"));
        }
        if pid == 0 {
            // SAFETY: closing the keeper's end in this process.
            unsafe { libc::close(lifeline[1]) };
            return self.confine(uid, gid, may_set_groups, lifeline[0]);
        }
        // SAFETY: closing the vmm's end in the keeper; prctl(2) with
        // constant arguments.
        unsafe {
            libc::close(lifeline[0]);
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        }
        let lifeline = lifeline[1];
        keep(pid as libc::pid_t, (uid, gid), may_set_groups, keeper_becomes, report, lifeline, self.reflector)
    }

    /// In the process that becomes the vmm: waits for its id maps, then
    /// confines itself. Returns once the exec may happen.
    fn confine(&self, uid: u32, gid: u32, may_set_groups: bool, lifeline: RawFd) -> std::io::Result<()> {
        let mut byte = 0u8;
        loop {
            // SAFETY: read(2) of one byte into a local.
            let read = unsafe { libc::read(lifeline, (&mut byte as *mut u8).cast(), 1) };
            if read == 1 {
                break;
            }
            if read < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            say(&[b"reflector: driver VM jail: the keeper could not map the user namespace's ids\n"]);
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        // A session and process group of its own: kill(0, ...),
        // setpriority(PRIO_PGRP, 0, ...) and the like name the caller's
        // group whatever its PID namespace, and the reflector's group was
        // the vmm's (and QEMU's): with --user, one kill(0, SIGKILL) ended
        // the reflector and every device (an adversarial review found it).
        // SAFETY: setsid(2); this process, just cloned, leads no group.
        step(unsafe { libc::setsid() }, b"starting a session of its own")?;
        // SAFETY: prctl(2) with constant arguments (the vmm clears it
        // again for itself after its exec).
        step(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }, b"making the process undumpable")?;
        // First become the device's user: what is created in the jail's
        // tmpfs must belong to an id mapped in this namespace. The
        // capabilities this process holds in its own user namespace stay
        // until they are dropped below (root's id is not mapped here, so
        // the switch does not clear them); outside it, it has none.
        // SAFETY: setgroups(2), setresgid(2), setresuid(2) with plain values.
        unsafe {
            if may_set_groups {
                step(libc::setgroups(0, std::ptr::null()), b"dropping supplementary groups")?;
            }
            step(libc::setresgid(gid, gid, gid), b"setting the gid")?;
            step(libc::setresuid(uid, uid, uid), b"setting the uid")?;
        }
        self.build_root()?;
        let file_size = self.file_size_limit.map(|limit| (libc::RLIMIT_FSIZE, limit));
        for (resource, limit) in
            [(libc::RLIMIT_NOFILE, MAX_FILES), (libc::RLIMIT_NPROC, MAX_TASKS), (libc::RLIMIT_CORE, 0)]
                .into_iter()
                .chain(file_size)
        {
            let limit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            // SAFETY: setrlimit(2) with a local struct.
            step(unsafe { libc::setrlimit(resource, &limit) }, b"setting a resource limit")?;
        }
        for capability in 0..64 {
            // SAFETY: prctl(2); EINVAL past the last capability is expected.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) };
        }
        drop_capabilities()?;
        // SAFETY: prctl(2) with constant arguments.
        step(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, b"setting no_new_privs")?;
        seccompiler::apply_filter(&self.filter).map_err(|_| failed(b"installing the seccomp filter"))?;
        // Dies with the keeper. Set last: a change of credentials clears it.
        step(
            // SAFETY: prctl(2) with constant arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
            b"setting the parent-death signal",
        )?;
        // The keeper may have died before that: then its end of the
        // lifeline is closed.
        let mut watch = libc::pollfd { fd: lifeline, events: 0, revents: 0 };
        // SAFETY: poll(2) of one local pollfd, without waiting.
        if unsafe { libc::poll(&mut watch, 1, 0) } != 0 && watch.revents & libc::POLLHUP != 0 {
            say(&[b"reflector: driver VM jail: the keeper ended before the vmm started\n"]);
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    }

    /// Mounts the jail's root (module doc) and moves into it.
    fn build_root(&self) -> std::io::Result<()> {
        let named = |result: std::io::Result<()>, what: &'static [u8]| result.map_err(|_| failed(what));
        // Nothing mounted here may propagate back to the host.
        named(mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None), b"making mounts private")?;
        named(
            mount(
                Some(c"drvm-jail"),
                &self.root,
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"mode=0755,size=64k"),
            ),
            b"mounting the jail's tmpfs",
        )?;
        // The reflector's umask (077) would make the jail's directories
        // unsearchable for the vmm's uid.
        // SAFETY: umask(2) cannot fail.
        unsafe { libc::umask(0o022) };
        for directory in &self.directories {
            // SAFETY: mkdir(2) with a C string prepared before the fork.
            let made = unsafe { libc::mkdir(directory.as_ptr(), 0o755) };
            if made != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(failed(b"creating a directory in the jail"));
            }
        }
        for bind in &self.binds {
            // SAFETY: open(2) to create the mount point, then close(2).
            let fd =
                unsafe { libc::open(bind.target.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o555) };
            step(fd, b"creating a mount point in the jail")?;
            // SAFETY: closing the descriptor just opened.
            unsafe { libc::close(fd) };
            named(mount(Some(&bind.source), &bind.target, None, libc::MS_BIND, None), b"binding a file into the jail")?;
            let read_only = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            named(mount(None, &bind.target, None, read_only, None), b"making a bound file read-only")?;
        }
        if let Some(proc) = &self.proc {
            // Its own PID namespace's processes only (itself), and nothing
            // else of /proc: no /proc/sys, no kernel symbols. Mounted while
            // the host's /proc is still visible, as the kernel requires.
            named(
                mount(
                    Some(c"proc"),
                    proc,
                    Some(c"proc"),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    Some(c"subset=pid,hidepid=invisible"),
                ),
                b"mounting the jail's /proc",
            )?;
        }
        // SAFETY: chdir(2) into the new root, pivot_root(2) onto itself (the
        // old root ends up stacked below and is detached), chdir back to /.
        unsafe {
            step(libc::chdir(self.root.as_ptr()), b"entering the jail's root")?;
            step(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int, b"pivot_root")?;
            step(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), b"detaching the host's root")?;
            step(libc::chdir(c"/".as_ptr()), b"entering /")?;
        }
        let sealed =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        named(mount(None, c"/", None, sealed, None), b"making the jail's root read-only")
    }
}

/// Clears the permitted, effective and inheritable capability sets (the
/// exec would clear them too, since the vmm's uid is not root in its
/// namespace; this makes it so before any of the vmm's code runs).
fn drop_capabilities() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
    let header = Header { version: 0x2008_0522, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capset(2) with a header and two data words that outlive the call.
    step(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as libc::c_int, b"dropping capabilities")
}

/// The keeper: maps the vmm's ids, reports its pid, lets it go on, closes
/// every descriptor but the lifeline, kills the vmm if `reflector` ends
/// first, and ends as the vmm ends.
fn keep(
    vmm: libc::pid_t,
    (uid, gid): (u32, u32),
    may_set_groups: bool,
    becomes: Option<(u32, u32)>,
    report: RawFd,
    lifeline: RawFd,
    reflector: libc::pid_t,
) -> ! {
    let mapped = map_ids(vmm, uid, gid, may_set_groups).and_then(|()| match becomes {
        // SAFETY: setgroups(2), setresgid(2), setresuid(2) with plain values.
        Some((uid, gid)) => unsafe {
            let ok = libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(gid, gid, gid) == 0
                && libc::setresuid(uid, uid, uid) == 0;
            if ok {
                Ok(())
            } else {
                Err(())
            }
        },
        None => Ok(()),
    });
    if mapped.is_ok() {
        let pid = vmm.to_ne_bytes();
        // SAFETY: write(2) of local buffers to descriptors this process holds.
        unsafe {
            libc::write(report, pid.as_ptr().cast(), pid.len());
            libc::write(lifeline, b"1".as_ptr().cast(), 1);
        }
    } else {
        say(&[b"reflector: driver VM jail: writing the user namespace's id maps failed\n"]);
        // The vmm-to-be waits for a byte that will never come: close the
        // lifeline so that it reads end-of-file and fails its start (until
        // then it holds every descriptor the reflector had).
        // SAFETY: close(2) of our end of the lifeline.
        unsafe { libc::close(lifeline) };
    }
    // The vmm's descriptors, standard streams and the reflector's
    // exec-error pipe are the vmm's business: the keeper holds none of them,
    // so the pipes close when the vmm ends. It keeps its lifeline, and the
    // reflector's uid range claim, held until the vmm has ended
    // (`super::uid_range_claim_fd`).
    close_all_but([lifeline, super::uid_range_claim_fd().unwrap_or(-1)]);
    outlive_no_reflector(vmm, reflector);
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) for our own child, into a local.
        let waited = unsafe { libc::waitpid(vmm, &mut status, 0) };
        if waited == vmm {
            break;
        }
        if waited < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit(2) ends this process at once.
            unsafe { libc::_exit(127) };
        }
    }
    end_as(status)
}

/// Closes every descriptor of this process but those in `kept` (-1: none),
/// with close_range(2) over the gaps between them; async-signal-safe.
fn close_all_but<const N: usize>(mut kept: [RawFd; N]) {
    kept.sort_unstable();
    let mut from = 0u32;
    for fd in kept {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd > from {
            // SAFETY: close_range(2) over plain numbers.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = from.max(fd + 1);
    }
    // SAFETY: close_range(2) over plain numbers.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

/// Returns once the vmm has ended, killing it first if the reflector ends
/// before it: the vmm's own watch of its lifeline (`--exit-on-stdin-close`)
/// binds only a vmm that cooperates. Without pidfds (Linux before 5.3),
/// returns at once and the lifeline alone ends the vmm.
fn outlive_no_reflector(vmm: libc::pid_t, reflector: libc::pid_t) {
    // SAFETY: pidfd_open(2) with a plain pid and no flags; a pidfd is
    // close-on-exec, and this process execs nothing.
    let (watched, child) = unsafe {
        (
            libc::syscall(libc::SYS_pidfd_open, reflector, 0) as RawFd,
            libc::syscall(libc::SYS_pidfd_open, vmm, 0) as RawFd,
        )
    };
    // The reflector's pidfd is its own only if it was still our parent
    // once the pidfd was open (a pid is not reused while it has children).
    // SAFETY: getppid(2) cannot fail.
    let reflector_alive = watched >= 0 && unsafe { libc::getppid() } == reflector;
    if watched >= 0 && !reflector_alive {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(vmm, libc::SIGKILL) };
    }
    if reflector_alive && child >= 0 {
        let mut fds = [
            libc::pollfd { fd: watched, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: child, events: libc::POLLIN, revents: 0 },
        ];
        loop {
            // SAFETY: poll(2) on two local pollfds of descriptors we hold.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if ready > 0 && fds[1].revents == 0 && fds[0].revents != 0 {
                // SAFETY: kill(2) of our own child, not yet reaped.
                unsafe { libc::kill(vmm, libc::SIGKILL) };
            }
            break;
        }
    }
    // SAFETY: close(2) of descriptors this function opened (or -1).
    unsafe {
        libc::close(watched);
        libc::close(child);
    }
}

/// Writes the vmm's user namespace maps: `uid` and `gid` map to themselves.
/// An unprivileged keeper must deny setgroups first.
fn map_ids(vmm: libc::pid_t, uid: u32, gid: u32, may_set_groups: bool) -> Result<(), ()> {
    let write_file = |file: &[u8], content: &[u8]| -> Result<(), ()> {
        let mut path = Text::new();
        path.push(b"/proc/").number(vmm as u64).push(b"/").push(file);
        // SAFETY: open(2) of a NUL-terminated stack buffer, write(2) of a
        // slice, close(2) of the descriptor just opened.
        unsafe {
            let fd = libc::open(path.c_str(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(());
            }
            let written = libc::write(fd, content.as_ptr().cast(), content.len());
            libc::close(fd);
            if written != content.len() as isize {
                return Err(());
            }
        }
        Ok(())
    };
    if !may_set_groups {
        write_file(b"setgroups", b"deny")?;
    }
    let mut line = Text::new();
    line.number(u64::from(uid)).push(b" ").number(u64::from(uid)).push(b" 1\n");
    write_file(b"uid_map", line.text())?;
    let mut line = Text::new();
    line.number(u64::from(gid)).push(b" ").number(u64::from(gid)).push(b" 1\n");
    write_file(b"gid_map", line.text())
}

/// Ends the keeper as `status` says the vmm ended: the same exit code, or
/// the same signal (so the reflector logs "signal: 9 (SIGKILL)" for a vmm
/// killed by its memory limit, as it would without a keeper).
fn end_as(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: setrlimit(2), signal(2) and sigprocmask(2) on this
        // process, then kill(2) of itself.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
        }
        // SAFETY: _exit(2) ends this process at once.
        unsafe { libc::_exit(128 + signal) };
    }
    // SAFETY: _exit(2) ends this process at once.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_hold_numbers_and_stay_terminated() {
        let mut text = Text::new();
        text.push(b"/proc/").number(4_194_304).push(b"/uid_map");
        assert_eq!(text.text(), b"/proc/4194304/uid_map");
        let mut line = Text::new();
        line.number(0).push(b" ").number(u64::from(u32::MAX)).push(b" 1\n");
        assert_eq!(line.text(), b"0 4294967295 1\n");
        let mut long = Text::new();
        for _ in 0..100 {
            long.push(b"x");
        }
        assert_eq!(long.text().len(), 63, "one byte stays free for the NUL");
        assert_eq!(long.bytes[63], 0);
    }
}
