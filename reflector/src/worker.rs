//! Small helpers for the vhost-user worker threads of every device.

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use crate::client_vring::ClientVring;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::timerfd::TimerFd;

/// A timerfd whose read never blocks: several events of one epoll batch
/// may disarm a timer whose expiry is already queued, and a blocking read of
/// a disarmed timer would stall the worker for good.
pub fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: F_GETFL/F_SETFL on the timer's own descriptor.
    let ok = unsafe {
        let flags = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}

/// A non-blocking timer firing every `period`, from one period from now.
pub fn periodic_timer(period: std::time::Duration) -> std::io::Result<TimerFd> {
    let mut timer = nonblocking_timer()?;
    timer.reset(period, Some(period)).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    Ok(timer)
}

// The queue operations below take the client's memory from the caller: the
// device's checked snapshot (`client_memory::ClientMemory`), never the
// vring's own view, which vhost-user-backend points at a new table before
// the device has checked it (clippy.toml forbids the vring's methods that
// use its view).

/// Tells the client about used buffers, if it asked to be told and any
/// were added since it was last told. Nothing to do while its queue is not
/// set up (a timer may fire between two clients) or without a checked
/// memory table.
pub fn signal_used(vring: &ClientVring, memory: Option<&GuestMemoryMmap>) -> std::io::Result<()> {
    let Some(memory) = memory else { return Ok(()) };
    if !vring.get_ref().get_queue().ready() {
        return Ok(());
    }
    signal_used_anyway(vring, memory)
}

/// As [`signal_used`], for a queue the client is stopping (GET_VRING_BASE)
/// too: chains completed while the stop waited for them are told of.
pub fn signal_used_anyway(vring: &ClientVring, memory: &GuestMemoryMmap) -> std::io::Result<()> {
    let next_used = vring.get_ref().get_queue().next_used();
    if !vring.used_since_notified(next_used) {
        return Ok(());
    }
    let needed = vring.get_mut().get_queue_mut().needs_notification(memory).map_err(std::io::Error::other)?;
    if needed {
        if let Some(call) = vring.get_ref().get_call() {
            crate::client_vring::notify_client(call.as_raw_fd())?;
            vring.notified_at(next_used);
        }
    }
    Ok(())
}

/// Puts chain `head` in the used ring with `len` bytes written.
pub fn add_used(vring: &ClientVring, memory: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), virtio_queue::Error> {
    vring.get_mut().get_queue_mut().add_used(memory, head, len)
}

/// Asks the client to kick again (EVENT_IDX: past what was taken); whether
/// more chains came meanwhile.
pub fn enable_notification(vring: &ClientVring, memory: &GuestMemoryMmap) -> std::io::Result<bool> {
    vring.get_mut().get_queue_mut().enable_notification(memory).map_err(std::io::Error::other)
}

/// Asks the client not to kick while the device takes chains anyway.
pub fn disable_notification(vring: &ClientVring, memory: &GuestMemoryMmap) -> std::io::Result<()> {
    vring.get_mut().get_queue_mut().disable_notification(memory).map_err(std::io::Error::other)
}

/// Why the client's queue cannot be served, if it cannot: virtio-queue
/// then yields no chain while re-enabling notifications (EVENT_IDX) keeps
/// reporting more work, so a worker that did not check would spin for
/// ever, its device locked, a line logged at each turn. Checked before
/// every pass over the queue, so that a pass that finds a chain finds it
/// whole:
/// - its kick replaced while the queue is served (the old one stays in the
///   worker's epoll set, readable for ever while the client holds it);
/// - its avail ring at guest address 0, which virtio-queue takes for a
///   ring never set and refuses to pop;
/// - a ring that does not lie whole in its memory (the avail index
///   readable, its entries not);
/// - more available entries than the queue holds, or an avail index that
///   cannot be read.
pub fn broken_queue(vring: &ClientVring, memory: &GuestMemoryMmap) -> Option<&'static str> {
    if vring.reconfigured_while_served() {
        return Some("it replaced the kick, moved the rings, resized or rewound a queue being served");
    }
    let state = vring.get_ref();
    let queue = state.get_queue();
    if !queue.ready() {
        return None;
    }
    if queue.avail_ring() == 0 {
        return Some("its queue's avail ring is at guest address 0 (a ring never set)");
    }
    if !queue.is_valid(memory) {
        return Some("its queue's rings do not lie in its memory");
    }
    match queue.avail_idx(memory, Ordering::Acquire) {
        Ok(avail) if (avail - Wrapping(queue.next_avail())).0 > queue.size() => {
            Some("its queue's avail index runs beyond the queue size")
        }
        Ok(_) => None,
        Err(_) => Some("its queue's avail index cannot be read"),
    }
}

/// Why a client is cut off whose queue, asked again after a pass (EVENT_IDX
/// re-enabled), reports chains that the next pass cannot take while it is
/// still ready: whatever the cause, a worker that went on would spin. (A
/// queue the client stopped meanwhile, GET_VRING_BASE, yields nothing
/// either: that pass just ends, see [`queue_ready`].)
pub const STUCK_QUEUE: &str = "its queue reports chains that cannot be taken";

/// Whether the client's queue is set up and not stopped: vhost-user-backend
/// marks it not ready at GET_VRING_BASE before the device hears of the
/// stop, so a pass under way may find it so.
pub fn queue_ready(vring: &ClientVring) -> bool {
    vring.get_ref().get_queue().ready()
}

/// Whether the client's queue is ready and enabled (SET_VRING_ENABLE):
/// the device passes data through it only then. A disabled queue must be
/// processed without side effects (vhost-user: a net device supplies no
/// new receive frame into it and discards what is sent through it).
pub fn queue_enabled(vring: &ClientVring) -> bool {
    let state = vring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

/// What one queue event may still take from a queue: a queue's worth. A
/// client whose chains are completed as they are taken (malformed, or
/// discarded) is held back by nothing else, and publishing as fast as the
/// worker pops (another vCPU raising the avail index) kept one event going
/// for ever: the device held, its worker and its other events (answers,
/// watches, a hang) waiting (an adversarial review found it). Once it is
/// spent the event ends, and [`come_back_to`] has the worker return to the
/// queue after the events waiting.
pub struct ChainBudget(usize);

impl ChainBudget {
    /// A queue's worth of `vring`.
    pub fn of(vring: &ClientVring) -> Self {
        ChainBudget(usize::from(vring.get_ref().get_queue().size()))
    }

    /// How many more chains the event may take.
    pub fn left(&self) -> usize {
        self.0
    }

    /// Counts `chains` taken.
    pub fn took(&mut self, chains: usize) {
        self.0 = self.0.saturating_sub(chains);
    }

    /// Whether it is spent; if so, the worker comes back to `vring` after
    /// the events waiting ([`come_back_to`]).
    pub fn spent(&self, vring: &ClientVring) -> bool {
        let spent = self.0 == 0;
        if spent {
            come_back_to(vring);
        }
        spent
    }
}

/// Has the worker handle `vring`'s queue again after the events waiting:
/// a kick of the device's own, added to the queue's kick eventfd without
/// ever waiting (the client shares it: [`crate::client_vring::notify_client`]).
fn come_back_to(vring: &ClientVring) {
    if let Some(kick) = vring.get_ref().get_kick() {
        // Not logged: a client can make it fail at will (a kick that is
        // not an eventfd), and only its own chains then wait, for its
        // next kick.
        let _ = crate::client_vring::notify_client(kick.as_raw_fd());
    }
}

/// Whether taking one more chain from `vring` would give the device more
/// chains of this client than its queue has descriptors: the client then
/// offered a head the device still holds (virtio: a head is the driver's
/// again only once used). Each chain kept costs the reflector memory, so a
/// client that reuses heads could make it hold without bound.
pub fn exceeds_queue(vring: &ClientVring, held: usize) -> bool {
    held >= usize::from(vring.get_ref().get_queue().size())
}

/// What a device says when [`exceeds_queue`] cuts its client off.
pub const HEAD_REUSED: &str = "it offers more chains than its queue holds: a head reused while the device has it";

/// The `size` bytes at `offset` of a virtio config space, as a client reads
/// them: zeros past its end (a read the device cannot answer is not an
/// error in vhost-user).
pub fn config_read(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(config.len());
    let end = start.saturating_add(size as usize).min(config.len());
    let mut bytes = config[start..end].to_vec();
    bytes.resize(size as usize, 0);
    bytes
}
