//! No request waits forever (DESIGN.md, invariant 5), tried with the two
//! drivers a user found hanging clients: one that dies on every start, and
//! one with a bug that one request triggers. Each gives the client an error
//! in bounded time; the second only for that request, while the others
//! succeed.
//!
//! Needs /dev/kvm and the workspace's binaries (`vmm`, `blk-load`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::{kvm_available, Reflector, Scratch};

/// Runs blk-load, bounded.
fn blk_load(socket: &Path, args: &[&str]) -> (Output, Vec<serde_json::Value>) {
    common::blk_load(socket, &[&["--timeout", "30"], args].concat())
}

fn status(control: &Path) -> serde_json::Value {
    let output =
        Command::new(env!("CARGO_BIN_EXE_reflector")).args(["status", "--json", "--control"]).arg(control).output();
    let text = String::from_utf8(output.unwrap().stdout).unwrap();
    serde_json::from_str::<serde_json::Value>(text.trim()).unwrap()[0].clone()
}

fn serve(scratch: &Scratch, extra: &str, ready: &str) -> Reflector {
    let socket = scratch.join("d0.sock");
    let args = vec![
        "--control".to_string(),
        scratch.join("ctl").display().to_string(),
        "--blk".to_string(),
        format!("socket={},image={},size=4M,name=d0{extra}", socket.display(), scratch.join("d0.img").display()),
    ];
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, ready);
    reflector.wait_for(|_| scratch.join("ctl").exists(), "the control socket");
    reflector
}

#[test]
fn a_driver_that_never_comes_up_fails_every_request_within_seconds() {
    if !kvm_available("a_driver_that_never_comes_up_fails_every_request_within_seconds") {
        return;
    }
    let scratch = Scratch::new("never-up");
    let reflector = serve(&scratch, ",driver=faulty", "serving vhost-user-blk");
    let started = Instant::now();
    let (output, jobs) = blk_load(&scratch.join("d0.sock"), &["--job", "randread", "--qd", "1", "--ios", "4"]);
    let waited = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Exit status 1: requests completed with errors (2 would be a timeout).
    assert_eq!(output.status.code(), Some(1), "blk-load: {stderr}\n{}", reflector.log_text());
    assert_eq!(jobs[0]["errors"], 4, "every request fails: {jobs:?}");
    assert!(waited < Duration::from_secs(20), "the client waited {waited:?}");
    let device = status(&scratch.join("ctl"));
    assert_eq!(device["state"], "failed", "{device}");
    let log = reflector.stop();
    assert!(log.contains("too many driver VM faults"), "{log}");
}

#[test]
fn a_request_that_kills_every_driver_vm_fails_alone_and_the_others_succeed() {
    if !kvm_available("a_request_that_kills_every_driver_vm_fails_alone_and_the_others_succeed") {
        return;
    }
    let scratch = Scratch::new("poison");
    // Sector 64 is in the 4 KiB block at 32 KiB: one request of a
    // sequential pass over the disk covers it.
    let reflector = serve(&scratch, ",driver_args=panic-on-sector=64", "controller ready");
    let socket = scratch.join("d0.sock");
    for pass in 0..2 {
        let (output, jobs) = blk_load(&socket, &["--job", "read", "--bs", "4k", "--qd", "8", "--ios", "1024"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "pass {pass}: {stderr}\n{}", reflector.log_text());
        assert_eq!(jobs[0]["errors"], 1, "pass {pass}: only the poison request fails: {jobs:?}");
        assert_eq!(jobs[0]["ios"], 1024, "pass {pass}: {jobs:?}");
    }
    let device = status(&scratch.join("ctl"));
    assert_eq!(device["poisoned"], 2, "{device}");
    assert_eq!(device["state"], "running", "{device}");
    let last = device["last_poison"].as_str().unwrap();
    assert!(last.contains("Read of 4096 bytes at sector 64"), "{last}");
    // Each poison request took three deaths: the first with other requests
    // in the driver VM, the next two alone.
    assert_eq!(device["faults"], 6, "{device}");
    let log = reflector.stop();
    assert!(log.contains("poison request"), "{log}");
}
