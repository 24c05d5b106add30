//! Assembling a driver VM: memory slots, doorbells, interrupt lines, the
//! image, the system tables, the boot information and the vCPU.
//!
//! A VM has no interrupt controller: its interrupt lines are eventfds the
//! vCPU thread waits on when the guest asks (`port::WAIT_LINES`), so no
//! interrupt is ever delivered through the emulated ring 0 (DESIGN.md).
//!
//! Everything a VM is given is listed in its [`VmConfig`]; nothing else
//! enters its guest physical address space (invariant 1 in DESIGN.md).

use std::os::fd::{FromRawFd, RawFd};

use guest_abi::{self as abi, BootInfo, DoorbellInfo, IrqInfo, Plain, WindowInfo};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DoorbellAddress, DoorbellConfig, VmConfig, PAGE_SIZE};
use crate::console::Console;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::memory::{self, GuestMemory};
use crate::vcpu::{Signals, Trap, Vcpu};
use crate::x86::{self, Access, PageTables};

/// Line numbers handed out to `--irq` lines, in order (each the bit a line
/// sets in `WAIT_LINES`'s answer, and its vector from `IRQ_VECTOR_BASE`):
/// the free lines of a PC's PICs, as before the lines bypassed them, so
/// the boot information a driver reads did not change.
const LINE_NUMBERS: [u32; abi::MAX_IRQS] = [5, 6, 7, 9, 10, 11, 12, 14];

/// A VM ready to run: its KVM handles, memory and vCPU.
pub struct Vm {
    /// Name for logs and reports.
    pub name: String,
    /// Kept open for the VM's lifetime; dropping it destroys the VM.
    pub vm_fd: VmFd,
    /// The one vCPU.
    pub vcpu: Vcpu,
    /// Doorbell eventfds (KVM holds its own references; these keep the
    /// registrations' fds alive for symmetry with teardown).
    pub eventfds: Vec<EventFd>,
}

impl Vm {
    /// Creates and fully sets up a VM; the guest has not run yet.
    pub fn create(kvm: &Kvm, config: &VmConfig, image: &Image, console: Console) -> Result<Vm> {
        config.validate()?;
        let needed = image.ram_needed();
        if needed > config.memory {
            return Err(Error::ImageTooLarge { image: image.name.clone(), needed, available: config.memory });
        }
        let guest = memory::build(config)?;
        let vm_fd = kvm.create_vm().map_err(Error::kvm("creating the VM"))?;
        register_slots(&vm_fd, &guest)?;
        let gsis: Vec<u32> = LINE_NUMBERS[..config.irqs.len()].to_vec();
        let mut lines = Vec::new();
        for (irq, gsi) in config.irqs.iter().zip(&gsis) {
            lines.push((take_eventfd(irq.fd, "--irq fd")?, 1 << gsi));
        }
        let mut eventfds = Vec::new();
        for doorbell in &config.doorbells {
            let eventfd = take_eventfd(doorbell.fd, "--doorbell fd")?;
            register_doorbell(&vm_fd, doorbell, &eventfd)?;
            eventfds.push(eventfd);
        }
        // A trapped window's posted registers: KVM signals their eventfds
        // on a write, so those never reach the trap's socket.
        for trap in &config.traps {
            for (offset, fd) in &trap.posted {
                let eventfd = take_eventfd(*fd, "--trap posted fd")?;
                let register = DoorbellConfig {
                    address: DoorbellAddress::Mmio(trap.gpa + offset),
                    len: 0,
                    datamatch: None,
                    fd: *fd,
                };
                register_doorbell(&vm_fd, &register, &eventfd)?;
                eventfds.push(eventfd);
            }
        }
        let header = image.load(&guest.memory)?;
        x86::write_system_tables(&guest.memory, header.isr_stubs)?;
        let cr3 = build_page_tables(&guest.memory, config, image)?;
        let vcpu_fd = vm_fd.create_vcpu(0).map_err(Error::kvm("creating the vCPU"))?;
        let tsc_khz = vcpu_fd.get_tsc_khz().map_err(Error::kvm("reading the TSC frequency"))?;
        let boot = boot_info(config, image, u64::from(tsc_khz), &gsis);
        guest
            .memory
            .write_slice(boot.as_bytes(), GuestAddress(abi::BOOT_INFO_GPA))
            .and_then(|_| guest.memory.write_slice(config.cmdline.as_bytes(), GuestAddress(abi::CMDLINE_GPA)))
            .map_err(|e| Error::invalid("guest memory", format!("writing the boot information: {e}")))?;
        let sregs = vcpu_fd.get_sregs().map_err(Error::kvm("reading special registers"))?;
        vcpu_fd.set_sregs(&x86::sregs(sregs, cr3)).map_err(Error::kvm("setting special registers"))?;
        vcpu_fd.set_regs(&x86::regs(image.layout.entry, boot.stack_top)).map_err(Error::kvm("setting registers"))?;
        let traps = config
            .traps
            .iter()
            .map(|trap| Ok(Trap::new(trap.gpa, trap.size, take_socket(trap.fd)?, &trap.name)))
            .collect::<Result<Vec<_>>>()?;
        let go = config.go.map(|fd| take_eventfd(fd, "--go-fd fd")).transpose()?;
        let start = config.start.map(|fd| take_eventfd(fd, "--start-fd fd")).transpose()?;
        let vcpu = Vcpu::new(vcpu_fd, guest.memory, console, traps, config.memory, Signals { go, start }, lines);
        Ok(Vm { name: config.name.clone(), vm_fd, vcpu, eventfds })
    }
}

fn register_slots(vm_fd: &VmFd, guest: &GuestMemory) -> Result<()> {
    for (slot, region) in guest.slots.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if region.read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: region.gpa,
            memory_size: region.size,
            userspace_addr: region.host_addr,
        };
        // SAFETY: the host range is a live mapping owned by `guest.memory`,
        // which the `Vcpu` keeps alive at least as long as the VM fd is used
        // to run the guest.
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(Error::kvm("registering guest memory"))?;
    }
    Ok(())
}

/// What [`Vm::create`] checks of the inherited descriptors and the window
/// files, for `vmm run --check`: each duplicated or opened, judged and
/// closed again; nothing is changed, and KVM is not asked anything. Before,
/// `--check` judged the options and the image alone, and said "usable" of
/// runs that then failed on a closed descriptor or a missing window file
/// (an adversarial review found it).
pub fn check_inherited(config: &VmConfig) -> Result<()> {
    for irq in &config.irqs {
        take_eventfd(irq.fd, "--irq fd")?;
    }
    for doorbell in &config.doorbells {
        take_eventfd(doorbell.fd, "--doorbell fd")?;
    }
    for trap in &config.traps {
        take_socket(trap.fd)?;
        for (_, fd) in &trap.posted {
            take_eventfd(*fd, "--trap posted fd")?;
        }
    }
    if let Some(fd) = config.go {
        take_eventfd(fd, "--go-fd fd")?;
    }
    if let Some(fd) = config.start {
        take_eventfd(fd, "--start-fd fd")?;
    }
    for window in &config.windows {
        crate::memory::open_window_file(window)?;
    }
    Ok(())
}

/// A private close-on-exec duplicate of the inherited socket `fd` of a
/// trapped window.
fn take_socket(fd: RawFd) -> Result<std::fs::File> {
    // SAFETY: F_DUPFD_CLOEXEC on a number; fails with EBADF if not open.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(Error::invalid(
            "--trap fd",
            format!("file descriptor {fd} is not open in the vmm: pass it open (without CLOEXEC)"),
        ));
    }
    // SAFETY: `copy` is a fresh descriptor nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(copy) })
}

/// Duplicates an inherited eventfd after checking that it is one.
fn take_eventfd(fd: RawFd, what: &str) -> Result<EventFd> {
    // SAFETY: F_GETFD only queries the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::invalid(
            what,
            format!("file descriptor {fd} is not open in the vmm: pass it open (without CLOEXEC)"),
        ));
    }
    // Where /proc is visible, say what it is if not an eventfd; a jailed
    // vmm has no /proc, and KVM refuses anything but an eventfd anyway.
    if let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        if link.as_os_str() != "anon_inode:[eventfd]" {
            return Err(Error::invalid(what, format!("file descriptor {fd} is {}, not an eventfd", link.display())));
        }
    }
    // SAFETY: fcntl on an fd we just checked is open; F_DUPFD_CLOEXEC creates
    // a new descriptor that we own.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if duplicate < 0 {
        return Err(Error::Io {
            operation: format!("duplicating file descriptor {fd}"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `duplicate` is a fresh eventfd descriptor owned by nothing else.
    Ok(unsafe { EventFd::from_raw_fd(duplicate) })
}

fn register_doorbell(vm_fd: &VmFd, doorbell: &DoorbellConfig, eventfd: &EventFd) -> Result<()> {
    let address = match doorbell.address {
        DoorbellAddress::Mmio(gpa) => IoEventAddress::Mmio(gpa),
        DoorbellAddress::Port(port) => IoEventAddress::Pio(port.into()),
    };
    let result = match (doorbell.datamatch, doorbell.len) {
        (None, _) => vm_fd.register_ioevent(eventfd, &address, NoDatamatch),
        (Some(value), 1) => vm_fd.register_ioevent(eventfd, &address, value as u8),
        (Some(value), 2) => vm_fd.register_ioevent(eventfd, &address, value as u16),
        (Some(value), 4) => vm_fd.register_ioevent(eventfd, &address, value as u32),
        (Some(value), _) => vm_fd.register_ioevent(eventfd, &address, value),
    };
    result.map_err(Error::kvm("registering a doorbell (ioeventfd)"))
}

/// Maps RAM (except the null page and the stack guard), windows and
/// doorbell pages; nothing else. Ring 3 gets what it needs and no more
/// (guest-abi's layout): a wild write cannot rewrite the IDT, the page
/// tables or the code, and so cannot turn into a misleading report.
fn build_page_tables(memory: &GuestMemoryMmap, config: &VmConfig, image: &Image) -> Result<u64> {
    let mut tables = PageTables::new(memory);
    tables.map(PAGE_SIZE, abi::BOOT_INFO_GPA, Access::SUPERVISOR)?;
    tables.map(abi::BOOT_INFO_GPA, abi::PANIC_BUF_GPA, Access::USER_READ_ONLY)?;
    tables.map(abi::PANIC_BUF_GPA, abi::PANIC_BUF_GPA + abi::PANIC_BUF_LEN as u64, Access::USER_DATA)?;
    tables.map(abi::PANIC_BUF_GPA + abi::PANIC_BUF_LEN as u64, abi::IMAGE_BASE, Access::SUPERVISOR)?;
    let image_end = image.layout.end.next_multiple_of(PAGE_SIZE);
    for page in (abi::IMAGE_BASE..image_end).step_by(PAGE_SIZE as usize) {
        let access = match image.layout.page_permissions(page) {
            (_, true) => Access::USER_CODE,
            (true, false) => Access::USER_DATA,
            (false, false) => Access::USER_READ_ONLY,
        };
        tables.map(page, page + PAGE_SIZE, access)?;
    }
    let (guard_start, guard_end) = abi::stack_guard(config.memory);
    tables.map(image_end, guard_start, Access::USER_DATA)?;
    tables.map(guard_end, config.memory, Access::USER_DATA)?;
    for window in &config.windows {
        let access = if window.read_only { Access::USER_READ_ONLY } else { Access::USER_DATA };
        tables.map(window.gpa, window.end(), access)?;
    }
    for trap in &config.traps {
        tables.map(trap.gpa, trap.end(), Access::USER_DATA)?;
    }
    let mut pages: Vec<u64> = config
        .doorbells
        .iter()
        .filter_map(|d| match d.address {
            DoorbellAddress::Mmio(gpa) => Some(gpa & !(PAGE_SIZE - 1)),
            DoorbellAddress::Port(_) => None,
        })
        .collect();
    pages.sort_unstable();
    pages.dedup();
    for page in pages {
        tables.map(page, page + PAGE_SIZE, Access::USER_DATA)?;
    }
    Ok(tables.root())
}

fn boot_info(config: &VmConfig, image: &Image, tsc_khz: u64, gsis: &[u32]) -> BootInfo {
    let mut boot = BootInfo {
        magic: abi::BOOT_MAGIC,
        abi_version: abi::ABI_VERSION,
        window_count: (config.windows.len() + config.traps.len()) as u32,
        doorbell_count: config.doorbells.len() as u32,
        irq_count: config.irqs.len() as u32,
        ram_size: config.memory,
        image_end: image.layout.end,
        heap_start: image.layout.end.next_multiple_of(PAGE_SIZE),
        heap_end: abi::stack_guard(config.memory).0,
        stack_top: config.memory,
        tsc_khz,
        cmdline_len: config.cmdline.len() as u64,
        ..Default::default()
    };
    for (slot, window) in boot.windows.iter_mut().zip(&config.windows) {
        let mut name = [0u8; abi::NAME_LEN];
        name[..window.name.len()].copy_from_slice(window.name.as_bytes());
        *slot = WindowInfo {
            gpa: window.gpa,
            size: window.size,
            flags: if window.read_only { abi::WINDOW_READ_ONLY } else { 0 },
            reserved: 0,
            name,
        };
    }
    for (slot, trap) in boot.windows.iter_mut().skip(config.windows.len()).zip(&config.traps) {
        let mut name = [0u8; abi::NAME_LEN];
        name[..trap.name.len()].copy_from_slice(trap.name.as_bytes());
        *slot = WindowInfo { gpa: trap.gpa, size: trap.size, flags: abi::WINDOW_TRAPPED, reserved: 0, name };
    }
    for (slot, doorbell) in boot.doorbells.iter_mut().zip(&config.doorbells) {
        *slot = match doorbell.address {
            DoorbellAddress::Mmio(gpa) => DoorbellInfo { kind: abi::DOORBELL_MMIO, len: doorbell.len, addr: gpa },
            DoorbellAddress::Port(port) => {
                DoorbellInfo { kind: abi::DOORBELL_PORT, len: doorbell.len, addr: port.into() }
            }
        };
    }
    for (slot, gsi) in boot.irqs.iter_mut().zip(gsis) {
        *slot = IrqInfo { gsi: *gsi, vector: u32::from(abi::IRQ_VECTOR_BASE) + gsi };
    }
    boot
}
