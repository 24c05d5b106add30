//! What a device owes a client that stops a queue (GET_VRING_BASE) or
//! leaves: every request taken from the queue completed before the stop is
//! answered, and nothing a departed client left in the driver VM landing
//! after the next client's requests. Both run the device's own events on
//! the connection's thread for a bounded time ([`stop_bound`]), then give
//! up on what is still held and retire the driver VM holding it.

use std::time::{Duration, Instant};

use super::{Device, DeviceKind};
use crate::client_vring::ClientVring;
use crate::recovery::Fault;
use crate::session::Event;

/// The longest a queue the client stops waits for the requests the device
/// holds of it: a request's own deadline in one driver VM that has not
/// attached yet (`Session::request_deadline`), 4 s with the default hang
/// deadline, and at most [`STOP_BOUND_MOST`]. The device's watches fail
/// over a driver VM that holds one longer, so an answer or a replay
/// normally comes well within it; what a crash loop's backoff holds back
/// longer fails instead.
pub(super) fn stop_bound(hang_deadline: Duration) -> Duration {
    (hang_deadline * crate::session::REQUEST_DEADLINE_FACTOR + crate::session::BOOT_DEADLINE).min(STOP_BOUND_MOST)
}

/// The longest a stopped queue waits, whatever the hang deadline: the
/// client's QEMU waits for the stop's answer with its main loop held (its
/// guest frozen through a reset or reboot).
const STOP_BOUND_MOST: Duration = Duration::from_secs(10);

/// The event ids of `listeners` (descriptor, id) readable within `bound`
/// (none if it passes or poll fails).
fn readable(listeners: &[(std::os::fd::RawFd, u16)], bound: Duration) -> Vec<u16> {
    let mut fds: Vec<libc::pollfd> =
        listeners.iter().map(|(fd, _)| libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = i32::try_from(bound.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    // SAFETY: poll(2) on a vector of pollfds that lives across the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if ready <= 0 {
        return Vec::new();
    }
    fds.iter().zip(listeners).filter(|(fd, _)| fd.revents & libc::POLLIN != 0).map(|(_, (_, id))| *id).collect()
}

impl<K: DeviceKind> Device<K> {
    /// The client stopped queue `queue` (GET_VRING_BASE) and takes its ring
    /// back once this returns. The vhost-user spec asks that every request
    /// taken from it be completed first ("the back-end must complete all
    /// inflight I/O requests for the specified vring before stopping it"):
    /// completed later, a read's data and each status byte landed in
    /// memory that may by then be the next kernel's (its guest rebooted)
    /// or in a ring the client had moved on from. So the device runs its
    /// own events here, as the worker would (the worker waits meanwhile on
    /// the lock this runs under), until it holds nothing of the queue: the
    /// driver VM's answers, a failover and its replay, a failed device's
    /// errors. Its watches bound each of these; past `stop_bound`, what
    /// is still held completes with an I/O error now, and nowhere later
    /// ([`Device::abandon_stopped_queue`]).
    pub(super) fn finish_stopped_queue(&mut self, queue: usize, vrings: &[ClientVring]) {
        let held = self.kind.held_of_queue(&self.core, queue);
        if held > 0 {
            tracing::debug!(device = %self.core.name, queue, held, "queue stopped: completing what it gave first");
        }
        if !self.run_events_until(vrings, |device| device.kind.held_of_queue(&device.core, queue) == 0) {
            self.abandon_stopped_queue(queue, vrings);
        }
        // `signal_used` tells no stopped queue (and an event that ended
        // as the client stopped it may have left chains untold).
        if let (Some(vring), Some(memory)) = (vrings.get(queue), self.core.memory.as_deref()) {
            if let Err(error) = crate::worker::signal_used_anyway(vring, memory) {
                tracing::debug!(device = %self.core.name, %error, "cannot notify the client of its stopped queue");
            }
        }
    }

    /// Runs the device's own events, as the worker would, until `done`
    /// holds (true) or `stop_bound` passes (false). For the connection's
    /// thread, while it holds the device (the worker, if any, waits).
    fn run_events_until(&mut self, vrings: &[ClientVring], done: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + self.core.stop_bound;
        let listeners = self.listeners();
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            for event in readable(&listeners, left) {
                if let Some(source) = Self::source_of(event) {
                    let result = self.on_source(source, vrings);
                    self.after_event(vrings, event, result);
                }
            }
        }
        true
    }

    /// A client that left (or was cut off) may have left requests in the
    /// driver VM: a write of its could still reach the medium after the
    /// next client's writes to the same sectors (a QEMU that reconnects
    /// resubmits, and writes again), which would then read what it had
    /// overwritten. Before the next client is served, the driver VM answers
    /// them (into nothing) within `stop_bound`, or is retired as
    /// withholding them and its device quiesced.
    pub(super) fn finish_departed(&mut self) {
        let departed = self.kind.departed_in_driver(&self.core);
        if departed == 0 {
            return;
        }
        tracing::debug!(device = %self.core.name, departed, "the client left requests in the driver VM: waiting for them");
        if self.run_events_until(&[], |device| device.kind.departed_in_driver(&device.core) == 0) {
            return;
        }
        tracing::warn!(
            device = %self.core.name, bound = ?self.core.stop_bound,
            "a departed client's requests are still in the driver VM; retiring it"
        );
        self.retire_withholding(&[]);
    }

    /// Retires the running driver VM as withholding requests past
    /// `stop_bound` (its device quiesced before this returns), and settles
    /// what that brought.
    fn retire_withholding(&mut self, vrings: &[ClientVring]) {
        if self.core.session.running() {
            self.handle(vrings, Event::Fault(Fault::Withheld(self.core.stop_bound)));
        }
        self.after_event(vrings, u16::MAX, Ok(()));
    }

    /// The stopped queue's bound passed: what the device still holds of it
    /// completes with an I/O error now ([`DeviceKind::abandon_queue`]). A
    /// driver VM that holds some of it is retired as withholding them, its
    /// device quiesced before the stop returns: a write it held would
    /// otherwise still reach the medium later, after writes the client
    /// made once told it had failed.
    fn abandon_stopped_queue(&mut self, queue: usize, vrings: &[ClientVring]) {
        let held = self.kind.held_of_queue(&self.core, queue);
        tracing::warn!(
            device = %self.core.name, queue, held, bound = ?self.core.stop_bound,
            "queue stopped: requests still unanswered complete with an I/O error"
        );
        if self.kind.abandon_queue(&mut self.core, queue, vrings) > 0 {
            self.retire_withholding(vrings);
        } else {
            self.after_event(vrings, u16::MAX, Ok(()));
        }
    }
}
