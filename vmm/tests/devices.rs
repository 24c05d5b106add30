//! Doorbells (ioeventfd), interrupt lines (eventfds the guest waits on) and windows (file
//! mappings) in real KVM guests.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::{AsRawFd, FromRawFd};

use common::{inheritable_eventfd, kvm_available, output, report, signal_eventfd, vmm, wait_eventfd, TempDir};

/// Plays the device side of `pingpong`: answers each doorbell with an
/// interrupt. Returns the rounds seen and the report.
fn ping_pong(doorbell_spec: &str, rounds: u32) -> (u32, serde_json::Value) {
    let doorbell = inheritable_eventfd();
    let interrupt = inheritable_eventfd();
    let doorbell_arg = format!("{doorbell_spec},fd={}", doorbell.as_raw_fd());
    let irq_arg = format!("fd={}", interrupt.as_raw_fd());
    let child = vmm()
        .args(["run", "--json", "--image", "pingpong", "--timeout", "60s", "--cmdline", &rounds.to_string()])
        .args(["--doorbell", &doorbell_arg, "--irq", &irq_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let mut seen = 0;
    // 30 s per doorbell is a hang guard only.
    while seen < rounds {
        match wait_eventfd(&doorbell, 30_000) {
            Some(count) => {
                assert_eq!(count, 1, "the guest rang twice without waiting for the interrupt");
                seen += 1;
                signal_eventfd(&interrupt);
            }
            None => break,
        }
    }
    let out = child.wait_with_output().expect("wait for vmm");
    (seen, report(&out))
}

#[test]
fn mmio_doorbell_and_interrupt_line_round_trip() {
    if !kvm_available("mmio_doorbell_and_interrupt_line_round_trip") {
        return;
    }
    let (seen, report) = ping_pong("mmio=0x50000000", 200);
    assert_eq!(seen, 200, "{report}");
    assert_eq!(report["outcome"], "exit", "{report}");
    assert_eq!(report["code"], 0);
}

#[test]
fn port_doorbell_round_trips() {
    if !kvm_available("port_doorbell_round_trips") {
        return;
    }
    let (seen, report) = ping_pong("port=0x600,len=4", 50);
    assert_eq!(seen, 50, "{report}");
    assert_eq!(report["outcome"], "exit", "{report}");
}

#[test]
fn without_interrupt_line_the_driver_reports_what_is_missing() {
    if !kvm_available("without_interrupt_line_the_driver_reports_what_is_missing") {
        return;
    }
    let doorbell = inheritable_eventfd();
    let spec = format!("mmio=0x50000000,fd={}", doorbell.as_raw_fd());
    let out = output(vmm().args(["run", "--json", "--image", "pingpong", "--doorbell", &spec]));
    assert_eq!(report(&out)["code"], guest_abi::exit_code::DRIVER_FAILED);
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupt line 0 missing"));
}

#[test]
fn windows_map_files_both_ways() {
    if !kvm_available("windows_map_files_both_ways") {
        return;
    }
    let dir = TempDir::new("mirror");
    let input: Vec<u8> = (0..16384u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let input_path = dir.file("in", &input);
    let output_path = dir.file("out", &[0u8; 16384]);
    let in_spec = format!("0x40000000,16K,{},ro,name=in", input_path.display());
    // An offset into the output file, to check offsets too.
    let out_spec = format!("0x40200000,8K,{},offset=8K,name=out", output_path.display());
    let out = output(vmm().args(["run", "--json", "--image", "mirror", "--window", &in_spec, "--window", &out_spec]));
    assert_eq!(report(&out)["outcome"], "exit", "{}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read(&output_path).unwrap();
    assert_eq!(&written[..8192], &[0u8; 8192][..], "bytes before the offset must be untouched");
    assert_eq!(&written[8192..], &input[..8192], "the guest's copy must reach the file");
}

#[test]
fn writing_a_read_only_window_faults() {
    if !kvm_available("writing_a_read_only_window_faults") {
        return;
    }
    let dir = TempDir::new("ro");
    let path = dir.file("regs", &[0x11u8; 4096]);
    let spec = format!("0x40000000,4K,{},ro", path.display());
    let out =
        output(vmm().args(["run", "--json", "--image", "faulty", "--cmdline", "write-window", "--window", &spec]));
    let report = report(&out);
    assert_eq!(report["outcome"], "exception", "{report}");
    assert_eq!(report["vector"], 14);
    assert_eq!(report["fault_address"], 0x4000_0000u64);
    assert_eq!(report["error_code"].as_u64().unwrap() & 0b111, 0b111, "a user write to a present page");
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x11u8; 4096], "the file must be unchanged");

    let writable = format!("0x40000000,4K,{}", path.display());
    let out =
        output(vmm().args(["run", "--json", "--image", "faulty", "--cmdline", "write-window", "--window", &writable]));
    assert_eq!(common::report(&out)["outcome"], "exit");
    assert_eq!(std::fs::read(&path).unwrap()[0], 0x5a, "a writable window's write reaches the file");
}

#[test]
fn a_memfd_window_is_shared_with_its_creator() {
    if !kvm_available("a_memfd_window_is_shared_with_its_creator") {
        return;
    }
    let dir = TempDir::new("memfd");
    let input = dir.file("in", &[0xabu8; 4096]);
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vmm-test-window".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor we own.
    let memfd = unsafe { std::fs::File::from(std::os::fd::OwnedFd::from_raw_fd(fd)) };
    memfd.set_len(4096).unwrap();
    let out_spec = format!("0x40200000,4K,/proc/{}/fd/{},name=out", std::process::id(), memfd.as_raw_fd());
    let in_spec = format!("0x40000000,4K,{},ro,name=in", input.display());
    let out = output(vmm().args(["run", "--json", "--image", "mirror", "--window", &in_spec, "--window", &out_spec]));
    assert_eq!(report(&out)["outcome"], "exit", "{}", String::from_utf8_lossy(&out.stderr));
    let mut contents = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Seek::rewind(&mut &memfd).map(|_| &memfd).unwrap(), &mut contents)
        .unwrap();
    assert_eq!(contents, vec![0xabu8; 4096], "the guest's writes must be visible through the memfd");
}

/// Starts `hello` as a standby (`--start-fd`), logging at info level, and
/// waits (bounded) until it says it stands by. Returns the child, its start
/// eventfd and the standard error read so far, still being read.
fn standby(name: &str) -> (std::process::Child, std::os::fd::OwnedFd, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let start = inheritable_eventfd();
    let mut child = vmm()
        .args(["run", "--json", "--exit-on-stdin-close", "--image", "hello", "--name", name])
        .args(["--cmdline", "standby-marker", "--start-fd", &format!("fd={}", start.as_raw_fd())])
        .env("VMM_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut seen = String::new();
    while !seen.contains("standing by") {
        // A hang guard, not a timing assertion.
        match received.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) => seen.push_str(&(line + "\n")),
            Err(_) => panic!("the standby never said it stands by: {seen}"),
        }
    }
    assert!(!seen.contains("standby-marker"), "the guest ran before its start signal: {seen}");
    (child, start, received)
}

#[test]
fn a_standby_runs_no_guest_code_until_started() {
    use std::io::Write;
    if !kvm_available("a_standby_runs_no_guest_code_until_started") {
        return;
    }
    // Asked to stop and report while standing by: it ends without its guest
    // having printed anything.
    let (mut child, _start, _) = standby("idle");
    // Kept open until it has ended: a closed lifeline ends it without a report.
    let mut lifeline = child.stdin.take().unwrap();
    lifeline.write_all(b"w").unwrap();
    let status = child.wait().unwrap();
    drop(lifeline);
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(report["outcome"], "stopped", "{report} ({status})");
    assert!(report["ready_us"].is_null(), "a standby's guest never ran: {report}");

    // Started: the guest boots and runs to its end.
    let (mut child, start, lines) = standby("started");
    let lifeline = child.stdin.take().unwrap();
    signal_eventfd(&start);
    let status = child.wait().unwrap();
    drop(lifeline);
    let console: String = lines.iter().collect::<Vec<_>>().join("\n");
    assert!(status.success(), "{status}: {console}");
    assert!(console.contains("command line: standby-marker"), "{console}");
}

#[test]
fn a_start_fd_that_is_not_an_open_descriptor_is_refused() {
    let out = output(vmm().args(["run", "--image", "hello", "--start-fd", "fd=77"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--start-fd"), "{stderr}");
}
