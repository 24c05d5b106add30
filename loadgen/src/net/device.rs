//! One virtio-net device driven over vhost-user: its RX queue (virtqueue 0) kept full of
//! buffers, its TX queue (virtqueue 1) with one single-descriptor slot per frame, and a bounded
//! poll-then-sleep wait over several devices at once.
//!
//! Shared memory (one memfd per device): the RX ring, the TX ring, then the RX buffers, then
//! the TX slots, then (for the malformed probe) a scratch area. Every error names the device's
//! socket.
//!
//! For the malformed probe a device can keep the top [`NetOptions::raw_descs`] descriptors of
//! each table for raw chains ([`NetDevice::submit_raw`]): any shape, loops and indirect tables
//! included, told apart from frames when the device returns them.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::features::*;
use super::frame::MAX_FRAME;
use super::rx::RxAssembler;
use super::{NetConfig, CONFIG_READ_LEN, HEADER_LEN, RX_QUEUE, TX_QUEUE};
use crate::error::{Error, Result};
use crate::mem::GuestMem;
use crate::session::{socket_event_error, Negotiated, Session};
use crate::vring::{DriverRing, RingLayout, Segment, TableEntry, UsedElem};

/// Bytes per TX slot: the header and the largest frame, rounded up.
const TX_SLOT: usize = 2048;
/// Longest frame we accept from the RX queue.
const MAX_RX_FRAME: usize = 65536;

/// How to set a device up.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Bound on every control exchange and on waiting for the backend to complete TX frames.
    pub timeout: Duration,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if offered.
    pub event_idx: bool,
    /// Negotiate VIRTIO_NET_F_MRG_RXBUF if offered.
    pub mrg_rxbuf: bool,
    /// Size of both queues (power of two).
    pub queue_size: u16,
    /// Bytes per RX buffer (without MRG_RXBUF at least the header plus the largest frame).
    pub rx_buf_size: usize,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC if offered (frames never use indirect tables; the
    /// malformed probe sends some).
    pub indirect_desc: bool,
    /// Descriptors at the top of each queue's table kept for raw chains
    /// ([`NetDevice::submit_raw`]) instead of RX buffers and TX slots (less than the queue size).
    pub raw_descs: u16,
    /// Bytes of shared memory, after the TX slots, for raw chains' buffers and tables.
    pub scratch: usize,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            timeout: Duration::from_secs(10),
            event_idx: true,
            mrg_rxbuf: true,
            queue_size: 256,
            rx_buf_size: 2048,
            indirect_desc: false,
            raw_descs: 0,
            scratch: 0,
        }
    }
}

/// Counters of one device.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct NetStats {
    /// Frames placed on the TX queue.
    pub tx_frames: u64,
    /// Frames taken from the RX queue.
    pub rx_frames: u64,
    /// RX buffers used by the device.
    pub rx_buffers: u64,
    /// Kicks of the TX queue.
    pub tx_kicks: u64,
    /// Kicks of the RX queue (new buffers).
    pub rx_kicks: u64,
}

/// One of a device's two queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Queue {
    /// The receive queue (virtqueue 0).
    Rx,
    /// The transmit queue (virtqueue 1).
    Tx,
}

impl Queue {
    /// "rx" or "tx".
    pub fn name(self) -> &'static str {
        match self {
            Queue::Rx => "rx",
            Queue::Tx => "tx",
        }
    }
}

/// The raw chains of one queue: which reserved descriptors they occupy, which the device holds
/// and which it has returned.
#[derive(Debug, Default)]
struct RawChains {
    /// First reserved descriptor index.
    first: u16,
    /// Per reserved descriptor: part of a chain the device holds.
    busy: Vec<bool>,
    /// Chains the device holds: head and descriptor indices.
    held: Vec<(u16, Vec<u16>)>,
    /// Chains the device returned, not yet taken.
    done: Vec<UsedElem>,
}

impl RawChains {
    fn new(first: u16, count: u16) -> Self {
        RawChains { first, busy: vec![false; usize::from(count)], ..Default::default() }
    }

    /// Records a used element if it returns a raw chain (true), freeing its descriptors.
    fn complete(&mut self, u: UsedElem) -> bool {
        let Some(pos) = self.held.iter().position(|(h, _)| u32::from(*h) == u.id) else { return false };
        let (_, indices) = self.held.swap_remove(pos);
        for i in indices {
            self.busy[usize::from(i - self.first)] = false;
        }
        self.done.push(u);
        true
    }

    /// First index of `n` consecutive free reserved descriptors.
    fn alloc(&self, n: usize) -> Option<u16> {
        if n == 0 || n > self.busy.len() {
            return None;
        }
        (0..=self.busy.len() - n).find(|&s| self.busy[s..s + n].iter().all(|b| !b)).map(|s| self.first + s as u16)
    }
}

/// A connected, running virtio-net device.
pub struct NetDevice {
    path: PathBuf,
    session: Session,
    mem: GuestMem,
    rx: DriverRing,
    tx: DriverRing,
    rx_kick: EventFd,
    rx_call: EventFd,
    tx_kick: EventFd,
    tx_call: EventFd,
    neg: Negotiated,
    config: NetConfig,
    config_error: Option<String>,
    rx_bufs: usize,
    rx_buf_size: usize,
    rx_posted: Vec<bool>,
    tx_bufs: usize,
    tx_free: Vec<u16>,
    tx_inflight: Vec<bool>,
    tx_outstanding: usize,
    asm: RxAssembler,
    stats: NetStats,
    timeout: Duration,
    scratch_off: usize,
    scratch_len: usize,
    raw_rx: RawChains,
    raw_tx: RawChains,
}

impl NetDevice {
    /// Connects to the backend at `path`, negotiates, and starts both queues with the RX queue
    /// full of buffers.
    pub fn connect(path: &Path, opts: &NetOptions) -> Result<Self> {
        Self::connect_inner(path, opts).map_err(|e| e.at(path))
    }

    fn connect_inner(path: &Path, opts: &NetOptions) -> Result<Self> {
        let layout = RingLayout::new(opts.queue_size)?;
        if opts.raw_descs >= opts.queue_size {
            return Err(Error::InvalidJob(format!(
                "{} descriptors kept for raw chains leave none of the {} for frames",
                opts.raw_descs, opts.queue_size
            )));
        }
        let mut session = Session::connect_queues(path, opts.timeout, 2)?;
        let mut wanted = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;
        if opts.mrg_rxbuf {
            wanted |= VIRTIO_NET_F_MRG_RXBUF;
        }
        if opts.event_idx {
            wanted |= VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.indirect_desc {
            wanted |= VIRTIO_RING_F_INDIRECT_DESC;
        }
        // No MQ: one queue pair is all we drive, and GET_QUEUE_NUM's answer (pairs or queues?)
        // would only get in the way.
        let neg = session
            .negotiate_features(wanted, VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK)?;
        let mrg = neg.acked & VIRTIO_NET_F_MRG_RXBUF != 0;
        let min_buf = if mrg { HEADER_LEN + 1 } else { HEADER_LEN + MAX_FRAME };
        if opts.rx_buf_size < min_buf || opts.rx_buf_size > 65536 {
            return Err(Error::InvalidJob(format!(
                "RX buffers of {} bytes: need {min_buf}..=65536 {}",
                opts.rx_buf_size,
                if mrg { "" } else { "(the backend does not offer MRG_RXBUF, so a frame must fit one buffer)" }
            )));
        }

        let mut config = NetConfig::default();
        let mut config_error = None;
        let has_config = neg.protocol & VhostUserProtocolFeatures::CONFIG.bits() != 0;
        if has_config && neg.acked & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS) != 0 {
            match session.get_config_bytes(&neg, CONFIG_READ_LEN).and_then(|raw| NetConfig::parse(&raw, neg.acked)) {
                Ok(c) => config = c,
                // The backend answered but refused: go on without the config.
                Err(e @ (Error::BackendRejected { .. } | Error::Vhost { .. } | Error::BadConfig(_))) => {
                    config_error = Some(e.to_string())
                }
                Err(e) => return Err(e),
            }
        }

        let qsize = usize::from(opts.queue_size);
        let rx_ring = 0;
        let tx_ring = layout.total;
        let rx_bufs = 2 * layout.total;
        let tx_bufs = (rx_bufs + qsize * opts.rx_buf_size).next_multiple_of(4096);
        let scratch_off = (tx_bufs + qsize * TX_SLOT).next_multiple_of(4096);
        let total = scratch_off + opts.scratch;
        let mem = GuestMem::new(total)?;
        // SAFETY: both rings lie inside `mem` (offsets 0 and layout.total, each layout.total
        // bytes, page-aligned), do not overlap, and move into the same struct as the mapping
        // (whose address does not change when the struct moves).
        let (rx, tx) = unsafe {
            (
                DriverRing::new(mem.host_base().add(rx_ring), layout, neg.event_idx()),
                DriverRing::new(mem.host_base().add(tx_ring), layout, neg.event_idx()),
            )
        };
        let efd = |what| EventFd::new(EFD_NONBLOCK).map_err(|e| Error::sys(what, e));
        let rx_kick = efd("creating the RX kick eventfd")?;
        let rx_call = efd("creating the RX call eventfd")?;
        let tx_kick = efd("creating the TX kick eventfd")?;
        let tx_call = efd("creating the TX call eventfd")?;

        session.set_mem_table(&mem)?;
        session.configure_vring(RX_QUEUE, &mem, rx_ring, layout, &rx_kick, &rx_call)?;
        session.configure_vring(TX_QUEUE, &mem, tx_ring, layout, &tx_kick, &tx_call)?;

        // Frames use descriptors (and RX buffers, TX slots) 0..first; raw chains the rest.
        let first = opts.queue_size - opts.raw_descs;
        let mut dev = NetDevice {
            path: path.to_path_buf(),
            session,
            mem,
            rx,
            tx,
            rx_kick,
            rx_call,
            tx_kick,
            tx_call,
            neg,
            config,
            config_error,
            rx_bufs,
            rx_buf_size: opts.rx_buf_size,
            rx_posted: vec![false; qsize],
            tx_bufs,
            tx_free: (0..first).rev().collect(),
            tx_inflight: vec![false; qsize],
            tx_outstanding: 0,
            // Frames longer than any we send are received (and counted as foreign) up to a
            // bound that only guards our memory.
            asm: RxAssembler::new(mrg, opts.queue_size, MAX_RX_FRAME.max(opts.rx_buf_size)),
            stats: NetStats::default(),
            timeout: opts.timeout,
            scratch_off,
            scratch_len: opts.scratch,
            raw_rx: RawChains::new(first, opts.raw_descs),
            raw_tx: RawChains::new(first, opts.raw_descs),
        };
        // Fill the RX queue before the rings start, so the backend has buffers at once.
        for id in 0..first {
            dev.post_rx(id);
        }
        dev.rx.publish();
        dev.session.enable_vring(&dev.neg, RX_QUEUE)?;
        dev.session.enable_vring(&dev.neg, TX_QUEUE)?;
        dev.session.sync(&dev.neg)?;
        // An event-driven backend learns about the buffers from a kick.
        dev.rx_kick.write(1).map_err(|e| Error::sys("kicking the RX queue (eventfd write)", e))?;
        dev.stats.rx_kicks += 1;
        dev.rx.disable_notify();
        dev.tx.disable_notify();
        Ok(dev)
    }

    /// The backend's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// The config space as read (fields None if not offered or not readable).
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Why the config space could not be read although MAC or STATUS was offered.
    pub fn config_error(&self) -> Option<&str> {
        self.config_error.as_deref()
    }

    /// True if MRG_RXBUF is in use.
    pub fn mrg_rxbuf(&self) -> bool {
        self.neg.acked & VIRTIO_NET_F_MRG_RXBUF != 0
    }

    /// Queue size (both queues).
    pub fn queue_size(&self) -> u16 {
        self.tx.size()
    }

    /// Bytes per RX buffer.
    pub fn rx_buf_size(&self) -> usize {
        self.rx_buf_size
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Frames received that spanned several RX buffers.
    pub fn multi_buffer_frames(&self) -> u64 {
        self.asm.multi_buffer_frames
    }

    /// TX frames the backend holds.
    pub fn tx_outstanding(&self) -> usize {
        self.tx_outstanding
    }

    /// Free TX slots.
    pub fn tx_free(&self) -> usize {
        self.tx_free.len()
    }

    fn post_rx(&mut self, id: u16) {
        let off = self.rx_bufs + usize::from(id) * self.rx_buf_size;
        let seg = Segment { addr: self.mem.gpa(off), len: self.rx_buf_size as u32, write: true };
        self.rx.push_chain(id, &[seg]);
        self.rx_posted[usize::from(id)] = true;
    }

    /// Queues a frame of `len` bytes that `fill` writes (not visible to the device before
    /// [`Self::flush_tx`]). False if every TX slot is in use (reap with [`Self::reap_tx`]).
    pub fn send_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        assert!(len <= TX_SLOT - HEADER_LEN, "frame of {len} bytes does not fit a TX slot");
        let Some(slot) = self.tx_free.pop() else { return false };
        let off = self.tx_bufs + usize::from(slot) * TX_SLOT;
        let buf = self.mem.slice_mut(off, HEADER_LEN + len);
        // virtio_net_hdr_v1: no checksum, no GSO; num_buffers is unused on TX.
        buf[..HEADER_LEN].fill(0);
        fill(&mut buf[HEADER_LEN..]);
        let seg = Segment { addr: self.mem.gpa(off), len: (HEADER_LEN + len) as u32, write: false };
        self.tx.push_chain(slot, &[seg]);
        self.tx_inflight[usize::from(slot)] = true;
        self.tx_outstanding += 1;
        self.stats.tx_frames += 1;
        true
    }

    /// Makes queued frames visible and kicks the TX queue if the device asks for it.
    pub fn flush_tx(&mut self) -> Result<()> {
        if self.tx.unpublished() != 0 && self.tx.publish() {
            self.stats.tx_kicks += 1;
            self.tx_kick.write(1).map_err(|e| Error::sys("kicking the TX queue (eventfd write)", e).at(&self.path))?;
        }
        Ok(())
    }

    /// Takes back the TX slots the device has completed; returns how many.
    pub fn reap_tx(&mut self) -> Result<usize> {
        let mut n = 0;
        while let Some(u) =
            self.tx.pop_used(self.tx_outstanding + self.raw_tx.held.len()).map_err(|e| e.at(&self.path))?
        {
            if self.raw_tx.complete(u) {
                continue;
            }
            let id = u.id as usize;
            if id >= self.tx_inflight.len() || !self.tx_inflight[id] {
                return Err(Error::Protocol(format!(
                    "TX used ring returned descriptor {id}, which is not an outstanding frame"
                ))
                .at(&self.path));
            }
            self.tx_inflight[id] = false;
            self.tx_free.push(id as u16);
            self.tx_outstanding -= 1;
            n += 1;
        }
        Ok(n)
    }

    /// True if the device has used RX buffers we have not taken yet.
    pub fn has_rx(&self) -> bool {
        self.rx.has_used()
    }

    /// True if the device has completed TX frames we have not reaped yet.
    pub fn has_tx_done(&self) -> bool {
        self.tx.has_used()
    }

    /// Takes up to `budget` received frames, calling `f` with each (without the virtio-net
    /// header, valid only during the call), and gives the buffers back to the device. Returns
    /// the number of frames.
    pub fn poll_rx(&mut self, budget: usize, mut f: impl FnMut(&[u8])) -> Result<usize> {
        let r = self.poll_rx_inner(budget, &mut f);
        // Buffers taken are given back even if something was wrong.
        let kick = self.rx.unpublished() != 0 && self.rx.publish();
        if kick {
            self.stats.rx_kicks += 1;
            self.rx_kick.write(1).map_err(|e| Error::sys("kicking the RX queue (eventfd write)", e).at(&self.path))?;
        }
        r.map_err(|e| e.at(&self.path))
    }

    fn poll_rx_inner(&mut self, budget: usize, f: &mut impl FnMut(&[u8])) -> Result<usize> {
        let mut frames = 0;
        while frames < budget {
            let Some(u) = self.rx.pop_used(self.rx_posted.len())? else { break };
            if self.raw_rx.complete(u) {
                continue;
            }
            let id = u.id as usize;
            if id >= self.rx_posted.len() || !self.rx_posted[id] {
                return Err(Error::Protocol(format!(
                    "RX used ring returned descriptor {id}, which is not a buffer we posted"
                )));
            }
            let len = u.len as usize;
            if len > self.rx_buf_size {
                return Err(Error::Protocol(format!(
                    "RX buffer {id} used with {len} bytes, it has {}",
                    self.rx_buf_size
                )));
            }
            self.rx_posted[id] = false;
            self.stats.rx_buffers += 1;
            let data = self.mem.slice(self.rx_bufs + id * self.rx_buf_size, len);
            let done = match self.asm.push(data)? {
                Some(frame) => {
                    f(frame);
                    true
                }
                None => false,
            };
            if done {
                frames += 1;
                self.stats.rx_frames += 1;
            }
            self.post_rx(id as u16);
        }
        Ok(frames)
    }

    /// Guest physical addresses of all the shared memory.
    pub fn mem_gpa_range(&self) -> Range<u64> {
        self.mem.gpa(0)..self.mem.gpa(self.mem.len())
    }

    /// Guest physical address of the scratch area ([`NetOptions::scratch`]).
    pub fn scratch_gpa(&self) -> u64 {
        self.mem.gpa(self.scratch_off)
    }

    /// Bytes of the scratch area.
    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// Bytes `off..off + len` of the scratch area.
    pub fn scratch(&self, off: usize, len: usize) -> &[u8] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.scratch_len), "scratch range out of bounds");
        self.mem.slice(self.scratch_off + off, len)
    }

    /// Bytes `off..off + len` of the scratch area, to write.
    pub fn scratch_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.scratch_len), "scratch range out of bounds");
        self.mem.slice_mut(self.scratch_off + off, len)
    }

    fn raw(&mut self, queue: Queue) -> &mut RawChains {
        match queue {
            Queue::Rx => &mut self.raw_rx,
            Queue::Tx => &mut self.raw_tx,
        }
    }

    /// The descriptor indices kept for raw chains (the same on both queues).
    pub fn raw_descs(&self) -> Range<u16> {
        self.raw_tx.first..self.queue_size()
    }

    /// First index of `n` consecutive reserved descriptors of `queue` that no held raw chain
    /// uses (None: not that many free).
    pub fn alloc_raw(&self, queue: Queue, n: usize) -> Option<u16> {
        match queue {
            Queue::Rx => self.raw_rx.alloc(n),
            Queue::Tx => self.raw_tx.alloc(n),
        }
    }

    /// Writes `entries` (index, entry) into `queue`'s descriptor table exactly as given, makes
    /// `head` available and kicks the queue. Every index must be a free reserved one
    /// ([`Self::alloc_raw`]); what the entries hold is not checked. The chain comes back through
    /// [`Self::take_raw`] (reaped by [`Self::reap_tx`] / [`Self::poll_rx`]).
    pub fn submit_raw(&mut self, queue: Queue, head: u16, entries: &[(u16, TableEntry)]) -> Result<()> {
        let path = self.path.clone();
        let raw = self.raw(queue);
        let first = raw.first;
        let mut indices: Vec<u16> = entries.iter().map(|(i, _)| *i).collect();
        indices.push(head);
        indices.sort_unstable();
        indices.dedup();
        for &i in &indices {
            if i < first || usize::from(i - first) >= raw.busy.len() || raw.busy[usize::from(i - first)] {
                return Err(Error::InvalidJob(format!(
                    "descriptor {i} of the {} queue is not a free one kept for raw chains",
                    queue.name()
                ))
                .at(&path));
            }
        }
        for &i in &indices {
            raw.busy[usize::from(i - first)] = true;
        }
        raw.held.push((head, indices));
        let (ring, kick) = match queue {
            Queue::Rx => (&mut self.rx, &self.rx_kick),
            Queue::Tx => (&mut self.tx, &self.tx_kick),
        };
        for &(i, entry) in entries {
            ring.write_entry(i, entry);
        }
        ring.push_head(head);
        ring.publish();
        // Kicked whether or not the device asked: a probe wants it to look now.
        kick.write(1).map_err(|e| Error::sys("kicking a queue (eventfd write)", e).at(&path))?;
        match queue {
            Queue::Rx => self.stats.rx_kicks += 1,
            Queue::Tx => self.stats.tx_kicks += 1,
        }
        Ok(())
    }

    /// The used length of raw chain `head` of `queue` if the device has returned it (once; call
    /// [`Self::reap_tx`] / [`Self::poll_rx`] first to collect completions).
    pub fn take_raw(&mut self, queue: Queue, head: u16) -> Option<u32> {
        let raw = self.raw(queue);
        let pos = raw.done.iter().position(|u| u.id == u32::from(head))?;
        Some(raw.done.swap_remove(pos).len)
    }

    /// Raw chains of `queue` the device holds.
    pub fn raw_held(&self, queue: Queue) -> usize {
        match queue {
            Queue::Rx => self.raw_rx.held.len(),
            Queue::Tx => self.raw_tx.held.len(),
        }
    }

    /// Checks, without blocking, that the backend has not hung up the control socket.
    pub fn check_connection(&self) -> Result<()> {
        let mut fd =
            libc::pollfd { fd: self.session.socket().as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: `fd` is one valid pollfd for the duration of the call; timeout 0 never blocks.
        let rc = unsafe { libc::poll(&mut fd, 1, 0) };
        if rc < 0 {
            return Err(Error::last_os("poll on the control socket").at(&self.path));
        }
        if fd.revents != 0 {
            return Err(socket_event_error(self.session.socket()).at(&self.path));
        }
        Ok(())
    }

    fn ready(&self, i: Interest) -> bool {
        (i.rx && self.rx.has_used()) || (i.tx && self.tx.has_used())
    }

    /// Asks for interrupts on the queues of interest; true if something is already there.
    fn arm(&mut self, i: Interest) -> bool {
        if i.rx {
            self.rx.enable_notify();
        }
        if i.tx {
            self.tx.enable_notify();
        }
        self.ready(i)
    }

    fn disarm(&mut self) {
        self.rx.disable_notify();
        self.tx.disable_notify();
        // Consume stale notifications; EAGAIN (none) is fine.
        let _ = self.rx_call.read();
        let _ = self.tx_call.read();
    }

    /// Stops both queues (GET_VRING_BASE, as QEMU does when a device stops) once no TX frame is
    /// outstanding, checking that the backend consumed exactly the TX frames we sent.
    pub fn shutdown(mut self) -> Result<()> {
        let path = self.path.clone();
        self.shutdown_inner().map_err(|e| e.at(&path))
    }

    fn shutdown_inner(&mut self) -> Result<()> {
        if self.tx_outstanding != 0 {
            return Err(Error::InvalidJob(format!("shutdown with {} TX frame(s) outstanding", self.tx_outstanding)));
        }
        let base = self.session.stop_vring_index(TX_QUEUE)?;
        if base != u32::from(self.tx.avail_idx()) {
            return Err(Error::Protocol(format!(
                "backend stopped the TX queue at avail index {base}, we sent up to {}",
                self.tx.avail_idx()
            )));
        }
        let base = self.session.stop_vring_index(RX_QUEUE)?;
        let ahead = self.rx.avail_idx().wrapping_sub(base as u16);
        if base > u32::from(u16::MAX) || usize::from(ahead) > self.rx_posted.len() {
            return Err(Error::Protocol(format!(
                "backend stopped the RX queue at avail index {base}, we made buffers available up to {}",
                self.rx.avail_idx()
            )));
        }
        Ok(())
    }
}

/// Which queues of a device a wait is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Received frames.
    pub rx: bool,
    /// Completed TX frames.
    pub tx: bool,
}

/// Waits for any of several devices: polls for an adaptive window, then sleeps on their call
/// eventfds and control sockets.
///
/// The window adapts as KVM's halt polling does (see `BlkDevice::wait`): a sleep shorter than
/// the maximum window doubles it, a longer one halves it.
#[derive(Clone, Debug)]
pub struct Waiter {
    spin_max: Duration,
    spin_cur: Duration,
    /// Times we slept.
    pub sleeps: u64,
}

impl Waiter {
    /// A waiter that polls for at most `spin_max` before sleeping.
    pub fn new(spin_max: Duration) -> Self {
        Waiter { spin_max, spin_cur: spin_max, sleeps: 0 }
    }

    /// Waits until a device has something its `interest` covers (true), or `timeout` passes
    /// (false). A backend hanging up its control socket is an error naming its socket.
    pub fn wait(&mut self, devs: &mut [NetDevice], interest: &[Interest], timeout: Duration) -> Result<bool> {
        assert_eq!(devs.len(), interest.len(), "one interest per device");
        let any = |devs: &[NetDevice]| devs.iter().zip(interest).any(|(d, &i)| d.ready(i));
        if any(devs) {
            return Ok(true);
        }
        let start = Instant::now();
        let spin = self.spin_cur.min(timeout);
        if !spin.is_zero() {
            loop {
                for _ in 0..32 {
                    std::hint::spin_loop();
                }
                if any(devs) {
                    return Ok(true);
                }
                if start.elapsed() >= spin {
                    break;
                }
            }
        }
        let r = self.sleep(devs, interest, start + timeout);
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

    fn sleep(&mut self, devs: &mut [NetDevice], interest: &[Interest], deadline: Instant) -> Result<bool> {
        let mut fds = Vec::with_capacity(devs.len() * 3);
        loop {
            let mut ready = false;
            for (d, &i) in devs.iter_mut().zip(interest) {
                ready |= d.arm(i);
            }
            if ready {
                devs.iter_mut().for_each(NetDevice::disarm);
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                devs.iter_mut().for_each(NetDevice::disarm);
                return Ok(false);
            }
            let ms = (deadline - now).as_millis().clamp(1, 1000) as libc::c_int;
            fds.clear();
            for (d, &i) in devs.iter().zip(interest) {
                let ev = |fd: i32, on: bool| libc::pollfd { fd, events: if on { libc::POLLIN } else { 0 }, revents: 0 };
                fds.push(ev(d.rx_call.as_raw_fd(), i.rx));
                fds.push(ev(d.tx_call.as_raw_fd(), i.tx));
                fds.push(libc::pollfd {
                    fd: d.session.socket().as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                });
            }
            self.sleeps += 1;
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    devs.iter_mut().for_each(NetDevice::disarm);
                    return Err(Error::sys("poll on the call eventfds", e));
                }
            }
            devs.iter_mut().for_each(NetDevice::disarm);
            for (k, d) in devs.iter().enumerate() {
                if fds[3 * k + 2].revents != 0 {
                    return Err(socket_event_error(d.session.socket()).at(&d.path));
                }
            }
            if any_ready(devs, interest) {
                return Ok(true);
            }
        }
    }
}

fn any_ready(devs: &[NetDevice], interest: &[Interest]) -> bool {
    devs.iter().zip(interest).any(|(d, &i)| d.ready(i))
}

impl NetDevice {
    /// Waits (bounded by the connect timeout) until the backend completes at least one TX frame.
    pub fn wait_tx(&mut self, waiter: &mut Waiter) -> Result<()> {
        if self.tx_outstanding == 0 {
            return Err(Error::InvalidJob("waiting for TX completions with nothing outstanding".into()));
        }
        let timeout = self.timeout;
        if !waiter.wait(std::slice::from_mut(self), &[Interest { rx: false, tx: true }], timeout)? {
            return Err(Error::NetTimeout {
                socket: self.path.clone(),
                what: format!("the backend completed none of the {} outstanding TX frames", self.tx_outstanding),
                timeout,
            });
        }
        Ok(())
    }

    /// The timeout given at connect time.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}
