//! The driver SDK's promises, tried as a driver developer would: the same
//! driver source runs isolated (a driver VM) and hosted (a plain process,
//! `hosted=on`) unchanged; a RAM disk whose data lives in device memory
//! (`vmdisk` on `device=memory`) keeps it across every driver death; hosted
//! mode is refused where it would drop the isolation the operator asked for.
//!
//! Needs /dev/kvm and the workspace's binaries next to the reflector; hosted
//! builds of the samples are made with cargo into target/hosted.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_clean_load_of, blk_arg, blk_load, kvm_available, spawn_blk_load, Reflector, Scratch};

/// A hosted (plain Linux process) build of sample driver `name`, made from
/// the same source as its isolated image.
fn hosted_build(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = root.join("target/hosted");
    let output = Command::new(env!("CARGO"))
        .current_dir(root.join("driver-vm"))
        .args(["build", "--release", "--locked", "--bin", name, "--target-dir"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(output.status.success(), "building hosted {name}: {}", String::from_utf8_lossy(&output.stderr));
    target.join("release").join(name)
}

/// How a sample runs: isolated (its built-in image, jailed) or hosted.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Isolated,
    Hosted,
}

/// Serves one block device with `driver` (a built-in name) in `mode`.
fn serve(scratch: &Scratch, mode: Mode, driver: &str, extra: &str) -> (Reflector, PathBuf, PathBuf) {
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let driver_spec = match mode {
        Mode::Isolated => format!(",driver={driver}"),
        Mode::Hosted => format!(",driver={},hosted=on", hosted_build(driver).display()),
    };
    let mut args = blk_arg(&socket, &image, &format!("{extra}{driver_spec}"));
    if let Mode::Hosted = mode {
        args.insert(0, "--no-jail".into());
    }
    let reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "serving channel");
    (reflector, socket, image)
}

#[test]
fn the_null_driver_serves_isolated_and_hosted_unchanged() {
    if !kvm_available("the_null_driver_serves_isolated_and_hosted_unchanged") {
        return;
    }
    for mode in [Mode::Isolated, Mode::Hosted] {
        let scratch = Scratch::new(&format!("sdk-null-{mode:?}"));
        let (reflector, socket, _) = serve(&scratch, mode, "null", ",size=16M");
        let (output, jobs) =
            blk_load(&socket, &["--job", "randwrite,randread", "--bs", "4k,128k", "--qd", "1,8", "--ios", "400"]);
        assert!(
            output.status.success(),
            "{mode:?}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            reflector.log_text()
        );
        assert_eq!(jobs.len(), 8, "{mode:?}");
        assert!(jobs.iter().all(|job| job["errors"] == 0), "{mode:?}: {jobs:?}");
        let log = reflector.stop();
        assert!(log.contains("null: serving channel generation"), "{mode:?}: {log}");
        if let Mode::Hosted = mode {
            assert!(log.contains("HOSTED"), "{mode:?}: the log says it is hosted: {log}");
        }
    }
}

#[test]
fn a_ram_disk_in_device_memory_keeps_its_data_across_driver_deaths_isolated_and_hosted() {
    if !kvm_available("a_ram_disk_in_device_memory_keeps_its_data_across_driver_deaths_isolated_and_hosted") {
        return;
    }
    for mode in [Mode::Isolated, Mode::Hosted] {
        let scratch = Scratch::new(&format!("sdk-vmdisk-{mode:?}"));
        let (mut reflector, socket, image) = serve(&scratch, mode, "vmdisk", ",size=16M,device=memory");
        // Verified writes and reads; every write read back after the kills
        // that follow it proves the data outlived the driver that wrote it.
        let load = spawn_blk_load(
            &socket,
            &["--queue-size", "1024", "--timeout", "30", "--job", "randwrite,randread", "--bs", "4k", "--qd", "8"]
                .into_iter()
                .chain(["--ios", "30000", "--size", "8M", "--verify", "--flush"])
                .collect::<Vec<_>>(),
        );
        for killed in 0..5 {
            let pid = reflector.driver_pid();
            // SAFETY: kill(2) on the current driver's vmm, our reflector's
            // child (a hosted driver dies with its vmm).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reflector
                .wait_for(|r| r.log_text().matches("driver VM restarted").count() > killed, "a replacement driver");
        }
        assert_clean_load_of(load, Some(&reflector));
        let log = reflector.stop();
        assert!(log.matches("driver VM restarted").count() >= 5, "{mode:?}: {log}");
        assert!(!log.contains("panicked"), "{mode:?}: {log}");
        let written = std::fs::read(&image).unwrap();
        assert!(written[..8 << 20].iter().any(|b| *b != 0), "{mode:?}: the writes reached the image");
        assert!(written[8 << 20..].iter().all(|b| *b == 0), "{mode:?}: nothing outside the region used");
    }
}

#[test]
fn hosted_mode_is_refused_inside_the_jail_and_for_isolated_images() {
    let scratch = Scratch::new("sdk-refusals");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let args = blk_arg(&socket, &image, &format!(",size=4M,hosted=on,driver={}", hosted_build("null").display()));
    let output = Command::new(env!("CARGO_BIN_EXE_reflector")).arg("serve").args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("hosted=on") && stderr.contains("--no-jail"), "{stderr}");
    // An isolated image given to --hosted: the vmm names the build to use.
    let isolated = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/x86_64-unknown-linux-gnu/release/null");
    let output = Command::new(common::sibling("vmm"))
        .args(["run", "--hosted", "--check", "--image"])
        .arg(&isolated)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("hosted build"), "{stderr}");
}

#[test]
fn a_driver_made_from_the_template_outside_the_repository_builds_tests_and_serves() {
    if !kvm_available("a_driver_made_from_the_template_outside_the_repository_builds_tests_and_serves") {
        return;
    }
    let scratch = Scratch::new("sdk-template");
    // The guide's three commands (docs/writing-a-driver.md), in a directory
    // outside the repository.
    let created =
        Command::new(common::sibling("vmm")).args(["new-driver", "mydisk", "--dir"]).arg(&scratch.0).output().unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let crate_dir = scratch.join("mydisk");
    for args in [&["test"][..], &["image"][..]] {
        let output = Command::new(env!("CARGO"))
            .current_dir(&crate_dir)
            .args(args)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .output()
            .unwrap();
        assert!(output.status.success(), "cargo {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        if args == ["test"] {
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(stdout.contains("data_survives_a_restart_of_the_driver ... ok"), "{stdout}");
        }
    }
    let image = crate_dir.join("target/x86_64-unknown-linux-gnu/release/mydisk");
    let (socket, disk) = (scratch.join("d.sock"), scratch.join("d.img"));
    let args = blk_arg(&socket, &disk, &format!(",size=16M,device=memory,driver={}", image.display()));
    let reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "mydisk: serving channel");
    let (output, jobs) = blk_load(
        &socket,
        &["--job", "randwrite,randread", "--bs", "4k", "--qd", "8", "--ios", "2000", "--verify", "--size", "8M"],
    );
    assert!(output.status.success(), "{}\n{}", String::from_utf8_lossy(&output.stderr), reflector.log_text());
    assert!(jobs.iter().all(|job| job["errors"] == 0 && job["mismatches"] == 0), "{jobs:?}");
}
