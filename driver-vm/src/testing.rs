//! Unit tests of drivers without KVM: a fake reflector on the driver's
//! channel and fake device memory, in the test's own process (hosted
//! builds only: `cargo test` in `driver-vm`).
//!
//! A [`Bench`] is wired like a driver VM the reflector starts: window
//! `channel` (rings and bounce slots) at the reflector's channel address,
//! doorbell 0 and interrupt line 0 for the channel, and whatever device
//! windows a test adds. The test publishes requests as the reflector would,
//! lets the driver serve them with [`Running::drain`] (which never
//! sleeps), and reads the completions and the bounce slots.
//!
//! ```ignore
//! let mut bench = Bench::new();
//! let mut driver = bench.start::<Null>().unwrap();
//! let id = bench.write(0, &[7; 512]);
//! driver.drain().unwrap();
//! assert_eq!(bench.completions(), vec![Completion { id, status: status::OK, len: 512 }]);
//! ```

extern crate alloc;
extern crate std;

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use std::alloc::{alloc_zeroed, dealloc, Layout};

use guest_kernel::abi::channel::{self, header, op, CompletionEntry, RequestEntry};
use guest_kernel::abi::Plain;
use guest_kernel::hosted::{HostedWindow, Resources};

use crate::channel::{Channel, ChannelDriver};
use crate::{Error, Kernel};

/// Where the reflector maps the channel in every driver VM.
pub const CHANNEL_GPA: u64 = 0x4000_0000;
/// Where the reflector maps the device's window (`regs`, or `disk`).
pub const DEVICE_GPA: u64 = 0x2000_0000;

/// Page-aligned memory standing in for a shared region: zeroed memory of
/// the test's own, or a shared mapping of a real device's descriptor.
pub struct Memory {
    base: *mut u8,
    layout: Layout,
    /// Mapped from a descriptor (unmapped on drop), not allocated.
    mapped: bool,
}

impl Memory {
    /// `size` zeroed bytes (at least one page).
    pub fn new(size: usize) -> Memory {
        let layout = Layout::from_size_align(size.max(4096), 4096).expect("a page-aligned layout");
        // SAFETY: a non-zero size with a valid alignment.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null(), "allocating {size} bytes of fake device memory");
        Memory { base, layout, mapped: false }
    }

    /// `size` bytes of descriptor `fd` (a device's memfd), mapped shared:
    /// what the device writes, the driver sees.
    pub fn map(fd: i32, size: usize) -> Memory {
        // SAFETY: maps `size` bytes of a descriptor the caller holds; the
        // kernel picks the address; checked below.
        let base = unsafe {
            libc::mmap(core::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        assert!(base != libc::MAP_FAILED, "mapping fd {fd}: {}", std::io::Error::last_os_error());
        let layout = Layout::from_size_align(size, 4096).expect("a page-aligned layout");
        Memory { base: base.cast(), layout, mapped: true }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `layout.size()` bytes allocated at `base`, alive with self.
        unsafe { core::slice::from_raw_parts(self.base, self.layout.size()) }
    }

    /// The bytes, writable (the reflector's side writes payloads).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only Rust view.
        unsafe { core::slice::from_raw_parts_mut(self.base, self.layout.size()) }
    }

    fn window(&self, name: &str, gpa: u64) -> HostedWindow {
        HostedWindow { name: name.into(), gpa, base: self.base, size: self.layout.size() as u64, read_only: false }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in `map` with this size.
            unsafe { libc::munmap(self.base.cast(), self.layout.size()) };
        } else {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.base, self.layout) };
        }
    }
}

/// An eventfd (a doorbell the driver rings, or an interrupt line a test
/// raises).
pub struct EventFd(i32);

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> EventFd {
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "creating an eventfd: {}", std::io::Error::last_os_error());
        EventFd(fd)
    }

    /// How often it was signalled since the last call.
    pub fn take(&self) -> u64 {
        let mut count = 0u64;
        // SAFETY: reads the 8-byte counter into a local.
        let n = unsafe { libc::read(self.0, (&mut count as *mut u64).cast(), 8) };
        if n == 8 {
            count
        } else {
            0
        }
    }

    /// Signals it once.
    pub fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local.
        unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }
}

impl Default for EventFd {
    fn default() -> Self {
        EventFd::new()
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this value owns.
        unsafe { libc::close(self.0) };
    }
}

/// A completion as the reflector reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's id.
    pub id: u64,
    /// `channel::status::*`.
    pub status: u32,
    /// Bytes done.
    pub len: u32,
}

/// A fake reflector and the memory of a driver's device.
pub struct Bench {
    channel: Memory,
    devices: Vec<(String, Memory)>,
    /// Doorbell 0: the driver published completions.
    pub completions_rung: EventFd,
    /// Doorbell 1: the device's (unused by devices made of memory).
    pub device_doorbell: EventFd,
    /// Interrupt line 0: requests published.
    pub requests_line: EventFd,
    /// Interrupt line 1: the device's.
    pub device_line: EventFd,
    /// A real device's doorbell and interrupt eventfds, given in place of
    /// `device_doorbell` and `device_line`.
    device_fds: Option<(i32, i32)>,
    cmdline: String,
    next_id: u64,
    cmp_cons: u32,
}

impl Default for Bench {
    fn default() -> Self {
        Bench::new()
    }
}

impl Bench {
    /// A channel as the reflector sets it up, generation 1, no device.
    pub fn new() -> Bench {
        Bench::on_channel(Memory::new(channel::REGION_SIZE))
    }

    /// The same on channel memory the test made: a memfd a real device
    /// DMAs into, mapped with [`Memory::map`].
    pub fn on_channel(channel: Memory) -> Bench {
        assert!(channel.layout.size() >= channel::REGION_SIZE, "the channel is smaller than its layout");
        let mut bench = Bench {
            channel,
            devices: Vec::new(),
            completions_rung: EventFd::new(),
            device_doorbell: EventFd::new(),
            requests_line: EventFd::new(),
            device_line: EventFd::new(),
            device_fds: None,
            cmdline: String::new(),
            next_id: 1,
            cmp_cons: 0,
        };
        let memory = bench.channel.bytes_mut();
        let mut put = |at: usize, bytes: &[u8]| memory[at..at + bytes.len()].copy_from_slice(bytes);
        put(header::MAGIC, &channel::MAGIC.to_le_bytes());
        put(header::VERSION, &channel::VERSION.to_le_bytes());
        put(header::GENERATION, &1u32.to_le_bytes());
        put(header::RING_SIZE, &channel::RING_SIZE.to_le_bytes());
        put(header::SLOT_SIZE, &channel::SLOT_SIZE.to_le_bytes());
        put(header::SLOT_COUNT, &channel::SLOT_COUNT.to_le_bytes());
        bench
    }

    /// Adds device memory as window `name` (at [`DEVICE_GPA`]), as the
    /// reflector's hardware would: it outlives every driver started on the
    /// bench, as a device outlives a driver VM.
    pub fn with_device_memory(mut self, name: &str, size: usize) -> Bench {
        self.devices.push((name.into(), Memory::new(size)));
        self
    }

    /// Adds a real device's window `name` (mapped from its descriptor).
    pub fn with_device_window(mut self, name: &str, memory: Memory) -> Bench {
        self.devices.push((name.into(), memory));
        self
    }

    /// Wires a real device: its doorbell eventfd becomes the driver's
    /// doorbell 1, and `line` (the eventfd its interrupt is routed to) the
    /// driver's interrupt line 1.
    pub fn with_device_eventfds(mut self, doorbell: i32, line: i32) -> Bench {
        self.device_fds = Some((doorbell, line));
        self
    }

    /// Sets the driver's command line (`driver_args`).
    pub fn with_cmdline(mut self, cmdline: &str) -> Bench {
        self.cmdline = cmdline.into();
        self
    }

    /// Device memory `name`.
    pub fn device_memory(&mut self, name: &str) -> &mut [u8] {
        let (_, memory) = self.devices.iter_mut().find(|(n, _)| n == name).expect("no such device memory");
        memory.bytes_mut()
    }

    /// A kernel over this bench's resources, as a new driver VM gets.
    pub fn kernel(&self) -> Kernel {
        let mut windows: Vec<HostedWindow> =
            self.devices.iter().map(|(name, memory)| memory.window(name, DEVICE_GPA)).collect();
        windows.push(self.channel.window("channel", CHANNEL_GPA));
        let resources = Resources {
            cmdline: self.cmdline.clone(),
            ram_size: 16 << 20,
            windows,
            doorbells: alloc::vec![
                self.completions_rung.0,
                self.device_fds.map_or(self.device_doorbell.0, |fds| fds.0)
            ],
            irqs: alloc::vec![self.requests_line.0, self.device_fds.map_or(self.device_line.0, |fds| fds.1)],
            go: None,
        };
        Kernel::hosted(resources).expect("the bench's resources fit a driver VM")
    }

    /// Starts driver `D` as a driver VM would: opens the channel, probes
    /// the device, attaches. Start another one (after dropping the first)
    /// to test a restart: its memory is new, the device's is not.
    pub fn start<D: ChannelDriver>(&self) -> Result<Running<D>, Error> {
        let kernel = self.kernel();
        let mut channel = Channel::open(&kernel, D::NAME)?;
        let device = D::probe(&kernel, &channel)?;
        channel.attach(D::FAULTS);
        Ok(Running { _kernel: kernel, channel, device })
    }

    /// The channel's shared word at `offset` (the reflector's side).
    fn word(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= channel::REGION_SIZE);
        // SAFETY: in bounds and aligned (checked above); the memory lives as
        // long as the bench; AtomicU32 has u32's layout.
        unsafe { &*(self.channel.base.add(offset) as *const AtomicU32) }
    }

    /// Publishes a request (the reflector's side); its id. A write's
    /// payload is copied into its bounce slot first.
    pub fn publish(&mut self, op: u32, sector: u64, len: u32, payload: Option<&[u8]>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let slot = channel::slot_of(id);
        if let Some(payload) = payload {
            let at = channel::slot_offset(slot);
            self.channel.bytes_mut()[at..at + payload.len()].copy_from_slice(payload);
        }
        let prod = self.word(header::REQ_PROD).load(Ordering::Acquire);
        let at = channel::REQUEST_RING_OFFSET + (prod % channel::RING_SIZE) as usize * channel::REQUEST_ENTRY_SIZE;
        let entry = RequestEntry { id, op, slot, sector, len, reserved: 0 };
        self.channel.bytes_mut()[at..at + channel::REQUEST_ENTRY_SIZE].copy_from_slice(entry.as_bytes());
        self.word(header::REQ_PROD).store(prod.wrapping_add(1), Ordering::Release);
        self.requests_line.signal();
        id
    }

    /// Publishes a read of `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> u64 {
        self.publish(op::READ, sector, len, None)
    }

    /// Publishes a write of `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> u64 {
        self.publish(op::WRITE, sector, data.len() as u32, Some(data))
    }

    /// Publishes a flush.
    pub fn flush(&mut self) -> u64 {
        self.publish(op::FLUSH, 0, 0, None)
    }

    /// The completions published since the last call.
    pub fn completions(&mut self) -> Vec<Completion> {
        let prod = self.word(header::CMP_PROD).load(Ordering::Acquire);
        let mut done = Vec::new();
        while self.cmp_cons != prod {
            let at = channel::COMPLETION_RING_OFFSET
                + (self.cmp_cons % channel::RING_SIZE) as usize * channel::COMPLETION_ENTRY_SIZE;
            let bytes = &self.channel.bytes()[at..at + channel::COMPLETION_ENTRY_SIZE];
            let entry = CompletionEntry::from_bytes(bytes).unwrap_or_default();
            done.push(Completion { id: entry.id, status: entry.status, len: entry.len });
            self.cmp_cons = self.cmp_cons.wrapping_add(1);
        }
        self.word(header::CMP_CONS).store(self.cmp_cons, Ordering::Release);
        done
    }

    /// The first `len` bytes of request `id`'s bounce slot (a read's data).
    pub fn slot(&self, id: u64, len: usize) -> &[u8] {
        let at = channel::slot_offset(channel::slot_of(id));
        &self.channel.bytes()[at..at + len]
    }
}

/// A driver started on a [`Bench`].
pub struct Running<D> {
    _kernel: Kernel,
    channel: Channel,
    /// The driver.
    pub device: D,
}

/// Longest [`Running::drain_until`] waits for a device of its own.
const DEVICE_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

impl<D: ChannelDriver> Running<D> {
    /// Serves everything published so far (never sleeps).
    pub fn drain(&mut self) -> Result<(), Error> {
        crate::channel::drain(&mut self.channel, &mut self.device)
    }

    /// Serves until `done` holds, for a device that completes on its own
    /// time (a simulated controller's thread); an error after 10 s.
    pub fn drain_until(&mut self, mut done: impl FnMut() -> bool) -> Result<(), Error> {
        let start = std::time::Instant::now();
        loop {
            self.drain()?;
            if done() {
                return Ok(());
            }
            if start.elapsed() > DEVICE_BOUND {
                return Err(Error::Device("the device did not complete within 10 s"));
            }
            std::thread::yield_now();
        }
    }
}
