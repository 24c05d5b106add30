//! Hosted mode: the same driver, as a Linux process.
//!
//! The vmm's `--hosted` start (`vmm run --hosted`, or the reflector's
//! `hosted=on`) gives the driver the resources a driver VM would get, as
//! descriptors and a command line:
//!
//! ```text
//! DRIVER [--cmdline WORDS] [--memory BYTES]
//!        [--window name=NAME,gpa=GPA,size=SIZE,fd=FD[,ro]]...
//!        [--doorbell fd=FD]... [--irq fd=FD]... [--go fd=FD]
//! ```
//!
//! Windows are mapped from their descriptors (shared, so the device and
//! the reflector see every write); a window keeps its guest-physical
//! address as [`Window::addr`](crate::device::Window::addr), which is what
//! the device's DMA uses. Doorbells and interrupt lines are eventfds. Unit
//! tests build a [`Kernel`] from memory of their own with [`Kernel::hosted`].
//!
//! What it is not: isolated. A hosted driver is an ordinary process with
//! the reflector's device memory mapped; it is for developing and debugging
//! (gdb, `println!`), never for an untrusted driver.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use guest_abi::{BootInfo, IrqInfo, WindowInfo, IRQ_VECTOR_BASE, MAX_DOORBELLS, MAX_IRQS, MAX_WINDOWS, NAME_LEN};

use crate::boot::Kernel;

/// One window of a hosted driver.
#[derive(Clone, Debug)]
pub struct HostedWindow {
    /// The name the driver looks it up by.
    pub name: String,
    /// Its guest-physical address: what the device's DMA uses.
    pub gpa: u64,
    /// Where this process reaches it.
    pub base: *mut u8,
    /// Its size in bytes.
    pub size: u64,
    /// Writes are refused (by the mapping's protection).
    pub read_only: bool,
}

/// What a hosted driver is given.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    /// The driver's command line.
    pub cmdline: String,
    /// What [`Kernel::ram_size`] answers.
    pub ram_size: u64,
    /// Windows, in order.
    pub windows: Vec<HostedWindow>,
    /// Doorbell eventfds, in order.
    pub doorbells: Vec<i32>,
    /// Interrupt line eventfds, in order.
    pub irqs: Vec<i32>,
    /// A warm spare's go eventfd ([`Kernel::wait_for_go`]).
    pub go: Option<i32>,
}

/// The hosted part of a [`Kernel`].
pub(crate) struct Mapped {
    pub(crate) cmdline: String,
    pub(crate) window_bases: Vec<u64>,
    pub(crate) doorbells: Vec<i32>,
    pub(crate) go: Option<i32>,
}

impl Kernel {
    /// A kernel over `resources`; its interrupt lines become this thread's.
    /// Refuses more windows, doorbells or lines than a driver VM can have,
    /// and names longer than a driver VM's.
    pub fn hosted(resources: Resources) -> Result<Kernel, String> {
        if resources.windows.len() > MAX_WINDOWS || resources.doorbells.len() > MAX_DOORBELLS {
            return Err(format!("at most {MAX_WINDOWS} windows and {MAX_DOORBELLS} doorbells"));
        }
        if resources.irqs.len() > MAX_IRQS {
            return Err(format!("at most {MAX_IRQS} interrupt lines"));
        }
        let mut boot = BootInfo {
            magic: guest_abi::BOOT_MAGIC,
            abi_version: guest_abi::ABI_VERSION,
            window_count: resources.windows.len() as u32,
            doorbell_count: resources.doorbells.len() as u32,
            irq_count: resources.irqs.len() as u32,
            ram_size: resources.ram_size,
            cmdline_len: resources.cmdline.len() as u64,
            ..Default::default()
        };
        for (slot, window) in boot.windows.iter_mut().zip(&resources.windows) {
            if window.name.len() > NAME_LEN {
                return Err(format!("window name {:?} is longer than {NAME_LEN} bytes", window.name));
            }
            let mut name = [0u8; NAME_LEN];
            name[..window.name.len()].copy_from_slice(window.name.as_bytes());
            let flags = if window.read_only { guest_abi::WINDOW_READ_ONLY } else { 0 };
            *slot = WindowInfo { gpa: window.gpa, size: window.size, flags, reserved: 0, name };
        }
        let mut lines = Vec::new();
        for (index, (slot, fd)) in boot.irqs.iter_mut().zip(&resources.irqs).enumerate() {
            *slot = IrqInfo { gsi: index as u32, vector: u32::from(IRQ_VECTOR_BASE) + index as u32 };
            lines.push((*fd, 1u64 << index));
        }
        crate::arch::set_lines(lines);
        let hosted = Mapped {
            cmdline: resources.cmdline,
            window_bases: resources.windows.iter().map(|window| window.base as u64).collect(),
            doorbells: resources.doorbells,
            go: resources.go,
        };
        Ok(Kernel { boot, hosted })
    }
}

/// Blocks until eventfd `fd` is signalled, and consumes it (a warm
/// spare's go).
pub(crate) fn wait_readable(fd: i32) {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one pollfd of a descriptor this process was given; a
    // bad one fails and the spare goes on.
    while unsafe { libc::poll(&mut pollfd, 1, -1) } < 0
        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    {}
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a local from the descriptor.
    unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
}

/// Signals eventfd `fd` once (a doorbell rung).
pub(crate) fn signal(fd: i32) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a local to a descriptor; a bad one fails.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Parses a number: decimal or 0x-hexadecimal.
fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// A window or descriptor argument: `key=value` pairs and bare flags.
fn pairs(text: &str) -> Vec<(&str, &str)> {
    text.split(',').map(|part| part.split_once('=').unwrap_or((part, ""))).collect()
}

/// Parses the hosted command line (module docs); windows are not mapped
/// yet: `(resources, (fd, offset) per window)`.
pub fn parse_args(args: &[String]) -> Result<(Resources, Vec<(i32, u64)>), String> {
    let mut resources = Resources { ram_size: 16 << 20, ..Default::default() };
    let mut fds = Vec::new();
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let fd_of = |pairs: &[(&str, &str)]| -> Result<i32, String> {
            let fd = pairs.iter().find(|(key, _)| *key == "fd").and_then(|(_, v)| v.parse::<i32>().ok());
            fd.filter(|fd| *fd > 2).ok_or_else(|| format!("{flag} {value}: expected fd=N (above 2)"))
        };
        match flag.as_str() {
            "--cmdline" => resources.cmdline = value.clone(),
            "--memory" => resources.ram_size = number(value).ok_or_else(|| format!("--memory {value}: a number"))?,
            "--doorbell" => resources.doorbells.push(fd_of(&pairs(value))?),
            "--irq" => resources.irqs.push(fd_of(&pairs(value))?),
            "--go" => resources.go = Some(fd_of(&pairs(value))?),
            "--window" => {
                let pairs = pairs(value);
                let get = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
                let bad = || format!("--window {value}: expected name=NAME,gpa=GPA,size=SIZE,fd=FD[,offset=N][,ro]");
                let offset = match get("offset") {
                    Some(offset) => number(offset).filter(|o| o % 4096 == 0).ok_or_else(bad)?,
                    None => 0,
                };
                let size = get("size").and_then(number).filter(|size| *size > 0).ok_or_else(bad)?;
                resources.windows.push(HostedWindow {
                    name: get("name").ok_or_else(bad)?.to_string(),
                    gpa: get("gpa").and_then(number).ok_or_else(bad)?,
                    base: core::ptr::null_mut(),
                    size,
                    read_only: get("ro").is_some(),
                });
                fds.push((fd_of(&pairs)?, offset));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((resources, fds))
}

/// Maps window descriptor `fd` from `offset` (shared).
fn map(fd: i32, offset: u64, window: &HostedWindow) -> Result<*mut u8, String> {
    let protection = if window.read_only { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
    // SAFETY: maps `size` bytes of a descriptor this process was given; the
    // kernel picks the address; the mapping lives as long as the process.
    let base = unsafe {
        libc::mmap(core::ptr::null_mut(), window.size as usize, protection, libc::MAP_SHARED, fd, offset as libc::off_t)
    };
    if base == libc::MAP_FAILED {
        let error = std::io::Error::last_os_error();
        return Err(format!("mapping window {:?} (fd {fd}, {} bytes): {error}", window.name, window.size));
    }
    Ok(base.cast())
}

/// The hosted process's start: parses its command line, maps its windows,
/// runs `main`, and exits with its code (status 2 and a message if the
/// command line is wrong).
pub fn start(main: fn(&Kernel) -> u32) -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kernel = parse_args(&args).and_then(|(mut resources, fds)| {
        for (window, (fd, offset)) in resources.windows.iter_mut().zip(fds) {
            window.base = map(fd, offset, window)?;
        }
        Kernel::hosted(resources)
    });
    match kernel {
        Ok(kernel) => crate::exit(main(&kernel)),
        Err(error) => {
            let program = std::env::args().next().unwrap_or_default();
            std::eprintln!("{program}: {error}");
            std::eprintln!("usage: {program} [--cmdline WORDS] [--memory BYTES] [--window name=NAME,gpa=GPA,size=SIZE,fd=FD[,offset=N][,ro]]... [--doorbell fd=FD]... [--irq fd=FD]... [--go fd=FD]");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn the_command_line_names_every_resource() {
        let (resources, fds) = parse_args(&strings(&[
            "--cmdline",
            "a b",
            "--window",
            "name=channel,gpa=0x40000000,size=4096,fd=5",
            "--window",
            "name=regs,gpa=0x50000000,size=0x2000,fd=6,ro,offset=0x1000",
            "--doorbell",
            "fd=7",
            "--irq",
            "fd=8",
            "--go",
            "fd=9",
        ]))
        .unwrap();
        assert_eq!(resources.go, Some(9));
        assert_eq!(resources.cmdline, "a b");
        assert_eq!(fds, vec![(5, 0), (6, 0x1000)]);
        assert_eq!(resources.windows[1].size, 0x2000);
        assert!(resources.windows[1].read_only && !resources.windows[0].read_only);
        assert_eq!((resources.doorbells.clone(), resources.irqs.clone()), (vec![7], vec![8]));
    }

    #[test]
    fn a_spare_goes_once_its_go_eventfd_is_written_and_consumes_it() {
        // SAFETY: eventfd(2) with valid flags; the descriptor is closed below.
        let go = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(go >= 0);
        let kernel = Kernel::hosted(Resources { go: Some(go), ..Default::default() }).unwrap();
        signal(go);
        kernel.wait_for_go();
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a local from our own eventfd.
        let left = unsafe { libc::read(go, (&mut count as *mut u64).cast(), 8) };
        assert_eq!(left, -1, "the go signal was not consumed");
        // Without a go signal, a kernel goes at once.
        Kernel::hosted(Resources::default()).unwrap().wait_for_go();
        // SAFETY: closes the descriptor opened above.
        unsafe { libc::close(go) };
    }

    #[test]
    fn bad_arguments_are_errors_that_say_what_is_expected() {
        for (args, expected) in [
            (vec!["--window", "name=x,gpa=1,fd=5"], "expected name=NAME"),
            (vec!["--irq", "fd=1"], "above 2"),
            (vec!["--bogus", "1"], "unknown argument"),
            (vec!["--cmdline"], "needs a value"),
        ] {
            let error = parse_args(&strings(&args)).unwrap_err();
            assert!(error.contains(expected), "{args:?}: {error}");
        }
        let windows = vec![HostedWindow {
            name: "much-too-long-a-window-name".into(),
            gpa: 0,
            base: core::ptr::null_mut(),
            size: 1,
            read_only: false,
        }];
        assert!(Kernel::hosted(Resources { windows, ..Default::default() }).is_err());
    }
}
