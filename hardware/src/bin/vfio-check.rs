//! `vfio-check ADDRESS`: exercises the project's VFIO code (`hardware::vfio`)
//! on a real NVMe function bound to vfio-pci, with the NVMe driver core
//! hosted in this process instead of a driver VM (for machines whose VFIO
//! host has no KVM: `ci/e2e-vfio.sh` runs it in a TCG guest with an
//! emulated IOMMU). Prints one `VFIO-CHECK:` line per stage and exits 0
//! only if every stage passed:
//!
//! 1. bad addresses and a function not bound to vfio-pci are clear errors;
//! 2. `VfioNvme::start`: container, group, IOMMU mapping of the DMA region
//!    only, the reflector's own identify (capacity), reset, MSI-X;
//! 3. through the BAR0 window as a driver maps it: 128 KiB written through
//!    a PRP list, flushed, read back; MSI-X interrupts reach the route;
//! 4. quiesce: bus mastering off and a function reset; what the dead
//!    driver rings afterwards never runs; the next driver resets and reads
//!    the data back;
//! 5. a driver pointing its PRPs outside the DMA region: the IOMMU blocks
//!    the transfer (nothing reaches the disk or the region).
//!
//! `vfio-check --pattern` prints the 128 KiB written in stage 3, for the
//! host to compare with the image afterwards.
//!
//! `vfio-check --nic ADDRESS MAC` does the same for an e1000e NIC
//! (`VfioNic`): its MAC address read through the BAR0 window, MSI reaching
//! the route (an interrupt cause set by hand), a frame sent through a
//! transmit ring in the DMA region (the card writes the descriptor back
//! through the IOMMU), and quiesce resetting the card.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hardware::shared_eventfd::SharedEventFd;
use hardware::shm::SharedMemory;
use hardware::vfio::{MappedDma, MappedRegisters, Stopwatch, VfioError, VfioFunction, VfioNic, VfioNvme, DMA_BASE};
use hardware::{BlockHardware, Hardware, NetHardware};
use nvme::{Controller, IoCommand, Layout};

/// Data buffers, then the driver's queue area, then the reflector's.
const BUFFERS: usize = 1 << 20;
const DRIVER_AREA: usize = BUFFERS;
const REFLECTOR_AREA: usize = BUFFERS + Layout::AREA;
const DMA_LEN: usize = BUFFERS + 2 * Layout::AREA;
/// Where stage 3 writes on the disk, and how much.
const DATA_OFFSET: u64 = 1 << 20;
const DATA_LEN: usize = 128 << 10;
const BOUND: Duration = Duration::from_secs(30);

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 12) as u8)).collect()
}

/// A driver's view of the DMA region, its data pointers shifted by
/// `shift` (0: honest).
struct Dma<'a> {
    inner: MappedDma<'a>,
    shift: u64,
}

impl nvme::DmaMemory for Dma<'_> {
    fn device_address(&self, offset: usize) -> u64 {
        let shift = if offset < BUFFERS { self.shift } else { 0 };
        self.inner.device_address(offset) + shift
    }
    fn write(&self, offset: usize, bytes: &[u8]) {
        self.inner.write(offset, bytes)
    }
    fn read(&self, offset: usize, bytes: &mut [u8]) {
        self.inner.read(offset, bytes)
    }
}

type Driver<'a> = Controller<MappedRegisters<'a>, Dma<'a>, Stopwatch>;

fn driver<'a>(regs: &'a SharedMemory, dma: &'a SharedMemory, shift: u64) -> Result<Driver<'a>, String> {
    Controller::start(
        MappedRegisters(regs),
        Dma { inner: MappedDma { memory: dma, offset: 0 }, shift },
        Stopwatch(Instant::now()),
        Layout::at(DRIVER_AREA),
    )
    .map_err(|e| format!("the controller did not come up: {e:?}"))
}

fn run(controller: &mut Driver<'_>, cid: u16, command: IoCommand) -> Result<u16, String> {
    controller.submit(cid, command).map_err(|e| format!("{command:?} refused: {e:?}"))?;
    controller.ring();
    let deadline = Instant::now() + BOUND;
    let mut status = None;
    while status.is_none() {
        if Instant::now() > deadline {
            return Err(format!("no completion for {command:?} within {BOUND:?}"));
        }
        controller.reap(|_, code| status = Some(code));
        std::thread::yield_now();
    }
    Ok(status.unwrap_or(u16::MAX))
}

fn stage(name: &str, result: Result<String, String>) -> bool {
    match result {
        Ok(detail) => {
            println!("VFIO-CHECK: pass {name}: {detail}");
            true
        }
        Err(error) => {
            println!("VFIO-CHECK: FAIL {name}: {error}");
            false
        }
    }
}

fn errors(address: &str) -> Result<String, String> {
    let mut seen = Vec::new();
    for (bad, wanted) in [("01:00.0", "not a PCI address"), ("ffff:ff:1f.7", "no such PCI device")] {
        match VfioFunction::open(bad) {
            Err(error) if error.to_string().contains(wanted) => seen.push(error.to_string()),
            Err(error) => return Err(format!("{bad}: unexpected error {error}")),
            Ok(_) => return Err(format!("{bad} opened")),
        }
    }
    // The host bridge is bound to no driver, or not to vfio-pci.
    match VfioFunction::open("0000:00:00.0") {
        Err(error @ VfioError::NotBound { .. }) => seen.push(error.to_string()),
        other => return Err(format!("the host bridge: expected NotBound, got {:?}", other.err())),
    }
    // The function is ours already: a second opener is refused.
    let _ = address;
    Ok(seen.join(" | "))
}

fn check(address: &str) -> Result<(), String> {
    let mut passed = stage("errors", errors(address));
    let dma = Arc::new(SharedMemory::new("vfio-dma", DMA_LEN).map_err(|e| e.to_string())?);
    let nvme = VfioNvme::start(address, false, &dma, 0, DMA_LEN, REFLECTOR_AREA).map_err(|e| e.to_string())?;
    passed &= stage(
        "start",
        Ok(format!(
            "capacity {} sectors, DMA region {DMA_LEN:#x} bytes at IOMMU address {DMA_BASE:#x}",
            nvme.capacity_sectors()
        )),
    );
    match VfioFunction::open(address) {
        Err(VfioError::InUse { .. }) | Err(VfioError::Call { .. }) => {}
        other => {
            passed &= stage("exclusive", Err(format!("a second open: {:?}", other.map(|_| "opened"))));
        }
    }
    let interrupts = SharedEventFd::new().map_err(|e| e.to_string())?;
    nvme.interrupt().route(interrupts.try_clone().map_err(|e| e.to_string())?);
    let windows = nvme.windows();
    let regs = windows.iter().find(|w| w.name == "regs").ok_or("no regs window")?.memory.clone();
    let data = pattern(DATA_LEN);
    passed &= stage(
        "io",
        (|| {
            let mut controller = driver(&regs, &dma, 0)?;
            dma.slice(0, DATA_LEN).ok_or("slice")?.copy_from(&data[..]);
            let write = IoCommand::Write { offset: DATA_OFFSET, len: DATA_LEN as u32, buffer: 0 };
            match run(&mut controller, 1, write)? {
                0 => {}
                status => return Err(format!("write status {status:#x}")),
            }
            match run(&mut controller, 2, IoCommand::Flush)? {
                0 => {}
                status => return Err(format!("flush status {status:#x}")),
            }
            let read = IoCommand::Read { offset: DATA_OFFSET, len: DATA_LEN as u32, buffer: 512 << 10 };
            match run(&mut controller, 3, read)? {
                0 => {}
                status => return Err(format!("read status {status:#x}")),
            }
            let mut back = vec![0u8; DATA_LEN];
            dma.slice(512 << 10, DATA_LEN).ok_or("slice")?.copy_to(&mut back[..]);
            if back != data {
                return Err("the data read back differs".into());
            }
            let raised = interrupts.take().unwrap_or(0);
            if raised == 0 {
                return Err("no MSI-X interrupt reached the route".into());
            }
            Ok(format!("128 KiB written, flushed, read back; {raised} interrupts"))
        })(),
    );
    passed &= stage(
        "quiesce",
        (|| {
            let mut dead = driver(&regs, &dma, 0)?;
            dma.slice(0, 4096).ok_or("slice")?.copy_from(&[0xa5u8; 4096][..]);
            dead.submit(1, IoCommand::Write { offset: 0, len: 4096, buffer: 0 }).map_err(|e| format!("{e:?}"))?;
            nvme.quiesce();
            if nvme.function().bus_master().map_err(|e| e.to_string())? {
                return Err("bus mastering still on after quiesce".into());
            }
            let ready = regs.atomic_u32(0x1c).load(std::sync::atomic::Ordering::Acquire) & 1;
            // The dead driver rings after its death.
            dead.ring();
            nvme.resume();
            if !nvme.function().bus_master().map_err(|e| e.to_string())? {
                return Err("bus mastering off after resume".into());
            }
            let mut next = driver(&regs, &dma, 0)?;
            let read = IoCommand::Read { offset: 0, len: 4096, buffer: 8192 };
            match run(&mut next, 1, read)? {
                0 => {}
                status => return Err(format!("read status {status:#x}")),
            }
            let mut back = vec![0u8; 4096];
            dma.slice(8192, 4096).ok_or("slice")?.copy_to(&mut back[..]);
            if back.contains(&0xa5) {
                return Err("a write the dead driver rang after quiesce ran".into());
            }
            let read = IoCommand::Read { offset: DATA_OFFSET, len: 4096, buffer: 8192 };
            run(&mut next, 2, read)?;
            dma.slice(8192, 4096).ok_or("slice")?.copy_to(&mut back[..]);
            if back[..] != data[..4096] {
                return Err("the next driver reads other data".into());
            }
            Ok(format!(
                "CSTS.RDY {ready} after reset; the dead driver's write never ran; the next driver reads the data"
            ))
        })(),
    );
    passed &= stage(
        "hostile",
        (|| {
            // Data pointers 64 MiB past the region: no IOMMU mapping.
            let mut hostile = driver(&regs, &dma, 64 << 20)?;
            dma.slice(0, 8192).ok_or("slice")?.copy_from(&[0x5au8; 8192][..]);
            let write_status = run(&mut hostile, 1, IoCommand::Write { offset: 0, len: 8192, buffer: 0 })?;
            let before: Vec<u8> = (0..BUFFERS).map(|i| (i % 251) as u8).collect();
            dma.slice(0, BUFFERS).ok_or("slice")?.copy_from(&before[..]);
            let read_status = run(&mut hostile, 2, IoCommand::Read { offset: DATA_OFFSET, len: 8192, buffer: 0 })?;
            let mut after = vec![0u8; BUFFERS];
            dma.slice(0, BUFFERS).ok_or("slice")?.copy_to(&mut after[..]);
            if after != before {
                return Err("a read pointed outside the region changed the region".into());
            }
            // The hostile driver is gone (its controller value unused from here).
            nvme.quiesce();
            nvme.resume();
            let mut honest = driver(&regs, &dma, 0)?;
            run(&mut honest, 1, IoCommand::Read { offset: 0, len: 8192, buffer: 0 })?;
            let mut disk = vec![0u8; 8192];
            dma.slice(0, 8192).ok_or("slice")?.copy_to(&mut disk[..]);
            if disk.contains(&0x5a) {
                return Err(format!("a write from outside the region (status {write_status:#x}) carried data"));
            }
            Ok(format!(
                "write status {write_status:#x}, read status {read_status:#x}: nothing moved; the next driver works"
            ))
        })(),
    );
    if passed {
        Ok(())
    } else {
        Err("a stage failed".into())
    }
}

/// e1000e registers and bits (Intel 82574L datasheet, section 10).
mod e1000e {
    pub const ICR: usize = 0x00c0;
    pub const ICS: usize = 0x00c8;
    pub const IMS: usize = 0x00d0;
    pub const TCTL: usize = 0x0400;
    pub const TDBAL: usize = 0x3800;
    pub const TDBAH: usize = 0x3804;
    pub const TDLEN: usize = 0x3808;
    pub const TDH: usize = 0x3810;
    pub const TDT: usize = 0x3818;
    /// Interrupt cause: link status change.
    pub const LSC: u32 = 1 << 2;
    /// TCTL: enable, pad short packets.
    pub const TCTL_EN_PSP: u32 = (1 << 1) | (1 << 3);
    /// Descriptor command: end of packet, insert FCS, report status.
    pub const CMD_EOP_IFCS_RS: u8 = 0b1011;
    /// Descriptor status: done.
    pub const STA_DD: u8 = 1;
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + BOUND;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {BOUND:?}"));
        }
        std::thread::yield_now();
    }
    Ok(())
}

fn check_nic(address: &str, expected_mac: &str) -> Result<(), String> {
    use std::sync::atomic::Ordering::{Acquire, Release};
    let dma = Arc::new(SharedMemory::new("vfio-nic-dma", DMA_LEN).map_err(|e| e.to_string())?);
    let nic = VfioNic::start(address, &dma, 0, DMA_LEN).map_err(|e| e.to_string())?;
    let mac = nic.mac().iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let mut passed = stage(
        "nic start",
        if mac == expected_mac {
            Ok(format!("MAC {mac}, link up {}", nic.link_up()))
        } else {
            Err(format!("MAC {mac}, expected {expected_mac}"))
        },
    );
    let interrupts = SharedEventFd::new().map_err(|e| e.to_string())?;
    nic.interrupt().route(interrupts.try_clone().map_err(|e| e.to_string())?);
    let windows = nic.windows();
    let regs = windows.iter().find(|w| w.name == "regs").ok_or("no regs window")?.memory.clone();
    let set = |offset: usize, value: u32| regs.atomic_u32(offset).store(value, Release);
    let get = |offset: usize| regs.atomic_u32(offset).load(Acquire);
    passed &= stage(
        "nic interrupt",
        (|| {
            set(e1000e::IMS, e1000e::LSC);
            set(e1000e::ICS, e1000e::LSC);
            let mut raised = 0;
            wait_until("an MSI from the card", || {
                raised += interrupts.take().unwrap_or(0);
                raised > 0
            })?;
            let cause = get(e1000e::ICR);
            Ok(format!("{raised} MSI delivered, cause {cause:#x}"))
        })(),
    );
    passed &= stage(
        "nic transmit",
        (|| {
            // A ring of 8 descriptors at 512 KiB, one 60-byte frame at 0.
            let (ring, frame) = (512usize << 10, 0usize);
            dma.slice(ring, 8 * 16).ok_or("slice")?.copy_from(&[0u8; 128][..]);
            let mut bytes = [0u8; 60];
            bytes[..6].copy_from_slice(&[0xff; 6]);
            bytes[6..12].copy_from_slice(&nic.mac());
            bytes[12..14].copy_from_slice(&[0x88, 0xb5]);
            dma.slice(frame, 60).ok_or("slice")?.copy_from(&bytes[..]);
            let mut descriptor = [0u8; 16];
            descriptor[..8].copy_from_slice(&(DMA_BASE + frame as u64).to_le_bytes());
            descriptor[8..10].copy_from_slice(&60u16.to_le_bytes());
            descriptor[11] = e1000e::CMD_EOP_IFCS_RS;
            dma.slice(ring, 16).ok_or("slice")?.copy_from(&descriptor[..]);
            let address = DMA_BASE + ring as u64;
            set(e1000e::TDBAL, address as u32);
            set(e1000e::TDBAH, (address >> 32) as u32);
            set(e1000e::TDLEN, 8 * 16);
            set(e1000e::TDH, 0);
            set(e1000e::TDT, 0);
            set(e1000e::TCTL, e1000e::TCTL_EN_PSP);
            set(e1000e::TDT, 1);
            let status = || dma.read::<u8>(ring + 12).unwrap_or(0);
            wait_until("the card writing the descriptor back", || status() & e1000e::STA_DD != 0)?;
            Ok(format!(
                "frame sent; descriptor written back through the IOMMU (status {:#x}), TDH {}",
                status(),
                get(e1000e::TDH)
            ))
        })(),
    );
    passed &= stage(
        "nic quiesce",
        (|| {
            set(e1000e::IMS, e1000e::LSC);
            nic.quiesce();
            if nic.function().bus_master().map_err(|e| e.to_string())? {
                return Err("bus mastering still on after quiesce".into());
            }
            let (tctl, tdbal) = (get(e1000e::TCTL), get(e1000e::TDBAL));
            nic.resume();
            if tctl & 2 != 0 || tdbal != 0 {
                return Err(format!("the reset left the transmitter set up (TCTL {tctl:#x}, TDBAL {tdbal:#x})"));
            }
            Ok(format!("bus mastering off, card reset (TCTL {tctl:#x}, TDBAL {tdbal:#x})"))
        })(),
    );
    if passed {
        Ok(())
    } else {
        Err("a stage failed".into())
    }
}

/// The host's end of the guest NIC's cable (a datagram socket at `path`):
/// waits for the frame `check_nic` sends, from `mac`, with the test's
/// EtherType.
fn receive_frame(path: &str, mac: &str) -> Result<usize, String> {
    let socket = std::os::unix::net::UnixDatagram::bind(path).map_err(|e| format!("binding {path}: {e}"))?;
    socket.set_read_timeout(Some(Duration::from_secs(300))).map_err(|e| e.to_string())?;
    let mut frame = [0u8; 2048];
    loop {
        let len = socket.recv(&mut frame).map_err(|e| format!("no frame on {path}: {e}"))?;
        let source = frame[6..12].iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        if len >= 14 && source == mac && frame[12..14] == [0x88, 0xb5] {
            return Ok(len);
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--pattern"] => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&pattern(DATA_LEN));
            ExitCode::SUCCESS
        }
        ["--receive", path, mac] => match receive_frame(path, mac) {
            Ok(len) => {
                println!("VFIO-CHECK: pass wire: a {len}-byte frame from {mac} arrived");
                ExitCode::SUCCESS
            }
            Err(error) => {
                println!("VFIO-CHECK: FAIL wire: {error}");
                ExitCode::FAILURE
            }
        },
        ["--nic", address, mac] => match check_nic(address, mac) {
            Ok(()) => {
                println!("VFIO-CHECK: pass nic");
                ExitCode::SUCCESS
            }
            Err(error) => {
                println!("VFIO-CHECK: FAIL {error}");
                ExitCode::FAILURE
            }
        },
        [address] => match check(address) {
            Ok(()) => {
                println!("VFIO-CHECK: pass");
                ExitCode::SUCCESS
            }
            Err(error) => {
                println!("VFIO-CHECK: FAIL {error}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: vfio-check ADDRESS (an NVMe function bound to vfio-pci) | --nic ADDRESS MAC | --pattern");
            ExitCode::from(2)
        }
    }
}
