//! A simulated network card, seen by its driver exactly as a passed-through
//! PCI function would be: a register and ring window (shared memory), a
//! doorbell and an interrupt (eventfds wired by KVM), and DMA only into the
//! region it was given. Its wire side is a port of a [`Switch`].
//!
//! Its state (the MAC, the link, the port's receive FIFO) outlives any
//! driver VM; a driver must reset it before use. Everything the driver
//! writes into the window is untrusted: ring indices are checked (a runaway
//! index stops the device with FATAL until reset), descriptors are
//! validated, and a DMA address outside the DMA region fails the descriptor
//! instead of touching host memory.
//!
//! Threads: the device thread sleeps on the doorbell and handles resets,
//! enabling and transmission; frames from the wire arrive on the sending
//! port's thread ([`SwitchPort::receive`]). Both go through one lock, so a
//! [`SimNic::quiesce`] (the host stopping DMA after its driver VM died) is
//! ordered against every DMA.

use crate::shared_eventfd::SharedEventFd;
use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use guest_abi::nic::{self, completion, reg, Completion, Descriptor};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::switch::{PortId, Switch, SwitchPort};
use super::{wait_for_doorbell, DmaRegion, Hardware, HardwareWindow, InterruptRoute, NetHardware};
use crate::shm::SharedMemory;

/// Frames the port holds while no RX buffer is posted: about two rings'
/// worth, enough to ride out a driver VM restart (a few milliseconds) at
/// the rates two TCG guests produce, small enough (at most ~400 KiB) that a
/// stuck driver costs little memory. Beyond it frames are dropped, as a real
/// NIC's FIFO would.
const RX_FIFO_FRAMES: usize = 256;
/// Most TX descriptors handled before the device publishes completions and
/// lets receivers run.
const TX_BATCH: u32 = 64;

/// Frames a card may send beyond those the reflector handed its driver,
/// for each driver VM, in [`crate::WorkAllowance`] units: 1 MiB is about
/// 250 frames. The card sends each frame it was given once, never a
/// duplicate, so an honest driver never needs it.
pub const TX_WORK_SPARE: u64 = 1 << 20;

/// Counters of the device.
#[derive(Debug)]
pub struct NicCounters {
    /// Frames sent to the wire.
    pub tx_frames: AtomicU64,
    /// Frames written into RX buffers.
    pub rx_frames: AtomicU64,
    /// Frames dropped: FIFO full, or arrived while the device was stopped.
    pub rx_dropped: AtomicU64,
    /// Descriptors failed (bad length or DMA address).
    pub bad_descriptors: AtomicU64,
    /// The card's work for its driver and what it may do
    /// ([`Hardware::work`]): each transmit descriptor's bytes and
    /// [`crate::COMMAND_WORK`]. Received frames are the wire's doing, not
    /// the driver's. Its spare is [`TX_WORK_SPARE`].
    pub work: crate::WorkAllowance,
}

impl Default for NicCounters {
    fn default() -> Self {
        NicCounters {
            tx_frames: AtomicU64::new(0),
            rx_frames: AtomicU64::new(0),
            rx_dropped: AtomicU64::new(0),
            bad_descriptors: AtomicU64::new(0),
            work: crate::WorkAllowance::with_spare(TX_WORK_SPARE),
        }
    }
}

/// The card.
pub struct SimNic {
    regs: Arc<SharedMemory>,
    doorbell: SharedEventFd,
    interrupt: Arc<InterruptRoute>,
    port: Arc<NicPort>,
    switch: Arc<Switch>,
    port_id: PortId,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    mac: [u8; 6],
}

/// The card's wire side and execution state, shared by its thread and the
/// switch.
struct NicPort {
    /// The register window (the engine's too): for `DEVICE_POLLING`.
    regs: Arc<SharedMemory>,
    engine: Mutex<Engine>,
    counters: Arc<NicCounters>,
}

impl SimNic {
    /// Starts a card with address `mac`, DMA into `dma`, wired to `switch`.
    pub fn start(name: &str, mac: [u8; 6], dma: DmaRegion, switch: Arc<Switch>) -> std::io::Result<SimNic> {
        let regs = Arc::new(SharedMemory::new(&format!("{name}-regs"), nic::WINDOW_SIZE)?);
        regs.write(reg::MAGIC, nic::MAGIC);
        regs.write(reg::VERSION, nic::VERSION);
        regs.write(reg::MAC, nic::mac_to_register(mac));
        regs.write(reg::MAX_FRAME, nic::MAX_FRAME);
        regs.atomic_u32(reg::STATUS).store(nic::status::LINK_UP, Ordering::Release);
        let doorbell = SharedEventFd::new()?;
        let interrupt = Arc::new(InterruptRoute::default());
        let counters = Arc::new(NicCounters::default());
        let engine = Engine::new(regs.clone(), dma, interrupt.clone(), counters.clone());
        regs.atomic_u32(reg::DEVICE_POLLING).store(1, Ordering::SeqCst);
        let port = Arc::new(NicPort { regs: regs.clone(), engine: Mutex::new(engine), counters });
        let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(port.clone() as Arc<dyn SwitchPort>));
        let port_id = switch.attach(weak, Some(mac)).map_err(std::io::Error::other)?;
        let stop = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let (wake, quit, thread_port, thread_switch) =
            (doorbell.try_clone()?, stop.try_clone()?, port.clone(), switch.clone());
        let thread = std::thread::Builder::new()
            .name(format!("{name}-nic"))
            .spawn(move || thread_port.run(&thread_switch, port_id, &wake, &quit))?;
        tracing::info!(nic = %name, switch = %switch.name(), mac = %format_mac(&mac), "simulated NIC attached");
        Ok(SimNic { regs, doorbell, interrupt, port, switch, port_id, stop, thread: Some(thread), mac })
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<NicCounters> {
        self.port.counters.clone()
    }
}

impl Hardware for SimNic {
    fn windows(&self) -> Vec<HardwareWindow> {
        vec![HardwareWindow { name: "regs", memory: self.regs.clone() }]
    }

    fn doorbell(&self) -> &SharedEventFd {
        &self.doorbell
    }

    fn interrupt(&self) -> Arc<InterruptRoute> {
        self.interrupt.clone()
    }

    fn work(&self) -> Option<&crate::WorkAllowance> {
        Some(&self.port.counters.work)
    }

    fn quiesce(&self) {
        self.port.lock().quiesce();
    }

    fn resume(&self) {
        self.port.counters.work.forgive();
        self.port.lock().quiesced = false;
        // The next driver VM's vmm holds the doorbell too.
        let _ = self.doorbell.signal();
    }
}

impl NetHardware for SimNic {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn link_up(&self) -> bool {
        self.port.lock().status & nic::status::LINK_UP != 0
    }
}

impl Drop for SimNic {
    fn drop(&mut self) {
        self.switch.detach(self.port_id);
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl SwitchPort for NicPort {
    fn receive(&self, frame: &[u8]) {
        self.lock().receive(frame);
    }
}

impl NicPort {
    fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The device thread: works while there is work, then sleeps on the
    /// doorbell. While awake it says so in `DEVICE_POLLING` (it will look
    /// at the rings again before it sleeps), so the driver skips its
    /// doorbell. It does not poll on: spinning here for 100 us after the
    /// last work took a core from the driver VMs and the reflector on this
    /// two-core machine (net-load 64 B: 0.09 against 0.15 Mpps, round trip
    /// 400 against 280 us). Frames it transmitted go to the switch outside
    /// the lock.
    fn run(&self, switch: &Switch, port_id: PortId, doorbell: &SharedEventFd, stop: &EventFd) {
        let awake = self.regs.atomic_u32(reg::DEVICE_POLLING);
        loop {
            let (frames, worked) = self.lock().step();
            for frame in &frames {
                switch.forward(port_id, frame);
            }
            if worked {
                continue;
            }
            awake.store(0, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.lock().has_pending_work() && !wait_for_doorbell(doorbell, stop) {
                return;
            }
            awake.store(1, Ordering::SeqCst);
        }
    }
}

/// Ring positions and the receive FIFO.
struct Engine {
    regs: Arc<SharedMemory>,
    dma: DmaRegion,
    interrupt: Arc<InterruptRoute>,
    counters: Arc<NicCounters>,
    ring_size: u32,
    tx_head: u32,
    txc_tail: u32,
    rx_head: u32,
    rxc_tail: u32,
    /// The host stopped the device (its driver died): no DMA until the next
    /// driver resets it.
    quiesced: bool,
    fifo: VecDeque<Vec<u8>>,
    /// The status register's value, kept here: the window's copy is
    /// driver-writable, and a driver clearing FATAL, or a dead one's
    /// writer setting READY before the resume, would have made the card
    /// run rings nobody checked.
    status: u32,
    /// Its driver's errors so far, for the log.
    driver_errors: crate::LogEvery,
}

impl Engine {
    fn new(
        regs: Arc<SharedMemory>,
        dma: DmaRegion,
        interrupt: Arc<InterruptRoute>,
        counters: Arc<NicCounters>,
    ) -> Self {
        Engine {
            regs,
            dma,
            interrupt,
            counters,
            ring_size: 0,
            tx_head: 0,
            txc_tail: 0,
            rx_head: 0,
            rxc_tail: 0,
            quiesced: false,
            fifo: VecDeque::new(),
            status: nic::status::LINK_UP,
            driver_errors: crate::LogEvery::default(),
        }
    }

    fn reg(&self, offset: usize) -> &AtomicU32 {
        self.regs.atomic_u32(offset)
    }

    fn ready(&self) -> bool {
        !self.quiesced && self.status & nic::status::READY != 0
    }

    fn set_status(&mut self, status: u32) {
        self.status = status;
        self.reg(reg::STATUS).store(status, Ordering::Release);
    }

    /// One round of doorbell work: returns the frames transmitted and
    /// whether it did anything (so more may be pending).
    fn step(&mut self) -> (Vec<Vec<u8>>, bool) {
        // Quiesced, the card ignores even a reset: a dying driver must not
        // be able to re-arm it before the reflector resumes it.
        if self.quiesced {
            return (Vec::new(), false);
        }
        // A reset and an enable are work too, a frame's command worth each:
        // a driver resetting its card in a loop of plain stores kept this
        // thread busy, a host core outside its quota, for nothing (an
        // adversarial review found it).
        let reset_request = self.reg(reg::RESET_REQUEST).load(Ordering::Acquire);
        if reset_request != self.reg(reg::RESET_DONE).load(Ordering::Acquire) {
            if !self.counters.work.try_spend(crate::COMMAND_WORK) {
                return (Vec::new(), false);
            }
            self.reset(reset_request);
            return (Vec::new(), true);
        }
        // Whatever the driver wrote there, the status is ours.
        self.reg(reg::STATUS).store(self.status, Ordering::Release);
        if self.status & (nic::status::READY | nic::status::FATAL) == 0 {
            if self.reg(reg::CONTROL).load(Ordering::Acquire) & nic::control::ENABLE != 0 {
                if !self.counters.work.try_spend(crate::COMMAND_WORK) {
                    return (Vec::new(), false);
                }
                self.enable();
                return (Vec::new(), true);
            }
            return (Vec::new(), false);
        }
        if !self.ready() {
            return (Vec::new(), false);
        }
        let delivered = self.drain_fifo();
        let (frames, transmitted) = self.transmit();
        (frames, delivered || transmitted)
    }

    /// Whether the doorbell would find work: a reset or an enable to do,
    /// TX descriptors, or FIFO frames and RX buffers for them.
    fn has_pending_work(&self) -> bool {
        if self.quiesced {
            return false;
        }
        if self.reg(reg::RESET_REQUEST).load(Ordering::Acquire) != self.reg(reg::RESET_DONE).load(Ordering::Acquire) {
            return !self.counters.work.exhausted();
        }
        if self.status & (nic::status::READY | nic::status::FATAL) == 0 {
            return self.reg(reg::CONTROL).load(Ordering::Acquire) & nic::control::ENABLE != 0
                && !self.counters.work.exhausted();
        }
        // Work only with room in the completion ring: a driver that never
        // takes its completions must not keep this thread polling.
        let room = |tail: usize, head: u32, completion_head: usize, completion_tail: u32| {
            self.reg(tail).load(Ordering::Acquire) != head
                && completion_tail.wrapping_sub(self.reg(completion_head).load(Ordering::Acquire)) < self.ring_size
        };
        self.ready()
            && (room(reg::TX_TAIL, self.tx_head, reg::TXC_HEAD, self.txc_tail) && !self.counters.work.exhausted()
                || !self.fifo.is_empty() && room(reg::RX_TAIL, self.rx_head, reg::RXC_HEAD, self.rxc_tail))
    }

    fn reset(&mut self, request: u32) {
        for offset in [
            reg::CONTROL,
            reg::RING_SIZE,
            reg::ERROR,
            reg::TX_TAIL,
            reg::TX_HEAD,
            reg::TXC_TAIL,
            reg::TXC_HEAD,
            reg::RX_TAIL,
            reg::RX_HEAD,
            reg::RXC_TAIL,
            reg::RXC_HEAD,
            reg::INTERRUPT_WANTED,
        ] {
            self.reg(offset).store(0, Ordering::Release);
        }
        // The link is the wire's, not the driver's: a reset keeps it, and
        // the FIFO (the port's, not the driver's) keeps its frames.
        self.set_status(nic::status::LINK_UP);
        self.reg(reg::RX_WAITING).store(u32::from(!self.fifo.is_empty()), Ordering::SeqCst);
        (self.ring_size, self.tx_head, self.txc_tail, self.rx_head, self.rxc_tail) = (0, 0, 0, 0, 0);
        self.reg(reg::RESET_DONE).store(request, Ordering::Release);
        self.interrupt.raise();
    }

    fn enable(&mut self) {
        let size = self.reg(reg::RING_SIZE).load(Ordering::Acquire);
        if size.is_power_of_two() && size <= nic::MAX_RING {
            self.ring_size = size;
            self.set_status(nic::status::READY | nic::status::LINK_UP);
        } else {
            self.fail(nic::error::BAD_RING_SIZE);
        }
        self.interrupt.raise();
    }

    /// Stops DMA for good until a reset: not ready and not enabled, so that
    /// resuming does not re-enable it with the dead driver's rings (a TX
    /// descriptor it left would go out, its frame read from a slot the
    /// reflector may have reused).
    fn quiesce(&mut self) {
        self.quiesced = true;
        self.set_status(self.status & !nic::status::READY);
        self.reg(reg::CONTROL).store(0, Ordering::Release);
    }

    fn fail(&mut self, error: u32) {
        if let Some(times) = self.driver_errors.note() {
            tracing::warn!(
                error,
                times,
                "simulated NIC stopped on a driver error; it needs a reset (logged at each power of two)"
            );
        }
        self.reg(reg::ERROR).store(error, Ordering::Release);
        self.set_status(nic::status::FATAL | nic::status::LINK_UP);
        self.interrupt.raise();
    }

    /// Checks a ring (driver tail ahead of device head by at most a ring)
    /// and its completion ring (device tail ahead of driver head by at most a
    /// ring). Returns the ring's tail and the completion head, or fails the
    /// device.
    fn checked_indices(
        &mut self,
        tail: usize,
        head: u32,
        completion_head: usize,
        completion_tail: u32,
    ) -> Option<(u32, u32)> {
        let tail = self.reg(tail).load(Ordering::Acquire);
        let completion_head = self.reg(completion_head).load(Ordering::Acquire);
        if tail.wrapping_sub(head) > self.ring_size {
            self.fail(nic::error::BAD_TAIL);
            return None;
        }
        if completion_tail.wrapping_sub(completion_head) > self.ring_size {
            self.fail(nic::error::BAD_COMPLETION_HEAD);
            return None;
        }
        Some((tail, completion_head))
    }

    /// Sends up to TX_BATCH frames; returns them for the switch, and
    /// whether it took any descriptor.
    fn transmit(&mut self) -> (Vec<Vec<u8>>, bool) {
        let Some((tail, completion_head)) =
            self.checked_indices(reg::TX_TAIL, self.tx_head, reg::TXC_HEAD, self.txc_tail)
        else {
            return (Vec::new(), false);
        };
        let start = self.tx_head;
        let mut frames = Vec::new();
        while self.tx_head != tail
            && self.txc_tail.wrapping_sub(completion_head) < self.ring_size
            && frames.len() < TX_BATCH as usize
            && !self.counters.work.exhausted()
        {
            let at = nic::ring_entry(nic::TX_RING_OFFSET, self.tx_head, self.ring_size, size_of::<Descriptor>());
            let descriptor: Descriptor = self.regs.read(at).unwrap_or_default();
            self.tx_head = self.tx_head.wrapping_add(1);
            let status = match self.read_frame(&descriptor) {
                Ok(frame) => {
                    frames.push(frame);
                    completion::SUCCESS
                }
                Err(status) => status,
            };
            let len = if status == completion::SUCCESS { descriptor.len } else { 0 };
            self.counters.work.spend(u64::from(len) + crate::COMMAND_WORK);
            self.push_completion(true, Completion { id: descriptor.id, status, len });
        }
        if self.tx_head != start {
            self.reg(reg::TX_HEAD).store(self.tx_head, Ordering::Release);
            self.publish_completions(true);
        }
        self.counters.tx_frames.fetch_add(frames.len() as u64, Ordering::Relaxed);
        (frames, self.tx_head != start)
    }

    fn read_frame(&self, descriptor: &Descriptor) -> Result<Vec<u8>, u16> {
        if !(nic::MIN_FRAME..=nic::MAX_FRAME).contains(&descriptor.len) {
            self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
            return Err(completion::BAD_LENGTH);
        }
        let slice = self
            .dma
            .translate(descriptor.addr, descriptor.len)
            .and_then(|offset| self.dma.memory.slice(offset, descriptor.len as usize));
        let Some(slice) = slice else {
            self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
            return Err(completion::DMA_ERROR);
        };
        let mut frame = vec![0u8; descriptor.len as usize];
        slice.copy_to(&mut frame[..]);
        Ok(frame)
    }

    /// A frame from the wire: into a posted buffer, else into the FIFO.
    fn receive(&mut self, frame: &[u8]) {
        self.drain_fifo();
        if self.fifo.is_empty() && self.deliver(frame) {
            self.publish_completions(false);
            return;
        }
        if self.fifo.len() < RX_FIFO_FRAMES {
            self.fifo.push_back(frame.to_vec());
        } else {
            self.drop_frame();
        }
        // Say that frames wait, then look at the RX tail once more: a
        // driver that posted buffers meanwhile without a doorbell (it had
        // not seen RX_WAITING yet) has them used now.
        self.reg(reg::RX_WAITING).store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.drain_fifo();
    }

    /// Delivers FIFO frames into newly posted buffers; whether it
    /// delivered any.
    fn drain_fifo(&mut self) -> bool {
        let mut delivered = false;
        while let Some(frame) = self.fifo.pop_front() {
            if !self.deliver(&frame) {
                self.fifo.push_front(frame);
                break;
            }
            delivered = true;
        }
        if delivered {
            if self.fifo.is_empty() {
                self.reg(reg::RX_WAITING).store(0, Ordering::SeqCst);
            }
            self.publish_completions(false);
        }
        delivered
    }

    /// Writes a frame into the next posted RX buffer; false if none is
    /// posted, it is bad (returned failed), or the rings are broken.
    fn deliver(&mut self, frame: &[u8]) -> bool {
        if !self.ready() {
            return false;
        }
        let Some((tail, completion_head)) =
            self.checked_indices(reg::RX_TAIL, self.rx_head, reg::RXC_HEAD, self.rxc_tail)
        else {
            return false;
        };
        if self.rx_head == tail || self.rxc_tail.wrapping_sub(completion_head) >= self.ring_size {
            return false;
        }
        let at = nic::ring_entry(nic::RX_RING_OFFSET, self.rx_head, self.ring_size, size_of::<Descriptor>());
        let descriptor: Descriptor = self.regs.read(at).unwrap_or_default();
        self.rx_head = self.rx_head.wrapping_add(1);
        self.reg(reg::RX_HEAD).store(self.rx_head, Ordering::Release);
        match self.write_frame(&descriptor, frame) {
            Ok(()) => {
                self.push_completion(
                    false,
                    Completion { id: descriptor.id, status: completion::SUCCESS, len: frame.len() as u32 },
                );
                self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                true
            }
            // A bad buffer is returned failed, and ends this delivery: the
            // frame waits in the FIFO for the next look. Trying the next
            // buffer instead had a driver that posts a ring of bad ones (no
            // honest driver posts one) make each frame sent to it walk the
            // ring, on the sender's thread (another tenant's card, the
            // TAP's), at no cost to itself (an adversarial review found it).
            Err(status) => {
                self.push_completion(false, Completion { id: descriptor.id, status, len: 0 });
                false
            }
        }
    }

    fn write_frame(&self, descriptor: &Descriptor, frame: &[u8]) -> Result<(), u16> {
        if descriptor.len < nic::MAX_FRAME {
            self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
            return Err(completion::BAD_LENGTH);
        }
        let slice = self
            .dma
            .translate(descriptor.addr, frame.len() as u32)
            .and_then(|offset| self.dma.memory.slice(offset, frame.len()));
        let Some(slice) = slice else {
            self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
            return Err(completion::DMA_ERROR);
        };
        slice.copy_from(frame);
        Ok(())
    }

    fn drop_frame(&self) {
        self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
        self.reg(reg::RX_DROPPED).fetch_add(1, Ordering::AcqRel);
    }

    fn push_completion(&mut self, tx: bool, entry: Completion) {
        let (ring, tail) = if tx {
            (nic::TX_COMPLETION_OFFSET, &mut self.txc_tail)
        } else {
            (nic::RX_COMPLETION_OFFSET, &mut self.rxc_tail)
        };
        let at = nic::ring_entry(ring, *tail, self.ring_size, size_of::<Completion>());
        *tail = tail.wrapping_add(1);
        self.regs.write(at, entry);
    }

    /// Makes completions visible and interrupts the driver if it asked.
    fn publish_completions(&self, tx: bool) {
        if tx {
            self.reg(reg::TXC_TAIL).store(self.txc_tail, Ordering::Release);
        } else {
            self.reg(reg::RXC_TAIL).store(self.rxc_tail, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        if self.reg(reg::INTERRUPT_WANTED).load(Ordering::Acquire) != 0 {
            self.interrupt.raise();
        }
    }
}

/// "52:54:00:12:34:56".
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The card's engine without its thread or switch, stepped by the caller:
/// for fuzzing what a driver can write into the window and what arrives on
/// the wire (`fuzz/`). Not for serving.
#[doc(hidden)]
pub struct EngineHarness {
    engine: Engine,
}

impl EngineHarness {
    /// An engine with its window in `regs` and DMA into `dma`.
    pub fn new(regs: Arc<SharedMemory>, dma: DmaRegion) -> Self {
        regs.write(reg::MAGIC, nic::MAGIC);
        regs.write(reg::VERSION, nic::VERSION);
        regs.write(reg::MAX_FRAME, nic::MAX_FRAME);
        let engine = Engine::new(regs, dma, Arc::new(InterruptRoute::default()), Arc::new(NicCounters::default()));
        EngineHarness { engine }
    }

    /// One round of doorbell work: the frames it sent, whether it did anything.
    pub fn step(&mut self) -> (Vec<Vec<u8>>, bool) {
        self.engine.step()
    }

    /// A frame arrives from the wire.
    pub fn receive(&mut self, frame: &[u8]) {
        self.engine.receive(frame);
    }

    /// Quiesces (or resumes) it.
    pub fn set_quiesced(&mut self, quiesced: bool) {
        if quiesced {
            self.engine.quiesce();
        } else {
            self.engine.quiesced = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    const DMA_GPA: u64 = 0x4000_0000;
    const DMA_SIZE: usize = 64 * 1024;
    const RING: u32 = 16;

    struct Card {
        nic: SimNic,
        interrupt: SharedEventFd,
        dma: Arc<SharedMemory>,
    }

    fn card(name: &str, mac: u8, switch: &Arc<Switch>) -> Card {
        let dma = Arc::new(SharedMemory::new(name, DMA_SIZE).unwrap());
        let region = DmaRegion { memory: dma.clone(), offset: 0, len: DMA_SIZE, gpa: DMA_GPA };
        let nic = SimNic::start(name, [2, 0, 0, 0, 0, mac], region, switch.clone()).unwrap();
        let interrupt = SharedEventFd::new().unwrap();
        nic.interrupt().route(interrupt.try_clone().unwrap());
        Card { nic, interrupt, dma }
    }

    impl Card {
        fn reg(&self, offset: usize) -> &AtomicU32 {
            self.nic.regs.atomic_u32(offset)
        }

        /// Waits (bounded) for an interrupt.
        fn wait_interrupt(&self) {
            let mut fd = libc::pollfd { fd: self.interrupt.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut fd, 1, 10_000) }, 1, "no interrupt from the card");
            self.interrupt.take().unwrap();
        }

        /// Rings the doorbell, then waits on interrupts until `done`.
        fn ring_until(&self, done: impl Fn(&Self) -> bool) {
            self.nic.doorbell.signal().unwrap();
            while !done(self) {
                self.wait_interrupt();
            }
        }

        fn status(&self) -> u32 {
            self.reg(reg::STATUS).load(Ordering::SeqCst)
        }

        /// Waits (bounded) until the card says frames wait for buffers.
        fn until_rx_waiting(&self) {
            let start = std::time::Instant::now();
            while self.reg(reg::RX_WAITING).load(Ordering::SeqCst) == 0 {
                assert!(start.elapsed() < std::time::Duration::from_secs(10), "no frame came to wait in the FIFO");
                std::thread::yield_now();
            }
        }

        fn reset_and_enable(&self) {
            let request = self.reg(reg::RESET_REQUEST).fetch_add(1, Ordering::SeqCst) + 1;
            self.ring_until(|card| card.reg(reg::RESET_DONE).load(Ordering::SeqCst) == request);
            self.reg(reg::RING_SIZE).store(RING, Ordering::SeqCst);
            self.reg(reg::CONTROL).store(nic::control::ENABLE, Ordering::SeqCst);
            self.ring_until(|card| card.status() & (nic::status::READY | nic::status::FATAL) != 0);
            self.reg(reg::INTERRUPT_WANTED).store(1, Ordering::SeqCst);
        }

        fn post(&self, ring: usize, tail_reg: usize, descriptor: Descriptor) {
            let tail = self.reg(tail_reg).load(Ordering::SeqCst);
            self.nic.regs.write(nic::ring_entry(ring, tail, RING, 16), descriptor);
            self.reg(tail_reg).store(tail + 1, Ordering::SeqCst);
        }

        /// Waits for completion number `index` of a completion ring.
        fn completion(&self, ring: usize, tail_reg: usize, index: u32) -> Completion {
            while self.reg(tail_reg).load(Ordering::SeqCst) <= index {
                self.wait_interrupt();
            }
            self.nic.regs.read(nic::ring_entry(ring, index, RING, 8)).unwrap()
        }

        fn send(&self, frame: &[u8], at: usize, id: u16) {
            self.dma.slice(at, frame.len()).unwrap().copy_from(frame);
            let descriptor = Descriptor { addr: DMA_GPA + at as u64, len: frame.len() as u32, id, reserved: 0 };
            self.post(nic::TX_RING_OFFSET, reg::TX_TAIL, descriptor);
            self.nic.doorbell.signal().unwrap();
        }

        fn post_rx(&self, at: usize, id: u16) {
            let descriptor = Descriptor { addr: DMA_GPA + at as u64, len: nic::MAX_FRAME, id, reserved: 0 };
            self.post(nic::RX_RING_OFFSET, reg::RX_TAIL, descriptor);
            self.nic.doorbell.signal().unwrap();
        }
    }

    fn frame(destination: u8, source: u8, len: usize) -> Vec<u8> {
        let mut frame: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        frame[0..6].copy_from_slice(&[2, 0, 0, 0, 0, destination]);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, source]);
        frame
    }

    #[test]
    fn a_frame_crosses_the_switch_into_a_posted_buffer() {
        let switch = Switch::new("t1");
        let (a, b) = (card("nic-a1", 1, &switch), card("nic-b1", 2, &switch));
        assert!(a.nic.link_up());
        assert_eq!(a.nic.mac(), [2, 0, 0, 0, 0, 1]);
        a.reset_and_enable();
        b.reset_and_enable();
        b.post_rx(0x2000, 7);
        let sent = frame(2, 1, 1000);
        a.send(&sent, 0x1000, 3);
        assert_eq!(
            a.completion(nic::TX_COMPLETION_OFFSET, reg::TXC_TAIL, 0),
            Completion { id: 3, status: 0, len: 1000 }
        );
        assert_eq!(
            b.completion(nic::RX_COMPLETION_OFFSET, reg::RXC_TAIL, 0),
            Completion { id: 7, status: 0, len: 1000 }
        );
        let mut received = vec![0u8; 1000];
        b.dma.slice(0x2000, 1000).unwrap().copy_to(&mut received[..]);
        assert_eq!(received, sent);
        // The sender's card did the work of one frame for its driver; the
        // receiver's, none (what arrives is the wire's doing).
        // (Each card's reset and enable, a command's worth each, before.)
        let setup = 2 * crate::COMMAND_WORK;
        assert_eq!(a.nic.work().map(crate::WorkAllowance::done), Some(setup + 1000 + crate::COMMAND_WORK));
        assert_eq!(b.nic.work().map(crate::WorkAllowance::done), Some(setup));
    }

    /// A vmm holds its card's interrupt line, and a hostile one may make it
    /// blocking and fill its count: the card of another tenant delivering
    /// a frame to it must not wait on it. Before, its thread wrote the line
    /// and slept there for good, and with it every card that sent to that
    /// one (an adversarial review found it).
    #[test]
    fn a_frame_to_a_card_whose_vmm_filled_its_line_does_not_hold_the_sender() {
        // On a thread of its own: a card stuck in the write could not be
        // dropped (its thread is joined), and the test would hang instead
        // of failing.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let switch = Switch::new("t-full");
            let (a, b) = (card("nic-a-full", 1, &switch), card("nic-b-full", 2, &switch));
            a.reset_and_enable();
            b.reset_and_enable();
            b.post_rx(0x2000, 7);
            b.post_rx(0x3000, 8);
            let line = b.interrupt.as_raw_fd();
            let most = u64::MAX - 1;
            // Filled while still non-blocking (an interrupt the card raises
            // meanwhile makes the write fail instead of blocking the test),
            // then made blocking: what the hostile vmm does to its own copy.
            // SAFETY: read(2) and write(2) of 8 bytes to and from locals,
            // and fcntl(2), on the line's descriptor.
            unsafe {
                let mut count = 0u64;
                while {
                    libc::read(line, (&raw mut count).cast(), 8);
                    libc::write(line, (&raw const most).cast(), 8) != 8
                } {}
                assert_eq!(libc::fcntl(line, libc::F_SETFL, 0), 0);
            }
            for (id, at) in [(3, 0x1000), (4, 0x1800)] {
                a.send(&frame(2, 1, 100), at, id);
                let sent = a.completion(nic::TX_COMPLETION_OFFSET, reg::TXC_TAIL, u32::from(id - 3));
                assert_eq!(sent, Completion { id, status: 0, len: 100 });
            }
            let start = std::time::Instant::now();
            while b.reg(reg::RXC_TAIL).load(Ordering::SeqCst) < 2 {
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(10),
                    "the frames were not delivered: RXC_TAIL {} RX_WAITING {} RX_TAIL {}",
                    b.reg(reg::RXC_TAIL).load(Ordering::SeqCst),
                    b.reg(reg::RX_WAITING).load(Ordering::SeqCst),
                    b.reg(reg::RX_TAIL).load(Ordering::SeqCst)
                );
                std::thread::yield_now();
            }
            let _ = done.send(());
        });
        let waited = finished.recv_timeout(std::time::Duration::from_secs(20));
        assert!(waited.is_ok(), "the sending card waited on the receiving card's full line (or failed)");
    }

    /// A reset is work too: a driver resetting its card in a loop of plain
    /// stores gets its spare's worth of resets, then the card stops. Before,
    /// its thread reset it as fast as the driver asked, a host core outside
    /// the driver's quota (an adversarial review found it).
    #[test]
    fn a_card_reset_in_a_loop_stops_once_its_spare_is_spent() {
        let regs = Arc::new(SharedMemory::new("nic-reset-loop", nic::WINDOW_SIZE).unwrap());
        let dma = Arc::new(SharedMemory::new("nic-reset-loop-dma", DMA_SIZE).unwrap());
        let region = DmaRegion { memory: dma, offset: 0, len: DMA_SIZE, gpa: DMA_GPA };
        let mut engine = EngineHarness::new(regs.clone(), region);
        let most = TX_WORK_SPARE / crate::COMMAND_WORK + 1;
        let mut resets = 0;
        loop {
            regs.atomic_u32(reg::RESET_REQUEST).fetch_add(1, Ordering::SeqCst);
            if !engine.step().1 {
                break;
            }
            resets += 1;
            assert!(resets <= most, "the card kept resetting past its spare");
        }
        assert!(resets >= most - 1, "the spare's resets were refused: {resets} of {most}");
        assert!(!engine.engine.has_pending_work(), "the card does not sleep");
    }

    #[test]
    fn receive_buffers_need_a_doorbell_only_while_frames_wait() {
        let switch = Switch::new("t-rxw");
        let (a, b) = (card("nic-a-rxw", 1, &switch), card("nic-b-rxw", 2, &switch));
        a.reset_and_enable();
        b.reset_and_enable();
        assert_eq!(b.reg(reg::RX_WAITING).load(Ordering::SeqCst), 0);
        // A buffer posted without a doorbell: the next frame finds it.
        let descriptor = Descriptor { addr: DMA_GPA + 0x2000, len: nic::MAX_FRAME, id: 4, reserved: 0 };
        b.post(nic::RX_RING_OFFSET, reg::RX_TAIL, descriptor);
        a.send(&frame(2, 1, 200), 0x1000, 1);
        assert_eq!(
            b.completion(nic::RX_COMPLETION_OFFSET, reg::RXC_TAIL, 0),
            Completion { id: 4, status: 0, len: 200 }
        );
        assert_eq!(b.reg(reg::RX_WAITING).load(Ordering::SeqCst), 0, "nothing waits");
        // With no buffer the frame waits and the card says so; the buffer
        // posted then (with its doorbell) takes it and the flag clears.
        a.send(&frame(2, 1, 300), 0x1000, 2);
        // The card completes a send before the switch carries the frame.
        b.until_rx_waiting();
        b.post_rx(0x3000, 5);
        assert_eq!(b.completion(nic::RX_COMPLETION_OFFSET, reg::RXC_TAIL, 1).len, 300);
        assert_eq!(b.reg(reg::RX_WAITING).load(Ordering::SeqCst), 0);
        // A reset keeps the FIFO's frames, and says they wait.
        a.send(&frame(2, 1, 100), 0x1000, 3);
        b.until_rx_waiting();
        b.reg(reg::RX_WAITING).store(0, Ordering::SeqCst); // a driver scribbling on it
        b.reset_and_enable();
        assert_eq!(b.reg(reg::RX_WAITING).load(Ordering::SeqCst), 1);
    }

    #[test]
    fn frames_wait_in_the_fifo_until_buffers_come_and_quiesce_stops_dma() {
        let switch = Switch::new("t2");
        let (a, b) = (card("nic-a2", 1, &switch), card("nic-b2", 2, &switch));
        a.reset_and_enable();
        b.reset_and_enable();
        a.send(&frame(2, 1, 100), 0x1000, 1);
        a.completion(nic::TX_COMPLETION_OFFSET, reg::TXC_TAIL, 0);
        // No buffer yet: the frame waits; posting one delivers it.
        b.post_rx(0x3000, 9);
        assert_eq!(b.completion(nic::RX_COMPLETION_OFFSET, reg::RXC_TAIL, 0).len, 100);
        // A quiesced card takes no frames into buffers, even posted ones.
        b.post_rx(0x4000, 10);
        b.nic.quiesce();
        b.dma.slice(0x4000, 64).unwrap().copy_from(&[0xaau8; 64][..]);
        a.send(&frame(2, 1, 64), 0x1000, 2);
        a.completion(nic::TX_COMPLETION_OFFSET, reg::TXC_TAIL, 1);
        b.nic.doorbell.signal().unwrap();
        let mut untouched = [0u8; 64];
        b.dma.slice(0x4000, 64).unwrap().copy_to(&mut untouched[..]);
        assert_eq!(untouched, [0xaa; 64]);
        assert_eq!(b.reg(reg::RXC_TAIL).load(Ordering::SeqCst), 1);
        // The dying driver's own reset does not re-arm it: only the reflector
        // resumes it (for the next driver VM), whose reset then runs.
        let done = b.reg(reg::RESET_DONE).load(Ordering::SeqCst);
        b.reg(reg::RESET_REQUEST).fetch_add(1, Ordering::SeqCst);
        b.nic.doorbell.signal().unwrap();
        b.nic.port.lock().step();
        assert_eq!(b.reg(reg::RESET_DONE).load(Ordering::SeqCst), done, "a quiesced card ignores resets");
        b.nic.resume();
        // After a reset the kept frame reaches the new buffer.
        b.reset_and_enable();
        assert!(b.nic.link_up(), "a reset keeps the link");
        b.post_rx(0x5000, 11);
        assert_eq!(
            b.completion(nic::RX_COMPLETION_OFFSET, reg::RXC_TAIL, 0),
            Completion { id: 11, status: 0, len: 64 }
        );
    }

    #[test]
    fn a_dead_drivers_transmit_descriptors_never_go_out_after_resume() {
        let switch = Switch::new("t4");
        let (a, b) = (card("nic-a4", 1, &switch), card("nic-b4", 2, &switch));
        a.reset_and_enable();
        b.reset_and_enable();
        b.post_rx(0x3000, 1);
        a.nic.quiesce();
        // The dying driver had written a frame and its descriptor, no doorbell.
        a.dma.slice(0x1000, 64).unwrap().copy_from(&frame(2, 1, 64)[..]);
        a.post(nic::TX_RING_OFFSET, reg::TX_TAIL, Descriptor { addr: DMA_GPA + 0x1000, len: 64, id: 7, reserved: 0 });
        // And it (or a writer that outlived it) said the card was ready:
        // the status is the card's, not the window's (before, this let the
        // frame out).
        a.reg(reg::STATUS).store(nic::status::READY | nic::status::LINK_UP, Ordering::SeqCst);
        a.nic.resume();
        for _ in 0..3 {
            let (sent, _) = a.nic.port.lock().step();
            assert!(sent.is_empty(), "a dead driver's frame went out after resume");
        }
        assert_eq!(a.status() & nic::status::READY, 0, "the card waits for the next driver's reset");
        assert_eq!(b.reg(reg::RXC_TAIL).load(Ordering::SeqCst), 0, "nothing reached the other card");
        // The next driver brings it up as usual.
        a.reset_and_enable();
        assert_eq!(a.status() & nic::status::READY, nic::status::READY);
    }

    /// A frame sent to a card whose driver posted a ring of bad receive
    /// buffers fails a few of them, not the ring, on the sender's thread
    /// (the delivery runs there; here on the test's, the card's own thread
    /// kept out by its lock).
    #[test]
    fn a_frame_to_a_ring_of_bad_receive_buffers_fails_a_few_not_the_ring() {
        let switch = Switch::new("t-bad-rx");
        let b = card("nic-b-bad-rx", 2, &switch);
        b.reset_and_enable();
        for id in 0..RING as u16 - 1 {
            let short = Descriptor { addr: DMA_GPA + 0x2000, len: 60, id, reserved: 0 };
            b.post(nic::RX_RING_OFFSET, reg::RX_TAIL, short);
        }
        let counters = b.nic.counters();
        let before = counters.bad_descriptors.load(Ordering::SeqCst);
        b.nic.port.lock().receive(&frame(2, 1, 100));
        let failed = counters.bad_descriptors.load(Ordering::SeqCst) - before;
        assert!((1..=2).contains(&failed), "one frame failed {failed} receive buffers");
    }

    #[test]
    fn bad_descriptors_fail_and_runaway_indices_are_fatal_until_reset() {
        let switch = Switch::new("t3");
        let a = card("nic-a3", 1, &switch);
        a.reset_and_enable();
        let outside = Descriptor { addr: DMA_GPA + DMA_SIZE as u64 - 10, len: 100, id: 1, reserved: 0 };
        a.post(nic::TX_RING_OFFSET, reg::TX_TAIL, outside);
        let runt = Descriptor { addr: DMA_GPA, len: 10, id: 2, reserved: 0 };
        a.post(nic::TX_RING_OFFSET, reg::TX_TAIL, runt);
        a.nic.doorbell.signal().unwrap();
        assert_eq!(a.completion(nic::TX_COMPLETION_OFFSET, reg::TXC_TAIL, 0).status, completion::DMA_ERROR);
        assert_eq!(a.completion(nic::TX_COMPLETION_OFFSET, reg::TXC_TAIL, 1).status, completion::BAD_LENGTH);
        assert_eq!(a.nic.counters().bad_descriptors.load(Ordering::SeqCst), 2);
        a.reg(reg::TX_TAIL).store(2 + RING + 1, Ordering::SeqCst);
        a.ring_until(|card| card.status() & nic::status::FATAL != 0);
        assert_eq!(a.reg(reg::ERROR).load(Ordering::SeqCst), nic::error::BAD_TAIL);
        // A driver clearing FATAL itself does not make the card run again.
        a.reg(reg::STATUS).store(nic::status::READY | nic::status::LINK_UP, Ordering::SeqCst);
        let (sent, worked) = a.nic.port.lock().step();
        assert!(sent.is_empty() && !worked, "a card whose driver cleared FATAL ran its rings");
        assert_eq!(a.status() & nic::status::FATAL, nic::status::FATAL, "the forged status stayed");
        a.reset_and_enable();
        assert_eq!(a.status() & nic::status::READY, nic::status::READY);
        let request = a.reg(reg::RESET_REQUEST).fetch_add(1, Ordering::SeqCst) + 1;
        a.ring_until(|card| card.reg(reg::RESET_DONE).load(Ordering::SeqCst) == request);
        a.reg(reg::RING_SIZE).store(3, Ordering::SeqCst);
        a.reg(reg::CONTROL).store(nic::control::ENABLE, Ordering::SeqCst);
        a.ring_until(|card| card.status() & nic::status::FATAL != 0);
        assert_eq!(a.reg(reg::ERROR).load(Ordering::SeqCst), nic::error::BAD_RING_SIZE);
    }
}
