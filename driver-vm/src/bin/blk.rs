//! `blk`: the block driver of the simulated storage controller (guest-abi
//! `storage`): window `regs` (registers and queues), doorbell 1, interrupt
//! line 1; the channel is `driver_vm::channel`'s. The controller DMAs
//! straight into the request's bounce slot: the driver never touches data.
//!
//! Parameters (`driver_args`): `panic-on-sector=N` (see `driver_vm::channel`);
//! `lie-before-enable`, a hostile image's stand-in for tests: the driver
//! never resets or enables its controller and answers every request OK at
//! once, so its writes are acknowledged and never done (only in images with
//! fault injection, which production images are built without).
#![no_std]
#![cfg_attr(not(test), no_main)]

use driver_vm::channel::{Channel, ChannelDriver, Device};
use driver_vm::kernel::abi::channel::{inject, op, status, RequestEntry, BLOCK_SLOTS, SLOT_COUNT, SLOT_SIZE};
use driver_vm::kernel::abi::storage::{self, reg, Command, Completion};
use driver_vm::kernel::device::Doorbell;
use driver_vm::registers::Registers;
use driver_vm::{println, Error, Kernel};

/// One controller command per bounce slot.
const DEPTH: u32 = SLOT_COUNT;

/// Commands of work no request asked for kept in the controller at once
/// (fault injection `junk-io`), with command ids from [`BLOCK_SLOTS`] on,
/// which no request's slot has.
const JUNK_DEPTH: u32 = 128;
const _: () = assert!(DEPTH <= storage::MAX_QUEUE_DEPTH && DEPTH.is_power_of_two());

struct Blk {
    regs: Registers,
    doorbell: Doorbell,
    /// Request id per command id (= bounce slot), while in the device.
    in_flight: [Option<u64>; DEPTH as usize],
    sq_tail: u32,
    cq_head: u32,
    /// Commands of work no request asked for in the controller (`junk-io`).
    junk: u32,
    /// `lie-before-enable`: the controller is never enabled, and every
    /// request answered OK at once.
    lying: bool,
}

impl ChannelDriver for Blk {
    const NAME: &'static str = "blk";
    const FAULTS: &'static [u32] = &[inject::CORRUPT_READS, inject::SKIP_FLUSHES, inject::SKIP_WRITES, inject::JUNK_IO];

    fn probe(kernel: &Kernel, _channel: &Channel) -> Result<Self, Error> {
        let blk = Blk {
            regs: Registers::new(kernel, "regs", 1, reg::INTERRUPT_WANTED)?,
            doorbell: kernel.doorbell(1).ok_or(Error::MissingDoorbell(1))?,
            in_flight: [None; DEPTH as usize],
            sq_tail: 0,
            cq_head: 0,
            junk: 0,
            // Test images only: production images are built without it.
            lying: cfg!(feature = "fault-injection")
                && kernel.cmdline().split_whitespace().any(|word| word == "lie-before-enable"),
        };
        if blk.regs.window().size() < storage::WINDOW_SIZE as u64
            || blk.regs.get(reg::MAGIC) != storage::MAGIC
            || blk.regs.get(reg::VERSION) != storage::VERSION
        {
            return Err(Error::Device("window `regs` is not a storage controller of a known version"));
        }
        if blk.lying {
            return Ok(blk);
        }
        // A previous driver VM may have left the controller in any state.
        let reset = blk.regs.get(reg::RESET_REQUEST).wrapping_add(1);
        blk.regs.set(reg::RESET_REQUEST, reset);
        blk.ring_unless_polling();
        blk.regs.wait_for(|regs| regs.get(reg::RESET_DONE) == reset);
        if (blk.regs.get(reg::SQ_TAIL), blk.regs.get(reg::CQ_HEAD)) != (0, 0) {
            return Err(Error::Device("the controller did not clear its queues on reset"));
        }
        blk.regs.set(reg::QUEUE_DEPTH, DEPTH);
        blk.regs.set(reg::CONTROL, storage::control::ENABLE);
        blk.ring_unless_polling();
        blk.regs.wait_for(|regs| regs.get(reg::STATUS) & (storage::status::READY | storage::status::FATAL) != 0);
        if blk.regs.get(reg::STATUS) & storage::status::FATAL != 0 {
            return Err(Error::Device("the controller refused its configuration"));
        }
        Ok(blk)
    }

    fn serving(&self) {
        println!("blk: controller ready, {} sectors", self.regs.read::<u64>(reg::CAPACITY));
    }
}

impl Blk {
    /// Tells the controller about what was just written, with its doorbell
    /// only if it is not polling.
    fn ring_unless_polling(&self) {
        self.regs.ring_unless_awake(&self.doorbell, reg::DEVICE_POLLING);
    }

    /// Fault injection `junk-io`: once the last batch is done, gives the
    /// controller [`JUNK_DEPTH`] commands no request asked for, each a read
    /// of a whole slot of the disk's start into the last slot, which no
    /// request uses (whole batches: the driver sleeps while each runs).
    fn add_junk(&mut self, channel: &Channel) {
        let added = if self.junk == 0 { JUNK_DEPTH } else { 0 };
        for n in 0..added {
            let cid = (BLOCK_SLOTS + (self.junk + n) % (DEPTH - BLOCK_SLOTS)) as u16;
            let dma = channel.slot_addr(SLOT_COUNT - 1);
            let command = Command { opcode: storage::opcode::READ, cid, len: SLOT_SIZE, lba: 0, dma, reserved: 0 };
            self.regs.write(storage::SQ_OFFSET + (self.sq_tail % DEPTH) as usize * 32, command);
            self.sq_tail = self.sq_tail.wrapping_add(1);
        }
        if added > 0 {
            self.junk += added;
            self.kick();
        }
    }
}

impl Device for Blk {
    fn submit(&mut self, channel: &mut Channel, request: RequestEntry) {
        if self.lying {
            return channel.complete(request.id, status::OK, request.len);
        }
        let opcode = match request.op {
            op::READ => storage::opcode::READ,
            op::WRITE => storage::opcode::WRITE,
            op::FLUSH => storage::opcode::FLUSH,
            _ => return channel.complete(request.id, status::IO_ERROR, 0),
        };
        let fits = request.len <= SLOT_SIZE && request.len.is_multiple_of(storage::SECTOR_SIZE);
        if !Channel::slot_ok(&request) || !fits || self.in_flight[request.slot as usize].is_some() {
            return channel.complete(request.id, status::IO_ERROR, 0);
        }
        let dma = channel.slot_addr(request.slot);
        let command =
            Command { opcode, cid: request.slot as u16, len: request.len, lba: request.sector, dma, reserved: 0 };
        self.regs.write(storage::SQ_OFFSET + (self.sq_tail % DEPTH) as usize * 32, command);
        self.sq_tail = self.sq_tail.wrapping_add(1);
        self.in_flight[request.slot as usize] = Some(request.id);
    }

    fn kick(&mut self) {
        self.regs.set(reg::SQ_TAIL, self.sq_tail);
        self.ring_unless_polling();
    }

    fn reap(&mut self, channel: &mut Channel) -> Result<bool, Error> {
        if self.regs.get(reg::STATUS) & storage::status::FATAL != 0 {
            return Err(Error::Device("the controller stopped with a fatal error"));
        }
        let tail = self.regs.get(reg::CQ_TAIL);
        let mut reaped = false;
        while self.cq_head != tail {
            let done: Completion = self.regs.read(storage::CQ_OFFSET + (self.cq_head % DEPTH) as usize * 16);
            self.cq_head = self.cq_head.wrapping_add(1);
            if u32::from(done.cid) >= BLOCK_SLOTS {
                // Work no request asked for is no progress: the driver
                // sleeps while its device does it.
                self.junk = self.junk.saturating_sub(1);
                continue;
            }
            reaped = true;
            let Some(id) = self.in_flight.get_mut(done.cid as usize).and_then(Option::take) else { continue };
            let answer = match done.status {
                storage::completion::SUCCESS => status::OK,
                storage::completion::INVALID => status::UNSUPPORTED,
                _ => status::IO_ERROR,
            };
            channel.complete(id, answer, done.len);
        }
        self.regs.set(reg::CQ_HEAD, self.cq_head);
        if channel.lies.junk_io {
            self.add_junk(channel);
        }
        Ok(reaped)
    }

    fn arm(&mut self, armed: bool) -> bool {
        let busy = self.in_flight.iter().any(Option::is_some) || self.junk > 0;
        self.regs.want_interrupt(armed && busy);
        self.regs.get(reg::CQ_TAIL) == self.cq_head
    }
}

driver_vm::channel_driver_main!(Blk);

/// The blk driver against the project's simulated storage controller
/// (`hardware::sim_storage`: its real engine, on its own thread), on the
/// host: no KVM, no reflector.
#[cfg(test)]
mod tests {
    extern crate std;
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::vec::Vec;

    use driver_vm::kernel::abi::channel::{self, status};
    use driver_vm::testing::{Bench, Memory, CHANNEL_GPA};
    use hardware::shared_eventfd::SharedEventFd;
    use hardware::shm::SharedMemory;
    use hardware::sim_storage::{SimStorage, SimStorageConfig};
    use hardware::{BlockHardware, DmaRegion, Hardware};

    use super::Blk;

    const DISK: usize = 1 << 20;

    /// A controller on a disk image, and a bench wired to it as the
    /// reflector wires a driver VM.
    struct Rig {
        bench: Bench,
        storage: SimStorage,
        image: PathBuf,
        _line: SharedEventFd,
        _channel: Arc<SharedMemory>,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.image);
        }
    }

    fn rig(tag: &str) -> Rig {
        let image = std::env::temp_dir().join(std::format!("blk-test-{tag}-{}.img", std::process::id()));
        std::fs::write(&image, std::vec![0u8; DISK]).unwrap();
        let channel = Arc::new(SharedMemory::new("blk-test-channel", channel::REGION_SIZE).unwrap());
        let dma = DmaRegion {
            memory: channel.clone(),
            offset: channel::BOUNCE_OFFSET,
            len: channel::SLOT_COUNT as usize * channel::SLOT_SIZE as usize,
            gpa: CHANNEL_GPA + channel::BOUNCE_OFFSET as u64,
        };
        let config = SimStorageConfig { name: tag.into(), image: image.clone(), read_only: false };
        let storage = SimStorage::start(&config, dma).unwrap();
        let line = SharedEventFd::new().unwrap();
        storage.interrupt().route(line.try_clone().unwrap());
        let regs = storage.windows()[0].memory.clone();
        let bench = Bench::on_channel(Memory::map(channel.as_raw_fd(), channel::REGION_SIZE))
            .with_device_window("regs", Memory::map(regs.as_raw_fd(), regs.size()))
            .with_device_eventfds(storage.doorbell().as_raw_fd(), line.as_raw_fd());
        Rig { bench, storage, image, _line: line, _channel: channel }
    }

    #[test]
    fn writes_reach_the_disk_and_read_back_through_the_controller() {
        let mut rig = rig("rw");
        let mut blk = rig.bench.start::<Blk>().unwrap();
        let data: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        let write = rig.bench.write(8, &data);
        let mut done = Vec::new();
        blk.drain_until(|| {
            done.extend(rig.bench.completions());
            !done.is_empty()
        })
        .unwrap();
        assert_eq!((done[0].id, done[0].status, done[0].len), (write, status::OK, 16384));
        assert_eq!(&std::fs::read(&rig.image).unwrap()[8 * 512..8 * 512 + 16384], &data[..]);
        let read = rig.bench.read(8, 16384);
        done.clear();
        blk.drain_until(|| {
            done.extend(rig.bench.completions());
            !done.is_empty()
        })
        .unwrap();
        assert_eq!((done[0].id, done[0].status), (read, status::OK));
        assert_eq!(rig.bench.slot(read, 16384), &data[..]);
    }

    #[test]
    fn a_flush_runs_on_the_controller_and_a_request_beyond_the_disk_fails() {
        let mut rig = rig("flush");
        let mut blk = rig.bench.start::<Blk>().unwrap();
        let before = rig.storage.flushes();
        let flush = rig.bench.flush();
        let beyond = rig.bench.read((DISK / 512) as u64, 512);
        let odd = rig.bench.publish(channel::op::READ, 0, 100, None);
        let mut done = Vec::new();
        blk.drain_until(|| {
            done.extend(rig.bench.completions());
            done.len() == 3
        })
        .unwrap();
        let status_of = |id| done.iter().find(|c| c.id == id).map(|c| c.status);
        assert_eq!(status_of(flush), Some(status::OK));
        assert_eq!(status_of(beyond), Some(status::IO_ERROR));
        assert_eq!(status_of(odd), Some(status::IO_ERROR));
        assert!(rig.storage.flushes().completed > before.completed, "the controller counted the flush");
    }

    #[test]
    fn a_new_driver_resets_the_controller_and_finds_the_data() {
        let mut rig = rig("restart");
        let mut first = rig.bench.start::<Blk>().unwrap();
        let write = rig.bench.write(0, &[0x6b; 4096]);
        first.drain_until(|| rig.bench.completions().iter().any(|c| c.id == write)).unwrap();
        drop(first);
        let mut second = rig.bench.start::<Blk>().unwrap();
        let read = rig.bench.read(0, 4096);
        second.drain_until(|| rig.bench.completions().iter().any(|c| c.id == read && c.status == status::OK)).unwrap();
        assert_eq!(rig.bench.slot(read, 4096), &[0x6b; 4096][..]);
    }
}
