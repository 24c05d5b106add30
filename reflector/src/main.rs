//! The `reflector` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use reflector::chaos;
use reflector::config::{self, Config};
use reflector::control::{self, Request, Response};
use reflector::hw::switch::Switches;
use reflector::hw::tap::TapPort;
use reflector::serve::{self, Service};
use reflector::supervisor;

const SERVE_EXAMPLES: &str = "\
Examples:
  # One disk, its driver in a driver VM; the image is created if missing:
  reflector serve --blk socket=/tmp/disk0.sock,image=/tmp/disk0.img,size=1G

  # Then attach QEMU to it (guest RAM must be shared):
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
      -chardev socket,id=c0,path=/tmp/disk0.sock -device vhost-user-blk-pci,chardev=c0

  # Two net devices on one switch (their guests share a network):
  reflector serve --net socket=/tmp/net0.sock,mac=52:54:00:00:00:01,switch=lan \\
                  --net socket=/tmp/net1.sock,mac=52:54:00:00:00:02,switch=lan
  # and in QEMU (use the same MAC as the reflector's device):
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
      -chardev socket,id=c1,path=/tmp/net0.sock -netdev vhost-user,id=n0,chardev=c1 \\
      -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01

  # Everything in a file:
  reflector serve --config /etc/reflector.toml

--blk keys: socket=PATH (required), image=PATH (required), size=SIZE (create the image
if missing), client_user=USER (the user whose QEMU connects, a name or UID[:GID]: the socket is
theirs, mode 0600, so no other tenant's QEMU can connect; default: the reflector's user's), readonly=on, name=NAME, driver=IMAGE (default blk), driver_memory=SIZE or memory=SIZE (driver VM RAM,
default 16M), hang_ms=MS (pending requests with no progress for this long mean a hung
driver VM, which is replaced; default 500), fault_budget=N (driver VM faults tolerated per
10 s before the device fails its requests for a 10 s cool-down; default 20), spare=off|standby|warm
(standby: keep a started, jailed vmm with its VM built waiting before its guest's first
instruction, so that a restart skips starting one and boots the driver there; warm, or on: keep a
booted driver VM waiting, so that a restart skips the boot too; off: nothing; default standby), checksums=on (remember a checksum
of every sector written through the device, 4 bytes per 512-byte sector, and treat a read that
returns other data as a driver lie: the driver VM is replaced and the read replayed),
dma=bounce|direct (direct: the simulated controller reaches each request's own buffers through
a window mapped only while it is in flight, instead of a bounce slot copied by the reflector;
one copy fewer; not with checksums=on; default bounce), poison_deaths=N (a request in flight in N dying driver VMs in a row completes with an I/O
error instead of being replayed again; default 3), driver_args=WORDS (the driver's
parameters, added to its command line; the blk driver takes panic-on-sector=N, a bug for tests),
device=sim|nvme|memory|vfio:ADDRESS (memory: the image itself as the vmdisk driver's device
memory), aio=threads|io_uring (device=nvme: how QEMU reaches the image; io_uring skips its
thread pool but lets that QEMU, and the reflector, use io_uring, which the jail otherwise
denies; default threads), hosted=on (run a hosted build of the driver, given by driver=PATH, as a plain process
instead of a driver VM: development only, without isolation; needs --no-jail).

--tap name=IFNAME[,switch=NAME] bridges a host TAP device (created if missing; bring it up
with `ip link set IFNAME up`) into a switch that --net devices use, so their guests reach
the host.

--net keys: socket=PATH (required), client_user=USER (as for --blk), mac=MAC (default 52:54:00:d5:00:N for the N-th net
device), switch=NAME (devices on one switch are connected; default \"default\"), name=NAME,
driver=IMAGE (default net), memory=SIZE, hang_ms=MS, fault_budget=N, spare=off|standby|warm, driver_args=WORDS,
hosted=on (as for --blk).

Configuration file (TOML):
  vmm = \"/usr/local/bin/vmm\"     # optional; default: the vmm next to the reflector
  jail = true                   # jail every driver VM (needs root); false for development only
  jail_uid_base = 2063597568    # device N's driver VMs run as uid/gid BASE + N (default: a range per reflector)
  user = \"drvm\"                 # become this user once set up (one of its own: never nobody); driver VMs then run as it too

  [[blk]]
  name = \"disk0\"
  socket = \"/tmp/disk0.sock\"
  image = \"/var/lib/disk0.img\"
  size = \"1G\"                   # create the image if missing
  readonly = false
  checksums = false             # check reads against what was written
  dma = \"bounce\"                # or \"direct\": per-request DMA windows, no bounce copy
  # device = \"nvme\"             # QEMU's NVMe model; then aio = \"io_uring\" skips QEMU's thread pool
  driver = \"blk\"                # driver VM image: built-in name or path
  driver_memory = \"16M\"
  hang_ms = 500                 # replace a driver VM that makes no progress this long
  fault_budget = 20             # faults per 10 s before the device is declared failed
  poison_deaths = 3             # a request in this many dying driver VMs in a row fails alone
  driver_args = \"\"              # the driver's parameters
  spare = \"standby\"             # keep a vmm waiting (\"warm\" or true: a booted driver VM)

  [[net]]
  name = \"net0\"
  socket = \"/tmp/net0.sock\"
  mac = \"52:54:00:00:00:01\"
  switch = \"lan\"                # devices on one switch are connected

A driver VM that exits, hangs or breaks the channel protocol is replaced and the
requests it had are replayed; the client sees a stall, not an error. A net device's link
stays up through a restart; frames the failed driver VM was sending are lost (at most once). After more than
20 faults in 10 s the device fails its requests for a 10 s cool-down, then tries again.";

/// Serves vhost-user block and net devices whose drivers run isolated in driver VMs.
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
    /// Show each device: state, driver VM pid, restarts, last fault, recovery stalls, requests in flight.
    /// Example: reflector status --control /tmp/reflector.ctl
    Status(StatusArgs),
    /// Print the counters in Prometheus text format. Example: reflector metrics --control /tmp/reflector.ctl
    Metrics(ControlArg),
    /// Make a failed device try a new driver VM now. Example: reflector recover --control /tmp/r.ctl disk0
    Recover(DeviceArgs),
    /// SIGKILL a device's driver VM (testing). Example: reflector kill --control /tmp/r.ctl disk0
    Kill(DeviceArgs),
    /// Make a device's driver commit a fault (testing): panic, page-fault, illegal, hang, lie or stop.
    /// Example: reflector inject --control /tmp/r.ctl disk0 panic --after 100
    Inject(InjectArgs),
    /// Kill driver VMs and inject driver faults at random while verified load runs; report.
    #[command(after_help = CHAOS_EXAMPLES)]
    Chaos(ChaosArgs),
}

const CHAOS_EXAMPLES: &str = "\
Example:
  reflector serve --control /tmp/r.ctl --blk socket=/tmp/d0.sock,image=/tmp/d0.img,size=256M,name=disk0 &
  reflector chaos --control /tmp/r.ctl --device disk0 --socket /tmp/d0.sock --faults 200 --seed 7

Exit status: 0 when the load saw no error and no mismatch and every fault was recovered.";

#[derive(Args, Debug)]
struct ControlArg {
    /// The reflector's control socket (reflector serve --control).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    control: ControlArg,
    /// The raw JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DeviceArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Device name.
    device: String,
}

#[derive(Args, Debug)]
struct InjectArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Device name.
    device: String,
    /// panic, page-fault, illegal, hang, lie, stop; or lies only evidence
    /// catches: corrupt-reads (needs checksums=on), skip-flushes, skip-writes; or costs the
    /// CPU watch catches: spin (never sleep), flood (ring the doorbell in a loop), junk-io (keep
    /// the device busy with work no request asked for); wild-dma, wild-queues (DMA outside the device's
    /// region, caught by the device's bounds); or none, which withdraws a fault not yet committed.
    fault: String,
    /// Requests to serve first.
    #[arg(long, default_value_t = 0)]
    after: u32,
}

#[derive(Args, Debug)]
struct ChaosArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Device name.
    #[arg(long)]
    device: String,
    /// The device's vhost-user socket: verified load (blk-load) runs on it during the chaos.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Number of faults.
    #[arg(long, default_value_t = 200)]
    faults: u32,
    /// Fault kinds to pick from (comma separated): kill, panic, page-fault, illegal, hang, lie, stop.
    #[arg(long, value_delimiter = ',', default_values_t = chaos::ALL_KINDS.map(String::from))]
    kinds: Vec<String>,
    /// Seed of the random choices (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Shortest pause between faults, ms (0 to 3,600,000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    min_gap_ms: u64,
    /// Longest pause between faults, ms (0 to 3,600,000; raised to --min-gap-ms if below it).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    max_gap_ms: u64,
    /// Longest wait for a recovery, s (1 to 3600).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    recovery_timeout_s: u64,
    /// Load runs (4 jobs of 2 s each) with no fault before the first one: the client's
    /// figures to read the failovers' against (needs --socket).
    #[arg(long, default_value_t = 0)]
    quiet_runs: u32,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A block device: socket=PATH,image=PATH[,size=SIZE][,readonly=on][,name=NAME][,driver=IMAGE].
    /// Repeatable. Example: --blk socket=/tmp/d0.sock,image=/tmp/d0.img,size=1G
    #[arg(long, value_name = "SPEC")]
    blk: Vec<String>,
    /// A net device: socket=PATH[,mac=MAC][,switch=NAME][,name=NAME][,driver=IMAGE].
    /// Repeatable. Example: --net socket=/tmp/n0.sock,mac=52:54:00:00:00:01,switch=lan
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// Bridge a host TAP device (created if missing) into a switch: name=IFNAME[,switch=NAME].
    /// Repeatable. Example: --tap name=drvm0,switch=lan
    #[arg(long, value_name = "SPEC")]
    tap: Vec<String>,
    /// A TOML configuration file (see below). Example: --config reflector.toml
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The vmm binary (default: next to the reflector). Example: --vmm target/release/vmm
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// Serve a control socket here (reflector status, metrics, recover, chaos).
    /// Example: --control /tmp/reflector.ctl
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Run driver VMs unjailed: as the reflector's user, with its
    /// privileges, in the host's namespaces. For development only (the
    /// jail needs root). Example: --no-jail
    #[arg(long)]
    no_jail: bool,
    /// Device N's driver VMs run as uid and gid BASE + N (default: a range of
    /// 1000 ids from 2063597568 up that no other running reflector on this host holds).
    /// Example: --jail-uid-base 3000000
    #[arg(long, value_name = "BASE")]
    jail_uid_base: Option<u32>,
    /// Once set up (sockets claimed, images and /dev/kvm opened, cgroups
    /// made), become this unprivileged user, with no capability left; driver
    /// VMs then run as this user, each in namespaces of its own. A name or
    /// UID[:GID]; one nothing else runs as (nobody is refused). Example: --user drvm
    #[arg(long, value_name = "USER")]
    user: Option<String>,
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
    let result = match cli.command {
        // A failed start leaves none of the sockets it placed.
        Command::Serve(args) => serve_devices(args).inspect_err(|_| reflector::sockets::remove_every_placed()),
        Command::Status(args) => show_status(&args),
        Command::Metrics(args) => control_command(&args.control, &Request::Metrics),
        Command::Recover(args) => control_command(&args.control.control, &Request::Recover { device: args.device }),
        Command::Kill(args) => control_command(&args.control.control, &Request::Kill { device: args.device }),
        Command::Inject(args) => match control::FaultKind::parse(&args.fault) {
            Some(fault) => control_command(
                &args.control.control,
                &Request::Inject { device: args.device, fault, after: args.after },
            ),
            None => Err(format!("inject: unknown fault {:?}: use {}", args.fault, control::FaultKind::NAMES)),
        },
        Command::Chaos(args) => return run_chaos(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("reflector: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Sends `request` and prints the answer as the commands always did: the
/// metrics text, `ok PID` for a kill, `ok` otherwise.
fn control_command(path: &std::path::Path, request: &Request) -> Result<(), String> {
    match control::request(path, request)? {
        Response::Metrics { text } => println!("{text}"),
        Response::Killed { pid } => println!("ok {pid}"),
        _ => println!("ok"),
    }
    Ok(())
}

fn show_status(args: &StatusArgs) -> Result<(), String> {
    let (statuses, fleet) = control::fleet_status(&args.control.control)?;
    if args.json {
        println!("{}", serde_json::to_string(&statuses).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!(
        "{:<10} {:<4} {:<17} {:>8} {:>9} {:>8} {:>8} {:>11} {:>11} {:>11} {:>9}  last fault",
        "device",
        "kind",
        "state",
        "pid",
        "in-flight",
        "faults",
        "restarts",
        "stall p50",
        "stall p99",
        "stall max",
        "rss"
    );
    let ms = |us: u64| format!("{:.2}ms", us as f64 / 1000.0);
    let mib = |kib: u64| format!("{:.1}MiB", kib as f64 / 1024.0);
    for d in &statuses {
        println!(
            "{:<10} {:<4} {:<17} {:>8} {:>9} {:>8} {:>8} {:>11} {:>11} {:>11} {:>9}  {}",
            d.device,
            d.kind,
            d.state,
            d.driver_pid,
            d.in_flight,
            d.faults,
            d.restarts,
            ms(d.stall_p50_us),
            ms(d.stall_p99_us),
            ms(d.stall_max_us),
            mib(d.driver_rss_kib),
            if d.last_fault_location.is_empty() {
                d.last_fault.clone()
            } else {
                format!("{} at {}", d.last_fault, d.last_fault_location)
            }
        );
    }
    let cap = if fleet.memory_cap_bytes == 0 {
        "no cap".to_owned()
    } else {
        format!("cap {}", mib(fleet.memory_cap_bytes / 1024))
    };
    println!(
        "fleet: {} devices, {} attached; driver VMs {} resident, {} their own; spares {} resident, {} their own \
         ({cap}); reflector {} (budget {}; its clients' memory it maps {})",
        fleet.devices,
        fleet.attached,
        mib(fleet.driver_rss_kib),
        mib(fleet.driver_own_kib),
        mib(fleet.spare_rss_kib),
        mib(fleet.spare_own_kib),
        mib(fleet.reflector_rss_kib),
        mib(fleet.reflector_budget_kib),
        mib(fleet.client_memory_kib)
    );
    Ok(())
}

fn run_chaos(args: ChaosArgs) -> ExitCode {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let blk_load = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("blk-load"),
        Err(error) => {
            eprintln!("reflector: cannot find blk-load: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = chaos::ChaosOptions {
        control: args.control.control,
        device: args.device,
        socket: args.socket,
        faults: args.faults,
        kinds: args.kinds,
        seed,
        gap: (
            std::time::Duration::from_millis(args.min_gap_ms),
            std::time::Duration::from_millis(args.max_gap_ms.max(args.min_gap_ms)),
        ),
        recovery_timeout: std::time::Duration::from_secs(args.recovery_timeout_s),
        blk_load,
        quiet_runs: args.quiet_runs,
    };
    match chaos::run(&options) {
        Ok(report) => {
            chaos::print(&options, &report);
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(message) => {
            eprintln!("reflector chaos: {message}");
            ExitCode::from(2)
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
    let first = config.net.len();
    for (i, spec) in args.net.iter().enumerate() {
        config.net.push(config::parse_net(spec, first + i).map_err(|e| e.0)?);
    }
    for spec in &args.tap {
        config.tap.push(config::parse_tap(spec).map_err(|e| e.0)?);
    }
    if args.vmm.is_some() {
        config.vmm = args.vmm.clone();
    }
    if args.no_jail {
        config.jail.enabled = false;
    }
    if let Some(base) = args.jail_uid_base {
        config.jail.uid_base = Some(base);
    }
    if args.user.is_some() {
        config.user = args.user.clone();
    }
    config.validate().map_err(|e| e.0)?;
    // The control socket on a device's path, however spelled, was refused
    // only once every device had started, as served by "another process".
    if let Some(control) = &args.control {
        let key = config::same_file_key(control);
        for (name, socket) in config.device_sockets() {
            if config::same_file_key(socket) == key {
                return Err(format!(
                    "--control {} is device {name:?}'s socket too: give the control socket a path of its own",
                    control.display()
                ));
            }
        }
    }
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
    let mut config = load_config(&args)?;
    if config.user.is_some() && !config.jail.enabled {
        return Err("--user needs the jail (driver VMs started before the switch would stay root's): \
                    drop --no-jail, or start the reflector as that user instead"
            .into());
    }
    let user = match &config.user {
        Some(spec) => Some(reflector::privileges::User::resolve(spec).map_err(|e| e.to_string())?),
        None => None,
    };
    config.jail.user = user.as_ref().map(|user| (user.uid, user.gid));
    let vmm = supervisor::find_vmm(config.vmm.as_deref())?;
    let signals = block_termination_signals();
    // io_uring stays denied to every process unless a disk's QEMU uses it
    // (the reflector's filter binds its children; their jails deny it again
    // but to that QEMU).
    let io_uring = config
        .blk
        .iter()
        .map(reflector::config::BlkConfig::io_uring)
        .find(|io_uring| *io_uring == reflector::jail::IoUring::Allowed)
        .unwrap_or(reflector::jail::IoUring::Denied);
    reflector::jail::confine_reflector(io_uring).map_err(|e| e.to_string())?;
    if io_uring == reflector::jail::IoUring::Allowed {
        if let Some(error) = reflector::jail::io_uring_refused() {
            tracing::warn!(
                %error,
                "aio=io_uring: this kernel refuses io_uring to the reflector (kernel.io_uring_disabled, or a seccomp \
                 profile around it); QEMU will reach the image through its thread pool instead"
            );
        }
    }
    reflector::sockets::restrict_umask();
    match reflector::sockets::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open descriptor limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open descriptor limit"),
    }
    hardware::shared_eventfd::prepare().map_err(|e| e.to_string())?;
    // Images created here are removed again if the start fails before the
    // devices serve.
    let mut created_images = reflector::disk_image::CreatedImages::default();
    let mut image_locks = Vec::new();
    for blk in &config.blk {
        image_locks.push(reflector::disk_image::prepare(blk, &mut created_images)?);
    }
    // Services live until the process exits.
    let mut services: Vec<&'static dyn Service> = Vec::new();
    if config.jail.enabled {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("jailing driver VMs needs root to set up (cgroups, ids, /dev/kvm): start the reflector as \
                        root (add --user NAME to become an unprivileged user once set up), or pass --no-jail \
                        for development"
                .into());
        }
    } else {
        tracing::warn!(
            "DRIVER VMS ARE NOT JAILED (--no-jail): a compromised vmm runs with the reflector's user and \
             privileges in the host's namespaces. For development only."
        );
    }
    if config.jail.enabled {
        reflector::jail::prepare_cgroups();
    }
    let started = start_concurrently(&config.blk, |i, blk| {
        serve::start_blk(blk, image_locks[i].as_ref(), &vmm, &config.jail, i as u32)
    })?;
    for service in started {
        services.push(Box::leak(Box::new(service)));
    }
    let mut index = config.blk.len() as u32;
    let switches = Switches::default();
    // TAPs are bridged before any card starts, so an operator's TAP error
    // fails the start before a driver VM runs, and "TAP device bridged" is
    // logged before any "card ready".
    let mut taps = Vec::new();
    for tap in &config.tap {
        taps.push(
            TapPort::start(&tap.name, switches.get(&tap.switch)).map_err(|e| format!("--tap {}: {e}", tap.name))?,
        );
    }
    for net in &config.net {
        services.push(Box::leak(Box::new(serve::start_net(net, &vmm, &switches, &config.jail, index)?)));
        index += 1;
    }
    let mut targets = Vec::new();
    for &service in &services {
        targets.push(service.control_target()?);
    }
    // Every socket is claimed as root (its directory may be root's); no
    // client is answered before the switch to `--user`.
    let control_socket = match &args.control {
        Some(path) => Some(control::claim(path).map_err(|e| format!("control socket: {e}"))?),
        None => None,
    };
    if let Some(user) = &user {
        user.become_it().map_err(|e| e.to_string())?;
        tracing::info!(user = %user, "set up; now running unprivileged");
    }
    // From here on a client may write to an image: it is a disk now.
    created_images.keep();
    for &service in &services {
        std::thread::Builder::new()
            .name(format!("{}-serve", service.name()))
            .spawn(move || {
                if let Err(message) = service.serve() {
                    tracing::error!(device = %service.name(), %message, "serving stopped");
                }
            })
            .map_err(|e| format!("starting a thread: {e}"))?;
    }
    if let (Some(path), Some(socket)) = (&args.control, control_socket) {
        socket.serve(targets).map_err(|e| format!("control socket: {e}"))?;
        tracing::info!(control = %path.display(), "control socket ready");
    }
    let mut signal = 0;
    // SAFETY: sigwait on the set blocked above.
    unsafe { libc::sigwait(&signals, &mut signal) };
    tracing::info!(signal, "stopping");
    for tap in &taps {
        tracing::debug!(dropped = tap.dropped(), "TAP port");
    }
    drop(taps);
    if let Some(path) = &args.control {
        reflector::sockets::remove_placed(path);
    }
    // Every device's driver VMs and device models are killed first, so
    // that they end together; then each device waits for its own.
    for service in &services {
        service.stop();
    }
    for service in services {
        service.shutdown();
        reflector::sockets::remove_placed(service.socket());
        let m = service.metrics();
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            device = %service.name(),
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
            tx_frames = count(&m.tx_frames),
            rx_frames = count(&m.rx_frames),
            tx_lost = count(&m.tx_lost),
            rx_dropped = count(&m.rx_dropped),
            "device counters"
        );
    }
    Ok(())
}

/// Devices started at once: starting one is forking, jailing and
/// executing its first driver VM, kernel work that scales with the cores.
/// 100 block devices, measured to the control socket: 1.04 s one at a time,
/// 0.71-0.80 s two at a time, 0.66-0.88 s four at a time (two cores here).
const STARTERS: usize = 2;

/// Starts `items` (devices) with `start`, a few at once; returns what each
/// started, in order, or the first error (then no further one is begun).
fn start_concurrently<T: Sync, S: Send>(
    items: &[T],
    start: impl Fn(usize, &T) -> Result<S, String> + Sync,
) -> Result<Vec<S>, String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<S, String>>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..STARTERS.min(items.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let result = start(i, item);
                let failed = result.is_err();
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(result);
                }
                if failed {
                    next.store(items.len(), Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    results.into_iter().filter_map(|slot| slot.into_inner().ok().flatten()).collect()
}
