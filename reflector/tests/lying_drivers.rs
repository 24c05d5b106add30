//! Drivers that lie where the channel protocol cannot see it: about the
//! data they read, and about flushes. The reflector judges them with its
//! own evidence (checksums of what it wrote, the device's flush count),
//! replaces the driver VM and replays the request: the client gets the
//! right data and a real flush, never the lie.
//!
//! Needs /dev/kvm and the workspace's binaries (`vmm`, `blk-load`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;

use common::{kvm_available, sibling, Reflector, Scratch};

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
    let mut reflector = Reflector::start(&args, scratch.join("log"), &socket);
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
