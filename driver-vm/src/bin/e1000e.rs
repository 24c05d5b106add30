//! `e1000e`: a network driver for the Intel 82574L (e1000e), here QEMU's
//! model, written to Intel's datasheet: reset, legacy receive and transmit
//! descriptor rings, tail doorbells, interrupt cause and mask, link state.
//! BAR0 is window `regs`, a trapped window (each access exits to the vmm
//! and reaches the card through the reflector), so the driver writes each
//! tail once per burst and never touches a register while idle. The card
//! DMAs only into the channel's bounce slots and device area (its rings),
//! at the address the channel header gives. Requests are `NET_TX` (a frame
//! in the slot) and `NET_RX` (an empty slot to receive into). Interrupt
//! line 1 is the card's (INTx through the reflector).
#![no_std]
#![cfg_attr(not(test), no_main)]

use core::sync::atomic::{fence, Ordering};

use driver_vm::channel::{Channel, ChannelDriver, Device};
use driver_vm::kernel::abi::channel::{self, header, op, status, RequestEntry};
use driver_vm::kernel::device::Window;
use driver_vm::kernel::time::Instant;
use driver_vm::{println, Error, Kernel};

/// Registers (82574L datasheet, section 10).
mod reg {
    pub const CTRL: usize = 0x0000;
    pub const STATUS: usize = 0x0008;
    pub const ICR: usize = 0x00c0;
    pub const ITR: usize = 0x00c4;
    pub const IMS: usize = 0x00d0;
    pub const IMC: usize = 0x00d8;
    pub const RCTL: usize = 0x0100;
    pub const TCTL: usize = 0x0400;
    pub const TIPG: usize = 0x0410;
    pub const RDBAL: usize = 0x2800;
    pub const RDBAH: usize = 0x2804;
    pub const RDLEN: usize = 0x2808;
    pub const RDH: usize = 0x2810;
    pub const RDT: usize = 0x2818;
    pub const RDTR: usize = 0x2820;
    pub const RADV: usize = 0x282c;
    pub const TDBAL: usize = 0x3800;
    pub const TDBAH: usize = 0x3804;
    pub const TDLEN: usize = 0x3808;
    pub const TDH: usize = 0x3810;
    pub const TDT: usize = 0x3818;
    pub const RAL0: usize = 0x5400;
    pub const RAH0: usize = 0x5404;
}

const CTRL_RST: u32 = 1 << 26;
const CTRL_SLU: u32 = 1 << 6;
const CTRL_ASDE: u32 = 1 << 5;
const STATUS_LU: u32 = 1 << 1;
/// Receiver enable, broadcasts accepted, CRC stripped, 4096-byte buffers
/// (BSIZE = 11 with BSEX).
const RCTL: u32 = (1 << 1) | (1 << 15) | (1 << 26) | (0b11 << 16) | (1 << 25);
/// Transmitter enable, short packets padded, collision threshold and
/// distance as the datasheet recommends.
const TCTL: u32 = (1 << 1) | (1 << 3) | (0x0f << 4) | (0x3f << 12);
/// Transmit descriptor written back (TXDW), link status change (LSC),
/// receive timer (RXT0).
const INTERRUPTS: u32 = (1 << 0) | (1 << 2) | (1 << 7);
/// Transmit command: end of packet, insert FCS, report status.
const TX_CMD: u8 = 0x01 | 0x02 | 0x08;
/// Descriptor done; end of packet.
const DD: u8 = 0x01;
const EOP: u8 = 0x02;
/// Receive descriptor errors that make a frame bad: CRC, symbol, sequence,
/// carrier extension and receive data errors. Not the checksum errors
/// (TCPE 0x20, IPE 0x40): QEMU's model checks checksums on by default
/// (`RXCSUM` after reset), and a frame whose checksum is wrong is still the
/// frame that came; the client's guest checks checksums itself (the device
/// offers no checksum offload). Failing those let any tenant sending bad
/// checksums to a broadcast address use up the receive buffers of every
/// e1000e card (a review found it).
const FRAME_ERRORS: u8 = 0x01 | 0x02 | 0x04 | 0x10 | 0x80;

/// Whether a receive descriptor's status and errors bytes hold a good
/// frame, whole.
fn received_whole(status: u8, errors: u8) -> bool {
    status & EOP != 0 && errors & FRAME_ERRORS == 0
}
/// Largest frame a transmit descriptor carries here.
const MAX_TX: u32 = 16 * 1024;

/// Descriptors per ring: more than the channel's slots, so neither ring
/// fills whatever mix of sends and receive buffers the reflector posts.
const RING: u32 = 512;
const DESCRIPTOR: usize = 16;
const TX_RING: usize = channel::DEVICE_AREA_OFFSET;
const RX_RING: usize = TX_RING + RING as usize * DESCRIPTOR;
const _: () = assert!(RX_RING + RING as usize * DESCRIPTOR <= channel::POSTED_MIRROR_OFFSET);
const _: () = assert!(RING > channel::SLOT_COUNT);

/// One descriptor ring: which request each descriptor carries.
struct Ring {
    offset: usize,
    /// Next descriptor to fill.
    tail: u32,
    /// Next descriptor the card will complete.
    head: u32,
    /// The tail the card was last told.
    told: u32,
    requests: [Option<(u64, u32)>; RING as usize],
}

impl Ring {
    const fn new(offset: usize) -> Self {
        Ring { offset, tail: 0, head: 0, told: 0, requests: [None; RING as usize] }
    }

    fn full(&self) -> bool {
        (self.tail + 1) % RING == self.head
    }

    fn at(&self, index: u32) -> usize {
        self.offset + index as usize * DESCRIPTOR
    }
}

struct E1000e {
    regs: Window,
    channel: Window,
    /// The card's address of the bounce slots.
    dma: u64,
    tx: Ring,
    rx: Ring,
    link_up: bool,
}

impl E1000e {
    /// The card's address of channel offset `offset`.
    fn device_address(&self, offset: usize) -> u64 {
        self.dma + (offset - channel::BOUNCE_OFFSET) as u64
    }

    fn get(&self, register: usize) -> u32 {
        self.regs.read(register)
    }

    fn set(&self, register: usize, value: u32) {
        self.regs.write(register, value)
    }

    fn status_of(&self, ring: &Ring, index: u32) -> u8 {
        self.channel.read::<u8>(ring.at(index) + 12)
    }

    /// Completes the descriptors the card is done with; whether any.
    fn drain(&mut self, channel: &mut Channel, tx: bool) -> bool {
        let mut any = false;
        loop {
            let ring = if tx { &self.tx } else { &self.rx };
            if ring.head == ring.tail {
                break;
            }
            let (at, head) = (ring.at(ring.head), ring.head);
            let done = self.status_of(ring, head);
            if done & DD == 0 {
                break;
            }
            fence(Ordering::Acquire);
            let length = u32::from(self.channel.read::<u16>(at + 8));
            let errors = self.channel.read::<u8>(at + 13);
            let ring = if tx { &mut self.tx } else { &mut self.rx };
            let request = ring.requests[head as usize].take();
            ring.head = (head + 1) % RING;
            any = true;
            let Some((id, len)) = request else { continue };
            match (tx, received_whole(done, errors)) {
                (true, _) => channel.complete(id, status::OK, len),
                (false, true) => channel.complete(id, status::OK, length),
                (false, false) => channel.complete(id, status::IO_ERROR, 0),
            }
        }
        any
    }
}

impl ChannelDriver for E1000e {
    const NAME: &'static str = "e1000e";

    fn probe(kernel: &Kernel, channel: &Channel) -> Result<Self, Error> {
        let regs = kernel.window("regs").ok_or(Error::MissingWindow("regs"))?;
        kernel.interrupt_line(1).ok_or(Error::MissingInterrupt(1))?;
        let card = E1000e {
            regs,
            channel: *channel.window(),
            dma: channel.window().read::<u64>(header::DMA_ADDRESS),
            tx: Ring::new(TX_RING),
            rx: Ring::new(RX_RING),
            link_up: false,
        };
        // A previous driver VM may have left the card in any state.
        card.set(reg::IMC, u32::MAX);
        card.set(reg::CTRL, card.get(reg::CTRL) | CTRL_RST);
        let start = Instant::now();
        while card.get(reg::CTRL) & CTRL_RST != 0 {
            if start.elapsed_us() > 100_000 {
                return Err(Error::Device("the card did not finish its reset"));
            }
        }
        card.set(reg::IMC, u32::MAX);
        card.get(reg::ICR);
        card.set(reg::CTRL, card.get(reg::CTRL) | CTRL_SLU | CTRL_ASDE);
        // The rings are cleared before the card is told where they are.
        card.channel.as_mut_slice()[TX_RING..RX_RING + RING as usize * DESCRIPTOR].fill(0);
        for (base, low, high, len, head, tail) in [
            (TX_RING, reg::TDBAL, reg::TDBAH, reg::TDLEN, reg::TDH, reg::TDT),
            (RX_RING, reg::RDBAL, reg::RDBAH, reg::RDLEN, reg::RDH, reg::RDT),
        ] {
            let address = card.device_address(base);
            card.set(low, address as u32);
            card.set(high, (address >> 32) as u32);
            card.set(len, RING * DESCRIPTOR as u32);
            card.set(head, 0);
            card.set(tail, 0);
        }
        // No interrupt moderation: the driver batches by itself.
        for register in [reg::ITR, reg::RDTR, reg::RADV] {
            card.set(register, 0);
        }
        card.set(reg::TIPG, 0x0060_2008);
        card.set(reg::TCTL, TCTL);
        card.set(reg::RCTL, RCTL);
        card.set(reg::IMS, INTERRUPTS);
        Ok(card)
    }

    /// After the first turn: the three register reads are trapped exits
    /// and the line is one more, none of them on a failover's path.
    fn serving(&self) {
        let (low, high) = (self.get(reg::RAL0).to_le_bytes(), self.get(reg::RAH0).to_le_bytes());
        let link = if self.get(reg::STATUS) & STATUS_LU != 0 { "up" } else { "down" };
        println!(
            "e1000e: card ready, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, link {link}",
            low[0], low[1], low[2], low[3], high[0], high[1]
        );
    }
}

impl Device for E1000e {
    fn submit(&mut self, channel: &mut Channel, request: RequestEntry) {
        let tx = match request.op {
            op::NET_TX => true,
            op::NET_RX => false,
            _ => return channel.complete(request.id, status::IO_ERROR, 0),
        };
        let ring = if tx { &self.tx } else { &self.rx };
        if !Channel::slot_ok(&request) || ring.full() || (tx && request.len > MAX_TX) {
            return channel.complete(request.id, status::IO_ERROR, 0);
        }
        let at = ring.at(ring.tail);
        let address = self.device_address(channel::slot_offset(request.slot));
        let mut descriptor = [0u8; DESCRIPTOR];
        descriptor[0..8].copy_from_slice(&address.to_le_bytes());
        if tx {
            descriptor[8..10].copy_from_slice(&(request.len as u16).to_le_bytes());
            descriptor[11] = TX_CMD;
        }
        self.channel.as_mut_slice()[at..at + DESCRIPTOR].copy_from_slice(&descriptor);
        let ring = if tx { &mut self.tx } else { &mut self.rx };
        ring.requests[ring.tail as usize] = Some((request.id, request.len));
        ring.tail = (ring.tail + 1) % RING;
    }

    fn kick(&mut self) {
        // The descriptors are in memory before the card is told.
        fence(Ordering::SeqCst);
        for (tx, register) in [(true, reg::TDT), (false, reg::RDT)] {
            let ring = if tx { &mut self.tx } else { &mut self.rx };
            if ring.tail != ring.told {
                ring.told = ring.tail;
                let tail = ring.tail;
                self.set(register, tail);
            }
        }
    }

    fn reap(&mut self, channel: &mut Channel) -> Result<bool, Error> {
        // From memory only: polling costs no exit.
        let sent = self.drain(channel, true);
        let received = self.drain(channel, false);
        Ok(sent || received)
    }

    fn arm(&mut self, armed: bool) -> bool {
        if armed {
            // Reading the cause acknowledges the interrupt, so the next
            // completion raises it again and wakes the driver: one exit per
            // sleep; interrupts stay enabled.
            let cause = self.get(reg::ICR);
            if cause & (1 << 2) != 0 {
                self.link_up = self.get(reg::STATUS) & STATUS_LU != 0;
                println!("e1000e: link {}", if self.link_up { "up" } else { "down" });
            }
        }
        let done = |ring: &Ring| ring.head != ring.tail && self.status_of(ring, ring.head) & DD != 0;
        !done(&self.tx) && !done(&self.rx)
    }
}

driver_vm::channel_driver_main!(E1000e);

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with a bad IP or TCP/UDP checksum is delivered (its guest
    /// judges it); one with a wire error, or not whole, is not.
    #[test]
    fn checksum_errors_do_not_fail_a_received_frame() {
        assert!(received_whole(DD | EOP, 0));
        assert!(received_whole(DD | EOP, 0x20 | 0x40), "a bad checksum failed the frame");
        assert!(!received_whole(DD | EOP, 0x01), "a CRC error");
        assert!(!received_whole(DD | EOP, 0x80), "a receive data error");
        assert!(!received_whole(DD, 0), "not the frame's end");
    }
}
