//! Counters of a device (block or net), readable while it runs: the control
//! socket reports them (`reflector status`, `reflector metrics`).

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use crate::failover::{Breakdown, PHASES};

/// Recovery stalls kept for percentiles (the most recent ones).
const STALL_HISTORY: usize = 4096;

/// Counters, readable while the device runs.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Chains taken from the client.
    pub requests: AtomicU64,
    /// Chains completed.
    pub completed: AtomicU64,
    /// Chains refused as malformed.
    pub malformed: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Clients cut off because touching their memory faulted (its file
    /// shrank or ran out of pages).
    pub client_memory_faults: AtomicU64,
    /// Doorbell rings from driver VMs.
    pub doorbells: AtomicU64,
    /// Kicks from the client (queue events its worker handled).
    pub kicks: AtomicU64,
    /// Driver VMs replaced for taking more than their share (spinning
    /// while idle, flooding the doorbell).
    pub abuses: AtomicU64,
    /// Driver protocol violations seen.
    pub violations: AtomicU64,
    /// Driver VM faults of any kind.
    pub faults: AtomicU64,
    /// Driver VMs started after a fault.
    pub restarts: AtomicU64,
    /// Requests sent again to a new driver VM.
    pub replayed: AtomicU64,
    /// Poison requests: completed with an error after being in
    /// `poison_deaths` dying driver VMs in a row.
    pub poisoned: AtomicU64,
    /// The last poison request, for operators (kind, length, sector).
    pub last_poison: Mutex<String>,
    /// Bytes read for the client.
    pub bytes_read: AtomicU64,
    /// Bytes written for the client.
    pub bytes_written: AtomicU64,
    /// Net: frames taken from the client's transmit queue.
    pub tx_frames: AtomicU64,
    /// Net: frames delivered into the client's receive queue.
    pub rx_frames: AtomicU64,
    /// Net: frame bytes transmitted for the client.
    pub tx_bytes: AtomicU64,
    /// Net: frame bytes received for the client.
    pub rx_bytes: AtomicU64,
    /// Net: transmitted frames lost in a driver VM that failed (at most
    /// once: they are never sent again).
    pub tx_lost: AtomicU64,
    /// Net: received frames dropped by the reflector (no client buffer could
    /// hold them, or the device had failed).
    pub rx_dropped: AtomicU64,
    /// Requests handed to the driver VM and not yet completed.
    pub in_flight: AtomicU64,
    /// The current driver VM's pid (0 while none runs).
    pub driver_pid: AtomicU64,
    /// The current driver VM's resident memory in KiB (its vmm's VmRSS),
    /// sampled every ten watch periods and at the first after each start.
    pub driver_rss_kib: AtomicU64,
    /// The part of it that is the driver VM's own (its anonymous memory;
    /// the rest is code and libraries every vmm shares, and the channel),
    /// KiB, sampled with it.
    pub driver_own_kib: AtomicU64,
    /// The memory cap of the device's driver VMs (their cgroup), bytes; 0
    /// when they have none (unjailed).
    pub memory_cap_bytes: AtomicU64,
    /// 1 when a block device's payloads go through per-request DMA
    /// windows (`dma=direct`), 0 with bounce slots.
    pub direct_dma: AtomicU64,
    /// The spare's pid (0 if none).
    pub spare_pid: AtomicU64,
    /// The spare's resident memory in KiB (0 if none), sampled with the
    /// current driver VM's.
    pub spare_rss_kib: AtomicU64,
    /// The part of it that is the spare's own, KiB.
    pub spare_own_kib: AtomicU64,
    /// `state_name` index of the device's driver state.
    pub state: AtomicU64,
    /// The last fault, for operators.
    pub last_fault: Mutex<String>,
    /// Where in the driver's source the last fault happened (from the
    /// driver VM's report: `function (file:line) [build ID]`), if known.
    pub last_fault_location: Mutex<String>,
    /// Recovery stalls, in microseconds: from the fault (or the first request
    /// after it, if none was pending) to the next completion.
    pub stalls_us: Mutex<VecDeque<u64>>,
    /// Where the recent failovers' time went ([`crate::failover`]).
    pub failovers: Mutex<VecDeque<Breakdown>>,
}

/// Names of the driver states, indexed by `Metrics::state`.
pub const STATE_NAMES: [&str; 3] = ["running", "awaiting_restart", "failed"];

impl Metrics {
    /// Records one recovery stall, keeping the most recent ones.
    pub fn record_stall(&self, stall_us: u64) {
        if let Ok(mut stalls) = self.stalls_us.lock() {
            if stalls.len() == STALL_HISTORY {
                stalls.pop_front();
            }
            stalls.push_back(stall_us);
        }
    }

    /// Median, p99 and max of the recorded recovery stalls, in microseconds.
    pub fn stall_percentiles(&self) -> Option<(u64, u64, u64)> {
        // Copied out first: the worker records a stall under this lock, and
        // must never wait for a status request's sort.
        let stalls: Vec<u64> = self.stalls_us.lock().ok()?.iter().copied().collect();
        percentiles(stalls)
    }

    /// Records one failover's breakdown, keeping the most recent ones.
    pub fn record_failover(&self, breakdown: Breakdown) {
        if let Ok(mut failovers) = self.failovers.lock() {
            if failovers.len() == STALL_HISTORY {
                failovers.pop_front();
            }
            failovers.push_back(breakdown);
        }
    }

    /// Median, p99 and max of each failover phase (in [`PHASES`] order) and
    /// of the whole, in microseconds, with how many failovers each counts.
    pub fn failover_percentiles(&self) -> Vec<(&'static str, usize, (u64, u64, u64))> {
        // Each phase's figures are taken under the lock and sorted after it:
        // the worker records a failover under this lock, and must never wait
        // for a status request's sorts.
        let rows: Vec<(&'static str, Vec<u64>)> = {
            let Ok(failovers) = self.failovers.lock() else { return Vec::new() };
            let mut rows: Vec<(&'static str, Vec<u64>)> = PHASES
                .iter()
                .enumerate()
                .map(|(index, phase)| (phase.name(), failovers.iter().filter_map(|b| b.phases_us[index]).collect()))
                .collect();
            rows.push(("total", failovers.iter().map(|b| b.total_us).collect()));
            rows
        };
        rows.into_iter()
            .filter_map(|(name, values)| {
                let count = values.len();
                Some((name, count, percentiles(values)?))
            })
            .collect()
    }
}

/// Median, p99 and max of `values` (nearest rank).
fn percentiles(mut values: Vec<u64>) -> Option<(u64, u64, u64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let at = |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    Some((at(0.5), at(0.99), values[values.len() - 1]))
}
