//! End-to-end tests of `net-load` against `dpdk-testpmd` (package dpdk) forwarding between two
//! vhost-user-net ports (`--forward-mode=io`: port 0 to port 1 and back). Skipped with a loud
//! message when testpmd is not installed, and failed instead when `CI` is set. testpmd is
//! time-bounded (a watchdog kills it), killed by pid at the end, and exits by itself if this
//! process dies (its standard input, a pipe we hold, reaches end of file).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use loadgen::net::device::{NetOptions, Waiter};
use loadgen::net::run::{self, NetPair, PingSpec, ThroughputSpec};

const NET_LOAD: &str = env!("CARGO_BIN_EXE_net-load");
/// Longest a testpmd instance may live.
const TESTPMD_LIMIT: Duration = Duration::from_secs(180);

/// testpmd spins a whole core: never two at once from this file.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The directory of DPDK's drivers: `DPDK_PMDS` if set, else the distribution's
/// `/usr/lib/<triplet>/dpdk/pmds-<abi>`, if it holds the vhost and ring mempool drivers.
fn find_pmds() -> Option<PathBuf> {
    let has = |d: &Path| d.join("librte_net_vhost.so").exists() && d.join("librte_mempool_ring.so").exists();
    if let Some(d) = std::env::var_os("DPDK_PMDS") {
        return Some(PathBuf::from(d)).filter(|d| has(d));
    }
    let mut found = Vec::new();
    for lib in std::fs::read_dir("/usr/lib").ok()?.flatten() {
        for d in std::fs::read_dir(lib.path().join("dpdk")).into_iter().flatten().flatten() {
            if d.file_name().to_string_lossy().starts_with("pmds-") && has(&d.path()) {
                found.push(d.path());
            }
        }
    }
    found.sort();
    found.pop()
}

/// testpmd and its drivers' directory.
fn find_testpmd() -> Option<(PathBuf, PathBuf)> {
    let path = std::env::var_os("PATH")?;
    let bin = std::env::split_paths(&path).map(|d| d.join("dpdk-testpmd")).find(|p| p.is_file())?;
    Some((bin, find_pmds()?))
}

/// testpmd and its drivers, or None (after a loud message) if the test must be skipped.
fn testpmd_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    match find_testpmd() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("{test}: dpdk-testpmd (or its vhost and mempool drivers) is not installed and CI is set")
        }
        None => {
            // Written to the real stderr, past the test harness's output capture.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! {test} skipped: dpdk-testpmd not installed (apt-get install dpdk) !!!!!!!!\n"
            );
            None
        }
    }
}

/// A running testpmd forwarding between two vhost-user ports; killed and cleaned up on drop.
struct Testpmd {
    child: Option<Child>,
    stop_watchdog: Option<mpsc::Sender<()>>,
    dir: PathBuf,
    prefix: String,
    s0: PathBuf,
    s1: PathBuf,
}

impl Testpmd {
    fn start((bin, pmds): &(PathBuf, PathBuf), name: &str) -> Testpmd {
        let dir = std::env::temp_dir().join(format!("net-load-it-{}-{}", name, std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (s0, s1) = (dir.join("s0.sock"), dir.join("s1.sock"));
        let log = File::create(dir.join("testpmd.log")).expect("log");
        let prefix = format!("netload{}{}", name, std::process::id());
        let child = Command::new(bin)
            .args(["-l", "0-1", "--no-huge", "-m", "1024", "--no-pci"])
            .arg(format!("--file-prefix={prefix}"))
            .arg("-d")
            .arg(pmds.join("librte_mempool_ring.so"))
            .arg("-d")
            .arg(pmds.join("librte_net_vhost.so"))
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={}", s0.display()))
            .arg("--vdev")
            .arg(format!("net_vhost1,iface={}", s1.display()))
            .args(["--", "--forward-mode=io", "--nb-cores=1", "--total-num-mbufs=16384", "--no-mlockall"])
            .arg("--auto-start")
            // Non-interactive testpmd runs until a line (or end of file) on its standard input.
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning dpdk-testpmd");
        let pid = child.id() as libc::pid_t;
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if rx.recv_timeout(TESTPMD_LIMIT) == Err(mpsc::RecvTimeoutError::Timeout) {
                eprintln!("dpdk-testpmd ran longer than {TESTPMD_LIMIT:?}: killing it");
                // SAFETY: plain kill(2) of the child we spawned (not yet reaped: the owner waits
                // only after stopping this thread).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        let mut t = Testpmd { child: Some(child), stop_watchdog: Some(tx), dir, prefix, s0, s1 };
        let deadline = Instant::now() + Duration::from_secs(20);
        // The sockets exist once testpmd listens (its log is block-buffered, so not a signal);
        // a connection made before the ports start waits in the backlog.
        while !(t.s0.exists() && t.s1.exists()) {
            if let Some(st) = t.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("dpdk-testpmd exited with {st}: {}", t.log());
            }
            assert!(Instant::now() < deadline, "dpdk-testpmd did not create its sockets in 20 s: {}", t.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("testpmd.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop_watchdog.take();
    }

    /// Ends testpmd as it asks (end of file on its input), killing it if it takes over 3 s.
    fn stop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            drop(c.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        // DPDK's runtime directory for our --file-prefix.
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

fn opts() -> NetOptions {
    NetOptions { timeout: Duration::from_secs(10), ..NetOptions::default() }
}

#[test]
fn throughput_and_pingpong_through_testpmd() {
    let Some(bin) = testpmd_or_skip("throughput_and_pingpong_through_testpmd") else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let t = Testpmd::start(&bin, "tp");
    let mut pair = NetPair::connect(&t.s0, &t.s1, &opts()).expect("connect");
    assert!(!pair.loopback());
    let mut waiter = Waiter::new(Duration::from_micros(50));
    pair.warm_up(None, None, false, &mut waiter).expect("warm-up");
    let spec = ThroughputSpec {
        size: 64,
        duration: Duration::from_secs(1),
        window: 256,
        burst: 32,
        bidir: false,
        stall: Duration::from_millis(50),
        dst: None,
        src: None,
        run_id: 100,
    };
    for size in [64, 1514] {
        let r = run::throughput(
            &mut pair,
            &ThroughputSpec { size, run_id: 100 + size as u32, ..spec.clone() },
            &mut waiter,
            |_| {},
        )
        .expect("throughput run");
        eprintln!("testpmd throughput {size} B: {r:?}");
        assert!(r.received > 1000, "{r:?}");
        assert_eq!((r.corrupted, r.duplicates), (0, 0), "{r:?}");
        assert!(r.received <= r.sent);
        assert!(r.mpps > 0.0 && r.gbps > 0.0);
    }
    let ping = PingSpec {
        size: 64,
        duration: None,
        count: Some(200),
        loss_timeout: Duration::from_secs(1),
        dst: None,
        src: None,
        run_id: 200,
    };
    let r = run::pingpong(&mut pair, &ping, &mut waiter, |_| {}).expect("pingpong");
    eprintln!("testpmd pingpong: {r:?}");
    assert_eq!(r.sent, 200);
    assert!(r.received >= 190, "{r:?}");
    assert_eq!((r.corrupted, r.duplicates), (0, 0), "{r:?}");
    assert!(r.rtt_p50_us > 0.0 && r.rtt_p50_us <= r.rtt_p99_us, "{r:?}");
    pair.shutdown(&mut waiter).expect("shutdown");
}

#[test]
fn frames_spanning_rx_buffers_and_both_directions() {
    let Some(bin) = testpmd_or_skip("frames_spanning_rx_buffers_and_both_directions") else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let t = Testpmd::start(&bin, "mrg");
    // 1514-byte frames (1526 with the header) in 512-byte RX buffers: 3 buffers each (testpmd
    // offers MRG_RXBUF).
    let o = NetOptions { rx_buf_size: 512, ..opts() };
    let mut pair = NetPair::connect(&t.s0, &t.s1, &o).expect("connect");
    assert!(pair.b().mrg_rxbuf(), "testpmd's vhost PMD offers MRG_RXBUF");
    let mut waiter = Waiter::new(Duration::from_micros(50));
    pair.warm_up(None, None, true, &mut waiter).expect("warm-up");
    let spec = ThroughputSpec {
        size: 1514,
        duration: Duration::from_millis(700),
        window: 256,
        burst: 32,
        bidir: true,
        stall: Duration::from_millis(50),
        dst: None,
        src: None,
        run_id: 300,
    };
    let r = run::throughput(&mut pair, &spec, &mut waiter, |_| {}).expect("throughput run");
    eprintln!("testpmd bidir 1514 B in 512 B buffers: {r:?}");
    assert_eq!(r.flows.len(), 2);
    assert_eq!(r.window, 85, "the window is what the RX queue holds: 256 buffers / 3 per frame");
    for f in &r.flows {
        assert!(f.received > 100, "{f:?}");
    }
    assert!(r.multi_buffer_frames >= r.received, "{r:?}");
    assert_eq!((r.corrupted, r.duplicates), (0, 0), "{r:?}");
    pair.shutdown(&mut waiter).expect("shutdown");
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs net-load; `during` runs while it is alive, with a receiver of its stderr lines; the
/// run is killed after `limit`.
fn net_load_with(args: &[&str], limit: Duration, during: impl FnOnce(&mpsc::Receiver<String>)) -> Run {
    let start = Instant::now();
    let mut child = Command::new(NET_LOAD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning net-load");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let (lines_tx, lines) = mpsc::channel();
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(&mut err).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line.clone());
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    during(&lines);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("net-load {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let run = Run {
        code: status.code(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    };
    eprintln!("--- net-load {args:?} -> {status}\n{}{}", run.stdout, run.stderr);
    run
}

#[test]
fn cli_json_and_backend_death() {
    let Some(bin) = testpmd_or_skip("cli_json_and_backend_death") else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut t = Testpmd::start(&bin, "cli");
    let (s0, s1) = (t.s0.to_str().expect("utf-8").to_string(), t.s1.to_str().expect("utf-8").to_string());
    let r = net_load_with(
        &["--tx", &s0, "--rx", &s1, "--size", "60,1000", "--seconds", "0.5", "--json"],
        Duration::from_secs(60),
        |_| {},
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<serde_json::Value> =
        r.stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(lines.len(), 2);
    for (l, size) in lines.iter().zip([60, 1000]) {
        assert_eq!(l["mode"], "throughput");
        assert_eq!(l["size"], size);
        assert_eq!(l["corrupted"], 0);
        assert_eq!(l["duplicates"], 0);
        assert!(l["received"].as_u64().unwrap_or(0) > 0, "{l}");
    }
    let r = net_load_with(
        &["--tx", &s0, "--rx", &s1, "--pingpong", "--count", "50", "--json"],
        Duration::from_secs(60),
        |_| {},
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let l: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("JSON");
    assert_eq!((l["mode"].as_str(), l["sent"].as_u64()), (Some("pingpong"), Some(50)));

    // testpmd dies during a run: a clear error naming a socket, not a hang or a panic.
    let r = net_load_with(
        &["--tx", &s0, "--rx", &s1, "--seconds", "60", "--timeout", "5"],
        Duration::from_secs(30),
        |lines| {
            // Frames are flowing once the first progress line is out.
            let deadline = Instant::now() + Duration::from_secs(20);
            while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                if line.contains("/60 s: sent") {
                    break;
                }
            }
            t.kill();
        },
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("backend closed the connection"), "{}", r.stderr);
    assert!(r.stderr.contains(&s0) || r.stderr.contains(&s1), "the error names the socket: {}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(20));
}

#[test]
fn missing_socket_is_a_clear_error() {
    let r = net_load_with(
        &["--tx", "/nonexistent/net-load.sock", "--rx", "/nonexistent/b.sock"],
        Duration::from_secs(30),
        |_| {},
    );
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("/nonexistent/net-load.sock") && r.stderr.contains("does not exist"), "{}", r.stderr);
}
