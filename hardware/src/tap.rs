//! A switch port bridged to a host TAP device: frames the switch sends to
//! the port are written to the TAP (the host receives them), frames the host
//! sends on the TAP go into the switch. Lets driver-VM networks reach the
//! host (or, bridged further by the operator, the world).
//!
//! The TAP is opened without packet information and without a virtio-net
//! header, so it carries plain Ethernet frames; frames longer than the
//! card's limit are dropped (the host side of a TAP has a 1500-byte MTU
//! unless an operator raises it).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::switch::{PortId, Switch, SwitchPort};

/// `TUNSETIFF` (linux/if_tun.h): _IOW('T', 202, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `IFF_TAP | IFF_NO_PI` (linux/if_tun.h).
const TAP_FLAGS: libc::c_short = 0x0002 | 0x1000;
/// `struct ifreq`: 16 bytes of name, then a union whose first member we use
/// is `short ifr_flags`; 40 bytes in all on x86_64.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    padding: [u8; 22],
}

/// The TAP side of a switch port.
struct TapWire {
    file: File,
    dropped: AtomicU64,
}

impl SwitchPort for TapWire {
    fn receive(&self, frame: &[u8]) {
        if (&self.file).write(frame).is_err() {
            // Down interface or full queue: a wire loses frames.
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A TAP device plugged into a switch, until dropped.
pub struct TapPort {
    wire: Arc<TapWire>,
    switch: Arc<Switch>,
    port_id: PortId,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

fn open_tap(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= 16 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("TAP name {name:?}: use up to 15 letters, digits, - and _"),
        ));
    }
    let file = File::options().read(true).write(true).open("/dev/net/tun").map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("opening /dev/net/tun: {e} (a TAP needs CAP_NET_ADMIN and the tun module)"),
        )
    })?;
    let mut request = IfReq { name: [0; 16], flags: TAP_FLAGS, padding: [0; 22] };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF on our own tun descriptor with a properly sized,
    // initialised ifreq that outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request as *mut IfReq) } < 0 {
        let error = std::io::Error::last_os_error();
        return Err(std::io::Error::new(error.kind(), format!("creating TAP {name}: {error}")));
    }
    Ok(file)
}

impl TapPort {
    /// Creates (or attaches to) TAP `name` and plugs it into `switch`.
    pub fn start(name: &str, switch: Arc<Switch>) -> std::io::Result<TapPort> {
        let file = open_tap(name)?;
        let reader = file.try_clone()?;
        let wire = Arc::new(TapWire { file, dropped: AtomicU64::new(0) });
        let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(wire.clone() as Arc<dyn SwitchPort>));
        let port_id = switch.attach(weak, None).map_err(std::io::Error::other)?;
        let stop = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let (quit, thread_switch) = (stop.try_clone()?, switch.clone());
        let thread = std::thread::Builder::new()
            .name(format!("{name}-tap"))
            .spawn(move || read_frames(reader, &thread_switch, port_id, &quit))?;
        tracing::info!(tap = %name, switch = %switch.name(), "TAP device bridged");
        Ok(TapPort { wire, switch, port_id, stop, thread: Some(thread) })
    }

    /// Frames the host side could not take.
    pub fn dropped(&self) -> u64 {
        self.wire.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for TapPort {
    fn drop(&mut self) {
        self.switch.detach(self.port_id);
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves frames the host sends on the TAP into the switch until `stop`.
fn read_frames(mut tap: File, switch: &Switch, port_id: PortId, stop: &EventFd) {
    let mut buffer = vec![0u8; 65536];
    loop {
        let mut fds = [
            libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll on two valid pollfds we own.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if ready < 0 || fds[1].revents != 0 {
            return;
        }
        match tap.read(&mut buffer) {
            Ok(len) if len <= guest_abi::nic::MAX_FRAME as usize => switch.forward(port_id, &buffer[..len]),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::warn!(%error, "reading the TAP device failed; the port stops");
                return;
            }
        }
    }
}
