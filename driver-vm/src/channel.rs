//! The driver side of the reflector's channel, so that a driver keeps only
//! its device logic: the warm-spare handshake, the layout check, attaching
//! to a generation, request iteration, completion publishing with one
//! doorbell per burst, the idle sleep, and the faults tests inject.
//!
//! A driver opens the channel ([`Channel::open`]), brings its device to a
//! known state, attaches ([`Channel::attach`]) and hands itself to
//! [`serve`] as a [`Device`]: `submit` takes each request, `reap` moves
//! device completions into the channel with [`Channel::complete`].
//!
//! Resources, as the reflector wires every driver: window `channel` (rings
//! and bounce slots, also the device's DMA region), doorbell 0 (completions
//! published), interrupt line 0 (requests published) and, for a warm spare,
//! its vmm's go signal (`Kernel::wait_for_go`).

use core::sync::atomic::{fence, Ordering};

#[cfg(feature = "fault-injection")]
use guest_kernel::abi::channel::inject;
use guest_kernel::abi::channel::{self, header, CompletionEntry, RequestEntry};
use guest_kernel::device::{Doorbell, Window};
use guest_kernel::{arch, time, Kernel};

use crate::poll::PollWindow;
use crate::{println, Error};

/// The lies a driver tells from now on once asked (tests). This module
/// tells them all (data of reads flipped, flushes acknowledged unflushed,
/// writes acknowledged unwritten,
/// spinning, flooding); a driver whose device has reads and flushes offers
/// the first two to [`Channel::attach`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lies {
    /// Flip a bit of every read's data before answering OK.
    pub corrupt_reads: bool,
    /// Answer flushes OK without flushing.
    pub skip_flushes: bool,
    /// Answer writes OK without writing.
    pub skip_writes: bool,
    /// Never sleep.
    pub spin: bool,
    /// Ring the reflector's doorbell continuously while idle.
    pub flood: bool,
    /// Point the device's data DMA outside the region it was given (a
    /// driver of a device that DMAs by address offers it).
    pub wild_dma: bool,
    /// Set the device up again with its queues outside that region (a
    /// driver of such a device offers it; it acts on it once).
    pub wild_queues: bool,
    /// Keep the device busy with work no request asked for (a driver whose
    /// device can be given such work offers it).
    pub junk_io: bool,
}

/// The faults every driver can commit through this module (none without
/// the `fault-injection` feature: a production image commits no fault).
#[cfg(feature = "fault-injection")]
pub const GENERIC_FAULTS: [u32; 8] = [
    inject::PANIC,
    inject::PAGE_FAULT,
    inject::ILLEGAL,
    inject::HANG,
    inject::LIE,
    inject::STOP,
    inject::SPIN,
    inject::FLOOD,
];
/// The faults every driver can commit through this module (none without
/// the `fault-injection` feature: a production image commits no fault).
#[cfg(not(feature = "fault-injection"))]
pub const GENERIC_FAULTS: [u32; 0] = [];

/// The channel, as a driver uses it.
pub struct Channel {
    window: Window,
    doorbell: Doorbell,
    req_cons: u32,
    cmp_prod: u32,
    /// For console messages (about injected faults).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    name: &'static str,
    /// Lies injected so far (tests).
    pub lies: Lies,
    /// The op of the request last handed out per slot (for lies about reads).
    ops: [u32; channel::SLOT_COUNT as usize],
    /// `panic-on-sector=N` on the command line: a bug one request
    /// triggers (tests of poison requests; `fault-injection` only).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    panic_sector: Option<u64>,
}

impl Channel {
    /// Finds the channel; as a warm spare (`spare` on the command line),
    /// first waits until the reflector lets it go (`Kernel::wait_for_go`).
    pub fn open(kernel: &Kernel, name: &'static str) -> Result<Channel, Error> {
        if kernel.cmdline().split_whitespace().any(|word| word == "spare") {
            println!("{name}: warm spare ready");
            kernel.wait_for_go();
        }
        let window = kernel.window("channel").ok_or(Error::MissingWindow("channel"))?;
        let doorbell = kernel.doorbell(0).ok_or(Error::MissingDoorbell(0))?;
        kernel.interrupt_line(0).ok_or(Error::MissingInterrupt(0))?;
        let known = window.size() >= channel::REGION_SIZE as u64
            && window.read::<u64>(header::MAGIC) == channel::MAGIC
            && window.read::<u32>(header::VERSION) == channel::VERSION
            && window.read::<u32>(header::RING_SIZE) == channel::RING_SIZE
            && window.read::<u32>(header::SLOT_SIZE) == channel::SLOT_SIZE
            && window.read::<u32>(header::SLOT_COUNT) == channel::SLOT_COUNT;
        if !known {
            return Err(Error::Device("window `channel` has an unknown layout"));
        }
        let panic_sector =
            kernel.cmdline().split_whitespace().find_map(|word| word.strip_prefix("panic-on-sector=")?.parse().ok());
        let ops = [0; channel::SLOT_COUNT as usize];
        let channel =
            Channel { window, doorbell, req_cons: 0, cmp_prod: 0, name, lies: Lies::default(), ops, panic_sector };
        channel.announce(channel::driver_state::OPENED);
        Ok(channel)
    }

    /// Says where the driver is in its start (`driver_state`), for the
    /// current generation, with one doorbell ring so the reflector hears it
    /// when it does (it times failovers by these marks).
    fn announce(&self, state: u32) {
        let generation = self.window.atomic_u32(header::GENERATION).load(Ordering::Acquire);
        self.window.atomic_u32(header::DRIVER_GENERATION).store(generation, Ordering::Release);
        self.window.atomic_u32(header::DRIVER_STATE).store(state, Ordering::Release);
        self.doorbell.ring(1);
    }

    /// Starts serving the current generation, announcing the faults this
    /// driver can commit besides [`GENERIC_FAULTS`]; returns the generation.
    pub fn attach(&mut self, extra_faults: &[u32]) -> u32 {
        let window = &self.window;
        self.req_cons = window.atomic_u32(header::REQ_CONS).load(Ordering::Acquire);
        self.cmp_prod = window.atomic_u32(header::CMP_PROD).load(Ordering::Acquire);
        let generation = window.atomic_u32(header::GENERATION).load(Ordering::Acquire);
        let extra = if cfg!(feature = "fault-injection") { channel::injectable(extra_faults) } else { 0 };
        let faults = channel::injectable(&GENERIC_FAULTS) | extra;
        window.atomic_u32(header::DRIVER_INJECTABLE).store(faults, Ordering::Release);
        self.announce(channel::driver_state::READY);
        generation
    }

    /// Guest-physical address of bounce slot `slot` (what the device DMAs to).
    pub fn slot_addr(&self, slot: u32) -> u64 {
        self.window.addr() + channel::slot_offset(slot) as u64
    }

    /// The channel's memory (a lying driver changes slots).
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// Whether `request` names a slot it may use: in range, matching its id.
    pub fn slot_ok(request: &RequestEntry) -> bool {
        request.slot < channel::SLOT_COUNT && channel::slot_of(request.id) == request.slot
    }

    /// The next published request, after committing any fault the
    /// reflector injected for it.
    pub fn next_request(&mut self) -> Option<RequestEntry> {
        loop {
            if self.window.atomic_u32(header::REQ_PROD).load(Ordering::Acquire) == self.req_cons {
                return None;
            }
            let at = channel::REQUEST_RING_OFFSET
                + (self.req_cons % channel::RING_SIZE) as usize * channel::REQUEST_ENTRY_SIZE;
            let request: RequestEntry = self.window.read(at);
            self.req_cons = self.req_cons.wrapping_add(1);
            self.window.atomic_u32(header::REQ_CONS).store(self.req_cons, Ordering::Release);
            #[cfg(feature = "fault-injection")]
            {
                if self.injected_fault_due() && self.commit_injected_fault(&request) {
                    continue;
                }
                let sectors = request.sector..request.sector + u64::from(request.len).div_ceil(512);
                if self.panic_sector.is_some_and(|s| request.op != channel::op::FLUSH && sectors.contains(&s)) {
                    panic!("{}: the bug on sector {}", self.name, request.sector);
                }
            }
            if self.lies.skip_flushes && request.op == channel::op::FLUSH {
                self.complete(request.id, channel::status::OK, 0);
                continue;
            }
            if self.lies.skip_writes && request.op == channel::op::WRITE {
                self.complete(request.id, channel::status::OK, request.len);
                continue;
            }
            if Channel::slot_ok(&request) {
                self.ops[request.slot as usize] = request.op;
            }
            return Some(request);
        }
    }

    /// Whether requests wait.
    pub fn requests_pending(&self) -> bool {
        self.window.atomic_u32(header::REQ_PROD).load(Ordering::Acquire) != self.req_cons
    }

    /// Writes one completion (visible after [`Channel::publish`]).
    pub fn complete(&mut self, id: u64, status: u32, len: u32) {
        let slot = channel::slot_of(id);
        let read = self.ops.get(slot as usize) == Some(&channel::op::READ);
        if self.lies.corrupt_reads && read && status == channel::status::OK {
            let at = channel::slot_offset(slot);
            let byte: u8 = self.window.read(at);
            self.window.write(at, byte ^ 1);
        }
        let at = channel::COMPLETION_RING_OFFSET
            + (self.cmp_prod % channel::RING_SIZE) as usize * channel::COMPLETION_ENTRY_SIZE;
        self.window.write(at, CompletionEntry { id, status, len });
        self.cmp_prod = self.cmp_prod.wrapping_add(1);
    }

    /// Makes written completions visible and rings the reflector once for
    /// all of them: a doorbell is a VM exit, the dearest thing a driver does.
    pub fn publish(&mut self) {
        let published = self.window.atomic_u32(header::CMP_PROD);
        if published.load(Ordering::Relaxed) == self.cmp_prod {
            return;
        }
        published.store(self.cmp_prod, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.window.atomic_u32(header::HOST_WAITING).load(Ordering::Acquire) != 0 {
            self.doorbell.ring(1);
        }
    }

    #[cfg(feature = "fault-injection")]
    fn injected_fault_due(&self) -> bool {
        if self.window.atomic_u32(header::INJECT_KIND).load(Ordering::Acquire) == inject::NONE {
            return false;
        }
        let after = self.window.atomic_u32(header::INJECT_AFTER);
        match after.load(Ordering::Acquire) {
            0 => true,
            n => {
                after.store(n - 1, Ordering::Release);
                false
            }
        }
    }

    /// Commits the injected fault (tests and chaos only); true if it
    /// answered `request` itself.
    #[cfg(feature = "fault-injection")]
    fn commit_injected_fault(&mut self, request: &RequestEntry) -> bool {
        let kind = self.window.atomic_u32(header::INJECT_KIND).swap(inject::NONE, Ordering::AcqRel);
        println!("{}: committing injected fault {kind}", self.name);
        match kind {
            inject::PANIC => panic!("injected fault: panic"),
            // SAFETY: deliberately unmapped (beyond the vmm's address limit):
            // the page fault ends the VM, which is the point.
            inject::PAGE_FAULT => unsafe {
                let _ = (0x7f00_dead_0000 as *const u64).read_volatile();
            },
            // SAFETY: ud2 raises #UD, which ends the VM.
            inject::ILLEGAL => unsafe { core::arch::asm!("ud2") },
            inject::HANG => loop {
                core::hint::spin_loop();
            },
            // A success with a length the request could not have.
            inject::LIE => {
                self.complete(request.id, channel::status::OK, request.len.wrapping_add(1));
                self.publish();
                return true;
            }
            inject::STOP => guest_kernel::exit(0),
            inject::CORRUPT_READS => self.lies.corrupt_reads = true,
            inject::SKIP_FLUSHES => self.lies.skip_flushes = true,
            inject::SKIP_WRITES => self.lies.skip_writes = true,
            inject::SPIN => self.lies.spin = true,
            inject::FLOOD => self.lies.flood = true,
            inject::WILD_DMA => self.lies.wild_dma = true,
            inject::WILD_QUEUES => self.lies.wild_queues = true,
            inject::JUNK_IO => self.lies.junk_io = true,
            _ => {}
        }
        false
    }
}

/// What [`serve`] drives.
pub trait Device {
    /// Takes one request: hands it to the device, or completes it at once.
    fn submit(&mut self, channel: &mut Channel, request: RequestEntry);
    /// After a burst of `submit`s: tells the device.
    fn kick(&mut self) {}
    /// Moves the device's completions into the channel; whether there were
    /// any. An error stops the driver. (None for a driver that completes
    /// everything in `submit`.)
    fn reap(&mut self, channel: &mut Channel) -> Result<bool, Error> {
        let _ = channel;
        Ok(false)
    }
    /// After the completions `reap` moved were published (and the
    /// reflector rung): hands their entries back to the device. A device
    /// whose release costs an exit (an NVMe completion queue's head
    /// doorbell) does it here, so that the reflector hears of them first.
    fn released(&mut self) {}
    /// Before sleeping: asks the device to interrupt when it completes
    /// something (`armed`), or not; returns whether it has nothing to reap.
    fn arm(&mut self, armed: bool) -> bool {
        let _ = armed;
        true
    }
}

/// A driver of a device the reflector serves through the channel: all it
/// writes is how to bring its device up and how to move requests.
pub trait ChannelDriver: Device + Sized {
    /// Name used in console messages.
    const NAME: &'static str;
    /// Faults it can commit besides [`GENERIC_FAULTS`] (its lies).
    const FAULTS: &'static [u32] = &[];
    /// The longest poll before sleeping, in microseconds (the window
    /// starts there and shrinks while sleeps outlast it, [`PollWindow`]): waking a sleeping driver
    /// costs a cross-CPU wake-up and the emulated interrupt path; at 4k QD1
    /// 80 us left the block driver asleep for nearly every request and 300
    /// us keeps it awake through a busy stream, while an idle one sleeps.
    /// Sleeping sooner does not save CPU either: with the simulated
    /// controller at 4k QD1, `poll-us=` 300 / 100 / 30 / 0 gave 12.3k /
    /// 11.8k / 11.5k / 5.6k IOPS for 138 / 143 / 151 / 295 us of reflector
    /// and driver VM CPU per request (each sleep and wake-up costs more
    /// than the polling it saves). `poll-us=N` in `driver_args` overrides it
    /// (0: never poll).
    const POLL_WINDOW_US: u64 = 300;
    /// Finds the device among the kernel's resources and brings it to a
    /// known state: a driver VM that died may have left it in any.
    fn probe(kernel: &Kernel, channel: &Channel) -> Result<Self, Error>;
    /// Called once the driver serves, before its first sleep (see
    /// [`GREETING_DEADLINE_US`]): where it says what it found. A console
    /// line is an exit (about 50 us); said during the probe, it would
    /// lengthen every failover.
    fn serving(&self) {}
}

/// Opens the channel, probes `D`, attaches and serves until it fails.
pub fn run_driver<D: ChannelDriver>(kernel: &Kernel) -> Result<u32, Error> {
    let mut channel = Channel::open(kernel, D::NAME)?;
    let mut device = D::probe(kernel, &channel)?;
    let generation = channel.attach(D::FAULTS);
    // `poll-us=N` in driver_args overrides the driver's poll window.
    let poll_us = kernel.cmdline().split_whitespace().find_map(|word| word.strip_prefix("poll-us=")?.parse().ok());
    let greeting = |device: &D| {
        device.serving();
        println!("{}: serving channel generation {generation}", D::NAME);
    };
    serve_then_greet(&mut channel, &mut device, poll_us.unwrap_or(D::POLL_WINDOW_US), Some(greeting))
}

/// How long after attaching a driver that never runs out of work still says
/// it serves. Its console lines wait for its first sleep otherwise: each is
/// an exit whose line the reflector reads, and right after an attach the
/// client waits on the replayed requests. Said after the first turn, the
/// two lines held a warm spare's replay phase at p50 0.34-0.37 ms, against
/// 0.20-0.22 ms now (four pairs of 200 kills, alternated).
pub const GREETING_DEADLINE_US: u64 = 10_000;

/// Serves the channel with `device` until it fails: polls while busy,
/// sleeps (one hypercall: its vmm waits on the interrupt lines) once idle
/// for its poll window, at most `poll_window_us` and shorter while its
/// sleeps are long ([`PollWindow`]).
pub fn serve<D: Device>(channel: &mut Channel, device: &mut D, poll_window_us: u64) -> Result<u32, Error> {
    serve_then_greet(channel, device, poll_window_us, None::<fn(&D)>)
}

/// [`serve`], calling `greeting` once: before the first sleep, or
/// [`GREETING_DEADLINE_US`] after it began under unbroken load.
fn serve_then_greet<D: Device>(
    channel: &mut Channel,
    device: &mut D,
    poll_window_us: u64,
    mut greeting: Option<impl FnOnce(&D)>,
) -> Result<u32, Error> {
    let started = time::Instant::now();
    let mut idle_since = started;
    let mut window = PollWindow::new(poll_window_us);
    loop {
        let (submitted, reaped) = turn(channel, device)?;
        // A driver giving its device work nobody asked for (`junk_io`)
        // sleeps at once, so that its own vCPU stays under every watch.
        let polling = !channel.lies.junk_io && idle_since.elapsed_us() < window.us();
        if submitted || reaped {
            idle_since = time::Instant::now();
        } else if channel.lies.flood {
            channel.doorbell.ring(1);
        } else if channel.lies.spin || polling {
            core::hint::spin_loop();
        } else {
            if let Some(greet) = greeting.take() {
                greet(device);
                // Something may have come while the lines went out.
                continue;
            }
            sleep(channel, device);
            window.slept(idle_since.elapsed_us());
            idle_since = time::Instant::now();
        }
        if greeting.is_some() && started.elapsed_us() >= GREETING_DEADLINE_US {
            greeting.take().into_iter().for_each(|greet| greet(device));
        }
    }
}

/// One turn of serving: every published request to the device (told once
/// for the burst), the device's completions into the channel, published
/// with one doorbell; whether anything was (submitted, reaped).
fn turn<D: Device>(channel: &mut Channel, device: &mut D) -> Result<(bool, bool), Error> {
    let mut submitted = false;
    while let Some(request) = channel.next_request() {
        device.submit(channel, request);
        submitted = true;
    }
    if submitted {
        device.kick();
    }
    let reaped = device.reap(channel)?;
    channel.publish();
    if reaped {
        device.released();
    }
    Ok((submitted, reaped))
}

/// Most rounds [`drain`] makes: a device that always claims progress is a
/// bug the caller hears about instead of a test that never ends.
const DRAIN_ROUNDS: usize = 100_000;

/// Serves what is pending now and never sleeps: takes every published
/// request, lets the device complete what it can, publishes, until nothing
/// moves. Unit tests drive a driver with it (`driver_vm::testing`).
pub fn drain<D: Device>(channel: &mut Channel, device: &mut D) -> Result<(), Error> {
    for _ in 0..DRAIN_ROUNDS {
        if turn(channel, device)? == (false, false) {
            return Ok(());
        }
    }
    Err(Error::Device("the device kept reporting progress: drain gave up"))
}

/// Sleeps until the reflector or the device has something, after
/// announcing it (so they interrupt) and re-checking (so a publish that
/// raced with the announcement is not missed).
fn sleep<D: Device>(channel: &mut Channel, device: &mut D) {
    let sleeping = channel.window.atomic_u32(header::DRIVER_SLEEPING);
    sleeping.store(1, Ordering::SeqCst);
    let device_quiet = device.arm(true);
    fence(Ordering::SeqCst);
    if device_quiet && !channel.requests_pending() {
        arch::wait_for_interrupt();
    }
    sleeping.store(0, Ordering::SeqCst);
    device.arm(false);
    arch::take_interrupts();
}

#[cfg(all(test, not(driver_vm_isolated)))]
mod tests {
    extern crate std;

    use core::cell::Cell;

    use super::{run_driver, Channel, ChannelDriver, Device, Error, Kernel, RequestEntry};
    use crate::kernel::abi::channel::status;
    use crate::testing::{Bench, Completion};

    /// A device that answers a request on its fourth look, as a device that
    /// takes a while; records whether it had answered when the driver said
    /// it serves, and stops the driver at the next look after that.
    struct Slow {
        pending: Option<RequestEntry>,
        looks: u32,
        answered: Cell<bool>,
        greeted_after_answer: Cell<Option<bool>>,
    }

    impl ChannelDriver for Slow {
        const NAME: &'static str = "slow";
        fn probe(_: &Kernel, _: &Channel) -> Result<Self, Error> {
            Ok(Slow { pending: None, looks: 0, answered: Cell::new(false), greeted_after_answer: Cell::new(None) })
        }
        fn serving(&self) {
            self.greeted_after_answer.set(Some(self.answered.get()));
        }
    }

    impl Device for Slow {
        fn submit(&mut self, _: &mut Channel, request: RequestEntry) {
            self.pending = Some(request);
            self.looks = 0;
        }
        fn reap(&mut self, channel: &mut Channel) -> Result<bool, Error> {
            match self.greeted_after_answer.get() {
                Some(true) => return Err(Error::Device("said it serves after its answer")),
                Some(false) => return Err(Error::Device("said it serves before its answer")),
                None => {}
            }
            self.looks += 1;
            match self.pending {
                Some(request) if self.looks >= 4 => {
                    channel.complete(request.id, status::OK, request.len);
                    self.pending = None;
                    self.answered.set(true);
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
    }

    #[test]
    fn a_driver_says_it_serves_only_after_answering_what_was_waiting() {
        let mut bench = Bench::new().with_cmdline("poll-us=50");
        // Published before the driver starts: a request a failover replays.
        let replayed = bench.read(0, 512);
        let ended = run_driver::<Slow>(&bench.kernel());
        assert!(matches!(ended, Err(Error::Device("said it serves after its answer"))), "{ended:?}");
        assert_eq!(bench.completions(), [Completion { id: replayed, status: status::OK, len: 512 }]);
    }
}
