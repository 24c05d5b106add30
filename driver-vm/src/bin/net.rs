//! `net`: the network driver. Serves the reflector's channel with the
//! simulated network card (see guest-abi `channel` and `nic`).
//!
//! Resources (as the reflector wires them, like the block driver's):
//! - window `regs`: the card's registers and rings;
//! - window `channel`: the reflector's rings and bounce slots (also the
//!   card's DMA region);
//! - doorbell 0 tells the reflector completions are ready, doorbell 1 is
//!   the card's doorbell;
//! - interrupt line 0: the reflector published requests; line 1: the card
//!   completed descriptors; line 2 (warm spares only): go.
//!
//! Channel requests are `NET_TX` (a frame in the slot to send) and `NET_RX`
//! (an empty slot to receive a frame into); the driver turns each into a
//! descriptor of the card's TX or RX ring, and each card completion into a
//! channel completion. It never touches frames: the card DMAs straight from
//! and into the slots. It polls while busy and sleeps when idle.
#![no_std]
#![no_main]

use core::sync::atomic::{fence, Ordering};

use driver_vm::kernel::abi::channel::{self, header, inject, CompletionEntry, RequestEntry};
use driver_vm::kernel::abi::nic::{self, reg, Completion, Descriptor};
use driver_vm::kernel::device::{Doorbell, InterruptLine, Window};
use driver_vm::kernel::{arch, time};
use driver_vm::{println, Driver, Error, Kernel};

/// How long to keep polling after the last piece of work before sleeping:
/// the block driver's measured window (see blk.rs), which keeps a busy
/// stream of frames free of interrupts and lets an idle link sleep.
const POLL_WINDOW_US: u64 = 300;
/// Entries of each card ring: one per bounce slot, so no ring can overflow
/// whatever mix of sends and receive buffers the reflector posts.
const RING_SIZE: u32 = channel::SLOT_COUNT;

const _: () = assert!(RING_SIZE <= nic::MAX_RING && RING_SIZE.is_power_of_two());

struct Net {
    regs: Window,
    channel: Window,
    to_reflector: Doorbell,
    to_device: Doorbell,
    device_interrupt: InterruptLine,
    /// Request id per descriptor id (= bounce slot), while the card has it.
    in_flight: [Option<u64>; RING_SIZE as usize],
    tx_tail: u32,
    txc_head: u32,
    rx_tail: u32,
    rxc_head: u32,
    req_cons: u32,
    cmp_prod: u32,
    link_up: bool,
}

impl Driver for Net {
    const NAME: &'static str = "net";

    fn probe(kernel: &Kernel) -> Result<Self, Error> {
        if kernel.cmdline().split_whitespace().any(|word| word == "spare") {
            let go = kernel.interrupt_line(2).ok_or(Error::MissingInterrupt(2))?;
            println!("net: warm spare ready");
            go.wait();
        }
        let mut net = Net {
            regs: kernel.window("regs").ok_or(Error::MissingWindow("regs"))?,
            channel: kernel.window("channel").ok_or(Error::MissingWindow("channel"))?,
            to_reflector: kernel.doorbell(0).ok_or(Error::MissingDoorbell(0))?,
            to_device: kernel.doorbell(1).ok_or(Error::MissingDoorbell(1))?,
            device_interrupt: kernel.interrupt_line(1).ok_or(Error::MissingInterrupt(1))?,
            in_flight: [None; RING_SIZE as usize],
            tx_tail: 0,
            txc_head: 0,
            rx_tail: 0,
            rxc_head: 0,
            req_cons: 0,
            cmp_prod: 0,
            link_up: false,
        };
        kernel.interrupt_line(0).ok_or(Error::MissingInterrupt(0))?;
        net.check_layouts()?;
        net.reset_device();
        net.enable_device()?;
        net.attach_channel();
        Ok(net)
    }

    fn run(mut self, _kernel: &Kernel) -> Result<u32, Error> {
        let mut idle_since = time::Instant::now();
        loop {
            let posted = self.forward_requests();
            let completed = self.forward_completions();
            self.publish_completions();
            let status = self.regs.atomic_u32(reg::STATUS).load(Ordering::Acquire);
            if status & nic::status::FATAL != 0 {
                return Err(Error::Device("the card stopped with a fatal error"));
            }
            self.watch_link(status);
            if posted || completed {
                idle_since = time::Instant::now();
            } else if idle_since.elapsed_us() >= POLL_WINDOW_US {
                self.sleep();
                idle_since = time::Instant::now();
            } else {
                core::hint::spin_loop();
            }
        }
    }
}

impl Net {
    fn check_layouts(&self) -> Result<(), Error> {
        if self.regs.size() < nic::WINDOW_SIZE as u64
            || self.regs.read::<u32>(reg::MAGIC) != nic::MAGIC
            || self.regs.read::<u32>(reg::VERSION) != nic::VERSION
        {
            return Err(Error::Device("window `regs` is not a network card of a known version"));
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

    /// Waits until `done` holds, polling, then sleeping on the card's
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

    /// Resets the card: a previous driver VM may have left it in any state.
    fn reset_device(&mut self) {
        let request = self.regs.atomic_u32(reg::RESET_REQUEST).load(Ordering::Acquire).wrapping_add(1);
        self.regs.atomic_u32(reg::RESET_REQUEST).store(request, Ordering::Release);
        self.to_device.ring(1);
        self.wait_for_device(|net| net.regs.atomic_u32(reg::RESET_DONE).load(Ordering::Acquire) == request);
        (self.tx_tail, self.txc_head, self.rx_tail, self.rxc_head) = (0, 0, 0, 0);
    }

    fn enable_device(&mut self) -> Result<(), Error> {
        self.regs.atomic_u32(reg::RING_SIZE).store(RING_SIZE, Ordering::Release);
        self.regs.atomic_u32(reg::CONTROL).store(nic::control::ENABLE, Ordering::Release);
        self.to_device.ring(1);
        let ready_or_fatal = nic::status::READY | nic::status::FATAL;
        self.wait_for_device(|net| net.regs.atomic_u32(reg::STATUS).load(Ordering::Acquire) & ready_or_fatal != 0);
        if self.regs.atomic_u32(reg::STATUS).load(Ordering::Acquire) & nic::status::FATAL != 0 {
            return Err(Error::Device("the card refused its configuration"));
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
        // No lies about data or flushes, no spinning or flooding: a card
        // has none of those to fake.
        let kinds = [inject::PANIC, inject::PAGE_FAULT, inject::ILLEGAL, inject::HANG, inject::LIE, inject::STOP];
        channel.atomic_u32(header::DRIVER_INJECTABLE).store(channel::injectable(&kinds), Ordering::Release);
        channel.atomic_u32(header::DRIVER_STATE).store(channel::driver_state::READY, Ordering::Release);
        let mac = nic::mac_from_register(self.regs.read::<u64>(reg::MAC));
        println!(
            "net: card ready, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, serving channel generation {generation}",
            mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
        );
    }

    /// Reports carrier changes (the reflector reads the card's link itself;
    /// this is for the console log).
    fn watch_link(&mut self, status: u32) {
        let up = status & nic::status::LINK_UP != 0;
        if up != self.link_up {
            self.link_up = up;
            println!("net: link {}", if up { "up" } else { "down" });
        }
    }

    /// Moves new channel requests into the card's TX and RX rings.
    fn forward_requests(&mut self) -> bool {
        let produced = self.channel.atomic_u32(header::REQ_PROD).load(Ordering::Acquire);
        let (tx_before, rx_before) = (self.tx_tail, self.rx_tail);
        let mut any = false;
        while self.req_cons != produced {
            let at = channel::REQUEST_RING_OFFSET
                + (self.req_cons % channel::RING_SIZE) as usize * channel::REQUEST_ENTRY_SIZE;
            let request: RequestEntry = self.channel.read(at);
            self.req_cons = self.req_cons.wrapping_add(1);
            any = true;
            if self.injected_fault_due() {
                self.commit_injected_fault(&request);
            }
            if !self.post(&request) {
                self.complete(request.id, channel::status::IO_ERROR, 0);
            }
        }
        self.channel.atomic_u32(header::REQ_CONS).store(self.req_cons, Ordering::Release);
        if self.tx_tail != tx_before || self.rx_tail != rx_before {
            self.regs.atomic_u32(reg::TX_TAIL).store(self.tx_tail, Ordering::Release);
            self.regs.atomic_u32(reg::RX_TAIL).store(self.rx_tail, Ordering::Release);
            fence(Ordering::SeqCst);
            self.to_device.ring(1);
        }
        any
    }

    /// Puts one request on the card's ring; false if it is malformed.
    fn post(&mut self, request: &RequestEntry) -> bool {
        let slot_ok = request.slot < channel::SLOT_COUNT
            && channel::slot_of(request.id) == request.slot
            && self.in_flight[request.slot as usize].is_none()
            && request.len <= channel::SLOT_SIZE;
        let (ring, tail) = match request.op {
            channel::op::NET_TX => (nic::TX_RING_OFFSET, &mut self.tx_tail),
            channel::op::NET_RX => (nic::RX_RING_OFFSET, &mut self.rx_tail),
            _ => return false,
        };
        if !slot_ok {
            return false;
        }
        let descriptor = Descriptor {
            addr: self.channel.addr() + channel::slot_offset(request.slot) as u64,
            len: request.len,
            id: request.slot as u16,
            reserved: 0,
        };
        self.regs.write(nic::ring_entry(ring, *tail, RING_SIZE, size_of::<Descriptor>()), descriptor);
        *tail = tail.wrapping_add(1);
        self.in_flight[request.slot as usize] = Some(request.id);
        true
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
        println!("net: committing injected fault {kind}");
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
            // A completion for a request that was never made.
            inject::LIE => {
                self.complete(request.id.wrapping_add(u64::from(channel::SLOT_COUNT)), channel::status::OK, 60);
                self.publish_completions();
            }
            inject::STOP => driver_vm::kernel::exit(0),
            _ => {}
        }
    }

    /// Moves card completions (TX, then RX) into the channel.
    fn forward_completions(&mut self) -> bool {
        let tx = self.drain_completions(nic::TX_COMPLETION_OFFSET, reg::TXC_TAIL, reg::TXC_HEAD, true);
        let rx = self.drain_completions(nic::RX_COMPLETION_OFFSET, reg::RXC_TAIL, reg::RXC_HEAD, false);
        tx || rx
    }

    fn drain_completions(&mut self, ring: usize, tail_reg: usize, head_reg: usize, tx: bool) -> bool {
        let tail = self.regs.atomic_u32(tail_reg).load(Ordering::Acquire);
        let mut head = if tx { self.txc_head } else { self.rxc_head };
        let start = head;
        while head != tail {
            let done: Completion = self.regs.read(nic::ring_entry(ring, head, RING_SIZE, size_of::<Completion>()));
            head = head.wrapping_add(1);
            let Some(id) = self.in_flight.get_mut(usize::from(done.id)).and_then(Option::take) else {
                continue;
            };
            let (status, len) = match done.status {
                nic::completion::SUCCESS => (channel::status::OK, done.len),
                _ => (channel::status::IO_ERROR, 0),
            };
            self.complete(id, status, len);
        }
        if tx {
            self.txc_head = head;
        } else {
            self.rxc_head = head;
        }
        if head != start {
            // No doorbell needed: with one ring entry per slot, the card's
            // completion rings cannot fill up.
            self.regs.atomic_u32(head_reg).store(head, Ordering::Release);
        }
        head != start
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
    /// all of them: a doorbell is a VM exit, the most expensive thing a
    /// driver does, so a burst of frames costs one.
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

    /// Sleeps until the reflector or the card has something, after
    /// announcing it (so they interrupt) and re-checking (so a publish that
    /// raced with the announcement is not missed).
    fn sleep(&mut self) {
        let channel_sleeping = self.channel.atomic_u32(header::DRIVER_SLEEPING);
        let interrupt_wanted = self.regs.atomic_u32(reg::INTERRUPT_WANTED);
        channel_sleeping.store(1, Ordering::SeqCst);
        interrupt_wanted.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let no_requests = self.channel.atomic_u32(header::REQ_PROD).load(Ordering::Acquire) == self.req_cons;
        let no_completions = self.regs.atomic_u32(reg::TXC_TAIL).load(Ordering::Acquire) == self.txc_head
            && self.regs.atomic_u32(reg::RXC_TAIL).load(Ordering::Acquire) == self.rxc_head;
        if no_requests && no_completions {
            arch::wait_for_interrupt();
        }
        channel_sleeping.store(0, Ordering::SeqCst);
        interrupt_wanted.store(0, Ordering::SeqCst);
        arch::take_interrupts();
    }
}

driver_vm::driver_main!(Net);
