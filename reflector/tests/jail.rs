//! The jail every driver VM's vmm starts in, tried from the inside: a
//! hostile vmm substitute (`hostile-vmm`, started by the reflector exactly
//! as the real vmm, jail included) attempts what a compromised vmm would and
//! reports how each attempt ended; and every real driver VM of a running
//! reflector is checked to be confined (seccomp, no_new_privs, no
//! capabilities, its own uid, an empty root, its own network namespace).
//!
//! Needs root, /dev/kvm and the workspace's binaries.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{kvm_available, sibling, Reflector, Scratch};
use reflector::console_relay::{BURST, RATE};

#[test]
fn a_hostile_vmm_cannot_escape_its_jail() {
    if !kvm_available("a_hostile_vmm_cannot_escape_its_jail") {
        return;
    }
    let scratch = Scratch::new("jail-hostile");
    let socket = scratch.join("d0.sock");
    let image = scratch.join("d0.img");
    let args = vec![
        "--vmm".to_string(),
        sibling("hostile-vmm").display().to_string(),
        "--blk".to_string(),
        // No standby: the report read is then the first vmm's, whose
        // descriptors are listed below (a standby has its start signal too;
        // hostile_clients checks a standby's descriptors).
        format!("socket={},image={},size=4M,name=d0,spare=off", socket.display(), image.display()),
    ];
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "serving vhost-user-blk");
    let exited = |r: &Reflector| {
        r.log_text().lines().any(|l| l.contains("driver VM exited driver_vm=") && l.contains("report={"))
    };
    reflector.wait_for(exited, "the hostile vmm's report");
    let capped = |r: &Reflector| r.log_text().contains("kind=\"out_of_memory\"");
    reflector.wait_for(capped, "the memory cap's kill reported as an out-of-memory fault");
    // It flooded its standard output before its report: the reflector read
    // it within its rate (the report came through) and kept none of it.
    let peak_kib: u64 = status_line(u64::from(reflector.child.id()), "VmHWM:")
        .trim_end_matches(" kB")
        .parse()
        .expect("the reflector's peak resident memory");
    let log = reflector.stop();
    let line = log.lines().find(|l| l.contains("driver VM exited driver_vm=") && l.contains("report={")).unwrap();
    let report: serde_json::Value = serde_json::from_str(line.split("report=").nth(1).unwrap()).unwrap();
    let expect = |key: &str, want: &str| assert_eq!(report[key], want, "{key}: {report}");
    // Host files, devices, /proc, cgroups, images: nothing is there.
    for path in ["/etc/passwd", "/dev/kvm", "/proc/self/status", "/sys/fs/cgroup", "/tmp", "/work", "/root"] {
        expect(&format!("open {path}"), "ENOENT");
    }
    let mut root: Vec<&str> = report["root entries"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    root.sort();
    assert_eq!(root, ["lib", "lib64", "vmm"], "the jail's root holds the vmm and its libraries only");
    assert!(!Path::new(&image).to_string_lossy().is_empty());
    // Only its own descriptors: stdio, /dev/kvm, two windows, two doorbells, two interrupt lines.
    assert_eq!(report["open fds"], serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), "{report}");
    // Its windows' files (the channel, the registers) are the reflector's
    // too: none can be shrunk or grown (a shrunk one would make the
    // reflector's next touch of it fault). Before the seals and the
    // filter's ban, each of the three calls worked.
    let resized = report["resize window files"].as_object().unwrap();
    assert!(resized.len() >= 2, "the windows were not found among its files: {report}");
    for (fd, outcomes) in resized {
        assert!(outcomes.as_array().unwrap().iter().all(|o| o != "ok"), "fd {fd} changed size: {outcomes}");
    }
    // No network (its namespace's loopback is down), no process it may touch.
    // No socket but a local one: none of the network's (its namespace is
    // empty besides), none of vsock's (which ignores namespaces).
    expect("tcp 127.0.0.1:22", "EPERM");
    expect("tcp 127.0.0.1:80", "EPERM");
    expect("vsock socket", "EPERM");
    expect("unix socket", "ok");
    // Alone in its PID namespace: it is process 1, its parent is outside,
    // and no other process id names anything it could signal or trace.
    assert_eq!(report["own pid"], 1, "{report}");
    assert_eq!(report["parent"], 0, "{report}");
    // A session and process group of its own: kill(0, ...) reaches it
    // alone, not the reflector's group (before, every vmm, keeper and
    // QEMU was in it, and with --user one kill(0, SIGKILL) ended them all,
    // an adversarial review found).
    assert_eq!(
        (&report["process group"], &report["session"]),
        (&serde_json::json!(1), &serde_json::json!(1)),
        "{report}"
    );
    // Its death signal stays (it dies with its keeper), and it takes no
    // native AIO context from the host's limit.
    expect("death signal cleared", "EPERM");
    expect("io_setup", "EPERM");
    assert_eq!(report["other processes visible"], serde_json::json!([]), "{report}");
    expect("ptrace parent", "EPERM");
    expect("io_uring_setup", "EPERM");
    // No new privileges, no new namespaces, no mounts, a read-only root.
    // (Root's id is not even mapped in its user namespace: EINVAL.)
    assert!(["EPERM", "EINVAL"].contains(&report["setuid 0"].as_str().unwrap()), "{report}");
    expect("unshare user", "EPERM");
    expect("setns", "EPERM");
    expect("mount tmpfs", "EPERM");
    expect("create /escape", "EROFS");
    // No process with memory of its own (a forked copy would keep the
    // channel mapped past the vmm's end); bounded tasks and CPU; more
    // memory than allowed gets it killed.
    expect("fork", "EPERM");
    let threads = report["threads of 200"].as_u64().unwrap();
    assert!(threads < 32, "tasks are limited: it started {threads} threads");
    let share = report["cpu share of three threads spinning 1 s"].as_f64().unwrap();
    assert!(share < 1.4, "its CPU quota is one core: three spinning threads got {share:.2} cores");
    assert!(line.contains("SIGKILL") && !log.contains("was not stopped"), "the memory limit must stop it: {line}");
    // Its standard output is read within a rate: what it got out in 1 s
    // is a pipe's worth, the reader's burst and a second of its rate, not
    // the hundreds of MiB a reader as fast as the writer takes (before, a
    // reflector thread's CPU outside any quota).
    let flooded = report["flooded stdout KiB in 1 s"].as_u64().unwrap();
    let most =
        (64 + reflector::supervisor::REPORT_LIMIT as u64 / 1024) + 2 * reflector::supervisor::REPORT_READ_RATE / 1024;
    assert!(flooded <= most, "{flooded} KiB of its standard output were read in 1 s, {most} allowed: {report}");
    assert!(
        peak_kib < 64 * 1024,
        "the reflector's memory must not grow with a vmm's output: peak {peak_kib} KiB after {flooded} KiB"
    );
    // ... and the fault says so.
    assert!(log.contains("killed by its memory cap"), "the memory cap's kill is not reported as one: {log}");
}

/// Serves one block device `d0` (`size=4M,spare=off` and `options`) with
/// `hostile-vmm` as its vmm, until its first report: that report, and the
/// reflector's log, once it stopped.
fn hostile_vmm_report(scratch: &Scratch, options: &str) -> (serde_json::Value, String) {
    hostile_vmm_report_on(scratch, options, Reflector::start_with)
}

/// As `hostile_vmm_report`, the reflector started by `start` (its log
/// a file, or its standard error a pipe).
fn hostile_vmm_report_on(
    scratch: &Scratch,
    options: &str,
    start: fn(&[String], PathBuf, &Path, &str) -> Reflector,
) -> (serde_json::Value, String) {
    let socket = scratch.join("d0.sock");
    let image = scratch.join("d0.img");
    let args = vec![
        "--vmm".to_string(),
        sibling("hostile-vmm").display().to_string(),
        "--blk".to_string(),
        format!("socket={},image={},size=4M,name=d0,spare=off{options}", socket.display(), image.display()),
    ];
    let mut reflector = start(&args, scratch.join("log"), &socket, "serving vhost-user-blk");
    let report_line = |r: &Reflector| {
        r.log_text()
            .lines()
            .find(|l| l.contains("driver VM exited driver_vm=") && l.contains("report={"))
            .map(str::to_owned)
    };
    reflector.wait_for(|r| report_line(r).is_some(), "the hostile vmm's report");
    let line = report_line(&reflector).unwrap();
    let log = reflector.stop();
    (serde_json::from_str(line.split("report=").nth(1).unwrap()).unwrap(), log)
}

/// A memory disk's image is a regular file, which no seal covers: a vmm
/// taken over before its own filters (a substitute binary here) tries to
/// grow it by writing past its end. Its jail lets it write no regular file
/// (`RLIMIT_FSIZE` 0), and its log lines still reach the reflector's log
/// file (`console_relay`). Before the limit, the write grew the image.
#[test]
fn a_hostile_vmm_cannot_grow_a_memory_disks_image_and_jailed_vmms_still_log_to_a_file() {
    if !kvm_available("a_hostile_vmm_cannot_grow_a_memory_disks_image") {
        return;
    }
    let scratch = Scratch::new("jail-fsize");
    let (report, log) = hostile_vmm_report(&scratch, ",device=memory");
    assert!(log.contains("hostile-vmm: trying the jail's walls"), "the vmm's log line is not in the log file: {log}");
    let tried = report["resize window files"].as_object().unwrap();
    assert!(tried.len() >= 2, "the channel and the disk were not both found among its files: {report}");
    for (fd, outcomes) in tried {
        assert!(outcomes.as_array().unwrap().iter().all(|o| o != "ok"), "fd {fd} changed size: {outcomes}");
    }
    assert_eq!(
        std::fs::metadata(scratch.join("d0.img")).unwrap().len(),
        4 << 20,
        "the memory disk's image changed size"
    );
}

/// The reflector's log is every device's: a vmm that writes to its
/// standard error without pause adds at most its budget to it (its burst,
/// then its rate), even where the reflector's standard error is a pipe
/// (a journal's socket, a terminal), which a vmm could write itself.
/// Before, a vmm inherited such a standard error, and all 16 MiB of its
/// flood reached the log.
#[test]
fn a_vmm_flooding_its_standard_error_adds_at_most_its_budget_to_a_piped_log() {
    let test = "a_vmm_flooding_its_standard_error_adds_at_most_its_budget_to_a_piped_log";
    if !kvm_available(test) {
        return;
    }
    let scratch = Scratch::new("jail-stderr");
    let started = std::time::Instant::now();
    let (report, log) = hostile_vmm_report_on(&scratch, "", Reflector::start_piped);
    let elapsed = started.elapsed();
    assert_eq!(report["flooded stderr MiB"], 16, "{report}");
    assert!(log.contains("hostile-vmm: trying the jail's walls"), "the vmm's log line is not in the log: {log}");
    // Each line the relay passes on starts with the driver VM's name.
    let flood = |line: &&str| line.starts_with("hostile-vmm flood");
    let logged: u64 =
        log.lines().filter_map(|l| l.strip_prefix("[d0] ")).filter(flood).map(|l| l.len() as u64 + 1).sum();
    // Its burst, its rate over the whole run, and a pipe's worth in flight.
    let allowed = BURST + elapsed.as_micros() as u64 * RATE / 1_000_000 + 64 * 1024;
    assert!(logged <= allowed, "{logged} bytes of a 16 MiB flood reached the log, {allowed} allowed");
    assert!(log.contains("output dropped"), "the log does not say what was dropped");
}

#[test]
fn a_vmm_gets_no_io_uring_even_beside_a_qemu_that_uses_it() {
    let test = "a_vmm_gets_no_io_uring_even_beside_a_qemu_that_uses_it";
    if !kvm_available(test) || !common::qemu_available(test) {
        return;
    }
    if reflector::jail::io_uring_refused().is_some() {
        eprintln!("\n*** SKIPPING {test}: this kernel refuses io_uring: nothing to tell apart ***\n");
        return;
    }
    // The disk's QEMU uses io_uring, so the reflector's own filter lets it
    // through: only the vmm's jail can deny it to the (hostile) vmm.
    let scratch = Scratch::new("jail-uring");
    let (report, _) = hostile_vmm_report(&scratch, ",device=nvme,aio=io_uring");
    assert_eq!(report["io_uring_setup"], "EPERM", "{report}");
}

fn status_line(pid: u64, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn every_running_driver_vm_is_confined() {
    if !kvm_available("every_running_driver_vm_is_confined") {
        return;
    }
    let scratch = Scratch::new("jail-status");
    let control = scratch.join("ctl");
    let (d0, n0, n1) = (scratch.join("d0.sock"), scratch.join("n0.sock"), scratch.join("n1.sock"));
    let args = vec![
        "--control".to_string(),
        control.display().to_string(),
        "--blk".to_string(),
        format!("socket={},image={},size=4M,name=d0,spare=on", d0.display(), scratch.join("d0.img").display()),
        "--net".to_string(),
        format!("socket={},switch=s,name=n0,spare=standby", n0.display()),
        "--net".to_string(),
        format!("socket={},switch=s,name=n1,spare=on", n1.display()),
    ];
    let mut reflector = Reflector::start(&args, scratch.join("log"), &n1);
    reflector.wait_for(|_| control.exists(), "the control socket");
    let status = || {
        let output = Command::new(env!("CARGO_BIN_EXE_reflector"))
            .args(["status", "--json", "--control"])
            .arg(&control)
            .output()
            .unwrap();
        assert!(output.status.success(), "reflector status failed: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout).unwrap();
        let devices: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let mut pids = Vec::new();
        for device in devices.as_array().unwrap() {
            for key in ["driver_pid", "spare_pid"] {
                if let Some(pid) = device[key].as_u64().filter(|pid| *pid != 0) {
                    pids.push(pid);
                }
            }
        }
        (text, devices, pids)
    };
    // Warm spares start with their devices, a standby once its device serves.
    reflector.wait_for(|_| status().2.len() == 6, "three driver VMs, two warm spares and a standby");
    let (text, devices, pids) = status();
    assert_eq!(pids.len(), 6, "three driver VMs, two warm spares and a standby: {text}\n{}", reflector.log_text());
    // The reflector has its own (deny) filter too.
    assert_eq!(status_line(u64::from(reflector.child.id()), "Seccomp:"), "2");
    // One program each (`jail::filters::DenyList`): the kernel prepares
    // each filter it attaches, on every cold restart for the jail's.
    assert_eq!(status_line(u64::from(reflector.child.id()), "Seccomp_filters:"), "1");
    let my_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    let dynamic_vmm = reflector::jail::interpreter(&sibling("vmm")).unwrap().is_some();
    let mut holders = Vec::new();
    for &pid in &pids {
        assert_eq!(status_line(pid, "Seccomp:"), "2", "driver VM {pid}");
        assert_eq!(status_line(pid, "NoNewPrivs:"), "1", "driver VM {pid}");
        assert_eq!(status_line(pid, "CapEff:"), "0000000000000000", "driver VM {pid}");
        assert_eq!(status_line(pid, "CapBnd:"), "0000000000000000", "driver VM {pid}");
        let uid = status_line(pid, "Uid:");
        assert!(!uid.split(' ').any(|id| id == "0"), "driver VM {pid} runs as {uid}");
        assert_ne!(std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(), my_net, "driver VM {pid}");
        let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        root.sort();
        // The vmm and its libraries; a static vmm (the production build) has none.
        let expected: &[&str] = if dynamic_vmm { &["lib", "lib64", "vmm"] } else { &["vmm"] };
        assert_eq!(root, expected, "driver VM {pid}");
        // Its mounts: the jail's tmpfs as its root and the files bound into
        // it, every one read-only; none of the host's.
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            assert!(fields[5].split(',').any(|option| option == "ro"), "driver VM {pid}: a writable mount: {line}");
            let root_mount = fields[4] == "/";
            assert_eq!(line.contains(" - tmpfs drvm-jail "), root_mount, "driver VM {pid}: {line}");
        }
        // Each of its threads carries a filter of its own besides the
        // reflector's and the jail's (vmm::seccomp), so none can make a
        // thread or a process that shares its memory and would outlive
        // them: the reflector takes a killed vmm for ended once its threads
        // are past their end. The main and vCPU threads install theirs (a
        // standby's main thread just after starting its vCPU thread); a
        // newer kernel also runs KVM's huge-page recovery worker as a
        // thread of the VM's process (`kvm-nx-lpage-recovery`, kernel code
        // only), which inherits the filters of the thread it is made from.
        let filters_of_threads = || -> Vec<String> {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .map(|task| task.unwrap().file_name().to_string_lossy().parse::<u64>().unwrap())
                .map(|tid| status_line(tid, "Seccomp_filters:"))
                .collect()
        };
        reflector.wait_for(
            |_| {
                let filters = filters_of_threads();
                filters.len() >= 2 && filters.iter().all(|count| count == "3")
            },
            &format!("driver VM {pid}'s threads, each under its own filter"),
        );
        // Its one child, the address-space holder (vmm::address_space):
        // confined, no descriptor of the vmm's, lowest priority.
        // (started first thing in the vmm, which may not have got there yet)
        let children = |pid: u64| -> Vec<u64> {
            let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
            text.split_whitespace().map(|c| c.parse().unwrap()).collect()
        };
        reflector.wait_for(|_| !children(pid).is_empty(), &format!("driver VM {pid}'s holder"));
        let children = children(pid);
        let [holder] = children[..] else { panic!("driver VM {pid}: children {children:?}, not one holder") };
        // It confines itself, then blocks in `read` (system call 0) for good.
        let in_read =
            || std::fs::read_to_string(format!("/proc/{holder}/syscall")).is_ok_and(|text| text.starts_with("0 "));
        reflector.wait_for(|_| in_read(), &format!("holder {holder} to settle in its read"));
        assert_eq!(status_line(holder, "Seccomp:"), "2", "holder {holder}");
        // The reflector's, the jail's and its own.
        assert_eq!(status_line(holder, "Seccomp_filters:"), "3", "holder {holder}");
        assert_eq!(status_line(holder, "NoNewPrivs:"), "1", "holder {holder}");
        assert_ne!(status_line(holder, "SigBlk:"), "0000000000000000", "holder {holder}: every signal blocked");
        let stat = std::fs::read_to_string(format!("/proc/{holder}/stat")).unwrap();
        let nice = stat.rsplit(')').next().unwrap().split_whitespace().nth(16).unwrap();
        assert_eq!(nice, "19", "holder {holder}: {stat}");
        // Its own pipe, and the VM's and the vCPU's descriptors (so that
        // the VM's teardown happens in its exit, at its priority).
        let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{holder}/fd"))
            .unwrap()
            .map(|fd| std::fs::read_link(fd.unwrap().path()).unwrap().to_string_lossy().into_owned())
            .map(|target| if target.starts_with("pipe:") { "pipe".to_owned() } else { target })
            .collect();
        fds.sort();
        assert_eq!(fds, ["anon_inode:kvm-vcpu:0", "anon_inode:kvm-vm", "pipe", "pipe"], "holder {holder}");
        holders.push(holder);
    }
    // Each device's driver VMs share a network namespace of the device's
    // own (made once, joined by every restart): a spare shares its current
    // one's, no other device's.
    let mut networks = Vec::new();
    for device in devices.as_array().unwrap() {
        let mut of_device: Vec<_> = ["driver_pid", "spare_pid"]
            .iter()
            .filter_map(|key| device[key].as_u64().filter(|pid| *pid != 0))
            .map(|pid| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap())
            .collect();
        of_device.dedup();
        assert_eq!(of_device.len(), 1, "device {}: its driver VMs in {of_device:?}", device["device"]);
        networks.push(of_device.remove(0));
    }
    let mut distinct = networks.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), networks.len(), "two devices share a network namespace: {networks:?}");
    // Each device reports its driver VM's resident memory once its watch
    // has looked (once a second), as the kernel counts it.
    let rss_of_all = || -> Option<Vec<u64>> {
        let output = Command::new(env!("CARGO_BIN_EXE_reflector"))
            .args(["status", "--json", "--control"])
            .arg(&control)
            .output();
        let devices: serde_json::Value = serde_json::from_slice(&output.ok()?.stdout).ok()?;
        devices.as_array()?.iter().map(|device| device["driver_rss_kib"].as_u64().filter(|kib| *kib > 0)).collect()
    };
    reflector.wait_for(|_| rss_of_all().is_some(), "every device's driver VM memory in status");
    for (device, kib) in rss_of_all().unwrap().into_iter().enumerate() {
        let pid = devices[device]["driver_pid"].as_u64().unwrap();
        let kernel: u64 = status_line(pid, "VmRSS:").trim_end_matches(" kB").parse().unwrap();
        assert!(kib < 64 * 1024, "device {device}: {kib} KiB");
        // The same process as the kernel sees it (its memory moves a little).
        assert!(kib.abs_diff(kernel) < 4096, "device {device}: status {kib} KiB, the kernel {kernel} KiB");
    }
    reflector.stop();
    // The holders end with their vmms.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while holders.iter().any(|h| Path::new(&format!("/proc/{h}")).exists()) {
        assert!(std::time::Instant::now() < deadline, "a holder outlived its vmm: {holders:?}");
        std::thread::yield_now();
    }
}

/// Runs blk-load with verification; panics unless every request succeeded.
fn verified_load(socket: &Path, job: &str) {
    let output = Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(socket)
        .args(["--job", job, "--qd", "4", "--ios", "400", "--verify", "--timeout", "20"])
        .output()
        .unwrap();
    assert!(output.status.success(), "blk-load {job}: {}", String::from_utf8_lossy(&output.stderr));
}

fn control(control: &Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_reflector")).args(args).arg("--control").arg(control).output();
    String::from_utf8(output.unwrap().stdout).unwrap()
}

/// A jailed vmm that closes its standard output (where its report comes)
/// and runs on is not taken for ended: no fault, no recovery while it runs
/// (which would let the next driver VM and the replay into the channel
/// beside it). Killed, it has ended, and then its exit is a fault.
#[test]
fn a_jailed_vmm_that_closes_its_output_is_not_taken_for_ended() {
    if !kvm_available("a_jailed_vmm_that_closes_its_output_is_not_taken_for_ended") {
        return;
    }
    let scratch = Scratch::new("jail-mute");
    let (socket, ctl) = (scratch.join("d0.sock"), scratch.join("ctl"));
    let args = vec![
        "--vmm".to_string(),
        sibling("mute-vmm").display().to_string(),
        "--control".to_string(),
        ctl.display().to_string(),
        "--blk".to_string(),
        format!("socket={},image={},size=4M,name=d0,spare=off", socket.display(), scratch.join("d0.img").display()),
    ];
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "serving vhost-user-blk");
    reflector.wait_for(|_| ctl.exists(), "the control socket");
    reflector
        .wait_for(|r| r.log_text().contains("mute-vmm: closed its standard output"), "the vmm to close its output");
    // The reflector has read the pipe's end by now, or will within this
    // second; it must not take it for the vmm's end.
    let watched_until = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < watched_until {
        assert!(
            !reflector.log_text().contains("driver VM fault"),
            "a fault while the vmm runs:\n{}",
            reflector.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = reflector.driver_pid();
    let state = status_line(pid as u64, "State:");
    assert!(state.starts_with('S') || state.starts_with('R'), "the vmm {pid} runs: {state}");
    control(&ctl, &["kill", "d0"]);
    reflector.wait_for(|r| r.log_text().contains("driver VM fault"), "the killed vmm's exit as a fault");
    reflector.wait_for(|r| r.log_text().contains("driver VM restarted"), "a restart");
    reflector.stop();
}

#[test]
fn a_reflector_that_became_an_unprivileged_user_still_jails_and_recovers() {
    if !kvm_available("a_reflector_that_became_an_unprivileged_user_still_jails_and_recovers") {
        return;
    }
    let scratch = Scratch::new("jail-user");
    let (socket, ctl) = (scratch.join("d0.sock"), scratch.join("ctl"));
    let args = vec![
        // A user of its own, as docs/threat-model.md asks: whoever runs as
        // that user owns the driver VMs' user namespaces.
        "--user".to_string(),
        "4077:4077".to_string(),
        "--control".to_string(),
        ctl.display().to_string(),
        "--blk".to_string(),
        format!("socket={},image={},size=4M,name=d0,spare=on", socket.display(), scratch.join("d0.img").display()),
    ];
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "now running unprivileged");
    reflector.wait_for(|_| ctl.exists(), "the control socket");
    // No client is answered before the switch: a client waiting at the
    // start was served as root while the switch was under way.
    let serving =
        |r: &Reflector| ["control socket ready", "serving vhost-user-blk"].iter().all(|l| r.log_text().contains(l));
    reflector.wait_for(serving, "the device and control sockets served");
    let log = reflector.log_text();
    let switched = log.find("now running unprivileged").unwrap();
    for serving in ["serving vhost-user-blk", "control socket ready"] {
        assert!(log.find(serving).is_some_and(|at| at > switched), "{serving:?} before the switch:\n{log}");
    }
    let uid = status_line(u64::from(reflector.child.id()), "Uid:");
    assert!(uid.split(' ').all(|id| id == "4077"), "the reflector runs as its user: {uid}");
    assert_eq!(status_line(u64::from(reflector.child.id()), "CapEff:"), "0000000000000000");
    assert_eq!(status_line(u64::from(reflector.child.id()), "CapPrm:"), "0000000000000000");
    verified_load(&socket, "randwrite");
    // Kill the driver VM started while the reflector was root, then the one
    // started after the switch: each is replaced and the data survives.
    for round in 0..2 {
        let before: serde_json::Value = serde_json::from_str(control(&ctl, &["status", "--json"]).trim()).unwrap();
        let restarts = before[0]["restarts"].as_u64().unwrap();
        assert!(control(&ctl, &["kill", "d0"]).starts_with("ok"), "round {round}");
        reflector.wait_for(
            |_| {
                let now: serde_json::Value =
                    serde_json::from_str(control(&ctl, &["status", "--json"]).trim()).unwrap_or_default();
                now[0]["restarts"].as_u64().is_some_and(|r| r > restarts) && now[0]["state"] == "running"
            },
            "the driver VM to be replaced",
        );
        verified_load(&socket, "randread");
    }
    let status: serde_json::Value = serde_json::from_str(control(&ctl, &["status", "--json"]).trim()).unwrap();
    for key in ["driver_pid", "spare_pid"] {
        let Some(pid) = status[0][key].as_u64().filter(|pid| *pid != 0) else { continue };
        let uid = status_line(pid, "Uid:");
        assert!(uid.split(' ').all(|id| id == "4077"), "{key} {pid} runs as {uid}");
        assert_eq!(status_line(pid, "CapEff:"), "0000000000000000", "{key} {pid}");
        assert_eq!(status_line(pid, "Seccomp:"), "2", "{key} {pid}");
        assert!(status_line(pid, "NSpid:").ends_with(" 1"), "{key} {pid} is process 1 of its own PID namespace");
    }
    let log = reflector.stop();
    assert!(!log.contains("jail:"), "no jail step failed:\n{log}");
}

/// Each driver VM has a memory cap of its own: a device's current driver
/// VM and its spare run at once, and one that stays within its cap is never
/// killed for the other's allocation, nor blamed for the other's kill.
/// (Before each had a cgroup of its own, two driver VMs each taking 40 of a
/// 64 MiB cap got one of them killed, whichever was larger.)
#[test]
fn each_driver_vm_has_a_memory_cap_of_its_own() {
    use reflector::driver_vms::DriverProcess;
    use reflector::jail::{default_uid_base, Jail, JailLimits, Jailed};
    use reflector::supervisor::{DriverLauncher, DriverVm, DriverVmSpec};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EventFd;

    if !kvm_available("each_driver_vm_has_a_memory_cap_of_its_own") {
        return;
    }
    const CAP_MIB: u64 = 64;
    let hoarder = sibling("hoarding-vmm");
    let limits = JailLimits { memory: CAP_MIB << 20, ..JailLimits::default() };
    let jail = Arc::new(
        Jail::prepare_for(Jailed::Vmm(&hoarder), "hoard", 7, default_uid_base().unwrap(), limits, None).unwrap(),
    );
    assert_eq!(jail.memory_cap(), Some(CAP_MIB << 20), "this test needs the memory cgroup");
    let exited = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
    // A launcher whose driver VMs each take `mib` MiB.
    let launcher = |mib: u64| {
        let spec = DriverVmSpec {
            name: format!("hoard-{mib}"),
            vmm: hoarder.clone(),
            image: "null".into(),
            args: String::new(),
            memory: format!("{mib}M"),
            jail: Some(jail.clone()),
            hosted: false,
        };
        DriverLauncher::new(spec, Vec::new(), Vec::new(), Vec::new(), 0, exited.try_clone().unwrap())
    };
    let resident_mib = |vm: &DriverVm| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap_or_default();
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap_or("0 kB");
        kib.trim().trim_end_matches(" kB").parse::<u64>().unwrap_or(0) >> 10
    };
    // Until `vm` holds `mib` MiB or is gone.
    let settle = |vm: &DriverVm, mib: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while resident_mib(vm) < mib && vm.exit_report().is_none() {
            assert!(Instant::now() < deadline, "driver VM {} took {} of {mib} MiB in 30 s", vm.pid(), resident_mib(vm));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The current driver VM and its spare, each within the cap, together
    // above it.
    let (current, spare) = (launcher(40), launcher(40));
    let current = current.launch(&mut |_| Ok(())).unwrap();
    settle(&current, 40);
    let spare = spare.launch(&mut |_| Ok(())).unwrap();
    settle(&spare, 40);
    for (role, vm) in [("current", &current), ("spare", &spare)] {
        assert!(vm.exit_report().is_none(), "the {role} driver VM, within its own cap, was killed");
        assert!(!DriverProcess::capped(vm), "the {role} driver VM is blamed for a kill");
        assert!(resident_mib(vm) >= 40, "the {role} driver VM holds {} MiB", resident_mib(vm));
    }
    // A third that takes more than the cap is stopped, and only it is
    // blamed.
    let greedy = launcher(CAP_MIB * 2).launch(&mut |_| Ok(())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while greedy.exit_report().is_none() {
        assert!(Instant::now() < deadline, "a driver VM taking {} MiB was not stopped in 30 s", CAP_MIB * 2);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(DriverProcess::capped(&greedy), "the driver VM above its cap is not reported as killed by it");
    for (role, vm) in [("current", &current), ("spare", &spare)] {
        assert!(vm.exit_report().is_none(), "the {role} driver VM died with another's allocation");
        assert!(!DriverProcess::capped(vm), "the {role} driver VM is blamed for another's kill");
    }
    for vm in [&current, &spare] {
        assert!(vm.kill_and_wait(Duration::from_secs(10)), "driver VM {} did not end when killed", vm.pid());
    }
    // Reaped before the test ends, so that the jail ends here and takes
    // its cgroups with it (ci/e2e-cgroup2.sh looks for any left behind).
    for vm in [&current, &spare, &greedy] {
        assert!(vm.wait_released(Duration::from_secs(10)), "driver VM {} was not reaped", vm.pid());
    }
}

/// A driver VM's CPU time counts every process its vmm makes, where its
/// memory cgroup is its own (cgroup v2): a vmm that clones a child sharing
/// its memory, which spins while the vmm sleeps, is seen spinning. Before,
/// the watch read the vmm's own time, which leaves such a child out (a
/// review found it). On cgroup v1 a driver VM has no CPU count of its own,
/// and the gap stays (the threat model says so).
#[test]
fn a_driver_vms_cpu_time_counts_the_processes_its_vmm_makes() {
    use reflector::jail::{default_uid_base, Jail, JailLimits, Jailed};
    use reflector::supervisor::{DriverLauncher, DriverVmSpec};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EventFd;

    if !kvm_available("a_driver_vms_cpu_time_counts_the_processes_its_vmm_makes") {
        return;
    }
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        eprintln!("skipped: on cgroup v1 a driver VM has no CPU count of its own (ci/e2e-cgroup2.sh runs this)");
        return;
    }
    let hoarder = sibling("hoarding-vmm");
    let jail = Arc::new(
        Jail::prepare_for(Jailed::Vmm(&hoarder), "spin", 10, default_uid_base().unwrap(), JailLimits::default(), None)
            .unwrap(),
    );
    assert!(jail.memory_cap().is_some(), "this test needs the memory cgroup (a driver VM's own)");
    let exited = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
    let spec = DriverVmSpec {
        name: "spin".into(),
        vmm: hoarder.clone(),
        image: "null".into(),
        args: "spin-in-a-child".into(),
        memory: "1M".into(),
        jail: Some(jail.clone()),
        hosted: false,
    };
    let launcher = DriverLauncher::new(spec, Vec::new(), Vec::new(), Vec::new(), 0, exited.try_clone().unwrap());
    let vm = launcher.launch(&mut |_| Ok(())).unwrap();
    let own = || reflector::driver_watch::process_cpu_time(vm.pid()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Until what `beyond` says of the count reaches `more`.
    let wait_for = |more: Duration, beyond: &dyn Fn() -> Duration| {
        while vm.cpu_time().unwrap().saturating_sub(beyond()) < more {
            assert!(vm.exit_report().is_none(), "the spinning vmm ended: {:?}", vm.exit_report());
            assert!(Instant::now() < deadline, "its child's spinning was not counted: {:?}", vm.cpu_time());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Past its start, however slow the machine: the count holds 100 ms
    // more than the vmm's own, its child's (cloned after the start, the vmm
    // then sleeping on its standard input).
    wait_for(Duration::from_millis(100), &own);
    let (own_before, counted_before) = (own(), vm.cpu_time().unwrap());
    wait_for(Duration::from_millis(500), &|| counted_before);
    let (own_grew, counted_grew) = (own() - own_before, vm.cpu_time().unwrap() - counted_before);
    assert!(
        own_grew * 4 < counted_grew,
        "the vmm itself took {own_grew:?} of {counted_grew:?}: its child did not spin apart from it"
    );
    assert!(vm.kill_and_wait(Duration::from_secs(10)), "the vmm did not end when killed");
    assert!(vm.wait_released(Duration::from_secs(10)), "the vmm was not reaped");
}

/// A driver VM's memory cgroup is its own from its start until it is
/// reaped: slots are handed out once each, a freed one is handed out
/// again, and only when every slot is held are they shared (and a shared
/// slot's release frees nothing its holder still uses).
#[test]
fn memory_slots_are_held_until_released_and_shared_only_when_all_are_held() {
    use reflector::jail::{default_uid_base, Jail, JailLimits, Jailed, MemorySlot, MEMORY_SLOTS};
    use std::sync::Arc;

    if !kvm_available("memory_slots_are_held_until_released_and_shared_only_when_all_are_held") {
        return;
    }
    let program = sibling("hoarding-vmm");
    let limits = JailLimits::default();
    let jail = Arc::new(
        Jail::prepare_for(Jailed::Vmm(&program), "slots", 8, default_uid_base().unwrap(), limits, None).unwrap(),
    );
    let mut held: Vec<MemorySlot> = (0..MEMORY_SLOTS).map(|_| Jail::lease(&jail).unwrap()).collect();
    let mut indices: Vec<usize> = held.iter().map(MemorySlot::index).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..MEMORY_SLOTS).collect::<Vec<_>>(), "each driver VM gets a slot of its own");
    assert!(held.iter().all(MemorySlot::exclusive));
    // Each holder's CPU count (cgroup v2 only) is good until another
    // joins its slot.
    let counts: Vec<_> = held.iter().map(|slot| (slot.index(), slot.cpu_time())).collect();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if v2 {
        assert!(counts.iter().all(|(_, count)| count.as_ref().is_some_and(|c| c.read().is_ok())));
    }
    // All held: the next is shared, and letting it go frees no slot.
    let shared = Jail::lease(&jail).unwrap();
    assert!(!shared.exclusive(), "slot {} handed out twice as exclusive", shared.index());
    assert!(shared.cpu_time().is_none(), "a shared slot's CPU time was taken as the newcomer's own");
    for (index, count) in counts.iter().filter_map(|(index, count)| Some((*index, count.as_ref()?))) {
        // The holder's count now has the newcomer's time in it (before,
        // it was read as the holder's own: a review found it).
        assert_eq!(count.read().is_ok(), index != shared.index(), "slot {index}, shared {}", shared.index());
    }
    drop(shared);
    assert!(!Jail::lease(&jail).unwrap().exclusive(), "a shared slot's release freed its holder's slot");
    // A reaped driver VM's slot is the next one's.
    let freed = held.remove(1).index();
    let next = Jail::lease(&jail).unwrap();
    assert_eq!((next.index(), next.exclusive()), (freed, true));
}

/// A jailed driver VM runs under its device's limits, whichever cgroup
/// hierarchy the host has: its memory cgroup caps it at the device's
/// `memory=`, and the cgroups of its CPU quota and task limit hold it. Run
/// on this machine (cgroup v1) by the test command, and on a pure cgroup v2
/// kernel, from a service's cgroup as systemd makes one, by
/// `ci/e2e-cgroup2.sh` (before it ran there, a reflector in such a cgroup
/// jailed its driver VMs with no limit at all: the kernel refuses
/// controllers to the children of a cgroup that holds processes).
#[test]
fn a_jailed_driver_vm_runs_under_its_devices_limits() {
    use reflector::jail::{default_uid_base, Jail, JailLimits, Jailed};
    use reflector::supervisor::{DriverLauncher, DriverVmSpec};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    if !kvm_available("a_jailed_driver_vm_runs_under_its_devices_limits") {
        return;
    }
    let hoarder = sibling("hoarding-vmm");
    let limits = JailLimits { cpu: 0.5, memory: 48 << 20, tasks: 24 };
    let jail = Arc::new(
        Jail::prepare_for(Jailed::Vmm(&hoarder), "limits", 9, default_uid_base().unwrap(), limits, None).unwrap(),
    );
    assert_eq!(jail.memory_cap(), Some(48 << 20), "no memory cgroups for the jail (see the reflector's warning)");
    let spec = DriverVmSpec {
        name: "limits".into(),
        vmm: hoarder.clone(),
        image: "null".into(),
        args: String::new(),
        memory: "1M".into(),
        jail: Some(jail.clone()),
        hosted: false,
    };
    let exited = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
    let vm = DriverLauncher::new(spec, Vec::new(), Vec::new(), Vec::new(), 0, exited).launch(&mut |_| Ok(())).unwrap();
    let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.pid())).unwrap();
    let read = |dir: &PathBuf, file: &str| -> String {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{}: {e} (membership: {membership})", dir.join(file).display()))
            .trim()
            .to_owned()
    };
    // cgroup v2: one line, `0::/path`; v1: a line per hierarchy.
    let unified = membership.lines().find_map(|l| l.strip_prefix("0::")).filter(|_| membership.lines().count() == 1);
    // The swap limit, where the kernel accounts swap: none beyond the cap.
    let swap = |dir: &PathBuf, file: &str, expected: String| {
        if dir.join(file).exists() {
            assert_eq!(read(dir, file), expected, "{file}: swap past the cap; membership: {membership}");
        }
    };
    let (memory, cpu, tasks, dirs) = match unified {
        Some(path) => {
            let leaf = PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            let device = leaf.parent().unwrap().to_path_buf();
            let (quota, period) =
                read(&device, "cpu.max").split_once(' ').map(|(q, p)| (q.to_owned(), p.to_owned())).unwrap();
            swap(&leaf, "memory.swap.max", "0".to_owned());
            (read(&leaf, "memory.max"), (quota, period), read(&device, "pids.max"), vec![device])
        }
        None => {
            let dir = |controller: &str| v1_cgroup_dir(&membership, controller);
            let cpu = dir("cpu");
            let quota = (read(&cpu, "cpu.cfs_quota_us"), read(&cpu, "cpu.cfs_period_us"));
            swap(&dir("memory"), "memory.memsw.limit_in_bytes", (48u64 << 20).to_string());
            let memory = dir("memory");
            let dirs = vec![cpu, dir("pids"), memory.clone(), memory.parent().unwrap().to_path_buf()];
            (read(&memory, "memory.limit_in_bytes"), quota, read(&dir("pids"), "pids.max"), dirs)
        }
    };
    assert_eq!(memory, (48u64 << 20).to_string(), "memory cap; membership: {membership}");
    assert_eq!(cpu, ("50000".to_owned(), "100000".to_owned()), "CPU quota and period; membership: {membership}");
    assert_eq!(tasks, "24", "task limit; membership: {membership}");
    assert!(vm.kill_and_wait(std::time::Duration::from_secs(10)), "driver VM {} did not end when killed", vm.pid());
    // The vmm has closed its files, which is what a kill waits for; its
    // last threads and the holder of its address space may still be
    // exiting in the cgroups. The jail's end waits for them and removes
    // every cgroup it made (they were left behind, found by
    // ci/e2e-cgroup2.sh).
    assert!(vm.wait_released(std::time::Duration::from_secs(10)), "driver VM {} was not reaped", vm.pid());
    drop(vm);
    assert_eq!(Arc::strong_count(&jail), 1, "the driver VM let go of its jail");
    drop(jail);
    for dir in dirs {
        assert!(!dir.exists(), "{} is left behind after its jail ended", dir.display());
    }
}

/// The cgroups a reflector that was killed left behind are removed when
/// the next one starts (`jail::prepare_cgroups`), and those of a reflector
/// still running are not; only in the cgroup the reflector is in (v1's
/// memory hierarchy here, the unified one in `ci/e2e-cgroup2.sh`).
#[test]
fn cgroups_of_a_reflector_that_is_gone_are_swept_and_no_others() {
    if !kvm_available("cgroups_of_a_reflector_that_is_gone_are_swept_and_no_others") {
        return;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let parent = if v2 {
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap().trim_start_matches('/');
        // Once moved into its own leaf, the devices' cgroups are beside it.
        let leaf = format!("/{}", reflector::jail::OWN_LEAF);
        let path = path.strip_suffix(leaf.as_str()).unwrap_or(path);
        PathBuf::from("/sys/fs/cgroup").join(path)
    } else {
        v1_cgroup_dir(&own, "memory")
    };
    // A pid no process has: the owner of the stale cgroups is gone.
    let gone = (1..).map(|i| 4_000_000 - i).find(|pid| !PathBuf::from(format!("/proc/{pid}")).exists()).unwrap();
    let stale = parent.join(format!("driver-vms-{gone}-swept"));
    let live = parent.join(format!("driver-vms-{}-kept", std::process::id()));
    for dir in [&stale, &live] {
        std::fs::create_dir_all(dir.join("vm0")).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    }
    reflector::jail::prepare_cgroups();
    let (stale_left, live_left) = (stale.exists(), live.join("vm0").exists());
    for dir in [&stale, &live] {
        let _ = std::fs::remove_dir(dir.join("vm0"));
        let _ = std::fs::remove_dir(dir);
    }
    assert!(!stale_left, "the cgroups of a reflector that is gone were left: {}", stale.display());
    assert!(live_left, "the cgroups of a running reflector were swept: {}", live.display());
}

/// A reflector that stops (SIGTERM) takes its devices' cgroups with it,
/// whichever hierarchy holds them: before, every stop left each device's
/// CPU, task and memory cgroups behind until the next start's sweep (the
/// devices still held their jails when the process ended).
#[test]
fn a_reflector_that_stops_leaves_no_cgroup_behind() {
    if !kvm_available("a_reflector_that_stops_leaves_no_cgroup_behind") {
        return;
    }
    let scratch = Scratch::new("jail-stop");
    let (d0, d1) = (scratch.join("d0.sock"), scratch.join("d1.sock"));
    let args = vec![
        "--blk".to_string(),
        format!("socket={},image={},size=4M,name=d0,spare=warm", d0.display(), scratch.join("d0.img").display()),
        "--blk".to_string(),
        format!("socket={},image={},size=4M,name=d1", d1.display(), scratch.join("d1.img").display()),
    ];
    let reflector = Reflector::start(&args, scratch.join("log"), &d1);
    let pid = reflector.child.id();
    let cgroups = common::DeviceCgroups::of(pid);
    assert!(!cgroups.list().is_empty(), "no cgroup of the reflector's devices: is it jailing with limits?");
    let log = reflector.stop();
    assert_eq!(
        cgroups.list(),
        Vec::<PathBuf>::new(),
        "cgroups left behind by a reflector that stopped; its log:\n{log}"
    );
}

/// The directory, in `controller`'s cgroup v1 hierarchy, of the cgroup
/// `membership` (a /proc/PID/cgroup) names.
fn v1_cgroup_dir(membership: &str, controller: &str) -> PathBuf {
    let path = membership
        .lines()
        .filter_map(|l| l.split_once(':').and_then(|(_, rest)| rest.split_once(':')))
        .find(|(controllers, _)| controllers.split(',').any(|c| c == controller))
        .map(|(_, path)| path.trim_start_matches('/').to_owned())
        .unwrap_or_else(|| panic!("no {controller} hierarchy in {membership}"));
    PathBuf::from("/sys/fs/cgroup").join(controller).join(path)
}

/// A vmm ends when its lifeline (standard input) closes only if it
/// cooperates. One that does not (its guest took it over) must still not
/// outlive a reflector that was killed, with no chance to stop it: its
/// keeper watches the reflector and kills it.
#[test]
fn a_vmm_that_ignores_its_lifeline_does_not_outlive_a_killed_reflector() {
    if !kvm_available("a_vmm_that_ignores_its_lifeline_does_not_outlive_a_killed_reflector") {
        return;
    }
    let scratch = Scratch::new("jail-outlive");
    let socket = scratch.join("d0.sock");
    let args = vec![
        "--vmm".to_string(),
        sibling("hoarding-vmm").display().to_string(),
        "--blk".to_string(),
        format!(
            "socket={},image={},size=4M,name=d0,spare=off,driver_args=ignore-lifeline",
            socket.display(),
            scratch.join("d0.img").display()
        ),
    ];
    let mut reflector = Reflector::start_with(&args, scratch.join("log"), &socket, "serving vhost-user-blk");
    let vmm = reflector.driver_pid();
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    };
    assert!(alive(vmm), "the driver VM {vmm} is not running");
    // The keeper holds the reflector's uid range claim until its vmm has
    // ended: a reflector started meanwhile cannot take the range, and with
    // it uids a process of the dead one may still run under.
    let keeper = status_line(vmm as u64, "PPid:");
    let claim = std::fs::read_dir(format!("/proc/{keeper}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .find(|target| target.starts_with(reflector::jail::UID_RANGE_CLAIMS))
        .unwrap_or_else(|| panic!("the keeper {keeper} of vmm {vmm} holds no uid range claim"));
    let range: u32 = claim.file_name().unwrap().to_str().unwrap().parse().unwrap();
    let claims: std::os::fd::OwnedFd = std::fs::File::open(reflector::jail::UID_RANGE_CLAIMS).unwrap().into();
    let cgroups = common::DeviceCgroups::of(reflector.child.id());
    reflector.child.kill().unwrap();
    reflector.child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // The claim first, then whether the vmm still runs: its keeper
        // ends only after it, so a vmm seen running after the try means
        // the keeper held the claim during it.
        let taken = reflector::jail::UidRangeClaim::claim(&claims, range).unwrap();
        if !alive(vmm) {
            break;
        }
        assert!(taken.is_none(), "uid range {range} was taken while its vmm {vmm} still ran");
        assert!(std::time::Instant::now() < deadline, "the vmm {vmm} outlived the killed reflector");
        std::thread::yield_now();
    }
    // Nothing of the device runs on in its cgroups (its keeper neither):
    // they empty and can be removed, as the next reflector's sweep does.
    fn remove(dir: &Path, deadline: std::time::Instant) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove(&entry.path(), deadline);
            }
        }
        while let Err(error) = std::fs::remove_dir(dir) {
            if error.kind() == std::io::ErrorKind::NotFound {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{} stays busy: {error}", dir.display());
            std::thread::yield_now();
        }
    }
    for dir in cgroups.list() {
        remove(&dir, deadline);
    }
}

/// A reflector stopped while a client keeps its device busy still ends the
/// device's driver VMs and removes its cgroups. The stop takes the device
/// from its worker between two events; it now waits (bounded) for such a
/// moment instead of giving up at the first try, which left the driver VMs
/// to end on their own and their cgroups behind. That first try found the
/// worker between events in every run here (seven), so this test guards
/// the whole stop under load more than it catches that race.
#[test]
fn a_reflector_stopped_under_load_ends_its_driver_vms_and_leaves_no_cgroup_behind() {
    if !kvm_available("a_reflector_stopped_under_load_ends_its_driver_vms_and_leaves_no_cgroup_behind") {
        return;
    }
    let scratch = Scratch::new("jail-stop-load");
    let (socket, ctl) = (scratch.join("d0.sock"), scratch.join("ctl"));
    let args = vec![
        "--control".to_string(),
        ctl.display().to_string(),
        "--blk".to_string(),
        format!("socket={},image={},size=8M,name=d0,spare=warm", socket.display(), scratch.join("d0.img").display()),
    ];
    let mut reflector = Reflector::start(&args, scratch.join("log"), &socket);
    reflector.wait_for(|_| ctl.exists(), "the control socket");
    let mut load =
        common::spawn_blk_load(&socket, &["--job", "randread", "--qd", "32", "--seconds", "60", "--timeout", "90"]);
    let status = || -> serde_json::Value {
        serde_json::from_str(control(&ctl, &["status", "--json"]).trim()).unwrap_or_default()
    };
    reflector.wait_for(
        |_| status()[0]["completed"].as_u64().is_some_and(|n| n > 2000) && status()[0]["spare_pid"].as_u64().is_some(),
        "the load to flow and the spare to start",
    );
    let now = status();
    let pids: Vec<i32> =
        ["driver_pid", "spare_pid"].iter().filter_map(|key| now[0][key].as_i64()).map(|p| p as i32).collect();
    assert_eq!(pids.len(), 2, "{now}");
    let cgroups = common::DeviceCgroups::of(reflector.child.id());
    let log = reflector.stop();
    let _ = load.kill();
    let _ = load.wait();
    assert!(!log.contains("busy at shutdown"), "the stop gave up on the busy device:\n{log}");
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, a zombie, or in its exit (PF_EXITING: a killed vmm whose
        // keeper was killed too may still be releasing its files, and never
        // runs its own code again).
        const PF_EXITING: u64 = 0x4;
        let flags = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
        let ended = stat.is_empty() || stat.contains(") Z") || flags.is_some_and(|flags| flags & PF_EXITING != 0);
        assert!(ended, "driver VM {pid} outlived the reflector's stop: {stat}");
    }
    assert_eq!(cgroups.list(), Vec::<PathBuf>::new(), "cgroups left behind by a reflector stopped under load:\n{log}");
}

/// A jail refused after its cgroups could have been made (here: a device
/// index past the ids the reflector hands out) leaves none behind: no jail
/// exists whose drop would remove them.
#[test]
fn a_jail_that_cannot_be_made_leaves_no_cgroup_behind() {
    use reflector::jail::{default_uid_base, Jail, JailLimits, Jailed, DEVICE_MODEL_IDS};

    if !kvm_available("a_jail_that_cannot_be_made_leaves_no_cgroup_behind") {
        return;
    }
    let program = sibling("hoarding-vmm");
    let limits = JailLimits::default();
    let refused = Jail::prepare_for(
        Jailed::Vmm(&program),
        "refused",
        DEVICE_MODEL_IDS,
        default_uid_base().unwrap(),
        limits,
        None,
    );
    assert!(refused.is_err(), "a device index past the ids handed out was accepted");
    let left: Vec<PathBuf> = common::DeviceCgroups::of(std::process::id())
        .list()
        .into_iter()
        .filter(|dir| dir.file_name().is_some_and(|name| name.to_string_lossy().ends_with("-refused")))
        .collect();
    assert_eq!(left, Vec::<PathBuf>::new(), "cgroups of a jail that was refused");
}
