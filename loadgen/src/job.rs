//! Jobs: what to submit (random or sequential, read or write, block size, queue depth), for how
//! long, and what was measured. With verification, every write carries the pattern of its
//! sectors and a fresh generation, and every read is checked against the latest generation
//! written there.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::blk::{status_name, SECTOR_SIZE, VIRTIO_BLK_S_OK};
use crate::device::{BlkDevice, Completion, Op};
use crate::error::{Error, Result};
use crate::pattern::{self, Rng, UNIT};
use crate::stats::Histogram;

/// The access pattern of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl JobKind {
    /// True for write jobs.
    pub fn writes(self) -> bool {
        matches!(self, JobKind::RandWrite | JobKind::Write)
    }

    /// True for random jobs.
    pub fn random(self) -> bool {
        matches!(self, JobKind::RandRead | JobKind::RandWrite)
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::RandRead => "randread",
            JobKind::RandWrite => "randwrite",
            JobKind::Read => "read",
            JobKind::Write => "write",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "randread" => Ok(JobKind::RandRead),
            "randwrite" => Ok(JobKind::RandWrite),
            "read" => Ok(JobKind::Read),
            "write" => Ok(JobKind::Write),
            _ => Err(format!("unknown job '{s}' (expected randread, randwrite, read or write)")),
        }
    }
}

/// One job.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// Access pattern.
    pub kind: JobKind,
    /// Bytes per request.
    pub bs: usize,
    /// Requests kept in flight.
    pub qd: usize,
    /// Stop issuing after this long (None: no time limit).
    pub duration: Option<Duration>,
    /// Stop after this many requests (None: no count limit).
    pub ios: Option<u64>,
}

/// The part of the device the jobs use.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// Byte offset of the start.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What one job measured.
/// Quantiles at which a job's latency distribution is reported.
pub const CDF_QUANTILES: [f64; 15] =
    [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999];

#[derive(Clone, Debug, serde::Serialize)]
pub struct JobResult {
    /// Job name (randread, randwrite, read, write).
    pub job: String,
    /// Bytes per request.
    pub bs: usize,
    /// Queue depth.
    pub qd: usize,
    /// Requests completed in the measured phase.
    pub ios: u64,
    /// Bytes transferred in the measured phase.
    pub bytes: u64,
    /// Wall-clock seconds of the measured phase.
    pub seconds: f64,
    /// Requests per second.
    pub iops: f64,
    /// Throughput in MB/s (10^6 bytes).
    pub mb_s: f64,
    /// Median completion latency, microseconds.
    pub lat_p50_us: f64,
    /// 99th percentile completion latency, microseconds.
    pub lat_p99_us: f64,
    /// 99.9th percentile completion latency, microseconds.
    pub lat_p999_us: f64,
    /// The latency distribution: `[quantile, microseconds]` at
    /// [`CDF_QUANTILES`], for charts (a CDF).
    pub lat_cdf_us: Vec<[f64; 2]>,
    /// Mean completion latency, microseconds.
    pub lat_mean_us: f64,
    /// Largest completion latency, microseconds.
    pub lat_max_us: f64,
    /// Requests that completed with a status other than OK.
    pub errors: u64,
    /// Requests whose data failed verification (including the read-back after write jobs).
    pub mismatches: u64,
    /// Requests verified (reads checked against the pattern).
    pub verified: u64,
    /// Kicks sent per request.
    pub kicks_per_io: f64,
    /// Sleeps on the call eventfd per request.
    pub sleeps_per_io: f64,
    /// CPU time of this process (all threads) as a percentage of one core.
    pub cpu_pct: f64,
}

/// Tracks, per granule of the region, the generation last written, and checks reads.
pub struct Verifier {
    granule: u64,
    region: Region,
    gens: Vec<u32>,
    next_gen: u32,
    seed: u64,
    mismatches: u64,
    verified: u64,
    reported: u32,
}

/// Generation meaning "content unknown" (never written by us, or a write failed).
const GEN_UNKNOWN: u32 = 0;
/// Generation of the fill before read jobs: fixed, so that a later run with the same seed can
/// verify what an earlier run filled (see [`Runner::assume_filled`]).
pub const FILL_GEN: u32 = 1;
/// Do not keep more than this many granules of verification state.
const MAX_GRANULES: u64 = 64 << 20;
/// Print details of at most this many mismatches.
const MAX_REPORTS: u32 = 10;

impl Verifier {
    /// State for `region`, tracked in units of `granule` bytes.
    pub fn new(region: Region, granule: u64, seed: u64) -> Result<Self> {
        if granule == 0 || !granule.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::InvalidJob(format!("verification granule {granule} is not a multiple of 512")));
        }
        let n = region.len / granule;
        if n > MAX_GRANULES {
            return Err(Error::InvalidJob(format!(
                "--verify over {} bytes in {}-byte blocks needs too much state; use --size to verify a smaller region",
                region.len, granule
            )));
        }
        Ok(Verifier {
            granule,
            region,
            gens: vec![GEN_UNKNOWN; n as usize],
            next_gen: FILL_GEN + 1,
            seed,
            mismatches: 0,
            verified: 0,
            reported: 0,
        })
    }

    fn granules(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let first = (offset - self.region.offset) / self.granule;
        let n = len as u64 / self.granule;
        first as usize..(first + n) as usize
    }

    fn new_generation(&mut self) -> u32 {
        let g = self.next_gen;
        self.next_gen = self.next_gen.checked_add(1).unwrap_or(FILL_GEN + 1);
        g
    }

    /// True if any granule of the range holds known data.
    fn any_written(&self, offset: u64, len: usize) -> bool {
        self.gens[self.granules(offset, len)].iter().any(|&g| g != GEN_UNKNOWN)
    }

    /// True if every granule of the range holds known data.
    fn all_written(&self, offset: u64, len: usize) -> bool {
        self.gens[self.granules(offset, len)].iter().all(|&g| g != GEN_UNKNOWN)
    }

    fn write_done(&mut self, offset: u64, len: usize, generation: u32, ok: bool) {
        let g = if ok { generation } else { GEN_UNKNOWN };
        let r = self.granules(offset, len);
        self.gens[r].fill(g);
    }

    /// Checks read data; returns false (and counts a mismatch) if any sector is wrong.
    fn check(&mut self, offset: u64, data: &[u8]) -> bool {
        let first_sector = offset / SECTOR_SIZE;
        let per_granule = (self.granule as usize) / UNIT;
        let range = self.granules(offset, data.len());
        let mut ok = true;
        let mut checked = false;
        for (gi, g) in range.enumerate() {
            let generation = self.gens[g];
            if generation == GEN_UNKNOWN {
                continue;
            }
            checked = true;
            for s in 0..per_granule {
                let idx = gi * per_granule + s;
                let sector = first_sector + idx as u64;
                if let Err(m) =
                    pattern::check_sector(&data[idx * UNIT..(idx + 1) * UNIT], sector, generation, self.seed)
                {
                    if self.reported < MAX_REPORTS {
                        eprintln!(
                            "blk-load: MISMATCH at sector {sector} (byte offset {}): expected generation {generation}, found {m}",
                            sector * SECTOR_SIZE
                        );
                        self.reported += 1;
                    }
                    ok = false;
                    break;
                }
            }
        }
        if checked {
            self.verified += 1;
        }
        if !ok {
            self.mismatches += 1;
        }
        ok
    }
}

/// Where the next request goes.
enum Source {
    Random { base: u64, blocks: u64 },
    Sequential { start: u64, end: u64, next: u64, wrap: bool },
}

enum Next {
    At(u64),
    /// The chosen block is busy: wait for a completion first.
    Busy,
    Done,
}

impl Source {
    fn next(&mut self, bs: usize, rng: &mut Rng, busy: &[u64], avoid_busy: bool) -> Next {
        let bs = bs as u64;
        match self {
            Source::Random { base, blocks } => {
                for _ in 0..8 {
                    let off = *base + rng.below(*blocks) * bs;
                    if !avoid_busy || !busy.contains(&off) {
                        return Next::At(off);
                    }
                }
                Next::Busy
            }
            Source::Sequential { start, end, next, wrap } => {
                if *next + bs > *end {
                    if !*wrap {
                        return Next::Done;
                    }
                    *next = *start;
                }
                let off = *next;
                if avoid_busy && busy.contains(&off) {
                    return Next::Busy;
                }
                *next += bs;
                Next::At(off)
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The job itself: latencies recorded.
    Measured,
    /// Writing the fill pattern before read jobs.
    Fill,
    /// Reading back what write jobs wrote.
    ReadBack,
}

struct InFlight {
    offset: u64,
    len: usize,
    generation: u32,
    submitted: Instant,
}

#[derive(Default)]
struct PhaseOut {
    ios: u64,
    bytes: u64,
    errors: u64,
    mismatches: u64,
    verified: u64,
    seconds: f64,
    hist: Option<Histogram>,
}

/// Runs jobs against one device.
pub struct Runner<'a> {
    dev: &'a mut BlkDevice,
    region: Region,
    verifier: Option<Verifier>,
    rng: Rng,
    reported_errors: u32,
}

pub(crate) fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; all-zero is valid and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to write into.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl<'a> Runner<'a> {
    /// A runner over `region` of `dev`; with `verify`, pattern state is kept per `granule`.
    pub fn new(dev: &'a mut BlkDevice, region: Region, verify: bool, granule: u64, seed: u64) -> Result<Self> {
        let cap = dev.config().capacity_bytes();
        if region.len == 0 {
            return Err(Error::InvalidJob("the region to use is empty".into()));
        }
        if !region.offset.is_multiple_of(SECTOR_SIZE) || !region.len.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::InvalidJob("region offset and size must be multiples of 512".into()));
        }
        if region.offset.checked_add(region.len).is_none_or(|end| end > cap) {
            return Err(Error::DeviceTooSmall(format!(
                "region {}+{} bytes does not fit in the device's {} bytes",
                region.offset, region.len, cap
            )));
        }
        let verifier = if verify { Some(Verifier::new(region, granule, seed)?) } else { None };
        Ok(Runner { dev, region, verifier, rng: Rng::new(seed ^ 0x6c6f_6164), reported_errors: 0 })
    }

    /// Declares that the whole region already holds the fill pattern (generation
    /// [`FILL_GEN`]) of an earlier run with the same seed: read jobs verify against it instead
    /// of filling first. Use it to check that data survived a backend restart.
    pub fn assume_filled(&mut self) -> Result<()> {
        let v = self
            .verifier
            .as_mut()
            .ok_or_else(|| Error::InvalidJob("assuming a filled region needs verification".into()))?;
        v.gens.fill(FILL_GEN);
        Ok(())
    }

    fn check_job(&self, spec: &JobSpec) -> Result<()> {
        let blk = u64::from(self.dev.config().blk_size);
        if spec.bs == 0 || !(spec.bs as u64).is_multiple_of(blk) {
            return Err(Error::InvalidJob(format!(
                "block size {} is not a multiple of the device block size {blk}",
                spec.bs
            )));
        }
        if spec.bs > self.dev.buf_size() {
            return Err(Error::InvalidJob(format!(
                "block size {} exceeds the buffers ({})",
                spec.bs,
                self.dev.buf_size()
            )));
        }
        if spec.qd == 0 || spec.qd > self.dev.slots() {
            return Err(Error::InvalidJob(format!("queue depth {} is not in 1..={}", spec.qd, self.dev.slots())));
        }
        if spec.bs as u64 > self.region.len {
            return Err(Error::DeviceTooSmall(format!(
                "block size {} is larger than the region ({} bytes)",
                spec.bs, self.region.len
            )));
        }
        if let Some(v) = &self.verifier {
            if !(spec.bs as u64).is_multiple_of(v.granule) {
                return Err(Error::InvalidJob(format!(
                    "block size {} is not a multiple of the verification granule {}",
                    spec.bs, v.granule
                )));
            }
        }
        if spec.kind.writes() && self.dev.read_only() {
            return Err(Error::InvalidJob(format!("{} on a read-only device", spec.kind)));
        }
        if spec.duration.is_none() && spec.ios.is_none() {
            return Err(Error::InvalidJob("a job needs a duration or an I/O count".into()));
        }
        Ok(())
    }

    /// Runs one job (plus, with verification, the fill before reads or the read-back after
    /// writes) and returns its measurements.
    pub fn run(&mut self, spec: &JobSpec) -> Result<JobResult> {
        self.check_job(spec)?;
        if !spec.kind.writes() && self.verifier.is_some() {
            self.fill_unwritten(spec.qd)?;
        }
        let blocks = self.region.len / spec.bs as u64;
        let usable = blocks * spec.bs as u64;
        let mut source = if spec.kind.random() {
            Source::Random { base: self.region.offset, blocks }
        } else {
            Source::Sequential {
                start: self.region.offset,
                end: self.region.offset + usable,
                next: self.region.offset,
                wrap: true,
            }
        };
        // With verification two requests may not touch the same block at once.
        let qd = if self.verifier.is_some() { spec.qd.min(blocks as usize) } else { spec.qd };
        let op = if spec.kind.writes() { Op::Write } else { Op::Read };
        let before = self.dev.notify_stats();
        let cpu0 = cpu_seconds();
        let out = self.drive(op, spec.bs, qd, &mut source, spec.duration, spec.ios, Phase::Measured)?;
        let cpu = cpu_seconds() - cpu0;
        let after = self.dev.notify_stats();
        let (mut mismatches, mut verified) = (out.mismatches, out.verified);
        if spec.kind.writes() && self.verifier.is_some() {
            let rb = self.read_back(spec.qd)?;
            mismatches += rb.mismatches;
            verified += rb.verified;
        }
        let hist = out.hist.unwrap_or_default();
        let secs = out.seconds.max(1e-9);
        let us = |ns: f64| (ns / 1000.0 * 10.0).round() / 10.0;
        let per_io = |x: u64| if out.ios == 0 { 0.0 } else { x as f64 / out.ios as f64 };
        Ok(JobResult {
            job: spec.kind.name().to_string(),
            bs: spec.bs,
            qd,
            ios: out.ios,
            bytes: out.bytes,
            seconds: (out.seconds * 1000.0).round() / 1000.0,
            iops: (out.ios as f64 / secs).round(),
            mb_s: (out.bytes as f64 / secs / 1e6 * 10.0).round() / 10.0,
            lat_p50_us: us(hist.quantile(0.5) as f64),
            lat_p99_us: us(hist.quantile(0.99) as f64),
            lat_p999_us: us(hist.quantile(0.999) as f64),
            lat_cdf_us: CDF_QUANTILES.iter().map(|q| [*q, us(hist.quantile(*q) as f64)]).collect(),
            lat_mean_us: us(hist.mean()),
            lat_max_us: us(hist.max() as f64),
            errors: out.errors,
            mismatches,
            verified,
            kicks_per_io: (per_io(after.kicks - before.kicks) * 1000.0).round() / 1000.0,
            sleeps_per_io: (per_io(after.sleeps - before.sleeps) * 1000.0).round() / 1000.0,
            cpu_pct: (cpu / secs * 1000.0).round() / 10.0,
        })
    }

    /// Large sequential chunk size for fill and read-back (a multiple of every job's block size
    /// is not needed: any multiple of the granule works).
    fn chunk(&self) -> usize {
        let g = self.verifier.as_ref().map_or(SECTOR_SIZE, |v| v.granule) as usize;
        let c = self.dev.buf_size() / g * g;
        c.min(self.region.len as usize / g * g).max(g)
    }

    /// Writes the pattern over every part of the region not yet written (before read jobs).
    fn fill_unwritten(&mut self, qd: usize) -> Result<()> {
        let Some(v) = &self.verifier else { return Ok(()) };
        let chunk = self.chunk();
        let end = self.region.offset + self.region.len / v.granule * v.granule;
        let mut off = self.region.offset;
        while off < end && v.all_written(off, chunk.min((end - off) as usize)) {
            off += chunk as u64;
        }
        if off >= end {
            return Ok(());
        }
        let t = Instant::now();
        // Sequential chunks; the last one may be shorter and is done separately.
        let full_end = off + (end - off) / chunk as u64 * chunk as u64;
        let mut src = Source::Sequential { start: off, end: full_end, next: off, wrap: false };
        let a = self.drive(Op::Write, chunk, qd, &mut src, None, None, Phase::Fill)?;
        let mut errors = a.errors;
        if full_end < end {
            let tail = (end - full_end) as usize;
            let mut src = Source::Sequential { start: full_end, end, next: full_end, wrap: false };
            errors += self.drive(Op::Write, tail, 1, &mut src, None, None, Phase::Fill)?.errors;
        }
        eprintln!(
            "blk-load: filled {} MiB with the verification pattern in {:.2} s{}",
            (end - off) >> 20,
            t.elapsed().as_secs_f64(),
            if errors > 0 { format!(" ({errors} write errors)") } else { String::new() }
        );
        if errors > 0 {
            return Err(Error::Protocol(format!("{errors} write(s) failed while filling the region for verification")));
        }
        Ok(())
    }

    /// Reads back and verifies every chunk of the region that holds written data.
    fn read_back(&mut self, qd: usize) -> Result<PhaseOut> {
        let Some(v) = &self.verifier else { return Ok(PhaseOut::default()) };
        let chunk = self.chunk();
        let end = self.region.offset + self.region.len / v.granule * v.granule;
        let mut total = PhaseOut::default();
        let mut off = self.region.offset;
        let t = Instant::now();
        // Walk runs of chunks that hold data; each run is read sequentially at full depth.
        while off < end {
            let len = |o: u64| chunk.min((end - o) as usize);
            let written = |o: u64, s: &Self| s.verifier.as_ref().is_some_and(|v| v.any_written(o, len(o)));
            if !written(off, self) {
                off += chunk as u64;
                continue;
            }
            let start = off;
            while off < end && written(off, self) && len(off) == chunk {
                off += chunk as u64;
            }
            if off > start {
                let mut src = Source::Sequential { start, end: off, next: start, wrap: false };
                let p = self.drive(Op::Read, chunk, qd, &mut src, None, None, Phase::ReadBack)?;
                total.mismatches += p.mismatches;
                total.verified += p.verified;
                total.errors += p.errors;
            } else {
                // A short final chunk.
                let l = len(off);
                let mut src = Source::Sequential { start: off, end: off + l as u64, next: off, wrap: false };
                let p = self.drive(Op::Read, l, 1, &mut src, None, None, Phase::ReadBack)?;
                total.mismatches += p.mismatches;
                total.verified += p.verified;
                total.errors += p.errors;
                off += l as u64;
            }
        }
        eprintln!(
            "blk-load: read back and verified {} request(s) in {:.2} s: {} mismatch(es), {} error(s)",
            total.verified,
            t.elapsed().as_secs_f64(),
            total.mismatches,
            total.errors
        );
        // Read-back errors are I/O failures of the device: count them as mismatches (the data
        // could not be confirmed).
        total.mismatches += total.errors;
        Ok(total)
    }

    fn report_error(&mut self, op: Op, f: &InFlight, c: &Completion) {
        if self.reported_errors < MAX_REPORTS {
            eprintln!(
                "blk-load: I/O ERROR: {:?} of {} bytes at byte offset {} completed with status {} ({})",
                op,
                f.len,
                f.offset,
                c.status,
                status_name(c.status)
            );
            self.reported_errors += 1;
        }
    }

    /// The submission/completion loop shared by jobs, fills and read-backs.
    #[allow(clippy::too_many_arguments)]
    fn drive(
        &mut self,
        op: Op,
        bs: usize,
        qd: usize,
        source: &mut Source,
        duration: Option<Duration>,
        ios: Option<u64>,
        phase: Phase,
    ) -> Result<PhaseOut> {
        let measure = phase == Phase::Measured;
        let verify = self.verifier.is_some();
        let mut slots: Vec<Option<InFlight>> = (0..qd).map(|_| None).collect();
        let mut free: Vec<usize> = (0..qd).rev().collect();
        let mut busy: Vec<u64> = Vec::with_capacity(qd);
        let mut done: Vec<Completion> = Vec::with_capacity(qd);
        let mut out = PhaseOut { hist: measure.then(Histogram::new), ..Default::default() };
        let mut submitted = 0u64;
        let mut exhausted = false;
        let start = Instant::now();
        let stop_at = duration.map(|d| start + d);
        let mut last_done = start;
        loop {
            // Refill the queue.
            let now = Instant::now();
            if stop_at.is_some_and(|t| now >= t) || ios.is_some_and(|n| submitted >= n) {
                exhausted = true;
            }
            while !exhausted && !free.is_empty() {
                if ios.is_some_and(|n| submitted >= n) {
                    exhausted = true;
                    break;
                }
                let offset = match source.next(bs, &mut self.rng, &busy, verify) {
                    Next::At(o) => o,
                    Next::Busy => break,
                    Next::Done => {
                        exhausted = true;
                        break;
                    }
                };
                let Some(slot) = free.pop() else { break };
                let mut generation = 0;
                if op == Op::Write {
                    if let Some(v) = &mut self.verifier {
                        generation = if phase == Phase::Fill { FILL_GEN } else { v.new_generation() };
                        let seed = v.seed;
                        pattern::fill(self.dev.data_mut(slot, bs), offset / SECTOR_SIZE, generation, seed);
                    }
                }
                self.dev.submit(slot, op, offset / SECTOR_SIZE, bs);
                if verify {
                    busy.push(offset);
                }
                slots[slot] = Some(InFlight { offset, len: bs, generation, submitted: now });
                submitted += 1;
            }
            self.dev.kick()?;
            if self.dev.outstanding() == 0 {
                if exhausted {
                    break;
                }
                // Only an in-flight request can make a block busy.
                return Err(Error::InvalidJob("internal: no request could be issued".into()));
            }
            done.clear();
            if self.dev.reap(&mut done)? == 0 {
                self.dev.wait()?;
                self.dev.reap(&mut done)?;
            }
            let now = Instant::now();
            if !done.is_empty() {
                last_done = now;
            }
            for c in done.drain(..) {
                let Some(f) = slots[c.slot].take() else {
                    return Err(Error::Protocol(format!("completion for idle slot {}", c.slot)));
                };
                free.push(c.slot);
                if verify {
                    if let Some(p) = busy.iter().position(|&o| o == f.offset) {
                        busy.swap_remove(p);
                    }
                }
                let ok = c.status == VIRTIO_BLK_S_OK;
                if !ok {
                    out.errors += 1;
                    self.report_error(op, &f, &c);
                }
                if let Some(v) = &mut self.verifier {
                    match op {
                        Op::Write => v.write_done(f.offset, f.len, f.generation, ok),
                        Op::Read if ok => {
                            let data = self.dev.data(c.slot, f.len);
                            v.check(f.offset, data);
                        }
                        _ => {}
                    }
                }
                if let Some(h) = &mut out.hist {
                    h.record(now.duration_since(f.submitted).as_nanos() as u64);
                }
                out.ios += 1;
                out.bytes += f.len as u64;
            }
        }
        out.seconds = last_done.duration_since(start).as_secs_f64();
        if let Some(v) = &mut self.verifier {
            out.mismatches = std::mem::take(&mut v.mismatches);
            out.verified = std::mem::take(&mut v.verified);
        }
        Ok(out)
    }
}

/// Greatest common divisor (for the verification granule of several block sizes).
pub fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_roundtrip() {
        for k in [JobKind::RandRead, JobKind::RandWrite, JobKind::Read, JobKind::Write] {
            assert_eq!(k.name().parse::<JobKind>().unwrap(), k);
        }
        assert!("randrw".parse::<JobKind>().is_err());
    }

    #[test]
    fn sequential_source_wraps_and_respects_busy() {
        let mut rng = Rng::new(1);
        let mut s = Source::Sequential { start: 4096, end: 4096 + 3 * 4096, next: 4096, wrap: true };
        let mut got = vec![];
        for _ in 0..4 {
            match s.next(4096, &mut rng, &[], true) {
                Next::At(o) => got.push(o),
                _ => panic!(),
            }
        }
        assert_eq!(got, vec![4096, 8192, 12288, 4096]);
        assert!(matches!(s.next(4096, &mut rng, &[8192], true), Next::Busy));
        let mut s = Source::Sequential { start: 0, end: 8192, next: 0, wrap: false };
        assert!(matches!(s.next(4096, &mut rng, &[], false), Next::At(0)));
        assert!(matches!(s.next(4096, &mut rng, &[], false), Next::At(4096)));
        assert!(matches!(s.next(4096, &mut rng, &[], false), Next::Done));
    }

    #[test]
    fn random_source_stays_in_region_aligned() {
        let mut rng = Rng::new(7);
        let mut s = Source::Random { base: 1 << 20, blocks: 100 };
        for _ in 0..10_000 {
            let Next::At(o) = s.next(8192, &mut rng, &[], false) else { panic!() };
            assert!((1 << 20..(1 << 20) + 100 * 8192).contains(&o));
            assert_eq!(o % 8192, 0);
        }
        // With every block busy it asks to wait instead of spinning.
        let mut s = Source::Random { base: 0, blocks: 1 };
        assert!(matches!(s.next(512, &mut rng, &[0], true), Next::Busy));
    }

    #[test]
    fn verifier_tracks_generations() {
        let region = Region { offset: 8192, len: 64 * 1024 };
        let mut v = Verifier::new(region, 4096, 5).unwrap();
        let mut buf = vec![0u8; 8192];
        let g = v.new_generation();
        pattern::fill(&mut buf, 16384 / 512, g, 5);
        assert!(!v.any_written(16384, 8192));
        v.write_done(16384, 8192, g, true);
        assert!(v.all_written(16384, 8192));
        assert!(v.check(16384, &buf));
        // A newer write makes the old data stale.
        let g2 = v.new_generation();
        v.write_done(16384, 4096, g2, true);
        assert!(!v.check(16384, &buf));
        assert_eq!(v.mismatches, 1);
        // A failed write makes the content unknown: that granule is not checked, the other is.
        v.write_done(16384, 4096, g2, false);
        assert!(v.check(16384, &buf[..]));
        assert_eq!(v.verified, 3);
        assert_eq!(v.mismatches, 1);
        // Unknown everywhere: nothing verified.
        assert!(v.check(32768, &buf));
        assert_eq!(v.verified, 3);
    }

    #[test]
    fn gcd_works() {
        assert_eq!(gcd(4096, 131072), 4096);
        assert_eq!(gcd(6144, 4096), 2048);
    }
}
