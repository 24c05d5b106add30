//! The control socket: operators (and the chaos command) ask the reflector
//! about its devices and act on them. One line per request, one answer per
//! connection:
//!
//! - `status`: one JSON array, an object per device;
//! - `metrics`: the counters in Prometheus text format;
//! - `inject DEVICE KIND [AFTER]`: make the driver commit a fault (tests);
//! - `kill DEVICE`: SIGKILL the device's driver VM, through its pidfd (tests);
//! - `recover DEVICE`: make a failed device try a new driver VM now.
//!
//! The socket is as privileged as the reflector: create it where only the
//! operator can reach it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use guest_abi::channel::inject;
use serde::Serialize;
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
#[derive(Serialize)]
struct DeviceStatus<'a> {
    device: &'a str,
    kind: &'static str,
    state: &'static str,
    driver_pid: u64,
    spare_pid: u64,
    requests: u64,
    completed: u64,
    in_flight: u64,
    errors: u64,
    malformed: u64,
    client_memory_faults: u64,
    violations: u64,
    abuses: u64,
    doorbells: u64,
    faults: u64,
    restarts: u64,
    replayed: u64,
    poisoned: u64,
    last_fault: String,
    last_poison: String,
    stall_p50_us: u64,
    stall_p99_us: u64,
    stall_max_us: u64,
    stalls: usize,
    bytes_read: u64,
    bytes_written: u64,
    tx_frames: u64,
    rx_frames: u64,
    tx_bytes: u64,
    rx_bytes: u64,
    tx_lost: u64,
    rx_dropped: u64,
}

fn status_of(target: &ControlTarget) -> DeviceStatus<'_> {
    let m = &target.metrics;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (p50, p99, max) = m.stall_percentiles().unwrap_or((0, 0, 0));
    DeviceStatus {
        device: &target.name,
        kind: target.kind,
        state: STATE_NAMES.get(get(&m.state) as usize).copied().unwrap_or("unknown"),
        driver_pid: get(&m.driver_pid),
        spare_pid: get(&m.spare_pid),
        requests: get(&m.requests),
        completed: get(&m.completed),
        in_flight: get(&m.in_flight),
        errors: get(&m.errors),
        malformed: get(&m.malformed),
        client_memory_faults: get(&m.client_memory_faults),
        abuses: get(&m.abuses),
        doorbells: get(&m.doorbells),
        violations: get(&m.violations),
        faults: get(&m.faults),
        restarts: get(&m.restarts),
        replayed: get(&m.replayed),
        poisoned: get(&m.poisoned),
        last_fault: m.last_fault.lock().map(|s| s.clone()).unwrap_or_default(),
        last_poison: m.last_poison.lock().map(|s| s.clone()).unwrap_or_default(),
        stall_p50_us: p50,
        stall_p99_us: p99,
        stall_max_us: max,
        stalls: m.stalls_us.lock().map(|s| s.len()).unwrap_or(0),
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
    family("faults_total", "counter", "Driver VM faults.", &|s| s.faults as f64);
    family("restarts_total", "counter", "Driver VMs started after a fault.", &|s| s.restarts as f64);
    family("replayed_total", "counter", "Requests replayed to a new driver VM.", &|s| s.replayed as f64);
    family("in_flight", "gauge", "Requests in the driver VM.", &|s| s.in_flight as f64);
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
    out
}

/// Parses a fault name.
pub fn fault_kind(name: &str) -> Option<u32> {
    Some(match name {
        "panic" => inject::PANIC,
        "page-fault" => inject::PAGE_FAULT,
        "illegal" => inject::ILLEGAL,
        "hang" => inject::HANG,
        "lie" => inject::LIE,
        "stop" => inject::STOP,
        "spin" => inject::SPIN,
        "flood" => inject::FLOOD,
        "corrupt-reads" => inject::CORRUPT_READS,
        "skip-flushes" => inject::SKIP_FLUSHES,
        _ => return None,
    })
}

fn target<'a>(targets: &'a [ControlTarget], name: Option<&str>) -> Result<&'a ControlTarget, String> {
    let name = name.ok_or("name a device")?;
    targets.iter().find(|t| t.name == name).ok_or_else(|| format!("no device named {name:?}"))
}

/// Answers one request line.
pub fn answer(targets: &[ControlTarget], line: &str) -> String {
    let mut words = line.split_whitespace();
    let result = match words.next() {
        Some("status") => {
            serde_json::to_string(&targets.iter().map(status_of).collect::<Vec<_>>()).map_err(|e| e.to_string())
        }
        Some("metrics") => Ok(prometheus(targets)),
        Some("inject") => target(targets, words.next()).and_then(|t| {
            let kind = words.next().and_then(fault_kind).ok_or(
                "inject DEVICE KIND [AFTER]: KIND is panic, page-fault, illegal, hang, lie, stop, corrupt-reads, skip-flushes, spin or flood".to_string(),
            )?;
            let after = words.next().map(str::parse).transpose().map_err(|_| "AFTER must be a number")?.unwrap_or(0);
            Channel::inject(&t.channel, kind, after);
            Ok("ok".into())
        }),
        Some("kill") => {
            target(targets, words.next()).and_then(|t| match t.metrics.driver_pid.load(Ordering::Relaxed) {
                0 => Err("no driver VM is running".into()),
                pid => {
                    // The device kills it through its pidfd: never a pid
                    // that was reused after the driver VM was reaped.
                    t.kill.write(1).map_err(|e| format!("asking the device to kill its driver VM: {e}"))?;
                    Ok(format!("ok {pid}"))
                }
            })
        }
        Some("recover") => target(targets, words.next()).and_then(|t| {
            t.recover.write(1).map_err(|e| e.to_string())?;
            Ok("ok".into())
        }),
        _ => Err("unknown request: use status, metrics, inject, kill or recover".into()),
    };
    match result {
        Ok(text) => text,
        Err(message) => format!("error: {message}"),
    }
}

/// Control clients served at once; more are told to try again.
const MAX_CLIENTS: usize = 8;

/// Reads one request line (bounded in size and time) and answers it.
fn answer_client(stream: &UnixStream, targets: &[ControlTarget]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    if BufReader::new(stream.take(MAX_LINE)).read_line(&mut line).is_err() {
        return;
    }
    let reply = answer(targets, line.trim());
    let _ = (&*stream).write_all(reply.as_bytes());
    let _ = (&*stream).write_all(b"\n");
}

/// Serves the control socket at `path` on a thread of its own.
pub fn serve(path: &Path, targets: Vec<ControlTarget>) -> Result<(), String> {
    let (listener, lock) = crate::sockets::claim(path).map_err(|e| e.to_string())?.into_listener();
    let targets = Arc::new(targets);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let _lock = lock;
            let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for stream in listener.incoming().flatten() {
                // Each client on a thread of its own, so that one that never
                // sends its line delays nobody else; a bounded number of them.
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    let _ = (&stream).write_all(b"error: too many control clients at once; try again\n");
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
        })
        .map_err(|e| format!("starting the control thread: {e}"))?;
    Ok(())
}

/// Sends one request to the control socket at `path`; returns the answer.
pub fn request(path: &Path, line: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(path)
        .map_err(|e| format!("cannot reach the reflector's control socket {}: {e}", path.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    stream.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("control socket: {e}"))?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(|e| format!("control socket: {e}"))?;
    let reply = reply.trim_end().to_owned();
    match reply.strip_prefix("error: ") {
        Some(message) => Err(message.to_owned()),
        None => Ok(reply),
    }
}
