//! Driver VMs' access to a QEMU model's BAR0: the vmm forwards each access
//! to its trapped window over a socketpair (`guest_abi::trap`), and a
//! thread here performs it over qtest, within BAR0, dword by dword.
//!
//! What a driver VM may do to the device is decided here: dword accesses
//! inside BAR0 while the device is not quiesced; PCI configuration space,
//! other BARs, QEMU's memory and every other qtest command stay out of its
//! reach. Anything else reads as all ones and is not written.
//!
//! Posted registers (`guest_abi::trap`: an NVMe controller's I/O
//! submission doorbell, `Model::posted_registers`) come as eventfd signals
//! the vmm's KVM raises without an exit to its userspace; this thread then
//! writes the register with the value the driver left in the posted
//! mirror, a page of the channel's device area. A vmm that stalls its
//! socket mid-request stalls only its own connection, posted writes
//! included, until it is revoked.
//! Before each socket request it performs the posted writes already
//! signalled, so the driver's program order holds where it matters: a
//! read after a posted write sees it done.
//!
//! A connection is revoked when its driver VM's record lets go of it
//! (`AccessGrant`, dropped once the driver VM was killed), used or not,
//! and, as a backstop, when the device is quiesced if it carried any
//! access: accesses still queued in it are never performed, so nothing a
//! dead driver asked for reaches the device after the replay began. Each
//! access holds its connection's gate from the check that it is not
//! revoked to its end, and a revocation takes the same gate: once it
//! returns, no access of the connection is under way or to come (a check
//! apart from the access let a proxy thread preempted between the two
//! perform a dead driver's write on the device its successor drives). A
//! spare's connection, silent until it is activated, survives the
//! quiesce; and when the device's QEMU process is replaced
//! (`SupervisedModel::resume`), a silent connection is handed over to the
//! new process, so that the spare serves it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use guest_abi::trap::{self, Access};

use super::QemuModel;
use crate::shared_eventfd::SharedEventFd;
use crate::shm::SharedMemory;
use crate::{AccessGrant, TrapConnection, WorkAllowance};

/// A device's posted registers and where their values are.
#[derive(Clone)]
pub struct PostedRegisters {
    /// The region the mirror page is in (the channel).
    pub memory: Arc<SharedMemory>,
    /// The mirror page's offset in it (`channel::POSTED_MIRROR_OFFSET`).
    pub mirror: usize,
    /// The registers' offsets in BAR0.
    pub offsets: Vec<u64>,
}

impl PostedRegisters {
    /// The value the driver left for register `offset`: the dword at its
    /// offset modulo a page in the mirror (driver memory: any value, which
    /// the device judges as it would the register's).
    fn value(&self, offset: u64) -> u32 {
        let at = self.mirror + (offset % 4096) as usize;
        self.memory.read::<u32>(at).unwrap_or(0)
    }
}

/// One driver VM's connection.
struct Connection {
    /// It carried an access.
    used: AtomicBool,
    /// Whether it may no longer reach the device: held by each access from
    /// its check to its end, and by its revocation.
    gate: Mutex<bool>,
    /// The proxy's end, to wake its thread when revoked.
    stream: UnixStream,
    /// The QEMU process it reaches: the one it was made on, or the one
    /// that replaced it while the connection was silent.
    model: RwLock<Weak<QemuModel>>,
}

impl Connection {
    fn new(stream: UnixStream, model: &Arc<QemuModel>) -> Self {
        Self::reaching(stream, Arc::downgrade(model))
    }

    fn reaching(stream: UnixStream, model: Weak<QemuModel>) -> Self {
        Connection { used: AtomicBool::new(false), gate: Mutex::new(false), stream, model: RwLock::new(model) }
    }

    fn model(&self) -> Option<Arc<QemuModel>> {
        match self.model.read() {
            Ok(model) => model.upgrade(),
            Err(poisoned) => poisoned.into_inner().upgrade(),
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, bool> {
        self.gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn revoked(&self) -> bool {
        *self.gate()
    }

    /// Revokes it: waits for an access under way to end, refuses every
    /// later one, and wakes its thread, which then ends.
    fn revoke(&self) {
        *self.gate() = true;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Runs `access` on the device it reaches unless it is revoked (None),
    /// its revocation waiting meanwhile; charged to `work` if given.
    fn admitted<T>(&self, work: Option<&WorkAllowance>, access: impl FnOnce(&QemuModel) -> T) -> Option<T> {
        if let Some(work) = work {
            work.spend(ACCESS_WORK);
        }
        self.unless_revoked(|| self.model().map(|model| access(&model))).flatten()
    }

    /// Waits while `work` is spent, until it is granted more (Done) or the
    /// connection is revoked (End).
    fn within(&self, work: Option<&WorkAllowance>) -> Served {
        match work {
            Some(work) if !work.wait_for_grant(|| self.revoked()) => Served::End,
            _ => Served::Done,
        }
    }

    /// Runs `work` unless the connection is revoked, holding its gate.
    fn unless_revoked<T>(&self, work: impl FnOnce() -> T) -> Option<T> {
        let revoked = self.gate();
        (!*revoked).then(work)
    }
}

/// The connections of one device.
#[derive(Default)]
pub(super) struct Connections {
    live: Mutex<Live>,
}

/// A device's connections, and whether they went to a successor.
#[derive(Default)]
struct Live {
    connections: Vec<Weak<Connection>>,
    /// Its silent connections were handed over to a new process: a
    /// connection made on this one now (a spare started meanwhile) would
    /// reach a dead process, so none is.
    handed_over: bool,
}

impl Connections {
    /// Revokes every connection that carried an access.
    pub(super) fn revoke_used(&self) {
        let Ok(mut live) = self.live.lock() else { return };
        live.connections.retain(|weak| weak.strong_count() > 0);
        for connection in live.connections.iter().filter_map(Weak::upgrade) {
            if connection.used.load(Ordering::Acquire) {
                connection.revoke();
            }
        }
    }

    /// Hands every connection that never carried an access over to
    /// `successor`, a new process of the same device: a spare's connection
    /// must reach the device it will drive, not the process that died.
    /// Connections that did carry one stay with the old process (they were
    /// revoked when it was quiesced).
    pub(super) fn hand_over_silent(&self, successor: &Arc<QemuModel>) {
        let Ok(mut live) = self.live.lock() else { return };
        live.handed_over = true;
        live.connections.retain(|weak| weak.strong_count() > 0);
        let Ok(mut theirs) = successor.connections.live.lock() else { return };
        for connection in live.connections.iter().filter_map(Weak::upgrade) {
            if connection.used.load(Ordering::Acquire) || connection.revoked() {
                continue;
            }
            match connection.model.write() {
                Ok(mut model) => *model = Arc::downgrade(successor),
                Err(poisoned) => *poisoned.into_inner() = Arc::downgrade(successor),
            }
            theirs.connections.push(Arc::downgrade(&connection));
        }
    }
}

/// What [`QemuModel::connect`] says on a process whose connections went to
/// a successor: connect to the current one instead.
pub(super) const REPLACED: &str = "the device's QEMU process was replaced";

impl QemuModel {
    /// A new connection to BAR0 for a driver VM: returns the vmm's ends
    /// (its `--trap` socket and one eventfd per posted register) and the
    /// grant that revokes it; a thread serves them until either end closes
    /// or the connection is revoked.
    pub fn connect(
        self: &Arc<Self>,
        posted: Option<&PostedRegisters>,
        work: Option<Arc<WorkAllowance>>,
    ) -> std::io::Result<TrapConnection> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut signals = Vec::new();
        let mut vmm_ends = Vec::new();
        for offset in posted.map(|p| p.offsets.as_slice()).unwrap_or_default() {
            let signal = SharedEventFd::new()?;
            vmm_ends.push(crate::descriptors::copy(&signal)?);
            signals.push((*offset, signal));
        }
        let connection = Arc::new(Connection::new(ours.try_clone()?, self));
        {
            let mut live = self.connections.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if live.handed_over {
                return Err(std::io::Error::other(REPLACED));
            }
            live.connections.push(Arc::downgrade(&connection));
        }
        let held = Arc::downgrade(&connection);
        let grant = AccessGrant::new(move || {
            if let Some(connection) = held.upgrade() {
                connection.revoke();
            }
        });
        let posted = posted.cloned().map(|registers| Posted { registers, signals });
        std::thread::Builder::new()
            .name("bar0-proxy".into())
            .spawn(move || serve(&connection, ours, posted.as_ref(), work.as_deref()))?;
        Ok(TrapConnection { socket: OwnedFd::from(theirs), posted: vmm_ends, grant })
    }
}

/// What one access to the device model costs of its allowance (in
/// [`WorkAllowance`] units, where a 4 KiB command is 8 KiB of grant): each
/// is a qtest round trip on this proxy's thread, tens of microseconds of
/// the reflector's CPU that no request may have asked for. A driver
/// writing accesses without pause (a trapped window's socket takes 4,096
/// in one write, unanswered) kept a proxy thread busy for good at no cost
/// of its own (an adversarial review found it). An honest NVMe driver makes
/// a few per request (a doorbell or two, the interrupt mask); its
/// request's grant covers 16 for 4 KiB, more for more data, and the spare
/// its controller's start.
pub const ACCESS_WORK: u64 = 1024;

/// One connection's posted registers: their values and their signals.
struct Posted {
    registers: PostedRegisters,
    signals: Vec<(u64, SharedEventFd)>,
}

/// What serving an access or a signal came to.
enum Served {
    Done,
    /// The connection ends: revoked, its device gone, or broken.
    End,
}

/// Serves one connection: its requests in order, and its posted writes
/// as they are signalled (those signalled before a request first), each
/// within `work` (the device's allowance, if it has one): while that is
/// spent, neither is taken, and the vmm waits on its full socket.
fn serve(connection: &Connection, mut stream: UnixStream, posted: Option<&Posted>, work: Option<&WorkAllowance>) {
    let signals = posted.map(|p| p.signals.as_slice()).unwrap_or_default();
    let mut watched: Vec<libc::pollfd> = std::iter::once(stream.as_raw_fd())
        .chain(signals.iter().map(|(_, signal)| signal.as_raw_fd()))
        .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
        .collect();
    loop {
        // SAFETY: `watched` is a live array of pollfd of the length given.
        let ready = unsafe { libc::poll(watched.as_mut_ptr(), watched.len() as libc::nfds_t, -1) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if let Served::End = connection.within(work) {
            return;
        }
        if let Some(posted) = posted {
            if let Served::End = perform_posted(connection, posted, work) {
                return;
            }
        }
        if watched[0].revents == 0 {
            continue;
        }
        let mut request = [0u8; trap::REQUEST_LEN];
        if stream.read_exact(&mut request).is_err() {
            return;
        }
        // Posted writes signalled while the request was on its way came
        // before it.
        if let Some(posted) = posted {
            if let Served::End = perform_posted(connection, posted, work) {
                return;
            }
        }
        if let Served::End = perform(connection, &mut stream, &request, work) {
            return;
        }
    }
}

/// Performs each posted write signalled so far, once, with the value its
/// mirror holds now (signals that came together are one write: the last
/// value is the one that counts, as for a doorbell).
fn perform_posted(connection: &Connection, posted: &Posted, work: Option<&WorkAllowance>) -> Served {
    for (offset, signal) in &posted.signals {
        // The vmm holds the posted register's eventfd too (its ioeventfd).
        if !matches!(signal.take(), Ok(1..)) {
            continue;
        }
        connection.used.store(true, Ordering::Release);
        let rung = connection.admitted(work, |model| {
            model.ring32(*offset, posted.registers.value(*offset)).map_err(|error| report_unanswered(model, &error))
        });
        if !matches!(rung, Some(Ok(_))) {
            return Served::End;
        }
    }
    Served::Done
}

/// Reports an access the device model did not answer. A process killed
/// on purpose (the reflector stopping, or a device replaced after a reset
/// that failed) leaves accesses of driver VMs killed with it unanswered:
/// expected, so not an error. Any other death is the device's failure.
fn report_unanswered(model: &QemuModel, error: &super::QtestError) {
    if model.killed() {
        tracing::debug!(%error, qemu_pid = model.pid(), "an access met the device model killed on purpose; closing the driver VM's connection");
    } else {
        tracing::error!(%error, qemu_pid = model.pid(), "the QEMU device model did not answer; closing the driver VM's connection");
    }
}

/// Performs one request from the socket.
fn perform(
    connection: &Connection,
    stream: &mut UnixStream,
    request: &[u8; trap::REQUEST_LEN],
    work: Option<&WorkAllowance>,
) -> Served {
    connection.used.store(true, Ordering::Release);
    let Some(access) = Access::decode(request) else {
        tracing::warn!("a driver VM sent a malformed trapped access; closing its connection");
        return Served::End;
    };
    let result = connection.admitted(work, |model| {
        // Every read but a dword's reads as all ones, of whatever width:
        // before, an 8-byte read gave 0x00000000_ffffffff.
        let result = match (access.kind, access.size) {
            (trap::READ, 4) => model.read32(u64::from(access.offset)).map(|value| u64::from(value.unwrap_or(u32::MAX))),
            (trap::READ, _) => Ok(u64::MAX),
            (trap::WRITE, 4) => model.write32(u64::from(access.offset), access.value as u32).map(|_| 0),
            _ => Ok(0),
        };
        result.map_err(|error| report_unanswered(model, &error))
    });
    let Some(Ok(value)) = result else { return Served::End };
    if access.kind == trap::READ && stream.write_all(&value.to_le_bytes()).is_err() {
        return Served::End;
    }
    Served::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_posted_registers_value_is_its_mirror_dword_at_its_offset_within_a_page() {
        let memory = Arc::new(SharedMemory::new("mirror", 3 * 4096).unwrap());
        let posted = PostedRegisters { memory: memory.clone(), mirror: 4096, offsets: vec![0x1008, 0x100c] };
        assert!(memory.write(4096 + 8, 0x1234_u32));
        assert!(memory.write(4096 + 12, 0x56_u32));
        assert_eq!(posted.value(0x1008), 0x1234, "SQ 1 tail: its shadow doorbell");
        assert_eq!(posted.value(0x100c), 0x56, "CQ 1 head: its shadow doorbell");
        // A mirror at the region's end reads as zero past it, never out of bounds.
        let edge = PostedRegisters { memory, mirror: 3 * 4096 - 4, offsets: vec![0x1008] };
        assert_eq!(edge.value(0x1008), 0);
    }

    #[test]
    fn a_revocation_waits_for_the_access_under_way_and_refuses_every_later_one() {
        use std::sync::mpsc;
        use std::time::Duration;
        // A hang guard, not a timing assertion.
        const BOUND: Duration = Duration::from_secs(10);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let connection = Arc::new(Connection::reaching(ours, Weak::new()));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (entered, inside) = mpsc::channel();
        let (go, wait) = mpsc::channel::<()>();
        let access = {
            let (connection, order) = (connection.clone(), order.clone());
            std::thread::spawn(move || {
                connection.unless_revoked(|| {
                    entered.send(()).unwrap();
                    wait.recv_timeout(BOUND).unwrap();
                    order.lock().unwrap().push("access");
                })
            })
        };
        inside.recv_timeout(BOUND).unwrap();
        let revocation = {
            let (connection, order) = (connection.clone(), order.clone());
            std::thread::spawn(move || {
                connection.revoke();
                order.lock().unwrap().push("revoked");
            })
        };
        // The access holds the gate its revocation takes, so the revocation
        // cannot end before it.
        assert!(connection.gate.try_lock().is_err(), "an access under way must hold its connection's gate");
        go.send(()).unwrap();
        assert_eq!(access.join().unwrap(), Some(()));
        revocation.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["access", "revoked"]);
        assert!(connection.revoked());
        assert_eq!(connection.unless_revoked(|| ()), None, "an access after the revocation ran");
    }

    /// A connection whose device's allowance is spent takes no access
    /// until more is granted, and ends if revoked meanwhile.
    #[test]
    fn a_connection_waits_while_its_allowance_is_spent() {
        use std::sync::mpsc;
        use std::time::Duration;
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let connection = Arc::new(Connection::reaching(ours, Weak::new()));
        let work = Arc::new(WorkAllowance::with_spare(0));
        assert!(matches!(connection.within(Some(&work)), Served::Done), "an allowance not spent held an access");
        work.spend(ACCESS_WORK);
        let waiting = |connection: Arc<Connection>, work: Arc<WorkAllowance>| {
            let (done, finished) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = done.send(matches!(connection.within(Some(&work)), Served::Done));
            });
            finished
        };
        let finished = waiting(connection.clone(), work.clone());
        // Not a timing assertion: a gate that lets the access through does
        // so at once; one that holds it never lets it go unprompted.
        assert!(finished.recv_timeout(Duration::from_millis(50)).is_err(), "an access went through a spent allowance");
        work.grant(ACCESS_WORK);
        assert_eq!(finished.recv_timeout(Duration::from_secs(10)), Ok(true), "a grant did not let the access go");
        work.spend(2 * ACCESS_WORK);
        let finished = waiting(connection.clone(), work);
        connection.revoke();
        assert_eq!(finished.recv_timeout(Duration::from_secs(10)), Ok(false), "a revoked connection went on waiting");
    }
}
