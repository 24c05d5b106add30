//! A cgroup per device for its driver VMs (CPU quota, task limit), and in
//! it a memory cgroup per driver VM slot (memory limit, OOM count); cgroup
//! v2 where the unified hierarchy has the controllers, else v1's cpu,
//! memory and pids hierarchies.
//!
//! Why memory per driver VM and not per device: a device runs two driver
//! VMs at once (the current one and its spare), and a cap they shared was
//! neither's: one that stayed within its share could be killed for the
//! other's allocation, and a kill could not be told apart from the other's
//! (the OOM count is the cgroup's).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{io_error, JailError, JailLimits};

/// One driver VM's memory cgroup.
pub(super) struct MemoryLeaf {
    /// The file through which a process joins it.
    pub join: File,
    /// Its OOM counter (v2's `memory.events`, v1's `memory.oom_control`),
    /// opened once: it is read on every driver VM's exit, before the exit
    /// is reported, and finding and opening it each time took 60-70 us of
    /// every failover here.
    pub events: Option<File>,
    /// Its CPU time (v2's `cpu.stat`, which every cgroup has), opened once:
    /// the watch reads it every period. None on v1.
    pub cpu: Option<File>,
    /// A driver VM holds it (`super::Jail::lease`).
    pub held: AtomicBool,
    /// Leases of it so far: a driver VM counting its CPU time here knows
    /// that another has joined it since (`super::CgroupCpu`).
    pub leases: std::sync::atomic::AtomicU64,
    /// On cgroup v2, its directory: the vmm is cloned into it
    /// (`CLONE_INTO_CGROUP`) instead of its keeper joining it first.
    pub dir: Option<File>,
}

/// A device's cgroups, opened.
pub(super) struct Cgroups {
    /// The files through which a process joins the device's CPU and task
    /// cgroups (none on v2: joining a leaf joins its parent's limits).
    pub joins: Vec<File>,
    /// The memory leaves, one per driver VM slot.
    pub memory: Vec<MemoryLeaf>,
    /// Every directory created, parents before children.
    pub dirs: Vec<PathBuf>,
}

/// A directory to create, its settings, and what a process does with it.
struct Dir {
    path: PathBuf,
    settings: Vec<(&'static str, String)>,
    role: Role,
}

/// What a cgroup directory is to the processes of a device.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// Only a parent of the cgroups joined (v1's memory, v2's device).
    Parent,
    /// Every process of the device joins it (v1's cpu and pids).
    Device,
    /// One driver VM at a time joins it (a memory slot).
    MemoryLeaf,
}

/// Creates the device's cgroups with `limits`, with `slots` memory leaves;
/// returns the opened files through which a process joins them and their
/// directories. cgroup v2 if the unified hierarchy has the controllers,
/// else v1's cpu, memory and pids hierarchies.
///
/// Each file is opened here, as root, and written later by the keeper
/// through that descriptor: the kernel judges a migration by the
/// credentials of whoever opened the file, so a reflector that has since
/// become an unprivileged user still places its vmms, and needs no right
/// over any cgroup.
///
/// Why v1's `tasks` rather than `cgroup.procs`: moving a whole thread group
/// takes the kernel's global threadgroup lock for writing, which waits for
/// an RCU grace period first; moving only the calling thread ("0" to
/// `tasks`) does not need that lock. The keeper is single-threaded (a
/// fork's child), so its one thread is the whole process, and the vmm it
/// clones next starts in the cgroups. Measured here: the first
/// `cgroup.procs` write of a cold restart took 19.6 ms of its 22 ms (strace),
/// and jailed cold restarts stalled p50 22 ms against 7 ms unjailed. (v2
/// has no such file outside threaded cgroups: there the write stays, and
/// mounting cgroup2 with `favordynmods` removes the wait.)
pub(super) fn cgroups_for(name: &str, limits: JailLimits, slots: usize) -> Result<Cgroups, JailError> {
    // The reflector's pid keeps two reflectors' devices apart.
    let device = format!("driver-vms-{}-{name}", std::process::id());
    let period: u64 = 100_000;
    let quota = ((limits.cpu * period as f64) as u64).max(1000);
    // Swap counts against the cap too (else a vmm past it would be
    // swapped out rather than stopped): v2's swap limit 0, v1's memory and
    // swap limit the memory limit (files present only with swap accounting).
    let leaf = |parent: &Path, slot: usize, limit: &'static str, swap: (&'static str, String)| Dir {
        path: parent.join(format!("vm{slot}")),
        settings: vec![(limit, limits.memory.to_string()), swap],
        role: Role::MemoryLeaf,
    };
    let mut plan = Vec::new();
    let v2 = unified();
    if v2 {
        let dir = unified_parent()?.join(&device);
        plan.push(Dir {
            path: dir.clone(),
            settings: vec![
                ("cpu.max", format!("{quota} {period}")),
                ("pids.max", limits.tasks.to_string()),
                // Its processes live in the leaves (v2 allows none here
                // once a controller is enabled for its children).
                ("cgroup.subtree_control", "+memory".to_owned()),
            ],
            role: Role::Parent,
        });
        plan.extend((0..slots).map(|slot| leaf(&dir, slot, "memory.max", ("memory.swap.max", "0".to_owned()))));
    } else {
        let own = started_in()?;
        for controller in ["cpu", "pids", "memory"] {
            let hierarchy = own_dir(&own, Some(controller));
            let dir = hierarchy.unwrap_or_else(|| Path::new("/sys/fs/cgroup").join(controller)).join(&device);
            let settings = match controller {
                "cpu" => vec![("cpu.cfs_period_us", period.to_string()), ("cpu.cfs_quota_us", quota.to_string())],
                "pids" => vec![("pids.max", limits.tasks.to_string())],
                _ => Vec::new(),
            };
            let role = if controller == "memory" { Role::Parent } else { Role::Device };
            plan.push(Dir { path: dir.clone(), settings, role });
            if controller == "memory" {
                let swap = ("memory.memsw.limit_in_bytes", limits.memory.to_string());
                plan.extend((0..slots).map(|slot| leaf(&dir, slot, "memory.limit_in_bytes", swap.clone())));
            }
        }
    }
    let mut cgroups = Cgroups { joins: Vec::new(), memory: Vec::new(), dirs: Vec::new() };
    for dir in plan {
        if let Err(error) = make(dir, v2, &mut cgroups) {
            // None of it is used: nothing is left behind either.
            remove_dirs(&cgroups.dirs, Duration::ZERO);
            return Err(error);
        }
    }
    Ok(cgroups)
}

/// Creates one directory of the plan with its settings and, unless it only
/// parents others, opens the file through which a process joins it.
fn make(dir: Dir, v2: bool, cgroups: &mut Cgroups) -> Result<(), JailError> {
    let path = &dir.path;
    std::fs::create_dir_all(path).map_err(io_error(format!("creating cgroup {}", path.display())))?;
    cgroups.dirs.push(path.clone());
    for (file, value) in dir.settings {
        let mut handle = match std::fs::OpenOptions::new().write(true).open(path.join(file)) {
            Ok(handle) => handle,
            // No swap accounting: no swap limit to set.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && SWAP_LIMITS.contains(&file) => continue,
            Err(e) => return Err(io_error(format!("opening {}", path.join(file).display()))(e)),
        };
        handle.write_all(value.as_bytes()).map_err(io_error(format!("writing {}", path.join(file).display())))?;
    }
    if dir.role == Role::Parent {
        return Ok(());
    }
    let join = if v2 { "cgroup.procs" } else { "tasks" };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path.join(join))
        .map_err(io_error(format!("opening {}", path.join(join).display())))?;
    // Written by the child after its descriptors are placed from 3:
    // kept above them all.
    let file = hardware::descriptors::lift(file.into())
        .map(std::fs::File::from)
        .map_err(io_error("moving a cgroup membership descriptor"))?;
    if dir.role == Role::MemoryLeaf {
        let events = ["memory.events", "memory.oom_control"].iter().find_map(|f| File::open(path.join(f)).ok());
        let directory = if v2 {
            Some(
                File::open(path)
                    .and_then(|dir| hardware::descriptors::lift(dir.into()))
                    .map(File::from)
                    .map_err(io_error(format!("opening {}", path.display())))?,
            )
        } else {
            None
        };
        let cpu = if v2 { File::open(path.join("cpu.stat")).ok() } else { None };
        cgroups.memory.push(MemoryLeaf {
            join: file,
            events,
            cpu,
            held: AtomicBool::new(false),
            leases: Default::default(),
            dir: directory,
        });
    } else {
        cgroups.joins.push(file);
    }
    Ok(())
}

/// Swap limit files, present only where the kernel accounts swap.
const SWAP_LIMITS: [&str; 2] = ["memory.swap.max", "memory.memsw.limit_in_bytes"];

/// The controllers a device's cgroups use.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Whether the host has only the unified hierarchy (cgroup v2) at
/// /sys/fs/cgroup; otherwise v1's hierarchies are there (a hybrid host's
/// unified hierarchy, at /sys/fs/cgroup/unified, has no controllers).
fn unified() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// /proc/self/cgroup as it was at the reflector's first look: on cgroup v2
/// the reflector may then move itself into a leaf ([`unified_parent`]),
/// and its devices' cgroups (and stale ones to sweep) stay where it started.
fn started_in() -> Result<String, JailError> {
    static STARTED_IN: OnceLock<Result<String, String>> = OnceLock::new();
    STARTED_IN
        .get_or_init(|| std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| io_error("reading /proc/self/cgroup")(std::io::Error::other(e)))
}

/// Where the reflector's own processes go on cgroup v2 when the cgroup it
/// started in must parent its devices' cgroups.
pub const OWN_LEAF: &str = "reflector";

/// On cgroup v2, the cgroup under which the devices' cgroups go: the one
/// the reflector started in, with the CPU, memory and task controllers
/// enabled for its children. The kernel enables controllers for the
/// children of a cgroup only if the cgroup holds no process itself (the
/// root excepted), and the reflector's own cgroup holds the reflector (a
/// systemd service's cgroup holds the service's processes): so the
/// reflector first moves itself into a leaf of it, [`OWN_LEAF`], as
/// systemd asks of a service that delegates (`Delegate=yes`). Done once;
/// the outcome is kept.
fn unified_parent() -> Result<PathBuf, JailError> {
    static PARENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PARENT.get_or_init(enable_controllers).clone().map_err(|reason| JailError::Io {
        what: "setting up cgroup v2 for the driver VMs".to_owned(),
        source: std::io::Error::other(reason),
    })
}

fn enable_controllers() -> Result<PathBuf, String> {
    let own = started_in().map_err(|e| e.to_string())?;
    let parent = own_dir(&own, None).unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
    let read = |file: &str| -> Result<String, String> {
        std::fs::read_to_string(parent.join(file)).map_err(|e| format!("reading {}: {e}", parent.join(file).display()))
    };
    // The processes of the cgroup, named (pid and command).
    let members = || -> Result<Vec<(u32, String)>, String> {
        Ok(read("cgroup.procs")?
            .split_whitespace()
            .filter_map(|pid| pid.parse::<u32>().ok())
            .map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                (pid, comm.trim().to_owned())
            })
            .collect())
    };
    // Where /proc/self/cgroup says the reflector is must be where it is
    // in this mount (a private cgroup namespace with the host's hierarchy
    // mounted says `/` of the wrong root): else the devices' cgroups would
    // land outside the reflector's own limits.
    let me = std::process::id();
    if !member_of(&parent) {
        return Err(format!(
            "/proc/self/cgroup names {}, but the reflector (pid {me}) is not in its cgroup.procs: \
             /sys/fs/cgroup is not its cgroup namespace's hierarchy; mount the cgroup2 of its own namespace there",
            parent.display()
        ));
    }
    let available: Vec<String> = read("cgroup.controllers")?.split_whitespace().map(str::to_owned).collect();
    let missing: Vec<&str> = CONTROLLERS.into_iter().filter(|c| !available.iter().any(|a| a == c)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "the controllers {} are not available in the reflector's cgroup {} (it has: {}); \
             delegate them to it (systemd: Delegate=yes in its unit)",
            missing.join(", "),
            parent.display(),
            available.join(" ")
        ));
    }
    // All at once: the kernel enables all of them or none.
    let enable = || -> Result<(), std::io::Error> {
        let enabled = read("cgroup.subtree_control").unwrap_or_default();
        let wanted: Vec<String> = CONTROLLERS
            .into_iter()
            .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
            .map(|c| format!("+{c}"))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        std::fs::write(parent.join("cgroup.subtree_control"), wanted.join(" "))
    };
    let failed = |e: std::io::Error| {
        let kind = read("cgroup.type").unwrap_or_default();
        format!(
            "enabling {} for the children of {} (cgroup.type {}): {e}",
            CONTROLLERS.join(", "),
            parent.display(),
            kind.trim()
        )
    };
    match enable() {
        Ok(()) => return Ok(parent),
        // Processes in it (the root cgroup alone may have both).
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => return Err(failed(e)),
    }
    // Only the reflector's own process may be moved: moving into a leaf of
    // a cgroup that others share (a login session's scope, a container's
    // init, a wrapper script) would leave them there and help nothing.
    let others: Vec<String> =
        members()?.into_iter().filter(|(pid, _)| *pid != me).map(|(pid, comm)| format!("{pid} ({comm})")).collect();
    if !others.is_empty() {
        return Err(format!(
            "its cgroup {} holds other processes than the reflector: {}; run the reflector alone in a cgroup \
             of its own (a systemd service that execs it, with Delegate=yes)",
            parent.display(),
            others.join(", ")
        ));
    }
    let leaf = parent.join(OWN_LEAF);
    std::fs::create_dir_all(&leaf).map_err(|e| format!("creating {}: {e}", leaf.display()))?;
    // "0": the writer's whole process, every thread of the reflector.
    std::fs::write(leaf.join("cgroup.procs"), "0")
        .map_err(|e| format!("moving the reflector into {}: {e}", leaf.display()))?;
    tracing::info!(cgroup = %leaf.display(), "the reflector moved into a leaf of its cgroup, which now parents its driver VMs' cgroups");
    enable().map_err(failed)?;
    Ok(parent)
}

/// How long removing a device's cgroups waits for processes still exiting
/// in them. A jail ends when the last of its holders lets go: the device
/// and, until each is reaped, its driver VMs' memory slots; where a jail
/// has no memory cgroups nothing holds it past a kill, and its keeper and
/// vmm leave the CPU and task cgroups only as they are reaped. Removing a
/// cgroup with a process in it fails (EBUSY) and would leave it behind
/// until the next start's sweep. An exit takes milliseconds (a VM's
/// teardown about 15 ms here); seconds mean a process that does not end.
pub(super) const EXIT_BOUND: Duration = Duration::from_secs(5);

/// Removes a device's cgroup directories (`dirs`: parents before
/// children, as created), children first, each once no process is left in
/// it, waiting at most until `bound` from now in all. One still busy then
/// is left, with a warning, for the next reflector's sweep.
pub(super) fn remove_dirs(dirs: &[PathBuf], bound: Duration) {
    let deadline = Instant::now() + bound;
    for dir in dirs.iter().rev() {
        if !wait_until_empty(dir, deadline) {
            tracing::warn!(cgroup = %dir.display(), "processes of a driver VM are still in its cgroup; it is left for the next start's sweep");
            continue;
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            // A reflector that became an unprivileged user (`--user`) may
            // not remove what it made as root: the next start sweeps it.
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::debug!(cgroup = %dir.display(), "not ours to remove any more; left for the next start's sweep")
            }
            Err(error) => tracing::warn!(cgroup = %dir.display(), %error, "cannot remove a driver VM cgroup"),
        }
    }
}

/// Waits until no process is left in cgroup `dir` (or it is gone), at most
/// until `deadline`; whether it is empty. cgroup v2 says so in
/// `cgroup.events` (`populated 0`, its descendants included) and signals
/// each change of that file to inotify; v1 has no such file, so its
/// `cgroup.procs` is read again after a growing pause.
fn wait_until_empty(dir: &Path, deadline: Instant) -> bool {
    let events = dir.join("cgroup.events");
    if !events.exists() {
        return wait_until_no_procs(dir, deadline);
    }
    let populated = || match std::fs::read_to_string(&events) {
        Ok(text) => text.lines().any(|line| line.trim() == "populated 1"),
        // Gone with its directory: nothing in it.
        Err(_) => false,
    };
    let Some(watch) = watch_modify(&events) else { return wait_until_no_procs(dir, deadline) };
    loop {
        if !populated() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if crate::hw::wait_readable(watch.as_raw_fd(), Some(left)) {
            let mut drained = [0u8; 4096];
            // SAFETY: read(2) of the inotify events into a buffer of its
            // length (non-blocking: only what is queued).
            unsafe { libc::read(watch.as_raw_fd(), drained.as_mut_ptr().cast(), drained.len()) };
        }
    }
}

/// An inotify descriptor watching `file` for modifications.
fn watch_modify(file: &Path) -> Option<OwnedFd> {
    let path = std::ffi::CString::new(file.as_os_str().as_bytes()).ok()?;
    // SAFETY: inotify_init1(2) with flags only; the descriptor is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let watch = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a NUL-terminated path that outlives the call.
    (unsafe { libc::inotify_add_watch(watch.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) } >= 0).then_some(watch)
}

/// cgroup v1's wait: `cgroup.procs` read until empty, 1 ms apart at first,
/// then twice as long each time up to 32 ms.
fn wait_until_no_procs(dir: &Path, deadline: Instant) -> bool {
    let procs = dir.join("cgroup.procs");
    let empty = || match std::fs::read_to_string(&procs) {
        Ok(listed) if !listed.trim().is_empty() => None,
        _ => Some(()),
    };
    crate::hw::poll_until(deadline, Duration::from_millis(1), Duration::from_millis(32), empty).is_some()
}

/// Sets up what the devices' cgroups need, once, before any device starts
/// (while the reflector has one thread and no child: a child forked by
/// another device's setup would still be in the cgroup the reflector
/// leaves, and keep it from parenting the devices' cgroups): removes stale
/// cgroups and, on cgroup v2, makes the reflector's cgroup their parent
/// ([`unified_parent`]). A failure is logged; each device then says it has
/// no limits.
pub fn prepare_cgroups() {
    sweep_stale_cgroups();
    if unified() {
        if let Err(error) = unified_parent() {
            tracing::warn!(%error, "driver VMs will run jailed without CPU, memory or task limits");
        }
    }
}

/// The directory of this process's cgroup, from `own` (/proc/self/cgroup):
/// in `controller`'s v1 hierarchy, or in the unified one (`None`, the
/// `0::` line) mounted at /sys/fs/cgroup; None if `own` names none.
fn own_dir(own: &str, controller: Option<&str>) -> Option<PathBuf> {
    let path = own.lines().find_map(|line| {
        let (_, rest) = line.split_once(':')?;
        let (controllers, path) = rest.split_once(':')?;
        let wanted = match controller {
            Some(controller) => controllers.split(',').any(|c| c == controller),
            None => controllers.is_empty(),
        };
        wanted.then_some(path.trim_start_matches('/'))
    })?;
    Some(Path::new("/sys/fs/cgroup").join(controller.unwrap_or("")).join(path))
}

/// Whether this process is in the cgroup directory `dir` (its
/// `cgroup.procs` lists it).
fn member_of(dir: &Path) -> bool {
    let me = std::process::id().to_string();
    std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| procs.split_whitespace().any(|pid| pid == me))
}

/// Removes the cgroups of reflectors that are gone (killed before they
/// could clean up); cgroups still holding processes stay.
fn sweep_stale_cgroups() {
    let Ok(own) = started_in() else { return };
    let hierarchies = std::iter::once(None).chain(CONTROLLERS.map(Some));
    for parent in hierarchies.filter_map(|controller| own_dir(&own, controller)) {
        // Only where this reflector is: a hierarchy mounted from outside
        // its cgroup namespace names another cgroup by the same path, and
        // the owners of what it holds are not in this PID namespace.
        if !member_of(&parent) && !member_of(&parent.join(OWN_LEAF)) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&parent) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("driver-vms-") else { continue };
            let owner = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                // Its driver VMs' memory leaves first.
                for leaf in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                    if leaf.file_name().to_string_lossy().starts_with("vm") {
                        let _ = std::fs::remove_dir(leaf.path());
                    }
                }
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory standing in for a cgroup: its files are plain files
    /// (inotify reports their modifications as the kernel's do).
    fn fake_cgroup(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fake-cgroup-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_v2_cgroup_is_waited_for_until_its_events_say_it_is_unpopulated() {
        let dir = fake_cgroup("v2");
        let events = dir.join("cgroup.events");
        std::fs::write(&events, "populated 1\nfrozen 0\n").unwrap();
        assert!(!wait_until_empty(&dir, Instant::now() + Duration::from_millis(20)), "populated: not empty");
        // The last process leaves while the wait is on (or before it
        // begins: either way the wait ends with the cgroup empty). Written
        // in place, as the kernel changes the file: a truncating write
        // would show the wait an empty file, which it takes for "not
        // populated", and end it before the change it is to wait for.
        let writer = std::thread::spawn({
            let events = events.clone();
            move || {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new().write(true).open(events).unwrap();
                file.write_all(b"populated 0\nfrozen 0\n").unwrap();
            }
        });
        assert!(wait_until_empty(&dir, Instant::now() + Duration::from_secs(30)));
        writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(wait_until_empty(&dir, Instant::now()), "a cgroup that is gone holds nothing");
    }

    #[test]
    fn a_v1_cgroup_is_waited_for_until_its_procs_are_gone() {
        let dir = fake_cgroup("v1");
        std::fs::write(dir.join("cgroup.procs"), "1234\n").unwrap();
        assert!(!wait_until_empty(&dir, Instant::now() + Duration::from_millis(20)), "a process in it");
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        assert!(wait_until_empty(&dir, Instant::now() + Duration::from_secs(30)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn removal_takes_children_first_and_leaves_a_busy_cgroup_in_place() {
        let parent = fake_cgroup("tree");
        let busy = parent.join("vm0");
        let idle = parent.join("vm1");
        for leaf in [&busy, &idle] {
            std::fs::create_dir(leaf).unwrap();
        }
        std::fs::write(busy.join("cgroup.procs"), "1234\n").unwrap();
        remove_dirs(&[parent.clone(), busy.clone(), idle.clone()], Duration::from_millis(20));
        assert!(!idle.exists(), "an empty child is removed");
        assert!(busy.exists() && parent.exists(), "a busy child stays, and so does its parent");
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
