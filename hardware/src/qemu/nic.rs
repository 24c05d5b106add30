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
use std::sync::atomic::{AtomicU64, Ordering};
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
        })?;
        let reader = ours.try_clone()?;
        let wire = Arc::new(Wire { socket: ours, dropped: AtomicU64::new(0) });
        let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(wire.clone() as Arc<dyn SwitchPort>));
        let port_id = switch.attach(weak, Some(mac)).map_err(std::io::Error::other)?;
        let thread_switch = switch.clone();
        std::thread::Builder::new()
            .name(format!("{name}-wire"))
            .spawn(move || carry_frames(&reader, &thread_switch, port_id))?;
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

/// Moves the frames the card sends into the switch until its socket closes.
fn carry_frames(socket: &UnixDatagram, switch: &Switch, port_id: PortId) {
    let mut frame = vec![0u8; 65536];
    loop {
        match socket.recv(&mut frame) {
            Ok(0) => return,
            Ok(len) if len <= guest_abi::nic::MAX_FRAME as usize => switch.forward(port_id, &frame[..len]),
            Ok(_) => {}
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
        self.process.resume();
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
        let _ = self.wire.socket.shutdown(std::net::Shutdown::Both);
    }
}
