//! A block device's disk image made ready before any device starts:
//! created if missing and asked for (`size=`), checked, and locked against
//! every other writer for as long as the device serves.
//!
//! - The lock is taken the moment the image is created (in the directory
//!   opened, never through a symlink), or before an existing one is used:
//!   another reflector started at the same moment on the same image cannot
//!   take it between its creation and this start's lock.
//! - An image this start created is removed again if the start fails before
//!   its devices serve: only if no other process holds a lock on it (a
//!   read-only device's lock is shared, and another reflector may share
//!   it), through its directory's descriptor, and only if the name still
//!   names the file created: never an image that was there before, one
//!   another process uses, or a file a swapped directory leads to.
//!
//! It is not the image's I/O: the devices' hardware opens the image again.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::{BlkConfig, DeviceHardware};

/// The disk images a start created: removed again if the start fails, so
/// that a refused start leaves no image behind (a retry with another
/// `size=` met the first attempt's file and was refused for its size);
/// kept once the devices serve.
#[derive(Debug, Default)]
#[must_use = "dropped, it removes the images it holds"]
pub struct CreatedImages(Vec<CreatedImage>);

#[derive(Debug)]
struct CreatedImage {
    path: PathBuf,
    /// The directory the image was created in, and its name there: the
    /// removal goes through this descriptor, not the path.
    directory: File,
    name: CString,
    /// Device and inode of the file created: a name that names another
    /// file by the time of the removal is left alone.
    identity: (u64, u64),
    /// This start's lock on the image (a copy of its descriptor, open for
    /// reading and writing, which shares the lock), held until the removal.
    lock: File,
}

impl CreatedImages {
    /// The start succeeded: the images are the devices' disks now.
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for CreatedImages {
    fn drop(&mut self) {
        for image in self.0.drain(..) {
            let shown = image.path.display();
            match image.remove() {
                Ok(true) => tracing::info!(image = %shown, "removed the disk image created for this start"),
                Ok(false) => tracing::warn!(
                    image = %shown,
                    "the disk image created for this start was replaced, or another process uses it; left"
                ),
                Err(error) => {
                    tracing::warn!(image = %shown, %error, "cannot remove the disk image created for this start")
                }
            }
        }
    }
}

impl CreatedImage {
    /// Unlinks the image if no other process holds a lock on it (another
    /// reflector serving it: a read-only device shares its lock) and its
    /// name in its directory still names the file created; false if not.
    fn remove(&self) -> std::io::Result<bool> {
        // The lock this start holds, made exclusive: refused while another
        // holds one.
        if !crate::sockets::lock_exclusive(&self.lock)? {
            return Ok(false);
        }
        let dir = self.directory.as_raw_fd();
        // SAFETY: a zeroed stat for fstatat(2) to fill.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat(2) on a directory descriptor we hold, a
        // NUL-terminated name that outlives the call, into a local stat.
        if unsafe { libc::fstatat(dir, self.name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            let error = std::io::Error::last_os_error();
            return if error.kind() == std::io::ErrorKind::NotFound { Ok(false) } else { Err(error) };
        }
        let is_file = stat.st_mode & libc::S_IFMT == libc::S_IFREG;
        if !is_file || (stat.st_dev, stat.st_ino) != self.identity {
            return Ok(false);
        }
        // SAFETY: unlinkat(2) of a NUL-terminated name in a directory
        // descriptor we hold.
        if unsafe { libc::unlinkat(dir, self.name.as_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(true)
    }
}

/// Creates the disk image if it is missing (and a size was given), noting
/// it in `created`; checks it; locks it. The lock, to hold while the device
/// serves; none for a VFIO function, which has no image (it is its own
/// disk, and its group is exclusive).
pub fn prepare(config: &BlkConfig, created: &mut CreatedImages) -> Result<Option<File>, String> {
    if matches!(config.device, DeviceHardware::Vfio { .. }) {
        return Ok(None);
    }
    let path = &config.image;
    // The file judged is the file locked: the checks read the descriptor
    // opened, not the path again.
    // Nothing but a regular file is opened (opening a device node may do
    // something).
    let not_a_file = || format!("disk image {} is not a regular file", path.display());
    let (file, made) = match std::fs::metadata(path) {
        Ok(seen) if !seen.is_file() => return Err(not_a_file()),
        Ok(_) => {
            let file = open_existing(path, config.read_only)
                .map_err(|e| format!("opening disk image {}: {e}", path.display()))?;
            (file, false)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => (create(config, created)?, true),
        Err(error) => return Err(format!("disk image {}: {error}", path.display())),
    };
    let metadata = file.metadata().map_err(|e| format!("disk image {}: {e}", path.display()))?;
    if !metadata.is_file() {
        // Swapped since it was looked at.
        return Err(not_a_file());
    }
    if metadata.len() < 512 {
        return Err(format!("disk image {} is smaller than one sector", path.display()));
    }
    if let Some(size) = config.size.filter(|&size| size != metadata.len()) {
        return Err(format!(
            "disk image {} exists with {} bytes, but size={size} was given: drop size= to use it as it is, \
             or resize the image",
            path.display(),
            metadata.len()
        ));
    }
    if !made {
        lock(&file, path, config.read_only)?;
    }
    Ok(Some(file))
}

/// Creates and locks the missing image of `config`, sized; notes it in
/// `created`.
fn create(config: &BlkConfig, created: &mut CreatedImages) -> Result<File, String> {
    let path = &config.image;
    let size = config
        .size
        .ok_or_else(|| format!("disk image {} does not exist: add size=SIZE to create it", path.display()))?;
    let (directory, name) = directory_and_name(path)?;
    let failed = |what: &str, error: std::io::Error| format!("{what} disk image {}: {error}", path.display());
    // Created in the directory opened, never through a path a swapped
    // directory or a symlink put elsewhere.
    // SAFETY: openat(2) of a NUL-terminated name in a directory descriptor
    // we hold; the descriptor returned is ours alone.
    let fd = unsafe {
        libc::openat(
            directory.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o666 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(failed("creating", std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor openat(2) just returned, owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    // Noted at once: from here every failure removes it (unless another
    // process has taken it since, which its lock says).
    let noted = file.metadata().and_then(|metadata| Ok(((metadata.dev(), metadata.ino()), file.try_clone()?)));
    let (identity, held) = match noted {
        Ok(noted) => noted,
        Err(error) => {
            // Nothing to identify it by: removed by its name, as before.
            let _ = std::fs::remove_file(path);
            return Err(failed("noting the new", error));
        }
    };
    let image = CreatedImage { path: path.clone(), directory, name, identity, lock: held };
    let ready = lock(&file, path, config.read_only).and_then(|()| {
        file.set_len(size).map_err(|error| format!("sizing disk image {} to {size} bytes: {error}", path.display()))
    });
    // Noted before anything can fail: a failed start (this one included)
    // removes it, and never leaves a 0-byte image a retry would accept.
    created.0.push(image);
    ready?;
    tracing::info!(image = %path.display(), size, "created disk image");
    Ok(file)
}

/// The directory `path` is in, opened (only as a place: no right to list
/// it is needed), and the file's name there.
fn directory_and_name(path: &Path) -> Result<(File, CString), String> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path.file_name().map(OsString::from).ok_or_else(|| {
        format!("disk image {}: the path names no file (it ends with .. or /): give a file's path", path.display())
    })?;
    let name = CString::new(name.as_bytes())
        .map_err(|_| format!("disk image {}: a path holding a NUL byte", path.display()))?;
    let directory = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(parent)
        .map_err(|e| format!("disk image {}: opening its directory {}: {e}", path.display(), parent.display()))?;
    Ok((directory, name))
}

/// Opens an existing disk image, never waiting: a FIFO swapped in at the
/// path since it was looked at is opened at once (and then refused for
/// what it is), not waited on for a writer.
fn open_existing(path: &Path, read_only: bool) -> std::io::Result<File> {
    std::fs::OpenOptions::new().read(true).write(!read_only).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)
}

/// Locks the disk image against every other writer (another reflector,
/// QEMU, qemu-storage-daemon: QEMU's image locks are open file description
/// locks too, so each side sees the other's).
/// A read-only device takes a shared lock: several may read one image, no
/// one may write it meanwhile.
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), String> {
    let locked = if read_only { crate::sockets::lock_shared(file) } else { crate::sockets::lock_exclusive(file) };
    match locked {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "disk image {} is in use by another process (it holds a lock on it): one writer at a time",
            path.display()
        )),
        Err(error) => Err(format!("locking disk image {}: {error}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(image: &Path, size: Option<u64>) -> BlkConfig {
        let mut config = crate::config::parse_blk(&format!("socket=/s,image={}", image.display()), 0).unwrap();
        config.size = size;
        config
    }

    /// The removal takes the file created, through the directory it was
    /// created in: never a file a directory swapped in since leads to.
    #[test]
    fn only_the_file_created_is_removed_through_the_directory_it_was_created_in() {
        let dir = std::env::temp_dir().join(format!("disk-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a")).unwrap();
        let image = dir.join("a").join("d.img");
        let mut created = CreatedImages::default();
        let lock = prepare(&config(&image, Some(1 << 20)), &mut created).unwrap();
        assert!(lock.is_some());
        // A second start on the same image finds it locked at once.
        let error = prepare(&config(&image, Some(1 << 20)), &mut CreatedImages::default()).unwrap_err();
        assert!(error.contains("in use by another process"), "{error}");
        // Its directory moved away and another, holding a file of that
        // name, put in its place: the file created goes, from the
        // directory it was created in, and the other stays.
        std::fs::rename(dir.join("a"), dir.join("moved")).unwrap();
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::write(&image, b"another's").unwrap();
        drop(lock);
        drop(created);
        assert_eq!(std::fs::read(&image).unwrap(), b"another's");
        assert!(!dir.join("moved").join("d.img").exists());
        // Left where it was: removed.
        let other = dir.join("e.img");
        let mut created = CreatedImages::default();
        let lock = prepare(&config(&other, Some(4096)), &mut created).unwrap();
        drop(lock);
        drop(created);
        assert!(!other.exists());
        // Replaced by another file of its name: left.
        let mut created = CreatedImages::default();
        let lock = prepare(&config(&other, Some(4096)), &mut created).unwrap();
        std::fs::rename(&other, dir.join("f.img")).unwrap();
        std::fs::write(&other, b"another's").unwrap();
        drop(lock);
        drop(created);
        assert_eq!(std::fs::read(&other).unwrap(), b"another's");
        std::fs::remove_file(&other).unwrap();
        // A read-only device's, whose shared lock another start (a second
        // reflector) shares: left to it.
        let shared = dir.join("r.img");
        let read_only = BlkConfig { read_only: true, ..config(&shared, Some(4096)) };
        let mut created = CreatedImages::default();
        let lock = prepare(&read_only, &mut created).unwrap();
        let second = prepare(&read_only, &mut CreatedImages::default()).unwrap();
        drop(lock);
        drop(created);
        assert!(shared.exists(), "an image another start uses was removed");
        drop(second);
        // A FIFO is refused, not waited on for a writer; so is a directory.
        let fifo = dir.join("p.img");
        let name = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        for path in [&fifo, &dir] {
            let error = prepare(&config(path, None), &mut CreatedImages::default()).unwrap_err();
            assert!(error.contains("is not a regular file"), "{error}");
        }
        // Kept: stays.
        let mut created = CreatedImages::default();
        let _lock = prepare(&config(&other, Some(4096)), &mut created).unwrap();
        created.keep();
        assert!(other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
