//! `net`: the network driver of the simulated card (guest-abi `nic`):
//! window `regs` (registers and rings), doorbell 1, interrupt line 1; the
//! channel is `driver_vm::channel`'s. Requests are `NET_TX` (a frame in the
//! slot to send) and `NET_RX` (an empty slot to receive into); each becomes
//! a descriptor of the card's TX or RX ring, each card completion a channel
//! completion. The card DMAs straight from and into the slots.
#![no_std]
#![cfg_attr(not(test), no_main)]

use core::sync::atomic::{fence, Ordering};

use driver_vm::channel::{Channel, ChannelDriver, Device};
use driver_vm::kernel::abi::channel::{op, status, RequestEntry, SLOT_COUNT, SLOT_SIZE};
use driver_vm::kernel::abi::nic::{self, reg, Completion, Descriptor};
use driver_vm::kernel::device::Doorbell;
use driver_vm::registers::Registers;
use driver_vm::{println, Error, Kernel};

/// Entries of each card ring: one per bounce slot, so no ring can overflow
/// whatever mix of sends and receive buffers the reflector posts.
const RING_SIZE: u32 = SLOT_COUNT;
const _: () = assert!(RING_SIZE <= nic::MAX_RING && RING_SIZE.is_power_of_two());

struct Net {
    regs: Registers,
    doorbell: Doorbell,
    /// Request id per descriptor id (= bounce slot), while the card has it.
    in_flight: [Option<u64>; RING_SIZE as usize],
    tx_tail: u32,
    /// TX tail as the card was last told (rung for, or seen polling).
    tx_told: u32,
    txc_head: u32,
    rx_tail: u32,
    rxc_head: u32,
    link_up: bool,
}

impl ChannelDriver for Net {
    const NAME: &'static str = "net";

    fn probe(kernel: &Kernel, _channel: &Channel) -> Result<Self, Error> {
        let net = Net {
            regs: Registers::new(kernel, "regs", 1, reg::INTERRUPT_WANTED)?,
            doorbell: kernel.doorbell(1).ok_or(Error::MissingDoorbell(1))?,
            in_flight: [None; RING_SIZE as usize],
            tx_tail: 0,
            tx_told: 0,
            txc_head: 0,
            rx_tail: 0,
            rxc_head: 0,
            link_up: false,
        };
        if net.regs.window().size() < nic::WINDOW_SIZE as u64
            || net.regs.get(reg::MAGIC) != nic::MAGIC
            || net.regs.get(reg::VERSION) != nic::VERSION
        {
            return Err(Error::Device("window `regs` is not a network card of a known version"));
        }
        // A previous driver VM may have left the card in any state; a reset
        // empties its rings.
        let reset = net.regs.get(reg::RESET_REQUEST).wrapping_add(1);
        net.regs.set(reg::RESET_REQUEST, reset);
        net.ring_unless_polling();
        net.regs.wait_for(|regs| regs.get(reg::RESET_DONE) == reset);
        net.regs.set(reg::RING_SIZE, RING_SIZE);
        net.regs.set(reg::CONTROL, nic::control::ENABLE);
        net.ring_unless_polling();
        net.regs.wait_for(|regs| regs.get(reg::STATUS) & (nic::status::READY | nic::status::FATAL) != 0);
        if net.regs.get(reg::STATUS) & nic::status::FATAL != 0 {
            return Err(Error::Device("the card refused its configuration"));
        }
        Ok(net)
    }

    fn serving(&self) {
        let m = nic::mac_from_register(self.regs.read::<u64>(reg::MAC));
        println!("net: card ready, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
    }
}

impl Net {
    /// Tells the card about what was just written, with its doorbell only
    /// if it is asleep.
    fn ring_unless_polling(&self) {
        self.regs.ring_unless_awake(&self.doorbell, reg::DEVICE_POLLING);
    }

    /// Moves one completion ring's entries into the channel; whether any.
    fn drain(&mut self, channel: &mut Channel, ring: usize, tail_reg: usize, head_reg: usize, tx: bool) -> bool {
        let tail = self.regs.get(tail_reg);
        let start = if tx { self.txc_head } else { self.rxc_head };
        let mut head = start;
        while head != tail {
            let done: Completion = self.regs.read(nic::ring_entry(ring, head, RING_SIZE, size_of::<Completion>()));
            head = head.wrapping_add(1);
            let Some(id) = self.in_flight.get_mut(usize::from(done.id)).and_then(Option::take) else { continue };
            match done.status {
                nic::completion::SUCCESS => channel.complete(id, status::OK, done.len),
                _ => channel.complete(id, status::IO_ERROR, 0),
            }
        }
        *(if tx { &mut self.txc_head } else { &mut self.rxc_head }) = head;
        // No doorbell: with one ring entry per slot, no completion ring fills.
        self.regs.set(head_reg, head);
        head != start
    }
}

impl Device for Net {
    fn submit(&mut self, channel: &mut Channel, request: RequestEntry) {
        let (ring, tail) = match request.op {
            op::NET_TX => (nic::TX_RING_OFFSET, &mut self.tx_tail),
            op::NET_RX => (nic::RX_RING_OFFSET, &mut self.rx_tail),
            _ => return channel.complete(request.id, status::IO_ERROR, 0),
        };
        let free = Channel::slot_ok(&request) && self.in_flight[request.slot as usize].is_none();
        if !free || request.len > SLOT_SIZE {
            return channel.complete(request.id, status::IO_ERROR, 0);
        }
        let descriptor = Descriptor {
            addr: channel.slot_addr(request.slot),
            len: request.len,
            id: request.slot as u16,
            reserved: 0,
        };
        self.regs.write(nic::ring_entry(ring, *tail, RING_SIZE, size_of::<Descriptor>()), descriptor);
        *tail = tail.wrapping_add(1);
        self.in_flight[request.slot as usize] = Some(request.id);
    }

    /// Tells the card of new descriptors, with its doorbell (an exit) only
    /// when it needs one: not while it is awake, and for receive buffers alone
    /// only when frames wait for them (the next frame finds them anyway).
    fn kick(&mut self) {
        self.regs.set(reg::TX_TAIL, self.tx_tail);
        self.regs.set(reg::RX_TAIL, self.rx_tail);
        let sending = self.tx_tail != self.tx_told;
        self.tx_told = self.tx_tail;
        fence(Ordering::SeqCst);
        if sending || self.regs.get(reg::RX_WAITING) != 0 {
            self.ring_unless_polling();
        }
    }

    fn reap(&mut self, channel: &mut Channel) -> Result<bool, Error> {
        let card = self.regs.get(reg::STATUS);
        if card & nic::status::FATAL != 0 {
            return Err(Error::Device("the card stopped with a fatal error"));
        }
        // The reflector reads the link itself; this is for the console.
        if (card & nic::status::LINK_UP != 0) != self.link_up {
            self.link_up = !self.link_up;
            println!("net: link {}", if self.link_up { "up" } else { "down" });
        }
        let tx = self.drain(channel, nic::TX_COMPLETION_OFFSET, reg::TXC_TAIL, reg::TXC_HEAD, true);
        let rx = self.drain(channel, nic::RX_COMPLETION_OFFSET, reg::RXC_TAIL, reg::RXC_HEAD, false);
        Ok(tx || rx)
    }

    fn arm(&mut self, armed: bool) -> bool {
        self.regs.want_interrupt(armed);
        self.regs.get(reg::TXC_TAIL) == self.txc_head && self.regs.get(reg::RXC_TAIL) == self.rxc_head
    }
}

driver_vm::channel_driver_main!(Net);

/// The net driver against two of the project's simulated cards on one
/// switch (`hardware::sim_nic`, `hardware::switch`: their real engines), on
/// the host: no KVM, no reflector.
#[cfg(test)]
mod tests {
    extern crate std;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::vec::Vec;

    use driver_vm::kernel::abi::channel::{self, op, status, SLOT_SIZE};
    use driver_vm::testing::{Bench, Completion, Memory, Running, CHANNEL_GPA};
    use hardware::shared_eventfd::SharedEventFd;
    use hardware::shm::SharedMemory;
    use hardware::sim_nic::SimNic;
    use hardware::switch::Switch;
    use hardware::{DmaRegion, Hardware};

    use super::Net;

    /// A card on `switch` and a bench wired to it as the reflector wires a
    /// driver VM.
    struct Card {
        bench: Bench,
        _card: SimNic,
        _line: SharedEventFd,
        _channel: Arc<SharedMemory>,
    }

    fn card(name: &str, mac: [u8; 6], switch: &Arc<Switch>) -> Card {
        let channel = Arc::new(SharedMemory::new(name, channel::REGION_SIZE).unwrap());
        let dma = DmaRegion {
            memory: channel.clone(),
            offset: channel::BOUNCE_OFFSET,
            len: channel::SLOT_COUNT as usize * channel::SLOT_SIZE as usize,
            gpa: CHANNEL_GPA + channel::BOUNCE_OFFSET as u64,
        };
        let nic = SimNic::start(name, mac, dma, switch.clone()).unwrap();
        let line = SharedEventFd::new().unwrap();
        nic.interrupt().route(line.try_clone().unwrap());
        let regs = nic.windows()[0].memory.clone();
        let bench = Bench::on_channel(Memory::map(channel.as_raw_fd(), channel::REGION_SIZE))
            .with_device_window("regs", Memory::map(regs.as_raw_fd(), regs.size()))
            .with_device_eventfds(nic.doorbell().as_raw_fd(), line.as_raw_fd());
        Card { bench, _card: nic, _line: line, _channel: channel }
    }

    /// Serves both drivers until `receiver` has completed `id`; its
    /// completions.
    fn until(
        sender: (&mut Running<Net>, &mut Bench),
        receiver: (&mut Running<Net>, &mut Bench),
        id: u64,
    ) -> (Vec<Completion>, Vec<Completion>) {
        let (mut sent, mut received) = (Vec::new(), Vec::new());
        let start = std::time::Instant::now();
        while !received.iter().any(|c: &Completion| c.id == id) {
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "no frame arrived: {sent:?} {received:?}");
            sender.0.drain().unwrap();
            receiver.0.drain().unwrap();
            sent.extend(sender.1.completions());
            received.extend(receiver.1.completions());
            std::thread::yield_now();
        }
        (sent, received)
    }

    const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

    fn frame(to: [u8; 6], from: [u8; 6], payload: &[u8]) -> Vec<u8> {
        [&to[..], &from[..], &[0x88, 0xb5][..], payload].concat()
    }

    #[test]
    fn a_frame_sent_through_one_card_lands_in_the_others_posted_buffer() {
        let switch = Switch::new("net-test");
        let (mut a, mut b) = (card("net-test-a", A, &switch), card("net-test-b", B, &switch));
        let mut sender = a.bench.start::<Net>().unwrap();
        let mut receiver = b.bench.start::<Net>().unwrap();
        let buffer = b.bench.publish(op::NET_RX, 0, SLOT_SIZE, None);
        receiver.drain().unwrap();
        let data = frame(B, A, &[0x5a; 200]);
        let send = a.bench.publish(op::NET_TX, 0, data.len() as u32, Some(&data));
        let (sent, received) = until((&mut sender, &mut a.bench), (&mut receiver, &mut b.bench), buffer);
        let got = received.iter().find(|c| c.id == buffer).unwrap();
        assert_eq!((got.status, got.len), (status::OK, data.len() as u32));
        assert_eq!(b.bench.slot(buffer, data.len()), &data[..]);
        assert!(sent.iter().any(|c| c.id == send && c.status == status::OK), "{sent:?}");
    }

    #[test]
    fn requests_the_card_cannot_take_fail_at_once() {
        let switch = Switch::new("net-test-bad");
        let mut a = card("net-test-bad-a", A, &switch);
        let mut net = a.bench.start::<Net>().unwrap();
        let flush = a.bench.flush();
        let huge = a.bench.publish(op::NET_TX, 0, SLOT_SIZE + 1, None);
        net.drain().unwrap();
        let done = a.bench.completions();
        for id in [flush, huge] {
            assert!(done.iter().any(|c| c.id == id && c.status == status::IO_ERROR), "{id}: {done:?}");
        }
    }
}
