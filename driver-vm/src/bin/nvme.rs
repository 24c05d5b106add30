//! `nvme`: a block driver for NVMe controllers (the `nvme` crate's core):
//! QEMU's model, or a real controller through VFIO. BAR0 is window `regs`:
//! on QEMU's model a trapped window (every register access exits to the
//! vmm and reaches the controller through the reflector, but for the I/O
//! submission doorbell: a posted register, a KVM ioeventfd whose value the
//! reflector reads from the driver's shadow doorbell), on VFIO the BAR
//! mapped directly; either way the driver rings one doorbell per burst.
//! While it polls, it hands completions back through the shadow doorbell
//! alone (on a controller that reads it) and writes the completion
//! doorbell only before it sleeps. The controller
//! reaches only the channel's bounce slots and device area, at the address
//! the channel header gives (`DMA_ADDRESS`): the driver's queues and PRP
//! lists live in the device area, data in the request's bounce slot.
//! Interrupt line 1 is the controller's (INTx or MSI-X, through the reflector).
//!
//! Besides the generic faults it can be asked (tests) to point its data DMA
//! outside the region it was given (`wild-dma`), or to set its controller
//! up again with its queues outside that region (`wild-queues`).
#![no_std]
#![cfg_attr(not(test), no_main)]

use core::cell::Cell;
use driver_vm::channel::{Channel, ChannelDriver, Device};

use driver_vm::kernel::abi::channel::{self, header, inject, op, status, RequestEntry, SLOT_COUNT};
use driver_vm::kernel::device::Window;
use driver_vm::kernel::time::Instant;
use driver_vm::{println, Error, Kernel};
use nvme::{Controller, IoCommand, Layout};

/// BAR0 in a window (trapped or mapped).
struct Bar(Window);

impl nvme::Registers for Bar {
    fn read32(&self, offset: usize) -> u32 {
        self.0.read(offset)
    }

    fn write32(&self, offset: usize, value: u32) {
        self.0.write(offset, value)
    }
}

/// The channel's DMA range: offsets from its bounce slots.
struct Dma {
    channel: Window,
    /// The controller's address of the bounce slots.
    base: u64,
    /// Data addresses point outside the range (an injected lie, tests).
    wild: Cell<bool>,
    /// Queue addresses point outside the range (an injected lie, tests).
    wild_queues: bool,
}

impl nvme::DmaMemory for Dma {
    fn device_address(&self, offset: usize) -> u64 {
        let data = offset < channel::DEVICE_AREA_OFFSET - channel::BOUNCE_OFFSET;
        let wild = if (data && self.wild.get()) || (!data && self.wild_queues) {
            channel::DMA_SIZE as u64 + (1 << 20)
        } else {
            0
        };
        self.base + offset as u64 + wild
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        let at = channel::BOUNCE_OFFSET + offset;
        self.channel.as_mut_slice()[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn read(&self, offset: usize, bytes: &mut [u8]) {
        let at = channel::BOUNCE_OFFSET + offset;
        bytes.copy_from_slice(&self.channel.as_slice()[at..at + bytes.len()]);
    }
}

struct Clock(Instant);

impl nvme::Clock for Clock {
    fn now_us(&self) -> u64 {
        self.0.elapsed_us()
    }
}

struct Nvme {
    controller: Controller<Bar, Dma, Clock>,
    /// BAR0, to set the controller up again (`wild-queues`).
    regs: Window,
    /// The `wild-queues` lie was acted on.
    queues_moved: bool,
    /// Request id and length per command id (= bounce slot).
    in_flight: [Option<(u64, u32)>; SLOT_COUNT as usize],
}

impl ChannelDriver for Nvme {
    const NAME: &'static str = "nvme";
    const FAULTS: &'static [u32] = &[inject::WILD_DMA, inject::WILD_QUEUES, inject::SKIP_WRITES];

    fn probe(kernel: &Kernel, channel: &Channel) -> Result<Self, Error> {
        let regs = kernel.window("regs").ok_or(Error::MissingWindow("regs"))?;
        let bar = Bar(regs);
        kernel.interrupt_line(1).ok_or(Error::MissingInterrupt(1))?;
        let base = channel.window().read::<u64>(header::DMA_ADDRESS);
        let dma = Dma { channel: *channel.window(), base, wild: Cell::new(false), wild_queues: false };
        let area = channel::DEVICE_AREA_OFFSET - channel::BOUNCE_OFFSET;
        const _: () = assert!(Layout::AREA <= channel::DEVICE_AREA_SIZE);
        // The I/O queue's doorbell values (its shadow doorbells) are where
        // the reflector reads a posted doorbell's value from.
        const _: () = assert!(
            Layout::at(channel::DEVICE_AREA_OFFSET - channel::BOUNCE_OFFSET).doorbells() + channel::BOUNCE_OFFSET
                == channel::POSTED_MIRROR_OFFSET
        );
        let controller = Controller::start(bar, dma, Clock(Instant::now()), Layout::at(area)).map_err(|error| {
            println!("nvme: the controller did not come up: {error:?}");
            Error::Device("the NVMe controller did not come up")
        })?;
        // Interrupts stay unmasked: the controller raises its line when it
        // posts a completion the driver has not released, so no register is
        // written per sleep (each would be a trapped exit).
        controller.interrupts(true);
        Ok(Nvme { controller, regs, queues_moved: false, in_flight: [None; SLOT_COUNT as usize] })
    }

    fn serving(&self) {
        let namespace = self.controller.namespace();
        println!(
            "nvme: controller ready, namespace 1: {} blocks of {} bytes",
            namespace.blocks,
            1u32 << namespace.block_shift
        );
    }
}

impl Nvme {
    /// The `wild-queues` lie: the controller is reset and set up with its
    /// queues outside the region, and the driver goes on submitting to the
    /// queues it had, which the controller no longer reads.
    fn move_queues_outside(&mut self) {
        self.queues_moved = true;
        let memory = self.controller.memory();
        let dma = Dma { channel: memory.channel, base: memory.base, wild: Cell::new(false), wild_queues: true };
        let area = channel::DEVICE_AREA_OFFSET - channel::BOUNCE_OFFSET;
        match Controller::start(Bar(self.regs), dma, Clock(Instant::now()), Layout::at(area)) {
            Ok(_) => println!("nvme: (injected) the controller took queues outside its region"),
            Err(error) => println!("nvme: (injected) queues moved outside the region: {error:?}"),
        }
    }
}

impl Device for Nvme {
    fn submit(&mut self, channel: &mut Channel, request: RequestEntry) {
        if !Channel::slot_ok(&request) || self.in_flight[request.slot as usize].is_some() {
            return channel.complete(request.id, status::IO_ERROR, 0);
        }
        self.controller.memory().wild.set(channel.lies.wild_dma);
        if channel.lies.wild_queues && !self.queues_moved {
            self.move_queues_outside();
        }
        let buffer = channel::slot_offset(request.slot) - channel::BOUNCE_OFFSET;
        let offset = request.sector.saturating_mul(512);
        let command = match request.op {
            op::READ => IoCommand::Read { offset, len: request.len, buffer },
            op::WRITE => IoCommand::Write { offset, len: request.len, buffer },
            op::FLUSH => IoCommand::Flush,
            _ => return channel.complete(request.id, status::UNSUPPORTED, 0),
        };
        match self.controller.submit(request.slot as u16, command) {
            Ok(()) => self.in_flight[request.slot as usize] = Some((request.id, request.len)),
            Err(_) => channel.complete(request.id, status::IO_ERROR, 0),
        }
    }

    fn kick(&mut self) {
        self.controller.ring();
    }

    fn reap(&mut self, channel: &mut Channel) -> Result<bool, Error> {
        let in_flight = &mut self.in_flight;
        let reaped = self.controller.take_completions(|cid, code| {
            let Some((id, len)) = in_flight.get_mut(usize::from(cid)).and_then(Option::take) else { return };
            match code {
                0 => channel.complete(id, status::OK, len),
                _ => {
                    // The controller's own word, for the operator: SCT<<8|SC.
                    println!("nvme: request {id} (command {cid}) failed with status {code:#x}");
                    channel.complete(id, status::IO_ERROR, 0)
                }
            }
        });
        Ok(reaped > 0)
    }

    fn released(&mut self) {
        // The shadow head alone while the driver polls: the controller's
        // interrupt line stays up, which no one listens to until the
        // driver sleeps.
        self.controller.publish_head();
    }

    fn arm(&mut self, armed: bool) -> bool {
        if armed {
            // The head register (an exit) only before sleeping: it lowers
            // the line if the queue is empty, so the next completion
            // raises it again; one already posted keeps it up, and the
            // reflector delivers it again after this write.
            self.controller.release();
        }
        // Read from memory: a completion posted after the last reap keeps
        // the driver awake; one posted later raises the interrupt.
        !self.controller.completion_posted()
    }
}

driver_vm::channel_driver_main!(Nvme);
