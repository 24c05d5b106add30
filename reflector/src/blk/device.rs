//! The block kind of device (`crate::device`): a vhost-user-blk device
//! whose requests a driver VM serves.
//!
//! Flow: the client kicks queue 0 → chains are parsed (`marshal`) → each
//! well-formed request takes a bounce slot and an id (`inflight`), a write's
//! payload is copied in, and the request is pushed into the channel → the
//! driver VM's doorbell wakes the worker → completions are judged
//! (`driver_answers`), a read's payload is copied out, and the chain is
//! completed in the client's used ring.
//!
//! What recovery means for block (DESIGN.md, restart protocol): completions
//! of the dead driver that pass every check are kept; every request still
//! in flight is replayed (suspects one at a time), its payload copied again
//! from client memory; a poison request completes with an error. The
//! client sees a stall, not an error.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::client_vring::ClientVring;
use guest_abi::channel::{self, RequestEntry};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap, VolatileSlice};

use super::inflight::{self, InFlight, InFlightTable};
use super::marshal::{self, BlkRequest, Limits, RequestKind, Segment};
use super::read_back;
use crate::channel::Channel;
use crate::device::{Device, DeviceCore, DeviceKind};
use crate::driver_answers::{self, Evidence, ReadBack, WrittenSums};
use crate::hw::BlockHardware;
use crate::recovery::Fault;
use crate::worker::{exceeds_queue, HEAD_REUSED};

/// Queues offered to the client.
pub const NUM_QUEUES: usize = 1;
/// Largest queue a client may set up: QEMU's limit for vhost-user-blk. A
/// request uses up to SEG_MAX + 2 descriptors, so deep queues of large
/// requests need this many.
pub const QUEUE_SIZE: usize = 1024;
/// Largest data segment advertised (size_max): one page, so that
/// `SEG_MAX` segments always fit one bounce slot.
const SIZE_MAX: u32 = 4096;
/// Most data segments per request (seg_max).
const SEG_MAX: u32 = channel::SLOT_SIZE / SIZE_MAX;

/// A block device served through a driver VM.
pub type BlkDevice = Device<Blk>;

/// A request waiting for a free bounce slot or a driver VM.
struct Waiting {
    head: u16,
    request: BlkRequest,
    status: GuestAddress,
}

/// What only a block device has.
pub struct Blk {
    limits: Limits,
    config: Vec<u8>,
    hardware: Arc<dyn BlockHardware>,
    /// Checksums of written sectors (`checksums=on`), to judge reads.
    written: Option<WrittenSums>,
    in_flight: InFlightTable,
    waiting: VecDeque<Waiting>,
    /// Deaths a request may be in before it is a poison request.
    poison_deaths: u32,
    /// Where the middle part of a long write read back from the medium is
    /// drawn (keys from the OS: a driver cannot predict it), and the
    /// failures to read the medium, for the log.
    draws: std::hash::RandomState,
    unreadable_medium: crate::hw::LogEvery,
    /// The configured driver keeps no data (`null`): no ledger judges it.
    keeps_no_data: bool,
}

impl Blk {
    /// The block side of a device on `hardware`: `checksums` keeps a
    /// checksum of every written sector to judge reads; a request in
    /// `poison_deaths` dying driver VMs completes with an error.
    /// `keeps_no_data`: the configured driver answers without its device
    /// (`null`, `inline-null`), so the device's record of its writes does
    /// not judge it; every other driver is judged by it from its first
    /// answer.
    pub fn new(
        hardware: Arc<dyn BlockHardware>,
        checksums: bool,
        poison_deaths: u32,
        keeps_no_data: bool,
    ) -> Result<Self, crate::driver_answers::ChecksumTableError> {
        let (capacity_sectors, read_only) = (hardware.capacity_sectors(), hardware.read_only());
        Ok(Blk {
            limits: Limits {
                capacity_sectors,
                max_data: channel::SLOT_SIZE,
                max_segments: SEG_MAX as usize,
                read_only,
            },
            config: virtio_blk_config(capacity_sectors),
            hardware: hardware.clone(),
            written: checksums.then(|| WrittenSums::new(capacity_sectors)).transpose()?,
            in_flight: InFlightTable::with_windows(hardware.dma_windows()),
            waiting: VecDeque::new(),
            poison_deaths,
            draws: std::hash::RandomState::new(),
            unreadable_medium: crate::hw::LogEvery::default(),
            keeps_no_data,
        })
    }

    /// The device's record of the writes it did, if it keeps one and the
    /// driver is to be judged by it.
    fn write_ledger(&self) -> Option<&crate::hw::write_ledger::WriteLedger> {
        self.hardware.write_ledger().filter(|_| !self.keeps_no_data)
    }

    fn accept(
        &mut self,
        core: &mut DeviceCore,
        vring: &ClientVring,
        memory: &GuestMemoryMmap,
        head: u16,
        segments: &[Segment],
    ) {
        core.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let parsed = marshal::parse(memory, segments, &self.limits);
        let request = match parsed.request {
            Ok(request) => request,
            Err(reason) => {
                core.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device = %core.name, head, %reason, "malformed request");
                return complete(core, vring, memory, head, parsed.status, reason.status(), 0);
            }
        };
        let status = parsed.status.unwrap_or(GuestAddress(0));
        match request.kind {
            RequestKind::GetId => {
                let id = format!("drvm-{}", core.name);
                let (code, written) = match marshal::write_id(memory, &request, &id) {
                    Ok(written) => (marshal::VIRTIO_BLK_S_OK, written),
                    Err(_) => (marshal::VIRTIO_BLK_S_IOERR, 0),
                };
                complete(core, vring, memory, head, Some(status), code, written);
            }
            _ if core.session.failed() => {
                complete(core, vring, memory, head, Some(status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
            // Sectors whose data is lost (`WrittenSums::mark_lost`): no
            // driver is asked to read them, and killed for what it finds.
            RequestKind::Read
                if self.written.as_ref().is_some_and(|written| {
                    written.lost(request.sector, u64::from(request.data_len()).div_ceil(512) as usize)
                }) =>
            {
                complete(core, vring, memory, head, Some(status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
            _ => {
                core.request_arrived();
                self.waiting.push_back(Waiting { head, request, status });
                self.submit_waiting(core, vring, memory);
            }
        }
    }

    /// Moves waiting requests into free bounce slots and the channel, while
    /// a driver VM runs.
    fn submit_waiting(&mut self, core: &mut DeviceCore, vring: &ClientVring, memory: &GuestMemoryMmap) {
        // While a request that was in a dying driver VM is pending, requests
        // go one at a time (`send_held`); new ones wait.
        while core.session.running() && !self.in_flight.serializing() {
            let Some(waiting) = self.waiting.pop_front() else { return };
            let entry = InFlight::new(waiting.head, waiting.request, waiting.status, core.client);
            let (slot, _) = match self.in_flight.insert(entry) {
                Ok(taken) => taken,
                Err(entry) => {
                    let InFlight { head, request, status, .. } = *entry;
                    self.waiting.push_front(Waiting { head, request, status });
                    return;
                }
            };
            if !self.send(core, memory, slot) {
                if let Some(entry) = self.in_flight.remove(slot) {
                    complete(core, vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
                }
            }
        }
    }

    /// Pushes the request in `slot` into the channel, copying a write's
    /// payload from client memory first. False if client memory failed.
    fn send(&mut self, core: &mut DeviceCore, memory: &GuestMemoryMmap, slot: u32) -> bool {
        let Some(entry) = self.in_flight.get(slot) else { return false };
        let request = &entry.request;
        let op = match request.kind {
            RequestKind::Read => channel::op::READ,
            RequestKind::Write => channel::op::WRITE,
            _ => channel::op::FLUSH,
        };
        let (mut sums, mut read_back) = (Vec::new(), Vec::new());
        // Where writes are read back from the medium, the draw that places
        // the middle part of a long one (a write's only).
        let draw = (request.kind == RequestKind::Write && self.hardware.medium().is_some()).then(|| {
            use std::hash::BuildHasher;
            self.draws.hash_one(entry.id)
        });
        if let (Some(limit), RequestKind::Read | RequestKind::Write) = (self.in_flight.window_limit(), request.kind) {
            // dma=direct: the device reaches the client's buffers through a
            // window while the request is in flight; nothing is copied.
            let window = core.memory.as_ref().and_then(|memory| marshal::dma_window(memory, request, limit));
            if !window.is_some_and(|window| self.in_flight.map_window(slot, window)) {
                return false;
            }
        } else if request.kind == RequestKind::Write {
            let copied = match self.written.is_some() {
                // Checksums are taken of what the client wrote, staged here:
                // the driver can change its bounce slot at any time.
                true => {
                    let mut data = vec![0u8; entry.data_len as usize];
                    let staged = marshal::copy_to_slot(memory, request, &VolatileSlice::from(&mut data[..]));
                    sums = WrittenSums::sums_of(&data);
                    if let Some(draw) = draw {
                        read_back = read_back::sent(data.len(), draw, |at, part| {
                            part.copy_from_slice(&data[at..at + part.len()]);
                        });
                    }
                    staged.ok().and_then(|()| core.channel.slot(slot, data.len())).map(|bounce| {
                        bounce.copy_from(&data[..]);
                        Ok(())
                    })
                }
                false => core
                    .channel
                    .slot(slot, entry.data_len as usize)
                    .map(|bounce| marshal::copy_to_slot(memory, request, &bounce)),
            };
            // A fault while copying left zeros, not the client's data.
            if !matches!(copied, Some(Ok(()))) || core.client_memory_poisoned() {
                return false;
            }
            // Without a staged copy, what the slot holds just after the copy
            // (a driver could change it meanwhile; it can write any sector
            // anyway: the read-back catches lost writes, not forged data).
            if let (Some(draw), None) = (draw, self.written.as_ref()) {
                read_back = core.channel.slot(slot, entry.data_len as usize).map_or_else(Vec::new, |bounce| {
                    read_back::sent(bounce.len(), draw, |at, part| {
                        if let Ok(from) = bounce.subslice(at, part.len()) {
                            from.copy_to(part);
                        }
                    })
                });
            }
        }
        self.gather_evidence(slot, sums, read_back);
        let Some(entry) = self.in_flight.get(slot) else { return false };
        let request = &entry.request;
        let (id, sector, len) = (entry.id, request.sector, entry.data_len);
        if let (RequestKind::Write, Some(writes)) = (request.kind, self.write_ledger()) {
            writes.expect(slot, sector);
        }
        // The device may do twice the work of what its driver is given (a
        // retry of everything), and no more (`hw::WorkAllowance`).
        if let Some(allowance) = self.hardware.work() {
            allowance.grant(2 * crate::hw::block_work(op == channel::op::FLUSH, len));
        }
        core.channel.push(RequestEntry { id, op, slot, sector, len, reserved: 0 });
        if let Some(entry) = self.in_flight.get_mut(slot) {
            entry.sent_at = Some(Instant::now());
        }
        true
    }

    /// Notes, as the request in `slot` is sent, what its answer will be
    /// judged against: the device's flush count for a flush; with
    /// checksums, a write's data sums (`write_sums`; its sectors become
    /// unknown until it completes, and reads of them in flight
    /// unverifiable), and whether a read can be verified; where the medium
    /// is read back, what a write sent to the parts read back. A write that
    /// overlaps another in flight is `raced`: either may end up on the
    /// medium, so neither is judged by what it sent.
    fn gather_evidence(&mut self, slot: u32, write_sums: Vec<u32>, read_back: Vec<read_back::Stretch>) {
        let Some(entry) = self.in_flight.get(slot) else { return };
        let kind = entry.request.kind;
        let others_of = |wanted: RequestKind| -> Vec<u32> {
            let in_flight = self.in_flight.iter();
            in_flight
                .filter(|(s, other)| *s != slot && other.request.kind == wanted && entry.overlaps(other))
                .map(|(s, _)| s)
                .collect()
        };
        match kind {
            RequestKind::Flush => {
                let mark = self.hardware.flush_mark();
                if let Some(entry) = self.in_flight.get_mut(slot) {
                    entry.flush_mark = mark;
                }
            }
            RequestKind::Write if self.written.is_some() || !read_back.is_empty() => {
                let (sectors, reads) = (entry.sectors(), others_of(RequestKind::Read));
                let writes = others_of(RequestKind::Write);
                if let Some(written) = self.written.as_mut() {
                    written.forget(sectors.start, (sectors.end - sectors.start) as usize);
                }
                for read in reads {
                    if let Some(read) = self.in_flight.get_mut(read) {
                        read.verifiable = false;
                    }
                }
                let raced = !writes.is_empty();
                for write in writes {
                    if let Some(write) = self.in_flight.get_mut(write) {
                        write.raced = true;
                    }
                }
                if let Some(entry) = self.in_flight.get_mut(slot) {
                    entry.sums = write_sums;
                    entry.read_back = read_back;
                    entry.raced |= raced;
                }
            }
            RequestKind::Read if self.written.is_some() => {
                let verifiable = others_of(RequestKind::Write).is_empty();
                if let Some(entry) = self.in_flight.get_mut(slot) {
                    entry.verifiable = verifiable;
                }
            }
            _ => {}
        }
    }

    /// Judges a completion that passed the protocol checks against the
    /// evidence (see `gather_evidence`); records a completed write's sums.
    /// Returns a verified read's data: the client gets that copy, not the
    /// bounce slot, which the driver may have changed since.
    fn judge_evidence(
        &mut self,
        channel: &Channel,
        slot: u32,
        status: u32,
    ) -> Result<Option<Vec<u8>>, driver_answers::Violation> {
        if status != channel::status::OK {
            return Ok(None);
        }
        let Some(entry) = self.in_flight.get(slot) else { return Ok(None) };
        let data = match (&self.written, entry.request.kind, entry.verifiable) {
            (Some(_), RequestKind::Read, true) => {
                let mut data = vec![0u8; entry.data_len as usize];
                if let Some(bounce) = channel.slot(slot, data.len()) {
                    bounce.copy_to(&mut data[..]);
                }
                Some(data)
            }
            _ => None,
        };
        let unraced_write = entry.request.kind == RequestKind::Write && !entry.raced;
        let read_back = match unraced_write {
            true => {
                let (sector, parts) = (entry.request.sector, entry.read_back.clone());
                self.read_back(sector, &parts)
            }
            false => Vec::new(),
        };
        let Some(entry) = self.in_flight.get(slot) else { return Ok(None) };
        let evidence = Evidence {
            flushes: self.hardware.flushes(),
            written: self.written.as_ref(),
            read_data: data.as_deref(),
            writes: self.write_ledger(),
            read_back: &read_back,
        };
        driver_answers::check_evidence(entry.id, entry.claim(slot), &evidence)?;
        // A write that raced another to the same sectors records nothing:
        // its sectors stay unknown (`InFlight::raced`).
        if unraced_write && !entry.sums.is_empty() {
            let (sector, sums) = (entry.request.sector, entry.sums.clone());
            let others: Vec<std::ops::Range<u64>> = self
                .in_flight
                .iter()
                .filter(|(s, other)| *s != slot && other.request.kind == RequestKind::Write)
                .map(|(_, other)| other.sectors())
                .collect();
            if let Some(written) = self.written.as_mut() {
                written.record(sector, &sums, |at| others.iter().any(|covered| covered.contains(&at)));
            }
        }
        Ok(data)
    }

    /// Reads `parts` of a write at `sector` back from the medium. A part the
    /// host cannot read is left out (its fault, not the driver's: logged at
    /// powers of two).
    fn read_back(&mut self, sector: u64, parts: &[read_back::Stretch]) -> Vec<ReadBack> {
        use std::os::unix::fs::FileExt;
        let Some(medium) = self.hardware.medium() else { return Vec::new() };
        let mut data = [0u8; read_back::WHOLE_UP_TO as usize * 512];
        let mut read = Vec::with_capacity(parts.len());
        for part in parts {
            let at = sector + u64::from(part.first);
            let data = &mut data[..(part.count as usize * 512).min(read_back::WHOLE_UP_TO as usize * 512)];
            match medium.read_exact_at(data, at * 512) {
                Ok(()) => read.push(ReadBack { sector: at, sent: part.crc, found: Some(crc32fast::hash(data)) }),
                // Inside the device's capacity (the write was checked
                // against it): the image was cut short under the device.
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                    read.push(ReadBack { sector: at, sent: part.crc, found: None })
                }
                Err(error) => {
                    if let Some(failures) = self.unreadable_medium.note() {
                        tracing::warn!(%error, sector = at, failures, "cannot read a write back from the medium; that part goes unjudged");
                    }
                }
            }
        }
        read
    }

    /// Sends the held requests the table releases (one suspect at a time
    /// after a death, then the rest: `InFlightTable::next_to_send`). One
    /// that cannot be sent (its client left, its memory failed) leaves the
    /// table, and the next are released at once: before, they waited for a
    /// completion that could not come (nothing was in the driver), and the
    /// hang deadline blamed the innocent driver for each.
    fn send_held(&mut self, core: &mut DeviceCore, vring: &ClientVring, memory: &GuestMemoryMmap) {
        loop {
            let chosen = self.in_flight.next_to_send();
            if chosen.is_empty() {
                return;
            }
            let mut sent_any = false;
            for slot in chosen {
                // A request of a client that left is never sent again: its
                // addresses would be read in the next client's memory.
                if self.in_flight.get(slot).is_some_and(|entry| entry.client != core.client) {
                    self.in_flight.remove(slot);
                    continue;
                }
                let replayed = self.in_flight.get(slot).is_some_and(|entry| entry.orphaned);
                if self.send(core, memory, slot) {
                    sent_any = true;
                    if replayed {
                        core.metrics.replayed.fetch_add(1, Ordering::Relaxed);
                    }
                } else if let Some(entry) = self.in_flight.remove(slot) {
                    complete(core, vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
                }
            }
            if sent_any {
                return;
            }
        }
    }

    /// Completes with an error every request that was in `poison_deaths`
    /// dying driver VMs (DESIGN.md, invariant 5), saying what it was.
    fn fail_poisoned(&mut self, core: &mut DeviceCore, vring: Option<&ClientVring>, memory: Option<&GuestMemoryMmap>) {
        for (_, entry) in self.in_flight.take_poisoned(self.poison_deaths) {
            let what = format!(
                "{:?} of {} bytes at sector {} was in {} dying driver VMs in a row{}",
                entry.request.kind,
                entry.data_len,
                entry.request.sector,
                entry.deaths + entry.silent_deaths,
                if entry.silent_deaths > 0 {
                    format!(" ({} of them ended without a report)", entry.silent_deaths)
                } else {
                    String::new()
                }
            );
            tracing::error!(device = %core.name, request = %what, "poison request: completed with an I/O error");
            if let (true, RequestKind::Read, Some(written)) =
                (entry.mismatched, entry.request.kind, self.written.as_mut())
            {
                let sectors = u64::from(entry.data_len).div_ceil(512);
                written.mark_lost(entry.request.sector, sectors as usize);
                tracing::error!(
                    device = %core.name,
                    sector = entry.request.sector,
                    sectors,
                    "driver VM after driver VM read other data there than was written: the sectors' data is lost; \
                     reads of them fail until they are written again"
                );
            }
            core.metrics.poisoned.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = core.metrics.last_poison.lock() {
                *last = what;
            }
            if let (Some(vring), Some(memory), true) = (vring, memory, entry.client == core.client) {
                complete(core, vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
        }
    }

    /// Judges and completes the driver VM's answers; false at the first
    /// that fails a check (reported as a fault unless `salvaging`).
    fn take_answers(&mut self, core: &mut DeviceCore, vring: Option<&ClientVring>, salvaging: bool) -> bool {
        let memory = core.memory.clone();
        let Some(completions) = core.take_completions(salvaging) else { return false };
        // Every answer of a block driver is to a client's request.
        if !salvaging && !completions.is_empty() {
            core.note_busy();
        }
        for completion in completions {
            let judged = inflight::check(&completion, &self.in_flight).and_then(|answer| {
                self.judge_evidence(&core.channel, answer.slot, answer.status).map(|data| (answer, data))
            });
            match judged {
                Ok((answer, verified)) => {
                    if let Some(entry) = self.in_flight.remove(answer.slot) {
                        if !salvaging {
                            core.progress();
                        }
                        // Once a sync of the medium failed, no flush is
                        // acknowledged, whatever the driver answered.
                        let status = match entry.request.kind {
                            RequestKind::Flush if self.hardware.flushes().medium_failed => channel::status::IO_ERROR,
                            _ => answer.status,
                        };
                        if let (Some(vring), Some(memory), true) =
                            (vring, memory.as_deref(), entry.client == core.client)
                        {
                            self.finish(core, vring, memory, answer.slot, entry, status, verified);
                        }
                        if !salvaging && core.draining() && !self.in_flight.replays_pending() {
                            core.drained();
                        }
                    }
                }
                Err(violation) => {
                    if let driver_answers::Violation::DataMismatch { id, .. } = violation {
                        if let Some(entry) = self.in_flight.get_mut(channel::slot_of(id)).filter(|e| e.id == id) {
                            entry.mismatched = true;
                        }
                    }
                    if !salvaging {
                        core.fault(Fault::Violation(violation.to_string()));
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Completes `entry` to the client; a read's data comes from `verified`
    /// if the judge checked a copy, else from the bounce slot.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        core: &mut DeviceCore,
        vring: &ClientVring,
        memory: &GuestMemoryMmap,
        slot: u32,
        entry: InFlight,
        status: u32,
        verified: Option<Vec<u8>>,
    ) {
        let code = match status {
            channel::status::OK => marshal::VIRTIO_BLK_S_OK,
            channel::status::UNSUPPORTED => marshal::VIRTIO_BLK_S_UNSUPP,
            _ => marshal::VIRTIO_BLK_S_IOERR,
        };
        let mut written = 0;
        let code = match (code, entry.request.kind) {
            // The device wrote the client's buffers itself, and can no
            // longer: the window went with the request's table entry.
            (marshal::VIRTIO_BLK_S_OK, RequestKind::Read) if self.in_flight.direct() => {
                written = entry.data_len;
                core.metrics.bytes_read.fetch_add(u64::from(entry.data_len), Ordering::Relaxed);
                code
            }
            (marshal::VIRTIO_BLK_S_OK, RequestKind::Read) => {
                let copied = match verified {
                    Some(mut data) => {
                        Some(marshal::copy_from_slot(memory, &entry.request, &VolatileSlice::from(&mut data[..])))
                    }
                    None => core
                        .channel
                        .slot(slot, entry.data_len as usize)
                        .map(|bounce| marshal::copy_from_slot(memory, &entry.request, &bounce)),
                };
                if matches!(copied, Some(Ok(()))) {
                    written = entry.data_len;
                    core.metrics.bytes_read.fetch_add(u64::from(entry.data_len), Ordering::Relaxed);
                    code
                } else {
                    marshal::VIRTIO_BLK_S_IOERR
                }
            }
            (marshal::VIRTIO_BLK_S_OK, RequestKind::Write) => {
                core.metrics.bytes_written.fetch_add(u64::from(entry.data_len), Ordering::Relaxed);
                code
            }
            (code, _) => code,
        };
        complete(core, vring, memory, entry.head, Some(entry.status), code, written);
    }
}

/// Completes a chain in the client's used ring.
fn complete(
    core: &mut DeviceCore,
    vring: &ClientVring,
    memory: &GuestMemoryMmap,
    head: u16,
    status: Option<GuestAddress>,
    code: u8,
    written: u32,
) {
    let used_len = match status {
        Some(address) if marshal::write_status(memory, address, code) => written + 1,
        _ => 0,
    };
    if code != marshal::VIRTIO_BLK_S_OK {
        core.metrics.errors.fetch_add(1, Ordering::Relaxed);
    }
    core.metrics.completed.fetch_add(1, Ordering::Relaxed);
    core.add_used(vring, memory, head, used_len);
}

impl DeviceKind for Blk {
    const QUEUES: usize = NUM_QUEUES;
    const MAX_QUEUE_SIZE: usize = QUEUE_SIZE;
    // A request holds a slot from its marshalling to its completion, and
    // an idle device has none in flight.
    const SLOTS_FREE_WHEN_IDLE: bool = true;

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.limits.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn config_space(&self) -> Vec<u8> {
        self.config.clone()
    }

    fn work(&self) -> Option<crate::driver_watch::DeviceWork> {
        self.hardware.work().map(crate::driver_watch::DeviceWork::of)
    }

    fn in_driver(&self) -> usize {
        self.in_flight.len()
    }

    fn oldest_in_driver(&self) -> Option<Instant> {
        self.in_flight.oldest_sent()
    }

    fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.waiting.is_empty()
    }

    fn queue_kicked(&mut self, core: &mut DeviceCore, _queue: usize, vrings: &[ClientVring]) -> std::io::Result<()> {
        let Some(vring) = vrings.first() else { return Ok(()) };
        let Some(memory) = core.memory.clone() else {
            tracing::debug!(device = %core.name, "queue kicked before the client's memory table arrived");
            return Ok(());
        };
        // A queue's worth an event (`worker::ChainBudget`), and so a pass:
        // a client that publishes as fast as the worker pops cannot grow
        // the list without bound, nor keep the event going with chains
        // completed as they are taken (malformed ones).
        let mut budget = crate::worker::ChainBudget::of(vring);
        for pass in 0.. {
            // What an earlier pass sent goes out (unpublished, the driver
            // would be blamed for it); it completes into nothing once the
            // client is cut off.
            if !core.queue_servable(vring, &memory) {
                break;
            }
            if core.event_idx && !core.quiet_client(vring, &memory) {
                break;
            }
            let chains: Vec<(u16, Option<Vec<Segment>>)> = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                let mut chains = Vec::new();
                while chains.len() < budget.left() {
                    let Some(chain) = queue.pop_descriptor_chain(memory.clone()) else { break };
                    let head = chain.head_index();
                    chains.push((head, marshal::chain_segments(chain, SEG_MAX as usize + 2)));
                }
                chains
            };
            budget.took(chains.len());
            tracing::trace!(device = %core.name, chains = chains.len(), "queue processed");
            if pass > 0 && chains.is_empty() {
                core.stuck_pass(vring);
                break;
            }
            for (head, segments) in chains {
                // The table's whole count bounds the client's own: its scan
                // (`len_for`) is needed only near the queue's size.
                let held = |in_flight| self.waiting.len() + in_flight;
                if exceeds_queue(vring, held(self.in_flight.len()))
                    && exceeds_queue(vring, held(self.in_flight.len_for(core.client)))
                {
                    core.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                    core.cut_off(HEAD_REUSED);
                    // What this kick already sent goes out; it completes
                    // into nothing once the client is gone.
                    core.publish();
                    return Ok(());
                }
                match segments {
                    Some(segments) => self.accept(core, vring, &memory, head, &segments),
                    None => {
                        // No status byte can be trusted in a chain that does not end.
                        core.metrics.requests.fetch_add(1, Ordering::Relaxed);
                        core.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(device = %core.name, head, "malformed request: the chain does not end");
                        complete(core, vring, &memory, head, None, marshal::VIRTIO_BLK_S_IOERR, 0);
                    }
                }
            }
            if budget.spent(vring) {
                break;
            }
            if !core.event_idx || !core.rearm_client(vring, &memory) {
                break;
            }
        }
        core.publish();
        core.arm_hang_watch(self.in_flight.len());
        Ok(())
    }

    fn completions(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]) -> std::io::Result<()> {
        if !self.take_answers(core, vrings.first(), false) {
            return Ok(());
        }
        let memory = core.memory.clone();
        if let (Some(vring), Some(memory)) = (vrings.first(), memory.as_deref()) {
            self.send_held(core, vring, memory);
            self.submit_waiting(core, vring, memory);
        }
        core.publish();
        Ok(())
    }

    fn retired(&mut self, core: &mut DeviceCore, vrings: &[ClientVring], fault: &Fault) {
        self.take_answers(core, vrings.first(), true);
        // What it still held was in a dying driver VM; one that had not
        // attached had taken none of it (it was booting or resetting its
        // device: a slow boot on a loaded machine is no request's doing).
        let blame = if core.driver_attached() { fault.blame() } else { crate::recovery::Blame::None };
        self.in_flight.blame_sent(blame);
        // The device is quiesced; no request of the dead driver's may be
        // reached again until a replay maps it anew.
        self.in_flight.revoke_windows();
    }

    fn launched(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]) {
        let memory = core.memory.clone();
        self.fail_poisoned(core, vrings.first(), memory.as_deref());
        for (slot, entry) in self.in_flight.drain() {
            if memory.is_none() || entry.client != core.client {
                continue;
            }
            // Same slot, new id: answers of the dead driver cannot match.
            // Held until `send_held` releases it.
            self.in_flight.insert_at(slot, entry);
        }
        if let (Some(vring), Some(memory)) = (vrings.first(), memory.as_deref()) {
            self.send_held(core, vring, memory);
            self.submit_waiting(core, vring, memory);
        }
    }

    fn fail_pending(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]) {
        let memory = core.memory.clone();
        let client = core.client;
        for (_, entry) in self.in_flight.drain() {
            if let (Some(vring), Some(memory), true) = (vrings.first(), memory.as_deref(), entry.client == client) {
                complete(core, vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
        }
        while let Some(waiting) = self.waiting.pop_front() {
            if let (Some(vring), Some(memory)) = (vrings.first(), memory.as_deref()) {
                complete(core, vring, memory, waiting.head, Some(waiting.status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
        }
    }

    fn held_of_queue(&self, core: &DeviceCore, _queue: usize) -> usize {
        self.in_flight.len_for(core.client) + self.waiting.len()
    }

    fn abandon_queue(&mut self, core: &mut DeviceCore, _queue: usize, vrings: &[ClientVring]) -> usize {
        let in_driver = self.in_flight.iter().filter(|(_, entry)| entry.client == core.client && entry.sent).count();
        let mut abandoned = self.in_flight.disown(core.client);
        // The device may no longer reach their buffers (`dma=direct`); the
        // windows of departed clients' requests were revoked as they left.
        self.in_flight.revoke_windows();
        abandoned.extend(self.waiting.drain(..).map(|waiting| (waiting.head, waiting.status)));
        if let (Some(vring), Some(memory)) = (vrings.first(), core.memory.clone()) {
            for (head, status) in abandoned {
                complete(core, vring, &memory, head, Some(status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
        }
        in_driver
    }

    fn departed_in_driver(&self, core: &DeviceCore) -> usize {
        self.in_flight.iter().filter(|(_, entry)| entry.sent && entry.client != core.client).count()
    }

    fn client_gone(&mut self, _core: &mut DeviceCore) {
        self.waiting.clear();
        // Requests held back after a death are in no driver VM: forgotten
        // now, they can neither be replayed with the next client's memory
        // nor keep its requests waiting behind them.
        self.in_flight.take_held();
        // What is still in the driver VM completes into nothing, and its
        // device may no longer reach the departed client's buffers: a QEMU
        // that reconnects brings the same guest RAM back, already reused.
        self.in_flight.revoke_windows();
    }
}

/// The virtio-blk configuration space (virtio spec 5.2.4), up to num_queues.
fn virtio_blk_config(capacity_sectors: u64) -> Vec<u8> {
    use virtio::blk::config;
    let mut bytes = vec![0u8; config::LEN];
    bytes[config::CAPACITY..config::CAPACITY + 8].copy_from_slice(&capacity_sectors.to_le_bytes());
    bytes[config::SIZE_MAX..config::SIZE_MAX + 4].copy_from_slice(&SIZE_MAX.to_le_bytes());
    bytes[config::SEG_MAX..config::SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
    bytes[config::BLK_SIZE..config::BLK_SIZE + 4].copy_from_slice(&(virtio::blk::SECTOR_SIZE as u32).to_le_bytes());
    bytes[config::NUM_QUEUES..config::NUM_QUEUES + 2].copy_from_slice(&(NUM_QUEUES as u16).to_le_bytes());
    bytes
}
