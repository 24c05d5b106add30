//! `hoarding-vmm`: stands in for a vmm that takes memory (guest code that
//! took over its vmm, or a leak). The reflector starts it exactly as it
//! starts the real vmm, jail included; it reads the size its `--memory`
//! argument gives (as the reflector's `memory=`: `16M`, `1G`), takes that much and touches
//! every page, then holds it until its standard input closes (the
//! reflector's lifeline, as for the real vmm) and exits; with
//! `ignore-lifeline` in its `--cmdline` (the device's `driver_args`) it
//! holds it for ever instead, as a vmm its guest took over would; with
//! `spin-in-a-child` it first clones a child sharing its memory (as a
//! thread, but a process of its own) that spins for ever, while the vmm
//! itself sleeps, as one would to hide its CPU from a watch that reads the
//! vmm's own. It prints nothing: the test watches its resident memory, its
//! CPU time, or whether it outlives the reflector.
//!
//! Not a test by itself: `reflector/tests/jail.rs` starts it to check that
//! each driver VM's memory cap is its own. Never installed anywhere a real
//! deployment would use it.

use std::io::Read;

use reflector::config::parse_size;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The reflector's start-up check of a configuration (`vmm run --check`)
    // passes: there is nothing to hoard for.
    if args.iter().any(|a| a == "--check") {
        return;
    }
    let wanted = args
        .iter()
        .position(|a| a == "--memory")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| parse_size(s).ok())
        .and_then(|bytes| usize::try_from(bytes).ok());
    let Some(wanted) = wanted else {
        eprintln!("hoarding-vmm: no --memory SIZE among {args:?}");
        std::process::exit(2);
    };
    // Chunks of 1 MiB, each page written: resident, not just reserved.
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    for _ in 0..wanted.div_ceil(1 << 20) {
        hoard.push(vec![0x5a; 1 << 20]);
    }
    let cmdline = args.iter().position(|a| a == "--cmdline").and_then(|i| args.get(i + 1));
    let said = |word: &str| cmdline.is_some_and(|line| line.split(' ').any(|w| w == word));
    if said("spin-in-a-child") {
        spin_in_a_child();
    }
    // Holds it until the reflector lets go (end of file) or dies.
    let mut byte = [0u8; 1];
    while matches!(std::io::stdin().read(&mut byte), Ok(n) if n > 0) {}
    if said("ignore-lifeline") {
        loop {
            std::thread::park();
        }
    }
    drop(hoard);
}

/// Clones a child that shares this process's memory but not its thread
/// group (`CLONE_VM` without `CLONE_THREAD`, which the jail allows: it is
/// how threads start) and spins for ever; it dies with this process's
/// jail.
fn spin_in_a_child() {
    extern "C" fn spin(_: *mut libc::c_void) -> libc::c_int {
        loop {
            std::hint::spin_loop();
        }
    }
    const STACK: usize = 64 * 1024;
    let stack = Box::leak(vec![0u8; STACK].into_boxed_slice());
    // SAFETY: clone(2) through libc with a stack of STACK bytes that is
    // never freed (leaked), growing down from its end; the child runs
    // `spin`, which touches nothing of the parent's.
    let child = unsafe {
        libc::clone(spin, stack.as_mut_ptr().add(STACK).cast(), libc::CLONE_VM | libc::SIGCHLD, std::ptr::null_mut())
    };
    if child < 0 {
        eprintln!("hoarding-vmm: clone: {}", std::io::Error::last_os_error());
        std::process::exit(3);
    }
}
