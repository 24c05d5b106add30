//! The control socket: operators (and the chaos command) ask the reflector
//! about its devices and act on them. A typed protocol shared by the server
//! and its clients: one [`Request`] per connection, one [`Response`], each
//! a line of JSON (`{"request":"kill","device":"d0"}` →
//! `{"response":"killed","pid":1234}`):
//!
//! - `status`: every device's state and counters;
//! - `metrics`: the counters in Prometheus text format;
//! - `inject`: make the driver commit a fault (tests);
//! - `kill`: SIGKILL the device's driver VM, through its pidfd (tests);
//! - `recover`: make a failed device try a new driver VM now.
//!
//! The socket is as privileged as the reflector: create it where only the
//! operator can reach it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use guest_abi::channel::inject;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::channel::Channel;
use crate::metrics::{Metrics, STATE_NAMES};
use crate::shm::SharedMemory;

/// Longest request line accepted.
const MAX_LINE: u64 = 4096;

/// What the control socket can reach of one device.
pub struct ControlTarget {
    /// "blk" or "net".
    pub kind: &'static str,
    /// Device name.
    pub name: String,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Its channel (fault injection).
    pub channel: Arc<SharedMemory>,
    /// Makes it recover from the failed state.
    pub recover: EventFd,
    /// Makes it SIGKILL its driver VM.
    pub kill: EventFd,
}

/// One device in `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Device name.
    pub device: String,
    /// "blk" or "net".
    pub kind: String,
    /// running, awaiting_restart or failed.
    pub state: String,
    /// The driver VM's pid (0: none runs).
    pub driver_pid: u64,
    /// The spare's pid (0: none).
    pub spare_pid: u64,
    /// Counter `requests` (see `Metrics`).
    pub requests: u64,
    /// Counter `completed` (see `Metrics`).
    pub completed: u64,
    /// Counter `in_flight` (see `Metrics`).
    pub in_flight: u64,
    /// The current driver VM's resident memory, KiB (see `Metrics`).
    pub driver_rss_kib: u64,
    /// The part of it that is the driver VM's own, KiB (see `Metrics`).
    #[serde(default)]
    pub driver_own_kib: u64,
    /// The spare's resident memory, KiB (0: none; see `Metrics`).
    #[serde(default)]
    pub spare_rss_kib: u64,
    /// The part of it that is the spare's own, KiB.
    #[serde(default)]
    pub spare_own_kib: u64,
    /// The memory cap of each of the device's driver VMs, bytes (0: none;
    /// each has a memory cgroup of its own).
    #[serde(default)]
    pub memory_cap_bytes: u64,
    /// Its current driver VM has attached to the channel (serves).
    #[serde(default)]
    pub attached: bool,
    /// How a block device's payloads reach its device: "bounce" or
    /// "direct" (`dma=`); empty for a net device.
    #[serde(default)]
    pub dma: String,
    /// Counter `errors` (see `Metrics`).
    pub errors: u64,
    /// Counter `malformed` (see `Metrics`).
    pub malformed: u64,
    /// Counter `client_memory_faults` (see `Metrics`).
    pub client_memory_faults: u64,
    /// Counter `violations` (see `Metrics`).
    pub violations: u64,
    /// Counter `abuses` (see `Metrics`).
    pub abuses: u64,
    /// Counter `doorbells` (see `Metrics`).
    pub doorbells: u64,
    /// Counter `kicks` (see `Metrics`).
    #[serde(default)]
    pub kicks: u64,
    /// Counter `faults` (see `Metrics`).
    pub faults: u64,
    /// Counter `restarts` (see `Metrics`).
    pub restarts: u64,
    /// Counter `replayed` (see `Metrics`).
    pub replayed: u64,
    /// Counter `poisoned` (see `Metrics`).
    pub poisoned: u64,
    /// The last fault.
    pub last_fault: String,
    /// Where in the driver's source it happened, if known.
    pub last_fault_location: String,
    /// The last poison request.
    pub last_poison: String,
    /// Counter `stall_p50_us` (see `Metrics`).
    pub stall_p50_us: u64,
    /// Counter `stall_p99_us` (see `Metrics`).
    pub stall_p99_us: u64,
    /// Counter `stall_max_us` (see `Metrics`).
    pub stall_max_us: u64,
    /// Recovery stalls recorded.
    pub stalls: usize,
    /// Where recent failovers' time went, phase by phase, then the whole
    /// (`failover`); empty before the first.
    #[serde(default)]
    pub failover: Vec<PhaseFigures>,
    /// Counter `bytes_read` (see `Metrics`).
    pub bytes_read: u64,
    /// Counter `bytes_written` (see `Metrics`).
    pub bytes_written: u64,
    /// Counter `tx_frames` (see `Metrics`).
    pub tx_frames: u64,
    /// Counter `rx_frames` (see `Metrics`).
    pub rx_frames: u64,
    /// Counter `tx_bytes` (see `Metrics`).
    pub tx_bytes: u64,
    /// Counter `rx_bytes` (see `Metrics`).
    pub rx_bytes: u64,
    /// Counter `tx_lost` (see `Metrics`).
    pub tx_lost: u64,
    /// Counter `rx_dropped` (see `Metrics`).
    pub rx_dropped: u64,
}

/// The fleet's memory as a whole, as Windows CE's paging pool reported its
/// target and use: what the driver VMs and the reflector hold against what
/// they may.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Devices served.
    pub devices: usize,
    /// Devices whose driver has attached (serving).
    pub attached: usize,
    /// Resident memory of the current driver VMs together, KiB (their
    /// shared code counted once per driver VM).
    pub driver_rss_kib: u64,
    /// The part of it that is each driver VM's own, together, KiB: what
    /// the fleet costs beyond one copy of the vmm's code.
    #[serde(default)]
    pub driver_own_kib: u64,
    /// Resident memory of the spares together, KiB (a standby or warm
    /// spare per device that keeps one).
    #[serde(default)]
    pub spare_rss_kib: u64,
    /// The part of it that is the spares' own, KiB.
    #[serde(default)]
    pub spare_own_kib: u64,
    /// The memory caps of the driver VMs running, current ones and
    /// spares, together, bytes (devices without one count 0).
    pub memory_cap_bytes: u64,
    /// The reflector's own resident memory, KiB: its resident set less
    /// [`FleetStatus::client_memory_kib`].
    pub reflector_rss_kib: u64,
    /// Pages of the clients' memory the reflector maps and has touched,
    /// KiB: in its resident set, but the clients' RAM (their QEMU's), not
    /// the reflector's; at most the clients' RAM, however small the
    /// reflector.
    #[serde(default)]
    pub client_memory_kib: u64,
    /// What the reflector should stay under: [`REFLECTOR_BASE_KIB`] plus
    /// [`REFLECTOR_PER_DEVICE_KIB`] per device, KiB.
    pub reflector_budget_kib: u64,
}

/// The reflector's own memory budget without devices, KiB.
pub const REFLECTOR_BASE_KIB: u64 = 10 * 1024;
/// Its budget per device served, KiB.
pub const REFLECTOR_PER_DEVICE_KIB: u64 = 256;

impl FleetStatus {
    /// The fleet of `devices`, with this process's memory.
    pub fn of(devices: &[DeviceStatus]) -> FleetStatus {
        let resident = crate::driver_watch::process_rss_kib(std::process::id() as libc::pid_t).unwrap_or(0);
        let clients = crate::client_memory::resident_in(&crate::client_memory::mapped_ranges()).unwrap_or(0);
        FleetStatus {
            devices: devices.len(),
            attached: devices.iter().filter(|d| d.attached).count(),
            driver_rss_kib: devices.iter().map(|d| d.driver_rss_kib).sum(),
            driver_own_kib: devices.iter().map(|d| d.driver_own_kib).sum(),
            spare_rss_kib: devices.iter().map(|d| d.spare_rss_kib).sum(),
            spare_own_kib: devices.iter().map(|d| d.spare_own_kib).sum(),
            memory_cap_bytes: devices.iter().map(|d| d.memory_cap_bytes * (1 + u64::from(d.spare_pid != 0))).sum(),
            reflector_rss_kib: resident.saturating_sub(clients),
            client_memory_kib: clients,
            reflector_budget_kib: REFLECTOR_BASE_KIB + REFLECTOR_PER_DEVICE_KIB * devices.len() as u64,
        }
    }
}

/// One failover phase's figures over recent failovers, microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseFigures {
    /// `detection`, `retire`, `replacement`, `device_reset`, `replay`,
    /// `drain` or `total`.
    pub phase: String,
    /// Failovers in which it was observed.
    pub count: usize,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Longest.
    pub max_us: u64,
}

fn status_of(target: &ControlTarget) -> DeviceStatus {
    let m = &target.metrics;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (p50, p99, max) = m.stall_percentiles().unwrap_or((0, 0, 0));
    DeviceStatus {
        device: target.name.clone(),
        kind: target.kind.to_owned(),
        state: STATE_NAMES.get(get(&m.state) as usize).copied().unwrap_or("unknown").to_owned(),
        driver_pid: get(&m.driver_pid),
        spare_pid: get(&m.spare_pid),
        requests: get(&m.requests),
        completed: get(&m.completed),
        in_flight: get(&m.in_flight),
        driver_rss_kib: get(&m.driver_rss_kib),
        driver_own_kib: get(&m.driver_own_kib),
        spare_rss_kib: get(&m.spare_rss_kib),
        spare_own_kib: get(&m.spare_own_kib),
        memory_cap_bytes: get(&m.memory_cap_bytes),
        attached: attached(target),
        dma: match (target.kind, get(&m.direct_dma)) {
            ("blk", 0) => "bounce",
            ("blk", _) => "direct",
            _ => "",
        }
        .to_owned(),
        errors: get(&m.errors),
        malformed: get(&m.malformed),
        client_memory_faults: get(&m.client_memory_faults),
        abuses: get(&m.abuses),
        doorbells: get(&m.doorbells),
        kicks: get(&m.kicks),
        violations: get(&m.violations),
        faults: get(&m.faults),
        restarts: get(&m.restarts),
        replayed: get(&m.replayed),
        poisoned: get(&m.poisoned),
        last_fault: m.last_fault.lock().map(|s| s.clone()).unwrap_or_default(),
        last_fault_location: m.last_fault_location.lock().map(|s| s.clone()).unwrap_or_default(),
        last_poison: m.last_poison.lock().map(|s| s.clone()).unwrap_or_default(),
        stall_p50_us: p50,
        stall_p99_us: p99,
        stall_max_us: max,
        stalls: m.stalls_us.lock().map(|s| s.len()).unwrap_or(0),
        failover: m
            .failover_percentiles()
            .into_iter()
            .map(|(phase, count, (p50_us, p99_us, max_us))| PhaseFigures {
                phase: phase.to_owned(),
                count,
                p50_us,
                p99_us,
                max_us,
            })
            .collect(),
        bytes_read: get(&m.bytes_read),
        bytes_written: get(&m.bytes_written),
        tx_frames: get(&m.tx_frames),
        rx_frames: get(&m.rx_frames),
        tx_bytes: get(&m.tx_bytes),
        rx_bytes: get(&m.rx_bytes),
        tx_lost: get(&m.tx_lost),
        rx_dropped: get(&m.rx_dropped),
    }
}

/// The counters in Prometheus text exposition format.
fn prometheus(targets: &[ControlTarget]) -> String {
    let statuses: Vec<DeviceStatus> = targets.iter().map(status_of).collect();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&DeviceStatus) -> f64| {
        out.push_str(&format!("# HELP reflector_{name} {help}\n# TYPE reflector_{name} {kind}\n"));
        for status in &statuses {
            out.push_str(&format!("reflector_{name}{{device=\"{}\"}} {}\n", status.device, value(status)));
        }
    };
    family("requests_total", "counter", "Requests taken from the client.", &|s| s.requests as f64);
    family("completed_total", "counter", "Requests completed to the client.", &|s| s.completed as f64);
    family("errors_total", "counter", "Requests completed with an error status.", &|s| s.errors as f64);
    family("poisoned_total", "counter", "Poison requests: failed after killing driver VMs in a row.", &|s| {
        s.poisoned as f64
    });
    family("malformed_total", "counter", "Malformed client requests refused.", &|s| s.malformed as f64);
    family("client_memory_faults_total", "counter", "Clients cut off because their memory faulted.", &|s| {
        s.client_memory_faults as f64
    });
    family("violations_total", "counter", "Driver protocol violations.", &|s| s.violations as f64);
    family("abuses_total", "counter", "Driver VMs replaced for spinning idle or flooding doorbells.", &|s| {
        s.abuses as f64
    });
    family("doorbells_total", "counter", "Doorbell rings from driver VMs.", &|s| s.doorbells as f64);
    family("kicks_total", "counter", "Kicks from the client handled by its worker.", &|s| s.kicks as f64);
    family("faults_total", "counter", "Driver VM faults.", &|s| s.faults as f64);
    family("restarts_total", "counter", "Driver VMs started after a fault.", &|s| s.restarts as f64);
    family("replayed_total", "counter", "Requests replayed to a new driver VM.", &|s| s.replayed as f64);
    family("in_flight", "gauge", "Requests in the driver VM.", &|s| s.in_flight as f64);
    family("driver_rss_bytes", "gauge", "Resident memory of the current driver VM's vmm.", &|s| {
        (s.driver_rss_kib * 1024) as f64
    });
    family("driver_own_bytes", "gauge", "The current driver VM's own memory (anonymous: not shared code).", &|s| {
        (s.driver_own_kib * 1024) as f64
    });
    family("spare_rss_bytes", "gauge", "Resident memory of the device's spare (0: none).", &|s| {
        (s.spare_rss_kib * 1024) as f64
    });
    family("memory_cap_bytes", "gauge", "Memory cap of each of the device's driver VMs (0: none).", &|s| {
        s.memory_cap_bytes as f64
    });
    family("attached", "gauge", "1 while the current driver says it serves.", &|s| f64::from(u8::from(s.attached)));
    family("failed", "gauge", "1 while the device fails its requests.", &|s| f64::from(u8::from(s.state == "failed")));
    family("read_bytes_total", "counter", "Bytes read for the client.", &|s| s.bytes_read as f64);
    family("written_bytes_total", "counter", "Bytes written for the client.", &|s| s.bytes_written as f64);
    family("tx_frames_total", "counter", "Net: frames taken from the client to send.", &|s| s.tx_frames as f64);
    family("rx_frames_total", "counter", "Net: frames delivered to the client.", &|s| s.rx_frames as f64);
    family("tx_bytes_total", "counter", "Net: frame bytes sent.", &|s| s.tx_bytes as f64);
    family("rx_bytes_total", "counter", "Net: frame bytes delivered.", &|s| s.rx_bytes as f64);
    family("tx_lost_total", "counter", "Net: frames lost in failed driver VMs.", &|s| s.tx_lost as f64);
    family("rx_dropped_total", "counter", "Net: received frames the reflector dropped.", &|s| s.rx_dropped as f64);
    out.push_str("# HELP reflector_recovery_stall_seconds Fault to next completion, recent faults.\n");
    out.push_str("# TYPE reflector_recovery_stall_seconds summary\n");
    for s in &statuses {
        for (q, v) in [("0.5", s.stall_p50_us), ("0.99", s.stall_p99_us), ("1", s.stall_max_us)] {
            out.push_str(&format!(
                "reflector_recovery_stall_seconds{{device=\"{}\",quantile=\"{q}\"}} {}\n",
                s.device,
                v as f64 / 1e6
            ));
        }
        out.push_str(&format!("reflector_recovery_stall_seconds_count{{device=\"{}\"}} {}\n", s.device, s.stalls));
    }
    let fleet = FleetStatus::of(&statuses);
    for (name, help, value) in [
        ("fleet_driver_rss_bytes", "Resident memory of every current driver VM together.", fleet.driver_rss_kib * 1024),
        (
            "fleet_driver_own_bytes",
            "The driver VMs' own memory together (not shared code).",
            fleet.driver_own_kib * 1024,
        ),
        ("fleet_spare_rss_bytes", "Resident memory of every spare together.", fleet.spare_rss_kib * 1024),
        ("fleet_spare_own_bytes", "The spares' own memory together (not shared code).", fleet.spare_own_kib * 1024),
        (
            "fleet_memory_cap_bytes",
            "Memory caps of the driver VMs running (current ones and spares) together.",
            fleet.memory_cap_bytes,
        ),
        (
            "rss_bytes",
            "The reflector's own resident memory (its clients' memory it maps excluded).",
            fleet.reflector_rss_kib * 1024,
        ),
        (
            "client_memory_resident_bytes",
            "Pages of the clients' memory the reflector maps and has touched (their RAM, not the reflector's).",
            fleet.client_memory_kib * 1024,
        ),
        (
            "memory_budget_bytes",
            "What the reflector's own memory should stay under.",
            fleet.reflector_budget_kib * 1024,
        ),
    ] {
        out.push_str(&format!(
            "# HELP reflector_{name} {help}\n# TYPE reflector_{name} gauge\nreflector_{name} {value}\n"
        ));
    }
    out.push_str("# HELP reflector_failover_phase_seconds Recent failovers, phase by phase (detection, retire, replacement, device_reset, replay, drain, total).\n");
    out.push_str("# TYPE reflector_failover_phase_seconds summary\n");
    for s in &statuses {
        for figures in &s.failover {
            for (q, v) in [("0.5", figures.p50_us), ("0.99", figures.p99_us), ("1", figures.max_us)] {
                out.push_str(&format!(
                    "reflector_failover_phase_seconds{{device=\"{}\",phase=\"{}\",quantile=\"{q}\"}} {}\n",
                    s.device,
                    figures.phase,
                    v as f64 / 1e6
                ));
            }
            out.push_str(&format!(
                "reflector_failover_phase_seconds_count{{device=\"{}\",phase=\"{}\"}} {}\n",
                s.device, figures.phase, figures.count
            ));
        }
    }
    out
}

/// A request to the control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every device's state and counters.
    Status,
    /// The counters in Prometheus text format.
    Metrics,
    /// Make `device`'s driver commit `fault` after `after` more requests.
    Inject {
        /// The device.
        device: String,
        /// The fault.
        fault: FaultKind,
        /// Requests to serve first.
        #[serde(default)]
        after: u32,
    },
    /// SIGKILL `device`'s driver VM.
    Kill {
        /// The device.
        device: String,
    },
    /// Make a failed `device` try a new driver VM now.
    Recover {
        /// The device.
        device: String,
    },
}

/// The control socket's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// To `status`.
    Status {
        /// One per device.
        devices: Vec<DeviceStatus>,
        /// The fleet as a whole.
        #[serde(default)]
        fleet: FleetStatus,
    },
    /// To `metrics`.
    Metrics {
        /// Prometheus text format.
        text: String,
    },
    /// To `kill`: the driver VM asked to die.
    Killed {
        /// Its pid.
        pid: u64,
    },
    /// To `inject` and `recover`.
    Done,
    /// Any request that could not be done.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}

/// A fault a driver can be asked to commit (`inject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Withdraw a fault injected and not yet committed.
    None,
    /// Panic.
    Panic,
    /// Read an unmapped address.
    PageFault,
    /// Execute an invalid instruction.
    Illegal,
    /// Stop serving and spin.
    Hang,
    /// Complete a request with a wrong length.
    Lie,
    /// Exit cleanly.
    Stop,
    /// Flip a bit of every read's data from now on.
    CorruptReads,
    /// Acknowledge flushes without flushing from now on.
    SkipFlushes,
    /// Acknowledge writes without writing from now on.
    SkipWrites,
    /// Never sleep from now on.
    Spin,
    /// Ring the doorbell continuously from now on.
    Flood,
    /// Point the device's data DMA outside its region from now on.
    WildDma,
    /// Set the device up again with its queues outside its region.
    WildQueues,
    /// Keep the device busy with work no request asked for from now on.
    JunkIo,
}

impl FaultKind {
    /// Every kind, by its name (`panic`, `page-fault`, ...).
    pub const NAMES: &'static str =
        "panic, page-fault, illegal, hang, lie, stop, corrupt-reads, skip-flushes, skip-writes, spin, flood, wild-dma, \
         wild-queues or junk-io; none withdraws one not yet committed";

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<FaultKind> {
        serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
    }

    /// Its code in the channel (`guest_abi::channel::inject`).
    pub fn code(self) -> u32 {
        match self {
            FaultKind::None => inject::NONE,
            FaultKind::Panic => inject::PANIC,
            FaultKind::PageFault => inject::PAGE_FAULT,
            FaultKind::Illegal => inject::ILLEGAL,
            FaultKind::Hang => inject::HANG,
            FaultKind::Lie => inject::LIE,
            FaultKind::Stop => inject::STOP,
            FaultKind::CorruptReads => inject::CORRUPT_READS,
            FaultKind::SkipFlushes => inject::SKIP_FLUSHES,
            FaultKind::SkipWrites => inject::SKIP_WRITES,
            FaultKind::Spin => inject::SPIN,
            FaultKind::Flood => inject::FLOOD,
            FaultKind::WildDma => inject::WILD_DMA,
            FaultKind::WildQueues => inject::WILD_QUEUES,
            FaultKind::JunkIo => inject::JUNK_IO,
        }
    }
}

fn target<'a>(targets: &'a [ControlTarget], name: &str) -> Result<&'a ControlTarget, String> {
    targets.iter().find(|t| t.name == name).ok_or_else(|| format!("no device named {name:?}"))
}

/// Whether the device's current driver says it has attached to the
/// channel's current generation (it serves; untrusted, for operators).
fn attached(target: &ControlTarget) -> bool {
    let generation = target.channel.atomic_u32(guest_abi::channel::header::GENERATION).load(Ordering::Acquire);
    Channel::driver_mark_in(&target.channel, generation) == Some(guest_abi::channel::driver_state::READY)
}

/// Refuses `fault` if the device's attached driver said it cannot commit
/// it (`DRIVER_INJECTABLE`); before the driver attaches, the request waits
/// in the channel as before.
fn refuse_unknown_fault(target: &ControlTarget, fault: FaultKind) -> Result<(), String> {
    use guest_abi::channel::header;
    let read = |offset| target.channel.atomic_u32(offset).load(Ordering::Acquire);
    if fault != FaultKind::None && attached(target) && read(header::DRIVER_INJECTABLE) & (1 << fault.code()) == 0 {
        let name = serde_json::to_value(fault).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        return Err(format!(
            "the driver of {} cannot commit `{name}` (it implements no such fault); nothing was injected",
            target.name
        ));
    }
    Ok(())
}

/// Carries out `request`.
pub fn respond(targets: &[ControlTarget], request: &Request) -> Response {
    let result = match request {
        Request::Status => {
            let devices: Vec<DeviceStatus> = targets.iter().map(status_of).collect();
            let fleet = FleetStatus::of(&devices);
            Ok(Response::Status { devices, fleet })
        }
        Request::Metrics => Ok(Response::Metrics { text: prometheus(targets) }),
        Request::Inject { device, fault, after } => target(targets, device).and_then(|t| {
            refuse_unknown_fault(t, *fault)?;
            Channel::inject(&t.channel, fault.code(), *after);
            Ok(Response::Done)
        }),
        Request::Kill { device } => {
            target(targets, device).and_then(|t| match t.metrics.driver_pid.load(Ordering::Relaxed) {
                0 => Err("no driver VM is running".into()),
                pid => {
                    // The device kills it through its pidfd: never a pid
                    // that was reused after the driver VM was reaped.
                    t.kill.write(1).map_err(|e| format!("asking the device to kill its driver VM: {e}"))?;
                    Ok(Response::Killed { pid })
                }
            })
        }
        Request::Recover { device } => target(targets, device).and_then(|t| {
            t.recover.write(1).map_err(|e| e.to_string())?;
            Ok(Response::Done)
        }),
    };
    result.unwrap_or_else(|message| Response::Error { message })
}

/// Answers one request line with one response line (JSON both).
pub fn answer(targets: &[ControlTarget], line: &str) -> String {
    let response = match serde_json::from_str::<Request>(line) {
        Ok(request) => respond(targets, &request),
        Err(error) => Response::Error {
            message: format!(
                "not a control request ({error}): send one JSON object such as {{\"request\":\"status\"}}; \
                 use the reflector's status, metrics, inject, kill and recover commands"
            ),
        },
    };
    serde_json::to_string(&response)
        .unwrap_or_else(|e| format!("{{\"response\":\"error\",\"message\":\"cannot encode the answer: {e}\"}}"))
}

/// Control clients served at once; more are told to try again.
const MAX_CLIENTS: usize = 8;

/// How long a control client has to send its whole request line (and
/// then to take the answer): a deadline for the line, not for each read,
/// so that [`MAX_CLIENTS`] clients sending a byte every few seconds cannot
/// hold every slot for hours.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

/// Reads one request line (bounded in size and time) and answers it,
/// the answer within [`CLIENT_DEADLINE`] too.
fn answer_client(stream: &UnixStream, targets: &[ControlTarget]) {
    let Some(line) = read_request(stream, std::time::Instant::now() + CLIENT_DEADLINE) else { return };
    let mut reply = answer(targets, line.trim());
    reply.push('\n');
    write_within(stream, reply.as_bytes(), std::time::Instant::now() + CLIENT_DEADLINE);
}

/// Writes `bytes` to `stream` until `deadline`, then gives up: a deadline
/// for the whole answer, not for each write, so that a client taking a
/// byte every few seconds of a large answer (`metrics` of many devices)
/// cannot hold its slot for hours (a review found the per-write timeout
/// allowed it). Whether it was all written.
fn write_within(stream: &UnixStream, mut bytes: &[u8], deadline: std::time::Instant) -> bool {
    while !bytes.is_empty() {
        let Some(left) = time_left(deadline) else { return false };
        if stream.set_write_timeout(Some(left)).is_err() {
            return false;
        }
        match (&*stream).write(bytes) {
            Ok(0) => return false,
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// What is left of the time until `deadline`; None once it has passed.
fn time_left(deadline: std::time::Instant) -> Option<Duration> {
    deadline.checked_duration_since(std::time::Instant::now()).filter(|left| !left.is_zero())
}

/// The request line: up to its newline, the end of the stream or
/// [`MAX_LINE`] bytes, whichever comes first; None once `deadline` passes
/// or the stream fails.
fn read_request(stream: &UnixStream, deadline: std::time::Instant) -> Option<String> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 512];
    while !line.contains(&b'\n') && (line.len() as u64) < MAX_LINE {
        let left = time_left(deadline)?;
        stream.set_read_timeout(Some(left)).ok()?;
        let want = chunk.len().min((MAX_LINE as usize).saturating_sub(line.len()));
        match (&*stream).read(&mut chunk[..want]) {
            Ok(0) => break,
            Ok(read) => line.extend_from_slice(&chunk[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let end = line.iter().position(|&byte| byte == b'\n').map_or(line.len(), |at| at + 1);
    line.truncate(end);
    Some(String::from_utf8_lossy(&line).into_owned())
}

/// The control socket, claimed (bound, listening) but not yet answered:
/// a reflector claims it as root and answers only once it dropped its
/// privileges (`--user`).
pub struct ControlSocket {
    listener: std::os::unix::net::UnixListener,
    lock: std::fs::File,
}

/// Claims the control socket at `path` (see `sockets::claim`).
pub fn claim(path: &Path) -> Result<ControlSocket, String> {
    let (listener, lock) = crate::sockets::claim(path).map_err(|e| e.to_string())?.into_listener();
    Ok(ControlSocket { listener, lock })
}

impl ControlSocket {
    /// Answers requests about `targets` on a thread of its own.
    pub fn serve(self, targets: Vec<ControlTarget>) -> Result<(), String> {
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let ControlSocket { listener, lock: _lock } = self;
                accept_clients(&listener, &Arc::new(targets));
            })
            .map_err(|e| format!("starting the control thread: {e}"))?;
        Ok(())
    }
}

/// Answers each client of `listener` on a thread of its own, so that one
/// that never sends its line delays nobody else; a bounded number of them.
fn accept_clients(listener: &std::os::unix::net::UnixListener, targets: &Arc<Vec<ControlTarget>>) {
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut accept_failures = crate::hw::LogEvery::default();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            // Out of descriptors, say: the pending connection stays and
            // fails again at once, so pause instead of spinning.
            Err(error) => {
                crate::serve::accept_failed(&mut accept_failures, "control", &error);
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::AcqRel);
            let busy = Response::Error { message: "too many control clients at once; try again".into() };
            let _ = (&stream).write_all(format!("{}\n", serde_json::to_string(&busy).unwrap_or_default()).as_bytes());
            continue;
        }
        let (targets, done) = (targets.clone(), busy.clone());
        let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
            answer_client(&stream, &targets);
            done.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Sends `request` to the control socket at `path`; returns the answer (an
/// `Error` response becomes `Err`).
pub fn request(path: &Path, request: &Request) -> Result<Response, String> {
    request_within(path, request, ANSWER_WAIT)
}

/// [`request`], the whole exchange (connecting included) within `wait`.
fn request_within(path: &Path, request: &Request, wait: Duration) -> Result<Response, String> {
    let deadline = std::time::Instant::now() + wait;
    let mut stream = crate::sockets::connect_within(path, wait).map_err(|e| {
        let e = match e.raw_os_error() {
            // The listener's backlog stayed full: nobody accepts there.
            Some(libc::EAGAIN) => format!("no connection accepted within {}s", wait.as_secs_f64()),
            _ => e.to_string(),
        };
        format!("cannot reach the reflector's control socket {}: {e}", path.display())
    })?;
    // The connection took some of the wait: the request's write gets what
    // is left.
    let _ = stream.set_write_timeout(Some(time_left(deadline).unwrap_or(Duration::from_micros(1))));
    let failed = |what: &str, error: std::io::Error| {
        let error = match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("no answer within {}s", wait.as_secs_f64())
            }
            _ => error.to_string(),
        };
        format!(
            "control socket {}: {what}: {error} (is it a reflector's, `reflector serve --control {}`?)",
            path.display(),
            path.display()
        )
    };
    let line = serde_json::to_string(request).map_err(|e| format!("encoding the request: {e}"))?;
    // A reflector that refuses a request (too many clients at once, a line
    // too long) answers why and closes without reading it all: the write
    // then fails, and the answer, already sent, is what to tell (before,
    // the failed write was, blaming the socket).
    let sent = stream.write_all(format!("{line}\n").as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // The whole answer within the deadline, not each read: a peer sending
    // a byte every few seconds is not waited on for ever.
    let mut reply = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let Some(left) = time_left(deadline) else {
            return Err(failed("reading the answer", std::io::ErrorKind::TimedOut.into()));
        };
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) if reply.len() + read <= 64 << 20 => reply.extend_from_slice(&chunk[..read]),
            Ok(_) => return Err(format!("control socket {}: an answer of more than 64 MiB", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            // A reflector that closed with the request unread resets the
            // connection once its answer has been read: the answer counts.
            Err(_) if reply.contains(&b'\n') => break,
            Err(error) => match sent {
                Err(error) => return Err(failed("sending the request", error)),
                Ok(()) => return Err(failed("reading the answer", error)),
            },
        }
    }
    if let (Err(error), true) = (sent, reply.is_empty()) {
        return Err(failed("sending the request", error));
    }
    let reply = String::from_utf8_lossy(&reply);
    // Whoever answered is not known to be a reflector: every string of its
    // answer reaches the terminal escaped (a JSON string may hold an
    // escape sequence as `\u001b`).
    let escaped = serde_json::from_str::<serde_json::Value>(reply.trim_end()).map(escape_strings);
    match escaped.and_then(serde_json::from_value::<Response>) {
        Ok(Response::Error { message }) => Err(message),
        Ok(response) => Ok(response),
        Err(error) => {
            // Whoever answered is not known to be a reflector: its bytes
            // reach the terminal escaped, and the first 200 characters only.
            let said: String = crate::untrusted_text::escape(reply.trim_end()).chars().take(200).collect();
            Err(format!("control socket {}: not a reflector's answer ({error}): {said}", path.display()))
        }
    }
}

/// `value` with every string in it (keys too) made printable
/// ([`crate::untrusted_text::escape`]) but for its line ends: the metrics
/// are lines of text.
fn escape_strings(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let escape_lines = |text: &str| text.split('\n').map(crate::untrusted_text::escape).collect::<Vec<_>>().join("\n");
    match value {
        Value::String(text) => Value::String(escape_lines(&text)),
        Value::Array(items) => Value::Array(items.into_iter().map(escape_strings).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(key, value)| (crate::untrusted_text::escape(&key), escape_strings(value)))
                .collect(),
        ),
        other => other,
    }
}

/// How long `request` waits for the reflector to take its request and
/// answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Every device's status, from the control socket at `path`.
pub fn status(path: &Path) -> Result<Vec<DeviceStatus>, String> {
    fleet_status(path).map(|(devices, _)| devices)
}

/// Every device's status and the fleet's, from the control socket at `path`.
pub fn fleet_status(path: &Path) -> Result<(Vec<DeviceStatus>, FleetStatus), String> {
    match request(path, &Request::Status)? {
        Response::Status { devices, fleet } => Ok((devices, fleet)),
        other => Err(format!("unexpected answer to status: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer is written within a deadline for the whole of it: a
    /// client that takes a byte now and then is cut off at it.
    #[test]
    fn a_client_taking_its_answer_slowly_is_cut_off_at_the_deadline() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let done = done.clone();
            // Slow: a byte a millisecond (each write of the answer then
            // takes a little), until the writer is done.
            std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                while !done.load(Ordering::SeqCst) && (&theirs).read(&mut byte).is_ok_and(|read| read == 1) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let answer = vec![b'x'; 4 << 20];
        let written = write_within(&ours, &answer, std::time::Instant::now() + Duration::from_millis(200));
        done.store(true, Ordering::SeqCst);
        drop(ours);
        reader.join().unwrap();
        assert!(!written, "4 MiB taken a byte a millisecond were all written within 200 ms");
    }

    /// A socket whose listener never accepts, its backlog full, is given
    /// up on within the deadline (before, the connect itself blocked for
    /// ever, before any timeout was set: a review found it).
    #[test]
    fn a_socket_that_never_accepts_is_given_up_on_within_the_deadline() {
        let dir = std::env::temp_dir().join(format!("control-backlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("full.sock");
        let (listener, queued) = crate::sockets::full_listener(&path);
        let (done, finished) = std::sync::mpsc::channel();
        let probe = path.clone();
        std::thread::spawn(move || {
            let _ = done.send(request_within(&probe, &Request::Status, Duration::from_millis(200)));
        });
        let answer = finished.recv_timeout(Duration::from_secs(20)).expect("the request hung");
        let error = answer.unwrap_err();
        assert!(error.contains("no connection accepted within 0.2s"), "{error}");
        assert!(error.contains(&path.display().to_string()), "{error}");
        drop((queued, listener));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A reflector that answers why it refuses and closes without reading
    /// the request (too many clients at once) is heard: the client's write
    /// fails, and it tells the answer, not the failed write (before: "Broken
    /// pipe", and a question whether the socket was a reflector's).
    #[test]
    fn a_refusal_sent_before_the_request_was_read_is_what_the_client_tells() {
        let dir = std::env::temp_dir().join(format!("control-refusal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("busy.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let busy = Response::Error { message: "too many control clients at once; try again".into() };
            (&stream).write_all(format!("{}\n", serde_json::to_string(&busy).unwrap()).as_bytes()).unwrap();
        });
        // Longer than the socket's buffer: the write fails once the server
        // has closed.
        let request = Request::Kill { device: "d".repeat(4 << 20) };
        let error = request_within(&path, &request, Duration::from_secs(10)).unwrap_err();
        server.join().unwrap();
        assert_eq!(error, "too many control clients at once; try again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The same refusal sent once the (small) request has arrived unread:
    /// the close then resets the connection after the answer, and the
    /// answer still counts (a review of the first fix found the reset
    /// taken for the answer).
    #[test]
    fn a_refusal_sent_after_the_request_arrived_unread_is_what_the_client_tells() {
        let dir = std::env::temp_dir().join(format!("control-late-refusal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("busy.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            // The request is there, and stays unread.
            let mut poll =
                libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&stream), events: libc::POLLIN, revents: 0 };
            // SAFETY: poll(2) on one pollfd on the stack.
            assert_eq!(unsafe { libc::poll(&mut poll, 1, 10_000) }, 1);
            let busy = Response::Error { message: "too many control clients at once; try again".into() };
            (&stream).write_all(format!("{}\n", serde_json::to_string(&busy).unwrap()).as_bytes()).unwrap();
        });
        let error = request_within(&path, &Request::Status, Duration::from_secs(10)).unwrap_err();
        server.join().unwrap();
        assert_eq!(error, "too many control clients at once; try again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A socket that is not a reflector's control socket gets a clear error
    /// naming it, and whatever it sent is escaped and cut short: before,
    /// its bytes reached the terminal raw (up to 64 MiB, escape sequences
    /// and all), and a silent one gave only "Resource temporarily
    /// unavailable".
    #[test]
    fn a_foreign_socket_answers_an_error_naming_it_with_its_words_escaped() {
        let dir = std::env::temp_dir().join(format!("control-foreign-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("other.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            stream.read_to_end(&mut request).unwrap();
            stream.write_all(format!("\x1b[2J{}", "x".repeat(100_000)).as_bytes()).unwrap();
        });
        let error = request(&path, &Request::Status).unwrap_err();
        peer.join().unwrap();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("\\u001b") && !error.contains('\x1b'), "{error}");
        assert!(error.len() < 1000, "{} bytes", error.len());
        // Nor does an answer in the protocol's own words bring its escape
        // sequences to the terminal.
        let listener = std::os::unix::net::UnixListener::bind(dir.join("other2.sock")).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            stream.read_to_end(&mut request).unwrap();
            let answer = Response::Error { message: "\x1b]0;owned\x07".into() };
            stream.write_all(serde_json::to_string(&answer).unwrap().as_bytes()).unwrap();
        });
        let error = request(&dir.join("other2.sock"), &Request::Status).unwrap_err();
        peer.join().unwrap();
        assert!(!error.contains('\x1b') && !error.contains('\x07'), "{error:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn targets() -> Vec<ControlTarget> {
        vec![ControlTarget {
            kind: "blk",
            name: "d0".into(),
            metrics: Arc::new(Metrics::default()),
            channel: Arc::new(SharedMemory::new("control-test", guest_abi::channel::REGION_SIZE).unwrap()),
            recover: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }]
    }

    fn ask(targets: &[ControlTarget], line: &str) -> Response {
        serde_json::from_str(&answer(targets, line)).unwrap()
    }

    #[test]
    fn requests_and_answers_are_typed_json_lines() {
        let targets = targets();
        let Response::Status { devices, .. } = ask(&targets, r#"{"request":"status"}"#) else { panic!("not a status") };
        assert_eq!((devices.len(), devices[0].device.as_str(), devices[0].state.as_str()), (1, "d0", "running"));
        assert!(
            matches!(ask(&targets, r#"{"request":"metrics"}"#), Response::Metrics { text } if text.contains("reflector_requests_total"))
        );
        let kill = ask(&targets, r#"{"request":"kill","device":"d0"}"#);
        assert_eq!(kill, Response::Error { message: "no driver VM is running".into() });
        targets[0].metrics.driver_pid.store(42, Ordering::Relaxed);
        assert_eq!(ask(&targets, r#"{"request":"kill","device":"d0"}"#), Response::Killed { pid: 42 });
        assert_eq!(targets[0].kill.read().unwrap(), 1, "the device was asked, not the pid");
        let inject = Request::Inject { device: "d0".into(), fault: FaultKind::SkipFlushes, after: 2 };
        assert_eq!(respond(&targets, &inject), Response::Done);
        assert_eq!(
            serde_json::to_string(&inject).unwrap(),
            r#"{"request":"inject","device":"d0","fault":"skip-flushes","after":2}"#
        );
        assert_eq!(ask(&targets, r#"{"request":"recover","device":"d0"}"#), Response::Done);
    }

    #[test]
    fn a_fault_the_attached_driver_cannot_commit_is_refused() {
        use guest_abi::channel::{driver_state, header, inject, injectable};
        let targets = targets();
        let channel = &targets[0].channel;
        channel.atomic_u32(header::GENERATION).store(3, Ordering::Release);
        channel.atomic_u32(header::DRIVER_GENERATION).store(3, Ordering::Release);
        channel.atomic_u32(header::DRIVER_STATE).store(driver_state::READY, Ordering::Release);
        channel.atomic_u32(header::DRIVER_INJECTABLE).store(injectable(&[inject::PANIC]), Ordering::Release);
        let refused = Request::Inject { device: "d0".into(), fault: FaultKind::CorruptReads, after: 0 };
        match respond(&targets, &refused) {
            Response::Error { message } => assert!(message.contains("cannot commit `corrupt-reads`"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(channel.atomic_u32(header::INJECT_KIND).load(Ordering::Acquire), inject::NONE);
        let panic = Request::Inject { device: "d0".into(), fault: FaultKind::Panic, after: 0 };
        assert_eq!(respond(&targets, &panic), Response::Done);
        assert_eq!(channel.atomic_u32(header::INJECT_KIND).load(Ordering::Acquire), inject::PANIC);
        // `none` withdraws it, whatever the driver implements.
        let none = Request::Inject { device: "d0".into(), fault: FaultKind::None, after: 0 };
        assert_eq!(
            serde_json::to_string(&none).unwrap(),
            r#"{"request":"inject","device":"d0","fault":"none","after":0}"#
        );
        assert_eq!(respond(&targets, &none), Response::Done);
        assert_eq!(channel.atomic_u32(header::INJECT_KIND).load(Ordering::Acquire), inject::NONE);
    }

    #[test]
    fn status_says_whether_the_driver_attached_and_sums_the_fleet() {
        use guest_abi::channel::{driver_state, header};
        let targets = targets();
        targets[0].metrics.driver_rss_kib.store(3000, Ordering::Relaxed);
        targets[0].metrics.memory_cap_bytes.store(256 << 20, Ordering::Relaxed);
        let status = |targets: &[ControlTarget]| match respond(targets, &Request::Status) {
            Response::Status { devices, fleet } => (devices, fleet),
            other => panic!("{other:?}"),
        };
        let (devices, fleet) = status(&targets);
        assert!(!devices[0].attached, "attached before the driver said so");
        assert_eq!((fleet.devices, fleet.attached, fleet.driver_rss_kib), (1, 0, 3000));
        assert_eq!((fleet.memory_cap_bytes, fleet.reflector_budget_kib), (256 << 20, 10 * 1024 + 256));
        // A spare has a cap of its own.
        targets[0].metrics.spare_pid.store(42, Ordering::Relaxed);
        assert_eq!(status(&targets).1.memory_cap_bytes, 2 * (256 << 20), "the spare's cap is not counted");
        targets[0].metrics.spare_pid.store(0, Ordering::Relaxed);
        assert!(fleet.reflector_rss_kib > 0);
        let channel = &targets[0].channel;
        channel.atomic_u32(header::GENERATION).store(2, Ordering::Release);
        channel.atomic_u32(header::DRIVER_GENERATION).store(2, Ordering::Release);
        channel.atomic_u32(header::DRIVER_STATE).store(driver_state::READY, Ordering::Release);
        assert_eq!(status(&targets).1.attached, 1);
        // A driver of an older generation does not serve this one.
        channel.atomic_u32(header::GENERATION).store(3, Ordering::Release);
        assert!(!status(&targets).0[0].attached);
        assert!(prometheus(&targets).contains("reflector_fleet_driver_rss_bytes 3072000"));
    }

    #[test]
    fn bad_requests_get_errors_that_say_what_to_do() {
        let targets = targets();
        for line in
            ["status", "", "{}", r#"{"request":"kill"}"#, r#"{"request":"inject","device":"d0","fault":"melt"}"#]
        {
            match ask(&targets, line) {
                Response::Error { message } => assert!(message.contains("not a control request"), "{line}: {message}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        assert!(
            matches!(ask(&targets, r#"{"request":"recover","device":"nope"}"#), Response::Error { message } if message.contains("no device named"))
        );
        assert_eq!(FaultKind::parse("page-fault"), Some(FaultKind::PageFault));
        assert_eq!(FaultKind::parse("melt"), None);
    }
}
