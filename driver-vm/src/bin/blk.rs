//! `blk`: the block driver. Serves the reflector's channel with the
//! simulated storage controller (see guest-abi `channel` and `storage`).
//!
//! Resources (as the reflector wires them):
//! - window `regs`: the controller's registers and queues;
//! - window `channel`: the reflector's rings and bounce slots (also the
//!   controller's DMA region);
//! - doorbell 0 tells the reflector completions are ready, doorbell 1 is
//!   the controller's doorbell;
//! - interrupt line 0: the reflector published requests; line 1: the
//!   controller completed commands; line 2 (warm spares only): go.
//!
//! Parameters (words of its command line, the device's `driver_args`):
//! `panic-on-sector=N` makes it panic on any request covering sector N, a
//! stand-in for a driver bug that one request triggers (tests of poison
//! requests).
//!
//! With `spare` on its command line the driver is a warm spare: it boots,
//! then sleeps on line 2 without touching the controller or the channel,
//! which another driver VM is using. When the reflector raises line 2 (the
//! active driver VM has died), it starts exactly like a fresh driver.
//!
//! The driver never touches payloads: it points the controller's DMA at the
//! request's bounce slot. It polls while busy and sleeps (ring-0 `hlt`, no
//! exit to the vmm) when idle.
#![no_std]
#![no_main]

use core::sync::atomic::{fence, Ordering};

use driver_vm::kernel::abi::channel::{self, header, inject, CompletionEntry, RequestEntry};
use driver_vm::kernel::abi::storage::{self, reg, Command, Completion};
use driver_vm::kernel::device::{Doorbell, InterruptLine, Window};
use driver_vm::kernel::{arch, time};
use driver_vm::{println, Driver, Error, Kernel};

/// How long to keep polling after the last piece of work before sleeping.
/// Waking a sleeping driver costs a cross-CPU wake-up (about 35 us,
/// DESIGN.md) plus the emulated ring-0 interrupt and #GP paths; measured with
/// blk-load at 4k QD1, an 80 us window left the driver asleep for nearly
/// every request (2.6k IOPS) and 300 us keeps it awake between requests of
/// a busy stream (6-11k IOPS), while an idle driver still sleeps after 0.3 ms.
const POLL_WINDOW_US: u64 = 300;
/// Queue depth programmed into the controller: one command per bounce slot.
const QUEUE_DEPTH: u32 = channel::SLOT_COUNT;

const _: () = assert!(QUEUE_DEPTH <= storage::MAX_QUEUE_DEPTH && QUEUE_DEPTH.is_power_of_two());

struct Blk {
    regs: Window,
    channel: Window,
    to_reflector: Doorbell,
    to_device: Doorbell,
    device_interrupt: InterruptLine,
    /// Request id per command id (= bounce slot), while the command is in the device.
    in_flight: [Option<u64>; QUEUE_DEPTH as usize],
    in_flight_count: u32,
    sq_tail: u32,
    cq_head: u32,
    req_cons: u32,
    cmp_prod: u32,
    /// Injected lies (tests): corrupt read data, skip flushes.
    corrupt_reads: bool,
    skip_flushes: bool,
    spin: bool,
    flood: bool,
    /// `panic-on-sector=N`: a bug that one request triggers.
    panic_sector: Option<u64>,
    /// The channel op of each command in the device, by command id.
    ops: [u32; QUEUE_DEPTH as usize],
}

impl Driver for Blk {
    const NAME: &'static str = "blk";

    fn probe(kernel: &Kernel) -> Result<Self, Error> {
        if kernel.cmdline().split_whitespace().any(|word| word == "spare") {
            let go = kernel.interrupt_line(2).ok_or(Error::MissingInterrupt(2))?;
            println!("blk: warm spare ready");
            go.wait();
        }
        let mut blk = Blk {
            regs: kernel.window("regs").ok_or(Error::MissingWindow("regs"))?,
            channel: kernel.window("channel").ok_or(Error::MissingWindow("channel"))?,
            to_reflector: kernel.doorbell(0).ok_or(Error::MissingDoorbell(0))?,
            to_device: kernel.doorbell(1).ok_or(Error::MissingDoorbell(1))?,
            device_interrupt: kernel.interrupt_line(1).ok_or(Error::MissingInterrupt(1))?,
            in_flight: [None; QUEUE_DEPTH as usize],
            in_flight_count: 0,
            sq_tail: 0,
            cq_head: 0,
            req_cons: 0,
            cmp_prod: 0,
            corrupt_reads: false,
            skip_flushes: false,
            spin: false,
            flood: false,
            panic_sector: kernel
                .cmdline()
                .split_whitespace()
                .find_map(|word| word.strip_prefix("panic-on-sector=")?.parse().ok()),
            ops: [0; QUEUE_DEPTH as usize],
        };
        kernel.interrupt_line(0).ok_or(Error::MissingInterrupt(0))?;
        blk.check_layouts()?;
        blk.reset_device()?;
        blk.enable_device()?;
        blk.attach_channel();
        Ok(blk)
    }

    fn run(mut self, _kernel: &Kernel) -> Result<u32, Error> {
        let mut idle_since = time::Instant::now();
        loop {
            let submitted = self.forward_requests();
            let completed = self.forward_completions();
            self.publish_completions();
            if self.regs.atomic_u32(reg::STATUS).load(Ordering::Acquire) & storage::status::FATAL != 0 {
                return Err(Error::Device("the controller stopped with a fatal error"));
            }
            if submitted || completed {
                idle_since = time::Instant::now();
            } else if self.flood {
                self.to_reflector.ring(1);
            } else if self.spin {
                core::hint::spin_loop();
            } else if idle_since.elapsed_us() >= POLL_WINDOW_US {
                self.sleep();
                idle_since = time::Instant::now();
            } else {
                core::hint::spin_loop();
            }
        }
    }
}

impl Blk {
    fn check_layouts(&self) -> Result<(), Error> {
        if self.regs.size() < storage::WINDOW_SIZE as u64
            || self.regs.read::<u32>(reg::MAGIC) != storage::MAGIC
            || self.regs.read::<u32>(reg::VERSION) != storage::VERSION
        {
            return Err(Error::Device("window `regs` is not a storage controller of a known version"));
        }
        let channel = &self.channel;
        if channel.size() < channel::REGION_SIZE as u64
            || channel.read::<u64>(header::MAGIC) != channel::MAGIC
            || channel.read::<u32>(header::VERSION) != channel::VERSION
            || channel.read::<u32>(header::RING_SIZE) != channel::RING_SIZE
            || channel.read::<u32>(header::SLOT_SIZE) != channel::SLOT_SIZE
            || channel.read::<u32>(header::SLOT_COUNT) != channel::SLOT_COUNT
        {
            return Err(Error::Device("window `channel` has an unknown layout"));
        }
        Ok(())
    }

    /// Rings the controller's doorbell unless it is polling anyway.
    fn notify_device(&self) {
        fence(Ordering::SeqCst);
        if self.regs.atomic_u32(reg::DEVICE_POLLING).load(Ordering::Acquire) == 0 {
            self.to_device.ring(1);
        }
    }

    /// Waits until `done` holds, polling, then sleeping on the device's
    /// interrupt. The reflector's hang detection bounds this wait.
    fn wait_for_device(&self, done: impl Fn(&Self) -> bool) {
        let start = time::Instant::now();
        while !done(self) {
            if start.elapsed_us() < POLL_WINDOW_US {
                core::hint::spin_loop();
                continue;
            }
            self.regs.atomic_u32(reg::INTERRUPT_WANTED).store(1, Ordering::SeqCst);
            if !done(self) {
                self.device_interrupt.wait();
            }
            self.regs.atomic_u32(reg::INTERRUPT_WANTED).store(0, Ordering::SeqCst);
        }
    }

    /// Resets the controller: a previous driver VM may have left it in any
    /// state, with commands in flight.
    fn reset_device(&mut self) -> Result<(), Error> {
        let request = self.regs.atomic_u32(reg::RESET_REQUEST).load(Ordering::Acquire).wrapping_add(1);
        self.regs.atomic_u32(reg::RESET_REQUEST).store(request, Ordering::Release);
        self.to_device.ring(1);
        self.wait_for_device(|blk| blk.regs.atomic_u32(reg::RESET_DONE).load(Ordering::Acquire) == request);
        self.sq_tail = self.regs.atomic_u32(reg::SQ_TAIL).load(Ordering::Acquire);
        self.cq_head = self.regs.atomic_u32(reg::CQ_HEAD).load(Ordering::Acquire);
        if self.sq_tail != 0 || self.cq_head != 0 {
            return Err(Error::Device("the controller did not clear its queues on reset"));
        }
        Ok(())
    }

    fn enable_device(&mut self) -> Result<(), Error> {
        self.regs.atomic_u32(reg::QUEUE_DEPTH).store(QUEUE_DEPTH, Ordering::Release);
        self.regs.atomic_u32(reg::CONTROL).store(storage::control::ENABLE, Ordering::Release);
        self.to_device.ring(1);
        let ready_or_fatal = storage::status::READY | storage::status::FATAL;
        self.wait_for_device(|blk| blk.regs.atomic_u32(reg::STATUS).load(Ordering::Acquire) & ready_or_fatal != 0);
        if self.regs.atomic_u32(reg::STATUS).load(Ordering::Acquire) & storage::status::FATAL != 0 {
            return Err(Error::Device("the controller refused its configuration"));
        }
        Ok(())
    }

    /// Starts serving the channel's current generation.
    fn attach_channel(&mut self) {
        let channel = &self.channel;
        self.req_cons = channel.atomic_u32(header::REQ_CONS).load(Ordering::Acquire);
        self.cmp_prod = channel.atomic_u32(header::CMP_PROD).load(Ordering::Acquire);
        let generation = channel.atomic_u32(header::GENERATION).load(Ordering::Acquire);
        channel.atomic_u32(header::DRIVER_GENERATION).store(generation, Ordering::Release);
        let every_kind = [
            inject::PANIC,
            inject::PAGE_FAULT,
            inject::ILLEGAL,
            inject::HANG,
            inject::LIE,
            inject::STOP,
            inject::CORRUPT_READS,
            inject::SKIP_FLUSHES,
            inject::SPIN,
            inject::FLOOD,
        ];
        channel.atomic_u32(header::DRIVER_INJECTABLE).store(channel::injectable(&every_kind), Ordering::Release);
        channel.atomic_u32(header::DRIVER_STATE).store(channel::driver_state::READY, Ordering::Release);
        println!("blk: controller ready, {} sectors, serving channel generation {generation}", self.capacity());
    }

    fn capacity(&self) -> u64 {
        self.regs.read::<u64>(reg::CAPACITY)
    }

    /// Moves new channel requests into the controller's submission queue.
    fn forward_requests(&mut self) -> bool {
        let produced = self.channel.atomic_u32(header::REQ_PROD).load(Ordering::Acquire);
        let mut submitted = false;
        while self.req_cons != produced {
            let at = channel::REQUEST_RING_OFFSET
                + (self.req_cons % channel::RING_SIZE) as usize * channel::REQUEST_ENTRY_SIZE;
            let request: RequestEntry = self.channel.read(at);
            self.req_cons = self.req_cons.wrapping_add(1);
            if self.injected_fault_due() {
                self.commit_injected_fault(&request);
            }
            if let Some(sector) = self.panic_sector {
                let sectors = request.sector..request.sector + u64::from(request.len).div_ceil(512);
                if request.op != channel::op::FLUSH && sectors.contains(&sector) {
                    panic!("blk: the bug on sector {sector}");
                }
            }
            if self.skip_flushes && request.op == channel::op::FLUSH {
                self.complete(request.id, channel::status::OK, 0);
                continue;
            }
            match self.command_for(&request) {
                Some(command) => {
                    self.in_flight[request.slot as usize] = Some(request.id);
                    self.ops[request.slot as usize] = request.op;
                    self.in_flight_count += 1;
                    let at = storage::SQ_OFFSET + (self.sq_tail % QUEUE_DEPTH) as usize * 32;
                    self.regs.write(at, command);
                    self.sq_tail = self.sq_tail.wrapping_add(1);
                    submitted = true;
                }
                None => self.complete(request.id, channel::status::IO_ERROR, 0),
            }
        }
        self.channel.atomic_u32(header::REQ_CONS).store(self.req_cons, Ordering::Release);
        if submitted {
            self.regs.atomic_u32(reg::SQ_TAIL).store(self.sq_tail, Ordering::Release);
            self.notify_device();
        }
        submitted
    }

    /// The controller command for a channel request, if it is well formed.
    fn command_for(&self, request: &RequestEntry) -> Option<Command> {
        let slot_ok = request.slot < channel::SLOT_COUNT
            && channel::slot_of(request.id) == request.slot
            && self.in_flight[request.slot as usize].is_none();
        let len_ok = request.len <= channel::SLOT_SIZE && request.len.is_multiple_of(storage::SECTOR_SIZE);
        let opcode = match request.op {
            channel::op::READ => storage::opcode::READ,
            channel::op::WRITE => storage::opcode::WRITE,
            channel::op::FLUSH => storage::opcode::FLUSH,
            _ => return None,
        };
        (slot_ok && len_ok).then_some(Command {
            opcode,
            cid: request.slot as u16,
            len: request.len,
            lba: request.sector,
            dma: self.channel.addr() + channel::slot_offset(request.slot) as u64,
            reserved: 0,
        })
    }

    /// Whether the reflector asked for a fault and this request is the one.
    fn injected_fault_due(&self) -> bool {
        if self.channel.atomic_u32(header::INJECT_KIND).load(Ordering::Acquire) == inject::NONE {
            return false;
        }
        let after = self.channel.atomic_u32(header::INJECT_AFTER);
        match after.load(Ordering::Acquire) {
            0 => true,
            n => {
                after.store(n - 1, Ordering::Release);
                false
            }
        }
    }

    /// Commits the fault the reflector asked for (tests and chaos only).
    fn commit_injected_fault(&mut self, request: &RequestEntry) {
        let kind = self.channel.atomic_u32(header::INJECT_KIND).swap(inject::NONE, Ordering::AcqRel);
        println!("blk: committing injected fault {kind}");
        match kind {
            inject::PANIC => panic!("injected fault: panic"),
            // SAFETY: deliberately unmapped (beyond the vmm's address limit):
            // the page fault ends the VM, which is the point.
            inject::PAGE_FAULT => unsafe {
                let _ = (0x7f00_dead_0000 as *const u64).read_volatile();
            },
            // SAFETY: ud2 raises #UD, which ends the VM.
            inject::ILLEGAL => unsafe { core::arch::asm!("ud2") },
            inject::HANG => loop {
                core::hint::spin_loop();
            },
            inject::LIE => {
                self.complete(request.id, channel::status::OK, request.len + storage::SECTOR_SIZE);
                self.publish_completions();
            }
            inject::STOP => driver_vm::kernel::exit(0),
            inject::CORRUPT_READS => self.corrupt_reads = true,
            inject::SKIP_FLUSHES => self.skip_flushes = true,
            inject::SPIN => self.spin = true,
            inject::FLOOD => self.flood = true,
            _ => {}
        }
    }

    /// Moves controller completions into the channel's completion ring.
    fn forward_completions(&mut self) -> bool {
        let tail = self.regs.atomic_u32(reg::CQ_TAIL).load(Ordering::Acquire);
        let mut completed = false;
        while self.cq_head != tail {
            let at = storage::CQ_OFFSET + (self.cq_head % QUEUE_DEPTH) as usize * 16;
            let done: Completion = self.regs.read(at);
            self.cq_head = self.cq_head.wrapping_add(1);
            let Some(id) = self.in_flight.get_mut(done.cid as usize).and_then(Option::take) else {
                continue;
            };
            self.in_flight_count -= 1;
            let status = match done.status {
                storage::completion::SUCCESS => channel::status::OK,
                storage::completion::INVALID => channel::status::UNSUPPORTED,
                _ => channel::status::IO_ERROR,
            };
            let slot = done.cid as usize;
            if self.corrupt_reads && status == channel::status::OK && self.ops[slot] == channel::op::READ {
                let at = channel::slot_offset(slot as u32);
                let byte: u8 = self.channel.read(at);
                self.channel.write(at, byte ^ 0x01);
            }
            self.complete(id, status, done.len);
            completed = true;
        }
        if completed {
            self.regs.atomic_u32(reg::CQ_HEAD).store(self.cq_head, Ordering::Release);
        }
        completed
    }

    /// Writes one completion for the reflector (published by
    /// `publish_completions`).
    fn complete(&mut self, id: u64, status: u32, len: u32) {
        let at = channel::COMPLETION_RING_OFFSET
            + (self.cmp_prod % channel::RING_SIZE) as usize * channel::COMPLETION_ENTRY_SIZE;
        self.channel.write(at, CompletionEntry { id, status, len });
        self.cmp_prod = self.cmp_prod.wrapping_add(1);
    }

    /// Makes written completions visible and rings the reflector once for
    /// all of them (a doorbell is a VM exit).
    fn publish_completions(&mut self) {
        let published = self.channel.atomic_u32(header::CMP_PROD);
        if published.load(Ordering::Relaxed) == self.cmp_prod {
            return;
        }
        published.store(self.cmp_prod, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.channel.atomic_u32(header::HOST_WAITING).load(Ordering::Acquire) != 0 {
            self.to_reflector.ring(1);
        }
    }

    /// Sleeps until the reflector or the controller has something, after
    /// announcing it (so they interrupt) and re-checking (so a publish that
    /// raced with the announcement is not missed).
    fn sleep(&mut self) {
        let channel_sleeping = self.channel.atomic_u32(header::DRIVER_SLEEPING);
        let interrupt_wanted = self.regs.atomic_u32(reg::INTERRUPT_WANTED);
        channel_sleeping.store(1, Ordering::SeqCst);
        interrupt_wanted.store(u32::from(self.in_flight_count > 0), Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let no_requests = self.channel.atomic_u32(header::REQ_PROD).load(Ordering::Acquire) == self.req_cons;
        let no_completions = self.regs.atomic_u32(reg::CQ_TAIL).load(Ordering::Acquire) == self.cq_head;
        if no_requests && no_completions {
            arch::wait_for_interrupt();
        }
        channel_sleeping.store(0, Ordering::SeqCst);
        interrupt_wanted.store(0, Ordering::SeqCst);
        arch::take_interrupts();
    }
}

driver_vm::driver_main!(Blk);
