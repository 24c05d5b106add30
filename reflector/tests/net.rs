//! The reflector serving two net devices on one switch through real driver
//! VMs, driven by the project's vhost-user-net frontend (`net-load`), which
//! checks every frame (sequence, pattern): none may arrive corrupted or
//! twice, also while driver VMs are killed or commit faults.
//!
//! Needs /dev/kvm and the workspace's binaries (`vmm`, `net-load`) built
//! next to the reflector (`cargo build --release`; `ci/test.sh` does it).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{kvm_available, qemu_available, qemu_pids, sibling, Reflector, Scratch, START_TIMEOUT};

/// Two net devices on switch `lan`, with a control socket.
struct Pair {
    _scratch: Scratch,
    reflector: Reflector,
    a: PathBuf,
    b: PathBuf,
    control: PathBuf,
}

impl Pair {
    fn start(tag: &str, extra: &str) -> Pair {
        Pair::start_with(tag, extra, &[])
    }

    /// Starts it with more `reflector serve` arguments.
    fn start_with(tag: &str, extra: &str, more: &[String]) -> Pair {
        let scratch = Scratch::new(tag);
        let (a, b, control) = (scratch.join("a.sock"), scratch.join("b.sock"), scratch.join("ctl"));
        let args = vec![
            "--control".to_string(),
            control.display().to_string(),
            "--net".into(),
            format!("socket={},mac=52:54:00:00:00:0a,switch=lan,name=neta{extra}", a.display()),
            "--net".into(),
            format!("socket={},mac=52:54:00:00:00:0b,switch=lan,name=netb{extra}", b.display()),
        ]
        .into_iter()
        .chain(more.iter().cloned())
        .collect::<Vec<_>>();
        let reflector = Reflector::start_with(&args, scratch.join("log"), &b, "card ready");
        let mut pair = Pair { _scratch: scratch, reflector, a, b, control };
        pair.reflector.wait_for(|r| r.log_text().matches("card ready").count() >= 2, "both driver VMs");
        // Claimed after the devices start (and their cards are ready).
        let control = pair.control.clone();
        pair.reflector.wait_for(|_| control.exists(), "the control socket");
        pair
    }

    fn status(&self, device: &str) -> serde_json::Value {
        let output = Command::new(env!("CARGO_BIN_EXE_reflector"))
            .args(["status", "--json", "--control"])
            .arg(&self.control)
            .output()
            .unwrap();
        assert!(output.status.success(), "status: {}", String::from_utf8_lossy(&output.stderr));
        let all: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        all.as_array().unwrap().iter().find(|d| d["device"] == device).cloned().unwrap()
    }

    fn control(&self, words: &[&str]) {
        let output = Command::new(env!("CARGO_BIN_EXE_reflector"))
            .args(words)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{words:?}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.reflector.log_text()
        );
    }

    /// Waits until `device`'s counter `field` reaches `at_least`.
    fn wait_counter(&self, device: &str, field: &str, at_least: u64) {
        let deadline = Instant::now() + START_TIMEOUT;
        while self.status(device)[field].as_u64().unwrap_or(0) < at_least {
            assert!(
                Instant::now() < deadline,
                "{device}: {field} never reached {at_least}:\n{}",
                self.reflector.log_text()
            );
            std::thread::yield_now();
        }
    }
}

fn net_load(tx: &Path, rx: &Path, args: &[&str]) -> std::process::Child {
    Command::new(sibling("net-load"))
        .arg("--tx")
        .arg(tx)
        .arg("--rx")
        .arg(rx)
        .args(["--json", "--quiet"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a net-load to finish, killing it (by its pid) if it takes longer than `limit`.
fn finish_within(child: Child, limit: Duration) -> Output {
    let pid = child.id() as i32;
    let (done, output) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match output.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("net-load did not finish within {limit:?}");
        }
    }
}

/// The JSON result lines of a finished net-load.
fn results(output: &Output) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

fn assert_clean(output: &Output) -> Vec<serde_json::Value> {
    let runs = results(output);
    assert!(
        output.status.success() && !runs.is_empty(),
        "net-load failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for run in &runs {
        assert!(run["received"].as_u64().unwrap() > 0, "nothing arrived: {run}");
        assert_eq!(run["corrupted"], 0, "corrupted frames: {run}");
        assert_eq!(run["duplicates"], 0, "duplicated frames: {run}");
    }
    runs
}

#[test]
fn frames_cross_the_switch_both_ways_and_the_counters_add_up() {
    if !kvm_available("frames_cross_the_switch_both_ways_and_the_counters_add_up") {
        return;
    }
    frames_cross("net-cross", "");
}

#[test]
fn frames_cross_qemus_e1000e_cards_both_ways_and_the_counters_add_up() {
    let test = "frames_cross_qemus_e1000e_cards_both_ways_and_the_counters_add_up";
    if !kvm_available(test) || !qemu_available(test) {
        return;
    }
    frames_cross("net-e1000e", ",device=e1000e");
}

/// Frames of every size both ways, then a ping-pong, through two cards
/// of kind `extra` on one switch; the devices' counters match.
fn frames_cross(tag: &str, extra: &str) {
    let pair = Pair::start(tag, extra);
    let output =
        net_load(&pair.a, &pair.b, &["--size", "64,1514", "--seconds", "1", "--bidir"]).wait_with_output().unwrap();
    let runs = assert_clean(&output);
    let received: u64 = runs.iter().map(|r| r["received"].as_u64().unwrap()).sum();
    let pingpong = net_load(&pair.b, &pair.a, &["--pingpong", "--count", "200"]).wait_with_output().unwrap();
    let pingpong = assert_clean(&pingpong);
    assert_eq!(pingpong[0]["received"], 200, "{}", pingpong[0]);
    let (a, b) = (pair.status("neta"), pair.status("netb"));
    assert_eq!((a["kind"].as_str(), a["state"].as_str()), (Some("net"), Some("running")));
    assert!(a["tx_frames"].as_u64().unwrap() > 0 && b["tx_frames"].as_u64().unwrap() > 0, "{a} {b}");
    let delivered = a["rx_frames"].as_u64().unwrap() + b["rx_frames"].as_u64().unwrap();
    assert!(delivered >= received, "the devices delivered {delivered} frames, net-load saw {received}");
    assert_eq!((a["faults"].as_u64(), a["malformed"].as_u64()), (Some(0), Some(0)), "{a}");
}

#[test]
fn killed_and_faulty_driver_vms_never_duplicate_or_corrupt_a_frame() {
    if !kvm_available("killed_and_faulty_driver_vms_never_duplicate_or_corrupt_a_frame") {
        return;
    }
    kills_and_faults("net-kill", ",hang_ms=200");
}

#[test]
fn killed_and_faulty_e1000e_driver_vms_never_duplicate_or_corrupt_a_frame() {
    let test = "killed_and_faulty_e1000e_driver_vms_never_duplicate_or_corrupt_a_frame";
    if !kvm_available(test) || !qemu_available(test) {
        return;
    }
    kills_and_faults("net-e1000e-kill", ",hang_ms=200,device=e1000e");
}

#[test]
fn a_killed_e1000e_qemu_is_started_again_on_the_same_switch_port() {
    let test = "a_killed_e1000e_qemu_is_started_again_on_the_same_switch_port";
    if !kvm_available(test) || !qemu_available(test) {
        return;
    }
    let mut pair = Pair::start("net-e1000e-qemu-death", ",hang_ms=200,device=e1000e");
    let load = net_load(&pair.a, &pair.b, &["--size", "256", "--seconds", "6", "--bidir"]);
    pair.wait_counter("neta", "tx_frames", 1);
    for round in 1..=2 {
        let pids = qemu_pids("mac=52:54:00:00:00:0a", Some(pair.reflector.child.id()));
        assert_eq!(pids.len(), 1, "one QEMU per card");
        // SAFETY: kill(2) on the reflector's QEMU child.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
        // Each card's first QEMU said it once, then each one started again.
        pair.reflector.wait_for(
            |r| r.log_text().matches("QEMU device model ready").count() >= 2 + round,
            "the card's QEMU started again",
        );
    }
    assert_clean(&finish_within(load, Duration::from_secs(60)));
    // The new card is plugged into the same port: frames cross both ways.
    let after = finish_within(net_load(&pair.a, &pair.b, &["--pingpong", "--count", "100"]), Duration::from_secs(60));
    assert_eq!(assert_clean(&after)[0]["received"], 100);
    assert_eq!(
        qemu_pids("mac=52:54:00:00:00:0a", Some(pair.reflector.child.id())).len(),
        1,
        "the card's only QEMU: {}",
        pair.reflector.log_text()
    );
    assert_eq!(pair.status("neta")["state"].as_str(), Some("running"));
}

/// Kills and injected faults of both cards' driver VMs (kind `extra`)
/// under bidirectional load: no frame corrupted or duplicated, every fault
/// replaced, traffic as before afterwards.
fn kills_and_faults(tag: &str, extra: &str) {
    let pair = Pair::start(tag, extra);
    let load = net_load(&pair.a, &pair.b, &["--size", "256", "--seconds", "8", "--bidir"]);
    pair.wait_counter("neta", "tx_frames", 1);
    let mut restarts = 0;
    for (device, action) in [
        ("neta", &["kill", "neta"][..]),
        ("netb", &["kill", "netb"][..]),
        ("neta", &["inject", "neta", "panic"][..]),
        ("netb", &["inject", "netb", "lie"][..]),
        ("neta", &["inject", "neta", "hang"][..]),
        ("netb", &["inject", "netb", "page-fault"][..]),
        ("neta", &["kill", "neta"][..]),
        ("netb", &["kill", "netb"][..]),
    ] {
        let before = pair.status(device)["restarts"].as_u64().unwrap();
        pair.control(action);
        pair.wait_counter(device, "restarts", before + 1);
        restarts += 1;
    }
    let output = load.wait_with_output().unwrap();
    assert_clean(&output);
    let (a, b) = (pair.status("neta"), pair.status("netb"));
    let total = a["restarts"].as_u64().unwrap() + b["restarts"].as_u64().unwrap();
    assert!(total >= restarts, "{total} restarts for {restarts} faults");
    assert!(b["violations"].as_u64().unwrap() >= 1, "the lie was not caught: {b}");
    assert_eq!((a["state"].as_str(), b["state"].as_str()), (Some("running"), Some("running")));
    // Each failover's reset left a QEMU device model usable: none had to
    // be started again (an e1000e's interrupt line left high by its dead
    // driver is lowered by the quiesce).
    let log = pair.reflector.log_text();
    assert!(!log.contains("stayed asserted through its reset"), "a device model was started again:\n{log}");
    // After the faults, traffic flows as before.
    let after = net_load(&pair.a, &pair.b, &["--pingpong", "--count", "100"]).wait_with_output().unwrap();
    assert_eq!(assert_clean(&after)[0]["received"], 100);
    // A fault the net driver does not implement is refused, not "ok" with
    // nothing happening.
    let refused = Command::new(env!("CARGO_BIN_EXE_reflector"))
        .args(["inject", "neta", "corrupt-reads", "--control"])
        .arg(&pair.control)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("cannot commit `corrupt-reads`"), "{stderr}");
}

#[test]
fn malformed_client_chains_are_dropped_counted_and_harmless() {
    if !kvm_available("malformed_client_chains_are_dropped_counted_and_harmless") {
        return;
    }
    let pair = Pair::start("net-malformed", "");
    let output = finish_within(net_load(&pair.a, &pair.b, &["--malformed"]), Duration::from_secs(300));
    let report = results(&output).into_iter().find(|r| r["mode"] == "malformed");
    let explain = || {
        format!(
            "net-load --malformed ({}):\n{}\n{}\nreflector log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            pair.reflector.log_text()
        )
    };
    let Some(report) = report else { panic!("no JSON report: {}", explain()) };
    let failed: Vec<String> = report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["result"] == "fail")
        .map(|c| format!("{}: {}", c["name"], c["detail"]))
        .collect();
    assert!(
        output.status.success() && report["passed"] == true,
        "the probe failed; failing cases:\n{}\n{}",
        failed.join("\n"),
        explain()
    );
    // Every case was sent (the reflector offers INDIRECT_DESC: nothing is skipped) and returned.
    let cases = report["cases"].as_array().unwrap();
    for case in cases {
        assert_eq!((case["sent"].as_bool(), case["returned"].as_bool()), (Some(true), Some(true)), "{case}");
        assert_eq!(case["used_len"], 0, "{case}");
    }
    let sent_on = |queue: &str| cases.iter().filter(|c| c["queue"] == queue && c["sent"] == true).count() as u64;
    let (tx_cases, rx_cases) = (sent_on("tx"), sent_on("rx"));
    assert_eq!((report["tx_cases"].as_u64(), report["rx_cases"].as_u64()), (Some(tx_cases), Some(rx_cases)));
    assert!(tx_cases >= 10 && rx_cases >= 2, "too few cases ran: {tx_cases} TX, {rx_cases} RX");
    assert_eq!(report["good_frames_received"], report["good_frames_sent"], "{report}");
    assert_eq!(report["leaked_frames"], 0, "{report}");
    // Each malformed chain was refused and counted by the device it was sent to, and none
    // reached a driver VM (nothing faulted, nothing restarted).
    let (a, b) = (pair.status("neta"), pair.status("netb"));
    assert!(a["malformed"].as_u64().unwrap() >= tx_cases, "TX device counted fewer than {tx_cases} malformed: {a}");
    assert!(b["malformed"].as_u64().unwrap() >= rx_cases, "RX device counted fewer than {rx_cases} malformed: {b}");
    for device in [&a, &b] {
        assert_eq!((device["faults"].as_u64(), device["restarts"].as_u64()), (Some(0), Some(0)), "{device}");
        assert_eq!(device["state"].as_str(), Some("running"), "{device}");
    }
    // And the devices work as before, both ways.
    let after = finish_within(net_load(&pair.a, &pair.b, &["--pingpong", "--count", "100"]), Duration::from_secs(120));
    assert_eq!(assert_clean(&after)[0]["received"], 100);
    let back = finish_within(net_load(&pair.b, &pair.a, &["--pingpong", "--count", "100"]), Duration::from_secs(120));
    assert_eq!(assert_clean(&back)[0]["received"], 100);
    let (a, b) = (pair.status("neta"), pair.status("netb"));
    assert_eq!((a["faults"].as_u64(), b["faults"].as_u64()), (Some(0), Some(0)), "{a} {b}");
}

/// Whether TAP devices can be made here (root and /dev/net/tun); with CI set
/// they must.
fn tap_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let available = root && Path::new("/dev/net/tun").exists() && Command::new("ip").arg("-V").output().is_ok();
    if !available {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: TAP devices need root, /dev/net/tun and iproute2, and CI is set"
        );
        eprintln!("\n*** SKIPPING {test}: TAP devices need root, /dev/net/tun and iproute2. ***\n");
    }
    available
}

fn tap_counter(name: &str, counter: &str) -> u64 {
    let path = format!("/sys/class/net/{name}/statistics/{counter}");
    std::fs::read_to_string(&path).unwrap_or_default().trim().parse().unwrap_or(0)
}

#[test]
fn a_tap_port_bridges_the_switch_to_the_host() {
    let test = "a_tap_port_bridges_the_switch_to_the_host";
    if !kvm_available(test) || !tap_available(test) {
        return;
    }
    let id = std::process::id();
    let tap = format!("drvt{}", id % 100_000);
    let subnet = format!("10.213.{}", id % 250 + 1);
    let pair = Pair::start_with("net-tap", "", &["--tap".into(), format!("name={tap},switch=lan")]);
    pair.reflector.log_text().contains("TAP device bridged").then_some(()).expect("the TAP was not bridged");
    for args in [vec!["addr", "add", &format!("{subnet}.1/24"), "dev", &tap], vec!["link", "set", &tap, "up"]] {
        let status = Command::new("ip").args(&args).status().unwrap();
        assert!(status.success(), "ip {args:?} failed");
    }
    // Broadcast: the devices' addresses are pinned to their ports (port
    // security), so frames between them never flood; broadcasts reach the host.
    let load =
        net_load(&pair.a, &pair.b, &["--size", "128", "--seconds", "4", "--bidir", "--dst-mac", "ff:ff:ff:ff:ff:ff"]);
    // The host's ARP requests for a peer on the TAP's subnet cross the switch to both devices.
    // ARP retries about once a second for as long as pings are queued (-w 5).
    let _ = Command::new("ping").args(["-c", "12", "-i", "0.3", "-w", "5", &format!("{subnet}.2")]).output();
    let output = load.wait_with_output().unwrap();
    let runs = assert_clean(&output);
    let foreign: u64 = runs.iter().map(|r| r["foreign"].as_u64().unwrap_or(0)).sum();
    assert!(foreign > 0, "no host frame reached the devices through the TAP: {runs:?}");
    assert!(tap_counter(&tap, "rx_packets") > 0, "no switch frame reached the host through the TAP");
    assert!(tap_counter(&tap, "tx_packets") > 0, "the host sent nothing on the TAP");
}
