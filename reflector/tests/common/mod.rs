//! Helpers shared by the reflector's integration tests: KVM availability,
//! scratch directories, and a reflector process started and stopped around a
//! test.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for anything to start (a hang guard, not a timing assertion).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(error) => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: /dev/kvm is unusable ({error}) and CI is set");
            }
            eprintln!("\n*** SKIPPING {test}: /dev/kvm is unusable ({error}). ***\n");
            false
        }
    }
}

pub fn sibling(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_reflector")).with_file_name(name);
    assert!(path.is_file(), "{} is missing: build the workspace first (cargo build --release)", path.display());
    path
}

pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("reflector-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running reflector, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Reflector {
    pub child: Child,
    log: PathBuf,
}

impl Reflector {
    pub fn start(args: &[String], log: PathBuf, socket: &Path) -> Reflector {
        Reflector::start_with(args, log, socket, "controller ready")
    }

    /// Starts it and waits for `socket` and for `ready` in its log.
    pub fn start_with(args: &[String], log: PathBuf, socket: &Path, ready: &str) -> Reflector {
        Reflector::start_configured(args, log, socket, ready, |_| {})
    }

    /// As `start_with`, with the command adjusted by `configure` first.
    pub fn start_configured(
        args: &[String],
        log: PathBuf,
        socket: &Path,
        ready: &str,
        configure: impl FnOnce(&mut Command),
    ) -> Reflector {
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_reflector"));
        configure(&mut command);
        let child = command
            .arg("serve")
            .args(args)
            .env("REFLECTOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut reflector = Reflector { child, log };
        reflector.wait_for(|r| socket.exists() && r.log_text().contains(ready), "the device to be served");
        reflector
    }

    /// As `start_with`, but its standard error is a pipe (as a journal's
    /// socket or a terminal would be, not a file), which a thread copies
    /// into `log` until every writer is gone.
    #[allow(dead_code)]
    pub fn start_piped(args: &[String], log: PathBuf, socket: &Path, ready: &str) -> Reflector {
        let mut file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_reflector"))
            .arg("serve")
            .args(args)
            .env("REFLECTOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut pipe, &mut file));
        let mut reflector = Reflector { child, log };
        reflector.wait_for(|r| socket.exists() && r.log_text().contains(ready), "the device to be served");
        reflector
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a condition on the reflector's observable state (its log,
    /// its socket), bounded by START_TIMEOUT.
    pub fn wait_for(&mut self, ready: impl Fn(&Reflector) -> bool, what: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !ready(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the reflector exited ({status}) before {what}:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{}", self.log_text());
            std::thread::yield_now();
        }
    }

    /// The current driver VM's pid, from the reflector's log: the last one
    /// a restart made current, else the first started (spares, started
    /// later, serve only once a restart lets them go). Waits (bounded) for
    /// the first start to be logged, which may follow the socket and the
    /// readiness line the reflector was started with. The restart line is
    /// written after the spare is let go: a caller that waited for a
    /// driver's own console line must wait for its restart line too.
    pub fn driver_pid(&mut self) -> i32 {
        self.wait_for(|r| r.log_text().contains("driver VM started"), "a driver VM to start");
        let log = self.log_text();
        let line = log
            .lines()
            .rfind(|l| l.contains("driver VM restarted"))
            .or_else(|| log.lines().find(|l| l.contains("driver VM started")))
            .expect("driver VM start logged");
        let pid = line.split("pid=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap();
        pid.parse().unwrap()
    }

    pub fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + START_TIMEOUT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the reflector ignored SIGTERM");
            std::thread::yield_now();
        }
        self.log_text()
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `--blk` argument for a device on `socket` and `image`.
pub fn blk_arg(socket: &Path, image: &Path, extra: &str) -> Vec<String> {
    vec!["--blk".into(), format!("socket={},image={}{extra}", socket.display(), image.display())]
}

/// A reflector serving disks `names` (8 MiB images in `scratch`, sockets
/// NAME.sock), with a control socket `ctl` if `control`; returns once every
/// socket (and the control socket) exists.
pub fn serve_disks(scratch: &Scratch, names: &[&str], control: bool) -> Reflector {
    let mut args = Vec::new();
    if control {
        args.extend(["--control".to_string(), scratch.join("ctl").display().to_string()]);
    }
    for disk in names {
        args.push("--blk".to_string());
        args.push(format!(
            "socket={},image={},size=8M,name={disk}",
            scratch.join(&format!("{disk}.sock")).display(),
            scratch.join(&format!("{disk}.img")).display()
        ));
    }
    let last = scratch.join(&format!("{}.sock", names.last().expect("a disk")));
    let mut reflector = Reflector::start(&args, scratch.join("log"), &last);
    let sockets: Vec<PathBuf> = names.iter().map(|disk| scratch.join(&format!("{disk}.sock"))).collect();
    let ctl = scratch.join("ctl");
    reflector.wait_for(|_| sockets.iter().all(|s| s.exists()) && (!control || ctl.exists()), "the sockets");
    reflector
}

/// Runs blk-load with `--json` and `args`; returns its output and the
/// parsed JSON job lines.
pub fn blk_load(socket: &Path, args: &[&str]) -> (std::process::Output, Vec<serde_json::Value>) {
    let output = Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let jobs = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (output, jobs)
}

/// Starts blk-load with `--json` and `args` in the background: the load a
/// test kills driver VMs (or their devices) under.
#[allow(dead_code)]
pub fn spawn_blk_load(socket: &Path, args: &[&str]) -> std::process::Child {
    Command::new(sibling("blk-load"))
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a blk-load started by [`spawn_blk_load`]: it must succeed
/// with no error and no mismatch in any job.
#[allow(dead_code)]
pub fn assert_clean_load(load: std::process::Child) {
    assert_clean_load_of(load, None);
}

/// [`assert_clean_load`], showing `reflector`'s log if it fails.
#[allow(dead_code)]
pub fn assert_clean_load_of(load: std::process::Child, reflector: Option<&Reflector>) {
    let output = load.wait_with_output().unwrap();
    let log = || reflector.map(Reflector::log_text).unwrap_or_default();
    assert!(output.status.success(), "blk-load: {}\nreflector:\n{}", String::from_utf8_lossy(&output.stderr), log());
    for line in String::from_utf8_lossy(&output.stdout).lines().filter(|l| l.starts_with('{')) {
        let job: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!((job["errors"].as_u64(), job["mismatches"].as_u64()), (Some(0), Some(0)), "{job}");
    }
}

/// Whether `qemu-system-x86_64` runs here (QEMU device models); with CI
/// set it must.
#[allow(dead_code)]
pub fn qemu_available(test: &str) -> bool {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !qemu {
        assert!(std::env::var_os("CI").is_none(), "{test}: qemu-system-x86_64 is missing and CI is set");
        eprintln!("\n*** SKIPPING {test}: qemu-system-x86_64 is missing ***\n");
    }
    qemu
}

/// Live (not zombie) QEMU processes whose command line contains `needle`
/// (an image path, a MAC address) and, if given, that descend from
/// `parent` (tests running at once use the same MACs; a jailed QEMU's
/// parent is its jail's keeper, the reflector's child): a device's QEMU,
/// found to be killed.
#[allow(dead_code)]
pub fn qemu_pids(needle: &str, parent: Option<u32>) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            // Jailed, QEMU runs as /qemu-system-x86_64.
            let program = cmdline.split('\0').next().unwrap_or("");
            let name = program.rsplit('/').next().unwrap_or("");
            name.starts_with("qemu-system") && cmdline.contains(needle)
        })
        .filter(|pid| {
            let (state, _) = state_and_parent(*pid as u32);
            let descends = |parent: u32| {
                let mut at = *pid as u32;
                (0..3).any(|_| {
                    at = state_and_parent(at).1.unwrap_or(0);
                    at == parent
                })
            };
            state.is_some_and(|state| state != "Z") && parent.is_none_or(descends)
        })
        .collect()
}

/// A process's state letter and its parent's pid.
fn state_and_parent(pid: u32) -> (Option<String>, Option<u32>) {
    // After the command name: state, then the parent's pid.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
    (fields.next().map(str::to_owned), fields.next().and_then(|p| p.parse().ok()))
}

/// Where reflector `pid`'s devices have their cgroups
/// (`driver-vms-<pid>-*`, its driver VMs' and its QEMU processes'): beside
/// it in each cgroup hierarchy it is in (v2: beside its own leaf). Made
/// while it runs; [`DeviceCgroups::list`] works after it is gone.
pub struct DeviceCgroups {
    parents: Vec<PathBuf>,
    prefix: String,
}

impl DeviceCgroups {
    pub fn of(pid: u32) -> DeviceCgroups {
        let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let parents = membership
            .lines()
            .filter_map(|line| {
                let (_, rest) = line.split_once(':')?;
                let (controllers, path) = rest.split_once(':')?;
                let hierarchy = controllers.split(',').find(|c| ["cpu", "pids", "memory"].contains(c)).unwrap_or("");
                if hierarchy.is_empty() && !controllers.is_empty() {
                    return None;
                }
                let path = path.trim_start_matches('/');
                let leaf = reflector::jail::OWN_LEAF;
                let path = path.strip_suffix(leaf).map(|p| p.trim_end_matches('/')).unwrap_or(path);
                Some(PathBuf::from("/sys/fs/cgroup").join(hierarchy).join(path))
            })
            .collect();
        DeviceCgroups { parents, prefix: format!("driver-vms-{pid}-") }
    }

    /// Those that exist now.
    pub fn list(&self) -> Vec<PathBuf> {
        self.parents
            .iter()
            .filter_map(|parent| std::fs::read_dir(parent).ok())
            .flat_map(|entries| entries.flatten())
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&self.prefix))
            .map(|entry| entry.path())
            .collect()
    }
}
