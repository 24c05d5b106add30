//! The driver VMs behind one device: the one serving it, an optional
//! spare (a standby or a warm one), and the interrupt routing that makes a replacement the device's
//! new owner. Shared by the block and net devices, which decide *when* to
//! replace a driver VM (their recovery); this decides *how*.
//!
//! Wiring convention (both drivers): interrupt line 0 is the reflector's
//! "requests published", line 1 the hardware's interrupt.

use hardware::shared_eventfd::SharedEventFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::hw::InterruptRoute;
use crate::spare_starter::SpareStarter;

/// The spare a device keeps ready to replace its driver VM (`spare=`;
/// `off`, none, is `Option::None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpareKind {
    /// A started, jailed vmm whose VM is built and confined, waiting
    /// before its guest's first instruction (`spare=standby`, the
    /// default): a restart skips the fork, the jail, the exec and the VM's
    /// construction, and still boots the driver from its first
    /// instruction. It costs a blocked process and its page tables, not a
    /// booted guest.
    Standby,
    /// A booted driver VM waiting before it touches the device or the
    /// channel (`spare=warm`, or `on`): a restart skips the boot too.
    Warm,
}

impl SpareKind {
    /// Its `spare=` value.
    pub fn name(self) -> &'static str {
        match self {
            SpareKind::Standby => "standby",
            SpareKind::Warm => "warm",
        }
    }

    /// A `spare=` setting's name (`off` for none).
    pub fn setting(spare: Option<SpareKind>) -> &'static str {
        spare.map_or("off", SpareKind::name)
    }
}

/// Starts the driver VMs of one device: the seam between a device and how
/// its drivers run. In the reflector a [`crate::supervisor::DriverLauncher`]
/// starts `vmm` processes; the device's unit tests plug in drivers that run
/// as threads, so recovery can be tested without KVM.
pub trait DriverLaunch: Send + Sync {
    /// The driver VMs' name.
    fn name(&self) -> &str;
    /// Starts a driver that serves at once. `route` gets its interrupt
    /// lines (0: requests published, 1: the hardware's interrupt) before it
    /// runs, so that no device interrupt can be lost.
    fn launch(
        &self,
        route: &mut dyn FnMut(&[SharedEventFd]) -> std::io::Result<()>,
    ) -> std::io::Result<Box<dyn DriverProcess>>;
    /// Starts a spare of `kind`: it waits for [`DriverProcess::activate`]
    /// before it touches the device or the channel; a warm one boots
    /// first, a standby runs no guest code.
    fn launch_spare(&self, kind: SpareKind) -> std::io::Result<Box<dyn DriverProcess>>;
    /// Takes down what its drivers ran in (a jail's cgroups), once every
    /// driver it started has been released (the reflector is stopping).
    fn end(&self) {}
}

/// One running driver (a driver VM process).
pub trait DriverProcess: Send + Sync {
    /// Its process id, for status and the resource watch.
    fn pid(&self) -> libc::pid_t;
    /// Its interrupt line `index` (an eventfd).
    fn interrupt(&self, index: usize) -> Option<&SharedEventFd>;
    /// Lets a warm spare start serving; false if this is not one or it
    /// could not be told.
    fn activate(&mut self) -> bool;
    /// How it ended (its report, empty if it gave none) once it can no
    /// longer run; None while it may still run.
    fn exit_report(&self) -> Option<String>;
    /// Whether its jail's memory cap killed it (once it has ended).
    fn capped(&self) -> bool {
        false
    }
    /// The CPU time it has used so far: all of its processes', where its
    /// jail counts them together (its memory cgroup), else its own.
    fn cpu_time(&self) -> std::io::Result<std::time::Duration> {
        crate::driver_watch::process_cpu_time(self.pid())
    }
    /// Kills it if it still runs; its end is then reported as an exit.
    fn kill(&self);
    /// Kills it and waits, at most `bound`, until it can no longer run;
    /// whether it got there.
    fn kill_and_wait(&self, bound: std::time::Duration) -> bool;
    /// Asks it to stop where it is and report where (before it is killed
    /// for a missed deadline) and waits at most `bound`; whether it ended.
    fn stop_and_report(&self, bound: std::time::Duration) -> bool {
        let _ = bound;
        false
    }
    /// Waits, at most `bound`, until it is reaped and has let go of what
    /// it was lent (its memory cgroup); whether it got there.
    fn wait_released(&self, bound: std::time::Duration) -> bool {
        let _ = bound;
        true
    }
}

/// Longest wait for a hung driver VM's report of where it was before it is
/// killed: a vmm stops its vCPU and writes one line in well under a
/// millisecond; a hostile one that ignores the request costs this much.
pub const REPORT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Longest wait at shutdown for the killed driver VMs of a device to be
/// reaped: the VM's teardown after its files close takes about 15 ms here
/// (DESIGN.md); a process stuck longer is left to end with the reflector.
pub const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Longest wait for a killed driver VM to stop running. SIGKILL to closed
/// files takes about a millisecond here; a process that takes longer is
/// stuck in the kernel, and recovery cannot wait for it forever.
pub const EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The current driver VM of a device and its spare.
pub struct DriverVms {
    launcher: Arc<dyn DriverLaunch>,
    device_interrupt: Arc<InterruptRoute>,
    /// The current driver VM's request interrupt (its line 0).
    request_interrupt: SharedEventFd,
    current: Option<Box<dyn DriverProcess>>,
    /// A spare waiting to replace `current` (when configured).
    spare: Option<Box<dyn DriverProcess>>,
    spare_kind: Option<SpareKind>,
    /// A spare is to be started once the current recovery has completed.
    spare_wanted: bool,
    /// Starts spares off the worker (`spare_starter`).
    starter: SpareStarter,
    /// Spares that failed to start or died waiting, in a row: past
    /// [`SPARE_FAILURES`] no more is wanted until the next restart.
    spare_failures: u32,
    /// Stopped for good: no driver VM is started again (a hang timer, a
    /// restart timer or a recover that fires while the reflector stops
    /// its other devices finds none to start).
    stopped: bool,
    /// Shut down: its driver VMs released and its jail ended.
    ended: bool,
    /// Driver VMs killed by [`DriverVms::stop`], for `shutdown` to wait
    /// for: no longer current nor spare, so their exits are no faults.
    ending: Vec<Box<dyn DriverProcess>>,
}

/// Spares that may fail in a row (not start, or die before they are used)
/// before a device stops asking for one until its next restart: a spare
/// whose driver cannot boot must not become a start loop in the watch.
pub const SPARE_FAILURES: u32 = 3;

impl DriverVms {
    /// Starts the first driver VM, and a warm spare if `spare_kind` asks
    /// for one. A standby is only wanted: [`DriverVms::launch_wanted_spare`]
    /// starts it once the device serves (a fleet's start would otherwise
    /// take twice the jailed starts: 100 devices attached after 1.6 s
    /// instead of 0.8 s).
    pub fn start(
        launcher: Box<dyn DriverLaunch>,
        device_interrupt: Arc<InterruptRoute>,
        spare_kind: Option<SpareKind>,
    ) -> std::io::Result<Self> {
        let launcher: Arc<dyn DriverLaunch> = Arc::from(launcher);
        let (current, request_interrupt) = launch_routed(launcher.as_ref(), &device_interrupt)?;
        let spare = match spare_kind {
            Some(SpareKind::Warm) => Some(launcher.launch_spare(SpareKind::Warm)?),
            None | Some(SpareKind::Standby) => None,
        };
        Ok(DriverVms {
            starter: SpareStarter::new()?,
            launcher,
            device_interrupt,
            request_interrupt,
            current: Some(current),
            spare,
            spare_kind,
            spare_wanted: spare_kind == Some(SpareKind::Standby),
            spare_failures: 0,
            stopped: false,
            ended: false,
            ending: Vec::new(),
        })
    }

    /// The driver VMs' name.
    pub fn name(&self) -> &str {
        self.launcher.name()
    }

    /// Whether they were stopped for good ([`DriverVms::stop`]).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Raised after publishing requests, when the driver may sleep.
    pub fn request_interrupt(&self) -> &SharedEventFd {
        &self.request_interrupt
    }

    /// The CPU time the current driver VM has used so far.
    pub fn current_cpu_time(&self) -> Option<std::io::Result<std::time::Duration>> {
        self.current.as_ref().map(|current| current.cpu_time())
    }

    /// The current driver VM's pid, if one runs.
    pub fn current_pid(&self) -> Option<libc::pid_t> {
        self.current.as_ref().map(|driver| driver.pid())
    }

    /// The spare's pid, if one is started.
    pub fn spare_pid(&self) -> Option<libc::pid_t> {
        self.spare.as_ref().map(|driver| driver.pid())
    }

    /// SIGKILLs the current driver VM (an operator or chaos asked); its exit
    /// then arrives as a fault.
    pub fn kill_current(&self) {
        if let Some(driver) = &self.current {
            tracing::info!(driver_vm = %self.name(), pid = driver.pid(), "killing the driver VM on request");
            driver.kill();
        }
    }

    /// Kills the current driver VM after a fault and waits until it can no
    /// longer run (bounded by [`EXIT_WAIT`]); none runs until `replace`.
    /// With `report_first` (a hang), first asks it where it is (bounded by
    /// [`REPORT_WAIT`]). Returns its report.
    pub fn drop_current(&mut self, report_first: bool) -> Option<String> {
        let driver = self.current.take()?;
        if report_first && !driver.stop_and_report(REPORT_WAIT) {
            tracing::debug!(driver_vm = %self.name(), pid = driver.pid(), "no report from the hung driver VM");
        }
        if !driver.kill_and_wait(EXIT_WAIT) {
            tracing::error!(
                driver_vm = %self.name(),
                pid = driver.pid(),
                "the killed driver VM has not exited after {EXIT_WAIT:?}; recovering anyway"
            );
        }
        driver.exit_report().filter(|report| !report.is_empty())
    }

    /// Kills every driver VM for good (the reflector is stopping), without
    /// waiting: a reflector stops all its devices' driver VMs at once, then
    /// waits for them ([`DriverVms::shutdown`]). None is started again.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        self.ending = [self.current.take(), self.spare.take()].into_iter().flatten().collect();
        for driver in &self.ending {
            driver.kill();
        }
    }

    /// [`DriverVms::stop`], then waits (at most [`RELEASE_WAIT`] in all)
    /// until the driver VMs are reaped, and takes down their jail's cgroups
    /// (waiting at most the jail's own bound for each to empty), which
    /// would otherwise outlive the reflector until the next one's sweep.
    /// Once: a second call does nothing.
    pub fn shutdown(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.stop();
        // A spare still starting is killed as soon as it has started (a
        // start stuck past the bound ends with the reflector).
        match self.starter.wait(RELEASE_WAIT) {
            Some(Ok(spare)) => {
                spare.kill();
                self.ending.push(spare);
            }
            Some(Err(error)) => tracing::warn!(driver_vm = %self.name(), %error, "the spare being started at shutdown"),
            None => {}
        }
        let drivers = std::mem::take(&mut self.ending);
        let deadline = std::time::Instant::now() + RELEASE_WAIT;
        for driver in &drivers {
            if !driver.wait_released(deadline.saturating_duration_since(std::time::Instant::now())) {
                tracing::warn!(driver_vm = %self.name(), pid = driver.pid(), "a killed driver VM was not reaped in {RELEASE_WAIT:?}");
            }
        }
        drop(drivers);
        self.launcher.end();
    }

    /// Makes a new driver VM current: the spare if one is alive, else a
    /// cold start. Returns its pid and the kind of the spare it was (None:
    /// a new vmm was started). The next spare is
    /// wanted, to be started by [`DriverVms::launch_wanted_spare`] once the
    /// recovery has completed a request: its start would otherwise compete
    /// for the two cores with the new driver's reset and the replay.
    pub fn replace(&mut self) -> std::io::Result<(libc::pid_t, Option<SpareKind>)> {
        // A spare still starting is not waited for: a cold start now, and
        // it becomes the spare when it is ready.
        self.collect_spare();
        let (driver, started) = match self.spare.take() {
            Some(spare) if spare.exit_report().is_none() => self.activate_spare(spare)?,
            dead => {
                if let Some(dead) = dead {
                    dead.kill();
                }
                (self.launch_cold()?, None)
            }
        };
        let pid = driver.pid();
        self.current = Some(driver);
        self.spare_wanted = self.spare_kind.is_some();
        self.spare_failures = 0;
        Ok((pid, started))
    }

    /// Starts the spare that `start` or `replace` asked for, if any, on the
    /// starter's thread: this returns at once, and the spare is taken when
    /// [`DriverVms::spare_event`] fires ([`DriverVms::collect_spare`]).
    pub fn launch_wanted_spare(&mut self) {
        if !self.spare_wanted || self.spare.is_some() || self.starter.busy() || self.stopped {
            return;
        }
        self.spare_wanted = false;
        let Some(kind) = self.spare_kind else { return };
        if let Err(error) = self.starter.start(self.launcher.clone(), kind) {
            tracing::error!(driver_vm = %self.name(), %error, "cannot start a spare");
            self.spare_failed();
        }
    }

    /// Signalled when a spare's start has ended: the worker then calls
    /// [`DriverVms::collect_spare`].
    pub fn spare_event(&self) -> &EventFd {
        self.starter.event()
    }

    /// Takes the spare whose start has ended, if one has: it becomes the
    /// spare, or counts as a failed one. Never waits.
    pub fn collect_spare(&mut self) {
        let Some(started) = self.starter.take_finished() else { return };
        match started {
            Ok(spare) if self.stopped || self.spare.is_some() => {
                spare.kill();
                self.ending.push(spare);
            }
            Ok(spare) => match spare.exit_report() {
                None => self.spare = Some(spare),
                Some(report) => {
                    tracing::warn!(driver_vm = %self.name(), %report, "the spare exited as it started");
                    self.spare_failed();
                }
            },
            Err(error) => {
                tracing::error!(driver_vm = %self.name(), %error, "cannot start a spare");
                self.spare_failed();
            }
        }
    }

    /// A spare did not start or died waiting: another is wanted, up to
    /// [`SPARE_FAILURES`] in a row.
    fn spare_failed(&mut self) {
        self.spare_failures += 1;
        self.spare_wanted = self.spare_kind.is_some() && self.spare_failures < SPARE_FAILURES;
        if !self.spare_wanted {
            tracing::warn!(
                driver_vm = %self.name(),
                failures = self.spare_failures,
                "no spare until the next restart: the last ones failed"
            );
        }
    }

    /// After "a driver VM exited": forgets a dead spare, and returns the
    /// current driver VM's exit report, and whether its memory cap killed
    /// it, if it is the one that exited (exits of driver VMs killed on
    /// purpose arrive too, and are not faults).
    pub fn exited(&mut self) -> Option<(String, bool)> {
        self.collect_spare();
        if let Some(report) = self.spare.as_ref().and_then(|spare| spare.exit_report()) {
            tracing::warn!(driver_vm = %self.name(), %report, "the spare exited");
            self.spare = None;
            self.spare_failed();
        }
        let current = self.current.as_ref()?;
        Some((current.exit_report()?, current.capped()))
    }

    /// Routes interrupts to a spare, then lets it go; a cold start if
    /// that fails.
    fn activate_spare(
        &mut self,
        mut spare: Box<dyn DriverProcess>,
    ) -> std::io::Result<(Box<dyn DriverProcess>, Option<SpareKind>)> {
        match take_over(spare.as_ref(), &self.device_interrupt) {
            Ok(request) if spare.activate() => {
                self.request_interrupt = request;
                Ok((spare, self.spare_kind))
            }
            _ => {
                spare.kill();
                Ok((self.launch_cold()?, None))
            }
        }
    }

    /// Starts a fresh driver VM, its interrupts routed before it runs.
    fn launch_cold(&mut self) -> std::io::Result<Box<dyn DriverProcess>> {
        if self.stopped {
            return Err(stopping());
        }
        let (driver, request) = launch_routed(self.launcher.as_ref(), &self.device_interrupt)?;
        self.request_interrupt = request;
        Ok(driver)
    }
}

/// Why a device that was stopped starts no driver VM.
fn stopping() -> std::io::Error {
    std::io::Error::other("the device was stopped (the reflector is stopping): no driver VM is started again")
}

/// Makes the VM owning `lines` the target of the device's interrupt (its
/// line 1); returns its request interrupt (line 0) for the reflector to raise.
fn route_lines(lines: &[SharedEventFd], device_interrupt: &InterruptRoute) -> std::io::Result<SharedEventFd> {
    let (Some(request), Some(device)) = (lines.first(), lines.get(1)) else {
        return Err(std::io::Error::other("driver VM without interrupt lines"));
    };
    device_interrupt.route(device.try_clone()?);
    request.try_clone()
}

/// Makes a running (spare) driver VM the interrupts' target.
fn take_over(driver: &dyn DriverProcess, device_interrupt: &InterruptRoute) -> std::io::Result<SharedEventFd> {
    let lines: Vec<SharedEventFd> = (0..2).filter_map(|i| driver.interrupt(i)?.try_clone().ok()).collect();
    route_lines(&lines, device_interrupt)
}

/// Starts a driver VM whose interrupts are routed before it runs, so that
/// no device interrupt can be lost between its start and the routing.
fn launch_routed(
    launcher: &dyn DriverLaunch,
    device_interrupt: &InterruptRoute,
) -> std::io::Result<(Box<dyn DriverProcess>, SharedEventFd)> {
    let mut request = None;
    let driver = launcher.launch(&mut |lines| {
        request = Some(route_lines(lines, device_interrupt)?);
        Ok(())
    })?;
    let request = request.ok_or_else(|| std::io::Error::other("the launcher did not route interrupts"))?;
    Ok((driver, request))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A driver that ends when killed.
    struct Process {
        lines: [SharedEventFd; 2],
        ended: AtomicBool,
    }

    impl DriverProcess for Process {
        fn pid(&self) -> libc::pid_t {
            1
        }
        fn interrupt(&self, index: usize) -> Option<&SharedEventFd> {
            self.lines.get(index)
        }
        fn activate(&mut self) -> bool {
            true
        }
        fn exit_report(&self) -> Option<String> {
            self.ended.load(Ordering::SeqCst).then(String::new)
        }
        fn kill(&self) {
            self.ended.store(true, Ordering::SeqCst);
        }
        fn kill_and_wait(&self, _bound: std::time::Duration) -> bool {
            self.kill();
            true
        }
    }

    #[derive(Default)]
    struct Launch {
        started: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
    }

    impl Launch {
        fn process(&self) -> std::io::Result<Box<dyn DriverProcess>> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let line = SharedEventFd::new;
            Ok(Box::new(Process { lines: [line()?, line()?], ended: AtomicBool::new(false) }))
        }
    }

    impl DriverLaunch for Launch {
        fn name(&self) -> &str {
            "fake"
        }
        fn launch(
            &self,
            route: &mut dyn FnMut(&[SharedEventFd]) -> std::io::Result<()>,
        ) -> std::io::Result<Box<dyn DriverProcess>> {
            let process = self.process()?;
            let lines: Vec<SharedEventFd> = (0..2).filter_map(|i| process.interrupt(i)?.try_clone().ok()).collect();
            route(&lines)?;
            Ok(process)
        }
        fn launch_spare(&self, _kind: SpareKind) -> std::io::Result<Box<dyn DriverProcess>> {
            self.process()
        }
        fn end(&self) {
            self.ended.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn stopped_driver_vms_are_killed_at_once_their_exits_are_no_faults_and_none_starts_again() {
        let launch = Launch::default();
        let (started, ended) = (launch.started.clone(), launch.ended.clone());
        let mut drivers =
            DriverVms::start(Box::new(launch), Arc::new(InterruptRoute::default()), Some(SpareKind::Warm)).unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2, "the driver VM and its warm spare");
        drivers.stop();
        // Both are killed and have ended: the worker that sees their exits
        // before the shutdown must not take them for a fault (a fault
        // retires the device's hardware, which is being stopped too).
        assert_eq!(drivers.exited(), None);
        assert_eq!((drivers.current_pid(), drivers.spare_pid()), (None, None));
        assert!(drivers.replace().is_err(), "a driver VM was started after the stop");
        drivers.launch_wanted_spare();
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert_eq!(ended.load(Ordering::SeqCst), 0, "the stop waits for nothing and ends nothing");
        drivers.shutdown();
        drivers.shutdown();
        assert_eq!(ended.load(Ordering::SeqCst), 1, "the jail ends once");
    }
}
