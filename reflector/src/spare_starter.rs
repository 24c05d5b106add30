//! Starting a device's next spare off its worker thread.
//!
//! A spare is wanted again right after a failover, at the recovery's first
//! completion, and starting one forks, builds a jail and execs a vmm: 2.3 ms
//! at the median and up to 5 ms here (jailed, under load). Done on the
//! device's worker, that start sat between the first completion and its
//! delivery to the client, and in front of every other replayed request,
//! while the stall the reflector reported had already ended. A
//! [`SpareStarter`] runs each start on a thread of its own and signals an
//! eventfd the worker watches when it ends; the worker collects the spare
//! then, without ever waiting for it.
//!
//! What it is not: a pool. One start runs at a time, and what it starts is
//! the caller's to keep or kill.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::driver_vms::{DriverLaunch, DriverProcess, SpareKind};

/// What a start gives: the spare, or why it could not start.
pub type Started = std::io::Result<Box<dyn DriverProcess>>;

/// Runs one spare start at a time on its own thread.
pub struct SpareStarter {
    /// Signalled when a start has ended, after its outcome is stored.
    done: Arc<EventFd>,
    /// The outcome of the start that ended, until taken.
    outcome: Arc<Mutex<Option<Started>>>,
    /// A start is under way, or ended without its outcome taken.
    running: bool,
}

impl SpareStarter {
    /// A starter with nothing started.
    pub fn new() -> std::io::Result<Self> {
        Ok(SpareStarter {
            done: Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            outcome: Arc::new(Mutex::new(None)),
            running: false,
        })
    }

    /// The eventfd signalled when a start ends, for the worker to watch.
    pub fn event(&self) -> &EventFd {
        &self.done
    }

    /// Whether a start is under way or ended without being taken.
    pub fn busy(&self) -> bool {
        self.running
    }

    /// Starts a spare of `kind` with `launcher` on a new thread and returns
    /// at once; an error if one is already under way or no thread could be
    /// made (the spare is then not started).
    pub fn start(&mut self, launcher: Arc<dyn DriverLaunch>, kind: SpareKind) -> std::io::Result<()> {
        if self.busy() {
            return Err(std::io::Error::other("a spare is already being started"));
        }
        let (done, outcome) = (self.done.clone(), self.outcome.clone());
        // The thread is not joined: it has only to return once it has stored
        // its outcome and said so.
        std::thread::Builder::new().name(format!("{}-spare", launcher.name())).spawn(move || {
            // A start that panicked is a start that failed: the outcome is
            // always stored, so the device never waits for a spare forever.
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| launcher.launch_spare(kind)))
                .unwrap_or_else(|_| Err(std::io::Error::other("the spare's start panicked")));
            *outcome.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(started);
            // A full counter (2^64 - 2 unread ends) is the only failure, and
            // then the worker has a wake-up pending anyway.
            let _ = done.write(1);
        })?;
        self.running = true;
        Ok(())
    }

    /// The outcome of the start that ended, if one did; never waits.
    pub fn take_finished(&mut self) -> Option<Started> {
        let _ = self.done.read();
        let started = self.take_outcome()?;
        self.running = false;
        Some(started)
    }

    /// Waits, at most `bound`, for the start under way, if any, and gives
    /// its outcome (the device is shutting down: whatever it started must
    /// be killed). A start still running after `bound` (a keeper stuck in
    /// the kernel) is left to end with the reflector, and its outcome is an
    /// error: a stopping reflector never waits for it forever.
    pub fn wait(&mut self, bound: Duration) -> Option<Started> {
        if !std::mem::take(&mut self.running) {
            return None;
        }
        let deadline = Instant::now() + bound;
        loop {
            if let Some(started) = self.take_outcome() {
                let _ = self.done.read();
                return Some(started);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Some(Err(std::io::Error::other(format!("the spare's start did not end within {bound:?}"))));
            }
            wait_readable(&self.done, left);
            let _ = self.done.read();
        }
    }

    fn take_outcome(&self) -> Option<Started> {
        self.outcome.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}

/// Waits at most `bound` for `event` to be readable; whether it is.
fn wait_readable(event: &EventFd, bound: Duration) -> bool {
    let mut ready = libc::pollfd { fd: event.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let timeout = i32::try_from(bound.as_millis().max(1)).unwrap_or(i32::MAX);
    // SAFETY: poll(2) on one pollfd that lives across the call; the eventfd
    // it names is borrowed, so open.
    unsafe { libc::poll(&mut ready, 1, timeout) == 1 }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    use super::*;

    /// Waits longer than any start, so that a test that never lets one
    /// finish fails instead of hanging.
    const BOUND: Duration = Duration::from_secs(10);

    struct Process;

    impl DriverProcess for Process {
        fn pid(&self) -> libc::pid_t {
            7
        }
        fn interrupt(&self, _index: usize) -> Option<&hardware::shared_eventfd::SharedEventFd> {
            None
        }
        fn activate(&mut self) -> bool {
            true
        }
        fn exit_report(&self) -> Option<String> {
            None
        }
        fn kill(&self) {}
        fn kill_and_wait(&self, _bound: Duration) -> bool {
            true
        }
    }

    /// A launcher whose spare starts only once the test lets it (or fail
    /// if `fail`).
    struct Gated {
        go: Mutex<mpsc::Receiver<()>>,
        fail: bool,
        finished: AtomicBool,
    }

    impl DriverLaunch for Gated {
        fn name(&self) -> &str {
            "gated"
        }
        fn launch(
            &self,
            _route: &mut dyn FnMut(&[hardware::shared_eventfd::SharedEventFd]) -> std::io::Result<()>,
        ) -> std::io::Result<Box<dyn DriverProcess>> {
            Err(std::io::Error::other("not used"))
        }
        fn launch_spare(&self, _kind: SpareKind) -> std::io::Result<Box<dyn DriverProcess>> {
            let go = self.go.lock().unwrap().recv_timeout(BOUND);
            self.finished.store(true, Ordering::SeqCst);
            match (go, self.fail) {
                (Ok(()), false) => Ok(Box::new(Process)),
                (Ok(()), true) => Err(std::io::Error::other("the vmm would not start")),
                (Err(_), _) => Err(std::io::Error::other("the test never let the start finish")),
            }
        }
    }

    fn gated(fail: bool) -> (Arc<Gated>, mpsc::Sender<()>) {
        let (go, gate) = mpsc::channel();
        (Arc::new(Gated { go: Mutex::new(gate), fail, finished: AtomicBool::new(false) }), go)
    }

    /// Blocks until the starter's eventfd says a start ended.
    fn wait_for_event(starter: &SpareStarter) {
        assert!(wait_readable(starter.event(), BOUND), "the starter never said its start ended");
    }

    #[test]
    fn a_start_returns_before_the_spare_has_started_and_signals_when_it_has() {
        let (launcher, go) = gated(false);
        let mut starter = SpareStarter::new().unwrap();
        starter.start(launcher.clone(), SpareKind::Warm).unwrap();
        // The launch is still blocked on the gate: `start` did not wait.
        assert!(!launcher.finished.load(Ordering::SeqCst));
        assert!(starter.busy());
        assert!(starter.take_finished().is_none(), "an unfinished start was taken");
        assert!(starter.start(launcher.clone(), SpareKind::Warm).is_err(), "two starts at once");
        go.send(()).unwrap();
        wait_for_event(&starter);
        let spare = starter.take_finished().expect("no outcome after the event").unwrap();
        assert_eq!(spare.pid(), 7);
        assert!(!starter.busy());
        assert!(starter.take_finished().is_none(), "an outcome was given twice");
    }

    #[test]
    fn a_failed_start_gives_its_error_and_the_next_one_can_run() {
        let (launcher, go) = gated(true);
        let mut starter = SpareStarter::new().unwrap();
        starter.start(launcher.clone(), SpareKind::Standby).unwrap();
        go.send(()).unwrap();
        wait_for_event(&starter);
        let error = starter.take_finished().unwrap().err().expect("a failed start gave a spare");
        assert!(error.to_string().contains("would not start"), "{error}");
        starter.start(launcher, SpareKind::Standby).unwrap();
        go.send(()).unwrap();
        assert!(starter.wait(BOUND).unwrap().is_err());
    }

    #[test]
    fn a_shutdown_waits_for_the_start_under_way_and_gets_its_spare() {
        let (launcher, go) = gated(false);
        let mut starter = SpareStarter::new().unwrap();
        assert!(starter.wait(BOUND).is_none(), "nothing was started");
        starter.start(launcher, SpareKind::Warm).unwrap();
        go.send(()).unwrap();
        assert_eq!(starter.wait(BOUND).unwrap().unwrap().pid(), 7);
        assert!(!starter.busy());
    }

    #[test]
    fn a_shutdown_does_not_wait_forever_for_a_start_that_never_ends() {
        let (launcher, go) = gated(false);
        let mut starter = SpareStarter::new().unwrap();
        starter.start(launcher, SpareKind::Warm).unwrap();
        let error = starter.wait(Duration::from_millis(1)).unwrap().err().expect("a start that had not ended");
        assert!(error.to_string().contains("did not end"), "{error}");
        assert!(!starter.busy());
        // Let the stuck start end, so the test leaves no thread behind.
        go.send(()).unwrap();
    }
}
