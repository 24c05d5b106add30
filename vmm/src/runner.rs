//! Running a VM to its end: the vCPU on its own thread, and an event loop
//! (event-manager) on the calling thread that waits for the vCPU to finish
//! or for the watchdog to expire.

use std::fs::File;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::error::{Error, Result};
use crate::outcome::Outcome;
use crate::vcpu::{self, RunUntil, VcpuStop};
use crate::vm::Vm;

/// How to run.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Stop the guest after this long (outcome `timeout`).
    pub timeout: Option<Duration>,
    /// Written with an 8-byte 1 when the guest signals ready (an eventfd or
    /// a pipe), for supervisors.
    pub ready_file: Option<File>,
    /// End the process when standard input closes: a supervisor passes a
    /// pipe it alone holds, so the VM dies with the supervisor even if that
    /// is SIGKILLed.
    pub exit_on_stdin_close: bool,
    /// Confine the vCPU and main threads with their seccomp filters once
    /// the VM is set up (see `seccomp`).
    pub seccomp: bool,
    /// Inherited descriptors of the windows' files (`--window fd=N`), which
    /// the filters forbid writing, as they do the VM's own copies.
    pub window_fds: Vec<std::os::fd::RawFd>,
}

/// What happened.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// How the guest ended.
    pub outcome: Outcome,
    /// When the guest signalled ready.
    pub ready_at: Option<Instant>,
}

/// Signals the event loop when the vCPU thread is done.
struct VcpuDone {
    event: EventFd,
    finished: Arc<AtomicBool>,
}

impl MutEventSubscriber for VcpuDone {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.finished.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(error) = ops.add(Events::new(&self.event, EventSet::IN)) {
            tracing::error!(?error, "cannot watch the vCPU thread; the VM will run without supervision");
        }
    }
}

/// How long the vCPU thread has to end once the watchdog stopped it. A
/// kick ends `KVM_RUN` within microseconds; a thread blocked elsewhere (a
/// console line written into a full pipe that nobody reads: standard
/// error, a `--console` FIFO) does not end, and without a bound `--timeout`
/// did not hold (an adversarial review found it). Past this, the guest is
/// reported timed out without the thread, which ends with the process.
const STOPPED_VCPU_GRACE: Duration = Duration::from_secs(1);

/// Set once [`run`] gave up on a vCPU thread that did not end.
static VCPU_THREAD_ABANDONED: AtomicBool = AtomicBool::new(false);

/// Whether [`run`] gave up on a vCPU thread that did not end after the
/// watchdog stopped it: it may be blocked writing into a full standard
/// error, holding std's lock of it, so that nothing more may be written
/// there but by [`say_if_room`].
pub fn vcpu_thread_abandoned() -> bool {
    VCPU_THREAD_ABANDONED.load(Ordering::Acquire)
}

/// Writes `line` (and a newline) to standard error only if a pipe there
/// takes it now, past std's lock of it; else drops it. For lines written
/// where standard error may be a full pipe nobody reads and the vCPU
/// thread blocked on it ([`vcpu_thread_abandoned`]; the lifeline's end).
pub fn say_if_room(line: &str) {
    let text = format!("{line}\n");
    // A pipe that says it has room takes PIPE_BUF bytes at once.
    if text.len() > libc::PIPE_BUF {
        return;
    }
    let mut poll = libc::pollfd { fd: 2, events: libc::POLLOUT, revents: 0 };
    // SAFETY: poll(2) on one pollfd on the stack, without waiting.
    if unsafe { libc::poll(&mut poll, 1, 0) } == 1 && poll.revents & libc::POLLOUT != 0 {
        // SAFETY: write(2) of a live buffer of its length to standard error.
        unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
    }
}

/// The byte a supervisor writes on standard input to stop the guest where
/// it is and have it reported (outcome `stopped`: registers, location,
/// backtrace), before it kills a driver VM that missed its deadline.
pub const STOP_AND_REPORT: u8 = b'w';

/// Checks that standard input can be watched, as `--exit-on-stdin-close`
/// needs: a pipe or a socket. Standard input closed, a regular file, a
/// directory or `/dev/null` cannot be polled, and the VM then ran on
/// without its supervisor's lifeline, one error line the only sign.
pub fn check_lifeline() -> Result<()> {
    // SAFETY: epoll_create1(2); checked below, closed at the end.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(Error::Io { operation: "creating an epoll".into(), source: std::io::Error::last_os_error() });
    }
    let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
    // SAFETY: epoll_ctl(2) adding standard input to our own epoll.
    let added = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, 0, &mut event) };
    let error = std::io::Error::last_os_error();
    // SAFETY: closing the epoll made above.
    unsafe { libc::close(epoll) };
    if added != 0 {
        return Err(Error::invalid(
            "--exit-on-stdin-close",
            format!("standard input cannot be watched ({error}): give a pipe only the supervisor holds"),
        ));
    }
    Ok(())
}

/// Ends the process when standard input reaches end-of-file or hangs up;
/// stops the vCPU when it carries [`STOP_AND_REPORT`].
struct Lifeline {
    stop: Arc<AtomicBool>,
    asked: Arc<AtomicBool>,
    vcpu: VcpuKick,
}

/// Reads the supervisor's lifeline (standard input), for a driver VM or a
/// hosted driver alike: ends the process when it closed or hung up (the
/// supervisor is gone); otherwise whether it carried [`STOP_AND_REPORT`].
pub fn read_lifeline(hung_up: bool) -> bool {
    let mut bytes = [0u8; 64];
    // SAFETY: read(2) into a local buffer from standard input.
    let n = unsafe { libc::read(0, bytes.as_mut_ptr() as *mut libc::c_void, bytes.len()) };
    if n > 0 && bytes[..n as usize].contains(&STOP_AND_REPORT) {
        return true;
    }
    if n == 0 || hung_up {
        // Not through the log: the vCPU thread may hold it, blocked writing
        // console lines into a full standard error.
        say_if_room("vmm: the supervisor is gone (standard input closed): stopping");
        std::process::exit(i32::from(crate::error::status::IO));
    }
    false
}

impl MutEventSubscriber for Lifeline {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let asked = read_lifeline(events.event_set().contains(EventSet::HANG_UP));
        if asked && !self.asked.swap(true, Ordering::AcqRel) {
            self.stop.store(true, Ordering::Release);
            self.vcpu.kick();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(error) = ops.add(Events::new_raw(0, EventSet::IN | EventSet::HANG_UP)) {
            tracing::error!(?error, "cannot watch standard input; the VM will not end with its supervisor");
        }
    }
}

/// Stops the vCPU when the timer expires.
struct Watchdog {
    timer: TimerFd,
    stop: Arc<AtomicBool>,
    expired: Arc<AtomicBool>,
    vcpu: VcpuKick,
}

/// Kicks the vCPU thread out of `KVM_RUN`, unless it said it ended: the
/// event loop that runs the kick joins it once it has, and may run on
/// after that (a halted guest waits for the watchdog), when its
/// `pthread_t` is no thread's. Before, the watchdog of a guest that halted
/// kicked the joined thread: undefined, and on musl (the production vmm) a
/// SIGSEGV instead of the timeout's report (an adversarial review found it).
struct VcpuKick {
    thread: libc::pthread_t,
    /// The vCPU thread said it ended ([`VcpuDone`]).
    finished: Arc<AtomicBool>,
}

impl VcpuKick {
    fn kick(&self) {
        if !self.finished.load(Ordering::Acquire) {
            // SAFETY: the thread has not said it ended, so it has not been
            // joined (the event loop, on this thread, joins it only once
            // `VcpuDone` saw it end): its pthread_t is valid.
            unsafe { libc::pthread_kill(self.thread, vcpu::kick_signal()) };
        }
    }
}

impl MutEventSubscriber for Watchdog {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.expired.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        self.vcpu.kick();
        let _ = ops.remove(Events::new(&self.timer, EventSet::IN));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(error) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::error!(?error, "cannot arm the watchdog; --timeout will not be enforced");
        }
    }
}

/// The vCPU thread's `pthread_t`, for `pthread_kill`: std hands out an
/// integer, which is libc's `pthread_t` on glibc and a pointer's value on
/// musl (the static production build).
#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
fn pthread_of<T>(handle: &thread::JoinHandle<T>) -> libc::pthread_t {
    handle.as_pthread_t() as libc::pthread_t
}

/// Tests widen the window between the vCPU thread's start and the main
/// thread's confinement (`VMM_TEST_CONFINE_DELAY_MS`), to show that no
/// guest code runs in it. Only in builds with the test images.
#[cfg(feature = "test-images")]
fn delay_confinement_for_tests() {
    if let Some(ms) = std::env::var("VMM_TEST_CONFINE_DELAY_MS").ok().and_then(|ms| ms.parse::<u64>().ok()) {
        thread::sleep(Duration::from_millis(ms.min(10_000)));
    }
}

fn io_error(operation: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { operation: operation.into(), source }
}

fn errno_error(operation: &str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error + '_ {
    move |e| Error::Io { operation: operation.into(), source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// Runs `vm` until the guest ends or the timeout expires.
pub fn run(vm: Vm, options: RunOptions) -> Result<RunResult> {
    vcpu::install_kick_handler().map_err(io_error("installing the vCPU kick signal handler"))?;
    let Vm { name, vm_fd, mut vcpu, eventfds } = vm;
    let stop = Arc::new(AtomicBool::new(false));
    let done = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_error("creating an eventfd"))?;
    let done_signal = done.try_clone().map_err(io_error("duplicating an eventfd"))?;
    let thread_stop = stop.clone();
    let asked = Arc::new(AtomicBool::new(false));
    let thread_asked = asked.clone();
    let mut ready_file = options.ready_file;
    // Built before any thread runs guest code; installed by each thread on
    // itself.
    let filters = match options.seccomp {
        true => {
            let mut no_writes_to = vcpu.memory_files();
            no_writes_to.extend(&options.window_fds);
            no_writes_to.sort_unstable();
            no_writes_to.dedup();
            Some((crate::seccomp::vcpu_filter(&no_writes_to), crate::seccomp::main_filter(&no_writes_to)))
        }
        false => None,
    };
    let (vcpu_filter, main_filter) = match filters {
        Some((Ok(vcpu), Ok(main))) => (Some(vcpu), Some(main)),
        Some((Err(error), _)) | Some((_, Err(error))) => {
            return Err(Error::Io {
                operation: "building the seccomp filters".into(),
                source: std::io::Error::other(error),
            })
        }
        None => (None, None),
    };
    // Guest code runs only once both threads are confined: a guest that
    // escaped into this process on its first exit must not find the main
    // thread still free to make threads or processes (which would share
    // the channel's memory past the vCPU thread's end, where the reflector
    // takes the vmm for ended) or the main thread's filter still in
    // writable memory before it is installed.
    let main_confined = Arc::new(AtomicBool::new(main_filter.is_none()));
    let vcpu_may_run = main_confined.clone();
    // What the main thread needs that its filter denies, made first.
    let mut manager: EventManager<Box<dyn MutEventSubscriber>> = EventManager::new().map_err(|e| Error::Io {
        operation: "creating the event loop".into(),
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    let watchdog_timer = match options.timeout {
        Some(timeout) => {
            let mut timer = TimerFd::new().map_err(errno_error("creating the watchdog timer"))?;
            timer.reset(timeout, None).map_err(errno_error("arming the watchdog timer"))?;
            Some(timer)
        }
        None => None,
    };
    let handle = thread::Builder::new()
        .name(format!("{name}-vcpu"))
        .spawn(move || {
            if let Some(filter) = vcpu_filter {
                if let Err(error) = crate::seccomp::apply(&filter) {
                    let reason = format!("cannot confine the vCPU thread: {error}");
                    let _ = done_signal.write(1);
                    return (VcpuStop::Ended(Outcome::InternalError { reason }), None, vcpu);
                }
            }
            // A few tens of microseconds: the main thread installs its
            // filter right after starting this thread.
            while !vcpu_may_run.load(Ordering::Acquire) {
                if thread_stop.load(Ordering::Acquire) {
                    let _ = done_signal.write(1);
                    return (VcpuStop::Stopped, None, vcpu);
                }
                thread::yield_now();
            }
            let mut ready_at = None;
            let mut stop_reason = vcpu.run(RunUntil::End, &thread_stop, &mut || {
                // Once: a guest saying it again and again would otherwise
                // have this thread write again and again, and block on a
                // supervisor's full pipe, past the watchdog and a stop
                // request (an adversarial review found it).
                if ready_at.is_some() {
                    return;
                }
                ready_at = Some(Instant::now());
                if let Some(file) = ready_file.as_mut() {
                    if let Err(error) = file.write_all(&1u64.to_ne_bytes()) {
                        tracing::warn!(%error, "cannot signal readiness on --ready-fd");
                    }
                }
            });
            // Stopped on request: where it was, read on this thread (the
            // vCPU thread's filter allows reading its registers).
            if stop_reason == VcpuStop::Stopped && thread_asked.load(Ordering::Acquire) {
                stop_reason = VcpuStop::Ended(vcpu.stopped_here());
            }
            let _ = done_signal.write(1);
            (stop_reason, ready_at, vcpu)
        })
        .map_err(io_error("starting the vCPU thread"))?;

    if let Some(filter) = main_filter {
        #[cfg(feature = "test-images")]
        delay_confinement_for_tests();
        if let Err(error) = crate::seccomp::apply(&filter) {
            stop.store(true, Ordering::Release);
            // SAFETY: the vCPU thread is not joined yet; its pthread_t is valid.
            unsafe { libc::pthread_kill(pthread_of(&handle), vcpu::kick_signal()) };
            return Err(Error::Io {
                operation: "confining the main thread".into(),
                source: std::io::Error::other(error),
            });
        }
        tracing::debug!("main thread confined: the guest may run");
        main_confined.store(true, Ordering::Release);
    }
    let finished = Arc::new(AtomicBool::new(false));
    let expired = Arc::new(AtomicBool::new(false));
    manager.add_subscriber(Box::new(VcpuDone { event: done, finished: finished.clone() }));
    if options.exit_on_stdin_close {
        manager.add_subscriber(Box::new(Lifeline {
            stop: stop.clone(),
            asked: asked.clone(),
            vcpu: VcpuKick { thread: pthread_of(&handle), finished: finished.clone() },
        }));
    }
    if let Some(timer) = watchdog_timer {
        manager.add_subscriber(Box::new(Watchdog {
            timer,
            stop: stop.clone(),
            expired: expired.clone(),
            vcpu: VcpuKick { thread: pthread_of(&handle), finished: finished.clone() },
        }));
    }
    let mut given_up_at = None;
    while !finished.load(Ordering::Acquire) {
        let ran = match expired.load(Ordering::Acquire) {
            false => manager.run(),
            // The watchdog stopped the vCPU: its thread ends within
            // microseconds of the kick, unless something it does blocks.
            true => {
                let deadline = *given_up_at.get_or_insert_with(|| Instant::now() + STOPPED_VCPU_GRACE);
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // Not logged: the log may be the very pipe it blocks on.
                    VCPU_THREAD_ABANDONED.store(true, Ordering::Release);
                    return Ok(RunResult { outcome: timeout(&options.timeout), ready_at: None });
                }
                manager.run_with_timeout(i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX))
            }
        };
        ran.map_err(|e| Error::Io {
            operation: "running the event loop".into(),
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    }
    let (stop_reason, ready_at, vcpu) = handle.join().map_err(|_| Error::Io {
        operation: "joining the vCPU thread".into(),
        source: std::io::Error::other("the vCPU thread panicked"),
    })?;
    let outcome = match stop_reason {
        VcpuStop::Ended(outcome) => outcome,
        VcpuStop::Stopped | VcpuStop::Ready if expired.load(Ordering::Acquire) => timeout(&options.timeout),
        VcpuStop::Stopped | VcpuStop::Ready => {
            Outcome::InternalError { reason: "the vCPU stopped without a reason".into() }
        }
    };
    let outcome = match outcome {
        // Without an interrupt line nothing can wake a halted guest: it
        // hangs, and the watchdog (if any) decides when to give up.
        Outcome::Halted => wait_for_watchdog(&mut manager, &expired, &options.timeout)?,
        other => other,
    };
    drop((vcpu, eventfds, vm_fd));
    Ok(RunResult { outcome, ready_at })
}

fn wait_for_watchdog(
    manager: &mut EventManager<Box<dyn MutEventSubscriber>>,
    expired: &AtomicBool,
    timeout: &Option<Duration>,
) -> Result<Outcome> {
    let Some(timeout) = timeout else { return Ok(Outcome::Halted) };
    while !expired.load(Ordering::Acquire) {
        manager.run().map_err(|e| Error::Io {
            operation: "running the event loop".into(),
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    }
    Ok(Outcome::Timeout { after_ms: timeout.as_millis() as u64 })
}

/// The outcome of a guest the watchdog stopped.
fn timeout(timeout: &Option<Duration>) -> Outcome {
    Outcome::Timeout { after_ms: timeout.unwrap_or_default().as_millis() as u64 }
}
