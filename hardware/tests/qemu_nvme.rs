//! QEMU's own NVMe controller as the hardware, driven from the host by the
//! `nvme` driver core over qtest (the hosted form of the NVMe driver):
//! bring-up, I/O through PRP lists into the DMA region, the image holding
//! what was written, quiesce and reset for the next driver, and a driver
//! that points the controller outside its DMA region.
//!
//! Needs `qemu-system-x86_64` (set QEMU to another binary); with CI set it
//! must be there.

// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hardware::qemu::{Dma as DmaRange, Drive, DriveAio, Model, QemuModel, DMA_BASE};
use hardware::shm::SharedMemory;
use hardware::InterruptRoute;
use nvme::{Controller, IoCommand, Layout};
use vmm_sys_util::eventfd::EventFd;

/// Bytes of data buffers before the driver's queue area.
const BUFFERS: usize = 1 << 20;
const IMAGE_SIZE: u64 = 64 << 20;
/// Longest wait for a command (QEMU answers in microseconds).
const BOUND: Duration = Duration::from_secs(20);

fn qemu() -> Option<PathBuf> {
    let qemu = PathBuf::from(std::env::var_os("QEMU").unwrap_or_else(|| "qemu-system-x86_64".into()));
    let found = std::process::Command::new(&qemu).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{} is missing and CI is set", qemu.display());
        eprintln!("\n*** SKIPPING: {} is missing ***\n", qemu.display());
    }
    found.then_some(qemu)
}

struct Bar<'a>(&'a QemuModel);

impl nvme::Registers for Bar<'_> {
    fn read32(&self, offset: usize) -> u32 {
        self.0.read32(offset as u64).expect("QEMU answers").unwrap_or(u32::MAX)
    }

    fn write32(&self, offset: usize, value: u32) {
        self.0.write32(offset as u64, value).expect("QEMU answers");
    }
}

/// How far a hostile driver moves the addresses it gives the controller:
/// its queues' and its data buffers'.
#[derive(Clone, Copy)]
struct Shift {
    queues: u64,
    data: u64,
}

const HONEST: Shift = Shift { queues: 0, data: 0 };

/// The DMA region as the driver sees it.
struct Dma<'a> {
    memory: &'a SharedMemory,
    shift: Shift,
}

impl nvme::DmaMemory for Dma<'_> {
    fn device_address(&self, offset: usize) -> u64 {
        let shift = if offset < BUFFERS { self.shift.data } else { self.shift.queues };
        (DMA_BASE + offset as u64).wrapping_add(shift)
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        self.memory.slice(offset, bytes.len()).unwrap().copy_from(bytes);
    }

    fn read(&self, offset: usize, bytes: &mut [u8]) {
        self.memory.slice(offset, bytes.len()).unwrap().copy_to(bytes);
    }
}

struct Clock(Instant);

impl nvme::Clock for Clock {
    fn now_us(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

struct Rig {
    _dir: tempdir::Dir,
    image: PathBuf,
    memory: SharedMemory,
    model: QemuModel,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!("qemu-nvme-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Rig {
    fn start(qemu: &std::path::Path, tag: &str) -> Rig {
        Rig::start_with(qemu, tag, DriveAio::Threads)
    }

    fn start_with(qemu: &std::path::Path, tag: &str, aio: DriveAio) -> Rig {
        let dir = tempdir::Dir::new(tag);
        let image = dir.0.join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
        let memory = SharedMemory::new("dma", BUFFERS + Layout::AREA).unwrap();
        let model = QemuModel::start(
            qemu,
            Model::Nvme(Drive { aio, ..Drive::new(image.clone()) }),
            "drvm-test",
            DmaRange { memory: &memory, offset: 0, len: memory.size() },
            Arc::new(InterruptRoute::default()),
            None,
            None,
        )
        .unwrap();
        Rig { _dir: dir, image, memory, model }
    }

    fn controller(&self, shift: Shift) -> Result<Controller<Bar<'_>, Dma<'_>, Clock>, nvme::Error> {
        Controller::start(
            Bar(&self.model),
            Dma { memory: &self.memory, shift },
            Clock(Instant::now()),
            Layout::at(BUFFERS),
        )
    }
}

/// Runs `command` as id `cid` to completion; its status.
fn run(controller: &mut Controller<Bar<'_>, Dma<'_>, Clock>, cid: u16, command: IoCommand) -> u16 {
    controller.submit(cid, command).unwrap();
    controller.ring();
    let deadline = Instant::now() + BOUND;
    let mut status = None;
    while status.is_none() {
        assert!(Instant::now() < deadline, "no completion for {command:?}");
        controller.reap(|id, code| {
            assert_eq!(id, cid, "a completion for a command never sent");
            status = Some(code);
        });
    }
    status.unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect()
}

#[test]
fn the_driver_core_moves_data_through_qemus_nvme_controller() {
    let Some(qemu) = qemu() else { return };
    for aio in [DriveAio::Threads, DriveAio::IoUring] {
        moves_data_through_qemus_nvme_controller(&Rig::start_with(&qemu, "io", aio));
    }
}

fn moves_data_through_qemus_nvme_controller(rig: &Rig) {
    let mut controller = rig.controller(HONEST).unwrap();
    assert!(controller.shadow_doorbells(), "QEMU's controller offers the shadow doorbell buffer (OACS bit 8)");
    let namespace = controller.namespace();
    assert_eq!((namespace.bytes(), namespace.block_shift), (IMAGE_SIZE, 9));
    // 128 KiB: PRP1 and a list of 31 entries.
    let data = pattern(3, 128 << 10);
    rig.memory.slice(0, data.len()).unwrap().copy_from(&data[..]);
    let write = IoCommand::Write { offset: 1 << 20, len: data.len() as u32, buffer: 0 };
    assert_eq!(run(&mut controller, 7, write), 0);
    assert_eq!(run(&mut controller, 8, IoCommand::Flush), 0);
    let on_disk = std::fs::read(&rig.image).unwrap();
    assert_eq!(&on_disk[1 << 20..(1 << 20) + data.len()], &data[..], "the image does not hold what was written");
    // Two pages (PRP2 is the second page) and one page, read back elsewhere.
    for (len, cid) in [(8192usize, 9u16), (4096, 10)] {
        let read = IoCommand::Read { offset: 1 << 20, len: len as u32, buffer: 256 << 10 };
        assert_eq!(run(&mut controller, cid, read), 0);
        let mut back = vec![0u8; len];
        rig.memory.slice(256 << 10, len).unwrap().copy_to(&mut back[..]);
        assert_eq!(back, data[..len]);
    }
    // Requests the driver cannot express are refused before the device.
    for bad in [
        IoCommand::Read { offset: 100, len: 512, buffer: 0 },
        IoCommand::Read { offset: 0, len: 100, buffer: 0 },
        IoCommand::Read { offset: IMAGE_SIZE, len: 512, buffer: 0 },
        IoCommand::Read { offset: 0, len: 512, buffer: 1 },
    ] {
        assert_eq!(controller.submit(1, bad), Err(nvme::Error::Request), "{bad:?}");
    }
}

#[test]
fn a_quiesced_controller_does_nothing_until_the_next_driver_resets_it() {
    let Some(qemu) = qemu() else { return };
    let rig = Rig::start(&qemu, "quiesce");
    let mut first = rig.controller(HONEST).unwrap();
    let old = pattern(5, 4096);
    rig.memory.slice(0, 4096).unwrap().copy_from(&old[..]);
    assert_eq!(run(&mut first, 1, IoCommand::Write { offset: 0, len: 4096, buffer: 0 }), 0);
    // The driver dies with a write queued but not rung; the device is
    // quiesced; what the dead driver rings afterwards is dropped.
    first.submit(2, IoCommand::Write { offset: 8192, len: 4096, buffer: 0 }).unwrap();
    rig.model.quiesce().unwrap();
    first.ring();
    assert_eq!(rig.model.read32(0x1c).unwrap(), None, "BAR reads answered while quiesced");
    rig.model.resume().unwrap();
    let on_disk = std::fs::read(&rig.image).unwrap();
    assert_eq!(&on_disk[8192..8192 + 4096], &[0u8; 4096][..], "a dead driver's command ran");
    // The next driver resets the controller and works.
    let mut next = rig.controller(HONEST).unwrap();
    assert_eq!(run(&mut next, 1, IoCommand::Read { offset: 0, len: 4096, buffer: 4096 }), 0);
    let mut back = vec![0u8; 4096];
    rig.memory.slice(4096, 4096).unwrap().copy_to(&mut back[..]);
    assert_eq!(back, old);
}

#[test]
fn a_driver_pointing_the_controller_outside_its_dma_region_reaches_nothing() {
    let Some(qemu) = qemu() else { return };
    let rig = Rig::start(&qemu, "hostile");
    let outside = rig.memory.size() as u64 + (1 << 20);
    // Queues outside the region: the controller fails (CSTS.CFS) at the
    // first command instead of finding commands anywhere else.
    let refused = rig.controller(Shift { queues: outside, data: 0 });
    assert!(matches!(refused, Err(nvme::Error::Fatal)), "{:?}", refused.err());
    // Queues inside, data pointers outside (a hostile driver's PRPs). The
    // QEMU machine holds its own read-only RAM and the DMA region, nothing
    // of the reflector's: whatever the controller transfers there comes
    // from, or goes to, no memory at all.
    let mut controller = rig.controller(Shift { queues: 0, data: outside }).unwrap();
    let secret = pattern(9, 8192);
    rig.memory.slice(0, 8192).unwrap().copy_from(&secret[..]);
    let write = IoCommand::Write { offset: 0, len: 8192, buffer: 0 };
    let status = run(&mut controller, 1, write);
    let image = std::fs::read(&rig.image).unwrap();
    assert!(
        image[..8192].iter().all(|&byte| byte == image[0]) && image[..8192] != secret[..],
        "a write from outside the region (status {status:#x}) carried data: {:?}",
        &image[..16]
    );
    std::fs::write(&rig.image, pattern(4, IMAGE_SIZE as usize)).unwrap();
    let read = IoCommand::Read { offset: 0, len: 8192, buffer: 0 };
    let _ = run(&mut controller, 2, read);
    let mut region = vec![0u8; 8192];
    rig.memory.slice(0, 8192).unwrap().copy_to(&mut region[..]);
    assert_eq!(region, secret, "a read pointed outside the region changed the region");
}

/// A device model is a bus master of its whole machine, not only of its
/// DMA region: a hostile driver's data pointers (or, on the e1000e, a
/// frame looped back to any address) reach the machine's RAM and devices.
/// Its RAM takes no write (a NIC machine's vCPU runs, and an interrupt
/// table and code written there ran on it, past every reset of the device
/// and every driver after it: an adversarial review found it), and it has
/// no HPET, whose timers a dead driver could leave raising the device's
/// interrupt line for its successors.
#[test]
fn the_machine_outside_the_dma_region_takes_no_write_and_has_no_timer() {
    let Some(qemu) = qemu() else { return };
    let rig = Rig::start(&qemu, "machine");
    let aimed_at = |address: u64| rig.controller(Shift { queues: 0, data: address.wrapping_sub(DMA_BASE) }).unwrap();
    let code = pattern(5, 4096);
    let mut image = std::fs::read(&rig.image).unwrap();
    image[..4096].copy_from_slice(&code);
    std::fs::write(&rig.image, &image).unwrap();
    // The machine's RAM: the image's block read into it, then written out
    // of it to another block.
    let mut controller = aimed_at(0x1000);
    let _ = run(&mut controller, 1, IoCommand::Read { offset: 0, len: 4096, buffer: 0 });
    let _ = run(&mut controller, 2, IoCommand::Write { offset: 4096, len: 4096, buffer: 0 });
    let _ = run(&mut controller, 3, IoCommand::Flush);
    let image = std::fs::read(&rig.image).unwrap();
    assert_ne!(&image[4096..8192], &code[..], "the device wrote the machine's RAM");
    assert!(
        image[4096..8192].iter().all(|&byte| byte == 0xf4),
        "the machine's RAM is not all hlt: {:?}",
        &image[4096..4112]
    );
    // Where q35 puts its HPET: its capabilities (vendor 0x8086 in bits
    // 16-31) must not come back.
    let mut controller = aimed_at(0xfed0_0000);
    let _ = run(&mut controller, 4, IoCommand::Write { offset: 8192, len: 4096, buffer: 0 });
    let _ = run(&mut controller, 5, IoCommand::Flush);
    let image = std::fs::read(&rig.image).unwrap();
    assert_ne!(&image[8194..8196], &[0x86, 0x80], "the machine has an HPET: {:?}", &image[8192..8200]);
}

/// Waits (bounded) until `controller` has a completion posted.
fn wait_for_completion(controller: &Controller<Bar<'_>, Dma<'_>, Clock>) {
    let deadline = Instant::now() + BOUND;
    while !controller.completion_posted() {
        assert!(Instant::now() < deadline, "no completion posted");
        std::thread::yield_now();
    }
}

/// How a driver dies, as far as its controller's interrupt is concerned.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// An I/O completion posted and not reaped, its interrupt unmasked.
    Unmasked,
    /// The same, its interrupt masked.
    Masked,
    /// An admin command's completion posted and not reaped.
    AdminUnreaped,
    /// Writes and flushes still in the controller's hands: they end
    /// during the quiesce, bus mastering off by then.
    InFlight,
}

/// Commands a dying driver leaves in flight: 128 KiB writes, every
/// eighth a flush (which waits for the disk).
const IN_FLIGHT: u16 = 120;

/// Submits Get Features (Number of Queues) on the admin queue the
/// controller `start` set up at `Layout::at(BUFFERS)`, as a driver that
/// writes its own admin commands would, and waits for its completion,
/// which is never reaped.
fn leave_an_admin_completion(model: &QemuModel, memory: &SharedMemory) {
    let mut command = nvme::Submission::new(0x0a, 0x55);
    command.cdw[0] = 0x07;
    submit_admin(model, memory, command);
}

/// Submits `command` on the admin queue the controller `start` set up at
/// `Layout::at(BUFFERS)`, as a driver that writes its own admin commands
/// would, and waits for its completion, which is never reaped.
fn submit_admin(model: &QemuModel, memory: &SharedMemory, command: nvme::Submission) {
    let (admin_sq, admin_cq) = (BUFFERS, BUFFERS + nvme::PAGE);
    // The admin queue has not wrapped: the entries bringing up the
    // controller took the first slots, each with phase 1.
    let phase = |slot: usize| {
        let mut entry = [0u8; 16];
        memory.slice(admin_cq + 16 * slot, 16).unwrap().copy_to(&mut entry);
        entry[14] & 1 == 1
    };
    let tail = (0..32).take_while(|&slot| phase(slot)).count();
    assert!(tail < 31, "the admin queue wrapped during bring-up");
    memory.slice(admin_sq + 64 * tail, 64).unwrap().copy_from(&command.to_bytes());
    model.write32(nvme::regs::DOORBELLS as u64, tail as u32 + 1).unwrap();
    let deadline = Instant::now() + BOUND;
    while !phase(tail) {
        assert!(Instant::now() < deadline, "no admin completion");
        std::thread::yield_now();
    }
}

/// QEMU's controller counts completion queues with completions pending
/// (for its INTx line) and a controller reset frees the queues without
/// uncounting them: a driver that dies with a completion unreaped leaves
/// the count up for good, and the line then stays asserted whenever the
/// next driver unmasks its interrupt, reaped or not: an interrupt on every
/// unmask, so a successor never sleeps, and no edge for its completions.
/// Commands that end during the quiesce count too (bus mastering off,
/// the controller reads a shadow head of 0 and finds its queue non-empty).
/// However the driver died, the quiesce must hand the next driver a device
/// whose line is low once its completions are reaped, without starting
/// QEMU again.
#[test]
fn a_driver_that_dies_with_a_completion_unreaped_leaves_its_successor_a_working_interrupt() {
    use hardware::qemu::{ProcessSpec, SupervisedModel};
    let Some(qemu) = qemu() else { return };
    for death in [Death::Unmasked, Death::Masked, Death::AdminUnreaped, Death::InFlight] {
        let dir = tempdir::Dir::new(&format!("stale-interrupt-{death:?}"));
        let image = dir.0.join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
        let memory = Arc::new(SharedMemory::new("dma", BUFFERS + Layout::AREA).unwrap());
        let route = Arc::new(InterruptRoute::default());
        let interrupts = hardware::shared_eventfd::SharedEventFd::new().unwrap();
        route.route(interrupts.try_clone().unwrap());
        let supervised = SupervisedModel::start(ProcessSpec {
            qemu: qemu.clone(),
            model: Model::Nvme(Drive::new(image)),
            serial: "drvm-stale".into(),
            dma: memory.clone(),
            offset: 0,
            len: memory.size(),
            interrupt: route,
            wire: None,
            jail: None,
            posted_mirror: None,
            work: None,
        })
        .unwrap();
        fn driver<'a>(model: &'a QemuModel, memory: &'a SharedMemory) -> Controller<Bar<'a>, Dma<'a>, Clock> {
            let dma = Dma { memory, shift: HONEST };
            Controller::start(Bar(model), dma, Clock(Instant::now()), Layout::at(BUFFERS)).unwrap()
        }
        let read = IoCommand::Read { offset: 0, len: 4096, buffer: 0 };
        {
            let model = supervised.current();
            let mut first = driver(&model, &memory);
            first.interrupts(true);
            match death {
                Death::Unmasked | Death::Masked => {
                    first.submit(1, read).unwrap();
                    first.ring();
                    wait_for_completion(&first);
                    if let Death::Masked = death {
                        first.interrupts(false);
                    }
                }
                Death::AdminUnreaped => leave_an_admin_completion(&model, &memory),
                Death::InFlight => {
                    assert!(first.shadow_doorbells(), "QEMU's controller offers shadow doorbells");
                    for cid in 1..=IN_FLIGHT {
                        let offset = u64::from(cid) << 17;
                        let command = match cid % 8 {
                            0 => IoCommand::Flush,
                            _ => IoCommand::Write { offset, len: 1 << 17, buffer: 0 },
                        };
                        first.submit(cid, command).unwrap();
                    }
                    first.ring();
                }
            }
            // The driver dies here, its completions never reaped.
        }
        supervised.quiesce();
        supervised.resume();
        let model = supervised.current();
        let mut next = driver(&model, &memory);
        for cid in 1..=3u16 {
            while interrupts.take().unwrap() > 0 {}
            // Idle and unmasked: a low line raises nothing.
            next.interrupts(true);
            assert!(
                interrupts.take().unwrap() == 0 && !model.line_asserted(),
                "{death:?}: command {cid}: the line is asserted with nothing to reap"
            );
            next.submit(cid, read).unwrap();
            next.ring();
            wait_for_completion(&next);
            next.interrupts(false);
            let mut done = Vec::new();
            next.reap(|id, status| done.push((id, status)));
            assert_eq!(done, [(cid, 0)], "{death:?}");
        }
        // And without the cost of a new QEMU process.
        assert_eq!(supervised.restarts(), 0, "{death:?}: the device's QEMU was started again");
    }
}

/// A dying driver that formatted its namespace to another LBA format
/// (Format NVM: 512-byte blocks with 8 bytes of metadata, or 4 KiB
/// blocks) leaves it so through the controller's reset: every later
/// driver's `Identify` finds a format it refuses, and the device failed
/// for good (an adversarial review found it). Renewing the model (what the
/// device does once drivers keep dying at their start,
/// `session::RENEW_AFTER`) gives the next driver a namespace as it was
/// configured. Before, 4 KiB blocks were accepted, and every request not
/// of whole 4 KiB blocks failed, with no driver dying to renew the model
/// (a later review found it).
#[test]
fn a_namespace_a_dead_driver_formatted_is_as_configured_once_the_model_is_renewed() {
    let Some(qemu) = qemu() else { return };
    // QEMU's LBA formats: 1 is 512 bytes and 8 of metadata, 4 is 4 KiB.
    for lba_format in [1, 4] {
        let (_dir, _image, memory, supervised) = supervised_nvme(qemu.clone(), "format", None);
        let start = |model: &QemuModel| {
            let dma = Dma { memory: &memory, shift: HONEST };
            Controller::start(Bar(model), dma, Clock(Instant::now()), Layout::at(BUFFERS)).map(|_| ())
        };
        let model = supervised.current();
        start(&model).unwrap();
        let mut format = nvme::Submission::new(0x80, 0x66);
        format.nsid = 1;
        format.cdw[0] = lba_format;
        submit_admin(&model, &memory, format);
        supervised.quiesce();
        supervised.resume();
        assert!(
            matches!(start(&supervised.current()), Err(nvme::Error::Format)),
            "LBA format {lba_format}: the driver after the one that formatted the namespace served it"
        );
        supervised.quiesce();
        supervised.renew();
        supervised.resume();
        assert_eq!(supervised.restarts(), 1);
        start(&supervised.current()).expect("the renewed model's namespace is not as configured");
    }
}

/// Reads a BAR0 register through a driver VM's trapped-window connection
/// (`guest_abi::trap`); None once the connection is closed.
fn trapped_read32(stream: &std::os::unix::net::UnixStream, offset: u32) -> Option<u32> {
    trapped_read(stream, 4, offset).map(|value| value as u32)
}

/// Reads `size` bytes of BAR0 through a driver VM's trapped-window
/// connection: the whole reply.
fn trapped_read(stream: &std::os::unix::net::UnixStream, size: u8, offset: u32) -> Option<u64> {
    use std::io::{Read, Write};
    let access = guest_abi::trap::Access { kind: guest_abi::trap::READ, size, offset, value: 0 };
    (&*stream).write_all(&access.encode()).ok()?;
    let mut reply = [0u8; guest_abi::trap::REPLY_LEN];
    (&*stream).read_exact(&mut reply).ok()?;
    Some(u64::from_le_bytes(reply))
}

/// A driver VM's connection to `trap` (a read timeout as its hang guard,
/// not a timing assertion) and the grant that keeps it.
fn trapped_connection(trap: &hardware::TrapWindow) -> (std::os::unix::net::UnixStream, hardware::AccessGrant) {
    let connection = (trap.connect)().unwrap();
    let stream = std::os::unix::net::UnixStream::from(connection.socket);
    stream.set_read_timeout(Some(BOUND)).unwrap();
    (stream, connection.grant)
}

/// Writes a BAR0 register through a driver VM's trapped-window connection;
/// whether the connection took it.
fn trapped_write32(stream: &std::os::unix::net::UnixStream, offset: u32, value: u32) -> bool {
    use std::io::Write;
    let access = guest_abi::trap::Access { kind: guest_abi::trap::WRITE, size: 4, offset, value: u64::from(value) };
    (&*stream).write_all(&access.encode()).is_ok()
}

/// A supervised QEMU process with an NVMe controller on a new image, its
/// DMA region a new shared memory (`posted_mirror`: see `ProcessSpec`).
fn supervised_nvme(
    qemu: PathBuf,
    tag: &str,
    posted_mirror: Option<usize>,
) -> (tempdir::Dir, PathBuf, Arc<SharedMemory>, Arc<hardware::qemu::SupervisedModel>) {
    supervised_nvme_within(qemu, tag, posted_mirror, None)
}

/// As [`supervised_nvme`], its driver's accesses charged to `work`.
fn supervised_nvme_within(
    qemu: PathBuf,
    tag: &str,
    posted_mirror: Option<usize>,
    work: Option<Arc<hardware::WorkAllowance>>,
) -> (tempdir::Dir, PathBuf, Arc<SharedMemory>, Arc<hardware::qemu::SupervisedModel>) {
    use hardware::qemu::{ProcessSpec, SupervisedModel};
    let dir = tempdir::Dir::new(tag);
    let image = dir.0.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
    let memory = Arc::new(SharedMemory::new("dma", BUFFERS + Layout::AREA).unwrap());
    let supervised = SupervisedModel::start(ProcessSpec {
        qemu,
        model: Model::Nvme(Drive::new(image.clone())),
        serial: format!("drvm-{tag}"),
        dma: memory.clone(),
        offset: 0,
        len: memory.size(),
        interrupt: Arc::new(InterruptRoute::default()),
        wire: None,
        jail: None,
        posted_mirror,
        work,
    })
    .unwrap();
    (dir, image, memory, Arc::new(supervised))
}

/// QEMU's standard error is a pipe nobody reads while it runs: a QEMU
/// that writes more than a pipe holds there (its NVMe model reports every
/// failed I/O so) has the rest dropped and goes on answering. Before, the
/// write waited for a reader, QEMU's main loop with it, every qtest command
/// timed out and QEMU was replaced, over and over (an adversarial review
/// found it). Here a wrapper writes 1 MiB before it execs QEMU.
#[test]
fn a_qemu_writing_more_than_a_pipe_holds_to_its_standard_error_goes_on_answering() {
    use std::os::unix::fs::PermissionsExt;
    let Some(qemu) = qemu() else { return };
    let dir = tempdir::Dir::new("noisy-qemu");
    let wrapper = dir.0.join("noisy-qemu");
    let script = format!("#!/bin/sh\nhead -c 1048576 /dev/zero >&2\nexec '{}' \"$@\"\n", qemu.display());
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_dir, _image, memory, supervised) = supervised_nvme(wrapper, "noisy", None);
    let dma = Dma { memory: &memory, shift: HONEST };
    let model = supervised.current();
    Controller::start(Bar(&model), dma, Clock(Instant::now()), Layout::at(BUFFERS))
        .expect("a QEMU that filled its standard error does not answer");
    assert_eq!(supervised.restarts(), 0);
}

/// A driver writing accesses to BAR0 without pause gets the proxy to
/// perform its allowance's worth and no more: the proxy takes nothing more
/// until more is granted, and then goes on. Before, the proxy performed
/// every access a driver wrote, each a qtest round trip on a reflector
/// thread, at no cost of the driver's (an adversarial review found it).
#[test]
fn a_driver_flooding_bar0_gets_its_allowances_worth_of_accesses_and_no_more() {
    use hardware::qemu::ACCESS_WORK;
    use std::io::{Read, Write};
    let Some(qemu) = qemu() else { return };
    const SPARE: u64 = 64;
    let work = Arc::new(hardware::WorkAllowance::with_spare(SPARE * ACCESS_WORK));
    let (_dir, _image, _memory, supervised) = supervised_nvme_within(qemu, "flood", None, Some(work.clone()));
    let trap = supervised.trap();
    let (stream, _grant) = trapped_connection(&trap);
    // A hang guard: a socket the proxy stopped reading fills.
    stream.set_write_timeout(Some(BOUND)).unwrap();
    // INTMS: setting interrupt mask bits, harmless to a disabled controller;
    // then a read of it, answered only once every write before it is done.
    // Fewer than the socket holds unread (each write is a buffer of its
    // own), more than the spare.
    const INTMS: u32 = 0x0c;
    const WRITES: u64 = 150;
    for _ in 0..WRITES {
        assert!(trapped_write32(&stream, INTMS, 1), "the proxy's socket filled");
    }
    let read = guest_abi::trap::Access { kind: guest_abi::trap::READ, size: 4, offset: INTMS, value: 0 };
    (&stream).write_all(&read.encode()).unwrap();
    let deadline = std::time::Instant::now() + BOUND;
    while !work.exhausted() {
        assert!(std::time::Instant::now() < deadline, "the spare was never spent");
        std::thread::yield_now();
    }
    // Not a timing assertion: a proxy that goes on past its allowance
    // answers the read within milliseconds; one that stops never does.
    stream.set_read_timeout(Some(std::time::Duration::from_millis(500))).unwrap();
    let mut reply = [0u8; guest_abi::trap::REPLY_LEN];
    assert!((&stream).read_exact(&mut reply).is_err(), "the proxy went on past its allowance");
    assert_eq!(work.done(), (SPARE + 1) * ACCESS_WORK, "accesses were taken past the spare");
    // Granted the rest, it goes on, and the read is answered.
    work.grant((WRITES + 1 - (SPARE + 1)) * ACCESS_WORK);
    stream.set_read_timeout(Some(BOUND)).unwrap();
    (&stream).read_exact(&mut reply).expect("the read after the grant");
    assert_eq!(work.done(), (WRITES + 1) * ACCESS_WORK);
    supervised.stop();
}

#[test]
fn a_spares_silent_connection_follows_the_device_to_its_next_qemu_process() {
    let Some(qemu) = qemu() else { return };
    let (_dir, _image, _memory, supervised) = supervised_nvme(qemu, "handover", None);
    let trap = supervised.trap();
    // The serving driver's connection, which carries accesses, and a
    // spare's, silent until it serves; their driver VMs' records hold
    // them throughout.
    let ((serving, _serving_grant), (spare, _spare_grant)) = (trapped_connection(&trap), trapped_connection(&trap));
    let cap = trapped_read32(&serving, 0).expect("the serving driver reads CAP");
    assert_ne!(cap, u32::MAX, "CAP read as all ones");
    // Only dword accesses reach the device: any other read is all ones.
    for size in [1, 2, 8] {
        assert_eq!(trapped_read(&serving, size, 0), Some(u64::MAX), "a read of {size} bytes");
    }
    // The device's QEMU process dies with its driver; the device is
    // quiesced and, for the next driver, resumed on a new process.
    supervised.current().kill();
    supervised.quiesce();
    supervised.resume();
    assert_eq!(supervised.restarts(), 1);
    assert_eq!(trapped_read32(&spare, 0), Some(cap), "the spare must reach the new process");
    assert_eq!(trapped_read32(&serving, 0), None, "the dead driver's connection must be revoked");
}

/// A spare that connects while the device's QEMU process is replaced
/// (its start runs on a thread of its own) could get its connection from
/// the old process after the hand-over: it then reached a dead process,
/// and the device paid one more failover once it served.
#[test]
fn a_connection_is_never_made_on_a_process_whose_connections_were_handed_over() {
    let Some(qemu) = qemu() else { return };
    let (_dir, _image, _memory, supervised) = supervised_nvme(qemu, "replaced", None);
    let trap = supervised.trap();
    let old = supervised.current();
    old.kill();
    supervised.quiesce();
    supervised.resume();
    assert_eq!(supervised.restarts(), 1);
    assert!(old.connect(None, None).is_err(), "a connection was made on the replaced process");
    let (stream, _grant) = trapped_connection(&trap);
    assert!(trapped_read32(&stream, 0).is_some_and(|cap| cap != u32::MAX), "the spare must reach the new process");
}

#[test]
fn a_dead_drivers_connection_reaches_nothing_once_its_record_lets_go_used_or_not() {
    let Some(qemu) = qemu() else { return };
    let (_dir, _image, _memory, supervised) = supervised_nvme(qemu, "revoke", None);
    let trap = supervised.trap();
    let connect = || trapped_connection(&trap);
    // AQA: read-write while the controller is disabled, as it is after a
    // quiesce.
    const AQA: u32 = 0x24;
    // A driver VM that used its connection, one killed before its proxy
    // read its first access (the access still in its socket), and the
    // next driver VM's.
    let (used, used_grant) = connect();
    let (silent, silent_grant) = connect();
    let (next, _next_grant) = connect();
    let before = trapped_read32(&used, AQA).expect("the serving driver reads AQA");
    // Both die: their records let go of their connections, the device is
    // quiesced and resumed for the next driver.
    drop((used_grant, silent_grant));
    supervised.quiesce();
    supervised.resume();
    // What they left queued is read by the proxy only now.
    trapped_write32(&silent, AQA, 0x001f_001f);
    trapped_write32(&used, AQA, 0x000f_000f);
    assert_eq!(trapped_read32(&silent, AQA), None, "a dead driver's silent connection still answers");
    assert_eq!(trapped_read32(&used, AQA), None, "a dead driver's used connection still answers");
    assert_eq!(trapped_read32(&next, AQA), Some(before), "a dead driver's queued write reached the device");
}

/// What this test binary logged (`captured_log`).
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Everything logged so far, by every thread of this binary (the BAR0
/// proxy logs from its own): a subscriber that writes into [`LOG`] is
/// installed the first time.
fn captured_log() -> String {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        struct Capture;
        impl std::io::Write for Capture {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                LOG.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| Capture)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

/// The error lines logged about the QEMU process `pid`.
fn errors_about(pid: u32) -> Vec<String> {
    let tag = format!("qemu_pid={pid}");
    captured_log().lines().filter(|line| line.contains("ERROR") && line.contains(&tag)).map(str::to_owned).collect()
}

#[test]
fn an_access_the_stopped_device_model_leaves_unanswered_is_no_error_a_crashed_ones_is() {
    let Some(qemu) = qemu() else { return };
    captured_log();
    let connect = |supervised: &Arc<hardware::qemu::SupervisedModel>| {
        let (stream, grant) = trapped_connection(&supervised.trap());
        assert!(trapped_read32(&stream, 0).is_some_and(|cap| cap != u32::MAX), "the driver reads CAP");
        (stream, grant)
    };
    // The reflector stops: it kills the driver VMs and then the device's
    // QEMU, while a driver's access may still be on its way (CI saw one
    // logged as an error at shutdown).
    let (_dir, _image, _memory, stopped) = supervised_nvme(qemu.clone(), "stopped", None);
    let (driver, _grant) = connect(&stopped);
    let pid = stopped.current().pid();
    stopped.stop();
    assert_eq!(trapped_read32(&driver, 0), None, "the stopped device's connection must close");
    assert_eq!(errors_about(pid), Vec::<String>::new(), "the stop was taken for the device's failure");
    // The same access to a QEMU that crashed is the device's failure.
    let (_dir, _image, _memory, crashed) = supervised_nvme(qemu, "crashed", None);
    let (driver, _grant) = connect(&crashed);
    let pid = crashed.current().pid();
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    assert_eq!(trapped_read32(&driver, 0), None, "the crashed device's connection must close");
    assert_eq!(errors_about(pid).len(), 1, "the crash went unreported: {}", captured_log());
    crashed.stop();
}

/// BAR0 as a driver VM's vmm presents it: accesses go over the trapped
/// window's socket, but a write to a posted register only signals its
/// eventfd (KVM's ioeventfd), and its value is lost on the way.
struct TrappedBar {
    socket: std::os::unix::net::UnixStream,
    posted: Vec<(usize, EventFd)>,
    /// Writes that went to an eventfd.
    signalled: std::rc::Rc<std::cell::Cell<u32>>,
}

impl nvme::Registers for TrappedBar {
    fn read32(&self, offset: usize) -> u32 {
        trapped_read32(&self.socket, offset as u32).expect("the proxy answers reads")
    }

    fn write32(&self, offset: usize, value: u32) {
        use std::io::Write;
        if let Some((_, signal)) = self.posted.iter().find(|(posted, _)| *posted == offset) {
            signal.write(1).unwrap();
            self.signalled.set(self.signalled.get() + 1);
            return;
        }
        let access = guest_abi::trap::Access {
            kind: guest_abi::trap::WRITE,
            size: 4,
            offset: offset as u32,
            value: value.into(),
        };
        (&self.socket).write_all(&access.encode()).unwrap();
    }
}

#[test]
fn a_posted_doorbell_reaches_the_controller_by_its_eventfd_alone() {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let Some(qemu) = qemu() else { return };
    let layout = Layout::at(BUFFERS);
    let (_dir, image, memory, supervised) = supervised_nvme(qemu, "posted", Some(layout.doorbells()));
    let trap = supervised.trap();
    let sq_doorbell = nvme::regs::sq_tail_doorbell(1, 4);
    assert_eq!(trap.posted, vec![sq_doorbell as u64], "the I/O submission doorbell is posted, nothing else");
    let connection = (trap.connect)().unwrap();
    assert_eq!(connection.posted.len(), 1, "one eventfd per posted register");
    let socket = std::os::unix::net::UnixStream::from(connection.socket);
    // A hang guard, not a timing assertion.
    socket.set_read_timeout(Some(BOUND)).unwrap();
    let posted = connection
        .posted
        .into_iter()
        // SAFETY: each descriptor is an eventfd this test now owns.
        .map(|fd| (sq_doorbell, unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }))
        .collect();
    let signalled = std::rc::Rc::new(std::cell::Cell::new(0));
    let bar = TrappedBar { socket, posted, signalled: signalled.clone() };
    let dma = Dma { memory: &memory, shift: HONEST };
    let mut controller = Controller::start(bar, dma, Clock(Instant::now()), layout).unwrap();
    // Each command is rung by the eventfd alone (the value written is
    // lost): the proxy must ring the register itself for it to run at all.
    let data = pattern(9, 64 << 10);
    memory.slice(0, data.len()).unwrap().copy_from(&data[..]);
    let commands = [
        IoCommand::Write { offset: 2 << 20, len: data.len() as u32, buffer: 0 },
        IoCommand::Flush,
        IoCommand::Read { offset: 2 << 20, len: data.len() as u32, buffer: 512 << 10 },
    ];
    for (cid, command) in (1u16..).zip(commands) {
        controller.submit(cid, command).unwrap();
        controller.ring();
        let deadline = Instant::now() + BOUND;
        let mut status = None;
        while status.is_none() {
            assert!(
                Instant::now() < deadline,
                "{command:?}: no completion; the posted doorbell did not reach the controller"
            );
            controller.reap(|id, code| {
                assert_eq!(id, cid, "a completion for a command never sent");
                status = Some(code);
            });
        }
        assert_eq!(status, Some(0), "{command:?}");
    }
    let mut back = vec![0u8; data.len()];
    memory.slice(512 << 10, data.len()).unwrap().copy_to(&mut back[..]);
    assert_eq!(back, data, "the data read back is not what was written");
    assert_eq!(&std::fs::read(&image).unwrap()[2 << 20..(2 << 20) + data.len()], &data[..]);
    // QEMU's EventIdx asks for a ring per burst here: every command was
    // rung, and only through the eventfd.
    assert!(signalled.get() >= commands.len() as u32, "{} rings by eventfd", signalled.get());
}

/// A QEMU process killed while it cannot end (stuck in the kernel, its
/// SIGKILL pending; here frozen by the cgroup v1 freezer, which holds a
/// fatal signal until the thaw) is not replaced until it has ended: a
/// read it had under way would still land in the DMA region, in a bounce
/// slot the replay had refilled (an adversarial review found it; before,
/// a new process started after two seconds' wait).
#[test]
fn a_killed_qemu_that_has_not_ended_is_replaced_only_once_it_has() {
    let Some(qemu) = qemu() else { return };
    let freezer = PathBuf::from("/sys/fs/cgroup/freezer");
    if !freezer.join("cgroup.procs").exists() {
        assert!(std::env::var_os("CI").is_none(), "no cgroup v1 freezer at {} and CI is set", freezer.display());
        eprintln!("\n*** SKIPPING: no cgroup v1 freezer ***\n");
        return;
    }
    let (_dir, _image, _memory, supervised) = supervised_nvme(qemu, "stuck", None);
    let pid = supervised.current().pid();
    let cgroup = freezer.join(format!("drvm-test-stuck-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
    std::fs::write(cgroup.join("freezer.state"), "FROZEN").unwrap();
    let frozen =
        hardware::poll_until(Instant::now() + BOUND, Duration::from_millis(1), Duration::from_millis(50), || {
            std::fs::read_to_string(cgroup.join("freezer.state")).ok().filter(|state| state.trim() == "FROZEN")
        });
    assert!(frozen.is_some(), "QEMU was not frozen");
    let waits = || {
        let tag = format!("pid={pid}");
        captured_log().lines().filter(|line| line.contains("has not exited after") && line.contains(&tag)).count()
    };
    let _ = captured_log();
    supervised.current().kill();
    // Killed, it is asked nothing more, nor killed again (each kill's
    // waits held the device's worker).
    let waited = waits();
    supervised.quiesce();
    supervised.renew();
    let waited_again = waits() - waited;
    supervised.resume();
    let restarts_while_stuck = supervised.restarts();
    std::fs::write(cgroup.join("freezer.state"), "THAWED").unwrap();
    let ended =
        hardware::poll_until(Instant::now() + BOUND, Duration::from_millis(1), Duration::from_millis(50), || {
            supervised.current().ended().then_some(())
        });
    let _ = std::fs::remove_dir(&cgroup);
    assert_eq!(restarts_while_stuck, 0, "a new QEMU started while the killed one could still write the DMA region");
    assert_eq!(waited, 1, "the kill did not wait for the stuck process");
    assert_eq!(waited_again, 0, "the killed model was killed again");
    assert!(ended.is_some(), "the thawed QEMU did not end");
    supervised.resume();
    assert_eq!(supervised.restarts(), 1, "no new QEMU once the killed one had ended");
    assert!(supervised.running());
}
