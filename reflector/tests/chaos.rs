//! Transparent recovery under chaos: at least 200 faults of every kind
//! (SIGKILL of the driver VM, guest panic, page fault, invalid instruction,
//! hang, lying answer, clean stop) while blk-load runs verified random
//! reads and writes. A client must see no error and no corrupted data.
//!
//! Needs /dev/kvm and the workspace's binaries next to the reflector.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{blk_load, kvm_available};

fn reflector_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_reflector"))
}

struct Served {
    child: Child,
    dir: PathBuf,
}

impl Served {
    /// Starts `reflector serve` with a control socket; waits (bounded) until
    /// the control socket answers.
    fn start(tag: &str, blk_extra: &str) -> Served {
        let dir = std::env::temp_dir().join(format!("reflector-chaos-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spec = format!(
            "socket={},image={},size=64M,name=disk0{blk_extra}",
            dir.join("d.sock").display(),
            dir.join("d.img").display()
        );
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new(reflector_bin())
            .args(["serve", "--blk", &spec, "--control"])
            .arg(dir.join("ctl"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut served = Served { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while served.status().is_none() {
            assert!(served.child.try_wait().unwrap().is_none(), "the reflector exited: {}", served.log());
            assert!(Instant::now() < deadline, "the control socket never answered: {}", served.log());
            std::thread::yield_now();
        }
        served
    }

    fn ctl(&self) -> PathBuf {
        self.dir.join("ctl")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn status(&self) -> Option<serde_json::Value> {
        let output =
            Command::new(reflector_bin()).args(["status", "--json", "--control"]).arg(self.ctl()).output().ok()?;
        let all: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        all.as_array()?.first().cloned()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn two_hundred_faults_of_every_kind_cost_no_client_error() {
    if !kvm_available("two_hundred_faults_of_every_kind_cost_no_client_error") {
        return;
    }
    // A large budget: this test injects faults far faster than the default
    // policy tolerates (that policy has its own test below and unit tests).
    let served = Served::start("all", ",hang_ms=100,fault_budget=100000");
    let output = Command::new(reflector_bin())
        .args(["chaos", "--device", "disk0", "--faults", "210", "--seed", "20261123", "--min-gap-ms", "110"])
        .args(["--max-gap-ms", "160", "--control"])
        .arg(served.ctl())
        .arg("--socket")
        .arg(served.dir.join("d.sock"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chaos failed:\n{report}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        served.log()
    );
    for kind in ["kill", "panic", "page-fault", "illegal", "hang", "lie", "stop"] {
        assert!(report.contains(&format!("{kind} ")), "no {kind} fault injected:\n{report}");
    }
    assert!(report.contains("faults without a recovery in time: 0"), "{report}");
    assert!(report.contains("client errors: 0 (device)"), "{report}");
    assert!(report.contains("0 I/O errors, 0 verification mismatches, 0 failed runs"), "{report}");
    let status = served.status().unwrap();
    assert!(status["restarts"].as_u64().unwrap() >= 210, "{status}");
    assert_eq!(status["errors"], 0, "{status}");
    assert_eq!(status["state"], "running");
    assert!(!served.log().contains("panicked"));
    // Every failover a client waited on is split into its phases; the
    // kills the reflector sent have a detection phase, the phases of each
    // failover up to its first completion add up to no more than its
    // whole, and the drain (to the last request the fault caught) follows.
    let phases = status["failover"].as_array().unwrap();
    let figure = |name: &str| phases.iter().find(|p| p["phase"] == name).cloned();
    for name in ["retire", "replacement", "device_reset", "replay", "drain", "total"] {
        let row = figure(name).unwrap_or_else(|| panic!("no {name} phase in {status}"));
        assert!(row["count"].as_u64().unwrap() > 0, "{status}");
    }
    assert!(figure("detection").is_some_and(|row| row["count"].as_u64().unwrap() > 0), "{status}");
    let total_max = figure("total").unwrap()["max_us"].as_u64().unwrap();
    assert!(
        phases.iter().filter(|p| p["phase"] != "drain").all(|p| p["max_us"].as_u64().unwrap() <= total_max),
        "{status}"
    );
    assert!(report.contains("failover phases"), "{report}");
}

/// The 1-based line of driver-vm/src/channel.rs containing `marker`.
fn channel_line(marker: &str) -> u64 {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../driver-vm/src/channel.rs")).unwrap();
    source.lines().position(|line| line.contains(marker)).unwrap() as u64 + 1
}

#[test]
fn a_hung_or_crashed_driver_is_reported_with_its_source_line() {
    if !kvm_available("a_hung_or_crashed_driver_is_reported_with_its_source_line") {
        return;
    }
    let served = Served::start("where", ",hang_ms=200");
    let hang = channel_line("inject::HANG => loop");
    let page_fault = channel_line("(0x7f00_dead_0000 as *const u64).read_volatile()");
    for (fault, kind, lines) in [("hang", "hang", hang..=hang + 1), ("page-fault", "exited", page_fault..=page_fault)] {
        let injected = Command::new(reflector_bin())
            .args(["inject", "disk0", fault, "--control"])
            .arg(served.ctl())
            .output()
            .unwrap();
        assert!(injected.status.success(), "{}", String::from_utf8_lossy(&injected.stderr));
        // The next request commits the fault; the load completes after the
        // recovery (blk-load's own timeout bounds it).
        let load = Command::new(reflector_bin().with_file_name("blk-load"))
            .arg("--socket")
            .arg(served.dir.join("d.sock"))
            .args([
                "--job",
                "randwrite,randread",
                "--bs",
                "4k",
                "--qd",
                "1",
                "--ios",
                "20",
                "--verify",
                "--timeout",
                "30",
            ])
            .output()
            .unwrap();
        assert!(load.status.success(), "{fault}: {}\n{}", String::from_utf8_lossy(&load.stderr), served.log());
        let status = served.status().unwrap();
        assert!(status["last_fault"].as_str().unwrap().starts_with(kind), "{fault}: {status}");
        let site = status["last_fault_location"].as_str().unwrap().to_owned();
        let line = site
            .split("driver-vm/src/channel.rs:")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|line| line.parse::<u64>().ok());
        assert!(line.is_some_and(|line| lines.contains(&line)), "{fault}: lines {lines:?}: {status}\n{}", served.log());
        assert!(site.contains("[build "), "{fault}: the build is named: {status}");
    }
    let log = served.log();
    assert!(log.contains("where the hung driver VM was"), "{log}");
    assert!(log.contains(r#"\"outcome\":\"stopped\""#), "the stopped report is logged: {log}");
}

#[test]
fn exhausting_the_fault_budget_fails_requests_then_an_operator_recovers_the_device() {
    if !kvm_available("exhausting_the_fault_budget_fails_requests_then_an_operator_recovers_the_device") {
        return;
    }
    let served = Served::start("budget", ",fault_budget=3");
    let wait_for = |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = served.status() {
                if ok(&status) {
                    return status;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}\n{}", served.status(), served.log());
            std::thread::yield_now();
        }
    };
    for round in 1..=4u64 {
        let kill =
            Command::new(reflector_bin()).args(["kill", "disk0", "--control"]).arg(served.ctl()).output().unwrap();
        assert!(kill.status.success(), "round {round}: {}", String::from_utf8_lossy(&kill.stderr));
        let killed = kill_pid(&kill);
        if round < 4 {
            // Restarts back off (a driver VM killed right after it started
            // looks like a crash loop): wait for the new one to run.
            wait_for("a new driver VM", &|s| {
                s["faults"].as_u64() == Some(round)
                    && s["state"] == "running"
                    && s["driver_pid"].as_u64().unwrap_or(0) != 0
                    && s["driver_pid"] != killed
            });
        }
    }
    let failed = wait_for("the failed state", &|s| s["state"] == "failed");
    assert_eq!(failed["faults"], 4);
    // A failed device completes requests with an error, at once.
    let load = Command::new(reflector_bin().with_file_name("blk-load"))
        .arg("--socket")
        .arg(served.dir.join("d.sock"))
        .args(["--job", "randread", "--bs", "4k", "--qd", "1", "--ios", "5", "--json", "--timeout", "10"])
        .output()
        .unwrap();
    assert_eq!(load.status.code(), Some(1), "requests must fail, not hang: {}", String::from_utf8_lossy(&load.stderr));
    let recover =
        Command::new(reflector_bin()).args(["recover", "disk0", "--control"]).arg(served.ctl()).output().unwrap();
    assert!(recover.status.success());
    wait_for("the recovery", &|s| s["state"] == "running" && s["driver_pid"].as_u64().unwrap_or(0) != 0);
    let load = Command::new(reflector_bin().with_file_name("blk-load"))
        .arg("--socket")
        .arg(served.dir.join("d.sock"))
        .args([
            "--job",
            "randwrite",
            "--bs",
            "4k",
            "--qd",
            "2",
            "--ios",
            "200",
            "--verify",
            "--json",
            "--timeout",
            "10",
        ])
        .output()
        .unwrap();
    assert!(load.status.success(), "after recovery requests succeed: {}", String::from_utf8_lossy(&load.stderr));
}

fn kill_pid(output: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::Value::from(text.trim().strip_prefix("ok ").and_then(|pid| pid.parse::<u64>().ok()).unwrap_or(0))
}

#[test]
fn a_warm_spare_takes_over_and_is_replaced() {
    if !kvm_available("a_warm_spare_takes_over_and_is_replaced") {
        return;
    }
    a_spare_takes_over_and_is_replaced("on", "warm");
}

#[test]
fn a_standby_takes_over_and_is_replaced() {
    if !kvm_available("a_standby_takes_over_and_is_replaced") {
        return;
    }
    a_spare_takes_over_and_is_replaced("standby", "standby");
}

/// Under chaos (kills, panics, lies; every block verified), most restarts
/// let the device's spare (`spare=VALUE`) go, and each used spare is
/// replaced by a new one.
fn a_spare_takes_over_and_is_replaced(value: &str, started: &str) {
    let served = Served::start(&format!("spare-{value}"), &format!(",spare={value},fault_budget=100000"));
    // A warm spare starts with the device, a standby once it serves.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let first = loop {
        let status = served.status().unwrap();
        if status["spare_pid"].as_u64().unwrap_or(0) != 0 {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "a spare must be started: {status}\n{}", served.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let output = Command::new(reflector_bin())
        .args(["chaos", "--device", "disk0", "--faults", "20", "--seed", "5", "--kinds", "kill,panic,lie"])
        .args(["--min-gap-ms", "110", "--max-gap-ms", "150", "--quiet-runs", "1", "--control"])
        .arg(served.ctl())
        .arg("--socket")
        .arg(served.dir.join("d.sock"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "chaos failed:\n{report}\n{}", served.log());
    // The client's figures with no fault came first, from one load run (its
    // four jobs), and the failovers' are read against them.
    assert!(report.contains("with no fault (before the first): median "), "{report}");
    assert!(report.contains("ms (4 jobs)"), "{report}");
    assert!(report.contains("x the median with no fault"), "{report}");
    let log = served.log();
    let marker = format!("started={started}");
    let used = log.lines().filter(|l| l.contains("driver VM restarted") && l.contains(&marker)).count();
    assert!(used >= 15, "most restarts must use the spare ({used} of 20 did):\n{log}");
    let last = served.status().unwrap();
    assert_ne!(last["spare_pid"].as_u64().unwrap_or(0), 0, "a new spare must be started: {last}");
    assert_ne!(last["spare_pid"], first["spare_pid"]);
}

/// A load that cannot start (a socket that is not there) is given up after
/// a few tries, and the chaos fails: before, blk-load was started again at
/// once for as long as the chaos ran, hundreds of times a second, each
/// failure an error line (an adversarial pass over the CLIs found it).
#[test]
fn a_load_that_cannot_start_is_given_up_and_fails_the_chaos() {
    if !kvm_available("a_load_that_cannot_start_is_given_up_and_fails_the_chaos") {
        return;
    }
    let served = Served::start("no-socket", "");
    // A fault waiting for a request, as one the chaos injected before its
    // load gave up would be (the gap before the first fault is random, so
    // the chaos's own may come after the giving up).
    let inject =
        Command::new(reflector_bin()).args(["inject", "disk0", "panic", "--control"]).arg(served.ctl()).output();
    assert!(inject.unwrap().status.success());
    let output = Command::new(reflector_bin())
        .args(["chaos", "--device", "disk0", "--faults", "50", "--kinds", "panic", "--recovery-timeout-s", "60"])
        .arg("--control")
        .arg(served.ctl())
        .arg("--socket")
        .arg(served.dir.join("no-such.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the chaos passed with no load:\n{stderr}");
    let tries = stderr.lines().filter(|l| l.contains("the load could not run")).count();
    assert_eq!(tries, 3 + 1 + 1, "three tries, the giving up and the error:\n{stderr}");
    assert!(stderr.contains("again and again: stopping it"), "{stderr}");
    assert!(stderr.contains("no request would trigger the faults"), "{stderr}");
    // The panic waiting for a request that never came was withdrawn: the
    // next client's requests commit no fault. Before, its first request
    // crashed the driver VM, long after the chaos had ended.
    let before = served.status().unwrap();
    let (load, jobs) =
        blk_load(&served.dir.join("d.sock"), &["--job", "randwrite", "--bs", "4k", "--ios", "32", "--verify"]);
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let after = served.status().unwrap();
    assert_eq!(after["restarts"], before["restarts"], "a fault was left armed: {after}\n{}", served.log());
    assert_eq!(after["faults"], before["faults"], "a fault was left armed: {after}\n{}", served.log());
}
