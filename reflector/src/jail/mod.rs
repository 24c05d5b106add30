//! The jail every `vmm` starts in. A vmm runs untrusted guest code behind
//! KVM (here a software KVM); assume it is compromised. The reflector builds
//! the jail between fork and exec, so even a substituted vmm binary starts
//! confined:
//!
//! - **a keeper and namespaces**: the forked child (the *keeper*) joins the
//!   device's cgroup and network namespace (made once per device, shared by
//!   its vmms one after another and by a spare, no other device's:
//!   `device_network`; without root, each vmm gets one of its own) and
//!   clones the process that becomes the vmm into new user, PID, mount, IPC
//!   and UTS namespaces. The vmm is PID 1 of
//!   its own PID namespace: it sees no other process, so it can name none
//!   to signal or trace. The keeper maps the vmm's one id into its user
//!   namespace, closes every descriptor, waits for the vmm and ends as it
//!   ended (same exit code or signal), so the reflector's view of "its
//!   child" is unchanged; if the keeper dies, the vmm is killed
//!   (PR_SET_PDEATHSIG), and if the reflector dies, the keeper kills the
//!   vmm (it watches the reflector through a pidfd): a vmm ends on its
//!   lifeline's end-of-file only if it cooperates, and one its guest took
//!   over would otherwise outlive the reflector, its cgroups with it. See
//!   [`Jail::enter`] (module `child`).
//! - **an empty root**: the mount namespace's root is an empty read-only
//!   tmpfs holding only the vmm binary and the shared libraries its loader
//!   needs, bind-mounted read-only: no /proc, no /dev, no images, no
//!   sockets. The network namespace has only a loopback device, down.
//! - **credentials**: an unprivileged uid and gid of the device's own
//!   (`uid_base + device index`; by default each reflector takes a range of
//!   its own, [`default_uid_base`]), the only id mapped in its user
//!   namespace, no supplementary groups. When the reflector itself runs as
//!   an unprivileged user (`--user`), its vmms run as that user instead
//!   (an unprivileged process can map only its own id), each still in
//!   namespaces of its own. Every capability is dropped from the bounding,
//!   permitted and effective sets; no_new_privs.
//! - **limits**: rlimits (64 descriptors, 32 tasks for its uid, no core
//!   dumps; not the file size, which would kill it for logging to a
//!   standard error that is a file), and a cgroup per device with a CPU
//!   quota, a memory limit and a task limit (cgroup v1 controllers or v2).
//! - **descriptors**: exactly its windows, doorbells, interrupt lines and
//!   /dev/kvm (`supervisor::ChildFds`); it opens nothing.
//! - **an outer seccomp filter** ([`filters`]), installed before exec so
//!   that it binds whatever binary runs: the calls that widen a process's
//!   reach (new namespaces, mounts, ptrace and cross-process memory access,
//!   BPF, perf, userfaultfd, keyrings, kernel modules, kexec, reboot, swap,
//!   and for a vmm any process with memory of its own: `fork`, a `clone`
//!   without `CLONE_VM`) fail with EPERM, and so does io_uring, whose submissions no filter
//!   sees (a device model's QEMU may use it when its drive asks to), and
//!   every x32 system call (which a deny list of x86-64 numbers misses).
//!
//! The vmm then confines its own threads with seccomp allow-lists once its
//! VM is set up (`vmm run --seccomp`).
//!
//! [`Jail::enter`] runs in the forked child and only makes async-signal-safe
//! system calls on data prepared by [`Jail::prepare`] in the parent.

mod cgroups;
mod child;
mod filters;
mod libraries;

pub use cgroups::{prepare_cgroups, OWN_LEAF};
pub use filters::{confine_reflector, io_uring_refused, IoUring};
pub use libraries::interpreter;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cgroups::{cgroups_for, Cgroups, MemoryLeaf};
use filters::{outer_filter, Inmate};
use libraries::libraries_of;

/// Where the jail's tmpfs is mounted (in each vmm's own mount namespace;
/// on the host it stays an empty directory).
pub const JAIL_ROOT: &str = "/run/driver-vms/jail";
/// The vmm binary inside the jail.
pub const JAILED_VMM: &str = "/vmm";
/// A device model's QEMU binary inside its jail.
pub const JAILED_QEMU: &str = "/qemu-system-x86_64";
/// Ids of devices' QEMU processes: this far above the device's own (its
/// driver VMs'), so that the two never share a uid.
pub const DEVICE_MODEL_IDS: u32 = IDS_PER_REFLECTOR / 2;
/// First uid (and gid) of driver VM jails. Far above any account a
/// distribution creates.
pub const DEFAULT_UID_BASE: u32 = 0x7b00_0000;
/// Ids each reflector may use: at most this many devices.
pub const IDS_PER_REFLECTOR: u32 = 1000;

/// Ranges of [`IDS_PER_REFLECTOR`] ids a reflector may take by default,
/// from [`DEFAULT_UID_BASE`].
pub const DEFAULT_RANGES: u32 = 100_000;

/// Where reflectors claim their default uid ranges: a directory only root
/// may write, a lock file a range.
pub const UID_RANGE_CLAIMS: &str = "/run/driver-vms-uid-ranges";

/// The first id of this reflector's range when none is configured: a range
/// no other running reflector on this host holds, so that the driver VMs
/// of two reflectors never share a uid (processes of one uid may signal
/// each other). Claimed for the reflector's life (the first call claims,
/// later calls give the same range). Before, the range was the pid modulo
/// 100,000, and on a host whose `pid_max` is 4,194,304 (systemd's) two
/// reflectors whose pids differed by a multiple of 100,000 shared every
/// uid (a review found it).
pub fn default_uid_base() -> Result<u32, JailError> {
    let claimed = CLAIMED.get_or_init(|| {
        UidRangeClaim::first_free(Path::new(UID_RANGE_CLAIMS), DEFAULT_RANGES).map(|claim| (claim.base(), claim))
    });
    match claimed {
        Ok((base, _)) => Ok(*base),
        Err(why) => Err(JailError::Io { what: why.clone(), source: std::io::Error::other("no default uid range") }),
    }
}

/// This reflector's default uid range, once claimed ([`default_uid_base`]).
static CLAIMED: std::sync::OnceLock<Result<(u32, UidRangeClaim), String>> = std::sync::OnceLock::new();

/// The descriptor of this reflector's default uid range claim, if it holds
/// one. Each keeper keeps it open until its vmm or QEMU has ended
/// (`child::keep`): the lock belongs to the open file description, which
/// the kernel lets go of only when its last descriptor closes, so the
/// range stays held while any process of it may still run. Before, it was
/// let go of when the reflector died, while its keepers were still
/// killing their processes, and a new reflector could take the range (and
/// its uids) within those milliseconds (a review found it). Only an atomic
/// load: safe in a forked child.
pub fn uid_range_claim_fd() -> Option<RawFd> {
    CLAIMED.get().and_then(|claimed| claimed.as_ref().ok()).map(|(_, claim)| claim._lock.as_raw_fd())
}

/// A default uid range held by this process: an open-file-description
/// lock on its file in a directory only root (the reflector, which jails
/// only as root) may write, so nobody else can hold one, and the kernel
/// lets go of it when the process ends: a claim is never left stale. A
/// first version claimed abstract Unix socket names, which any local user
/// could bind all of, and no reflector could then start (a review found
/// it). Ranges are taken from 0 up, so the files are as many as reflectors
/// ever ran at once.
pub struct UidRangeClaim {
    range: u32,
    _lock: std::fs::File,
}

impl UidRangeClaim {
    /// Claims range `range` in the claims directory `claims` (a descriptor
    /// of it); None if another holds it.
    pub fn claim(claims: &OwnedFd, range: u32) -> std::io::Result<Option<Self>> {
        let name = CString::new(range.to_string()).map_err(std::io::Error::other)?;
        // SAFETY: openat(2) of a NUL-terminated name in a directory we hold
        // open; never through a symlink.
        let fd = unsafe {
            libc::openat(
                claims.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor this owns from here on.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        Ok(crate::sockets::lock_exclusive(&file)?.then_some(UidRangeClaim { range, _lock: file }))
    }

    /// The first of `ranges` free in the claims directory at `dir` (made,
    /// owner-only, if missing).
    pub fn first_free(dir: &Path, ranges: u32) -> Result<Self, String> {
        let claims = open_claims(dir).map_err(|e| {
            format!(
                "claiming a default uid range in {}: {e}; set jail_uid_base (--jail-uid-base) to a range of \
                 {IDS_PER_REFLECTOR} ids of this reflector's own",
                dir.display()
            )
        })?;
        // A range whose file cannot be locked (something else put there)
        // is passed over, and said if no range is left.
        let mut failed = None;
        for range in 0..ranges {
            match Self::claim(&claims, range) {
                Ok(Some(claim)) => return Ok(claim),
                Ok(None) => {}
                Err(error) => failed = Some(format!(" (uid range {range}: {error})")),
            }
        }
        Err(format!(
            "every one of the {ranges} default uid ranges is held by another reflector on this host{}: set \
             jail_uid_base (--jail-uid-base) to a range of {IDS_PER_REFLECTOR} ids of this reflector's own",
            failed.unwrap_or_default()
        ))
    }

    /// Its first id.
    pub fn base(&self) -> u32 {
        DEFAULT_UID_BASE + self.range * IDS_PER_REFLECTOR
    }
}

/// The claims directory at `dir`, made if missing: it must be a directory
/// of this process's user that no one else may write.
fn open_claims(dir: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => return Err(error),
        _ => {}
    }
    let path = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: open(2) of a NUL-terminated path; a symlink is refused.
    let fd =
        unsafe { libc::open(path.as_ptr(), libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this owns from here on.
    let claims = unsafe { OwnedFd::from_raw_fd(fd) };
    let metadata = std::fs::File::from(claims.try_clone()?).metadata()?;
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me || metadata.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "it is not a directory of uid {me} that only it may write (owner {}, mode {:o})",
            metadata.uid(),
            metadata.mode() & 0o7777
        )));
    }
    Ok(claims)
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
    /// Memory limit in bytes of each driver VM of the device (each has a
    /// memory cgroup of its own).
    pub memory: u64,
    /// Task limit for the device's cgroup.
    pub tasks: u64,
}

impl JailLimits {
    /// A device model's QEMU: a core (it does the device's I/O), 512 MiB
    /// (45 MiB of its own plus the page cache of the image it writes), and
    /// tasks for its threads (an I/O pool bounded at 8).
    pub const DEVICE_MODEL: JailLimits = JailLimits { cpu: 1.0, memory: 512 << 20, tasks: 64 };
}

impl Default for JailLimits {
    /// One core: a driver VM has one vCPU, and a busy one polls its channel
    /// and device (a driver sleeps only after 300 us without work), so under
    /// load it uses a core's worth of time, and half a core throttled it:
    /// the simulated controller's 4k reads went from 6-9k to 12k IOPS at QD1
    /// and from 82-88k to 176-191k at QD32, and the p99.9 latency from about
    /// 50 ms (the rest of each 100 ms period, throttled) to about 1 ms, when
    /// this went from 0.5 to 1.0 (measured with blk-load, jailed, one run
    /// each). The quota still bounds a compromised vmm that runs more than
    /// its vCPU. And 256 MiB for a 16 MiB guest, its windows and the vmm.
    fn default() -> Self {
        JailLimits { cpu: 1.0, memory: 256 << 20, tasks: MAX_TASKS }
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

/// Whose ids a device's vmms run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JailIds {
    /// A uid and gid of the device's own (the reflector is root and may
    /// map any id).
    Device {
        /// uid and gid.
        id: u32,
    },
    /// The unprivileged user the reflector runs as (`--user`): the only id
    /// an unprivileged process may map into a user namespace.
    Reflector {
        /// uid.
        uid: u32,
        /// gid.
        gid: u32,
    },
}

/// What a jail holds.
#[derive(Clone, Copy, Debug)]
pub enum Jailed<'a> {
    /// A driver VM's vmm (this binary): /dev/kvm handed in, no /proc.
    Vmm(&'a Path),
    /// A device model's QEMU (this binary): no /dev/kvm; a /proc of its own
    /// PID namespace with nothing but its own process (`subset=pid`), for
    /// the `/proc/self/fd/N` paths its memory and firmware are named by;
    /// ids and cgroup of its own; io_uring only if its drive uses it.
    DeviceModel {
        /// The binary.
        qemu: &'a Path,
        /// Whether it may set up io_uring (`aio=io_uring`).
        io_uring: IoUring,
        /// The largest a file it writes may grow (`RLIMIT_FSIZE`): its
        /// image's size, or 0 for a model without one.
        largest_file: u64,
    },
}

/// Everything the child needs to jail itself, prepared in the parent.
pub struct Jail {
    /// The program to exec, inside the jail.
    program: &'static str,
    /// Where a /proc of its own is mounted, if it gets one.
    proc: Option<CString>,
    root: CString,
    directories: Vec<CString>,
    binds: Vec<Bind>,
    /// The files through which a process joins the device's CPU and task
    /// cgroups (v1's `tasks`; none on v2), written "0" by the keeper.
    cgroups: Vec<File>,
    /// The memory cgroups, one per driver VM slot ([`MemorySlot`]).
    memory_leaves: Vec<MemoryLeaf>,
    /// Where a driver VM goes when every slot is held.
    overflow: AtomicUsize,
    cgroup_dirs: Vec<PathBuf>,
    /// Each memory cgroup's limit, bytes.
    memory: u64,
    ids: JailIds,
    /// The device's `/dev/kvm`, handed to each of its vmms.
    kvm: Option<File>,
    /// The outer seccomp filter (see the module doc), compiled before fork.
    filter: seccompiler::BpfProgram,
    /// The largest file it may write (`RLIMIT_FSIZE`), if limited: 0 for a
    /// vmm, which writes no regular file (its windows' files are reached
    /// through memory, its standard error is a pipe into the reflector's
    /// `console_relay`), so that one taken over before its own
    /// filters cannot grow a memory disk's image, the one window file no
    /// seal covers. A device model's QEMU writes its image, and no file
    /// past the image's size.
    file_size_limit: Option<libc::rlim_t>,
    /// The reflector's pid: each keeper kills its vmm if this process ends
    /// first (module `child`).
    reflector: libc::pid_t,
    /// The device's network namespace, which each keeper joins before it
    /// clones its vmm ([`device_network`]); None: each vmm gets one of its
    /// own.
    network: Option<OwnedFd>,
}

impl Jail {
    /// Prepares a jail holding `what` for device number `index` named
    /// `name`: the jail directory, the list of files to bind (the program
    /// and its libraries), the device's cgroups with `limits`, and for a
    /// vmm /dev/kvm opened for it. `user`: the unprivileged user the
    /// reflector will run as, if any: what it jails runs as that user.
    pub fn prepare_for(
        what: Jailed<'_>,
        name: &str,
        index: u32,
        uid_base: u32,
        limits: JailLimits,
        user: Option<(u32, u32)>,
    ) -> Result<Jail, JailError> {
        let (program, jailed, cgroup, id_offset) = match what {
            Jailed::Vmm(vmm) => (vmm, JAILED_VMM, name.to_owned(), 0),
            // `.`: no device name has one, so no device's cgroup is another's QEMU's.
            Jailed::DeviceModel { qemu, .. } => (qemu, JAILED_QEMU, format!("{name}.qemu"), DEVICE_MODEL_IDS),
        };
        if index >= DEVICE_MODEL_IDS {
            return Err(JailError::Io {
                what: format!("device {name}"),
                source: std::io::Error::other(format!("at most {DEVICE_MODEL_IDS} devices can be jailed")),
            });
        }
        make_searchable_dir(Path::new(JAIL_ROOT))?;
        let program = resolve_program(program)?;
        let mut files = vec![(program.clone(), PathBuf::from(jailed))];
        for library in libraries_of(&program)? {
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
        let proc = match what {
            Jailed::Vmm(_) => None,
            Jailed::DeviceModel { .. } => {
                let proc = c_path(&Path::new(JAIL_ROOT).join("proc"))?;
                directories.push(proc.clone());
                Some(proc)
            }
        };
        // Parents before children.
        directories.sort_by_key(|d| d.as_bytes().len());
        let kvm = match what {
            Jailed::Vmm(_) => Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .map_err(io_error("opening /dev/kvm for the driver VMs"))?,
            ),
            Jailed::DeviceModel { .. } => None,
        };
        let slots = match what {
            Jailed::Vmm(_) => MEMORY_SLOTS,
            // One QEMU at a time (its supervisor reaps one before the next).
            Jailed::DeviceModel { .. } => 1,
        };
        let ids = match user {
            Some((uid, gid)) => JailIds::Reflector { uid, gid },
            None => JailIds::Device { id: uid_base.saturating_add(id_offset + index) },
        };
        let filter = match what {
            Jailed::Vmm(_) => outer_filter(IoUring::Denied, Inmate::Vmm)?,
            Jailed::DeviceModel { io_uring, .. } => outer_filter(io_uring, Inmate::DeviceModel)?,
        };
        let file_size_limit = match what {
            Jailed::Vmm(_) => Some(0),
            Jailed::DeviceModel { largest_file, .. } => Some(largest_file),
        };
        let root = c_path(Path::new(JAIL_ROOT))?;
        // A keeper can join a namespace the reflector made only while it is
        // root in the host's user namespace: not after `--user`'s switch.
        // SAFETY: geteuid(2) cannot fail.
        let network = match (user, unsafe { libc::geteuid() }) {
            (None, 0) => device_network()
                .inspect_err(|error| {
                    tracing::info!(device = name, %error, "no network namespace for the device: each of its jailed processes makes one of its own (slower restarts)")
                })
                .ok(),
            _ => None,
        };
        // Last: nothing after this fails, so no cgroup is made for a jail
        // that is then not returned (a jail's drop removes its cgroups).
        let cgroups = cgroups_for(&cgroup, limits, slots).unwrap_or_else(|error| {
            tracing::warn!(device = name, %error, "no cgroup limits for this device's jailed processes");
            Cgroups { joins: Vec::new(), memory: Vec::new(), dirs: Vec::new() }
        });
        Ok(Jail {
            program: jailed,
            proc,
            root,
            directories,
            binds,
            overflow: AtomicUsize::new(0),
            cgroups: cgroups.joins,
            memory_leaves: cgroups.memory,
            cgroup_dirs: cgroups.dirs,
            memory: limits.memory,
            ids,
            kvm,
            filter,
            file_size_limit,
            reflector: std::process::id() as libc::pid_t,
            network,
        })
    }

    /// Removes the jail's cgroups once the processes still exiting in
    /// them are gone (waiting at most a few seconds; see
    /// `cgroups::EXIT_BOUND`); again, or after the jail's end, nothing.
    /// Its last holder's drop does it; a reflector that stops while its
    /// devices still hold their jails calls it after killing their driver
    /// VMs.
    pub fn remove_cgroups(&self) {
        cgroups::remove_dirs(&self.cgroup_dirs, cgroups::EXIT_BOUND);
    }

    /// The memory each of its processes may use (with what it starts),
    /// if its memory cgroups are in place (the kernel's OOM killer stops
    /// it beyond).
    pub fn memory_cap(&self) -> Option<u64> {
        (!self.memory_leaves.is_empty()).then_some(self.memory)
    }

    /// A memory cgroup for a driver VM about to start, held until the
    /// returned slot is dropped (once the process is reaped); None without
    /// memory cgroups. When every slot is held (a storm of kills whose
    /// victims are not reaped yet), slots are shared in turn: the cap then
    /// binds the sharers together, and a kill is blamed on each (logged).
    pub fn lease(jail: &Arc<Jail>) -> Option<MemorySlot> {
        if jail.memory_leaves.is_empty() {
            return None;
        }
        let free = jail
            .memory_leaves
            .iter()
            .position(|leaf| leaf.held.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok());
        let (index, held) = match free {
            Some(index) => (index, true),
            None => {
                let index = jail.overflow.fetch_add(1, Ordering::Relaxed) % jail.memory_leaves.len();
                tracing::warn!(slot = index, "every driver VM memory cgroup is held: sharing one");
                (index, false)
            }
        };
        if let Some(leaf) = jail.memory_leaves.get(index) {
            leaf.leases.fetch_add(1, Ordering::AcqRel);
        }
        Some(MemorySlot { jail: jail.clone(), index, held })
    }

    /// How many processes slot `index`'s memory cap has killed so far
    /// (v2's `memory.events`, v1's `memory.oom_control`: `oom_kill N`);
    /// None where the kernel does not count.
    fn oom_kills(&self, index: usize) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        // Either file is a few short lines.
        let mut buffer = [0u8; 512];
        let read = self.memory_leaves.get(index)?.events.as_ref()?.read_at(&mut buffer, 0).ok()?;
        let text = std::str::from_utf8(buffer.get(..read)?).ok()?;
        text.lines().find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
    }

    /// Slot `index`'s CPU-time file (`cpu.stat`), a descriptor of its own,
    /// and its leases so far; None on cgroup v1.
    fn cpu_stat(&self, index: usize) -> Option<(File, u64)> {
        let leaf = self.memory_leaves.get(index)?;
        Some((leaf.cpu.as_ref()?.try_clone().ok()?, leaf.leases.load(Ordering::Acquire)))
    }

    /// Slot `index`'s leases so far.
    fn leases(&self, index: usize) -> u64 {
        self.memory_leaves.get(index).map_or(0, |leaf| leaf.leases.load(Ordering::Acquire))
    }

    /// The program to exec once jailed.
    pub fn program(&self) -> &'static str {
        self.program
    }

    /// /dev/kvm, to pass to a vmm.
    pub fn kvm(&self) -> Option<RawFd> {
        self.kvm.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Whose ids its vmms run with.
    pub fn ids(&self) -> JailIds {
        self.ids
    }
}

/// Memory cgroups per device that runs driver VMs: its current one, its
/// spare, and one ending (a slot is free again once its process is reaped,
/// about 15 ms after a kill). Each costs the fleet's start (a cgroup's
/// creation): 100 devices were all attached after 1.07 and 1.40 s with
/// four, against 0.92 and 0.94 s with one memory cgroup per device; with
/// three, 0.94 and 1.00 s against 1.02 and 0.95 s (alternated runs).
pub const MEMORY_SLOTS: usize = 3;

/// A driver VM's memory cgroup ([`Jail::lease`]): its cap and its OOM count
/// are its own.
pub struct MemorySlot {
    jail: Arc<Jail>,
    index: usize,
    /// Held by this driver VM alone (released on drop).
    held: bool,
}

impl MemorySlot {
    /// Which of the jail's memory cgroups ([`Jail::enter`]).
    pub fn index(&self) -> usize {
        self.index
    }

    /// How many processes its memory cap has killed so far; None where
    /// the kernel does not count.
    pub fn oom_kills(&self) -> Option<u64> {
        self.jail.oom_kills(self.index)
    }

    /// Whether the cap is this driver VM's alone.
    pub fn exclusive(&self) -> bool {
        self.held
    }

    /// Its cgroup's CPU time, to read while its driver VM runs: that
    /// driver VM's, whatever processes it made (a vmm's own CPU time leaves
    /// out a child it clones), for as long as no other driver VM joins the
    /// slot (`read` then fails: a kill storm made the slots shared, and
    /// the newcomer's time is not this one's). None where the slot is
    /// shared from the start or the kernel has no such count (cgroup v1).
    /// Also counted: with `--user`, the keeper, which joins the cgroup
    /// itself (a few system calls); and a previous occupant's last
    /// teardown, in the unjudged first period.
    pub fn cpu_time(&self) -> Option<CgroupCpu> {
        let (file, leases) = self.held.then(|| self.jail.cpu_stat(self.index)).flatten()?;
        Some(CgroupCpu { file, jail: self.jail.clone(), index: self.index, leases })
    }
}

/// A memory cgroup's `cpu.stat`, open, while one driver VM has it alone.
pub struct CgroupCpu {
    file: File,
    jail: Arc<Jail>,
    index: usize,
    /// The slot's leases when its driver VM got it: more since means
    /// another joined.
    leases: u64,
}

impl CgroupCpu {
    /// The CPU time of every process in it so far (`usage_usec`); an
    /// error once another driver VM has joined it (a review found the
    /// first version counted a newcomer's time as the holder's).
    pub fn read(&self) -> std::io::Result<std::time::Duration> {
        use std::os::unix::fs::FileExt;
        if self.jail.leases(self.index) != self.leases {
            return Err(std::io::Error::other("another driver VM shares its memory cgroup now"));
        }
        // A few short lines.
        let mut buffer = [0u8; 1024];
        let read = self.file.read_at(&mut buffer, 0)?;
        let text = std::str::from_utf8(buffer.get(..read).unwrap_or_default()).map_err(std::io::Error::other)?;
        text.lines()
            .find_map(|line| line.strip_prefix("usage_usec ")?.trim().parse().ok())
            .map(std::time::Duration::from_micros)
            .ok_or_else(|| std::io::Error::other("no usage_usec in cpu.stat"))
    }
}

impl Drop for MemorySlot {
    fn drop(&mut self) {
        if self.held {
            if let Some(leaf) = self.jail.memory_leaves.get(self.index) {
                leaf.held.store(false, Ordering::Release);
            }
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // Its driver VMs are killed by now, but may still be exiting.
        self.remove_cgroups();
    }
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

/// Creates `path` and its missing parents, each searchable by everyone:
/// the reflector's umask (077) would leave them closed to a vmm's uid,
/// which must reach the jail's mount point.
fn make_searchable_dir(path: &Path) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).map_err(io_error(format!("creating {}", path.display())))?;
    for directory in path.ancestors().take_while(|a| a.starts_with("/run") && *a != Path::new("/run")) {
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755))
            .map_err(io_error(format!("opening {} to driver VM users", directory.display())))?;
    }
    Ok(())
}

/// A network namespace of its own for one device's jailed processes (only
/// a loopback device, down, which none of them may bring up: the namespace
/// belongs to the host's user namespace, where they have no capability),
/// made once and held by a descriptor, so that each restart joins it
/// (`setns`) instead of making and later destroying one. That was the
/// costliest namespace of a jail by far: a cold restart's stall went from
/// p50 6.4 / p99 8.7-9.1 ms to 5.8 / 7.3 ms without it (200 kills each,
/// alternated twice), and its teardown (the kernel's `cleanup_net`, RCU
/// barriers in a workqueue) ran beside every failover that followed a
/// kill. The device's processes share it, one after another and a spare
/// beside its current one; no other device's do. Made on a thread of its
/// own, since unshare(2) moves only the calling thread.
///
/// Its descriptor sits where no child's placement reaches (the keeper uses
/// it after its moves, `hardware::descriptors::lift`).
fn device_network() -> std::io::Result<OwnedFd> {
    let namespace = std::thread::Builder::new()
        .name("jail-network".into())
        .spawn(|| {
            // SAFETY: unshare(2) of this thread's network namespace; the
            // thread ends once it has opened it.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            File::open("/proc/thread-self/ns/net")
        })?
        .join()
        .map_err(|_| std::io::Error::other("the thread making it panicked"))??;
    hardware::descriptors::lift(namespace.into())
}

/// `program` as an absolute, resolved path (a bare name is looked up in
/// PATH, as `Command` would).
fn resolve_program(program: &Path) -> Result<PathBuf, JailError> {
    let found = if program.components().count() == 1 {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file()))
            .unwrap_or_else(|| program.to_owned())
    } else {
        program.to_owned()
    };
    found.canonicalize().map_err(io_error(format!("resolving {}", program.display())))
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        what: format!("{}", path.display()),
        source: std::io::Error::other("NUL in path"),
    })
}

impl hardware::qemu::ProcessJail for Jail {
    fn program(&self) -> &Path {
        Path::new(self.program)
    }

    fn enter(&self, report: RawFd) -> std::io::Result<()> {
        Jail::enter(self, report, 0)
    }

    fn end(&self) {
        self.remove_cgroups();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A range one reflector holds is not given to another, and is free
    /// again once its holder lets go (before, the pid modulo 100,000 gave
    /// two reflectors the same: a review found it); a claims directory
    /// others may write is refused.
    #[test]
    fn a_uid_range_is_held_by_one_reflector_at_a_time() {
        let dir = std::env::temp_dir().join(format!("uid-ranges-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = UidRangeClaim::first_free(&dir, 4).unwrap();
        assert_eq!(first.base(), DEFAULT_UID_BASE);
        // Another open of the same file is another holder.
        let second = UidRangeClaim::first_free(&dir, 4).unwrap();
        assert_eq!(second.base(), DEFAULT_UID_BASE + IDS_PER_REFLECTOR);
        let claims = open_claims(&dir).unwrap();
        assert!(UidRangeClaim::claim(&claims, 0).unwrap().is_none(), "a held range was given again");
        drop(first);
        assert!(UidRangeClaim::claim(&claims, 0).unwrap().is_some(), "a range let go of stays held");
        let rest: Vec<UidRangeClaim> = (0..3).map(|_| UidRangeClaim::first_free(&dir, 4).unwrap()).collect();
        let step = |n: u32| DEFAULT_UID_BASE + n * IDS_PER_REFLECTOR;
        assert_eq!(rest.iter().map(UidRangeClaim::base).collect::<Vec<_>>(), [step(0), step(2), step(3)]);
        let error = UidRangeClaim::first_free(&dir, 4).err().unwrap();
        assert!(error.contains("every one of the 4 default uid ranges is held"), "{error}");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = UidRangeClaim::first_free(&dir, 4).err().unwrap();
        assert!(error.contains("only it may write"), "{error}");
        drop(second);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
