//! The workloads: throughput (frames sent as fast as a bounded window allows, every arrival
//! checked and counted) and ping-pong (one frame at a time, round-trip latency).
//!
//! A run sends on the TX queue of device `a` and receives on the RX queue of device `b` (the
//! same device when both sockets are the same), and with `bidir` also from `b` to `a`. Frames
//! carry a run id per run and direction, so frames of an earlier run still in flight are told
//! apart (counted as `stray`) and never confused with this run's.

use std::path::Path;
use std::time::{Duration, Instant};

use super::device::{Interest, NetDevice, NetOptions, Waiter};
use super::frame::{self, FrameBuilder, Parsed, Tracker, BROADCAST, MAX_FRAME, MIN_FRAME};
use super::{format_mac, HEADER_LEN};
use crate::error::{Error, Result};
use crate::job::cpu_seconds;
use crate::stats::Histogram;

/// Source MAC of frames from device `a` when it has none (locally administered).
pub const LOCAL_MAC_A: [u8; 6] = [0x02, 0x6e, 0x6c, 0x00, 0x00, 0x01];
/// Source MAC of frames from device `b` when it has none (locally administered).
pub const LOCAL_MAC_B: [u8; 6] = [0x02, 0x6e, 0x6c, 0x00, 0x00, 0x02];

/// Run id of warm-up frames ([`NetPair::warm_up`]).
pub const WARMUP_RUN: u32 = 0x4d52_4157;
/// Frames taken from an RX queue per poll.
const RX_BUDGET: usize = 64;
/// How often the control sockets are checked while busy.
const CONN_CHECK: Duration = Duration::from_millis(50);

/// The two devices of a run: frames go from `a`'s TX queue to `b`'s RX queue.
pub struct NetPair {
    devs: Vec<NetDevice>,
}

impl NetPair {
    /// Connects to the sending device at `tx` and the receiving one at `rx` (one connection if
    /// they are the same socket).
    pub fn connect(tx: &Path, rx: &Path, opts: &NetOptions) -> Result<Self> {
        let a = NetDevice::connect(tx, opts)?;
        if tx == rx {
            return Ok(NetPair { devs: vec![a] });
        }
        let b = NetDevice::connect(rx, opts)?;
        Ok(NetPair { devs: vec![a, b] })
    }

    /// The sending device.
    pub fn a(&self) -> &NetDevice {
        &self.devs[0]
    }

    /// The receiving device.
    pub fn b(&self) -> &NetDevice {
        &self.devs[self.devs.len() - 1]
    }

    fn b_index(&self) -> usize {
        self.devs.len() - 1
    }

    /// True if one device both sends and receives.
    pub fn loopback(&self) -> bool {
        self.devs.len() == 1
    }

    /// The devices (one or two).
    pub fn devices(&self) -> &[NetDevice] {
        &self.devs
    }

    /// The devices (one or two), to drive directly: the sending one first, the receiving one
    /// last ([`Self::rx_index`]).
    pub fn devices_mut(&mut self) -> &mut [NetDevice] {
        &mut self.devs
    }

    /// Index of the receiving device in [`Self::devices_mut`] (0 when one device does both).
    pub fn rx_index(&self) -> usize {
        self.b_index()
    }

    /// The MACs of a run from `a` to `b`: (dst, src). `dst`/`src` override; otherwise `b`'s and
    /// `a`'s from their config spaces, else broadcast and [`LOCAL_MAC_A`].
    pub fn macs(&self, dst: Option<[u8; 6]>, src: Option<[u8; 6]>) -> ([u8; 6], [u8; 6]) {
        let dst = dst.or(self.b().config().mac).unwrap_or(BROADCAST);
        let src = src.or(self.a().config().mac).unwrap_or(LOCAL_MAC_A);
        (dst, src)
    }

    /// Sends small frames of run [`WARMUP_RUN`] from `a` to `b` (and with `bidir` from `b` to
    /// `a`) until one arrives in each direction: a peer may drop frames while it sets up (testpmd
    /// forwards only once both ports are running) or learns addresses (a switch). Bounded by
    /// the devices' timeout; returns how long it took.
    pub fn warm_up(
        &mut self,
        dst: Option<[u8; 6]>,
        src: Option<[u8; 6]>,
        bidir: bool,
        waiter: &mut Waiter,
    ) -> Result<Duration> {
        let start = Instant::now();
        let (dst, src) = self.macs(dst, src);
        let b = self.b_index();
        let mut dirs = vec![(0, b, FrameBuilder { dst, src, run: WARMUP_RUN, len: MIN_FRAME })];
        if bidir && b != 0 {
            let back_src = self.b().config().mac.unwrap_or(LOCAL_MAC_B);
            dirs.push((b, 0, FrameBuilder { dst: src, src: back_src, run: WARMUP_RUN, len: MIN_FRAME }));
        }
        let timeout = self.devs[0].timeout();
        let deadline = start + timeout;
        let interest = vec![Interest { rx: true, tx: false }; self.devs.len()];
        for (tx, rx, builder) in dirs {
            let mut seq = 0u64;
            'direction: loop {
                let d = &mut self.devs[tx];
                d.reap_tx()?;
                if d.tx_free() > 0 {
                    d.send_with(builder.len, |buf| builder.write(buf, seq, 0));
                    d.flush_tx()?;
                    seq += 1;
                }
                let resend = Instant::now() + Duration::from_millis(10);
                loop {
                    let mut arrived = false;
                    for (k, d) in self.devs.iter_mut().enumerate() {
                        d.poll_rx(RX_BUDGET, |f| {
                            arrived |= k == rx && matches!(frame::parse(f), Parsed::Ours { run: WARMUP_RUN, .. })
                        })?;
                    }
                    if arrived {
                        break 'direction;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::NetTimeout {
                            socket: self.devs[rx].path().to_path_buf(),
                            what: format!(
                                "none of {seq} warm-up frames sent on {} (to {}) arrived: is the peer forwarding \
                                 from one socket to the other?",
                                self.devs[tx].path().display(),
                                format_mac(&builder.dst)
                            ),
                            timeout,
                        });
                    }
                    if now >= resend {
                        break;
                    }
                    self.devs.iter().try_for_each(NetDevice::check_connection)?;
                    waiter.wait(&mut self.devs, &interest, resend.min(deadline) - now)?;
                }
            }
        }
        // Let the other warm-up frames in flight arrive (they would count as stray).
        let quiet = Duration::from_millis(5);
        let drain_end = Instant::now() + Duration::from_millis(200);
        while Instant::now() < drain_end {
            let mut n = 0;
            for d in &mut self.devs {
                n += d.poll_rx(RX_BUDGET, |_| {})?;
            }
            if n == 0 && !waiter.wait(&mut self.devs, &interest, quiet)? {
                break;
            }
        }
        self.drain_tx(waiter)?;
        Ok(start.elapsed())
    }

    /// Waits (bounded by the timeout) until no TX frame is outstanding on any device.
    pub fn drain_tx(&mut self, waiter: &mut Waiter) -> Result<()> {
        for d in &mut self.devs {
            d.reap_tx()?;
            while d.tx_outstanding() > 0 {
                d.wait_tx(waiter)?;
                d.reap_tx()?;
            }
        }
        Ok(())
    }

    /// Stops every device's queues (see [`NetDevice::shutdown`]).
    pub fn shutdown(mut self, waiter: &mut Waiter) -> Result<()> {
        self.drain_tx(waiter)?;
        for d in self.devs {
            d.shutdown()?;
        }
        Ok(())
    }
}

/// A throughput run.
#[derive(Clone, Debug)]
pub struct ThroughputSpec {
    /// Frame length in bytes (60..=1514).
    pub size: usize,
    /// How long to send.
    pub duration: Duration,
    /// Frames in flight per direction (sent, not yet received, not given up).
    pub window: usize,
    /// Frames queued per kick at most.
    pub burst: usize,
    /// Also send from `b` to `a`.
    pub bidir: bool,
    /// With frames in flight and none arriving for this long, those frames are given up (they
    /// count as lost unless they arrive later) and the window reopens; at the end, how long
    /// to wait for the last frames.
    pub stall: Duration,
    /// Destination MAC of frames from `a` (default: `b`'s, else broadcast).
    pub dst: Option<[u8; 6]>,
    /// Source MAC of frames from `a` (default: `a`'s, else [`LOCAL_MAC_A`]).
    pub src: Option<[u8; 6]>,
    /// Run id of the first direction (the second uses the next one).
    pub run_id: u32,
}

/// The figures of one direction.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FlowResult {
    /// "TX socket -> RX socket".
    pub direction: String,
    /// Destination MAC.
    pub dst_mac: String,
    /// Source MAC.
    pub src_mac: String,
    /// Frames sent.
    pub sent: u64,
    /// Distinct frames received intact.
    pub received: u64,
    /// Frames sent and never received.
    pub lost: u64,
    /// `lost` in percent of `sent`.
    pub loss_pct: f64,
    /// Frames received more than once (extra copies).
    pub duplicates: u64,
    /// Frames of this run received damaged.
    pub corrupted: u64,
    /// Frames received after a later one.
    pub out_of_order: u64,
    /// Runs of consecutive lost frames.
    pub gap_runs: u64,
    /// First lost sequence numbers.
    pub first_lost: Vec<u64>,
    /// Times the window was reopened after a stall.
    pub window_resets: u64,
    /// Received frames per second, in millions.
    pub mpps: f64,
    /// Received frame bytes per second, in Gbit.
    pub gbps: f64,
    /// Sent frames per second, in millions.
    pub tx_mpps: f64,
    /// One-way latency (send to receive, same clock), microseconds.
    pub lat_p50_us: f64,
    /// One-way latency p99, microseconds.
    pub lat_p99_us: f64,
    /// One-way latency mean, microseconds.
    pub lat_mean_us: f64,
    /// One-way latency maximum, microseconds.
    pub lat_max_us: f64,
}

/// The figures of a throughput run (directions added up; per direction in `flows`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ThroughputResult {
    /// "throughput".
    pub mode: &'static str,
    /// Frame length.
    pub size: usize,
    /// Seconds spent sending.
    pub seconds: f64,
    /// Window per direction (at most what the receiving RX queue holds).
    pub window: usize,
    /// Frames sent.
    pub sent: u64,
    /// Distinct frames received intact.
    pub received: u64,
    /// Frames never received.
    pub lost: u64,
    /// `lost` in percent of `sent`.
    pub loss_pct: f64,
    /// Extra copies received.
    pub duplicates: u64,
    /// Damaged test frames (including those whose run id was damaged).
    pub corrupted: u64,
    /// Frames received after a later one.
    pub out_of_order: u64,
    /// Test frames of another run (e.g. late frames of an earlier run).
    pub stray: u64,
    /// Frames that are not test frames.
    pub foreign: u64,
    /// Received frames per second, in millions.
    pub mpps: f64,
    /// Received frame bytes per second, in Gbit.
    pub gbps: f64,
    /// Sent frames per second, in millions.
    pub tx_mpps: f64,
    /// One-way latency p50, microseconds.
    pub lat_p50_us: f64,
    /// One-way latency p99, microseconds.
    pub lat_p99_us: f64,
    /// Frames that spanned several RX buffers.
    pub multi_buffer_frames: u64,
    /// TX kicks per frame sent.
    pub kicks_per_frame: f64,
    /// Sleeps on the call eventfds.
    pub sleeps: u64,
    /// CPU time of this process, percent of one core.
    pub cpu_pct: f64,
    /// Per direction.
    pub flows: Vec<FlowResult>,
}

impl ThroughputResult {
    /// True if every frame that arrived was intact and arrived once, and some arrived.
    pub fn clean(&self) -> bool {
        self.received > 0 && self.corrupted == 0 && self.duplicates == 0
    }
}

/// A periodic progress report.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Seconds since the start.
    pub elapsed: f64,
    /// Frames sent so far.
    pub sent: u64,
    /// Frames received so far.
    pub received: u64,
    /// Received frames per second over the last interval, in millions.
    pub mpps: f64,
}

struct Flow {
    tx: usize,
    rx: usize,
    builder: FrameBuilder,
    sent: u64,
    /// Frames below this are no longer in flight (given up after a stall).
    base: u64,
    tracker: Tracker,
    lat: Histogram,
    last_event: Instant,
    window_resets: u64,
}

impl Flow {
    fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.base.max(self.tracker.next_expected()))
    }
}

#[derive(Default)]
struct Others {
    stray: u64,
    foreign: u64,
    corrupted: u64,
}

/// Classifies and records one received frame.
fn dispatch(frame: &[u8], flows: &mut [Flow], others: &mut Others, now_ns: u64, now: Instant, total: &mut Histogram) {
    match frame::parse(frame) {
        Parsed::Ours { run, seq, ts } => match flows.iter_mut().find(|f| f.builder.run == run) {
            Some(f) => {
                if f.tracker.record(seq, frame.len(), f.sent) == frame::Arrival::New {
                    f.last_event = now;
                }
                let lat = now_ns.saturating_sub(ts);
                f.lat.record(lat);
                total.record(lat);
            }
            None => others.stray += 1,
        },
        Parsed::Corrupt { run, .. } => match flows.iter_mut().find(|f| f.builder.run == run) {
            Some(f) => f.tracker.record_corrupt(),
            None => others.corrupted += 1,
        },
        Parsed::Foreign => others.foreign += 1,
    }
}

fn check_size(size: usize) -> Result<()> {
    if !(MIN_FRAME..=MAX_FRAME).contains(&size) {
        return Err(Error::InvalidJob(format!("frame size {size} is not in {MIN_FRAME}..={MAX_FRAME}")));
    }
    Ok(())
}

fn us(ns: f64) -> f64 {
    (ns / 100.0).round() / 10.0
}

/// Runs a throughput test; `progress` is called about once a second.
pub fn throughput(
    pair: &mut NetPair,
    spec: &ThroughputSpec,
    waiter: &mut Waiter,
    mut progress: impl FnMut(&Progress),
) -> Result<ThroughputResult> {
    check_size(spec.size)?;
    if spec.window == 0 || spec.burst == 0 {
        return Err(Error::InvalidJob("--window and --burst must be at least 1".into()));
    }
    if spec.bidir && pair.loopback() {
        return Err(Error::InvalidJob("--bidir needs two different sockets".into()));
    }
    let (dst, src) = pair.macs(spec.dst, spec.src);
    // More frames in flight than the receiving RX queue has room for would only be dropped.
    let room = |d: &NetDevice| {
        let per_frame = (HEADER_LEN + spec.size).div_ceil(d.rx_buf_size());
        usize::from(d.queue_size()) / per_frame
    };
    let window = spec.window.min(room(pair.b())).min(room(pair.a())).max(1);
    let start = Instant::now();
    let b = pair.b_index();
    let mut flows = vec![Flow {
        tx: 0,
        rx: b,
        builder: FrameBuilder { dst, src, run: spec.run_id, len: spec.size },
        sent: 0,
        base: 0,
        tracker: Tracker::new(),
        lat: Histogram::new(),
        last_event: start,
        window_resets: 0,
    }];
    if spec.bidir {
        let back_src = pair.b().config().mac.unwrap_or(LOCAL_MAC_B);
        flows.push(Flow {
            tx: b,
            rx: 0,
            builder: FrameBuilder { dst: src, src: back_src, run: spec.run_id.wrapping_add(1), len: spec.size },
            sent: 0,
            base: 0,
            tracker: Tracker::new(),
            lat: Histogram::new(),
            last_event: start,
            window_resets: 0,
        });
    }
    let devs = &mut pair.devs;
    let before: Vec<_> = devs.iter().map(|d| (d.stats(), d.multi_buffer_frames())).collect();
    let sleeps0 = waiter.sleeps;
    let cpu0 = cpu_seconds();
    let mut others = Others::default();
    let mut total_lat = Histogram::new();
    let window_frames = window;
    let window = window as u64;
    let end = start + spec.duration;
    let mut send_end: Option<Instant> = None;
    let mut last_tx_done = start;
    let mut next_check = start + CONN_CHECK;
    let mut next_report = start + Duration::from_secs(1);
    let mut last_report = (start, 0u64);
    let mut interest = vec![Interest::default(); devs.len()];
    let ns = |t: Instant| t.saturating_duration_since(start).as_nanos() as u64;

    loop {
        let now = Instant::now();
        let sending = now < end;
        if !sending && send_end.is_none() {
            send_end = Some(now);
        }
        let mut busy = false;
        for d in devs.iter_mut() {
            if d.has_rx() {
                let t = Instant::now();
                let n = d.poll_rx(RX_BUDGET, |f| dispatch(f, &mut flows, &mut others, ns(t), t, &mut total_lat))?;
                busy |= n > 0;
            }
            if d.tx_outstanding() > 0 && d.reap_tx()? > 0 {
                busy = true;
                last_tx_done = now;
            }
        }
        if sending {
            for f in &mut flows {
                let d = &mut devs[f.tx];
                let room = window.saturating_sub(f.in_flight()).min(spec.burst as u64).min(d.tx_free() as u64);
                if room == 0 {
                    continue;
                }
                let ts = ns(now);
                if d.tx_outstanding() == 0 {
                    // The queue was idle: TX completions are timed from now.
                    last_tx_done = now;
                }
                for _ in 0..room {
                    let (builder, seq) = (&f.builder, f.sent);
                    if !d.send_with(spec.size, |buf| builder.write(buf, seq, ts)) {
                        break;
                    }
                    f.sent += 1;
                }
                d.flush_tx()?;
                busy = true;
            }
        } else if flows.iter().all(|f| f.in_flight() == 0) {
            break;
        }
        if now >= next_check {
            devs.iter().try_for_each(NetDevice::check_connection)?;
            next_check = now + CONN_CHECK;
            if now >= next_report {
                let received: u64 = flows.iter().map(|f| f.tracker.received).sum();
                let dt = (now - last_report.0).as_secs_f64();
                progress(&Progress {
                    elapsed: (now - start).as_secs_f64(),
                    sent: flows.iter().map(|f| f.sent).sum(),
                    received,
                    mpps: (received - last_report.1) as f64 / dt / 1e6,
                });
                last_report = (now, received);
                next_report = now + Duration::from_secs(1);
            }
        }
        if busy {
            continue;
        }
        // Nothing moved: give up on stalled windows, or wait.
        for f in &mut flows {
            if f.in_flight() > 0 && now.saturating_duration_since(f.last_event) >= spec.stall {
                f.base = f.sent;
                f.last_event = now;
                if sending {
                    f.window_resets += 1;
                }
            }
        }
        let tx_outstanding: usize = devs.iter().map(NetDevice::tx_outstanding).sum();
        let timeout = devs[0].timeout();
        if tx_outstanding > 0 && now.saturating_duration_since(last_tx_done) >= timeout {
            let d = devs.iter().find(|d| d.tx_outstanding() > 0).unwrap_or(&devs[0]);
            return Err(Error::NetTimeout {
                socket: d.path().to_path_buf(),
                what: format!("the backend completed none of the {} outstanding TX frames", d.tx_outstanding()),
                timeout,
            });
        }
        for (i, d) in interest.iter_mut().zip(devs.iter()) {
            *i = Interest { rx: true, tx: d.tx_outstanding() > 0 };
        }
        let mut wait = spec.stall.min(Duration::from_millis(10));
        if sending {
            wait = wait.min(end.saturating_duration_since(now));
        }
        waiter.wait(devs, &interest, wait.max(Duration::from_micros(1)))?;
    }
    let send_end = send_end.unwrap_or_else(Instant::now);
    let secs = (send_end - start).as_secs_f64().max(1e-9);
    let cpu = cpu_seconds() - cpu0;
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);

    let mut r = ThroughputResult {
        mode: "throughput",
        size: spec.size,
        seconds: (secs * 1000.0).round() / 1000.0,
        window: window_frames,
        stray: others.stray,
        foreign: others.foreign,
        corrupted: others.corrupted,
        sleeps: waiter.sleeps - sleeps0,
        cpu_pct: (cpu / elapsed * 1000.0).round() / 10.0,
        lat_p50_us: us(total_lat.quantile(0.5) as f64),
        lat_p99_us: us(total_lat.quantile(0.99) as f64),
        ..Default::default()
    };
    for f in &flows {
        let t = &f.tracker;
        let lost = t.lost(f.sent);
        let (gap_runs, first_lost) = t.gaps(f.sent, 8);
        let fr = FlowResult {
            direction: format!("{} -> {}", devs[f.tx].path().display(), devs[f.rx].path().display()),
            dst_mac: format_mac(&f.builder.dst),
            src_mac: format_mac(&f.builder.src),
            sent: f.sent,
            received: t.received,
            lost,
            loss_pct: pct(lost, f.sent),
            duplicates: t.duplicates,
            corrupted: t.corrupted,
            out_of_order: t.out_of_order,
            gap_runs,
            first_lost,
            window_resets: f.window_resets,
            mpps: t.received as f64 / secs / 1e6,
            gbps: t.bytes as f64 * 8.0 / secs / 1e9,
            tx_mpps: f.sent as f64 / secs / 1e6,
            lat_p50_us: us(f.lat.quantile(0.5) as f64),
            lat_p99_us: us(f.lat.quantile(0.99) as f64),
            lat_mean_us: us(f.lat.mean()),
            lat_max_us: us(f.lat.max() as f64),
        };
        r.sent += fr.sent;
        r.received += fr.received;
        r.lost += fr.lost;
        r.duplicates += fr.duplicates;
        r.corrupted += fr.corrupted;
        r.out_of_order += fr.out_of_order;
        r.mpps += fr.mpps;
        r.gbps += fr.gbps;
        r.tx_mpps += fr.tx_mpps;
        r.flows.push(fr);
    }
    r.loss_pct = pct(r.lost, r.sent);
    let mut kicks = 0;
    for (d, (s0, m0)) in devs.iter().zip(&before) {
        kicks += d.stats().tx_kicks - s0.tx_kicks;
        r.multi_buffer_frames += d.multi_buffer_frames() - m0;
    }
    r.kicks_per_frame = if r.sent == 0 { 0.0 } else { kicks as f64 / r.sent as f64 };
    pair.drain_tx(waiter)?;
    Ok(r)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// A ping-pong run: one frame at a time from `a` to `b`.
#[derive(Clone, Debug)]
pub struct PingSpec {
    /// Frame length in bytes (60..=1514).
    pub size: usize,
    /// Stop after this long (None: only `count` applies).
    pub duration: Option<Duration>,
    /// Stop after this many frames (None: only `duration` applies).
    pub count: Option<u64>,
    /// A frame not back within this long is lost.
    pub loss_timeout: Duration,
    /// Destination MAC (default: `b`'s, else broadcast).
    pub dst: Option<[u8; 6]>,
    /// Source MAC (default: `a`'s, else [`LOCAL_MAC_A`]).
    pub src: Option<[u8; 6]>,
    /// Run id.
    pub run_id: u32,
}

/// The figures of a ping-pong run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PingResult {
    /// "pingpong".
    pub mode: &'static str,
    /// "TX socket -> RX socket".
    pub direction: String,
    /// Frame length.
    pub size: usize,
    /// Seconds the run took.
    pub seconds: f64,
    /// Frames sent.
    pub sent: u64,
    /// Frames back in time.
    pub received: u64,
    /// Frames not back within the loss timeout.
    pub lost: u64,
    /// `lost` in percent of `sent`.
    pub loss_pct: f64,
    /// Frames that came back after their loss timeout.
    pub late: u64,
    /// Extra copies received.
    pub duplicates: u64,
    /// Damaged test frames.
    pub corrupted: u64,
    /// Test frames of another run.
    pub stray: u64,
    /// Frames that are not test frames.
    pub foreign: u64,
    /// Round trips per second.
    pub rate: f64,
    /// Round-trip time p50, microseconds.
    pub rtt_p50_us: f64,
    /// Round-trip time p99, microseconds.
    pub rtt_p99_us: f64,
    /// Round-trip time mean, microseconds.
    pub rtt_mean_us: f64,
    /// Round-trip time maximum, microseconds.
    pub rtt_max_us: f64,
    /// Sleeps on the call eventfds.
    pub sleeps: u64,
    /// CPU time of this process, percent of one core.
    pub cpu_pct: f64,
}

impl PingResult {
    /// True if every frame that arrived was intact and arrived once, and some arrived.
    pub fn clean(&self) -> bool {
        self.received > 0 && self.corrupted == 0 && self.duplicates == 0
    }
}

/// Runs a ping-pong test; `progress` is called about once a second.
pub fn pingpong(
    pair: &mut NetPair,
    spec: &PingSpec,
    waiter: &mut Waiter,
    mut progress: impl FnMut(&Progress),
) -> Result<PingResult> {
    check_size(spec.size)?;
    if spec.duration.is_none() && spec.count.is_none() {
        return Err(Error::InvalidJob("a ping-pong run needs a duration or a count".into()));
    }
    let (dst, src) = pair.macs(spec.dst, spec.src);
    let builder = FrameBuilder { dst, src, run: spec.run_id, len: spec.size };
    let b = pair.b_index();
    let devs = &mut pair.devs;
    let interest = vec![Interest { rx: true, tx: false }; devs.len()];
    let mut tracker = Tracker::new();
    let mut rtt = Histogram::new();
    let mut others = Others::default();
    let (mut sent, mut lost, mut late) = (0u64, 0u64, 0u64);
    let sleeps0 = waiter.sleeps;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut next_report = start + Duration::from_secs(1);
    let mut last_report = (start, 0u64);
    let mut last_back = start;
    let mut streak = 0u64;
    let ns = |t: Instant| t.saturating_duration_since(start).as_nanos() as u64;
    loop {
        let now = Instant::now();
        if spec.count.is_some_and(|c| sent >= c) || spec.duration.is_some_and(|d| now - start >= d) {
            break;
        }
        if now >= next_report {
            let dt = (now - last_report.0).as_secs_f64();
            progress(&Progress {
                elapsed: (now - start).as_secs_f64(),
                sent,
                received: tracker.received,
                mpps: (tracker.received - last_report.1) as f64 / dt / 1e6,
            });
            last_report = (now, tracker.received);
            next_report = now + Duration::from_secs(1);
        }
        devs.iter().try_for_each(NetDevice::check_connection)?;
        let a = &mut devs[0];
        a.reap_tx()?;
        if a.tx_free() == 0 {
            a.wait_tx(waiter)?;
            a.reap_tx()?;
        }
        let seq = sent;
        let t0 = Instant::now();
        if !a.send_with(spec.size, |buf| builder.write(buf, seq, ns(t0))) {
            return Err(Error::Protocol("no free TX slot after a TX completion".into()).at(a.path()));
        }
        a.flush_tx()?;
        sent += 1;
        let deadline = t0 + spec.loss_timeout;
        loop {
            let mut back = false;
            for (k, d) in devs.iter_mut().enumerate() {
                if !d.has_rx() {
                    continue;
                }
                d.poll_rx(RX_BUDGET, |f| match frame::parse(f) {
                    Parsed::Ours { run, seq: s, .. } if run == spec.run_id => {
                        let arrival = tracker.record(s, f.len(), sent);
                        if k == b && s == seq && arrival != frame::Arrival::Duplicate {
                            back = true;
                        } else if arrival != frame::Arrival::Duplicate {
                            late += 1;
                        }
                    }
                    Parsed::Ours { .. } => others.stray += 1,
                    Parsed::Corrupt { .. } => others.corrupted += 1,
                    Parsed::Foreign => others.foreign += 1,
                })?;
            }
            let now = Instant::now();
            if back {
                rtt.record((now - t0).as_nanos() as u64);
                last_back = now;
                streak = 0;
                break;
            }
            if now >= deadline {
                lost += 1;
                streak += 1;
                let quiet = now.saturating_duration_since(last_back);
                if quiet >= devs[0].timeout() {
                    return Err(Error::NetTimeout {
                        socket: devs[b].path().to_path_buf(),
                        what: format!(
                            "none of the last {streak} frame(s) sent on {} came back",
                            devs[0].path().display()
                        ),
                        timeout: quiet,
                    });
                }
                break;
            }
            waiter.wait(devs, &interest, deadline - now)?;
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let cpu = cpu_seconds() - cpu0;
    // Frames that came back late were counted lost when their time ran out.
    let received = tracker.received - late;
    let r = PingResult {
        mode: "pingpong",
        direction: format!("{} -> {}", devs[0].path().display(), devs[b].path().display()),
        size: spec.size,
        seconds: (secs * 1000.0).round() / 1000.0,
        sent,
        received,
        lost,
        loss_pct: pct(lost, sent),
        late,
        duplicates: tracker.duplicates,
        corrupted: tracker.corrupted + others.corrupted,
        stray: others.stray,
        foreign: others.foreign,
        rate: received as f64 / secs,
        rtt_p50_us: us(rtt.quantile(0.5) as f64),
        rtt_p99_us: us(rtt.quantile(0.99) as f64),
        rtt_mean_us: us(rtt.mean()),
        rtt_max_us: us(rtt.max() as f64),
        sleeps: waiter.sleeps - sleeps0,
        cpu_pct: (cpu / secs * 1000.0).round() / 10.0,
    };
    pair.drain_tx(waiter)?;
    Ok(r)
}
