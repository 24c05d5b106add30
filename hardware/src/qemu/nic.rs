//! QEMU's e1000e (Intel 82574L) as the network card of a device: the model
//! in its QEMU process, reached by the driver VM through a trapped BAR0
//! window (`proxy`), DMA into the channel's bounce slots and device area;
//! its network side a datagram socketpair (one frame per datagram) whose
//! other end is a port of the project's switch. The QEMU process is
//! supervised ([`SupervisedModel`]): restarted, the card is plugged into
//! the same port.

use crate::shared_eventfd::SharedEventFd;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use vmm_sys_util::eventfd::EventFd;

use super::supervised::{ProcessSpec, SupervisedModel};
use super::{Model, ModelError, QemuProcess};
use crate::shm::SharedMemory;
use crate::switch::{Mac, PortId, Switch, SwitchPort};
use crate::{Hardware, HardwareWindow, InterruptRoute, NetHardware, TrapWindow};

/// A network card (QEMU's e1000e) plugged into a switch.
pub struct QemuNic {
    process: Arc<SupervisedModel>,
    interrupt: Arc<InterruptRoute>,
    /// The card's doorbells are in BAR0: nothing rings this one.
    doorbell: SharedEventFd,
    mac: Mac,
    wire: Arc<Wire>,
    switch: Arc<Switch>,
    port_id: PortId,
}

/// The switch's side of the card's network cable.
struct Wire {
    socket: UnixDatagram,
    /// Frames the card could not take (its socket buffer was full).
    dropped: AtomicU64,
    /// What the card may send into the switch: the frames the reflector
    /// handed its driver, and [`crate::sim_nic::TX_WORK_SPARE`] more per
    /// driver VM. Each frame is carried on the reflector's wire thread, and
    /// delivered on it into the receiving card (another tenant's); a
    /// driver that wrote a ring of frames nobody asked for and rang once
    /// had QEMU send them all, a reflector core and the switch's lock (an
    /// adversarial review found it). Past it, the thread stops reading the
    /// cable until more is granted, so QEMU's sends wait, in its own quota.
    work: crate::WorkAllowance,
    /// The card is gone: the thread ends.
    unplugged: AtomicBool,
}

impl SwitchPort for Wire {
    fn receive(&self, frame: &[u8]) {
        // Never blocks (the reader's clone shares the socket's blocking
        // mode): a card whose QEMU is dead or slow drops the frame, as a
        // full receive ring does.
        // SAFETY: send from a valid buffer of `frame.len()` bytes on a
        // socket this port owns.
        let sent =
            unsafe { libc::send(self.socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
        if sent < 0 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl QemuNic {
    /// Starts QEMU (`qemu`) with an e1000e of address `mac`, able to reach
    /// `len` bytes of `dma` from `offset`, its cable plugged into `switch`.
    pub fn start(
        qemu: &QemuProcess,
        name: &str,
        mac: Mac,
        dma: &Arc<SharedMemory>,
        offset: usize,
        len: usize,
        switch: Arc<Switch>,
    ) -> Result<QemuNic, ModelError> {
        let (ours, theirs) = UnixDatagram::pair()?;
        let theirs = OwnedFd::from(theirs);
        let interrupt = Arc::new(InterruptRoute::default());
        let process = SupervisedModel::start(ProcessSpec {
            posted_mirror: None,
            qemu: qemu.binary.clone(),
            jail: qemu.jail.clone(),
            model: Model::E1000e { mac },
            serial: name.chars().filter(char::is_ascii_alphanumeric).take(20).collect(),
            dma: dma.clone(),
            offset,
            len,
            interrupt: interrupt.clone(),
            wire: Some(theirs),
            // Its accesses are not judged: its driver's receive path has
            // no grants (received frames are the wire's doing).
            work: None,
        })?;
        let reader = ours.try_clone()?;
        let wire = Arc::new(Wire::new(ours));
        let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(wire.clone() as Arc<dyn SwitchPort>));
        let port_id = switch.attach(weak, Some(mac)).map_err(std::io::Error::other)?;
        let (thread_switch, thread_wire) = (switch.clone(), wire.clone());
        std::thread::Builder::new()
            .name(format!("{name}-wire"))
            .spawn(move || carry_frames(|frame| reader.recv(frame), &thread_wire, &thread_switch, port_id))?;
        Ok(QemuNic {
            process: Arc::new(process),
            interrupt,
            doorbell: SharedEventFd::new()?,
            mac,
            wire,
            switch,
            port_id,
        })
    }

    /// How many times its QEMU process was started again.
    pub fn restarts(&self) -> u64 {
        self.process.restarts()
    }

    /// Frames the card could not take.
    pub fn dropped(&self) -> u64 {
        self.wire.dropped.load(Ordering::Relaxed)
    }
}

impl Wire {
    fn new(socket: UnixDatagram) -> Wire {
        Wire {
            socket,
            dropped: AtomicU64::new(0),
            work: crate::WorkAllowance::with_spare(crate::sim_nic::TX_WORK_SPARE),
            unplugged: AtomicBool::new(false),
        }
    }
}

/// Moves the frames the card sends (`recv`: its socket's) into the switch,
/// each within the card's allowance, until its socket closes or the card is
/// unplugged.
fn carry_frames(
    mut recv: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
    wire: &Wire,
    switch: &Switch,
    port_id: PortId,
) {
    let mut frame = vec![0u8; 65536];
    loop {
        if !wire.work.wait_for_grant(|| wire.unplugged.load(Ordering::Acquire)) {
            return;
        }
        match recv(&mut frame) {
            Ok(0) => return,
            Ok(len) => {
                // Every datagram read is charged, a frame too long to carry
                // too: the card may send them (a hostile driver's 64 KiB
                // frames), and read uncharged they were the same flood.
                wire.work.spend(len as u64 + crate::COMMAND_WORK);
                if len <= guest_abi::nic::MAX_FRAME as usize {
                    switch.forward(port_id, &frame[..len]);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

impl Hardware for QemuNic {
    fn windows(&self) -> Vec<HardwareWindow> {
        Vec::new()
    }

    fn traps(&self) -> Vec<TrapWindow> {
        vec![self.process.trap()]
    }

    fn doorbell(&self) -> &SharedEventFd {
        &self.doorbell
    }

    fn interrupt(&self) -> Arc<InterruptRoute> {
        self.interrupt.clone()
    }

    fn quiesce(&self) {
        self.process.quiesce();
    }

    fn resume(&self) {
        // A new driver starts with the spare alone.
        self.wire.work.forgive();
        self.process.resume();
    }

    fn work(&self) -> Option<&crate::WorkAllowance> {
        Some(&self.wire.work)
    }

    fn renew(&self) {
        self.process.renew();
    }

    fn watch_failure(&self, failure: EventFd) {
        self.process.watch_failure(failure);
    }

    fn stop(&self) {
        self.process.stop();
    }

    fn shut_down(&self) {
        self.process.shut_down();
    }
}

impl NetHardware for QemuNic {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn link_up(&self) -> bool {
        self.process.running()
    }
}

impl Drop for QemuNic {
    fn drop(&mut self) {
        self.switch.detach(self.port_id);
        self.wire.unplugged.store(true, Ordering::Release);
        let _ = self.wire.socket.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counter(AtomicU64);

    impl SwitchPort for Counter {
        fn receive(&self, _frame: &[u8]) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A card whose driver had QEMU send a ring of frames nobody asked
    /// for gets into the switch its spare's worth and no more: the cable
    /// is not read again until the reflector grants more; then the rest
    /// follows. Before, the wire thread carried every frame QEMU sent,
    /// into another tenant's card. The card's side is a stand-in that
    /// notes any read made while the allowance was spent.
    #[test]
    fn a_card_sends_into_the_switch_only_what_it_was_granted_and_its_spare() {
        // Frames the switch carries, and frames too long for it, which the
        // wire reads and drops (uncharged before: a review found it).
        for len in [1000, 4 * guest_abi::nic::MAX_FRAME as usize] {
            sends_within_its_allowance(len);
        }
    }

    fn sends_within_its_allowance(len: usize) {
        let switch = Switch::new("wire-test");
        let (card_mac, victim_mac) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let victim = Arc::new(Counter::default());
        let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(victim.clone() as Arc<dyn SwitchPort>));
        switch.attach(weak, Some(victim_mac)).unwrap();
        let (ours, _qemu) = UnixDatagram::pair().unwrap();
        let wire = Arc::new(Wire::new(ours));
        let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(wire.clone() as Arc<dyn SwitchPort>));
        let port = switch.attach(weak, Some(card_mac)).unwrap();
        let mut frame = vec![0u8; len];
        frame[0..6].copy_from_slice(&victim_mac);
        frame[6..12].copy_from_slice(&card_mac);
        let per_frame = frame.len() as u64 + crate::COMMAND_WORK;
        let sent = 4 * (crate::sim_nic::TX_WORK_SPARE / per_frame + 1);
        let (thread_wire, thread_switch) = (wire.clone(), switch.clone());
        let carrier = std::thread::spawn(move || {
            let (mut given, mut read_while_spent) = (0, 0);
            let card = |buffer: &mut [u8]| {
                if given == sent {
                    return Ok(0);
                }
                read_while_spent += u64::from(thread_wire.work.exhausted());
                given += 1;
                buffer[..frame.len()].copy_from_slice(&frame);
                Ok(frame.len())
            };
            carry_frames(card, &thread_wire, &thread_switch, port);
            read_while_spent
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !wire.work.exhausted() {
            assert!(std::time::Instant::now() < deadline, "{len}-byte frames: the spare was never spent");
            std::thread::yield_now();
        }
        // Granted the rest, the rest follows.
        wire.work.grant(sent * per_frame);
        assert_eq!(carrier.join().unwrap(), 0, "{len}-byte frames: the cable was read while the allowance was spent");
        let carried = if len <= guest_abi::nic::MAX_FRAME as usize { sent } else { 0 };
        assert_eq!(victim.0.load(Ordering::Relaxed), carried);
    }
}
