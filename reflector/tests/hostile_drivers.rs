//! Hostile drivers, made with the blk driver's fault injection so that
//! each runs in a real driver VM:
//! - drivers that lie where the channel protocol cannot see it, about the
//!   data they read and about flushes: the reflector judges them with its
//!   own evidence (checksums of what it wrote, the device's flush count),
//!   replaces the driver VM and replays the request; the client gets the
//!   right data and a real flush, never the lie;
//! - drivers that take the CPU: one that never sleeps, one that rings the
//!   reflector's doorbell in a loop. Each is caught by the reflector's
//!   watch within a few seconds and replaced, while another disk served by
//!   the same reflector completes verified I/O. (The bound on what they
//!   take meanwhile is the driver VM's CPU quota; the ratio of the other
//!   disk's throughput to its quiet baseline is printed, not asserted:
//!   tests assert no timing.)
//!
//! Crashes, hangs, page faults and protocol lies are in `chaos.rs`; a
//! controller that runs nothing a dead driver queued in the unit tests of
//! `hw::sim_storage`; forged channel fields in those of `channel`.
//!
//! Needs /dev/kvm and the workspace's binaries (`vmm`, `blk-load`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;

use common::{kvm_available, serve_disks, sibling, Reflector, Scratch, START_TIMEOUT};

fn reflector_command(control: &Path, args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_reflector")).args(args).arg("--control").arg(control).output();
    output.unwrap()
}

fn status(control: &Path) -> serde_json::Value {
    let output = reflector_command(control, &["status", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    match value {
        serde_json::Value::Array(mut devices) => devices.remove(0),
        device => device,
    }
}

fn blk_load(socket: &Path, args: &[&str]) -> Output {
    Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(socket)
        .args(["--queue-size", "256", "--timeout", "20"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A reflector serving one disk `d0` with `extra` keys and a control socket.
fn serve(scratch: &Scratch, extra: &str) -> (Reflector, std::path::PathBuf, std::path::PathBuf) {
    let (socket, control) = (scratch.join("d0.sock"), scratch.join("ctl"));
    let args = vec![
        "--control".to_string(),
        control.display().to_string(),
        "--blk".to_string(),
        format!("socket={},image={},size=4M,name=d0{extra}", socket.display(), scratch.join("d0.img").display()),
    ];
    // The simulated controller says it is ready; the memory disk is ready
    // once its first driver VM serves the channel.
    let ready = if extra.contains("device=memory") { "serving channel" } else { "controller ready" };
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, ready);
    reflector.wait_for(|_| control.exists(), "the control socket");
    (reflector, socket, control)
}

#[test]
fn a_driver_returning_other_data_is_caught_by_checksums() {
    if !kvm_available("a_driver_returning_other_data_is_caught_by_checksums") {
        return;
    }
    let scratch = Scratch::new("lie-data");
    let (reflector, socket, control) = serve(&scratch, ",checksums=on");
    let injected = reflector_command(&control, &["inject", "d0", "corrupt-reads"]);
    assert!(injected.status.success(), "{}", String::from_utf8_lossy(&injected.stderr));
    // Every block is written, then read back and verified by the client.
    let load = blk_load(
        &socket,
        &["--job", "write,read", "--bs", "4k", "--qd", "4", "--size", "1M", "--ios", "256", "--verify"],
    );
    let stderr = String::from_utf8_lossy(&load.stderr);
    assert!(load.status.success(), "the client saw the lie: {stderr}");
    let status = status(&control);
    assert!(status["violations"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["last_fault"].as_str().unwrap().contains("is not what was written"), "{status}");
    assert_eq!(status["errors"], 0, "{status}");
    reflector.stop();
}

/// Under `dma=direct` the controller moves payloads straight between the
/// medium and the client's buffers: a driver that alters read data in its
/// bounce slots (the same lie as above, without checksums) alters nothing
/// the client sees. The same lie under bounce slots reaches the client
/// (which is why `checksums=on` exists), so the test can tell the modes
/// apart.
#[test]
fn a_driver_altering_its_slots_reaches_no_data_under_direct_dma() {
    if !kvm_available("a_driver_altering_its_slots_reaches_no_data_under_direct_dma") {
        return;
    }
    let verified_under_lie = |tag: &str, extra: &str| {
        let scratch = Scratch::new(tag);
        let (reflector, socket, control) = serve(&scratch, extra);
        let injected = reflector_command(&control, &["inject", "d0", "corrupt-reads"]);
        assert!(injected.status.success(), "{}", String::from_utf8_lossy(&injected.stderr));
        let load = blk_load(
            &socket,
            &["--job", "write,read", "--bs", "4k", "--qd", "4", "--size", "1M", "--ios", "256", "--verify"],
        );
        let status = status(&control);
        reflector.stop();
        (load, status)
    };
    let (direct, status) = verified_under_lie("lie-direct", ",dma=direct");
    assert_eq!(status["dma"], "direct", "{status}");
    assert!(direct.status.success(), "the lie reached the client: {}", String::from_utf8_lossy(&direct.stderr));
    assert_eq!((status["errors"].as_u64(), status["violations"].as_u64()), (Some(0), Some(0)), "{status}");
    let (bounce, status) = verified_under_lie("lie-bounce", "");
    assert_eq!(status["dma"], "bounce", "{status}");
    let stderr = String::from_utf8_lossy(&bounce.stderr);
    assert!(!bounce.status.success() && stderr.contains("mismatch"), "bounce slots without checksums: {stderr}");
}

#[test]
fn a_driver_acknowledging_a_flush_it_did_not_do_is_caught() {
    if !kvm_available("a_driver_acknowledging_a_flush_it_did_not_do_is_caught") {
        return;
    }
    let scratch = Scratch::new("lie-flush");
    let (reflector, socket, control) = serve(&scratch, "");
    let injected = reflector_command(&control, &["inject", "d0", "skip-flushes"]);
    assert!(injected.status.success(), "{}", String::from_utf8_lossy(&injected.stderr));
    let load =
        blk_load(&socket, &["--job", "write", "--bs", "4k", "--qd", "1", "--size", "64k", "--ios", "16", "--flush"]);
    let stderr = String::from_utf8_lossy(&load.stderr);
    assert!(load.status.success(), "{stderr}");
    assert!(stderr.contains("flush OK") || String::from_utf8_lossy(&load.stdout).contains("flush OK"), "{stderr}");
    let status = status(&control);
    assert!(status["violations"].as_u64().unwrap() >= 1, "{status}");
    assert!(
        status["last_fault"].as_str().unwrap().contains("flush acknowledged before the device flushed"),
        "{status}"
    );
    reflector.stop();
}

/// A driver that acknowledges writes without giving them to the device:
/// before, the writes were lost and the client's verified reads found the
/// old data (an adversarial review found it). The device's own record of
/// the writes it did catches each such answer; the write is replayed to
/// the next driver VM and every block verifies.
#[test]
fn a_driver_acknowledging_a_write_it_did_not_do_is_caught() {
    if !kvm_available("a_driver_acknowledging_a_write_it_did_not_do_is_caught") {
        return;
    }
    lost_writes_are_caught("lie-write", "", "write acknowledged before the device wrote it");
}

/// The same lie from the `vmdisk` driver, whose device is the image mapped
/// into it (`device=memory`): before, its word was taken. Each write it
/// acknowledges is read back from the image.
#[test]
fn a_memory_disk_driver_acknowledging_a_write_it_did_not_do_is_caught() {
    if !kvm_available("a_memory_disk_driver_acknowledging_a_write_it_did_not_do_is_caught") {
        return;
    }
    lost_writes_are_caught("lie-write-memory", ",device=memory", "the medium does not hold its data");
}

/// A driver that answers its writes before it ever enables its controller,
/// as a hostile image would at every start (`lie-before-enable`): the
/// simulated controller's record of its writes took a driver that had not
/// enabled it for one that keeps no data, at its word, and each write was
/// acknowledged and lost (an adversarial review found it). Now only a
/// driver configured as keeping no data (`null`) is taken at its word:
/// each lie is a violation, and no write is acknowledged that was not done.
#[test]
fn a_driver_answering_writes_before_it_enables_its_controller_gets_none_acknowledged() {
    if !kvm_available("a_driver_answering_writes_before_it_enables_its_controller_gets_none_acknowledged") {
        return;
    }
    let scratch = Scratch::new("lie-before-enable");
    let (reflector, socket, control) = serve(&scratch, ",driver_args=lie-before-enable");
    let load =
        blk_load(&socket, &["--job", "randwrite", "--bs", "4k", "--qd", "1", "--size", "64k", "--ios", "4", "--json"]);
    let stdout = String::from_utf8_lossy(&load.stdout);
    let job: serde_json::Value = stdout
        .lines()
        .find(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap())
        .unwrap_or_else(|| panic!("no job reported: {}", String::from_utf8_lossy(&load.stderr)));
    assert_eq!(job["errors"], 4, "a write the device never did was acknowledged: {job}");
    assert!(status(&control)["violations"].as_u64().unwrap() >= 1);
    let log = reflector.stop();
    assert!(log.contains("write acknowledged before the device wrote it"), "the lie was not caught: {log}");
}

/// Serves d0 with `extra` options, makes its driver acknowledge writes it
/// does not do (`skip-writes`), and checks that a verified load loses
/// nothing and that the lie was caught as `caught_as` says.
fn lost_writes_are_caught(tag: &str, extra: &str, caught_as: &str) {
    let scratch = Scratch::new(tag);
    let (reflector, socket, control) = serve(&scratch, extra);
    let injected = reflector_command(&control, &["inject", "d0", "skip-writes"]);
    assert!(injected.status.success(), "{}", String::from_utf8_lossy(&injected.stderr));
    let load = blk_load(
        &socket,
        &["--job", "randwrite,randread", "--bs", "4k", "--qd", "1", "--size", "64k", "--ios", "32", "--verify"],
    );
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    let status = status(&control);
    assert!(status["violations"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["last_fault"].as_str().unwrap().contains(caught_as), "{status}");
    reflector.stop();
}

/// IOPS of a verified random-write/read job on `socket` (must pass).
fn verified_iops(socket: &Path, seconds: &str) -> f64 {
    let output = blk_load(
        socket,
        &[
            "--job",
            "randwrite,randread",
            "--bs",
            "4k",
            "--qd",
            "4",
            "--seconds",
            seconds,
            "--verify",
            "--size",
            "4M",
            "--json",
        ],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let jobs: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for job in &jobs {
        assert_eq!(job["mismatches"], 0, "{job}");
        assert_eq!(job["errors"], 0, "{job}");
    }
    jobs.iter().filter_map(|j| j["iops"].as_f64()).sum::<f64>() / jobs.len().max(1) as f64
}

/// A driver VM of d0 that takes the CPU (`fault`) is caught (the fault
/// says `caught_as`) and replaced while d1, on the same reflector, keeps
/// serving verified I/O.
fn a_cpu_hog_is_caught(tag: &str, fault: &str, caught_as: &str) {
    let scratch = Scratch::new(tag);
    let control = scratch.join("ctl");
    let reflector = serve_disks(&scratch, &["d0", "d1"], true);
    let (d0, d1) = (scratch.join("d0.sock"), scratch.join("d1.sock"));
    let baseline = verified_iops(&d1, "2");
    let injected = reflector_command(&control, &["inject", "d0", fault]);
    assert!(injected.status.success(), "{}", String::from_utf8_lossy(&injected.stderr));
    // One request makes the driver commit the fault; then it has nothing to do.
    let trigger = blk_load(&d0, &["--job", "write", "--bs", "4k", "--qd", "1", "--ios", "1", "--size", "64k"]);
    assert!(trigger.status.success(), "{}", String::from_utf8_lossy(&trigger.stderr));
    let during = verified_iops(&d1, "2");
    let device = |control: &Path, name: &str| {
        let output = reflector_command(control, &["status", "--json"]);
        let all: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
        let list = all.as_array().cloned().unwrap_or_else(|| vec![all]);
        list.into_iter().find(|d| d["device"] == name).unwrap()
    };
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    let caught = |d: &serde_json::Value| d["abuses"].as_u64().unwrap() > 0 && d["restarts"].as_u64().unwrap() > 0;
    while !caught(&device(&control, "d0")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the {fault} driver was never caught: {}",
            device(&control, "d0")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let d0_status = device(&control, "d0");
    eprintln!(
        "{fault}: d1 {during:.0} IOPS while d0's driver misbehaved, {baseline:.0} before ({:.2}x); d0: {}",
        during / baseline.max(1.0),
        d0_status["last_fault"]
    );
    assert!(d0_status["restarts"].as_u64().unwrap() >= 1, "{d0_status}");
    assert!(d0_status["last_fault"].as_str().unwrap_or_default().contains(caught_as), "{d0_status}");
    let d1_status = device(&control, "d1");
    assert_eq!(d1_status["faults"], 0, "d1 had a fault while d0's driver misbehaved: {d1_status}");
    // The replacement is well behaved: d0 serves verified I/O again.
    verified_iops(&d0, "1");
    reflector.stop();
}

#[test]
fn a_driver_that_never_sleeps_is_caught_and_replaced() {
    if kvm_available("a_driver_that_never_sleeps_is_caught_and_replaced") {
        a_cpu_hog_is_caught("hog-spin", "spin", "with no request to serve");
    }
}

#[test]
fn a_driver_flooding_the_doorbell_is_caught_and_replaced() {
    if kvm_available("a_driver_flooding_the_doorbell_is_caught_and_replaced") {
        a_cpu_hog_is_caught("hog-flood", "flood", "rang the reflector");
    }
}

/// A driver that keeps its device busy with work no request asked for,
/// sleeping under its own CPU quota meanwhile: the simulated controller
/// copies on the reflector's thread, outside that quota (before, for as
/// long as the driver liked, a host core). The device's work is held
/// against the requests the driver was given.
#[test]
fn a_driver_giving_its_device_work_nobody_asked_for_is_caught_and_replaced() {
    if kvm_available("a_driver_giving_its_device_work_nobody_asked_for_is_caught_and_replaced") {
        a_cpu_hog_is_caught("hog-junk", "junk-io", "gave its device work no request asked for");
    }
}

#[test]
fn checksums_never_accuse_an_honest_driver() {
    if !kvm_available("checksums_never_accuse_an_honest_driver") {
        return;
    }
    let scratch = Scratch::new("honest-sums");
    let (reflector, socket, control) = serve(&scratch, ",checksums=on");
    // Overlapping writes, then reads, at depth 16 over 1 MiB, while the driver
    // VM is killed: replays, reordering and overlaps must not look like lies.
    let load = Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(&socket)
        .args(["--queue-size", "1024", "--timeout", "20", "--job", "randwrite,randread", "--bs", "4k,64k"])
        .args(["--qd", "16", "--size", "1M", "--seconds", "2", "--verify"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut kills = 0;
    while kills < 5 {
        let restarts = status(&control)["restarts"].as_u64().unwrap();
        assert!(reflector_command(&control, &["kill", "d0"]).status.success());
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while status(&control)["restarts"].as_u64().unwrap() == restarts {
            assert!(std::time::Instant::now() < deadline, "no restart after a kill");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        kills += 1;
    }
    let output = load.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let status = status(&control);
    assert_eq!(status["violations"], 0, "an honest driver was accused: {status}");
    assert_eq!(status["errors"], 0, "{status}");
    reflector.stop();
}
