//! Driver VMs' access to a QEMU model's BAR0: the vmm forwards each access
//! to its trapped window over a socketpair (`guest_abi::trap`), and a
//! thread here performs it over qtest, within BAR0, dword by dword.
//!
//! What a driver VM may do to the device is decided here: dword accesses
//! inside BAR0 while the device is not quiesced; PCI configuration space,
//! other BARs, QEMU's memory and every other qtest command stay out of its
//! reach. Anything else reads as all ones and is not written.
//!
//! A connection that carried any access is revoked when the device is
//! quiesced (its driver VM died): accesses still queued in it are never
//! performed, so nothing a dead driver asked for reaches the device after
//! the replay began. A spare's connection, silent until it is activated,
//! survives; and when the device's QEMU process is replaced
//! (`SupervisedModel::resume`), a silent connection is handed over to the
//! new process, so that the spare serves it.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use guest_abi::trap::{self, Access};

use super::QemuModel;

/// One driver VM's connection.
struct Connection {
    /// It carried an access.
    used: AtomicBool,
    /// It may no longer reach the device.
    revoked: AtomicBool,
    /// The proxy's end, to wake its thread when revoked.
    stream: UnixStream,
    /// The QEMU process it reaches: the one it was made on, or the one
    /// that replaced it while the connection was silent.
    model: RwLock<Weak<QemuModel>>,
}

impl Connection {
    fn model(&self) -> Option<Arc<QemuModel>> {
        match self.model.read() {
            Ok(model) => model.upgrade(),
            Err(poisoned) => poisoned.into_inner().upgrade(),
        }
    }
}

/// The connections of one device.
#[derive(Default)]
pub(super) struct Connections {
    live: Mutex<Vec<Weak<Connection>>>,
}

impl Connections {
    /// Revokes every connection that carried an access.
    pub(super) fn revoke_used(&self) {
        let Ok(mut live) = self.live.lock() else { return };
        live.retain(|weak| weak.strong_count() > 0);
        for connection in live.iter().filter_map(Weak::upgrade) {
            if connection.used.load(Ordering::Acquire) {
                connection.revoked.store(true, Ordering::Release);
                let _ = connection.stream.shutdown(std::net::Shutdown::Both);
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
        live.retain(|weak| weak.strong_count() > 0);
        let Ok(mut theirs) = successor.connections.live.lock() else { return };
        for connection in live.iter().filter_map(Weak::upgrade) {
            if connection.used.load(Ordering::Acquire) || connection.revoked.load(Ordering::Acquire) {
                continue;
            }
            match connection.model.write() {
                Ok(mut model) => *model = Arc::downgrade(successor),
                Err(poisoned) => *poisoned.into_inner() = Arc::downgrade(successor),
            }
            theirs.push(Arc::downgrade(&connection));
        }
    }
}

impl QemuModel {
    /// A new connection to BAR0 for a driver VM: returns the vmm's end (its
    /// `--trap` descriptor); a thread serves the other until either end
    /// closes or the connection is revoked.
    pub fn connect(self: &Arc<Self>) -> std::io::Result<OwnedFd> {
        let (ours, theirs) = UnixStream::pair()?;
        let connection = Arc::new(Connection {
            used: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            stream: ours.try_clone()?,
            model: RwLock::new(Arc::downgrade(self)),
        });
        if let Ok(mut live) = self.connections.live.lock() {
            live.push(Arc::downgrade(&connection));
        }
        std::thread::Builder::new().name("bar0-proxy".into()).spawn(move || serve(&connection, ours))?;
        Ok(OwnedFd::from(theirs))
    }
}

/// Serves one connection's accesses in order.
fn serve(connection: &Connection, mut stream: UnixStream) {
    let mut request = [0u8; trap::REQUEST_LEN];
    while stream.read_exact(&mut request).is_ok() {
        connection.used.store(true, Ordering::Release);
        let Some(model) = connection.model() else { return };
        if connection.revoked.load(Ordering::Acquire) {
            return;
        }
        let Some(access) = Access::decode(&request) else {
            tracing::warn!("a driver VM sent a malformed trapped access; closing its connection");
            return;
        };
        let result = match (access.kind, access.size) {
            (trap::READ, 4) => model.read32(u64::from(access.offset)).map(|value| value.unwrap_or(u32::MAX)),
            (trap::READ, _) => Ok(u32::MAX),
            (trap::WRITE, 4) => model.write32(u64::from(access.offset), access.value as u32).map(|_| 0),
            _ => Ok(0),
        };
        let value = match result {
            Ok(value) => value,
            Err(error) => {
                tracing::error!(%error, "the QEMU device model did not answer; closing the driver VM's connection");
                return;
            }
        };
        if access.kind == trap::READ && stream.write_all(&u64::from(value).to_le_bytes()).is_err() {
            return;
        }
    }
}
