//! Crash reports, from both untrusted ends: the image's symbols (line
//! tables and build-id, read with addr2line/object from any bytes as an
//! ELF file) and the report a hostile vmm writes, from which the reflector
//! takes a location for its log and `status`. Nothing may panic; the
//! location the reflector keeps is bounded and free of control characters.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    // The ELF reader wants the file 8-byte aligned, as the vmm keeps it.
    let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: viewing the u64 buffer as bytes; it is at least as long.
    let view = unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), aligned.len() * 8) };
    view[..bytes.len()].copy_from_slice(bytes);
    let symbols = vmm::symbols::Symbols::new(&view[..bytes.len()]);
    let _ = symbols.build_id();
    for address in [0x10_0000, 0x10_0020, 0x10_1000, u64::from_le_bytes([bytes.first().copied().unwrap_or(0); 8])] {
        let _ = symbols.locate(address);
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Some(site) = reflector::supervisor::crash_site(text) {
            assert!(!site.chars().any(char::is_control), "control characters kept: {site:?}");
            assert!(site.chars().count() <= 3 * 200 + 64, "unbounded: {} characters", site.chars().count());
        }
    }
});
