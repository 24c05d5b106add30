//! The `vmm` command line.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use kvm_ioctls::Kvm;

use vmm::config::{parse_number, DoorbellConfig, IrqConfig, TrapConfig, VmConfig, WindowConfig, DEFAULT_MEMORY};
use vmm::console::{Console, ConsoleSink};
use vmm::error::status;
use vmm::outcome::{ErrorReport, Report};
use vmm::runner::{self, RunOptions};
use vmm::{bench, image, Error, Image, Vm};

const RUN_EXAMPLES: &str = "\
Examples:
  vmm run --image hello
  vmm run --image faulty --cmdline page-fault --json
  vmm run --image ./my-driver.elf --memory 32M --timeout 2s \\
      --window 0x40000000,64K,/sys/bus/pci/devices/0000:01:00.0/resource0,name=regs \\
      --window 0x40100000,1M,/dev/shm/channel,name=channel \\
      --doorbell mmio=0x40200000,fd=5 --irq fd=6 --ready-fd 7

Exit status:
  0   the guest exited with code 0          10  the guest panicked
  1   the guest exited with another code    11  the guest took an exception
  2   command-line syntax error             12  the guest triple-faulted
                                            13  KVM internal error
                                            14  timeout (or halted for good)
                                            15  invalid access (address or port not given)
                                            16  stopped at the supervisor's request (`w` on stdin)
  20  image not found        21  not a valid image      22  image larger than RAM
  23  overlapping ranges     24  unaligned value        25  window file unusable
  26  invalid value          27  KVM unavailable/error  28  other I/O error

With --json, one line on stdout reports the outcome: {\"outcome\": \"exit\" | \"panic\" |
\"exception\" | \"triple_fault\" | \"internal_error\" | \"timeout\" | \"invalid_access\" |
\"halted\" | \"stopped\" | \"setup_error\", ...}, with the image's \"build_id\" (a command line
refused as syntax is a setup_error of kind \"usage\", status 2); crashes carry
\"location\" (function, file, line) and \"backtrace\" (frame-pointer chain, symbolised).";

/// A small KVM VMM for driver VMs.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a driver VM image and report how it ended.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// List the built-in images.
    Images,
    /// Measure boot times: process spawn to guest ready, and in-process VM re-create.
    Bench(bench::BenchArgs),
    /// Name the source location of guest addresses in an image (from its
    /// line tables): one line per address, `ADDRESS<tab>LOCATION` (`?`
    /// where it has none). Profilers give a driver VM's guest time as bare
    /// addresses (`perf kvm --guest`); `ci/profile.sh` names them with this.
    Locate(LocateArgs),
    /// Create a driver crate of your own (outside this repository), started
    /// from the vmdisk sample: `cargo test`, `cargo image`, then serve it
    /// with the reflector's driver=PATH (docs/writing-a-driver.md).
    NewDriver(NewDriverArgs),
}

#[derive(Args, Debug)]
struct LocateArgs {
    /// Built-in image name (see `vmm images`) or path to an image ELF file.
    /// Example: --image net
    #[arg(long, value_name = "NAME|PATH")]
    image: String,
    /// Guest addresses, hex with 0x or decimal; without any, they are read
    /// from standard input (whitespace-separated). Example: 0x102b51
    #[arg(value_name = "ADDRESS")]
    addresses: Vec<String>,
    /// Also the driver's own functions each place was inlined into,
    /// innermost first, joined by ` < ` (a doorbell's write inlined into
    /// two callers is then two places).
    #[arg(long)]
    inlined: bool,
}

#[derive(Args, Debug)]
struct NewDriverArgs {
    /// The driver's name (lower-case letters, digits, - and _): the crate,
    /// its directory and its image. Example: mydisk
    name: String,
    /// Where to create its directory. Example: --dir ~/drivers
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// The SDK (a checkout of this project; default: the one this vmm was
    /// built from). Example: --sdk ~/src/driver-vms
    #[arg(long)]
    sdk: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Built-in image name (see `vmm images`) or path to an image ELF file.
    /// Example: --image hello
    #[arg(long, value_name = "NAME|PATH")]
    image: String,
    /// Guest RAM, with optional K/M/G suffix; pages are only allocated when
    /// touched. Example: --memory 32M
    #[arg(long, value_name = "SIZE", default_value_t = format!("{}M", DEFAULT_MEMORY >> 20))]
    memory: String,
    /// Map a file at a guest physical address: GPA,SIZE,PATH[,offset=N][,ro][,name=NAME].
    /// Page-aligned, outside RAM. Repeatable.
    /// Example: --window 0x40000000,64K,/dev/shm/regs,name=regs
    #[arg(long, value_name = "SPEC")]
    window: Vec<String>,
    /// A window no memory backs: every guest access to it exits, and the
    /// vmm forwards it over an inherited socket (a device BAR the
    /// supervisor mediates): GPA,SIZE,fd=N[,name=NAME][,posted=OFFSET:FD]...
    /// A posted register's writes signal eventfd FD in KVM instead (a
    /// doorbell whose value the driver leaves in memory). Repeatable.
    /// Example: --trap 0x20000000,16K,fd=8,name=regs,posted=0x1008:9
    #[arg(long, value_name = "SPEC")]
    trap: Vec<String>,
    /// Bind an MMIO address or I/O port to an inherited eventfd (KVM
    /// ioeventfd): mmio=GPA|port=PORT,fd=N[,len=1|2|4|8][,datamatch=V]. Repeatable.
    /// Example: --doorbell mmio=0x40200000,fd=5
    #[arg(long, value_name = "SPEC")]
    doorbell: Vec<String>,
    /// Add an interrupt line raised by writing an inherited eventfd (the
    /// guest's sleep, port::WAIT_LINES, returns with its bit): fd=N. The
    /// guest sees lines in the order given. Repeatable.
    /// Example: --irq fd=6
    #[arg(long, value_name = "SPEC")]
    irq: Vec<String>,
    /// A warm spare's go signal: an inherited eventfd, fd=N. The guest's
    /// WAIT_GO hypercall blocks until it is written.
    /// Example: --go-fd fd=9
    #[arg(long, value_name = "SPEC")]
    go_fd: Option<String>,
    /// A standby's start signal: an inherited eventfd, fd=N. The VM is
    /// built and confined, then its vCPU waits until this is written before
    /// the guest's first instruction (a supervisor keeps a standby so that
    /// a restart skips starting, jailing and loading a vmm).
    /// Example: --start-fd fd=10
    #[arg(long, value_name = "SPEC")]
    start_fd: Option<String>,
    /// Command line handed to the guest. Example: --cmdline page-fault
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,
    /// Name used as the console prefix and in reports (default: the image name).
    /// Example: --name blk0
    #[arg(long)]
    name: Option<String>,
    /// Stop the guest after this long: 500ms, 2s, 1.5s or seconds.
    /// Example: --timeout 2s
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Where the guest console goes: stderr, none, or a file path (made,
    /// or emptied; never the image's or a window's file; a FIFO must have
    /// a reader). Example: --console /tmp/vm.log
    #[arg(long, value_name = "stderr|none|PATH", default_value = "stderr")]
    console: String,
    /// Print one JSON line with the outcome on stdout.
    #[arg(long)]
    json: bool,
    /// Inherited eventfd or pipe written (8 bytes) when the guest is ready.
    /// Example: --ready-fd 7
    #[arg(long, value_name = "FD")]
    ready_fd: Option<i32>,
    /// End when standard input closes: a supervisor passes a pipe only it
    /// holds (one that cannot be watched is refused), so the VM never
    /// outlives it. A `w` written on it stops the
    /// guest where it is and reports where (outcome `stopped`: registers,
    /// source location, backtrace). Example: --exit-on-stdin-close
    #[arg(long)]
    exit_on_stdin_close: bool,
    /// Check the options, the image (it fits the memory, the windows fit
    /// the address space), the inherited descriptors, the window files and
    /// the console's path, and exit: 0 if a run would start, else the
    /// setup error's status. No VM is created, no file made or changed. Supervisors check a driver
    /// configuration this way before relying on it. Example: --check
    #[arg(long)]
    check: bool,
    /// Use this inherited descriptor of /dev/kvm instead of opening it: a
    /// jailed vmm can open no path. Example: --kvm-fd 3
    #[arg(long, value_name = "FD")]
    kvm_fd: Option<i32>,
    /// Confine the vCPU and main threads with seccomp filters once the VM
    /// is set up, both before any guest code runs: they can then open, map
    /// or create nothing new, threads and processes included (any other
    /// system call kills the process). Supervisors always pass it.
    /// Example: --seccomp
    #[arg(long)]
    seccomp: bool,
    /// Run the driver as a plain Linux process instead of a driver VM:
    /// --image is then a hosted build of it (cargo build in driver-vm),
    /// given the same windows, doorbells and interrupt lines. For
    /// development (gdb, println); nothing is isolated. Example: --hosted
    #[arg(long)]
    hosted: bool,
}

/// Writes a line to standard output. A reader that went away (the
/// supervisor died) is not an error worth more than the exit status:
/// `println!` would panic on the broken pipe.
fn say_out(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Writes a line to standard error, ignoring a closed stream (see `say_out`).
fn say_err(line: &str) {
    use std::io::Write;
    // The vCPU thread, given up on, may hold standard error blocked.
    if vmm::runner::vcpu_thread_abandoned() {
        return vmm::runner::say_if_room(line);
    }
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `vmm locate`: names each address's source location in the image.
fn locate(args: LocateArgs) -> ExitCode {
    let image = match Image::resolve(&args.image) {
        Ok(image) => image,
        Err(error) => {
            say_err(&format!("vmm: {error}"));
            return ExitCode::from(error.exit_status());
        }
    };
    let symbols = vmm::symbols::Symbols::new(image.bytes());
    let name = |text: &str| -> Result<(), ExitCode> {
        let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        let Ok(address) = parsed else {
            say_err(&format!("vmm: {text:?} is not an address: give hex with 0x (0x102b51) or decimal"));
            return Err(ExitCode::from(status::USAGE));
        };
        say_out(&format!("{address:#x}\t{}", symbols.name(address, args.inlined)));
        Ok(())
    };
    let named = if args.addresses.is_empty() {
        // Line by line, so a profile's many addresses take no more memory
        // than one line.
        std::io::BufRead::lines(std::io::stdin().lock()).try_for_each(|line| match line {
            Ok(line) => line.split_whitespace().try_for_each(name),
            Err(error) => {
                say_err(&format!("vmm: cannot read the addresses from standard input: {error}"));
                Err(ExitCode::from(status::USAGE))
            }
        })
    } else {
        args.addresses.iter().map(String::as_str).try_for_each(name)
    };
    named.err().unwrap_or(ExitCode::SUCCESS)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?}: expected a duration from 0.001ms to 1e9 s, such as 500ms, 2s or 1.5");
    let (number, scale) =
        if let Some(ms) = text.strip_suffix("ms") { (ms, 1e-3) } else { (text.strip_suffix('s').unwrap_or(text), 1.0) };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    // Below a microsecond a timer rounds to none, which would disarm the
    // watchdog instead of arming it.
    if !value.is_finite() || value * scale < 1e-6 || value * scale > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// The production vmm's allocator (static on musl): musl's malloc maps a
/// group of pages for small allocations and unmaps it when its last one is
/// freed, and each unmap is a TLB shootdown across the CPUs; dlmalloc keeps
/// what it mapped. From the exec to the end of argument parsing, 45 mmap,
/// munmap and brk calls became 6, and the time 413-524 us became 195-278
/// (the cold restart's path).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> ExitCode {
    let output = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A filter of directives only when asked for: building one took 50-70
    // us of every start, the level alone none.
    if std::env::var_os("VMM_LOG").is_some() {
        output
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .init();
    } else {
        output.with_max_level(tracing::Level::WARN).init();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            if !error.use_stderr() {
                return ExitCode::SUCCESS;
            }
            if let Some(name) = json_run_asked(std::env::args_os().skip(1)) {
                // A supervisor that reads the outcome from standard output
                // gets one for a command line it got wrong as well.
                let report = ErrorReport {
                    name,
                    outcome: "setup_error",
                    kind: "usage",
                    message: error.render().to_string().trim().to_string(),
                };
                say_out(&serde_json::to_string(&report).unwrap_or_default());
            }
            return ExitCode::from(status::USAGE);
        }
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Images => {
            for name in image::builtin_names() {
                say_out(name);
            }
            ExitCode::SUCCESS
        }
        Command::Bench(args) => bench::main(args),
        Command::Locate(args) => locate(args),
        Command::NewDriver(args) => {
            let sdk = args.sdk.unwrap_or_else(vmm::new_driver::default_sdk);
            match vmm::new_driver::create(&args.name, &args.dir, &sdk) {
                Ok(dir) => {
                    let name = &args.name;
                    say_out(&format!("created {}: a RAM disk driver to start from (the vmdisk sample)", dir.display()));
                    say_out(&format!("  cd {} && cargo test     # its unit tests, no KVM", dir.display()));
                    say_out("  cargo image                # the isolated driver VM image");
                    say_out(&format!(
                        "  reflector serve --blk socket=/tmp/{name}.sock,image=/tmp/{name}.img,size=64M,device=memory,\
                         driver=$PWD/target/x86_64-unknown-linux-gnu/release/{name}"
                    ));
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    say_err(&format!("vmm: {error}"));
                    ExitCode::from(error.exit_status())
                }
            }
        }
    }
}

/// The VM's name when none is given: the image's file name without `.elf`.
fn name_of_image(image: &str) -> String {
    let base = image.rsplit('/').next().unwrap_or(image);
    base.strip_suffix(".elf").unwrap_or(base).to_string()
}

/// For a command line clap refused: if it is a `run` with `--json`, the
/// VM's name as far as the arguments say (`--name`, else `--image`'s),
/// which the JSON report carries.
fn json_run_asked(args: impl Iterator<Item = std::ffi::OsString>) -> Option<String> {
    let mut args: Vec<String> = args.map(|arg| arg.to_string_lossy().into_owned()).collect();
    // What follows `--` is no option.
    if let Some(end) = args.iter().position(|arg| arg == "--") {
        args.truncate(end);
    }
    if args.first().map(String::as_str) != Some("run") || !args.iter().any(|arg| arg == "--json") {
        return None;
    }
    let value = |option: &str| {
        let inline = format!("{option}=");
        args.iter().enumerate().find_map(|(i, arg)| match arg.strip_prefix(&inline) {
            Some(value) => Some(value.to_string()),
            None if arg == option => args.get(i + 1).filter(|value| !value.starts_with("--")).cloned(),
            None => None,
        })
    };
    Some(value("--name").or_else(|| value("--image").map(|image| name_of_image(&image))).unwrap_or_default())
}

fn run(args: RunArgs) -> ExitCode {
    let name = args.name.clone().unwrap_or_else(|| name_of_image(&args.image));
    let json = args.json;
    let start = Instant::now();
    if args.hosted {
        return report(&name, json, run_hosted(&name, args, start));
    }
    if args.check {
        return match check(&name, &args) {
            Ok(()) => {
                say_err(&format!("vmm: {name}: the configuration and image are usable"));
                ExitCode::SUCCESS
            }
            Err(error) => {
                say_err(&format!("vmm: {error}"));
                if json {
                    say_out(&serde_json::to_string(&ErrorReport::new(&name, &error)).unwrap_or_default());
                }
                ExitCode::from(error.exit_status())
            }
        };
    }
    report(&name, json, setup_and_run(&name, args, start))
}

/// Keeps a second descriptor of standard output at the highest number this
/// process may hold, for as long as it lives.
///
/// Why: when the process ends (SIGKILL included), the kernel closes its
/// descriptors in number order and then releases their files in the
/// reverse order: the file whose last descriptor is closed last is released
/// first. With a copy at the top, standard output's pipe is released before
/// the VM's descriptors, whose release waits for RCU grace periods (with
/// KVM's irqfd cleanup, before lines stopped being irqfds, about 1.4 ms of
/// a killed driver VM's end in a kernel trace here). A supervisor takes end-of-file on that pipe as the
/// sign that the guest can no longer run, which holds whatever the order:
/// descriptors are closed only once every thread, the vCPU's included, has
/// exited.
fn keep_stdout_released_first() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) into a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    // At most 1024 entries: a higher number would grow the table for nothing.
    let top = limit.rlim_cur.saturating_sub(1).min(1023) as libc::c_int;
    // SAFETY: fcntl(2) F_DUPFD_CLOEXEC on standard output; returns a new
    // descriptor (deliberately never closed) or -1, which changes nothing.
    let _ = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, top) };
}

/// Prints how the run ended; its exit status.
fn report(name: &str, json: bool, result: vmm::Result<Report>) -> ExitCode {
    match result {
        Ok(report) => {
            if json {
                say_out(&serde_json::to_string(&report).unwrap_or_default());
            } else {
                say_err(&format!("vmm: {} {}", report.name, report.outcome.describe()));
            }
            ExitCode::from(report.outcome.exit_status())
        }
        Err(error) => {
            say_err(&format!("vmm: {error}"));
            if json {
                say_out(&serde_json::to_string(&ErrorReport::new(name, &error)).unwrap_or_default());
            }
            ExitCode::from(error.exit_status())
        }
    }
}

/// `vmm run --hosted`: the driver as a process (see `vmm::hosted`). With
/// --check, reports a usable configuration as a `check` outcome.
fn run_hosted(name: &str, args: RunArgs, start: Instant) -> vmm::Result<Report> {
    let config = vm_config(name, &args)?;
    let image = vmm::hosted::resolve(&args.image)?;
    if args.check {
        vmm::hosted::check(&config)?;
        say_err(&format!("vmm: {name}: the configuration and hosted driver are usable"));
        std::process::exit(0);
    }
    tracing::warn!("running the driver HOSTED: a plain process, not isolated (development only)");
    config.check_descriptors_with(args.ready_fd)?;
    if args.exit_on_stdin_close {
        vmm::runner::check_lifeline()?;
    }
    let ready_file = args.ready_fd.map(ready_file).transpose()?;
    let options =
        vmm::hosted::HostedOptions { exit_on_stdin_close: args.exit_on_stdin_close, ready_file, timeout: args.timeout };
    // A standby: the driver process starts when the start signal comes.
    let stopped = config.start.and_then(|start| {
        tracing::info!("standing by: the driver starts when the start signal is written");
        vmm::hosted::wait_for_start(start, args.exit_on_stdin_close)
    });
    let outcome = match stopped {
        Some(outcome) => outcome,
        None => vmm::hosted::run(&config, &image, options)?,
    };
    Ok(Report {
        name: name.to_owned(),
        outcome,
        ready_us: None,
        elapsed_us: start.elapsed().as_micros() as u64,
        build_id: None,
    })
}

/// The VM's configuration from the options, checked.
fn vm_config(name: &str, args: &RunArgs) -> vmm::Result<VmConfig> {
    let config = VmConfig {
        name: name.to_owned(),
        memory: parse_number("--memory", &args.memory)?,
        windows: args.window.iter().map(|s| WindowConfig::parse(s)).collect::<Result<_, _>>()?,
        traps: args.trap.iter().map(|s| TrapConfig::parse(s)).collect::<Result<_, _>>()?,
        doorbells: args.doorbell.iter().map(|s| DoorbellConfig::parse(s)).collect::<Result<_, _>>()?,
        irqs: args.irq.iter().map(|s| IrqConfig::parse(s)).collect::<Result<_, _>>()?,
        go: args.go_fd.as_deref().map(|spec| vmm::config::parse_eventfd_spec("--go-fd", spec)).transpose()?,
        start: args.start_fd.as_deref().map(|spec| vmm::config::parse_eventfd_spec("--start-fd", spec)).transpose()?,
        cmdline: args.cmdline.clone(),
    };
    config.validate()?;
    Ok(config)
}

/// The VM's configuration and image from the options, checked.
fn configure(name: &str, args: &RunArgs) -> vmm::Result<(VmConfig, Image)> {
    let config = vm_config(name, args)?;
    let image = Image::resolve(&args.image)?;
    if image.ram_needed() > config.memory {
        return Err(Error::ImageTooLarge {
            image: image.name.clone(),
            needed: image.ram_needed(),
            available: config.memory,
        });
    }
    Ok((config, image))
}

/// `vmm run --check`: what a run judges of its configuration before it
/// asks KVM anything, with nothing made, emptied or taken: the options and
/// the image, every inherited descriptor and window file, `--ready-fd`, and
/// the console's path. Not the lifeline: standard input is the run's, and
/// a supervisor checks with none.
fn check(name: &str, args: &RunArgs) -> vmm::Result<()> {
    let (config, _) = configure(name, args)?;
    config.check_descriptors_with(args.ready_fd.into_iter().chain(args.kvm_fd))?;
    vmm::vm::check_inherited(&config)?;
    if let Some(fd) = args.ready_fd {
        check_ready_fd(fd)?;
    }
    if !matches!(args.console.as_str(), "stderr" | "none") {
        check_console_path(Path::new(&args.console), &args.image, &config)?;
    }
    Ok(())
}

fn setup_and_run(name: &str, args: RunArgs, start: Instant) -> vmm::Result<Report> {
    keep_stdout_released_first();
    let (config, image) = configure(name, &args)?;
    // `--kvm-fd` and `--ready-fd` are owned like the VM's own descriptors:
    // one number given to two owners was closed twice.
    config.check_descriptors_with(args.ready_fd.into_iter().chain(args.kvm_fd))?;
    if args.exit_on_stdin_close {
        runner::check_lifeline()?;
    }
    if let Some(fd) = args.ready_fd {
        check_ready_fd(fd)?;
    }
    let sink = match args.console.as_str() {
        "stderr" => ConsoleSink::Stderr,
        "none" => ConsoleSink::Discard,
        path => {
            // Judged before the console file is emptied, and before its
            // descriptor takes a number a closed inherited one had (it was
            // then said to be the console's file, not an eventfd).
            vmm::vm::check_inherited(&config)?;
            ConsoleSink::File(console_file(Path::new(path), &args.image, &config)?)
        }
    };
    let ready_file = args.ready_fd.map(ready_file).transpose()?;
    let kvm = match args.kvm_fd {
        Some(fd) => inherited_kvm(fd)?,
        None => Kvm::new().map_err(|source| Error::Kvm {
            operation: "opening /dev/kvm (is KVM available and accessible?)",
            source,
        })?,
    };
    if args.seccomp {
        // Confined: no process of the same user (other driver VMs, or
        // anything else running as the reflector's --user) may trace this
        // one or read its memory, which holds the guest's and the channel's.
        // SAFETY: prctl(2) with constant arguments.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            return Err(Error::Io {
                operation: "making the process undumpable (PR_SET_DUMPABLE)".into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let vm = Vm::create(&kvm, &config, &image, Console::new(name, sink))?;
    // Supervised, its end is watched: an address-space holder lets it end
    // sooner, and holds the VM so that its teardown waits for the recovery
    // (`vmm::address_space`). Started while this is the only thread.
    let kept = [std::os::fd::AsRawFd::as_raw_fd(&vm.vm_fd), vm.vcpu.raw_fd()];
    let holder = match args.exit_on_stdin_close.then(|| vmm::address_space::hold(&kept)).transpose() {
        Ok(holder) => holder,
        Err(error) => {
            tracing::warn!(%error, "no address-space holder: a kill of this vmm is seen later");
            None
        }
    };
    if !args.seccomp {
        tracing::warn!(
            "running UNCONFINED (no --seccomp, no jail): guest code that escapes into this process has its \
             privileges. For development only; the reflector jails every vmm and passes --seccomp."
        );
    }
    let options = RunOptions {
        timeout: args.timeout,
        ready_file,
        exit_on_stdin_close: args.exit_on_stdin_close,
        seccomp: args.seccomp,
        window_fds: config.windows.iter().filter_map(|window| window.fd).collect(),
    };
    // No guest code runs before the holder is confined.
    if let Some(holder) = holder {
        if let Err(error) = holder.confined(Duration::from_millis(100)) {
            tracing::warn!(%error, "no address-space holder: a kill of this vmm is seen later");
        }
    }
    let result = runner::run(vm, options)?;
    let mut outcome = result.outcome;
    let symbols = vmm::symbols::Symbols::new(image.bytes());
    outcome.symbolize(&symbols);
    Ok(Report {
        name: name.to_owned(),
        outcome,
        ready_us: result.ready_at.map(|t| t.duration_since(start).as_micros() as u64),
        elapsed_us: start.elapsed().as_micros() as u64,
        build_id: symbols.build_id().map(str::to_owned),
    })
}

/// /dev/kvm from an inherited descriptor, checked to be one.
fn inherited_kvm(fd: i32) -> vmm::Result<Kvm> {
    // SAFETY: F_GETFD only queries the descriptor.
    if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::invalid("--kvm-fd", format!("{fd} is not an open inherited file descriptor above 2")));
    }
    // SAFETY: the descriptor is open and inherited for this purpose; the
    // vmm takes ownership of it.
    let kvm = unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if kvm.get_api_version() != 12 {
        std::mem::forget(kvm);
        return Err(Error::invalid("--kvm-fd", format!("{fd} is not /dev/kvm")));
    }
    Ok(kvm)
}

/// The `--console` file: made if missing, emptied if it is a regular file,
/// and refused if it is the image or a window's file, which emptying it
/// would have destroyed (before, it was truncated even when the run then
/// failed). Opened without waiting: a FIFO nobody reads is refused instead
/// of blocking the start for ever; its writes then wait as usual.
fn console_file(path: &Path, image: &str, config: &VmConfig) -> vmm::Result<File> {
    let file = open_console(path, image, config)?;
    if file.metadata().is_ok_and(|metadata| metadata.file_type().is_file()) {
        file.set_len(0)
            .map_err(|source| Error::Io { operation: format!("emptying console file {}", path.display()), source })?;
    }
    // Blocking again, as a console's writes always were.
    // SAFETY: fcntl(2) on a descriptor this owns.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_SETFL, libc::O_WRONLY) };
    Ok(file)
}

/// `--check` of the console's path: what [`console_file`] would refuse,
/// judged from its metadata alone: never opened, since opening a FIFO for
/// writing and closing it gives its reader end-of-file (the run after the
/// check then found no reader). A missing file's directory must take it.
fn check_console_path(path: &Path, image: &str, config: &VmConfig) -> vmm::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let writable = |at: &Path, what: &str| -> vmm::Result<()> {
        let c_path = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::invalid("--console", "a path with a NUL byte"))?;
        // SAFETY: access(2) of a NUL-terminated path.
        if unsafe { libc::access(c_path.as_ptr(), libc::W_OK) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(Error::Io { operation: format!("{what} console file {}", path.display()), source });
        }
        Ok(())
    };
    match std::fs::metadata(path) {
        Ok(metadata) => {
            console_is_its_own(path, (metadata.dev(), metadata.ino()), image, config)?;
            writable(path, "writing")
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
            writable(directory, "making")
        }
        Err(source) => Err(Error::Io { operation: format!("reading console file {}", path.display()), source }),
    }
}

/// Opens the console file without waiting, made if missing, checked not
/// to be the image's or a window's file.
fn open_console(path: &Path, image: &str, config: &VmConfig) -> vmm::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let failed = |what: &str| {
        let what = format!("{what} console file {}", path.display());
        move |source: std::io::Error| {
            let hint = match source.raw_os_error() {
                Some(libc::ENXIO) => " (a FIFO nobody reads, or a socket)",
                _ => "",
            };
            Error::Io { operation: format!("{what}{hint}"), source }
        }
    };
    let file = File::options()
        .write(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(failed("opening"))?;
    let console = file.metadata().map_err(failed("reading"))?;
    console_is_its_own(path, (console.dev(), console.ino()), image, config)?;
    Ok(file)
}

/// Refuses a console file (its device and inode) that is the image's or a
/// window's file.
fn console_is_its_own(path: &Path, console: (u64, u64), image: &str, config: &VmConfig) -> vmm::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let is_it = |metadata: std::fs::Metadata| (metadata.dev(), metadata.ino()) == console;
    let fd_is_it = |fd: i32| {
        // SAFETY: fstat(2) into a local; a closed descriptor fails, and is
        // judged where it is used.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let stated = unsafe { libc::fstat(fd, &mut stat) } == 0;
        stated && (stat.st_dev, stat.st_ino) == console
    };
    let mut windows = config.windows.iter().map(|window| {
        let is = match window.fd {
            Some(fd) => fd_is_it(fd),
            None => std::fs::metadata(&window.path).is_ok_and(is_it),
        };
        (is, format!("the window at {:#x}", window.gpa))
    });
    let built_in = !image.contains('/') && vmm::image::builtin_names().any(|name| name == image);
    let image_is_it = match image.strip_prefix("fd=").and_then(|fd| fd.parse().ok()) {
        Some(fd) => fd_is_it(fd),
        None => !built_in && std::fs::metadata(image).is_ok_and(is_it),
    };
    match image_is_it.then(|| "the image".to_owned()).or_else(|| windows.find(|(is, _)| *is).map(|(_, w)| w)) {
        Some(what) => Err(Error::invalid(
            "--console",
            format!("{} is {what}'s file: give the console a file of its own", path.display()),
        )),
        None => Ok(()),
    }
}

fn ready_file(fd: i32) -> vmm::Result<File> {
    check_ready_fd(fd)?;
    // SAFETY: the descriptor is open and inherited for this purpose; the vmm
    // takes ownership of it and nothing else in the process uses it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `--ready-fd`: open, above 2, and one readiness may be written to.
fn check_ready_fd(fd: i32) -> vmm::Result<()> {
    // SAFETY: F_GETFD only queries the descriptor.
    if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::invalid("--ready-fd", format!("{fd} is not an open inherited file descriptor above 2")));
    }
    // An eventfd (an anonymous inode: no file type), a pipe or a socket:
    // readiness written into a regular file or a device would overwrite
    // its first 8 bytes.
    // SAFETY: fstat(2) of an open descriptor into a local.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut stat) } != 0
        || !matches!(stat.st_mode & libc::S_IFMT, 0 | libc::S_IFIFO | libc::S_IFSOCK)
    {
        return Err(Error::invalid(
            "--ready-fd",
            format!("{fd} is not an eventfd, a pipe or a socket (readiness is written to it as 8 bytes)"),
        ));
    }
    Ok(())
}
