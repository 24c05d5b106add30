//! A client's queue ([`ClientVring`]) and the two descriptors of it that the
//! client shares with the reflector: its kick eventfd, which the worker
//! reads, and its call eventfd, which the worker adds to. This is the one
//! place the reflector touches either.
//!
//! The client keeps its end of both descriptors, and with it the *file
//! description*: it can clear the `O_NONBLOCK` the reflector sets, drain a
//! kick between the worker's wake-up and its read, and fill its call
//! count. A plain `read(2)` or `write(2)` of them can then sleep for as long
//! as the client likes, inside the device's event, with its vring locked,
//! and for ever after the client leaves (the next client is never served).
//! So neither is ever a plain `read(2)` or `write(2)`: the kick is read
//! with [`hardware::shared_eventfd::take`] (a drained kick is a spurious
//! wake-up, nothing more) and the call added to with
//! [`hardware::shared_eventfd::signal`] (the kernel's own eventfd signal,
//! which saturates instead of waiting), the two ways the reflector touches
//! any eventfd another process holds.
//!
//! It is not the queue's logic: vhost-user-backend's `VringRwLock` keeps
//! the queue's state, and [`crate::worker`] reads client memory through the
//! device's checked snapshot.

// The one place vhost-user-backend's vring may be named (clippy.toml).
#![allow(clippy::disallowed_types)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// The client memory every vring of the reflector is typed with.
type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A client's queue: vhost-user-backend's `VringRwLock`, but its kick is
/// read without ever waiting ([`read_kick_without_waiting`]) and never
/// reconfigured while served ([`ClientVring::reconfigured_while_served`]), and it
/// remembers the used index its client was last notified at.
#[derive(Clone)]
pub struct ClientVring(VringRwLock, Arc<AtomicU32>, Arc<AtomicBool>, Arc<AtomicBool>);

impl ClientVring {
    /// No notification yet: no used index is `u32::MAX`.
    const NEVER: u32 = u32::MAX;

    /// Whether the used index moved since the client was last notified:
    /// a notification without a used buffer added tells a client nothing,
    /// and one whose call is also a kick (its own or another queue's)
    /// would wake the worker again for ever.
    pub fn used_since_notified(&self, next_used: u16) -> bool {
        self.1.load(Ordering::Relaxed) != u32::from(next_used)
    }

    /// Whether the queue is served (set up, enabled, kicked), which a
    /// change of its kick, rings, size or indices is refused in: then
    /// noted ([`ClientVring::reconfigured_while_served`]).
    fn refused_while_served(&self) -> bool {
        let served = {
            let state = self.0.get_ref();
            state.get_queue().ready() && state.is_enabled() && state.get_kick().is_some()
        };
        if served {
            self.2.store(true, Ordering::Relaxed);
        }
        served
    }

    /// Whether `other` is this very queue (a clone of it), not another one.
    pub fn same(&self, other: &ClientVring) -> bool {
        Arc::ptr_eq(&self.1, &other.1)
    }

    /// The client was notified at used index `next_used`.
    pub fn notified_at(&self, next_used: u16) {
        self.1.store(u32::from(next_used), Ordering::Relaxed);
    }

    /// A queue set up anew (its rings, size or indices: a guest's reboot,
    /// a driver reloaded) has never been notified: the index of the last
    /// notification before would, were the first used index after it the
    /// same, keep that notification from being sent, and a guest waiting
    /// on one request would wait for ever (an adversarial review found it).
    fn forget_notified(&self) {
        self.1.store(Self::NEVER, Ordering::Relaxed);
    }

    /// Whether the client replaced the kick, moved the rings, resized the
    /// queue or set its indices while the queue was served (set up,
    /// enabled, kicked): each is kept as it was and noted, and the client
    /// is cut off ([`crate::worker::broken_queue`]). A client changes them
    /// only while the queue is stopped (GET_VRING_BASE) or disabled; the
    /// device holds chains of the ring as it was, whose heads, put in a
    /// moved or resized ring, or popped again after a rewound index, would
    /// be completed into the wrong ring or twice (an adversarial review
    /// found the rings and indices could change). A kick replaced would be
    /// closed by vhost-user-backend's handler without leaving the worker's
    /// epoll set, where it stays readable for ever while the client holds
    /// its end, never read again: the worker would spin.
    pub fn reconfigured_while_served(&self) -> bool {
        self.2.load(Ordering::Relaxed)
    }

    /// Whether the client gave a kick that was refused ([`takes_whole_count`]):
    /// it is closed, the queue never served, and the device cuts the client
    /// off at its next event (`Device::settle`), as the vhost-user handler
    /// ends the connection where the kernel says which eventfds are
    /// semaphores. Logged once a queue: a client sending such kicks in a
    /// loop cannot flood the log.
    pub fn kick_refused(&self) -> bool {
        self.3.load(Ordering::Relaxed)
    }
}

impl<'a> VringStateGuard<'a, Memory> for ClientVring {
    type G = <VringRwLock as VringStateGuard<'a, Memory>>::G;
}

impl<'a> VringStateMutGuard<'a, Memory> for ClientVring {
    type G = <VringRwLock as VringStateMutGuard<'a, Memory>>::G;
}

// vhost-user-backend's own handler calls these (clippy.toml forbids the
// device to, as they use the vring's unchecked view of client memory); the
// wrapper only passes them on.
#[allow(clippy::disallowed_methods)]
impl VringT<Memory> for ClientVring {
    fn new(mem: Memory, max_queue_size: u16) -> Result<Self, VirtQueError> {
        let vring = VringRwLock::new(mem, max_queue_size)?;
        Ok(ClientVring(vring, Arc::new(AtomicU32::new(Self::NEVER)), Arc::default(), Arc::default()))
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Memory>>::G {
        self.0.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Memory>>::G {
        self.0.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.0.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        match self.0.get_ref().get_call() {
            Some(call) => notify_client(call.as_raw_fd()),
            None => Ok(()),
        }
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.0.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.0.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.0.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        // No kick of the device's own is needed when the queue is enabled
        // again: vhost-user-backend takes a disabled queue's kick out of
        // the worker's epoll set, and queues an event for it when it puts
        // it back.
        self.0.set_enabled(enabled)
    }

    fn set_queue_info(&self, desc_table: u64, avail_ring: u64, used_ring: u64) -> Result<(), VirtQueError> {
        if self.refused_while_served() {
            return Ok(());
        }
        self.forget_notified();
        self.0.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.0.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        if !self.refused_while_served() {
            self.0.set_queue_next_avail(base);
            self.forget_notified();
        }
    }

    fn set_queue_next_used(&self, idx: u16) {
        if !self.refused_while_served() {
            self.0.set_queue_next_used(idx);
            self.forget_notified();
        }
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.0.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        if !self.refused_while_served() {
            self.0.set_queue_size(num);
            self.forget_notified();
        }
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.0.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        // See `reconfigured_while_served`: the new descriptor (if any) is
        // closed.
        if !self.refused_while_served() {
            let file = file.filter(|kick| match takes_whole_count(kick) {
                Ok(()) => true,
                Err(why) => {
                    if !self.3.swap(true, Ordering::Relaxed) {
                        tracing::warn!("refusing a client's kick: {why}; the client is cut off");
                    }
                    false
                }
            });
            self.0.set_kick(file)
        }
    }

    /// Whether the queue is enabled, having consumed the kick if one is
    /// there: a kick the client drained first is not waited for.
    fn read_kick(&self) -> io::Result<bool> {
        let state: <VringRwLock as VringStateGuard<'_, Memory>>::G = self.0.get_ref();
        let state: &VringState<Memory> = &state;
        if let Some(kick) = state.get_kick() {
            read_kick_without_waiting(kick.as_raw_fd())?;
        }
        Ok(state.is_enabled())
    }

    fn set_call(&self, file: Option<File>) {
        self.0.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.0.set_err(file)
    }
}

/// What a kick whose reads do not take its whole count is, for messages.
pub const PARTIAL_READ_KICK: &str = "an eventfd in semaphore mode, or one the client reads itself";

/// Whether a kick may be taken: a read of it takes its whole count, on any
/// kernel ([`hardware::shared_eventfd::reads_whole_count`]); else why not.
/// A kick that is refused is closed, and its queue never served (it never
/// becomes ready): a semaphore eventfd with a large count would wake the
/// worker for ever, a reflector core the client pays nothing for. On
/// Linux 6.7 and later the vhost-user handler refuses one first
/// (`third_party/vhost`, PATCHED.md).
fn takes_whole_count(kick: &File) -> Result<(), String> {
    match hardware::shared_eventfd::reads_whole_count(kick.as_raw_fd()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("a read of it does not take its whole count ({PARTIAL_READ_KICK})")),
        Err(error) => Err(format!("it cannot be signalled and read without waiting ({error})")),
    }
}

/// Consumes a kick eventfd's count if it has one; returns at once if not,
/// whatever the client did to the descriptor's flags.
pub fn read_kick_without_waiting(kick: RawFd) -> io::Result<()> {
    hardware::shared_eventfd::take(kick).map(|_| ())
}

/// Adds 1 to a client's call eventfd without ever waiting, however full its
/// count and whatever its flags (`hardware::shared_eventfd::signal`).
pub fn notify_client(call: RawFd) -> io::Result<()> {
    hardware::shared_eventfd::signal(call)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Duration;

    fn eventfd(count: u32, flags: libc::c_int) -> OwnedFd {
        // SAFETY: eventfd(2); checked below.
        let fd = unsafe { libc::eventfd(count, libc::EFD_CLOEXEC | flags) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor this owns from here on.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// A kick in semaphore mode is refused on any kernel, not only where
    /// the vhost-user handler is told by the kernel (Linux 6.7): its queue
    /// never becomes ready, so the worker never waits on it. A plain one is
    /// taken, and a kick it held is kept.
    #[test]
    fn a_semaphore_kick_is_refused_on_any_kernel() {
        let memory = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let vring = ClientVring::new(GuestMemoryAtomic::new(memory), 256).unwrap();
        let semaphore = eventfd(1 << 30, libc::EFD_SEMAPHORE);
        vring.set_kick(Some(File::from(semaphore.try_clone().unwrap())));
        assert!(vring.get_ref().get_kick().is_none(), "a semaphore kick was taken");
        assert!(vring.kick_refused(), "a refused kick was not noted");
        let plain = eventfd(1, 0);
        vring.set_kick(Some(File::from(plain.try_clone().unwrap())));
        assert!(vring.get_ref().get_kick().is_some(), "a plain kick was refused");
        assert_eq!(hardware::shared_eventfd::take(plain.as_raw_fd()).unwrap(), 1, "the kick it held was lost");
    }

    /// A queue's kick may be replaced while the queue is stopped or
    /// disabled (its kick then out of the worker's epoll set), not while it
    /// is served: the old one is kept, read, and the replacement noted.
    #[test]
    fn a_kick_replaced_while_served_is_kept_and_noted() {
        let memory = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let vring = ClientVring::new(GuestMemoryAtomic::new(memory), 256).unwrap();
        let kick = |fd: &OwnedFd| Some(File::from(fd.try_clone().unwrap()));
        let kept_fd = |vring: &ClientVring| vring.get_ref().get_kick().as_ref().map(|kick| kick.as_raw_fd());
        let (first, second, third) = (eventfd(0, 0), eventfd(0, 0), eventfd(1, 0));
        vring.set_kick(kick(&first));
        vring.set_queue_ready(true);
        vring.set_enabled(false);
        vring.set_kick(kick(&second));
        assert!(!vring.reconfigured_while_served(), "a disabled queue's kick may be replaced");
        vring.set_enabled(true);
        let served = kept_fd(&vring);
        vring.set_kick(kick(&third));
        assert!(vring.reconfigured_while_served(), "a served queue's kick was replaced unnoticed");
        assert_eq!(kept_fd(&vring), served, "the served kick was not kept");
    }

    /// A served queue's rings, size and indices are kept as they are, and
    /// the change noted; a disabled queue's change (a client restarting it)
    /// is applied.
    #[test]
    fn a_served_queues_rings_size_and_indices_are_kept_and_the_change_noted() {
        let memory = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        type Change = fn(&ClientVring);
        let changes: [(&str, Change); 4] = [
            ("rings", |vring| vring.set_queue_info(0x10000, 0x20000, 0x30000).unwrap()),
            ("size", |vring| vring.set_queue_size(64)),
            ("next avail", |vring| vring.set_queue_next_avail(7)),
            ("next used", |vring| vring.set_queue_next_used(9)),
        ];
        let state = |vring: &ClientVring| {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (
                queue.desc_table(),
                queue.avail_ring(),
                queue.used_ring(),
                queue.size(),
                queue.next_avail(),
                queue.next_used(),
            )
        };
        for (what, change) in changes {
            let vring = ClientVring::new(GuestMemoryAtomic::new(memory.clone()), 256).unwrap();
            vring.set_queue_size(128);
            vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
            vring.set_kick(Some(File::from(eventfd(0, 0))));
            vring.set_queue_ready(true);
            vring.set_enabled(false);
            let before = state(&vring);
            change(&vring);
            assert!(!vring.reconfigured_while_served(), "{what}: a disabled queue's change was refused");
            assert_ne!(state(&vring), before, "{what}: a disabled queue's change was not applied");
            vring.set_enabled(true);
            let before = state(&vring);
            // The same change again, to other values where it has some.
            change(&vring);
            vring.set_queue_info(0x4000, 0x5000, 0x6000).unwrap();
            vring.set_queue_size(32);
            assert!(vring.reconfigured_while_served(), "{what}: a served queue's change went unnoticed");
            assert_eq!(state(&vring), before, "{what}: a served queue was changed");
        }
    }

    /// Runs `f` on a thread; whether it returned within 5 s (a thread that
    /// sleeps for good is left behind: the test has failed).
    fn returns(f: impl FnOnce() + Send + 'static) -> bool {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = done.send(());
        });
        finished.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    /// A kick the client drained (its descriptor blocking, its count 0) is
    /// a spurious wake-up: the read returns at once, the queue still
    /// enabled; a kick still there is consumed.
    #[test]
    fn a_drained_blocking_kick_is_not_waited_for() {
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let vring = ClientVring::new(memory, 256).unwrap();
        let kick = eventfd(0, 0);
        vring.set_kick(Some(File::from(kick.try_clone().unwrap())));
        vring.set_enabled(true);
        let reader = vring.clone();
        assert!(returns(move || assert!(reader.read_kick().unwrap())), "the read waited on a drained kick");
        let one = 1u64;
        // SAFETY: write(2) of 8 bytes from a local.
        assert_eq!(unsafe { libc::write(kick.as_raw_fd(), (&raw const one).cast(), 8) }, 8);
        assert!(vring.read_kick().unwrap());
        assert_eq!(hardware::shared_eventfd::take(kick.as_raw_fd()).unwrap(), 0, "the kick was not consumed");
    }

    /// A queue set up anew (its indices rewound: a guest's reboot) has not
    /// been notified yet, whatever index the last notification was at:
    /// otherwise a first completion at that same index went untold, and a
    /// guest waiting on it waited for ever.
    #[test]
    fn a_queue_set_up_anew_has_not_been_notified() {
        let memory = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        type Change = fn(&ClientVring);
        let changes: [(&str, Change); 4] = [
            ("rings", |vring| vring.set_queue_info(0x10000, 0x20000, 0x30000).unwrap()),
            ("size", |vring| vring.set_queue_size(64)),
            ("next avail", |vring| vring.set_queue_next_avail(0)),
            ("next used", |vring| vring.set_queue_next_used(0)),
        ];
        for (what, change) in changes {
            let vring = ClientVring::new(GuestMemoryAtomic::new(memory.clone()), 256).unwrap();
            vring.notified_at(1);
            assert!(!vring.used_since_notified(1));
            change(&vring);
            assert!(vring.used_since_notified(1), "{what}: the last notification before it still counts");
        }
    }
}
