//! Boot: from the vmm's boot information to the image's entry point.

use guest_abi::BootInfo;

use crate::device::{Doorbell, InterruptLine, Window};

/// What the kernel gives a driver: its command line and its device
/// resources, as the vmm described them in the boot information.
pub struct Kernel {
    pub(crate) boot: BootInfo,
    /// Where a hosted driver reaches its windows and doorbells.
    #[cfg(not(driver_vm_isolated))]
    pub(crate) hosted: crate::hosted::Mapped,
}

impl Kernel {
    /// The command line passed with `vmm run --cmdline` (empty if none, or
    /// if it was not UTF-8).
    #[cfg(not(driver_vm_isolated))]
    pub fn cmdline(&self) -> &str {
        &self.hosted.cmdline
    }

    /// The command line passed with `vmm run --cmdline` (empty if none, or
    /// if it was not UTF-8).
    #[cfg(driver_vm_isolated)]
    pub fn cmdline(&self) -> &str {
        use guest_abi::CMDLINE_GPA;
        let len = (self.boot.cmdline_len as usize).min(guest_abi::CMDLINE_MAX);
        // SAFETY: the vmm wrote `len` bytes at CMDLINE_GPA, which is mapped
        // and never written again while the guest runs.
        let bytes = unsafe { core::slice::from_raw_parts(CMDLINE_GPA as *const u8, len) };
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// Size of guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.boot.ram_size
    }

    /// The windows, in command-line order.
    pub fn windows(&self) -> impl Iterator<Item = Window> + '_ {
        let count = (self.boot.window_count as usize).min(guest_abi::MAX_WINDOWS);
        self.boot.windows[..count].iter().enumerate().map(|(i, info)| Window::from_info(info, self.window_base(i)))
    }

    #[cfg(driver_vm_isolated)]
    fn window_base(&self, index: usize) -> u64 {
        self.boot.windows[index].gpa
    }

    #[cfg(not(driver_vm_isolated))]
    fn window_base(&self, index: usize) -> u64 {
        self.hosted.window_bases.get(index).copied().unwrap_or(0)
    }

    /// The window called `name` on the command line.
    pub fn window(&self, name: &str) -> Option<Window> {
        self.windows().find(|w| w.name() == name)
    }

    /// Doorbell number `index` (command-line order).
    #[cfg(not(driver_vm_isolated))]
    pub fn doorbell(&self, index: usize) -> Option<Doorbell> {
        self.hosted.doorbells.get(index).map(|fd| Doorbell::eventfd(*fd))
    }

    /// Doorbell number `index` (command-line order).
    #[cfg(driver_vm_isolated)]
    pub fn doorbell(&self, index: usize) -> Option<Doorbell> {
        let count = (self.boot.doorbell_count as usize).min(guest_abi::MAX_DOORBELLS);
        self.boot.doorbells[..count].get(index).and_then(Doorbell::from_info)
    }

    /// A warm spare's wait until its supervisor lets it go: the `WAIT_GO`
    /// hypercall, which blocks in the vmm (no halt, no interrupt through
    /// ring 0); returns at once if the vmm was given no go signal.
    #[cfg(driver_vm_isolated)]
    pub fn wait_for_go(&self) {
        crate::arch::outl(guest_abi::port::WAIT_GO, 0);
    }

    /// A warm spare's wait until its supervisor lets it go: blocks on the
    /// go eventfd it was given (`--go fd=N`); returns at once without one.
    #[cfg(not(driver_vm_isolated))]
    pub fn wait_for_go(&self) {
        if let Some(fd) = self.hosted.go {
            crate::hosted::wait_readable(fd);
        }
    }

    /// Interrupt line number `index` (command-line order).
    pub fn interrupt_line(&self, index: usize) -> Option<InterruptLine> {
        let count = (self.boot.irq_count as usize).min(guest_abi::MAX_IRQS);
        self.boot.irqs[..count].get(index).map(InterruptLine::from_info)
    }
}

#[cfg(driver_vm_isolated)]
extern "Rust" {
    fn __driver_vm_main(kernel: &Kernel) -> u32;
}

/// First Rust code to run, called by `_start` with `rdi` = boot information.
#[cfg(driver_vm_isolated)]
pub(crate) extern "C" fn kernel_entry(boot: *const BootInfo) -> ! {
    use core::ptr;

    use guest_abi::{exit_code, port, BOOT_MAGIC};

    use crate::{arch, heap, time};

    // SAFETY: the vmm maps the boot information page at BOOT_INFO_GPA and
    // passes its address; `BootInfo` is plain data (every bit pattern valid).
    let boot = unsafe { ptr::read_volatile(boot) };
    if boot.magic != BOOT_MAGIC || boot.abi_version != guest_abi::ABI_VERSION {
        crate::exit(exit_code::BAD_BOOT_INFO);
    }
    time::init(boot.tsc_khz);
    heap::init(boot.heap_start, boot.heap_end);
    let kernel = Kernel { boot };
    arch::outl(port::READY, 0);
    // SAFETY: every image defines `__driver_vm_main` through `entry!`.
    let code = unsafe { __driver_vm_main(&kernel) };
    crate::exit(code)
}
