//! The `reflector` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use reflector::config::{self, Config};
use reflector::serve::{self, BlkService};
use reflector::supervisor;

const SERVE_EXAMPLES: &str = "\
Examples:
  # One disk, its driver in a driver VM; the image is created if missing:
  reflector serve --blk socket=/tmp/disk0.sock,image=/tmp/disk0.img,size=1G

  # Then attach QEMU to it (guest RAM must be shared):
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
      -chardev socket,id=c0,path=/tmp/disk0.sock -device vhost-user-blk-pci,chardev=c0

  # Everything in a file:
  reflector serve --config /etc/reflector.toml

--blk keys: socket=PATH (required), image=PATH (required), size=SIZE (create the image
if missing), readonly=on, name=NAME, driver=IMAGE (default blk), memory=SIZE (driver VM RAM,
default 16M), hang_ms=MS (pending requests with no progress for this long mean a hung
driver VM, which is replaced; default 500).

Configuration file (TOML):
  vmm = \"/usr/local/bin/vmm\"     # optional; default: the vmm next to the reflector

  [[blk]]
  name = \"disk0\"
  socket = \"/tmp/disk0.sock\"
  image = \"/var/lib/disk0.img\"
  size = \"1G\"                   # create the image if missing
  readonly = false
  driver = \"blk\"                # driver VM image: built-in name or path
  driver_memory = \"16M\"
  hang_ms = 500                 # replace a driver VM that makes no progress this long

A driver VM that exits, hangs or breaks the channel protocol is replaced and the
requests it had are replayed; the client sees a stall, not an error. After more than
20 faults in 10 s the device fails its requests for a 10 s cool-down, then tries again.";

/// Serves vhost-user block devices whose drivers run isolated in driver VMs.
#[derive(Parser, Debug)]
#[command(name = "reflector", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve devices until SIGINT or SIGTERM.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A block device: socket=PATH,image=PATH[,size=SIZE][,readonly=on][,name=NAME][,driver=IMAGE].
    /// Repeatable. Example: --blk socket=/tmp/d0.sock,image=/tmp/d0.img,size=1G
    #[arg(long, value_name = "SPEC")]
    blk: Vec<String>,
    /// A TOML configuration file (see below). Example: --config reflector.toml
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The vmm binary (default: next to the reflector). Example: --vmm target/release/vmm
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REFLECTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let Command::Serve(args) = cli.command;
    match serve_devices(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("reflector: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => config::load(path).map_err(|e| e.0)?,
        None => Config::default(),
    };
    let first = config.blk.len();
    for (i, spec) in args.blk.iter().enumerate() {
        config.blk.push(config::parse_blk(spec, first + i).map_err(|e| e.0)?);
    }
    if args.vmm.is_some() {
        config.vmm = args.vmm.clone();
    }
    config.validate().map_err(|e| e.0)?;
    Ok(config)
}

/// Blocks SIGINT and SIGTERM in every thread (threads inherit the mask), so
/// that the main thread can wait for them with sigwait.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask on
    // the calling thread; no other thread exists yet.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn serve_devices(args: ServeArgs) -> Result<(), String> {
    let config = load_config(&args)?;
    let vmm = supervisor::find_vmm(config.vmm.as_deref())?;
    let signals = block_termination_signals();
    for blk in &config.blk {
        serve::prepare_image(blk)?;
    }
    let mut services: Vec<&'static BlkService> = Vec::new();
    for blk in &config.blk {
        // Services live until the process exits.
        let service: &'static BlkService = Box::leak(Box::new(serve::start_blk(blk, &vmm)?));
        services.push(service);
        std::thread::Builder::new()
            .name(format!("{}-serve", blk.name))
            .spawn(move || {
                if let Err(message) = service.serve() {
                    tracing::error!(device = %service.config.name, %message, "serving stopped");
                }
            })
            .map_err(|e| format!("starting a thread: {e}"))?;
    }
    let mut signal = 0;
    // SAFETY: sigwait on the set blocked above.
    unsafe { libc::sigwait(&signals, &mut signal) };
    tracing::info!(signal, "stopping");
    for service in services {
        service.shutdown();
        let _ = std::fs::remove_file(&service.config.socket);
        let m = &service.metrics;
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            device = %service.config.name,
            requests = count(&m.requests),
            completed = count(&m.completed),
            malformed = count(&m.malformed),
            errors = count(&m.errors),
            violations = count(&m.violations),
            faults = count(&m.faults),
            restarts = count(&m.restarts),
            replayed = count(&m.replayed),
            stall_p50_us = m.stall_percentiles().map(|s| s.0).unwrap_or(0),
            stall_p99_us = m.stall_percentiles().map(|s| s.1).unwrap_or(0),
            stall_max_us = m.stall_percentiles().map(|s| s.2).unwrap_or(0),
            bytes_read = count(&m.bytes_read),
            bytes_written = count(&m.bytes_written),
            "device counters"
        );
    }
    Ok(())
}
