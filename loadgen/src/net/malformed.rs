//! The malformed-chain probe (`net-load --malformed`): deliberately malformed descriptor chains
//! on the TX queue of the sending device and the RX queue of the receiving one, one at a time,
//! each checked for how the backend returns it, with well-formed frames sent between cases to
//! check that the device still works.
//!
//! A backend must return every malformed chain (put it in the used ring) without hanging,
//! disconnecting, writing into it or sending anything it holds:
//!
//! - a TX chain is malformed if it is device-writable, too short for the 12-byte virtio-net
//!   header and an Ethernet header, longer than any frame a device without offloads takes
//!   (4000 bytes), outside the shared memory, zero-length, an indirect table that is garbage,
//!   badly sized, nested or outside the memory, or a `next` loop or a `next` out of the table.
//!   The TX frames of these chains carry a real Ethernet header addressed to the receiving device
//!   and the marker `NLDM` + case number, so a backend that sends one anyway is caught
//!   (`leaked_frames`);
//! - an RX chain is malformed if it is device-readable, smaller than the virtio-net header, or
//!   outside the shared memory: it must come back with used length 0 (or, if held, never be
//!   filled with a frame).
//!
//! Every case has its own area of the scratch memory; each area is compared after the case
//! (and at the end) with what the probe wrote: no backend may write into a malformed chain.
//! Between cases (and before the first, and after the last) three well-formed frames of 60,
//! 1514 and 256 bytes go from the TX device to the RX device and must arrive intact. Every wait
//! is bounded by the devices' timeout.
//!
//! [`cases`] builds the chains from where the memory is and what was negotiated ([`Target`]),
//! so it is a pure function with its own tests; [`Probe`] runs them.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::device::{Interest, NetDevice, Queue, Waiter};
use super::frame::{self, FrameBuilder, Parsed, Tracker, ETHERTYPE};
use super::run::{NetPair, WARMUP_RUN};
use super::HEADER_LEN;
use crate::error::{Error, Result};
use crate::vring::{TableEntry, DESC_BYTES, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// Scratch bytes each case has for its buffers and tables.
pub const AREA: usize = 8192;
/// Descriptors of each queue kept for malformed chains.
pub const RAW_DESCS: u16 = 16;
/// What an area holds where the case writes nothing.
pub const FILL: u8 = 0x5a;
/// Payload marker of the frames in malformed TX chains (after the Ethernet header).
pub const PROBE_MAGIC: [u8; 4] = *b"NLDM";
/// Run id of the first good-frame check; the `n`th uses `GOOD_RUN + n`.
pub const GOOD_RUN: u32 = 0x4e4c_4700;
/// Sizes of the well-formed frames of one check.
pub const GOOD_SIZES: [usize; 3] = [60, 1514, 256];
/// Frame length of the too-long case: beyond any device without segmentation offload.
pub const TOO_LONG: usize = 4000;
/// An address no shared memory holds, for the zero-length descriptor.
pub const GARBAGE_ADDR: u64 = 0xdead_beef_dead_b000;
/// Frames taken from an RX queue per poll.
const RX_BUDGET: usize = 64;

/// Scratch bytes the probe needs for `cases` cases: an area each, and a spare page at the end
/// (the "straddling the end" case reads the last bytes of the memory).
pub fn scratch_bytes(cases: usize) -> usize {
    cases * AREA + 4096
}

/// Where one device's memory is and what it negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// Guest physical addresses of all its shared memory.
    pub mem: Range<u64>,
    /// Guest physical address of its scratch area.
    pub scratch: u64,
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    pub indirect: bool,
}

/// Everything the chains depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The device whose TX queue gets the TX cases.
    pub tx: Side,
    /// The device whose RX queue gets the RX cases.
    pub rx: Side,
    /// Destination MAC of the frames in TX cases (the RX device's).
    pub dst: [u8; 6],
    /// Their source MAC.
    pub src: [u8; 6],
}

/// One descriptor of a case, at `head + position`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// The entry; with `NEXT`, `next` is relative to the head unless `next_absolute`.
    pub entry: TableEntry,
    /// `next` is an index of the table as is (e.g. out of range), not relative.
    pub next_absolute: bool,
}

impl Desc {
    fn new(addr: u64, len: u32, flags: u16) -> Self {
        Desc { entry: TableEntry { addr, len, flags, next: 0 }, next_absolute: false }
    }

    /// Chained to the descriptor at `head + next`.
    fn then(mut self, next: u16) -> Self {
        self.entry.flags |= VRING_DESC_F_NEXT;
        self.entry.next = next;
        self
    }

    /// The table entry at `head + position`.
    pub fn placed(&self, head: u16) -> TableEntry {
        let mut e = self.entry;
        if e.flags & VRING_DESC_F_NEXT != 0 && !self.next_absolute {
            e.next = head.wrapping_add(e.next);
        }
        e
    }
}

/// One malformed chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// Short kebab-case name.
    pub name: &'static str,
    /// The queue it goes to.
    pub queue: Queue,
    /// What is wrong with it.
    pub what: String,
    /// Its descriptors, the head first.
    pub descs: Vec<Desc>,
    /// Bytes written at offsets of the case's area before it is sent (the rest holds [`FILL`]).
    pub writes: Vec<(usize, Vec<u8>)>,
    /// Why it does not apply (then it is skipped).
    pub skip: Option<String>,
}

/// The frame of malformed TX chains: a real Ethernet header to the RX device, [`PROBE_MAGIC`]
/// and the case number, then filler; cut to `len` bytes.
pub fn probe_frame(t: &Target, case: usize, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len.max(20));
    f.extend_from_slice(&t.dst);
    f.extend_from_slice(&t.src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&PROBE_MAGIC);
    f.extend_from_slice(&(case as u16).to_le_bytes());
    let mut i = 0u8;
    while f.len() < len {
        f.push(i);
        i = i.wrapping_add(1);
    }
    f.truncate(len);
    f
}

/// The case number in a frame built by [`probe_frame`] (None: not one).
pub fn probe_marker(frame: &[u8]) -> Option<usize> {
    if frame.len() < 20 || frame[12..14] != ETHERTYPE.to_be_bytes() || frame[14..18] != PROBE_MAGIC {
        return None;
    }
    Some(usize::from(u16::from_le_bytes([frame[18], frame[19]])))
}

/// A TX buffer: the virtio-net header (no offloads) and [`probe_frame`].
fn tx_buffer(t: &Target, case: usize, frame_len: usize) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b.extend_from_slice(&probe_frame(t, case, frame_len));
    b
}

/// Deterministic garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn table(entries: &[TableEntry]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.encode()).collect()
}

/// The cases, in the order they are sent: the TX ones, then the RX ones.
pub fn cases(t: &Target) -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    let w = VRING_DESC_F_WRITE;
    let hdr = HEADER_LEN as u32;
    let good = hdr + 60;
    let no_indirect = (!t.tx.indirect).then(|| "the backend did not offer VIRTIO_RING_F_INDIRECT_DESC".to_string());
    let mut add = |name, queue, what: String, descs: Vec<Desc>, writes: Vec<(usize, Vec<u8>)>, skip| {
        v.push(Case { name, queue, what, descs, writes, skip });
    };
    // Each case's area: its index in the list (known before it is added).
    let area = |side: &Side, k: usize| side.scratch + (k * AREA) as u64;
    let tx_end = t.tx.mem.end;
    let mut k = 0;
    let mut next = || {
        k += 1;
        k - 1
    };

    let n = next();
    add(
        "tx-device-writable",
        Queue::Tx,
        "a 60-byte frame in a device-writable descriptor".into(),
        vec![Desc::new(area(&t.tx, n), good, w)],
        vec![(0, tx_buffer(t, n, 60))],
        None,
    );
    let n = next();
    add(
        "tx-shorter-than-ethernet-header",
        Queue::Tx,
        "the virtio-net header and 13 frame bytes, one short of an Ethernet header".into(),
        vec![Desc::new(area(&t.tx, n), hdr + 13, 0)],
        vec![(0, tx_buffer(t, n, 13))],
        None,
    );
    let n = next();
    add(
        "tx-zero-length",
        Queue::Tx,
        "one zero-length descriptor (in front of a well-formed frame's bytes)".into(),
        vec![Desc::new(area(&t.tx, n), 0, 0)],
        vec![(0, tx_buffer(t, n, 60))],
        None,
    );
    let n = next();
    add(
        "tx-zero-length-plus-garbage",
        Queue::Tx,
        format!("a zero-length descriptor at the garbage address {GARBAGE_ADDR:#x}, then 20 garbage bytes"),
        vec![Desc::new(GARBAGE_ADDR, 0, 0).then(1), Desc::new(area(&t.tx, n), 20, 0)],
        vec![(0, garbage(0x6761_7262, 20))],
        None,
    );
    let n = next();
    add(
        "tx-frame-too-long",
        Queue::Tx,
        format!("a {TOO_LONG}-byte frame (no device without segmentation offload takes more than 1518)"),
        vec![Desc::new(area(&t.tx, n), hdr + TOO_LONG as u32, 0)],
        vec![(0, tx_buffer(t, n, TOO_LONG))],
        None,
    );
    next();
    add(
        "tx-beyond-shared-memory",
        Queue::Tx,
        format!("72 bytes at {tx_end:#x}, just past the end of the shared memory"),
        vec![Desc::new(tx_end, good, 0)],
        vec![],
        None,
    );
    next();
    add(
        "tx-straddling-shared-memory-end",
        Queue::Tx,
        format!("72 bytes at {:#x}: the last 36 bytes of the shared memory and 36 past it", tx_end - 36),
        vec![Desc::new(tx_end - 36, good, 0)],
        vec![],
        None,
    );
    next();
    add(
        "tx-below-shared-memory",
        Queue::Tx,
        format!("72 bytes at 0x0 (the shared memory starts at {:#x})", t.tx.mem.start),
        vec![Desc::new(0, good, 0)],
        vec![],
        (t.tx.mem.start < u64::from(good)).then(|| "the shared memory starts at 0".to_string()),
    );
    next();
    add(
        "tx-address-wraps",
        Queue::Tx,
        "72 bytes at u64::MAX - 35 (the range wraps around the address space)".into(),
        vec![Desc::new(u64::MAX - 35, good, 0)],
        vec![],
        None,
    );
    let n = next();
    add(
        "tx-next-self-loop",
        Queue::Tx,
        "a 72-byte descriptor (header and a 60-byte frame) whose next is itself".into(),
        vec![Desc::new(area(&t.tx, n), good, 0).then(0)],
        vec![(0, tx_buffer(t, n, 60))],
        None,
    );
    let n = next();
    let a = area(&t.tx, n);
    add(
        "tx-next-loop",
        Queue::Tx,
        "a 72-byte descriptor (header and a 60-byte frame), then a 4-byte one whose next is itself: a walk \
         cut short anywhere before the queue size leaves a frame of a valid length"
            .into(),
        vec![Desc::new(a, good, 0).then(1), Desc::new(a + u64::from(good), 4, 0).then(1)],
        vec![(0, tx_buffer(t, n, 60)), (good as usize, vec![0xc1, 0xc2, 0xc3, 0xc4])],
        None,
    );
    let n = next();
    add(
        "tx-next-out-of-range",
        Queue::Tx,
        "a 72-byte descriptor (header and a 60-byte frame) chained to descriptor 65535, outside the table".into(),
        vec![Desc { next_absolute: true, ..Desc::new(area(&t.tx, n), good, 0).then(u16::MAX) }],
        vec![(0, tx_buffer(t, n, 60))],
        None,
    );
    let n = next();
    add(
        "tx-indirect-garbage",
        Queue::Tx,
        "an indirect table of 8 entries of garbage".into(),
        vec![Desc::new(area(&t.tx, n), 8 * DESC_BYTES as u32, VRING_DESC_F_INDIRECT)],
        vec![(0, garbage(0x696e_6469, 8 * DESC_BYTES))],
        no_indirect.clone(),
    );
    // The indirect cases below point at a well-formed frame at +1024 of their area: only the
    // table is wrong.
    let frame_at = |a: u64| TableEntry { addr: a + 1024, len: good, flags: 0, next: 0 };
    let n = next();
    let a = area(&t.tx, n);
    add(
        "tx-indirect-bad-length",
        Queue::Tx,
        "an indirect table of 24 bytes (not a multiple of 16) whose first entry is a well-formed frame".into(),
        vec![Desc::new(a, 24, VRING_DESC_F_INDIRECT)],
        vec![(0, table(&[frame_at(a)])), (1024, tx_buffer(t, n, 60))],
        no_indirect.clone(),
    );
    let n = next();
    let a = area(&t.tx, n);
    let inner = TableEntry { addr: a + 256, len: DESC_BYTES as u32, flags: VRING_DESC_F_INDIRECT, next: 0 };
    add(
        "tx-indirect-nested",
        Queue::Tx,
        "an indirect table whose entry is itself an indirect table (of a well-formed frame)".into(),
        vec![Desc::new(a, DESC_BYTES as u32, VRING_DESC_F_INDIRECT)],
        vec![(0, table(&[inner])), (256, table(&[frame_at(a)])), (1024, tx_buffer(t, n, 60))],
        no_indirect.clone(),
    );
    next();
    add(
        "tx-indirect-outside-memory",
        Queue::Tx,
        format!("an indirect table of 2 entries at {tx_end:#x}, past the end of the shared memory"),
        vec![Desc::new(tx_end, 2 * DESC_BYTES as u32, VRING_DESC_F_INDIRECT)],
        vec![],
        no_indirect.clone(),
    );
    let n = next();
    let a = area(&t.tx, n);
    let looped = [
        TableEntry { addr: a + 1024, len: good, flags: VRING_DESC_F_NEXT, next: 1 },
        TableEntry { addr: a + 1024 + u64::from(good), len: 4, flags: VRING_DESC_F_NEXT, next: 1 },
    ];
    add(
        "tx-indirect-loop",
        Queue::Tx,
        "an indirect table of 2 entries: a 72-byte frame, then a 4-byte entry whose next is itself".into(),
        vec![Desc::new(a, 2 * DESC_BYTES as u32, VRING_DESC_F_INDIRECT)],
        vec![(0, table(&looped)), (1024, tx_buffer(t, n, 60)), (1024 + good as usize, vec![0xc1, 0xc2, 0xc3, 0xc4])],
        no_indirect,
    );

    let rx_end = t.rx.mem.end;
    let n = next();
    add(
        "rx-device-readable",
        Queue::Rx,
        "a 2048-byte receive buffer that is device-readable".into(),
        vec![Desc::new(area(&t.rx, n), 2048, 0)],
        vec![],
        None,
    );
    let n = next();
    add(
        "rx-4-byte-buffer",
        Queue::Rx,
        format!("a 4-byte receive buffer (the virtio-net header alone is {HEADER_LEN})"),
        vec![Desc::new(area(&t.rx, n), 4, w)],
        vec![],
        None,
    );
    next();
    add(
        "rx-beyond-shared-memory",
        Queue::Rx,
        format!("a 2048-byte receive buffer at {rx_end:#x}, just past the end of the shared memory"),
        vec![Desc::new(rx_end, 2048, w)],
        vec![],
        None,
    );
    v
}

/// How one case went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// "tx" or "rx".
    pub queue: Queue,
    /// What is wrong with the chain.
    pub description: String,
    /// The chain was sent (false: skipped or not reached).
    pub sent: bool,
    /// The backend put it in the used ring.
    pub returned: bool,
    /// The used length it reported (None: not returned).
    pub used_len: Option<u32>,
    /// Milliseconds from the kick to the return.
    pub wait_ms: Option<f64>,
    /// Returned only after the case's wait was over.
    pub returned_late: bool,
    /// Frames of this chain (or unexplained frames while it was the last case) that arrived.
    pub leaked_frames: u64,
    /// Lengths of the first few of them (without the virtio-net header).
    pub leaked_lens: Vec<usize>,
    /// First offset of the case's area the backend wrote into (None: untouched).
    pub written_at: Option<usize>,
    /// "pass", "fail", "skip" (does not apply) or "not run" (the probe stopped before it).
    pub result: &'static str,
    /// What happened, in words.
    pub detail: String,
}

/// One check that well-formed frames still go through.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GoodCheck {
    /// "start", or the case it follows.
    pub after: String,
    /// Frames sent.
    pub sent: u64,
    /// Distinct frames received intact.
    pub received: u64,
    /// Damaged frames of this check.
    pub corrupted: u64,
    /// Extra copies.
    pub duplicates: u64,
    /// Milliseconds until the last arrived (or the check gave up).
    pub ms: f64,
    /// All arrived once, intact.
    pub passed: bool,
}

/// The probe's result (`--json` prints it as one object).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MalformedReport {
    /// "malformed".
    pub mode: &'static str,
    /// The TX device's socket.
    pub tx: String,
    /// The RX device's socket.
    pub rx: String,
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated on the TX device (the indirect cases run).
    pub indirect_desc: bool,
    /// Every case, in order.
    pub cases: Vec<CaseResult>,
    /// Cases sent on the TX queue.
    pub tx_cases: usize,
    /// Cases sent on the RX queue.
    pub rx_cases: usize,
    /// Cases the backend returned.
    pub returned: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Cases skipped.
    pub skipped: usize,
    /// The good-frame checks.
    pub good_checks: Vec<GoodCheck>,
    /// Good frames sent.
    pub good_frames_sent: u64,
    /// Good frames received intact.
    pub good_frames_received: u64,
    /// Frames that should not have arrived (of malformed chains, or unexplained).
    pub leaked_frames: u64,
    /// Late frames of earlier good checks or of the warm-up (harmless).
    pub stray_frames: u64,
    /// Why the probe stopped early (the backend hung up, broke the ring protocol, ...).
    pub error: Option<String>,
    /// Seconds the probe took.
    pub seconds: f64,
    /// Every case passed (or was skipped), every good frame arrived intact, no error.
    pub passed: bool,
}

/// A sent chain the backend has not returned yet.
struct Pending {
    case: usize,
    dev: usize,
    queue: Queue,
    head: u16,
    sent_at: Instant,
}

/// The good-frame check in progress.
struct GoodRun {
    run: u32,
    sent: u64,
    tracker: Tracker,
}

/// Runs the cases over a connected, warmed-up pair.
pub struct Probe<'p> {
    pair: &'p mut NetPair,
    waiter: &'p mut Waiter,
    timeout: Duration,
    cases: Vec<Case>,
    results: Vec<CaseResult>,
    /// Per case: its area as written before it was sent.
    snapshots: Vec<Option<Vec<u8>>>,
    pending: Vec<Pending>,
    /// The case unexplained frames are blamed on (the last one sent).
    context: Option<usize>,
    good: Option<GoodRun>,
    good_checks: Vec<GoodCheck>,
    unattributed: u64,
    stray: u64,
    waiting: bool,
}

impl<'p> Probe<'p> {
    /// A probe of `pair` (connected with [`RAW_DESCS`] raw descriptors and
    /// [`scratch_bytes`] of scratch, warmed up); every wait is bounded by `timeout`.
    pub fn new(pair: &'p mut NetPair, waiter: &'p mut Waiter, timeout: Duration) -> Result<Self> {
        let t = Self::target(pair);
        let cases = cases(&t);
        let need = scratch_bytes(cases.len());
        let rx = pair.rx_index();
        for d in [&pair.devices()[0], &pair.devices()[rx]] {
            if d.scratch_len() < need || d.raw_descs().len() < 2 {
                return Err(Error::InvalidJob(format!(
                    "the malformed probe needs {need} bytes of scratch and 2 raw descriptors per queue, {} has {} and {}",
                    d.path().display(),
                    d.scratch_len(),
                    d.raw_descs().len()
                )));
            }
        }
        let results = cases
            .iter()
            .map(|c| CaseResult {
                name: c.name.into(),
                queue: c.queue,
                description: c.what.clone(),
                sent: false,
                returned: false,
                used_len: None,
                wait_ms: None,
                returned_late: false,
                leaked_frames: 0,
                leaked_lens: Vec::new(),
                written_at: None,
                result: if c.skip.is_some() { "skip" } else { "not run" },
                detail: c.skip.as_ref().map_or_else(|| "not run".into(), |why| format!("skipped: {why}")),
            })
            .collect();
        let n = cases.len();
        Ok(Probe {
            pair,
            waiter,
            timeout,
            cases,
            results,
            snapshots: vec![None; n],
            pending: Vec::new(),
            context: None,
            good: None,
            good_checks: Vec::new(),
            unattributed: 0,
            stray: 0,
            waiting: false,
        })
    }

    /// What the chains of `pair` are built from.
    pub fn target(pair: &NetPair) -> Target {
        let side = |d: &NetDevice| Side {
            mem: d.mem_gpa_range(),
            scratch: d.scratch_gpa(),
            indirect: d.negotiated().acked & super::features::VIRTIO_RING_F_INDIRECT_DESC != 0,
        };
        let (dst, src) = pair.macs(None, None);
        Target { tx: side(pair.a()), rx: side(pair.b()), dst, src }
    }

    /// The cases this probe runs.
    pub fn cases(&self) -> &[Case] {
        &self.cases
    }

    fn dev_of(&self, queue: Queue) -> usize {
        match queue {
            Queue::Tx => 0,
            Queue::Rx => self.pair.rx_index(),
        }
    }

    /// A good-frame check before any case: the path works (an error if not: nothing to probe).
    pub fn baseline(&mut self) -> Result<()> {
        let c = self.good_check("start")?;
        if !c.passed {
            return Err(Error::NetTimeout {
                socket: self.pair.b().path().to_path_buf(),
                what: format!(
                    "only {} of {} well-formed frames arrived intact before any malformed chain",
                    c.received, c.sent
                ),
                timeout: self.timeout,
            });
        }
        Ok(())
    }

    /// Sends every case, each followed by a good-frame check; `report` gets each case's result
    /// (as known then) and each check.
    pub fn run(mut self, mut report: impl FnMut(&CaseResult, Option<&GoodCheck>)) -> MalformedReport {
        let start = Instant::now();
        let mut error = None;
        for k in 0..self.cases.len() {
            if self.cases[k].skip.is_some() {
                report(&self.results[k], None);
                continue;
            }
            let r = self.run_case(k).and_then(|()| self.good_check(self.cases[k].name)).and_then(|check| {
                // A device that passes no frame at all is dead or hung: waiting out every
                // further case would only multiply the timeout.
                if check.received == 0 {
                    return Err(Error::NetTimeout {
                        socket: self.pair.b().path().to_path_buf(),
                        what: format!("none of the {} well-formed frames sent after the case arrived", check.sent),
                        timeout: self.timeout,
                    });
                }
                Ok(check)
            });
            match r {
                Ok(check) => {
                    self.judge(k);
                    report(&self.results[k], Some(&check));
                }
                Err(e) => {
                    let r = &mut self.results[k];
                    r.detail = format!("{}; then: {e}", r.detail);
                    r.result = "fail";
                    report(&self.results[k], None);
                    error = Some(format!("after case {}: {e}", self.cases[k].name));
                    for (r, c) in self.results.iter_mut().zip(&self.cases).skip(k + 1) {
                        if c.skip.is_none() {
                            r.result = "not run";
                            r.detail = "not run: the probe stopped".into();
                        }
                    }
                    break;
                }
            }
        }
        if error.is_none() {
            // Chains returned only now are still judged.
            if let Err(e) = self.settle() {
                error = Some(format!("at the end: {e}"));
            }
        }
        self.finish(start, error)
    }

    /// Sends case `k` and waits (bounded) for it to come back.
    fn run_case(&mut self, k: usize) -> Result<()> {
        let case = self.cases[k].clone();
        let dev = self.dev_of(case.queue);
        let d = &mut self.pair.devices_mut()[dev];
        let Some(head) = d.alloc_raw(case.queue, case.descs.len()) else {
            let r = &mut self.results[k];
            r.result = "fail";
            r.detail = "not sent: no free descriptors (earlier chains were never returned)".into();
            return Ok(());
        };
        let off = k * AREA;
        d.scratch_mut(off, AREA).fill(FILL);
        for (at, bytes) in &case.writes {
            d.scratch_mut(off + at, bytes.len()).copy_from_slice(bytes);
        }
        self.snapshots[k] = Some(d.scratch(off, AREA).to_vec());
        let entries: Vec<(u16, TableEntry)> =
            case.descs.iter().enumerate().map(|(i, desc)| (head + i as u16, desc.placed(head))).collect();
        self.context = Some(k);
        self.results[k].sent = true;
        self.results[k].detail = "not returned".into();
        d.submit_raw(case.queue, head, &entries)?;
        self.pending.push(Pending { case: k, dev, queue: case.queue, head, sent_at: Instant::now() });
        self.waiting = true;
        let deadline = Instant::now() + self.timeout;
        while self.pending.iter().any(|p| p.case == k) {
            if Instant::now() >= deadline {
                break;
            }
            self.step(deadline)?;
        }
        self.waiting = false;
        let r = &mut self.results[k];
        if !r.returned {
            r.detail = format!("not returned within {} s", self.timeout.as_secs_f64());
        }
        Ok(())
    }

    /// Takes what the devices completed and received; if there was nothing, waits (at most
    /// until `deadline`, and 50 ms) for more and takes that.
    fn step(&mut self, deadline: Instant) -> Result<()> {
        if self.pump()? {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        let interest: Vec<Interest> = self
            .pair
            .devices()
            .iter()
            .map(|d| Interest { rx: true, tx: d.tx_outstanding() > 0 || d.raw_held(Queue::Tx) > 0 })
            .collect();
        let wait = (deadline - now).min(Duration::from_millis(50));
        self.waiter.wait(self.pair.devices_mut(), &interest, wait)?;
        self.pump().map(|_| ())
    }

    /// Reaps TX completions, takes received frames, and notes returned raw chains; true if
    /// anything happened.
    fn pump(&mut self) -> Result<bool> {
        let mut frames: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut progress = false;
        for (k, d) in self.pair.devices_mut().iter_mut().enumerate() {
            d.check_connection()?;
            let held = d.raw_held(Queue::Tx) + d.raw_held(Queue::Rx);
            progress |= d.reap_tx()? > 0;
            progress |= d.has_rx();
            while d.has_rx() {
                if d.poll_rx(RX_BUDGET, |f| frames.push((k, f.to_vec())))? == 0 && !d.has_rx() {
                    break;
                }
                if frames.len() > 4096 {
                    break;
                }
            }
            progress |= d.raw_held(Queue::Tx) + d.raw_held(Queue::Rx) != held;
        }
        for (k, f) in frames {
            self.classify(k, &f);
        }
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let (case, dev, queue, head, sent_at) = (p.case, p.dev, p.queue, p.head, p.sent_at);
            match self.pair.devices_mut()[dev].take_raw(queue, head) {
                Some(len) => {
                    self.pending.swap_remove(i);
                    let late = !(self.waiting && self.context == Some(case));
                    let r = &mut self.results[case];
                    r.returned = true;
                    r.used_len = Some(len);
                    r.wait_ms = Some((sent_at.elapsed().as_secs_f64() * 1e4).round() / 10.0);
                    r.returned_late = late;
                    r.detail = if late { format!("returned late, used len {len}") } else { format!("used len {len}") };
                }
                None => i += 1,
            }
        }
        Ok(progress)
    }

    fn classify(&mut self, dev: usize, f: &[u8]) {
        let leak = |r: &mut CaseResult| {
            r.leaked_frames += 1;
            if r.leaked_lens.len() < 8 {
                r.leaked_lens.push(f.len());
            }
        };
        if let Some(case) = probe_marker(f).filter(|&c| c < self.results.len()) {
            leak(&mut self.results[case]);
            return;
        }
        let rx = self.pair.rx_index();
        let good_run = self.good.as_ref().map(|g| g.run);
        match frame::parse(f) {
            Parsed::Ours { run, seq, .. } if Some(run) == good_run && dev == rx => {
                if let Some(g) = self.good.as_mut() {
                    g.tracker.record(seq, f.len(), g.sent);
                }
            }
            Parsed::Corrupt { run, .. } if Some(run) == good_run => {
                if let Some(g) = self.good.as_mut() {
                    g.tracker.record_corrupt();
                }
            }
            Parsed::Ours { run, .. } if run == WARMUP_RUN || (GOOD_RUN..GOOD_RUN + 1024).contains(&run) => {
                self.stray += 1;
            }
            _ => match self.context {
                Some(k) => leak(&mut self.results[k]),
                None => self.unattributed += 1,
            },
        }
    }

    /// Sends the well-formed frames of one check and waits (bounded) for them.
    fn good_check(&mut self, after: &str) -> Result<GoodCheck> {
        let start = Instant::now();
        let run = GOOD_RUN.wrapping_add(self.good_checks.len() as u32);
        let (dst, src) = self.pair.macs(None, None);
        self.good = Some(GoodRun { run, sent: 0, tracker: Tracker::new() });
        let deadline = start + self.timeout;
        for (seq, &size) in GOOD_SIZES.iter().enumerate() {
            let builder = FrameBuilder { dst, src, run, len: size };
            loop {
                let d = &mut self.pair.devices_mut()[0];
                d.reap_tx()?;
                if d.send_with(size, |buf| builder.write(buf, seq as u64, 0)) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Error::NetTimeout {
                        socket: d.path().to_path_buf(),
                        what: "no TX slot came free".into(),
                        timeout: self.timeout,
                    });
                }
                self.step(deadline)?;
            }
            if let Some(g) = self.good.as_mut() {
                g.sent += 1;
            }
        }
        self.pair.devices_mut()[0].flush_tx()?;
        let want = GOOD_SIZES.len() as u64;
        loop {
            let received = self.good.as_ref().map_or(0, |g| g.tracker.received);
            if received >= want || Instant::now() >= deadline {
                break;
            }
            self.step(deadline)?;
        }
        // The frames' TX slots come back too (bounded).
        while self.pair.devices()[0].tx_outstanding() > 0 && Instant::now() < deadline {
            self.step(deadline)?;
        }
        let g = self.good.take().map_or_else(Tracker::new, |g| g.tracker);
        let check = GoodCheck {
            after: after.into(),
            sent: want,
            received: g.received,
            corrupted: g.corrupted,
            duplicates: g.duplicates,
            ms: (start.elapsed().as_secs_f64() * 1e4).round() / 10.0,
            passed: g.received == want && g.corrupted == 0 && g.duplicates == 0,
        };
        self.good_checks.push(check.clone());
        Ok(check)
    }

    /// Waits (bounded) for chains still held, then judges every case once more.
    fn settle(&mut self) -> Result<()> {
        // A little time for late returns; a held RX chain may stay held (never filled).
        let deadline = Instant::now() + Duration::from_millis(100).min(self.timeout);
        while !self.pending.is_empty() && Instant::now() < deadline {
            self.step(deadline)?;
        }
        self.pump()?;
        for k in 0..self.cases.len() {
            self.judge(k);
        }
        Ok(())
    }

    /// The verdict of case `k` from what is known now.
    fn judge(&mut self, k: usize) {
        let dev = self.dev_of(self.cases[k].queue);
        let Some(snapshot) = &self.snapshots[k] else { return };
        let now = self.pair.devices()[dev].scratch(k * AREA, AREA);
        let written = now.iter().zip(snapshot).position(|(a, b)| a != b);
        let r = &mut self.results[k];
        r.written_at = written;
        let mut problems = Vec::new();
        match (r.queue, r.returned) {
            (Queue::Tx, false) => problems.push("never returned".to_string()),
            (Queue::Tx, true) if r.returned_late => {
                problems.push(format!("held longer than {} s", self.timeout.as_secs_f64()))
            }
            (Queue::Rx, true) if r.used_len != Some(0) => {
                problems.push(format!("returned with used len {}", r.used_len.unwrap_or(0)))
            }
            // Held, but never filled: harmless (checked through the area and the frames).
            (Queue::Rx, false) | (_, true) => {}
        }
        if let Some(at) = written {
            problems.push(format!("the backend wrote into the chain's memory at +{at}"));
        }
        if r.leaked_frames > 0 {
            let lens: Vec<String> = r.leaked_lens.iter().map(|l| l.to_string()).collect();
            problems.push(format!(
                "{} frame(s) of it arrived at a device ({} bytes): the backend sent it",
                r.leaked_frames,
                lens.join(", ")
            ));
        }
        let base = match (r.returned, r.used_len) {
            (true, Some(len)) if r.returned_late => format!("returned late, used len {len}"),
            (true, Some(len)) => format!("returned, used len {len}"),
            _ if r.queue == Queue::Rx => "held by the backend, never filled".to_string(),
            _ => format!("not returned within {} s", self.timeout.as_secs_f64()),
        };
        r.result = if problems.is_empty() { "pass" } else { "fail" };
        r.detail = if problems.is_empty() { base } else { format!("{base}; FAIL: {}", problems.join("; ")) };
    }

    fn finish(self, start: Instant, error: Option<String>) -> MalformedReport {
        let count = |f: &dyn Fn(&CaseResult) -> bool| self.results.iter().filter(|r| f(r)).count();
        let tx_cases = count(&|r| r.sent && r.queue == Queue::Tx);
        let rx_cases = count(&|r| r.sent && r.queue == Queue::Rx);
        let returned = count(&|r| r.returned);
        let failed = count(&|r| r.result == "fail");
        let skipped = count(&|r| r.result == "skip");
        let not_reached = count(&|r| r.result == "not run");
        let leaked = self.results.iter().map(|r| r.leaked_frames).sum::<u64>() + self.unattributed;
        let good_ok = self.good_checks.iter().all(|c| c.passed);
        let passed = error.is_none() && failed == 0 && not_reached == 0 && good_ok && leaked == 0;
        let (a, b) = (self.pair.a(), self.pair.b());
        MalformedReport {
            mode: "malformed",
            tx: a.path().display().to_string(),
            rx: b.path().display().to_string(),
            indirect_desc: a.negotiated().acked & super::features::VIRTIO_RING_F_INDIRECT_DESC != 0,
            tx_cases,
            rx_cases,
            returned,
            failed,
            skipped,
            good_frames_sent: self.good_checks.iter().map(|c| c.sent).sum(),
            good_frames_received: self.good_checks.iter().map(|c| c.received).sum(),
            good_checks: self.good_checks,
            leaked_frames: leaked,
            stray_frames: self.stray,
            error,
            seconds: (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            passed,
            cases: self.results,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::GPA_BASE;

    fn target(indirect: bool) -> Target {
        let side = Side { mem: GPA_BASE..GPA_BASE + (4 << 20), scratch: GPA_BASE + (3 << 20), indirect };
        Target { tx: side.clone(), rx: side, dst: [0x52, 0x54, 0, 0, 0, 0x0b], src: [0x52, 0x54, 0, 0, 0, 0x0a] }
    }

    fn find<'a>(cs: &'a [Case], name: &str) -> &'a Case {
        cs.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn every_case_is_named_once_fits_and_stays_in_its_area() {
        let t = target(true);
        let cs = cases(&t);
        let mut names: Vec<_> = cs.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), cs.len());
        assert!(cs.iter().all(|c| c.skip.is_none()));
        assert_eq!(cs.iter().filter(|c| c.queue == Queue::Rx).count(), 3);
        assert!(cs.iter().all(|c| c.descs.len() <= usize::from(RAW_DESCS)));
        // The RX cases come last.
        let first_rx = cs.iter().position(|c| c.queue == Queue::Rx).unwrap();
        assert!(cs[first_rx..].iter().all(|c| c.queue == Queue::Rx));
        for (k, c) in cs.iter().enumerate() {
            for (at, bytes) in &c.writes {
                assert!(at + bytes.len() <= AREA, "{}", c.name);
            }
            // A descriptor inside the scratch memory lies inside the case's own area.
            let side = if c.queue == Queue::Tx { &t.tx } else { &t.rx };
            let area = side.scratch + (k * AREA) as u64..side.scratch + ((k + 1) * AREA) as u64;
            for d in &c.descs {
                let e = d.entry;
                if e.addr >= side.scratch && e.addr < side.mem.end {
                    if side.mem.end - e.addr <= 36 + 36 {
                        continue; // the straddling case
                    }
                    assert!(area.contains(&e.addr) && e.addr + u64::from(e.len) <= area.end, "{}", c.name);
                }
            }
        }
        assert!(scratch_bytes(cs.len()) >= cs.len() * AREA + 72);
        let cs = cases(&target(false));
        let skipped: Vec<_> = cs.iter().filter(|c| c.skip.is_some()).map(|c| c.name).collect();
        assert_eq!(
            skipped,
            [
                "tx-indirect-garbage",
                "tx-indirect-bad-length",
                "tx-indirect-nested",
                "tx-indirect-outside-memory",
                "tx-indirect-loop"
            ]
        );
    }

    #[test]
    fn chains_are_malformed_the_intended_way() {
        let t = target(true);
        let cs = cases(&t);
        let one = |name| {
            let c = find(&cs, name);
            assert_eq!(c.descs.len(), 1, "{name}");
            c.descs[0].placed(100)
        };
        let e = one("tx-device-writable");
        assert_eq!((e.len, e.flags), (72, VRING_DESC_F_WRITE));
        assert_eq!(one("tx-shorter-than-ethernet-header").len, 25);
        assert_eq!(one("tx-zero-length").len, 0);
        assert_eq!(one("tx-frame-too-long").len, 12 + 4000);
        assert_eq!(one("tx-beyond-shared-memory").addr, t.tx.mem.end);
        let e = one("tx-straddling-shared-memory-end");
        assert!(e.addr < t.tx.mem.end && e.addr + u64::from(e.len) > t.tx.mem.end);
        assert_eq!(one("tx-below-shared-memory").addr, 0);
        assert!(one("tx-address-wraps").addr.checked_add(72).is_none());
        // Loops: relative next placed at the head, or kept absolute.
        let own = one("tx-next-self-loop");
        assert_eq!((own.len, own.flags, own.next), (72, VRING_DESC_F_NEXT, 100));
        let lasso = &find(&cs, "tx-next-loop").descs;
        assert_eq!((lasso[0].placed(100).next, lasso[1].placed(100).next), (101, 101));
        assert_eq!(lasso[1].placed(100).len, 4);
        assert_eq!(one("tx-next-out-of-range").next, u16::MAX);
        let z = &find(&cs, "tx-zero-length-plus-garbage").descs;
        assert_eq!((z[0].placed(7).addr, z[0].placed(7).len, z[0].placed(7).next), (GARBAGE_ADDR, 0, 8));
        for name in ["tx-indirect-garbage", "tx-indirect-bad-length", "tx-indirect-nested", "tx-indirect-loop"] {
            assert_eq!(one(name).flags, VRING_DESC_F_INDIRECT, "{name}");
        }
        assert_eq!(one("tx-indirect-bad-length").len % 16, 8);
        let nested = find(&cs, "tx-indirect-nested");
        assert_eq!(u16::from(nested.writes[0].1[12]), VRING_DESC_F_INDIRECT);
        assert_eq!(one("tx-indirect-outside-memory").addr, t.tx.mem.end);
        let rd = one("rx-device-readable");
        assert_eq!((rd.len, rd.flags), (2048, 0));
        let tiny = one("rx-4-byte-buffer");
        assert_eq!((tiny.len, tiny.flags), (4, VRING_DESC_F_WRITE));
        assert_eq!(one("rx-beyond-shared-memory").addr, t.rx.mem.end);
    }

    #[test]
    fn probe_frames_carry_a_real_header_and_their_case() {
        let t = target(true);
        let f = probe_frame(&t, 17, 60);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &t.dst);
        assert_eq!(&f[6..12], &t.src);
        assert_eq!(probe_marker(&f), Some(17));
        assert_eq!(frame::parse(&f), Parsed::Foreign, "never taken for a good frame");
        assert_eq!(probe_frame(&t, 3, 13).len(), 13);
        assert_eq!(probe_marker(&probe_frame(&t, 3, 19)), None);
        let b = tx_buffer(&t, 2, 4000);
        assert_eq!(b.len(), 4012);
        assert_eq!(&b[..HEADER_LEN], &[0; HEADER_LEN]);
        let good = FrameBuilder { dst: t.dst, src: t.src, run: GOOD_RUN, len: 60 }.build(0, 0);
        assert_eq!(probe_marker(&good), None);
    }
}
