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
fn interpreter(binary: &Path) -> std::io::Result<Option<PathBuf>> {
    let bytes = std::fs::read(binary)?;
    let field = |at: usize, len: usize| -> std::io::Result<u64> {
        let slice = bytes.get(at..at + len).ok_or_else(|| std::io::Error::other("truncated ELF"))?;
        let mut value = [0u8; 8];
        value[..len].copy_from_slice(slice);
        Ok(u64::from_le_bytes(value))
    };
    if bytes.get(0..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
        return Err(std::io::Error::other("not a 64-bit ELF file"));
    }
    let (phoff, phentsize, phnum) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for i in 0..phnum {
        let header = (phoff + i * phentsize) as usize;
        if field(header, 4)? == 3 {
            let (offset, size) = (field(header + 8, 8)? as usize, field(header + 32, 8)? as usize);
            let raw = bytes.get(offset..offset + size).ok_or_else(|| std::io::Error::other("truncated ELF"))?;
            let text = raw.split(|b| *b == 0).next().unwrap_or(raw);
            return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(text))));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libraries_of_a_dynamic_binary_are_found() {
        let me = std::env::current_exe().unwrap();
        let libraries = libraries(&me).unwrap();
        assert!(libraries.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libraries:?}");
        assert!(libraries.iter().all(|l| l.is_absolute() && l.exists()), "{libraries:?}");
    }
}
