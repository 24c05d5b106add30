//! Devices nobody here wrote: a QEMU device model (NVMe, e1000e) in a QEMU
//! process that runs no guest code, used as the card a driver VM drives.
//!
//! The QEMU process (`-accel tcg -S`: its vCPU never runs; for a NIC, whose
//! frames QEMU delivers only to a running machine, a vCPU halted for good
//! in a 64 KiB firmware of `hlt`) holds one PCI
//! function. The reflector reaches it over qtest on a socketpair: PCI
//! configuration through ports 0xcf8/0xcfc (done here, once, never by a
//! driver), BAR accesses as `readl`/`writel`, interrupts as `IRQ raise`
//! lines after `irq_intercept_in ioapic`. Its memory for data is only the
//! DMA region the reflector gives it, a file QEMU maps as a memory device
//! at [`DMA_BASE`]: the controller can reach that region and nothing else
//! of the reflector or the driver VM (the IOMMU of this design). Its DMA
//! does reach the rest of its own machine, which is why that machine's
//! RAM is read-only to it and all `hlt` ([`machine_ram`]) and it has no
//! HPET.
//!
//! Not here: which driver accesses are allowed (the window proxy decides
//! what of BAR0 a driver VM reaches), and the NVMe protocol (the `nvme`
//! crate, in the driver).

mod nic;
mod nvme;
mod proxy;
mod qtest;
mod supervised;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use nic::QemuNic;
pub use nvme::QemuNvme;
pub use proxy::{PostedRegisters, ACCESS_WORK};
pub use qtest::{Qtest, QtestError, ANSWER_SPIN, ANSWER_TIMEOUT};
pub use supervised::{ProcessSpec, SupervisedModel};

use ::nvme::regs as nvme_regs;
use vmm_sys_util::eventfd::EventFd;

use crate::shm::SharedMemory;
use crate::InterruptRoute;

/// Where the device sees its DMA region (QEMU maps it as a memory device
/// there).
pub use crate::DMA_BASE;
/// The first IOAPIC input a PCI device's INTx can reach on q35 (its
/// PIRQ lines are GSIs 16 to 23); below are the ISA interrupts of the
/// machine itself.
const FIRST_PCI_GSI: u32 = 16;
/// Where BAR0 is placed in QEMU's address space (the q35 PCI hole).
const BAR0_ADDRESS: u64 = 0xfe00_0000;
/// QEMU's NVMe controller's registers, as offsets in BAR0 (its
/// doorbells are 4 bytes apart: CAP.DSTRD = 0).
const CC: u64 = nvme_regs::CC as u64;
const INTMC: u64 = nvme_regs::INTMC as u64;
const AQA: u64 = nvme_regs::AQA as u64;
const ASQ: u64 = nvme_regs::ASQ as u64;
const ACQ: u64 = nvme_regs::ACQ as u64;
const ADMIN_CQ_HEAD_DOORBELL: u64 = nvme_regs::DOORBELLS as u64 + 4;
/// Completion queues a QEMU NVMe controller can hold (its default
/// `max_ioqpairs`, 64, and the admin queue), so counted pending at most.
const MAX_NVME_QUEUES: usize = 65;
/// RAM, in MiB, QEMU needs besides the DMA region (it runs no guest).
const QEMU_RAM_MIB: usize = 2;
/// Longest [`QemuModel::kill`] waits for the killed QEMU to be reaped: a
/// SIGKILL ends it in milliseconds unless it is stuck in the kernel
/// (uninterruptible I/O on hung storage), and the device's thread, which
/// kills it in a failover and at shutdown, must not wait for that for ever.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// The descriptors the QEMU child gets: its qtest socket and the DMA
/// region's memfd.
const QTEST_FD: RawFd = 3;
const DMA_FD: RawFd = 4;
/// A NIC's network side.
const WIRE_FD: RawFd = 5;
/// The halting firmware (every machine gets it: a jailed QEMU can read no
/// firmware file).
const FIRMWARE_FD: RawFd = 6;
/// The machine's RAM ([`machine_ram`]), read-only to the machine.
const RAM_FD: RawFd = 9;
/// A disk image, opened by the reflector (a jailed QEMU can open no path):
/// read-write (absent for a read-only disk) and read-only, both in QEMU's
/// descriptor set 1.
const IMAGE_RW_FD: RawFd = 7;
const IMAGE_RO_FD: RawFd = 8;

/// A sandbox the QEMU process starts in (the reflector's jail: namespaces,
/// an empty root with QEMU and its libraries, its own uid, cgroup,
/// seccomp). `None` runs QEMU unconfined but for its own `-sandbox`.
pub trait ProcessJail: Send + Sync {
    /// The binary to execute, as the jail sees it.
    fn program(&self) -> &Path;
    /// Enters the jail, in the forked child before exec: only
    /// async-signal-safe calls. A keeper process stays behind as the
    /// reflector's child and writes the jailed process's pid to `report`.
    fn enter(&self, report: RawFd) -> std::io::Result<()>;
    /// Takes down what the jail made for its processes (its cgroups), once
    /// they have ended; nothing by default.
    fn end(&self) {}
}

/// Firmware for a machine whose vCPU must run but do nothing: 64 KiB of
/// `hlt`, and at the reset vector `cli; hlt; jmp .-1`. With interrupts off
/// the vCPU halts for good and costs no CPU; nothing programs PCI but the
/// reflector.
fn halt_firmware() -> std::io::Result<SharedMemory> {
    let firmware = all_hlt("halt-firmware", 64 * 1024)?;
    if let Some(reset) = firmware.slice(0xfff0, 4) {
        reset.copy_from(&[0xfa, 0xf4, 0xeb, 0xfd]);
    }
    Ok(firmware)
}

/// The machine's RAM: [`QEMU_RAM_MIB`] of `hlt`, which QEMU maps read-only
/// (`readonly=on`: a ROM to the machine, whose writes, the device's DMA
/// included, are dropped). A device model is a bus master of the whole
/// machine, not only of its DMA region: a hostile e1000e driver can loop
/// a frame back into any address (MAC loopback). Into writable RAM it
/// could write an interrupt table and code, and then, with an NMI sent
/// through the MSI window, run that code on the NIC machine's vCPU (which
/// runs: QEMU delivers frames only to a running machine), past every
/// reset of the device and every driver VM after it (an adversarial review
/// found it). In RAM that is all `hlt`, every interrupt, NMI, SMI or INIT
/// the vCPU can be sent ends in a `hlt`: its interrupt table's entries
/// (`f4f4:f4f4`) point into the same RAM.
fn machine_ram() -> std::io::Result<SharedMemory> {
    all_hlt("machine-ram", QEMU_RAM_MIB << 20)
}

/// Shared memory of `bytes` bytes, every one `hlt` (0xf4).
fn all_hlt(name: &str, bytes: usize) -> std::io::Result<SharedMemory> {
    let memory = SharedMemory::new(name, bytes)?;
    if let Some(all) = memory.slice(0, bytes) {
        all.copy_from(&vec![0xf4u8; bytes][..]);
    }
    Ok(memory)
}

/// PCI configuration space offsets and bits.
mod pci {
    pub const VENDOR: u32 = 0x00;
    pub const COMMAND: u32 = 0x04;
    pub const BAR0: u32 = 0x10;
    pub const BAR1: u32 = 0x14;
    /// Memory space enable.
    pub const MEMORY: u32 = 1 << 1;
    /// Bus master enable: without it the device cannot DMA.
    pub const BUS_MASTER: u32 = 1 << 2;
}

/// How a device's QEMU processes are started: the binary, and the jail
/// each starts in.
#[derive(Clone)]
pub struct QemuProcess {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// The jail (`None`: unconfined but for QEMU's own `-sandbox`).
    pub jail: Option<Arc<dyn ProcessJail>>,
}

impl Model {
    /// What the model is, for errors that already name what it serves.
    pub fn kind(&self) -> &'static str {
        match self {
            Model::Nvme(_) => "NVMe controller",
            Model::E1000e { .. } => "e1000e",
        }
    }
}

impl std::fmt::Display for Model {
    /// For logs and errors: the model and what it serves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Model::Nvme(drive) => write!(
                f,
                "NVMe controller on {} (aio={}{})",
                drive.image.display(),
                drive.aio.as_str(),
                if drive.read_only { ", read-only" } else { "" }
            ),
            Model::E1000e { .. } => write!(f, "e1000e {}", self.label()),
        }
    }
}

/// A disk model's image, and how QEMU's block layer reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    /// The image file.
    pub image: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// How QEMU performs its reads and writes.
    pub aio: DriveAio,
}

impl Drive {
    /// `image`, writable, through QEMU's thread pool.
    pub fn new(image: PathBuf) -> Drive {
        Drive { image, read_only: false, aio: DriveAio::Threads }
    }
}

/// How QEMU's block layer performs a disk model's reads and writes (its
/// `-drive aio=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DriveAio {
    /// QEMU's thread pool: each request is handed to a worker thread and
    /// its completion back to the main loop, two wake-ups inside QEMU.
    #[default]
    Threads,
    /// An io_uring of QEMU's main loop: reads the page cache holds
    /// complete as they are submitted, other requests in the kernel's
    /// io_uring workers. The jail must allow the io_uring calls (the
    /// reflector's jail denies them to every other process).
    IoUring,
}

impl DriveAio {
    /// Its name in QEMU's `aio=` option (and the reflector's).
    pub fn as_str(self) -> &'static str {
        match self {
            DriveAio::Threads => "threads",
            DriveAio::IoUring => "io_uring",
        }
    }
}

/// Which QEMU device model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Model {
    /// `-device nvme` on a raw image.
    Nvme(Drive),
    /// `-device e1000e` (Intel 82574L), its network side a datagram socket
    /// (one frame per datagram) the reflector joins to a switch.
    E1000e {
        /// Its MAC address.
        mac: [u8; 6],
    },
}

impl Model {
    fn arguments(&self, serial: &str) -> Vec<String> {
        let mut arguments = vec!["-name".to_owned(), format!("guest={}", self.label().replace(',', ",,"))];
        arguments.extend(match self {
            Model::Nvme(drive) => {
                let mut nvme = Vec::new();
                if !drive.read_only {
                    nvme.extend(["-add-fd".to_owned(), format!("fd={IMAGE_RW_FD},set=1")]);
                }
                nvme.extend([
                    "-add-fd".to_owned(),
                    format!("fd={IMAGE_RO_FD},set=1"),
                    "-drive".into(),
                    format!(
                        "file=/dev/fdset/1,if=none,id=disk,format=raw,cache=writeback,file.locking=off,aio={},read-only={}",
                        drive.aio.as_str(),
                        if drive.read_only { "on" } else { "off" }
                    ),
                    "-device".into(),
                    format!("nvme,serial={serial},drive=disk"),
                ]);
                nvme
            }
            Model::E1000e { mac } => vec![
                "-netdev".into(),
                format!("dgram,id=wire,local.type=fd,local.str={WIRE_FD}"),
                "-device".into(),
                // No option ROM: nothing would run it, and a jailed QEMU
                // could not read it.
                format!(
                    "e1000e,netdev=wire,romfile=,mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
                ),
            ],
        });
        arguments
    }

    /// What the process serves, for `ps`: the image, the MAC.
    fn label(&self) -> String {
        match self {
            Model::Nvme(drive) => drive.image.display().to_string(),
            Model::E1000e { mac } => {
                format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5])
            }
        }
    }

    /// The image's descriptors (read-write unless read-only, and
    /// read-only), for a disk.
    fn image_files(&self) -> std::io::Result<Vec<(std::fs::File, RawFd)>> {
        let Model::Nvme(drive) = self else { return Ok(Vec::new()) };
        let mut files = Vec::new();
        if !drive.read_only {
            files.push((std::fs::File::options().read(true).write(true).open(&drive.image)?, IMAGE_RW_FD));
        }
        files.push((std::fs::File::open(&drive.image)?, IMAGE_RO_FD));
        Ok(files)
    }

    /// The registers a driver's writes reach by a posted write
    /// (`guest_abi::trap`): an NVMe controller's I/O submission doorbell
    /// (queue 1; QEMU's doorbells are 4 bytes apart), whose value the
    /// `nvme` driver keeps in its shadow doorbell. Not the completion
    /// doorbell: QEMU's model counts, at each write of it that finds the
    /// queue empty, one queue fewer holding completions (its INTx level),
    /// so two writes of one value, which the coalescing of posted writes
    /// makes, would leave its line high for good; its writes stay trapped,
    /// each with its own value. None for the NIC.
    pub fn posted_registers(&self) -> Vec<u64> {
        match self {
            Model::Nvme(_) => vec![nvme_regs::sq_tail_doorbell(1, 4) as u64],
            Model::E1000e { .. } => Vec::new(),
        }
    }

    /// Whether QEMU's vCPU must run (halted in [`HALT_FIRMWARE`]) rather
    /// than stay stopped (`-S`): QEMU's network layer delivers no frame to
    /// a NIC while the machine is stopped.
    fn needs_running_machine(&self) -> bool {
        matches!(self, Model::E1000e { .. })
    }

    /// The PCI vendor and device id the model answers with.
    fn pci_id(&self) -> u32 {
        match self {
            // Red Hat, QEMU NVMe controller.
            Model::Nvme(_) => 0x0010_1b36,
            // Intel, 82574L.
            Model::E1000e { .. } => 0x10d3_8086,
        }
    }
}

/// Spawns `command` from a thread that lives as long as the process.
///
/// QEMU gets PR_SET_PDEATHSIG, which the kernel fires when the *thread*
/// that forked it exits, not the process: QEMU started again by a device's
/// worker thread (which ends when its client disconnects) would otherwise
/// die with that thread.
fn spawn_lasting(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        let started = std::thread::Builder::new().name("qemu-spawner".into()).spawn(move || {
            for (mut command, reply) in incoming {
                let _ = reply.send(command.spawn());
            }
        });
        if let Err(error) = started {
            tracing::error!(%error, "cannot start the QEMU spawner thread");
        }
        Mutex::new(requests)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| std::io::Error::other("the QEMU spawner's lock is poisoned"))?
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the QEMU spawner thread is gone"))?;
    answer.recv().map_err(|_| std::io::Error::other("the QEMU spawner thread is gone"))?
}

/// The part of a shared region a device model may reach by DMA: `len`
/// bytes from `offset` (page aligned), seen by the device at [`DMA_BASE`].
#[derive(Clone, Copy)]
pub struct Dma<'a> {
    /// The region.
    pub memory: &'a SharedMemory,
    /// Where the device's range starts in it.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// What went wrong starting or driving a QEMU model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// QEMU could not be started.
    #[error("cannot start {qemu}: {error} (install QEMU, e.g. the Debian package qemu-system-x86)")]
    Spawn {
        /// The binary.
        qemu: String,
        /// Why.
        error: std::io::Error,
    },
    /// QEMU exited or stopped answering.
    #[error(transparent)]
    Qtest(#[from] QtestError),
    /// QEMU started, but the device is not where it was put.
    #[error("QEMU exited or did not offer its {}: {detail}", model.kind())]
    NoDevice {
        /// The model.
        model: Model,
        /// What QEMU said, if anything.
        detail: String,
    },
    /// A descriptor or socket could not be made.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A QEMU process holding one device model, its BAR0 mapped, bus mastering
/// on; killed when dropped.
pub struct QemuModel {
    model: Model,
    child: Mutex<Child>,
    /// The read end of QEMU's standard error (non-blocking).
    stderr: Mutex<OwnedFd>,
    qtest: Qtest,
    /// PCI device number on bus 0.
    slot: u32,
    bar0_size: u64,
    /// Bus mastering and BAR accesses are off (the driver VM died).
    quiesced: AtomicBool,
    /// Held (shared) by each BAR access from its admission check to its
    /// end, and (exclusive) by the quiesce while it sets `quiesced`: no
    /// access admitted before the quiesce reaches the device after it
    /// (a dead driver's write of its interrupt mask, landing after the
    /// reset, raised the line again).
    admission: std::sync::RwLock<()>,
    /// Driver VMs' connections to BAR0 (`proxy`).
    connections: proxy::Connections,
    /// Where the device's interrupt goes.
    interrupt: Arc<InterruptRoute>,
    /// The level of the device's INTx line, as QEMU last reported it.
    line_asserted: Arc<AtomicBool>,
    /// Written when the QEMU process exits (its qtest connection closed).
    exit_notice: Arc<Mutex<Option<EventFd>>>,
    /// Killed on purpose ([`QemuModel::kill`]): an access it no longer
    /// answers is expected, not a failure to report.
    killed: AtomicBool,
    /// The process's pid, read without `child`'s lock (which a kill holds
    /// while it waits for the process to be reaped).
    pid: u32,
}

impl QemuModel {
    /// Starts `qemu` (a `qemu-system-x86_64`) with `model`, able to reach
    /// `dma` at [`DMA_BASE`]; its interrupt goes to `interrupt`; a NIC's
    /// network side is `wire`.
    pub fn start(
        qemu: &Path,
        model: Model,
        serial: &str,
        dma: Dma<'_>,
        interrupt: Arc<InterruptRoute>,
        wire: Option<&OwnedFd>,
        jail: Option<Arc<dyn ProcessJail>>,
    ) -> Result<QemuModel, ModelError> {
        let Dma { memory: dma, offset, len } = dma;
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = OwnedFd::from(theirs);
        let mut command = match &jail {
            Some(jail) => {
                let mut command = Command::new(jail.program());
                // Nothing of the reflector's environment reaches the jail.
                command.env_clear();
                command
            }
            None => Command::new(qemu),
        };
        let maxmem_mib = QEMU_RAM_MIB + len.div_ceil(1 << 20) + 1;
        command
            // No PIT: its ticks (18 a second) woke QEMU and this process's
            // qtest reader for nothing (the device's line is not the
            // timer's).
            // No HPET either: a device's DMA could program its timers,
            // which then raised interrupts on the device's line for every
            // driver after the one that died (their state survives the
            // device's reset). No SMM: nothing here needs it.
            .args(["-machine", "q35,pit=off,hpet=off,smm=off,memory-backend=ram"])
            .args(["-accel", "tcg", "-nodefaults", "-display", "none", "-no-user-config"])
            .args(["-chardev", &format!("socket,id=qtest,fd={QTEST_FD}"), "-qtest", "chardev:qtest"])
            .args(["-qtest-log", "none"])
            // QEMU parses what a hostile driver writes into its queues: it
            // runs under its own seccomp filter, which forbids obsolete
            // syscalls, gaining privileges, spawning processes and
            // changing resource controls.
            .args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"])
            // A bounded I/O thread pool: the jail bounds its tasks.
            .args(["-object", "main-loop,id=main-loop,thread-pool-max=8"])
            .args(["-m", &format!("{QEMU_RAM_MIB}M,slots=1,maxmem={maxmem_mib}M")])
            .args([
                "-object",
                &format!("memory-backend-file,id=ram,mem-path=/proc/self/fd/{RAM_FD},size={QEMU_RAM_MIB}M,readonly=on"),
            ])
            .args([
                "-object",
                &format!(
                    "memory-backend-file,id=dma,mem-path=/proc/self/fd/{DMA_FD},offset={offset},size={len},share=on"
                ),
                "-device",
                &format!("pc-dimm,memdev=dma,addr={DMA_BASE:#x}"),
            ])
            .args(model.arguments(serial))
            .args(["-bios", &format!("/proc/self/fd/{FIRMWARE_FD}")])
            .args(if model.needs_running_machine() { None } else { Some("-S") })
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // QEMU's standard error: a pipe nobody reads while it runs, so
        // non-blocking at both ends (one file description each, QEMU's
        // included): what it writes past a pipe's worth is dropped, never
        // waited on. A blocking one filled with 64 KiB (QEMU's NVMe model
        // reports every failed I/O there) held QEMU's main loop in the
        // write: every qtest command timed out, and QEMU was replaced, over
        // and over (an adversarial review found it). Read only to say why
        // QEMU did not start ([`QemuModel::exit_detail`]).
        let (stderr_read, stderr_write) = crate::descriptors::pipe()?;
        for end in [&stderr_read, &stderr_write] {
            crate::descriptors::set_nonblocking(end)?;
        }
        command.stderr(Stdio::from(stderr_write));
        let (firmware, ram) = (halt_firmware()?, machine_ram()?);
        let images = model.image_files()?;
        // Each source at the number QEMU's command line names, fixed
        // before the fork: the child only walks it.
        let mut placement = crate::descriptors::Placement::new();
        placement.place(theirs.as_raw_fd(), QTEST_FD);
        placement.place(dma.as_raw_fd(), DMA_FD);
        if let Some(wire) = wire {
            placement.place(wire.as_raw_fd(), WIRE_FD);
        }
        placement.place(firmware.as_raw_fd(), FIRMWARE_FD);
        placement.place(ram.as_raw_fd(), RAM_FD);
        for (file, number) in &images {
            placement.place(file.as_raw_fd(), *number);
        }
        // The jail's keeper reports the jailed pid here. Not read: the
        // keeper is the child the reflector kills and waits for. The keeper
        // writes before it lets QEMU exec, and the spawn returns only after
        // that exec, so the read end is still open when it writes.
        let (report_read, report_write) = crate::descriptors::pipe()?;
        // Above every number a descriptor is placed at below.
        let report_write = crate::descriptors::lift(report_write)?;
        let report = report_write.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec the closure only calls prctl,
        // getppid, the placement's fcntl, dup2 and close_range, and the
        // jail's entry, which are async-signal-safe, on descriptors and data
        // that stay alive in the parent across the spawn; it allocates
        // nothing.
        unsafe {
            command.pre_exec(move || {
                // QEMU (or its jail's keeper, which QEMU dies with) dies
                // with the reflector, whatever kills it (qtest does not end
                // QEMU when its connection closes); a parent gone before
                // the request took effect ends the start.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                // Nothing else reaches QEMU, whatever the reflector itself
                // inherited without close-on-exec.
                placement.install_in_child()?;
                match &jail {
                    Some(jail) => jail.enter(report),
                    None => Ok(()),
                }
            });
        }
        let child =
            spawn_lasting(command).map_err(|error| ModelError::Spawn { qemu: qemu.display().to_string(), error })?;
        drop((theirs, firmware, ram, images, report_read, report_write));
        let (route, level) = (interrupt.clone(), Arc::new(AtomicBool::new(false)));
        let line = level.clone();
        let exit_notice: Arc<Mutex<Option<EventFd>>> = Arc::default();
        let notice = exit_notice.clone();
        // Spinning for answers pays for NVMe (its driver's bring-up and the
        // quiesce: register accesses QEMU answers at once; over four runs
        // of 200 kills alternated with the build before, failover retire
        // p50 1.35-1.65 to 0.98-1.03 ms and device reset 4.3-5.3 to
        // 4.1-4.5 ms), not for the e1000e: a TX tail write has QEMU send the
        // frame (half take over 100 us), and spinning on two cores slowed
        // net-load's ping-pong round trips, p50 367-408 to 428-594 us.
        let answer_spin = match model {
            Model::Nvme(_) => ANSWER_SPIN,
            Model::E1000e { .. } => Duration::ZERO,
        };
        let qtest = Qtest::new(
            ours,
            answer_spin,
            move |gsi, raised| {
                // The IOAPIC's ISA inputs are the machine's own (its
                // timer's, 18 times a second): not the device's line.
                if gsi < FIRST_PCI_GSI {
                    return;
                }
                line.store(raised, Ordering::Release);
                if raised {
                    route.raise();
                }
            },
            move || {
                if let Ok(notice) = notice.lock() {
                    if let Some(notice) = notice.as_ref() {
                        let _ = notice.write(1);
                    }
                }
            },
        )?;
        // Built before it is set up, so that an error kills QEMU (Drop).
        let mut started = QemuModel {
            model: model.clone(),
            pid: child.id(),
            child: Mutex::new(child),
            stderr: Mutex::new(stderr_read),
            qtest,
            slot: 0,
            bar0_size: 0,
            quiesced: AtomicBool::new(false),
            admission: std::sync::RwLock::new(()),
            connections: proxy::Connections::default(),
            interrupt,
            line_asserted: level,
            exit_notice,
            killed: AtomicBool::new(false),
        };
        match started.set_up() {
            Ok(()) => Ok(started),
            Err(ModelError::Qtest(error)) => Err(ModelError::NoDevice { model, detail: started.exit_detail(&error) }),
            Err(error) => Err(error),
        }
    }

    /// Finds the function, maps BAR0 and turns on memory space, bus
    /// mastering and interrupt interception.
    fn set_up(&mut self) -> Result<(), ModelError> {
        self.qtest.command("irq_intercept_in ioapic")?;
        self.slot = (0..32)
            .find_map(|slot| match self.config_read(slot, pci::VENDOR) {
                Ok(id) if id == self.model.pci_id() => Some(Ok(slot)),
                Ok(_) => None,
                Err(error) => Some(Err(error)),
            })
            .transpose()?
            .ok_or_else(|| ModelError::NoDevice { model: self.model.clone(), detail: "not on PCI bus 0".into() })?;
        self.config_write(self.slot, pci::BAR0, 0xffff_ffff)?;
        let sized = self.config_read(self.slot, pci::BAR0)?;
        self.bar0_size = u64::from((!(sized & !0xf)).wrapping_add(1));
        self.config_write(self.slot, pci::BAR0, BAR0_ADDRESS as u32)?;
        // A 64-bit BAR0 takes BAR1 as its upper half.
        if sized & 0b110 == 0b100 {
            self.config_write(self.slot, pci::BAR1, (BAR0_ADDRESS >> 32) as u32)?;
        }
        self.config_write(self.slot, pci::COMMAND, pci::MEMORY | pci::BUS_MASTER)?;
        tracing::info!(model = %self.model, slot = self.slot, bar0_size = self.bar0_size, "QEMU device model ready");
        Ok(())
    }

    fn config_address(slot: u32, offset: u32) -> u32 {
        0x8000_0000 | (slot << 11) | (offset & 0xfc)
    }

    fn config_read(&self, slot: u32, offset: u32) -> Result<u32, QtestError> {
        self.qtest.outl(0xcf8, Self::config_address(slot, offset))?;
        self.qtest.inl(0xcfc)
    }

    fn config_write(&self, slot: u32, offset: u32, value: u32) -> Result<(), QtestError> {
        self.qtest.outl(0xcf8, Self::config_address(slot, offset))?;
        self.qtest.outl(0xcfc, value)
    }

    /// What QEMU said on its way out, for an error: the first 4 KiB it
    /// wrote to its standard error, escaped. Never waits (QEMU is killed
    /// and reaped within [`KILL_WAIT`], the pipe read without blocking),
    /// whatever QEMU did or is stuck in.
    fn exit_detail(&self, error: &QtestError) -> String {
        if let Ok(mut child) = self.child.lock() {
            kill_and_reap(&mut child);
        }
        let mut said = Vec::new();
        if let Ok(pipe) = self.stderr.lock() {
            let mut buffer = [0u8; 4096];
            // Bounded: what a device model writes is not trusted.
            while said.len() < 4096 {
                match read_without_waiting(&pipe, &mut buffer) {
                    Some(read) if read > 0 => said.extend_from_slice(&buffer[..read]),
                    _ => break,
                }
            }
        }
        said.truncate(4096);
        let said: String = String::from_utf8_lossy(&said).trim().escape_debug().collect();
        format!("{error}; QEMU said: {said}")
    }

    /// Bytes of BAR0.
    pub fn bar0_size(&self) -> u64 {
        self.bar0_size
    }

    /// Reads the BAR0 dword at `offset` (None past its end or while
    /// quiesced: a read the driver is not allowed answers all ones).
    pub fn read32(&self, offset: u64) -> Result<Option<u32>, QtestError> {
        let _admitted = self.admission.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.allowed(offset) {
            return Ok(None);
        }
        self.qtest.readl(BAR0_ADDRESS + offset).map(Some)
    }

    /// Writes the BAR0 dword at `offset` (dropped past its end or while
    /// quiesced); whether it was written.
    pub fn write32(&self, offset: u64, value: u32) -> Result<bool, QtestError> {
        let written = self.write32_only(offset, value)?;
        if written {
            // QEMU reports the line's changes the write caused before it
            // answers the write.
            self.resample();
        }
        Ok(written)
    }

    /// Writes a posted doorbell (`proxy`): as [`QemuModel::write32`] but
    /// without the resample. Ringing a submission doorbell acknowledges no
    /// interrupt, and the line of a driver that polls stays high (it
    /// releases completions through its shadow doorbells), so a resample
    /// per ring would only leave it a spurious wake-up at its next sleep.
    pub fn ring32(&self, offset: u64, value: u32) -> Result<bool, QtestError> {
        self.write32_only(offset, value)
    }

    fn write32_only(&self, offset: u64, value: u32) -> Result<bool, QtestError> {
        let _admitted = self.admission.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.allowed(offset) {
            return Ok(false);
        }
        self.qtest.writel(BAR0_ADDRESS + offset, value)?;
        Ok(true)
    }

    /// Delivers the interrupt again if the device's line is still
    /// asserted after a driver's write, as a level-triggered line is
    /// sampled again after its end of interrupt: a completion posted while
    /// the line was already high (the driver's acknowledgement not yet
    /// performed) raises no new edge, and the driver, asleep by then,
    /// would never learn of it. The driver's write is its acknowledgement.
    fn resample(&self) {
        if self.line_asserted.load(Ordering::Acquire) {
            self.interrupt.raise();
        }
    }

    fn allowed(&self, offset: u64) -> bool {
        offset.is_multiple_of(4) && offset + 4 <= self.bar0_size && !self.quiesced.load(Ordering::Acquire)
    }

    /// Stops all DMA: bus mastering off, then the controller disabled,
    /// which QEMU does at once, cancelling or finishing every command it
    /// held before it answers; BAR accesses are dropped until
    /// [`QemuModel::resume`].
    pub fn quiesce(&self) -> Result<(), QtestError> {
        // Every access admitted before this has ended once the write lock
        // is held; none is admitted after.
        {
            let _exclusive = self.admission.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            self.quiesced.store(true, Ordering::Release);
        }
        // What a dead driver left in its connection never reaches the device.
        self.connections.revoke_used();
        self.config_write(self.slot, pci::COMMAND, pci::MEMORY)?;
        match self.model {
            Model::Nvme(_) => self.reset_nvme()?,
            // CTRL.RST: a device reset, which empties the rings.
            Model::E1000e { .. } => {
                self.qtest.writel(BAR0_ADDRESS, 1 << 26)?;
                // QEMU's e1000e can leave its legacy interrupt line high
                // through the reset (a cause the dead driver had not
                // acknowledged): every cause masked (IMC) and the causes
                // read, which clears them (ICR), lower it. Without this,
                // most failovers found the line high and started the
                // device's QEMU again (`SupervisedModel::quiesce`): over
                // two alternated runs of 10 kills under net-load, 19 of 20
                // failovers restarted QEMU and stalled p50 50 ms; with it
                // none did, p50 6.6-8.6 ms.
                self.qtest.writel(BAR0_ADDRESS + 0xd8, u32::MAX)?;
                self.qtest.readl(BAR0_ADDRESS + 0xc0)?;
            }
        }
        Ok(())
    }

    /// Resets QEMU's NVMe controller for the next driver, its interrupt
    /// line low and nothing pending.
    ///
    /// QEMU's controller counts the completion queues holding completions
    /// (`cq_pending`, for its INTx line) and keeps a vector asserted while
    /// the count is above zero; a controller reset frees the queues without
    /// uncounting them. A driver that died with a completion unreaped
    /// would leave the line asserted for good, whenever the vector is
    /// unmasked, reaped or not: its successor would take an interrupt at
    /// each unmask and never sleep. Over 10 kills under load, half the
    /// failovers found the device so and started its QEMU again (48-86 ms
    /// each, against 7-11 ms). Commands that end during the reset count
    /// too: the reset first waits for the commands in flight, whose
    /// completions, bus mastering off, find a shadow head of 0 and so a
    /// queue that is not empty (CI caught one; the hardware test
    /// `a_driver_that_dies_with_a_completion_unreaped_leaves_its_successor_a_working_interrupt`,
    /// leaving 120 commands in flight, did in 5 of 6 runs of rings made
    /// before the reset). So the count is taken down after the reset, when
    /// nothing is in flight any more: on an admin queue of its own
    /// (nothing is submitted on it, so it stays empty and the controller
    /// never reaches the memory it names), each ring of its head doorbell
    /// takes one off, until the line falls.
    fn reset_nvme(&self) -> Result<(), QtestError> {
        // CC.EN = 0: the reset waits for every command in flight, then
        // frees the queues.
        self.qtest.writel(BAR0_ADDRESS + CC, 0)?;
        if !self.nvme_line_left_asserted()? {
            return Ok(());
        }
        // Two-entry admin queues (AQA is zero-based) at the DMA region's
        // base (page aligned; bus mastering is off anyway).
        self.qtest.writel(BAR0_ADDRESS + AQA, 1 | (1 << 16))?;
        for base in [ASQ, ACQ] {
            self.qtest.writel(BAR0_ADDRESS + base, DMA_BASE as u32)?;
            self.qtest.writel(BAR0_ADDRESS + base + 4, (DMA_BASE >> 32) as u32)?;
        }
        self.qtest.writel(BAR0_ADDRESS + CC, nvme_regs::CC_CONFIG | nvme_regs::CC_ENABLE)?;
        let mut rings = 0;
        while self.line_asserted() && rings < MAX_NVME_QUEUES {
            self.qtest.writel(BAR0_ADDRESS + ADMIN_CQ_HEAD_DOORBELL, 0)?;
            rings += 1;
        }
        tracing::debug!(rings, "the controller counted completions through its reset; counted down");
        self.qtest.writel(BAR0_ADDRESS + CC, 0)?;
        // Still high: a count no ring of vector 0's queue takes down (a
        // hostile driver's other vector); its supervisor starts QEMU again
        // (`SupervisedModel::quiesce`).
        self.nvme_line_left_asserted().map(|_| ())
    }

    /// Unmasks every vector, so that the line shows what the controller
    /// still counts (a reset clears the masks without looking at the
    /// line, and a controller already disabled is not reset by CC.EN = 0);
    /// whether it is asserted.
    fn nvme_line_left_asserted(&self) -> Result<bool, QtestError> {
        self.qtest.writel(BAR0_ADDRESS + INTMC, u32::MAX)?;
        Ok(self.line_asserted())
    }

    /// Whether the device's interrupt line is asserted: after a quiesce it
    /// must not be (QEMU's NVMe model keeps it asserted across a reset that
    /// found completions pending, see [`QemuModel::quiesce`], and a line
    /// stuck high gives no new edge to any later driver).
    pub fn line_asserted(&self) -> bool {
        self.line_asserted.load(Ordering::Acquire)
    }

    /// Kills the QEMU process now (not reported as its failure).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.notify_exit(None);
        if let Ok(mut child) = self.child.lock() {
            if !kill_and_reap(&mut child) {
                tracing::warn!(
                    pid = child.id(),
                    "the killed QEMU process has not exited after {KILL_WAIT:?} (stuck in the kernel?); going on without it"
                );
            }
        }
        // Jailed, the child reaped is QEMU's keeper, and QEMU dies of its
        // parent-death signal a moment later: a transfer it had under way
        // could still land in a bounce slot the replay refills. Its end of
        // the qtest connection closes once its threads and memory are gone.
        let deadline = Instant::now() + KILL_WAIT;
        let gone = crate::poll_until(deadline, Duration::from_micros(100), Duration::from_millis(10), || {
            self.qtest.peer_gone().then_some(())
        });
        if gone.is_none() {
            tracing::warn!(
                pid = self.pid,
                "the killed QEMU's connection is still open after {KILL_WAIT:?}; going on without it"
            );
        }
    }

    /// Turns bus mastering back on for the next driver, which resets the
    /// device itself.
    pub fn resume(&self) -> Result<(), QtestError> {
        self.config_write(self.slot, pci::COMMAND, pci::MEMORY | pci::BUS_MASTER)?;
        self.quiesced.store(false, Ordering::Release);
        Ok(())
    }

    /// Writes `notice` when the QEMU process exits, whatever kills it
    /// (not when this model is dropped).
    pub fn notify_exit(&self, notice: Option<EventFd>) {
        if let Ok(mut current) = self.exit_notice.lock() {
            *current = notice;
        }
    }

    /// Whether the process has ended, its memory with it: our child is
    /// reaped (a jailed QEMU's keeper), and QEMU's end of the qtest
    /// connection is closed, which happens once its threads and memory are
    /// gone.
    pub fn ended(&self) -> bool {
        !self.running() && self.qtest.peer_gone()
    }

    /// Whether the process was killed on purpose ([`QemuModel::kill`]).
    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// The QEMU process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the QEMU process still runs.
    pub fn running(&self) -> bool {
        self.child.lock().is_ok_and(|mut child| matches!(child.try_wait(), Ok(None)))
    }
}

/// One read of what `pipe` holds without waiting (it is non-blocking);
/// None at an error (nothing there: EAGAIN).
fn read_without_waiting(pipe: &OwnedFd, buffer: &mut [u8]) -> Option<usize> {
    // SAFETY: read(2) into a buffer that lives across the call, at most its
    // length.
    let read = unsafe { libc::read(pipe.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
    usize::try_from(read).ok()
}

/// SIGKILLs `child` and reaps it, waiting at most [`KILL_WAIT`]: a process
/// stuck in the kernel would hold the thread (a device's worker) for as
/// long. Whether it was reaped.
fn kill_and_reap(child: &mut std::process::Child) -> bool {
    let _ = child.kill();
    let deadline = Instant::now() + KILL_WAIT;
    crate::poll_until(deadline, Duration::from_micros(100), Duration::from_millis(10), || {
        (!matches!(child.try_wait(), Ok(None))).then_some(())
    })
    .is_some()
}

impl Drop for QemuModel {
    fn drop(&mut self) {
        self.notify_exit(None);
        if let Ok(mut child) = self.child.lock() {
            if !kill_and_reap(&mut child) {
                tracing::warn!(pid = child.id(), "a QEMU process let go of has not exited (stuck in the kernel?)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_models_posted_registers_have_mirror_dwords_of_their_own() {
        let models = [Model::Nvme(Drive::new(PathBuf::from("disk.img"))), Model::E1000e { mac: [0; 6] }];
        for model in models {
            let posted = model.posted_registers();
            for (i, offset) in posted.iter().enumerate() {
                assert!(offset.is_multiple_of(4), "{model:?}: {offset:#x} is not a dword");
                let mirror = offset % 4096;
                assert!(
                    posted[..i].iter().all(|other| other % 4096 != mirror),
                    "{model:?}: {offset:#x} shares its mirror dword {mirror:#x}"
                );
            }
        }
        // The NVMe I/O submission doorbell's mirror is its shadow doorbell.
        let nvme = Model::Nvme(Drive::new(PathBuf::from("disk.img")));
        assert_eq!(nvme.posted_registers(), vec![0x1008]);
    }

    #[test]
    fn a_drives_aio_reaches_qemus_command_line() {
        let drive_option = |model: &Model| {
            let arguments = model.arguments("serial");
            let at = arguments.iter().position(|a| a == "-drive").expect("a -drive option");
            arguments[at + 1].clone()
        };
        let mut drive = Drive::new(PathBuf::from("disk.img"));
        assert!(drive_option(&Model::Nvme(drive.clone())).contains(",aio=threads,"));
        drive.aio = DriveAio::IoUring;
        drive.read_only = true;
        let option = drive_option(&Model::Nvme(drive));
        assert!(option.contains(",aio=io_uring,") && option.ends_with(",read-only=on"), "{option}");
    }
}
