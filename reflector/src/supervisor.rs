//! Driver VM processes: each driver VM is a separate `vmm` child process,
//! wired to its device and channel by windows (memfds), doorbells and
//! interrupt lines (eventfds). A watcher thread reaps the child, logs how
//! its guest ended, and signals the device.
//!
//! A `vmm` runs untrusted guest code and must reach only its own VM's
//! memory, windows and channel (DESIGN.md, invariant 6). So a child gets
//! exactly the descriptors listed for it, renumbered from 3 in a fixed
//! order ([`ChildFds`]); every other descriptor it would have inherited
//! (a client's guest RAM, another device's eventfds, whatever a library
//! opened without CLOEXEC) is closed at exec, whatever its flags in the
//! reflector. Windows are opened by the child as `/proc/self/fd/N`: it is
//! never told a path into the reflector's descriptor table.

use hardware::shared_eventfd::SharedEventFd;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::driver_vms::{DriverLaunch, DriverProcess, SpareKind};
use crate::hw::{TrapConnection, TrapWindow};
use crate::jail::{Jail, MemorySlot};
use crate::shm::SharedMemory;
use crate::token_bucket::TokenBucket;

/// What to boot.
#[derive(Clone)]
pub struct DriverVmSpec {
    /// Name (console prefix, logs).
    pub name: String,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// Driver image: built-in name or path.
    pub image: String,
    /// The driver's parameters: words for its command line.
    pub args: String,
    /// Guest RAM, e.g. "16M".
    pub memory: String,
    /// The jail its vmms start in; None only for development (`--no-jail`).
    pub jail: Option<Arc<crate::jail::Jail>>,
    /// The driver runs hosted (`vmm run --hosted`): development only.
    pub hosted: bool,
}

/// A window to map: guest address, memory, name.
#[derive(Clone)]
pub struct Window {
    /// Driver guest-physical address.
    pub gpa: u64,
    /// The memory.
    pub memory: Arc<SharedMemory>,
    /// Name the driver looks up.
    pub name: &'static str,
}

/// Starts driver VMs for one device, always wired the same way, so that a
/// replacement sees exactly what its predecessor saw.
pub struct DriverLauncher {
    spec: DriverVmSpec,
    /// A driver image given as a file, opened once and passed to each vmm
    /// (a jailed vmm can open no path).
    image_file: Option<std::fs::File>,
    /// Why the image file could not be opened: said by [`DriverLauncher::check`]
    /// (a jailed vmm would only say that no such file exists).
    image_error: Option<std::io::Error>,
    windows: Vec<Window>,
    /// Trapped windows and where they go; each driver VM gets its own
    /// connection to each.
    traps: Vec<(u64, TrapWindow)>,
    doorbells: Vec<(u64, SharedEventFd)>,
    interrupt_lines: usize,
    exited: EventFd,
}

/// A `vmm` command line ready to start, with the pipe on which a jailed
/// one's keeper reports the vmm's pid (read end, write end).
struct Prepared {
    command: Command,
    report: Option<(OwnedFd, OwnedFd)>,
}

impl Prepared {
    /// Starts it; returns the child (the vmm, or its keeper when jailed),
    /// killed if dropped unwatched, and the vmm's pid.
    fn spawn(mut self) -> std::io::Result<(Unwatched, libc::pid_t)> {
        let child = Unwatched(Some(self.command.spawn()?));
        let Some((read, write)) = self.report else {
            let pid = child.id() as libc::pid_t;
            return Ok((child, pid));
        };
        // The keeper wrote before the vmm could exec, and spawn returned
        // after that exec: the pid is there, or the keeper failed.
        drop(write);
        let mut pid = [0u8; 4];
        let mut report = std::fs::File::from(read);
        match report.read_exact(&mut pid) {
            Ok(()) => Ok((child, libc::pid_t::from_ne_bytes(pid))),
            Err(error) => {
                Err(std::io::Error::other(format!("the jail's keeper did not report the vmm's pid: {error}")))
            }
        }
    }
}

/// A started child (the vmm, or its jail's keeper) that no watcher has
/// taken yet. Dropped before one does (an error on the way: no descriptor
/// or thread left), it is killed and reaped: left running, a vmm with the
/// device's windows and doorbells went unsupervised, its end unseen (a
/// jailed vmm dies with its keeper, of its parent-death signal).
struct Unwatched(Option<Child>);

impl Unwatched {
    /// The child's pid (0 once taken).
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// The child, for what keeps it from now on (its watcher).
    fn take(&mut self) -> Option<Child> {
        self.0.take()
    }
}

impl Drop for Unwatched {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            tracing::warn!(pid = child.id(), "a driver VM's start failed after its process started: killed");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running driver VM process.
pub struct DriverVm {
    name: String,
    /// The vmm's pid (for /proc and status).
    pid: libc::pid_t,
    /// Our child's pidfd: the vmm's, or its keeper's when jailed (killing
    /// the keeper kills the vmm).
    pidfd: Option<OwnedFd>,
    /// Our child's pid (for kill(2) where pidfds are missing).
    child: libc::pid_t,
    /// The jailed vmm's own pidfd, when it could be opened and proved to be
    /// the keeper's child: a kill reaches it at once instead of through the
    /// keeper's death and its parent-death signal (a second process exit
    /// in series, about half a millisecond of every failover here).
    vmm_pidfd: Option<OwnedFd>,
    /// Its jail's memory cap killed it (set when it is gone).
    capped: Arc<AtomicBool>,
    gone: Arc<Gone>,
    reaped: Arc<AtomicBool>,
    /// Reaped, and its memory cgroup let go of (set by the watcher).
    released: Arc<Gone>,
    /// Its memory cgroup's CPU time, when the cgroup is its alone: every
    /// process the vmm makes is counted there (the vmm's own time leaves
    /// out a child it clones, which could spin unwatched: a review found
    /// it).
    cgroup_cpu: Option<crate::jail::CgroupCpu>,
    report: Arc<Mutex<String>>,
    /// A spare's go signal (a warm spare's `--go-fd`, a standby's
    /// `--start-fd`).
    go: Option<SharedEventFd>,
    /// This VM's interrupt lines, in order.
    interrupts: Vec<SharedEventFd>,
    /// Its connections' rights to its trapped windows: revoked when this
    /// record is dropped (once the VM was killed, or never started), so
    /// that nothing it left in them reaches the device its successor
    /// drives, whether or not it ever used them.
    _grants: Vec<hardware::AccessGrant>,
    /// The write end of its standard input (the watcher holds it too:
    /// the vmm ends when the last holder goes), for asking it to stop and
    /// report where it was.
    lifeline: Option<Arc<std::process::ChildStdin>>,
}

/// Set once a driver VM's process has ended, as the kernel says (its pidfd,
/// or its reap): its vCPU can no longer run. Never on what the process
/// itself controls, such as its standard output closing ([`Watcher`]).
#[derive(Default)]
struct Gone {
    flag: AtomicBool,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Gone {
    fn set(&self) {
        let _guard = self.lock.lock();
        self.flag.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Waits until set, at most `bound`; whether it was set.
    fn wait(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        let mut guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while !self.is_set() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = match self.changed.wait_timeout(guard, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

/// The descriptors a child gets: the `i`th passed becomes its descriptor
/// `FIRST + i`; nothing else above standard error survives its exec
/// (`hardware::descriptors::Placement`, which QEMU's placement shares).
pub struct ChildFds {
    placement: hardware::descriptors::Placement,
}

impl ChildFds {
    /// The child's first passed descriptor (after standard input, output
    /// and error).
    pub const FIRST: RawFd = 3;

    /// No descriptors yet.
    pub fn new() -> Self {
        ChildFds { placement: hardware::descriptors::Placement::new() }
    }

    /// Passes `fd`; returns its number in the child.
    pub fn pass(&mut self, fd: RawFd) -> RawFd {
        let number = Self::FIRST + self.placement.len() as RawFd;
        self.placement.place(fd, number);
        number
    }

    /// Makes `command`'s child receive exactly these descriptors, then
    /// enter `jail` if given, in the memory cgroup given with it (its
    /// keeper reports the vmm's pid on the descriptor given with it).
    pub fn apply(self, command: &mut Command, jail: Option<(Arc<crate::jail::Jail>, usize, RawFd)>) {
        let mut placement = self.placement;
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe system calls (fcntl, dup2,
        // close_range, and the jail's) on memory allocated before the fork.
        unsafe {
            command.pre_exec(move || {
                placement.install_in_child()?;
                match &jail {
                    Some((jail, memory_slot, report)) => jail.enter(*report, *memory_slot),
                    None => Ok(()),
                }
            });
        }
    }
}

impl Default for ChildFds {
    fn default() -> Self {
        Self::new()
    }
}

impl DriverLauncher {
    /// A launcher of driver VMs with `interrupt_lines` interrupt lines
    /// each (every VM gets eventfds of its own, so a dead VM's line never
    /// wakes the next); `exited` is signalled whenever one of its VMs exits.
    pub fn new(
        spec: DriverVmSpec,
        windows: Vec<Window>,
        traps: Vec<(u64, TrapWindow)>,
        doorbells: Vec<(u64, SharedEventFd)>,
        interrupt_lines: usize,
        exited: EventFd,
    ) -> Self {
        // An unreadable file, or one that is not a regular file, is
        // reported by the start's `check` (the vmm reads it). Non-blocking:
        // opening a FIFO for reading waits for a writer for ever.
        let open = |path: &str| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path)
        };
        let (image_file, image_error) = match spec.image.contains('/').then(|| open(&spec.image)) {
            Some(Ok(file)) => (Some(file), None),
            Some(Err(error)) => (None, Some(error)),
            None => (None, None),
        };
        DriverLauncher { spec, image_file, image_error, windows, traps, doorbells, interrupt_lines, exited }
    }

    /// The driver VM's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Starts a driver VM (`vmm run`) that serves at once. `route` gets its
    /// interrupt lines before the VM exists, so that the device's interrupts
    /// reach it from its first instruction on.
    pub fn launch(&self, route: &mut dyn FnMut(&[SharedEventFd]) -> std::io::Result<()>) -> std::io::Result<DriverVm> {
        self.start(None, route)
    }

    /// Starts a spare: a driver VM that waits until [`DriverVm::activate`]
    /// before it touches the device or the channel (route its interrupts
    /// with [`DriverVm::interrupt`] before that). A warm one boots first
    /// (its guest's `WAIT_GO`); a standby waits before its guest's first
    /// instruction (the vmm's `--start-fd`).
    pub fn launch_spare(&self, kind: SpareKind) -> std::io::Result<DriverVm> {
        let go = SharedEventFd::new()?;
        self.start(Some((kind, go)), &mut |_| Ok(()))
    }

    /// Checks that a driver VM of this configuration would start (`vmm run
    /// --check`: the image exists and is valid, fits the memory, the
    /// windows fit the address space), without starting one. A bad
    /// `driver=` or `memory=` fails the device's start instead of becoming
    /// a restart loop.
    pub fn check(&self) -> Result<(), String> {
        if let Some(error) = &self.image_error {
            return Err(format!("driver={}: {error}", self.spec.image));
        }
        // A fleet of like devices would start one jailed vmm each only to
        // check the same thing (half the forks of a fleet's start): one
        // check per configuration that passed.
        static PASSED: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let key = self.check_key();
        if PASSED.lock().is_ok_and(|passed| passed.contains(&key)) {
            return Ok(());
        }
        self.run_check()?;
        if let Ok(mut passed) = PASSED.lock() {
            passed.push(key);
        }
        Ok(())
    }

    /// What `check` depends on: launchers with the same key pass or fail it
    /// alike (the descriptors differ, never their layout).
    fn check_key(&self) -> String {
        let spec = &self.spec;
        let windows: Vec<(u64, usize, &str)> = self.windows.iter().map(|w| (w.gpa, w.memory.size(), w.name)).collect();
        let traps: Vec<(u64, u64, &str)> = self.traps.iter().map(|(gpa, t)| (*gpa, t.size, t.name)).collect();
        let doorbells: Vec<u64> = self.doorbells.iter().map(|(gpa, _)| *gpa).collect();
        format!(
            "{:?} {:?} {:?} {:?} hosted={} jailed={} {windows:?} {traps:?} {doorbells:?} lines={}",
            spec.vmm,
            spec.image,
            spec.args,
            spec.memory,
            spec.hosted,
            spec.jail.is_some(),
            self.interrupt_lines
        )
    }

    /// Runs `vmm run --check` for this configuration.
    fn run_check(&self) -> Result<(), String> {
        let lines = (0..self.interrupt_lines)
            .map(|_| SharedEventFd::new())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("creating an eventfd: {e}"))?;
        // The check starts no VM: unconnected sockets and fresh eventfds
        // stand in for the trapped windows' connections.
        let traps = self
            .traps
            .iter()
            .map(|(_, trap)| stand_in_connection(trap.posted.len()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("creating a socket or an eventfd: {e}"))?;
        let memory_slot = self.spec.jail.as_ref().and_then(Jail::lease);
        let slot = memory_slot.as_ref().map_or(0, MemorySlot::index);
        let mut prepared = self
            .command(&lines.iter().collect::<Vec<_>>(), &traps, None, slot)
            .map_err(|e| format!("creating a pipe: {e}"))?;
        prepared.command.arg("--check").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let (mut unwatched, _) = prepared.spawn().map_err(|e| format!("starting {}: {e}", self.spec.vmm.display()))?;
        let mut child = unwatched.take().ok_or_else(|| format!("starting {}: no child", self.spec.vmm.display()))?;
        let deadline = Instant::now() + CHECK_DEADLINE;
        let mut message = Vec::new();
        if let Some(mut stderr) = child.stderr.take() {
            read_until(&mut stderr, CHECK_MESSAGE_LIMIT, deadline, &mut message);
        }
        let ended = hardware::poll_until(deadline, Duration::from_micros(100), Duration::from_millis(10), || {
            child.try_wait().transpose()
        });
        let Some(status) = ended else {
            // The keeper, or the unjailed vmm itself: a jailed vmm dies with
            // its keeper (its parent-death signal).
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} run --check did not end within {} s (is it this project's vmm?); it was killed",
                self.spec.vmm.display(),
                CHECK_DEADLINE.as_secs()
            ));
        };
        let status = status.map_err(|e| format!("waiting for {}: {e}", self.spec.vmm.display()))?;
        if status.success() {
            Ok(())
        } else {
            let message = String::from_utf8_lossy(&message);
            let message = message.trim().trim_start_matches("vmm: ");
            let mut message =
                if message.is_empty() { format!("the vmm ended with {status}") } else { message.to_owned() };
            // A name without a `/` is a built-in image's: a file of that
            // name here is not looked at (a jailed vmm sees no file).
            if !self.spec.image.contains('/') && Path::new(&self.spec.image).is_file() {
                message.push_str(&format!(
                    " (a file {} is in the working directory: give it as driver=./{})",
                    self.spec.image, self.spec.image
                ));
            }
            Err(format!("driver={} memory={}: {message}", self.spec.image, self.spec.memory))
        }
    }

    /// The `vmm run` command line of a driver VM, with its descriptors and
    /// its jail; `go` makes it a spare of that kind, which waits until `go`
    /// is written (a warm one in its guest's `WAIT_GO`, a standby before
    /// its guest's first instruction); `memory_slot`: the memory cgroup
    /// it starts in, if jailed.
    fn command(
        &self,
        lines: &[&SharedEventFd],
        traps: &[TrapConnection],
        go: Option<(SpareKind, &SharedEventFd)>,
        memory_slot: usize,
    ) -> std::io::Result<Prepared> {
        // The guest learns it is a warm spare from its command line.
        let spare = matches!(go, Some((SpareKind::Warm, _)));
        let spec = &self.spec;
        let mut command = match &spec.jail {
            Some(jail) => {
                let mut command = Command::new(jail.program());
                // Nothing of the reflector's environment reaches the jail.
                command.env_clear();
                if let Some(filter) = std::env::var_os("VMM_LOG") {
                    command.env("VMM_LOG", filter);
                }
                command
            }
            None => Command::new(&spec.vmm),
        };
        command.args(["run", "--json", "--exit-on-stdin-close", "--seccomp", "--name", &spec.name]);
        command.args(["--memory", &spec.memory]);
        if spec.hosted {
            command.arg("--hosted");
        }
        let cmdline = match (spec.args.is_empty(), spare) {
            (true, false) => String::new(),
            (true, true) => "spare".to_owned(),
            (false, false) => spec.args.clone(),
            (false, true) => format!("{} spare", spec.args),
        };
        if !cmdline.is_empty() {
            command.args(["--cmdline", &cmdline]);
        }
        let mut fds = ChildFds::new();
        match &self.image_file {
            Some(file) => command.arg("--image").arg(format!("fd={}", fds.pass(file.as_raw_fd()))),
            None => command.args(["--image", &spec.image]),
        };
        if let Some(kvm) = spec.jail.as_ref().and_then(|jail| jail.kvm()) {
            let fd = fds.pass(kvm);
            command.arg("--kvm-fd").arg(fd.to_string());
        }
        for window in &self.windows {
            let fd = fds.pass(window.memory.as_raw_fd());
            let arg = format!("{:#x},{},fd={fd},name={}", window.gpa, window.memory.size(), window.name);
            command.arg("--window").arg(arg);
        }
        for ((gpa, trap), connection) in self.traps.iter().zip(traps) {
            let fd = fds.pass(connection.socket.as_raw_fd());
            let mut arg = format!("{gpa:#x},{},fd={fd},name={}", trap.size, trap.name);
            for (offset, signal) in trap.posted.iter().zip(&connection.posted) {
                let fd = fds.pass(signal.as_raw_fd());
                arg.push_str(&format!(",posted={offset:#x}:{fd}"));
            }
            command.arg("--trap").arg(arg);
        }
        for (gpa, doorbell) in &self.doorbells {
            let fd = fds.pass(doorbell.as_raw_fd());
            command.arg("--doorbell").arg(format!("mmio={gpa:#x},fd={fd}"));
        }
        for line in lines {
            let fd = fds.pass(line.as_raw_fd());
            command.arg("--irq").arg(format!("fd={fd}"));
        }
        if let Some((kind, go)) = go {
            let fd = fds.pass(go.as_raw_fd());
            let option = match kind {
                SpareKind::Warm => "--go-fd",
                SpareKind::Standby => "--start-fd",
            };
            command.arg(option).arg(format!("fd={fd}"));
        }
        let report = match &spec.jail {
            Some(jail) => {
                let (read, write) = hardware::descriptors::pipe()?;
                // The keeper writes it after the descriptors are placed
                // from 3: kept above them all.
                let write = hardware::descriptors::lift(write)?;
                fds.apply(&mut command, Some((jail.clone(), memory_slot, write.as_raw_fd())));
                Some((read, write))
            }
            None => {
                fds.apply(&mut command, None);
                None
            }
        };
        // Standard input is a pipe whose write end only this process holds
        // (the watcher keeps it): if the reflector dies, even by SIGKILL,
        // the driver VM ends too.
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        Ok(Prepared { command, report })
    }

    fn start(
        &self,
        go: Option<(SpareKind, SharedEventFd)>,
        route: &mut dyn FnMut(&[SharedEventFd]) -> std::io::Result<()>,
    ) -> std::io::Result<DriverVm> {
        let spec = &self.spec;
        let interrupts =
            (0..self.interrupt_lines).map(|_| SharedEventFd::new()).collect::<std::io::Result<Vec<_>>>()?;
        route(&interrupts)?;
        let lines: Vec<&SharedEventFd> = interrupts.iter().collect();
        // Each driver VM gets connections of its own (the device revokes a
        // dead one's).
        let traps = self.traps.iter().map(|(_, trap)| (trap.connect)()).collect::<std::io::Result<Vec<_>>>()?;
        // Its memory cgroup, and that cgroup's OOM kills so far: a kill
        // counted there from now on is this driver VM's.
        let memory_slot = spec.jail.as_ref().and_then(Jail::lease).map(|slot| {
            let before = slot.oom_kills();
            (slot, before)
        });
        let slot = memory_slot.as_ref().map_or(0, |(slot, _)| slot.index());
        let cgroup_cpu = memory_slot.as_ref().and_then(|(slot, _)| slot.cpu_time());
        let mut prepared = self.command(&lines, &traps, go.as_ref().map(|(kind, go)| (*kind, go)), slot)?;
        // A jailed vmm may write no regular file (its jail's `RLIMIT_FSIZE`).
        if spec.jail.is_some() {
            prepared.command.stderr(crate::console_relay::stderr_for_jailed_vmm(&spec.name)?);
        }
        let (mut child, pid) = prepared
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("starting {}: {e}", spec.vmm.display())))?;
        let child_pid = child.id() as libc::pid_t;
        // Our own, not yet reaped child (the vmm, or its keeper when jailed).
        let pidfd = pidfd_open(child_pid);
        let vmm_pidfd = if pid == child_pid { None } else { jailed_vmm_pidfd(pid, child_pid) };
        let gone = Arc::new(Gone::default());
        let reaped = Arc::new(AtomicBool::new(false));
        let released = Arc::new(Gone::default());
        let capped = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(String::new()));
        let spare = SpareKind::setting(go.as_ref().map(|(kind, _)| *kind));
        tracing::info!(driver_vm = %spec.name, pid, image = %spec.image, %spare, "driver VM started");
        let go = go.map(|(_, go)| go);
        let lifeline = child.0.as_mut().and_then(|child| child.stdin.take()).map(Arc::new);
        // What proves that the vmm has ended: its own pidfd (a jailed one's
        // keeper may die first, and the vmm only after, of its parent-death
        // signal), or our child's when that is the vmm. None: the reap of
        // our child, the keeper, which ends after the vmm it waits for.
        let vmm_end = match (&vmm_pidfd, pid == child_pid) {
            (Some(vmm), _) => Some(vmm.try_clone()?),
            (None, true) => pidfd.as_ref().map(OwnedFd::try_clone).transpose()?,
            (None, false) => None,
        };
        let watcher = Watcher {
            lifeline: lifeline.clone(),
            name: spec.name.clone(),
            pid,
            vmm_end,
            gone: gone.clone(),
            reaped: reaped.clone(),
            released: released.clone(),
            report: report.clone(),
            exited: self.exited.try_clone()?,
            memory_slot,
            capped: capped.clone(),
        };
        // Taken inside the thread: if it cannot start, the closure is
        // dropped, and the child with it, killed.
        std::thread::Builder::new().name(format!("{}-watch", spec.name)).spawn(move || {
            if let Some(child) = child.take() {
                watcher.watch(child);
            }
        })?;
        Ok(DriverVm {
            name: spec.name.clone(),
            pid,
            pidfd,
            child: child_pid,
            vmm_pidfd,
            capped,
            gone,
            reaped,
            released,
            cgroup_cpu,
            report,
            go,
            interrupts,
            lifeline,
            _grants: traps.into_iter().map(|trap| trap.grant).collect(),
        })
    }
}

impl DriverVm {
    /// The process id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The CPU time it has used so far: its memory cgroup's, which counts
    /// every process it made, where the cgroup is its alone; else the
    /// vmm's own.
    pub fn cpu_time(&self) -> std::io::Result<Duration> {
        match &self.cgroup_cpu {
            Some(cpu) => cpu.read(),
            None => crate::driver_watch::process_cpu_time(self.pid),
        }
    }

    /// Interrupt line `index` of this VM (an eventfd its vmm waits on).
    pub fn interrupt(&self, index: usize) -> Option<&SharedEventFd> {
        self.interrupts.get(index)
    }

    /// Lets a warm spare start serving; false if this is not one or the
    /// go signal could not be given.
    pub fn activate(&mut self) -> bool {
        match self.go.take() {
            // The spare's vmm holds it too: never a write (`shared_eventfd`).
            Some(go) => go.signal().is_ok(),
            None => false,
        }
    }

    /// The vmm's JSON report, once the process has gone (its guest can no
    /// longer run).
    pub fn exit_report(&self) -> Option<String> {
        self.gone.is_set().then(|| self.report.lock().map(|r| r.clone()).unwrap_or_default())
    }

    /// Kills the process and waits, at most `bound`, until its guest can no
    /// longer run (the process has ended); whether it got there. Then
    /// nothing it queued can race what the reflector does next.
    pub fn kill_and_wait(&self, bound: Duration) -> bool {
        self.kill();
        self.gone.wait(bound)
    }

    /// Waits, at most `bound`, until the process is reaped and has let go
    /// of its memory cgroup (and with it its share of the jail); whether
    /// it got there. Later than [`DriverVm::kill_and_wait`]: the VM's
    /// teardown comes between.
    pub fn wait_released(&self, bound: Duration) -> bool {
        self.released.wait(bound)
    }

    /// Asks the vmm to stop its guest where it is and report where (a `w`
    /// on its standard input: outcome `stopped`, with registers, source
    /// location and backtrace), and waits at most `bound` for it to end;
    /// whether it did. A vmm that ignores the request is killed all the
    /// same by the caller: the request costs isolation nothing.
    pub fn stop_and_report(&self, bound: Duration) -> bool {
        use std::io::Write;
        let asked = self.lifeline.as_ref().is_some_and(|stdin| (&**stdin).write_all(b"w").is_ok());
        asked && self.gone.wait(bound)
    }

    /// Kills the process (SIGKILL) if it is still running. Through a pidfd,
    /// so a pid reused after reaping is never hit.
    pub fn kill(&self) {
        if self.reaped.load(Ordering::Acquire) {
            return;
        }
        // The vmm's own pidfd may refuse (a reflector without the right to
        // signal the jail's uid): the keeper's death kills it all the same.
        if let Some(vmm) = &self.vmm_pidfd {
            sigkill(vmm);
        }
        match &self.pidfd {
            Some(pidfd) => sigkill(pidfd),
            // SAFETY: kill(2) on our own child, not reaped yet (checked above).
            None => unsafe {
                libc::kill(self.child, libc::SIGKILL);
            },
        }
        tracing::debug!(driver_vm = %self.name, pid = self.pid, "driver VM killed");
    }
}

/// An unconnected socket and `posted` fresh eventfds: what a trapped
/// window's connection looks like to a `vmm run --check`.
fn stand_in_connection(posted: usize) -> std::io::Result<TrapConnection> {
    let (socket, _) = std::os::unix::net::UnixStream::pair()?;
    let posted = (0..posted)
        .map(|_| hardware::descriptors::copy(&SharedEventFd::new()?))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(TrapConnection { socket: OwnedFd::from(socket), posted, grant: hardware::AccessGrant::none() })
}

/// A pidfd of the jailed vmm `pid`, if it is still the child of `keeper`.
///
/// Why the check makes it safe: the keeper is our child and unreaped, so
/// its pid is its own; it reaps the vmm only as it ends itself. If the vmm
/// had ended and its pid been reused before the pidfd was opened, the
/// process under that pid could not be the keeper's child (a dead keeper
/// has no new children), so a pidfd that passes names the vmm.
fn jailed_vmm_pidfd(pid: libc::pid_t, keeper: libc::pid_t) -> Option<OwnedFd> {
    let pidfd = pidfd_open(pid)?;
    // Field 4: the parent's pid.
    let parent = crate::driver_watch::process_stat(pid, &[4]).ok()?;
    (parent == [keeper as u64]).then_some(pidfd)
}

/// A pidfd of process `pid`, or None (no such process, or no pidfds).
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) with plain values; returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    // SAFETY: a fresh descriptor we own when non-negative.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
}

/// SIGKILLs the process `pidfd` names; a failure changes nothing.
fn sigkill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) on a pidfd we own, no siginfo.
    unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0) };
}

/// Follows one driver VM process to its end.
struct Watcher {
    /// Standard input's write end, held until the vmm is gone.
    lifeline: Option<Arc<std::process::ChildStdin>>,
    name: String,
    pid: libc::pid_t,
    /// A pidfd of the vmm itself, readable once it has ended; None where
    /// the kernel has no pidfds or a jailed vmm's could not be opened.
    vmm_end: Option<OwnedFd>,
    gone: Arc<Gone>,
    reaped: Arc<AtomicBool>,
    released: Arc<Gone>,
    report: Arc<Mutex<String>>,
    exited: EventFd,
    /// Its memory cgroup, held until it is reaped, and the cgroup's OOM
    /// kill count when it started.
    memory_slot: Option<(MemorySlot, Option<u64>)>,
    capped: Arc<AtomicBool>,
}

impl Watcher {
    /// Reads the vmm's report, reports the process gone once it has ended,
    /// then reaps it.
    ///
    /// Gone means ended, as the kernel says, not that its standard output
    /// closed: a compromised vmm may close that itself and run on, and
    /// taken for its end, recovery would have let the next driver VM and
    /// the replay into the channel while it still wrote there
    /// (`the_closing_of_a_driver_vms_output_is_not_taken_for_its_end`).
    /// At the end-of-file, every thread of the vmm must be past its last
    /// write to its memory ([`vmm_threads_ended`]); if one is not, its
    /// pidfd decides. Why not wait for the reap: a jailed vmm's keeper ends
    /// after it, a second process exit in series, and its pidfd only after
    /// its address-space holder's teardown (`vmm::address_space`).
    fn watch(self, mut child: Child) {
        let _lifeline = self.lifeline;
        let (report, ended) = match child.stdout.take() {
            Some(stdout) => {
                read_report(OwnedFd::from(stdout), self.vmm_end.as_ref(), self.pid, REPORT_LIMIT, REPORT_READ_RATE)
            }
            None => (String::new(), false),
        };
        if let Ok(mut text) = self.report.lock() {
            *text = report.clone();
        }
        // Else its pidfd says when it has ended (a jailed vmm's comes after
        // its holder's teardown: it is process 1 of its PID namespace);
        // without one, the reap of our child (the vmm, or the keeper that
        // waited for it).
        let reaped_first = match (&self.vmm_end, ended) {
            (_, true) => None,
            (Some(end), false) => {
                hardware::wait_readable(end.as_raw_fd(), None);
                None
            }
            (None, false) => Some(child.wait()),
        };
        // The kernel counts an OOM kill before the process it kills can
        // end, so the count is final by now. The cgroup is this driver
        // VM's own (its spare, or its predecessor, has another), unless
        // every slot was held when it started.
        let capped = self.memory_slot.as_ref().is_some_and(|(slot, before)| slot.oom_kills() > *before);
        self.capped.store(capped, Ordering::Release);
        if capped {
            let shared = self.memory_slot.as_ref().is_some_and(|(slot, _)| !slot.exclusive());
            tracing::warn!(driver_vm = %self.name, pid = self.pid, shared, "the driver VM was killed by its memory cap");
        }
        self.gone.set();
        let _ = self.exited.write(1);
        match reaped_first.unwrap_or_else(|| child.wait()) {
            Ok(status) => tracing::info!(driver_vm = %self.name, %status, report = %report, "driver VM exited"),
            Err(error) => tracing::error!(driver_vm = %self.name, %error, "cannot wait for the driver VM"),
        }
        self.reaped.store(true, Ordering::Release);
        // Its memory cgroup is free for the next driver VM.
        drop(self.memory_slot);
        self.released.set();
    }
}

/// How long `vmm run --check` may take. It creates no VM and reads at most
/// one image file (a few milliseconds); a binary that has not ended by then
/// (not this project's vmm, or one that hangs) fails the start with that
/// said, instead of hanging it.
const CHECK_DEADLINE: Duration = Duration::from_secs(5);

/// What is kept of a failed check's standard error (its message).
const CHECK_MESSAGE_LIMIT: usize = 64 * 1024;

/// Reads `from` into `into` (at most `limit` bytes kept, the rest read and
/// dropped, so that the writer never blocks) until its end or `deadline`.
fn read_until(from: &mut (impl Read + AsRawFd), limit: usize, deadline: Instant, into: &mut Vec<u8>) {
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        // Not readable by the deadline (or poll failed): the check is over.
        if !hardware::wait_readable(from.as_raw_fd(), Some(left)) {
            return;
        }
        match from.read(&mut buffer) {
            Ok(0) => return,
            Ok(read) => {
                let keep = read.min(limit.saturating_sub(into.len()));
                into.extend_from_slice(&buffer[..keep]);
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The most of a vmm's standard output kept while it runs: its report (one
/// JSON line at its end, a few KiB with a backtrace) must fit. A vmm is
/// assumed compromised and may write without end; the reflector keeps only
/// this much of it, and reads it within [`REPORT_READ_RATE`].
pub const REPORT_LIMIT: usize = 64 * 1024;

/// The most of a report kept, once escaped: it is logged at each of a
/// driver VM's deaths, up to three times, and a compromised vmm that wrote
/// 64 KiB of control characters (six bytes each escaped) dying once a
/// second added about 1 MiB a second to the log every device shares (an
/// adversarial review found it). An honest report (a 4 KiB message, its
/// location and 32 frames) is well under it; a cut one is no JSON, and
/// names no crash site.
pub const REPORT_LINE_MOST: usize = 16 * 1024;

/// How fast a vmm's standard output is read, in bytes a second, after a
/// burst of [`REPORT_LIMIT`]: an honest vmm writes one line, at its end. A
/// compromised one writing without pause then waits on its full pipe, in
/// its own CPU quota; read as fast as it wrote, it cost a reflector thread
/// two copies a byte, outside any quota (an adversarial review found it).
pub const REPORT_READ_RATE: u64 = 64 * 1024;

/// The vmm's report: the last line of its standard output, read until the
/// pipe's end, or, given `end` (the vmm's pidfd), until the vmm has ended
/// and the pipe holds nothing more: a process the vmm left behind with the
/// pipe open (an unjailed vmm's child; a jailed vmm's die with it, in its
/// PID namespace) does not hold the report back. At most `rate` bytes a
/// second are read, after a burst of `limit`.
///
/// Also returns whether the vmm has ended by then: its pidfd said so, or
/// at the end-of-file every one of its threads was past its last write to
/// its memory ([`vmm_threads_ended`]).
fn read_report(output: OwnedFd, end: Option<&OwnedFd>, pid: libc::pid_t, limit: usize, rate: u64) -> (String, bool) {
    let mut tail = Tail::new(limit);
    let mut chunk = vec![0u8; limit.clamp(1, 16 * 1024)];
    let mut reads = TokenBucket::full(rate, limit as u64);
    let mut output = std::fs::File::from(output);
    let mut open = true;
    loop {
        // The output is read only with room for a whole chunk; meanwhile
        // only the end is watched, until the room comes.
        let wait = (open && reads.tokens() < chunk.len() as u64).then(|| reads.until(chunk.len() as u64));
        let mut fds = Vec::with_capacity(2);
        if open && wait.is_none() {
            fds.push(libc::pollfd { fd: output.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if let Some(end) = end {
            fds.push(libc::pollfd { fd: end.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if !open && end.is_none() {
            break;
        }
        let timeout = wait.map_or(-1, |wait| i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX));
        // SAFETY: poll(2) on pollfds in a live vector, of descriptors we hold.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        let readable = |fd: RawFd| fds.iter().any(|p| p.fd == fd && p.revents != 0);
        if open && readable(output.as_raw_fd()) {
            match output.read(&mut chunk) {
                Ok(0) => {
                    open = false;
                    let ended = vmm_threads_ended(pid);
                    if ended || end.is_none() {
                        return (tail.last_line(), ended);
                    }
                }
                Ok(read) => {
                    reads.spend(read as u64);
                    tail.push(&chunk[..read]);
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => open = false,
            }
            continue;
        }
        if end.is_some_and(|end| readable(end.as_raw_fd())) {
            // Ended: what it wrote is in the pipe; take what is there, at
            // most a pipe's worth and the kept tail (a process it left
            // behind may write on).
            let mut left = 2 * limit + 64 * 1024;
            while open && left > 0 && hardware::wait_readable(output.as_raw_fd(), Some(Duration::ZERO)) {
                match output.read(&mut chunk) {
                    Ok(0) | Err(_) => open = false,
                    Ok(read) => {
                        tail.push(&chunk[..read]);
                        left = left.saturating_sub(read);
                    }
                }
            }
            return (tail.last_line(), true);
        }
    }
    (tail.last_line(), false)
}

/// `PF_EXITING` (include/linux/sched.h): the task is in `do_exit` and never
/// returns to user mode.
const PF_EXITING: u64 = 0x4;

/// Whether every thread of process `pid` is past its last write to the
/// process's memory: gone, or exiting (`PF_EXITING`) with no address space
/// left (`exit_mm` done, which makes the kernel's own last writes there on
/// its behalf, the robust futex list and `clear_child_tid`). What the
/// process did with its files cannot say that: a vmm that closed its
/// standard output runs on. The threads are listed again after the check,
/// until two lists agree: a new thread comes only from one that is not
/// exiting, and shows in the next list. A process whose threads cannot be
/// listed (reaped already, or hidden by a `/proc` mounted `hidepid`) is not
/// judged here, nor one whose pid was reused (its threads are not
/// exiting): the caller waits for its pidfd instead.
fn vmm_threads_ended(pid: libc::pid_t) -> bool {
    let list = || -> Option<Vec<libc::pid_t>> {
        let entries = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        let mut tids: Vec<libc::pid_t> =
            entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok()).collect();
        tids.sort_unstable();
        Some(tids)
    };
    let Some(mut before) = list() else {
        return false;
    };
    // A thread that keeps making threads keeps the lists apart: bounded,
    // and then the pidfd decides.
    for _ in 0..8 {
        for &tid in &before {
            // Field 9: flags; 23: the address space's size, 0 without one.
            match crate::driver_watch::process_stat(tid, &[9, 23]) {
                Ok(fields) if fields[0] & PF_EXITING != 0 && fields[1] == 0 => {}
                Ok(_) => return false,
                // Gone since the list.
                Err(_) => {}
            }
        }
        match list() {
            Some(after) if after == before => return true,
            Some(after) => before = after,
            None => return false,
        }
    }
    false
}

/// The end of a stream, at most `limit` bytes of it kept; memory stays
/// within three times `limit` whatever the writer sends.
struct Tail {
    bytes: Vec<u8>,
    limit: usize,
}

impl Tail {
    fn new(limit: usize) -> Self {
        Tail { bytes: Vec::with_capacity(limit), limit }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        // Compacted only past twice the limit: each byte is moved at most
        // once on average, however long the flood.
        if self.bytes.len() > 2 * self.limit {
            self.bytes.drain(..self.bytes.len() - self.limit);
        }
    }

    /// Its last non-empty line (lossily decoded, trimmed), every character
    /// that is not printable escaped ([`crate::untrusted_text::escape`]),
    /// cut at [`REPORT_LINE_MOST`] bytes.
    fn last_line(&self) -> String {
        let kept = &self.bytes[self.bytes.len().saturating_sub(self.limit)..];
        let text = String::from_utf8_lossy(kept);
        let mut line = crate::untrusted_text::escape(
            text.lines().rev().map(str::trim).find(|line| !line.is_empty()).unwrap_or(""),
        );
        if line.len() > REPORT_LINE_MOST {
            let mut end = REPORT_LINE_MOST;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        line
    }
}

/// The `vmm` binary: `explicit` if given, else the one next to this
/// executable (both are built by `cargo build --release`); an absolute
/// path, so that what was checked is what runs: a relative one was
/// checked in the working directory and then looked for in `$PATH` by the
/// spawn (an adversarial review found it).
pub fn find_vmm(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return match std::fs::canonicalize(path) {
            Ok(path) if path.is_file() => Ok(path),
            Ok(_) => Err(format!("--vmm {}: not a file", path.display())),
            Err(error) => Err(format!("--vmm {}: {error}", path.display())),
        };
    }
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("vmm")));
    match beside {
        Some(path) if path.is_file() => Ok(path),
        _ => Err("cannot find the vmm binary next to the reflector: build both with `cargo build --release`, or pass --vmm PATH".into()),
    }
}

impl DriverLaunch for DriverLauncher {
    fn name(&self) -> &str {
        DriverLauncher::name(self)
    }

    fn launch(
        &self,
        route: &mut dyn FnMut(&[SharedEventFd]) -> std::io::Result<()>,
    ) -> std::io::Result<Box<dyn DriverProcess>> {
        Ok(Box::new(DriverLauncher::launch(self, route)?))
    }

    fn launch_spare(&self, kind: SpareKind) -> std::io::Result<Box<dyn DriverProcess>> {
        Ok(Box::new(DriverLauncher::launch_spare(self, kind)?))
    }

    fn end(&self) {
        if let Some(jail) = &self.spec.jail {
            jail.remove_cgroups();
        }
    }
}

impl DriverProcess for DriverVm {
    fn pid(&self) -> libc::pid_t {
        DriverVm::pid(self)
    }

    fn cpu_time(&self) -> std::io::Result<Duration> {
        DriverVm::cpu_time(self)
    }

    fn interrupt(&self, index: usize) -> Option<&SharedEventFd> {
        DriverVm::interrupt(self, index)
    }

    fn activate(&mut self) -> bool {
        DriverVm::activate(self)
    }

    fn exit_report(&self) -> Option<String> {
        DriverVm::exit_report(self)
    }

    fn kill(&self) {
        DriverVm::kill(self)
    }

    fn capped(&self) -> bool {
        self.capped.load(Ordering::Acquire)
    }

    fn kill_and_wait(&self, bound: Duration) -> bool {
        DriverVm::kill_and_wait(self, bound)
    }

    fn stop_and_report(&self, bound: Duration) -> bool {
        DriverVm::stop_and_report(self, bound)
    }

    fn wait_released(&self, bound: Duration) -> bool {
        DriverVm::wait_released(self, bound)
    }
}

/// Where a driver VM's report says it crashed or stopped, for the fault
/// log and `status`: `function (file:line)`, with the image's build-id.
/// The report comes from an untrusted vmm: only its `location` and
/// `build_id` are taken, bounded and with control characters dropped.
pub fn crash_site(report: &str) -> Option<String> {
    let report: serde_json::Value = serde_json::from_str(report).ok()?;
    let location = report.get("location")?;
    let text = |value: Option<&serde_json::Value>| -> String {
        let raw = value.and_then(serde_json::Value::as_str).unwrap_or("");
        raw.chars().filter(|&c| crate::untrusted_text::printable(c)).take(200).collect()
    };
    let line = location.get("line").and_then(serde_json::Value::as_u64)?;
    let (function, file) = (text(location.get("function")), text(location.get("file")));
    let build = text(report.get("build_id"));
    let mut site = if function.is_empty() { format!("{file}:{line}") } else { format!("{function} ({file}:{line})") };
    if !build.is_empty() {
        site.push_str(&format!(" [build {build}]"));
    }
    Some(site)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::Tail;

    /// A report line of control characters, each escaped in six bytes, is
    /// cut at [`super::REPORT_LINE_MOST`].
    #[test]
    fn a_report_of_control_characters_is_cut_once_escaped() {
        let flood = vec![1u8; 64 * 1024];
        let line = last_line(&flood[..], 64 * 1024);
        assert!(line.len() <= super::REPORT_LINE_MOST, "{} bytes kept", line.len());
        assert!(line.starts_with("\\u0001"), "{}", &line[..12]);
        assert_eq!(last_line(&b"{\"exit\":\"panic\"}\n"[..], 64 * 1024), "{\"exit\":\"panic\"}");
    }

    /// The last line of what `output` gives until its end, from at most its
    /// last `limit` bytes (lossily decoded, trimmed); memory stays within
    /// three times `limit` whatever the writer sends.
    fn last_line(mut output: impl Read, limit: usize) -> String {
        let mut tail = Tail::new(limit);
        let mut chunk = vec![0u8; limit.clamp(1, 16 * 1024)];
        loop {
            match output.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) => tail.push(&chunk[..read]),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        tail.last_line()
    }

    /// A reader that gives `flood` bytes of `fill` in small pieces, then
    /// `end`, then end-of-file, without ever holding the flood.
    struct Flood {
        left: usize,
        fill: u8,
        end: std::io::Cursor<Vec<u8>>,
    }

    impl std::io::Read for Flood {
        fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return self.end.read(buffer);
            }
            let n = buffer.len().min(self.left).min(4096);
            buffer[..n].fill(self.fill);
            self.left -= n;
            Ok(n)
        }
    }

    #[test]
    fn the_report_after_a_flood_is_kept_and_the_flood_is_not() {
        let report = b"\n{\"outcome\":\"panic\"}\n".to_vec();
        let flood = Flood { left: 64 << 20, fill: b'x', end: std::io::Cursor::new(report) };
        assert_eq!(last_line(flood, 1024), "{\"outcome\":\"panic\"}");
    }

    #[test]
    fn the_last_non_empty_line_is_the_report() {
        assert_eq!(last_line(&b"started\n{\"a\":1}\n\n"[..], 1024), "{\"a\":1}");
        assert_eq!(last_line(&b""[..], 1024), "");
    }

    /// A vmm writing without pause is read no faster than the rate: it
    /// waits on its full pipe, in its own CPU quota, and its report still
    /// comes through. Before, the watcher read all it wrote as fast as it
    /// came, a reflector thread's CPU outside any quota (an adversarial
    /// review found it). A bound, not a timing: the bucket cannot give
    /// more than its burst and its rate over the time it took.
    #[test]
    fn a_flooding_vmms_output_is_read_no_faster_than_its_rate() {
        use std::io::Write;
        use std::os::fd::{FromRawFd, OwnedFd};
        const LIMIT: usize = 16 * 1024;
        const RATE: u64 = 256 * 1024;
        const FLOOD: usize = 384 * 1024;
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) into two ints; checked.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: two fresh descriptors, each owned once from here on.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let writer = std::thread::spawn(move || {
            let mut write = std::fs::File::from(write);
            write.write_all(&vec![b'x'; FLOOD]).unwrap();
            write.write_all(b"\n{\"outcome\":\"exit\"}\n").unwrap();
        });
        let started = std::time::Instant::now();
        let (report, _) = super::read_report(read, None, std::process::id() as libc::pid_t, LIMIT, RATE);
        let took = started.elapsed();
        writer.join().unwrap();
        assert_eq!(report, "{\"outcome\":\"exit\"}");
        let at_least = std::time::Duration::from_secs_f64((FLOOD - 2 * LIMIT) as f64 / RATE as f64);
        assert!(took >= at_least, "{FLOOD} bytes read in {took:?}: faster than {RATE} bytes a second");
    }

    /// What a vmm writes reaches the log and `reflector status`: no escape
    /// sequence, carriage return or text-reordering character of it may
    /// reach them as it is; an honest report is unchanged.
    #[test]
    fn a_report_reaches_the_reflector_with_its_unprintable_characters_escaped() {
        let honest = r#"{"outcome":"panic","message":"naïve \u001b","location":{"line":3}}"#;
        assert_eq!(last_line(honest.as_bytes(), 1024), honest);
        let hostile = "{\"outcome\":\"exit\"}\x1b]0;pwned\x07\r\x1b[1A\u{9b}2J\u{202e}\u{2028}x";
        let line = last_line(hostile.as_bytes(), 1024);
        assert!(line.chars().all(crate::untrusted_text::printable), "{line:?}");
        assert_eq!(line, r#"{"outcome":"exit"}\u001b]0;pwned\u0007\u000d\u001b[1A\u009b2J\u202e\u2028x"#);
    }

    #[test]
    fn a_line_longer_than_the_limit_keeps_only_its_end() {
        let flood = Flood { left: 10_000, fill: b'y', end: std::io::Cursor::new(b"END".to_vec()) };
        let line = last_line(flood, 100);
        assert_eq!(line.len(), 100);
        assert!(line.ends_with("yyyEND"), "{line}");
    }
}

#[cfg(test)]
mod find_vmm_tests {
    use super::find_vmm;
    use std::path::Path;

    /// A vmm named relative to the working directory is the one there,
    /// named absolutely; a missing one is an error naming it.
    #[test]
    fn a_vmm_given_relative_is_found_absolute() {
        let dir = std::env::temp_dir().join(format!("find-vmm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vmm = dir.join("vmm");
        std::fs::write(&vmm, b"").unwrap();
        let here = std::env::current_dir().unwrap();
        let relative = pathdiff(&vmm, &here);
        let found = find_vmm(Some(&relative)).unwrap();
        assert!(found.is_absolute(), "{}", found.display());
        assert_eq!(found, std::fs::canonicalize(&vmm).unwrap());
        let error = find_vmm(Some(Path::new("no-such-vmm-here"))).unwrap_err();
        assert!(error.contains("no-such-vmm-here"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `path` relative to `base` (both absolute): `..` up to their common
    /// part, then down.
    fn pathdiff(path: &Path, base: &Path) -> std::path::PathBuf {
        let (path, base): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
        let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
        let mut relative = std::path::PathBuf::new();
        for _ in common..base.len() {
            relative.push("..");
        }
        for part in &path[common..] {
            relative.push(part);
        }
        relative
    }
}

#[cfg(test)]
mod process_tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::EventFd;

    use super::{DriverLauncher, DriverVm, DriverVmSpec};
    use crate::driver_vms::EXIT_WAIT;

    /// A vmm stand-in: a shell script (it runs unjailed) that does `body`.
    fn stand_in(name: &str, body: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("supervisor-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("marker");
        let script = dir.join("vmm");
        let body = body.replace("MARKER", &marker.display().to_string());
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        (script, marker)
    }

    fn launch(vmm: PathBuf, exited: &EventFd) -> DriverVm {
        launch_with_traps(vmm, exited, Vec::new())
    }

    fn launch_with_traps(vmm: PathBuf, exited: &EventFd, traps: Vec<(u64, crate::hw::TrapWindow)>) -> DriverVm {
        let spec = DriverVmSpec {
            name: "stand-in".into(),
            vmm,
            image: "blk".into(),
            args: String::new(),
            memory: "16M".into(),
            jail: None,
            hosted: false,
        };
        let launcher = DriverLauncher::new(spec, Vec::new(), traps, Vec::new(), 1, exited.try_clone().unwrap());
        launcher.launch(&mut |_| Ok(())).unwrap()
    }

    /// The state letter of `/proc/PID/stat`, or None once the process is
    /// reaped.
    fn state(pid: libc::pid_t) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.split_whitespace().next()?.chars().next()
    }

    /// A compromised vmm may close its standard output (where its report
    /// comes) and run on. Taken for its end, a failover would let the next
    /// driver VM and the replay into the channel while it still wrote there.
    #[test]
    fn the_closing_of_a_driver_vms_output_is_not_taken_for_its_end() {
        let (script, marker) = stand_in("closes-output", "exec 1>&-\n: > MARKER\nexec sleep 60");
        let exited = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let driver = launch(script, &exited);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the stand-in did not start");
            std::thread::yield_now();
        }
        // Its output is closed; the watcher has read its end by now or
        // will soon. It must not report the driver VM gone: it runs.
        let reported = hardware::wait_readable(std::os::fd::AsRawFd::as_raw_fd(&exited), Some(Duration::from_secs(1)));
        let running = state(driver.pid());
        assert!(!reported && driver.exit_report().is_none(), "reported gone while it runs ({running:?})");
        assert!(matches!(running, Some('S' | 'R')), "the stand-in is {running:?}");
        // Once killed and waited for, it has ended.
        assert!(driver.kill_and_wait(EXIT_WAIT), "not gone after a kill");
        let after = state(driver.pid());
        assert!(matches!(after, None | Some('Z' | 'X')), "reported gone, but it is {after:?}");
        assert!(driver.exit_report().is_some());
        let _ = std::fs::remove_dir_all(marker.parent().unwrap());
    }

    /// A started driver VM that could not be handed to its watcher (an
    /// error on the way) is killed and reaped, not left running
    /// unsupervised; one taken runs on.
    #[test]
    fn a_started_child_dropped_unwatched_is_killed_and_reaped() {
        use std::os::fd::AsRawFd;
        let spawn = || super::Unwatched(Some(std::process::Command::new("sleep").arg("30").spawn().unwrap()));
        let unwatched = spawn();
        let pid = unwatched.id() as libc::pid_t;
        let pidfd = super::pidfd_open(pid).unwrap();
        drop(unwatched);
        assert!(hardware::wait_readable(pidfd.as_raw_fd(), Some(Duration::ZERO)), "still running");
        // SAFETY: waitid(2) on our pidfd into a zeroed siginfo; ECHILD once reaped.
        let reaped = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG)
        };
        assert_eq!(reaped, -1, "not reaped");
        let mut taken = spawn();
        let mut child = taken.take().unwrap();
        drop(taken);
        assert_eq!(child.try_wait().unwrap(), None, "a child its watcher took was killed");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A live process's threads are not past their end; an exited one's
    /// (a zombie, not yet reaped) are; a reaped one is left to its pidfd.
    #[test]
    fn only_threads_past_their_end_count_as_ended() {
        assert!(!super::vmm_threads_ended(std::process::id() as libc::pid_t));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        let deadline = Instant::now() + Duration::from_secs(10);
        while state(pid) != Some('Z') {
            assert!(Instant::now() < deadline, "`true` did not end: {:?}", state(pid));
            std::thread::yield_now();
        }
        assert!(super::vmm_threads_ended(pid), "an exited process's threads are past their end");
        child.wait().unwrap();
        assert!(!super::vmm_threads_ended(pid), "a reaped process is left to its pidfd");
    }

    /// A driver VM's connections to its trapped windows end with its
    /// record, whether it used them or not: a driver VM killed before its
    /// first access was read could otherwise leave it to reach the device
    /// its successor drives.
    #[test]
    fn a_driver_vms_trapped_window_connections_are_revoked_with_its_record_and_not_before() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let revoked = Arc::new(AtomicUsize::new(0));
        let connect = {
            let revoked = revoked.clone();
            move || {
                let (socket, _) = std::os::unix::net::UnixStream::pair()?;
                let revoked = revoked.clone();
                Ok(crate::hw::TrapConnection {
                    socket: socket.into(),
                    posted: Vec::new(),
                    grant: hardware::AccessGrant::new(move || {
                        revoked.fetch_add(1, Ordering::SeqCst);
                    }),
                })
            }
        };
        let trap = crate::hw::TrapWindow { name: "regs", size: 4096, posted: Vec::new(), connect: Arc::new(connect) };
        let (script, marker) = stand_in("trapped", ": > MARKER\nexec sleep 60");
        let exited = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let driver = launch_with_traps(script, &exited, vec![(0x4000_0000, trap)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the stand-in did not start");
            std::thread::yield_now();
        }
        assert_eq!(revoked.load(Ordering::SeqCst), 0, "a running driver VM's connection was revoked");
        assert!(driver.kill_and_wait(EXIT_WAIT), "not gone after a kill");
        drop(driver);
        assert_eq!(revoked.load(Ordering::SeqCst), 1, "a dead driver VM's connection outlived its record");
        let _ = std::fs::remove_dir_all(marker.parent().unwrap());
    }

    /// Its report still comes through when the vmm writes it and ends.
    #[test]
    fn a_driver_vms_report_is_read_to_its_end() {
        let (script, _) = stand_in("reports", "echo 'starting'\necho '{\"outcome\":\"exit\",\"code\":0}'");
        let exited = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let driver = launch(script.clone(), &exited);
        assert!(hardware::wait_readable(std::os::fd::AsRawFd::as_raw_fd(&exited), Some(EXIT_WAIT)), "no exit seen");
        assert_eq!(driver.exit_report().as_deref(), Some("{\"outcome\":\"exit\",\"code\":0}"));
        let _ = std::fs::remove_dir_all(script.parent().unwrap());
    }
}
