//! Bad input gets one clear line on stderr and a distinct exit status, and
//! never a panic. Cases that fail before KVM is opened run everywhere; the
//! rest need /dev/kvm.

#![allow(clippy::unwrap_used)]

mod common;

use common::{inheritable_eventfd, kvm_available, output, vmm, TempDir};
use std::os::fd::AsRawFd;

/// Runs `vmm ARGS`, checks the exit status and that stderr is one line
/// mentioning `needle`.
fn rejects(args: &[&str], status: i32, needle: &str) {
    let out = output(vmm().args(args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "vmm {args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "vmm {args:?}: expected one line, got {stderr}");
    assert!(lines[0].starts_with("vmm: "), "{stderr}");
    assert!(stderr.contains(needle), "vmm {args:?}: {stderr:?} does not mention {needle:?}");
}

#[test]
fn missing_image() {
    rejects(&["run", "--image", "no-such-image"], 20, "not a built-in image");
    rejects(&["run", "--image", "/no/such/file.elf"], 20, "no such file");
    // A path that is there but cannot be reached says why, not "not
    // found" (an adversarial review found every such path reported so).
    let dir = TempDir::new("image-path");
    let through_a_file = dir.file("plain", b"x").join("image.elf");
    rejects(&["run", "--image", through_a_file.to_str().unwrap()], 21, "Not a directory");
}

#[test]
fn locate_refuses_what_is_not_an_address_or_an_image() {
    rejects(&["locate", "--image", "hello", "0x10zz"], 2, "is not an address");
    rejects(&["locate", "--image", "hello", "0x"], 2, "is not an address");
    rejects(&["locate", "--image", "no-such-image", "0x100000"], 20, "not a built-in image");
}

/// Addresses on standard input are judged as those given as arguments; a
/// stream that is not text ends in an error, not a panic.
#[test]
fn locate_refuses_bad_standard_input() {
    use std::io::Write;
    for (input, needle) in
        [(&b"0x100000\nnot-an-address\n"[..], "is not an address"), (b"0x10\xff\n", "standard input")]
    {
        let mut child = vmm()
            .args(["locate", "--image", "hello"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("vmm: ") && stderr.contains(needle), "{stderr}");
    }
}

/// A FIFO as the image, or as a window: opening one for reading waited
/// for a writer for ever, so the vmm hung instead of refusing it.
#[test]
fn a_fifo_is_no_image_and_no_window() {
    let dir = TempDir::new("fifo");
    let fifo = dir.path().join("fifo");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    let window = format!("0x40000000,4K,{fifo},ro");
    for (args, status, needle) in [
        (vec!["run", "--image", fifo], 21, "not a regular file"),
        (vec!["run", "--image", "hello", "--window", &window], 25, "not a regular file or device"),
    ] {
        let mut child =
            vmm().args(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let exit = loop {
            if let Some(exit) = child.try_wait().unwrap() {
                break exit;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("vmm {args:?} hung on a FIFO");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(exit.code(), Some(status), "vmm {args:?}: {stderr}");
        assert!(stderr.contains(needle), "vmm {args:?}: {stderr}");
    }
}

#[test]
fn not_an_elf() {
    let dir = TempDir::new("not-elf");
    let path = dir.file("text.elf", b"this is not an ELF file at all, just text....................................");
    rejects(&["run", "--image", path.to_str().unwrap()], 21, "not an ELF");
    let empty = dir.file("empty.elf", b"");
    rejects(&["run", "--image", empty.to_str().unwrap()], 21, "not an ELF");
}

#[test]
fn a_non_image_elf_is_rejected() {
    // A host executable is an ELF, but not linked at the image base.
    rejects(&["run", "--image", env!("CARGO_BIN_EXE_vmm")], 21, "not a valid driver VM image");
}

/// The hello image with 64 MiB added to the bss of its last segment.
fn oversized_image() -> Vec<u8> {
    let mut image = vmm::image::BUILT_IN.iter().find(|(name, _)| *name == "hello").unwrap().1.to_vec();
    let u64_at = |image: &[u8], at: usize| u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
    let phoff = u64_at(&image, 32) as usize;
    let phnum = u16::from_le_bytes([image[56], image[57]]) as usize;
    let last_load = (0..phnum).map(|i| phoff + i * 56).rfind(|at| image[*at] == 1).unwrap();
    let memsz = u64_at(&image, last_load + 40) + (64 << 20);
    image[last_load + 40..last_load + 48].copy_from_slice(&memsz.to_le_bytes());
    image
}

#[test]
fn image_larger_than_ram() {
    let dir = TempDir::new("too-large");
    let path = dir.file("big.elf", &oversized_image());
    rejects(&["run", "--image", path.to_str().unwrap(), "--memory", "16M"], 22, "raise --memory");
}

#[test]
fn invalid_sizes_and_numbers() {
    rejects(&["run", "--image", "hello", "--memory", "12Q"], 26, "--memory");
    rejects(&["run", "--image", "hello", "--memory", "1M"], 26, "between");
    rejects(&["run", "--image", "hello", "--memory", "99999999999G"], 26, "too large");
    rejects(&["run", "--image", "hello", "--memory", "5000"], 24, "not a multiple");
    rejects(&["run", "--image", "hello", "--window", "0x40000000,0,/dev/null"], 26, "size is zero");
    rejects(&["run", "--image", "hello", "--window", "0x40000000,4K"], 26, "GPA,SIZE,PATH");
    rejects(&["run", "--image", "hello", "--window", "0x40000000,4K,/dev/null,colour=red"], 26, "unknown option");
    rejects(&["run", "--image", "hello", "--cmdline", &"x".repeat(5000)], 26, "--cmdline");
    rejects(&["run", "--image", "hello", "--doorbell", "mmio=0x50000000"], 26, "fd=N");
    rejects(&["run", "--image", "hello", "--irq", "fd=2"], 26, "above 2");
    // Rounded to no time, it disarmed the watchdog instead of arming it.
    let out = output(vmm().args(["run", "--image", "hello", "--timeout", "1e-10"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("expected a duration"), "{stderr}");
}

#[test]
fn window_overlapping_ram_or_another_window() {
    rejects(&["run", "--image", "hello", "--window", "0x100000,4K,/dev/null"], 23, "overlaps guest RAM");
    rejects(
        &["run", "--image", "hello", "--window", "0x40000000,8K,/dev/null", "--window", "0x40001000,4K,/dev/null"],
        23,
        "overlaps window 0",
    );
    rejects(&["run", "--image", "hello", "--window", "0xfee00000,4K,/dev/null"], 23, "APIC");
}

#[test]
fn unaligned_window() {
    rejects(&["run", "--image", "hello", "--window", "0x40000100,4K,/dev/null"], 24, "address");
    rejects(&["run", "--image", "hello", "--window", "0x40000000,100,/dev/null"], 24, "size");
    rejects(&["run", "--image", "hello", "--window", "0x40000000,4K,/dev/null,offset=12"], 24, "offset");
}

/// `--hosted` with a built-in image's name says that it wants a hosted
/// build's path: before, the name was "not a built-in image" in a list
/// of the built-in images that held it.
#[test]
fn a_hosted_run_of_a_built_in_image_says_what_it_wants() {
    rejects(&["run", "--hosted", "--image", "blk"], 26, "runs only in a driver VM");
    rejects(&["run", "--hosted", "--image", "no-such-driver"], 20, "not found");
}

#[test]
fn usage_errors_are_status_2() {
    let out = output(vmm().args(["run", "--image", "hello", "--no-such-flag"]));
    assert_eq!(out.status.code(), Some(2));
    let out = output(vmm().args(["run"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image"));
    assert!(out.stdout.is_empty(), "no --json, no report on stdout");
    // With --json, a supervisor reading the outcome gets one for these
    // too: before, standard output stayed empty.
    for (args, name) in [
        (&["run", "--json", "--image", "./drv.elf", "--no-such-flag"][..], "drv"),
        (&["run", "--name=d0", "--json", "--memory"][..], "d0"),
        (&["run", "--json"][..], ""),
        (&["run", "--json", "--name", "--image", "x.elf"][..], "x"),
    ] {
        let out = output(vmm().args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().count(), 1, "{args:?}: {stdout}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["outcome"], "setup_error", "{report}");
        assert_eq!(report["kind"], "usage", "{report}");
        assert_eq!(report["vm"], name, "{report}");
        assert!(report["message"].as_str().unwrap().starts_with("error:"), "{report}");
    }
}

#[test]
fn help_documents_every_option_with_an_example() {
    let out = output(vmm().args(["run", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--image",
        "--memory",
        "--window",
        "--doorbell",
        "--irq",
        "--cmdline",
        "--timeout",
        "--console",
        "--json",
        "--ready-fd",
    ] {
        assert!(help.contains(option), "{option} missing from --help");
    }
    assert!(help.contains("Example: --window"), "{help}");
    assert!(help.contains("Exit status"), "{help}");
}

// The cases below open window files and eventfds after KVM is opened.

#[test]
fn unreadable_or_unsuitable_window_file() {
    if !kvm_available("unreadable_or_unsuitable_window_file") {
        return;
    }
    let dir = TempDir::new("window-file");
    rejects(&["run", "--image", "hello", "--window", "0x40000000,4K,/no/such/file"], 25, "cannot open");
    let small = dir.file("small", &[0u8; 4096]);
    let spec = format!("0x40000000,8K,{}", small.display());
    rejects(&["run", "--image", "hello", "--window", &spec], 25, "needs");
    let spec = format!("0x40000000,4K,{}", dir.path().display());
    rejects(&["run", "--image", "hello", "--window", &spec], 25, "window file");
}

#[test]
fn doorbell_fd_must_be_an_open_eventfd() {
    if !kvm_available("doorbell_fd_must_be_an_open_eventfd") {
        return;
    }
    rejects(&["run", "--image", "hello", "--doorbell", "mmio=0x50000000,fd=987"], 26, "not open");
    let dir = TempDir::new("not-eventfd");
    let file = std::fs::File::open(dir.file("plain", b"x")).unwrap();
    let fd = file.as_raw_fd();
    // Make it inheritable for the child.
    // SAFETY: fcntl on an fd we own.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    rejects(&["run", "--image", "hello", "--irq", &format!("fd={fd}")], 26, "not an eventfd");
    let eventfd = inheritable_eventfd();
    let spec = format!("fd={}", eventfd.as_raw_fd());
    rejects(&["run", "--image", "hello", "--irq", &spec, "--irq", &spec], 26, "used twice");
    // One number as --kvm-fd and --ready-fd, or as a line and --ready-fd:
    // two owners closed it twice (a debug build aborted on it).
    let number = eventfd.as_raw_fd().to_string();
    rejects(&["run", "--image", "hello", "--kvm-fd", &number, "--ready-fd", &number], 26, "used twice");
    rejects(&["run", "--image", "hello", "--irq", &spec, "--ready-fd", &number], 26, "used twice");
}

/// A window's descriptor is mapped, never written: given as --ready-fd
/// too, readiness landed in the window's file. --ready-fd itself must be
/// an eventfd, a pipe or a socket, not a file whose first 8 bytes it
/// would overwrite (an adversarial review found both).
#[test]
fn readiness_is_never_written_into_a_windows_or_any_file() {
    let dir = TempDir::new("ready-window");
    let data = dir.file("window", &[0x5a; 65536]);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&data).unwrap();
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we own: inheritable for the child.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let (window, ready) = (format!("0x40000000,64K,fd={fd}"), fd.to_string());
    rejects(&["run", "--image", "hello", "--window", &window, "--ready-fd", &ready], 26, "the window at 0x40000000");
    rejects(&["run", "--image", "hello", "--ready-fd", &ready], 26, "not an eventfd, a pipe or a socket");
    assert_eq!(std::fs::read(&data).unwrap(), vec![0x5a; 65536], "the file was written");
}

/// `--console` is emptied only once it is known not to be the image or a
/// window's file (before, a run that then failed had already emptied a
/// window's data), and a FIFO nobody reads is refused instead of blocking
/// the start for ever, past --timeout.
#[test]
fn the_console_file_is_never_the_images_or_a_windows_and_never_waited_for() {
    let dir = TempDir::new("console-file");
    let data = dir.file("window", &[0x5a; 65536]);
    let window = format!("0x40000000,64K,{}", data.display());
    let console = data.display().to_string();
    rejects(&["run", "--image", "hello", "--window", &window, "--console", &console], 26, "the window at 0x40000000");
    assert_eq!(std::fs::read(&data).unwrap(), vec![0x5a; 65536], "the window's file was emptied");
    let fifo = dir.path().join("fifo");
    let path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo(3) of a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let mut command = vmm();
    command.args(["run", "--image", "hello", "--timeout", "2s", "--console"]).arg(&fifo);
    // Bounded: before, the open waited for a reader for ever.
    let out =
        output(std::process::Command::new("timeout").arg("20").arg(command.get_program()).args(command.get_args()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(28), "{stderr}");
    assert!(stderr.contains("a FIFO nobody reads"), "{stderr}");
}

/// `--exit-on-stdin-close` needs a standard input that can be watched:
/// with /dev/null (or a regular file, or none) the VM ran on without its
/// supervisor's lifeline, one error line the only sign.
#[test]
fn a_lifeline_that_cannot_be_watched_is_refused() {
    let out =
        output(vmm().args(["run", "--image", "hello", "--exit-on-stdin-close"]).stdin(std::process::Stdio::null()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(26), "{stderr}");
    assert!(stderr.contains("standard input cannot be watched"), "{stderr}");
}

/// `--check` says "usable" only of runs that would start: it judges the
/// descriptors, window files and console path too, and makes or changes
/// nothing (before, it judged the options and the image alone; an
/// adversarial review found it saying usable of runs that then failed).
#[test]
fn check_refuses_what_the_run_would_and_changes_nothing() {
    let dir = TempDir::new("check");
    let check = |extra: &[&str]| {
        let mut args = vec!["run", "--check", "--image", "hello"];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let missing = format!("0x40000000,64K,{}", dir.path().join("no-such-file").display());
    let console = dir.path().join("console.log");
    for (extra, status, needle) in [
        (vec!["--window", missing.as_str()], 25, "cannot open"),
        (vec!["--irq", "fd=987"], 26, "not open"),
        (vec!["--doorbell", "mmio=0x50000000,fd=987"], 26, "not open"),
        (vec!["--ready-fd", "987"], 26, "not an open inherited"),
        (vec!["--console", "/no/such/dir/console.log"], 28, "console file"),
    ] {
        let args = check(&extra);
        rejects(&args.iter().map(String::as_str).collect::<Vec<_>>(), status, needle);
    }
    let args = check(&["--console", console.to_str().unwrap()]);
    let out = output(vmm().args(&args));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!console.exists(), "--check made the console file");
    // Never opened: opening a FIFO for writing and closing it gives its
    // reader end-of-file (one without a reader is judged at the run).
    let fifo = dir.path().join("fifo");
    let path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo(3) of a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let args = check(&["--console", fifo.to_str().unwrap()]);
    let out = output(vmm().args(&args));
    assert_eq!(out.status.code(), Some(0), "--check opened the FIFO: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_endless_image_file_is_refused_not_read_forever() {
    // `timeout` bounds the run: before the image read was bounded, this
    // read /dev/zero until memory ran out.
    let out = std::process::Command::new("timeout")
        .args(["60", env!("CARGO_BIN_EXE_vmm"), "run", "--image", "/dev/zero"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(21), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

#[test]
fn a_vanished_supervisor_is_not_a_panic() {
    if !kvm_available("a_vanished_supervisor_is_not_a_panic") {
        return;
    }
    // Standard output is a pipe nobody reads any more: the supervisor died.
    let (read_end, write_end) = common::pipe();
    drop(read_end);
    let out = output(vmm().args(["run", "--image", "hello", "--json"]).stdout(std::process::Stdio::from(write_end)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
