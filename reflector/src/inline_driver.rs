//! Drivers that are threads of the reflector: the driver side of the
//! channel served in this process, with no VM and no process boundary.
//!
//! Two uses, one loop ([`ChannelThread`]): the benchmark baseline
//! `driver=inline-null` (the reflector completing every request itself, so
//! a benchmark can set the cost of a driver VM against the channel's own),
//! and the device's unit tests, whose fake drivers serve, die, hang or lie
//! by script (`device/fake.rs`).
//!
//! What it is not: a way to run a driver. Nothing here isolates anything;
//! it is never used unless asked for by name.

use hardware::shared_eventfd::SharedEventFd;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use guest_abi::channel::{self, driver_state, header, CompletionEntry, RequestEntry};
use vmm_sys_util::eventfd::EventFd;

use crate::driver_vms::{DriverLaunch, DriverProcess};
use crate::shm::SharedMemory;

/// Polling before sleeping, as a driver VM's driver does under a stream of
/// requests (`driver_vm::channel::ChannelDriver::POLL_WINDOW_US`, the
/// longest of its adaptive window, where a stream keeps it): fixed, since a
/// baseline for benchmarks and a fake for tests need no more.
const POLL_WINDOW: Duration = Duration::from_micros(300);

/// The `driver=` name of the inline null driver.
pub const INLINE_NULL: &str = "inline-null";

/// A pid no process can have (above the kernel's PID_MAX_LIMIT), so the
/// resource watch finds nothing to read and nothing can be signalled.
pub const FIRST_THREAD_PID: libc::pid_t = 4_194_304 + 1;

/// What a channel thread does with a request: answer it (status, length),
/// take it and never answer, or die with a report.
pub enum Answer {
    /// Complete it.
    Complete(u32, u32),
    /// Complete it after the rest of the requests taken with it, these
    /// answers last first (a device that completes out of order).
    Reversed(u32, u32),
    /// Never answer it.
    Ignore,
    /// End, reporting this (a vmm's JSON report, or empty).
    Die(String),
}

/// How a channel thread and its handle meet.
#[derive(Default)]
pub struct ThreadState {
    killed: AtomicBool,
    report: Mutex<Option<String>>,
    ended: Condvar,
}

impl ThreadState {
    fn end(&self, report: String) {
        if let Ok(mut slot) = self.report.lock() {
            *slot = Some(report);
        }
        self.ended.notify_all();
    }
}

/// The driver side of a channel, served on a thread.
pub struct ChannelThread {
    /// The channel.
    pub channel: Arc<SharedMemory>,
    /// Rung after publishing completions (the reflector's doorbell).
    pub doorbell: SharedEventFd,
    /// Raised by the reflector after publishing requests.
    pub request_interrupt: SharedEventFd,
    /// Shared with its handle.
    pub state: Arc<ThreadState>,
    /// Cleared for a warm spare until it is activated.
    pub go: Arc<AtomicBool>,
}

impl ChannelThread {
    /// Serves until killed (an empty report, as a killed vmm
    /// gives) or until `answer` says to die; returns the report.
    pub fn run(
        &self,
        mut before_attach: impl FnMut() -> Option<String>,
        mut answer: impl FnMut(&RequestEntry) -> Answer,
    ) -> String {
        while !self.go.load(Ordering::SeqCst) {
            if !self.sleep() {
                return String::new();
            }
        }
        if let Some(report) = before_attach() {
            return report;
        }
        let word = |offset| self.channel.atomic_u32(offset);
        let generation = word(header::GENERATION).load(Ordering::Acquire);
        word(header::DRIVER_GENERATION).store(generation, Ordering::Release);
        word(header::DRIVER_STATE).store(driver_state::READY, Ordering::Release);
        let (mut taken, mut answered) = (0u32, 0u32);
        loop {
            let published = word(header::REQ_PROD).load(Ordering::Acquire);
            let before = answered;
            let mut reversed = Vec::new();
            while taken != published {
                let at =
                    channel::REQUEST_RING_OFFSET + (taken % channel::RING_SIZE) as usize * channel::REQUEST_ENTRY_SIZE;
                let Some(request) = self.channel.read::<RequestEntry>(at) else { return String::new() };
                taken = taken.wrapping_add(1);
                word(header::REQ_CONS).store(taken, Ordering::Release);
                let (status, len) = match answer(&request) {
                    Answer::Complete(status, len) => (status, len),
                    Answer::Reversed(status, len) => {
                        reversed.push(CompletionEntry { id: request.id, status, len });
                        continue;
                    }
                    Answer::Ignore => continue,
                    Answer::Die(report) => return report,
                };
                self.answer(answered, CompletionEntry { id: request.id, status, len });
                answered = answered.wrapping_add(1);
            }
            for completion in reversed.into_iter().rev() {
                self.answer(answered, completion);
                answered = answered.wrapping_add(1);
            }
            if answered != before {
                // As a driver VM's driver: rung only while the reflector
                // waits (not while it polls the ring).
                word(header::CMP_PROD).store(answered, Ordering::Release);
                fence(Ordering::SeqCst);
                if word(header::HOST_WAITING).load(Ordering::Acquire) != 0 {
                    let _ = self.doorbell.signal();
                }
                continue;
            }
            if !self.wait(taken) {
                return String::new();
            }
        }
    }

    /// Writes completion number `answered` (not yet published).
    fn answer(&self, answered: u32, completion: CompletionEntry) {
        let at =
            channel::COMPLETION_RING_OFFSET + (answered % channel::RING_SIZE) as usize * channel::COMPLETION_ENTRY_SIZE;
        self.channel.write(at, completion);
    }

    /// Waits for requests beyond `taken` as a driver does: polls for
    /// [`POLL_WINDOW`], then announces that it sleeps (so the reflector
    /// raises the request interrupt), checks again, and sleeps; false once
    /// killed.
    fn wait(&self, taken: u32) -> bool {
        let word = |offset| self.channel.atomic_u32(offset);
        let start = Instant::now();
        while start.elapsed() < POLL_WINDOW {
            if word(header::REQ_PROD).load(Ordering::Acquire) != taken {
                return !self.state.killed.load(Ordering::SeqCst);
            }
            // Yielding, as the reflector's own polls do: the worker that
            // publishes requests may be waiting for this core.
            std::thread::yield_now();
        }
        word(header::DRIVER_SLEEPING).store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let alive = word(header::REQ_PROD).load(Ordering::Acquire) != taken || self.sleep();
        word(header::DRIVER_SLEEPING).store(0, Ordering::SeqCst);
        alive && !self.state.killed.load(Ordering::SeqCst)
    }

    /// Sleeps until the request interrupt, at most 10 ms (so a kill is
    /// seen); false once killed.
    fn sleep(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.request_interrupt),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd that lives across the call.
        unsafe { libc::poll(&mut poll, 1, 10) };
        let _ = self.request_interrupt.take();
        !self.state.killed.load(Ordering::SeqCst)
    }
}

/// The handle of a channel thread, as the device sees a driver.
pub struct ThreadDriver {
    /// Its made-up pid.
    pub pid: libc::pid_t,
    /// Its interrupt lines (0: requests, 1: the device's).
    pub lines: Vec<SharedEventFd>,
    /// Shared with the thread.
    pub state: Arc<ThreadState>,
    /// A spare's go flag, until activated.
    pub go: Option<Arc<AtomicBool>>,
}

impl DriverProcess for ThreadDriver {
    fn pid(&self) -> libc::pid_t {
        self.pid
    }

    fn interrupt(&self, index: usize) -> Option<&SharedEventFd> {
        self.lines.get(index)
    }

    fn activate(&mut self) -> bool {
        self.go.take().map(|go| go.store(true, Ordering::SeqCst)).is_some()
    }

    fn exit_report(&self) -> Option<String> {
        self.state.report.lock().ok().and_then(|report| report.clone())
    }

    fn kill(&self) {
        self.state.killed.store(true, Ordering::SeqCst);
    }

    fn kill_and_wait(&self, bound: Duration) -> bool {
        self.kill();
        let Ok(report) = self.state.report.lock() else { return false };
        match self.state.ended.wait_timeout_while(report, bound, |report| report.is_none()) {
            Ok((report, _)) => report.is_some(),
            Err(_) => false,
        }
    }
}

/// Starts a channel thread for a driver: `serve` runs on it (given the
/// thread's channel side) and returns its report.
pub fn spawn_thread(
    channel: &Arc<SharedMemory>,
    completion_doorbell: &SharedEventFd,
    driver_exited: &EventFd,
    number: usize,
    spare: bool,
    serve: impl FnOnce(&ChannelThread) -> String + Send + 'static,
) -> std::io::Result<ThreadDriver> {
    let lines = vec![SharedEventFd::new()?, SharedEventFd::new()?];
    let state = Arc::new(ThreadState::default());
    let go = Arc::new(AtomicBool::new(!spare));
    let thread = ChannelThread {
        channel: channel.clone(),
        doorbell: completion_doorbell.try_clone()?,
        request_interrupt: lines[0].try_clone()?,
        state: state.clone(),
        go: go.clone(),
    };
    let exited = driver_exited.try_clone()?;
    std::thread::Builder::new().name(format!("inline-driver-{number}")).spawn(move || {
        let report = serve(&thread);
        thread.state.end(report);
        let _ = exited.write(1);
    })?;
    Ok(ThreadDriver { pid: FIRST_THREAD_PID + number as libc::pid_t, lines, state, go: spare.then_some(go) })
}

/// `driver=inline-null`: the reflector completes every request itself, at
/// once, on the channel (a benchmark baseline; reads return whatever the
/// bounce slot holds).
pub struct InlineNull {
    name: String,
    channel: Arc<SharedMemory>,
    completion_doorbell: SharedEventFd,
    driver_exited: EventFd,
    launches: AtomicUsize,
}

impl InlineNull {
    /// An inline null driver for device `name`'s channel.
    pub fn new(
        name: &str,
        channel: Arc<SharedMemory>,
        completion_doorbell: &SharedEventFd,
        driver_exited: &EventFd,
    ) -> std::io::Result<Self> {
        Ok(InlineNull {
            name: name.to_owned(),
            channel,
            completion_doorbell: completion_doorbell.try_clone()?,
            driver_exited: driver_exited.try_clone()?,
            launches: AtomicUsize::new(0),
        })
    }
}

impl ThreadLaunch for InlineNull {
    fn name(&self) -> &str {
        &self.name
    }

    fn start(&self, spare: bool) -> std::io::Result<ThreadDriver> {
        let number = self.launches.fetch_add(1, Ordering::SeqCst);
        spawn_thread(&self.channel, &self.completion_doorbell, &self.driver_exited, number, spare, |thread| {
            thread.run(|| None, |request| Answer::Complete(channel::status::OK, request.len))
        })
    }
}

/// Starts drivers that are channel threads; every such launcher is a
/// [`DriverLaunch`].
pub trait ThreadLaunch: Send + Sync {
    /// The drivers' name.
    fn name(&self) -> &str;
    /// Starts one (a warm spare if `spare`).
    fn start(&self, spare: bool) -> std::io::Result<ThreadDriver>;
}

impl<T: ThreadLaunch> DriverLaunch for T {
    fn name(&self) -> &str {
        ThreadLaunch::name(self)
    }

    fn launch(
        &self,
        route: &mut dyn FnMut(&[SharedEventFd]) -> std::io::Result<()>,
    ) -> std::io::Result<Box<dyn DriverProcess>> {
        let driver = self.start(false)?;
        route(&driver.lines)?;
        Ok(Box::new(driver))
    }

    /// A thread has no boot to skip: both kinds of spare wait alike.
    fn launch_spare(&self, _kind: crate::driver_vms::SpareKind) -> std::io::Result<Box<dyn DriverProcess>> {
        Ok(Box::new(self.start(true)?))
    }
}
