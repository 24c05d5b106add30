//! x86-64 entry, interrupt stubs, port I/O and the memory primitives the
//! compiler expects.
//!
//! The vCPU starts in ring 3 (see DESIGN.md: ring 0 is emulated and about
//! 1,800x slower on kvm-pvm). Ring 0 is entered only through the stubs below,
//! which are written to run as few instructions as possible there:
//! - exceptions report themselves to the vmm and never return;
//! - interrupts set a bit in [`IRQ_PENDING`] and return (none arrives: the
//!   vmm delivers interrupt lines through [`wait_for_interrupt`]'s
//!   hypercall, not through ring 0; the stub stays for a vector nobody
//!   expects).
//!
//! The guest sleeps with one exit: [`wait_for_interrupt`] reads
//! `port::WAIT_LINES`, on which the vmm blocks until a line fires. A `hlt`
//! (and the interrupt that ended it) went through the emulated ring 0, and
//! cost a waking driver VM several hundred microseconds; now a ring-3 `hlt`
//! is a fatal #GP like any other privileged instruction.

use core::sync::atomic::{AtomicU64, Ordering};

use guest_abi::port;

/// One bit per interrupt vector from `IRQ_VECTOR_BASE`, set by the ring-0
/// interrupt stub, cleared by [`take_interrupts`].
#[no_mangle]
pub static IRQ_PENDING: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .image_header, "a"
    .balign 8
    .ascii "DRVMIMG1"
    .long {abi_version}
    .long 24
    .quad __isr_stubs

    .section .text._start, "ax"
    .global _start
_start:
    xor ebp, ebp
    and rsp, -16
    call {kernel_entry}
    ud2

    .section .text.isr, "ax"
    .balign 16
__isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    push 0
    .endif
    .byte 0x68
    .long vec
    .if vec < 32
    jmp __fatal_exception
    .else
    jmp __irq_entry
    .endif
    .set vec, vec + 1
    .endr

__fatal_exception:
    mov dx, {port_exception}
    mov eax, dword ptr [rsp]
    out dx, eax
.Lfatal_hang:
    jmp .Lfatal_hang

__irq_entry:
    push rax
    push rcx
    mov rcx, qword ptr [rsp + 16]
    sub ecx, {irq_base}
    and ecx, 63
    xor eax, eax
    bts rax, rcx
    lock or qword ptr [rip + {irq_pending}], rax
    pop rcx
    pop rax
    add rsp, 16
    iretq

    .section .text.mem, "ax"
    .global memcpy
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret

    .global memmove
memmove:
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe .Lmemmove_forward
    lea rsi, [rsi + rcx - 1]
    lea rdi, [rdi + rcx - 1]
    std
    rep movsb
    cld
    ret
.Lmemmove_forward:
    rep movsb
    ret

    .global memset
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    mov rcx, rdx
    xor eax, eax
    repe cmpsb
    je .Lmemcmp_done
    movzx eax, byte ptr [rdi - 1]
    movzx ecx, byte ptr [rsi - 1]
    sub eax, ecx
.Lmemcmp_done:
    ret
"#,
    abi_version = const guest_abi::ABI_VERSION,
    kernel_entry = sym crate::boot::kernel_entry,
    port_exception = const port::EXCEPTION,
    irq_pending = sym IRQ_PENDING,
    irq_base = const guest_abi::IRQ_VECTOR_BASE,
);

/// Writes `value` to an I/O port.
#[inline]
pub fn outl(port: u16, value: u32) {
    // SAFETY: ring-3 port I/O is allowed by the all-zero I/O bitmap the vmm
    // installs; it touches no guest memory.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

/// Writes a byte to an I/O port.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: as in `outl`.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

/// Writes a 16-bit value to an I/O port.
#[inline]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as in `outl`.
    unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") value, options(nostack, preserves_flags)) };
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed in ring 3 (CR4.TSD is clear) and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads a dword from an I/O port.
#[inline]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outl`; the value lands in a register.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags));
    }
    value
}

/// Sleeps until an interrupt line fires, unless one is already pending,
/// and marks the lines that fired in [`IRQ_PENDING`].
///
/// One exit (`port::WAIT_LINES`): the vmm blocks on the lines' eventfds. A
/// wake-up that races with the check below is not lost: a line's eventfd
/// keeps its count until the vmm reads it.
pub fn wait_for_interrupt() {
    if IRQ_PENDING.load(Ordering::Acquire) == 0 {
        let fired = inl(port::WAIT_LINES);
        IRQ_PENDING.fetch_or(u64::from(fired), Ordering::AcqRel);
    }
}

/// Consumes the pending bits in `mask`; whether any was set.
pub fn take_line(mask: u64) -> bool {
    IRQ_PENDING.fetch_and(!mask, Ordering::AcqRel) & mask != 0
}

/// Returns and clears the set of interrupts taken since the last call
/// (bit N: vector `IRQ_VECTOR_BASE + N`).
pub fn take_interrupts() -> u64 {
    IRQ_PENDING.swap(0, Ordering::AcqRel)
}
