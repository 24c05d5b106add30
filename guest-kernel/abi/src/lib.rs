//! The contracts around a driver VM: between the `vmm` and the image (this
//! module: memory layout, boot information, image header, hypercalls),
//! between the reflector and the driver ([`channel`]), and between the
//! simulated storage controller and its driver ([`storage`]).
//!
//! Both sides compile this crate: the host `vmm` (which writes the boot
//! information and interprets hypercalls) and `guest-kernel` (which reads the
//! boot information and makes the hypercalls). It holds plain data layouts and
//! numbers only, no code that touches memory, so it is `no_std` and has no
//! dependencies.
//!
//! What it is not: it is not trusted by the host. Everything the guest writes
//! into these structures (the panic message, an exception frame) is read by
//! the `vmm` with bounds checks and treated as untrusted text.
//!
//! # Guest physical memory layout
//!
//! ```text
//! 0x0000_0000  null page, never mapped in the guest page tables
//! 0x0000_1000  GDT                  (GDT_GPA)
//! 0x0000_2000  IDT, 256 gates       (IDT_GPA)
//! 0x0000_3000  boot information     (BOOT_INFO_GPA)
//! 0x0000_4000  command line         (CMDLINE_GPA, CMDLINE_MAX bytes)
//! 0x0000_5000  panic message buffer (PANIC_BUF_GPA, PANIC_BUF_LEN bytes)
//! 0x0000_6000  TSS + I/O permission bitmap
//! 0x0000_9000  ring-0 stack         (top at RING0_STACK_TOP)
//! 0x0000_c000  double-fault stack   (top at DOUBLE_FAULT_STACK_TOP)
//! 0x0001_0000  page tables          (up to PAGE_TABLES_END)
//! 0x0010_0000  image (IMAGE_BASE), then heap, then an unmapped guard
//!              page (STACK_GUARD_SIZE), then the ring-3 stack
//!              (RING3_STACK_SIZE) at the top of RAM
//! RAM end ..   windows, doorbell pages (placed by the user, checked by the vmm)
//! ```
//!
//! Ring 3 reaches only what it needs (the vmm's page tables): the boot
//! information and command line read-only, the panic buffer, the image
//! (code read and execute, read-only data, data), heap, stack, windows and
//! doorbells. GDT, IDT, TSS, ring-0 stacks and page tables are
//! supervisor-only; nothing but the image's code is executable; the guard
//! page is unmapped, so a stack overflow faults there and is reported as one.
#![no_std]
#![deny(missing_docs)]

pub mod channel;
pub mod nic;
pub mod storage;
pub mod trap;

/// Version of this contract. The image header and the boot information both
/// carry it; the vmm refuses an image built against another version.
pub const ABI_VERSION: u32 = 2;

/// Guest physical address of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// Guest physical address of the IDT (256 16-byte gates).
pub const IDT_GPA: u64 = 0x2000;
/// Guest physical address of [`BootInfo`]; also passed in `rdi` at entry.
pub const BOOT_INFO_GPA: u64 = 0x3000;
/// Guest physical address of the command line (not NUL-terminated; its
/// length is in [`BootInfo::cmdline_len`]).
pub const CMDLINE_GPA: u64 = 0x4000;
/// Longest command line the vmm accepts.
pub const CMDLINE_MAX: usize = 4096;
/// Guest physical address where the guest writes its panic message.
pub const PANIC_BUF_GPA: u64 = 0x5000;
/// Size of the panic message buffer.
pub const PANIC_BUF_LEN: usize = 4096;
/// Guest physical address of the 64-bit TSS.
pub const TSS_GPA: u64 = 0x6000;
/// Top of the ring-0 stack used by exception and interrupt handlers
/// (TSS.RSP0). 12 KiB: handlers are a few dozen instructions and nest at
/// most once (an exception in a handler is fatal).
pub const RING0_STACK_TOP: u64 = 0xc000;
/// Top of the stack the double-fault handler runs on (TSS.IST1), so that a
/// ring-0 stack overflow is reported as a double fault, not a triple fault.
pub const DOUBLE_FAULT_STACK_TOP: u64 = 0xe000;
/// First page-table page; the PML4 lives here.
pub const PAGE_TABLES_GPA: u64 = 0x1_0000;
/// End (exclusive) of the page-table area: 240 tables, enough for RAM plus
/// windows that are not 2 MiB aligned up to about 400 MiB.
pub const PAGE_TABLES_END: u64 = 0x10_0000;
/// Where every image is linked and loaded. The [`ImageHeader`] sits here.
pub const IMAGE_BASE: u64 = 0x10_0000;
/// Size of the ring-3 stack at the top of RAM.
pub const RING3_STACK_SIZE: u64 = 256 * 1024;
/// Size of the unmapped guard below the ring-3 stack (Rust probes every
/// page of a large frame, so an overflow always touches it).
pub const STACK_GUARD_SIZE: u64 = 4096;

/// The guard below the ring-3 stack of a guest with `ram_size` bytes of RAM:
/// `[start, end)`.
pub const fn stack_guard(ram_size: u64) -> (u64, u64) {
    let end = ram_size - RING3_STACK_SIZE;
    (end - STACK_GUARD_SIZE, end)
}
/// Guest physical addresses at or above this are not usable for windows:
/// one PML4 entry (512 GiB) of identity mapping covers everything.
pub const GPA_LIMIT: u64 = 1 << 39;
/// The local APIC and IOAPIC MMIO range (in-kernel irqchip); no window or
/// doorbell may overlap it.
pub const APIC_MMIO_RANGE: (u64, u64) = (0xfec0_0000, 0xfef0_0000);

/// Ring-3 code segment selector the vCPU starts with.
pub const USER_CS: u16 = 0x23;
/// Ring-3 data segment selector.
pub const USER_DS: u16 = 0x1b;
/// Ring-0 code segment selector (interrupt gates target it).
pub const KERNEL_CS: u16 = 0x08;
/// Ring-0 data segment selector.
pub const KERNEL_DS: u16 = 0x10;
/// Task register selector.
pub const TSS_SELECTOR: u16 = 0x28;

/// Distance between two interrupt entry stubs in the image.
pub const ISR_STUB_STRIDE: u64 = 16;
/// Number of interrupt vectors (and stubs).
pub const ISR_COUNT: u64 = 256;
/// First vector of the interrupt lines (the PIC is programmed with this base).
pub const IRQ_VECTOR_BASE: u8 = 0x20;

/// Magic at the start of every image ([`ImageHeader::magic`]).
pub const IMAGE_MAGIC: [u8; 8] = *b"DRVMIMG1";
/// Magic in [`BootInfo::magic`].
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"DRVMBOOT");

/// Port-I/O hypercalls. The guest runs in ring 3 with an all-zero I/O
/// permission bitmap, so `out` to these ports exits to the vmm. Each is one
/// `out dx, eax`; arguments that do not fit in `eax` live in memory at a
/// fixed address.
pub mod port {
    /// COM1 transmit register: console output, a byte (or a `rep outsb`
    /// string) per exit; the guest kernel writes lines with [`CONSOLE_LINE`].
    pub const CONSOLE: u16 = 0x3f8;
    /// COM1 line status register: reads as "transmitter empty".
    pub const CONSOLE_LSR: u16 = 0x3fd;
    /// `eax` = exit code: the guest ends cleanly.
    pub const EXIT: u16 = 0x500;
    /// `eax` = length of the message at `PANIC_BUF_GPA`: the guest panicked.
    pub const PANIC: u16 = 0x501;
    /// `eax` = vector; sent by the ring-0 exception stub with the exception
    /// frame on the ring-0 stack at `rsp` (see [`super::ExceptionFrame`]).
    pub const EXCEPTION: u16 = 0x502;
    /// `eax` = 0: the guest kernel finished initialising and the driver is
    /// about to run. Supervisors wait for this.
    pub const READY: u16 = 0x503;
    /// `eax` = length (at most `PANIC_BUF_LEN`) of console output the guest
    /// wrote at `PANIC_BUF_GPA`: a whole line in one exit. `rep outsb` to
    /// [`CONSOLE`] is one exit on hardware KVM but one per byte on kvm-pvm:
    /// a 45-byte line took 2.2 ms there (one exit about 40 us), on the
    /// recovery path of every driver VM start.
    pub const CONSOLE_LINE: u16 = 0x504;
    /// `eax` = 0: a warm spare waits here until its supervisor lets it go
    /// (the vmm blocks the vCPU thread on its `--go-fd` eventfd and
    /// returns once it is signalled; at once if it has none). Waking a
    /// halted vCPU takes an interrupt through the emulated ring 0 on
    /// kvm-pvm; this wakes a thread and re-enters ring 3.
    pub const WAIT_GO: u16 = 0x505;
    /// `in` dword: the guest sleeps until one of its interrupt lines fires
    /// (at once if one already has); the value read is the set of lines
    /// that fired, one bit per [`super::IrqInfo::vector`] from
    /// [`super::IRQ_VECTOR_BASE`]. The vmm blocks the vCPU thread on the
    /// lines' eventfds and re-enters ring 3: a line is not a KVM irqfd, and
    /// no interrupt goes through the emulated ring 0 (on kvm-pvm, a `hlt`
    /// and the interrupt that ended it cost a driver VM's wake-up several
    /// hundred microseconds there). 0 when the vmm was asked to stop.
    pub const WAIT_LINES: u16 = 0x506;
    /// First and last port reserved for hypercalls; doorbells may not use
    /// them.
    pub const RESERVED: (u16, u16) = (0x500, 0x50f);
    /// The COM1 register block; doorbells may not use it.
    pub const CONSOLE_BLOCK: (u16, u16) = (0x3f8, 0x3ff);
}

/// What the exception stub leaves on the ring-0 stack before reporting:
/// its own two pushes followed by the CPU's interrupt frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionFrame {
    /// Vector number pushed by the stub.
    pub vector: u64,
    /// Error code pushed by the CPU, or 0 pushed by the stub.
    pub error_code: u64,
    /// Faulting instruction pointer.
    pub rip: u64,
    /// Code segment at the fault (its low two bits are the privilege level).
    pub cs: u64,
    /// Flags at the fault.
    pub rflags: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
    /// Stack segment at the fault.
    pub ss: u64,
}

/// Header at [`IMAGE_BASE`], the first bytes of every image. It tells the vmm
/// where the interrupt entry stubs are so that it can build the IDT before
/// the first guest instruction runs (ring 3 cannot load an IDT itself).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageHeader {
    /// [`IMAGE_MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_VERSION`] the image was built against.
    pub abi_version: u32,
    /// `size_of::<ImageHeader>()`, for forward compatibility.
    pub header_size: u32,
    /// Address of the first of [`ISR_COUNT`] entry stubs, each
    /// [`ISR_STUB_STRIDE`] bytes apart.
    pub isr_stubs: u64,
}

/// Most windows a VM can have.
pub const MAX_WINDOWS: usize = 16;
/// Most doorbells a VM can have.
pub const MAX_DOORBELLS: usize = 16;
/// Most interrupt lines a VM can have (free lines of the two 8259 PICs).
pub const MAX_IRQS: usize = 8;
/// Length of a window name, NUL padded.
pub const NAME_LEN: usize = 16;

/// A window: a file (device BAR, memfd, regular file) mapped into guest
/// physical memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowInfo {
    /// Guest physical (and, identity mapped, virtual) address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`WINDOW_READ_ONLY`], [`WINDOW_TRAPPED`] or 0.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Name given on the command line, NUL padded.
    pub name: [u8; NAME_LEN],
}

/// [`WindowInfo::flags`]: the window is mapped read-only.
pub const WINDOW_READ_ONLY: u32 = 1;
/// [`WindowInfo::flags`]: no memory backs the window; every access exits
/// to the vmm, which forwards it to its supervisor ([`trap`]).
pub const WINDOW_TRAPPED: u32 = 2;

/// [`DoorbellInfo::kind`]: unused slot.
pub const DOORBELL_NONE: u32 = 0;
/// [`DoorbellInfo::kind`]: a write of `len` bytes to a guest physical address.
pub const DOORBELL_MMIO: u32 = 1;
/// [`DoorbellInfo::kind`]: an `out` of `len` bytes to an I/O port.
pub const DOORBELL_PORT: u32 = 2;

/// A doorbell: an address whose write the host receives as an eventfd
/// signal (KVM ioeventfd), without an exit to the vmm.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellInfo {
    /// [`DOORBELL_MMIO`] or [`DOORBELL_PORT`].
    pub kind: u32,
    /// Width of the write in bytes: 1, 2, 4 or 8 (port: 1, 2 or 4).
    pub len: u32,
    /// Guest physical address or port number.
    pub addr: u64,
}

/// An interrupt line: the host signals an eventfd, and the guest's
/// [`port::WAIT_LINES`] returns with the line's bit (`vector` minus
/// [`IRQ_VECTOR_BASE`]) set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Global system interrupt (PIC pin) the line is wired to.
    pub gsi: u32,
    /// Vector the guest sees.
    pub vector: u32,
}

/// Everything the guest kernel learns from the vmm. Written by the vmm at
/// [`BOOT_INFO_GPA`] before the first instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of valid entries in `windows`.
    pub window_count: u32,
    /// Number of valid entries in `doorbells`.
    pub doorbell_count: u32,
    /// Number of valid entries in `irqs`.
    pub irq_count: u32,
    /// Size of RAM, which starts at guest physical address 0.
    pub ram_size: u64,
    /// First byte after the loaded image.
    pub image_end: u64,
    /// Heap: `[heap_start, heap_end)`, between the image and the stack.
    pub heap_start: u64,
    /// End of the heap.
    pub heap_end: u64,
    /// Initial ring-3 stack pointer (top of RAM).
    pub stack_top: u64,
    /// TSC frequency in kHz, for time keeping.
    pub tsc_khz: u64,
    /// Length of the command line at [`CMDLINE_GPA`].
    pub cmdline_len: u64,
    /// Windows, in command-line order.
    pub windows: [WindowInfo; MAX_WINDOWS],
    /// Doorbells, in command-line order.
    pub doorbells: [DoorbellInfo; MAX_DOORBELLS],
    /// Interrupt lines, in command-line order.
    pub irqs: [IrqInfo; MAX_IRQS],
}

/// Plain data: `repr(C)`, no padding, every bit pattern valid, so it can be
/// copied to and from guest memory as bytes.
///
/// # Safety
///
/// Implement only for types with those three properties; the `const`
/// assertions below check the sizes of the ones in this crate.
pub unsafe trait Plain: Copy + Default {
    /// The value's bytes.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Plain` types have no padding, so every byte is initialised.
        unsafe { core::slice::from_raw_parts(self as *const Self as *const u8, core::mem::size_of::<Self>()) }
    }

    /// A value from the first `size_of::<Self>()` bytes, if there are that many.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked above; every bit pattern is a valid `Self`;
        // `read_unaligned` has no alignment requirement.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const Self) })
    }
}

// SAFETY: this and the impls below are for repr(C) structs of integers and
// byte arrays whose sizes equal the sum of their fields (asserted below), so
// they have no padding and every bit pattern is valid.
unsafe impl Plain for ExceptionFrame {}
// SAFETY: see above.
unsafe impl Plain for ImageHeader {}
// SAFETY: see above.
unsafe impl Plain for WindowInfo {}
// SAFETY: see above.
unsafe impl Plain for DoorbellInfo {}
// SAFETY: see above.
unsafe impl Plain for IrqInfo {}
// SAFETY: see above.
unsafe impl Plain for BootInfo {}
// SAFETY: primitive integers have no padding and accept every bit pattern.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for u16 {}
// SAFETY: as above.
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for u64 {}
// SAFETY: see the struct impls above.
unsafe impl Plain for channel::RequestEntry {}
// SAFETY: see above.
unsafe impl Plain for channel::CompletionEntry {}
// SAFETY: see above.
unsafe impl Plain for storage::Command {}
// SAFETY: see above.
unsafe impl Plain for storage::Completion {}
// SAFETY: see above (sizes asserted in `nic`).
unsafe impl Plain for nic::Descriptor {}
// SAFETY: see above.
unsafe impl Plain for nic::Completion {}

const _: () = {
    use core::mem::size_of;
    // Each stub is push imm8 (2 bytes) + push imm32 (5) + jmp rel32 (5).
    assert!(2 + 5 + 5 <= ISR_STUB_STRIDE);
    assert!(PAGE_TABLES_END <= IMAGE_BASE);
    assert!(size_of::<BootInfo>() <= 0x1000);
    assert!(size_of::<ExceptionFrame>() == 7 * 8);
    assert!(size_of::<ImageHeader>() == 8 + 4 + 4 + 8);
    assert!(size_of::<WindowInfo>() == 8 + 8 + 4 + 4 + NAME_LEN);
    assert!(size_of::<DoorbellInfo>() == 4 + 4 + 8);
    assert!(size_of::<IrqInfo>() == 4 + 4);
    assert!(
        size_of::<BootInfo>()
            == 8 + 4 * 4
                + 8 * 7
                + MAX_WINDOWS * size_of::<WindowInfo>()
                + MAX_DOORBELLS * size_of::<DoorbellInfo>()
                + MAX_IRQS * size_of::<IrqInfo>()
    );
};

/// Guest exit codes the kernel itself uses (a driver chooses its own codes
/// below 64).
pub mod exit_code {
    /// The boot information was missing or of another ABI version.
    pub const BAD_BOOT_INFO: u32 = 100;
    /// The driver returned an error from its entry point.
    pub const DRIVER_FAILED: u32 = 101;
}

/// Name of an exception vector, for reports.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide_error",
        1 => "debug",
        2 => "nmi",
        3 => "breakpoint",
        4 => "overflow",
        5 => "bound_range",
        6 => "invalid_opcode",
        7 => "device_not_available",
        8 => "double_fault",
        10 => "invalid_tss",
        11 => "segment_not_present",
        12 => "stack_fault",
        13 => "general_protection",
        14 => "page_fault",
        16 => "x87_floating_point",
        17 => "alignment_check",
        18 => "machine_check",
        19 => "simd_floating_point",
        20 => "virtualization",
        21 => "control_protection",
        _ => "reserved",
    }
}

/// Whether the CPU pushes an error code for this exception vector.
pub const fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layout_areas_do_not_overlap_and_are_ordered() {
        let tss_end = TSS_GPA + 104 + 8192 + 1;
        let areas = [
            (GDT_GPA, GDT_GPA + 0x1000),
            (IDT_GPA, IDT_GPA + ISR_COUNT * 16),
            (BOOT_INFO_GPA, BOOT_INFO_GPA + size_of::<BootInfo>() as u64),
            (CMDLINE_GPA, CMDLINE_GPA + CMDLINE_MAX as u64),
            (PANIC_BUF_GPA, PANIC_BUF_GPA + PANIC_BUF_LEN as u64),
            (TSS_GPA, tss_end),
            (tss_end, RING0_STACK_TOP),
            (RING0_STACK_TOP, DOUBLE_FAULT_STACK_TOP),
            (PAGE_TABLES_GPA, PAGE_TABLES_END),
        ];
        for pair in areas.windows(2) {
            assert!(pair[0].0 < pair[0].1, "empty area {:x?}", pair[0]);
            assert!(pair[0].1 <= pair[1].0, "{:x?} overlaps {:x?}", pair[0], pair[1]);
        }
    }

    #[test]
    fn error_code_vectors() {
        assert!(has_error_code(14) && has_error_code(13) && has_error_code(8));
        assert!(!has_error_code(6) && !has_error_code(3) && !has_error_code(32));
        assert_eq!(exception_name(14), "page_fault");
    }
}
