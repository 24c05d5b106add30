//! Claiming the paths the reflector listens on (vhost-user sockets, the
//! control socket) so that a path can never destroy a file or be shared.
//!
//! - Only a stale socket is ever replaced: a path naming a regular file (a
//!   disk image, say), a directory or anything else is refused, and so is a
//!   socket something still listens on.
//! - A second reflector cannot take a path over, however it is spelled: the
//!   owner holds an exclusive open-file-description lock on `PATH.lock`
//!   for as long as it serves (released by the kernel when it dies).
//! - Sockets are created owner-only (mode 0600), whatever the caller's umask:
//!   a vhost-user client gets to hand the reflector its memory, and the
//!   control socket can kill driver VMs.
//! - A path appears only once its socket listens: it is bound in a private
//!   directory beside it and renamed into place, so a client that sees the path
//!   (QEMU, `reflector status`, a script waiting for the file) can connect
//!   at once, never in the moment between bind(2) and listen(2).
//! - Every failure is an error at start, naming the path and what to do.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Why a path cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Something other than a socket is there.
    #[error("{path} exists and is not a socket: refusing to replace it (remove it or choose another path)")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The path is longer than a socket address holds: no client could
    /// connect to it.
    #[error(
        "{path:?} is {len} bytes long, more than a socket address holds ({SUN_PATH_MAX}): no client could connect \
         to it; choose a shorter path"
    )]
    TooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The path cannot name a socket file.
    #[error(
        "{path:?} names no socket file (it is empty or ends with '/'): give a path such as /run/reflector/d0.sock"
    )]
    NotAPath {
        /// The path.
        path: PathBuf,
    },
    /// Another process serves the path.
    #[error("{path} is already served by another process (its lock {lock} is held, or it accepts connections)")]
    InUse {
        /// The path.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A socket path this process serves: the listener and the lock that
/// keeps every other process off it.
#[derive(Debug)]
pub struct ClaimedSocket {
    listener: UnixListener,
    path: PathBuf,
    _lock: File,
}

impl ClaimedSocket {
    /// The listening socket.
    pub fn into_listener(self) -> (UnixListener, File) {
        (self.listener, self._lock)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes an exclusive (write) lock on the whole of `file`, which must be
/// open for writing: an open file description lock, so it belongs to this
/// open file and conflicts within the process too. False if another holds
/// a lock on it.
pub fn lock_exclusive(file: &File) -> std::io::Result<bool> {
    lock(file, libc::F_WRLCK)
}

/// Takes a shared (read) lock on the whole of `file`: other readers may
/// hold one too, no writer. False if a writer holds a lock on it.
pub fn lock_shared(file: &File) -> std::io::Result<bool> {
    lock(file, libc::F_RDLCK)
}

fn lock(file: &File, kind: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: a zeroed flock describing the whole file.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK with a valid flock on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(error),
    }
}

/// Claims `path` for listening (see the module doc).
pub fn claim(path: &Path) -> Result<ClaimedSocket, ClaimError> {
    claim_for(path, None)
}

/// [`claim`], the socket owned by `client` (uid, gid) instead of the
/// reflector's user: mode 0600 still, so that only that user (and root)
/// can connect to it, not another tenant's QEMU run as another user.
pub fn claim_for(path: &Path, client: Option<(u32, u32)>) -> Result<ClaimedSocket, ClaimError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| ClaimError::Io { what, path, source }
    };
    // `PATH.lock` must be a sibling of the socket, never a file inside a
    // directory named by the path (`/run/` would lock `/run/.lock`).
    if path.as_os_str().is_empty() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return Err(ClaimError::NotAPath { path: path.to_owned() });
    }
    let len = path.as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(ClaimError::TooLong { path: path.to_owned(), len });
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(io("creating the lock file", &lock_path))?;
    if !lock_exclusive(&lock).map_err(io("locking", &lock_path))? {
        // A path this process placed before (however spelled: found by
        // its lock file) and let go of holds its lock until its removal:
        // claimed anew, unless its claim is still live.
        let earlier = identity_of(&lock).and_then(take_placed).map(|mut earlier| {
            earlier.lock = None;
            earlier
        });
        if earlier.is_none() || !lock_exclusive(&lock).map_err(io("locking", &lock_path))? {
            // Held by a live claim (or taken by another process this
            // moment): its socket is still the one placed, if it is there.
            if let (Some(earlier), Ok(mut placed)) = (earlier, PLACED.lock()) {
                placed.push(earlier);
            }
            return Err(ClaimError::InUse { path: path.to_owned(), lock: lock_path });
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            // A socket left by a process that did not hold the lock (an
            // older reflector, or another program) may still be served.
            if served(path).map_err(io("checking whether a process still serves", path))? {
                return Err(ClaimError::InUse { path: path.to_owned(), lock: lock_path });
            }
            match std::fs::remove_file(path) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("removing the stale socket", path)(error));
                }
                _ => {}
            }
        }
        Ok(_) => return Err(ClaimError::NotASocket { path: path.to_owned() }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(ClaimError::Io { what: "inspecting", path: path.to_owned(), source: error }),
    }
    let listener = bind_listening(path, client).map_err(io("binding a socket at", path))?;
    remember_placed(path, &lock);
    Ok(ClaimedSocket { listener, path: path.to_owned(), _lock: lock })
}

/// A socket this process placed.
struct Placed {
    path: PathBuf,
    /// Its device and inode as placed, so that [`remove_placed`] removes
    /// only what it placed.
    identity: (u64, u64),
    /// A copy of its lock's descriptor, which shares the lock: held until
    /// the socket is removed, so that no other process claims the path
    /// between the check and the removal (a start that failed let go of its
    /// claims before it removed their sockets).
    lock: Option<File>,
    /// The lock file's device and inode: the path however spelled.
    lock_identity: Option<(u64, u64)>,
}

fn identity_of(file: &File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|metadata| (metadata.dev(), metadata.ino()))
}

/// The sockets this process placed.
static PLACED: std::sync::Mutex<Vec<Placed>> = std::sync::Mutex::new(Vec::new());

fn remember_placed(path: &Path, lock: &File) {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(metadata), Ok(mut placed)) = (std::fs::symlink_metadata(path), PLACED.lock()) {
        let identity = (metadata.dev(), metadata.ino());
        let (lock_identity, lock) = (identity_of(lock), lock.try_clone().ok());
        placed.retain(|other| other.path != path && (lock_identity.is_none() || other.lock_identity != lock_identity));
        placed.push(Placed { path: path.to_owned(), identity, lock, lock_identity });
    }
}

/// Takes the socket whose lock file is `lock_identity` out of the sockets
/// placed, without removing it.
fn take_placed(lock_identity: (u64, u64)) -> Option<Placed> {
    let mut placed = PLACED.lock().ok()?;
    let index = placed.iter().position(|other| other.lock_identity == Some(lock_identity))?;
    Some(placed.swap_remove(index))
}

/// Removes the socket this process placed at `path` ([`claim`]), if it is
/// still there: whatever has taken its place since (a file, another
/// program's socket) is left. Before, the reflector's stop removed
/// whatever was at each path then (an adversarial review found it).
pub fn remove_placed(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(mut placed) = PLACED.lock() else { return };
    let Some(index) = placed.iter().position(|other| other.path == path) else { return };
    // Its lock (dropped last) is held while it is looked at and removed.
    let ours = placed.swap_remove(index);
    let there = std::fs::symlink_metadata(path);
    if there.is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == ours.identity) {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes every socket this process placed and still finds in place (see
/// [`remove_placed`]): a start that failed after placing some leaves no
/// path a client would find refusing connections.
pub fn remove_every_placed() {
    let paths: Vec<PathBuf> = match PLACED.lock() {
        Ok(placed) => placed.iter().map(|placed| placed.path.clone()).collect(),
        Err(_) => return,
    };
    for path in paths {
        remove_placed(&path);
    }
}

/// Whether a process serves the socket at `path`, of any type. Only a
/// refused connection says nobody does (the kernel finds no socket bound
/// to it); a connection taken or queued, or a full backlog (the probe
/// never blocks), says one does. Any other answer (no permission, say) is
/// an error: a socket nobody can vouch for is never removed. Before, any
/// failed stream connect meant stale: another program's live datagram
/// socket (journald's, say) was removed, and a listener with a full
/// backlog blocked the start for ever.
fn served(path: &Path) -> std::io::Result<bool> {
    for kind in [libc::SOCK_STREAM, libc::SOCK_SEQPACKET, libc::SOCK_DGRAM] {
        let error = match connect_nonblocking(path, kind) {
            Ok(_connected) => return Ok(true),
            Err(error) => error,
        };
        match error.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => return Ok(true),
            // Refused, or gone since it was looked at: nobody serves it.
            Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => return Ok(false),
            Some(libc::EPROTOTYPE) => continue,
            _ => return Err(error),
        }
    }
    Err(std::io::Error::other("a socket of no type this can connect to"))
}

/// Connects a new non-blocking socket of `kind` to the socket at `path`:
/// the socket, connected or queued, or why not (EAGAIN: a full backlog).
fn connect_nonblocking(path: &Path, kind: libc::c_int) -> std::io::Result<std::os::fd::OwnedFd> {
    connect(path, kind | libc::SOCK_NONBLOCK, None)
}

/// Connects a stream socket to the socket at `path`, waiting at most
/// `wait` for room in its backlog (a listener that never accepts, whose
/// backlog is full, held a plain connect for ever), and with `wait` as its
/// write timeout from then on.
pub fn connect_within(path: &Path, wait: std::time::Duration) -> std::io::Result<std::os::unix::net::UnixStream> {
    // At least a microsecond: a zero timeout means none at all.
    connect(path, libc::SOCK_STREAM, Some(wait.max(std::time::Duration::from_micros(1))))
        .map(std::os::unix::net::UnixStream::from)
}

/// Connects a new socket of `kind` (flags included) to the socket at
/// `path`; with a send timeout of `wait` set first, which bounds the
/// kernel's wait for room in the listener's backlog (EAGAIN once passed).
fn connect(path: &Path, kind: libc::c_int, wait: Option<std::time::Duration>) -> std::io::Result<std::os::fd::OwnedFd> {
    let address = unix_address(path)?;
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this owns, closed when dropped.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if let Some(wait) = wait {
        let timeout = libc::timeval {
            tv_sec: wait.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_usec: libc::suseconds_t::from(wait.subsec_micros()),
        };
        // SAFETY: setsockopt(2) on our socket with a timeval of its size.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: connect(2) with an initialised sockaddr_un of its length.
    if unsafe { libc::connect(socket.as_raw_fd(), std::ptr::addr_of!(address).cast(), UNIX_ADDRESS_LEN) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

/// The length of a `sockaddr_un`, as `connect(2)` and `bind(2)` take it.
const UNIX_ADDRESS_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;

/// The address of the socket at `path` (ENAMETOOLONG if it does not fit).
fn unix_address(path: &Path) -> std::io::Result<libc::sockaddr_un> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied below.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.len() >= address.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (to, from) in address.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    Ok(address)
}

/// A listener at `path` that never accepts, its backlog full, and the
/// connections that fill it. Its backlog holds one (`listen(2)` with 0):
/// std's listeners take the host's most (`somaxconn`, 4096), which a test
/// filled only with more descriptors than a common limit allows (a review
/// found it).
#[cfg(test)]
pub(crate) fn full_listener(path: &Path) -> (UnixListener, Vec<std::os::fd::OwnedFd>) {
    let address = unix_address(path).unwrap();
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor this owns from here on.
    let listener = unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: bind(2) and listen(2) on our socket, with an initialised
    // sockaddr_un of its length.
    unsafe {
        assert_eq!(libc::bind(fd, std::ptr::addr_of!(address).cast(), UNIX_ADDRESS_LEN), 0, "bind");
        assert_eq!(libc::listen(fd, 0), 0, "listen");
    }
    let mut queued = Vec::new();
    loop {
        match connect_nonblocking(path, libc::SOCK_STREAM) {
            Ok(socket) => queued.push(socket),
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(libc::EAGAIN), "{error}");
                break (listener, queued);
            }
        }
        assert!(queued.len() < 16, "the backlog never filled");
    }
}

/// Longest socket path a client can connect to (`sun_path`, less its NUL).
const SUN_PATH_MAX: usize = 107;

/// Binds a listening, owner-only socket that appears at `path` only once
/// it listens: bound in a new private directory beside it (`PATH.XXXXXX`,
/// made by mkdtemp(3), so no other path can be touched), then renamed onto
/// `path` without replacing anything there; owned by `client` (uid, gid)
/// if given.
fn bind_listening(path: &Path, client: Option<(u32, u32)>) -> std::io::Result<UnixListener> {
    StagingDir::beside(path)?.place(path, client)
}

/// The private directory a socket is bound in before it is renamed into
/// place, reached only through a descriptor of it: whoever may write the
/// directory it is made in (QEMU's user, say, in a directory of its own)
/// can rename it away and put a symlink in its place, and every operation
/// by its path (the bind, the chmod, the clean-up's unlink, all as root)
/// then reached wherever the symlink pointed: a file named `s` anywhere
/// could be removed, or made owner-only (an adversarial review found it).
/// Through the descriptor, they stay in the directory made here, wherever
/// it was moved. Binding through `/proc/self/fd/N/s` also keeps the bound
/// name short, whatever the length of `path` (sun_path holds 107 bytes;
/// longer paths were bound in place before).
struct StagingDir {
    /// Where it was made (it may have been moved since).
    path: PathBuf,
    /// The directory itself.
    fd: std::os::fd::OwnedFd,
}

impl StagingDir {
    /// Makes one beside `path` (`PATH.XXXXXX`, mode 0700).
    fn beside(path: &Path) -> std::io::Result<StagingDir> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let mut template = path.as_os_str().as_bytes().to_vec();
        template.extend_from_slice(b".XXXXXX\0");
        // SAFETY: mkdtemp(3) rewrites the trailing XXXXXX of this
        // NUL-terminated buffer, which we own and which outlives the call,
        // and creates that directory (mode 0700).
        if unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) }.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: open(2) of the NUL-terminated name mkdtemp just made; a
        // symlink put there meanwhile is refused (O_NOFOLLOW), as is
        // anything but a directory.
        let fd = unsafe {
            libc::open(
                template.as_ptr().cast(),
                libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
            )
        };
        template.pop();
        let path = PathBuf::from(std::ffi::OsString::from_vec(template));
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor this owns from here on.
        let staging = StagingDir { path, fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) } };
        // What was opened must be the directory mkdtemp made: a directory
        // of someone else's, swapped in between the two (whoever may write
        // the parent can), would let them put a symlink where the socket
        // goes.
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::File::from(staging.fd.try_clone()?).metadata()?;
        // SAFETY: geteuid(2) cannot fail.
        let me = unsafe { libc::geteuid() };
        if metadata.uid() != me || metadata.mode() & 0o077 != 0 {
            return Err(std::io::Error::other(format!(
                "{} is not the private directory made for the socket (owner {}, mode {:o}): another user may write \
                 the directory it is in; choose a directory only the reflector's user can write",
                staging.path.display(),
                metadata.uid(),
                metadata.mode() & 0o7777
            )));
        }
        Ok(staging)
    }

    /// Binds a listening socket `s` in it, owner-only, and renames it onto
    /// `path` unless something is there (RENAME_NOREPLACE).
    fn place(&self, path: &Path, client: Option<(u32, u32)>) -> std::io::Result<UnixListener> {
        use std::os::unix::ffi::OsStrExt;
        let name = c"s";
        let listener = UnixListener::bind(format!("/proc/self/fd/{}/s", self.fd.as_raw_fd()))?;
        let placed = (|| {
            // The process umask is 077 (see `restrict_umask`); this also
            // covers a library that bound with another one.
            // SAFETY: fchmodat(2) of a name in the directory this owns.
            if unsafe { libc::fchmodat(self.fd.as_raw_fd(), name.as_ptr(), 0o600, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = client {
                // SAFETY: fchownat(2) of a name in the directory this owns,
                // not following a symlink.
                let owned =
                    unsafe { libc::fchownat(self.fd.as_raw_fd(), name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
                if owned != 0 {
                    let error = std::io::Error::last_os_error();
                    return Err(std::io::Error::new(
                        error.kind(),
                        format!("giving the socket to its client's user (uid {uid}, gid {gid}): {error}"),
                    ));
                }
            }
            let to = std::ffi::CString::new(path.as_os_str().as_bytes())?;
            // SAFETY: renameat2(2) of a name in the directory this owns to a
            // NUL-terminated path that lives across the call; NOREPLACE
            // fails rather than replace a file that appeared at `path`
            // since it was checked.
            let renamed = unsafe {
                libc::renameat2(self.fd.as_raw_fd(), name.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE)
            };
            if renamed != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })();
        if placed.is_err() {
            // SAFETY: unlinkat(2) of a name in the directory this owns.
            unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) };
        }
        placed.map(|()| listener)
    }
}

impl Drop for StagingDir {
    /// Removes the directory if its path still names it (moved away, it
    /// is left where it is, empty).
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let ours = self.fd.try_clone().ok().and_then(|fd| std::fs::File::from(fd).metadata().ok());
        let there = std::fs::symlink_metadata(&self.path).ok();
        if let (Some(ours), Some(there)) = (ours, there) {
            if there.is_dir() && (ours.dev(), ours.ino()) == (there.dev(), there.ino()) {
                let _ = std::fs::remove_dir(&self.path);
            }
        }
    }
}

/// Makes every file and socket this process creates owner-only.
pub fn restrict_umask() {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
}

/// Raises the soft limit on open descriptors to the hard limit: every
/// device holds a few dozen (eventfds, memfds, a client's memory), and
/// the default soft limit of 1024 ran out at about 29 devices.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    // SAFETY: getrlimit into a zeroed struct.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit with a soft limit equal to the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sockets-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Connects to `path` as `uid`:`gid` from a child process: 0 connected,
    /// 1 refused for permission, 2 anything else.
    fn connect_as(path: &Path, uid: u32, gid: u32) -> i32 {
        // Everything the child needs is made before the fork: it only
        // makes system calls.
        let address = unix_address(path).unwrap();
        // A fork that shares this process's descriptor table (a clone with
        // CLONE_FILES and no stack of its own): a plain fork held a copy of
        // every descriptor, the other tests' lock files included, until it
        // ended, and a test running beside this one found its lock still
        // held (CI found it). Its credentials are changed by raw system
        // calls, which change only the calling task.
        // SAFETY: clone(2) as fork (a copy of this address space, the
        // child on a copy of this stack); the child makes only system
        // calls, closes the one descriptor it opens, and _exits.
        let pid = unsafe {
            libc::syscall(libc::SYS_clone, libc::CLONE_FILES | libc::SIGCHLD, 0usize, 0usize, 0usize, 0usize)
        } as libc::pid_t;
        if pid == 0 {
            // SAFETY: the child's own credentials and a socket it owns.
            unsafe {
                if libc::syscall(libc::SYS_setgroups, 0usize, 0usize) != 0
                    || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                    || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                {
                    libc::_exit(3);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let connected = libc::connect(fd, std::ptr::addr_of!(address).cast(), UNIX_ADDRESS_LEN) == 0;
                let refused = *libc::__errno_location() == libc::EACCES;
                libc::close(fd);
                libc::_exit(if connected {
                    0
                } else if refused {
                    1
                } else {
                    2
                });
            }
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waitpid(2) on the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "the child died: {status}");
        libc::WEXITSTATUS(status)
    }

    /// A socket given to its client's user (`client_user=`) takes that
    /// user's connections and no other user's: before, every socket was
    /// the reflector's user's, so every tenant's QEMU had to run as that
    /// one user, and any of them could connect to another tenant's device
    /// whenever that one's QEMU was not connected (a review found it).
    #[test]
    fn a_socket_given_to_its_clients_user_takes_only_that_users_connections() {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: giving a socket to another user needs root");
            return;
        }
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = scratch("client-user");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (tenant, other) = (61_234, 61_235);
        let path = dir.join("d.sock");
        let claimed = claim_for(&path, Some((tenant, tenant))).unwrap();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((metadata.uid(), metadata.gid(), metadata.mode() & 0o777), (tenant, tenant, 0o600));
        assert_eq!(connect_as(&path, tenant, tenant), 0, "the client's user was refused");
        assert_eq!(connect_as(&path, other, other), 1, "another user connected");
        // Without a client user: the reflector's own, as before.
        let own = dir.join("own.sock");
        let _own = claim(&own).unwrap();
        assert_eq!(connect_as(&own, tenant, tenant), 1, "a socket of the reflector's took another user");
        drop(claimed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_socket_path_appears_only_listening_and_its_placing_replaces_nothing() {
        let dir = scratch("placed");
        let path = dir.join("s.sock");
        // Another path that looks like a staging name is never touched.
        let neighbour = dir.join("s.sock.new");
        let _neighbour = UnixListener::bind(&neighbour).unwrap();
        let claimed = claim(&path).unwrap();
        UnixStream::connect(&path).expect("the path accepts as soon as it exists");
        UnixStream::connect(&neighbour).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["s.sock", "s.sock.lock", "s.sock.new"], "no staging directory is left behind");
        drop(claimed);
        // A file that appears at the path between the claim's check and
        // the placing stays.
        let image = dir.join("disk.img");
        std::fs::write(&image, b"precious").unwrap();
        assert!(bind_listening(&image, None).is_err());
        assert_eq!(std::fs::read(&image).unwrap(), b"precious");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4, "no staging directory is left behind");
        // A path as long as a socket address holds, too long for the
        // staging directory's name beside it to be bound by name, is
        // placed all the same (bound through the directory's descriptor);
        // a longer one, which no client could connect to, is refused.
        let long = dir.join("x".repeat(SUN_PATH_MAX - dir.as_os_str().len() - 1));
        assert_eq!(long.as_os_str().len(), SUN_PATH_MAX);
        let _claimed = claim(&long).unwrap();
        UnixStream::connect(&long).unwrap();
        let longer = dir.join("x".repeat(SUN_PATH_MAX - dir.as_os_str().len()));
        assert!(matches!(claim(&longer), Err(ClaimError::TooLong { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The reflector's stop removes the socket it placed, and nothing that
    /// took its place since.
    #[test]
    fn only_the_socket_placed_is_removed() {
        let dir = scratch("remove");
        let path = dir.join("d.sock");
        let claimed = claim(&path).unwrap();
        remove_placed(&path);
        assert!(std::fs::symlink_metadata(&path).is_err(), "the socket placed was left");
        drop(claimed);
        let claimed = claim(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"precious").unwrap();
        remove_placed(&path);
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        drop(claimed);
        // Claimed again, then replaced by another program's socket.
        let claimed = claim(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let _other = UnixListener::bind(&path).unwrap();
        remove_placed(&path);
        assert!(std::fs::symlink_metadata(&path).is_ok(), "another socket at the path was removed");
        drop(claimed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A placed socket's lock is held until the socket is removed, even
    /// once its claim is let go of (a failed start does so before its
    /// clean-up): another process could take the path in between and have
    /// its own socket removed. This process may claim it again; a second
    /// claim while one is live is refused and leaves it placed.
    #[test]
    fn a_placed_sockets_lock_is_held_until_its_removal() {
        let dir = scratch("held");
        let path = dir.join("d.sock");
        drop(claim(&path).unwrap());
        // Another open file description: another process, to OFD locks.
        let other = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("d.sock.lock")).unwrap();
        assert!(!lock_exclusive(&other).unwrap(), "the lock went with the claim");
        let again = claim(&path).unwrap();
        assert!(matches!(claim(&path), Err(ClaimError::InUse { .. })));
        remove_placed(&path);
        assert!(std::fs::symlink_metadata(&path).is_err(), "the live claim's socket was no longer placed");
        drop(again);
        assert!(lock_exclusive(&other).unwrap(), "the lock outlived the removal");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whoever may write the directory a socket is claimed in, and swaps
    /// the staging directory for a symlink while the reflector binds, gets
    /// nothing touched where the symlink points: the socket is bound and
    /// placed from the directory the reflector made. Before, the bind, its
    /// chmod and the clean-up's unlink went by path: a file named `s`
    /// anywhere could be removed (as root), or made owner-only.
    #[test]
    fn a_staging_directory_swapped_for_a_symlink_touches_nothing_it_points_to() {
        let dir = scratch("swapped");
        let victim = dir.join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("s"), b"precious").unwrap();
        std::fs::set_permissions(victim.join("s"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.join("d.sock");
        let staging = StagingDir::beside(&path).unwrap();
        std::fs::rename(&staging.path, dir.join("moved")).unwrap();
        std::os::unix::fs::symlink(&victim, &staging.path).unwrap();
        let _listener = staging.place(&path, None).expect("placed from the directory made for it");
        drop(staging);
        UnixStream::connect(&path).unwrap();
        assert_eq!(std::fs::read(victim.join("s")).unwrap(), b"precious");
        assert_eq!(std::fs::metadata(victim.join("s")).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(std::fs::symlink_metadata(dir.join("moved").join("s")).is_err(), "the socket stayed behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = scratch("file");
        let image = dir.join("disk.img");
        std::fs::write(&image, b"precious").unwrap();
        assert!(matches!(claim(&image), Err(ClaimError::NotASocket { .. })));
        assert_eq!(std::fs::read(&image).unwrap(), b"precious");
        std::fs::create_dir(dir.join("d")).unwrap();
        assert!(matches!(claim(&dir.join("d")), Err(ClaimError::NotASocket { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_path_is_claimed_once_however_spelled_and_a_stale_socket_is_replaced() {
        let dir = scratch("once");
        let path = dir.join("s.sock");
        // A stale socket (its listener is gone) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let first = claim(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let respelled = dir.join(".").join("s.sock");
        assert!(matches!(claim(&respelled), Err(ClaimError::InUse { .. })));
        drop(first);
        claim(&respelled).unwrap();
        // A live socket whose owner holds no lock is not taken over.
        let other = dir.join("live.sock");
        let _live = UnixListener::bind(&other).unwrap();
        assert!(matches!(claim(&other), Err(ClaimError::InUse { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Another program's live socket of another type (journald's datagram
    /// socket) is not stale: a stream connect fails on it with EPROTOTYPE,
    /// which was taken for stale, and the socket was removed.
    #[test]
    fn a_live_socket_of_another_type_is_never_replaced() {
        let dir = scratch("other-type");
        let path = dir.join("dgram.sock");
        let _live = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let claimed = claim(&path);
        assert!(matches!(claimed, Err(ClaimError::InUse { .. })), "{claimed:?}");
        assert!(std::fs::symlink_metadata(&path).is_ok(), "the live datagram socket was removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A listener whose backlog is full is in use, and the claim says so at
    /// once: a blocking connect waited for ever (and the start with it).
    #[test]
    fn a_listener_with_a_full_backlog_is_in_use_not_a_hang() {
        let dir = scratch("backlog");
        let path = dir.join("full.sock");
        let (listener, queued) = full_listener(&path);
        let (done, finished) = std::sync::mpsc::channel();
        let probe = path.clone();
        std::thread::spawn(move || {
            let _ = done.send(claim(&probe).map(|_| ()));
        });
        let claimed = finished.recv_timeout(std::time::Duration::from_secs(20)).expect("the claim hung");
        assert!(matches!(claimed, Err(ClaimError::InUse { .. })), "{claimed:?}");
        drop((queued, listener));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_or_an_empty_path_is_refused_without_a_lock_file() {
        let dir = scratch("dir-path");
        let mut slashed = dir.clone().into_os_string();
        slashed.push("/");
        assert!(matches!(claim(Path::new(&slashed)), Err(ClaimError::NotAPath { .. })));
        assert!(matches!(claim(Path::new("")), Err(ClaimError::NotAPath { .. })));
        assert!(!dir.join(".lock").exists(), "a lock file was made inside the directory");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let error = claim(Path::new("/nonexistent-dir-for-test/s.sock")).unwrap_err();
        assert!(error.to_string().contains("/nonexistent-dir-for-test/s.sock.lock"), "{error}");
    }
}
