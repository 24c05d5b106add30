//! `blk`: the block driver of the simulated storage controller (guest-abi
//! `storage`): window `regs` (registers and queues), doorbell 1, interrupt
//! line 1; the channel is `driver_vm::channel`'s. The controller DMAs
//! straight into the request's bounce slot: the driver never touches data.
//!
//! Parameters (`driver_args`): `panic-on-sector=N` (see `driver_vm::channel`).
#![no_std]
#![cfg_attr(not(test), no_main)]

use core::sync::atomic::{fence, Ordering};

use driver_vm::channel::{Channel, ChannelDriver, Device};
use driver_vm::kernel::abi::channel::{inject, op, status, RequestEntry, SLOT_COUNT, SLOT_SIZE};
use driver_vm::kernel::abi::storage::{self, reg, Command, Completion};
use driver_vm::kernel::device::Doorbell;
use driver_vm::registers::Registers;
use driver_vm::{println, Error, Kernel};

/// One controller command per bounce slot.
const DEPTH: u32 = SLOT_COUNT;
const _: () = assert!(DEPTH <= storage::MAX_QUEUE_DEPTH && DEPTH.is_power_of_two());

struct Blk {
    regs: Registers,
    doorbell: Doorbell,
    /// Request id per command id (= bounce slot), while in the device.
    in_flight: [Option<u64>; DEPTH as usize],
    sq_tail: u32,
    cq_head: u32,
}

impl ChannelDriver for Blk {
    const NAME: &'static str = "blk";
    const FAULTS: &'static [u32] = &[inject::CORRUPT_READS, inject::SKIP_FLUSHES];

    fn probe(kernel: &Kernel, _channel: &Channel) -> Result<Self, Error> {
        let blk = Blk {
            regs: Registers::new(kernel, "regs", 1, reg::INTERRUPT_WANTED)?,
            doorbell: kernel.doorbell(1).ok_or(Error::MissingDoorbell(1))?,
            in_flight: [None; DEPTH as usize],
            sq_tail: 0,
            cq_head: 0,
        };
        if blk.regs.window().size() < storage::WINDOW_SIZE as u64
            || blk.regs.get(reg::MAGIC) != storage::MAGIC
            || blk.regs.get(reg::VERSION) != storage::VERSION
        {
            return Err(Error::Device("window `regs` is not a storage controller of a known version"));
        }
        // A previous driver VM may have left the controller in any state.
        let reset = blk.regs.get(reg::RESET_REQUEST).wrapping_add(1);
        blk.regs.set(reg::RESET_REQUEST, reset);
        blk.doorbell.ring(1);
        blk.regs.wait_for(|regs| regs.get(reg::RESET_DONE) == reset);
        if (blk.regs.get(reg::SQ_TAIL), blk.regs.get(reg::CQ_HEAD)) != (0, 0) {
            return Err(Error::Device("the controller did not clear its queues on reset"));
        }
        blk.regs.set(reg::QUEUE_DEPTH, DEPTH);
        blk.regs.set(reg::CONTROL, storage::control::ENABLE);
        blk.doorbell.ring(1);
        blk.regs.wait_for(|regs| regs.get(reg::STATUS) & (storage::status::READY | storage::status::FATAL) != 0);
        if blk.regs.get(reg::STATUS) & storage::status::FATAL != 0 {
            return Err(Error::Device("the controller refused its configuration"));
        }
        println!("blk: controller ready, {} sectors", blk.regs.read::<u64>(reg::CAPACITY));
        Ok(blk)
    }
}

impl Device for Blk {
    fn submit(&mut self, channel: &mut Channel, request: RequestEntry) {
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
        fence(Ordering::SeqCst);
        // Rung unless the controller polls anyway.
        if self.regs.get(reg::DEVICE_POLLING) == 0 {
            self.doorbell.ring(1);
        }
    }

    fn reap(&mut self, channel: &mut Channel) -> Result<bool, Error> {
        if self.regs.get(reg::STATUS) & storage::status::FATAL != 0 {
            return Err(Error::Device("the controller stopped with a fatal error"));
        }
        let (tail, start) = (self.regs.get(reg::CQ_TAIL), self.cq_head);
        while self.cq_head != tail {
            let done: Completion = self.regs.read(storage::CQ_OFFSET + (self.cq_head % DEPTH) as usize * 16);
            self.cq_head = self.cq_head.wrapping_add(1);
            let Some(id) = self.in_flight.get_mut(done.cid as usize).and_then(Option::take) else { continue };
            let answer = match done.status {
                storage::completion::SUCCESS => status::OK,
                storage::completion::INVALID => status::UNSUPPORTED,
                _ => status::IO_ERROR,
            };
            channel.complete(id, answer, done.len);
        }
        self.regs.set(reg::CQ_HEAD, self.cq_head);
        Ok(self.cq_head != start)
    }

    fn arm(&mut self, armed: bool) -> bool {
        let busy = self.in_flight.iter().any(Option::is_some);
        self.regs.want_interrupt(armed && busy);
        self.regs.get(reg::CQ_TAIL) == self.cq_head
    }
}

driver_vm::channel_driver_main!(Blk);
