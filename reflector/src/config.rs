//! Reflector configuration: `--blk` and `--net` one-liners and the TOML file, both
//! checked before anything starts. Errors name the option or the file, line
//! and key at fault.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::driver_vms::SpareKind;
use crate::hw::qemu::DriveAio;
use crate::jail::IoUring;

/// Default driver image for block devices.
pub const DEFAULT_BLK_DRIVER: &str = "blk";
/// Default driver image for net devices.
pub const DEFAULT_NET_DRIVER: &str = "net";
/// Default switch of net devices: devices that name no switch share one.
pub const DEFAULT_SWITCH: &str = "default";
/// Default driver VM RAM: the block driver needs well under a megabyte;
/// unused pages cost nothing.
pub const DEFAULT_DRIVER_MEMORY: &str = "16M";

/// A configuration error, ready to print.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// One block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Name (driver VM name, logs, device id).
    pub name: String,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// The user whose processes may connect to the socket (`client_user=`,
    /// a name or uid[:gid]): the socket is theirs, mode 0600. None: the
    /// reflector's user's (root's), so every client must run as that user,
    /// and one tenant's QEMU could connect to another's device whenever
    /// that one's is not connected.
    pub client_user: Option<String>,
    /// Disk image file.
    pub image: PathBuf,
    /// Create the image with this size if it does not exist.
    pub size: Option<u64>,
    /// Driver image (built-in name or path).
    pub driver: String,
    /// Driver VM RAM.
    pub driver_memory: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Keep a checksum of every sector written through the device and check
    /// reads against it (4 bytes of reflector memory per 512-byte sector).
    pub checksums: bool,
    /// Pending requests with no progress for this long mean a hung driver VM.
    pub hang_deadline: std::time::Duration,
    /// Driver VM faults tolerated per 10 s before the device fails.
    pub fault_budget: u32,
    /// A request in flight in this many dying driver VMs in a row completes
    /// with an error instead of being replayed again.
    pub poison_deaths: u32,
    /// Words added to the driver's command line (a driver's parameters).
    pub driver_args: String,
    /// What to keep ready to replace a failed driver VM: nothing, a
    /// standby vmm (the default), or a booted driver VM
    /// (`spare=off|standby|warm`).
    pub spare: Option<SpareKind>,
    /// Run the driver hosted (a plain process, `vmm run --hosted`), for
    /// development only: needs `--no-jail`.
    pub hosted: bool,
    /// The hardware the driver VM drives.
    pub device: DeviceHardware,
    /// How request payloads reach the device.
    pub dma: DmaMode,
    /// How QEMU's block layer reaches the image (`aio=threads|io_uring`,
    /// `device=nvme` only; None: QEMU's thread pool).
    pub aio: Option<DriveAio>,
}

impl BlkConfig {
    /// Whether the configured driver answers without its device, keeping
    /// no data: `null` (the built-in image, or a build of it named so, as
    /// `hosted=on` takes) and `inline-null`, the one kind of driver no
    /// record of the device's writes judges.
    pub fn driver_keeps_no_data(&self) -> bool {
        let name = std::path::Path::new(&self.driver).file_name().and_then(|name| name.to_str());
        matches!(name.unwrap_or(&self.driver), "null" | crate::inline_driver::INLINE_NULL)
    }

    /// Whether this disk's QEMU may use io_uring: only with `aio=io_uring`.
    pub fn io_uring(&self) -> IoUring {
        if self.aio == Some(DriveAio::IoUring) {
            IoUring::Allowed
        } else {
            IoUring::Denied
        }
    }
}

/// Parses `aio=`: QEMU's names ([`DriveAio::as_str`]).
fn parse_aio(value: &str) -> Result<DriveAio, String> {
    [DriveAio::Threads, DriveAio::IoUring]
        .into_iter()
        .find(|aio| aio.as_str() == value)
        .ok_or_else(|| format!("aio={value}: expected threads or io_uring"))
}

/// How a block device's payloads travel between the client and the device
/// (`dma=`; DESIGN.md, "Per-request DMA windows"; threat model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DmaMode {
    /// The device reaches only the channel's bounce slots; the reflector
    /// copies each payload between a slot and client memory (`dma=bounce`,
    /// the default: client memory is touched by the reflector alone).
    #[default]
    Bounce,
    /// The device reaches a request's own client buffers through a window
    /// mapped while the request is in flight, in its direction only, and
    /// revoked before it completes or when its driver VM dies
    /// (`dma=direct`): one copy fewer. `device=sim` only; not with
    /// `checksums=on` (the judge checks a copy that then does not exist).
    Direct,
}

impl DmaMode {
    fn parse(value: &str) -> Result<DmaMode, String> {
        match value {
            "bounce" => Ok(DmaMode::Bounce),
            "direct" => Ok(DmaMode::Direct),
            _ => Err(format!("dma={value}: expected bounce or direct")),
        }
    }
}

/// The hardware behind a device, whatever its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceHardware {
    /// The project's simulated device (`device=sim`).
    Sim,
    /// QEMU's model of a real device of the kind (`device=nvme` for a
    /// block device, `device=e1000e` for a net device), in a QEMU process
    /// started from `qemu`.
    QemuModel {
        /// The `qemu-system-x86_64` binary.
        qemu: PathBuf,
    },
    /// The disk image itself as device memory (`device=memory`, block
    /// only): the `vmdisk` driver copies to and from it; its data survives
    /// every restart of the driver.
    Memory,
    /// A real PCI function bound to vfio-pci (`device=vfio:DDDD:BB:DD.F`):
    /// an NVMe controller for a block device, an e1000e for a net device,
    /// driven by the same driver as QEMU's model of it.
    Vfio {
        /// Its PCI address.
        address: String,
    },
}

/// The hardware a device kind can have, for `device=` and the default
/// driver.
pub struct KindHardware {
    /// What the simulated device is, for errors.
    sim: &'static str,
    /// `device=` value and description of the QEMU model.
    model: (&'static str, &'static str),
    /// Default drivers: of the simulated device, of the QEMU model.
    drivers: (&'static str, &'static str),
    /// The driver of `device=memory`, for kinds that have it.
    memory: Option<&'static str>,
}

/// What a block device can be.
pub const BLK_HARDWARE: KindHardware = KindHardware {
    sim: "the simulated controller",
    model: ("nvme", "QEMU's NVMe model"),
    drivers: (DEFAULT_BLK_DRIVER, "nvme"),
    memory: Some("vmdisk"),
};

/// What a net device can be.
pub const NET_HARDWARE: KindHardware = KindHardware {
    sim: "the simulated card",
    model: ("e1000e", "QEMU's e1000e model"),
    drivers: (DEFAULT_NET_DRIVER, "e1000e"),
    memory: None,
};

impl DeviceHardware {
    /// From `device=` and `qemu=`, for a device of `kind`.
    fn parse(kind: &KindHardware, device: &str, qemu: Option<PathBuf>) -> Result<Self, String> {
        let (model, model_description) = kind.model;
        match (device, qemu) {
            ("sim", None) => Ok(DeviceHardware::Sim),
            ("sim", Some(_)) => Err(format!("qemu= is for device={model}")),
            ("memory", None) if kind.memory.is_some() => Ok(DeviceHardware::Memory),
            ("memory", Some(_)) if kind.memory.is_some() => Err(format!("qemu= is for device={model}")),
            (named, qemu) if named == model => {
                Ok(DeviceHardware::QemuModel { qemu: qemu.unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU)) })
            }
            (vfio, Some(_)) if vfio.starts_with("vfio:") => Err(format!("qemu= is for device={model}")),
            (vfio, None) if vfio.starts_with("vfio:") => {
                let address = &vfio["vfio:".len()..];
                if !crate::hw::vfio::is_pci_address(address) {
                    return Err(format!(
                        "device={vfio}: {address:?} is not a PCI address (expected vfio:DDDD:BB:DD.F, e.g. vfio:0000:01:00.0)"
                    ));
                }
                Ok(DeviceHardware::Vfio { address: address.to_owned() })
            }
            (other, _) => Err(format!(
                "device={other}: expected sim ({}), {model} ({model_description}){} or vfio:DDDD:BB:DD.F (a real \
                 {model} bound to vfio-pci)",
                kind.sim,
                if kind.memory.is_some() { ", memory (the image as device memory, driver vmdisk)" } else { "" }
            )),
        }
    }

    /// The driver a device of this hardware runs unless `driver=` says.
    fn default_driver(&self, kind: &KindHardware) -> &'static str {
        match self {
            DeviceHardware::Sim => kind.drivers.0,
            DeviceHardware::QemuModel { .. } | DeviceHardware::Vfio { .. } => kind.drivers.1,
            DeviceHardware::Memory => kind.memory.unwrap_or(kind.drivers.0),
        }
    }
}

/// The QEMU binary `device=nvme` starts unless `qemu=` says.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// One net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name (driver VM name, logs).
    pub name: String,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// The user whose processes may connect to the socket (`client_user=`,
    /// a name or uid[:gid]): the socket is theirs, mode 0600. None: the
    /// reflector's user's (root's), so every client must run as that user,
    /// and one tenant's QEMU could connect to another's device whenever
    /// that one's is not connected.
    pub client_user: Option<String>,
    /// The card's MAC address (what the client sees in its config space).
    pub mac: [u8; 6],
    /// The switch its wire is plugged into (devices on one switch talk).
    pub switch: String,
    /// Driver image (built-in name or path).
    pub driver: String,
    /// Driver VM RAM.
    pub driver_memory: String,
    /// Frames being sent with no progress for this long mean a hung driver VM.
    pub hang_deadline: std::time::Duration,
    /// Driver VM faults tolerated per 10 s before the device fails.
    pub fault_budget: u32,
    /// What to keep ready to replace a failed driver VM: nothing, a
    /// standby vmm (the default), or a booted driver VM
    /// (`spare=off|standby|warm`).
    pub spare: Option<SpareKind>,
    /// Run the driver hosted (see [`BlkConfig::hosted`]).
    pub hosted: bool,
    /// Words added to the driver's command line (a driver's parameters).
    pub driver_args: String,
    /// The card the driver VM drives.
    pub device: DeviceHardware,
}

/// A host TAP device bridged into a switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapConfig {
    /// Interface name (created if missing).
    pub name: String,
    /// The switch it is plugged into.
    pub switch: String,
}

/// Everything the reflector serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Block devices.
    pub blk: Vec<BlkConfig>,
    /// Net devices.
    pub net: Vec<NetConfig>,
    /// TAP devices bridged into switches.
    pub tap: Vec<TapConfig>,
    /// The vmm binary, if not next to the reflector.
    pub vmm: Option<PathBuf>,
    /// How driver VMs are jailed.
    pub jail: JailSettings,
    /// The unprivileged user (name, or uid[:gid]) the reflector becomes
    /// once it has set up; None: it stays as started.
    pub user: Option<String>,
}

/// How driver VMs are jailed (see `jail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JailSettings {
    /// Jail every vmm (needs root). Off only for development.
    pub enabled: bool,
    /// Device N's driver VMs run as uid and gid `uid_base + N`; by default
    /// a range of its own for each running reflector (see `jail`).
    pub uid_base: Option<u32>,
    /// The unprivileged user (uid, gid) the reflector becomes once set up
    /// (`user`, resolved at start); its driver VMs then run as that user.
    pub user: Option<(u32, u32)>,
}

/// A driver is a built-in image's name (`vmm images`: letters, digits,
/// `-`, `_`, `.`) or a path with a `/`. Anything else went to `vmm
/// --image` as it was: `fd=3` had the vmm read whatever its descriptor 3
/// was, and `--help` became an option (an adversarial review found it).
fn check_driver(driver: &str) -> Result<(), &'static str> {
    let name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    match driver.contains('/') || (driver.chars().all(name) && driver.starts_with(|c: char| c.is_ascii_alphanumeric()))
    {
        true => Ok(()),
        false => Err("give a built-in image's name (vmm images) or a path with a /"),
    }
}

/// What names the same file as `path` does, however spelled: its
/// directory resolved (symlinks, `..`, relative to the working directory)
/// and its own name; the path as given where the directory does not exist
/// (the start then fails on it anyway).
pub fn same_file_key(path: &Path) -> PathBuf {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(parent), path.file_name()) {
        (Ok(parent), Some(name)) => parent.join(name),
        _ => path.to_owned(),
    }
}

impl Default for JailSettings {
    fn default() -> Self {
        JailSettings { enabled: true, uid_base: None, user: None }
    }
}

/// Parses a size: bytes, or with a K/M/G/T suffix (binary).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        Some((i, 't' | 'T')) => (&text[..i], 40),
        _ => (text, 0),
    };
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size such as 512M or 4G"))?;
    let bytes = value.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!("{text:?} must be a nonzero multiple of 512 bytes"));
    }
    Ok(bytes)
}

/// Parses a unicast MAC address such as 52:54:00:12:34:56.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let octets: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if octets.len() != 6 {
        return Err(format!("{text:?} is not a MAC address such as 52:54:00:12:34:56"));
    }
    for (byte, octet) in mac.iter_mut().zip(&octets) {
        *byte = match u8::from_str_radix(octet, 16) {
            // Two hex digits: from_str_radix also takes a sign (`+2`).
            Ok(value) if octet.len() == 2 && octet.bytes().all(|b| b.is_ascii_hexdigit()) => value,
            _ => return Err(format!("{text:?} is not a MAC address such as 52:54:00:12:34:56")),
        };
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{text:?} is a multicast address; a card needs a unicast one"));
    }
    if mac == [0; 6] {
        return Err(format!("{text:?} is the all-zero address, which no card may have"));
    }
    Ok(mac)
}

/// The MAC of net device `index` when none is given: QEMU's prefix
/// 52:54:00, then 0xd5 ("driver VM") and the index.
pub fn default_mac(index: usize) -> [u8; 6] {
    let i = (index as u16).to_be_bytes();
    [0x52, 0x54, 0x00, 0xd5, i[0], i[1]]
}

fn parse_budget(value: &str) -> Result<u32, String> {
    positive("fault_budget", value)
}

/// `value` of `key` as a positive number: the same rule on the command line
/// and in the file.
fn positive(key: &str, value: &str) -> Result<u32, String> {
    value.parse().ok().filter(|n| *n > 0).ok_or_else(|| format!("{key}={value}: expected a positive number"))
}

/// A driver's parameters: words of letters, digits and `-=.:_`, which
/// pass through the vmm's command line unchanged.
fn check_driver_args(value: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-=.:_ ".contains(c);
    if value.len() > 200 || !value.chars().all(allowed) {
        return Err(format!(
            "driver_args={value:?}: expected at most 200 characters of letters, digits, spaces and -=.:_"
        ));
    }
    Ok(())
}

fn parse_millis(text: &str) -> Result<std::time::Duration, String> {
    match text.parse::<u64>() {
        Ok(ms) if (10..=600_000).contains(&ms) => Ok(std::time::Duration::from_millis(ms)),
        _ => Err(format!("{text:?}: expected milliseconds between 10 and 600000")),
    }
}

/// A `spare=` value: a kind, or on (warm) or off (none).
fn parse_spare(value: &str) -> Result<Option<SpareKind>, String> {
    match value {
        "standby" => Ok(Some(SpareKind::Standby)),
        "warm" => Ok(Some(SpareKind::Warm)),
        _ => parse_bool("spare", value)
            .map(|on| on.then_some(SpareKind::Warm))
            .map_err(|_| format!("spare={value}: expected off, standby or warm (on)")),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" | "" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={value}: expected on or off")),
    }
}

/// Parses `socket=PATH,image=PATH[,size=SIZE][,driver=IMAGE][,readonly=on][,name=NAME][,memory=SIZE]`;
/// `index` names the device when no name is given.
pub fn parse_blk(spec: &str, index: usize) -> Result<BlkConfig, ConfigError> {
    let error = |reason: String| ConfigError(format!("--blk {spec:?}: {reason}"));
    let mut config = BlkConfig {
        name: format!("blk{index}"),
        socket: PathBuf::new(),
        client_user: None,
        image: PathBuf::new(),
        size: None,
        driver: DEFAULT_BLK_DRIVER.into(),
        driver_memory: DEFAULT_DRIVER_MEMORY.into(),
        read_only: false,
        checksums: false,
        hang_deadline: crate::recovery::DEFAULT_HANG_DEADLINE,
        fault_budget: crate::recovery::RestartPolicy::default().budget,
        poison_deaths: crate::recovery::DEFAULT_POISON_DEATHS,
        driver_args: String::new(),
        spare: Some(SpareKind::Standby),
        hosted: false,
        device: DeviceHardware::Sim,
        dma: DmaMode::Bounce,
        aio: None,
    };
    let (mut device, mut qemu, mut driver) = ("sim".to_owned(), None, None);
    for item in spec.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match key {
            "socket" => config.socket = PathBuf::from(value),
            "client_user" => config.client_user = Some(value.to_owned()),
            "image" => config.image = PathBuf::from(value),
            "poison_deaths" => config.poison_deaths = positive(key, value).map_err(error)?,
            "driver_args" => {
                check_driver_args(value).map_err(error)?;
                config.driver_args = value.into();
            }
            "size" => config.size = Some(parse_size(value).map_err(|e| error(format!("size: {e}")))?),
            "driver" => driver = Some(value.to_owned()),
            "device" => device = value.to_owned(),
            "qemu" => qemu = Some(PathBuf::from(value)),
            // `driver_memory`, as in the file; `memory` is its short form.
            "driver_memory" | "memory" => config.driver_memory = value.into(),
            "name" => config.name = value.into(),
            "readonly" => config.read_only = parse_bool(key, value).map_err(error)?,
            "checksums" => config.checksums = parse_bool(key, value).map_err(error)?,
            "dma" => config.dma = DmaMode::parse(value).map_err(error)?,
            "aio" => config.aio = Some(parse_aio(value).map_err(error)?),
            "spare" => config.spare = parse_spare(value).map_err(error)?,
            "hosted" => config.hosted = parse_bool(key, value).map_err(error)?,
            "hang_ms" => config.hang_deadline = parse_millis(value).map_err(|e| error(format!("hang_ms: {e}")))?,
            "fault_budget" => config.fault_budget = parse_budget(value).map_err(error)?,
            _ => {
                return Err(error(format!(
                    "unknown key {key:?} (known: socket, client_user, image, size, device, qemu, driver, driver_args, driver_memory (or memory), name, readonly, checksums, dma, aio, spare, hosted, hang_ms, fault_budget, poison_deaths)"
                )))
            }
        }
    }
    config.device = DeviceHardware::parse(&BLK_HARDWARE, &device, qemu).map_err(error)?;
    config.driver = driver.unwrap_or_else(|| config.device.default_driver(&BLK_HARDWARE).into());
    check(&config).map_err(error)?;
    Ok(config)
}

fn check(config: &BlkConfig) -> Result<(), String> {
    match (&config.device, config.image.as_os_str().is_empty()) {
        (DeviceHardware::Vfio { .. }, false) => {
            return Err("image= is not for a VFIO function: the device is its own disk".into())
        }
        (DeviceHardware::Vfio { .. }, true) if config.size.is_some() => {
            return Err("size= is not for a VFIO function: its capacity is the device's".into())
        }
        (DeviceHardware::Vfio { .. }, true) => {}
        (_, true) => return Err("image=PATH is required".into()),
        (_, false) => {}
    }
    if config.device == DeviceHardware::Memory && config.read_only {
        // The driver maps the whole disk: read-only would take a read-only
        // window, which the memory device does not offer yet.
        return Err("readonly=on is not available with device=memory: use device=sim for a read-only disk".into());
    }
    let medium_read_back = matches!(config.device, DeviceHardware::Memory | DeviceHardware::QemuModel { .. });
    if medium_read_back && config.driver_keeps_no_data() {
        // Each write a driver answers OK is read back from these devices'
        // images (`blk::read_back`): a driver that keeps nothing would be
        // caught lying at every write, and its device fail.
        return Err(format!(
            "driver={} keeps no data, and device={} has every write read back from its image: use the default device (device=sim)",
            config.driver,
            if config.device == DeviceHardware::Memory { "memory" } else { "nvme" }
        ));
    }
    if config.aio.is_some() && !matches!(config.device, DeviceHardware::QemuModel { .. }) {
        // Only QEMU's block layer has an aio= to choose.
        return Err("aio= is for device=nvme (how QEMU reaches the image): other devices do their own I/O".into());
    }
    if config.checksums {
        if let Some(size) = config.size {
            crate::driver_answers::WrittenSums::check_capacity(size / 512).map_err(|e| e.to_string())?;
        }
    }
    if config.dma == DmaMode::Direct {
        if config.device != DeviceHardware::Sim {
            // QEMU's models and VFIO functions reach memory through their own
            // address spaces, and the memory disk is copied by its driver.
            return Err("dma=direct needs device=sim: other devices reach only the bounce slots".into());
        }
        if config.checksums {
            return Err(
                "dma=direct cannot be combined with checksums=on: the checksums judge the copy that direct DMA removes"
                    .into(),
            );
        }
    }
    check_common(&config.name, &config.socket, &config.driver)
}

/// Longest device name. A name goes into its driver VMs' cgroup directory
/// (`driver-vms-PID-NAME.N`, a path component of at most 255 bytes) and
/// memfd names: a name of 240 characters made the cgroup's creation fail,
/// and the device ran its driver VMs without a CPU, memory or task limit
/// (a warning was all).
pub const MAX_NAME_LEN: usize = 64;

/// Lowest `jail_uid_base`: the driver VMs' and device models' ids must be
/// no account's (login users, system and dynamic service users all lie
/// below 65,536) and root is never one of them.
pub const MIN_UID_BASE: u32 = 65_536;

fn check_common(name: &str, socket: &Path, driver: &str) -> Result<(), String> {
    if socket.as_os_str().is_empty() {
        return Err("socket=PATH is required".into());
    }
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("name {name:?}: use letters, digits, - and _"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name {name:?} is {} characters long: use at most {MAX_NAME_LEN}", name.len()));
    }
    if driver.is_empty() {
        return Err("driver must not be empty".into());
    }
    Ok(())
}

/// Parses `socket=PATH[,mac=MAC][,switch=NAME][,driver=IMAGE][,name=NAME][,memory=SIZE]
/// [,spare=off|standby|warm][,hang_ms=MS][,fault_budget=N]`; `index` names the device
/// (and picks its MAC) when none is given.
pub fn parse_net(spec: &str, index: usize) -> Result<NetConfig, ConfigError> {
    let error = |reason: String| ConfigError(format!("--net {spec:?}: {reason}"));
    let mut config = NetConfig {
        name: format!("net{index}"),
        socket: PathBuf::new(),
        client_user: None,
        mac: default_mac(index),
        switch: DEFAULT_SWITCH.into(),
        driver: DEFAULT_NET_DRIVER.into(),
        driver_memory: DEFAULT_DRIVER_MEMORY.into(),
        hang_deadline: crate::recovery::DEFAULT_HANG_DEADLINE,
        fault_budget: crate::recovery::RestartPolicy::default().budget,
        spare: Some(SpareKind::Standby),
        hosted: false,
        driver_args: String::new(),
        device: DeviceHardware::Sim,
    };
    let (mut device, mut qemu, mut driver) = ("sim".to_owned(), None, None);
    for item in spec.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match key {
            "socket" => config.socket = PathBuf::from(value),
            "client_user" => config.client_user = Some(value.to_owned()),
            "device" => device = value.to_owned(),
            "qemu" => qemu = Some(PathBuf::from(value)),
            "mac" => config.mac = parse_mac(value).map_err(|e| error(format!("mac: {e}")))?,
            "switch" => config.switch = value.into(),
            "driver" => driver = Some(value.to_owned()),
            // `driver_memory`, as in the file; `memory` is its short form.
            "driver_memory" | "memory" => config.driver_memory = value.into(),
            "name" => config.name = value.into(),
            "spare" => config.spare = parse_spare(value).map_err(error)?,
            "hosted" => config.hosted = parse_bool(key, value).map_err(error)?,
            "driver_args" => {
                check_driver_args(value).map_err(error)?;
                config.driver_args = value.into();
            }
            "hang_ms" => config.hang_deadline = parse_millis(value).map_err(|e| error(format!("hang_ms: {e}")))?,
            "fault_budget" => config.fault_budget = parse_budget(value).map_err(error)?,
            _ => {
                return Err(error(format!(
                "unknown key {key:?} (known: socket, client_user, mac, switch, device, qemu, driver, driver_args, driver_memory (or memory), name, spare, hosted, hang_ms, fault_budget)"
            )))
            }
        }
    }
    config.device = DeviceHardware::parse(&NET_HARDWARE, &device, qemu).map_err(error)?;
    config.driver = driver.unwrap_or_else(|| config.device.default_driver(&NET_HARDWARE).into());
    check_net(&config).map_err(error)?;
    Ok(config)
}

/// Parses `name=IFNAME[,switch=NAME]`.
pub fn parse_tap(spec: &str) -> Result<TapConfig, ConfigError> {
    let error = |reason: String| ConfigError(format!("--tap {spec:?}: {reason}"));
    let mut config = TapConfig { name: String::new(), switch: DEFAULT_SWITCH.into() };
    for item in spec.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match key {
            "name" => config.name = value.into(),
            "switch" => config.switch = value.into(),
            _ => return Err(error(format!("unknown key {key:?} (known: name, switch)"))),
        }
    }
    check_tap(&config).map_err(error)?;
    Ok(config)
}

fn check_tap(config: &TapConfig) -> Result<(), String> {
    let name = &config.name;
    if name.is_empty() || name.len() > 15 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("name {name:?}: an interface name of up to 15 letters, digits, - and _ is required"));
    }
    if config.switch.is_empty() {
        return Err("switch must not be empty".into());
    }
    Ok(())
}

fn check_net(config: &NetConfig) -> Result<(), String> {
    if config.switch.is_empty() {
        return Err("switch must not be empty".into());
    }
    check_common(&config.name, &config.socket, &config.driver)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    vmm: Option<PathBuf>,
    jail: Option<bool>,
    jail_uid_base: Option<u32>,
    user: Option<String>,
    #[serde(default)]
    blk: Vec<toml::Spanned<FileBlk>>,
    #[serde(default)]
    net: Vec<toml::Spanned<FileNet>>,
    #[serde(default)]
    tap: Vec<toml::Spanned<FileTap>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTap {
    name: String,
    switch: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNet {
    name: Option<String>,
    socket: PathBuf,
    client_user: Option<String>,
    mac: Option<toml::Spanned<String>>,
    switch: Option<String>,
    driver: Option<String>,
    #[serde(alias = "memory")]
    driver_memory: Option<String>,
    hang_ms: Option<toml::Spanned<u64>>,
    fault_budget: Option<u32>,
    driver_args: Option<String>,
    spare: Option<FileSpare>,
    #[serde(default)]
    hosted: bool,
    device: Option<String>,
    qemu: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBlk {
    name: Option<String>,
    socket: PathBuf,
    client_user: Option<String>,
    image: PathBuf,
    size: Option<toml::Spanned<String>>,
    driver: Option<String>,
    #[serde(alias = "memory")]
    driver_memory: Option<String>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    checksums: bool,
    dma: Option<toml::Spanned<String>>,
    aio: Option<toml::Spanned<String>>,
    hang_ms: Option<toml::Spanned<u64>>,
    fault_budget: Option<u32>,
    poison_deaths: Option<u32>,
    driver_args: Option<String>,
    spare: Option<FileSpare>,
    #[serde(default)]
    hosted: bool,
    device: Option<String>,
    qemu: Option<PathBuf>,
}

/// `spare = true | false | "off" | "standby" | "warm"`.
#[derive(Deserialize)]
#[serde(untagged, expecting = "key `spare`: expected true, false, \"off\", \"standby\" or \"warm\"")]
enum FileSpare {
    On(bool),
    Kind(String),
}

impl FileSpare {
    fn kind(spare: Option<FileSpare>) -> Result<Option<SpareKind>, String> {
        match spare {
            None => Ok(Some(SpareKind::Standby)),
            Some(FileSpare::On(on)) => Ok(on.then_some(SpareKind::Warm)),
            Some(FileSpare::Kind(kind)) => parse_spare(&kind),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Reads a TOML configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_bounded(path)
        .map_err(|e| ConfigError(format!("cannot read configuration file {}: {e}", path.display())))?;
    parse_file(&text, &path.display().to_string())
}

/// Largest configuration file read: a file describing hundreds of devices
/// is tens of kilobytes; `--config /dev/zero` must be an error, not a hang.
pub const MAX_CONFIG_FILE: u64 = 4 << 20;

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: opening a FIFO for reading waits for a writer for ever.
    let file = std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err(std::io::Error::other(format!("larger than {} MiB", MAX_CONFIG_FILE >> 20)));
    }
    Ok(text)
}

/// Parses a TOML configuration; `origin` names it in errors.
pub fn parse_file(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| format!(", line {}", line_of(text, span.start))).unwrap_or_default();
        ConfigError(format!("{origin}{line}: {}", e.message()))
    })?;
    let defaults = JailSettings::default();
    let jail = JailSettings {
        enabled: file.jail.unwrap_or(defaults.enabled),
        uid_base: file.jail_uid_base.or(defaults.uid_base),
        user: None,
    };
    let mut config = Config { vmm: file.vmm, jail, user: file.user, ..Config::default() };
    for (index, spanned) in file.blk.into_iter().enumerate() {
        let line = line_of(text, spanned.span().start);
        let blk = spanned.into_inner();
        let size = match blk.size {
            Some(size) => Some(parse_size(size.get_ref()).map_err(|e| {
                ConfigError(format!("{origin}, line {}: [[blk]] key `size`: {e}", line_of(text, size.span().start)))
            })?),
            None => None,
        };
        let hang_deadline = match blk.hang_ms {
            Some(ms) => parse_millis(&ms.get_ref().to_string()).map_err(|e| {
                ConfigError(format!("{origin}, line {}: [[blk]] key `hang_ms`: {e}", line_of(text, ms.span().start)))
            })?,
            None => crate::recovery::DEFAULT_HANG_DEADLINE,
        };
        let number = |key: &str, value: Option<u32>, default: u32| match value {
            Some(value) => positive(key, &value.to_string())
                .map_err(|e| ConfigError(format!("{origin}, line {line}: [[blk]] key `{key}`: {e}"))),
            None => Ok(default),
        };
        let driver_args = blk.driver_args.unwrap_or_default();
        check_driver_args(&driver_args)
            .map_err(|e| ConfigError(format!("{origin}, line {line}: [[blk]] key `driver_args`: {e}")))?;
        let hardware = DeviceHardware::parse(&BLK_HARDWARE, blk.device.as_deref().unwrap_or("sim"), blk.qemu)
            .map_err(|e| ConfigError(format!("{origin}, line {line}: [[blk]]: {e}")))?;
        let device = BlkConfig {
            spare: FileSpare::kind(blk.spare)
                .map_err(|e| ConfigError(format!("{origin}, line {line}: [[blk]] key `spare`: {e}")))?,
            hosted: blk.hosted,
            hang_deadline,
            fault_budget: number("fault_budget", blk.fault_budget, crate::recovery::RestartPolicy::default().budget)?,
            poison_deaths: number("poison_deaths", blk.poison_deaths, crate::recovery::DEFAULT_POISON_DEATHS)?,
            driver_args,
            name: blk.name.unwrap_or_else(|| format!("blk{index}")),
            socket: blk.socket,
            client_user: blk.client_user,
            image: blk.image,
            size,
            driver: blk.driver.unwrap_or_else(|| hardware.default_driver(&BLK_HARDWARE).into()),
            driver_memory: blk.driver_memory.unwrap_or_else(|| DEFAULT_DRIVER_MEMORY.into()),
            read_only: blk.readonly,
            checksums: blk.checksums,
            device: hardware,
            dma: match blk.dma {
                Some(dma) => DmaMode::parse(dma.get_ref()).map_err(|e| {
                    ConfigError(format!("{origin}, line {}: [[blk]] key `dma`: {e}", line_of(text, dma.span().start)))
                })?,
                None => DmaMode::Bounce,
            },
            aio: match blk.aio {
                Some(aio) => Some(parse_aio(aio.get_ref()).map_err(|e| {
                    ConfigError(format!("{origin}, line {}: [[blk]] key `aio`: {e}", line_of(text, aio.span().start)))
                })?),
                None => None,
            },
        };
        check(&device).map_err(|e| ConfigError(format!("{origin}, line {line}: [[blk]]: {e}")))?;
        config.blk.push(device);
    }
    for (index, spanned) in file.net.into_iter().enumerate() {
        let line = line_of(text, spanned.span().start);
        config.net.push(file_net(spanned.into_inner(), index, text, origin, line)?);
    }
    for spanned in file.tap {
        let line = line_of(text, spanned.span().start);
        let tap = spanned.into_inner();
        let tap = TapConfig { name: tap.name, switch: tap.switch.unwrap_or_else(|| DEFAULT_SWITCH.into()) };
        check_tap(&tap).map_err(|e| ConfigError(format!("{origin}, line {line}: [[tap]]: {e}")))?;
        config.tap.push(tap);
    }
    Ok(config)
}

fn file_net(net: FileNet, index: usize, text: &str, origin: &str, line: usize) -> Result<NetConfig, ConfigError> {
    let key_error = |key: &str, at: usize, e: String| {
        ConfigError(format!("{origin}, line {}: [[net]] key `{key}`: {e}", line_of(text, at)))
    };
    let mac = match net.mac {
        Some(mac) => parse_mac(mac.get_ref()).map_err(|e| key_error("mac", mac.span().start, e))?,
        None => default_mac(index),
    };
    let hang_deadline = match net.hang_ms {
        Some(ms) => parse_millis(&ms.get_ref().to_string()).map_err(|e| key_error("hang_ms", ms.span().start, e))?,
        None => crate::recovery::DEFAULT_HANG_DEADLINE,
    };
    let hardware = DeviceHardware::parse(&NET_HARDWARE, net.device.as_deref().unwrap_or("sim"), net.qemu)
        .map_err(|e| ConfigError(format!("{origin}, line {line}: [[net]]: {e}")))?;
    let device = NetConfig {
        name: net.name.unwrap_or_else(|| format!("net{index}")),
        socket: net.socket,
        client_user: net.client_user,
        mac,
        switch: net.switch.unwrap_or_else(|| DEFAULT_SWITCH.into()),
        driver: net.driver.unwrap_or_else(|| hardware.default_driver(&NET_HARDWARE).into()),
        driver_memory: net.driver_memory.unwrap_or_else(|| DEFAULT_DRIVER_MEMORY.into()),
        hang_deadline,
        fault_budget: match net.fault_budget {
            Some(budget) => positive("fault_budget", &budget.to_string())
                .map_err(|e| ConfigError(format!("{origin}, line {line}: [[net]] key `fault_budget`: {e}")))?,
            None => crate::recovery::RestartPolicy::default().budget,
        },
        spare: FileSpare::kind(net.spare)
            .map_err(|e| ConfigError(format!("{origin}, line {line}: [[net]] key `spare`: {e}")))?,
        hosted: net.hosted,
        driver_args: {
            let args = net.driver_args.unwrap_or_default();
            check_driver_args(&args)
                .map_err(|e| ConfigError(format!("{origin}, line {line}: [[net]] key `driver_args`: {e}")))?;
            args
        },
        device: hardware,
    };
    check_net(&device).map_err(|e| ConfigError(format!("{origin}, line {line}: [[net]]: {e}")))?;
    Ok(device)
}

impl Config {
    /// A client's uid must be none of the reflector's own: not the user it
    /// becomes (`user`), whose processes the reflector and, with it, every
    /// driver VM are, nor one of the jail's ids, its driver VMs' and device
    /// models' (a review found a client could be given either, and then
    /// signal them).
    fn check_client_uid(&self, uid: u32) -> Result<(), String> {
        if let Some(user) = &self.user {
            if crate::privileges::User::resolve(user).is_ok_and(|reflector| reflector.uid == uid) {
                return Err(format!("uid {uid} is the reflector's own user ({user})"));
            }
        }
        let ids = u64::from(crate::jail::IDS_PER_REFLECTOR);
        let ranges = match self.jail.uid_base {
            Some(base) => u64::from(base)..u64::from(base) + ids,
            None => {
                let base = u64::from(crate::jail::DEFAULT_UID_BASE);
                base..base + u64::from(crate::jail::DEFAULT_RANGES) * ids
            }
        };
        if self.jail.enabled && ranges.contains(&u64::from(uid)) {
            return Err(format!(
                "uid {uid} is among the jail's ids ({}-{}), its driver VMs' and device models'",
                ranges.start,
                ranges.end - 1
            ));
        }
        Ok(())
    }

    /// Each device's name and socket path, block devices first.
    pub fn device_sockets(&self) -> impl Iterator<Item = (&str, &Path)> {
        let blk = self.blk.iter().map(|b| (b.name.as_str(), b.socket.as_path()));
        blk.chain(self.net.iter().map(|n| (n.name.as_str(), n.socket.as_path())))
    }

    /// Checks what no single device can: unique names and sockets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.blk.is_empty() && self.net.is_empty() {
            // A TAP alone bridges a switch no device is plugged into.
            let message = if self.tap.is_empty() {
                "nothing to serve: give --blk, --net or --config (see reflector serve --help)"
            } else {
                "nothing to serve: a TAP device only bridges a switch to the host, and no device is on it: add a \
                 --net (a [[net]] table in a file) on the TAP's switch"
            };
            return Err(ConfigError(message.into()));
        }
        if let Some(base) = self.jail.uid_base {
            let ids = crate::jail::IDS_PER_REFLECTOR;
            // The last id of the range stays below (uid_t)-1, which means "no id".
            if base < MIN_UID_BASE || base.checked_add(ids).is_none_or(|end| end == u32::MAX) {
                return Err(ConfigError(format!(
                    "jail_uid_base {base}: the driver VMs' ids ({ids} from it) must lie between {MIN_UID_BASE} and \
                     {}, where no account's are (default: a range per reflector from {})",
                    u32::MAX - 1,
                    crate::jail::DEFAULT_UID_BASE
                )));
            }
        }
        // Jailed, each device gets ids of its own from a fixed range: more
        // were refused only once the first ones had started.
        let clients = self.blk.iter().map(|b| (&b.name, &b.client_user));
        for (name, user) in clients.chain(self.net.iter().map(|n| (&n.name, &n.client_user))) {
            if let Some(user) = user {
                let error = |e: String| ConfigError(format!("device {name}: client_user={user}: {e}"));
                let client = crate::privileges::User::resolve(user).map_err(|e| error(e.to_string()))?;
                self.check_client_uid(client.uid).map_err(error)?;
            }
        }
        let count = self.blk.len() + self.net.len();
        if count > crate::client_memory::MOST_DEVICES {
            return Err(ConfigError(format!(
                "{count} devices: one reflector serves at most {} (run several)",
                crate::client_memory::MOST_DEVICES
            )));
        }
        if self.jail.enabled && count > crate::jail::DEVICE_MODEL_IDS as usize {
            return Err(ConfigError(format!(
                "{count} devices: at most {} can be jailed by one reflector (run several)",
                crate::jail::DEVICE_MODEL_IDS
            )));
        }
        // Sets, not pairs: a configuration of a hundred thousand devices
        // (a 4 MiB file) took minutes of comparisons before its error.
        let mut names = std::collections::HashSet::new();
        let mut sockets = std::collections::HashSet::new();
        for (name, socket) in self.device_sockets() {
            if !names.insert(name) {
                return Err(ConfigError(format!("two devices are named {name:?}")));
            }
            // Spelled differently (relative, through `..` or a symlinked
            // directory), one path was refused only at its claim, as
            // "served by another process".
            if !sockets.insert(same_file_key(socket)) {
                return Err(ConfigError(format!("two devices use socket {}", socket.display())));
            }
        }
        // One image under two devices was refused only once the first had
        // started, as "in use by another process"; readers may share one.
        let mut images = std::collections::HashMap::new();
        // (A VFIO function is its own disk: it has no image.)
        for blk in self.blk.iter().filter(|blk| !blk.image.as_os_str().is_empty()) {
            if let Some(other) = images.insert(same_file_key(&blk.image), blk) {
                if !(blk.read_only && other.read_only) {
                    return Err(ConfigError(format!(
                        "devices {:?} and {:?} both use image {}: one writer at a time (give each its own, or \
                         readonly=on to both)",
                        other.name,
                        blk.name,
                        blk.image.display()
                    )));
                }
            }
        }
        let drivers = self.blk.iter().map(|b| (&b.name, &b.driver, b.hosted));
        for (name, driver, hosted) in drivers.chain(self.net.iter().map(|n| (&n.name, &n.driver, n.hosted))) {
            check_driver(driver).map_err(|why| ConfigError(format!("device {name}: driver={driver}: {why}")))?;
            if hosted && !driver.contains('/') {
                // The built-in images are isolated builds: the vmm's hosted
                // mode refused the name as "not found" among the very
                // names it listed.
                return Err(ConfigError(format!(
                    "device {name}: driver={driver}: hosted=on runs a hosted build of the driver, given by its path \
                     (with a /); a name is a built-in image's, which runs only in a driver VM (cargo build \
                     --release in driver-vm builds the hosted drivers, in driver-vm/target/release)"
                )));
            }
        }
        for (i, a) in self.tap.iter().enumerate() {
            if self.tap[i + 1..].iter().any(|b| b.name == a.name) {
                return Err(ConfigError(format!("TAP {:?} is given twice", a.name)));
            }
            if !self.net.iter().any(|n| n.switch == a.switch) {
                return Err(ConfigError(format!(
                    "TAP {:?} is on switch {:?}, which no --net device uses",
                    a.name, a.switch
                )));
            }
        }
        for (i, a) in self.net.iter().enumerate() {
            if let Some(b) = self.net[i + 1..].iter().find(|b| b.mac == a.mac && b.switch == a.switch) {
                return Err(ConfigError(format!(
                    "net devices {:?} and {:?} share MAC {} on switch {:?}: give each its own mac=",
                    a.name,
                    b.name,
                    crate::hw::sim_nic::format_mac(&a.mac),
                    a.switch
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device N's driver VMs run as `jail_uid_base` + N: a base of 0 made
    /// device 0's vmm root on the host, one of 1000 shared a login user's
    /// ids (who could then signal it), one near 2^32 ran out of ids.
    #[test]
    fn a_uid_base_overlapping_accounts_or_running_out_of_ids_is_refused() {
        let file = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\n";
        for base in [0u32, 1000, 65_535, u32::MAX - 10] {
            let config = parse_file(&format!("jail_uid_base = {base}\n{file}"), "r.toml").unwrap();
            let error = config.validate().unwrap_err().0;
            assert!(error.contains(&format!("jail_uid_base {base}")), "{error}");
        }
        let config = parse_file(&format!("jail_uid_base = 3000000\n{file}"), "r.toml").unwrap();
        config.validate().unwrap();
    }

    /// A name too long for its driver VMs' cgroup directory left the device
    /// running them with no limit (a warning was all).
    #[test]
    fn a_name_too_long_for_its_cgroup_is_refused() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let error = parse_blk(&format!("socket=/s,image=/i,name={long}"), 0).unwrap_err().to_string();
        assert!(error.contains("use at most 64"), "{error}");
        let error = parse_net(&format!("socket=/s,name={long}"), 0).unwrap_err().to_string();
        assert!(error.contains("use at most 64"), "{error}");
        parse_blk(&format!("socket=/s,image=/i,name={}", "a".repeat(MAX_NAME_LEN)), 0).unwrap();
    }

    #[test]
    fn device_memory_is_the_vmdisk_drivers_and_only_for_block_devices() {
        let memory = parse_blk("socket=/s,image=/i,device=memory", 0).unwrap();
        assert_eq!((memory.device, memory.driver.as_str()), (DeviceHardware::Memory, "vmdisk"));
        let error = parse_blk("socket=/s,image=/i,device=memory,readonly=on", 0).unwrap_err();
        assert!(error.to_string().contains("readonly=on is not available with device=memory"), "{error}");
        let error = parse_net("socket=/s,device=memory", 0).unwrap_err();
        assert!(error.to_string().contains("expected sim"), "{error}");
    }

    #[test]
    fn a_spare_is_off_standby_or_warm_on_the_command_line_and_in_a_file() {
        for (value, expected) in [
            ("off", None),
            ("standby", Some(SpareKind::Standby)),
            ("warm", Some(SpareKind::Warm)),
            ("on", Some(SpareKind::Warm)),
        ] {
            assert_eq!(parse_blk(&format!("socket=/s,image=/i,spare={value}"), 0).unwrap().spare, expected);
            assert_eq!(parse_net(&format!("socket=/s,spare={value}"), 0).unwrap().spare, expected);
        }
        assert_eq!(parse_blk("socket=/s,image=/i", 0).unwrap().spare, Some(SpareKind::Standby));
        assert_eq!(parse_net("socket=/s", 0).unwrap().spare, Some(SpareKind::Standby));
        let error = parse_blk("socket=/s,image=/i,spare=hot", 0).unwrap_err().to_string();
        assert!(error.contains("expected off, standby or warm"), "{error}");
        let file = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\n";
        for (value, expected) in
            [("true", Some(SpareKind::Warm)), ("false", None), ("\"standby\"", Some(SpareKind::Standby))]
        {
            let config = parse_file(&format!("{file}spare = {value}\n"), "r.toml").unwrap();
            assert_eq!(config.blk[0].spare, expected, "spare = {value}");
        }
        assert_eq!(parse_file(file, "r.toml").unwrap().blk[0].spare, Some(SpareKind::Standby));
        let error = parse_file(&format!("{file}spare = \"hot\"\n"), "r.toml").unwrap_err().to_string();
        assert!(error.contains("key `spare`") && error.contains("expected off, standby or warm"), "{error}");
        // Neither a boolean nor a string: the accepted values are named
        // (before, serde's "did not match any variant of untagged enum").
        let error = parse_file(&format!("{file}spare = 5\n"), "r.toml").unwrap_err().to_string();
        assert!(error.contains("line 4") && error.contains("key `spare`: expected true, false, \"off\""), "{error}");
        assert!(!error.contains("untagged"), "{error}");
        let net = "[[net]]\nsocket = \"/s\"\nspare = \"standby\"\n";
        assert_eq!(parse_file(net, "r.toml").unwrap().net[0].spare, Some(SpareKind::Standby));
    }

    /// `hosted=on` wants the path of a hosted build: a built-in image's
    /// name (the default driver included) is refused by name.
    #[test]
    fn a_hosted_driver_is_given_by_its_path() {
        for spec in ["socket=/s,image=/i,hosted=on", "socket=/s,image=/i,hosted=on,driver=vmdisk"] {
            let config = Config { blk: vec![parse_blk(spec, 0).unwrap()], ..Config::default() };
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("hosted=on runs a hosted build") && error.contains("driver-vm/target"), "{error}");
        }
        let config = Config { net: vec![parse_net("socket=/s,hosted=on", 0).unwrap()], ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("driver=net: hosted=on runs a hosted build"));
        let hosted = parse_blk("socket=/s,image=/i,hosted=on,driver=./target/release/blk", 0).unwrap();
        assert!(Config { blk: vec![hosted], ..Config::default() }.validate().is_ok());
    }

    /// A configuration of TAP devices alone is refused for having no
    /// device, not told to give the `--config` it came from.
    #[test]
    fn taps_alone_are_nothing_to_serve_and_said_so() {
        let config = parse_file("[[tap]]\nname = \"tap0\"\nswitch = \"s\"\n", "r.toml").unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("no device is on it") && !error.contains("--config"), "{error}");
        let error = Config::default().validate().unwrap_err().to_string();
        assert!(error.contains("give --blk, --net or --config"), "{error}");
    }

    /// A device whose writes are read back from its image refuses the
    /// drivers that keep no data (before, every write they answered was a
    /// violation, and the device failed its requests).
    #[test]
    fn drivers_that_keep_no_data_are_refused_where_writes_are_read_back() {
        for spec in [
            "socket=/s,image=/i,device=nvme,driver=null",
            "socket=/s,image=/i,device=memory,driver=null",
            "socket=/s,image=/i,device=nvme,driver=inline-null",
        ] {
            let error = parse_blk(spec, 0).unwrap_err().to_string();
            assert!(error.contains("keeps no data") && error.contains("device=sim"), "{spec}: {error}");
        }
        assert!(parse_blk("socket=/s,image=/i,driver=null", 0).is_ok());
        assert!(parse_blk("socket=/s,image=/i,driver=inline-null", 0).is_ok());
    }

    #[test]
    fn direct_dma_is_for_the_simulated_controller_without_checksums() {
        assert_eq!(parse_blk("socket=/s,image=/i", 0).unwrap().dma, DmaMode::Bounce);
        assert_eq!(parse_blk("socket=/s,image=/i,dma=direct", 0).unwrap().dma, DmaMode::Direct);
        assert_eq!(parse_blk("socket=/s,image=/i,dma=bounce,checksums=on", 0).unwrap().dma, DmaMode::Bounce);
        for (spec, expected) in [
            ("socket=/s,image=/i,dma=direct,checksums=on", "cannot be combined with checksums=on"),
            ("socket=/s,image=/i,dma=direct,device=memory", "dma=direct needs device=sim"),
            ("socket=/s,image=/i,dma=direct,device=nvme", "dma=direct needs device=sim"),
            ("socket=/s,image=/i,dma=fast", "dma=fast: expected bounce or direct"),
        ] {
            let error = parse_blk(spec, 0).unwrap_err().to_string();
            assert!(error.contains(expected), "{spec}: {error}");
        }
        let file = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\ndma = \"direct\"\n";
        assert_eq!(parse_file(file, "r.toml").unwrap().blk[0].dma, DmaMode::Direct);
        let error = parse_file(&file.replace("direct", "zero-copy"), "r.toml").unwrap_err().to_string();
        assert!(error.contains("line 4") && error.contains("key `dma`"), "{error}");
        let error = parse_file(&format!("{file}checksums = true\n"), "r.toml").unwrap_err().to_string();
        assert!(error.contains("cannot be combined with checksums=on"), "{error}");
    }

    /// `client_user=` names the user whose QEMU may connect; one that
    /// cannot be resolved, or root, is refused before anything starts.
    #[test]
    fn a_client_user_is_resolved_before_anything_starts() {
        let blk = parse_blk("socket=/s,image=/i,client_user=61234:61234", 0).unwrap();
        assert_eq!(blk.client_user.as_deref(), Some("61234:61234"));
        let net = parse_net("socket=/n,client_user=61235", 0).unwrap();
        Config { blk: vec![blk.clone()], net: vec![net], ..Config::default() }.validate().unwrap();
        let in_jail = (crate::jail::DEFAULT_UID_BASE + 7).to_string();
        for (user, expected) in
            [("root", "is root"), ("no-such-user-here", "no such user"), (in_jail.as_str(), "among the jail's ids")]
        {
            let bad = BlkConfig { client_user: Some(user.into()), ..blk.clone() };
            let error = Config { blk: vec![bad], ..Config::default() }.validate().unwrap_err().0;
            assert!(error.contains(&format!("client_user={user}")) && error.contains(expected), "{error}");
        }
        // Nor the user the reflector becomes.
        let reflectors = Config { blk: vec![blk.clone()], user: Some("61234".into()), ..Config::default() };
        assert!(reflectors.validate().unwrap_err().0.contains("the reflector's own user"));
        let file = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\nclient_user = \"61234\"\n";
        assert_eq!(parse_file(file, "r.toml").unwrap().blk[0].client_user.as_deref(), Some("61234"));
    }

    /// A MAC address is six pairs of hex digits: `+2` parsed as a number
    /// was taken for 02 (an adversarial review found it).
    #[test]
    fn a_mac_address_is_six_pairs_of_hex_digits() {
        assert_eq!(parse_mac("52:54:00:12:34:5f"), Ok([0x52, 0x54, 0, 0x12, 0x34, 0x5f]));
        for bad in ["+2:54:00:00:00:01", "52:54:00:00:00:-1", "52:54:00:00:00:1", "52:54:00:00:00:001"] {
            assert!(parse_mac(bad).is_err(), "{bad} was taken");
        }
    }

    /// A driver is a built-in image's name or a path with a `/`: anything
    /// else reached `vmm --image` as it was (`fd=3`: the vmm read its
    /// descriptor 3; `--help`: an option).
    #[test]
    fn a_driver_is_a_built_in_name_or_a_path() {
        for good in ["blk", "nvme", "my-driver_2.elf", "./blk.elf", "/opt/drivers/blk"] {
            let blk = parse_blk(&format!("socket=/s,image=/i,driver={good}"), 0).unwrap();
            Config { blk: vec![blk], ..Config::default() }.validate().unwrap();
        }
        for bad in ["fd=3", "--help", "-x", ".hidden", "two words"] {
            let blk = parse_blk(&format!("socket=/s,image=/i,driver={bad}"), 0).unwrap();
            let error = Config { blk: vec![blk], ..Config::default() }.validate().unwrap_err().0;
            assert!(error.contains(&format!("driver={bad}")) && error.contains("a path with a /"), "{error}");
        }
        let net = parse_net("socket=/n,driver=fd=4", 0).unwrap();
        assert!(Config { net: vec![net], ..Config::default() }.validate().is_err());
    }

    #[test]
    fn checksums_of_a_medium_asked_too_large_are_refused() {
        let error = parse_blk("socket=/s,image=/i,size=64T,checksums=on", 0).unwrap_err().to_string();
        assert!(error.contains("checksums=on keeps 4 bytes per 512-byte sector"), "{error}");
        assert!(parse_blk("socket=/s,image=/i,size=64T", 0).is_ok(), "without checksums: any size");
        assert!(parse_blk("socket=/s,image=/i,size=128G,checksums=on", 0).is_ok(), "the most");
    }

    #[test]
    fn aio_is_qemus_and_so_for_device_nvme_only() {
        assert_eq!(parse_blk("socket=/s,image=/i,device=nvme", 0).unwrap().aio, None);
        let uring = parse_blk("socket=/s,image=/i,device=nvme,aio=io_uring", 0).unwrap();
        assert_eq!((uring.aio, uring.io_uring()), (Some(DriveAio::IoUring), IoUring::Allowed));
        assert_eq!(parse_blk("socket=/s,image=/i,device=nvme", 0).unwrap().io_uring(), IoUring::Denied);
        assert_eq!(parse_blk("socket=/s,image=/i,device=nvme,aio=threads", 0).unwrap().aio, Some(DriveAio::Threads));
        for (spec, expected) in [
            ("socket=/s,image=/i,aio=io_uring", "aio= is for device=nvme"),
            ("socket=/s,image=/i,device=memory,aio=threads", "aio= is for device=nvme"),
            ("socket=/s,device=vfio:0000:01:00.0,aio=io_uring", "aio= is for device=nvme"),
            ("socket=/s,image=/i,device=nvme,aio=native", "aio=native: expected threads or io_uring"),
        ] {
            let error = parse_blk(spec, 0).unwrap_err().to_string();
            assert!(error.contains(expected), "{spec}: {error}");
        }
        let file = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\ndevice = \"nvme\"\naio = \"io_uring\"\n";
        assert_eq!(parse_file(file, "r.toml").unwrap().blk[0].aio, Some(DriveAio::IoUring));
        let error = parse_file(&file.replace("io_uring", "fast"), "r.toml").unwrap_err().to_string();
        assert!(error.contains("line 5") && error.contains("key `aio`"), "{error}");
        let error = parse_file(&file.replace("nvme", "sim"), "r.toml").unwrap_err().to_string();
        assert!(error.contains("aio= is for device=nvme"), "{error}");
    }

    #[test]
    fn a_vfio_function_is_named_by_its_pci_address_and_has_no_image() {
        let vfio = parse_blk("socket=/s,device=vfio:0000:01:00.0", 0).unwrap();
        assert_eq!(vfio.device, DeviceHardware::Vfio { address: "0000:01:00.0".into() });
        assert_eq!(vfio.driver, "nvme", "the NVMe driver is the default");
        for (spec, expected) in [
            ("socket=/s,device=vfio:1:0.0", "is not a PCI address"),
            ("socket=/s,device=vfio:", "is not a PCI address"),
            ("socket=/s,image=/i,device=vfio:0000:01:00.0", "image= is not for a VFIO function"),
            ("socket=/s,size=1G,device=vfio:0000:01:00.0", "size= is not for a VFIO function"),
            ("socket=/s,device=vfio:0000:01:00.0,qemu=/q", "qemu= is for device=nvme"),
            ("socket=/s", "image=PATH is required"),
        ] {
            let error = parse_blk(spec, 0).unwrap_err().to_string();
            assert!(error.contains(expected), "{spec}: {error}");
        }
        let nic = parse_net("socket=/s,device=vfio:0000:02:00.0", 0).unwrap();
        assert_eq!(
            (nic.device, nic.driver.as_str()),
            (DeviceHardware::Vfio { address: "0000:02:00.0".into() }, "e1000e")
        );
    }

    #[test]
    fn blk_one_liner() {
        let c = parse_blk("socket=/tmp/a.sock,image=/tmp/a.img,size=64M,readonly=on,name=disk", 0).unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.size, Some(64 << 20));
        assert!(c.read_only);
        assert_eq!(c.name, "disk");
        assert_eq!(c.driver, "blk");
        let d = parse_blk("socket=/s,image=/i", 3).unwrap();
        assert_eq!((d.name.as_str(), d.read_only, d.size), ("blk3", false, None));
        for bad in [
            "image=/i",
            "socket=/s",
            "socket=/s,image=/i,size=12Q",
            "socket=/s,image=/i,size=100",
            "socket=/s,image=/i,colour=red",
            "socket=/s,image=/i,readonly=maybe",
            "socket=/s,image=/i,name=a b",
        ] {
            let error = parse_blk(bad, 0).unwrap_err().0;
            assert!(error.starts_with("--blk"), "{error}");
        }
    }

    #[test]
    fn toml_file_and_its_errors_name_the_line_and_key() {
        let text = "vmm = \"/opt/vmm\"\n\n[[blk]]\nname = \"disk0\"\nsocket = \"/tmp/d0.sock\"\nimage = \"/tmp/d0.img\"\nsize = \"1G\"\n";
        let config = parse_file(text, "r.toml").unwrap();
        assert_eq!(config.vmm, Some(PathBuf::from("/opt/vmm")));
        assert_eq!(config.blk[0].size, Some(1 << 30));
        assert_eq!(config.blk[0].name, "disk0");

        let bad_size = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\nsize = \"lots\"\n";
        let error = parse_file(bad_size, "r.toml").unwrap_err().0;
        assert!(error.contains("r.toml, line 4") && error.contains("size"), "{error}");

        let unknown = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\nspeed = 3\n";
        let error = parse_file(unknown, "r.toml").unwrap_err().0;
        assert!(error.contains("r.toml, line 4") && error.contains("speed"), "{error}");

        let missing = "[[blk]]\nsocket = \"/s\"\n";
        let error = parse_file(missing, "r.toml").unwrap_err().0;
        assert!(error.contains("image"), "{error}");

        let wrong_type = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\nreadonly = \"yes\"\n";
        let error = parse_file(wrong_type, "r.toml").unwrap_err().0;
        assert!(error.contains("line 4"), "{error}");
    }

    #[test]
    fn the_command_line_and_the_file_take_the_same_keys_with_the_same_rules() {
        let line = parse_blk(
            "socket=/s,image=/i,driver_memory=32M,fault_budget=5,poison_deaths=2,driver_args=panic-on-sector=8",
            0,
        )
        .unwrap();
        let file = parse_file(
            "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\ndriver_memory = \"32M\"\nfault_budget = 5\npoison_deaths = 2\ndriver_args = \"panic-on-sector=8\"\n",
            "r.toml",
        )
        .unwrap();
        assert_eq!(line, file.blk[0]);
        assert_eq!((line.driver_memory.as_str(), line.fault_budget, line.poison_deaths), ("32M", 5, 2));
        // `memory` is the short form of `driver_memory` on both sides.
        assert_eq!(parse_blk("socket=/s,image=/i,memory=32M", 0).unwrap().driver_memory, "32M");
        let short = parse_file("[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\nmemory = \"32M\"\n", "r.toml").unwrap();
        assert_eq!(short.blk[0].driver_memory, "32M");
        // Zero is refused on both sides (the file used to make it 20).
        for key in ["fault_budget", "poison_deaths"] {
            let error = parse_blk(&format!("socket=/s,image=/i,{key}=0"), 0).unwrap_err().0;
            assert!(error.contains(key), "{error}");
            let text = format!("[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\n{key} = 0\n");
            let error = parse_file(&text, "r.toml").unwrap_err().0;
            assert!(error.contains(key) && error.contains("positive"), "{error}");
        }
        let error = parse_file("[[net]]\nsocket = \"/n\"\nfault_budget = 0\n", "r.toml").unwrap_err().0;
        assert!(error.contains("fault_budget"), "{error}");
        let error = parse_blk("socket=/s,image=/i,driver_args=a;rm", 0).unwrap_err().0;
        assert!(error.contains("driver_args"), "{error}");
    }

    #[test]
    fn net_one_liner_and_toml() {
        let n = parse_net("socket=/tmp/n.sock,mac=52:54:00:12:34:56,switch=lan", 0).unwrap();
        assert_eq!((n.mac, n.switch.as_str(), n.driver.as_str()), ([0x52, 0x54, 0, 0x12, 0x34, 0x56], "lan", "net"));
        let d = parse_net("socket=/s", 2).unwrap();
        assert_eq!((d.name.as_str(), d.mac, d.switch.as_str()), ("net2", default_mac(2), "default"));
        // A net driver takes parameters too, checked as a block driver's.
        assert_eq!(parse_net("socket=/s,driver_args=verbose=1", 0).unwrap().driver_args, "verbose=1");
        assert!(parse_net("socket=/s,driver_args=a;rm", 0).unwrap_err().0.contains("driver_args"));
        let file = parse_file("[[net]]\nsocket = \"/s\"\ndriver_args = \"verbose=1\"\n", "r.toml").unwrap();
        assert_eq!(file.net[0].driver_args, "verbose=1");
        for bad in [
            "mac=52:54:00:12:34:56",
            "socket=/s,mac=52:54:00:12:34",
            "socket=/s,mac=53:54:00:12:34:56",
            "socket=/s,mac=52:54:00:12:34:5g",
            "socket=/s,mac=00:00:00:00:00:00",
            "socket=/s,switch=",
            "socket=/s,colour=red",
        ] {
            let error = parse_net(bad, 0).unwrap_err().0;
            assert!(error.starts_with("--net"), "{error}");
        }
        let text =
            "[[net]]\nsocket = \"/a\"\nswitch = \"lan\"\n\n[[net]]\nsocket = \"/b\"\nmac = \"02:00:00:00:00:01\"\n";
        let config = parse_file(text, "r.toml").unwrap();
        assert_eq!(config.net.len(), 2);
        assert_eq!(config.net[1].mac, [2, 0, 0, 0, 0, 1]);
        config.validate().unwrap();
        let bad_mac = "[[net]]\nsocket = \"/a\"\nmac = \"nope\"\n";
        let error = parse_file(bad_mac, "r.toml").unwrap_err().0;
        assert!(error.contains("line 3") && error.contains("mac"), "{error}");
        let same_mac = Config {
            net: vec![
                parse_net("socket=/a,mac=02:00:00:00:00:01", 0).unwrap(),
                parse_net("socket=/b,mac=02:00:00:00:00:01", 1).unwrap(),
            ],
            ..Config::default()
        };
        assert!(same_mac.validate().unwrap_err().0.contains("share MAC"));
    }

    #[test]
    fn tap_one_liner_and_toml() {
        let t = parse_tap("name=tap0,switch=lan").unwrap();
        assert_eq!((t.name.as_str(), t.switch.as_str()), ("tap0", "lan"));
        for bad in ["switch=lan", "name=", "name=a-very-long-interface-name", "name=t0,colour=red", "name=t 0"] {
            assert!(parse_tap(bad).unwrap_err().0.starts_with("--tap"), "{bad}");
        }
        let text = "[[net]]\nsocket = \"/a\"\nswitch = \"lan\"\n\n[[tap]]\nname = \"tap0\"\nswitch = \"lan\"\n";
        let config = parse_file(text, "r.toml").unwrap();
        assert_eq!(config.tap, vec![TapConfig { name: "tap0".into(), switch: "lan".into() }]);
        config.validate().unwrap();
        let orphan = Config { tap: vec![parse_tap("name=tap1,switch=nowhere").unwrap()], ..config.clone() };
        assert!(orphan.validate().unwrap_err().0.contains("no --net device"));
    }

    #[test]
    fn duplicates_and_emptiness_are_refused() {
        assert!(Config::default().validate().is_err());
        let a = parse_blk("socket=/s,image=/i,name=x", 0).unwrap();
        let b = parse_blk("socket=/t,image=/j,name=x", 1).unwrap();
        assert!(Config { blk: vec![a.clone(), b], ..Config::default() }.validate().is_err());
        let c = parse_blk("socket=/s,image=/j,name=y", 1).unwrap();
        assert!(Config { blk: vec![a, c], ..Config::default() }.validate().is_err());
    }

    /// Two devices on one socket or one image, however the paths are
    /// spelled, are refused before anything starts: before, the second
    /// was refused only at its claim or its image's lock, once the first
    /// had started, and as held by "another process".
    #[test]
    fn one_socket_or_image_under_two_spellings_is_refused() {
        let dir = std::env::temp_dir().join(format!("config-spellings-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let at = |name: &str| dir.join(name).display().to_string();
        let via = |name: &str| dir.join("sub").join("..").join(name).display().to_string();
        let blk = |socket: String, image: String, name: &str, extra: &str| {
            parse_blk(&format!("socket={socket},image={image},name={name}{extra}"), 0).unwrap()
        };
        let one_socket = Config {
            blk: vec![blk(at("a.sock"), at("a.img"), "a", ""), blk(via("a.sock"), at("b.img"), "b", "")],
            ..Config::default()
        };
        assert!(one_socket.validate().unwrap_err().0.contains("socket"));
        let one_image = Config {
            blk: vec![blk(at("a.sock"), at("d.img"), "a", ""), blk(at("b.sock"), via("d.img"), "b", "")],
            ..Config::default()
        };
        assert!(one_image.validate().unwrap_err().0.contains("both use image"));
        let readers = Config {
            blk: vec![
                blk(at("a.sock"), at("d.img"), "a", ",readonly=on"),
                blk(at("b.sock"), via("d.img"), "b", ",readonly=on"),
            ],
            ..Config::default()
        };
        readers.validate().unwrap();
        // Functions passed through have no image to share.
        let vfio = |i: usize| {
            parse_blk(&format!("socket={},device=vfio:0000:00:0{i}.0,name=v{i}", at(&format!("v{i}.sock"))), i).unwrap()
        };
        Config { blk: vec![vfio(1), vfio(2)], ..Config::default() }.validate().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// More devices than a reflector can jail are refused before any starts.
    #[test]
    fn more_devices_than_can_be_jailed_are_refused_at_once() {
        let most = crate::jail::DEVICE_MODEL_IDS as usize;
        let net = |i: usize| parse_net(&format!("socket=/n{i}.sock,name=n{i}"), i).unwrap();
        let config = |count: usize| Config { net: (0..count).map(net).collect(), ..Config::default() };
        config(most).validate().unwrap();
        assert!(config(most + 1).validate().unwrap_err().0.contains(&format!("at most {most}")));
        let unjailed =
            |count| Config { jail: JailSettings { enabled: false, ..JailSettings::default() }, ..config(count) };
        unjailed(most + 1).validate().unwrap();
        // Unjailed too, no more than the SIGBUS guard holds every client's
        // most tables for.
        let served = crate::client_memory::MOST_DEVICES;
        assert!(served >= most, "a reflector serves fewer devices than it can jail");
        unjailed(served).validate().unwrap();
        let error = unjailed(served + 1).validate().unwrap_err().0;
        assert!(error.contains(&format!("serves at most {served}")), "{error}");
    }
}
