//! Wiring devices end to end and serving them: for a block device the disk
//! image, channel, simulated controller, driver VM process and vhost-user
//! socket; for a net device the same with a simulated card plugged into a
//! switch. A socket is served again after a client disconnects (QEMU
//! restarted).

use hardware::shared_eventfd::SharedEventFd;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use guest_abi::channel;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::device::{Blk, BlkDevice};
use crate::channel::Channel;
use crate::config::{BlkConfig, DeviceHardware, DmaMode, JailSettings, NetConfig};
use crate::control::ControlTarget;
use crate::device::{Device, DeviceKind, DeviceWiring};
use crate::hw::memory_disk::MemoryDisk;
use crate::hw::qemu::{Drive, ProcessJail, QemuNic, QemuNvme, QemuProcess};
use crate::hw::sim_nic::SimNic;
use crate::hw::sim_storage::{SimStorage, SimStorageConfig};
use crate::hw::switch::Switches;
use crate::hw::vfio::{VfioNic, VfioNvme};
use crate::hw::{BlockHardware, DmaRegion, Hardware, NetHardware};
use crate::inline_driver::{InlineNull, INLINE_NULL};
use crate::jail::{IoUring, Jail, JailLimits, Jailed};
use crate::metrics::Metrics;
use crate::net::device::{Net, NetDevice};
use crate::recovery::{RecoveryConfig, RestartPolicy};
use crate::shm::SharedMemory;
use crate::supervisor::{DriverLauncher, DriverVmSpec, Window};

/// Longest a stopping reflector waits for a worker to let go of its
/// device: a worker holds it for one event at a time (microseconds, or its
/// 30 us completion poll), so under load the device is free again within
/// a few of the growing pauses; a worker that holds it longer is stuck.
const SHUTDOWN_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Driver guest-physical address of the controller's window.
pub const REGS_GPA: u64 = 0x2000_0000;
/// Driver guest-physical address of the doorbell page: +0 tells the
/// reflector about completions, +8 is the controller's doorbell.
pub const DOORBELL_GPA: u64 = 0x3000_0000;
/// Driver guest-physical address of the channel.
pub const CHANNEL_GPA: u64 = 0x4000_0000;

/// A device being served: its vhost-user backend and what must live as
/// long as it (the channel, the simulated hardware).
pub struct DeviceService<D> {
    name: String,
    socket: PathBuf,
    /// The claimed socket, taken by `serve`.
    listener: std::sync::Mutex<Option<std::os::unix::net::UnixListener>>,
    /// Locks held while serving: the socket's, and the disk image's.
    _locks: Vec<std::fs::File>,
    device: Arc<RwLock<D>>,
    metrics: Arc<Metrics>,
    channel_memory: Arc<SharedMemory>,
    _hardware: Box<dyn std::any::Any + Send + Sync>,
}

/// A block device being served.
pub type BlkService = DeviceService<BlkDevice>;
/// A net device being served.
pub type NetService = DeviceService<NetDevice>;

/// What the serving loop and the control socket need of a device, block or net.
pub trait ServedDevice:
    vhost_user_backend::VhostUserBackendMut<Bitmap = (), Vring = crate::client_vring::ClientVring> + Send + Sync + 'static
{
    /// "blk" or "net", for `reflector status`.
    const KIND: &'static str;
    /// The protocol, for logs.
    const PROTOCOL: &'static str;
    /// The device's own event sources for the vhost-user worker, with their ids.
    fn listeners(&self) -> Vec<(RawFd, u16)>;
    /// A client connected; `connection` ends its connection.
    fn client_connected(&mut self, connection: vhost_user_backend::ShutdownHandle);
    /// The client went away.
    fn client_gone(&mut self);
    /// Kills the driver VMs for good, without waiting for them.
    fn stop(&mut self);
    /// Kills the driver VMs for good and waits (bounded) for them.
    fn shutdown(&mut self);
    /// An eventfd that makes a failed device try a new driver VM.
    fn recover_trigger(&self) -> std::io::Result<EventFd>;
    /// An eventfd that makes the device SIGKILL its driver VM.
    fn kill_trigger(&self) -> std::io::Result<EventFd>;
}

impl<K: ServedKind> ServedDevice for Device<K> {
    const KIND: &'static str = K::KIND;
    const PROTOCOL: &'static str = K::PROTOCOL;
    fn listeners(&self) -> Vec<(RawFd, u16)> {
        Device::listeners(self)
    }
    fn client_gone(&mut self) {
        Device::client_gone(self)
    }
    fn client_connected(&mut self, connection: vhost_user_backend::ShutdownHandle) {
        Device::client_connected(self, connection)
    }
    fn stop(&mut self) {
        Device::stop(self)
    }
    fn shutdown(&mut self) {
        Device::shutdown(self)
    }
    fn recover_trigger(&self) -> std::io::Result<EventFd> {
        Device::recover_trigger(self)
    }
    fn kill_trigger(&self) -> std::io::Result<EventFd> {
        Device::kill_trigger(self)
    }
}

/// The names a kind of device is served under.
pub trait ServedKind: DeviceKind {
    /// "blk" or "net", for `reflector status`.
    const KIND: &'static str;
    /// The protocol, for logs.
    const PROTOCOL: &'static str;
}

impl ServedKind for Blk {
    const KIND: &'static str = "blk";
    const PROTOCOL: &'static str = "vhost-user-blk";
}

impl ServedKind for Net {
    const KIND: &'static str = "net";
    const PROTOCOL: &'static str = "vhost-user-net";
}

impl<D: ServedDevice> DeviceService<D> {
    /// Runs `stopping` on the device, once its worker lets go of it. A
    /// worker holds it for each event it handles: this waits for a moment
    /// it does, but never for ever on a worker that does not (its driver
    /// VMs then end with their keepers, which watch the reflector).
    fn with_device(&self, stopping: impl FnOnce(&mut D)) {
        let deadline = Instant::now() + SHUTDOWN_LOCK_WAIT;
        let device =
            crate::hw::poll_until(deadline, Duration::from_micros(50), Duration::from_millis(5), || {
                match self.device.try_write() {
                    Ok(device) => Some(device),
                    Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                }
            });
        match device {
            Some(mut device) => stopping(&mut device),
            None => tracing::warn!(
                device = %self.name,
                "device still busy after {SHUTDOWN_LOCK_WAIT:?} at shutdown; its driver VMs end with the reflector"
            ),
        }
    }
}

impl<D: ServedDevice> Service for DeviceService<D> {
    fn name(&self) -> &str {
        &self.name
    }

    fn socket(&self) -> &Path {
        &self.socket
    }

    fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn stop(&self) {
        self.with_device(ServedDevice::stop);
    }

    fn shutdown(&self) {
        self.with_device(ServedDevice::shutdown);
    }

    fn control_target(&self) -> Result<ControlTarget, String> {
        let device = self.device.read().map_err(|_| "device lock poisoned".to_string())?;
        let name = &self.name;
        let recover = device.recover_trigger().map_err(|e| format!("{name}: {e}"))?;
        let kill = device.kill_trigger().map_err(|e| format!("{name}: {e}"))?;
        Ok(ControlTarget {
            name: name.clone(),
            kind: D::KIND,
            metrics: self.metrics.clone(),
            channel: self.channel_memory.clone(),
            recover,
            kill,
        })
    }

    fn serve(&self) -> Result<(), String> {
        let listener = self
            .listener
            .lock()
            .map_err(|_| format!("{}: listener lock poisoned", self.name))?
            .take()
            .ok_or_else(|| format!("{}: served twice", self.name))?;
        let hooks = ConnectionHooks { listeners: D::listeners, connected: D::client_connected, gone: D::client_gone };
        serve_socket(&self.name, listener, D::PROTOCOL, &self.device, hooks)
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{context}: {e}")
}

/// The jail of device `index`'s driver VMs, unless jailing is off.
fn jail_for(vmm: &Path, name: &str, index: u32, settings: &JailSettings) -> Result<Option<Arc<Jail>>, String> {
    jail_of(Jailed::Vmm(vmm), JailLimits::default(), name, index, settings).map_err(|e| format!("{name}: {e}"))
}

/// How device `index`'s QEMU processes start: `qemu`, in a jail of their
/// own unless jailing is off, which lets them set up io_uring only if
/// `io_uring` says so.
fn qemu_process(
    qemu: &Path,
    io_uring: IoUring,
    image: Option<&Path>,
    name: &str,
    index: u32,
    settings: &JailSettings,
) -> Result<QemuProcess, String> {
    // A QEMU taken over (by a driver through its device model) must not
    // fill the host's filesystem: no file it writes grows past its image.
    let largest_file = match image {
        Some(image) => {
            std::fs::metadata(image).map_err(|e| format!("{name}: reading the size of {}: {e}", image.display()))?.len()
        }
        None => 0,
    };
    let jailed = Jailed::DeviceModel { qemu, io_uring, largest_file };
    let jail = jail_of(jailed, JailLimits::DEVICE_MODEL, name, index, settings).map_err(|e| {
        format!(
            "{name}: jailing QEMU ({}): {e} (install QEMU, e.g. the Debian package qemu-system-x86)",
            qemu.display()
        )
    })?;
    Ok(QemuProcess { binary: qemu.to_owned(), jail: jail.map(|jail| jail as Arc<dyn ProcessJail>) })
}

/// A jail holding `what` for device `index`, unless jailing is off.
fn jail_of(
    what: Jailed<'_>,
    limits: JailLimits,
    name: &str,
    index: u32,
    settings: &JailSettings,
) -> Result<Option<Arc<Jail>>, crate::jail::JailError> {
    if !settings.enabled {
        return Ok(None);
    }
    let base = match settings.uid_base {
        Some(base) => base,
        None => crate::jail::default_uid_base()?,
    };
    Jail::prepare_for(what, name, index, base, limits, settings.user).map(|jail| Some(Arc::new(jail)))
}

/// Claims a device's socket path (see `sockets`).
fn claim_socket(
    name: &str,
    path: &Path,
    client_user: Option<&str>,
) -> Result<(std::os::unix::net::UnixListener, std::fs::File), String> {
    let client = match client_user {
        Some(user) => {
            let user =
                crate::privileges::User::resolve(user).map_err(|e| format!("{name}: client_user={user}: {e}"))?;
            Some((user.uid, user.gid))
        }
        None => None,
    };
    crate::sockets::claim_for(path, client)
        .map(crate::sockets::ClaimedSocket::into_listener)
        .map_err(|e| format!("{name}: {e}"))
}

/// Starts everything behind one block device (not yet its socket), whose
/// image [`crate::disk_image::prepare`] made ready and locked (`image_lock`:
/// a copy is held while the device serves).
pub fn start_blk(
    config: &BlkConfig,
    image_lock: Option<&std::fs::File>,
    vmm: &Path,
    jail: &JailSettings,
    index: u32,
) -> Result<BlkService, String> {
    let name = &config.name;
    let image_lock = image_lock
        .map(std::fs::File::try_clone)
        .transpose()
        .map_err(io(format!("{name}: keeping the lock of disk image {}", config.image.display())))?;
    let (listener, socket_lock) = claim_socket(name, &config.socket, config.client_user.as_deref())?;
    let channel = Channel::new(name).map_err(io(format!("{name}: creating the channel")))?;
    let hardware: Arc<dyn BlockHardware> = match &config.device {
        DeviceHardware::Sim => {
            let hardware_config =
                SimStorageConfig { name: name.clone(), image: config.image.clone(), read_only: config.read_only };
            let started = match config.dma {
                DmaMode::Bounce => SimStorage::start(&hardware_config, bounce_dma(&channel)),
                // The windows sit where the bounce slots are: the driver
                // names the same addresses either way.
                DmaMode::Direct => {
                    tracing::info!(device = %name, "payloads go through per-request DMA windows (dma=direct)");
                    SimStorage::start_direct(&hardware_config, request_windows())
                }
            };
            Arc::new(started.map_err(io(format!("{name}: starting the controller")))?)
        }
        DeviceHardware::QemuModel { qemu } => {
            // The controller reaches the bounce slots and the driver's
            // device area, nothing else, at DMA_BASE.
            channel.set_dma_address(crate::hw::qemu::DMA_BASE);
            let aio = config.aio.unwrap_or_default();
            let drive = Drive { image: config.image.clone(), read_only: config.read_only, aio };
            let nvme = QemuNvme::start(
                &qemu_process(qemu, config.io_uring(), Some(&config.image), name, index, jail)?,
                name,
                drive,
                channel.memory(),
                channel::BOUNCE_OFFSET,
                channel::DMA_SIZE,
                Some(channel::POSTED_MIRROR_OFFSET),
            )
            .map_err(|e| format!("{name}: starting QEMU's NVMe controller on {}: {e}", config.image.display()))?;
            Arc::new(nvme)
        }
        DeviceHardware::Memory => {
            let image = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&config.image)
                .map_err(io(format!("{name}: opening disk image {}", config.image.display())))?;
            Arc::new(
                MemoryDisk::start(image)
                    .map_err(io(format!("{name}: serving {} as device memory", config.image.display())))?,
            )
        }
        DeviceHardware::Vfio { address } => {
            // The IOMMU maps the bounce slots and the driver's device area,
            // nothing else, at DMA_BASE; the reflector's one identify uses
            // the device area before any driver runs.
            channel.set_dma_address(crate::hw::vfio::DMA_BASE);
            let nvme = VfioNvme::start(
                address,
                config.read_only,
                channel.memory(),
                channel::BOUNCE_OFFSET,
                channel::DMA_SIZE,
                channel::DEVICE_AREA_OFFSET - channel::BOUNCE_OFFSET,
            )
            .map_err(|e| format!("{name}: starting the VFIO NVMe controller: {e}"))?;
            Arc::new(nvme)
        }
    };
    // Before any driver VM starts: a medium too large to keep checksums
    // of is refused with nothing started.
    let kind = Blk::new(hardware.clone(), config.checksums, config.poison_deaths, config.driver_keeps_no_data())
        .map_err(|e| format!("{name}: {e}"))?;
    let channel_memory = channel.memory().clone();
    let setup = DriverSetup {
        vmm,
        jail,
        index,
        driver: &config.driver,
        args: &config.driver_args,
        memory: &config.driver_memory,
        hosted: config.hosted,
    };
    let wiring = wire(name, channel, hardware.clone(), &setup)?;
    let recovery = recovery_config(config.hang_deadline, config.fault_budget, config.spare, config.poison_deaths);
    let device = BlkDevice::new(name, kind, wiring, recovery).map_err(io(format!("{name}: starting the driver VM")))?;
    hardware.watch_failure(device.kill_trigger().map_err(io(format!("{name}: creating an eventfd")))?);
    let metrics = device.metrics();
    metrics.direct_dma.store(u64::from(config.dma == DmaMode::Direct), std::sync::atomic::Ordering::Relaxed);
    Ok(BlkService {
        name: config.name.clone(),
        socket: config.socket.clone(),
        listener: std::sync::Mutex::new(Some(listener)),
        _locks: std::iter::once(socket_lock).chain(image_lock).collect(),
        device: Arc::new(RwLock::new(device)),
        metrics,
        channel_memory,
        _hardware: Box::new(hardware),
    })
}

/// A device being served, whatever its kind.
pub trait Service: Send + Sync {
    /// Its name.
    fn name(&self) -> &str;
    /// Its vhost-user socket.
    fn socket(&self) -> &Path;
    /// Its counters.
    fn metrics(&self) -> &Arc<Metrics>;
    /// Kills its driver VMs and its hardware's process for good, without
    /// waiting for them: the reflector stops every device so first.
    fn stop(&self);
    /// Stops it if not yet done, waits (bounded) for what it killed, and
    /// takes down what they ran in (their cgroups).
    fn shutdown(&self);
    /// What the control socket may reach of it.
    fn control_target(&self) -> Result<ControlTarget, String>;
    /// Serves the socket until the process ends, one client at a time.
    fn serve(&self) -> Result<(), String>;
}

/// How long a device's socket waits after a failed accept (no descriptor
/// or memory left) before it accepts again.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A socket's accept failed (no descriptor or memory left): logged at each
/// power of two of `failures`, then a pause of [`ACCEPT_RETRY`] before
/// the next accept, so that a failure that persists does not spin.
pub(crate) fn accept_failed(failures: &mut crate::hw::LogEvery, socket: &str, error: &dyn std::fmt::Display) {
    if let Some(failures) = failures.note() {
        tracing::error!(socket, %error, failures, "cannot accept a client; trying again");
    }
    std::thread::sleep(ACCEPT_RETRY);
}

/// What [`serve_socket`] tells a device about its connections.
struct ConnectionHooks<D> {
    /// The device's own event sources, for the connection's worker.
    listeners: fn(&D) -> Vec<(RawFd, u16)>,
    /// A client connected: the handle ends its connection.
    connected: fn(&mut D, vhost_user_backend::ShutdownHandle),
    /// The client's connection ended.
    gone: fn(&mut D),
}

/// Serves `socket` with `device`, one client at a time, forever, telling
/// the device of each connection through `hooks`.
fn serve_socket<D>(
    name: &str,
    listener: std::os::unix::net::UnixListener,
    protocol: &str,
    device: &Arc<RwLock<D>>,
    hooks: ConnectionHooks<D>,
) -> Result<(), String>
where
    D: vhost_user_backend::VhostUserBackendMut<Bitmap = (), Vring = crate::client_vring::ClientVring>
        + Send
        + Sync
        + 'static,
{
    let mut listener = Listener::from(listener);
    let mut accept_failures = crate::hw::LogEvery::default();
    let mut pace = crate::connection_pace::ConnectionPace::default();
    tracing::info!(device = %name, "serving {protocol}");
    loop {
        // Out of descriptors or memory, say, at any step up to the accept:
        // the device serves again once they are back, instead of never
        // (its thread used to end here: at the accept, and later at the
        // making of the next client's daemon, whose epoll and eventfds
        // are descriptors too, which a review of the first fix's test
        // found). The pause keeps a persistent failure from spinning.
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.to_owned(), device.clone(), memory) {
            Ok(daemon) => daemon,
            Err(error) => {
                accept_failed(&mut accept_failures, name, &format!("creating the vhost-user daemon: {error}"));
                continue;
            }
        };
        let watched = {
            let handlers = daemon.get_epoll_handlers();
            let handler = handlers.first().ok_or_else(|| format!("{name}: no vhost-user worker"))?;
            let device = device.read().map_err(|_| format!("{name}: device lock poisoned"))?;
            (hooks.listeners)(&device)
                .into_iter()
                .try_for_each(|(fd, event)| handler.register_listener(fd, EventSet::IN, u64::from(event)))
        };
        if let Err(error) = watched {
            accept_failed(&mut accept_failures, name, &format!("watching the driver VM: {error}"));
            continue;
        }
        // A client past the pace waits in the backlog for its turn.
        while let Some(wait) = pace.admit() {
            if let Some(waits) = pace.note_wait() {
                tracing::warn!(
                    device = %name,
                    waits,
                    "clients connect faster than {} a second; each waits its turn",
                    crate::connection_pace::CONNECTIONS_PER_SECOND
                );
            }
            std::thread::sleep(wait);
        }
        if let Err(error) = daemon.start(&mut listener) {
            accept_failed(&mut accept_failures, name, &error);
            continue;
        }
        if let Some(unlogged) = pace.may_log() {
            tracing::info!(device = %name, left_out = unlogged, "client connected");
        }
        if let (Some(connection), Ok(mut device)) = (daemon.shutdown_handle(), device.write()) {
            (hooks.connected)(&mut device, connection);
        }
        match daemon.wait() {
            Ok(()) | Err(vhost_user_backend::Error::HandleRequest(VhostUserError::Disconnected)) => {}
            Err(error) => {
                if let Some(unlogged) = pace.may_log() {
                    tracing::warn!(device = %name, %error, left_out = unlogged, "client connection ended with an error");
                }
            }
        }
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        // Its worker joined and its view of the client's memory gone, so
        // the device's is the last and unmaps the table.
        drop(daemon);
        if let Ok(mut device) = device.write() {
            (hooks.gone)(&mut device);
        }
        if let Some(unlogged) = pace.may_log() {
            tracing::info!(device = %name, left_out = unlogged, "client disconnected; waiting for the next one");
        }
    }
}

/// Starts everything behind one net device (not yet its socket): its card
/// is plugged into the switch of that name in `switches`.
pub fn start_net(
    config: &NetConfig,
    vmm: &Path,
    switches: &Switches,
    jail: &JailSettings,
    index: u32,
) -> Result<NetService, String> {
    let name = &config.name;
    let (listener, socket_lock) = claim_socket(name, &config.socket, config.client_user.as_deref())?;
    let channel = Channel::new(name).map_err(io(format!("{name}: creating the channel")))?;
    let switch = switches.get(&config.switch);
    if config.driver == INLINE_NULL {
        return Err(format!("{name}: driver={INLINE_NULL} is a block benchmark baseline, not a network driver"));
    }
    let hardware: Arc<dyn NetHardware> = match &config.device {
        // The parser gives device=memory to block devices only.
        DeviceHardware::Memory => return Err(format!("{name}: device=memory is for block devices")),
        DeviceHardware::Sim => Arc::new(
            SimNic::start(name, config.mac, bounce_dma(&channel), switch)
                .map_err(io(format!("{name}: starting the network card")))?,
        ),
        DeviceHardware::QemuModel { qemu } => {
            // The card reaches the bounce slots and the driver's rings in
            // the device area, nothing else, at DMA_BASE.
            channel.set_dma_address(crate::hw::qemu::DMA_BASE);
            let nic = QemuNic::start(
                &qemu_process(qemu, IoUring::Denied, None, name, index, jail)?,
                name,
                config.mac,
                channel.memory(),
                channel::BOUNCE_OFFSET,
                channel::DMA_SIZE,
                switch,
            )
            .map_err(|e| format!("{name}: starting QEMU's e1000e: {e}"))?;
            Arc::new(nic)
        }
        DeviceHardware::Vfio { address } => {
            // The IOMMU maps the bounce slots and the driver's rings in the
            // device area, nothing else; the card's wire is its own port.
            channel.set_dma_address(crate::hw::vfio::DMA_BASE);
            let nic = VfioNic::start(address, channel.memory(), channel::BOUNCE_OFFSET, channel::DMA_SIZE)
                .map_err(|e| format!("{name}: starting the VFIO NIC: {e}"))?;
            if nic.mac() != config.mac {
                tracing::info!(device = %name, mac = ?nic.mac(), "a VFIO NIC keeps its own MAC address; mac= is ignored");
            }
            Arc::new(nic)
        }
    };
    let channel_memory = channel.memory().clone();
    let setup = DriverSetup {
        vmm,
        jail,
        index,
        driver: &config.driver,
        args: &config.driver_args,
        memory: &config.driver_memory,
        hosted: config.hosted,
    };
    let wiring = wire(name, channel, hardware.clone(), &setup)?;
    // Frames are never replayed: no poison limit applies.
    let recovery = recovery_config(config.hang_deadline, config.fault_budget, config.spare, u32::MAX);
    let kind = Net::new(hardware.clone());
    let device = NetDevice::new(name, kind, wiring, recovery).map_err(io(format!("{name}: starting the driver VM")))?;
    hardware.watch_failure(device.kill_trigger().map_err(io(format!("{name}: creating an eventfd")))?);
    let metrics = device.metrics();
    Ok(NetService {
        name: config.name.clone(),
        socket: config.socket.clone(),
        listener: std::sync::Mutex::new(Some(listener)),
        _locks: vec![socket_lock],
        device: Arc::new(RwLock::new(device)),
        metrics,
        channel_memory,
        _hardware: Box::new(hardware),
    })
}

/// The memory a device may reach by DMA: the channel's bounce slots (the
/// IOMMU of this design).
pub(crate) fn bounce_dma(channel: &Channel) -> DmaRegion {
    DmaRegion {
        memory: channel.memory().clone(),
        offset: channel::BOUNCE_OFFSET,
        len: channel::SLOT_COUNT as usize * channel::SLOT_SIZE as usize,
        gpa: CHANNEL_GPA + channel::BOUNCE_OFFSET as u64,
    }
}

/// Per-request DMA windows (`dma=direct`), one per bounce slot at the
/// slot's address.
fn request_windows() -> Arc<crate::hw::dma_windows::DmaWindows> {
    crate::hw::dma_windows::DmaWindows::new(
        CHANNEL_GPA + channel::BOUNCE_OFFSET as u64,
        channel::SLOT_SIZE,
        channel::SLOT_COUNT,
    )
}

/// What a device's driver VMs start as.
struct DriverSetup<'a> {
    vmm: &'a Path,
    jail: &'a JailSettings,
    /// The device's index (its jail's ids).
    index: u32,
    driver: &'a str,
    args: &'a str,
    memory: &'a str,
    /// The driver runs hosted (development only, without the jail).
    hosted: bool,
}

/// Wires `hardware` and `channel` to driver VMs of `setup`: their eventfds,
/// their launcher (checked: a bad `driver=` or `memory=` fails the start),
/// the device's wiring.
fn wire(
    name: &str,
    channel: Channel,
    hardware: Arc<dyn Hardware>,
    setup: &DriverSetup,
) -> Result<DeviceWiring, String> {
    let creating = || io(format!("{name}: creating an eventfd"));
    let completion_doorbell = SharedEventFd::new().map_err(creating())?;
    let driver_exited = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(creating())?;
    if setup.hosted && setup.jail.enabled {
        return Err(format!(
            "{name}: hosted=on runs the driver as a plain process, without a VM or a jail: a development mode \
             only, which needs the reflector started with --no-jail"
        ));
    }
    let mut memory_cap = None;
    let launcher: Box<dyn crate::driver_vms::DriverLaunch> = if setup.driver == INLINE_NULL {
        tracing::warn!(device = %name, "driver=inline-null: no driver; the reflector completes every request itself (a benchmark baseline)");
        Box::new(
            InlineNull::new(name, channel.memory().clone(), &completion_doorbell, &driver_exited)
                .map_err(io(format!("{name}: creating an eventfd")))?,
        )
    } else {
        let jail = jail_for(setup.vmm, name, setup.index, setup.jail)?;
        memory_cap = jail.as_ref().and_then(|jail| jail.memory_cap());
        let spec = DriverVmSpec {
            hosted: setup.hosted,
            name: name.to_owned(),
            vmm: setup.vmm.to_owned(),
            image: setup.driver.to_owned(),
            args: setup.args.to_owned(),
            memory: setup.memory.to_owned(),
            jail,
        };
        let launcher = launcher_for(spec, hardware.as_ref(), &channel, &completion_doorbell, &driver_exited)?;
        launcher.check().map_err(|e| format!("{name}: the driver VM cannot start: {e}"))?;
        Box::new(launcher)
    };
    Ok(DeviceWiring {
        channel,
        device_interrupt: hardware.interrupt(),
        hardware,
        completion_doorbell,
        driver_exited,
        launcher,
        poll_window: POLL_WINDOW,
        memory_cap,
    })
}

/// How long a device's worker polls for completions after a kick
/// (`Device::poll_for_completions`): a null driver in a driver VM answers
/// within 9 us (p50) when polled, against 34-41 us through its doorbell
/// (an exit here) and the worker's wake-up; 30 us catches such answers, and
/// polling 30, 60 or 100 us made no further difference (measured with
/// 4k QD1 reads: 11k IOPS without polling, 27-34k with). Devices slower
/// than the window (the simulated controller answers in about 70 us) lose
/// their poll credit and are left to their doorbell.
const POLL_WINDOW: std::time::Duration = std::time::Duration::from_micros(30);

fn recovery_config(
    hang_deadline: std::time::Duration,
    budget: u32,
    spare: Option<crate::driver_vms::SpareKind>,
    poison_deaths: u32,
) -> RecoveryConfig {
    let policy = RestartPolicy { budget, ..RestartPolicy::default() };
    RecoveryConfig { hang_deadline, policy, spare, poison_deaths }
}

/// A launcher wiring driver VMs the way both drivers expect: the hardware's
/// windows at REGS_GPA, the channel at CHANNEL_GPA, doorbell 0 to the
/// reflector and doorbell 1 to the hardware, two interrupt lines (0: the
/// reflector's "requests published", 1: the hardware's interrupt).
fn launcher_for(
    spec: DriverVmSpec,
    hardware: &dyn Hardware,
    channel: &Channel,
    completion_doorbell: &SharedEventFd,
    driver_exited: &EventFd,
) -> Result<DriverLauncher, String> {
    let name = spec.name.clone();
    let dup = |fd: &SharedEventFd| fd.try_clone().map_err(io(format!("{name}: duplicating an eventfd")));
    let mut windows: Vec<Window> =
        hardware.windows().into_iter().map(|w| Window { gpa: REGS_GPA, memory: w.memory, name: w.name }).collect();
    windows.push(Window { gpa: CHANNEL_GPA, memory: channel.memory().clone(), name: "channel" });
    let traps = hardware.traps().into_iter().map(|trap| (REGS_GPA, trap)).collect();
    let doorbells = vec![(DOORBELL_GPA, dup(completion_doorbell)?), (DOORBELL_GPA + 8, dup(hardware.doorbell())?)];
    let exited = driver_exited.try_clone().map_err(io(format!("{name}: duplicating an eventfd")))?;
    Ok(DriverLauncher::new(spec, windows, traps, doorbells, 2, exited))
}
