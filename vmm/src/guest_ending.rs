//! What a guest's last exits say, read from its memory: the message of a
//! panic, the frame of an exception, and the backtrace of either. Guest
//! memory and registers are the guest's to set, so every value here is
//! untrusted: lengths are clamped, reads are bounds-checked by vm-memory,
//! text is sanitised, and the frame-pointer walk is bounded
//! ([`symbols::return_addresses`]). Free of the vCPU, so that the fuzz
//! target `guest_ending` runs it on any memory and registers.

use guest_abi::{self as abi, ExceptionFrame, Plain};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::outcome::{sanitize, Frame, Outcome};
use crate::symbols;

/// Page-fault error code bit: the fault was an instruction fetch.
const PF_INSTRUCTION_FETCH: u64 = 1 << 4;

/// `rip` and the return addresses on the ring-3 stack's frame-pointer
/// chain from `rbp`, in a guest of `ram_size` bytes.
pub fn backtrace(memory: &GuestMemoryMmap, ram_size: u64, rip: u64, rbp: u64) -> Vec<Frame> {
    let stack = abi::stack_guard(ram_size).1..ram_size;
    std::iter::once(rip).chain(symbols::return_addresses(memory, rbp, stack)).map(Frame::at).collect()
}

/// A guest's panic (`port::PANIC` with `length`): its message from the
/// panic buffer, and the backtrace from the panic handler's `out` at `rip`
/// (its frame chain from `rbp` leads to the caller, so `rip` is left out).
pub fn panic(memory: &GuestMemoryMmap, ram_size: u64, length: u32, rip: u64, rbp: u64) -> Outcome {
    let length = (length as usize).min(abi::PANIC_BUF_LEN);
    let mut message = vec![0u8; length];
    if memory.read_slice(&mut message, GuestAddress(abi::PANIC_BUF_GPA)).is_err() {
        message.clear();
    }
    let backtrace = backtrace(memory, ram_size, rip, rbp).into_iter().skip(1).collect();
    Outcome::Panic { message: sanitize(&message), backtrace }
}

/// A guest's exception (`port::EXCEPTION`): the frame its ring-0 stub left
/// at `rsp`; `fault_address` gives CR2, asked only for a page fault.
pub fn exception(
    memory: &GuestMemoryMmap,
    ram_size: u64,
    rsp: u64,
    rbp: u64,
    fault_address: impl FnOnce() -> u64,
) -> Outcome {
    let mut raw = [0u8; std::mem::size_of::<ExceptionFrame>()];
    let frame = match memory.read_slice(&mut raw, GuestAddress(rsp)) {
        Ok(()) => ExceptionFrame::from_bytes(&raw).unwrap_or_default(),
        Err(_) => {
            return Outcome::InternalError {
                reason: format!("exception reported with an unreadable stack at {rsp:#x}"),
            }
        }
    };
    let fault_address = (frame.vector == 14).then(fault_address);
    let (guard_start, guard_end) = abi::stack_guard(ram_size);
    let stack_overflow = fault_address.is_some_and(|address| (guard_start..guard_end).contains(&address));
    Outcome::Exception {
        vector: frame.vector,
        name: abi::exception_name(frame.vector).into(),
        rip: frame.rip,
        error_code: frame.error_code,
        fault_address,
        ring: (frame.cs & 3) as u8,
        // Filled in by the caller, which holds the image.
        location: None,
        stack_overflow,
        backtrace: exception_backtrace(memory, ram_size, &frame, rbp),
    }
}

/// The backtrace of an exception. The stubs leave rbp alone: it is the
/// faulting code's. A fetch that faulted (a call through a bad pointer)
/// has not built a frame yet: its caller's return address is at the top
/// of the stack.
fn exception_backtrace(memory: &GuestMemoryMmap, ram_size: u64, frame: &ExceptionFrame, rbp: u64) -> Vec<Frame> {
    let mut frames = backtrace(memory, ram_size, frame.rip, rbp);
    let stack = abi::stack_guard(ram_size).1..ram_size;
    let fetch = frame.vector == 14 && frame.error_code & PF_INSTRUCTION_FETCH != 0;
    if fetch && stack.contains(&frame.rsp) {
        let mut raw = [0u8; 8];
        if memory.read_slice(&mut raw, GuestAddress(frame.rsp)).is_ok() {
            frames.insert(1, Frame::at(u64::from_le_bytes(raw)));
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 1 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn write_frame(memory: &GuestMemoryMmap, at: u64, frame: ExceptionFrame) {
        let words = [frame.vector, frame.error_code, frame.rip, frame.cs, frame.rflags, frame.rsp, frame.ss];
        let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
        memory.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    #[test]
    fn a_panic_message_is_clamped_to_its_buffer_and_sanitized() {
        let memory = memory();
        memory.write_slice(b"oops\x1b[2J", GuestAddress(abi::PANIC_BUF_GPA)).unwrap();
        let Outcome::Panic { message, backtrace } = panic(&memory, RAM, u32::MAX, 0x10_0000, 0) else { panic!() };
        assert!(message.starts_with("oops\\u{1b}[2J"), "{message:?}");
        assert_eq!(message.len(), "oops\\u{1b}[2J".len() + (abi::PANIC_BUF_LEN - 8) * "\\u{0}".len());
        assert!(backtrace.is_empty(), "{backtrace:?}");
    }

    #[test]
    fn a_faulted_fetch_names_its_caller_and_a_fault_in_the_guard_a_stack_overflow() {
        let memory = memory();
        let stack = abi::stack_guard(RAM).1;
        memory.write_slice(&0x10_2222u64.to_le_bytes(), GuestAddress(stack + 0x100)).unwrap();
        let frame = ExceptionFrame {
            vector: 14,
            error_code: PF_INSTRUCTION_FETCH,
            rip: 0xdead,
            rsp: stack + 0x100,
            ..Default::default()
        };
        write_frame(&memory, 0x9000, frame);
        let guard = abi::stack_guard(RAM).0;
        let Outcome::Exception { backtrace, fault_address, stack_overflow, .. } =
            exception(&memory, RAM, 0x9000, 0, || guard + 8)
        else {
            panic!()
        };
        assert_eq!(backtrace.iter().map(|f| f.address).collect::<Vec<_>>(), [0xdead, 0x10_2222]);
        assert_eq!((fault_address, stack_overflow), (Some(guard + 8), true));
    }

    #[test]
    fn an_exception_frame_past_memory_is_an_internal_error_and_cr2_is_read_only_for_a_page_fault() {
        let memory = memory();
        let outcome = exception(&memory, RAM, RAM - 8, 0, || unreachable!("CR2 read for no frame"));
        assert!(matches!(outcome, Outcome::InternalError { .. }), "{outcome:?}");
        write_frame(&memory, 0x9000, ExceptionFrame { vector: 13, ..Default::default() });
        let outcome = exception(&memory, RAM, 0x9000, 0, || unreachable!("CR2 read for a general protection fault"));
        assert!(matches!(outcome, Outcome::Exception { fault_address: None, stack_overflow: false, .. }));
    }
}
