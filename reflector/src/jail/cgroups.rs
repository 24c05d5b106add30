//! A cgroup per device for its driver VMs: CPU quota, memory limit, task
//! limit; cgroup v2 where the unified hierarchy has the controllers, else
//! v1's cpu, memory and pids hierarchies.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{io_error, JailError, JailLimits};

/// Creates the device's cgroups with `limits`; returns the opened files
/// through which a process joins them and their directories. cgroup v2 if
/// the unified hierarchy has the controllers, else v1's cpu, memory and
/// pids hierarchies.
///
/// Each file is opened here, as root, and written later by the keeper
/// through that descriptor: the kernel judges a migration by the
/// credentials of whoever opened the file, so a reflector that has since
/// become an unprivileged user still places its vmms, and needs no right
/// over any cgroup.
///
/// Why v1's `tasks` rather than `cgroup.procs`: moving a whole thread group
/// takes the kernel's global threadgroup lock for writing, which waits for
/// an RCU grace period first; moving only the calling thread ("0" to
/// `tasks`) does not need that lock. The keeper is single-threaded (a
/// fork's child), so its one thread is the whole process, and the vmm it
/// clones next starts in the cgroups. Measured here: the first
/// `cgroup.procs` write of a cold restart took 19.6 ms of its 22 ms (strace),
/// and jailed cold restarts stalled p50 22 ms against 7 ms unjailed. (v2
/// has no such file outside threaded cgroups: there the write stays, and
/// mounting cgroup2 with `favordynmods` removes the wait.)
pub(super) fn cgroups_for(name: &str, limits: JailLimits) -> Result<(Vec<File>, Vec<PathBuf>), JailError> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(io_error("reading /proc/self/cgroup"))?;
    // The reflector's pid keeps two reflectors' devices apart.
    let leaf = format!("driver-vms-{}-{name}", std::process::id());
    let period: u64 = 100_000;
    let quota = ((limits.cpu * period as f64) as u64).max(1000);
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers");
    let v2 = std::fs::read_to_string(unified).is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
    let mut procs = Vec::new();
    let mut dirs = Vec::new();
    let mut settings: Vec<(PathBuf, Vec<(&str, String)>)> = Vec::new();
    if v2 {
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
        let parent = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory +pids");
        settings.push((
            parent.join(&leaf),
            vec![
                ("cpu.max", format!("{quota} {period}")),
                ("memory.max", limits.memory.to_string()),
                ("pids.max", limits.tasks.to_string()),
            ],
        ));
    } else {
        for (controller, files) in [
            ("cpu", vec![("cpu.cfs_period_us", period.to_string()), ("cpu.cfs_quota_us", quota.to_string())]),
            ("memory", vec![("memory.limit_in_bytes", limits.memory.to_string())]),
            ("pids", vec![("pids.max", limits.tasks.to_string())]),
        ] {
            let path = own
                .lines()
                .filter_map(|l| l.split_once(':').and_then(|(_, rest)| rest.split_once(':')))
                .find(|(controllers, _)| controllers.split(',').any(|c| c == controller))
                .map(|(_, path)| path)
                .unwrap_or("/");
            let parent = Path::new("/sys/fs/cgroup").join(controller).join(path.trim_start_matches('/'));
            settings.push((parent.join(&leaf), files));
        }
    }
    for (dir, files) in settings {
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating cgroup {}", dir.display())))?;
        dirs.push(dir.clone());
        for (file, value) in files {
            let mut handle = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(file))
                .map_err(io_error(format!("opening {}", dir.join(file).display())))?;
            handle.write_all(value.as_bytes()).map_err(io_error(format!("writing {}", dir.join(file).display())))?;
        }
        let join = if v2 { "cgroup.procs" } else { "tasks" };
        let procs_file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(join))
            .map_err(io_error(format!("opening {}", dir.join(join).display())))?;
        // Written by the child after its descriptors are placed from 3:
        // kept above them all.
        let procs_file = hardware::descriptors::lift(procs_file.into())
            .map(std::fs::File::from)
            .map_err(io_error("moving a cgroup membership descriptor"))?;
        procs.push(procs_file);
    }
    Ok((procs, dirs))
}

/// Removes the cgroups of reflectors that are gone (killed before they
/// could clean up); cgroups still holding processes stay.
pub fn sweep_stale_cgroups() {
    let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else { return };
    let mut parents = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let relative = path.trim_start_matches('/');
        if controllers.is_empty() {
            parents.push(Path::new("/sys/fs/cgroup").join(relative));
        }
        for controller in controllers.split(',').filter(|c| ["cpu", "memory", "pids"].contains(c)) {
            parents.push(Path::new("/sys/fs/cgroup").join(controller).join(relative));
        }
    }
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("driver-vms-") else { continue };
            let owner = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}
