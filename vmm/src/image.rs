//! Driver VM images: built-in ones (embedded by build.rs) or files.
//!
//! An image is an x86-64 ELF executable linked at `IMAGE_BASE` with an
//! [`ImageHeader`] there. [`parse_elf`] checks the ELF headers before
//! anything is loaded, so a bad file gets a precise error instead of a
//! half-loaded guest; linux-loader then loads the segments, and
//! [`check_header`] validates the image header in guest memory.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use guest_abi::{self as abi, ImageHeader, Plain};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::PAGE_SIZE;
use crate::error::{Error, Result};

/// An image file embedded at an 8-byte aligned address: ELF readers
/// (`object`, for the crash reports' symbols) read its headers in place and
/// refuse a misaligned file.
macro_rules! aligned_image {
    ($path:expr) => {{
        #[repr(C, align(8))]
        struct Aligned<Bytes: ?Sized>(Bytes);
        static ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!($path));
        &ALIGNED.0
    }};
}

include!(concat!(env!("OUT_DIR"), "/images.rs"));

/// Heap an image gets at least, beyond its own size and the ring-3 stack.
pub const MIN_HEAP: u64 = 64 * 1024;

/// Most program headers accepted; the linker script produces five.
const MAX_PROGRAM_HEADERS: u16 = 64;

/// Where an image's loadable segments go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfLayout {
    /// Entry point.
    pub entry: u64,
    /// Lowest loaded address (always `IMAGE_BASE`).
    pub start: u64,
    /// End (exclusive) of the highest segment, including its bss.
    pub end: u64,
    /// The loadable segments, for the page permissions.
    pub segments: Vec<Segment>,
}

/// One loadable segment: where, and what the guest may do with its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First address.
    pub start: u64,
    /// End (exclusive), including its bss.
    pub end: u64,
    /// Writable (PF_W).
    pub writable: bool,
    /// Executable (PF_X).
    pub executable: bool,
}

impl Segment {
    /// The pages it touches: `[first, end)`, page aligned.
    pub fn pages(&self) -> (u64, u64) {
        (self.start & !(PAGE_SIZE - 1), self.end.next_multiple_of(PAGE_SIZE))
    }
}

impl ElfLayout {
    /// Permissions of the image page at `page`: (writable, executable).
    /// Pages no segment touches are plain data.
    pub fn page_permissions(&self, page: u64) -> (bool, bool) {
        let touching = self.segments.iter().filter(|segment| {
            let (first, end) = segment.pages();
            (first..end).contains(&page)
        });
        touching.fold((false, false), |(w, x), segment| (w || segment.writable, x || segment.executable))
    }
}

/// An image ready to load.
#[derive(Clone, Debug)]
pub struct Image {
    /// Built-in name or path, for messages.
    pub name: String,
    bytes: Cow<'static, [u8]>,
    /// Where it loads.
    pub layout: ElfLayout,
}

/// The names of the built-in images.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILT_IN.iter().map(|(name, _)| *name)
}

impl Image {
    /// Largest image file read: driver images are tens of kilobytes, and
    /// `--image /dev/zero` must end in an error, not in all of memory.
    pub const MAX_FILE: u64 = 64 << 20;

    /// Resolves `--image`: a built-in name, else a path. A name containing a
    /// `/` is always a path.
    pub fn resolve(arg: &str) -> Result<Image> {
        if !arg.contains('/') && !arg.starts_with("fd=") {
            if let Some((name, bytes)) = BUILT_IN.iter().find(|(name, _)| *name == arg) {
                return Image::from_bytes(name.to_string(), Cow::Borrowed(bytes));
            }
        }
        Image::from_bytes(arg.into(), Cow::Owned(read_file(arg)?))
    }

    /// Checks `bytes` as an image.
    pub fn from_bytes(name: String, bytes: Cow<'static, [u8]>) -> Result<Image> {
        let layout = parse_elf(&bytes).map_err(|reason| Error::ImageInvalid { image: name.clone(), reason })?;
        Ok(Image { name, bytes, layout })
    }

    /// The ELF file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Guest RAM this image needs: itself, a minimal heap, the stack and
    /// its guard.
    pub fn ram_needed(&self) -> u64 {
        self.layout.end.next_multiple_of(PAGE_SIZE) + MIN_HEAP + abi::STACK_GUARD_SIZE + abi::RING3_STACK_SIZE
    }

    /// Loads the segments into `memory` and validates the image header.
    pub fn load(&self, memory: &GuestMemoryMmap) -> Result<ImageHeader> {
        let invalid = |reason: String| Error::ImageInvalid { image: self.name.clone(), reason };
        Elf::load(memory, None, &mut Cursor::new(&self.bytes[..]), None)
            .map_err(|e| invalid(format!("loading its segments failed: {e}")))?;
        let mut raw = [0u8; std::mem::size_of::<ImageHeader>()];
        memory
            .read_slice(&mut raw, GuestAddress(abi::IMAGE_BASE))
            .map_err(|e| invalid(format!("reading its header failed: {e}")))?;
        check_header(&raw, &self.layout).map_err(invalid)
    }
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(offset..offset.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(offset..offset.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(offset..offset.checked_add(8)?)?.try_into().ok()?))
}

/// Checks the ELF file header and program headers of an image and returns
/// where it loads. Input is untrusted: every offset and size is checked.
pub fn parse_elf(bytes: &[u8]) -> std::result::Result<ElfLayout, String> {
    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;
    const PF_W: u32 = 2;
    const PHDR_SIZE: usize = 56;
    if bytes.len() < 64 || bytes[..4] != *b"\x7fELF" {
        return Err("not an ELF file (no ELF magic)".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let short = || "truncated ELF header".to_string();
    let (e_type, machine) = (u16_at(bytes, 16).ok_or_else(short)?, u16_at(bytes, 18).ok_or_else(short)?);
    if e_type != 2 || machine != 62 {
        return Err(format!("not an x86-64 executable (type {e_type}, machine {machine})"));
    }
    let entry = u64_at(bytes, 24).ok_or_else(short)?;
    let phoff = usize::try_from(u64_at(bytes, 32).ok_or_else(short)?).map_err(|_| "program header offset too large")?;
    let (phentsize, phnum) = (u16_at(bytes, 54).ok_or_else(short)?, u16_at(bytes, 56).ok_or_else(short)?);
    if usize::from(phentsize) != PHDR_SIZE || phnum == 0 || phnum > MAX_PROGRAM_HEADERS {
        return Err(format!("unexpected program headers ({phnum} of {phentsize} bytes)"));
    }
    let (mut start, mut end) = (u64::MAX, 0u64);
    let mut segments = Vec::new();
    for index in 0..usize::from(phnum) {
        let base = phoff
            .checked_add(index * PHDR_SIZE)
            .filter(|base| base.checked_add(PHDR_SIZE).is_some_and(|end| end <= bytes.len()))
            .ok_or_else(|| format!("program header {index} lies beyond the end of the file"))?;
        let field = |offset| u64_at(bytes, base + offset).unwrap_or(u64::MAX);
        if u32_at(bytes, base) != Some(PT_LOAD) {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (field(8), field(24), field(32), field(40));
        if filesz > memsz {
            return Err(format!("segment {index}: file size {filesz} exceeds memory size {memsz}"));
        }
        if offset.checked_add(filesz).is_none_or(|e| e > bytes.len() as u64) {
            return Err(format!("segment {index} lies beyond the end of the file"));
        }
        let segment_end = paddr.checked_add(memsz).ok_or_else(|| format!("segment {index} wraps around"))?;
        if paddr < abi::IMAGE_BASE || segment_end > abi::GPA_LIMIT {
            return Err(format!(
                "segment {index} at {paddr:#x} is outside [{:#x}, {:#x})",
                abi::IMAGE_BASE,
                abi::GPA_LIMIT
            ));
        }
        let flags = u32_at(bytes, base + 4).unwrap_or(0);
        let (writable, executable) = (flags & PF_W != 0, flags & PF_X != 0);
        if writable && executable {
            return Err(format!(
                "segment {index} is writable and executable: images are W^X (link it with guest-kernel/link.ld)"
            ));
        }
        start = start.min(paddr);
        end = end.max(segment_end);
        segments.push(Segment { start: paddr, end: segment_end, writable, executable });
    }
    for (a, b) in segments.iter().flat_map(|a| segments.iter().map(move |b| (a, b))) {
        let ((a_first, a_end), (b_first, b_end)) = (a.pages(), b.pages());
        if a.writable && b.executable && a_first < b_end && b_first < a_end {
            return Err(format!(
                "a writable segment at {:#x} shares a page with code at {:#x}: images are W^X (link it with guest-kernel/link.ld)",
                a.start, b.start
            ));
        }
    }
    if start != abi::IMAGE_BASE {
        return Err(format!("no loadable segment at {:#x} (link it with guest-kernel/link.ld)", abi::IMAGE_BASE));
    }
    if !(start..end).contains(&entry) {
        return Err(format!("entry point {entry:#x} is outside the image [{start:#x}, {end:#x})"));
    }
    Ok(ElfLayout { entry, start, end, segments })
}

/// Checks the image header read from `IMAGE_BASE`.
pub fn check_header(raw: &[u8], layout: &ElfLayout) -> std::result::Result<ImageHeader, String> {
    let header = ImageHeader::from_bytes(raw).ok_or("image header truncated")?;
    if header.magic != abi::IMAGE_MAGIC {
        return Err(format!("no image header at {:#x} (is it built with guest-kernel?)", abi::IMAGE_BASE));
    }
    if header.abi_version != abi::ABI_VERSION {
        return Err(format!(
            "built for ABI version {}, this vmm speaks {}: rebuild it",
            header.abi_version,
            abi::ABI_VERSION
        ));
    }
    if header.header_size as usize != std::mem::size_of::<ImageHeader>() {
        return Err(format!(
            "image header is {} bytes, expected {}",
            header.header_size,
            std::mem::size_of::<ImageHeader>()
        ));
    }
    let stubs_end = header.isr_stubs.checked_add(abi::ISR_COUNT * abi::ISR_STUB_STRIDE);
    if header.isr_stubs < layout.start || stubs_end.is_none_or(|end| end > layout.end) {
        return Err(format!("interrupt stubs at {:#x} are outside the image", header.isr_stubs));
    }
    Ok(header)
}

/// Reads an image file given as `fd=N` (an inherited descriptor) or a
/// path, bounded by [`Image::MAX_FILE`]: for driver VM images and hosted
/// drivers alike.
pub fn read_file(arg: &str) -> Result<Vec<u8>> {
    if let Some(number) = arg.strip_prefix("fd=") {
        let fd: std::os::fd::RawFd = number.parse().ok().filter(|fd| *fd > 2).ok_or_else(|| {
            Error::invalid("--image", format!("{arg:?}: expected fd=N, an inherited descriptor above 2"))
        })?;
        return read_inherited(fd).map_err(|source| Error::ImageRead { path: arg.into(), source });
    }
    let path = Path::new(arg);
    // Only a path that is not there is "not found": one that cannot be
    // reached (no permission, a file as a directory, too long, a symlink
    // loop) says why, from the read (before, each was "not found").
    if std::fs::symlink_metadata(path).is_err_and(|error| error.kind() == std::io::ErrorKind::NotFound) {
        return Err(Error::ImageNotFound {
            name: arg.into(),
            builtins: builtin_names().collect::<Vec<_>>().join(", "),
        });
    }
    read_bounded(path).map_err(|source| Error::ImageRead { path: path.into(), source })
}

/// Reads an image from inherited descriptor `fd` (a jailed vmm opens no
/// path): a regular file of at most [`Image::MAX_FILE`] bytes, read from
/// its start whatever its offset.
fn read_inherited(fd: std::os::fd::RawFd) -> std::io::Result<Vec<u8>> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;
    // SAFETY: F_DUPFD_CLOEXEC on a number; fails with EBADF if not open.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this process owns.
    let file = unsafe { std::fs::File::from_raw_fd(copy) };
    let size = file.metadata()?.len();
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if size > Image::MAX_FILE {
        return Err(std::io::Error::other(format!("larger than {} MiB", Image::MAX_FILE >> 20)));
    }
    let mut bytes = vec![0u8; size as usize];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Reads an image file: a regular file of at most [`Image::MAX_FILE`] bytes.
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: opening a FIFO for reading waits for a writer for ever.
    let file = std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(Image::MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > Image::MAX_FILE {
        return Err(std::io::Error::other(format!("larger than {} MiB", Image::MAX_FILE >> 20)));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> &'static [u8] {
        BUILT_IN.iter().find(|(name, _)| *name == "hello").map(|(_, bytes)| *bytes).expect("hello is built in")
    }

    #[test]
    fn builtin_images_parse() {
        for (name, bytes) in BUILT_IN {
            let layout = parse_elf(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(layout.start, abi::IMAGE_BASE);
            assert!(layout.end > layout.entry);
        }
    }

    #[test]
    fn rejects_non_elf_and_truncation() {
        assert!(parse_elf(b"hello world").unwrap_err().contains("not an ELF"));
        let image = hello();
        assert!(parse_elf(&image[..63]).is_err());
        // Cut inside the last loaded segment (line tables follow the
        // segments in the file): the headers now point beyond the end.
        let word = |at: usize| u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
        let (phoff, phnum) = (word(32) as usize, u16::from_le_bytes([image[56], image[57]]) as usize);
        let segments_end = (0..phnum)
            .map(|i| phoff + i * 56)
            .filter(|&at| u32::from_le_bytes(image[at..at + 4].try_into().unwrap()) == 1)
            .map(|at| word(at + 8) + word(at + 32))
            .max()
            .unwrap() as usize;
        let cut = &image[..segments_end - 1];
        assert!(parse_elf(cut).unwrap_err().contains("beyond the end"));
    }

    /// Offsets of the PT_LOAD program headers of `image`.
    fn load_headers(image: &[u8]) -> Vec<usize> {
        let phoff = u64::from_le_bytes(image[32..40].try_into().unwrap()) as usize;
        let phnum = u16::from_le_bytes([image[56], image[57]]) as usize;
        (0..phnum).map(|i| phoff + i * 56).filter(|&at| image[at..at + 4] == [1, 0, 0, 0]).collect()
    }

    #[test]
    fn built_in_images_are_w_xor_x_and_their_code_is_read_only() {
        for (name, bytes) in BUILT_IN {
            let layout = parse_elf(bytes).unwrap();
            let code = layout.segments.iter().find(|s| s.executable).unwrap_or_else(|| panic!("{name}: no code"));
            assert_eq!(layout.page_permissions(code.start & !(PAGE_SIZE - 1)), (false, true), "{name}");
            assert!(layout.segments.iter().any(|s| !s.writable && !s.executable), "{name}: no read-only data");
        }
    }

    #[test]
    fn rejects_writable_code_and_code_sharing_a_page_with_data() {
        let mut image = hello().to_vec();
        let headers = load_headers(&image);
        let code = *headers.iter().find(|&&at| image[at + 4] & 1 != 0).unwrap();
        image[code + 4] |= 2; // PF_W on the code segment
        assert!(parse_elf(&image).unwrap_err().contains("W^X"));
        // The header segment (read-only) made writable: it shares its page
        // with the code.
        let mut image = hello().to_vec();
        image[headers[0] + 4] |= 2;
        assert!(parse_elf(&image).unwrap_err().contains("shares a page with code"));
    }

    #[test]
    fn rejects_wrong_machine_and_bad_headers() {
        let mut image = hello().to_vec();
        image[18] = 0xb7; // aarch64
        assert!(parse_elf(&image).unwrap_err().contains("not an x86-64"));
        let mut image = hello().to_vec();
        image[56] = 0xff; // e_phnum
        image[57] = 0xff;
        assert!(parse_elf(&image).is_err());
        let mut image = hello().to_vec();
        // e_phoff at the end of the address space: the header's end wraps
        // (a panic where overflow is checked, a header read from offset 55
        // where it is not), and it must be refused as beyond the file.
        for phoff in [u64::MAX, u64::MAX - 55, u64::MAX - 8] {
            image[32..40].copy_from_slice(&phoff.to_le_bytes());
            assert!(parse_elf(&image).unwrap_err().contains("beyond the end of the file"), "{phoff:#x}");
        }
    }

    /// Fuzz-style: thousands of randomly corrupted images must never panic
    /// the parser, and whatever it accepts must lie where images may load.
    #[test]
    fn corrupted_images_never_panic_and_accepted_ones_are_in_bounds() {
        let original = hello();
        let mut state = 0x9e37_79b9_7f4a_7c15u64; // fixed seed: reproducible
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let mut image = original.to_vec();
            // Corrupt the headers most of the time: that is where the parser looks.
            for _ in 0..1 + next() % 8 {
                let limit = if next() % 4 == 0 { image.len() } else { 64 + 5 * 56 };
                let at = (next() as usize) % limit.min(image.len());
                image[at] = next() as u8;
            }
            if round % 10 == 0 {
                image.truncate((next() as usize) % (original.len() + 1));
            }
            if let Ok(layout) = parse_elf(&image) {
                assert_eq!(layout.start, abi::IMAGE_BASE);
                assert!(layout.start <= layout.entry && layout.entry < layout.end && layout.end <= abi::GPA_LIMIT);
            }
        }
    }

    #[test]
    fn header_checks() {
        let layout = parse_elf(hello()).unwrap();
        let good = ImageHeader {
            magic: abi::IMAGE_MAGIC,
            abi_version: abi::ABI_VERSION,
            header_size: 24,
            isr_stubs: layout.start + 0x30,
        };
        assert!(check_header(good.as_bytes(), &layout).is_ok());
        let bad_magic = ImageHeader { magic: *b"XXXXXXXX", ..good };
        assert!(check_header(bad_magic.as_bytes(), &layout).is_err());
        let bad_version = ImageHeader { abi_version: 99, ..good };
        assert!(check_header(bad_version.as_bytes(), &layout).unwrap_err().contains("ABI"));
        let bad_stubs = ImageHeader { isr_stubs: u64::MAX - 8, ..good };
        assert!(check_header(bad_stubs.as_bytes(), &layout).is_err());
    }
}
