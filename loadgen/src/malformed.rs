//! The malformed-request probe (`blk-load --malformed`): deliberately malformed virtio-blk
//! descriptor chains, sent one at a time over one connection, each checked for how the backend
//! completes it.
//!
//! Every case is a hand-made chain ([`RawDesc`]) whose header, status byte and data live in the
//! device's scratch area. Before a case the status byte holds [`SENTINEL`] (not a valid status)
//! and the data the chain covers holds [`FILL`]; afterwards the probe looks at the used length,
//! the status byte and whether the data changed. What is expected (virtio 1.2, 5.2.6):
//!
//! - a malformed request completes with `VIRTIO_BLK_S_IOERR`, or `VIRTIO_BLK_S_UNSUPP` for an
//!   unknown request type; used length 1 (only the status byte written), no data written;
//! - a chain whose status descriptor is not device-writable has nowhere to put a status: it
//!   completes with used length 0 and the status byte untouched.
//!
//! A case the backend does not answer within the timeout, or during which it hangs up, fails;
//! the probe then reconnects and goes on with the next case. After the cases, a normal 4 KiB
//! write and read-back (a read only, on a read-only device) must still succeed.
//!
//! [`cases`] builds the chains from what the device advertised ([`Target`]), so it is a pure
//! function with its own tests; [`Probe`] runs them.

use std::path::Path;

use crate::blk::{self, request_header, status_name, SECTOR_SIZE};
use crate::device::{BlkDevice, DeviceOptions, Op};
use crate::error::{Error, Result};
use crate::vring::RawDesc;

/// The status byte's value before a case: not a valid virtio-blk status.
pub const SENTINEL: u8 = 0xa5;
/// The data area's content before a case.
pub const FILL: u8 = 0x5a;
/// Offset of the request header in the scratch area.
pub const HEADER_OFF: usize = 0;
/// Offset of the status byte in the scratch area.
pub const STATUS_OFF: usize = 64;
/// Offset of the data area in the scratch area.
pub const DATA_OFF: usize = 4096;
/// Scratch memory the probe asks for: header page plus 2 MiB of data.
pub const SCRATCH_BYTES: usize = DATA_OFF + (2 << 20);
/// Queue size the probe uses unless told otherwise (room for chains of up to 256 descriptors).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Request type no virtio-blk device implements.
pub const UNKNOWN_TYPE: u32 = 0xff;

/// What the device advertised and where the probe's memory is: everything a chain depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Most data segments per request (0: not advertised).
    pub seg_max: u32,
    /// Largest data segment (0: not advertised).
    pub size_max: u32,
    /// The device offered VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Descriptors in the queue.
    pub queue_size: u16,
    /// Guest physical addresses of all the shared memory.
    pub mem: std::ops::Range<u64>,
    /// Guest physical address of the scratch area.
    pub scratch: u64,
    /// Bytes of the scratch area.
    pub scratch_len: usize,
}

impl Target {
    /// Reads the target off a connected device.
    pub fn of(dev: &BlkDevice) -> Self {
        let c = dev.config();
        Target {
            capacity: c.capacity,
            seg_max: c.seg_max,
            size_max: c.size_max,
            read_only: dev.read_only(),
            queue_size: dev.queue_size(),
            mem: dev.mem_gpa_range(),
            scratch: dev.scratch_gpa(),
            scratch_len: dev.scratch_len(),
        }
    }

    fn header(&self) -> u64 {
        self.scratch + HEADER_OFF as u64
    }

    fn status(&self) -> RawDesc {
        RawDesc::writable(self.scratch + STATUS_OFF as u64, 1)
    }

    fn data(&self, off: usize, len: u32, device_writes: bool) -> RawDesc {
        let addr = self.scratch + (DATA_OFF + off) as u64;
        if device_writes {
            RawDesc::writable(addr, len)
        } else {
            RawDesc::readable(addr, len)
        }
    }
}

/// How a case must complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// With this status byte, used length 1, no data written.
    Status(u8),
    /// With used length 0, the status byte untouched and no data written.
    Untouched,
}

impl Expect {
    /// For reports.
    pub fn describe(&self) -> String {
        match self {
            Expect::Status(s) => format!("{} ({s}), used len 1", status_name(*s)),
            Expect::Untouched => "no status, used len 0".into(),
        }
    }
}

/// One malformed chain, ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Written at [`HEADER_OFF`] of the scratch area (whether or not the chain points there).
    pub header: [u8; 16],
    /// The descriptors.
    pub descs: Vec<RawDesc>,
    /// Bytes from [`DATA_OFF`] that the chain's data descriptors cover (checked unchanged).
    pub data_extent: usize,
}

/// One case of the probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// Short kebab-case name.
    pub name: &'static str,
    /// What is wrong with the chain.
    pub what: String,
    /// How it must complete.
    pub expect: Expect,
    /// The chain, or why the case does not apply to this device (skipped).
    pub chain: std::result::Result<Chain, String>,
}

/// Builds the chains.
struct Builder<'a> {
    t: &'a Target,
}

impl Builder<'_> {
    /// header + data + status, with the header (type, sector) written at HEADER_OFF.
    fn chain(&self, req_type: u32, sector: u64, data: &[RawDesc]) -> Chain {
        self.custom(req_type, sector, RawDesc::readable(self.t.header(), 16), data, self.t.status())
    }

    fn custom(&self, req_type: u32, sector: u64, header: RawDesc, data: &[RawDesc], status: RawDesc) -> Chain {
        let mut descs = Vec::with_capacity(data.len() + 2);
        descs.push(header);
        descs.extend_from_slice(data);
        descs.push(status);
        let (start, end) = (self.t.scratch + DATA_OFF as u64, self.t.scratch + self.t.scratch_len as u64);
        let data_extent = data
            .iter()
            .filter(|d| (start..end).contains(&d.addr))
            .map(|d| (d.addr - start + u64::from(d.len)) as usize)
            .max()
            .unwrap_or(0);
        Chain { header: request_header(req_type, sector), descs, data_extent }
    }

    /// header + one data descriptor at an address outside the data area + status.
    fn foreign(&self, req_type: u32, data: RawDesc) -> Chain {
        Chain { data_extent: 0, ..self.chain(req_type, 0, &[data]) }
    }

    /// `n` consecutive data descriptors of `len` bytes.
    fn segments(&self, n: usize, len: u32, device_writes: bool) -> Vec<RawDesc> {
        (0..n).map(|i| self.t.data(i * len as usize, len, device_writes)).collect()
    }

    /// Skips a chain that does not fit the queue or the scratch area.
    fn fits(&self, chain: Chain) -> std::result::Result<Chain, String> {
        if chain.descs.len() > usize::from(self.t.queue_size) {
            return Err(format!(
                "needs {} descriptors, the queue has {} (a larger --queue-size may help)",
                chain.descs.len(),
                self.t.queue_size
            ));
        }
        if DATA_OFF + chain.data_extent > self.t.scratch_len {
            return Err(format!("needs {} bytes of data, the probe has {}", chain.data_extent, self.t.scratch_len));
        }
        Ok(chain)
    }
}

/// The cases, in the order they are sent.
pub fn cases(t: &Target) -> Vec<Case> {
    use blk::VIRTIO_BLK_T_OUT as OUT;
    use blk::{VIRTIO_BLK_S_IOERR as IOERR, VIRTIO_BLK_S_UNSUPP as UNSUPP, VIRTIO_BLK_T_IN as IN};
    let b = Builder { t };
    let ioerr = Expect::Status(IOERR);
    let rd = |n: u32| [t.data(0, n, true)];
    let wr = |n: u32| [t.data(0, n, false)];
    let mut v = Vec::new();
    let mut case = |name, what: String, expect, chain: std::result::Result<Chain, String>| {
        let chain = chain.and_then(|c| b.fits(c));
        v.push(Case { name, what, expect, chain });
    };

    let hdr = t.header();
    case(
        "header-short",
        "read whose header descriptor is 8 bytes, not 16".into(),
        ioerr,
        Ok(b.custom(IN, 0, RawDesc::readable(hdr, 8), &rd(512), t.status())),
    );
    case(
        "header-device-writable",
        "read whose 16-byte header descriptor is device-writable".into(),
        ioerr,
        Ok(b.custom(IN, 0, RawDesc::writable(hdr, 16), &rd(512), t.status())),
    );
    case(
        "header-beyond-shared-memory",
        "read whose header descriptor lies just past the end of the shared memory".into(),
        ioerr,
        Ok(b.custom(IN, 0, RawDesc::readable(t.mem.end, 16), &rd(512), t.status())),
    );
    case(
        "read-data-device-readable",
        "read of 4 KiB into a device-readable data descriptor".into(),
        ioerr,
        Ok(b.chain(IN, 0, &wr(4096))),
    );
    case(
        "write-data-device-writable",
        "write of 4 KiB from a device-writable data descriptor".into(),
        ioerr,
        Ok(b.chain(OUT, 0, &rd(4096))),
    );
    case("data-zero-length", "read with one zero-length data descriptor".into(), ioerr, Ok(b.chain(IN, 0, &rd(0))));
    case(
        "data-zero-length-second",
        "read of 4 KiB followed by a zero-length data descriptor".into(),
        ioerr,
        Ok(b.chain(IN, 0, &[t.data(0, 4096, true), t.data(4096, 0, true)])),
    );
    case(
        "read-length-not-sector-multiple",
        "read of 1000 bytes (not a multiple of 512)".into(),
        ioerr,
        Ok(b.chain(IN, 0, &rd(1000))),
    );
    case(
        "write-length-not-sector-multiple",
        "write of 1000 bytes (not a multiple of 512)".into(),
        ioerr,
        Ok(b.chain(OUT, 0, &wr(1000))),
    );
    let cap = t.capacity;
    case(
        "read-beyond-capacity",
        format!("read of 512 bytes at sector {cap} (= capacity)"),
        ioerr,
        Ok(b.chain(IN, cap, &rd(512))),
    );
    case(
        "read-straddling-capacity",
        format!("read of 1024 bytes at sector {} (the last sector and one past it)", cap.saturating_sub(1)),
        ioerr,
        Ok(b.chain(IN, cap.saturating_sub(1), &rd(1024))),
    );
    case(
        "write-beyond-capacity",
        format!("write of 512 bytes at sector {cap} (= capacity)"),
        ioerr,
        Ok(b.chain(OUT, cap, &wr(512))),
    );
    case(
        "read-sector-u64-max",
        "read of 512 bytes at sector u64::MAX".into(),
        ioerr,
        Ok(b.chain(IN, u64::MAX, &rd(512))),
    );
    case(
        "write-sector-u64-max",
        "write of 512 bytes at sector u64::MAX".into(),
        ioerr,
        Ok(b.chain(OUT, u64::MAX, &wr(512))),
    );
    let wrap = (u64::MAX >> 9) + 1;
    case(
        "read-sector-byte-offset-wraps",
        format!("read of 512 bytes at sector {wrap} (sector x 512 wraps to byte 0)"),
        ioerr,
        Ok(b.chain(IN, wrap, &rd(512))),
    );
    case(
        "data-beyond-shared-memory",
        format!("read into 512 bytes at {:#x}, just past the end of the shared memory", t.mem.end),
        ioerr,
        Ok(b.foreign(IN, RawDesc::writable(t.mem.end, 512))),
    );
    case(
        "data-straddling-shared-memory-end",
        format!(
            "read into 512 bytes at {:#x}, the last 256 bytes of the shared memory and 256 past it",
            t.mem.end - 256
        ),
        ioerr,
        Ok(b.foreign(IN, RawDesc::writable(t.mem.end - 256, 512))),
    );
    case(
        "data-below-shared-memory",
        format!("read into 512 bytes at 0x0 (the shared memory starts at {:#x})", t.mem.start),
        ioerr,
        if t.mem.start >= 512 {
            Ok(b.foreign(IN, RawDesc::writable(0, 512)))
        } else {
            Err("the shared memory starts at 0".into())
        },
    );
    case(
        "data-address-wraps",
        "read into 512 bytes at u64::MAX - 255 (the range wraps around the address space)".into(),
        ioerr,
        Ok(b.foreign(IN, RawDesc::writable(u64::MAX - 255, 512))),
    );
    let no_seg_max = || Err::<Chain, String>("the device does not advertise seg_max".into());
    let seg_max = t.seg_max as usize;
    for (name, extra, writes) in [
        ("seg-max-exceeded-by-1", 1, false),
        ("seg-max-exceeded-by-8-read", 8, false),
        ("seg-max-exceeded-by-8-write", 8, true),
    ] {
        let n = seg_max + extra;
        let (what, req) = if writes { ("write", OUT) } else { ("read", IN) };
        case(
            name,
            format!("{what} with {n} data descriptors of 512 bytes (seg_max {seg_max} + {extra})"),
            ioerr,
            if seg_max == 0 { no_seg_max() } else { Ok(b.chain(req, 0, &b.segments(n, 512, !writes))) },
        );
    }
    let limit = u64::from(t.seg_max) * u64::from(t.size_max);
    case(
        "data-larger-than-seg-max-times-size-max",
        format!("read of {} bytes in one descriptor (seg_max x size_max = {limit})", limit + 512),
        ioerr,
        match u32::try_from(limit + 512) {
            _ if limit == 0 => Err("the device does not advertise both seg_max and size_max".into()),
            Ok(len) => Ok(b.chain(IN, 0, &rd(len))),
            Err(_) => Err(format!("seg_max x size_max = {limit} does not fit a descriptor length")),
        },
    );
    case(
        "unknown-request-type",
        format!("request of type {UNKNOWN_TYPE} (header and status only)"),
        Expect::Status(UNSUPP),
        Ok(b.chain(UNKNOWN_TYPE, 0, &[])),
    );
    case(
        "write-to-read-only-device",
        "write of 4 KiB at sector 0 to a device that offers VIRTIO_BLK_F_RO".into(),
        ioerr,
        if t.read_only {
            Ok(b.chain(OUT, 0, &wr(4096)))
        } else {
            Err("the device is writable (no VIRTIO_BLK_F_RO)".into())
        },
    );
    let mut status_ro = t.status();
    status_ro.flags = 0;
    case(
        "status-not-device-writable",
        "read of 512 bytes whose status descriptor is device-readable".into(),
        Expect::Untouched,
        Ok(b.custom(IN, 0, RawDesc::readable(hdr, 16), &rd(512), status_ro)),
    );
    v
}

/// How one case (or the final health check) went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseResult {
    /// Case name.
    pub case: String,
    /// What the chain does wrong (or what the check does).
    pub description: String,
    /// True for malformed chains, false for the final health check.
    pub malformed: bool,
    /// Whether the chain was sent (false when skipped or not reached).
    pub sent: bool,
    /// "pass", "fail" or "skip".
    pub result: &'static str,
    /// What was expected.
    pub expected: String,
    /// What happened.
    pub got: String,
    /// Expected status byte (None: untouched).
    pub expected_status: Option<u8>,
    /// Expected used length.
    pub expected_used_len: Option<u32>,
    /// The status byte after completion (None if the chain did not complete).
    pub status: Option<u8>,
    /// The used length reported (None if the chain did not complete).
    pub used_len: Option<u32>,
}

impl CaseResult {
    /// True unless the case failed.
    pub fn ok(&self) -> bool {
        self.result != "fail"
    }
}

/// What a completed chain left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Used length from the used ring.
    pub used_len: u32,
    /// The status byte.
    pub status: u8,
    /// First data offset (from DATA_OFF) whose byte is no longer [`FILL`].
    pub data_changed: Option<usize>,
}

/// Judges a completed case: (passed, description of what happened).
pub fn judge(expect: Expect, o: &Observed) -> (bool, String) {
    let status = match o.status {
        SENTINEL => "no status".to_string(),
        s => format!("{} ({s})", status_name(s)),
    };
    let mut got = format!("{status}, used len {}", o.used_len);
    if let Some(off) = o.data_changed {
        got.push_str(&format!(", data written at +{off}"));
    }
    let pass = o.data_changed.is_none()
        && match expect {
            Expect::Status(s) => o.status == s && o.used_len == 1,
            Expect::Untouched => o.status == SENTINEL && o.used_len == 0,
        };
    (pass, got)
}

/// Runs the probe over one connection (reconnecting only after a case the backend did not
/// answer or hung up on).
pub struct Probe<'p> {
    path: &'p Path,
    opts: DeviceOptions,
    dev: Option<BlkDevice>,
    target: Target,
    reconnects: u32,
    seed: u64,
}

impl<'p> Probe<'p> {
    /// Connects to the backend at `path`. `opts.slots`, `buf_size`, `seg_size` and `scratch`
    /// are set by the probe; the rest (timeout, queue size, EVENT_IDX, spin) are the caller's.
    pub fn connect(path: &'p Path, mut opts: DeviceOptions, seed: u64) -> Result<Self> {
        opts.slots = 1;
        opts.buf_size = 4096;
        opts.seg_size = None;
        opts.scratch = SCRATCH_BYTES;
        opts.queue_size = Some(opts.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE));
        let dev = BlkDevice::connect(path, &opts)?;
        let target = Target::of(&dev);
        Ok(Probe { path, opts, dev: Some(dev), target, reconnects: 0, seed })
    }

    /// The device as first connected.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The connected device (for reports).
    pub fn device(&self) -> Option<&BlkDevice> {
        self.dev.as_ref()
    }

    /// Times the probe had to reconnect.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    fn dev(&mut self) -> Result<&mut BlkDevice> {
        if self.dev.is_none() {
            let dev = BlkDevice::connect(self.path, &self.opts)?;
            let t = Target::of(&dev);
            if t != self.target {
                return Err(Error::Protocol(format!(
                    "the device changed across a reconnect: {:?} then {t:?}",
                    self.target
                )));
            }
            self.reconnects += 1;
            self.dev = Some(dev);
        }
        self.dev.as_mut().ok_or_else(|| Error::InvalidJob("no device".into()))
    }

    /// Sends every case, then the health check; `report` gets each result as it is known.
    pub fn run(&mut self, mut report: impl FnMut(&CaseResult)) -> Vec<CaseResult> {
        let mut results = Vec::new();
        for case in cases(&self.target.clone()) {
            let r = self.run_case(&case);
            report(&r);
            results.push(r);
        }
        let r = self.health_check();
        report(&r);
        results.push(r);
        results
    }

    fn run_case(&mut self, case: &Case) -> CaseResult {
        let (expected_status, expected_used_len) = match case.expect {
            Expect::Status(s) => (Some(s), Some(1)),
            Expect::Untouched => (None, Some(0)),
        };
        let mut r = CaseResult {
            case: case.name.into(),
            description: case.what.clone(),
            malformed: true,
            sent: false,
            result: "fail",
            expected: case.expect.describe(),
            got: String::new(),
            expected_status,
            expected_used_len,
            status: None,
            used_len: None,
        };
        let chain = match &case.chain {
            Ok(chain) => chain,
            Err(why) => {
                r.result = "skip";
                r.got = format!("skipped: {why}");
                return r;
            }
        };
        let dev = match self.dev() {
            Ok(dev) => dev,
            Err(e) => {
                r.got = format!("not sent: cannot reconnect: {e}");
                return r;
            }
        };
        dev.scratch_mut(HEADER_OFF, 16).copy_from_slice(&chain.header);
        dev.scratch_mut(STATUS_OFF, 1)[0] = SENTINEL;
        dev.scratch_mut(DATA_OFF, chain.data_extent).fill(FILL);
        r.sent = true;
        match dev.run_raw(&chain.descs) {
            Ok(used_len) => {
                let status = dev.scratch(STATUS_OFF, 1)[0];
                let data_changed = dev.scratch(DATA_OFF, chain.data_extent).iter().position(|&b| b != FILL);
                let o = Observed { used_len, status, data_changed };
                let (pass, got) = judge(case.expect, &o);
                r.status = Some(status);
                r.used_len = Some(used_len);
                r.got = got;
                r.result = if pass { "pass" } else { "fail" };
                if let Err(e) = dev.check_connection() {
                    r.got.push_str(&format!(", then: {e}"));
                    r.result = "fail";
                    self.dev = None;
                }
            }
            Err(e) => {
                r.got = no_answer(&e);
                self.dev = None;
            }
        }
        r
    }

    /// A normal 4 KiB write and read-back (read only, on a read-only device) at sector 0, then
    /// GET_VRING_BASE must agree on the number of chains consumed.
    fn health_check(&mut self) -> CaseResult {
        let read_only = self.target.read_only;
        let len = if self.target.capacity >= 8 { 4096 } else { SECTOR_SIZE as usize };
        let mut r = CaseResult {
            case: "healthy-after-malformed".into(),
            description: if read_only {
                format!("a normal {len}-byte read at sector 0 still succeeds")
            } else {
                format!("a normal {len}-byte write and read-back at sector 0 still succeed")
            },
            malformed: false,
            sent: true,
            result: "fail",
            expected: if read_only { "OK".into() } else { "OK, OK, data intact".into() },
            got: String::new(),
            expected_status: Some(blk::VIRTIO_BLK_S_OK),
            expected_used_len: None,
            status: None,
            used_len: None,
        };
        let seed = self.seed;
        match self.dev().and_then(|dev| health_io(dev, len, read_only, seed)) {
            Ok((pass, got, status)) => {
                r.got = got;
                r.status = Some(status);
                r.result = if pass { "pass" } else { "fail" };
            }
            Err(e) => r.got = no_answer(&e),
        }
        if let Some(dev) = self.dev.take() {
            if let Err(e) = dev.shutdown() {
                r.got.push_str(&format!("; stopping the queue: {e}"));
                r.result = "fail";
            }
        }
        r
    }
}

fn health_io(dev: &mut BlkDevice, len: usize, read_only: bool, seed: u64) -> Result<(bool, String, u8)> {
    let mut x = seed | 1;
    let mut pattern = vec![0u8; len];
    for b in &mut pattern {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut got = Vec::new();
    if !read_only {
        dev.data_mut(0, len).copy_from_slice(&pattern);
        let c = dev.run_one(0, Op::Write, 0, len)?;
        got.push(status_name(c.status).to_string());
        if c.status != blk::VIRTIO_BLK_S_OK {
            return Ok((false, format!("write: {} ({})", status_name(c.status), c.status), c.status));
        }
    }
    dev.data_mut(0, len).fill(0);
    let c = dev.run_one(0, Op::Read, 0, len)?;
    got.push(status_name(c.status).to_string());
    if c.status != blk::VIRTIO_BLK_S_OK {
        return Ok((false, format!("read: {} ({})", status_name(c.status), c.status), c.status));
    }
    if !read_only {
        match dev.data(0, len).iter().zip(&pattern).position(|(a, b)| a != b) {
            Some(off) => return Ok((false, format!("{}, data differs at +{off}", got.join(", ")), c.status)),
            None => got.push("data intact".into()),
        }
    }
    Ok((true, got.join(", "), c.status))
}

fn no_answer(e: &Error) -> String {
    match e {
        Error::IoTimeout { timeout, .. } => format!("no completion within {} s", timeout.as_secs_f64()),
        Error::BackendClosed { .. } => "the backend closed the connection".into(),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::GPA_BASE;
    use crate::vring::VRING_DESC_F_WRITE;

    fn target() -> Target {
        Target {
            capacity: 65536,
            seg_max: 32,
            size_max: 4096,
            read_only: false,
            queue_size: 256,
            mem: GPA_BASE..GPA_BASE + (4 << 20),
            scratch: GPA_BASE + (1 << 20),
            scratch_len: SCRATCH_BYTES,
        }
    }

    fn find<'a>(cases: &'a [Case], name: &str) -> &'a Case {
        cases.iter().find(|c| c.name == name).unwrap()
    }

    fn header_of(c: &Chain) -> (u32, u64) {
        let h = c.header;
        (u32::from_le_bytes(h[0..4].try_into().unwrap()), u64::from_le_bytes(h[8..16].try_into().unwrap()))
    }

    #[test]
    fn every_case_is_built_and_named_once() {
        let t = target();
        let cs = cases(&t);
        let mut names: Vec<_> = cs.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), cs.len(), "case names are unique");
        let skipped: Vec<_> = cs.iter().filter(|c| c.chain.is_err()).map(|c| c.name).collect();
        assert_eq!(skipped, vec!["write-to-read-only-device"]);
        for c in &cs {
            let Ok(chain) = &c.chain else { continue };
            assert!(chain.descs.len() >= 2 && chain.descs.len() <= 256, "{}", c.name);
            assert!(DATA_OFF + chain.data_extent <= t.scratch_len, "{}", c.name);
            if c.name != "status-not-device-writable" {
                let last = chain.descs.last().unwrap();
                assert_eq!(*last, RawDesc::writable(t.scratch + STATUS_OFF as u64, 1), "{}", c.name);
                assert!(matches!(c.expect, Expect::Status(_)), "{}", c.name);
            }
        }
        let ro = cases(&Target { read_only: true, ..target() });
        assert!(ro.iter().all(|c| c.chain.is_ok()), "a read-only device runs every case");
    }

    #[test]
    fn chains_are_malformed_the_intended_way() {
        let t = target();
        let cs = cases(&t);
        let chain = |name| find(&cs, name).chain.clone().unwrap();
        let short = chain("header-short");
        assert_eq!((short.descs[0].len, short.descs[0].flags), (8, 0));
        assert_eq!(chain("header-device-writable").descs[0].flags, VRING_DESC_F_WRITE);
        assert_eq!(chain("header-beyond-shared-memory").descs[0].addr, t.mem.end);
        let rd = chain("read-data-device-readable");
        assert_eq!((header_of(&rd).0, rd.descs[1].flags, rd.descs[1].len), (0, 0, 4096));
        let wr = chain("write-data-device-writable");
        assert_eq!((header_of(&wr).0, rd.descs.len()), (1, 3));
        assert_eq!(wr.descs[1].flags, VRING_DESC_F_WRITE);
        assert_eq!(chain("data-zero-length").descs[1].len, 0);
        assert_eq!(chain("data-zero-length-second").descs[2].len, 0);
        assert_eq!(chain("read-length-not-sector-multiple").descs[1].len, 1000);
        assert_eq!(header_of(&chain("read-beyond-capacity")), (0, 65536));
        assert_eq!(header_of(&chain("read-straddling-capacity")), (0, 65535));
        assert_eq!(header_of(&chain("write-sector-u64-max")), (1, u64::MAX));
        let wrap = header_of(&chain("read-sector-byte-offset-wraps")).1;
        assert_eq!(wrap.wrapping_mul(512), 0);
        let beyond = chain("data-beyond-shared-memory");
        assert_eq!((beyond.descs[1].addr, beyond.data_extent), (t.mem.end, 0));
        let straddle = chain("data-straddling-shared-memory-end").descs[1];
        assert!(straddle.addr < t.mem.end && straddle.addr + u64::from(straddle.len) > t.mem.end);
        assert_eq!(chain("data-below-shared-memory").descs[1].addr, 0);
        let wraps = chain("data-address-wraps").descs[1];
        assert!(wraps.addr.checked_add(u64::from(wraps.len)).is_none());
        for (name, n, flags) in [
            ("seg-max-exceeded-by-1", 33, VRING_DESC_F_WRITE),
            ("seg-max-exceeded-by-8-read", 40, VRING_DESC_F_WRITE),
            ("seg-max-exceeded-by-8-write", 40, 0),
        ] {
            let c = chain(name);
            assert_eq!(c.descs.len(), n + 2, "{name}");
            assert!(c.descs[1..=n].iter().all(|d| d.len == 512 && d.flags == flags), "{name}");
            assert_eq!(c.data_extent, n * 512, "{name}");
        }
        let big = chain("data-larger-than-seg-max-times-size-max");
        assert_eq!(big.descs[1].len, 32 * 4096 + 512);
        let unknown = find(&cs, "unknown-request-type");
        assert_eq!(unknown.expect, Expect::Status(blk::VIRTIO_BLK_S_UNSUPP));
        assert_eq!(header_of(unknown.chain.as_ref().unwrap()).0, UNKNOWN_TYPE);
        let status = find(&cs, "status-not-device-writable");
        assert_eq!(status.expect, Expect::Untouched);
        assert_eq!(status.chain.as_ref().unwrap().descs[2].flags, 0);
    }

    #[test]
    fn cases_that_do_not_fit_are_skipped() {
        // qemu-storage-daemon: seg_max = 1022, no size_max; the default queue cannot hold
        // seg_max + 3 descriptors.
        let t = Target { seg_max: 1022, size_max: 0, ..target() };
        let cs = cases(&t);
        for name in ["seg-max-exceeded-by-1", "seg-max-exceeded-by-8-read", "data-larger-than-seg-max-times-size-max"] {
            assert!(find(&cs, name).chain.is_err(), "{name}");
        }
        let t = Target { seg_max: 0, ..target() };
        assert!(find(&cases(&t), "seg-max-exceeded-by-1").chain.as_ref().unwrap_err().contains("seg_max"));
        let t = Target { scratch_len: DATA_OFF + 4096, ..target() };
        assert!(find(&cases(&t), "data-larger-than-seg-max-times-size-max").chain.is_err());
    }

    #[test]
    fn judging() {
        let ioerr = Expect::Status(blk::VIRTIO_BLK_S_IOERR);
        let o = |used_len, status, data_changed| Observed { used_len, status, data_changed };
        assert_eq!(judge(ioerr, &o(1, 1, None)), (true, "IOERR (1), used len 1".into()));
        assert!(!judge(ioerr, &o(0, 1, None)).0, "used length must be 1");
        assert!(!judge(ioerr, &o(1, 0, None)).0, "status must be IOERR");
        assert_eq!(judge(ioerr, &o(1, SENTINEL, None)), (false, "no status, used len 1".into()));
        assert_eq!(judge(ioerr, &o(1, 1, Some(17))), (false, "IOERR (1), used len 1, data written at +17".into()));
        assert!(judge(Expect::Untouched, &o(0, SENTINEL, None)).0);
        assert!(!judge(Expect::Untouched, &o(1, SENTINEL, None)).0);
        assert!(!judge(Expect::Untouched, &o(0, 1, None)).0);
        assert_eq!(judge(Expect::Status(2), &o(1, 2, None)).1, "UNSUPP (2), used len 1");
    }
}
