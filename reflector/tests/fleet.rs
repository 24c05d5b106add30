//! A fleet: 100 block devices, each with its own jailed driver VM, served by
//! one reflector on this 2-core machine. Every device must pass verified
//! I/O, `status` must account for the fleet as a whole, and an idle device
//! must give its bounce memory back. (How fast and how small the fleet is
//! is `ci/bench-fleet.sh`'s to measure: no timing here.)
//!
//! Needs root, /dev/kvm and the workspace's binaries.
#![allow(clippy::unwrap_used)]

use std::process::Command;

mod common;

use common::{blk_load, kvm_available, serve_disks, Scratch};

const DEVICES: usize = 100;

fn status(ctl: &std::path::Path) -> serde_json::Value {
    let output =
        Command::new(env!("CARGO_BIN_EXE_reflector")).args(["status", "--json", "--control"]).arg(ctl).output();
    serde_json::from_slice(&output.unwrap().stdout).unwrap()
}

#[test]
fn a_hundred_driver_vms_each_serve_verified_io_and_the_fleet_is_accounted_for() {
    if !kvm_available("a_hundred_driver_vms_each_serve_verified_io_and_the_fleet_is_accounted_for") {
        return;
    }
    let scratch = Scratch::new("fleet");
    let names: Vec<String> = (0..DEVICES).map(|i| format!("f{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut reflector = serve_disks(&scratch, &names, true);
    let ctl = scratch.join("ctl");
    let all_attached = |_: &common::Reflector| {
        status(&ctl).as_array().is_some_and(|devices| devices.iter().all(|d| d["attached"] == true))
    };
    reflector.wait_for(all_attached, "every driver VM to attach");
    let pids: std::collections::HashSet<u64> =
        status(&ctl).as_array().unwrap().iter().map(|d| d["driver_pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), DEVICES, "each device has a driver VM of its own");
    for name in &names {
        let socket = scratch.join(&format!("{name}.sock"));
        let (output, jobs) =
            blk_load(&socket, &["--job", "randwrite", "--bs", "4k", "--qd", "4", "--ios", "64", "--verify"]);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(jobs.len(), 1, "{name}");
        assert_eq!((jobs[0]["errors"].as_u64(), jobs[0]["mismatches"].as_u64()), (Some(0), Some(0)), "{name}");
    }
    // Each driver VM's memory is sampled by its device's watch: its own
    // part (anonymous) is some of it, never all (its code is shared).
    let sampled = |_: &common::Reflector| {
        status(&ctl).as_array().is_some_and(|devices| devices.iter().all(|d| d["driver_rss_kib"].as_u64() > Some(0)))
    };
    reflector.wait_for(sampled, "every driver VM's memory sampled");
    for device in status(&ctl).as_array().unwrap() {
        let (rss, own) = (device["driver_rss_kib"].as_u64().unwrap(), device["driver_own_kib"].as_u64().unwrap());
        assert!(0 < own && own < rss, "own {own} KiB of {rss} KiB resident: {device}");
    }
    let text = Command::new(env!("CARGO_BIN_EXE_reflector")).args(["status", "--control"]).arg(&ctl).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("fleet: {DEVICES} devices, {DEVICES} attached")), "{text}");
    let devices = status(&ctl);
    let devices = devices.as_array().unwrap();
    assert!(devices.iter().all(|d| d["memory_cap_bytes"].as_u64().unwrap() > 0), "every device has a memory cap");
    assert!(devices.iter().all(|d| d["completed"].as_u64().unwrap() >= 64), "every device served its load");
    // Idle devices give their bounce slots' pages back (after the load they
    // held about 0.5 MiB each of the reflector's shared memory).
    let pid = reflector.child.id();
    let shared_kib = move || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("RssShmem:")).unwrap_or("RssShmem: 0 kB").to_owned();
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    reflector.wait_for(|_| shared_kib() < 8 * 1024, "the idle devices to release their bounce memory");
    let log = reflector.stop();
    assert!(!log.contains("panicked"), "{log}");
}
