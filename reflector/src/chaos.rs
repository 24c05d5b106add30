//! `reflector chaos`: while verified load runs against a device, kill its
//! driver VM and make it commit guest-side faults at random (seeded,
//! reproducible) intervals; wait for each recovery; report what happened.
//!
//! The load is the project's frontend, `blk-load --verify`, run in a loop
//! next to the chaos; its errors and verification mismatches are what a
//! client would have seen.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{self, DeviceStatus, FaultKind, Request};

/// How often the chaos command asks whether a recovery has ended (and
/// how long it waits before asking first).
const STATUS_PERIOD: Duration = Duration::from_millis(10);

/// Every fault the chaos command can cause.
pub const ALL_KINDS: [&str; 7] = ["kill", "panic", "page-fault", "illegal", "hang", "lie", "stop"];

/// What to do.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// The reflector's control socket.
    pub control: PathBuf,
    /// The device to torment.
    pub device: String,
    /// Its vhost-user socket, to run verified load on (needed for every
    /// kind but `kill`: injected faults trigger on a request).
    pub socket: Option<PathBuf>,
    /// How many faults.
    pub faults: u32,
    /// Which kinds, chosen at random.
    pub kinds: Vec<String>,
    /// Seed of the random choices.
    pub seed: u64,
    /// Shortest and longest pause between a recovery and the next fault.
    pub gap: (Duration, Duration),
    /// Longest wait for a recovery before the run fails.
    pub recovery_timeout: Duration,
    /// The `blk-load` binary.
    pub blk_load: PathBuf,
    /// Load runs (4 jobs of 2 s each) before the first fault, with no
    /// fault: the client's own figures on the same device and machine,
    /// against which the failovers' are read.
    pub quiet_runs: u32,
}

/// What happened.
#[derive(Debug, Default)]
pub struct ChaosReport {
    /// Faults caused, by kind.
    pub by_kind: BTreeMap<String, u32>,
    /// Faults after which no recovery was seen in time.
    pub unrecovered: u32,
    /// Restarts the device counted during the run.
    pub restarts: u64,
    /// Requests the device completed with an error during the run.
    pub device_errors: u64,
    /// Recovery stall percentiles from the device (p50, p99, max), µs.
    pub stall_us: (u64, u64, u64),
    /// Where the failovers' time went, phase by phase (from the device).
    pub failover: Vec<crate::control::PhaseFigures>,
    /// Load runs completed.
    pub load_runs: u32,
    /// I/O errors the load saw.
    pub load_errors: u64,
    /// Verification mismatches the load saw.
    pub load_mismatches: u64,
    /// Load runs that could not run at all.
    pub load_failures: u32,
    /// The slowest request of each load job, µs (a job is 2 s of one
    /// pattern, a dozen failovers at the chaos's pace): what the client
    /// waited at worst, which a stall measured inside the reflector could
    /// understate.
    pub load_slowest_us: Vec<u64>,
    /// The slowest request of each job of the quiet runs before the first
    /// fault ([`ChaosOptions::quiet_runs`]), µs.
    pub quiet_slowest_us: Vec<u64>,
    /// Wall time.
    pub elapsed: Duration,
}

impl ChaosReport {
    /// Whether a client saw nothing but stalls.
    pub fn passed(&self) -> bool {
        self.unrecovered == 0
            && self.device_errors == 0
            && self.load_errors == 0
            && self.load_mismatches == 0
            && self.load_failures == 0
    }
}

/// A small seeded generator (xorshift64*): reproducible runs need no more.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn device_status(options: &ChaosOptions) -> Result<DeviceStatus, String> {
    control::status(&options.control)?
        .into_iter()
        .find(|d| d.device == options.device)
        .ok_or_else(|| format!("the reflector has no device named {:?}", options.device))
}

/// What the load saw.
#[derive(Debug, Default)]
struct LoadOutcome {
    runs: u32,
    errors: u64,
    mismatches: u64,
    failures: u32,
    slowest_us: Vec<u64>,
}

/// Runs of the load in a row that could not start before it is given up.
const LOAD_START_TRIES: u32 = 3;

/// The chaos's error once its load gave up.
const LOAD_GAVE_UP: &str = "the load could not run (see above): no request would trigger the faults";

/// Runs `blk-load --verify` in a loop until `stop`, or `max_runs` runs, or
/// until it could not start [`LOAD_START_TRIES`] times in a row.
fn run_load(
    options: &ChaosOptions,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    gave_up: Arc<AtomicBool>,
    max_runs: Option<u32>,
) -> LoadOutcome {
    let mut load = LoadOutcome::default();
    let LoadOutcome { runs, errors, mismatches, failures, slowest_us } = &mut load;
    let mut could_not_run = 0;
    while !stop.load(Ordering::Acquire) && max_runs.is_none_or(|max| *runs + *failures < max) {
        let output = Command::new(&options.blk_load)
            .arg("--socket")
            .arg(&socket)
            .args(["--json", "--verify", "--queue-size", "1024", "--timeout", "30", "--job", "randwrite,randread"])
            .args(["--bs", "4k,64k", "--qd", "8", "--seconds", "2", "--size", "32M"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let Ok(output) = output else {
            *failures += 1;
            break;
        };
        *runs += 1;
        for line in String::from_utf8_lossy(&output.stdout).lines().filter(|l| l.starts_with('{')) {
            if let Ok(job) = serde_json::from_str::<serde_json::Value>(line) {
                *errors += job["errors"].as_u64().unwrap_or(0);
                *mismatches += job["mismatches"].as_u64().unwrap_or(0);
                if let Some(slowest) = job["lat_max_us"].as_f64() {
                    slowest_us.push(slowest as u64);
                }
            }
        }
        if output.status.code() == Some(2) {
            *failures += 1;
            could_not_run += 1;
            tracing::error!(stderr = %String::from_utf8_lossy(&output.stderr).trim(), "the load could not run");
            // A load that cannot start (no such socket, not a reflector's)
            // will not start the next time either: before, it was started
            // again at once, hundreds of times a second, each failure a
            // line.
            if could_not_run == LOAD_START_TRIES {
                tracing::error!(tries = LOAD_START_TRIES, "the load could not run, again and again: stopping it");
                gave_up.store(true, Ordering::Release);
                break;
            }
            continue;
        }
        could_not_run = 0;
        if !output.status.success() {
            tracing::error!(stderr = %String::from_utf8_lossy(&output.stderr).trim(), "the load saw errors");
        }
    }
    load
}

/// Runs the chaos.
pub fn run(options: &ChaosOptions) -> Result<ChaosReport, String> {
    for kind in &options.kinds {
        if !ALL_KINDS.contains(&kind.as_str()) {
            return Err(format!("unknown fault kind {kind:?} (known: {})", ALL_KINDS.join(", ")));
        }
        if kind != "kill" && options.socket.is_none() {
            return Err(format!("fault kind {kind:?} triggers on a request: give --socket so that load runs"));
        }
    }
    if options.kinds.is_empty() {
        return Err("no fault kinds given".into());
    }
    let start_status = device_status(options)?;
    if start_status.kind == "net" && options.socket.is_some() {
        return Err(format!(
            "{} is a net device: the chaos load is blk-load (block). Run it without --socket (kills only), \
             with net-load as the load, or see ci/e2e-net.sh",
            options.device
        ));
    }
    let start = Instant::now();
    let mut report = ChaosReport::default();
    // Set once the load gave up: the faults that wait for a request would
    // each wait out the recovery timeout for nothing.
    let gave_up = Arc::new(AtomicBool::new(false));
    let quiet = match &options.socket {
        Some(socket) if options.quiet_runs > 0 => {
            eprintln!("chaos: {} load runs with no fault first", options.quiet_runs);
            run_load(options, socket.clone(), Arc::default(), gave_up.clone(), Some(options.quiet_runs))
        }
        _ => LoadOutcome::default(),
    };
    report.quiet_slowest_us = quiet.slowest_us.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let load = options.socket.clone().map(|socket| {
        let (options, stop) = (options.clone(), stop.clone());
        let gave_up = gave_up.clone();
        std::thread::spawn(move || run_load(&options, socket, stop, gave_up, None))
    });
    let mut rng = Rng(options.seed | 1);
    let result = (|| -> Result<(), String> {
        for i in 0..options.faults {
            if gave_up.load(Ordering::Acquire) {
                return Err(LOAD_GAVE_UP.into());
            }
            let (low, high) = (options.gap.0.as_micros() as u64, options.gap.1.as_micros() as u64);
            std::thread::sleep(Duration::from_micros(low + rng.below(high.saturating_sub(low) + 1)));
            let kind = &options.kinds[rng.below(options.kinds.len() as u64) as usize];
            let before = device_status(options)?.restarts;
            match kind.as_str() {
                "kill" => control::request(&options.control, &Request::Kill { device: options.device.clone() })?,
                other => {
                    let fault = FaultKind::parse(other).ok_or_else(|| format!("unknown fault {other:?}"))?;
                    let inject = Request::Inject { device: options.device.clone(), fault, after: 0 };
                    control::request(&options.control, &inject)?
                }
            };
            *report.by_kind.entry(kind.clone()).or_default() += 1;
            let deadline = Instant::now() + options.recovery_timeout;
            // A status is not free for the reflector (percentiles of every
            // recent failover, /proc reads): asking during the failover
            // slowed the failover it measures (on two cores, every 2 ms
            // from the kill on). The recovery is measured by the reflector
            // itself; this loop only waits for it to end.
            std::thread::sleep(STATUS_PERIOD);
            loop {
                let status = device_status(options)?;
                if status.restarts > before && status.state == "running" {
                    break;
                }
                if gave_up.load(Ordering::Acquire) {
                    return Err(LOAD_GAVE_UP.into());
                }
                if Instant::now() > deadline {
                    report.unrecovered += 1;
                    let status = serde_json::to_string(&status).unwrap_or_default();
                    tracing::error!(fault = i, kind = %kind, %status, "no recovery in time");
                    break;
                }
                std::thread::sleep(STATUS_PERIOD);
            }
            if (i + 1) % 20 == 0 {
                eprintln!("chaos: {} faults", i + 1);
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Release);
    if options.kinds.iter().any(|kind| kind != "kill") {
        // A fault injected for a request that never came (the load gave up,
        // or the fault was never committed in time) would be committed at
        // the next client's first request, long after the chaos: withdrawn.
        let withdraw = Request::Inject { device: options.device.clone(), fault: FaultKind::None, after: 0 };
        if let Err(error) = control::request(&options.control, &withdraw) {
            tracing::error!(%error, device = %options.device, "cannot withdraw the fault injected last: \
                                    the next request may commit it (reflector inject DEVICE none)");
        }
    }
    if let Some(load) = load {
        let load = load.join().unwrap_or(LoadOutcome { failures: 1, ..LoadOutcome::default() });
        // What the quiet runs saw counts too.
        (report.load_runs, report.load_errors, report.load_mismatches, report.load_failures) = (
            load.runs + quiet.runs,
            load.errors + quiet.errors,
            load.mismatches + quiet.mismatches,
            load.failures + quiet.failures,
        );
        report.load_slowest_us = load.slowest_us;
    }
    result?;
    let end_status = device_status(options)?;
    // A reflector restarted meanwhile starts its counters again.
    report.restarts = end_status.restarts.saturating_sub(start_status.restarts);
    report.device_errors = end_status.errors.saturating_sub(start_status.errors);
    report.stall_us = (end_status.stall_p50_us, end_status.stall_p99_us, end_status.stall_max_us);
    report.failover = end_status.failover;
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Prints the report.
pub fn print(options: &ChaosOptions, report: &ChaosReport) {
    let total: u32 = report.by_kind.values().sum();
    println!(
        "chaos on device {}: {total} faults in {:.1} s (seed {})",
        options.device,
        report.elapsed.as_secs_f64(),
        options.seed
    );
    let kinds: Vec<String> = report.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("  faults by kind: {}", kinds.join(", "));
    println!("  restarts: {}, faults without a recovery in time: {}", report.restarts, report.unrecovered);
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "  recovery stall (fault detected -> next completion): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(report.stall_us.0),
        ms(report.stall_us.1),
        ms(report.stall_us.2)
    );
    if !report.failover.is_empty() {
        println!("  failover phases (recent failovers a client waited on):");
        println!("    {:<14} {:>6} {:>9} {:>9} {:>9}", "phase", "count", "p50 ms", "p99 ms", "max ms");
        for figures in &report.failover {
            println!(
                "    {:<14} {:>6} {:>9.3} {:>9.3} {:>9.3}",
                figures.phase,
                figures.count,
                ms(figures.p50_us),
                ms(figures.p99_us),
                ms(figures.max_us)
            );
        }
    }
    let median_and_max = |jobs: &[u64]| -> Option<(u64, u64)> {
        let mut sorted = jobs.to_vec();
        sorted.sort_unstable();
        Some((*sorted.get(sorted.len() / 2)?, *sorted.last()?))
    };
    let quiet = median_and_max(&report.quiet_slowest_us);
    if let Some((median, max)) = quiet {
        println!(
            "  the client's slowest request in each 2 s load job with no fault (before the first): median {:.2} ms, max {:.2} ms ({} jobs)",
            ms(median),
            ms(max),
            report.quiet_slowest_us.len()
        );
    }
    if let Some((median, max)) = median_and_max(&report.load_slowest_us) {
        let ratio = match quiet {
            Some((quiet, _)) if quiet > 0 => format!(", {:.2}x the median with no fault", median as f64 / quiet as f64),
            _ => String::new(),
        };
        println!(
            "  the client's slowest request in each 2 s load job (failovers included): median {:.2} ms, max {:.2} ms ({} jobs){ratio}",
            ms(median),
            ms(max),
            report.load_slowest_us.len()
        );
    }
    println!(
        "  client errors: {} (device), load: {} runs, {} I/O errors, {} verification mismatches, {} failed runs",
        report.device_errors, report.load_runs, report.load_errors, report.load_mismatches, report.load_failures
    );
    println!("result: {}", if report.passed() { "PASS" } else { "FAIL" });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_seeded_and_bounded() {
        let draw = |seed| {
            let mut rng = Rng(seed);
            (0..5).map(|_| rng.below(7)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        assert!(draw(9).iter().all(|v| *v < 7));
    }
}
