//! The files a jailed vmm needs besides itself: the shared libraries its
//! dynamic loader resolves, found by asking that loader.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::JailError;

/// [`libraries`] of `vmm`, asked of its loader once per binary: every
/// device's jail binds the same files, and starting the loader for each of
/// hundreds of devices would only repeat the answer.
pub(super) fn libraries_of(vmm: &Path) -> Result<Vec<PathBuf>, JailError> {
    static KNOWN: std::sync::Mutex<Vec<(PathBuf, Vec<PathBuf>)>> = std::sync::Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, found)) = known.iter().find(|(binary, _)| binary == vmm) {
        return Ok(found.clone());
    }
    let found = libraries(vmm)?;
    known.push((vmm.to_owned(), found.clone()));
    Ok(found)
}

/// The shared libraries `vmm` loads, as its dynamic loader resolves them
/// (the loader included); none for a static binary.
fn libraries(vmm: &Path) -> Result<Vec<PathBuf>, JailError> {
    let fail = |reason: String| JailError::Libraries { vmm: vmm.to_owned(), reason };
    let Some(interpreter) = interpreter(vmm).map_err(|e| fail(e.to_string()))? else { return Ok(Vec::new()) };
    let output = std::process::Command::new(&interpreter)
        .arg("--list")
        .arg(vmm)
        .output()
        .map_err(|e| fail(format!("running {}: {e}", interpreter.display())))?;
    if !output.status.success() {
        return Err(fail(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    let mut found = vec![interpreter];
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.trim(),
            None => line.trim(),
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') && !found.iter().any(|f| f == Path::new(path)) {
            found.push(PathBuf::from(path));
        }
    }
    Ok(found)
}

/// The ELF program interpreter (PT_INTERP) of `binary`, if it has one.
///
/// Reads only the ELF header, the program headers and the interpreter's
/// name: reading the whole binary (the vmm is 4.6 MB, QEMU more) left its
/// pages resident in the reflector for good, in the heap of the thread
/// that started the device (a device on QEMU's NVMe model idled at 9.7 MiB
/// against 5.1 MiB, of a budget of 10.25).
pub fn interpreter(binary: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::fs::FileExt;
    // Not a FIFO or a device: opening a FIFO would wait for a writer, with
    // every device's start waiting behind it.
    if !std::fs::metadata(binary)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let file = std::fs::File::open(binary)?;
    let read = |at: u64, len: usize| -> std::io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, at).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => std::io::Error::other("truncated ELF"),
            _ => e,
        })?;
        Ok(bytes)
    };
    let field = |bytes: &[u8], at: usize, len: usize| -> u64 {
        let mut value = [0u8; 8];
        value[..len].copy_from_slice(&bytes[at..at + len]);
        u64::from_le_bytes(value)
    };
    // Shorter than a 64-bit ELF header: not one.
    let header = if file.metadata()?.len() < 0x40 { Vec::new() } else { read(0, 0x40)? };
    if header.get(0..4) != Some(b"\x7fELF") || header.get(4) != Some(&2) {
        return Err(std::io::Error::other("not a 64-bit ELF file"));
    }
    let (phoff, phentsize, phnum) = (field(&header, 0x20, 8), field(&header, 0x36, 2), field(&header, 0x38, 2));
    if phentsize < 0x38 {
        return Err(std::io::Error::other("ELF program headers too small"));
    }
    // At most 65535 headers of at most 65535 bytes: 4 GiB at worst from a
    // hostile file, so read them one at a time.
    for i in 0..phnum {
        let entry = read(phoff.saturating_add(i * phentsize), 0x38)?;
        if field(&entry, 0, 4) == 3 {
            let (offset, size) = (field(&entry, 8, 8), field(&entry, 32, 8));
            // A path, not a file: PATH_MAX bounds it.
            let size = usize::try_from(size)
                .ok()
                .filter(|&s| s <= 4096)
                .ok_or_else(|| std::io::Error::other("ELF interpreter name longer than a path"))?;
            let raw = read(offset, size)?;
            let text = raw.split(|b| *b == 0).next().unwrap_or(&raw);
            return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(text))));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit ELF header with one program header, PT_INTERP naming
    /// `interp`, at the start of a sparse file of `size` bytes.
    fn elf_with_interpreter(name: &str, interp: &[u8], size: u64) -> PathBuf {
        use std::os::unix::fs::FileExt;
        let path = std::env::temp_dir().join(format!("reflector-elf-{}-{name}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        let mut header = vec![0u8; 0x40];
        header[0..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        header[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        header[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let mut program = vec![0u8; 0x38];
        program[0..4].copy_from_slice(&3u32.to_le_bytes());
        program[8..16].copy_from_slice(&0x78u64.to_le_bytes());
        program[32..40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
        file.write_all_at(&header, 0).unwrap();
        file.write_all_at(&program, 0x40).unwrap();
        file.write_all_at(interp, 0x78).unwrap();
        path
    }

    #[test]
    fn the_interpreter_is_read_from_the_headers_alone() {
        // 1 GiB, sparse: reading it whole would take a gigabyte.
        let path = elf_with_interpreter("big", b"/lib64/ld-test.so.2\0", 1 << 30);
        assert_eq!(interpreter(&path).unwrap(), Some(PathBuf::from("/lib64/ld-test.so.2")));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_broken_binary_is_refused_with_a_reason() {
        let long = vec![b'a'; 8192];
        let path = elf_with_interpreter("long", &long, 16384);
        let error = interpreter(&path).unwrap_err().to_string();
        assert!(error.contains("longer than a path"), "{error}");
        std::fs::remove_file(&path).unwrap();
        // Cut inside its program header.
        let path = elf_with_interpreter("short", b"/lib/ld.so\0", 0x78);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0x60).unwrap();
        let error = interpreter(&path).unwrap_err().to_string();
        assert!(error.contains("truncated ELF"), "{error}");
        std::fs::remove_file(&path).unwrap();
        // A FIFO is refused, not opened (that would wait for a writer).
        let fifo = std::env::temp_dir().join(format!("reflector-elf-{}-fifo", std::process::id()));
        let name = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let error = interpreter(&fifo).unwrap_err().to_string();
        assert!(error.contains("not a regular file"), "{error}");
        std::fs::remove_file(&fifo).unwrap();
        let path = std::env::temp_dir().join(format!("reflector-elf-{}-text", std::process::id()));
        std::fs::write(&path, b"#!/bin/sh\necho not an ELF file\n").unwrap();
        let error = interpreter(&path).unwrap_err().to_string();
        assert!(error.contains("not a 64-bit ELF"), "{error}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_libraries_of_a_dynamic_binary_are_found() {
        let me = std::env::current_exe().unwrap();
        let libraries = libraries(&me).unwrap();
        assert!(libraries.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libraries:?}");
        assert!(libraries.iter().all(|l| l.is_absolute() && l.exists()), "{libraries:?}");
    }
}
