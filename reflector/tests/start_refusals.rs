//! Bad starts are refused at once, with a message naming the cause, and
//! never destroy or share a file: a socket path naming a regular file, a
//! socket or image another reflector serves, a socket that cannot be bound,
//! an unusable driver image or memory size, an image whose size differs
//! from `size=`, a medium too large to keep checksums of, a vmm binary
//! whose start check never ends. Sockets are
//! owner-only whatever the umask.
//!
//! Needs the workspace's binaries (`vmm`) and /dev/kvm for the cases that
//! start a device.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

mod common;

use common::{kvm_available, Reflector, Scratch, START_TIMEOUT};

/// Runs `reflector serve ARGS`, which must fail by itself (bounded: a
/// reflector that serves instead is killed and the test fails); returns
/// its standard error.
fn refused(args: &[String]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_reflector"))
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("the reflector served instead of refusing: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(status.code().is_some(), "killed by a signal: {status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn blk(socket: &Path, image: &Path, extra: &str) -> Vec<String> {
    vec!["--blk".into(), format!("socket={},image={}{extra}", socket.display(), image.display())]
}

#[test]
fn a_socket_path_naming_a_file_never_deletes_it() {
    let scratch = Scratch::new("refuse-file");
    let (victim, image) = (scratch.join("precious.img"), scratch.join("d.img"));
    std::fs::write(&victim, b"the only copy").unwrap();
    let stderr = refused(&blk(&victim, &image, ",size=1M"));
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"the only copy");
    // The control socket too.
    let mut args = blk(&scratch.join("d.sock"), &image, ",size=1M");
    args.extend(["--control".to_string(), victim.display().to_string()]);
    if kvm_available("a_socket_path_naming_a_file_never_deletes_it") {
        let stderr = refused(&args);
        assert!(stderr.contains("is not a socket"), "{stderr}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"the only copy");
}

/// A control socket on a device's socket path, however spelled, is
/// refused before anything starts: before, it was refused once every
/// device had started, as served by "another process".
#[test]
fn a_control_socket_on_a_devices_path_is_refused_at_once() {
    let scratch = Scratch::new("refuse-control");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let mut args = blk(&socket, &image, ",size=1M");
    args.extend(["--control".into(), scratch.join(".").join("d.sock").display().to_string()]);
    let stderr = refused(&args);
    assert!(stderr.contains("socket too"), "{stderr}");
    assert!(!std::fs::exists(&image).unwrap(), "a device started: its image was made");
}

#[test]
fn a_socket_that_cannot_be_bound_fails_the_start() {
    let scratch = Scratch::new("refuse-bind");
    let image = scratch.join("d.img");
    let missing = scratch.join("no-such-dir").join("d.sock");
    let stderr = refused(&blk(&missing, &image, ",size=1M"));
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    let long = scratch.join(&"x".repeat(120));
    let stderr = refused(&blk(&long, &image, ",size=1M"));
    assert!(stderr.contains("more than a socket address holds"), "{stderr}");
    assert!(!image.exists(), "the refused start left the image it created");
}

/// A start refused after it created an image removes that image, and only
/// that one: before, the image stayed, and a retry with another `size=`
/// was refused for the size the failed attempt had given it.
#[test]
fn a_refused_start_removes_the_images_it_created_and_no_other() {
    let scratch = Scratch::new("refuse-created");
    let (created, kept) = (scratch.join("new.img"), scratch.join("kept.img"));
    std::fs::write(&kept, vec![7u8; 4096]).unwrap();
    // The second device's image exists with another size than asked: the
    // start fails after making the first's.
    let mut args = blk(&scratch.join("a.sock"), &created, ",size=1M");
    args.extend(blk(&scratch.join("b.sock"), &kept, ",size=1M"));
    let stderr = refused(&args);
    assert!(stderr.contains("exists with 4096 bytes"), "{stderr}");
    assert!(!created.exists(), "the refused start left the image it created: {stderr}");
    assert_eq!(std::fs::read(&kept).unwrap(), vec![7u8; 4096]);
    // Refused once the devices are being started (the socket's directory
    // is missing): the same.
    let missing = scratch.join("no-such-dir").join("d.sock");
    let stderr = refused(&blk(&missing, &created, ",size=1M"));
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    assert!(!created.exists(), "the refused start left the image it created: {stderr}");
    // An image that was there before is never removed.
    let stderr = refused(&blk(&missing, &kept, ""));
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    assert_eq!(std::fs::read(&kept).unwrap(), vec![7u8; 4096]);
}

/// A driver image named without a `/` is a built-in one's name: a file of
/// that name in the working directory, which a jailed vmm never sees, is
/// named in the error with the spelling that reaches it. Before, the
/// error said only that no such file exists.
#[test]
fn a_driver_file_named_like_a_built_in_image_is_pointed_to_in_the_error() {
    if !kvm_available("a_driver_file_named_like_a_built_in_image_is_pointed_to_in_the_error") {
        return;
    }
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("\n*** SKIPPING: jailed driver VMs need root ***\n");
        return;
    }
    let scratch = Scratch::new("refuse-bare-driver");
    std::fs::write(scratch.join("mydrv.elf"), b"not an image").unwrap();
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let output = Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_reflector"))
        .arg("serve")
        .args(blk(&socket, &image, ",size=1M,driver=mydrv.elf"))
        .current_dir(scratch.join("."))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("give it as driver=./mydrv.elf"), "{stderr}");
}

#[test]
fn an_unusable_driver_or_memory_fails_the_start() {
    if !kvm_available("an_unusable_driver_or_memory_fails_the_start") {
        return;
    }
    let scratch = Scratch::new("refuse-driver");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let stderr = refused(&blk(&socket, &image, ",size=1M,driver=no-such-driver"));
    assert!(stderr.contains("no-such-driver") && stderr.contains("not found"), "{stderr}");
    let stderr = refused(&blk(&socket, &image, ",size=1M,memory=600M"));
    assert!(stderr.contains("memory=600M") && stderr.contains("overlaps"), "{stderr}");
    // Refused once its socket was placed: the socket is removed with the
    // image (before, a client found a path that refused connections).
    assert!(!socket.exists() && !image.exists(), "the refused start left its socket or image");
    let stderr = refused(&["--net".into(), format!("socket={},driver=/dev/null", scratch.join("n.sock").display())]);
    assert!(stderr.contains("/dev/null"), "{stderr}");
    // A FIFO: opening it for reading waited for a writer for ever, and the
    // start hung with its termination signals blocked.
    let fifo = scratch.join("driver.fifo");
    let path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let stderr = refused(&blk(&socket, &image, &format!(",size=1M,driver={}", fifo.display())));
    assert!(stderr.contains("not a regular file"), "{stderr}");
    let stderr = refused(&["--config".into(), fifo.display().to_string()]);
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

#[test]
fn an_image_of_another_size_than_asked_is_refused() {
    let scratch = Scratch::new("refuse-size");
    let image = scratch.join("d.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let stderr = refused(&blk(&scratch.join("d.sock"), &image, ",size=1M"));
    assert!(stderr.contains("exists with 4096 bytes"), "{stderr}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 4096);
}

/// A medium too large for its sectors' checksums (an existing sparse image
/// here; a typo in `size=` or a real disk behind VFIO alike) is refused by
/// name before any driver VM starts: before, the table's allocation (4
/// bytes a sector, 2 GiB for this 256 GiB image) aborted the reflector,
/// every device with it, or took the host's memory.
#[test]
fn a_medium_too_large_to_keep_checksums_of_is_refused_by_name() {
    let scratch = Scratch::new("refuse-checksums");
    let image = scratch.join("d.img");
    std::fs::File::create(&image).unwrap().set_len(256 << 30).unwrap();
    let stderr = refused(&blk(&scratch.join("d.sock"), &image, ",checksums=on"));
    assert!(stderr.contains("checksums=on keeps 4 bytes per 512-byte sector"), "{stderr}");
    assert!(stderr.contains("turn checksums off"), "{stderr}");
    // Asked for by size=: refused by the configuration's check.
    let stderr = refused(&blk(&scratch.join("e.sock"), &scratch.join("e.img"), ",size=64T,checksums=on"));
    assert!(stderr.contains("checksums=on"), "{stderr}");
    assert!(!scratch.join("e.img").exists(), "an image was made for a refused device");
}

#[test]
fn a_second_reflector_cannot_take_a_socket_or_an_image() {
    if !kvm_available("a_second_reflector_cannot_take_a_socket_or_an_image") {
        return;
    }
    let scratch = Scratch::new("refuse-twice");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let control = scratch.join("ctl");
    let mut args = blk(&socket, &image, ",size=1M");
    args.extend(["--control".to_string(), control.display().to_string()]);
    // umask 000 must not make the sockets world-writable.
    // SAFETY: umask cannot fail; the child inherits it.
    let old = unsafe { libc::umask(0) };
    let mut first = Reflector::start(&args, scratch.join("log"), &socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    first.wait_for(|_| control.exists(), "the control socket");
    for path in [&socket, &control] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    // The same socket, spelled differently, with another image.
    let respelled = scratch.0.join(".").join("d.sock");
    let stderr = refused(&blk(&respelled, &scratch.join("other.img"), ",size=1M"));
    assert!(stderr.contains("already served"), "{stderr}");
    // The same image behind another socket.
    let stderr = refused(&blk(&scratch.join("other.sock"), &image, ""));
    assert!(stderr.contains("in use by another process"), "{stderr}");
    assert!(first.child.try_wait().unwrap().is_none(), "the first reflector must keep serving");
    first.stop();
}

#[test]
fn many_devices_start_under_a_low_descriptor_limit() {
    if !kvm_available("many_devices_start_under_a_low_descriptor_limit") {
        return;
    }
    let scratch = Scratch::new("fd-limit");
    let mut args = Vec::new();
    for i in 0..8 {
        args.extend(blk(&scratch.join(&format!("d{i}.sock")), &scratch.join(&format!("d{i}.img")), ",size=1M"));
    }
    let last = scratch.join("d7.sock");
    // A soft limit of 64 ran out at about the fourth device before the
    // reflector raised it to the hard limit.
    let reflector = Reflector::start_configured(&args, scratch.join("log"), &last, "controller ready", |command| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit in the child before exec; async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                let mut limit: libc::rlimit = std::mem::zeroed();
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                limit.rlim_cur = 64;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                Ok(())
            });
        }
    });
    let mut reflector = reflector;
    reflector.wait_for(|r| r.log_text().matches("serving vhost-user-blk").count() == 8, "all eight devices served");
    let log = reflector.stop();
    assert!(!log.contains("Too many open files"), "{log}");
}

#[test]
fn an_endless_configuration_file_is_refused() {
    let stderr = refused(&["--config".into(), "/dev/zero".into()]);
    assert!(stderr.contains("/dev/zero") && stderr.contains("not a regular file"), "{stderr}");
}

/// A reflector serving one small disk, with a control socket (its path).
fn with_control(tag: &str) -> (Scratch, Reflector, std::path::PathBuf) {
    let scratch = Scratch::new(tag);
    let (socket, control) = (scratch.join("d.sock"), scratch.join("ctl"));
    let mut args = blk(&socket, &scratch.join("d.img"), ",size=1M");
    args.extend(["--control".to_string(), control.display().to_string()]);
    let mut reflector = Reflector::start(&args, scratch.join("log"), &socket);
    reflector.wait_for(|_| control.exists(), "the control socket");
    (scratch, reflector, control)
}

#[test]
fn idle_control_clients_delay_nobody() {
    if !kvm_available("idle_control_clients_delay_nobody") {
        return;
    }
    let (_scratch, reflector, control) = with_control("control-idle");
    // Three clients that never send a line: served one after the other,
    // each held the socket for its 5 s read timeout, and `status` (which
    // gives up after 10 s) failed.
    let idle: Vec<_> = (0..3).map(|_| std::os::unix::net::UnixStream::connect(&control).unwrap()).collect();
    let status =
        Command::new(env!("CARGO_BIN_EXE_reflector")).args(["status", "--json", "--control"]).arg(&control).output();
    let status = status.unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    drop(idle);
    reflector.stop();
}

/// Control clients that send a byte now and then, never a whole line, are
/// cut off once their time for the line is up: each read's timeout was
/// the only bound, so eight such clients held every slot for as long as
/// they kept dribbling (4096 bytes, hours) and nobody could ask `status`.
#[test]
fn dribbling_control_clients_are_cut_off_and_status_answers() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    if !kvm_available("dribbling_control_clients_are_cut_off_and_status_answers") {
        return;
    }
    let (_scratch, reflector, control) = with_control("control-dribble");
    // Eight (every slot), each sending a byte every 100 ms until the
    // reflector closes it; bounded at 30 s, far past the 5 s deadline.
    let dribblers: Vec<_> = (0..8)
        .map(|_| {
            let mut client = std::os::unix::net::UnixStream::connect(&control).unwrap();
            std::thread::spawn(move || {
                client.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(30) {
                    if client.write_all(b" ").is_err() {
                        return true;
                    }
                    // Its 100 ms read timeout paces the bytes; an end of
                    // stream, an answer or a reset is the reflector done
                    // with it.
                    match client.read(&mut [0u8; 64]) {
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        }
                        _ => return true,
                    }
                }
                false
            })
        })
        .collect();
    for dribbler in dribblers {
        assert!(dribbler.join().unwrap(), "a control client sending a byte every 100 ms was never cut off");
    }
    let status =
        Command::new(env!("CARGO_BIN_EXE_reflector")).args(["status", "--json", "--control"]).arg(&control).output();
    let status = status.unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    reflector.stop();
}

#[test]
fn a_failed_image_creation_leaves_no_file() {
    let scratch = Scratch::new("refuse-create");
    let image = scratch.join("d.img");
    // The file size limit makes sizing the new image fail (EFBIG; SIGXFSZ
    // ignored so that the reflector sees the error).
    let mut child = Command::new(env!("CARGO_BIN_EXE_reflector"));
    child.arg("serve").args(blk(&scratch.join("d.sock"), &image, ",size=64M"));
    use std::os::unix::process::CommandExt;
    // SAFETY: signal(2) and setrlimit(2) in the child before exec.
    unsafe {
        child.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 1 << 20, rlim_max: 1 << 20 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            Ok(())
        });
    }
    let output = child.stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("sizing disk image"), "{stderr}");
    assert!(!image.exists(), "a 0-byte image was left behind");
}

/// A `--vmm` that never ends its start check (not this project's vmm, or
/// one that hangs) fails the start within the check's deadline, with that
/// said, instead of hanging it; the hung process is killed.
#[test]
fn a_vmm_whose_check_never_ends_fails_the_start() {
    let scratch = Scratch::new("refuse-hung-check");
    let (socket, image) = (scratch.join("d.sock"), scratch.join("d.img"));
    let marker = scratch.join("hung-check-ran");
    let hung = scratch.join("hung-vmm");
    // Its standard error stays open too: the check must not wait for it.
    std::fs::write(&hung, format!("#!/bin/sh\necho $$ > {}\nexec sleep 600\n", marker.display())).unwrap();
    std::fs::set_permissions(&hung, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut args = vec!["--no-jail".to_string(), "--vmm".to_string(), hung.display().to_string()];
    args.extend(blk(&socket, &image, ",size=1M"));
    let stderr = refused(&args);
    assert!(stderr.contains("did not end within") && stderr.contains("hung-vmm"), "{stderr}");
    let pid = std::fs::read_to_string(&marker).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z"), "the hung check outlived the start: {stat}");
}
