//! The jail every `vmm` starts in. A vmm runs untrusted guest code behind
//! KVM (here a software KVM); assume it is compromised. The reflector (as
//! root) builds the jail between fork and exec, so even a substituted vmm
//! binary starts confined:
//!
//! - **namespaces**: new mount, network, IPC and UTS namespaces. The mount
//!   namespace's root is an empty read-only tmpfs holding only the vmm
//!   binary and the shared libraries its loader needs, bind-mounted
//!   read-only: no /proc, no /dev, no images, no sockets. The network
//!   namespace has only a loopback device, down.
//! - **credentials**: an unprivileged uid and gid of the device's own
//!   (`uid_base + device index`; by default each reflector takes a range
//!   of its own, [`default_uid_base`]), no supplementary groups; every capability
//!   dropped from the bounding set before the switch, so none remain;
//!   no_new_privs.
//! - **limits**: rlimits (64 descriptors, 32 tasks for its uid, no core
//!   dumps; not the file size, which would kill it for logging to a
//!   standard error that is a file), and a cgroup per device with a CPU quota, a
//!   memory limit and a task limit (cgroup v1 controllers or v2).
//! - **descriptors**: exactly its windows, doorbells, interrupt lines and
//!   /dev/kvm (`supervisor::ChildFds`); it opens nothing.
//!
//! - **an outer seccomp filter**, installed before exec so that it binds
//!   whatever binary runs: the calls that widen a process's reach (new
//!   namespaces, mounts, ptrace and cross-process memory access, BPF, perf,
//!   userfaultfd, keyrings, kernel modules, kexec, reboot, swap) fail with
//!   EPERM.
//!
//! The vmm then confines its own threads with seccomp filters once its VM is
//! set up (`vmm run --seccomp`): allow-lists that kill the process. Not used: a PID namespace (the vmm would
//! have to be started by clone(CLONE_NEWPID), not fork): without /proc and
//! with a uid of its own it cannot see, signal or trace other processes.
//!
//! [`Jail::enter`] runs in the forked child and only makes async-signal-safe
//! system calls on data prepared by [`Jail::prepare`] in the parent.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the jail's tmpfs is mounted (in each vmm's own mount namespace;
/// on the host it stays an empty directory).
pub const JAIL_ROOT: &str = "/run/driver-vms/jail";
/// The vmm binary inside the jail.
pub const JAILED_VMM: &str = "/vmm";
/// First uid (and gid) of driver VM jails. Far above any account a
/// distribution creates.
pub const DEFAULT_UID_BASE: u32 = 0x7b00_0000;
/// Ids each reflector may use: at most this many devices.
pub const IDS_PER_REFLECTOR: u32 = 1000;

/// The first id of this reflector's range when none is configured: its own
/// range by its pid, so that the driver VMs of two reflectors never share a
/// uid (processes of one uid may signal each other).
pub fn default_uid_base() -> u32 {
    DEFAULT_UID_BASE + (std::process::id() % 100_000) * IDS_PER_REFLECTOR
}
/// Descriptors a jailed vmm may hold: it is given about 10 and opens about
/// 20 more (KVM objects, eventfd copies, epoll, a timer).
const MAX_FILES: u64 = 64;
/// Tasks (processes and threads) its uid may have: two driver VMs (the
/// current one and a warm spare) of two or three threads each.
const MAX_TASKS: u64 = 32;

/// Resource limits of a device's driver VMs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JailLimits {
    /// CPU share (1.0 = one core) for all driver VMs of the device.
    pub cpu: f64,
    /// Memory limit in bytes for all driver VMs of the device.
    pub memory: u64,
    /// Task limit for the device's cgroup.
    pub tasks: u64,
}

impl Default for JailLimits {
    /// Half a core (an honest driver VM sleeps when idle and a busy one is
    /// bounded by its device; measured below 30 % at full load here), and
    /// 256 MiB for a 16 MiB guest, its windows and the vmm.
    fn default() -> Self {
        JailLimits { cpu: 0.5, memory: 256 << 20, tasks: MAX_TASKS }
    }
}

/// Why a jail cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call or file operation failed.
    #[error("preparing the driver VM jail: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The vmm's dynamic loader could not list its libraries.
    #[error("preparing the driver VM jail: cannot list the libraries of {vmm}: {reason}")]
    Libraries {
        /// The vmm binary.
        vmm: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Io { what, source }
}

/// A bind mount into the jail: host file, path inside (both C strings).
struct Bind {
    source: CString,
    target: CString,
}

/// Everything the child needs to jail itself, prepared in the parent.
pub struct Jail {
    root: CString,
    directories: Vec<CString>,
    binds: Vec<Bind>,
    /// `cgroup.procs` of the device's cgroups, written "0" by the child.
    cgroups: Vec<File>,
    cgroup_dirs: Vec<PathBuf>,
    uid: u32,
    gid: u32,
    /// The device's `/dev/kvm`, handed to each of its vmms.
    kvm: File,
    /// The outer seccomp filters (see the module doc), compiled before fork.
    filters: Vec<seccompiler::BpfProgram>,
}

impl Jail {
    /// Prepares the jail for device number `index` named `name`, whose
    /// driver VMs run `vmm`: the jail directory, the list of files to bind
    /// (the vmm and its libraries), the device's cgroups with `limits`, and
    /// /dev/kvm opened for it.
    pub fn prepare(vmm: &Path, name: &str, index: u32, uid_base: u32, limits: JailLimits) -> Result<Jail, JailError> {
        std::fs::create_dir_all(JAIL_ROOT).map_err(io_error(format!("creating {JAIL_ROOT}")))?;
        let vmm = vmm.canonicalize().map_err(io_error(format!("resolving {}", vmm.display())))?;
        let mut files = vec![(vmm.clone(), PathBuf::from(JAILED_VMM))];
        for library in libraries_of(&vmm)? {
            let source = library.canonicalize().map_err(io_error(format!("resolving {}", library.display())))?;
            files.push((source, library));
        }
        let mut directories = Vec::new();
        let mut binds = Vec::new();
        for (source, target) in files {
            let inside = Path::new(JAIL_ROOT).join(target.strip_prefix("/").unwrap_or(&target));
            for ancestor in inside.ancestors().skip(1) {
                if ancestor == Path::new(JAIL_ROOT) {
                    break;
                }
                let directory = c_path(ancestor)?;
                if !directories.contains(&directory) {
                    directories.push(directory);
                }
            }
            binds.push(Bind { source: c_path(&source)?, target: c_path(&inside)? });
        }
        // Parents before children.
        directories.sort_by_key(|d| d.as_bytes().len());
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(io_error("opening /dev/kvm for the driver VMs"))?;
        let (cgroups, cgroup_dirs) = match cgroups_for(name, limits) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(device = name, %error, "no cgroup limits for this device's driver VMs");
                (Vec::new(), Vec::new())
            }
        };
        if index >= IDS_PER_REFLECTOR {
            return Err(JailError::Io {
                what: format!("device {name}"),
                source: std::io::Error::other(format!("at most {IDS_PER_REFLECTOR} devices can be jailed")),
            });
        }
        let id = uid_base.saturating_add(index);
        let filters = outer_filters()?;
        Ok(Jail {
            root: c_path(Path::new(JAIL_ROOT))?,
            directories,
            binds,
            cgroups,
            cgroup_dirs,
            uid: id,
            gid: id,
            kvm,
            filters,
        })
    }

    /// The program to exec once jailed.
    pub fn program(&self) -> &'static str {
        JAILED_VMM
    }

    /// /dev/kvm, to pass to the child.
    pub fn kvm(&self) -> RawFd {
        self.kvm.as_raw_fd()
    }

    /// In the forked child, before exec: enters the jail. Async-signal-safe
    /// system calls only, on data prepared before the fork.
    pub fn enter(&self) -> std::io::Result<()> {
        for procs in &self.cgroups {
            // Moves this process (0 = the writer) into the device's cgroup.
            // SAFETY: write(2) of a static buffer to a descriptor we hold.
            check(unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } as libc::c_int)?;
        }
        let namespaces = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        // SAFETY: unshare(2) of this single-threaded child.
        check(unsafe { libc::unshare(namespaces) })?;
        // Nothing mounted here may propagate back to the host.
        mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
        mount(
            Some(c"drvm-jail"),
            &self.root,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(c"mode=0755,size=64k"),
        )?;
        // The reflector's umask (077) would make the jail's directories
        // unsearchable for the vmm's uid.
        // SAFETY: umask(2) cannot fail.
        unsafe { libc::umask(0o022) };
        for directory in &self.directories {
            // SAFETY: mkdir(2) with a C string prepared before the fork.
            let made = unsafe { libc::mkdir(directory.as_ptr(), 0o755) };
            if made != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(std::io::Error::last_os_error());
            }
        }
        for bind in &self.binds {
            // SAFETY: open(2) to create the mount point, then close(2).
            let fd =
                unsafe { libc::open(bind.target.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o555) };
            check(fd)?;
            // SAFETY: closing the descriptor just opened.
            unsafe { libc::close(fd) };
            mount(Some(&bind.source), &bind.target, None, libc::MS_BIND, None)?;
            let read_only = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            mount(None, &bind.target, None, read_only, None)?;
        }
        // SAFETY: chdir(2) into the new root, pivot_root(2) onto itself (the
        // old root ends up stacked below and is detached), chdir back to /.
        unsafe {
            check(libc::chdir(self.root.as_ptr()))?;
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
        }
        let sealed =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(None, c"/", None, sealed, None)?;
        for (resource, limit) in
            [(libc::RLIMIT_NOFILE, MAX_FILES), (libc::RLIMIT_NPROC, MAX_TASKS), (libc::RLIMIT_CORE, 0)]
        {
            let limit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            // SAFETY: setrlimit(2) with a local struct.
            check(unsafe { libc::setrlimit(resource, &limit) })?;
        }
        for capability in 0..64 {
            // SAFETY: prctl(2); EINVAL past the last capability is expected.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) };
        }
        // SAFETY: dropping supplementary groups, then gid, then uid: after
        // setresuid from root to another uid the permitted, effective and
        // ambient capability sets are cleared.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        for filter in &self.filters {
            seccompiler::apply_filter(filter).map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // Empty once its driver VMs are gone; a busy one stays (harmless).
        for directory in self.cgroup_dirs.iter().rev() {
            let _ = std::fs::remove_dir(directory);
        }
    }
}

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
    libc::SYS_setns,
];

/// What a vmm may not do besides [`NEVER`]: build namespaces and mounts
/// (the reflector needs these to build jails, so only the jail denies them).
const JAIL_ONLY: &[libc::c_long] =
    &[libc::SYS_unshare, libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root, libc::SYS_chroot];

/// Confines the reflector process (all its threads, and children before
/// their own jail adds more): [`NEVER`] fails with EPERM. Call
/// once at start, before it starts threads.
pub fn confine_reflector() -> Result<(), JailError> {
    let fail = |e: &dyn std::fmt::Display| JailError::Io {
        what: "confining the reflector with seccomp".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let rules = NEVER.iter().map(|call| (*call, Vec::new())).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .map_err(|e| fail(&e))?;
    let program = seccompiler::BpfProgram::try_from(filter).map_err(|e| fail(&e))?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| fail(&e))
}

/// The outer filters: [`NEVER`], [`JAIL_ONLY`] and clone with any namespace flag fail
/// with EPERM; clone3 (whose flags sit in memory a filter cannot read) with
/// ENOSYS, so the C library falls back to clone. Two filters: the kernel
/// runs both and the stricter answer wins.
fn outer_filters() -> Result<Vec<seccompiler::BpfProgram>, JailError> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
    let fail = |e: &dyn std::fmt::Display| JailError::Io {
        what: "building the jail's seccomp filter".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let compile = |rules: std::collections::BTreeMap<i64, Vec<SeccompRule>>, errno: i32| {
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            seccompiler::TargetArch::x86_64,
        )
        .map_err(|e| fail(&e))?;
        seccompiler::BpfProgram::try_from(filter).map_err(|e| fail(&e))
    };
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        NEVER.iter().chain(JAIL_ONLY).map(|call| (*call, Vec::new())).collect();
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
    let clone_rules = namespaces
        .iter()
        .map(|flag| {
            let flag = *flag as u64;
            let set = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)
                .map_err(|e| fail(&e))?;
            SeccompRule::new(vec![set]).map_err(|e| fail(&e))
        })
        .collect::<Result<Vec<_>, JailError>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let clone3 = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    Ok(vec![compile(rules, libc::EPERM)?, compile(clone3, libc::ENOSYS)?])
}

fn check(result: libc::c_int) -> std::io::Result<()> {
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn mount(
    source: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    kind: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
) -> std::io::Result<()> {
    let pointer = |value: Option<&std::ffi::CStr>| value.map_or(std::ptr::null(), |v| v.as_ptr());
    // SAFETY: mount(2) with C strings that outlive the call (or null).
    check(unsafe { libc::mount(pointer(source), target.as_ptr(), pointer(kind), flags, pointer(data).cast()) })
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        what: format!("{}", path.display()),
        source: std::io::Error::other("NUL in path"),
    })
}

/// [`libraries`] of `vmm`, asked of its loader once per binary: every
/// device's jail binds the same files, and starting the loader for each of
/// hundreds of devices would only repeat the answer.
fn libraries_of(vmm: &Path) -> Result<Vec<PathBuf>, JailError> {
    static KNOWN: std::sync::Mutex<Vec<(PathBuf, Vec<PathBuf>)>> = std::sync::Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, found)) = known.iter().find(|(binary, _)| binary == vmm) {
        return Ok(found.clone());
    }
    let found = libraries(vmm)?;
    known.push((vmm.to_owned(), found.clone()));
    Ok(found)
}

/// The shared libraries `vmm` loads, as its dynamic loader resolves them
/// (the loader included); none for a static binary.
fn libraries(vmm: &Path) -> Result<Vec<PathBuf>, JailError> {
    let fail = |reason: String| JailError::Libraries { vmm: vmm.to_owned(), reason };
    let Some(interpreter) = interpreter(vmm).map_err(|e| fail(e.to_string()))? else { return Ok(Vec::new()) };
    let output = std::process::Command::new(&interpreter)
        .arg("--list")
        .arg(vmm)
        .output()
        .map_err(|e| fail(format!("running {}: {e}", interpreter.display())))?;
    if !output.status.success() {
        return Err(fail(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    let mut found = vec![interpreter];
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.trim(),
            None => line.trim(),
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') && !found.iter().any(|f| f == Path::new(path)) {
            found.push(PathBuf::from(path));
        }
    }
    Ok(found)
}

/// The ELF program interpreter (PT_INTERP) of `binary`, if it has one.
fn interpreter(binary: &Path) -> std::io::Result<Option<PathBuf>> {
    let bytes = std::fs::read(binary)?;
    let field = |at: usize, len: usize| -> std::io::Result<u64> {
        let slice = bytes.get(at..at + len).ok_or_else(|| std::io::Error::other("truncated ELF"))?;
        let mut value = [0u8; 8];
        value[..len].copy_from_slice(slice);
        Ok(u64::from_le_bytes(value))
    };
    if bytes.get(0..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
        return Err(std::io::Error::other("not a 64-bit ELF file"));
    }
    let (phoff, phentsize, phnum) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for i in 0..phnum {
        let header = (phoff + i * phentsize) as usize;
        if field(header, 4)? == 3 {
            let (offset, size) = (field(header + 8, 8)? as usize, field(header + 32, 8)? as usize);
            let raw = bytes.get(offset..offset + size).ok_or_else(|| std::io::Error::other("truncated ELF"))?;
            let text = raw.split(|b| *b == 0).next().unwrap_or(raw);
            return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(text))));
        }
    }
    Ok(None)
}

/// Creates the device's cgroups with `limits`; returns their opened
/// `cgroup.procs` and their directories. cgroup v2 if the unified hierarchy
/// has the controllers, else v1's cpu, memory and pids hierarchies.
fn cgroups_for(name: &str, limits: JailLimits) -> Result<(Vec<File>, Vec<PathBuf>), JailError> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(io_error("reading /proc/self/cgroup"))?;
    // The reflector's pid keeps two reflectors' devices apart.
    let leaf = format!("driver-vms-{}-{name}", std::process::id());
    let period: u64 = 100_000;
    let quota = ((limits.cpu * period as f64) as u64).max(1000);
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers");
    let v2 = std::fs::read_to_string(unified).is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
    let mut procs = Vec::new();
    let mut dirs = Vec::new();
    let mut settings: Vec<(PathBuf, Vec<(&str, String)>)> = Vec::new();
    if v2 {
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
        let parent = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory +pids");
        settings.push((
            parent.join(&leaf),
            vec![
                ("cpu.max", format!("{quota} {period}")),
                ("memory.max", limits.memory.to_string()),
                ("pids.max", limits.tasks.to_string()),
            ],
        ));
    } else {
        for (controller, files) in [
            ("cpu", vec![("cpu.cfs_period_us", period.to_string()), ("cpu.cfs_quota_us", quota.to_string())]),
            ("memory", vec![("memory.limit_in_bytes", limits.memory.to_string())]),
            ("pids", vec![("pids.max", limits.tasks.to_string())]),
        ] {
            let path = own
                .lines()
                .filter_map(|l| l.split_once(':').and_then(|(_, rest)| rest.split_once(':')))
                .find(|(controllers, _)| controllers.split(',').any(|c| c == controller))
                .map(|(_, path)| path)
                .unwrap_or("/");
            let parent = Path::new("/sys/fs/cgroup").join(controller).join(path.trim_start_matches('/'));
            settings.push((parent.join(&leaf), files));
        }
    }
    for (dir, files) in settings {
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating cgroup {}", dir.display())))?;
        dirs.push(dir.clone());
        for (file, value) in files {
            let mut handle = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(file))
                .map_err(io_error(format!("opening {}", dir.join(file).display())))?;
            handle.write_all(value.as_bytes()).map_err(io_error(format!("writing {}", dir.join(file).display())))?;
        }
        let procs_file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(io_error(format!("opening {}", dir.join("cgroup.procs").display())))?;
        procs.push(procs_file);
    }
    Ok((procs, dirs))
}

/// Removes the cgroups of reflectors that are gone (killed before they
/// could clean up); cgroups still holding processes stay.
pub fn sweep_stale_cgroups() {
    let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else { return };
    let mut parents = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let relative = path.trim_start_matches('/');
        if controllers.is_empty() {
            parents.push(Path::new("/sys/fs/cgroup").join(relative));
        }
        for controller in controllers.split(',').filter(|c| ["cpu", "memory", "pids"].contains(c)) {
            parents.push(Path::new("/sys/fs/cgroup").join(controller).join(relative));
        }
    }
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("driver-vms-") else { continue };
            let owner = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libraries_of_a_dynamic_binary_are_found() {
        let me = std::env::current_exe().unwrap();
        let libraries = libraries(&me).unwrap();
        assert!(libraries.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libraries:?}");
        assert!(libraries.iter().all(|l| l.is_absolute() && l.exists()), "{libraries:?}");
    }
}
