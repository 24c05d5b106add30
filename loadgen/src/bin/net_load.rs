//! `net-load`: send Ethernet frames through vhost-user-net backends and measure them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use loadgen::net::device::{NetDevice, NetOptions, Waiter};
use loadgen::net::frame::{MAX_FRAME, MIN_FRAME};
use loadgen::net::malformed::{self, Probe};
use loadgen::net::run::{self, NetPair, PingResult, PingSpec, Progress, ThroughputResult, ThroughputSpec};
use loadgen::net::{features, format_mac, parse_mac};
use loadgen::Error;

/// Send Ethernet frames through vhost-user-net backends and measure them (the frontend side
/// that QEMU normally plays, without a guest in the way).
///
/// Frames go out on the TX queue (virtqueue 1) of the device at --tx and are expected back on
/// the RX queue (virtqueue 0) of the device at --rx, through whatever forwards between the two
/// (a switch, dpdk-testpmd); --tx and --rx may be the same socket. Every frame carries a run
/// id, a sequence number, its send time and a pattern derived from them, so the receiver counts
/// frames received, lost, duplicated, corrupted and out of order.
///
/// Throughput (default): frames of --size bytes as fast as a window of --window frames in
/// flight allows, for --seconds; reports Mpps, Gbit/s of frame bytes, loss and one-way latency.
/// --pingpong: one frame at a time, reports round-trip time p50/p99/mean.
/// --malformed: sends malformed descriptor chains instead (see that option).
///
/// Example: net-load --tx /tmp/port0.sock --rx /tmp/port1.sock --size 64,1514 --seconds 5
///
/// Exit status: 0 frames arrived, none corrupted or duplicated (--malformed: every case passed);
/// 1 nothing arrived, or some frame arrived corrupted or twice (--malformed: a case or a check
/// failed, or the backend hung up during the probe); 2 the run could not be done (connection,
/// setup, timeout, backend hung up).
#[derive(Parser, Debug)]
#[command(name = "net-load", version)]
struct Cli {
    /// vhost-user-net socket of the device whose TX queue sends the frames.
    #[arg(long)]
    tx: PathBuf,

    /// vhost-user-net socket of the device whose RX queue receives them (may equal --tx).
    #[arg(long)]
    rx: PathBuf,

    /// Frame sizes in bytes without FCS, 60..=1514, comma-separated (one run each).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    size: Vec<usize>,

    /// Seconds per run (default 5; with --pingpong and --count, no time limit).
    #[arg(long)]
    seconds: Option<f64>,

    /// Ping-pong: one frame at a time, measuring the round-trip time.
    #[arg(long)]
    pingpong: bool,

    /// With --pingpong: stop after this many frames.
    #[arg(long, requires = "pingpong")]
    count: Option<u64>,

    /// Also send from --rx to --tx at the same time (throughput only).
    #[arg(long, conflicts_with = "pingpong")]
    bidir: bool,

    /// Frames in flight per direction at most (sent, not yet received).
    #[arg(long, default_value_t = 256)]
    window: usize,

    /// Frames queued per TX kick at most.
    #[arg(long, default_value_t = 32)]
    burst: usize,

    /// Destination MAC (default: the --rx device's MAC from its config space, else broadcast).
    #[arg(long, value_parser = parse_mac)]
    dst_mac: Option<[u8; 6]>,

    /// Source MAC (default: the --tx device's MAC, else 02:6e:6c:00:00:01).
    #[arg(long, value_parser = parse_mac)]
    src_mac: Option<[u8; 6]>,

    /// One JSON object per run on stdout instead of the table.
    #[arg(long)]
    json: bool,

    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,

    /// Seconds to wait for any control answer, or for the backend to complete TX frames.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,

    /// Throughput: with frames in flight and none arriving for this many milliseconds, those
    /// frames are given up (lost unless they arrive later) and the window reopens; also how
    /// long the end of a run waits for the last frames.
    #[arg(long, default_value_t = 50)]
    stall_ms: u64,

    /// Ping-pong: a frame not back within this many milliseconds is lost.
    #[arg(long, default_value_t = 1000)]
    loss_timeout_ms: u64,

    /// Longest time in microseconds to poll the rings before sleeping on the call eventfds
    /// (0: never poll); adapts below this from the measured waits.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,

    /// Size of both virtqueues (power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,

    /// Bytes per RX buffer; smaller than a frame needs MRG_RXBUF (frames then span buffers).
    #[arg(long, default_value_t = 2048)]
    rx_buf_size: usize,

    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,

    /// Do not negotiate VIRTIO_NET_F_MRG_RXBUF.
    #[arg(long)]
    no_mrg_rxbuf: bool,

    /// Run id of the first run (default: from the clock); each run and direction uses the next.
    #[arg(long)]
    run_id: Option<u32>,

    /// Probe how the backend refuses malformed descriptor chains instead of measuring: on the TX
    /// queue of --tx, device-writable, too short, 4000-byte, zero-length and out-of-memory
    /// chains, garbage, badly sized, nested and looping indirect tables, `next` loops and
    /// `next` out of range; on the RX queue of --rx, device-readable, 4-byte and out-of-memory
    /// buffers. Each must come back (RX ones with used length 0, or never filled) without a
    /// hang, a hang-up, a write into it or a frame of it arriving; well-formed frames sent
    /// between cases must arrive intact. One line per case, or one JSON object with --json.
    #[arg(long, conflicts_with_all = ["pingpong", "bidir", "count", "seconds"])]
    malformed: bool,
}

fn describe(role: &str, d: &NetDevice) {
    let neg = d.negotiated();
    let cfg = d.config();
    let mac = cfg.mac.map_or_else(|| "none".to_string(), |m| format_mac(&m));
    let link = match cfg.link_up {
        Some(true) => "up",
        Some(false) => "DOWN",
        None => "unknown",
    };
    eprintln!(
        "net-load: {role} {}: mac {mac}, link {link}; features [{}]; queue size {}, RX buffers {} bytes",
        d.path().display(),
        features::names(neg.acked).join(" "),
        d.queue_size(),
        d.rx_buf_size()
    );
    if let Some(e) = d.config_error() {
        eprintln!("net-load: {role} {}: config space not readable: {e}", d.path().display());
    }
}

fn progress(quiet: bool, total: Option<f64>) -> impl FnMut(&Progress) {
    move |p: &Progress| {
        if !quiet {
            let of = total.map(|t| format!("/{t}")).unwrap_or_default();
            eprintln!(
                "net-load: {:.0}{of} s: sent {}, received {} ({:.3} Mpps)",
                p.elapsed, p.sent, p.received, p.mpps
            );
        }
    }
}

/// The malformed probe over a connected, warmed-up pair: true if it passed. Errors before the
/// first case are setup errors; the backend failing during the probe is a failed probe.
fn run_malformed(cli: &Cli, mut pair: NetPair, waiter: &mut Waiter) -> Result<bool, Error> {
    let timeout = Duration::from_secs_f64(cli.timeout);
    let mut probe = Probe::new(&mut pair, waiter, timeout)?;
    probe.baseline()?;
    let (json, quiet) = (cli.json, cli.quiet);
    if !json {
        println!("{:<34} {:>5} {:>4} {:>8} {:>8}  result", "case", "queue", "sent", "returned", "used len");
    }
    let mut report = probe.run(|r, check| {
        if json {
            if !quiet {
                eprintln!("net-load: malformed: {} ({}): {} - {}", r.name, r.queue.name(), r.result, r.detail);
            }
        } else {
            println!(
                "{:<34} {:>5} {:>4} {:>8} {:>8}  {}: {}",
                r.name,
                r.queue.name(),
                if r.sent { "yes" } else { "no" },
                if r.returned { "yes" } else { "no" },
                r.used_len.map_or_else(|| "-".to_string(), |l| l.to_string()),
                r.result,
                r.detail
            );
        }
        if let Some(c) = check.filter(|c| !c.passed) {
            eprintln!(
                "net-load: malformed: after {}: only {} of {} good frames arrived intact ({} corrupted, {} duplicated)",
                c.after, c.received, c.sent, c.corrupted, c.duplicates
            );
        }
    });
    if report.error.is_none() {
        if let Err(e) = pair.shutdown(waiter) {
            report.error = Some(format!("stopping the queues after the probe: {e}"));
            report.passed = false;
        }
    }
    if json {
        print_json(&report);
    } else {
        println!(
            "malformed probe: {} case(s) sent ({} TX, {} RX), {} returned, {} failed, {} skipped; good frames {}/{} \
             intact; leaked frames {}; {}",
            report.tx_cases + report.rx_cases,
            report.tx_cases,
            report.rx_cases,
            report.returned,
            report.failed,
            report.skipped,
            report.good_frames_received,
            report.good_frames_sent,
            report.leaked_frames,
            if report.passed { "PASSED" } else { "FAILED" }
        );
    }
    if let Some(e) = &report.error {
        eprintln!("net-load: malformed probe stopped: {e}");
    }
    Ok(report.passed)
}

fn run(cli: &Cli) -> Result<bool, Error> {
    if !(cli.timeout > 0.0 && cli.timeout.is_finite()) {
        return Err(Error::InvalidJob("--timeout must be a positive number of seconds".into()));
    }
    if let Some(s) = cli.seconds {
        if !(s > 0.0 && s.is_finite()) {
            return Err(Error::InvalidJob("--seconds must be positive".into()));
        }
    }
    if cli.size.is_empty() {
        return Err(Error::InvalidJob("--size needs at least one value".into()));
    }
    for &s in &cli.size {
        if !(MIN_FRAME..=MAX_FRAME).contains(&s) {
            return Err(Error::InvalidJob(format!("frame size {s} is not in {MIN_FRAME}..={MAX_FRAME}")));
        }
    }
    let mut opts = NetOptions {
        timeout: Duration::from_secs_f64(cli.timeout),
        event_idx: !cli.no_event_idx,
        mrg_rxbuf: !cli.no_mrg_rxbuf,
        queue_size: cli.queue_size,
        rx_buf_size: cli.rx_buf_size,
        ..NetOptions::default()
    };
    if cli.malformed {
        opts.indirect_desc = true;
        opts.raw_descs = malformed::RAW_DESCS;
        // Enough for every case the probe may build.
        opts.scratch = malformed::scratch_bytes(64);
        if cli.queue_size < 2 * malformed::RAW_DESCS {
            return Err(Error::InvalidJob(format!(
                "--malformed needs --queue-size of at least {}",
                2 * malformed::RAW_DESCS
            )));
        }
    }
    let mut pair = NetPair::connect(&cli.tx, &cli.rx, &opts)?;
    if pair.loopback() {
        describe("tx+rx", pair.a());
    } else {
        describe("tx", pair.a());
        describe("rx", pair.b());
    }
    let (dst, src) = pair.macs(cli.dst_mac, cli.src_mac);
    eprintln!("net-load: frames {} -> {}, ethertype 0x88b5", format_mac(&src), format_mac(&dst));
    let mut waiter = Waiter::new(Duration::from_micros(cli.spin_us));
    let took = pair.warm_up(cli.dst_mac, cli.src_mac, cli.bidir, &mut waiter)?;
    eprintln!("net-load: path up: a warm-up frame came through after {:.1} ms", took.as_secs_f64() * 1e3);
    if cli.malformed {
        return run_malformed(cli, pair, &mut waiter);
    }
    let mut run_id = cli.run_id.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u32) ^ std::process::id().rotate_left(16)
    }) & !1;
    let seconds = cli.seconds.map(Duration::from_secs_f64);
    let mut clean = true;
    if !cli.json {
        if cli.pingpong {
            println!(
                "{:>5} {:>8} {:>9} {:>9} {:>6} {:>5} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "size",
                "seconds",
                "sent",
                "received",
                "lost",
                "late",
                "corrupt",
                "dup",
                "rtt p50",
                "rtt p99",
                "mean",
                "max(us)"
            );
        } else {
            println!(
                "{:>5} {:>7} {:>11} {:>11} {:>9} {:>8} {:>5} {:>7} {:>6} {:>8} {:>7} {:>8} {:>8}",
                "size",
                "seconds",
                "sent",
                "received",
                "lost",
                "loss%",
                "dup",
                "corrupt",
                "ooo",
                "Mpps",
                "Gbit/s",
                "lat p50",
                "p99(us)"
            );
        }
    }
    for &size in &cli.size {
        if cli.pingpong {
            let duration = match (seconds, cli.count) {
                (None, None) => Some(Duration::from_secs(5)),
                (s, _) => s,
            };
            let spec = PingSpec {
                size,
                duration,
                count: cli.count,
                loss_timeout: Duration::from_millis(cli.loss_timeout_ms.max(1)),
                dst: cli.dst_mac,
                src: cli.src_mac,
                run_id,
            };
            let total = duration.map(|d| d.as_secs_f64()).filter(|d| *d >= 2.0);
            let r = run::pingpong(&mut pair, &spec, &mut waiter, progress(cli.quiet || total.is_none(), total))?;
            clean &= report_ping(&r, cli.json);
        } else {
            let duration = seconds.unwrap_or(Duration::from_secs(5));
            let spec = ThroughputSpec {
                size,
                duration,
                window: cli.window,
                burst: cli.burst,
                bidir: cli.bidir,
                stall: Duration::from_millis(cli.stall_ms.max(1)),
                dst: cli.dst_mac,
                src: cli.src_mac,
                run_id,
            };
            let secs = duration.as_secs_f64();
            let r = run::throughput(&mut pair, &spec, &mut waiter, progress(cli.quiet || secs < 2.0, Some(secs)))?;
            clean &= report_throughput(&r, cli.json);
        }
        run_id = run_id.wrapping_add(2);
    }
    pair.shutdown(&mut waiter)?;
    Ok(clean)
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("net-load: cannot encode the result as JSON: {e}"),
    }
}

fn report_throughput(r: &ThroughputResult, json: bool) -> bool {
    if json {
        print_json(r);
    } else {
        println!(
            "{:>5} {:>7.2} {:>11} {:>11} {:>9} {:>8.3} {:>5} {:>7} {:>6} {:>8.3} {:>7.3} {:>8.1} {:>8.1}",
            r.size,
            r.seconds,
            r.sent,
            r.received,
            r.lost,
            r.loss_pct,
            r.duplicates,
            r.corrupted,
            r.out_of_order,
            r.mpps,
            r.gbps,
            r.lat_p50_us,
            r.lat_p99_us
        );
        if r.flows.len() > 1 {
            for f in &r.flows {
                println!(
                    "      {}: sent {}, received {}, lost {} ({:.3}%), {:.3} Mpps, {:.3} Gbit/s",
                    f.direction, f.sent, f.received, f.lost, f.loss_pct, f.mpps, f.gbps
                );
            }
        }
    }
    for f in &r.flows {
        if f.lost > 0 {
            eprintln!(
                "net-load: {}: {} frame(s) lost in {} gap(s), first {:?}; window reopened {} time(s)",
                f.direction, f.lost, f.gap_runs, f.first_lost, f.window_resets
            );
        }
    }
    if r.stray + r.foreign > 0 {
        eprintln!(
            "net-load: also received {} frame(s) of other runs and {} that are not test frames",
            r.stray, r.foreign
        );
    }
    check(r.received, r.corrupted, r.duplicates)
}

fn report_ping(r: &PingResult, json: bool) -> bool {
    if json {
        print_json(r);
    } else {
        println!(
            "{:>5} {:>8.2} {:>9} {:>9} {:>6} {:>5} {:>8} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            r.size,
            r.seconds,
            r.sent,
            r.received,
            r.lost,
            r.late,
            r.corrupted,
            r.duplicates,
            r.rtt_p50_us,
            r.rtt_p99_us,
            r.rtt_mean_us,
            r.rtt_max_us
        );
    }
    check(r.received, r.corrupted, r.duplicates)
}

fn check(received: u64, corrupted: u64, duplicates: u64) -> bool {
    if received == 0 {
        eprintln!("net-load: FAILED: no frame arrived (is the peer forwarding between the two sockets?)");
    }
    if corrupted > 0 {
        eprintln!("net-load: FAILED: {corrupted} frame(s) arrived corrupted");
    }
    if duplicates > 0 {
        eprintln!("net-load: FAILED: {duplicates} frame(s) arrived more than once");
    }
    received > 0 && corrupted == 0 && duplicates == 0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("net-load: error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from(["net-load", "--tx", "/a", "--rx", "/b", "--size", "64,1514", "--json"]).unwrap();
        assert_eq!(c.size, vec![64, 1514]);
        assert!(c.json && !c.pingpong);
        let c = Cli::try_parse_from(["net-load", "--tx", "/a", "--rx", "/a", "--pingpong", "--count", "10"]).unwrap();
        assert_eq!(c.count, Some(10));
        let c =
            Cli::try_parse_from(["net-load", "--tx", "/a", "--rx", "/b", "--dst-mac", "52:54:00:00:00:02"]).unwrap();
        assert_eq!(c.dst_mac, Some([0x52, 0x54, 0, 0, 0, 2]));
        assert!(Cli::try_parse_from(["net-load", "--tx", "/a", "--rx", "/b", "--dst-mac", "nope"]).is_err());
        assert!(Cli::try_parse_from(["net-load", "--tx", "/a", "--rx", "/b", "--count", "3"]).is_err());
        assert!(Cli::try_parse_from(["net-load", "--tx", "/a", "--rx", "/b", "--pingpong", "--bidir"]).is_err());
        assert!(Cli::try_parse_from(["net-load", "--tx", "/a"]).is_err());
        let c = Cli::try_parse_from(["net-load", "--tx", "/a", "--rx", "/b", "--malformed", "--json"]).unwrap();
        assert!(c.malformed && c.json);
        assert!(Cli::try_parse_from(["net-load", "--tx", "/a", "--rx", "/b", "--malformed", "--pingpong"]).is_err());
    }
}
