//! Boots every built-in image in a real KVM guest and checks the reported
//! outcome of each way a guest can end.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::{kvm_available, output, run_json, vmm, TempDir};

/// Where `faulty page-fault` reads (driver-vm/src/bin/faulty.rs).
const FAULTY_UNMAPPED_ADDRESS: u64 = 0x7f00_dead_0000;

#[test]
fn hello_prints_its_command_line_and_exits_zero() {
    if !kvm_available("hello_prints_its_command_line_and_exits_zero") {
        return;
    }
    let dir = TempDir::new("hello");
    let console = dir.path().join("console.log");
    let (status, report) = run_json(&[
        "--image",
        "hello",
        "--cmdline",
        "alpha beta",
        "--name",
        "greeter",
        "--console",
        console.to_str().unwrap(),
    ]);
    assert_eq!(status, 0, "{report}");
    assert_eq!(report["outcome"], "exit");
    assert_eq!(report["code"], 0);
    assert_eq!(report["vm"], "greeter");
    assert!(report["ready_us"].as_u64().is_some(), "the guest must signal ready: {report}");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("[greeter] hello from a driver VM (16 MiB RAM)"), "{text}");
    assert!(text.contains("[greeter] command line: alpha beta"), "{text}");
    let sum: u64 = (0..8192u64).map(|i| i * i).sum();
    assert!(text.contains(&format!("[greeter] heap: 8192 values, sum {sum}")), "{text}");
    assert!(text.contains("[greeter] sse: 1/3 = 0.333333"), "{text}");
}

#[test]
fn console_goes_to_stderr_with_the_vm_name() {
    if !kvm_available("console_goes_to_stderr_with_the_vm_name") {
        return;
    }
    let out = output(vmm().args(["run", "--image", "hello", "--memory", "4M"]));
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[hello] hello from a driver VM (4 MiB RAM)"), "{stderr}");
    assert!(stderr.contains("vmm: hello exited with code 0"), "{stderr}");
}

#[test]
fn panic_is_reported_with_its_message() {
    if !kvm_available("panic_is_reported_with_its_message") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "panic"]);
    assert_eq!(status, 10, "{report}");
    assert_eq!(report["outcome"], "panic");
    let message = report["message"].as_str().unwrap();
    assert!(message.contains("faulty driver: panic requested"), "{message}");
    assert!(message.contains("faulty.rs"), "the location is part of the message: {message}");
}

#[test]
fn page_fault_reports_vector_address_and_ring() {
    if !kvm_available("page_fault_reports_vector_address_and_ring") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "page-fault"]);
    assert_eq!(status, 11, "{report}");
    assert_eq!(report["outcome"], "exception");
    assert_eq!(report["vector"], 14);
    assert_eq!(report["name"], "page_fault");
    assert_eq!(report["fault_address"], FAULTY_UNMAPPED_ADDRESS);
    assert_eq!(report["ring"], 3);
    let error_code = report["error_code"].as_u64().unwrap();
    assert_eq!(error_code & 0b101, 0b100, "a user-mode read of a non-present page: {error_code:#x}");
    let rip = report["rip"].as_u64().unwrap();
    assert!((0x10_0000..0x20_0000).contains(&rip), "rip {rip:#x} must be inside the image");
    // The crash names the source line of the planted bug (issue 13): the
    // line of faulty.rs that reads the unmapped address.
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../driver-vm/src/bin/faulty.rs")).unwrap();
    let planted =
        source.lines().position(|l| l.contains("(UNMAPPED_ADDRESS as *const u64).read_volatile()")).unwrap() + 1;
    let location = &report["location"];
    assert!(location["file"].as_str().unwrap().ends_with("driver-vm/src/bin/faulty.rs"), "{report}");
    assert_eq!(location["line"].as_u64(), Some(planted as u64), "{report}");
    let text = output(vmm().args(["run", "--image", "faulty", "--cmdline", "page-fault"]));
    let text = String::from_utf8_lossy(&text.stderr);
    assert!(text.contains(&format!("faulty.rs:{planted})")), "the text report names the line: {text}");
}

#[test]
fn invalid_instruction_is_reported() {
    if !kvm_available("invalid_instruction_is_reported") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "illegal"]);
    assert_eq!(status, 11, "{report}");
    assert_eq!(report["outcome"], "exception");
    assert_eq!(report["vector"], 6);
    assert_eq!(report["name"], "invalid_opcode");
    assert!(report.get("fault_address").is_none());
}

#[test]
fn a_ring3_hlt_is_a_general_protection_fault() {
    if !kvm_available("a_ring3_hlt_is_a_general_protection_fault") {
        return;
    }
    // The guest sleeps with `port::WAIT_LINES`; nothing in ring 0 turns a
    // `hlt` into a sleep any more.
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "halt"]);
    assert_eq!(status, 11, "{report}");
    assert_eq!(report["outcome"], "exception");
    assert_eq!(report["name"], "general_protection", "{report}");
}

#[test]
fn a_driver_vm_has_no_interrupt_controller_to_poke() {
    if !kvm_available("a_driver_vm_has_no_interrupt_controller_to_poke") {
        return;
    }
    // The master PIC's command port: with an in-kernel irqchip (a VM with
    // interrupt lines had one) KVM would answer it; a driver VM has none,
    // so the access ends the VM.
    let line = common::inheritable_eventfd();
    let irq = format!("fd={}", std::os::fd::AsRawFd::as_raw_fd(&line));
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "poke-pic", "--irq", &irq]);
    assert_eq!(status, 15, "{report}");
    assert_eq!(report["outcome"], "invalid_access", "{report}");
    assert_eq!(report["address"], 0x20, "{report}");
}

/// The 1-based line of `driver-vm/src/bin/faulty.rs` whose text contains
/// `marker` (the planted bugs are marked `planted: ...`).
fn planted_line(marker: &str) -> u64 {
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../driver-vm/src/bin/faulty.rs")).unwrap();
    let index = source.lines().position(|line| line.contains(marker));
    index.unwrap_or_else(|| panic!("no line with {marker:?} in faulty.rs")) as u64 + 1
}

/// Asserts `location` (a report's) is in faulty.rs, at a line in `lines`.
fn assert_in_faulty(location: &serde_json::Value, lines: std::ops::RangeInclusive<u64>, report: &serde_json::Value) {
    let file = location["file"].as_str().unwrap_or_default();
    assert!(file.ends_with("driver-vm/src/bin/faulty.rs"), "{location} in {report}");
    let line = location["line"].as_u64().unwrap_or_default();
    assert!(lines.contains(&line), "line {line} not in {lines:?}: {report}");
}

/// Whether some frame of the report's backtrace is at `line` of faulty.rs.
fn backtrace_has(report: &serde_json::Value, line: u64) -> bool {
    let frames = report["backtrace"].as_array().cloned().unwrap_or_default();
    frames.iter().any(|frame| {
        frame["location"]["file"].as_str().is_some_and(|f| f.ends_with("faulty.rs"))
            && frame["location"]["line"].as_u64() == Some(line)
    })
}

#[test]
fn every_report_names_the_build() {
    if !kvm_available("every_report_names_the_build") {
        return;
    }
    let (_, report) = run_json(&["--image", "faulty", "--cmdline", "exit=3"]);
    let build_id = report["build_id"].as_str().unwrap_or_default();
    assert_eq!(build_id.len(), 40, "a sha1 build-id in hex: {report}");
    assert!(build_id.chars().all(|c| c.is_ascii_hexdigit()), "{report}");
    let (_, hello) = run_json(&["--image", "hello"]);
    assert_ne!(hello["build_id"], report["build_id"], "two images, two builds");
}

#[test]
fn a_driver_allocating_without_bound_is_stopped_by_its_ram_and_says_so() {
    if !kvm_available("a_driver_allocating_without_bound_is_stopped_by_its_ram_and_says_so") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--memory", "16M", "--cmdline", "hog"]);
    assert_ne!(status, 0, "{report}");
    assert_eq!(report["outcome"], "panic", "{report}");
    assert!(report["message"].as_str().unwrap().contains("memory allocation of 262144 bytes failed"), "{report}");
    assert!(backtrace_has(&report, planted_line("planted: hog")), "a frame at the allocation: {report}");
    // The guest's RAM is its cap: the vmm never grew past it and its own
    // few MiB (the largest child this test process has reaped so far).
    // SAFETY: rusage is plain data, valid all zeros.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage(2) into a local struct.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    assert!(usage.ru_maxrss < 40 * 1024, "a vmm reached {} KiB", usage.ru_maxrss);
}

#[test]
fn a_panic_reports_the_backtrace_to_its_line() {
    if !kvm_available("a_panic_reports_the_backtrace_to_its_line") {
        return;
    }
    let (_, report) = run_json(&["--image", "faulty", "--cmdline", "panic"]);
    let line = planted_line("planted: panic");
    assert!(report["message"].as_str().unwrap().contains(&format!("faulty.rs:{line}")), "{report}");
    assert!(backtrace_has(&report, line), "a frame at faulty.rs:{line}: {report}");
}

#[test]
fn ring_3_cannot_write_its_idt_or_its_code_nor_execute_its_stack() {
    if !kvm_available("ring_3_cannot_write_its_idt_or_its_code_nor_execute_its_stack") {
        return;
    }
    // Error code bits: 0 present (protection, not absence), 1 write, 2 user,
    // 4 instruction fetch.
    for (failure, address_check, bits) in
        [("write-idt", Some(0x2000u64), 0b00111u64), ("write-code", None, 0b00111), ("execute-stack", None, 0b10101)]
    {
        let (status, report) = run_json(&["--image", "faulty", "--cmdline", failure]);
        assert_eq!(status, 11, "{failure}: {report}");
        assert_eq!(report["name"], "page_fault", "{failure}: {report}");
        assert_eq!(report["ring"], 3, "{failure}: {report}");
        let error_code = report["error_code"].as_u64().unwrap();
        assert_eq!(error_code & 0b10111, bits, "{failure}: error code {error_code:#b}: {report}");
        if let Some(address) = address_check {
            assert_eq!(report["fault_address"], address, "{failure}: {report}");
        }
        let line = planted_line(&format!("planted: {failure}"));
        // An instruction fetch faults at the target: the call is a frame.
        if failure == "execute-stack" {
            assert!(backtrace_has(&report, line), "{failure}: a frame at line {line}: {report}");
        } else {
            assert_in_faulty(&report["location"], line..=line, &report);
        }
    }
}

#[test]
fn a_stack_overflow_is_reported_as_one_with_its_line() {
    if !kvm_available("a_stack_overflow_is_reported_as_one_with_its_line") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "stack-overflow"]);
    assert_eq!(status, 11, "{report}");
    assert_eq!(report["stack_overflow"], true, "{report}");
    assert_eq!(report["ring"], 3, "{report}");
    let (begins, ends) = (planted_line("planted: stack-overflow begins"), planted_line("planted: stack-overflow ends"));
    assert_in_faulty(&report["location"], begins - 2..=ends, &report);
    let frames = report["backtrace"].as_array().unwrap();
    assert!(frames.len() >= 8, "the recursion shows in the backtrace: {report}");
    let text = output(vmm().args(["run", "--image", "faulty", "--cmdline", "stack-overflow"]));
    let text = String::from_utf8_lossy(&text.stderr);
    assert!(text.contains("overflowed its stack"), "{text}");
}

#[test]
fn a_hung_guest_stopped_by_its_supervisor_reports_where_it_was() {
    if !kvm_available("a_hung_guest_stopped_by_its_supervisor_reports_where_it_was") {
        return;
    }
    use std::io::{BufRead, Read, Write};
    let mut child = vmm()
        .args(["run", "--image", "faulty", "--cmdline", "hang", "--json", "--exit-on-stdin-close"])
        .args(["--timeout", "60s"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The watchdog bounds the wait for the guest's own word that it hangs.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("faulty: hanging") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the vmm ended before the guest hung");
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"w").unwrap();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let status = child.wait().unwrap();
    drop(stdin);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(status.code(), Some(16), "{report}");
    assert_eq!(report["outcome"], "stopped", "{report}");
    assert!(report["registers"]["rip"].as_u64().is_some(), "{report}");
    // Stopped in the loop, or (the request can overtake the guest) still
    // in the print before it: in hang() or in the console code it calls.
    let (begins, hang) = (planted_line("planted: hang begins"), planted_line("planted: hang loop"));
    let location = &report["location"];
    let file = location["file"].as_str().unwrap_or_default();
    let line = location["line"].as_u64().unwrap_or_default();
    let in_hang = file.ends_with("driver-vm/src/bin/faulty.rs") && (begins..=hang + 1).contains(&line);
    assert!(in_hang || file.contains("guest-kernel/src/"), "in hang(), lines {begins}..={}: {report}", hang + 1);
    let call = planted_line("Failure::Hang => hang(),");
    assert!(backtrace_has(&report, call), "the caller at line {call}: {report}");
}

#[test]
fn hang_is_stopped_by_the_watchdog() {
    if !kvm_available("hang_is_stopped_by_the_watchdog") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "hang", "--timeout", "300ms"]);
    assert_eq!(status, 14, "{report}");
    assert_eq!(report["outcome"], "timeout");
    assert_eq!(report["after_ms"], 300);
}

/// A guest that says it is ready again and again does not hold its vmm
/// on a `--ready-fd` pipe nobody reads: the vmm signals readiness once,
/// and the watchdog still ends the guest. Before, each READY was a
/// blocking write, and once the pipe was full the vCPU thread slept in it
/// past the watchdog (an adversarial review found it).
#[test]
fn a_guest_saying_ready_again_and_again_is_still_stopped_by_the_watchdog() {
    if !kvm_available("a_guest_saying_ready_again_and_again_is_still_stopped_by_the_watchdog") {
        return;
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a two-element array; the write end is inherited
    // (no O_CLOEXEC), the read end is marked close-on-exec below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), 0) }, 0);
    // SAFETY: fresh descriptors we own from here on.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETFD on a descriptor we own.
    unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let ready = write.as_raw_fd().to_string();
    let child = vmm()
        .args(["run", "--json", "--image", "faulty", "--cmdline", "ready-flood", "--timeout", "2s"])
        .args(["--ready-fd", &ready])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run vmm");
    drop(write);
    let pid = child.id() as libc::pid_t;
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let Ok(output) = finished.recv_timeout(std::time::Duration::from_secs(20)) else {
        // SAFETY: kill(2) of our own child, still unreaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("the vmm was still running 20 s after its 2 s watchdog");
    };
    let report = common::report(&output.unwrap());
    assert_eq!(report["outcome"], "timeout", "{report}");
    drop(read);
}

/// A guest printing without end into a standard error nobody reads (a
/// full pipe) is still stopped by the watchdog: the vCPU thread, blocked
/// writing a console line, never saw the watchdog's kick, and the vmm ran
/// past `--timeout` for as long as the pipe stayed full (an adversarial
/// review found it). It is now reported timed out without that thread.
#[test]
fn a_guest_flooding_a_console_nobody_reads_is_still_stopped_by_the_watchdog() {
    if !kvm_available("a_guest_flooding_a_console_nobody_reads_is_still_stopped_by_the_watchdog") {
        return;
    }
    // The report as JSON on standard output, or as text on the blocked
    // standard error itself.
    for json in [true, false] {
        let mut fds = [0; 2];
        // SAFETY: pipe2 into a two-element array, both ends close-on-exec
        // (the write end reaches the child as its standard error, by dup2).
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors we own from here on.
        let (unread, stderr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut child = vmm()
            .args(["run", "--image", "faulty", "--cmdline", "console-flood", "--timeout", "2s"])
            .args(json.then_some("--json"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::from(stderr))
            .spawn()
            .expect("run vmm");
        let pid = child.id() as libc::pid_t;
        let mut stdout = child.stdout.take().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut report = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut report);
            let _ = done.send((report, child.wait()));
        });
        let Ok((report, status)) = finished.recv_timeout(std::time::Duration::from_secs(20)) else {
            // SAFETY: kill(2) of our own child, still unreaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("json {json}: the vmm was still running 20 s after its 2 s watchdog, its console blocked");
        };
        assert_eq!(status.unwrap().code(), Some(14), "json {json}: {report}");
        if json {
            let report: serde_json::Value = serde_json::from_str(report.trim()).expect("one JSON report");
            assert_eq!(report["outcome"], "timeout", "{report}");
        }
        drop(unread);
    }
}

#[test]
fn exit_code_is_passed_through() {
    if !kvm_available("exit_code_is_passed_through") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "exit=42"]);
    assert_eq!(status, 1, "{report}");
    assert_eq!(report["outcome"], "exit");
    assert_eq!(report["code"], 42);
}

#[test]
fn driver_probe_failure_is_an_exit_with_the_kernel_code() {
    if !kvm_available("driver_probe_failure_is_an_exit_with_the_kernel_code") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "no-such-failure"]);
    assert_eq!(status, 1, "{report}");
    assert_eq!(report["code"], guest_abi::exit_code::DRIVER_FAILED);
}

#[test]
fn an_image_file_path_works_like_a_builtin_name() {
    if !kvm_available("an_image_file_path_works_like_a_builtin_name") {
        return;
    }
    let dir = TempDir::new("image-path");
    let builtin = vmm::image::BUILT_IN.iter().find(|(name, _)| *name == "hello").unwrap().1;
    let path = dir.file("hello.elf", builtin);
    let (status, report) = run_json(&["--image", path.to_str().unwrap()]);
    assert_eq!(status, 0, "{report}");
    assert_eq!(report["vm"], "hello");
}

#[test]
fn every_builtin_image_is_listed() {
    let out = output(vmm().arg("images"));
    let listed = String::from_utf8_lossy(&out.stdout);
    for name in ["hello", "faulty", "pingpong", "mirror"] {
        assert!(listed.lines().any(|line| line == name), "{name} missing from `vmm images`: {listed}");
    }
}

/// `vmm locate` names a guest address as a crash report does: the same
/// function, file and line for every address of the report's backtrace
/// (a return address is looked up at its call, one byte before), given as
/// arguments or on standard input, and `?` for an address the image's
/// line tables do not cover; with `--inlined`, followed by the driver's own
/// functions it was inlined into.
#[test]
fn locate_names_an_address_as_the_crash_report_does() {
    use std::io::Write;
    if !kvm_available("locate_names_an_address_as_the_crash_report_does") {
        return;
    }
    let (status, report) = run_json(&["--image", "faulty", "--cmdline", "page-fault"]);
    assert_eq!(report["outcome"], "exception", "status {status}: {report}");
    let mut expected = Vec::new();
    for (i, frame) in report["backtrace"].as_array().unwrap().iter().enumerate() {
        let address = frame["address"].as_u64().unwrap() - u64::from(i > 0);
        let location = &frame["location"];
        let named = match location["function"].as_str() {
            Some(function) => format!("{function} ({}:{})", location["file"].as_str().unwrap(), location["line"]),
            None if location.is_null() => "?".to_owned(),
            None => format!("{}:{}", location["file"].as_str().unwrap(), location["line"]),
        };
        expected.push((format!("{address:#x}"), named));
    }
    assert!(expected.iter().filter(|(_, named)| named != "?").count() >= 2, "{report}");
    expected.push(("0x1".to_owned(), "?".to_owned()));
    let lines = |stdout: &[u8]| -> Vec<(String, String)> {
        let text = String::from_utf8_lossy(stdout).into_owned();
        text.lines().map(|line| line.split_once('\t').map(|(a, b)| (a.into(), b.into())).unwrap_or_default()).collect()
    };
    let mut args = vec!["locate".to_owned(), "--image".to_owned(), "faulty".to_owned()];
    args.extend(expected.iter().map(|(address, _)| address.clone()));
    let out = output(vmm().args(&args));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&out.stdout), expected);

    let mut child = vmm()
        .args(["locate", "--image", "faulty"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input: Vec<String> = expected.iter().map(|(address, _)| address.clone()).collect();
    child.stdin.take().unwrap().write_all(input.join("\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(lines(&out.stdout), expected);

    // --inlined: the same place first, then only the driver's own code.
    args.push("--inlined".to_owned());
    let out = output(vmm().args(&args));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for ((address, chain), (expected_address, place)) in lines(&out.stdout).iter().zip(&expected) {
        assert_eq!(address, expected_address);
        let frames: Vec<&str> = chain.split(" < ").collect();
        assert_eq!(frames[0], place, "{chain}");
        assert!(frames.iter().all(|frame| !frame.contains("(/rustc/")), "{chain}");
    }
}

#[test]
fn vms_can_be_recreated_in_process_without_leaking() {
    use std::sync::atomic::AtomicBool;
    use vmm::console::{Console, ConsoleSink};
    use vmm::vcpu::{RunUntil, VcpuStop};
    if !kvm_available("vms_can_be_recreated_in_process_without_leaking") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let image = vmm::Image::resolve("hello").unwrap();
    let config = vmm::VmConfig::default();
    let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let mut baseline = None;
    for round in 0..20 {
        let mut vm = vmm::Vm::create(&kvm, &config, &image, Console::new("t", ConsoleSink::Discard)).unwrap();
        let stop = vm.vcpu.run(RunUntil::Ready, &AtomicBool::new(false), &mut || {});
        assert_eq!(stop, VcpuStop::Ready, "round {round}");
        drop(vm);
        let fds = open_fds();
        // Other tests run in parallel and open files; allow a margin but
        // catch a per-VM leak (20 rounds x at least 3 fds each).
        let base = *baseline.get_or_insert(fds);
        assert!(fds < base + 20, "round {round}: {fds} fds open, {base} after the first VM");
    }
}

/// A confined vmm runs no guest code until both of its threads are
/// confined: a guest that escaped into the vmm on its first exit must not
/// find the main thread still free to make a thread or a process that
/// shares the vmm's memory (the reflector takes a killed vmm for ended once
/// its threads are past their end, and replays into the channel mapped
/// there), nor its filter still waiting in writable memory. The test build
/// widens the window with `VMM_TEST_CONFINE_DELAY_MS`; the vmm's log says
/// when the main thread is confined, and its guest's console lines come on
/// the same pipe, so their order is the order of the events.
#[test]
fn no_guest_code_runs_before_the_main_thread_is_confined() {
    use std::io::Read;
    if !kvm_available("no_guest_code_runs_before_the_main_thread_is_confined") {
        return;
    }
    let (reader, writer) = common::pipe();
    let mut child = vmm()
        .args(["run", "--seccomp", "--timeout", "60s", "--image", "hello", "--cmdline", "confine-marker"])
        .env("VMM_LOG", "debug")
        .env("VMM_TEST_CONFINE_DELAY_MS", "300")
        .stdout(std::process::Stdio::from(writer.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(writer))
        .spawn()
        .expect("spawn vmm");
    let mut text = String::new();
    std::fs::File::from(reader).read_to_string(&mut text).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {text}");
    let confined = text.find("main thread confined").unwrap_or_else(|| panic!("no confinement logged: {text}"));
    let guest = text.find("hello from a driver VM").unwrap_or_else(|| panic!("the guest never printed: {text}"));
    assert!(confined < guest, "guest code ran before the main thread was confined:\n{text}");
}
