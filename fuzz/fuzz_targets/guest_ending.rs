//! What the vmm reads from a guest that ends (`vmm::guest_ending`): the
//! panic message in the panic buffer, the exception frame at the guest's
//! `rsp`, and the backtrace along its frame-pointer chain, all guest
//! memory and registers the fuzzer sets; then the report line the vmm
//! prints, with any source location, as the reflector reads it
//! (`supervisor::crash_site`).
//!
//! Besides "no panic": the walk is bounded, the message carries no
//! control characters, a stack overflow is claimed only for a fault in
//! the guard page, and the report stays one JSON line whatever the guest
//! wrote (the reflector takes the last line a vmm prints as its report).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::guest_ending;
use vmm::outcome::{Outcome, Report};
use vmm::symbols::{Location, MAX_FRAMES};

#[derive(Arbitrary, Debug)]
struct Ending {
    /// RAM of 1 to 8 MiB (a driver VM's is a few).
    ram_mib: u8,
    exception: bool,
    length: u32,
    rip: u64,
    /// Below the top of RAM by this much, or (top bit set) as it is: the
    /// fuzzer reaches the stack without guessing its address.
    rbp: u64,
    rsp: u64,
    cr2: u64,
    panic_buffer: Vec<u8>,
    /// Written at the top of RAM: frames, return addresses.
    stack: Vec<u8>,
    /// Written at `rsp`: the exception frame.
    frame: Vec<u8>,
    /// Where an exception is said to be, as an image's line tables could
    /// name it (any bytes: the image is the driver's too).
    function: Option<String>,
    file: String,
    line: u32,
}

/// `value` below the top of RAM (within the top 512 KiB: the ring-3 stack
/// and what is under it), or, with its top bit set, as it is.
fn near_top(value: u64, ram_size: u64) -> u64 {
    if value >> 63 == 1 {
        value
    } else {
        ram_size.wrapping_sub(value % (512 << 10))
    }
}

fuzz_target!(|ending: Ending| {
    let ram_size = (u64::from(ending.ram_mib % 8) + 1) << 20;
    let Ok(memory) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram_size as usize)]) else { return };
    let (rbp, rsp) = (near_top(ending.rbp, ram_size), near_top(ending.rsp, ram_size));
    let buffer = &ending.panic_buffer[..ending.panic_buffer.len().min(guest_abi::PANIC_BUF_LEN)];
    memory.write_slice(buffer, GuestAddress(guest_abi::PANIC_BUF_GPA)).expect("the panic buffer is in RAM");
    let stack = &ending.stack[..ending.stack.len().min(512 << 10)];
    memory.write_slice(stack, GuestAddress(ram_size - stack.len() as u64)).expect("the stack is in RAM");
    if rsp < ram_size {
        let frame = &ending.frame[..ending.frame.len().min((ram_size - rsp) as usize)];
        memory.write_slice(frame, GuestAddress(rsp)).expect("checked to fit");
    }

    let mut outcome = if ending.exception {
        guest_ending::exception(&memory, ram_size, rsp, rbp, || ending.cr2)
    } else {
        guest_ending::panic(&memory, ram_size, ending.length, ending.rip, rbp)
    };
    if let Outcome::Exception { location, .. } = &mut outcome {
        *location = Some(Location { function: ending.function.clone(), file: ending.file.clone(), line: ending.line });
    }
    match &outcome {
        Outcome::Panic { message, backtrace } => {
            assert!(backtrace.len() <= MAX_FRAMES, "{} frames", backtrace.len());
            assert!(!message.chars().any(|c| c.is_control() && c != '\t'), "control characters kept: {message:?}");
        }
        Outcome::Exception { backtrace, fault_address, stack_overflow, .. } => {
            // rip, the walk, and a faulted fetch's caller.
            assert!(backtrace.len() <= MAX_FRAMES + 2, "{} frames", backtrace.len());
            let guard = guest_abi::stack_guard(ram_size);
            if *stack_overflow {
                assert!(fault_address.is_some_and(|a| (guard.0..guard.1).contains(&a)), "{fault_address:?}");
            }
        }
        Outcome::InternalError { .. } => assert!(ending.exception, "a panic read as {outcome:?}"),
        other => panic!("an ending read as {other:?}"),
    }

    let report = Report { name: "d0".into(), outcome, ready_us: None, elapsed_us: 1, build_id: None };
    let line = serde_json::to_string(&report).expect("a report serializes");
    assert!(!line.contains('\n'), "the report is not one line");
    let _: serde_json::Value = serde_json::from_str(&line).expect("the report is JSON");
    let site = reflector::supervisor::crash_site(&line);
    if let Outcome::Exception { .. } = report.outcome {
        let site = site.unwrap_or_else(|| panic!("no crash site taken from {line}"));
        assert!(!site.chars().any(char::is_control), "control characters kept: {site:?}");
        assert!(site.chars().count() <= 3 * 200 + 64, "unbounded: {} characters", site.chars().count());
    }
});
