//! What a VM is made of, parsed from the command line and checked before any
//! KVM call: RAM, windows, doorbells, interrupt lines, command line.
//!
//! The checks here are the ones that need no file and no KVM: sizes,
//! alignment, overlaps, limits. `memory.rs` checks the window files and
//! `image.rs` the image.

use std::os::fd::RawFd;
use std::path::PathBuf;

use guest_abi::{self as abi, port};

use crate::error::{Error, Result};

/// Page size of the guest and of every mapping.
pub const PAGE_SIZE: u64 = 4096;
/// Default guest RAM. Pages are mapped lazily, so unused RAM costs nothing;
/// 16 MiB leaves a driver megabytes of heap.
pub const DEFAULT_MEMORY: u64 = 16 << 20;
/// Smallest RAM: the fixed areas below the image (1 MiB), the image and the
/// ring-3 stack.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest RAM: it must end below the 32-bit MMIO hole where the APICs live.
pub const MAX_MEMORY: u64 = 3 << 30;
/// Posted registers a trapped window may have: an NVMe queue pair's two
/// doorbells need two; each is a KVM ioeventfd and a descriptor.
pub const MAX_POSTED: usize = 8;

/// A VM description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Name used in console prefixes and reports.
    pub name: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Windows, in command-line order.
    pub windows: Vec<WindowConfig>,
    /// Trapped windows: accesses forwarded over a socket.
    pub traps: Vec<TrapConfig>,
    /// Doorbells, in command-line order.
    pub doorbells: Vec<DoorbellConfig>,
    /// Interrupt lines, in command-line order.
    pub irqs: Vec<IrqConfig>,
    /// A warm spare's "go" eventfd: the guest's `WAIT_GO` hypercall
    /// blocks until it is signalled.
    pub go: Option<RawFd>,
    /// A standby's start eventfd: the vCPU waits for it before the guest's
    /// first instruction (the VM is built, no guest code has run).
    pub start: Option<RawFd>,
    /// Command line handed to the guest.
    pub cmdline: String,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: "vm".into(),
            memory: DEFAULT_MEMORY,
            windows: Vec::new(),
            traps: Vec::new(),
            doorbells: Vec::new(),
            irqs: Vec::new(),
            go: None,
            start: None,
            cmdline: String::new(),
        }
    }
}

/// A file mapped into guest physical memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowConfig {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The file: a regular file, a memfd (`/proc/PID/fd/N`), a sysfs PCI
    /// `resourceN` file; `fd=N` in the spec (an inherited descriptor, for a
    /// jailed vmm that can open no path) shows here as `fd=N`.
    pub path: PathBuf,
    /// The inherited descriptor to map instead of opening `path`.
    pub fd: Option<RawFd>,
    /// Offset into the file.
    pub offset: u64,
    /// Map read-only (guest writes fault).
    pub read_only: bool,
    /// Name the guest sees.
    pub name: String,
}

/// A window backed by no memory: the guest's accesses exit to the vmm,
/// which forwards them over an inherited socket (`guest_abi::trap`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrapConfig {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The inherited socket.
    pub fd: RawFd,
    /// Name the guest sees.
    pub name: String,
    /// Posted registers: (offset in the window, inherited eventfd). A
    /// guest write there signals the eventfd in KVM instead of coming
    /// over the socket (`guest_abi::trap`).
    pub posted: Vec<(u64, RawFd)>,
}

/// Where a doorbell sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorbellAddress {
    /// A guest physical address.
    Mmio(u64),
    /// An I/O port.
    Port(u16),
}

/// A doorbell: guest writes to `address` signal the eventfd `fd` in KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoorbellConfig {
    /// Where the guest writes.
    pub address: DoorbellAddress,
    /// Width of the write in bytes.
    pub len: u32,
    /// Only writes of this value signal (KVM datamatch).
    pub datamatch: Option<u64>,
    /// An eventfd inherited from the parent.
    pub fd: RawFd,
}

/// An interrupt line: signalling the eventfd `fd` raises it (the guest's
/// `WAIT_LINES` returns with its bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqConfig {
    /// An eventfd inherited from the parent.
    pub fd: RawFd,
}

/// Parses a number: decimal or `0x` hexadecimal, with an optional binary
/// suffix K, M or G (KiB, MiB, GiB).
pub fn parse_number(what: &str, text: &str) -> Result<u64> {
    let invalid = |reason: &str| Error::invalid(what, format!("{text:?}: {reason}"));
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'k' | 'K')) => (&trimmed[..i], 10),
        Some((i, 'm' | 'M')) => (&trimmed[..i], 20),
        Some((i, 'g' | 'G')) => (&trimmed[..i], 30),
        _ => (trimmed, 0),
    };
    let digits = digits.replace('_', "");
    let value = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse::<u64>(),
    }
    .map_err(|_| invalid("expected a number such as 4096, 0x1000, 16M or 1G"))?;
    value.checked_mul(1u64 << shift).ok_or_else(|| invalid("too large"))
}

fn parse_fd(what: &str, text: &str) -> Result<RawFd> {
    // Said as a descriptor's error, not a size's (`fd=-1` was "expected a
    // number such as 4096").
    let fd = parse_number(what, text)
        .map_err(|_| Error::invalid(what, format!("{text:?}: expected an inherited file descriptor number above 2")))?;
    RawFd::try_from(fd)
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| Error::invalid(what, format!("{text:?}: expected an inherited file descriptor number above 2")))
}

/// Splits `key=value` (or a bare flag, returned with an empty value).
fn key_value(item: &str) -> (&str, &str) {
    item.split_once('=').unwrap_or((item, ""))
}

/// Refuses `key` given a second time in one option's `spec` (`posted=`
/// may repeat): the last one silently won (`fd=3,fd=4`, `len=4,len=8`),
/// which is never what was meant (an adversarial review found it).
fn once<'a>(seen: &mut Vec<&'a str>, key: &'a str, what: &str, spec: &str) -> Result<()> {
    if seen.contains(&key) {
        return Err(Error::invalid(what, format!("{spec:?}: {key} is given twice")));
    }
    seen.push(key);
    Ok(())
}

impl WindowConfig {
    /// Parses `GPA,SIZE,PATH|fd=N[,offset=N][,ro][,name=NAME]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let what = "--window";
        let mut parts = spec.split(',');
        let (Some(gpa), Some(size), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::invalid(what, format!("{spec:?}: expected GPA,SIZE,PATH[,offset=N][,ro][,name=NAME]")));
        };
        if path.is_empty() {
            return Err(Error::invalid(what, format!("{spec:?}: the path is empty")));
        }
        let fd = match path.strip_prefix("fd=") {
            Some(number) => Some(parse_fd("--window fd", number)?),
            None => None,
        };
        let mut window = WindowConfig {
            gpa: parse_number("--window address", gpa)?,
            size: parse_number("--window size", size)?,
            path: PathBuf::from(path),
            fd,
            offset: 0,
            read_only: false,
            name: String::new(),
        };
        let mut seen = Vec::new();
        for item in parts {
            let key = match key_value(item).0 {
                "readonly" => "ro",
                key => key,
            };
            once(&mut seen, key, what, spec)?;
            match key_value(item) {
                ("offset", value) => window.offset = parse_number("--window offset", value)?,
                ("ro", "") | ("readonly", "on") => window.read_only = true,
                ("name", value) => window.name = value.to_owned(),
                _ => {
                    return Err(Error::invalid(
                        what,
                        format!("{spec:?}: unknown option {item:?} (known: offset=N, ro, name=NAME)"),
                    ))
                }
            }
        }
        Ok(window)
    }

    /// End (exclusive) of the window in guest physical memory.
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.size)
    }
}

impl TrapConfig {
    /// Parses `GPA,SIZE,fd=N[,name=NAME][,posted=OFFSET:FD]...`.
    pub fn parse(spec: &str) -> Result<Self> {
        let what = "--trap";
        let mut parts = spec.split(',');
        let (Some(gpa), Some(size)) = (parts.next(), parts.next()) else {
            return Err(Error::invalid(
                what,
                format!("{spec:?}: expected GPA,SIZE,fd=N[,name=NAME][,posted=OFFSET:FD]"),
            ));
        };
        let (mut fd, mut name, mut posted) = (None, String::new(), Vec::new());
        let mut seen = Vec::new();
        for item in parts {
            if let key @ ("fd" | "name") = key_value(item).0 {
                once(&mut seen, key, what, spec)?;
            }
            match key_value(item) {
                ("fd", value) => fd = Some(parse_fd("--trap fd", value)?),
                ("name", value) => name = value.to_owned(),
                ("posted", value) => {
                    let Some((offset, eventfd)) = value.split_once(':') else {
                        return Err(Error::invalid(
                            "--trap posted",
                            format!("{value:?}: expected OFFSET:FD, a register's offset and an inherited eventfd"),
                        ));
                    };
                    posted
                        .push((parse_number("--trap posted offset", offset)?, parse_fd("--trap posted fd", eventfd)?));
                }
                _ => {
                    return Err(Error::invalid(
                        what,
                        format!("{spec:?}: unknown option {item:?} (known: fd=N, name=NAME, posted=OFFSET:FD)"),
                    ))
                }
            }
        }
        Ok(TrapConfig {
            gpa: parse_number("--trap address", gpa)?,
            size: parse_number("--trap size", size)?,
            fd: fd.ok_or_else(|| Error::invalid(what, format!("{spec:?}: give fd=N, an inherited socket")))?,
            name,
            posted,
        })
    }

    /// Checks its posted registers: dwords inside the window, each once,
    /// at most [`MAX_POSTED`].
    fn validate_posted(&self, index: usize) -> Result<()> {
        if self.posted.len() > MAX_POSTED {
            return Err(Error::invalid(
                "--trap posted",
                format!("trap {index} ({}): {} posted registers, at most {MAX_POSTED}", self.name, self.posted.len()),
            ));
        }
        for (i, (offset, _)) in self.posted.iter().enumerate() {
            check_aligned(format!("trap {index} ({}) posted register {offset:#x}", self.name), *offset, 4)?;
            if offset.checked_add(4).is_none_or(|end| end > self.size) {
                return Err(Error::invalid(
                    "--trap posted",
                    format!("trap {index} ({}): register {offset:#x} is outside its {} bytes", self.name, self.size),
                ));
            }
            if self.posted[..i].iter().any(|(other, _)| other == offset) {
                return Err(Error::invalid(
                    "--trap posted",
                    format!("trap {index} ({}): register {offset:#x} is posted twice", self.name),
                ));
            }
        }
        Ok(())
    }

    /// End (exclusive) of the window in guest physical memory.
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.size)
    }
}

impl DoorbellConfig {
    /// Parses `mmio=GPA,fd=N[,len=4][,datamatch=V]` or
    /// `port=PORT,fd=N[,len=4][,datamatch=V]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let what = "--doorbell";
        let (mut address, mut fd, mut len, mut datamatch) = (None, None, 4u32, None);
        let mut seen = Vec::new();
        for item in spec.split(',') {
            // One address: mmio= or port=, not both.
            let key = match key_value(item).0 {
                "mmio" | "port" => "mmio= or port=",
                key => key,
            };
            once(&mut seen, key, what, spec)?;
            match key_value(item) {
                ("mmio", value) => address = Some(DoorbellAddress::Mmio(parse_number("--doorbell mmio", value)?)),
                ("port", value) => {
                    let port = parse_number("--doorbell port", value)?;
                    let port = u16::try_from(port)
                        .map_err(|_| Error::invalid("--doorbell port", format!("{value:?}: ports are 0 to 0xffff")))?;
                    address = Some(DoorbellAddress::Port(port));
                }
                ("fd", value) => fd = Some(parse_fd("--doorbell fd", value)?),
                ("len", value) => {
                    len = u32::try_from(parse_number("--doorbell len", value)?).unwrap_or(0);
                }
                ("datamatch", value) => datamatch = Some(parse_number("--doorbell datamatch", value)?),
                _ => {
                    return Err(Error::invalid(
                        what,
                        format!(
                            "{spec:?}: unknown option {item:?} (known: mmio=GPA, port=PORT, fd=N, len=N, datamatch=V)"
                        ),
                    ))
                }
            }
        }
        let address = address.ok_or_else(|| Error::invalid(what, format!("{spec:?}: give mmio=GPA or port=PORT")))?;
        let fd = fd.ok_or_else(|| Error::invalid(what, format!("{spec:?}: give fd=N, an inherited eventfd")))?;
        let widths: &[u32] = match address {
            DoorbellAddress::Mmio(_) => &[1, 2, 4, 8],
            DoorbellAddress::Port(_) => &[1, 2, 4],
        };
        if !widths.contains(&len) {
            return Err(Error::invalid("--doorbell len", format!("{len}: must be one of {widths:?}")));
        }
        // A value wider than the write can never match: the doorbell would
        // never ring.
        if let Some(value) = datamatch.filter(|value| len < 8 && value >> (len * 8) != 0) {
            return Err(Error::invalid(
                "--doorbell datamatch",
                format!("{value:#x} is wider than a {len}-byte write: the doorbell would never ring"),
            ));
        }
        Ok(DoorbellConfig { address, len, datamatch, fd })
    }
}

impl IrqConfig {
    /// Parses `fd=N`.
    pub fn parse(spec: &str) -> Result<Self> {
        Ok(IrqConfig { fd: parse_eventfd_spec("--irq", spec)? })
    }
}

/// Parses `fd=N`, an inherited eventfd given with `option` (`--irq`,
/// `--go-fd`, `--start-fd`), whose name the errors carry.
pub fn parse_eventfd_spec(option: &str, spec: &str) -> Result<RawFd> {
    match key_value(spec) {
        ("fd", value) => parse_fd(&format!("{option} fd"), value),
        _ => Err(Error::invalid(option, format!("{spec:?}: expected fd=N, an inherited eventfd"))),
    }
}

/// A named range for overlap checks.
struct Range {
    what: String,
    start: u64,
    end: u64,
}

fn check_aligned(what: impl Into<String>, value: u64, align: u64) -> Result<()> {
    if !value.is_multiple_of(align) {
        return Err(Error::Unaligned { what: what.into(), value, align });
    }
    Ok(())
}

/// Where a window (mapped or trapped) goes, for the checks both share.
struct Placement<'a> {
    /// The option it came from.
    flag: &'static str,
    /// How errors name it.
    label: String,
    /// The name the guest sees.
    name: &'a str,
}

impl Placement<'_> {
    /// Checks a window of `size` bytes at `gpa` against the address space
    /// and `ranges`; returns its range.
    fn check(self, gpa: u64, size: u64, ranges: &[Range]) -> Result<Range> {
        let Placement { flag, label, name } = self;
        if size == 0 {
            return Err(Error::invalid(flag, format!("{label}: size is zero")));
        }
        check_aligned(format!("{label} address"), gpa, PAGE_SIZE)?;
        check_aligned(format!("{label} size"), size, PAGE_SIZE)?;
        if gpa.checked_add(size).is_none_or(|end| end > abi::GPA_LIMIT) {
            return Err(Error::invalid(
                flag,
                format!("{label} ends beyond the guest physical address limit {:#x}", abi::GPA_LIMIT),
            ));
        }
        if name.len() >= abi::NAME_LEN || name.contains('\0') {
            return Err(Error::invalid(flag, format!("{name:?}: at most {} bytes, no NUL", abi::NAME_LEN - 1)));
        }
        let range = Range { what: label, start: gpa, end: gpa.saturating_add(size) };
        check_no_overlap(ranges, &range)?;
        Ok(range)
    }
}

/// Refuses a descriptor number given to two owners (doorbells, lines,
/// traps, `--kvm-fd`, `--ready-fd`).
fn check_owned_once(mut fds: Vec<RawFd>) -> Result<()> {
    fds.sort_unstable();
    if let Some(pair) = fds.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(Error::invalid(
            "fd",
            format!(
                "{} is used twice; give each doorbell, line, trap, --kvm-fd and --ready-fd its own descriptor",
                pair[0]
            ),
        ));
    }
    Ok(())
}

fn check_no_overlap(ranges: &[Range], new: &Range) -> Result<()> {
    match ranges.iter().find(|r| new.start < r.end && r.start < new.end) {
        Some(other) => Err(Error::Overlap {
            what: new.what.clone(),
            start: new.start,
            end: new.end,
            other: format!("{} [{:#x}, {:#x})", other.what, other.start, other.end),
        }),
        None => Ok(()),
    }
}

impl VmConfig {
    /// Checks sizes, alignment, limits and overlaps.
    pub fn validate(&self) -> Result<()> {
        self.validate_memory()?;
        let mut ranges = vec![
            Range { what: "guest RAM".into(), start: 0, end: self.memory },
            Range { what: "the APIC MMIO range".into(), start: abi::APIC_MMIO_RANGE.0, end: abi::APIC_MMIO_RANGE.1 },
        ];
        self.validate_windows(&mut ranges)?;
        self.validate_doorbells(&ranges)?;
        if self.irqs.len() > abi::MAX_IRQS {
            return Err(Error::invalid("--irq", format!("{} lines given, at most {}", self.irqs.len(), abi::MAX_IRQS)));
        }
        if self.cmdline.len() > abi::CMDLINE_MAX {
            return Err(Error::invalid(
                "--cmdline",
                format!("{} bytes, at most {}", self.cmdline.len(), abi::CMDLINE_MAX),
            ));
        }
        self.check_descriptors_with([])
    }

    /// Refuses a descriptor number the VM takes ownership of given twice,
    /// among its own and `others` the vmm owns besides (`--kvm-fd`,
    /// `--ready-fd`): two owners close one number twice.
    pub fn check_descriptors_with(&self, others: impl IntoIterator<Item = RawFd>) -> Result<()> {
        let owned: Vec<RawFd> = self.owned_descriptors().chain(others).collect();
        // A window's descriptor is mapped, not owned: one also given as a
        // doorbell, a line or --ready-fd would be written as that too (the
        // 8 bytes of readiness landed in the window's file).
        if let Some(window) = self.windows.iter().find(|w| w.fd.is_some_and(|fd| owned.contains(&fd))) {
            return Err(Error::invalid(
                "fd",
                format!(
                    "{} is the window at {:#x}'s and also a doorbell, line, trap, --kvm-fd or --ready-fd: give each \
                     its own descriptor",
                    window.path.display(),
                    window.gpa
                ),
            ));
        }
        check_owned_once(owned)
    }

    /// The inherited descriptors the VM takes ownership of.
    fn owned_descriptors(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.doorbells
            .iter()
            .map(|d| d.fd)
            .chain(self.irqs.iter().map(|i| i.fd))
            .chain(self.go)
            .chain(self.start)
            .chain(self.traps.iter().map(|t| t.fd))
            .chain(self.traps.iter().flat_map(|t| t.posted.iter().map(|(_, fd)| *fd)))
    }

    fn validate_memory(&self) -> Result<()> {
        check_aligned("--memory", self.memory, PAGE_SIZE)?;
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&self.memory) {
            return Err(Error::invalid(
                "--memory",
                format!("{} bytes: must be between {}M and {}M", self.memory, MIN_MEMORY >> 20, MAX_MEMORY >> 20),
            ));
        }
        Ok(())
    }

    fn validate_windows(&self, ranges: &mut Vec<Range>) -> Result<()> {
        if self.windows.len() + self.traps.len() > abi::MAX_WINDOWS {
            return Err(Error::invalid(
                "--window",
                format!(
                    "{} windows and traps given, at most {}",
                    self.windows.len() + self.traps.len(),
                    abi::MAX_WINDOWS
                ),
            ));
        }
        for (i, trap) in self.traps.iter().enumerate() {
            if trap.size > u64::from(u32::MAX) {
                return Err(Error::invalid("--trap size", format!("trap {i} ({}): at most 4 GiB", trap.name)));
            }
            let place = Placement { flag: "--trap", label: format!("trap {i} ({})", trap.name), name: &trap.name };
            ranges.push(place.check(trap.gpa, trap.size, ranges)?);
            trap.validate_posted(i)?;
        }
        for (i, window) in self.windows.iter().enumerate() {
            let label = format!("window {i} ({})", window.path.display());
            check_aligned(format!("{label} offset"), window.offset, PAGE_SIZE)?;
            let place = Placement { flag: "--window", label, name: &window.name };
            ranges.push(place.check(window.gpa, window.size, ranges)?);
        }
        Ok(())
    }

    fn validate_doorbells(&self, memory: &[Range]) -> Result<()> {
        if self.doorbells.len() > abi::MAX_DOORBELLS {
            return Err(Error::invalid(
                "--doorbell",
                format!("{} given, at most {}", self.doorbells.len(), abi::MAX_DOORBELLS),
            ));
        }
        let mut mmio = Vec::new();
        let mut ports = vec![
            Range {
                what: "the console ports".into(),
                start: port::CONSOLE_BLOCK.0.into(),
                end: u64::from(port::CONSOLE_BLOCK.1) + 1,
            },
            Range {
                what: "the hypercall ports".into(),
                start: port::RESERVED.0.into(),
                end: u64::from(port::RESERVED.1) + 1,
            },
        ];
        for (i, doorbell) in self.doorbells.iter().enumerate() {
            let len = u64::from(doorbell.len);
            match doorbell.address {
                DoorbellAddress::Mmio(gpa) => {
                    check_aligned(format!("doorbell {i} address"), gpa, len)?;
                    if gpa.checked_add(len).is_none_or(|end| end > abi::GPA_LIMIT) {
                        return Err(Error::invalid(
                            "--doorbell mmio",
                            format!("{gpa:#x} is beyond {:#x}", abi::GPA_LIMIT),
                        ));
                    }
                    // The doorbell's whole page is mapped for it, so only
                    // other doorbells may share that page.
                    let page = gpa & !(PAGE_SIZE - 1);
                    check_no_overlap(
                        memory,
                        &Range { what: format!("doorbell {i} page"), start: page, end: page + PAGE_SIZE },
                    )?;
                    let exact = Range { what: format!("doorbell {i}"), start: gpa, end: gpa + len };
                    check_no_overlap(&mmio, &exact)?;
                    mmio.push(exact);
                }
                DoorbellAddress::Port(number) => {
                    let range = Range {
                        what: format!("doorbell {i} port"),
                        start: number.into(),
                        end: u64::from(number) + len,
                    };
                    if range.end > 0x1_0000 {
                        return Err(Error::invalid(
                            "--doorbell port",
                            format!("{number:#x} + {len} bytes is beyond port 0xffff"),
                        ));
                    }
                    check_no_overlap(&ports, &range)?;
                    ports.push(range);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key given twice in one option, or a doorbell value no write of its
    /// length can carry, is refused: the last key silently won, and such a
    /// doorbell never rang (an adversarial review found both).
    #[test]
    fn a_key_given_twice_or_a_datamatch_wider_than_the_write_is_refused() {
        let refused = |result: Result<()>, needle: &str| {
            let error = result.unwrap_err().to_string();
            assert!(error.contains(needle), "{error} does not say {needle:?}");
        };
        refused(DoorbellConfig::parse("mmio=0x5000,fd=3,fd=4").map(drop), "fd is given twice");
        refused(DoorbellConfig::parse("mmio=0x5000,port=5,fd=3").map(drop), "mmio= or port= is given twice");
        refused(DoorbellConfig::parse("mmio=0x5000,fd=3,len=4,len=8").map(drop), "len is given twice");
        refused(DoorbellConfig::parse("mmio=0x5000,fd=3,len=1,datamatch=256").map(drop), "wider than a 1-byte write");
        refused(DoorbellConfig::parse("port=0xfffe,fd=3,len=2,datamatch=0x10000").map(drop), "2-byte");
        assert!(DoorbellConfig::parse("mmio=0x5000,fd=3,len=1,datamatch=255").is_ok());
        assert!(DoorbellConfig::parse("mmio=0x5000,fd=3,len=8,datamatch=0xffffffffffffffff").is_ok());
        refused(WindowConfig::parse("0x40000000,4K,/f,name=a,name=b").map(drop), "name is given twice");
        refused(WindowConfig::parse("0x40000000,4K,/f,ro,readonly=on").map(drop), "ro is given twice");
        refused(TrapConfig::parse("0x40000000,4K,fd=3,fd=4").map(drop), "fd is given twice");
        assert!(TrapConfig::parse("0x40000000,4K,fd=3,posted=0x8:4,posted=0xc:5").is_ok(), "posted= repeats");
    }

    fn window(gpa: u64, size: u64) -> WindowConfig {
        WindowConfig { gpa, size, path: "/dev/null".into(), fd: None, offset: 0, read_only: false, name: String::new() }
    }

    fn config_with(windows: Vec<WindowConfig>) -> VmConfig {
        VmConfig { windows, ..VmConfig::default() }
    }

    #[test]
    fn numbers_with_suffixes_and_hex() {
        assert_eq!(parse_number("x", "4096").unwrap(), 4096);
        assert_eq!(parse_number("x", "0x1000").unwrap(), 4096);
        assert_eq!(parse_number("x", "16M").unwrap(), 16 << 20);
        assert_eq!(parse_number("x", "2g").unwrap(), 2 << 30);
        assert_eq!(parse_number("x", "4k").unwrap(), 4096);
        assert_eq!(parse_number("x", "0x10_0000").unwrap(), 1 << 20);
        assert!(parse_number("x", "").is_err());
        assert!(parse_number("x", "12Q").is_err());
        assert!(parse_number("x", "-1").is_err());
        assert!(parse_number("x", "99999999999999999999").is_err());
        assert!(parse_number("x", "0xffffffffffffffffG").is_err());
    }

    #[test]
    fn window_spec_parses_options() {
        let w = WindowConfig::parse("0x40000000,8K,/tmp/bar,offset=0x1000,ro,name=regs").unwrap();
        assert_eq!(w.gpa, 0x4000_0000);
        assert_eq!(w.size, 8192);
        assert_eq!(w.offset, 0x1000);
        assert!(w.read_only);
        assert_eq!(w.name, "regs");
        assert!(WindowConfig::parse("0x40000000,8K").is_err());
        assert!(WindowConfig::parse("0x40000000,8K,").is_err());
        assert!(WindowConfig::parse("0x40000000,8K,/x,bogus").is_err());
    }

    #[test]
    fn doorbell_and_irq_specs() {
        let d = DoorbellConfig::parse("mmio=0x50000000,fd=7,len=8,datamatch=3").unwrap();
        assert_eq!(
            d,
            DoorbellConfig { address: DoorbellAddress::Mmio(0x5000_0000), len: 8, datamatch: Some(3), fd: 7 }
        );
        let p = DoorbellConfig::parse("port=0x600,fd=5").unwrap();
        assert_eq!(p.address, DoorbellAddress::Port(0x600));
        assert_eq!(p.len, 4);
        assert!(DoorbellConfig::parse("port=0x600,fd=5,len=8").is_err());
        assert!(DoorbellConfig::parse("port=0x10000,fd=5").is_err());
        assert!(DoorbellConfig::parse("mmio=0x1000").is_err());
        assert!(DoorbellConfig::parse("fd=9").is_err());
        assert!(DoorbellConfig::parse("mmio=0x1000,fd=1").is_err());
        assert_eq!(IrqConfig::parse("fd=9").unwrap(), IrqConfig { fd: 9 });
        assert!(IrqConfig::parse("gsi=9").is_err());
    }

    #[test]
    fn trapped_windows_parse_and_are_checked_like_windows() {
        let trap = TrapConfig::parse("0x20000000,16K,fd=8,name=regs").unwrap();
        assert_eq!(trap, TrapConfig { gpa: 0x2000_0000, size: 16384, fd: 8, name: "regs".into(), posted: vec![] });
        for bad in [
            "0x20000000",
            "0x20000000,16K",
            "0x20000000,16K,fd=1",
            "0x20000000,16K,fd=8,ro",
            "0x20000000,16K,fd=8,posted=0x1008",
            "0x20000000,16K,fd=8,posted=0x1008:2",
            "0x20000000,16K,fd=8,posted=x:9",
        ] {
            assert!(TrapConfig::parse(bad).is_err(), "{bad}");
        }
        let with =
            |traps: Vec<TrapConfig>, windows: Vec<WindowConfig>| VmConfig { traps, windows, ..VmConfig::default() };
        assert!(with(vec![trap.clone()], vec![window(1 << 30, 4096)]).validate().is_ok());
        let over_window = with(vec![trap.clone()], vec![window(0x2000_1000, 4096)]);
        assert!(matches!(over_window.validate(), Err(Error::Overlap { .. })));
        let in_ram = with(vec![TrapConfig { gpa: 0x1000, ..trap.clone() }], vec![]);
        assert!(matches!(in_ram.validate(), Err(Error::Overlap { .. })));
        let unaligned = with(vec![TrapConfig { size: 100, ..trap.clone() }], vec![]);
        assert!(matches!(unaligned.validate(), Err(Error::Unaligned { .. })));
        let shared_fd = VmConfig { irqs: vec![IrqConfig { fd: 8 }], ..with(vec![trap.clone()], vec![]) };
        assert!(matches!(shared_fd.validate(), Err(Error::InvalidValue { .. })));
    }

    #[test]
    fn posted_registers_are_dwords_inside_their_window_each_with_its_own_eventfd() {
        let posted = TrapConfig::parse("0x20000000,16K,fd=8,name=regs,posted=0x1008:9,posted=0x100c:10").unwrap();
        assert_eq!(posted.posted, vec![(0x1008, 9), (0x100c, 10)]);
        let with = |posted: Vec<(u64, RawFd)>| VmConfig {
            traps: vec![TrapConfig { posted, ..TrapConfig::parse("0x20000000,16K,fd=8").unwrap() }],
            ..VmConfig::default()
        };
        assert!(with(vec![(0x1008, 9), (0x100c, 10)]).validate().is_ok());
        assert!(with(vec![(0x3ffc, 9)]).validate().is_ok());
        for (bad, why) in [
            (vec![(0x1006, 9)], "unaligned"),
            (vec![(0x4000, 9)], "outside the window"),
            (vec![(u64::MAX - 3, 9)], "wraps"),
            (vec![(0x1008, 9), (0x1008, 10)], "posted twice"),
            (vec![(0x1008, 8)], "the socket's descriptor"),
            (vec![(0x1008, 9), (0x100c, 9)], "one eventfd twice"),
            ((0..=MAX_POSTED as u64).map(|i| (4 * i, 9 + i as RawFd)).collect(), "too many"),
        ] {
            assert!(with(bad).validate().is_err(), "{why}");
        }
    }

    #[test]
    fn memory_limits() {
        assert!(VmConfig::default().validate().is_ok());
        let small = VmConfig { memory: 1 << 20, ..VmConfig::default() };
        assert!(matches!(small.validate(), Err(Error::InvalidValue { .. })));
        let odd = VmConfig { memory: (16 << 20) + 1, ..VmConfig::default() };
        assert!(matches!(odd.validate(), Err(Error::Unaligned { .. })));
        let huge = VmConfig { memory: 64 << 30, ..VmConfig::default() };
        assert!(matches!(huge.validate(), Err(Error::InvalidValue { .. })));
    }

    #[test]
    fn window_checks() {
        assert!(config_with(vec![window(1 << 30, 1 << 20)]).validate().is_ok());
        let over_ram = config_with(vec![window(0x80_0000, 4096)]);
        assert!(matches!(over_ram.validate(), Err(Error::Overlap { .. })));
        let pair = config_with(vec![window(1 << 30, 1 << 20), window((1 << 30) + 4096, 4096)]);
        assert!(matches!(pair.validate(), Err(Error::Overlap { .. })));
        let apic = config_with(vec![window(0xfee0_0000, 4096)]);
        assert!(matches!(apic.validate(), Err(Error::Overlap { .. })));
        let unaligned = config_with(vec![window((1 << 30) + 12, 4096)]);
        assert!(matches!(unaligned.validate(), Err(Error::Unaligned { .. })));
        let unaligned_size = config_with(vec![window(1 << 30, 100)]);
        assert!(matches!(unaligned_size.validate(), Err(Error::Unaligned { .. })));
        let empty = config_with(vec![window(1 << 30, 0)]);
        assert!(matches!(empty.validate(), Err(Error::InvalidValue { .. })));
        let wraps = config_with(vec![window(u64::MAX - 4095, 8192)]);
        assert!(matches!(wraps.validate(), Err(Error::InvalidValue { .. })));
    }

    #[test]
    fn doorbell_checks() {
        let bell = |spec: &str| DoorbellConfig::parse(spec).unwrap();
        let ok = VmConfig {
            doorbells: vec![bell("mmio=0x50000000,fd=3"), bell("mmio=0x50000004,fd=4"), bell("port=0x600,fd=5")],
            irqs: vec![IrqConfig { fd: 6 }],
            ..VmConfig::default()
        };
        assert!(ok.validate().is_ok());
        let in_ram = VmConfig { doorbells: vec![bell("mmio=0x1000,fd=3")], ..VmConfig::default() };
        assert!(matches!(in_ram.validate(), Err(Error::Overlap { .. })));
        let in_window = VmConfig {
            windows: vec![window(0x5000_0000, 4096)],
            doorbells: vec![bell("mmio=0x50000800,fd=3")],
            ..VmConfig::default()
        };
        assert!(matches!(in_window.validate(), Err(Error::Overlap { .. })));
        let same =
            VmConfig { doorbells: vec![bell("port=0x600,fd=3"), bell("port=0x602,fd=4")], ..VmConfig::default() };
        assert!(matches!(same.validate(), Err(Error::Overlap { .. })));
        let console = VmConfig { doorbells: vec![bell("port=0x3f8,fd=3,len=1")], ..VmConfig::default() };
        assert!(matches!(console.validate(), Err(Error::Overlap { .. })));
        let unaligned = VmConfig { doorbells: vec![bell("mmio=0x50000002,fd=3")], ..VmConfig::default() };
        assert!(matches!(unaligned.validate(), Err(Error::Unaligned { .. })));
        let shared_fd = VmConfig {
            doorbells: vec![bell("port=0x600,fd=3")],
            irqs: vec![IrqConfig { fd: 3 }],
            ..VmConfig::default()
        };
        assert!(matches!(shared_fd.validate(), Err(Error::InvalidValue { .. })));
        let many_irqs = VmConfig { irqs: (3..20).map(|fd| IrqConfig { fd }).collect(), ..VmConfig::default() };
        assert!(matches!(many_irqs.validate(), Err(Error::InvalidValue { .. })));
    }
}
