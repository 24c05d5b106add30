//! The device with its recovery, driven without KVM: fake drivers on the
//! real channel ([`super::fake`]), a client queue written with
//! virtio-queue's mock, and the worker loop run by the test. Each test is a
//! promise of docs/DESIGN.md's restart protocol, tried against a driver
//! that dies, hangs, lies or never comes up.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hardware::shared_eventfd::SharedEventFd;
use vmm_sys_util::eventfd::EventFd;

use vm_memory::GuestMemoryMmap;

use super::fake::{client_memory, Client, FakeDisk, FakeLaunch, Script, Sent, QUEUE_SIZE};
use super::{Device, DeviceWiring};
use crate::blk::device::{Blk, BlkDevice};
use crate::channel::Channel;
use crate::hw::Hardware;
use crate::metrics::Metrics;
use crate::recovery::{RecoveryConfig, RestartPolicy};

/// Longest any test waits for the device (the fake drivers answer in
/// microseconds; this bounds a broken recovery, it is not a timing claim).
const BOUND: Duration = Duration::from_secs(30);

const OK: u8 = virtio::blk::S_OK;
const IOERR: u8 = virtio::blk::S_IOERR;

struct Bench<'a> {
    device: BlkDevice,
    client: Client<'a>,
    disk: Arc<FakeDisk>,
    launch_count: Arc<std::sync::atomic::AtomicUsize>,
    scripts: Arc<std::sync::Mutex<std::collections::VecDeque<Script>>>,
    listeners: Vec<(std::os::fd::RawFd, u16)>,
    metrics: Arc<Metrics>,
    /// The channel's memory (ring and bounce slots).
    channel_memory: Arc<crate::shm::SharedMemory>,
    /// Where the starts of spares wait while held.
    spare_gate: Arc<super::fake::SpareGate>,
}

/// A policy that backs off briefly, so a crash loop is given up on in well
/// under a second.
fn quick_recovery() -> RecoveryConfig {
    RecoveryConfig {
        hang_deadline: Duration::from_millis(100),
        policy: RestartPolicy {
            backoff_start: Duration::from_millis(1),
            backoff_max: Duration::from_millis(10),
            ..RestartPolicy::default()
        },
        ..RecoveryConfig::default()
    }
}

impl<'a> Bench<'a> {
    fn new(memory: &'a GuestMemoryMmap, scripts: &[Script], checksums: bool, recovery: RecoveryConfig) -> Self {
        Bench::on(FakeDisk::new(4096), memory, scripts, checksums, recovery, Duration::ZERO)
    }

    /// As `new`, payloads going through per-request DMA windows (`dma=direct`).
    fn direct(memory: &'a GuestMemoryMmap, scripts: &[Script], recovery: RecoveryConfig) -> Self {
        Bench::on(FakeDisk::direct(4096), memory, scripts, false, recovery, Duration::ZERO)
    }

    /// A bench on `disk`, the worker polling for completions for
    /// `poll_window` after each kick.
    fn on(
        disk: Arc<FakeDisk>,
        memory: &'a GuestMemoryMmap,
        scripts: &[Script],
        checksums: bool,
        recovery: RecoveryConfig,
        poll_window: Duration,
    ) -> Self {
        let channel = Channel::new("fake").unwrap();
        let channel_memory = channel.memory().clone();
        let completion_doorbell = SharedEventFd::new().unwrap();
        let driver_exited = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let launch =
            FakeLaunch::new(channel.memory().clone(), &completion_doorbell, &driver_exited, disk.clone(), scripts);
        let (launch_count, scripts, spare_gate) =
            (launch.launches.clone(), launch.scripts(), launch.spare_gate.clone());
        let wiring = DeviceWiring {
            channel,
            hardware: disk.clone(),
            device_interrupt: disk.interrupt(),
            completion_doorbell,
            driver_exited,
            launcher: Box::new(launch),
            poll_window,
            memory_cap: None,
        };
        let mut device = Device::new(
            "fake",
            Blk::new(disk.clone(), checksums, recovery.poison_deaths, false).unwrap(),
            wiring,
            recovery,
        )
        .unwrap();
        let client = Client::attach(memory, &mut device);
        let listeners = device.listeners();
        let metrics = device.metrics();
        Bench { device, client, disk, launch_count, scripts, listeners, metrics, channel_memory, spare_gate }
    }

    fn count(&self, counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }

    fn launches(&self) -> usize {
        self.launch_count.load(Ordering::SeqCst)
    }

    /// Runs the device until `sent` are all completed; each exactly once.
    fn complete(&mut self, sent: &[Sent], what: &str) {
        let mut used = Vec::new();
        let wanted: Vec<u16> = sent.iter().map(|s| s.head).collect();
        self.run_until(what, |client, _| {
            used.extend(client.take_used());
            wanted.iter().all(|head| used.iter().any(|(h, _)| h == head))
        });
        for head in wanted {
            assert_eq!(used.iter().filter(|(h, _)| *h == head).count(), 1, "{what}: head {head} completed twice");
        }
    }

    fn run_until(&mut self, what: &str, done: impl FnMut(&mut Client<'a>, &mut BlkDevice) -> bool) {
        let metrics = self.metrics.clone();
        let what = || {
            let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::SeqCst);
            format!(
                "{what} (requests {}, completed {}, faults {}, restarts {}, state {}, last fault {:?})",
                count(&metrics.requests),
                count(&metrics.completed),
                count(&metrics.faults),
                count(&metrics.restarts),
                count(&metrics.state),
                metrics.last_fault.lock().map(|f| f.clone()).unwrap_or_default()
            )
        };
        self.client.run_until(&mut self.device, &self.listeners, BOUND, &what, done);
    }

    fn submit(&mut self, requests: &[(bool, u64, Vec<u8>)]) -> Vec<Sent> {
        let sent = requests.iter().map(|(write, sector, data)| self.client.request(*write, *sector, data)).collect();
        self.client.kick(&mut self.device);
        sent
    }

    fn kill_driver(&mut self) {
        self.device.kill_trigger().unwrap().write(1).unwrap();
    }

    fn state(&self) -> &'static str {
        crate::metrics::STATE_NAMES[self.metrics.state.load(Ordering::SeqCst) as usize]
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        self.device.shutdown();
    }
}

#[test]
fn requests_pass_through_a_serving_driver() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Serve], true, quick_recovery());
    let data = pattern(1, 4096);
    let write = bench.submit(&[(true, 8, data.clone())]);
    bench.complete(&write, "the write");
    assert_eq!(bench.client.status(&write[0]), OK);
    assert_eq!(bench.disk.read(8, 4096), data);
    let read = bench.submit(&[(false, 8, vec![0; 4096])]);
    bench.complete(&read, "the read");
    assert_eq!((bench.client.status(&read[0]), bench.client.data(&read[0])), (OK, data));
    assert_eq!((bench.count(&bench.metrics.faults), bench.launches()), (0, 1));
}

#[test]
fn direct_dma_moves_payloads_without_the_bounce_slots_and_leaves_no_window_behind() {
    let memory = client_memory();
    let mut bench = Bench::direct(&memory, &[Script::Serve], quick_recovery());
    let windows = bench.disk.windows.clone().unwrap();
    let data = pattern(11, 8192);
    let write = bench.submit(&[(true, 8, data.clone())]);
    bench.complete(&write, "the write");
    assert_eq!(bench.disk.read(8, 8192), data);
    let read = bench.submit(&[(false, 8, vec![0; 8192])]);
    bench.complete(&read, "the read");
    assert_eq!((bench.client.status(&read[0]), bench.client.data(&read[0])), (OK, data));
    assert_eq!(windows.mapped(), 0, "a completed request's window is revoked");
    let bounce_len = 2 * guest_abi::channel::SLOT_SIZE as usize;
    let bounce = bench.channel_memory.slice(guest_abi::channel::BOUNCE_OFFSET, bounce_len).unwrap();
    let mut seen = vec![0u8; bounce.len()];
    bounce.copy_to(&mut seen[..]);
    assert!(seen.iter().all(|b| *b == 0), "the payloads never passed through a bounce slot");
}

#[test]
fn direct_dma_windows_are_revoked_at_a_death_and_mapped_again_for_the_replay() {
    // The first driver takes a write and a read and never answers; it is
    // killed. Its requests' windows must be gone before the next driver
    // may touch the device, and the replays must land.
    let memory = client_memory();
    let mut bench = Bench::direct(&memory, &[Script::Hang, Script::Serve], RecoveryConfig::default());
    let windows = bench.disk.windows.clone().unwrap();
    let data = pattern(12, 4096);
    bench.disk.write(300, &data);
    let written = pattern(13, 8192);
    let sent = bench.submit(&[(true, 0, written.clone()), (false, 300, vec![0; 4096])]);
    bench.run_until("the hung driver to hold both", |_, _| windows.mapped() == 2);
    bench.kill_driver();
    bench.complete(&sent, "the replayed requests");
    assert_eq!(bench.disk.mapped_at_resume.load(Ordering::SeqCst), 0, "a window outlived its driver VM");
    assert_eq!(bench.disk.read(0, 8192), written);
    assert_eq!((bench.client.status(&sent[1]), bench.client.data(&sent[1])), (OK, data));
    assert_eq!((bench.count(&bench.metrics.replayed), bench.count(&bench.metrics.errors)), (2, 0));
    assert_eq!(windows.mapped(), 0);
}

#[test]
fn direct_dma_windows_close_when_their_client_leaves() {
    let memory = client_memory();
    let mut bench = Bench::direct(&memory, &[Script::Hang], quick_recovery());
    let windows = bench.disk.windows.clone().unwrap();
    bench.submit(&[(false, 0, vec![0; 4096]), (true, 8, pattern(15, 4096))]);
    bench.run_until("the driver to hold both", |_, _| windows.mapped() == 2);
    bench.device.client_gone();
    assert_eq!(windows.mapped(), 0, "the device can still reach a departed client's memory");
}

/// A DMA window keeps its client's table mapped after the client replaces
/// the table, and so must keep the table's SIGBUS registration: a client
/// that then shrinks the old table's file would otherwise fault the
/// device's access through the window, outside any registered range, and
/// kill the reflector. Before, the registration went with the table.
#[test]
fn a_dma_window_keeps_its_tables_sigbus_guard_after_the_table_is_replaced() {
    use vhost_user_backend::VhostUserBackendMut;
    let memory = client_memory();
    let old = vm_memory::GuestMemoryBackend::get_host_address(&memory, vm_memory::GuestAddress(0)).unwrap() as usize;
    let mut bench = Bench::direct(&memory, &[Script::Hang], RecoveryConfig::default());
    let windows = bench.disk.windows.clone().unwrap();
    bench.submit(&[(true, 8, pattern(19, 4096))]);
    bench.run_until("the driver to hold the write", |_, _| windows.mapped() == 1);
    let replacement = client_memory();
    bench.device.update_memory(vm_memory::GuestMemoryAtomic::new(replacement)).unwrap();
    assert_eq!(windows.mapped(), 1);
    assert!(crate::client_memory::registered(old), "the window's table is no longer guarded");
}

/// Requests held back after a death belong to their client: if it leaves
/// before they are replayed, they are forgotten, never replayed with the
/// next client's memory (its RAM at the old client's addresses: with
/// `dma=direct` the device would write and read it, with bounce slots its
/// bytes would reach the disk) nor completed in its queue.
fn held_requests_of_a_departed_client_never_reach_the_next(direct: bool) {
    let memory = client_memory();
    let scripts = [Script::PanicOnSector(64), Script::Serve];
    let mut bench = match direct {
        true => Bench::direct(&memory, &scripts, quick_recovery()),
        false => Bench::new(&memory, &scripts, false, quick_recovery()),
    };
    bench.disk.write(8, &pattern(16, 4096));
    // The write at sector 64 kills the first driver; the three are then
    // suspects, replayed one at a time: the others wait, held.
    let sent = bench.submit(&[(true, 64, pattern(17, 512)), (false, 8, vec![0; 4096]), (true, 16, pattern(18, 4096))]);
    bench.run_until("the replacement driver", |_, device| device.metrics().restarts.load(Ordering::SeqCst) == 1);
    bench.device.client_gone();
    let other_memory = client_memory();
    let mut other = Client::attach(&other_memory, &mut bench.device);
    for request in &sent {
        other.scribble(request);
    }
    let listeners = bench.listeners.clone();
    other.run_until(&mut bench.device, &listeners, BOUND, &|| "the old requests to be done".into(), |_, device| {
        device.metrics().in_flight.load(Ordering::SeqCst) == 0
    });
    assert!(other.take_used().is_empty(), "an old request was completed in the new client's queue");
    assert!(other.data(&sent[1]).iter().all(|b| *b == 0xee), "the old read was written into the new client's memory");
    assert!(bench.disk.read(16, 4096).iter().all(|b| *b == 0), "the old write took the new client's bytes to the disk");
    if let Some(windows) = &bench.disk.windows {
        assert_eq!(windows.mapped(), 0);
    }
}

/// A suspect that cannot be sent (the client's new memory table no longer
/// holds its buffer) fails alone, and releases the next suspect at once:
/// before, the next waited for a completion that could not come (nothing
/// was in the driver), and the hang deadline blamed the innocent driver
/// (an adversarial review found it).
#[test]
fn a_suspect_that_cannot_be_sent_releases_the_next_at_once() {
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic};
    // SAFETY: memfd_create with a static name; checked below.
    let fd = unsafe { libc::memfd_create(c"client".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor this test owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(super::fake::CLIENT_MEMORY as u64).unwrap();
    let mapped = |len: usize| {
        let offset = FileOffset::new(file.try_clone().unwrap(), 0);
        GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(offset))]).unwrap()
    };
    let memory = mapped(super::fake::CLIENT_MEMORY);
    let mut bench = Bench::new(&memory, &[Script::PanicOnSector(64), Script::Serve], false, quick_recovery());
    // The write at sector 64 kills the first driver: both are suspects.
    bench.submit(&[(true, 64, pattern(20, 512)), (false, 8, vec![0; 512])]);
    bench.run_until("the death", |_, device| device.metrics().faults.load(Ordering::SeqCst) == 1);
    // A table of the rings only: the write's payload is outside it now.
    vhost_user_backend::VhostUserBackendMut::update_memory(
        &mut bench.device,
        GuestMemoryAtomic::new(mapped(0x10_0000)),
    )
    .unwrap();
    bench.run_until("both done", |_, device| device.metrics().in_flight.load(Ordering::SeqCst) == 0);
    assert_eq!(bench.count(&bench.metrics.faults), 1, "an innocent driver was blamed for a request it never had");
    // (Their status bytes lie outside the new table too: nothing to see.)
}

#[test]
fn held_requests_of_a_departed_client_never_reach_the_next_client() {
    held_requests_of_a_departed_client_never_reach_the_next(false);
    held_requests_of_a_departed_client_never_reach_the_next(true);
}

#[test]
fn a_lying_driver_under_direct_dma_is_caught_and_its_request_replayed() {
    let memory = client_memory();
    let mut bench = Bench::direct(&memory, &[Script::Lie, Script::Serve], quick_recovery());
    let data = pattern(14, 2048);
    let sent = bench.submit(&[(true, 40, data.clone())]);
    bench.complete(&sent, "the write after the lie");
    assert_eq!((bench.client.status(&sent[0]), bench.disk.read(40, 2048)), (OK, data));
    assert_eq!(bench.count(&bench.metrics.violations), 1);
    assert_eq!(bench.disk.windows.as_ref().unwrap().mapped(), 0);
}

#[test]
fn a_killed_driver_is_replaced_and_what_it_held_is_replayed() {
    // The first driver takes the requests and never answers; it is killed
    // (as `reflector kill` does), with no report: nothing is blamed.
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Hang, Script::Serve], false, RecoveryConfig::default());
    let (a, b) = (pattern(2, 8192), pattern(3, 512));
    let sent = bench.submit(&[(true, 0, a.clone()), (true, 100, b.clone())]);
    bench.kill_driver();
    bench.complete(&sent, "the replayed writes");
    assert!(sent.iter().all(|s| bench.client.status(s) == OK));
    assert_eq!((bench.disk.read(0, 8192), bench.disk.read(100, 512)), (a, b));
    let m = &bench.metrics;
    assert_eq!((bench.count(&m.faults), bench.count(&m.restarts), bench.count(&m.replayed)), (1, 1, 2));
    assert_eq!((bench.count(&m.errors), bench.count(&m.poisoned)), (0, 0));
    assert!(bench.disk.quiesced.load(Ordering::SeqCst) >= 1, "the hardware was not quiesced after the death");
    assert_eq!(bench.state(), "running");
}

#[test]
fn a_hung_driver_is_replaced_after_the_deadline() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Hang, Script::Serve], false, quick_recovery());
    let data = pattern(4, 1024);
    let sent = bench.submit(&[(true, 20, data.clone())]);
    bench.complete(&sent, "the write after the hang");
    assert_eq!(bench.client.status(&sent[0]), OK);
    assert_eq!(bench.disk.read(20, 1024), data);
    assert!(bench.metrics.last_fault.lock().unwrap().starts_with("hang"), "{:?}", bench.metrics.last_fault);
    assert_eq!(bench.launches(), 2);
}

/// A driver that answers every request but one keeps the device making
/// progress: the hang deadline (from the last answer of any) never passes,
/// and before the request's own deadline the withheld request waited for
/// ever. It is caught and the request replayed into the next driver VM.
#[test]
fn a_request_withheld_while_others_are_answered_is_caught_and_replayed() {
    let memory = client_memory();
    let recovery = RecoveryConfig { hang_deadline: Duration::from_millis(300), ..quick_recovery() };
    let mut bench = Bench::new(&memory, &[Script::WithholdSector(7), Script::Serve], false, recovery);
    let withheld = bench.submit(&[(true, 7, pattern(7, 512))]);
    // Others keep coming and being answered meanwhile, one each 20 ms (the
    // hang deadline is 15 times that), for longer than the request's own
    // deadline (the mock queue takes fewer than 128 requests in all). Once
    // they stop, a plain hang would replay it too, but say so.
    let (mut sector, mut last) = (100, std::time::Instant::now());
    bench.run_until("the withheld write", |client, device| {
        if client.status(&withheld[0]) == 0xff && sector < 180 && last.elapsed() >= Duration::from_millis(20) {
            client.request(false, sector, &[0; 512]);
            client.kick(device);
            (sector, last) = (sector + 1, std::time::Instant::now());
        }
        client.status(&withheld[0]) != 0xff
    });
    assert_eq!(bench.client.status(&withheld[0]), OK);
    assert_eq!(bench.disk.read(7, 512), pattern(7, 512));
    assert!(bench.launches() >= 2, "the withholding driver VM was not replaced");
    let last = bench.metrics.last_fault.lock().unwrap().clone();
    assert!(last.contains("unanswered"), "{last}");
}

#[test]
fn a_lying_driver_is_caught_and_its_request_replayed() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Lie, Script::Serve], false, quick_recovery());
    let data = pattern(5, 2048);
    let sent = bench.submit(&[(true, 40, data.clone())]);
    bench.complete(&sent, "the write after the lie");
    assert_eq!(bench.client.status(&sent[0]), OK);
    assert_eq!(bench.disk.read(40, 2048), data);
    assert_eq!(bench.count(&bench.metrics.violations), 1);
    assert!(bench.metrics.last_fault.lock().unwrap().starts_with("violation"));
}

#[test]
fn corrupted_read_data_never_reaches_the_client() {
    // The first driver serves writes well and flips a bit of every read.
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::CorruptReads, Script::Serve], true, quick_recovery());
    let data = pattern(6, 4096);
    let write = bench.submit(&[(true, 64, data.clone())]);
    bench.complete(&write, "the write");
    let read = bench.submit(&[(false, 64, vec![0; 4096])]);
    bench.complete(&read, "the read");
    assert_eq!((bench.client.status(&read[0]), bench.client.data(&read[0])), (OK, data));
    assert_eq!((bench.count(&bench.metrics.violations), bench.launches()), (1, 2));
}

/// A sector the medium holds other data in than was written (a write a
/// dead driver corrupted after its copy was checked) fails its read as
/// poison after as many honest drivers read it so, and from then on fails
/// at once, until it is written again: before, every read of it killed
/// driver after driver, each a fault and a replay of all it held, until
/// the fault budget failed the device (an adversarial review found it).
#[test]
fn a_sector_read_otherwise_than_written_by_driver_after_driver_fails_at_once_until_written() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Serve], true, quick_recovery());
    let data = pattern(21, 4096);
    let write = bench.submit(&[(true, 8, data.clone())]);
    bench.complete(&write, "the write");
    // The medium changes under the checksums.
    bench.disk.write(8, &pattern(22, 4096));
    let read = bench.submit(&[(false, 8, vec![0; 4096])]);
    bench.complete(&read, "the read of the changed sectors");
    assert_eq!(bench.client.status(&read[0]), IOERR);
    let faults = bench.count(&bench.metrics.faults);
    assert!(faults >= 1, "no driver was blamed for the other data");
    for (attempt, sector, len) in [("a second read", 8, 4096), ("a read of one of its sectors", 9, 512)] {
        let read = bench.submit(&[(false, sector, vec![0; len])]);
        bench.complete(&read, attempt);
        assert_eq!(bench.client.status(&read[0]), IOERR, "{attempt}");
        assert_eq!(bench.count(&bench.metrics.faults), faults, "{attempt}: another driver was killed for it");
    }
    // Written again, it reads as written.
    let rewrite = bench.submit(&[(true, 8, data.clone())]);
    bench.complete(&rewrite, "the rewrite");
    let read = bench.submit(&[(false, 8, vec![0; 4096])]);
    bench.complete(&read, "the read after the rewrite");
    assert_eq!((bench.client.status(&read[0]), bench.client.data(&read[0])), (OK, data));
}

/// Two writes to the same sectors in flight together, carried out in
/// order and completed last first (NVMe may): the medium holds the second.
/// Before, the first's completion, with nothing else in flight, recorded
/// its sums, and the read of the second's data accused the honest driver.
#[test]
fn overlapping_writes_completed_out_of_order_are_no_evidence_against_an_honest_driver() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::ReverseWrites], true, quick_recovery());
    let (first, second) = (pattern(12, 4096), pattern(13, 4096));
    let writes = bench.submit(&[(true, 64, first), (true, 64, second.clone())]);
    bench.complete(&writes, "the overlapping writes");
    assert_eq!(bench.disk.read(64, 4096), second, "the writes were not carried out in order");
    let read = bench.submit(&[(false, 64, vec![0; 4096])]);
    bench.complete(&read, "the read");
    assert_eq!((bench.client.status(&read[0]), bench.client.data(&read[0])), (OK, second));
    assert_eq!((bench.count(&bench.metrics.violations), bench.launches()), (0, 1));
}

#[test]
fn a_driver_that_never_comes_up_fails_the_device_and_every_request_then_recover_brings_it_back() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::DieAtStart], false, quick_recovery());
    let sent = bench.submit(&[(true, 0, pattern(7, 512)), (false, 8, vec![0; 512])]);
    bench.complete(&sent, "the requests of a device whose driver never comes up");
    assert!(sent.iter().all(|s| bench.client.status(s) == IOERR), "not failed with an error");
    // Their errors came from the poison limit or the failure, whichever
    // first; the device gives up on the driver soon after.
    bench.run_until("the device to fail", |_, device| device.metrics().state.load(Ordering::SeqCst) == 2);
    // A request to a failed device fails at once.
    let late = bench.submit(&[(false, 16, vec![0; 512])]);
    bench.complete(&late, "a request to the failed device");
    assert_eq!(bench.client.status(&late[0]), IOERR);
    // The operator fixes the driver and recovers the device.
    *bench.scripts.lock().unwrap() = [Script::Serve].into();
    bench.device.recover_trigger().unwrap().write(1).unwrap();
    bench.run_until("the recovered device", |_, device| device.metrics().state.load(Ordering::SeqCst) == 0);
    let data = pattern(8, 512);
    let sent = bench.submit(&[(true, 24, data.clone())]);
    bench.complete(&sent, "a write to the recovered device");
    assert_eq!(bench.client.status(&sent[0]), OK);
    assert_eq!(bench.disk.read(24, 512), data);
}

#[test]
fn a_request_that_kills_every_driver_fails_alone_and_the_others_succeed() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::PanicOnSector(64)], false, quick_recovery());
    let (before, after) = (pattern(9, 512), pattern(10, 4096));
    let sent = bench.submit(&[(true, 0, before.clone()), (true, 64, pattern(11, 512)), (true, 128, after.clone())]);
    bench.complete(&sent, "the poison request and its neighbours");
    let statuses: Vec<u8> = sent.iter().map(|s| bench.client.status(s)).collect();
    assert_eq!(statuses, [OK, IOERR, OK]);
    assert_eq!((bench.disk.read(0, 512), bench.disk.read(128, 4096)), (before, after));
    assert_eq!(bench.disk.read(64, 512), vec![0; 512], "the poison write reached the medium");
    let m = &bench.metrics;
    assert_eq!(
        (bench.count(&m.poisoned), bench.count(&m.faults)),
        (1, u64::from(crate::recovery::DEFAULT_POISON_DEATHS))
    );
    assert!(m.last_poison.lock().unwrap().contains("sector 64"), "{:?}", m.last_poison);
    // The device serves on.
    assert_eq!(bench.state(), "running");
    let next = bench.submit(&[(false, 0, vec![0; 512])]);
    bench.complete(&next, "a read after the poison request");
    assert_eq!(bench.client.status(&next[0]), OK);
}

/// A driver VM that ends without a report whenever it holds one request
/// (a compromised vmm ending itself, before the request's own deadline):
/// the request fails alone after `SILENT_DEATHS_PER_DEATH` times the
/// poison limit of such ends, and the others succeed. Before, each end was
/// taken for a kill from outside, blamed nothing, and the request was
/// replayed for ever under the fault budget (an adversarial review found
/// it).
#[test]
fn a_request_held_by_drivers_that_end_without_a_report_fails_alone() {
    let memory = client_memory();
    // Each lives past `stable_after`, as such a vmm can (its deaths are
    // then no crash loop, and each restart is at once).
    let policy = RestartPolicy { budget: 100, stable_after: Duration::ZERO, ..quick_recovery().policy };
    let recovery = RecoveryConfig { policy, ..quick_recovery() };
    let mut bench = Bench::new(&memory, &[Script::EndSilentlyOnSector(64)], false, recovery);
    let (before, after) = (pattern(9, 512), pattern(10, 4096));
    let sent = bench.submit(&[(true, 0, before.clone()), (true, 64, pattern(11, 512)), (true, 128, after.clone())]);
    bench.complete(&sent, "the request drivers end on and its neighbours");
    let statuses: Vec<u8> = sent.iter().map(|s| bench.client.status(s)).collect();
    assert_eq!(statuses, [OK, IOERR, OK]);
    assert_eq!((bench.disk.read(0, 512), bench.disk.read(128, 4096)), (before, after));
    let silent = crate::recovery::DEFAULT_POISON_DEATHS * crate::recovery::SILENT_DEATHS_PER_DEATH;
    assert_eq!((bench.count(&bench.metrics.poisoned), bench.count(&bench.metrics.faults)), (1, u64::from(silent)));
    assert!(bench.metrics.last_poison.lock().unwrap().contains("ended without a report"));
}

/// An operator's kill of an idle device is that kill's alone: the ends
/// without a report that come later are the drivers' own. Before, the
/// kill's mark stayed when no client waited on the failover, and every
/// later silent end was taken for an operator's kill: none counted, and a
/// request held by drivers ending so was replayed until the fault budget
/// failed the device (an adversarial review found it).
#[test]
fn an_operators_kill_of_an_idle_device_excuses_no_later_end() {
    let memory = client_memory();
    let policy = RestartPolicy { budget: 100, stable_after: Duration::ZERO, ..quick_recovery().policy };
    let recovery = RecoveryConfig { policy, ..quick_recovery() };
    let mut bench = Bench::new(&memory, &[Script::Serve, Script::EndSilentlyOnSector(64)], false, recovery);
    bench.kill_driver();
    bench.run_until("the restart after the kill", |_, device| device.metrics().restarts.load(Ordering::SeqCst) == 1);
    assert!(bench.metrics.last_fault.lock().unwrap().starts_with("killed"), "{:?}", bench.metrics.last_fault);
    let sent = bench.submit(&[(true, 0, pattern(10, 512)), (true, 64, pattern(11, 512))]);
    bench.complete(&sent, "the request drivers end on, and one before it");
    let statuses: Vec<u8> = sent.iter().map(|s| bench.client.status(s)).collect();
    assert_eq!(statuses, [OK, IOERR]);
    assert_eq!(
        bench.count(&bench.metrics.poisoned),
        1,
        "the silent ends were taken for the operator's kill: {} faults, last {:?}, state {}",
        bench.count(&bench.metrics.faults),
        bench.metrics.last_fault.lock().unwrap(),
        bench.state()
    );
    assert!(bench.metrics.last_fault.lock().unwrap().starts_with("exited"), "{:?}", bench.metrics.last_fault);
    // The kill, and the silent ends the poison limit takes: not one more,
    // which the first end after the kill was, taken for the kill.
    let silent = crate::recovery::DEFAULT_POISON_DEATHS * crate::recovery::SILENT_DEATHS_PER_DEATH;
    assert_eq!(bench.count(&bench.metrics.faults), 1 + u64::from(silent));
}

/// Kills an operator asks the reflector for (`reflector kill`, chaos)
/// blame no request, however many.
#[test]
fn kills_an_operator_asked_for_never_make_a_request_poison() {
    // Six drivers in a row hold the request without answering and are
    // killed (no report: not the request's doing); the seventh serves.
    let scripts = [[Script::Hang; 6].as_slice(), &[Script::Serve]].concat();
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &scripts, false, RecoveryConfig::default());
    let data = pattern(12, 512);
    let sent = bench.submit(&[(true, 200, data.clone())]);
    for restarts in 1..=6 {
        bench.kill_driver();
        bench.run_until("the restart after a kill", |_, device| {
            device.metrics().restarts.load(Ordering::SeqCst) == restarts
        });
    }
    bench.complete(&sent, "the write held through six kills");
    assert_eq!(bench.client.status(&sent[0]), OK);
    assert_eq!(bench.disk.read(200, 512), data);
    assert_eq!((bench.count(&bench.metrics.poisoned), bench.count(&bench.metrics.faults)), (0, 6));
}

#[test]
fn drivers_that_die_before_attaching_make_no_request_poison() {
    // The first driver takes the write and hangs (a death that counts
    // against it); the next three die while starting, before they could
    // take anything (as slow boots on a loaded machine did, timed out as
    // hangs); the fifth serves. Dying before the attach is no evidence
    // against the write: it must not reach the poison limit (3).
    let scripts = [[Script::Hang].as_slice(), &[Script::DieAtStart; 3], &[Script::Serve]].concat();
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &scripts, false, quick_recovery());
    let data = pattern(13, 4096);
    let sent = bench.submit(&[(true, 300, data.clone())]);
    bench.complete(&sent, "the write through four deaths");
    assert_eq!(bench.client.status(&sent[0]), OK, "a request failed for deaths it had no part in");
    assert_eq!(bench.disk.read(300, 4096), data);
    assert_eq!((bench.count(&bench.metrics.poisoned), bench.count(&bench.metrics.faults)), (0, 4));
}

#[test]
fn a_warm_spare_takes_over_and_is_replaced() {
    // The first start serves as the current driver VM and hangs; the
    // second is the spare, which serves.
    let recovery = RecoveryConfig { spare: Some(crate::driver_vms::SpareKind::Warm), ..RecoveryConfig::default() };
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Hang, Script::Serve], false, recovery);
    let spare = bench.device.core.drivers.spare_pid().expect("no warm spare");
    let data = pattern(13, 512);
    let sent = bench.submit(&[(true, 300, data.clone())]);
    bench.kill_driver();
    bench.complete(&sent, "the write replayed on the spare");
    assert_eq!(bench.client.status(&sent[0]), OK);
    assert_eq!(bench.device.driver_pid(), Some(spare), "the spare did not take over");
    // Once the recovery completed a request, the next spare boots.
    bench.run_until("a new spare", |_, device| device.core.drivers.spare_pid().is_some_and(|pid| pid != spare));
    assert_eq!(bench.launches(), 3);
}

#[test]
fn the_recovery_answers_its_client_while_the_next_spare_starts() {
    // The next spare is wanted at the recovery's first completion. Its
    // start (fork, jail, exec: milliseconds) once ran on the worker, so
    // that completion, and every other replayed request, reached the
    // client only after it, while the stall reported had already ended.
    // (Restarted at once, though its driver dies young: a failover that
    // waited for a backoff is not timed.)
    let policy = RestartPolicy { stable_after: Duration::ZERO, ..RestartPolicy::default() };
    let recovery =
        RecoveryConfig { spare: Some(crate::driver_vms::SpareKind::Warm), policy, ..RecoveryConfig::default() };
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Hang, Script::Serve], false, recovery);
    let spare = bench.device.core.drivers.spare_pid().expect("no warm spare");
    bench.spare_gate.hold();
    let sent = bench.submit(&[(true, 300, pattern(21, 512)), (true, 900, pattern(22, 4096))]);
    bench.kill_driver();
    bench.complete(&sent, "the writes replayed on the spare");
    assert!(!bench.spare_gate.timed_out(), "the client's answers waited for the next spare's start");
    assert_eq!(bench.device.driver_pid(), Some(spare));
    // Both writes were caught by the fault: the failover's breakdown ends
    // with the drain to the second answer.
    let phases = bench.metrics.failover_percentiles();
    let count = |phase: &str| phases.iter().find(|(name, ..)| *name == phase).map(|(_, count, _)| *count);
    assert_eq!((count("replay"), count("drain")), (Some(1), Some(1)), "{phases:?}");
    // The start was asked for, and waits; once it ends, the device takes it.
    let gate = bench.spare_gate.clone();
    bench.run_until("the next spare's start", |_, _| gate.waiting() == 1);
    gate.release();
    bench.run_until("a new spare", |_, device| device.core.drivers.spare_pid().is_some_and(|pid| pid != spare));
    assert_eq!(bench.launches(), 3);
}

#[test]
fn a_standby_is_started_once_the_device_serves_and_takes_over() {
    let recovery = RecoveryConfig { spare: Some(crate::driver_vms::SpareKind::Standby), ..RecoveryConfig::default() };
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Serve, Script::Serve, Script::Serve], false, recovery);
    // Not started with the device (a fleet's start would take twice as
    // long), but once it has served.
    assert_eq!(bench.device.core.drivers.spare_pid(), None, "a standby started with its device");
    let sent = bench.submit(&[(true, 100, pattern(14, 512))]);
    bench.complete(&sent, "the first write");
    // Started off the worker (`spare_starter`), and taken when it is ready.
    bench.run_until("a standby after the first completion", |_, device| device.core.drivers.spare_pid().is_some());
    let standby = bench.device.core.drivers.spare_pid().expect("no standby after the first completion");
    bench.kill_driver();
    bench.run_until("the restart", |_, device| device.core.metrics.restarts.load(Ordering::SeqCst) == 1);
    let data = pattern(15, 512);
    let sent = bench.submit(&[(true, 300, data.clone())]);
    bench.complete(&sent, "a write after the restart");
    assert_eq!(bench.client.status(&sent[0]), OK);
    assert_eq!(bench.disk.read(300, 512), data);
    assert_eq!(bench.device.driver_pid(), Some(standby), "the standby did not take over");
    // The recovery's first completion starts the next one.
    bench.run_until("a new standby", |_, device| device.core.drivers.spare_pid().is_some_and(|pid| pid != standby));
    assert_eq!(bench.launches(), 3);
}

#[test]
fn answers_for_a_client_that_left_never_reach_the_next_one() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Serve], false, quick_recovery());
    let sent = bench.submit(&[(false, 0, vec![0; 4096])]);
    // The client goes away before the answer is taken; another attaches,
    // its memory laid out the same way.
    bench.device.client_gone();
    let other_memory = client_memory();
    let mut other = Client::attach(&other_memory, &mut bench.device);
    other.scribble(&sent[0]);
    let listeners = bench.listeners.clone();
    other.run_until(&mut bench.device, &listeners, BOUND, &|| "the answer to be taken".into(), |_, device| {
        device.metrics().in_flight.load(Ordering::SeqCst) == 0
    });
    assert!(other.take_used().is_empty(), "an answer for the old client was completed in the new one's queue");
    assert_eq!(other.status(&sent[0]), 0xee, "the old client's status was written into the new client's memory");
    assert_eq!(
        other.data(&sent[0]),
        vec![0xee; 4096],
        "the old client's data was written into the new client's memory"
    );
    assert_eq!(bench.count(&bench.metrics.completed), 0);
}

#[test]
fn a_worker_polling_for_completions_completes_every_request_once_with_its_data() {
    let memory = client_memory();
    let mut bench = Bench::on(FakeDisk::new(4096), &memory, &[Script::Serve], false, RecoveryConfig::default(), BOUND);
    for round in 0..20u64 {
        let data = pattern(round as u8, 4096);
        let write = bench.submit(&[(true, round * 8, data.clone())]);
        bench.complete(&write, "a polled write");
        let read = bench.submit(&[(false, round * 8, vec![0; 4096])]);
        bench.complete(&read, "a polled read");
        assert_eq!(bench.client.data(&read[0]), data, "round {round}");
    }
    assert_eq!(bench.count(&bench.metrics.errors), 0);
}

#[test]
fn poll_credit_follows_hits_and_probes_when_polling_stopped_paying() {
    let mut credit = crate::device::PollCredit::default();
    // No credit yet: one probe in PROBE_EVERY kicks.
    let probes = (0..32).filter(|_| credit.should_poll()).count();
    assert_eq!(probes, 2);
    credit.record(true);
    assert!((0..10).all(|_| credit.should_poll()), "a hit earns polling on every kick");
    credit.record(false);
    assert!(!credit.should_poll(), "a miss costs two: the one hit's credit is gone");
    for _ in 0..20 {
        credit.record(true);
    }
    for _ in 0..3 {
        credit.record(false);
    }
    assert!(credit.should_poll(), "credit is capped at MAX (8): three misses leave two");
    credit.record(false);
    assert!(!credit.should_poll(), "the fourth miss in a row stops polling");
}

#[test]
fn a_device_that_was_stopped_starts_no_driver_vm_when_its_driver_then_hangs() {
    // The reflector stops every device, then shuts them down one after
    // another while their workers run on: a hang deadline that passes in
    // between must not start a driver VM (which would outlive the
    // reflector's cleanup of its jail).
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Hang, Script::Serve], false, quick_recovery());
    let sent = bench.submit(&[(true, 20, pattern(4, 1024))]);
    bench.device.stop();
    bench.run_until("the hang to be seen", |_, device| device.core.metrics.faults.load(Ordering::SeqCst) == 1);
    assert_eq!(bench.launches(), 1, "a driver VM was started after the stop");
    assert_eq!(bench.device.driver_pid(), None);
    assert_eq!(bench.count(&bench.metrics.restarts), 0);
    // Its request stays unanswered (the reflector is going): no I/O error.
    assert!(bench.client.take_used().iter().all(|(head, _)| *head != sent[0].head));
    bench.device.shutdown();
    bench.device.shutdown();
    assert_eq!(bench.launches(), 1);
}

/// A client that offers a request's head again while the device still
/// holds it (virtio: a head is the driver's again only once used) is cut
/// off once it would pass its queue's size, instead of making the
/// reflector keep a request per offer without bound. Before the fix the
/// device took every offer: 385 requests from a queue of 256.
#[test]
fn a_client_reoffering_a_request_the_device_holds_is_cut_off_at_its_queue_size() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Hang], false, RecoveryConfig::default());
    let sent = bench.submit(&[(false, 0, vec![0; 512])]);
    for _ in 0..3 {
        bench.client.republish(sent[0].head, QUEUE_SIZE / 2);
        bench.client.kick(&mut bench.device);
    }
    assert!(bench.device.core.memory.is_none(), "the client reusing a held head was not cut off");
    assert!(bench.count(&bench.metrics.malformed) >= 1);
}

/// A queue whose avail ring virtio-queue cannot pop (at guest address 0,
/// which it takes for a ring never set, or with its entries past the
/// client's memory, its index inside) while its index says there is a
/// chain: with EVENT_IDX, asking for the next kick reports that chain
/// again and again. The client is cut off at the kick; before, the
/// worker's kick never returned (its device locked for good, a line
/// logged at each turn).
#[test]
fn a_queue_whose_avail_ring_cannot_be_popped_cuts_the_client_off_instead_of_spinning() {
    for avail in [0, super::fake::CLIENT_MEMORY as u64 - 4] {
        let memory = client_memory();
        let mut bench = Bench::new(&memory, &[Script::Hang], false, RecoveryConfig::default());
        bench.client.move_avail_ring(&mut bench.device, avail, 1);
        bench.client.kick(&mut bench.device);
        assert!(bench.device.core.memory.is_none(), "avail ring at {avail:#x}: the client was not cut off");
        assert!(bench.count(&bench.metrics.malformed) >= 1);
    }
    // The same for a net device's receive queue.
    let memory = client_memory();
    let mut device = fake_net_device("fake-net-unpoppable", 3);
    let client = Client::attach(&memory, &mut device);
    client.move_avail_ring(&mut device, super::fake::CLIENT_MEMORY as u64 - 4, 1);
    client.kick(&mut device);
    assert!(device.core.memory.is_none(), "the net client was not cut off");
    device.shutdown();
}

/// A kick that a read does not empty (an eventfd in semaphore mode) is
/// refused by its queue on any kernel, and the client is cut off at the
/// device's next event, whatever that event is: its queue, never served,
/// brings none.
#[test]
fn a_client_whose_kick_was_refused_is_cut_off_at_the_next_event() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use vhost_user_backend::{VhostUserBackendMut, VringT};
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Serve], false, RecoveryConfig::default());
    // SAFETY: eventfd(2); checked, then owned.
    let semaphore = unsafe { libc::eventfd(1 << 20, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE) };
    assert!(semaphore >= 0);
    // SAFETY: a fresh descriptor owned from here on.
    let semaphore = unsafe { OwnedFd::from_raw_fd(semaphore) };
    // Disabled first, as a client replaces a kick.
    bench.client.vrings[0].set_enabled(false);
    bench.client.vrings[0].set_kick(Some(std::fs::File::from(semaphore)));
    assert!(bench.client.vrings[0].kick_refused());
    assert!(bench.device.core.memory.is_some(), "cut off before any event");
    let doorbell = bench.device.core.completion_doorbell.as_raw_fd();
    let event = bench.listeners.iter().find(|(fd, _)| *fd == doorbell).unwrap().1;
    bench.device.handle_event(event, vmm_sys_util::epoll::EventSet::IN, &bench.client.vrings, 0).unwrap();
    assert!(bench.device.core.memory.is_none(), "the client whose kick was refused was not cut off");
    assert!(bench.count(&bench.metrics.malformed) >= 1);
}

/// The vmm holds its completion doorbell (its ioeventfd) and may make it
/// blocking and drain it between the worker's wake-up and its read: the
/// worker must not wait there. Before, it read it with a plain read and
/// slept, its device held, until the vmm rang again, and the hang watch
/// that would have replaced that driver VM runs on the same worker.
#[test]
fn a_completion_doorbell_its_vmm_drained_does_not_hold_the_worker() {
    use std::os::fd::AsRawFd;
    use vhost_user_backend::VhostUserBackendMut;
    // On a thread of its own: a worker stuck in the read would hang the
    // test instead of failing it.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let memory: &'static GuestMemoryMmap = Box::leak(Box::new(client_memory()));
        let mut bench = Bench::new(memory, &[Script::Hang], false, RecoveryConfig::default());
        let doorbell = bench.device.core.completion_doorbell.as_raw_fd();
        // SAFETY: fcntl(2) on the doorbell's descriptor: what the hostile
        // vmm does to its own copy (the count is 0: drained).
        assert_eq!(unsafe { libc::fcntl(doorbell, libc::F_SETFL, 0) }, 0);
        let event = bench.listeners.iter().find(|(fd, _)| *fd == doorbell).unwrap().1;
        bench.device.handle_event(event, vmm_sys_util::epoll::EventSet::IN, &bench.client.vrings, 0).unwrap();
        let _ = done.send(());
    });
    let waited = finished.recv_timeout(Duration::from_secs(20));
    assert!(waited.is_ok(), "the worker waited on a drained completion doorbell (or failed)");
}

/// A sync of the medium that fails (a host write-back error) fails the
/// flush, and every flush after it: the host reports such an error once
/// per descriptor, so a later sync passes while what the failed one covered
/// may be lost. The driver, which did its part, is not blamed. Before, the
/// flush was judged not done: the driver was replaced, the flush replayed,
/// and the replay's sync passed: the client was told its data was durable
/// (an adversarial review found it).
#[test]
fn a_failed_sync_of_the_medium_fails_every_flush_from_then_on_and_blames_no_driver() {
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Serve], false, quick_recovery());
    let write = bench.submit(&[(true, 0, vec![7; 4096])]);
    bench.complete(&write, "the write");
    bench.disk.fail_next_sync.store(true, Ordering::SeqCst);
    for attempt in ["the flush whose sync failed", "a flush after it"] {
        let flush = bench.client.flush();
        bench.client.kick(&mut bench.device);
        bench.complete(std::slice::from_ref(&flush), attempt);
        assert_eq!(bench.client.status(&flush), crate::blk::marshal::VIRTIO_BLK_S_IOERR, "{attempt}");
    }
    assert_eq!(bench.count(&bench.metrics.faults), 0, "a driver was blamed for the medium's failure");
}

/// A client that stops its queue (GET_VRING_BASE: vhost-user-backend marks
/// it not ready before the device hears of it) while chains are published
/// and a kick is being handled is not cut off: the pass finds nothing to
/// pop, and ends. Before, the guard against a queue that reports chains it
/// cannot yield cut off an honest QEMU stopping its VM under I/O (an
/// adversarial review of that guard found it).
#[test]
fn a_queue_stopped_under_a_kick_ends_the_pass_without_cutting_the_client_off() {
    use vhost_user_backend::{VhostUserBackendMut, VringT};
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Hang], false, RecoveryConfig::default());
    bench.device.set_event_idx(true);
    bench.client.vrings[0].set_queue_event_idx(true);
    bench.client.request(false, 0, &[0; 512]);
    bench.client.vrings[0].set_queue_ready(false);
    bench.client.mark_avail_event(0x5a5a);
    bench.client.kick(&mut bench.device);
    assert!(bench.device.core.memory.is_some(), "an honest client stopping its queue was cut off");
    assert_eq!(bench.count(&bench.metrics.malformed), 0);
    // The ring is the client's again: nothing is written there (a review
    // found the pass still wrote the avail event after the stop).
    assert_eq!(bench.client.avail_event(), 0x5a5a, "the device wrote the stopped queue's avail event");
    // The same for a net device's receive queue.
    let memory = client_memory();
    let mut device = fake_net_device("fake-net-stopped", 5);
    let mut client = Client::attach(&memory, &mut device);
    device.set_event_idx(true);
    client.vrings[0].set_queue_event_idx(true);
    client.writable(2048);
    client.vrings[0].set_queue_ready(false);
    client.kick(&mut device);
    assert!(device.core.memory.is_some(), "an honest net client stopping its queue was cut off");
    device.shutdown();
}

/// A net device on a simulated card of address 02:00:00:00:00:`mac`,
/// alone on a switch of its own, whose driver VM never answers.
fn fake_net_device(name: &str, mac: u8) -> Device<crate::net::device::Net> {
    fake_net_device_with(name, mac, Script::Hang)
}

/// The same, its driver VM doing what `script` says.
fn fake_net_device_with(name: &str, mac: u8, script: Script) -> Device<crate::net::device::Net> {
    let channel = Channel::new(name).unwrap();
    let switch = hardware::switch::Switch::new(name);
    let card = Arc::new(
        hardware::sim_nic::SimNic::start(name, [2, 0, 0, 0, 0, mac], crate::serve::bounce_dma(&channel), switch)
            .unwrap(),
    );
    let completion_doorbell = SharedEventFd::new().unwrap();
    let driver_exited = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let launch =
        FakeLaunch::new(channel.memory().clone(), &completion_doorbell, &driver_exited, FakeDisk::new(8), &[script]);
    let wiring = DeviceWiring {
        channel,
        hardware: card.clone(),
        device_interrupt: card.interrupt(),
        completion_doorbell,
        driver_exited,
        launcher: Box::new(launch),
        poll_window: Duration::ZERO,
        memory_cap: None,
    };
    Device::new(name, crate::net::device::Net::new(card), wiring, RecoveryConfig::default()).unwrap()
}

/// A net driver answering every receive buffer with an error at once
/// (no frame came, nothing was asked) gets them back once at once, then at
/// the next watch period: before, the worker re-posted each as it came
/// back, and the driver kept it doing so, a host core outside its quota,
/// while the answers made it look busy to the idle watch (an adversarial
/// review found it).
#[test]
fn receive_buffers_a_net_driver_fails_come_back_only_at_the_next_watch() {
    let memory = client_memory();
    let mut device = fake_net_device_with("fake-net-rx-errors", 4, Script::FailAll);
    let mut client = Client::attach(&memory, &mut device);
    let listeners = device.listeners();
    let metrics = device.metrics();
    let errors = || metrics.errors.load(Ordering::SeqCst);
    // Every buffer, then every one again (posted again at once), then none.
    let rx = 2 * u64::from(crate::net::slots::RX_SLOTS);
    let what = || format!("receive errors: {}", metrics.errors.load(Ordering::SeqCst));
    client.run_until(&mut device, &listeners, BOUND, &what, |_, _| errors() >= rx);
    // Long enough for the buffers to go round many times, were they posted
    // again at once (the worker's loop is microseconds a turn).
    let started = std::time::Instant::now();
    client.run_until(&mut device, &listeners, BOUND, &what, |_, _| {
        errors() > rx || started.elapsed() > Duration::from_millis(200)
    });
    assert_eq!(errors(), rx, "failed receive buffers were posted again before the next watch");
    let timer = std::os::fd::AsRawFd::as_raw_fd(&device.core.watch_timer);
    let watch = listeners.iter().find(|(fd, _)| *fd == timer).unwrap().1;
    // A watch period ends now (a handler acts only on an expiry).
    device.core.watch_timer.reset(Duration::from_micros(1), None).unwrap();
    assert!(hardware::wait_readable(timer, Some(BOUND)), "the watch timer did not expire");
    vhost_user_backend::VhostUserBackendMut::handle_event(
        &mut device,
        watch,
        vmm_sys_util::epoll::EventSet::IN,
        &client.vrings,
        0,
    )
    .unwrap();
    client.run_until(&mut device, &listeners, BOUND, &what, |_, _| errors() >= rx + rx / 2);
    device.shutdown();
}

/// The same for a net device's receive buffers, which it keeps until a
/// frame comes: without the cut, one writable buffer offered again and
/// again made the reflector hold a chain per offer.
#[test]
fn a_net_client_reoffering_a_held_receive_buffer_is_cut_off_at_its_queue_size() {
    let memory = client_memory();
    let mut device = fake_net_device("fake-net", 1);
    let mut client = Client::attach(&memory, &mut device);
    let head = client.writable(2048);
    client.kick(&mut device);
    for _ in 0..3 {
        client.republish(head, QUEUE_SIZE / 2);
        client.kick(&mut device);
    }
    assert!(device.core.memory.is_none(), "the client reusing a held receive buffer was not cut off");
    device.shutdown();
}

/// A receive queue the client stops (GET_VRING_BASE: its guest reboots,
/// say) gets back the receive chains the device held, unused, at once:
/// kept, they took frames after the restart, written where the old
/// kernel's buffers were (into the next kernel's memory), their heads put
/// in the new ring (an adversarial review found it).
#[test]
fn a_stopped_receive_queue_gets_its_held_buffers_back_unused() {
    let memory = client_memory();
    let mut device = fake_net_device("fake-net-stop", 2);
    let mut client = Client::attach(&memory, &mut device);
    let heads: Vec<u16> = (0..3).map(|_| client.writable(2048)).collect();
    client.kick(&mut device);
    assert!(client.take_used().is_empty(), "the receive buffers were not held");
    vhost_user_backend::VhostUserBackendMut::stop_vring(&mut device, virtio::net::RX_QUEUE as u32).unwrap();
    assert_eq!(client.take_used(), heads.iter().map(|&head| (head, 0)).collect::<Vec<_>>());
    device.shutdown();
}

/// A receive queue the client disabled (SET_VRING_ENABLE 0: vhost-user
/// lets a disabled ring be processed only without side effects) gets no
/// frame into the buffers the device took from it before, and gets the
/// frames held meanwhile once enabled again. Before, every answer of the
/// driver wrote frames into them, marked them used and told the client
/// (an adversarial review found it).
#[test]
fn a_disabled_receive_queue_gets_no_frame_until_it_is_enabled_again() {
    use vhost_user_backend::VringT;
    let memory = client_memory();
    let mut device = fake_net_device_with("fake-net-rx-disabled", 6, Script::Receive);
    let mut client = Client::attach(&memory, &mut device);
    let _tx = client.add_queue();
    let listeners = device.listeners();
    let metrics = device.metrics();
    let heads: Vec<u16> = (0..4).map(|_| client.writable(2048)).collect();
    client.kick(&mut device);
    assert!(client.take_used().is_empty(), "frames came before the driver's answers were taken");
    client.vrings[0].set_enabled(false);
    let answers = || metrics.doorbells.load(Ordering::SeqCst);
    let what = || format!("driver doorbells: {}", answers());
    client.run_until(&mut device, &listeners, BOUND, &what, |_, _| answers() > 0);
    assert_eq!(client.take_used(), vec![], "frames were written into a disabled receive queue");
    assert_eq!(metrics.rx_frames.load(Ordering::SeqCst), 0);
    client.vrings[0].set_enabled(true);
    client.kick(&mut device);
    let frame = (virtio::net::HEADER_LEN as u32) + super::fake::RECEIVED_FRAME;
    assert_eq!(client.take_used(), heads.iter().map(|&head| (head, frame)).collect::<Vec<_>>());
    device.shutdown();
}

/// A transmit queue the client disabled has its frames discarded, never
/// sent (vhost-user), and its chains given back. Before, they were sent
/// whenever an answer of the driver came.
#[test]
fn a_disabled_transmit_queues_frames_are_discarded_not_sent() {
    use vhost_user_backend::VringT;
    let memory = client_memory();
    let mut device = fake_net_device_with("fake-net-tx-disabled", 7, Script::Receive);
    let mut client = Client::attach(&memory, &mut device);
    let mut tx = client.add_queue();
    client.vrings[1].set_enabled(false);
    let head = tx.frame(60);
    let listeners = device.listeners();
    let metrics = device.metrics();
    // The driver answers the receive buffers it is given at once, and each
    // answer has the device look at the transmit queue.
    let answers = || metrics.doorbells.load(Ordering::SeqCst);
    let what = || format!("driver doorbells: {}", answers());
    client.run_until(&mut device, &listeners, BOUND, &what, |_, _| answers() > 0);
    assert_eq!(metrics.tx_frames.load(Ordering::SeqCst), 0, "a disabled queue's frame was sent");
    assert_eq!(metrics.tx_lost.load(Ordering::SeqCst), 1);
    assert_eq!(tx.take_used(), vec![(head, 0)]);
    device.shutdown();
}

/// A client that publishes chains the device completes as it takes them
/// (malformed ones), as fast as it takes them (another vCPU of its guest),
/// has one event take a queue's worth, and the worker goes on. Before, the
/// event took chains for as long as the client published them, its device
/// and worker held the while (an adversarial review found it).
#[test]
fn a_client_publishing_as_fast_as_the_device_takes_has_one_event_take_a_queues_worth() {
    use std::sync::atomic::AtomicBool;
    use vhost_user_backend::{VhostUserBackendMut, VringT};
    use vm_memory::{Address, Bytes, GuestAddress};
    let memory: &'static GuestMemoryMmap = Box::leak(Box::new(client_memory()));
    let mut bench = Bench::new(memory, &[Script::Hang], false, RecoveryConfig::default());
    bench.device.set_event_idx(true);
    bench.client.vrings[0].set_queue_event_idx(true);
    // A chain with no readable header: malformed, completed when taken.
    let head = bench.client.writable(16);
    let (avail, used) = bench.client.rings();
    let stop = Arc::new(AtomicBool::new(false));
    // The guest's vCPU: keeps half a queue of such chains published past
    // those used (the device takes them faster than one at a time),
    // until told to stop or 100,000 are published (a bound for the test
    // to end, not a timing: with the bug one event takes them all).
    const MOST: u32 = 100_000;
    let publisher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let index = |at: GuestAddress| memory.read_obj::<u16>(at.unchecked_add(2)).unwrap();
            let mut count = 0u32;
            while !stop.load(Ordering::SeqCst) && count < MOST {
                let (published, completed) = (index(avail), index(used));
                if published.wrapping_sub(completed) < QUEUE_SIZE / 2 {
                    let entry = avail.unchecked_add(4 + 2 * u64::from(published % QUEUE_SIZE));
                    memory.write_obj(head, entry).unwrap();
                    std::sync::atomic::fence(Ordering::SeqCst);
                    memory.write_obj(published.wrapping_add(1), avail.unchecked_add(2)).unwrap();
                    count += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
        })
    };
    let published = || memory.read_obj::<u16>(avail.unchecked_add(2)).unwrap();
    let deadline = std::time::Instant::now() + BOUND;
    while published() < QUEUE_SIZE / 2 {
        assert!(std::time::Instant::now() < deadline, "the guest's vCPU published nothing");
        std::thread::yield_now();
    }
    bench.client.kick(&mut bench.device);
    stop.store(true, Ordering::SeqCst);
    publisher.join().unwrap();
    let taken = bench.count(&bench.metrics.malformed);
    assert!((1..=u64::from(QUEUE_SIZE)).contains(&taken), "one event took {taken} chains");
    assert!(bench.device.core.memory.is_some(), "the client was cut off");
}

/// An idle block device gives its bounce slots' pages back, unless a
/// device reaches them through an IOMMU (VFIO), which pinned them: the
/// IOMMU would keep the old pages, so the device would write to disk what
/// the host never wrote, and the host read zeros where the device put data
/// (an adversarial review found it: the release was decided by the
/// device's kind alone).
#[test]
fn bounce_slots_a_device_pinned_are_kept_when_the_device_goes_idle() {
    use std::os::fd::AsRawFd;
    use vhost_user_backend::VhostUserBackendMut;
    let memory = client_memory();
    for pinned in [false, true] {
        let mut bench = Bench::new(&memory, &[Script::Serve], false, quick_recovery());
        let marker = guest_abi::channel::BOUNCE_OFFSET + 4096;
        bench.channel_memory.write::<u64>(marker, 0x5a5a);
        if pinned {
            bench.channel_memory.pin();
        }
        let timer = bench.device.core.watch_timer.as_raw_fd();
        let watch = bench.listeners.iter().find(|(fd, _)| *fd == timer).unwrap().1;
        for _ in 0..=super::IDLE_RELEASE_PERIODS {
            // A watch period ends now (a handler acts only on an expiry).
            bench.device.core.watch_timer.reset(Duration::from_micros(1), None).unwrap();
            assert!(hardware::wait_readable(timer, Some(BOUND)), "the watch timer did not expire");
            bench.device.handle_event(watch, vmm_sys_util::epoll::EventSet::IN, &bench.client.vrings, 0).unwrap();
        }
        let expected = if pinned { 0x5a5a } else { 0 };
        assert_eq!(bench.channel_memory.read::<u64>(marker), Some(expected), "pinned: {pinned}");
        bench.device.shutdown();
    }
}

/// A block queue the client stops (GET_VRING_BASE: its device stops, is
/// reset, or its guest reboots) has every request it gave completed
/// before the stop returns, as the vhost-user spec asks ("the back-end
/// must complete all inflight I/O requests for the specified vring before
/// stopping it"): completed later, a read's data and its status byte
/// landed in memory that could by then be the next kernel's. Here the
/// driver VM withholds the request, so it completes through a failover
/// and a replay that run during the stop.
#[test]
fn a_stopped_queue_has_every_request_it_gave_completed_before_the_stop_returns() {
    use vhost_user_backend::{VhostUserBackendMut, VringT};
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::WithholdSector(7), Script::Serve], false, quick_recovery());
    let sent = bench.submit(&[(true, 7, pattern(9, 512)), (true, 8, pattern(8, 512))]);
    bench.run_until("the other write", |client, _| client.status(&sent[1]) == OK);
    let mut used = bench.client.take_used();
    assert_eq!(bench.client.status(&sent[0]), 0xff, "the withheld write completed before the stop");
    bench.client.vrings[0].set_queue_ready(false);
    bench.device.stop_vring(0).unwrap();
    used.extend(bench.client.take_used());
    assert_eq!(used.iter().filter(|(head, _)| *head == sent[0].head).count(), 1, "used: {used:?}");
    assert_eq!(bench.client.status(&sent[0]), OK);
    assert_eq!(bench.disk.read(7, 512), pattern(9, 512));
    assert!(bench.launches() >= 2, "the withholding driver VM was not replaced");
}

/// A request a stopped queue can wait for no longer (its driver VM hangs
/// and the device's own deadlines are further off) completes with an I/O
/// error before the stop returns, and never again: neither its driver's
/// late answer nor a replay reaches the client's ring afterwards.
#[test]
fn a_request_a_stopped_queue_cannot_wait_for_fails_at_once_and_never_completes_later() {
    use super::DeviceKind;
    use vhost_user_backend::{VhostUserBackendMut, VringT};
    let memory = client_memory();
    let recovery = RecoveryConfig { hang_deadline: Duration::from_secs(5), ..quick_recovery() };
    let mut bench = Bench::new(&memory, &[Script::Hang, Script::Serve], false, recovery);
    bench.device.core.stop_bound = Duration::from_millis(50);
    let sent = bench.submit(&[(true, 3, pattern(3, 512))]);
    bench.run_until("the write in the driver VM", |_, device| device.kind.in_driver() == 1);
    let quiesced = bench.disk.quiesced.load(Ordering::SeqCst);
    bench.client.vrings[0].set_queue_ready(false);
    bench.device.stop_vring(0).unwrap();
    assert_eq!(bench.client.take_used(), vec![(sent[0].head, 1)]);
    assert_eq!(bench.client.status(&sent[0]), IOERR);
    // The driver VM holding it was retired, its device quiesced, before
    // the stop returned: the write cannot reach the medium afterwards.
    assert!(bench.disk.quiesced.load(Ordering::SeqCst) > quiesced, "the device was not quiesced");
    assert_eq!(bench.count(&bench.metrics.faults), 1);
    // It is not replayed to the next driver VM.
    bench.client.vrings[0].set_queue_ready(true);
    let later = bench.submit(&[(false, 4, vec![0; 512])]);
    let mut used = Vec::new();
    bench.run_until("a request after the stop", |client, _| {
        used.extend(client.take_used());
        client.status(&later[0]) != 0xff
    });
    assert_eq!(used, vec![(later[0].head, 513)], "the abandoned write completed again");
    assert!(bench.launches() >= 2, "the hung driver VM was not replaced");
    assert_eq!(bench.disk.read(3, 512), vec![0; 512], "the abandoned write reached the medium");
}

/// An event whose timer or eventfd has nothing to read changes nothing:
/// the worker may hold in its batch an event that a stopped queue's drain
/// has handled meanwhile, and a kill handled twice killed the driver VM
/// that had just replaced the one killed.
#[test]
fn an_event_already_handled_changes_nothing_when_it_comes_again() {
    use super::Source;
    use vhost_user_backend::VhostUserBackendMut;
    let memory = client_memory();
    let mut bench = Bench::new(&memory, &[Script::Serve], false, quick_recovery());
    let first = bench.submit(&[(false, 1, vec![0; 512])]);
    bench.complete(&first, "a read");
    for source in [Source::Kill, Source::Recover, Source::Hang, Source::Restart, Source::Watch] {
        let event = BlkDevice::event_id(source);
        bench.device.handle_event(event, vmm_sys_util::epoll::EventSet::IN, &bench.client.vrings, 0).unwrap();
    }
    let second = bench.submit(&[(false, 2, vec![0; 512])]);
    bench.complete(&second, "a read after");
    assert_eq!(bench.count(&bench.metrics.faults), 0, "an event with nothing to read killed the driver VM");
    assert_eq!(bench.launches(), 1);
}

/// A client that leaves (or is cut off) with a write in the driver VM: the
/// next client is served only once that write is answered or its driver
/// VM retired and its device quiesced, so that the departed write cannot
/// land after the next client's writes to the same sectors (a QEMU that
/// reconnects resubmits; a review found the departed write was left to
/// complete whenever, into nothing, on the medium all the same).
#[test]
fn a_departed_clients_write_left_in_the_driver_vm_cannot_land_after_the_next_clients() {
    use super::DeviceKind;
    let memory = client_memory();
    let recovery = RecoveryConfig { hang_deadline: Duration::from_secs(5), ..quick_recovery() };
    let mut bench = Bench::new(&memory, &[Script::WithholdSector(7), Script::Serve], false, recovery);
    bench.device.core.stop_bound = Duration::from_millis(50);
    bench.submit(&[(true, 7, pattern(7, 512))]);
    bench.run_until("the write in the driver VM", |_, device| device.kind.in_driver() == 1);
    let quiesced = bench.disk.quiesced.load(Ordering::SeqCst);
    bench.device.client_gone();
    assert!(bench.disk.quiesced.load(Ordering::SeqCst) > quiesced, "the device was not quiesced");
    assert_eq!(bench.count(&bench.metrics.faults), 1, "the withholding driver VM was not retired");
    assert_eq!(bench.disk.read(7, 512), vec![0; 512], "the departed write reached the medium");
}
