//! The vhost-user control connection: connect, negotiate, read the config space, share memory
//! and set up the virtqueue, with every exchange bounded in time.
//!
//! The `vhost` crate's frontend blocks on its socket and retries on `EAGAIN`, so a socket
//! timeout alone cannot bound a call. Instead a watchdog thread holds a clone of the socket and
//! shuts it down when a call overruns its deadline; the blocked call then fails and we report a
//! timeout.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::{features::*, BlkConfig, CONFIG_READ_LEN};
use crate::error::{Error, Result};
use crate::mem::GuestMem;
use crate::vring::RingLayout;

#[derive(Default)]
struct WdState {
    deadline: Option<Instant>,
    fired: bool,
    stop: bool,
}

/// Shuts the control socket down when an armed deadline passes.
struct Watchdog {
    shared: Arc<(Mutex<WdState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

fn lock(m: &Mutex<WdState>) -> MutexGuard<'_, WdState> {
    // The state is plain data; a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watchdog {
    fn new(sock: UnixStream) -> Result<Self> {
        let shared = Arc::new((Mutex::new(WdState::default()), Condvar::new()));
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("blk-load-watchdog".into())
            .spawn(move || {
                let (m, cv) = &*s2;
                let mut st = lock(m);
                loop {
                    if st.stop {
                        return;
                    }
                    match st.deadline {
                        None => st = cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                let _ = sock.shutdown(std::net::Shutdown::Both);
                                st.fired = true;
                                st.deadline = None;
                            } else {
                                st = cv.wait_timeout(st, d - now).unwrap_or_else(|p| p.into_inner()).0;
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::sys("spawning the watchdog thread", e))?;
        Ok(Watchdog { shared, thread: Some(thread) })
    }

    fn arm(&self, timeout: Duration) {
        let (m, cv) = &*self.shared;
        lock(m).deadline = Some(Instant::now() + timeout);
        cv.notify_one();
    }

    /// Disarms; returns true if the deadline had passed (the socket is then shut down).
    fn disarm(&self) -> bool {
        let (m, _) = &*self.shared;
        let mut st = lock(m);
        st.deadline = None;
        st.fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        lock(m).stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects a unix stream socket with a bounded wait (a backend that never accepts and has a
/// full backlog would otherwise block `connect` forever).
fn connect_bounded(path: &Path, timeout: Duration) -> Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let conn_err = |source: io::Error| Error::Connect { path: path.to_path_buf(), source };
    if std::fs::symlink_metadata(path).is_err() {
        return Err(Error::SocketMissing(path.to_path_buf()));
    }
    // SAFETY: plain socket creation; no pointers involved.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(conn_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `tv` is a valid timeval and the length matches it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(conn_err(io::Error::last_os_error()));
    }
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(conn_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path is {} bytes, the limit is {}", bytes.len(), addr.sun_path.len() - 1),
        )));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un and the length covers it.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => {
                Error::ControlTimeout { op: "connect", timeout, hint: " (its listen backlog is full)" }
            }
            Some(libc::ECONNREFUSED) => conn_err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "connection refused (stale socket file, no backend listening?)",
            )),
            Some(libc::ENOENT) => Error::SocketMissing(path.to_path_buf()),
            _ => conn_err(e),
        });
    }
    let sock = UnixStream::from(fd);
    // Back to blocking sends without a timeout: the watchdog bounds them from now on.
    sock.set_write_timeout(None).map_err(conn_err)?;
    Ok(sock)
}

/// What was negotiated with the backend.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Negotiated {
    /// Virtio features the backend offered.
    pub offered: u64,
    /// Virtio features we acknowledged.
    pub acked: u64,
    /// vhost-user protocol features acknowledged (0 if none).
    pub protocol: u64,
    /// Number of queues the backend has (GET_QUEUE_NUM with MQ, else 1).
    pub queues: u64,
}

impl Negotiated {
    /// EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.acked & VIRTIO_RING_F_EVENT_IDX != 0
    }
}

/// The vhost-user control connection.
pub struct Session {
    // Field order matters for Drop: the watchdog (which holds a clone of the socket) goes first.
    watchdog: Watchdog,
    fe: Frontend,
    sock: UnixStream,
    timeout: Duration,
    first_reply_seen: bool,
    reply_ack: bool,
}

impl Session {
    /// Connects to the backend at `path`. `timeout` bounds every control exchange.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        Self::connect_queues(path, timeout, 1)
    }

    /// Like [`Self::connect`] for a device with `queues` virtqueues (a virtio-net device has
    /// two: RX and TX). GET_QUEUE_NUM, if negotiated, replaces the number.
    pub fn connect_queues(path: &Path, timeout: Duration, queues: u64) -> Result<Self> {
        let sock = connect_bounded(path, timeout)?;
        let wd_sock = sock.try_clone().map_err(|e| Error::sys("cloning the control socket", e))?;
        let poll_sock = sock.try_clone().map_err(|e| Error::sys("cloning the control socket", e))?;
        let watchdog = Watchdog::new(wd_sock)?;
        let fe = Frontend::from_stream(sock, queues.max(1));
        Ok(Session { watchdog, fe, sock: poll_sock, timeout, first_reply_seen: false, reply_ack: false })
    }

    /// The control socket (to watch for the backend hanging up while I/O runs).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    fn call<T>(&mut self, op: &'static str, f: impl FnOnce(&mut Frontend) -> vhost::Result<T>) -> Result<T> {
        // Without REPLY_ACK, SET_* messages return as soon as they are sent.
        let expects_reply = op.starts_with("GET_") || self.reply_ack;
        self.watchdog.arm(self.timeout);
        let r = f(&mut self.fe);
        let fired = self.watchdog.disarm();
        match r {
            Ok(v) if !fired => {
                self.first_reply_seen |= expects_reply;
                Ok(v)
            }
            _ if fired => {
                // The very first exchange never answered: typical of a backend that serves one
                // frontend at a time and is busy with another.
                let hint = if self.first_reply_seen {
                    ""
                } else {
                    " (it accepted the connection but never answered: is another frontend connected to it?)"
                };
                Err(Error::ControlTimeout { op, timeout: self.timeout, hint })
            }
            Ok(_) => unreachable!("handled above"),
            Err(e) => Err(map_vhost_err(op, e)),
        }
    }

    /// SET_OWNER, feature and protocol-feature negotiation, GET_QUEUE_NUM, for a virtio-blk
    /// device.
    pub fn negotiate(&mut self, want_event_idx: bool) -> Result<Negotiated> {
        let mut wanted = VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_RO
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_MQ;
        if want_event_idx {
            wanted |= VIRTIO_RING_F_EVENT_IDX;
        }
        self.negotiate_features(
            wanted,
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
        )
    }

    /// SET_OWNER, then acknowledges VIRTIO_F_VERSION_1 (required), PROTOCOL_FEATURES and those of
    /// the device-specific and ring features in `wanted` that the backend offers, and those of
    /// the protocol features in `protocol_wanted` (of which CONFIG, MQ and REPLY_ACK are
    /// understood here) that it offers; GET_QUEUE_NUM with MQ.
    pub fn negotiate_features(
        &mut self,
        wanted: u64,
        protocol_wanted: VhostUserProtocolFeatures,
    ) -> Result<Negotiated> {
        self.call("SET_OWNER", |fe| fe.set_owner())?;
        let offered = self.call("GET_FEATURES", |fe| fe.get_features())?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(Error::Unsupported(format!(
                "VIRTIO_F_VERSION_1 (offered features {offered:#x}); legacy devices are not driven"
            )));
        }
        let acked = offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | wanted);
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut queues = 1;
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let pf = self.call("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            protocol = pf
                & protocol_wanted
                & (VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK);
            self.call("SET_PROTOCOL_FEATURES", |fe| fe.set_protocol_features(protocol))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later message is acknowledged: failures are reported where they happen,
                // and the backend has processed the setup before our first kick.
                self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                self.reply_ack = true;
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                queues = self.call("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
                if queues == 0 {
                    return Err(Error::BadConfig("backend reports 0 queues".into()));
                }
            }
        }
        self.call("SET_FEATURES", |fe| fe.set_features(acked))?;
        Ok(Negotiated { offered, acked, protocol: protocol.bits(), queues })
    }

    /// Reads and validates the virtio-blk config space (needs the CONFIG protocol feature).
    pub fn get_config(&mut self, neg: &Negotiated) -> Result<BlkConfig> {
        if neg.protocol & VhostUserProtocolFeatures::CONFIG.bits() == 0 {
            return Err(Error::Unsupported(
                "the CONFIG protocol feature, so the capacity cannot be read (GET_CONFIG)".into(),
            ));
        }
        let buf = vec![0u8; CONFIG_READ_LEN as usize];
        let (_, payload) =
            self.call("GET_CONFIG", |fe| fe.get_config(0, CONFIG_READ_LEN, VhostUserConfigFlags::empty(), &buf))?;
        BlkConfig::parse(&payload, neg.acked)
    }

    /// Reads `len` bytes of the config space from offset 0 (GET_CONFIG; needs the CONFIG
    /// protocol feature).
    pub fn get_config_bytes(&mut self, neg: &Negotiated, len: u32) -> Result<Vec<u8>> {
        if neg.protocol & VhostUserProtocolFeatures::CONFIG.bits() == 0 {
            return Err(Error::Unsupported("the CONFIG protocol feature (GET_CONFIG)".into()));
        }
        let buf = vec![0u8; len as usize];
        let (_, payload) = self.call("GET_CONFIG", |fe| fe.get_config(0, len, VhostUserConfigFlags::empty(), &buf))?;
        Ok(payload)
    }

    /// Shares `mem` with the backend (SET_MEM_TABLE).
    pub fn set_mem_table(&mut self, mem: &GuestMem) -> Result<()> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: mem.gpa(0),
            memory_size: mem.len() as u64,
            userspace_addr: mem.uaddr(0),
            mmap_offset: 0,
            mmap_handle: mem.file().as_raw_fd(),
        };
        self.call("SET_MEM_TABLE", |fe| fe.set_mem_table(&[region])).map(|_| ())
    }

    /// SET_MEM_TABLE with one region of `memory_size` bytes backed by `mem`'s memfd, whatever
    /// the memfd's size: for a hostile client whose table lies about its memory.
    pub fn set_mem_table_sized(&mut self, mem: &GuestMem, memory_size: u64) -> Result<()> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: mem.gpa(0),
            memory_size,
            userspace_addr: mem.uaddr(0),
            mmap_offset: 0,
            mmap_handle: mem.file().as_raw_fd(),
        };
        self.call("SET_MEM_TABLE", |fe| fe.set_mem_table(&[region])).map(|_| ())
    }

    /// Sets up and enables queue 0 with its ring at `ring_off` in `mem`.
    pub fn setup_vring(
        &mut self,
        neg: &Negotiated,
        mem: &GuestMem,
        ring_off: usize,
        layout: RingLayout,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<()> {
        self.configure_vring(0, mem, ring_off, layout, kick, call)?;
        self.enable_vring(neg, 0)?;
        self.sync(neg)
    }

    /// Sets queue `index` up (size, addresses, base 0, call and kick eventfds) with its ring at
    /// `ring_off` in `mem`, without enabling it.
    pub fn configure_vring(
        &mut self,
        index: usize,
        mem: &GuestMem,
        ring_off: usize,
        layout: RingLayout,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<()> {
        let cfg = vring_config(mem, ring_off, layout);
        self.call("SET_VRING_NUM", |fe| fe.set_vring_num(index, layout.size))?;
        self.call("SET_VRING_ADDR", |fe| fe.set_vring_addr(index, &cfg))?;
        self.call("SET_VRING_BASE", |fe| fe.set_vring_base(index, 0))?;
        self.call("SET_VRING_CALL", |fe| fe.set_vring_call(index, call))?;
        self.call("SET_VRING_KICK", |fe| fe.set_vring_kick(index, kick))?;
        Ok(())
    }

    /// Enables queue `index` (SET_VRING_ENABLE) if protocol features were negotiated: rings then
    /// start disabled. Without them a ring runs once its kick eventfd is set.
    pub fn enable_vring(&mut self, neg: &Negotiated, index: usize) -> Result<()> {
        if neg.acked & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            self.call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(index, true))?;
        }
        Ok(())
    }

    /// Without REPLY_ACK, makes sure the backend processed every message sent so far (by
    /// waiting for the reply of a request that has one) before the first kick.
    pub fn sync(&mut self, neg: &Negotiated) -> Result<()> {
        if neg.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() == 0 {
            self.call("GET_FEATURES (sync)", |fe| fe.get_features())?;
        }
        Ok(())
    }

    /// Points queue `index` at its ring at `ring_off` in `mem` again (SET_VRING_ADDR alone): for a
    /// hostile client, whose backend then reads the used index through its map of `mem`.
    pub fn readdress_vring(&mut self, index: usize, mem: &GuestMem, ring_off: usize, layout: RingLayout) -> Result<()> {
        let cfg = vring_config(mem, ring_off, layout);
        self.call("SET_VRING_ADDR", |fe| fe.set_vring_addr(index, &cfg))
    }

    /// As [`Session::readdress_vring`], the queue disabled meanwhile (SET_VRING_ENABLE 0, then
    /// 1), as a client moving a ring it serves must (protocol features negotiated): a backend
    /// refuses to move a ring it serves.
    pub fn move_vring(&mut self, index: usize, mem: &GuestMem, ring_off: usize, layout: RingLayout) -> Result<()> {
        self.call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(index, false))?;
        self.readdress_vring(index, mem, ring_off, layout)?;
        self.call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(index, true))
    }

    /// Sends SET_VRING_KICK for queue `index` with `kick`, whatever it is: for a hostile client.
    pub fn set_vring_kick(&mut self, index: usize, kick: &EventFd) -> Result<()> {
        self.call("SET_VRING_KICK", |fe| fe.set_vring_kick(index, kick))
    }

    /// Sends SET_VRING_CALL for queue `index` with `call`, whatever it is: for a hostile client.
    pub fn set_vring_call(&mut self, index: usize, call: &EventFd) -> Result<()> {
        self.call("SET_VRING_CALL", |fe| fe.set_vring_call(index, call))
    }

    /// Sends SET_PROTOCOL_FEATURES with `bits`, offered or not: for a hostile client.
    pub fn set_protocol_features_raw(&mut self, bits: u64) -> Result<()> {
        let features = VhostUserProtocolFeatures::from_bits_retain(bits);
        self.call("SET_PROTOCOL_FEATURES", |fe| fe.set_protocol_features(features))
    }

    /// Stops queue 0 (GET_VRING_BASE, as QEMU does when a device stops); returns the backend's
    /// next avail index.
    pub fn stop_vring(&mut self) -> Result<u32> {
        self.stop_vring_index(0)
    }

    /// Stops queue `index` (GET_VRING_BASE); returns the backend's next avail index.
    pub fn stop_vring_index(&mut self, index: usize) -> Result<u32> {
        self.call("GET_VRING_BASE", |fe| fe.get_vring_base(index))
    }
}

/// The addresses of a ring laid out as `layout` at `ring_off` in `mem`, as SET_VRING_ADDR
/// gives them.
fn vring_config(mem: &GuestMem, ring_off: usize, layout: RingLayout) -> VringConfigData {
    VringConfigData {
        queue_max_size: layout.size,
        queue_size: layout.size,
        flags: 0,
        desc_table_addr: mem.uaddr(ring_off + layout.desc),
        used_ring_addr: mem.uaddr(ring_off + layout.used),
        avail_ring_addr: mem.uaddr(ring_off + layout.avail),
        log_addr: None,
    }
}

/// The error to report when the control socket became readable or hung up while I/O was
/// running (a backend sends nothing unasked on it).
pub fn socket_event_error(sock: &UnixStream) -> Error {
    let mut b = [0u8; 1];
    // SAFETY: peeking at most 1 byte into a valid local buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n > 0 {
        Error::Protocol("unexpected message from the backend on the control socket during I/O".into())
    } else {
        Error::BackendClosed { op: "I/O" }
    }
}

fn map_vhost_err(op: &'static str, e: vhost::Error) -> Error {
    use vhost::vhost_user::Error as UE;
    match e {
        vhost::Error::VhostUserProtocol(UE::Disconnected | UE::SocketBroken(_) | UE::PartialMessage) => {
            Error::BackendClosed { op }
        }
        vhost::Error::VhostUserProtocol(UE::BackendInternalError) => Error::BackendRejected { op },
        e => Error::Vhost { op, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    fn tmp_sock(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("blk-load-{}-{}.sock", name, std::process::id()))
    }

    #[test]
    fn missing_socket_is_reported() {
        let p = tmp_sock("missing");
        let _ = std::fs::remove_file(&p);
        let e = Session::connect(&p, Duration::from_secs(1)).err().unwrap();
        assert!(matches!(e, Error::SocketMissing(_)), "{e}");
    }

    #[test]
    fn stale_socket_is_refused() {
        let p = tmp_sock("stale");
        let _ = std::fs::remove_file(&p);
        drop(UnixListener::bind(&p).unwrap());
        let e = Session::connect(&p, Duration::from_secs(1)).err().unwrap();
        assert!(matches!(e, Error::Connect { .. }), "{e}");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn silent_backend_times_out() {
        let p = tmp_sock("silent");
        let _ = std::fs::remove_file(&p);
        let l = UnixListener::bind(&p).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // Read everything, answer nothing, until the frontend gives up.
            let mut buf = [0u8; 256];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        });
        let start = Instant::now();
        let mut s = Session::connect(&p, Duration::from_millis(300)).unwrap();
        let e = s.negotiate(true).err().unwrap();
        assert!(matches!(e, Error::ControlTimeout { op: "GET_FEATURES", .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(s);
        t.join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn closing_backend_is_reported() {
        let p = tmp_sock("closing");
        let _ = std::fs::remove_file(&p);
        let l = UnixListener::bind(&p).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            drop(s);
        });
        let mut s = Session::connect(&p, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        let e = s.negotiate(true).err().unwrap();
        assert!(matches!(e, Error::BackendClosed { .. }), "{e}");
        let _ = std::fs::remove_file(&p);
    }
}
