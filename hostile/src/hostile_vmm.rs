//! `hostile-vmm`: stands in for a compromised `vmm` (guest code that took
//! over the vmm process). The reflector starts it exactly as it starts the
//! real vmm, jail included; it ignores its arguments and tries, one by one,
//! what a compromised vmm would: read host files and other devices' images,
//! reach sockets and the network, trace or signal other processes, gain
//! privileges, write its root, fork, start tasks without bound, take more CPU or memory
//! than its share, flood its standard output and its standard error. It
//! prints one JSON line saying how each attempt ended (the reflector logs
//! it as the driver VM's report), then tries to take more memory than its
//! cgroup allows, which should get it killed.
//!
//! Not a test by itself: `reflector/tests/jail.rs` runs it and judges the
//! report. Never installed anywhere a real deployment would use it.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// How a system call ended: "ok" or the errno's name.
fn outcome(result: libc::c_long) -> String {
    if result >= 0 {
        return "ok".into();
    }
    errno_name(&std::io::Error::last_os_error())
}

/// The name of the errno `error` carries.
fn errno_name(error: &std::io::Error) -> String {
    match error.raw_os_error().unwrap_or(0) {
        libc::ENOENT => "ENOENT".into(),
        libc::EACCES => "EACCES".into(),
        libc::EPERM => "EPERM".into(),
        libc::EROFS => "EROFS".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ESRCH => "ESRCH".into(),
        other => format!("errno {other}"),
    }
}

fn open(path: &str) -> String {
    let Ok(path) = std::ffi::CString::new(path) else { return "bad path".into() };
    // SAFETY: open(2) of a C string; the descriptor, if any, is left open.
    outcome(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) } as libc::c_long)
}

fn connect_tcp(port: u16) -> String {
    // SAFETY: socket(2), then connect(2) with a local sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return outcome(-1);
        }
        let mut address: libc::sockaddr_in = std::mem::zeroed();
        address.sin_family = libc::AF_INET as libc::sa_family_t;
        address.sin_port = port.to_be();
        address.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        outcome(libc::connect(fd, (&address as *const libc::sockaddr_in).cast(), len) as libc::c_long)
    }
}

/// A socket of `domain` (stream): how its making ended.
fn make_socket(domain: libc::c_int) -> String {
    // SAFETY: socket(2); the descriptor, if any, is left open.
    outcome(unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) } as libc::c_long)
}

/// fork(2) once: how it ended. A child (the jail letting it through)
/// ends at once.
fn fork_once() -> String {
    // SAFETY: fork(2); a child only exits.
    match unsafe { libc::fork() } {
        // SAFETY: _exit(2) in the child, touching nothing of the parent's.
        0 => unsafe { libc::_exit(0) },
        pid if pid > 0 => {
            // SAFETY: waitpid(2) of our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            "ok".into()
        }
        _ => errno_name(&std::io::Error::last_os_error()),
    }
}

/// Starts up to `limit` threads (tasks, as a process would be) that
/// wait; how many it got.
fn threads_many(limit: usize) -> usize {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..limit {
        let stop = stop.clone();
        let waiter = move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::park_timeout(Duration::from_millis(10));
            }
        };
        match std::thread::Builder::new().stack_size(64 << 10).spawn(waiter) {
            Ok(thread) => threads.push(thread),
            Err(_) => break,
        }
    }
    let count = threads.len();
    stop.store(true, std::sync::atomic::Ordering::Release);
    for thread in threads {
        thread.thread().unpark();
        let _ = thread.join();
    }
    count
}

/// Spins for `wall`; the share of a CPU it got.
fn cpu_share(wall: Duration) -> f64 {
    let cpu = || {
        let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime(2) into a local struct.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
        Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
    };
    let (start, cpu_start) = (Instant::now(), cpu());
    // More threads than a vmm's one vCPU: what a compromised vmm would run.
    let spinners: Vec<_> = (0..SPINNING_THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                while start.elapsed() < wall {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    for spinner in spinners {
        let _ = spinner.join();
    }
    (cpu() - cpu_start).as_secs_f64() / start.elapsed().as_secs_f64()
}

/// How long it floods its standard output: the reflector reads it within a
/// rate (`supervisor::REPORT_READ_RATE`), so what goes out in this time is
/// what the reflector read.
const FLOOD_TIME: Duration = Duration::from_secs(1);

/// The most it writes to standard output before the report: several times
/// the reflector's whole memory budget for a device.
const FLOOD_MIB: usize = 256;

/// Writes to standard output for `time`, without waiting (non-blocking),
/// at most `mib` MiB of one byte as one line (ended, so that the report
/// after it is a line of its own); how many KiB went out. A reflector
/// that reads all it can costs itself a core; one that reads within its
/// rate leaves the pipe full, and the writer waits.
fn flood_stdout(time: Duration, mib: usize) -> usize {
    let chunk = vec![b'x'; 64 << 10];
    let mut out = std::io::stdout().lock();
    let _ = out.flush();
    // SAFETY: fcntl(2) on standard output's descriptor.
    let flags = unsafe { libc::fcntl(1, libc::F_GETFL) };
    // SAFETY: as above.
    unsafe { libc::fcntl(1, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    let started = Instant::now();
    let mut written = 0usize;
    while started.elapsed() < time && written < mib << 20 {
        // SAFETY: write(2) of a live buffer to standard output.
        let n = unsafe { libc::write(1, chunk.as_ptr().cast(), chunk.len()) };
        if n > 0 {
            written += n as usize;
        } else {
            std::thread::yield_now();
        }
    }
    // SAFETY: as above: blocking again, for the report.
    unsafe { libc::fcntl(1, libc::F_SETFL, flags) };
    let _ = out.write_all(b"\n");
    written >> 10
}

/// MiB written to standard error before the report: far more than a
/// driver VM's share of the reflector's log.
const FLOOD_STDERR_MIB: usize = 16;

/// Writes `mib` MiB to standard error in lines of 4 KiB, each starting
/// with "hostile-vmm flood" (`reflector/tests/jail.rs` counts them); how
/// many MiB went out.
fn flood_stderr(mib: usize) -> usize {
    let mut line = b"hostile-vmm flood ".to_vec();
    line.resize(4095, b'x');
    line.push(b'\n');
    let mut err = std::io::stderr().lock();
    let lines = mib << 20 >> 12;
    let written = (0..lines).take_while(|_| err.write_all(&line).is_ok()).count();
    written >> 8
}

/// Threads spinning in the CPU test: three, on a machine of two cores, so
/// only the jail's quota (one core) keeps it below two.
const SPINNING_THREADS: usize = 3;

/// Tries to shrink, grow and write past the end of each regular file among
/// `fds` (its windows: the channel, the device's registers, a memory disk's
/// image), which the reflector maps too: {fd: [ftruncate to 0, fallocate
/// past the end, pwrite past the end]}.
fn resize_files(fds: &[i32]) -> Value {
    let mut tried = Map::new();
    for &fd in fds.iter().filter(|fd| **fd > 2) {
        // SAFETY: fstat(2) into a local struct, then ftruncate(2),
        // fallocate(2) and pwrite(2) of one local byte on a descriptor this
        // process holds: what a compromised vmm would try.
        let outcomes = unsafe {
            let mut stat: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut stat) < 0 || stat.st_mode & libc::S_IFMT != libc::S_IFREG {
                continue;
            }
            let end = stat.st_size;
            [
                outcome(libc::ftruncate(fd, 0).into()),
                outcome(libc::fallocate(fd, 0, end, 4096).into()),
                outcome(libc::pwrite(fd, [0u8].as_ptr().cast(), 1, end) as libc::c_long),
            ]
        };
        tried.insert(fd.to_string(), json!(outcomes));
    }
    Value::Object(tried)
}

fn main() {
    // It passes the supervisor's start check, as a compromised binary would.
    if std::env::args().any(|arg| arg == "--check") {
        return;
    }
    // A write past its file size limit fails instead of killing it: it
    // wants to go on trying.
    // SAFETY: signal(2) setting a disposition to ignore, no handler.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // A log line, as every vmm writes: it must reach the reflector's log
    // even though it may write no regular file.
    let _ = writeln!(std::io::stderr(), "hostile-vmm: trying the jail's walls");
    let mut report = Map::new();
    let mut note = |key: &str, value: Value| {
        report.insert(key.into(), value);
    };
    for path in ["/etc/passwd", "/dev/kvm", "/proc/self/status", "/sys/fs/cgroup", "/tmp", "/work", "/root"] {
        note(&format!("open {path}"), json!(open(path)));
    }
    let root: Vec<String> = std::fs::read_dir("/")
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default();
    note("root entries", json!(root));
    let open_fds: Vec<i32> =
        // SAFETY: F_GETFD only queries a descriptor number.
        (0..1024).filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0).collect();
    note("open fds", json!(open_fds));
    note("resize window files", resize_files(&open_fds));
    note("tcp 127.0.0.1:22", json!(connect_tcp(22)));
    note("tcp 127.0.0.1:80", json!(connect_tcp(80)));
    // A vsock address family ignores network namespaces.
    note("vsock socket", json!(make_socket(libc::AF_VSOCK)));
    note("unix socket", json!(make_socket(libc::AF_UNIX)));
    // An io_uring would submit calls no seccomp filter sees (the probe
    // closes a ring it made).
    let io_uring = reflector::jail::io_uring_refused().map_or_else(|| "ok".to_owned(), |e| errno_name(&e));
    note("io_uring_setup", json!(io_uring));
    // SAFETY: getpid(2), getppid(2); ptrace(2) and kill(2) aimed at the
    // parent (the keeper, or the reflector), and kill(2) probing which
    // process ids exist: each must fail or find nothing.
    unsafe {
        let me = libc::getpid();
        let parent = libc::getppid();
        note("own pid", json!(me));
        note("parent", json!(parent));
        // Its process group and session: its own, so that kill(0) and the
        // like (which name the caller's group, whatever its PID namespace)
        // reach it alone (0: a group led from outside its namespace).
        note("process group", json!(libc::getpgrp()));
        note("session", json!(libc::getsid(0)));
        note("death signal cleared", json!(outcome(libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) as libc::c_long)));
        let mut context: libc::c_ulong = 0;
        note("io_setup", json!(outcome(libc::syscall(libc::SYS_io_setup, 65536u32, &raw mut context))));
        note("ptrace parent", json!(outcome(libc::ptrace(libc::PTRACE_ATTACH, parent, 0, 0))));
        if parent > 0 {
            note("signal parent", json!(outcome(libc::kill(parent, 0) as libc::c_long)));
        }
        // Ids that name a process other than itself (ESRCH: none there).
        let visible: Vec<i32> = (1..=100_000)
            .filter(|pid| {
                *pid != me
                    && !(libc::kill(*pid, 0) < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH))
            })
            .take(20)
            .collect();
        note("other processes visible", json!(visible));
        note("setuid 0", json!(outcome(libc::setuid(0) as libc::c_long)));
        note("unshare user", json!(outcome(libc::unshare(libc::CLONE_NEWUSER) as libc::c_long)));
        // Entering another namespace (its standard input is no namespace:
        // unfiltered, the kernel would answer EINVAL).
        note("setns", json!(outcome(libc::setns(0, libc::CLONE_NEWNET) as libc::c_long)));
        note(
            "mount tmpfs",
            json!(outcome(
                libc::mount(c"x".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) as libc::c_long
            )),
        );
        let created = libc::open(c"/escape".as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
        note("create /escape", json!(outcome(created as libc::c_long)));
    }
    note("fork", json!(fork_once()));
    note("threads of 200", json!(threads_many(200)));
    note("cpu share of three threads spinning 1 s", json!(cpu_share(Duration::from_secs(1))));
    // Standard output without end (as far as the reflector can tell): a
    // supervisor that kept all of it would run out of memory.
    note("flooded stdout KiB in 1 s", json!(flood_stdout(FLOOD_TIME, FLOOD_MIB)));
    note("flooded stderr MiB", json!(flood_stderr(FLOOD_STDERR_MIB)));
    println!("{}", Value::Object(report));
    let _ = std::io::stdout().flush();
    // Last: more memory than its cgroup allows (256 MiB); each page touched.
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    for _ in 0..64 {
        hoard.push(vec![1u8; 16 << 20]);
    }
    eprintln!("hostile-vmm: took {} MiB and was not stopped", hoard.len() * 16);
}
