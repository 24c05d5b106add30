//! `hardware`: the devices driver VMs drive, behind one trait
//! ([`Hardware`]: windows, doorbell, interrupt, quiesce and resume, DMA only
//! into the region it is given), extended by [`BlockHardware`] and
//! [`NetHardware`]. The simulated storage controller and network card (and
//! their switch and TAP port) implement it today; QEMU's device models and
//! VFIO functions plug in at the same seam.
//!
//! What it is not: a judge of anything a driver says (the reflector's
//! `driver_answers`), nor a reader of client memory by any address of its
//! own: a device reaches client memory only through the per-request
//! windows the reflector maps for it ([`dma_windows`], `dma=direct`). It
//! trusts the driver with nothing: every register a driver writes is
//! checked by the device.

pub mod descriptors;
pub mod dma_windows;
pub mod memory_disk;
pub mod qemu;
pub mod shared_eventfd;
pub mod shm;
pub mod sim_nic;
pub mod sim_storage;
pub mod switch;
pub mod tap;
pub mod vfio;
pub mod write_ledger;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::shared_eventfd::SharedEventFd;
use crate::shm::SharedMemory;

/// Where a device that reaches its DMA region by address sees its first
/// byte, whether a QEMU model (the region is a memory device there) or a
/// VFIO function (the IOMMU maps it there): above 4 GiB, clear of the
/// legacy holes below 1 MiB that would swallow DMA into low RAM. The
/// driver learns it from the channel header.
pub const DMA_BASE: u64 = 0x1_0000_0000;

/// A window of the device mapped into the driver VM.
pub struct HardwareWindow {
    /// Name the driver looks it up by.
    pub name: &'static str,
    /// The memory behind it.
    pub memory: Arc<SharedMemory>,
}

/// A window of the device no memory backs: the driver VM's accesses to it
/// trap, and its vmm forwards them over a connection `connect` makes (one
/// per driver VM).
#[derive(Clone)]
pub struct TrapWindow {
    /// Name the driver looks it up by.
    pub name: &'static str,
    /// Bytes.
    pub size: u64,
    /// Its posted registers (offsets): writes the vmm signals by KVM
    /// ioeventfd instead of forwarding (`guest_abi::trap`).
    pub posted: Vec<u64>,
    /// Makes a new connection; returns the vmm's ends.
    pub connect: Arc<dyn Fn() -> std::io::Result<TrapConnection> + Send + Sync>,
}

/// The vmm's ends of one driver VM's connection to a trapped window.
pub struct TrapConnection {
    /// The socket its accesses come over (`--trap ...,fd=`).
    pub socket: std::os::fd::OwnedFd,
    /// One eventfd per posted register, in [`TrapWindow::posted`]'s order
    /// (`--trap ...,posted=OFFSET:FD`).
    pub posted: Vec<std::os::fd::OwnedFd>,
    /// The driver VM's right to reach the device through this connection.
    pub grant: AccessGrant,
}

/// One driver VM's right to reach a trapped window: dropping it revokes
/// the connection, used or not, and returns only once no access of it is
/// under way or can come. Its driver VM's record holds it, so a driver
/// VM's connection ends with the driver VM (whatever it left queued in its
/// socket, or signalled on its posted registers, never reaches the device
/// its successor drives), even one whose process has not been seen to end.
pub struct AccessGrant(Option<Box<dyn FnOnce() + Send + Sync>>);

impl AccessGrant {
    /// A grant that runs `revoke` when dropped.
    pub fn new(revoke: impl FnOnce() + Send + Sync + 'static) -> Self {
        AccessGrant(Some(Box::new(revoke)))
    }

    /// A grant of nothing (a connection that reaches no device).
    pub fn none() -> Self {
        AccessGrant(None)
    }
}

impl Drop for AccessGrant {
    fn drop(&mut self) {
        if let Some(revoke) = self.0.take() {
            revoke();
        }
    }
}

/// A device as a driver VM sees it, whatever its kind: the seam where a
/// simulated device, a QEMU device model or a VFIO function plugs in.
pub trait Hardware: Send + Sync {
    /// Windows to map into the driver VM.
    fn windows(&self) -> Vec<HardwareWindow>;
    /// Windows whose accesses trap and are forwarded (a device model's
    /// BAR); none for memory-mapped devices.
    fn traps(&self) -> Vec<TrapWindow> {
        Vec::new()
    }
    /// Written by the driver VM (KVM ioeventfd) to notify the device.
    fn doorbell(&self) -> &SharedEventFd;
    /// Where the device's interrupt goes: the current driver VM's line.
    fn interrupt(&self) -> Arc<InterruptRoute>;
    /// Stops all DMA, finishing any command under way first, and ignores
    /// the window (resets included) until [`Hardware::resume`]: the host's
    /// analogue of disabling bus mastering when a driver VM died, so that
    /// nothing the dead driver queued can run after the reflector reused
    /// its bounce slots for the replay.
    fn quiesce(&self);
    /// Lets the next driver VM (started after the old one can no longer
    /// run) reset and use the device.
    fn resume(&self);
    /// Drivers keep dying as they start: the device may hold state a dead
    /// driver left that outlives its reset (a device model's namespace
    /// formatted to another block format). Hardware that can, starts
    /// afresh at the next [`Hardware::resume`] (a device model: a new QEMU
    /// process); a simulated device has no such state.
    fn renew(&self) {}
    /// Hardware that can fail on its own (a device model's process dying)
    /// writes `failure` when it does: the device kills its driver VM, and
    /// the hardware is restarted in [`Hardware::resume`] before the next
    /// one starts. Simulated devices never fail so.
    fn watch_failure(&self, _failure: EventFd) {}
    /// The reflector is stopping: ends what runs the hardware now (a device
    /// model's process: killed, never started again), leaving what it ran
    /// in to [`Hardware::shut_down`], so that a reflector stops all its
    /// devices' processes at once and then waits for them together.
    /// Simulated devices have nothing of the kind.
    fn stop(&self) {}
    /// The work the device does for its drivers on the reflector's own
    /// threads, and what it may do ([`WorkAllowance`]), so that a driver
    /// cannot spend the host's CPU through its device while its own vCPU
    /// sleeps under its quota. None where the device's work is not the
    /// reflector's (a device model's process, under its jail's limits; a
    /// real device; a memory disk, which the driver's vCPU copies); a
    /// device model's card has one, for the frames the reflector's thread
    /// carries from it into the switch.
    fn work(&self) -> Option<&WorkAllowance> {
        None
    }
    /// The reflector is stopping: [`Hardware::stop`] if not yet done, then
    /// ends what the hardware's process ran in (its jail's cgroups).
    fn shut_down(&self) {}
}

/// A block device: its medium.
pub trait BlockHardware: Hardware {
    /// Size of the medium in 512-byte sectors.
    fn capacity_sectors(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// How many cache flushes of the medium the device has started and
    /// completed, counted by the device itself (never by the driver): the
    /// reflector's evidence that a flush a driver acknowledges really ran.
    /// A cheap read: the reflector asks for it with every completion.
    fn flushes(&self) -> FlushCount;
    /// Called once when a flush request goes to the driver: the mark it is
    /// judged against (acknowledged truthfully once `flushes().completed`
    /// exceeds it). By default the flushes the device has started so far;
    /// a device whose flushes the host performs itself does one here.
    fn flush_mark(&self) -> u64 {
        self.flushes().started
    }
    /// The per-request DMA windows the device's data transfers go through
    /// instead of the bounce slots (`dma=direct`), if it was started with
    /// them: the reflector then maps each request's client buffers there
    /// rather than copying its payload.
    fn dma_windows(&self) -> Option<Arc<dma_windows::DmaWindows>> {
        None
    }
    /// The device's own record of the writes it performed, by slot
    /// ([`write_ledger::WriteLedger`]): the reflector's evidence that a
    /// write a driver acknowledges was done. None where the device keeps
    /// none the host can read (a write's answer is then taken on trust).
    fn write_ledger(&self) -> Option<&write_ledger::WriteLedger> {
        None
    }
    /// The medium as the host itself reads it, where it can: a raw image
    /// whose sector N is at byte 512·N, which the device writes through
    /// the page cache (QEMU's NVMe model, the memory disk). The reflector's
    /// evidence that a write a driver acknowledges is on it: each one is
    /// read back and compared with what was sent. None where only the
    /// device reaches its medium (a VFIO function) or where the device
    /// keeps its own record of its writes ([`BlockHardware::write_ledger`]).
    fn medium(&self) -> Option<&std::fs::File> {
        None
    }
}

/// Flushes of a medium, counted by its device. One at a time: a flush
/// numbered `started` at some moment has completed once `completed`
/// reaches that number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushCount {
    /// Flushes begun.
    pub started: u64,
    /// Flushes finished (successfully or not: a failed one the driver
    /// reports as an error).
    pub completed: u64,
    /// A sync of the medium has failed (a host write-back error): what it
    /// covered may be lost, and the host reports such an error once per
    /// descriptor, so a later sync may pass all the same. No flush can be
    /// acknowledged from then on, whatever the driver answers.
    pub medium_failed: bool,
}

/// Flushes the host makes itself, for a device that keeps no flush count
/// of its own a driver could not fake (QEMU's NVMe model, the memory
/// disk): each flush request syncs the image (`fdatasync` on the host's own
/// descriptor, through the page cache the device writes) and is counted.
/// Every write the device performed before the flush was sent is then on
/// the medium, whatever the driver answers; one sync per flush request. (A
/// write the driver answered without having the device perform it is not;
/// the reflector reads each acknowledged write back from this image,
/// [`BlockHardware::medium`].)
pub struct HostSync {
    image: std::fs::File,
    counts: Mutex<FlushCount>,
    /// For the log, when a sync fails.
    what: &'static str,
}

impl HostSync {
    /// Syncs `image` (called `what` in the log) on every mark.
    pub fn new(image: std::fs::File, what: &'static str) -> Self {
        HostSync { image, counts: Mutex::new(FlushCount::default()), what }
    }

    /// The image it syncs ([`BlockHardware::medium`]).
    pub fn image(&self) -> &std::fs::File {
        &self.image
    }

    /// The syncs so far ([`BlockHardware::flushes`]).
    pub fn counts(&self) -> FlushCount {
        self.counts.lock().map(|counts| *counts).unwrap_or_default()
    }

    /// Syncs now; the mark the flush is judged against
    /// ([`BlockHardware::flush_mark`]).
    pub fn mark(&self) -> u64 {
        let Ok(mut counts) = self.counts.lock() else { return u64::MAX };
        let mark = counts.started;
        counts.started += 1;
        // SAFETY: fdatasync on a descriptor this struct owns.
        if unsafe { libc::fdatasync(self.image.as_raw_fd()) } == 0 {
            counts.completed = counts.started;
        } else {
            tracing::error!(
                error = %std::io::Error::last_os_error(),
                "cannot sync {}: every flush fails from now on (check the host's storage, then serve the disk again)",
                self.what
            );
            counts.medium_failed = true;
        }
        mark
    }
}

/// What one command or frame costs a device besides its bytes, in the
/// units of [`WorkAllowance`]: a command's own handling (a completion, a
/// `pread` or `pwrite` call) costs about what a 4 KiB copy does.
pub const COMMAND_WORK: u64 = 4096;

/// What a flush costs a block device, in the same units: an `fdatasync`
/// of the image, from tens of microseconds to milliseconds, about what a
/// 1 MiB copy does.
pub const FLUSH_WORK: u64 = 1 << 20;

/// The work of one block command: a flush's, or `len` bytes moved.
pub fn block_work(flush: bool, len: u32) -> u64 {
    if flush {
        FLUSH_WORK
    } else {
        u64::from(len) + COMMAND_WORK
    }
}

/// Work a block device may do beyond what the reflector granted, for each
/// driver VM: a driver's own set-up, and what was granted and done in
/// another order. 64 MiB of copying is about 5 ms of a core here.
pub const WORK_SPARE: u64 = 64 << 20;

/// How long [`WorkAllowance::wait_for_grant`] waits before it looks at a
/// spent allowance again: the next grant comes with the next request handed
/// to the driver, and a millisecond's wait is a thousand wake-ups a second
/// of an idle thread at most.
pub const GRANT_WAIT: Duration = Duration::from_millis(1);

/// The work a simulated device does for its drivers, counted by the device
/// itself (each data transfer's bytes, and [`COMMAND_WORK`] for each
/// command or transmitted frame; received frames are the wire's doing),
/// and the work the reflector granted as it handed requests to the driver.
/// The device runs a command only while its work is within the grant and a
/// spare ([`WORK_SPARE`] for a block device): past that it waits for more
/// to be granted, so a driver giving its device work no request asked for
/// gets at most the spare, and whatever it saved of the grants of requests
/// it served with less (for as long as it lives: a new driver gets the
/// spare alone, [`WorkAllowance::forgive`]).
#[derive(Debug)]
pub struct WorkAllowance {
    /// Written by the device's thread for each command...
    done: OwnLine,
    /// ... and by the reflector's worker for each request: kept on cache
    /// lines of their own, so that neither write takes the other's line.
    granted: OwnLine,
    spare: u64,
}

/// A counter alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct OwnLine(std::sync::atomic::AtomicU64);

impl std::ops::Deref for OwnLine {
    type Target = std::sync::atomic::AtomicU64;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl WorkAllowance {
    /// An allowance with `spare` beyond the grants, for each driver VM.
    pub fn with_spare(spare: u64) -> Self {
        WorkAllowance { done: Default::default(), granted: Default::default(), spare }
    }

    /// The reflector grants `work` more (a request handed to the driver).
    pub fn grant(&self, work: u64) {
        self.granted.fetch_add(work, std::sync::atomic::Ordering::AcqRel);
    }

    /// The device did `work`.
    pub fn spend(&self, work: u64) {
        self.done.fetch_add(work, std::sync::atomic::Ordering::AcqRel);
    }

    /// The work done so far.
    pub fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The work granted so far (raised to what was done at each
    /// [`WorkAllowance::forgive`]).
    pub fn granted(&self) -> u64 {
        self.granted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A new driver starts with the spare, no more and no less: what a dead
    /// one overspent is forgiven, and what it saved (grants of requests it
    /// answered without doing them, frames it never sent) is forgotten, so
    /// that no later driver of the device may spend it (the device resumes
    /// for the next; the worker that grants is the one that resumes).
    pub fn forgive(&self) {
        self.granted.store(self.done(), std::sync::atomic::Ordering::Release);
    }

    /// Whether the device must wait for a grant before it does more.
    pub fn exhausted(&self) -> bool {
        self.done() > self.granted().saturating_add(self.spare)
    }

    /// Waits while the allowance is spent, looking again every
    /// [`GRANT_WAIT`], until more is granted (true) or `gone` says there
    /// is no longer anything to wait for (false): a thread that carries a
    /// driver's work without a doorbell of its own to sleep on (a device
    /// model's wire, its BAR0 proxy).
    pub fn wait_for_grant(&self, gone: impl Fn() -> bool) -> bool {
        while self.exhausted() {
            if gone() {
                return false;
            }
            std::thread::sleep(GRANT_WAIT);
        }
        true
    }

    /// Spends `work` on a command the device may run now: false, spending
    /// nothing, when it must wait for a grant first.
    pub fn try_spend(&self, work: u64) -> bool {
        if self.exhausted() {
            return false;
        }
        self.spend(work);
        true
    }
}

/// A network card: its address and link.
pub trait NetHardware: Hardware {
    /// The card's MAC address.
    fn mac(&self) -> [u8; 6];
    /// Whether the wire is connected.
    fn link_up(&self) -> bool;
}

/// Where a device's interrupt is delivered, like a programmable MSI: each
/// driver VM has an eventfd of its own per line (its vmm waits on them when
/// the guest sleeps), and the reflector routes the interrupt to the driver
/// VM that currently owns the device.
#[derive(Default)]
pub struct InterruptRoute {
    target: Mutex<Option<SharedEventFd>>,
    /// Interrupts that could not be raised, for the log. The vmm holds
    /// the line too, so it is raised only through
    /// [`SharedEventFd::signal`], which never waits: with a write, a vmm
    /// that made its line blocking and filled its count held whichever
    /// thread raised it (another tenant's card, delivering a frame) for
    /// good.
    failures: std::sync::atomic::AtomicU64,
}

impl InterruptRoute {
    /// Sends future interrupts to `target`.
    pub fn route(&self, target: SharedEventFd) {
        if let Ok(mut current) = self.target.lock() {
            *current = Some(target);
        }
    }

    /// Raises the interrupt (dropped if nothing is routed).
    pub fn raise(&self) {
        if let Ok(current) = self.target.lock() {
            if let Some(target) = current.as_ref() {
                if let Err(error) = target.signal() {
                    let failures = self.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(%error, failures, "cannot raise a device interrupt");
                    }
                }
            }
        }
    }
}

/// The memory a device may DMA into: part of a shared region, at a driver
/// guest-physical address (the analogue of an IOMMU mapping).
#[derive(Clone)]
pub struct DmaRegion {
    /// The shared region.
    pub memory: Arc<SharedMemory>,
    /// Offset of the DMA range in the region.
    pub offset: usize,
    /// Length of the DMA range.
    pub len: usize,
    /// Driver guest-physical address of the DMA range.
    pub gpa: u64,
}

impl DmaRegion {
    /// The region offset for `len` bytes at driver address `address`, if the
    /// whole range is inside the DMA range.
    pub fn translate(&self, address: u64, len: u32) -> Option<usize> {
        let start = address.checked_sub(self.gpa)?;
        let end = start.checked_add(u64::from(len))?;
        (end <= self.len as u64).then(|| self.offset + start as usize)
    }
}

/// Sleeps until `doorbell` rings (true) or `stop` is signalled (false): a
/// simulated device's thread between bursts of work.
pub(crate) fn wait_for_doorbell(doorbell: &impl AsRawFd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd { fd: doorbell.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: poll on two valid pollfds we own.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if fds[1].revents != 0 || ready < 0 {
            return false;
        }
        // The vmm holds the doorbell too, and may have drained it.
        let _ = shared_eventfd::take(doorbell.as_raw_fd());
        return true;
    }
}

/// Counts an event a driver can repeat at will (a device stopping on its
/// error, a failing medium) and says when to log it: at its 1st, 2nd,
/// 4th, 8th... occurrence, the count in the line. A driver repeating it in
/// a loop (tens of thousands a second) cannot flood the reflector's log,
/// nor push a journal's rate limit into dropping other devices' lines.
#[derive(Default)]
pub struct LogEvery(u64);

impl LogEvery {
    /// Counts one; the count so far if this one is to be logged.
    pub fn note(&mut self) -> Option<u64> {
        self.0 += 1;
        self.0.is_power_of_two().then_some(self.0)
    }
}

/// Waits until `fd` is readable or closed, at most `timeout` (None:
/// without end); whether it is (false: the time ran out, or poll failed).
/// A signal does not end the wait early. The timeout is rounded up to
/// poll's milliseconds, so that a wait never ends before its deadline.
pub fn wait_readable(fd: std::os::fd::RawFd, timeout: Option<Duration>) -> bool {
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    loop {
        let left = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        let ms = left.map_or(-1, |left| i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX));
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one pollfd on the stack.
        match unsafe { libc::poll(&mut poll, 1, ms) } {
            ready if ready > 0 => return true,
            0 => return false,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

/// Calls `attempt` until it gives a value or `deadline` passes, sleeping
/// between tries: `first` at first, then twice as long each time up to
/// `longest`, never past the deadline; `attempt` runs at least once. For
/// waits on something that ends soon but tells no descriptor: a killed
/// process's reaping, a lock a worker holds for one event at a time, the
/// last process of a cgroup v1.
pub fn poll_until<T>(
    deadline: Instant,
    first: Duration,
    longest: Duration,
    mut attempt: impl FnMut() -> Option<T>,
) -> Option<T> {
    let mut pause = first;
    loop {
        if let Some(value) = attempt() {
            return Some(value);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new driver gets the spare, and not what a dead one saved of its
    /// grants: before, a driver that answered requests without doing them
    /// banked their grants for any later driver of the device to spend (an
    /// adversarial review found it).
    #[test]
    fn a_new_driver_gets_the_spare_and_not_what_the_last_one_saved() {
        let work = WorkAllowance::with_spare(4096);
        work.grant(1 << 20);
        work.spend(4096);
        work.forgive();
        work.spend(4096);
        assert!(!work.exhausted(), "the spare is the new driver's");
        work.spend(1);
        assert!(work.exhausted(), "the dead driver's saved grants were kept");
        // And what a dead one overspent is forgiven.
        work.forgive();
        assert!(!work.exhausted());
    }

    #[test]
    fn dma_translation_is_bounded() {
        let memory = Arc::new(SharedMemory::new("dma", 8192).unwrap());
        let region = DmaRegion { memory, offset: 4096, len: 4096, gpa: 0x1000_0000 };
        assert_eq!(region.translate(0x1000_0000, 4096), Some(4096));
        assert_eq!(region.translate(0x1000_0200, 512), Some(4096 + 512));
        assert_eq!(region.translate(0x1000_0200, 4096), None);
        assert_eq!(region.translate(0x0fff_ffff, 1), None);
        assert_eq!(region.translate(u64::MAX, 4096), None);
    }

    #[test]
    fn wait_readable_says_whether_a_descriptor_became_readable_or_closed_in_time() {
        let mut ends = [0; 2];
        // SAFETY: pipe2(2) into a local array; both ends closed below.
        assert_eq!(unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let [reader, writer] = ends;
        assert!(!wait_readable(reader, Some(Duration::from_millis(1))), "nothing written yet");
        // SAFETY: write(2) of one byte to the pipe's write end.
        assert_eq!(unsafe { libc::write(writer, b"x".as_ptr().cast(), 1) }, 1);
        assert!(wait_readable(reader, Some(Duration::ZERO)));
        assert!(wait_readable(reader, None));
        // SAFETY: closing the ends made above, once each.
        unsafe {
            libc::close(writer);
            libc::close(reader);
        }
    }

    #[test]
    fn poll_until_tries_at_least_once_and_gives_up_at_its_deadline() {
        let pause = Duration::from_millis(1);
        assert_eq!(poll_until(Instant::now(), pause, pause, || Some(7)), Some(7), "a past deadline still tries once");
        let mut tries = 0;
        let found = poll_until(Instant::now() + Duration::from_secs(30), pause, pause, || {
            tries += 1;
            (tries == 3).then_some(tries)
        });
        assert_eq!(found, Some(3));
        let mut tries = 0;
        let never = poll_until(Instant::now(), pause, pause, || {
            tries += 1;
            None::<()>
        });
        assert_eq!((never, tries), (None, 1));
    }
}
