//! Test doubles for the device's unit tests, so that recovery is tested
//! without KVM: a driver that runs as a thread on the real channel
//! ([`FakeLaunch`], scripted per start to serve, die, hang or lie), the
//! block hardware it drives ([`FakeDisk`]: a medium in memory that counts
//! its own flushes), and a client ([`Client`]: a split virtqueue in test
//! memory written with virtio-queue's mock, and the event loop
//! vhost-user-backend would run).

use hardware::shared_eventfd::SharedEventFd;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::client_vring::ClientVring;
use guest_abi::channel::{self, op, status, RequestEntry};
use vhost_user_backend::{VhostUserBackendMut, VringT};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::hw::dma_windows::{DeviceAccess, DmaWindows};
use crate::hw::{BlockHardware, FlushCount, Hardware, HardwareWindow, InterruptRoute};
use crate::inline_driver::{spawn_thread, Answer, ThreadDriver, ThreadLaunch};
use crate::shm::SharedMemory;

/// What a fake driver does once started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// Serves every request correctly.
    Serve,
    /// Panics before it attaches (a driver that never comes up).
    DieAtStart,
    /// Panics when it takes a request for this sector.
    PanicOnSector(u64),
    /// Takes requests and never answers them.
    Hang,
    /// Serves every request but those for this sector, which it takes and
    /// never answers.
    WithholdSector(u64),
    /// Answers every request with a length it did not have.
    Lie,
    /// Answers every read OK with a bit of its data flipped.
    CorruptReads,
    /// Carries out writes in the order it takes them, and completes those
    /// taken together last first (as an NVMe controller may).
    ReverseWrites,
    /// Answers every request at once with an I/O error, doing nothing.
    FailAll,
    /// Ends without a report when it takes a request for this sector (a
    /// compromised vmm ending itself, as a kill from outside would look).
    EndSilentlyOnSector(u64),
    /// A net driver on a busy wire: answers each receive buffer at once
    /// with a frame of [`RECEIVED_FRAME`] bytes, and sends each frame.
    Receive,
}

/// The length of the frames [`Script::Receive`] receives.
pub const RECEIVED_FRAME: u32 = 60;

/// A fake driver's exit report when it panics: what a vmm reports for a
/// guest panic (non-empty: the death blames the requests it held).
const PANIC_REPORT: &str = r#"{"exit":"panic","message":"fake driver panicked"}"#;

/// A block medium in memory that counts its flushes, the hardware of the
/// fake drivers: they read and write it as a driver's DMA would.
pub struct FakeDisk {
    sectors: Mutex<Vec<u8>>,
    flushes: Mutex<FlushCount>,
    doorbell: SharedEventFd,
    interrupt: Arc<InterruptRoute>,
    /// Times the device quiesced its (fake) DMA after a driver's death.
    pub quiesced: AtomicU32,
    /// Per-request DMA windows its transfers go through (`dma=direct`),
    /// one per slot at `slot * SLOT_SIZE`; else the bounce slots.
    pub windows: Option<Arc<DmaWindows>>,
    /// The most windows ever found mapped when a new driver VM was let at
    /// the device (each should have been revoked at the death before).
    pub mapped_at_resume: AtomicUsize,
    /// The next flush's sync of the medium fails (once: as the host reports
    /// a write-back error once per descriptor), and the driver answers OK,
    /// as a driver whose device's own flush passed does.
    pub fail_next_sync: std::sync::atomic::AtomicBool,
}

impl FakeDisk {
    /// A zeroed medium of `sectors` 512-byte sectors.
    pub fn new(sectors: u64) -> Arc<Self> {
        FakeDisk::with_windows(sectors, None)
    }

    /// As `new`, its transfers going through per-request DMA windows.
    pub fn direct(sectors: u64) -> Arc<Self> {
        FakeDisk::with_windows(sectors, Some(DmaWindows::new(0, channel::SLOT_SIZE, channel::SLOT_COUNT)))
    }

    fn with_windows(sectors: u64, windows: Option<Arc<DmaWindows>>) -> Arc<Self> {
        Arc::new(FakeDisk {
            sectors: Mutex::new(vec![0; sectors as usize * 512]),
            flushes: Mutex::new(FlushCount::default()),
            doorbell: SharedEventFd::new().unwrap(),
            interrupt: Arc::new(InterruptRoute::default()),
            quiesced: AtomicU32::new(0),
            windows,
            mapped_at_resume: AtomicUsize::new(0),
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Puts `data` on the medium at `sector`.
    pub fn write(&self, sector: u64, data: &[u8]) {
        let at = sector as usize * 512;
        self.sectors.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
    }

    /// The medium's bytes at `sector`.
    pub fn read(&self, sector: u64, len: usize) -> Vec<u8> {
        let at = sector as usize * 512;
        self.sectors.lock().unwrap()[at..at + len].to_vec()
    }

    /// Serves one request between the medium and its bounce slot; the
    /// status of the answer.
    fn serve(&self, memory: &SharedMemory, request: &RequestEntry) -> u32 {
        let at = request.sector as usize * 512;
        let mut sectors = self.sectors.lock().unwrap();
        if at + request.len as usize > sectors.len() {
            return status::IO_ERROR;
        }
        if let (Some(windows), op::READ | op::WRITE) = (&self.windows, request.op) {
            let (address, len) = (u64::from(request.slot) * u64::from(channel::SLOT_SIZE), request.len);
            let medium = &mut sectors[at..at + len as usize];
            let done = match request.op {
                op::READ => windows.with(address, len, DeviceAccess::Write, |slices| {
                    let mut from = &medium[..];
                    for slice in slices {
                        slice.copy_from(&from[..slice.len()]);
                        from = &from[slice.len()..];
                    }
                }),
                _ => windows.with(address, len, DeviceAccess::Read, |slices| {
                    let mut to = &mut medium[..];
                    for slice in slices {
                        let (now, rest) = to.split_at_mut(slice.len());
                        slice.copy_to(now);
                        to = rest;
                    }
                }),
            };
            return if done.is_ok() { status::OK } else { status::IO_ERROR };
        }
        let Some(bounce) = memory.slice(channel::slot_offset(request.slot), request.len as usize) else {
            return status::IO_ERROR;
        };
        match request.op {
            op::READ => bounce.copy_from(&sectors[at..at + request.len as usize]),
            op::WRITE => {
                bounce.copy_to(&mut sectors[at..at + request.len as usize]);
            }
            op::FLUSH => {
                let mut flushes = self.flushes.lock().unwrap();
                flushes.started += 1;
                if self.fail_next_sync.swap(false, Ordering::SeqCst) {
                    flushes.medium_failed = true;
                } else {
                    flushes.completed = flushes.started;
                }
            }
            _ => return status::UNSUPPORTED,
        }
        status::OK
    }
}

impl Hardware for FakeDisk {
    fn windows(&self) -> Vec<HardwareWindow> {
        Vec::new()
    }

    fn doorbell(&self) -> &SharedEventFd {
        &self.doorbell
    }

    fn interrupt(&self) -> Arc<InterruptRoute> {
        self.interrupt.clone()
    }

    fn quiesce(&self) {
        self.quiesced.fetch_add(1, Ordering::SeqCst);
    }

    fn resume(&self) {
        let mapped = self.windows.as_ref().map_or(0, |windows| windows.mapped());
        self.mapped_at_resume.fetch_max(mapped, Ordering::SeqCst);
    }
}

impl BlockHardware for FakeDisk {
    fn capacity_sectors(&self) -> u64 {
        (self.sectors.lock().unwrap().len() / 512) as u64
    }

    fn read_only(&self) -> bool {
        false
    }

    fn flushes(&self) -> FlushCount {
        *self.flushes.lock().unwrap()
    }

    fn dma_windows(&self) -> Option<Arc<DmaWindows>> {
        self.windows.clone()
    }
}

/// Holds the starts of spares while held (each for at most
/// [`SpareGate::BOUND`]), so that a test can see what the device does
/// while its next spare is starting.
#[derive(Default)]
pub struct SpareGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    held: bool,
    waiting: usize,
    timed_out: bool,
}

impl SpareGate {
    /// Longest a start waits: a device that waits for its spare's start
    /// on its worker then goes on, late, and the test sees it.
    pub const BOUND: Duration = Duration::from_secs(10);

    /// Holds the next starts until [`SpareGate::release`].
    pub fn hold(&self) {
        self.state.lock().unwrap().held = true;
    }

    /// Lets the held starts go.
    pub fn release(&self) {
        self.state.lock().unwrap().held = false;
        self.changed.notify_all();
    }

    /// Starts waiting at the gate now.
    pub fn waiting(&self) -> usize {
        self.state.lock().unwrap().waiting
    }

    /// Whether a start gave up waiting for the release.
    pub fn timed_out(&self) -> bool {
        self.state.lock().unwrap().timed_out
    }

    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        state.waiting += 1;
        let (mut state, wait) = self.changed.wait_timeout_while(state, Self::BOUND, |state| state.held).unwrap();
        state.timed_out |= wait.timed_out();
        state.waiting -= 1;
    }
}

/// Starts fake drivers on a device's channel: the `n`th start follows the
/// `n`th script given, the last one for every later start.
pub struct FakeLaunch {
    channel: Arc<SharedMemory>,
    completion_doorbell: SharedEventFd,
    driver_exited: EventFd,
    disk: Arc<FakeDisk>,
    scripts: Arc<Mutex<VecDeque<Script>>>,
    /// Drivers started so far (spares included).
    pub launches: Arc<AtomicUsize>,
    /// Where the starts of spares wait while a test holds them.
    pub spare_gate: Arc<SpareGate>,
}

impl FakeLaunch {
    /// Fake drivers on `channel` driving `disk`, ringing
    /// `completion_doorbell` and signalling `driver_exited` as a vmm would.
    pub fn new(
        channel: Arc<SharedMemory>,
        completion_doorbell: &SharedEventFd,
        driver_exited: &EventFd,
        disk: Arc<FakeDisk>,
        scripts: &[Script],
    ) -> Self {
        FakeLaunch {
            channel,
            completion_doorbell: completion_doorbell.try_clone().unwrap(),
            driver_exited: driver_exited.try_clone().unwrap(),
            disk,
            scripts: Arc::new(Mutex::new(scripts.iter().copied().collect())),
            launches: Arc::new(AtomicUsize::new(0)),
            spare_gate: Arc::default(),
        }
    }

    /// The scripts of later starts, to change them while the device runs.
    pub fn scripts(&self) -> Arc<Mutex<VecDeque<Script>>> {
        self.scripts.clone()
    }
}

impl ThreadLaunch for FakeLaunch {
    fn name(&self) -> &str {
        "fake"
    }

    fn start(&self, spare: bool) -> std::io::Result<ThreadDriver> {
        if spare {
            self.spare_gate.pass();
        }
        let number = self.launches.fetch_add(1, Ordering::SeqCst);
        let script = {
            let mut scripts = self.scripts.lock().unwrap();
            match scripts.len() {
                0 => Script::Serve,
                1 => scripts[0],
                _ => scripts.pop_front().unwrap_or(Script::Serve),
            }
        };
        let disk = self.disk.clone();
        spawn_thread(&self.channel, &self.completion_doorbell, &self.driver_exited, number, spare, move |thread| {
            let memory = thread.channel.clone();
            thread.run(
                || (script == Script::DieAtStart).then(|| PANIC_REPORT.to_owned()),
                |request| {
                    let touches = |sector: u64| {
                        request.op != op::FLUSH
                            && (request.sector..request.sector + u64::from(request.len).div_ceil(512)).contains(&sector)
                    };
                    match script {
                        Script::PanicOnSector(sector) if touches(sector) => Answer::Die(PANIC_REPORT.into()),
                        Script::Hang => Answer::Ignore,
                        Script::EndSilentlyOnSector(sector) if touches(sector) => Answer::Die(String::new()),
                        Script::FailAll => Answer::Complete(status::IO_ERROR, 0),
                        Script::Receive if request.op == op::NET_RX => Answer::Complete(status::OK, RECEIVED_FRAME),
                        Script::Receive => Answer::Complete(status::OK, request.len),
                        Script::WithholdSector(sector) if touches(sector) => Answer::Ignore,
                        Script::Lie => Answer::Complete(disk.serve(&memory, request), request.len + 1),
                        Script::ReverseWrites if request.op == op::WRITE => {
                            Answer::Reversed(disk.serve(&memory, request), request.len)
                        }
                        Script::CorruptReads if request.op == op::READ => {
                            let status = disk.serve(&memory, request);
                            if let Some(bounce) = memory.slice(channel::slot_offset(request.slot), 1) {
                                let byte: u8 = bounce.read_obj(0).unwrap();
                                bounce.write_obj(byte ^ 1, 0).unwrap();
                            }
                            Answer::Complete(status, request.len)
                        }
                        _ => Answer::Complete(disk.serve(&memory, request), request.len),
                    }
                },
            )
        })
    }
}

/// Entries in the client's queue.
pub const QUEUE_SIZE: u16 = 256;
/// Where the client's request buffers start (after the queue).
const BUFFERS: u64 = 0x10_0000;
/// Bytes of buffer per request (header, data up to 64 KiB, status).
const BUFFER_STRIDE: u64 = 0x1_1000;
/// The client's memory.
pub const CLIENT_MEMORY: usize = 0x100_0000;

/// A virtio-blk request as the client wrote it.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    /// Its descriptor chain's head.
    pub head: u16,
    data: GuestAddress,
    len: u32,
    status: GuestAddress,
}

/// The memory of a [`Client`], owned by the test (the client's mock queue
/// borrows it).
pub fn client_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), CLIENT_MEMORY)]).unwrap()
}

/// A client of a device: one queue in its memory, written through
/// virtio-queue's mock as a guest driver would, and the worker loop.
///
/// The mock zeroes a queue's indices when it lays it out, so it is laid out
/// once; and it does not wrap its avail ring, so a client sends fewer than
/// half [`QUEUE_SIZE`] requests in its life (the rings would overlap).
pub struct Client<'a> {
    memory: &'a GuestMemoryMmap,
    queue: MockSplitQueue<'a, GuestMemoryMmap>,
    /// The client's queue as the device sees it.
    pub vrings: Vec<ClientVring>,
    next_descriptor: u16,
    used_seen: u16,
}

impl<'a> Client<'a> {
    /// A client in `memory` with one ready queue of [`QUEUE_SIZE`], its
    /// memory table given to `device`.
    pub fn attach<D: VhostUserBackendMut<Bitmap = (), Vring = ClientVring>>(
        memory: &'a GuestMemoryMmap,
        device: &mut D,
    ) -> Client<'a> {
        let atomic = GuestMemoryAtomic::new(memory.clone());
        let queue = MockSplitQueue::create(memory, GuestAddress(0), QUEUE_SIZE);
        let vring = ClientVring::new(atomic.clone(), QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring.set_queue_info(queue.desc_table_addr().0, queue.avail_addr().0, queue.used_addr().0).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        device.update_memory(atomic).unwrap();
        Client { memory, queue, vrings: vec![vring], next_descriptor: 0, used_seen: 0 }
    }

    /// Puts a read (`write`: false) or write of `data.len()` bytes at
    /// `sector` on the queue (not yet kicked); a write carries `data`.
    pub fn request(&mut self, write: bool, sector: u64, data: &[u8]) -> Sent {
        let memory = self.memory;
        assert!(self.queue.avail().idx().load() < QUEUE_SIZE / 2, "the mock's avail ring is full");
        let index = u64::from(self.next_descriptor / 3);
        let header = GuestAddress(BUFFERS + index * BUFFER_STRIDE);
        let data_at = header.unchecked_add(16);
        let status_at = header.unchecked_add(BUFFER_STRIDE - 16);
        let kind = if write { virtio::blk::T_OUT } else { virtio::blk::T_IN };
        memory.write_obj(kind, header).unwrap();
        memory.write_obj(0u32, header.unchecked_add(4)).unwrap();
        memory.write_obj(sector, header.unchecked_add(8)).unwrap();
        memory.write_obj(0xffu8, status_at).unwrap();
        if write {
            memory.write_slice(data, data_at).unwrap();
        }
        let head = self.next_descriptor;
        let (next, write_flag) = (virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16, 2u16);
        let data_flags = next | if write { 0 } else { write_flag };
        let descriptors = [
            SplitDescriptor::new(header.0, 16, next, head + 1),
            SplitDescriptor::new(data_at.0, data.len() as u32, data_flags, head + 2),
            SplitDescriptor::new(status_at.0, 1, write_flag, 0),
        ]
        .map(RawDescriptor::from);
        self.queue.add_desc_chains(&descriptors, head).unwrap();
        self.next_descriptor = (self.next_descriptor + 3) % (QUEUE_SIZE - QUEUE_SIZE % 3);
        Sent { head, data: data_at, len: data.len() as u32, status: status_at }
    }

    /// Puts a flush on the queue (not yet kicked).
    pub fn flush(&mut self) -> Sent {
        let memory = self.memory;
        assert!(self.queue.avail().idx().load() < QUEUE_SIZE / 2, "the mock's avail ring is full");
        let header = GuestAddress(BUFFERS + u64::from(self.next_descriptor / 3) * BUFFER_STRIDE);
        let status_at = header.unchecked_add(BUFFER_STRIDE - 16);
        memory.write_obj(virtio::blk::T_FLUSH, header).unwrap();
        memory.write_obj(0u32, header.unchecked_add(4)).unwrap();
        memory.write_obj(0u64, header.unchecked_add(8)).unwrap();
        memory.write_obj(0xffu8, status_at).unwrap();
        let head = self.next_descriptor;
        let descriptors = [
            SplitDescriptor::new(header.0, 16, virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16, head + 1),
            SplitDescriptor::new(status_at.0, 1, 2, 0),
        ]
        .map(RawDescriptor::from);
        self.queue.add_desc_chains(&descriptors, head).unwrap();
        self.next_descriptor = (self.next_descriptor + 3) % (QUEUE_SIZE - QUEUE_SIZE % 3);
        Sent { head, data: status_at, len: 0, status: status_at }
    }

    /// Offers `head` again, `times` times, as a client that breaks virtio
    /// would: avail entries naming a chain the device may still hold. Not
    /// kicked.
    pub fn republish(&mut self, head: u16, times: u16) {
        let avail = self.queue.avail();
        for _ in 0..times {
            let idx = avail.idx().load();
            avail.ring().ref_at(usize::from(idx % QUEUE_SIZE)).unwrap().store(head);
            avail.idx().store(idx.wrapping_add(1));
        }
    }

    /// Puts one device-writable buffer of `len` bytes on the queue (a
    /// receive buffer, to a net device); its head. Not kicked.
    pub fn writable(&mut self, len: u32) -> u16 {
        let head = self.next_descriptor;
        let at = GuestAddress(BUFFERS + u64::from(head / 3) * BUFFER_STRIDE);
        let descriptor = RawDescriptor::from(SplitDescriptor::new(at.0, len, 2, 0));
        self.queue.add_desc_chains(&[descriptor], head).unwrap();
        self.next_descriptor = (self.next_descriptor + 3) % (QUEUE_SIZE - QUEUE_SIZE % 3);
        head
    }

    /// The status byte the device wrote for `sent` (0xff: none yet).
    pub fn status(&self, sent: &Sent) -> u8 {
        self.memory.read_obj(sent.status).unwrap()
    }

    /// Fills the status byte and data buffer `sent` uses with 0xee in this
    /// client's memory, to see whether anything writes there.
    pub fn scribble(&self, sent: &Sent) {
        self.memory.write_slice(&vec![0xee; sent.len as usize], sent.data).unwrap();
        self.memory.write_obj(0xeeu8, sent.status).unwrap();
    }

    /// The data a read brought.
    pub fn data(&self, sent: &Sent) -> Vec<u8> {
        let mut data = vec![0; sent.len as usize];
        self.memory.read_slice(&mut data, sent.data).unwrap();
        data
    }

    /// The used ring's avail event (EVENT_IDX: where the device asks to be
    /// kicked next), as the device last wrote it.
    pub fn avail_event(&self) -> u16 {
        self.memory.read_obj(self.avail_event_address()).unwrap()
    }

    /// Writes `value` where the device writes its avail event, to see
    /// whether it writes there again.
    pub fn mark_avail_event(&self, value: u16) {
        self.memory.write_obj(value, self.avail_event_address()).unwrap();
    }

    fn avail_event_address(&self) -> GuestAddress {
        GuestAddress(self.queue.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE))
    }

    /// Chains the device completed since the last call (head, length).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        take_used(&self.queue, &mut self.used_seen)
    }

    /// Runs the worker loop vhost-user-backend would run on `device`'s
    /// event sources (`listeners`) until `done` holds; panics after
    /// `bound`, saying `what` it waited for.
    pub fn run_until<D: VhostUserBackendMut<Bitmap = (), Vring = ClientVring>>(
        &mut self,
        device: &mut D,
        listeners: &[(std::os::fd::RawFd, u16)],
        bound: Duration,
        what: &dyn Fn() -> String,
        mut done: impl FnMut(&mut Self, &mut D) -> bool,
    ) {
        let deadline = Instant::now() + bound;
        while !done(self, device) {
            assert!(Instant::now() < deadline, "{}: not within {bound:?}", what());
            let mut fds: Vec<libc::pollfd> =
                listeners.iter().map(|(fd, _)| libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 }).collect();
            // SAFETY: poll(2) on a vector of pollfds that lives across the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
            assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
            for (pollfd, (_, event)) in fds.iter().zip(listeners) {
                if pollfd.revents & libc::POLLIN != 0 {
                    device.handle_event(*event, EventSet::IN, &self.vrings, 0).unwrap();
                }
            }
        }
    }

    /// Moves the queue's avail ring to `to` (as SET_VRING_ADDR would, the
    /// queue disabled meanwhile as a client restarting it does: a served
    /// queue's rings are not moved) and sets the index there to `idx`,
    /// with EVENT_IDX on for `device`: for a client whose ring cannot be
    /// popped. Not kicked.
    pub fn move_avail_ring<D: VhostUserBackendMut<Bitmap = (), Vring = ClientVring>>(
        &self,
        device: &mut D,
        to: u64,
        idx: u16,
    ) {
        device.set_event_idx(true);
        self.vrings[0].set_queue_event_idx(true);
        self.vrings[0].set_enabled(false);
        self.vrings[0].set_queue_info(self.queue.desc_table_addr().0, to, self.queue.used_addr().0).unwrap();
        self.vrings[0].set_enabled(true);
        assert!(!self.vrings[0].reconfigured_while_served(), "the ring was moved while served");
        self.memory.write_obj(idx, GuestAddress(to + 2)).unwrap();
    }

    /// Kicks the client's queue.
    pub fn kick<D: VhostUserBackendMut<Bitmap = (), Vring = ClientVring>>(&self, device: &mut D) {
        device.handle_event(0, EventSet::IN, &self.vrings, 0).unwrap();
    }

    /// Where the queue's avail and used rings are, for a test that plays
    /// a vCPU of the guest writing them while the device runs.
    pub fn rings(&self) -> (GuestAddress, GuestAddress) {
        (self.queue.avail_addr(), self.queue.used_addr())
    }

    /// A second queue of this client (a net device's transmit queue) at
    /// [`SECOND_QUEUE`], ready and enabled, added to [`Client::vrings`].
    pub fn add_queue(&mut self) -> SecondQueue<'a> {
        let queue = MockSplitQueue::create(self.memory, GuestAddress(SECOND_QUEUE), QUEUE_SIZE);
        let vring = ClientVring::new(GuestMemoryAtomic::new(self.memory.clone()), QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring.set_queue_info(queue.desc_table_addr().0, queue.avail_addr().0, queue.used_addr().0).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        self.vrings.push(vring);
        SecondQueue { memory: self.memory, queue, next_descriptor: 0, used_seen: 0 }
    }
}

/// Where [`Client::add_queue`] lays out its queue, and its buffers after it.
const SECOND_QUEUE: u64 = 0x80_0000;

/// A second queue of a [`Client`]: frames to send, for a net device.
pub struct SecondQueue<'a> {
    memory: &'a GuestMemoryMmap,
    queue: MockSplitQueue<'a, GuestMemoryMmap>,
    next_descriptor: u16,
    used_seen: u16,
}

impl SecondQueue<'_> {
    /// Puts a frame of `len` bytes (after its virtio-net header) on the
    /// queue, not kicked; its head.
    pub fn frame(&mut self, len: u32) -> u16 {
        let head = self.next_descriptor;
        let at = GuestAddress(SECOND_QUEUE + 0x10_0000 + u64::from(head) * 0x1000);
        self.memory.write_slice(&vec![0x5a; virtio::net::HEADER_LEN + len as usize], at).unwrap();
        let descriptor = SplitDescriptor::new(at.0, virtio::net::HEADER_LEN as u32 + len, 0, 0);
        self.queue.add_desc_chains(&[RawDescriptor::from(descriptor)], head).unwrap();
        self.next_descriptor += 1;
        head
    }

    /// Chains the device completed since the last call (head, length).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        take_used(&self.queue, &mut self.used_seen)
    }
}

/// The chains the device put in `queue`'s used ring since `used_seen`
/// (head, length), which moves past them.
fn take_used(queue: &MockSplitQueue<'_, GuestMemoryMmap>, used_seen: &mut u16) -> Vec<(u16, u32)> {
    let used = queue.used();
    let mut completed = Vec::new();
    while *used_seen != used.idx().load() {
        let element = used.ring().ref_at(usize::from(*used_seen % QUEUE_SIZE)).unwrap().load();
        completed.push((element.id() as u16, element.len()));
        *used_seen = used_seen.wrapping_add(1);
    }
    completed
}
