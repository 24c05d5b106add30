//! Hostile vhost-user clients against a reflector serving two disks: one
//! client breaks the rules (`blk-load --hostile`), and the reflector must
//! survive it, keep serving the other disk with verified data, and serve
//! the hostile client's disk again to the next client. Before the fixes
//! each of these killed the reflector (SIGBUS) or made a worker spin.
//!
//! Needs /dev/kvm and the workspace's binaries (`vmm`, `blk-load`).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

mod common;

use common::{kvm_available, serve_disks, sibling, Scratch};

/// A hostile client holding its connection until dropped.
struct Hostile {
    child: Child,
    outcome: serde_json::Value,
}

impl Hostile {
    fn start(socket: &Path, case: &str) -> Hostile {
        let mut child = Command::new(sibling("blk-load"))
            .arg("--socket")
            .arg(socket)
            .args(["--hostile", case, "--json", "--timeout", "30", "--queue-size", "256"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "blk-load --hostile {case} printed no outcome: {:?}", child.wait());
        let outcome = serde_json::from_str(&line).unwrap();
        Hostile { child, outcome }
    }

    /// Closes its standard input (it then disconnects) and waits for it.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the hostile client itself failed: {status}");
    }
}

/// A verified job against `socket` that must pass.
fn verified_io(socket: &Path, what: &str) {
    let output = Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(socket)
        .args(["--json", "--queue-size", "256", "--timeout", "20"])
        .args(["--job", "randwrite,randread", "--bs", "4k", "--qd", "4", "--ios", "200", "--verify", "--size", "4M"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{what}: blk-load failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// One hostile case: the reflector logs `signature`, survives, and both
/// disks serve verified I/O afterwards.
fn survives(case: &str, signature: &str, expect_refused: bool) {
    let scratch = Scratch::new(&format!("hostile-{case}"));
    let mut reflector = serve_disks(&scratch, &["d0", "d1"], false);
    let (d0, d1) = (scratch.join("d0.sock"), scratch.join("d1.sock"));
    let hostile = Hostile::start(&d0, case);
    if expect_refused {
        assert_eq!(hostile.outcome["refused"], true, "{case}: {}", hostile.outcome);
    }
    reflector.wait_for(|r| r.log_text().contains(signature), signature);
    verified_io(&d1, &format!("{case}: the other disk, while the hostile client is connected"));
    hostile.finish();
    verified_io(&d0, &format!("{case}: the hostile client's disk, for the next client"));
    assert!(reflector.child.try_wait().unwrap().is_none(), "{case}: the reflector died:\n{}", reflector.log_text());
    let log = reflector.stop();
    assert!(!log.contains("panicked"), "{case}: {log}");
}

/// One hostile case that must be served, not refused: the reflector
/// survives it, and the next client of the same disk is served (a worker
/// that waited on the hostile client never served it).
fn served_and_then_the_next(case: &str) {
    let scratch = Scratch::new(case);
    let mut reflector = serve_disks(&scratch, &["d0"], false);
    let socket = scratch.join("d0.sock");
    let hostile = Hostile::start(&socket, case);
    assert_eq!(hostile.outcome["refused"], false, "{}", hostile.outcome);
    hostile.finish();
    verified_io(&socket, &format!("the next client, after {case}"));
    assert!(reflector.child.try_wait().unwrap().is_none(), "{case}: the reflector died:\n{}", reflector.log_text());
    let log = reflector.stop();
    assert!(!log.contains("panicked"), "{case}: {log}");
}

#[test]
fn a_memory_region_larger_than_its_file_is_refused() {
    if kvm_available("a_memory_region_larger_than_its_file_is_refused") {
        survives("memory-beyond-file", "refusing the client's memory table", true);
    }
}

#[test]
fn a_client_shrinking_its_memory_is_cut_off_alone() {
    if kvm_available("a_client_shrinking_its_memory_is_cut_off_alone") {
        survives("shrink-memory", "its memory faulted", true);
    }
}

#[test]
fn an_avail_index_beyond_the_queue_cuts_the_client_off_without_spinning() {
    if kvm_available("an_avail_index_beyond_the_queue_cuts_the_client_off_without_spinning") {
        survives("avail-overrun", "avail index runs beyond the queue size", false);
    }
}

/// A bad memory table that arrives while the worker is inside an event:
/// vhost-user-backend maps it and points the vrings at it before the
/// device checks it, so a worker that touched the queue through the
/// vrings' own view took SIGBUS from the table it was about to refuse (an
/// adversarial review found it). The device reads client memory only
/// through its checked snapshot now.
#[test]
fn a_bad_memory_table_sent_while_the_queue_is_kicked_is_refused_untouched() {
    if kvm_available("a_bad_memory_table_sent_while_the_queue_is_kicked_is_refused_untouched") {
        survives("swap-memory", "refusing the client's memory table", true);
    }
}

/// A client cut off (here for an avail index beyond its queue) that then
/// truncates its memory and sends its queue's addresses again: the
/// vhost-user handler reads the used index through its own map of the
/// table, which the device had unregistered from the SIGBUS guard when it
/// let go of the client, so the reflector died of SIGBUS (an adversarial
/// review found it). A table stays guarded while anything maps it, and a
/// client cut off has its connection ended.
#[test]
fn a_cut_off_client_truncating_its_memory_cannot_fault_the_reflector() {
    if kvm_available("a_cut_off_client_truncating_its_memory_cannot_fault_the_reflector") {
        survives("cut-then-shrink", "avail index runs beyond the queue size", true);
    }
}

/// A client whose used ring's `avail_event` field (EVENT_IDX) lies outside
/// its memory: the device's request for the next kick failed after it had
/// taken the kicked request, which was then never sent to the driver, and
/// the driver was blamed for it (an adversarial review found it). The
/// client is cut off before any request is taken (its rings must lie whole
/// in its memory, `avail_event` included), and no driver VM is replaced.
#[test]
fn a_used_ring_whose_notification_field_is_outside_memory_cuts_the_client_off() {
    if kvm_available("a_used_ring_whose_notification_field_is_outside_memory_cuts_the_client_off") {
        survives("unwritable-avail-event", "its queue's rings do not lie in its memory", true);
    }
}

/// An avail ring whose index lies in the client's memory and whose
/// entries do not: virtio-queue yields no chain from it, while asking for
/// the next kick (EVENT_IDX) reports one more. Before, the worker spun on
/// it for ever, its device locked (the next client was never served), a
/// line logged at each turn.
#[test]
fn an_avail_ring_past_the_clients_memory_cuts_the_client_off_without_spinning() {
    if kvm_available("an_avail_ring_past_the_clients_memory_cuts_the_client_off_without_spinning") {
        survives("avail-ring-past-memory", "its queue's rings do not lie in its memory", true);
    }
}

/// A new kick for a queue being served: vhost-user-backend's handler
/// closed the old one without taking it out of the worker's epoll set,
/// where it stayed readable for ever (the client holds it) and was never
/// read again. Before, the worker spun from the client's next kick on.
#[test]
fn a_kick_replaced_while_its_queue_is_served_cuts_the_client_off() {
    if kvm_available("a_kick_replaced_while_its_queue_is_served_cuts_the_client_off") {
        survives(
            "replaced-kick",
            "it replaced the kick, moved the rings, resized or rewound a queue being served",
            true,
        );
    }
}

/// SET_VRING_ENABLE before SET_FEATURES is remembered (QEMU's virtio-net
/// sends it then), but only the last for each queue: two million of them
/// grew the reflector, which serves every device, by 16 MiB, without
/// bound. One for a queue the device lacks ends the connection.
#[test]
fn early_queue_enables_are_remembered_once_a_queue_and_only_for_queues_the_device_has() {
    if !kvm_available("early_queue_enables_are_remembered_once_a_queue_and_only_for_queues_the_device_has") {
        return;
    }
    let scratch = Scratch::new("hostile-early-enables");
    let mut reflector = serve_disks(&scratch, &["d0", "d1"], false);
    let d0 = scratch.join("d0.sock");
    let resident_kib = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let before = resident_kib(reflector.child.id());
    let hostile = Hostile::start(&d0, "early-enables");
    assert_eq!(hostile.outcome["refused"], false, "{}", hostile.outcome);
    let grown = resident_kib(reflector.child.id()).saturating_sub(before);
    assert!(grown < 4 << 10, "the reflector grew by {grown} KiB while it read 2 million early enables");
    hostile.finish();
    verified_io(&d0, "the next client, after early-enables");
    let missing = Hostile::start(&d0, "early-enable-of-a-missing-queue");
    assert_eq!(missing.outcome["refused"], true, "{}", missing.outcome);
    missing.finish();
    verified_io(&d0, "the next client, after early-enable-of-a-missing-queue");
    assert!(reflector.child.try_wait().unwrap().is_none(), "the reflector died:\n{}", reflector.log_text());
    let log = reflector.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// A client acknowledging a protocol feature the device never offered
/// (`CONFIGURE_MEM_SLOTS`, which lets it add memory regions without
/// limit, each a slot of the SIGBUS guard every device shares) has its
/// connection ended.
#[test]
fn a_client_acknowledging_features_it_was_not_offered_is_refused() {
    if kvm_available("a_client_acknowledging_features_it_was_not_offered_is_refused") {
        survives("unoffered-features", "client connection ended with an error", true);
    }
}

/// A kick descriptor that is not an eventfd (a timerfd firing every
/// microsecond kept the worker handling kicks for ever, a reflector core
/// the client paid nothing for) has the connection ended.
#[test]
fn a_kick_that_is_not_an_eventfd_is_refused() {
    if kvm_available("a_kick_that_is_not_an_eventfd_is_refused") {
        survives("timer-kick", "client connection ended with an error", true);
    }
}

/// A semaphore eventfd as the kick stays readable for as many reads as its
/// count: like a timerfd, it kept the worker busy for ever. Here (Linux 6.7
/// or later) the vhost-user handler ends the connection; where the kernel
/// does not say which eventfds are semaphores, the reflector tells one by
/// reading it and never serves its queue
/// (`client_vring::tests::a_semaphore_kick_is_refused_on_any_kernel`).
#[test]
fn a_semaphore_eventfd_as_the_kick_is_refused() {
    if kvm_available("a_semaphore_eventfd_as_the_kick_is_refused") {
        survives("semaphore-kick", "client connection ended with an error", true);
    }
}

/// A client that makes its call eventfd blocking again and fills its
/// count: the worker's write to it blocked, with the device held, for as
/// long as the client liked and for ever after it left (the next client
/// was never served). The notification is skipped when it would block.
#[test]
fn a_full_blocking_call_eventfd_never_blocks_the_device() {
    if kvm_available("a_full_blocking_call_eventfd_never_blocks_the_device") {
        served_and_then_the_next("full-call");
    }
}

/// A client that makes its kick eventfd blocking again and drains each
/// kick before the worker reads it: the worker's read, after its epoll
/// had seen the kick, slept with the queue locked until the client kicked
/// again, and for ever once it left (the next client was never served).
/// The kick is read without waiting (`RWF_NOWAIT`).
#[test]
fn a_client_draining_its_own_kick_never_blocks_the_device() {
    if kvm_available("a_client_draining_its_own_kick_never_blocks_the_device") {
        served_and_then_the_next("drained-kick");
    }
}

/// A client without EVENT_IDX whose call eventfd is its kick: the worker
/// notified every queue after every event, so each notification kicked it
/// again and it never rested (a core the client paid nothing for). It
/// notifies only when a used buffer was added since the last notification:
/// the kicks it handles stay a few per request.
#[test]
fn a_call_that_is_the_kick_does_not_keep_the_worker_busy() {
    if !kvm_available("a_call_that_is_the_kick_does_not_keep_the_worker_busy") {
        return;
    }
    let scratch = Scratch::new("call-is-kick");
    let reflector = serve_disks(&scratch, &["d0"], true);
    let socket = scratch.join("d0.sock");
    let hostile = Hostile::start(&socket, "call-is-kick");
    assert_eq!(hostile.outcome["refused"], false, "{}", hostile.outcome);
    let status = Command::new(env!("CARGO_BIN_EXE_reflector"))
        .args(["status", "--json", "--control"])
        .arg(scratch.join("ctl"))
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let kicks = status[0]["kicks"].as_u64().unwrap();
    // The warm-up request and 20 more, each kicked once and notified once
    // (each notification one kick more): 42 at most, and a margin.
    assert!(kicks <= 64, "the worker handled {kicks} kicks for 21 requests: it kicks itself");
    hostile.finish();
    verified_io(&socket, "the next client, after the call that was the kick");
    let log = reflector.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// A client arriving while the reflector has no descriptor left is not
/// accepted, and the device serves the next one once descriptors are back:
/// before, the failed accept ended the device's serving thread, and the
/// device never accepted a client again.
#[test]
fn a_failed_accept_does_not_end_a_devices_service() {
    if !kvm_available("a_failed_accept_does_not_end_a_devices_service") {
        return;
    }
    let scratch = Scratch::new("accept-failure");
    let mut reflector = serve_disks(&scratch, &["d0"], false);
    let socket = scratch.join("d0.sock");
    let pid = reflector.child.id() as libc::pid_t;
    let limit = |soft: u64, hard: u64| {
        let new = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        // SAFETY: prlimit(2) on the reflector this test started, with a valid struct.
        assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) }, 0);
    };
    let mut before = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit(2) reading the reflector's limit into a valid struct.
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut before) }, 0);
    // Its lowest free descriptor number: a new descriptor takes the lowest
    // free number, which the limit then forbids, so the next accept fails.
    let open: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|number| !open.contains(number)).unwrap();
    limit(lowest_free, before.rlim_max);
    let refused = Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(&socket)
        .args(["--timeout", "2", "--job", "randread", "--bs", "4k", "--qd", "1", "--ios", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a client was served with no descriptor left");
    // Logged as either, before the fix and after.
    let failed =
        |r: &common::Reflector| ["cannot accept a client", "serving stopped"].iter().any(|l| r.log_text().contains(l));
    reflector.wait_for(failed, "the failed accept");
    // A second failure while descriptors are still short (the retry's own
    // daemon needs some): before, that one ended the device's service.
    reflector.wait_for(|r| r.log_text().contains("failures=2") || r.log_text().contains("serving stopped"), "a retry");
    assert!(!reflector.log_text().contains("serving stopped"), "{}", reflector.log_text());
    limit(before.rlim_cur, before.rlim_max);
    verified_io(&socket, "the next client, descriptors back");
    let log = reflector.stop();
    assert!(!log.contains("serving stopped"), "{log}");
}

/// A client that connects and leaves in a loop is taken at the device's
/// pace and has a few of its connection lines logged, not each: before,
/// every connection cost a vhost-user daemon, a thread and two log lines
/// as fast as it could connect, and a journal's limit for the reflector's
/// whole service dropped the other devices' lines (a review found it). The
/// device serves the next client after it.
#[test]
fn a_client_connecting_in_a_loop_is_taken_at_the_pace_and_logged_in_part() {
    if !kvm_available("a_client_connecting_in_a_loop_is_taken_at_the_pace_and_logged_in_part") {
        return;
    }
    use reflector::connection_pace::{CONNECTION_BURST, LINE_BURST, SECONDS_A_LINE};
    let scratch = Scratch::new("connect-loop");
    let mut reflector = serve_disks(&scratch, &["d0"], false);
    let socket = scratch.join("d0.sock");
    let started = std::time::Instant::now();
    let clients = CONNECTION_BURST + 16;
    for _ in 0..clients {
        drop(std::os::unix::net::UnixStream::connect(&socket).unwrap());
    }
    reflector.wait_for(|r| r.log_text().contains("each waits its turn"), "the pace");
    reflector.wait_for(
        |r| r.log_text().matches("client disconnected").count() as u64 >= 1 && r.log_text().contains("left_out="),
        "a connection line",
    );
    verified_io(&socket, "the next client");
    let elapsed = started.elapsed().as_secs();
    let log = reflector.stop();
    let lines = log.matches("client connected").count() + log.matches("client disconnected").count();
    let allowed = LINE_BURST + elapsed / SECONDS_A_LINE + 1;
    assert!(lines as u64 <= allowed, "{lines} connection lines for {clients} clients, {allowed} allowed:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The descriptors of process `pid`: number -> what it points at.
fn fd_table(pid: i32) -> Vec<(i32, String)> {
    let mut table: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let number = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((number, target.display().to_string()))
        })
        .collect();
    table.sort();
    table
}

#[test]
fn a_driver_vm_holds_only_its_own_descriptors() {
    if !kvm_available("a_driver_vm_holds_only_its_own_descriptors") {
        return;
    }
    let scratch = Scratch::new("fds");
    let control = scratch.join("ctl");
    let mut reflector = serve_disks(&scratch, &["d0", "d1"], true);
    let d0 = scratch.join("d0.sock");
    // A client holds d0 (its guest RAM and eventfds are in the reflector)
    // while d1's driver VM is replaced: the new vmm must get none of it.
    let client = Hostile::start(&d0, "idle");
    assert_eq!(client.outcome["refused"], false, "{}", client.outcome);
    let restarted = "driver VM restarted device=d1";
    let kill = Command::new(env!("CARGO_BIN_EXE_reflector")).args(["kill", "d1", "--control"]).arg(&control).output();
    assert!(kill.unwrap().status.success());
    // The vmm that took over (a standby, started before the client came,
    // or a cold start), and the standby started after it, while the
    // client holds d0.
    let after_restart = |log: &str| -> Option<(i32, i32)> {
        let pid_of = |line: &str| line.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok();
        let (_, after) = log.split_once(restarted)?;
        let current = pid_of(after.lines().next()?)?;
        let standby = after.lines().find(|l| l.contains("driver VM started driver_vm=d1")).and_then(pid_of)?;
        Some((current, standby))
    };
    reflector.wait_for(|r| after_restart(&r.log_text()).is_some(), "d1's new driver VM and its next standby");
    let (current, standby) = after_restart(&reflector.log_text()).unwrap();
    for pid in [current, standby] {
        let table = fd_table(pid);
        let described = format!("{table:#?}");
        for (number, target) in &table {
            assert!(!target.contains("blk-load"), "fd {number} of d1's vmm {pid} is the client's memory: {described}");
            assert!(!target.contains("d0-"), "fd {number} of d1's vmm {pid} belongs to d0: {described}");
        }
        // What it was given, numbered from 3 in a fixed order: /dev/kvm (it
        // opens no path in its jail), its windows, doorbells and interrupt
        // lines (then a standby's start signal).
        let given: Vec<&str> = table.iter().filter(|(n, _)| (3..=9).contains(n)).map(|(_, t)| t.as_str()).collect();
        assert_eq!(
            given,
            ["/dev/kvm", "/memfd:d1-regs (deleted)", "/memfd:d1-channel (deleted)"]
                .into_iter()
                .chain(["anon_inode:[eventfd]"; 4])
                .collect::<Vec<_>>(),
            "vmm {pid}: {described}"
        );
    }
    client.finish();
    reflector.stop();
}
