//! `blk-load`: drive a vhost-user-blk backend socket with virtio-blk requests and measure it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use loadgen::blk::features;
use loadgen::job::gcd;
use loadgen::malformed::Probe;
use loadgen::{BlkDevice, DeviceOptions, Error, JobKind, JobResult, JobSpec, Region, Runner};

/// Drive a vhost-user-blk backend with virtio-blk requests and measure it (the frontend side
/// that QEMU normally plays, without a guest in the way).
///
/// Jobs are the cross product of --job, --bs and --qd, run in that order (job outermost) over
/// one connection. One line per job: a table, or JSON with --json.
///
/// Example: blk-load --socket /tmp/vhost.sock --job randwrite,randread --bs 4k --qd 1,32
/// --seconds 5 --verify
///
/// Exit status: 0 all requests succeeded (and verified, with --verify); 1 some request failed
/// or some data did not verify; 2 the run could not be done (connection, setup, timeout).
///
/// With --malformed, no jobs run: a series of deliberately malformed requests probes how the
/// backend refuses them (see --malformed); exit status 0 only if every case passed.
#[derive(Parser, Debug)]
#[command(name = "blk-load", version)]
struct Cli {
    /// Path of the backend's vhost-user socket.
    #[arg(long, short = 's')]
    socket: PathBuf,

    /// Jobs: randread, randwrite, read, write (sequential), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "randread")]
    job: Vec<JobKind>,

    /// Block sizes (bytes, or with k/m suffix: 4k, 128k), comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "4k")]
    bs: Vec<u64>,

    /// Queue depths (requests kept in flight), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    qd: Vec<usize>,

    /// Run each job for this many seconds (default 5 unless --ios is given).
    #[arg(long)]
    seconds: Option<f64>,

    /// Stop each job after this many requests.
    #[arg(long)]
    ios: Option<u64>,

    /// Bytes of the device to use (k/m/g suffixes; default: all of it from --offset).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,

    /// Byte offset of the region to use.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    offset: u64,

    /// Write self-checking patterns and verify every read (read jobs first fill the region;
    /// write jobs are read back and verified afterwards).
    #[arg(long)]
    verify: bool,

    /// The region already holds the fill pattern of an earlier --verify run with the same
    /// --seed (its read jobs filled it): verify reads against it without filling. Checks that
    /// data survived a backend restart. Needs --verify and --seed.
    #[arg(long, requires_all = ["verify", "seed"])]
    assume_filled: bool,

    /// Send a flush after the last job.
    #[arg(long)]
    flush: bool,

    /// Fetch and print the device ID (GET_ID) before the jobs.
    #[arg(long)]
    get_id: bool,

    /// One JSON object per job on stdout instead of the table.
    #[arg(long)]
    json: bool,

    /// Seconds to wait for any answer from the backend (control message or completion).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,

    /// Longest time in microseconds to poll the used ring before sleeping on the call eventfd
    /// (0: never poll). The window adapts below this from the measured wait times.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,

    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX (use the flag-based suppression instead).
    #[arg(long)]
    no_event_idx: bool,

    /// Split each request's data into descriptors of at most this many bytes (default: one).
    #[arg(long, value_parser = parse_size)]
    seg_size: Option<u64>,

    /// Virtqueue size (power of two; default: smallest that fits the queue depth).
    #[arg(long)]
    queue_size: Option<u16>,

    /// Seed for offsets and patterns (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,

    /// Instead of jobs, probe the backend with malformed requests: one at a time, over one
    /// connection, deliberately malformed virtio-blk chains (short or device-writable header,
    /// data in the wrong direction, zero-length or unaligned data, sectors beyond the capacity,
    /// addresses outside the shared memory, more than seg_max segments or seg_max x size_max
    /// bytes, an unknown request type, a write to a read-only device, a read-only status
    /// byte). Each must complete with VIRTIO_BLK_S_IOERR (UNSUPP for the unknown type) and used
    /// length 1, no data written; the chain with a read-only status byte with used length 0 and
    /// no status. Each wait is bounded by --timeout. Then a normal 4k write and read-back must
    /// still work. One line per case (case, expected, got, pass/fail/skip), or one JSON object
    /// with --json. Uses --timeout, --queue-size (default 256), --no-event-idx, --spin-us and
    /// --seed; job options do not apply. Example: blk-load --socket /tmp/vhost.sock --malformed
    #[arg(
        long,
        conflicts_with_all = [
            "job", "bs", "qd", "seconds", "ios", "size", "offset", "verify", "assume_filled", "flush", "get_id",
            "seg_size",
        ]
    )]
    malformed: bool,

    /// Instead of jobs, act as a hostile client once, then hold the connection until standard
    /// input closes (at most --timeout): memory-beyond-file (a memory table region of 64 TiB on a
    /// 1 MiB memfd), shrink-memory (truncate the memfd under the backend, then submit a write
    /// whose payload lies past the new end), avail-overrun (an avail index beyond the queue
    /// size), swap-memory (tables past their memfd's end while the queue is kicked), or idle (a well-behaved client that just stays connected). Prints one line (JSON with --json) saying whether the backend refused. For tests
    /// that check a backend survives such a client. Example: blk-load -s /tmp/d.sock --hostile
    /// shrink-memory --timeout 30 < /dev/null
    #[arg(long, value_name = "CASE", value_parser = loadgen::hostile::Case::parse, conflicts_with = "malformed")]
    hostile: Option<loadgen::hostile::Case>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = [("kib", 1u64 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("k", 1 << 10), ("m", 1 << 20)]
        .iter()
        .chain(&[("g", 1u64 << 30), ("t", 1 << 40), ("b", 1)])
        .find_map(|(suf, m)| lower.strip_suffix(suf).map(|n| (n.to_string(), *m)))
        .unwrap_or((lower.clone(), 1));
    let n: u64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size (examples: 4096, 4k, 128k, 1m, 2g)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size '{s}' is too large"))
}

fn human_size(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{}g", b >> 30)
    } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}m", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}k", b >> 10)
    } else {
        b.to_string()
    }
}

fn run(cli: &Cli) -> Result<bool, Error> {
    if cli.malformed {
        return run_malformed(cli);
    }
    if let Some(case) = cli.hostile {
        return run_hostile(cli, case);
    }
    if cli.bs.is_empty() || cli.qd.is_empty() || cli.job.is_empty() {
        return Err(Error::InvalidJob("--job, --bs and --qd need at least one value".into()));
    }
    for &b in &cli.bs {
        if b == 0 || !b.is_multiple_of(512) || b > 64 << 20 {
            return Err(Error::InvalidJob(format!("block size {b} is not a multiple of 512 in 512..=64m")));
        }
    }
    if cli.qd.contains(&0) {
        return Err(Error::InvalidJob("queue depth must be at least 1".into()));
    }
    let timeout = timeout(cli)?;
    if let Some(s) = cli.seconds {
        if !(s > 0.0 && s.is_finite()) {
            return Err(Error::InvalidJob("--seconds must be positive".into()));
        }
    }
    let max_bs = cli.bs.iter().copied().max().unwrap_or(4096);
    let max_qd = cli.qd.iter().copied().max().unwrap_or(1);
    let granule = cli.bs.iter().copied().fold(0, gcd);
    // Verification fills and reads back in chunks of up to 128 KiB.
    let buf_size = if cli.verify { max_bs.max(128 << 10) / granule * granule } else { max_bs };
    let opts = DeviceOptions {
        timeout,
        event_idx: !cli.no_event_idx,
        slots: max_qd,
        buf_size: buf_size as usize,
        seg_size: cli.seg_size.map(|s| s as usize),
        queue_size: cli.queue_size,
        spin: Duration::from_micros(cli.spin_us),
        scratch: 0,
    };
    let mut dev = BlkDevice::connect(&cli.socket, &opts)?;
    let cfg = *dev.config();
    let neg = *dev.negotiated();
    eprintln!(
        "blk-load: {}: {} bytes ({} sectors), blk_size {}, seg_max {}, size_max {}, queues {}; features [{}]; queue size {}, {} MiB shared",
        cli.socket.display(),
        cfg.capacity_bytes(),
        cfg.capacity,
        cfg.blk_size,
        cfg.seg_max,
        cfg.size_max,
        neg.queues,
        features::names(neg.acked).join(" "),
        dev.queue_size(),
        dev.mem_size() >> 20
    );
    if cli.get_id {
        match dev.get_id()? {
            Some(id) => println!("device id: {id:?}"),
            None => eprintln!("blk-load: device does not support GET_ID"),
        }
    }
    let cap = cfg.capacity_bytes();
    if cli.offset >= cap {
        return Err(Error::DeviceTooSmall(format!("--offset {} is beyond the device's {} bytes", cli.offset, cap)));
    }
    let len = match cli.size {
        Some(s) if cli.offset.checked_add(s).is_none_or(|e| e > cap) => {
            return Err(Error::DeviceTooSmall(format!(
                "--size {} at --offset {} needs {} bytes, the device has {}",
                s,
                cli.offset,
                cli.offset.saturating_add(s),
                cap
            )))
        }
        Some(s) => s,
        None => cap - cli.offset,
    };
    let region = Region { offset: cli.offset, len };
    let seed = cli.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    });
    if cli.verify {
        eprintln!("blk-load: verification seed {seed} (pass --seed {seed} to reproduce)");
    }
    let duration = match (cli.seconds, cli.ios) {
        (Some(s), _) => Some(Duration::from_secs_f64(s)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(5)),
    };
    let mut clean = true;
    {
        let mut runner = Runner::new(&mut dev, region, cli.verify, granule, seed)?;
        if cli.assume_filled {
            runner.assume_filled()?;
        }
        if !cli.json {
            println!(
                "{:<10} {:>6} {:>4} {:>10} {:>9} {:>9} {:>9} {:>7} {:>10}",
                "job", "bs", "qd", "IOPS", "MB/s", "p50(us)", "p99(us)", "errors", "mismatches"
            );
        }
        for &kind in &cli.job {
            for &bs in &cli.bs {
                for &qd in &cli.qd {
                    let spec = JobSpec { kind, bs: bs as usize, qd, duration, ios: cli.ios };
                    let r = runner.run(&spec)?;
                    clean &= r.errors == 0 && r.mismatches == 0;
                    print_result(&r, cli.json);
                }
            }
        }
    }
    if cli.flush {
        let status = dev.flush()?;
        if status != loadgen::blk::VIRTIO_BLK_S_OK {
            eprintln!("blk-load: flush failed with status {status} ({})", loadgen::blk::status_name(status));
            clean = false;
        } else {
            eprintln!("blk-load: flush OK");
        }
    }
    dev.shutdown()?;
    Ok(clean)
}

fn timeout(cli: &Cli) -> Result<Duration, Error> {
    if !(cli.timeout > 0.0 && cli.timeout.is_finite()) {
        return Err(Error::InvalidJob("--timeout must be a positive number of seconds".into()));
    }
    Ok(Duration::from_secs_f64(cli.timeout))
}

/// One 4 KiB request slot, for probes that send one chain at a time.
fn one_slot_options(cli: &Cli) -> Result<DeviceOptions, Error> {
    Ok(DeviceOptions {
        timeout: timeout(cli)?,
        event_idx: !cli.no_event_idx,
        slots: 1,
        buf_size: 4096,
        seg_size: None,
        queue_size: cli.queue_size,
        spin: Duration::from_micros(cli.spin_us),
        scratch: 0,
    })
}

fn run_hostile(cli: &Cli, case: loadgen::hostile::Case) -> Result<bool, Error> {
    let opts = one_slot_options(cli)?;
    let json = cli.json;
    loadgen::hostile::run(&cli.socket, case, &opts, |outcome| {
        if json {
            println!("{}", serde_json::to_string(outcome).unwrap_or_default());
        } else {
            println!("blk-load: hostile {}: refused={} ({})", outcome.case, outcome.refused, outcome.detail);
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(true)
}

fn run_malformed(cli: &Cli) -> Result<bool, Error> {
    let opts = one_slot_options(cli)?;
    let seed = cli.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64
    });
    let mut probe = Probe::connect(&cli.socket, opts, seed)?;
    let t = probe.target().clone();
    let neg = probe.device().map(|d| d.negotiated().acked).unwrap_or_default();
    eprintln!(
        "blk-load: {}: malformed-request probe; {} sectors, seg_max {}, size_max {}{}; features [{}]; queue size {}, shared memory {:#x}..{:#x}",
        cli.socket.display(),
        t.capacity,
        t.seg_max,
        t.size_max,
        if t.read_only { ", read-only" } else { "" },
        features::names(neg).join(" "),
        t.queue_size,
        t.mem.start,
        t.mem.end
    );
    if !cli.json {
        println!("{:<40} {:<24} {:<40} result", "case", "expected", "got");
    }
    let results = probe.run(|r| {
        if cli.json {
            match serde_json::to_string(r) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("blk-load: cannot encode the result as JSON: {e}"),
            }
        } else {
            println!("{:<40} {:<24} {:<40} {}", r.case, r.expected, r.got, r.result);
        }
    });
    let count = |what: &str| results.iter().filter(|r| r.result == what).count();
    let sent = results.iter().filter(|r| r.malformed && r.sent).count();
    eprintln!(
        "blk-load: malformed probe: {} passed, {} failed, {} skipped; {sent} malformed chain(s) sent; {} reconnect(s)",
        count("pass"),
        count("fail"),
        count("skip"),
        probe.reconnects()
    );
    Ok(results.iter().all(|r| r.ok()))
}

fn print_result(r: &JobResult, json: bool) {
    if json {
        match serde_json::to_string(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("blk-load: cannot encode the result as JSON: {e}"),
        }
    } else {
        println!(
            "{:<10} {:>6} {:>4} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>10}",
            r.job,
            human_size(r.bs as u64),
            r.qd,
            r.iops,
            r.mb_s,
            r.lat_p50_us,
            r.lat_p99_us,
            r.errors,
            r.mismatches
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if cli.malformed => {
            eprintln!("blk-load: FAILED: some malformed-request cases did not complete as expected (see above)");
            ExitCode::from(1)
        }
        Ok(false) => {
            eprintln!("blk-load: FAILED: some requests failed or did not verify (see above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("blk-load: error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(131072));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999t").is_err());
        assert_eq!(human_size(131072), "128k");
        assert_eq!(human_size(1000), "1000");
    }

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from([
            "blk-load",
            "--socket",
            "/x",
            "--job",
            "randwrite,randread",
            "--bs",
            "4k,128k",
            "--qd",
            "1,32",
        ])
        .unwrap();
        assert_eq!(c.job, vec![JobKind::RandWrite, JobKind::RandRead]);
        assert_eq!(c.bs, vec![4096, 131072]);
        assert_eq!(c.qd, vec![1, 32]);
        assert!(Cli::try_parse_from(["blk-load", "--socket", "/x", "--job", "bogus"]).is_err());
        assert!(!c.malformed);
    }

    #[test]
    fn malformed_cli() {
        let c = Cli::try_parse_from(["blk-load", "-s", "/x", "--malformed", "--json", "--timeout", "5"]).unwrap();
        assert!(c.malformed && c.json);
        assert!(Cli::try_parse_from(["blk-load", "-s", "/x", "--malformed", "--queue-size", "1024"]).is_ok());
        // Job options make no sense with the probe.
        assert!(Cli::try_parse_from(["blk-load", "-s", "/x", "--malformed", "--job", "read"]).is_err());
        assert!(Cli::try_parse_from(["blk-load", "-s", "/x", "--malformed", "--verify"]).is_err());
    }
}
