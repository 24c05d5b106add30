//! A virtio-blk device driven over vhost-user: the shared memory layout, request slots,
//! submission, completion and the bounded wait for completions.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::{self, features::*, BlkConfig};
use crate::error::{Error, Result};
use crate::mem::GuestMem;
use crate::session::{Negotiated, Session};
use crate::vring::{DriverRing, RawDesc, RingLayout, Segment, MAX_QUEUE_SIZE};

/// How to set the device up.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Bound on every control exchange and on waiting for any completion.
    pub timeout: Duration,
    /// Negotiate EVENT_IDX if the backend offers it.
    pub event_idx: bool,
    /// Number of request slots (maximum queue depth).
    pub slots: usize,
    /// Data buffer bytes per slot (largest request).
    pub buf_size: usize,
    /// Split data into descriptors of at most this many bytes (None: one descriptor, unless the
    /// device's `size_max` forces smaller ones).
    pub seg_size: Option<usize>,
    /// Queue size (None: the smallest power of two that holds all slots' descriptors).
    pub queue_size: Option<u16>,
    /// Longest time to poll the used ring before sleeping on the call eventfd. The window in
    /// use adapts between 0 and this (see [`BlkDevice::wait`]).
    pub spin: Duration,
    /// Bytes of extra shared memory after the slots' buffers that no request of
    /// [`BlkDevice::submit`] touches: room for hand-made chains ([`BlkDevice::submit_raw`]).
    /// Rounded up to a page; 0 for none.
    pub scratch: usize,
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `sector` into the slot's buffer.
    Read,
    /// Write `len` bytes of the slot's buffer at `sector`.
    Write,
    /// Flush the device's write cache.
    Flush,
    /// Fetch the 20-byte device ID into the slot's buffer.
    GetId,
}

/// One completed request.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The slot it used.
    pub slot: usize,
    /// Status byte the device wrote (0xff if it wrote none).
    pub status: u8,
    /// `len` from the used ring element.
    pub used_len: u32,
}

/// Counters of notifications in both directions.
#[derive(Clone, Copy, Debug, Default)]
pub struct NotifyStats {
    /// Kicks sent (eventfd writes).
    pub kicks: u64,
    /// Times we slept on the call eventfd.
    pub sleeps: u64,
}

struct SlotMem {
    hdr_off: usize,
    status_off: usize,
    data_off: usize,
}

const STATUS_UNSET: u8 = 0xff;
const SLOT_HDR_STRIDE: usize = 64;

/// A connected, running virtio-blk device with one queue.
pub struct BlkDevice {
    session: Session,
    mem: GuestMem,
    ring: DriverRing,
    kick: EventFd,
    call: EventFd,
    config: BlkConfig,
    neg: Negotiated,
    slots: Vec<SlotMem>,
    inflight: Vec<bool>,
    outstanding: usize,
    descs_per_slot: usize,
    seg_size: usize,
    buf_size: usize,
    timeout: Duration,
    spin_max: Duration,
    spin_cur: Duration,
    stats: NotifyStats,
    segs: Vec<Segment>,
    scratch_off: usize,
    scratch_len: usize,
}

impl BlkDevice {
    /// Connects to the backend at `path` and brings the device up.
    pub fn connect(path: &Path, opts: &DeviceOptions) -> Result<Self> {
        if opts.slots == 0 {
            return Err(Error::InvalidJob("queue depth must be at least 1".into()));
        }
        if opts.buf_size == 0 || !opts.buf_size.is_multiple_of(512) {
            return Err(Error::InvalidJob(format!("buffer size {} is not a multiple of 512", opts.buf_size)));
        }
        let mut session = Session::connect(path, opts.timeout)?;
        let neg = session.negotiate(opts.event_idx)?;
        let config = session.get_config(&neg)?;

        // Data segments: bounded by --seg-size and by the device's size_max.
        let mut seg_size = opts.seg_size.unwrap_or(opts.buf_size).min(opts.buf_size);
        if config.size_max != 0 {
            let limit = (config.size_max as usize) / 512 * 512;
            if limit == 0 {
                return Err(Error::BadConfig(format!("size_max {} is below one sector", config.size_max)));
            }
            seg_size = seg_size.min(limit);
        }
        if seg_size == 0 || !seg_size.is_multiple_of(512) {
            return Err(Error::InvalidJob(format!("segment size {seg_size} is not a positive multiple of 512")));
        }
        let data_segs = opts.buf_size.div_ceil(seg_size);
        if config.seg_max != 0 && data_segs > config.seg_max as usize {
            return Err(Error::InvalidJob(format!(
                "requests of {} bytes need {} segments of {} bytes, the device takes at most {} (seg_max)",
                opts.buf_size, data_segs, seg_size, config.seg_max
            )));
        }
        let descs_per_slot = data_segs + 2;
        let needed =
            opts.slots.checked_mul(descs_per_slot).filter(|&n| n <= usize::from(MAX_QUEUE_SIZE)).ok_or_else(|| {
                Error::InvalidJob(format!(
                    "queue depth {} x {} descriptors per request exceeds the largest queue (32768)",
                    opts.slots, descs_per_slot
                ))
            })?;
        let size = match opts.queue_size {
            Some(q) if usize::from(q) < needed => {
                return Err(Error::InvalidJob(format!(
                    "queue size {q} cannot hold {} requests of {} descriptors",
                    opts.slots, descs_per_slot
                )))
            }
            Some(q) => q,
            None => needed.next_power_of_two().max(16) as u16,
        };
        let layout = RingLayout::new(size)?;

        // Memory: ring, then slot headers/status bytes, then data buffers.
        let hdr_base = layout.total;
        let data_base = (hdr_base + opts.slots * SLOT_HDR_STRIDE).next_multiple_of(4096);
        let buf_stride = opts.buf_size.next_multiple_of(4096);
        let scratch_off = data_base + opts.slots * buf_stride;
        let scratch_len = opts.scratch.next_multiple_of(4096);
        let total = scratch_off + scratch_len;
        let mut mem = GuestMem::new(total.next_multiple_of(1 << 20))?;
        let slots = (0..opts.slots)
            .map(|i| SlotMem {
                hdr_off: hdr_base + i * SLOT_HDR_STRIDE,
                status_off: hdr_base + i * SLOT_HDR_STRIDE + 16,
                data_off: data_base + i * buf_stride,
            })
            .collect();
        // Give buffers a recognisable non-zero content for unverified writes.
        for (i, b) in mem.slice_mut(data_base, opts.slots * buf_stride).iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ 0x5a;
        }

        // SAFETY: the ring lives at offset 0 of `mem`, which is page-aligned, at least
        // `layout.total` bytes long, and moves into the same struct as the ring (the mapping's
        // address does not change when the struct moves).
        let ring = unsafe { DriverRing::new(mem.host_base(), layout, neg.event_idx()) };
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("creating the kick eventfd", e))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys("creating the call eventfd", e))?;

        session.set_mem_table(&mem)?;
        session.setup_vring(&neg, &mem, 0, layout, &kick, &call)?;

        let mut dev = BlkDevice {
            session,
            mem,
            ring,
            kick,
            call,
            config,
            neg,
            slots,
            inflight: vec![false; opts.slots],
            outstanding: 0,
            descs_per_slot,
            seg_size,
            buf_size: opts.buf_size,
            timeout: opts.timeout,
            spin_max: opts.spin,
            spin_cur: opts.spin,
            stats: NotifyStats::default(),
            segs: Vec::with_capacity(descs_per_slot),
            scratch_off,
            scratch_len,
        };
        dev.ring.disable_notify();
        Ok(dev)
    }

    /// The device configuration.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// Queue size in use.
    pub fn queue_size(&self) -> u16 {
        self.ring.size()
    }

    /// Bytes of shared memory.
    pub fn mem_size(&self) -> usize {
        self.mem.len()
    }

    /// Number of slots (maximum queue depth).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Data buffer bytes per slot.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Requests currently held by the device.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Notification counters so far.
    pub fn notify_stats(&self) -> NotifyStats {
        self.stats
    }

    /// True if the device is read-only.
    pub fn read_only(&self) -> bool {
        self.neg.acked & VIRTIO_BLK_F_RO != 0
    }

    /// True if the device takes flushes.
    pub fn has_flush(&self) -> bool {
        self.neg.acked & VIRTIO_BLK_F_FLUSH != 0
    }

    /// The first `len` bytes of a slot's data buffer.
    pub fn data(&self, slot: usize, len: usize) -> &[u8] {
        assert!(len <= self.buf_size && !self.inflight[slot], "buffer access to a busy slot or past its end");
        self.mem.slice(self.slots[slot].data_off, len)
    }

    /// The first `len` bytes of a slot's data buffer, to fill before a write.
    pub fn data_mut(&mut self, slot: usize, len: usize) -> &mut [u8] {
        assert!(len <= self.buf_size && !self.inflight[slot], "buffer access to a busy slot or past its end");
        let off = self.slots[slot].data_off;
        self.mem.slice_mut(off, len)
    }

    /// Guest physical addresses `start..end` of all the memory shared with the backend (an
    /// address outside this range is outside the client's memory as the backend knows it).
    pub fn mem_gpa_range(&self) -> std::ops::Range<u64> {
        self.mem.gpa(0)..self.mem.gpa(self.mem.len())
    }

    /// Guest physical address of the scratch area ([`DeviceOptions::scratch`]).
    pub fn scratch_gpa(&self) -> u64 {
        self.mem.gpa(self.scratch_off)
    }

    /// Bytes of the scratch area.
    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// The scratch bytes `off..off + len`. Only while nothing is outstanding: a chain in
    /// flight may point into the scratch area.
    pub fn scratch(&self, off: usize, len: usize) -> &[u8] {
        assert!(self.outstanding == 0, "scratch access while a request is outstanding");
        assert!(off.checked_add(len).is_some_and(|end| end <= self.scratch_len), "scratch range out of bounds");
        self.mem.slice(self.scratch_off + off, len)
    }

    /// The scratch bytes `off..off + len`, to fill (same rule as [`Self::scratch`]).
    pub fn scratch_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(self.outstanding == 0, "scratch access while a request is outstanding");
        assert!(off.checked_add(len).is_some_and(|end| end <= self.scratch_len), "scratch range out of bounds");
        self.mem.slice_mut(self.scratch_off + off, len)
    }

    /// Queues a hand-made descriptor chain, written exactly as given (see [`RawDesc`]): for
    /// malformed requests. Not yet visible to the device (see [`Self::kick`]). The chain starts
    /// at descriptor 0 and may use the whole table, so nothing may be outstanding; it is then
    /// outstanding as slot 0's request, and [`Self::reap`] returns its completion as slot 0's
    /// (whose `status` field is meaningless unless the chain's status is slot 0's).
    pub fn submit_raw(&mut self, descs: &[RawDesc]) -> Result<()> {
        if self.outstanding != 0 {
            return Err(Error::InvalidJob(format!(
                "a raw chain needs an idle queue, {} request(s) are outstanding",
                self.outstanding
            )));
        }
        if descs.is_empty() || descs.len() > usize::from(self.ring.size()) {
            return Err(Error::InvalidJob(format!(
                "a raw chain of {} descriptors does not fit the queue of {}",
                descs.len(),
                self.ring.size()
            )));
        }
        self.mem.slice_mut(self.slots[0].status_off, 1)[0] = STATUS_UNSET;
        self.ring.push_raw_chain(0, descs);
        self.inflight[0] = true;
        self.outstanding += 1;
        Ok(())
    }

    /// Submits a raw chain ([`Self::submit_raw`]) and waits (bounded by the timeout) for its
    /// completion; returns the used length the device reported.
    pub fn run_raw(&mut self, descs: &[RawDesc]) -> Result<u32> {
        self.submit_raw(descs)?;
        self.kick()?;
        let mut out = Vec::with_capacity(1);
        loop {
            if self.reap(&mut out)? > 0 {
                return Ok(out[0].used_len);
            }
            self.wait()?;
        }
    }

    /// A second handle on the kick eventfd (a hostile client kicks from
    /// another thread while it changes the memory table).
    pub fn kick_handle(&self) -> Result<EventFd> {
        self.kick.try_clone().map_err(|e| Error::sys("duplicating the kick eventfd", e))
    }

    /// The vhost-user session (a hostile client sends its own messages).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// The memfd behind the shared memory (a hostile client shrinks it).
    pub fn memory_file(&self) -> &std::fs::File {
        self.mem.file()
    }

    /// Offset in the shared memory where the slots' data buffers start (page aligned):
    /// everything before it is rings and request headers.
    pub fn data_offset(&self) -> usize {
        self.slots.first().map_or(self.mem.len(), |slot| slot.data_off)
    }

    /// Publishes `idx` as the avail index and kicks, whatever was queued: for a hostile client.
    pub fn force_avail_index(&mut self, idx: u16) -> Result<()> {
        self.ring.force_avail_index(idx);
        self.kick.write(1).map_err(|e| Error::sys("kicking the device (eventfd write)", e))
    }

    /// Makes the call eventfd blocking (the backend shares its file description) and fills its
    /// count to the most it holds, then asks for interrupts: a backend that then writes to it
    /// blocks. For a hostile client, which must never read the call eventfd afterwards
    /// ([`Self::poll_used`] instead of [`Self::wait`]).
    pub fn fill_call_count(&mut self) -> Result<()> {
        // Filled while still non-blocking: a notification the backend adds
        // meanwhile makes the write fail (EAGAIN) instead of blocking this
        // client for good; then the count is read back to 0 and filled again.
        let deadline = Instant::now() + self.timeout;
        loop {
            let _ = self.call.read();
            match self.call.write(u64::MAX - 1) {
                Ok(()) => break,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {}
                Err(error) => return Err(Error::sys("filling the call eventfd", error)),
            }
        }
        let fd = self.call.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on our own eventfd.
        let cleared = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
        };
        if !cleared {
            return Err(Error::last_os("clearing O_NONBLOCK on the call eventfd"));
        }
        self.ring.enable_notify();
        Ok(())
    }

    /// Waits at most `timeout` for a used entry by looking at the used ring alone; whether one
    /// came.
    pub fn poll_used(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.ring.has_used() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Points the queue at its ring again (SET_VRING_ADDR): for a hostile client.
    pub fn readdress_queue(&mut self) -> Result<()> {
        self.session.readdress_vring(0, &self.mem, 0, self.ring.layout())
    }

    /// Points the queue's used ring at the very end of its memory (SET_VRING_ADDR), so that the
    /// `avail_event` field after it (EVENT_IDX) lies outside: for a hostile client.
    pub fn used_ring_at_memory_end(&mut self) -> Result<()> {
        let mut layout = self.ring.layout();
        layout.used = self.mem.len() - (4 + 8 * usize::from(layout.size));
        self.session.move_vring(0, &self.mem, 0, layout)
    }

    /// Points the queue's avail ring at the last 4 bytes of its memory (SET_VRING_ADDR), so that
    /// its flags and index lie inside and its entries outside, sets that index to `idx` and
    /// kicks: for a hostile client.
    pub fn avail_ring_at_memory_end(&mut self, idx: u16) -> Result<()> {
        let mut layout = self.ring.layout();
        layout.avail = self.mem.len() - 4;
        self.session.move_vring(0, &self.mem, 0, layout)?;
        self.mem.slice_mut(layout.avail + 2, 2).copy_from_slice(&idx.to_le_bytes());
        self.kick.write(1).map_err(|e| Error::sys("kicking the device (eventfd write)", e))
    }

    /// Waits at most `timeout` for the backend to hang up the control socket; whether it did.
    pub fn wait_for_hangup(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fd = libc::pollfd { fd: self.session.socket().as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
            let millis = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `fd` is one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut fd, 1, millis) };
            if rc > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                return true;
            }
            if left.is_zero() || (rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted) {
                return false;
            }
        }
    }

    /// Checks, without blocking, that the backend has not hung up the control socket (or sent
    /// something unexpected on it).
    pub fn check_connection(&self) -> Result<()> {
        let mut fd =
            libc::pollfd { fd: self.session.socket().as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: `fd` is one valid pollfd for the duration of the call; timeout 0 never blocks.
        let rc = unsafe { libc::poll(&mut fd, 1, 0) };
        if rc < 0 {
            return Err(Error::last_os("poll on the control socket"));
        }
        if fd.revents != 0 {
            return Err(self.socket_event());
        }
        Ok(())
    }

    /// Queues a request in `slot` (not yet visible to the device: see [`Self::kick`]).
    pub fn submit(&mut self, slot: usize, op: Op, sector: u64, len: usize) {
        assert!(!self.inflight[slot], "slot {slot} is busy");
        let (req_type, len) = match op {
            Op::Read => (blk::VIRTIO_BLK_T_IN, len),
            Op::Write => (blk::VIRTIO_BLK_T_OUT, len),
            Op::Flush => (blk::VIRTIO_BLK_T_FLUSH, 0),
            Op::GetId => (blk::VIRTIO_BLK_T_GET_ID, blk::VIRTIO_BLK_ID_BYTES),
        };
        assert!(len <= self.buf_size, "request larger than the slot buffer");
        let sm = &self.slots[slot];
        let (hdr_off, status_off, data_off) = (sm.hdr_off, sm.status_off, sm.data_off);
        let sector = if matches!(op, Op::Read | Op::Write) { sector } else { 0 };
        self.mem.slice_mut(hdr_off, 16).copy_from_slice(&blk::request_header(req_type, sector));
        self.mem.slice_mut(status_off, 1)[0] = STATUS_UNSET;

        self.segs.clear();
        self.segs.push(Segment { addr: self.mem.gpa(hdr_off), len: 16, write: false });
        let device_writes = !matches!(op, Op::Write);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.seg_size);
            self.segs.push(Segment { addr: self.mem.gpa(data_off + done), len: n as u32, write: device_writes });
            done += n;
        }
        self.segs.push(Segment { addr: self.mem.gpa(status_off), len: 1, write: true });
        let head = (slot * self.descs_per_slot) as u16;
        self.ring.push_chain(head, &self.segs);
        self.inflight[slot] = true;
        self.outstanding += 1;
    }

    /// Publishes queued requests and kicks the device if it asked for it.
    pub fn kick(&mut self) -> Result<()> {
        if self.ring.unpublished() == 0 {
            return Ok(());
        }
        if self.ring.publish() {
            self.stats.kicks += 1;
            self.kick.write(1).map_err(|e| Error::sys("kicking the device (eventfd write)", e))?;
        }
        Ok(())
    }

    /// Moves completions from the used ring into `out`; returns how many.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let mut n = 0;
        while let Some(u) = self.ring.pop_used(self.outstanding)? {
            let slot = (u.id as usize) / self.descs_per_slot;
            if !(u.id as usize).is_multiple_of(self.descs_per_slot) || slot >= self.slots.len() || !self.inflight[slot]
            {
                return Err(Error::Protocol(format!(
                    "used ring returned descriptor {} which is not the head of an outstanding request",
                    u.id
                )));
            }
            // The Acquire load of the used index in pop_used orders this read after the
            // device's status write.
            let status = self.mem.slice(self.slots[slot].status_off, 1)[0];
            self.inflight[slot] = false;
            self.outstanding -= 1;
            out.push(Completion { slot, status, used_len: u.len });
            n += 1;
        }
        Ok(n)
    }

    /// Waits until at least one completion is available: polls for up to the spin window, then
    /// sleeps on the call eventfd. Fails if the backend hangs up, or if nothing completes within
    /// the timeout while requests are outstanding.
    ///
    /// The spin window adapts as KVM's halt polling does: when a sleep turns out shorter than the
    /// maximum window, polling a little longer would have caught it, so the window doubles;
    /// when it is longer, polling was wasted CPU, so the window halves. Low queue depths with
    /// fast backends end up polling, deep queues (long waits) end up sleeping, and the two
    /// cores we share are never held longer than the maximum window per wait.
    pub fn wait(&mut self) -> Result<()> {
        if self.ring.has_used() {
            return Ok(());
        }
        if self.outstanding == 0 {
            return Err(Error::InvalidJob("waiting for completions with nothing outstanding".into()));
        }
        let start = Instant::now();
        if !self.spin_cur.is_zero() {
            loop {
                for _ in 0..32 {
                    std::hint::spin_loop();
                }
                if self.ring.has_used() {
                    return Ok(());
                }
                if start.elapsed() >= self.spin_cur {
                    break;
                }
            }
        }
        let r = self.sleep();
        let waited = start.elapsed();
        if waited <= self.spin_max {
            self.spin_cur = (self.spin_cur * 2).max(Duration::from_micros(2)).min(self.spin_max);
        } else {
            self.spin_cur /= 2;
            if self.spin_cur < Duration::from_micros(2) {
                self.spin_cur = Duration::ZERO;
            }
        }
        r
    }

    /// Sleeps on the call eventfd (and the control socket) until a completion shows up.
    fn sleep(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            self.ring.enable_notify();
            if self.ring.has_used() {
                self.ring.disable_notify();
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                self.ring.disable_notify();
                return Err(Error::IoTimeout { outstanding: self.outstanding, timeout: self.timeout });
            }
            let ms = (deadline - now).as_millis().clamp(1, 1000) as libc::c_int;
            let mut fds = [
                libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd {
                    fd: self.session.socket().as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            self.stats.sleeps += 1;
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            self.ring.disable_notify();
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::sys("poll on the call eventfd", e));
                }
            }
            if fds[0].revents & libc::POLLIN != 0 {
                // Consume the notification; EAGAIN (already consumed) is fine.
                let _ = self.call.read();
            }
            if fds[1].revents != 0 {
                return Err(self.socket_event());
            }
            if self.ring.has_used() {
                return Ok(());
            }
        }
    }

    /// The control socket became readable or hung up while I/O was running.
    fn socket_event(&self) -> Error {
        let mut b = [0u8; 1];
        // SAFETY: peeking at most 1 byte into a valid local buffer.
        let n = unsafe {
            libc::recv(self.session.socket().as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        if n > 0 {
            Error::Protocol("unexpected message from the backend on the control socket during I/O".into())
        } else {
            Error::BackendClosed { op: "I/O" }
        }
    }

    /// Submits one request in `slot` and waits for it; returns its status.
    pub fn run_one(&mut self, slot: usize, op: Op, sector: u64, len: usize) -> Result<Completion> {
        self.submit(slot, op, sector, len);
        self.kick()?;
        let mut out = Vec::with_capacity(1);
        loop {
            if self.reap(&mut out)? > 0 {
                return Ok(out[0]);
            }
            self.wait()?;
        }
    }

    /// Fetches the device ID (GET_ID); None if the device does not support it.
    pub fn get_id(&mut self) -> Result<Option<String>> {
        let c = self.run_one(0, Op::GetId, 0, blk::VIRTIO_BLK_ID_BYTES)?;
        if c.status != blk::VIRTIO_BLK_S_OK {
            return Ok(None);
        }
        let raw = self.data(0, blk::VIRTIO_BLK_ID_BYTES);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        Ok(Some(String::from_utf8_lossy(&raw[..end]).into_owned()))
    }

    /// Sends a flush and waits for it; returns its status byte.
    pub fn flush(&mut self) -> Result<u8> {
        if !self.has_flush() {
            return Err(Error::Unsupported("flush (VIRTIO_BLK_F_FLUSH not offered)".into()));
        }
        Ok(self.run_one(0, Op::Flush, 0, 0)?.status)
    }

    /// Stops the queue (GET_VRING_BASE) once nothing is outstanding, and checks that the
    /// backend consumed exactly what we submitted.
    pub fn shutdown(mut self) -> Result<()> {
        if self.outstanding != 0 {
            return Err(Error::InvalidJob(format!("shutdown with {} request(s) outstanding", self.outstanding)));
        }
        let base = self.session.stop_vring()?;
        if base != u32::from(self.ring.avail_idx()) {
            return Err(Error::Protocol(format!(
                "backend stopped at avail index {base}, we submitted up to {}",
                self.ring.avail_idx()
            )));
        }
        Ok(())
    }
}
