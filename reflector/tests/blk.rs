//! The reflector serving a disk through a real driver VM, driven by the
//! project's vhost-user frontend (`blk-load`) with data verification.
//!
//! Needs /dev/kvm and the workspace's binaries (`vmm`, `blk-load`) built
//! next to the reflector (`cargo build --release`; `ci/test.sh` does it).
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::{assert_clean_load, blk_arg, kvm_available, spawn_blk_load, Reflector, Scratch};

/// Runs blk-load with this file's queue size and timeout.
fn blk_load(socket: &Path, args: &[&str]) -> (Output, Vec<serde_json::Value>) {
    common::blk_load(socket, &[&["--queue-size", "256", "--timeout", "20"], args].concat())
}

/// SIGKILLs the driver VM `kills` times, each after its replacement
/// started, while blk-load writes and reads back blocks of `sizes` at QD8;
/// the load must end without an error or a mismatch.
fn kill_under_verified_load(reflector: &mut Reflector, socket: &Path, sizes: &str, kills: usize) {
    let load = spawn_blk_load(
        socket,
        &["--queue-size", "1024", "--timeout", "20", "--job", "randwrite,randread", "--bs", sizes, "--qd", "8"]
            .into_iter()
            .chain(["--ios", "200000", "--size", "8M", "--verify"])
            .collect::<Vec<_>>(),
    );
    for killed in 0..kills {
        // SAFETY: kill(2) on the current driver VM, our reflector's child.
        unsafe { libc::kill(reflector.driver_pid(), libc::SIGKILL) };
        reflector.wait_for(|r| r.log_text().matches("driver VM restarted").count() > killed, "a replacement driver VM");
    }
    assert_clean_load(load);
}

#[test]
fn verified_reads_and_writes_through_a_driver_vm() {
    if !kvm_available("verified_reads_and_writes_through_a_driver_vm") {
        return;
    }
    let scratch = Scratch::new("verify");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let reflector = Reflector::start(&blk_arg(&socket, &image, ",size=32M,name=disk0"), scratch.join("log"), &socket);
    let (output, jobs) = blk_load(
        &socket,
        &[
            "--job",
            "randwrite,randread,write,read",
            "--bs",
            "4k,128k",
            "--qd",
            "1,4",
            "--ios",
            "300",
            "--verify",
            "--size",
            "16M",
            "--get-id",
            "--flush",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "blk-load failed: {stderr}");
    assert_eq!(jobs.len(), 16, "{stderr}");
    for job in &jobs {
        assert_eq!(job["errors"], 0, "{job}");
        assert_eq!(job["mismatches"], 0, "{job}");
        assert!(job["ios"].as_u64().unwrap() >= 300, "{job}");
    }
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("drvm-disk0"), "GET_ID must return the device id: {all}");
    assert!(all.contains("flush OK"), "{all}");
    reflector.stop();
    let written = std::fs::read(&image).unwrap();
    assert_eq!(written.len(), 32 << 20, "the image was created with the requested size");
    assert!(written[..16 << 20].iter().any(|b| *b != 0), "the writes must have reached the image");
    assert!(written[16 << 20..].iter().all(|b| *b == 0), "nothing may be written outside the region used");
}

#[test]
fn a_client_can_reconnect_and_a_read_only_disk_refuses_writes() {
    if !kvm_available("a_client_can_reconnect_and_a_read_only_disk_refuses_writes") {
        return;
    }
    let scratch = Scratch::new("reconnect");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    std::fs::write(&image, vec![0x5au8; 4 << 20]).unwrap();
    let reflector = Reflector::start(&blk_arg(&socket, &image, ",readonly=on"), scratch.join("log"), &socket);
    for round in 0..2 {
        let (output, jobs) = blk_load(&socket, &["--job", "randread", "--bs", "4k", "--qd", "2", "--ios", "100"]);
        assert!(output.status.success(), "round {round}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(jobs[0]["errors"], 0);
    }
    let (output, jobs) = blk_load(&socket, &["--job", "randwrite", "--bs", "4k", "--qd", "1", "--ios", "10"]);
    assert!(!output.status.success(), "writes to a read-only disk must fail");
    assert!(jobs.first().is_none_or(|job| job["errors"].as_u64().unwrap_or(0) > 0));
    let log = reflector.stop();
    assert!(log.matches("client connected").count() >= 3, "{log}");
    assert_eq!(std::fs::read(&image).unwrap(), vec![0x5au8; 4 << 20], "a read-only image must not change");
}

#[test]
fn killed_driver_vms_are_replaced_without_client_errors() {
    if !kvm_available("killed_driver_vms_are_replaced_without_client_errors") {
        return;
    }
    let scratch = Scratch::new("kill");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let mut reflector = Reflector::start(&blk_arg(&socket, &image, ",size=16M"), scratch.join("log"), &socket);
    kill_under_verified_load(&mut reflector, &socket, "4k", 10);
    let log = reflector.stop();
    assert!(log.matches("driver VM restarted").count() >= 10, "{log}");
    assert!(log.contains("errors=0"), "the reflector completed no request with an error: {log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// `dma=direct`: the controller reaches each request's own buffers through
/// a window, under verified load of every size, scattered 128k requests
/// and a driver VM killed again and again; nothing is lost or misplaced.
#[test]
fn direct_dma_serves_verified_io_and_survives_killed_driver_vms() {
    if !kvm_available("direct_dma_serves_verified_io_and_survives_killed_driver_vms") {
        return;
    }
    let scratch = Scratch::new("direct");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let spec = blk_arg(&socket, &image, ",size=32M,name=disk0,dma=direct");
    let mut reflector = Reflector::start(&spec, scratch.join("log"), &socket);
    let (output, jobs) = blk_load(
        &socket,
        &["--job", "randwrite,randread,write,read", "--bs", "4k,128k", "--qd", "1,4", "--ios", "200"]
            .into_iter()
            .chain(["--verify", "--size", "16M", "--flush"])
            .collect::<Vec<_>>(),
    );
    assert!(output.status.success(), "blk-load failed: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(jobs.len(), 16);
    for job in &jobs {
        assert_eq!((job["errors"].as_u64(), job["mismatches"].as_u64()), (Some(0), Some(0)), "{job}");
    }
    kill_under_verified_load(&mut reflector, &socket, "4k,64k", 6);
    let log = reflector.stop();
    assert!(log.contains("per-request DMA windows (dma=direct)"), "{log}");
    assert!(log.contains("errors=0"), "the reflector completed no request with an error: {log}");
    let written = std::fs::read(&image).unwrap();
    assert!(written[16 << 20..].iter().all(|b| *b == 0), "nothing may be written outside the region used");
}

#[test]
fn bad_configuration_names_the_file_line_and_key() {
    let scratch = Scratch::new("bad-config");
    let config = scratch.join("r.toml");
    std::fs::write(&config, "[[blk]]\nsocket = \"/tmp/x.sock\"\nimage = \"/tmp/x.img\"\nsize = \"huge\"\n").unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_reflector")).args(["serve", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("r.toml, line 4") && stderr.contains("size"), "{stderr}");

    let output =
        Command::new(env!("CARGO_BIN_EXE_reflector")).args(["serve", "--blk", "socket=/tmp/x.sock"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("image=PATH is required"), "{stderr}");

    let missing = scratch.join("missing.img");
    let spec = format!("socket={},image={}", scratch.join("s").display(), missing.display());
    let output = Command::new(env!("CARGO_BIN_EXE_reflector")).args(["serve", "--blk", &spec]).output().unwrap();
    let mut stderr = String::new();
    output.stderr.as_slice().read_to_string(&mut stderr).unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("does not exist: add size=SIZE"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn driver_vms_never_outlive_a_killed_reflector() {
    if !kvm_available("driver_vms_never_outlive_a_killed_reflector") {
        return;
    }
    let scratch = Scratch::new("lifeline");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let mut reflector = Reflector::start(&blk_arg(&socket, &image, ",size=8M,spare=on"), scratch.join("log"), &socket);
    reflector.wait_for(|r| r.log_text().matches("driver VM started").count() >= 2, "the driver VM and its spare");
    let pids: Vec<i32> = reflector
        .log_text()
        .lines()
        .filter(|l| l.contains("driver VM started"))
        .filter_map(|l| l.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2);
    reflector.child.kill().unwrap();
    reflector.child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for pid in pids {
        // Gone, or a zombie waiting for init to reap it.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
                .unwrap_or(false)
        };
        while alive() {
            assert!(std::time::Instant::now() < deadline, "driver VM {pid} outlived the reflector");
            std::thread::yield_now();
        }
    }
}

#[test]
fn a_null_driver_of_under_thirty_lines_serves_every_request() {
    if !kvm_available("a_null_driver_of_under_thirty_lines_serves_every_request") {
        return;
    }
    let scratch = Scratch::new("null");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let args = blk_arg(&socket, &image, ",size=4M,driver=null");
    let reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "null: serving channel generation 1");
    let (output, jobs) = blk_load(&socket, &["--job", "randwrite,randread", "--qd", "4", "--ios", "200"]);
    assert!(output.status.success(), "blk-load: {}", String::from_utf8_lossy(&output.stderr));
    assert!(jobs.iter().all(|job| job["errors"] == 0 && job["ios"] == 200), "{jobs:?}");
    // The driver itself: its unit tests follow it in the file.
    let source = include_str!("../../driver-vm/src/bin/null.rs");
    let code = source.lines().take_while(|line| !line.starts_with("#[cfg(test)]")).count();
    assert!(code <= 30, "the null driver grew to {code} lines");
    drop(reflector);
}
