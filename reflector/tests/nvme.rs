//! A disk on hardware nobody here wrote: the reflector serves it through a
//! driver VM running the NVMe driver, whose controller is QEMU's NVMe model
//! in a QEMU process (`device=nvme`); BAR0 is a trapped window the
//! reflector forwards over qtest. Driven by `blk-load` with verification,
//! also while driver VMs are killed.
//!
//! Needs /dev/kvm, `qemu-system-x86_64` and the workspace's binaries built
//! next to the reflector (`cargo build --release`; `ci/test.sh` does it).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;

use common::{
    assert_clean_load_of, blk_arg, kvm_available, qemu_available, qemu_pids, sibling, spawn_blk_load, Reflector,
    Scratch,
};

fn available(test: &str) -> bool {
    kvm_available(test) && qemu_available(test)
}

/// [`available`], and jails (root).
fn jails_available(test: &str) -> bool {
    if !available(test) {
        return false;
    }
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("\n*** SKIPPING {test}: jails need root ***\n");
        return false;
    }
    true
}

fn blk_load(socket: &Path, args: &[&str]) -> (Output, Vec<serde_json::Value>) {
    common::blk_load(socket, &[&["--queue-size", "1024", "--timeout", "30"], args].concat())
}

/// QEMU processes whose command line names `image`.
/// A reflector serving an NVMe-backed disk with checksums (and `options`),
/// and a verified random write and read load of `ios` requests per job
/// running on it.
fn nvme_under_load(
    scratch: &Scratch,
    ios: &str,
    options: &str,
) -> (std::path::PathBuf, Reflector, std::process::Child) {
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let args = blk_arg(&socket, &image, &format!(",size=16M,device=nvme,checksums=on{options}"));
    let reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "nvme: serving channel generation");
    let load = spawn_blk_load(
        &socket,
        &["--queue-size", "1024", "--timeout", "30", "--job", "randwrite,randread", "--bs", "4k", "--qd", "8"]
            .into_iter()
            .chain(["--ios", ios, "--size", "8M", "--verify"])
            .collect::<Vec<_>>(),
    );
    (image, reflector, load)
}

#[test]
fn verified_io_through_an_nvme_driver_vm_on_qemus_controller() {
    let test = "verified_io_through_an_nvme_driver_vm_on_qemus_controller";
    if !available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-verify");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let args = blk_arg(&socket, &image, ",size=32M,name=nvme0,device=nvme,checksums=on");
    let reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "nvme: serving channel generation");
    let (output, jobs) = blk_load(
        &socket,
        &[
            "--job",
            "randwrite,randread,write,read",
            "--bs",
            "4k,128k",
            "--qd",
            "1,8",
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
    assert!(output.status.success(), "blk-load failed: {stderr}");
    assert_eq!(jobs.len(), 16, "{stderr}");
    for job in &jobs {
        assert_eq!((job["errors"].as_u64(), job["mismatches"].as_u64()), (Some(0), Some(0)), "{job}");
    }
    assert!(stderr.contains("flush OK") || String::from_utf8_lossy(&output.stdout).contains("flush OK"));
    // By default QEMU reached the image through its thread pool: no ring.
    let pids = qemu_pids(&image.display().to_string(), None);
    assert_eq!(pids.len(), 1, "one QEMU per NVMe device");
    assert_eq!(io_urings_of(pids[0]), 0, "QEMU set up an io_uring without aio=io_uring");
    // The reflector stays within its memory budget (10 MiB and 256 KiB a
    // device) right after the load, bounce slots still resident. It held
    // 12.0 MiB when it read the vmm's whole binary to find its loader
    // (`jail::libraries`), and those pages stayed in a thread's heap.
    let status = std::fs::read_to_string(format!("/proc/{}/status", reflector.child.id())).unwrap();
    let resident: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let budget = reflector::control::REFLECTOR_BASE_KIB + reflector::control::REFLECTOR_PER_DEVICE_KIB;
    assert!(resident < budget, "the reflector holds {resident} KiB after the load, over its budget of {budget} KiB");
    let log = reflector.stop();
    assert!(log.contains("QEMU device model ready"), "{log}");
    assert!(!log.contains("driver VM fault"), "{log}");
    let written = std::fs::read(&image).unwrap();
    assert!(written[..16 << 20].iter().any(|b| *b != 0), "the writes did not reach the image");
    assert!(written[16 << 20..].iter().all(|b| *b == 0), "something was written outside the region used");
}

#[test]
fn nvme_driver_vms_killed_under_load_lose_nothing_and_qemu_dies_with_the_reflector() {
    let test = "nvme_driver_vms_killed_under_load_lose_nothing_and_qemu_dies_with_the_reflector";
    if !available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-kill");
    let (image, mut reflector, load) = nvme_under_load(&scratch, "30000", "");
    // Each driver is killed once it serves, and once the restart that made
    // it current is logged (with its pid): a spare is let go before that
    // line is written, and can print its serving line first.
    kill_driver_vms(&mut reflector, 10);
    assert_clean_load_of(load, Some(&reflector));
    let log = reflector.log_text();
    assert!(log.matches("driver VM restarted").count() >= 10, "{log}");
    assert!(!log.contains("violation"), "an honest driver was judged lying: {log}");
    // Each quiesce left the controller clean (`QemuModel::reset_nvme`): no
    // failover paid for a new QEMU process.
    assert!(!log.contains("stayed asserted through its reset"), "a device model was started again:\n{log}");
    // QEMU holds the image until the reflector dies, however it dies.
    assert_eq!(qemu_pids(&image.display().to_string(), None).len(), 1, "one QEMU per NVMe device");
    reflector.child.kill().unwrap();
    reflector.child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !qemu_pids(&image.display().to_string(), None).is_empty() {
        assert!(std::time::Instant::now() < deadline, "QEMU outlived the reflector");
        std::thread::yield_now();
    }
}

/// Kills the current driver VM `kills` times, each once it serves, and once
/// the restart that made it current is logged (with its pid): a spare is
/// let go before that line is written, and can print its serving line
/// first. Returns when the last replacement serves.
fn kill_driver_vms(reflector: &mut Reflector, kills: usize) {
    let serving_and_current = |killed: usize| {
        move |r: &common::Reflector| {
            let log = r.log_text();
            log.matches("serving channel generation").count() > killed
                && log.matches("driver VM restarted").count() >= killed
        }
    };
    for killed in 0..kills {
        reflector.wait_for(serving_and_current(killed), "a replacement NVMe driver serving");
        // SAFETY: kill(2) on the current driver VM, our reflector's child.
        unsafe { libc::kill(reflector.driver_pid(), libc::SIGKILL) };
    }
    reflector.wait_for(serving_and_current(kills), "a replacement NVMe driver serving");
}

/// How many io_uring instances process `pid` holds.
fn io_urings_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy() == "anon_inode:[io_uring]")
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_qemu_reaching_its_image_through_io_uring_loses_nothing_when_driver_vms_are_killed() {
    let test = "a_qemu_reaching_its_image_through_io_uring_loses_nothing_when_driver_vms_are_killed";
    if !available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-uring");
    let (image, mut reflector, load) = nvme_under_load(&scratch, "60000", ",aio=io_uring");
    let pids = qemu_pids(&image.display().to_string(), None);
    assert_eq!(pids.len(), 1, "one QEMU per NVMe device");
    // QEMU sets its ring up at the first request; each driver VM killed
    // leaves requests in it, which the quiesce's controller reset drains.
    reflector.wait_for(|_| io_urings_of(pids[0]) > 0, "QEMU's io_uring");
    kill_driver_vms(&mut reflector, 5);
    assert_clean_load_of(load, Some(&reflector));
    let log = reflector.log_text();
    assert!(!log.contains("violation"), "an honest driver was judged lying: {log}");
    assert!(!log.contains("stayed asserted through its reset"), "a device model was started again:\n{log}");
    assert_eq!(qemu_pids(&image.display().to_string(), None), pids, "QEMU was started again:\n{log}");
}

#[test]
fn a_qemu_device_model_killed_under_load_is_started_again_and_nothing_is_lost() {
    let test = "a_qemu_device_model_killed_under_load_is_started_again_and_nothing_is_lost";
    if !available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-qemu-death");
    let (image, mut reflector, load) = nvme_under_load(&scratch, "20000", "");
    for round in 1..=2 {
        reflector.wait_for(
            |r| r.log_text().matches("serving channel generation").count() >= round,
            "an NVMe driver serving",
        );
        let pids = qemu_pids(&image.display().to_string(), None);
        assert_eq!(pids.len(), 1, "one QEMU per NVMe device");
        // SAFETY: kill(2) on the reflector's QEMU child.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
        reflector.wait_for(
            |r| r.log_text().matches("starting it again").count() >= round,
            "the QEMU device model started again",
        );
    }
    assert_clean_load_of(load, Some(&reflector));
    assert_eq!(
        qemu_pids(&image.display().to_string(), None).len(),
        1,
        "the QEMU started again is the device's only one: {}",
        reflector.log_text()
    );
}

#[test]
fn a_driver_pointing_its_controller_outside_the_dma_region_is_caught_and_replaced() {
    let test = "a_driver_pointing_its_controller_outside_the_dma_region_is_caught_and_replaced";
    if !available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-wild");
    let (socket, image, control) = (scratch.join("d.sock"), scratch.join("d.img"), scratch.join("ctl"));
    let mut args = blk_arg(&socket, &image, ",size=16M,name=wild,device=nvme,checksums=on");
    args.extend(["--control".to_string(), control.display().to_string()]);
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "nvme: serving channel generation");
    reflector.wait_for(|_| control.exists(), "the control socket");
    let region = ["--bs", "4k", "--qd", "4", "--size", "4M", "--ios", "2000", "--verify", "--seed", "7"];
    // An honest driver fills the region (blk-load's read job writes it first).
    let (output, jobs) = blk_load(&socket, &[["--job", "read"].as_slice(), &region].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(jobs[0]["mismatches"], 0);
    let before = std::fs::read(&image).unwrap();
    // From now on the driver points every data transfer outside the region
    // its controller may reach; the reads it answers OK carry no data.
    let inject = Command::new(sibling("reflector"))
        .args(["inject", "wild", "wild-dma", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(inject.status.success(), "inject: {}", String::from_utf8_lossy(&inject.stderr));
    let (output, jobs) = blk_load(&socket, &[["--job", "randread", "--assume-filled"].as_slice(), &region].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!((jobs[0]["errors"].as_u64(), jobs[0]["mismatches"].as_u64()), (Some(0), Some(0)), "{}", jobs[0]);
    let log = reflector.log_text();
    assert!(log.contains("is not what was written there"), "the checksums did not catch the driver: {log}");
    assert!(log.contains("driver VM restarted"), "{log}");
    assert!(std::fs::read(&image).unwrap() == before, "reads through a wild driver changed the image");
}

/// A driver that acknowledges writes without giving them to QEMU's
/// controller: before, each was lost (a later read found the old data, and
/// only `checksums=on` noticed, at that read; without it the client got
/// the old data). QEMU's model keeps no record of its writes, so the
/// reflector reads each acknowledged write back from the image: the lie is
/// a violation, the write is replayed to the next driver VM, and every
/// block verifies.
#[test]
fn a_driver_acknowledging_a_write_it_did_not_do_is_caught_on_the_image() {
    let test = "a_driver_acknowledging_a_write_it_did_not_do_is_caught_on_the_image";
    if !available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-skip");
    let (socket, image, control) = (scratch.join("d.sock"), scratch.join("d.img"), scratch.join("ctl"));
    let mut args = blk_arg(&socket, &image, ",size=16M,name=liar,device=nvme");
    args.extend(["--control".to_string(), control.display().to_string()]);
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "nvme: serving channel generation");
    reflector.wait_for(|_| control.exists(), "the control socket");
    let inject = Command::new(sibling("reflector"))
        .args(["inject", "liar", "skip-writes", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(inject.status.success(), "inject: {}", String::from_utf8_lossy(&inject.stderr));
    let (output, jobs) = blk_load(
        &socket,
        &["--job", "randwrite,randread", "--bs", "4k", "--qd", "1", "--size", "64k", "--ios", "32", "--verify"],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for job in &jobs {
        assert_eq!((job["errors"].as_u64(), job["mismatches"].as_u64()), (Some(0), Some(0)), "{job}");
    }
    let log = reflector.stop();
    assert!(log.contains("the medium does not hold its data"), "the lie was not caught: {log}");
    assert!(log.contains("driver VM restarted"), "{log}");
}

#[test]
fn a_driver_moving_its_controllers_queues_outside_the_dma_region_is_replaced_and_nothing_is_lost() {
    let test = "a_driver_moving_its_controllers_queues_outside_the_dma_region_is_replaced_and_nothing_is_lost";
    if !available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-wild-queues");
    let (socket, image, control) = (scratch.join("d.sock"), scratch.join("d.img"), scratch.join("ctl"));
    let mut args = blk_arg(&socket, &image, ",size=16M,name=wildq,device=nvme,checksums=on,hang_ms=500");
    args.extend(["--control".to_string(), control.display().to_string()]);
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "nvme: serving channel generation");
    reflector.wait_for(|_| control.exists(), "the control socket");
    let load = spawn_blk_load(
        &socket,
        &["--queue-size", "1024", "--timeout", "60", "--job", "randwrite,randread", "--bs", "4k", "--qd", "8"]
            .into_iter()
            .chain(["--ios", "6000", "--size", "8M", "--verify"])
            .collect::<Vec<_>>(),
    );
    reflector.wait_for(|r| r.log_text().contains("client connected"), "the load");
    // The driver resets its controller and gives it queues outside the
    // region; the controller can reach none of them (CSTS.CFS), the
    // commands in flight never complete, the hang deadline replaces the
    // driver and the next one resets the controller.
    let inject = Command::new(sibling("reflector"))
        .args(["inject", "wildq", "wild-queues", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(inject.status.success(), "inject: {}", String::from_utf8_lossy(&inject.stderr));
    reflector.wait_for(
        |r| r.log_text().contains("queues moved outside the region") || r.log_text().contains("took queues outside"),
        "the driver acting on wild-queues",
    );
    reflector.wait_for(|r| r.log_text().matches("serving channel generation").count() >= 2, "a new driver VM");
    assert_clean_load_of(load, Some(&reflector));
    let log = reflector.log_text();
    assert!(log.contains("queues moved outside the region: Fatal"), "the controller reached its wild queues: {log}");
}

#[test]
fn the_qemu_device_model_runs_in_a_jail_of_its_own() {
    let test = "the_qemu_device_model_runs_in_a_jail_of_its_own";
    if !jails_available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-jail");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let args = blk_arg(&socket, &image, ",size=8M,device=nvme");
    let reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "nvme: serving channel generation");
    let pids = qemu_pids(&image.display().to_string(), None);
    assert_eq!(pids.len(), 1, "{}", reflector.log_text());
    let pid = pids[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned();
    let uid: u32 = field("Uid:").split_whitespace().next().unwrap().parse().unwrap();
    assert!(uid >= 1000, "QEMU runs as uid {uid}");
    assert_eq!(field("CapEff:"), "0000000000000000", "QEMU holds capabilities");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "QEMU runs without a seccomp filter");
    // Its root holds QEMU, its libraries and a /proc of its own, nothing else.
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert!(
        root.iter().all(|e| ["lib", "lib64", "usr", "proc", "qemu-system-x86_64"].contains(&e.as_str())),
        "{root:?}"
    );
    assert!(!root.iter().any(|e| e == "tmp" || e == "dev" || e == "etc"), "{root:?}");
    // Its /proc shows its own PID namespace: itself alone.
    let own_proc: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/proc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(own_proc, vec!["1".to_owned()], "QEMU sees other processes");
    // And the image it serves is not among its files (it got a descriptor).
    assert!(!std::path::Path::new(&format!("/proc/{pid}/root{}", image.display())).exists());
}

#[test]
fn a_qemu_taken_over_can_set_up_io_uring_only_if_its_own_disk_asked_for_it() {
    let test = "a_qemu_taken_over_can_set_up_io_uring_only_if_its_own_disk_asked_for_it";
    if !jails_available(test) {
        return;
    }
    if let Some(error) = reflector::jail::io_uring_refused() {
        eprintln!("\n*** SKIPPING {test}: this kernel refuses io_uring ({error}) ***\n");
        return;
    }
    let scratch = Scratch::new("nvme-uring-jail");
    // The first disk's QEMU (a real one) uses io_uring, so the reflector's
    // own filter, which every child inherits, lets io_uring through; the
    // second disk's QEMU is hostile-qemu, which says whether its jail did.
    let first = blk_arg(&scratch.join("a.sock"), &scratch.join("a.img"), ",size=8M,name=a,device=nvme,aio=io_uring");
    let hostile = sibling("hostile-qemu");
    // Made here, so that the failed starts keep it (they remove an image
    // they made themselves) and its size can be looked at.
    std::fs::File::create(scratch.join("b.img")).unwrap().set_len(8 << 20).unwrap();
    for (aio, expected) in [("", "io_uring_setup EPERM"), (",aio=io_uring", "io_uring_setup ok")] {
        let options = format!(",size=8M,name=b,device=nvme{aio},qemu={}", hostile.display());
        let second = blk_arg(&scratch.join("b.sock"), &scratch.join("b.img"), &options);
        // Bounded: a reflector that started on hostile-qemu would serve on.
        let output = Command::new("timeout")
            .arg("60")
            .arg(sibling("reflector"))
            .arg("serve")
            .args(&first)
            .args(&second)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{aio}: the reflector started on hostile-qemu: {stderr}");
        assert!(stderr.contains(expected), "{aio}: expected {expected:?}: {stderr}");
        // Nor may it grow a file, its image above all: the host's
        // filesystem is not its to fill. Before the jail's file size
        // limit, each attempt worked.
        // QEMU's words come escaped, its line ends as `\n`.
        let said = stderr.replace("\\n", "\n");
        let grown: Vec<&str> = said.lines().filter(|l| l.contains("hostile-qemu: grow fd")).collect();
        assert!(!grown.is_empty(), "{aio}: hostile-qemu found no file to grow: {stderr}");
        for line in grown {
            assert!(!line.contains("ok"), "{aio}: {line}");
        }
        assert_eq!(std::fs::metadata(scratch.join("b.img")).unwrap().len(), 8 << 20, "{aio}: its image grew");
    }
}

#[test]
fn a_missing_qemu_or_a_bad_device_is_a_clear_start_error() {
    let scratch = Scratch::new("nvme-refuse");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    for (extra, expected) in [
        (",size=8M,device=nvme,qemu=/nonexistent/qemu", "/nonexistent/qemu"),
        (",size=8M,device=floppy", "device=floppy: expected sim"),
        (",size=8M,qemu=/usr/bin/qemu-system-x86_64", "qemu= is for device=nvme"),
    ] {
        let output = Command::new(sibling("reflector"))
            .arg("serve")
            .arg("--no-jail")
            .args(blk_arg(&socket, &image, extra))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra}: the reflector started: {stderr}");
        assert!(stderr.contains(expected), "{extra}: {stderr}");
    }
    // The VFIO door: a PCI function that is not there, or not a PCI
    // address, an image given to a device that is its own disk.
    let socket = socket.display();
    for (kind, spec, expected) in [
        ("--blk", format!("socket={socket},device=vfio:ffff:ff:1f.7"), "ffff:ff:1f.7: no such PCI device"),
        ("--blk", format!("socket={socket},device=vfio:01:00.0"), "\"01:00.0\" is not a PCI address"),
        ("--blk", format!("socket={socket},image=/i,device=vfio:0000:01:00.0"), "image= is not for a VFIO function"),
        ("--blk", format!("socket={socket},size=1G,device=vfio:0000:01:00.0"), "size= is not for a VFIO function"),
        ("--net", format!("socket={socket},device=vfio:ffff:ff:1f.6"), "ffff:ff:1f.6: no such PCI device"),
    ] {
        let output = Command::new(sibling("reflector"))
            .args(["serve", "--no-jail", kind, &spec])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{spec}: the reflector started: {stderr}");
        assert!(stderr.contains(expected), "{spec}: {stderr}");
    }
}

/// A reflector that stops (SIGTERM) ends its device's QEMU process and
/// takes every cgroup it made with it, the QEMU jail's (`*.qemu`)
/// included: before, that QEMU ended only with the reflector (its
/// parent-death signal), after the reflector could remove its cgroups,
/// which stayed until the next start's sweep.
#[test]
fn a_reflector_that_stops_ends_its_qemu_and_leaves_no_cgroup_behind() {
    let test = "a_reflector_that_stops_ends_its_qemu_and_leaves_no_cgroup_behind";
    if !jails_available(test) {
        return;
    }
    let scratch = Scratch::new("nvme-stop");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let args = blk_arg(&socket, &image, ",size=16M,device=nvme");
    let reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "nvme: serving channel generation");
    let pid = reflector.child.id();
    let cgroups = common::DeviceCgroups::of(pid);
    let before = cgroups.list();
    assert!(
        before.iter().any(|dir| dir.to_string_lossy().ends_with(".qemu")),
        "no cgroup of the device's QEMU among {before:?}: is it jailing with limits?"
    );
    let qemu = qemu_pids(&image.display().to_string(), None);
    assert!(!qemu.is_empty(), "no QEMU process serves {}", image.display());
    let log = reflector.stop();
    assert_eq!(
        cgroups.list(),
        Vec::<std::path::PathBuf>::new(),
        "cgroups left behind by a reflector that stopped; its log:\n{log}"
    );
    for pid in qemu {
        // Gone, or a zombie its new parent has not reaped yet.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]).unwrap_or("");
        assert!(state.is_empty() || state == "Z", "QEMU {pid} outlived the reflector (state {state})");
    }
}
