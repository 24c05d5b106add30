//! Hostile-client actions (`blk-load --hostile CASE`): a vhost-user-blk client that breaks the
//! rules on purpose, so that tests can check a backend survives it and keeps serving its other
//! clients. Each action is done once; the connection then stays open until standard input
//! closes (or the timeout passes), so that a test can watch the backend react while the hostile
//! client is still there.
//!
//! - `memory-beyond-file`: a memory table whose region is 64 TiB on a 1 MiB memfd. A backend
//!   that maps it and later touches an address past the file's end takes SIGBUS. It must refuse
//!   the table (the connection ends).
//! - `shrink-memory`: a normal device whose memfd is truncated, after one verified write and
//!   read, to the start of the data buffers; then a write whose payload lies past the new end is
//!   submitted. Touching it raises SIGBUS in the backend, which must survive it and stop
//!   serving this client.
//! - `avail-overrun`: the avail index is set to the queue size plus 5 past what was consumed
//!   (with EVENT_IDX if offered). The backend must neither spin nor crash.
//! - `swap-memory`: while a second thread kicks the queue without pause, a new memory table
//!   whose region lies past the end of its (one page) memfd, over the rings, so that any touch
//!   of the queue through it raises SIGBUS; [`SWAP_ATTEMPTS`] times, on a fresh connection
//!   each. The backend must refuse every table without touching it, though its worker is busy
//!   with the queue when the table arrives.
//! - `cut-then-shrink`: `avail-overrun`, which makes the backend cut the client off; then,
//!   once the backend ended the connection or [`CUT_WAIT`] passed, the memfd truncated to
//!   nothing and the queue's addresses sent again (SET_VRING_ADDR), which makes a backend read
//!   the used index. A backend that unregistered the memory from its SIGBUS guard while its
//!   vhost-user handler still mapped it died here.
//! - `unoffered-features`: SET_PROTOCOL_FEATURES acknowledging `CONFIGURE_MEM_SLOTS`, which the
//!   backend did not offer (it would allow ADD_MEM_REG without limit). The backend must end
//!   the connection.
//! - `timer-kick`: a timerfd firing every microsecond sent as the queue's kick descriptor. A
//!   backend that takes it polls the queue for ever at no cost to the client; it must refuse
//!   it (end the connection).
//! - `semaphore-kick`: a semaphore-mode eventfd, its count at its most, as the queue's kick:
//!   readable for as many reads as its count, it kept the worker handling kicks for ever. The
//!   backend must refuse it.
//! - `full-call`: the call eventfd made blocking again (the backend shares its file
//!   description) and its count filled to the most it holds, then a request: a backend whose
//!   write to it blocks holds its device for as long as the client likes, and for ever after it
//!   disconnects. The request must complete (seen in the used ring), and the next client must
//!   be served.
//! - `drained-kick`: the kick eventfd made blocking again, then kicked and drained (its count
//!   read back before the backend could) over and over for [`DRAIN_RACE`], each drain a little
//!   later than the one before, until the client sees, in `/proc`, a thread of the backend (the
//!   socket's peer) asleep in a read of that kick. A backend whose worker reads a kick its
//!   epoll reported, after the client took it, sleeps there, with the queue locked, until the
//!   client kicks again, and for ever after it disconnects. No thread may be seen asleep there,
//!   and the next client must be served.
//! - `call-is-kick`: without EVENT_IDX (which makes a backend notify after every event), the
//!   queue's kick eventfd sent as its call too, then [`CALL_IS_KICK_REQUESTS`] requests, one at
//!   a time, each seen in the used ring. A backend that notifies without a used buffer added
//!   kicks itself with each notification, and its worker never rests; the test counts the kicks
//!   it handled (`reflector status`).
//! - `unwritable-avail-event`: with EVENT_IDX, the used ring moved to the very end of the
//!   client's memory, so that its `avail_event` field lies outside, then a request kicked. A
//!   backend that took the request and then failed to ask for the next kick left it unsent to its
//!   driver, which was later blamed for it. The backend must cut the client off (end the
//!   connection), blaming no driver.
//! - `avail-ring-past-memory`: with EVENT_IDX, the avail ring moved to the last 4 bytes of the
//!   client's memory, so that its index can be read and its entries cannot, the index one past
//!   what was consumed, then a kick. virtio-queue yields no chain from such a ring, while asking
//!   for the next kick reports one more: a backend that did not check spun for ever, its device
//!   locked, logging a line at each turn. The backend must cut the client off.
//! - `replaced-kick`: a new kick eventfd sent for the queue while it is served (no client that
//!   follows vhost-user does: it stops the queue first), then a request kicked through the old
//!   one. A backend that closed the old kick without taking it out of its epoll set found it
//!   readable for ever (the client holds it) and never read it again: its worker spun. The
//!   backend must cut the client off.
//! - `early-enables`: [`EARLY_ENABLES`] SET_VRING_ENABLE messages for queue 0 before any
//!   SET_FEATURES (which the backend must remember: QEMU's virtio-net sends one then), then a
//!   GET_FEATURES whose answer shows they were all read; the connection is then held. A
//!   backend that kept every one grew without bound (the test watches its memory).
//! - `early-enable-of-a-missing-queue`: one SET_VRING_ENABLE before SET_FEATURES for queue 1000,
//!   which the device does not have. The backend must end the connection (it would otherwise
//!   keep one entry per queue index a client names, four billion of them).
//! - `idle` (not hostile: the baseline): one write and read, then the connection is held, for
//!   tests that need a client connected while they look at something else.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::device::{BlkDevice, DeviceOptions, Op};
use crate::error::{Error, Result};
use crate::mem::GuestMem;
use crate::session::Session;

/// The hostile actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// A memory region larger than its file.
    MemoryBeyondFile,
    /// The memfd shrinks under the backend.
    ShrinkMemory,
    /// An avail index beyond the queue size.
    AvailOverrun,
    /// A bad memory table while the queue is kicked without pause.
    SwapMemory,
    /// A well-behaved client that stays connected.
    Idle,
    /// Cut off, then its memfd truncated and the queue's addresses sent again.
    CutThenShrink,
    /// A protocol feature the backend did not offer, acknowledged.
    UnofferedFeatures,
    /// A timerfd as the queue's kick.
    TimerKick,
    /// A semaphore eventfd as the queue's kick.
    SemaphoreKick,
    /// The call eventfd blocking and full.
    FullCall,
    /// The kick blocking, and drained before the backend reads it.
    DrainedKick,
    /// The kick eventfd as the call too.
    CallIsKick,
    /// The used ring's `avail_event` outside the client's memory.
    UnwritableAvailEvent,
    /// The avail ring's entries outside the client's memory, its index inside.
    AvailRingPastMemory,
    /// A new kick for a queue being served.
    ReplacedKick,
    /// SET_VRING_ENABLE without end before SET_FEATURES.
    EarlyEnables,
    /// SET_VRING_ENABLE before SET_FEATURES for a queue the device lacks.
    EarlyEnableOfAMissingQueue,
}

impl Case {
    /// Every case's name, for help and errors (in the order of [`Case`]'s variants).
    pub const NAMES: [&'static str; 17] = [
        "memory-beyond-file",
        "shrink-memory",
        "avail-overrun",
        "swap-memory",
        "idle",
        "cut-then-shrink",
        "unoffered-features",
        "timer-kick",
        "semaphore-kick",
        "full-call",
        "drained-kick",
        "call-is-kick",
        "unwritable-avail-event",
        "avail-ring-past-memory",
        "replaced-kick",
        "early-enables",
        "early-enable-of-a-missing-queue",
    ];

    /// Parses a case name.
    pub fn parse(name: &str) -> std::result::Result<Case, String> {
        match name {
            "memory-beyond-file" => Ok(Case::MemoryBeyondFile),
            "shrink-memory" => Ok(Case::ShrinkMemory),
            "avail-overrun" => Ok(Case::AvailOverrun),
            "swap-memory" => Ok(Case::SwapMemory),
            "idle" => Ok(Case::Idle),
            "cut-then-shrink" => Ok(Case::CutThenShrink),
            "unoffered-features" => Ok(Case::UnofferedFeatures),
            "timer-kick" => Ok(Case::TimerKick),
            "semaphore-kick" => Ok(Case::SemaphoreKick),
            "full-call" => Ok(Case::FullCall),
            "drained-kick" => Ok(Case::DrainedKick),
            "call-is-kick" => Ok(Case::CallIsKick),
            "unwritable-avail-event" => Ok(Case::UnwritableAvailEvent),
            "avail-ring-past-memory" => Ok(Case::AvailRingPastMemory),
            "replaced-kick" => Ok(Case::ReplacedKick),
            "early-enables" => Ok(Case::EarlyEnables),
            "early-enable-of-a-missing-queue" => Ok(Case::EarlyEnableOfAMissingQueue),
            other => Err(format!("unknown hostile case {other:?} (known: {})", Case::NAMES.join(", "))),
        }
    }
}

/// What happened, as far as the client can tell.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// The case's name.
    pub case: &'static str,
    /// The backend refused the action (ended the connection or answered an error).
    pub refused: bool,
    /// What the client saw.
    pub detail: String,
}

/// Does `case` against the backend at `path`; `done` is called with the outcome as soon as the
/// action is done, then the connection is held until standard input closes or `timeout` passes.
pub fn run(path: &Path, case: Case, opts: &DeviceOptions, done: impl FnOnce(&Outcome)) -> Result<Outcome> {
    let name = Case::NAMES[case as usize];
    let (outcome, hold): (Outcome, Box<dyn std::any::Any>) = match case {
        Case::MemoryBeyondFile => {
            let mut session = Session::connect(path, opts.timeout)?;
            let negotiated = session.negotiate(opts.event_idx)?;
            let mem = GuestMem::new(1 << 20)?;
            let sent = session.set_mem_table_sized(&mem, 64 << 40);
            // A round trip tells whether the backend kept the connection.
            let after = sent.and_then(|()| session.get_config(&negotiated).map(|_| ()));
            let outcome = refused_or_not(name, after, "the table was accepted");
            (outcome, Box::new((session, mem)))
        }
        Case::ShrinkMemory => {
            let mut device = BlkDevice::connect(path, opts)?;
            let first = device.run_one(0, Op::Write, 0, 4096)?;
            let second = device.run_one(0, Op::Read, 0, 4096)?;
            if first.status != 0 || second.status != 0 {
                return Err(Error::Protocol(format!(
                    "the warm-up write/read failed (status {}/{})",
                    first.status, second.status
                )));
            }
            let keep = device.data_offset() as u64;
            device.memory_file().set_len(keep).map_err(|e| Error::sys("truncating the guest memory memfd", e))?;
            device.submit(0, Op::Write, 8, 4096);
            device.kick()?;
            let mut completions = Vec::new();
            let detail = match device.wait().and_then(|()| device.reap(&mut completions)) {
                Ok(_) => match completions.first() {
                    Some(c) => format!("the write past the memory's end completed with status {}", c.status),
                    None => "no completion".into(),
                },
                Err(error) => format!("the write past the memory's end did not complete: {error}"),
            };
            let refused = completions.first().is_none_or(|c| c.status != 0);
            (Outcome { case: name, refused, detail }, Box::new(device))
        }
        Case::AvailOverrun => {
            let mut device = BlkDevice::connect(path, opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            let consumed = 1u16;
            let bogus = consumed.wrapping_add(device.queue_size()).wrapping_add(5);
            device.force_avail_index(bogus)?;
            let refused = device.check_connection().is_err();
            let detail =
                format!("avail index set to {bogus} with {consumed} consumed (queue size {})", device.queue_size());
            (Outcome { case: name, refused, detail }, Box::new(device))
        }
        Case::SwapMemory => {
            let mut refused = 0;
            for _ in 0..SWAP_ATTEMPTS {
                if swap_memory_under_kicks(path, opts)? {
                    refused += 1;
                }
            }
            let detail = format!("{refused} of {SWAP_ATTEMPTS} bad tables refused while the queue was kicked");
            (Outcome { case: name, refused: refused == SWAP_ATTEMPTS, detail }, Box::new(()))
        }
        Case::Idle => {
            let mut device = BlkDevice::connect(path, opts)?;
            let (write, read) = (device.run_one(0, Op::Write, 0, 4096)?, device.run_one(0, Op::Read, 0, 4096)?);
            let refused = write.status != 0 || read.status != 0;
            let detail = format!("write status {}, read status {}", write.status, read.status);
            (Outcome { case: name, refused, detail }, Box::new(device))
        }
        Case::CutThenShrink => {
            let mut device = BlkDevice::connect(path, opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            let bogus = 1u16.wrapping_add(device.queue_size()).wrapping_add(5);
            device.force_avail_index(bogus)?;
            let hung_up = device.wait_for_hangup(CUT_WAIT);
            device.memory_file().set_len(0).map_err(|e| Error::sys("truncating the guest memory memfd", e))?;
            // Nothing of the client touches its memory from here on: it would fault too.
            let readdressed = device.readdress_queue();
            let detail = format!(
                "the backend ended the connection: {hung_up}; SET_VRING_ADDR after truncating the memory: {}",
                readdressed.as_ref().map_or_else(|e| format!("failed ({e})"), |()| "accepted".into())
            );
            (Outcome { case: name, refused: hung_up && readdressed.is_err(), detail }, Box::new(device))
        }
        Case::UnofferedFeatures => {
            let mut session = Session::connect(path, opts.timeout)?;
            let negotiated = session.negotiate(opts.event_idx)?;
            let slots = vhost::vhost_user::VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits();
            let sent = session.set_protocol_features_raw(negotiated.protocol | slots);
            let after = sent.and_then(|()| session.get_config(&negotiated).map(|_| ()));
            let outcome = refused_or_not(name, after, "CONFIGURE_MEM_SLOTS was accepted");
            (outcome, Box::new(session))
        }
        Case::SemaphoreKick | Case::TimerKick => {
            let mut device = BlkDevice::connect(path, opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            let timer = if case == Case::TimerKick { ticking_timer()? } else { full_semaphore()? };
            let negotiated = *device.negotiated();
            let sent = device.session_mut().set_vring_kick(0, &timer);
            let after = sent.and_then(|()| device.session_mut().get_config(&negotiated).map(|_| ()));
            let outcome = refused_or_not(name, after, "the kick was accepted");
            (outcome, Box::new((device, timer)))
        }
        Case::FullCall => {
            let mut device = BlkDevice::connect(path, opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            device.fill_call_count()?;
            device.submit(0, Op::Read, 0, 4096);
            device.kick()?;
            let completed = device.poll_used(Duration::from_secs(5));
            let detail = format!("the request after the call eventfd filled up completed: {completed}");
            // Not refused: served, and the backend did not block.
            (Outcome { case: name, refused: !completed, detail }, Box::new(device))
        }
        Case::DrainedKick => {
            let mut device = BlkDevice::connect(path, opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            let kick = device.kick_handle()?;
            let (rounds, asleep) = drain_kicks(&kick, device.session_mut().socket())?;
            let detail = format!(
                "{rounds} kicks drained; a backend thread seen asleep in a read of the kick: {}",
                asleep.as_deref().unwrap_or("none")
            );
            // Not refused: no thread of the backend waited for the client.
            (Outcome { case: name, refused: asleep.is_some(), detail }, Box::new((device, kick)))
        }
        Case::CallIsKick => {
            let opts = DeviceOptions { event_idx: false, ..opts.clone() };
            let mut device = BlkDevice::connect(path, &opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            let kick = device.kick_handle()?;
            device.session_mut().set_vring_call(0, &kick)?;
            let mut completed = 0;
            let mut completions = Vec::new();
            for _ in 0..CALL_IS_KICK_REQUESTS {
                device.submit(0, Op::Read, 0, 4096);
                device.kick()?;
                if !device.poll_used(Duration::from_secs(5)) {
                    break;
                }
                completed += device.reap(&mut completions)?;
            }
            let detail = format!("{completed} of {CALL_IS_KICK_REQUESTS} requests completed with the kick as the call");
            (Outcome { case: name, refused: completed != CALL_IS_KICK_REQUESTS, detail }, Box::new((device, kick)))
        }
        Case::UnwritableAvailEvent => {
            let opts = DeviceOptions { event_idx: true, ..opts.clone() };
            let mut device = BlkDevice::connect(path, &opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            // The backend may look at the queue as soon as it is enabled
            // again, and end the connection before it answers the enable.
            let moved = device.used_ring_at_memory_end();
            if moved.is_ok() {
                device.submit(0, Op::Read, 0, 4096);
                device.kick()?;
            }
            let hung_up = device.wait_for_hangup(CUT_WAIT);
            let detail = format!("the backend ended the connection: {hung_up} (at the move: {})", moved.is_err());
            (Outcome { case: name, refused: hung_up, detail }, Box::new(device))
        }
        Case::AvailRingPastMemory => {
            let opts = DeviceOptions { event_idx: true, ..opts.clone() };
            let mut device = BlkDevice::connect(path, &opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            // One request consumed: the index says one more. The backend
            // may look at the queue as soon as it is enabled again, and end
            // the connection before it answers the enable.
            let moved = device.avail_ring_at_memory_end(2);
            let hung_up = device.wait_for_hangup(CUT_WAIT);
            let detail = format!("the backend ended the connection: {hung_up} (at the move: {})", moved.is_err());
            (Outcome { case: name, refused: hung_up, detail }, Box::new(device))
        }
        Case::ReplacedKick => {
            let mut device = BlkDevice::connect(path, opts)?;
            device.run_one(0, Op::Write, 0, 4096)?;
            let replacement = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| Error::sys("creating an eventfd", e))?;
            device.session_mut().set_vring_kick(0, &replacement)?;
            device.submit(0, Op::Read, 0, 4096);
            device.kick()?;
            let hung_up = device.wait_for_hangup(CUT_WAIT);
            let detail = format!("the backend ended the connection: {hung_up}");
            (Outcome { case: name, refused: hung_up, detail }, Box::new((device, replacement)))
        }
        Case::EarlyEnables => {
            let session = Session::connect(path, opts.timeout)?;
            let batch: Vec<u8> = (0..1024).flat_map(|_| early_enable(0)).collect();
            let mut sent = Ok(());
            for _ in 0..EARLY_ENABLES / 1024 {
                sent = session.socket().write_all(&batch);
                if sent.is_err() {
                    break;
                }
            }
            // GET_FEATURES, answered once every enable before it was read.
            let answered = sent.and_then(|()| {
                let mut socket = session.socket();
                socket.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])?;
                socket.read_exact(&mut [0u8; 20])
            });
            let detail = match &answered {
                Ok(()) => format!("{EARLY_ENABLES} enables sent before SET_FEATURES, all read"),
                Err(error) => format!("the backend ended the connection: {error}"),
            };
            (Outcome { case: name, refused: answered.is_err(), detail }, Box::new(session))
        }
        Case::EarlyEnableOfAMissingQueue => {
            let session = Session::connect(path, opts.timeout)?;
            let sent = session.socket().write_all(&early_enable(1000));
            let hung_up = sent.is_err() || hung_up(session.socket(), CUT_WAIT);
            let detail = format!("the backend ended the connection: {hung_up}");
            (Outcome { case: name, refused: hung_up, detail }, Box::new(session))
        }
    };
    done(&outcome);
    hold_until_stdin_closes(opts.timeout);
    drop(hold);
    Ok(outcome)
}

/// The outcome of an action the backend either refused (`after`, a round trip, failed: the
/// connection ended) or took (`accepted` says what).
fn refused_or_not(case: &'static str, after: Result<()>, accepted: &str) -> Outcome {
    match after {
        Ok(()) => Outcome { case, refused: false, detail: accepted.into() },
        Err(error) => Outcome { case, refused: true, detail: format!("refused: {error}") },
    }
}

/// SET_VRING_ENABLE messages `early-enables` sends before SET_FEATURES: 16 MiB, kept whole.
pub const EARLY_ENABLES: usize = 2 << 20;

/// A SET_VRING_ENABLE message (request 18, version 1, no reply asked) enabling queue `index`.
fn early_enable(index: u32) -> Vec<u8> {
    [18u32, 1, 8, index, 1].iter().flat_map(|word| word.to_le_bytes()).collect()
}

/// Waits at most `timeout` for the backend to hang up `socket`; whether it did.
fn hung_up(socket: &std::os::unix::net::UnixStream, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fd = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: `fd` is one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut fd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if rc > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return true;
        }
        if left.is_zero() {
            return false;
        }
    }
}

/// How long `cut-then-shrink` waits for the backend to end its connection before it goes on.
pub const CUT_WAIT: Duration = Duration::from_secs(2);

/// A timerfd that fires every microsecond, as an `EventFd` (which only wraps a descriptor).
fn ticking_timer() -> Result<vmm_sys_util::eventfd::EventFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: timerfd_create with constant arguments; checked below.
    let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
    if fd < 0 {
        return Err(Error::last_os("timerfd_create"));
    }
    // SAFETY: a fresh descriptor this owns from here on.
    let timer = unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(fd) };
    let every = libc::timespec { tv_sec: 0, tv_nsec: 1000 };
    let spec = libc::itimerspec { it_interval: every, it_value: every };
    // SAFETY: arms the timer just created with a valid itimerspec.
    if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(Error::last_os("timerfd_settime"));
    }
    Ok(timer)
}

/// A semaphore-mode eventfd whose count is at its most, as an `EventFd`.
fn full_semaphore() -> Result<vmm_sys_util::eventfd::EventFd> {
    let semaphore = vmm_sys_util::eventfd::EventFd::new(libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK)
        .map_err(|e| Error::sys("creating a semaphore eventfd", e))?;
    semaphore.write(u64::MAX - 1).map_err(|e| Error::sys("filling the semaphore eventfd", e))?;
    Ok(semaphore)
}

/// The requests `call-is-kick` makes after it sent its kick as the call.
pub const CALL_IS_KICK_REQUESTS: usize = 20;

/// How long `drained-kick` races the backend for its kicks.
pub const DRAIN_RACE: Duration = Duration::from_secs(2);

/// `drained-kick`'s race: kicks and drains `kick` (made blocking) until a thread of the
/// backend at the other end of `socket` is seen asleep reading it, or [`DRAIN_RACE`] passes.
/// Returns the rounds raced and the thread seen, if any.
fn drain_kicks(
    kick: &vmm_sys_util::eventfd::EventFd,
    socket: &std::os::unix::net::UnixStream,
) -> Result<(u64, Option<String>)> {
    use std::os::fd::AsRawFd;
    let fd = kick.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on our own eventfd.
    let cleared = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(Error::last_os("clearing O_NONBLOCK on the kick eventfd"));
    }
    let backend = peer_pid(socket)?;
    let id = eventfd_id(std::process::id() as libc::pid_t, fd)
        .ok_or_else(|| Error::Protocol("the kick's eventfd-id is not in /proc/self/fdinfo".into()))?;
    let deadline = Instant::now() + DRAIN_RACE;
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        kick.write(1).map_err(|e| Error::sys("kicking", e))?;
        // Each drain a little later, up to 64 us: the backend's wake-up
        // takes that long, and the race is won by a drain between its
        // epoll's look at the kick and its read.
        let wait = Instant::now() + Duration::from_micros(rounds % 64);
        while Instant::now() < wait {
            std::hint::spin_loop();
        }
        let mut count = 0u64;
        let iov = libc::iovec { iov_base: (&raw mut count).cast(), iov_len: 8 };
        // SAFETY: preadv2(2) into the 8 bytes of `count`, without waiting
        // (the description is blocking now, for the backend too).
        unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        rounds += 1;
        if let Some(thread) = asleep_on_eventfd(backend, id) {
            return Ok((rounds, Some(thread)));
        }
    }
    Ok((rounds, None))
}

/// The pid of the process at the other end of a unix socket.
fn peer_pid(socket: &std::os::unix::net::UnixStream) -> Result<libc::pid_t> {
    use std::os::fd::AsRawFd;
    let mut credentials = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) SO_PEERCRED into a ucred of the length given.
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut credentials).cast(),
            &mut len,
        )
    };
    if got != 0 {
        return Err(Error::last_os("SO_PEERCRED on the vhost-user socket"));
    }
    Ok(credentials.pid)
}

/// The `eventfd-id` of descriptor `fd` of process `pid` (the same eventfd has the same id in
/// every process that holds it).
fn eventfd_id(pid: libc::pid_t, fd: i32) -> Option<u64> {
    let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    fdinfo.lines().find_map(|line| line.strip_prefix("eventfd-id:")?.trim().parse().ok())
}

/// A thread of `pid` asleep in a read(2) or write(2) of the eventfd whose id is `id`, named by
/// its tid and its wait; none when nothing is, or `/proc` does not tell.
fn asleep_on_eventfd(pid: libc::pid_t, id: u64) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.filter_map(|task| task.ok()).find_map(|task| {
        let syscall = std::fs::read_to_string(task.path().join("syscall")).ok()?;
        let mut fields = syscall.split_whitespace();
        let number = fields.next()?;
        let fd = i32::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
        let read_or_write = ["0", "1"].contains(&number);
        (read_or_write && eventfd_id(pid, fd) == Some(id)).then(|| {
            let wchan = std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
            format!("{} in syscall {number} ({wchan})", task.file_name().to_string_lossy())
        })
    })
}

/// How many bad tables `swap-memory` sends, each on a fresh connection: the backend's worker is
/// in the middle of an event when most of them arrive.
pub const SWAP_ATTEMPTS: u32 = 20;

/// One `swap-memory` attempt: connects, kicks the queue from another thread without pause,
/// sends a table whose region runs past its one-page memfd over the rings, and says whether
/// the backend refused it (ended the connection).
fn swap_memory_under_kicks(path: &Path, opts: &DeviceOptions) -> Result<bool> {
    let mut device = BlkDevice::connect(path, opts)?;
    device.run_one(0, Op::Write, 0, 4096)?;
    let kick = device.kick_handle()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kicker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = kick.write(1);
                std::thread::yield_now();
            }
        })
    };
    // The rings start at the memory's first byte: everything past the first page is past the
    // new file's end.
    let page = GuestMem::new(4096)?;
    let size = device.mem_size() as u64;
    let sent = device.session_mut().set_mem_table_sized(&page, size);
    let negotiated = *device.negotiated();
    let after = sent.and_then(|()| device.session_mut().get_config(&negotiated).map(|_| ()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = kicker.join();
    Ok(after.is_err())
}

/// Keeps the connection (held by the caller) open until standard input reaches its end, at
/// most `timeout`.
fn hold_until_stdin_closes(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}
