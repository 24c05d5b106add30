//! x86-64 system state for a vCPU that starts in ring 3: GDT, TSS with an
//! all-zero I/O permission bitmap, IDT pointing at the image's stubs,
//! identity page tables, and the initial registers.
//!
//! Why ring 3: on kvm-pvm guest ring 0 is emulated (about 1,800x slower), so
//! the guest runs its code in ring 3 and enters ring 0 only through
//! exceptions and interrupts. Ring 3 cannot load an IDT or a task register,
//! so the vmm does it here (see DESIGN.md, "A ring-3 boot").

use guest_abi as abi;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::PAGE_SIZE;
use crate::error::{Error, Result};

/// Size of the 64-bit TSS proper.
const TSS_SIZE: u64 = 104;
/// One bit per I/O port.
const IO_BITMAP_SIZE: u64 = 65536 / 8;
/// TSS limit: TSS, bitmap and the all-ones terminator byte the CPU requires.
const TSS_LIMIT: u64 = TSS_SIZE + IO_BITMAP_SIZE;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IF: u64 = 1 << 9;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const PTE_NO_EXECUTE: u64 = 1 << 63;
const HUGE_PAGE: u64 = 2 << 20;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

fn write_u64(memory: &GuestMemoryMmap, gpa: u64, value: u64) -> Result<()> {
    memory
        .write_slice(&value.to_le_bytes(), GuestAddress(gpa))
        .map_err(|e| Error::invalid("guest memory", format!("writing at {gpa:#x}: {e}")))
}

fn read_u64(memory: &GuestMemoryMmap, gpa: u64) -> Result<u64> {
    let mut raw = [0u8; 8];
    memory
        .read_slice(&mut raw, GuestAddress(gpa))
        .map_err(|e| Error::invalid("guest memory", format!("reading at {gpa:#x}: {e}")))?;
    Ok(u64::from_le_bytes(raw))
}

/// The GDT: null, kernel code and data, user data and code (in the order
/// `syscall`/`sysret` expect), and the TSS descriptor.
fn gdt_entries() -> [u64; 7] {
    let base = abi::TSS_GPA;
    let tss_low = (TSS_LIMIT & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40) // present, DPL 0, type 0xb: busy 64-bit TSS
        | (((TSS_LIMIT >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code64, DPL 0
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00cf_f300_0000_ffff, // 0x18 user data, DPL 3 (selector 0x1b)
        0x00af_fb00_0000_ffff, // 0x20 user code64, DPL 3 (selector 0x23)
        tss_low,
        base >> 32,
    ]
}

/// Writes the GDT, the TSS and the IDT.
pub fn write_system_tables(memory: &GuestMemoryMmap, isr_stubs: u64) -> Result<()> {
    for (i, entry) in gdt_entries().iter().enumerate() {
        write_u64(memory, abi::GDT_GPA + 8 * i as u64, *entry)?;
    }
    // TSS: RSP0 at offset 4, IST1 at 36, I/O map base at 102. The bitmap
    // after it stays zero (RAM starts zeroed): every port is allowed, which
    // the ring-3 hypercalls and port doorbells need.
    write_u64(memory, abi::TSS_GPA + 4, abi::RING0_STACK_TOP)?;
    write_u64(memory, abi::TSS_GPA + 36, abi::DOUBLE_FAULT_STACK_TOP)?;
    memory
        .write_slice(&(TSS_SIZE as u16).to_le_bytes(), GuestAddress(abi::TSS_GPA + 102))
        .and_then(|_| memory.write_slice(&[0xff], GuestAddress(abi::TSS_GPA + TSS_LIMIT)))
        .map_err(|e| Error::invalid("guest memory", format!("writing the TSS: {e}")))?;
    for vector in 0..abi::ISR_COUNT {
        let handler = isr_stubs + vector * abi::ISR_STUB_STRIDE;
        let ist = if vector == 8 { 1 } else { 0 };
        let low = (handler & 0xffff)
            | (u64::from(abi::KERNEL_CS) << 16)
            | (ist << 32)
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate (clears IF)
            | (((handler >> 16) & 0xffff) << 48);
        write_u64(memory, abi::IDT_GPA + 16 * vector, low)?;
        write_u64(memory, abi::IDT_GPA + 16 * vector + 8, handler >> 32)?;
    }
    Ok(())
}

/// What the guest may do with a mapped range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Ring 3 may reach it (else only the ring-0 stubs and the CPU itself).
    pub user: bool,
    /// Writes are allowed.
    pub writable: bool,
    /// Instructions may be fetched from it.
    pub executable: bool,
}

impl Access {
    /// Ring-3 data: heap, stack, windows, doorbells.
    pub const USER_DATA: Access = Access { user: true, writable: true, executable: false };
    /// Ring-3 read-only data (boot information, read-only windows, constants).
    pub const USER_READ_ONLY: Access = Access { user: true, writable: false, executable: false };
    /// The image's code.
    pub const USER_CODE: Access = Access { user: true, writable: false, executable: true };
    /// Kernel structures ring 3 must not reach: GDT, IDT, TSS, ring-0
    /// stacks, page tables.
    pub const SUPERVISOR: Access = Access { user: false, writable: true, executable: false };

    fn leaf_bits(self) -> u64 {
        PTE_PRESENT
            | if self.user { PTE_USER } else { 0 }
            | if self.writable { PTE_WRITABLE } else { 0 }
            | if self.executable { 0 } else { PTE_NO_EXECUTE }
    }
}

/// Identity page tables built in the page-table area of guest RAM.
pub struct PageTables<'a> {
    memory: &'a GuestMemoryMmap,
    next_free: u64,
}

impl<'a> PageTables<'a> {
    /// Starts with an empty PML4 at `PAGE_TABLES_GPA`.
    pub fn new(memory: &'a GuestMemoryMmap) -> Self {
        PageTables { memory, next_free: abi::PAGE_TABLES_GPA + PAGE_SIZE }
    }

    /// CR3 value.
    pub fn root(&self) -> u64 {
        abi::PAGE_TABLES_GPA
    }

    /// Maps `[start, end)` to itself with 2 MiB pages where aligned, 4 KiB
    /// pages elsewhere, with `access`. Intermediate tables allow everything:
    /// the leaf decides.
    pub fn map(&mut self, start: u64, end: u64, access: Access) -> Result<()> {
        let leaf = access.leaf_bits();
        let mut addr = start;
        while addr < end {
            let pdpt = self.child(self.root(), (addr >> 39) & 0x1ff)?;
            let pd = self.child(pdpt, (addr >> 30) & 0x1ff)?;
            if addr.is_multiple_of(HUGE_PAGE) && end - addr >= HUGE_PAGE {
                write_u64(self.memory, pd + 8 * ((addr >> 21) & 0x1ff), addr | leaf | PTE_HUGE)?;
                addr += HUGE_PAGE;
            } else {
                let pt = self.child(pd, (addr >> 21) & 0x1ff)?;
                write_u64(self.memory, pt + 8 * ((addr >> 12) & 0x1ff), addr | leaf)?;
                addr += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// The table that entry `index` of `table` points to, allocated if absent.
    fn child(&mut self, table: u64, index: u64) -> Result<u64> {
        let entry_gpa = table + 8 * index;
        let entry = read_u64(self.memory, entry_gpa)?;
        if entry & PTE_PRESENT != 0 {
            return Ok(entry & ADDRESS_MASK);
        }
        if self.next_free >= abi::PAGE_TABLES_END {
            return Err(Error::invalid(
                "memory layout",
                "the page tables do not fit in their area: align windows to 2 MiB or use fewer of them",
            ));
        }
        let new = self.next_free;
        self.next_free += PAGE_SIZE;
        write_u64(self.memory, entry_gpa, new | PTE_PRESENT | PTE_WRITABLE | PTE_USER)?;
        Ok(new)
    }
}

fn segment(selector: u16, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 }, // execute/read or read/write, accessed
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Special registers: long mode, paging, SSE, ring-3 segments, GDT/IDT/TR.
pub fn sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    sregs.cs = segment(abi::USER_CS, 3, true);
    let data = segment(abi::USER_DS, 3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: abi::TSS_GPA,
        limit: TSS_LIMIT as u32,
        selector: abi::TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment { type_: 0x2, present: 1, limit: 0xffff, unusable: 1, ..Default::default() };
    sregs.gdt.base = abi::GDT_GPA;
    sregs.gdt.limit = (gdt_entries().len() * 8 - 1) as u16;
    sregs.idt.base = abi::IDT_GPA;
    sregs.idt.limit = (abi::ISR_COUNT * 16 - 1) as u16;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    sregs
}

/// General registers at the first instruction: `rdi` = boot information.
pub fn regs(entry: u64, stack_top: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top,
        rdi: abi::BOOT_INFO_GPA,
        rflags: RFLAGS_RESERVED | RFLAGS_IF,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// Walks the tables like the MMU: returns the leaf entry for `addr`.
    fn translate(memory: &GuestMemoryMmap, cr3: u64, addr: u64) -> Option<u64> {
        let mut table = cr3;
        for (level, shift) in [39u64, 30, 21, 12].iter().enumerate() {
            let entry = read_u64(memory, table + 8 * ((addr >> shift) & 0x1ff)).unwrap();
            if entry & PTE_PRESENT == 0 {
                return None;
            }
            if level == 3 || (level == 2 && entry & PTE_HUGE != 0) {
                return Some(entry);
            }
            table = entry & ADDRESS_MASK;
        }
        None
    }

    #[test]
    fn page_tables_map_exactly_what_was_asked() {
        let memory = memory();
        let mut tables = PageTables::new(&memory);
        tables.map(0x1000, 4 << 20, Access::USER_DATA).unwrap();
        tables.map(0x4000_0000, 0x4000_3000, Access::USER_READ_ONLY).unwrap();
        tables.map(0x5000_0000, 0x5000_1000, Access::USER_CODE).unwrap();
        tables.map(0x6000_0000, 0x6000_1000, Access::SUPERVISOR).unwrap();
        let cr3 = tables.root();
        assert_eq!(translate(&memory, cr3, 0), None, "null page must stay unmapped");
        let low = translate(&memory, cr3, 0x1000).unwrap();
        assert_eq!(low & ADDRESS_MASK, 0x1000);
        assert_ne!(low & PTE_USER, 0);
        let huge = translate(&memory, cr3, 0x30_0000).unwrap();
        assert_ne!(huge & PTE_HUGE, 0);
        let window = translate(&memory, cr3, 0x4000_2000).unwrap();
        assert_eq!(window & PTE_WRITABLE, 0, "read-only window must not be writable");
        assert_ne!(window & PTE_NO_EXECUTE, 0, "data must not be executable");
        let code = translate(&memory, cr3, 0x5000_0000).unwrap();
        assert_eq!(code & (PTE_WRITABLE | PTE_NO_EXECUTE), 0, "code: executable, not writable");
        let kernel = translate(&memory, cr3, 0x6000_0000).unwrap();
        assert_eq!(kernel & PTE_USER, 0, "kernel structures are supervisor-only");
        assert_eq!(translate(&memory, cr3, 0x4000_3000), None);
        assert_eq!(translate(&memory, cr3, 4 << 20), None);
    }

    #[test]
    fn page_table_area_exhaustion_is_an_error() {
        let memory = memory();
        let mut tables = PageTables::new(&memory);
        // 4 KiB pages spread one per 2 MiB region need one table each.
        let mut result = Ok(());
        for i in 0..1000u64 {
            result = tables.map(0x4000_0000 + i * HUGE_PAGE, 0x4000_1000 + i * HUGE_PAGE, Access::USER_DATA);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(Error::InvalidValue { .. })));
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let gdt = gdt_entries();
        let low = gdt[5];
        assert_eq!(low & 0xffff, TSS_LIMIT & 0xffff);
        assert_eq!((low >> 16) & 0xff_ffff, abi::TSS_GPA);
        assert_eq!((low >> 40) & 0xff, 0x8b);
        assert_eq!(gdt[(abi::USER_CS >> 3) as usize] >> 45 & 3, 3, "user code DPL");
    }
}
