//! Where in the driver's source a guest address is: the image's DWARF line
//! tables (images are built with `debug = "line-tables-only"`), read with
//! `addr2line`, so a crash is reported as a function, file and line instead
//! of a bare instruction address. Inlined frames are walked outward to the
//! first one in the driver's own code (not the standard library's). Also
//! the image's build-id, and the frame-pointer chain a backtrace follows.

use addr2line::gimli;
use object::{Object, ObjectSection};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A source location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Location {
    /// The function (demangled), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// The source file, as the compiler named it.
    pub file: String,
    /// The line.
    pub line: u32,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.function {
            Some(function) => write!(f, "{function} ({}:{})", self.file, self.line),
            None => write!(f, "{}:{}", self.file, self.line),
        }
    }
}

type Reader<'a> = gimli::EndianSlice<'a, gimli::RunTimeEndian>;

/// An image's symbols: its line tables (if it has them) and build-id.
pub struct Symbols<'a> {
    context: Option<addr2line::Context<Reader<'a>>>,
    build_id: Option<String>,
}

impl<'a> Symbols<'a> {
    /// Reads the line tables and build-id of the ELF `image` (untrusted: a
    /// malformed file yields no symbols, never an error or a panic). The
    /// bytes must be 8-byte aligned, as the built-in images and heap
    /// buffers are.
    pub fn new(image: &'a [u8]) -> Self {
        let Ok(file) = object::File::parse(image) else { return Symbols { context: None, build_id: None } };
        // A GNU build-id is 20 bytes; a longer one (a hostile image's
        // megabytes) is none.
        let build_id = file
            .build_id()
            .ok()
            .flatten()
            .filter(|id| id.len() <= MAX_BUILD_ID)
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect());
        let load = |id: gimli::SectionId| -> Result<Reader<'a>, gimli::Error> {
            let data = file.section_by_name(id.name()).and_then(|section| section.data().ok()).unwrap_or(&[]);
            Ok(gimli::EndianSlice::new(data, gimli::RunTimeEndian::Little))
        };
        Symbols { context: gimli::Dwarf::load(load).ok().and_then(context), build_id }
    }

    /// The build-id, in hex.
    pub fn build_id(&self) -> Option<&str> {
        self.build_id.as_deref()
    }

    /// The location of `address`: the innermost frame in the driver's own
    /// code (inlined standard-library frames are skipped), or the innermost
    /// frame if all are the library's. None without line tables or when
    /// the address is in none.
    pub fn locate(&self, address: u64) -> Option<Location> {
        let mut stack = self.frames(address);
        let own = stack.iter().position(is_own);
        own.or((!stack.is_empty()).then_some(0)).map(|at| stack.swap_remove(at))
    }

    /// Every frame at `address`, innermost first: the function it is in and
    /// those it was inlined into, each with its call's line. A doorbell's
    /// write, inlined into the driver's code, is told apart by its callers.
    pub fn frames(&self, address: u64) -> Vec<Location> {
        let Some(mut frames) = self.context.as_ref().and_then(|c| c.find_frames(address).skip_all_loads().ok()) else {
            return Vec::new();
        };
        let mut stack = Vec::new();
        while let Ok(Some(frame)) = frames.next() {
            if stack.len() == MAX_INLINED {
                break;
            }
            let Some(location) = frame.location else { continue };
            let (Some(file), Some(line)) = (location.file, location.line) else { continue };
            let function = frame.function.as_ref().and_then(|f| f.demangle().ok()).map(|name| shown(&name));
            stack.push(Location { function, file: shown(file), line });
        }
        stack
    }

    /// How `vmm locate` names `address`: its [`Symbols::locate`] place, or
    /// `?`; with `inlined`, followed by the driver's own functions it was
    /// inlined into, joined by ` < `.
    pub fn name(&self, address: u64, inlined: bool) -> String {
        let Some(place) = self.locate(address) else { return "?".to_owned() };
        let chain: Vec<String> = if inlined {
            self.frames(address).iter().filter(|frame| is_own(frame)).map(ToString::to_string).collect()
        } else {
            Vec::new()
        };
        if chain.is_empty() {
            place.to_string()
        } else {
            chain.join(" < ")
        }
    }
}

/// The longest build-id taken, in bytes (a GNU one is 20).
const MAX_BUILD_ID: usize = 64;

/// The deepest nesting of debugging entries an image's DWARF may have for
/// its addresses to be looked up: `addr2line` walks a function's inlined
/// calls recursively, so entries nested 100,000 deep (a hostile image's,
/// a byte each) overflowed the vmm's stack as it wrote its report, and it
/// ended without one (an adversarial review found it). The compiler's nest
/// a few tens deep.
const MAX_ENTRY_DEPTH: isize = 256;

/// The most debugging entries an image's DWARF may have for its addresses
/// to be looked up: `addr2line` keeps a record (48 bytes) of each inlined
/// call of a function it looks in, so a hostile image's tens of millions of
/// one-byte entries took gigabytes as the vmm wrote its crash report (its
/// memory cap then killed it, and its report said out of memory instead of
/// the crash: an adversarial review found it). The built-in drivers have
/// 3,000-4,000; 1,000,000 is about 50 MiB at most.
const MAX_ENTRIES: usize = 1_000_000;

/// The most frames given for one address (a function and the calls it was
/// inlined into; the compiler's are a few deep).
const MAX_INLINED: usize = 16;

/// The most characters of a function's or file's name kept: names come
/// from the image, as long as it likes (tens of megabytes, copied for each
/// frame, made reports of hundreds of megabytes).
const MAX_NAME: usize = 256;

/// `name`, from an untrusted image, as a report or a terminal may show it:
/// cut at [`MAX_NAME`] characters, and each control, bidirectional or
/// zero-width character written as its escape (`\u{1b}`): before, an
/// image's names reached `vmm run`'s and `vmm locate`'s output raw, escape
/// sequences and all.
fn shown(name: &str) -> String {
    let mut shown = String::new();
    for c in name.chars().take(MAX_NAME) {
        let hidden = c.is_control()
            || matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}');
        if hidden {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// The lookup context of `dwarf`, if its entries are no deeper than
/// [`MAX_ENTRY_DEPTH`] and no more than [`MAX_ENTRIES`] (read without
/// recursion) and it parses.
fn context(dwarf: gimli::Dwarf<Reader<'_>>) -> Option<addr2line::Context<Reader<'_>>> {
    let mut headers = dwarf.units();
    let mut count = 0usize;
    while let Some(header) = headers.next().ok()? {
        let unit = dwarf.unit(header).ok()?;
        let mut entries = unit.entries_raw(None).ok()?;
        while !entries.is_empty() {
            count += 1;
            if entries.next_depth() > MAX_ENTRY_DEPTH || count > MAX_ENTRIES {
                return None;
            }
            if let Some(abbreviation) = entries.read_abbreviation().ok()? {
                entries.skip_attributes(abbreviation.attributes()).ok()?;
            }
        }
    }
    addr2line::Context::from_dwarf(dwarf).ok()
}

/// Whether a frame is in the driver's own code, not the standard library's.
pub fn is_own(frame: &Location) -> bool {
    !frame.file.starts_with("/rustc/")
}

/// The location of `address` in the ELF `image` (see [`Symbols::locate`]).
pub fn locate(image: &[u8], address: u64) -> Option<Location> {
    Symbols::new(image).locate(address)
}

/// Most frames a backtrace follows.
pub const MAX_FRAMES: usize = 32;

/// The return addresses on the frame-pointer chain from `rbp` (images are
/// built with frame pointers): `[rbp]` is the caller's `rbp`, `[rbp + 8]`
/// the return address. Guest memory is untrusted: every frame must lie in
/// `stack` (the ring-3 stack), be aligned and sit above the one before, and
/// the walk stops after [`MAX_FRAMES`].
pub fn return_addresses(memory: &GuestMemoryMmap, mut rbp: u64, stack: std::ops::Range<u64>) -> Vec<u64> {
    let read = |at: u64| {
        let mut raw = [0u8; 8];
        memory.read_slice(&mut raw, GuestAddress(at)).ok().map(|()| u64::from_le_bytes(raw))
    };
    let mut addresses = Vec::new();
    while addresses.len() < MAX_FRAMES && rbp.is_multiple_of(8) && stack.contains(&rbp) && rbp + 16 <= stack.end {
        let (Some(caller_rbp), Some(return_address)) = (read(rbp), read(rbp + 8)) else { break };
        if return_address == 0 {
            break;
        }
        addresses.push(return_address);
        if caller_rbp <= rbp {
            break;
        }
        rbp = caller_rbp;
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_chain_is_followed_within_the_stack_and_stops_at_garbage() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let write = |at: u64, value: u64| memory.write_slice(&value.to_le_bytes(), GuestAddress(at)).unwrap();
        // Three frames, the last pointing back down (a loop a hostile guest
        // could build): followed once each.
        write(0x8000, 0x8100);
        write(0x8008, 0x1111);
        write(0x8100, 0x8200);
        write(0x8108, 0x2222);
        write(0x8200, 0x8000);
        write(0x8208, 0x3333);
        assert_eq!(return_addresses(&memory, 0x8000, 0x8000..0x9000), vec![0x1111, 0x2222, 0x3333]);
        // Outside the stack, unaligned, or beyond memory: nothing.
        assert!(return_addresses(&memory, 0x7ff8, 0x8000..0x9000).is_empty());
        assert!(return_addresses(&memory, 0x8004, 0x8000..0x9000).is_empty());
        assert!(return_addresses(&memory, 0xfff8, 0x8000..0x20000).is_empty());
    }

    /// low_pc 0x1000 and a length of 0x1000 (abbreviations 1 to 3 below).
    const RANGE: [u8; 16] = [0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0];

    /// The entries of a compile unit (abbreviation 1) and a function
    /// (abbreviation 2) in it, both over [`RANGE`], children to follow.
    fn function_entries() -> Vec<u8> {
        [&[1][..], &RANGE, &[2], &RANGE].concat()
    }

    /// A DWARF 4 unit of `entries`: its header (length, version,
    /// abbreviations at 0, addresses of 8 bytes), then them.
    fn unit(entries: &[u8]) -> Vec<u8> {
        let mut info = ((2 + 4 + 1 + entries.len()) as u32).to_le_bytes().to_vec();
        info.extend_from_slice(&4u16.to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes());
        info.push(8);
        info.extend_from_slice(entries);
        info
    }

    /// DWARF of one compile unit and one function covering 0x1000..0x2000,
    /// with `siblings` inlined calls side by side in it, each a byte (an
    /// entry with no attribute and no child).
    fn wide_dwarf(siblings: usize) -> (Vec<u8>, Vec<u8>) {
        const CHILDREN: u8 = 1;
        let abbrev = vec![
            1, 0x11, CHILDREN, 0x11, 0x01, 0x12, 0x07, 0, 0, //
            2, 0x2e, CHILDREN, 0x11, 0x01, 0x12, 0x07, 0, 0, //
            3, 0x1d, 0, 0, 0, //
            0,
        ];
        let mut entries = function_entries();
        entries.extend(std::iter::repeat_n(3, siblings));
        entries.extend([0, 0]);
        (unit(&entries), abbrev)
    }

    /// An image with more debugging entries than any driver's gives no
    /// symbols: before, looking an address up kept a record of each.
    #[test]
    fn dwarf_of_millions_of_entries_gives_no_symbols() {
        let (info, abbrev) = wide_dwarf(4);
        assert!(symbols_of(&info, &abbrev).context.is_some(), "a narrow unit was refused");
        let (info, abbrev) = wide_dwarf(MAX_ENTRIES + 1);
        assert!(symbols_of(&info, &abbrev).context.is_none(), "{} entries were taken", MAX_ENTRIES + 1);
    }

    /// A name from an image is cut short and shown without what would move
    /// a terminal's cursor or retitle it.
    #[test]
    fn names_from_an_image_are_cut_short_and_escaped() {
        assert_eq!(shown("run"), "run");
        let hostile = format!("\x1b]0;owned\x07{}", "x".repeat(10_000));
        let name = shown(&hostile);
        assert!(!name.contains('\x1b') && !name.contains('\x07'), "{name}");
        assert!(name.starts_with("\\u{1b}]0;owned\\u{7}"), "{name}");
        assert!(name.chars().count() <= MAX_NAME * 10);
    }

    /// DWARF of one compile unit and one function covering 0x1000..0x2000,
    /// with `depth` inlined calls nested inside it.
    fn nested_dwarf(depth: usize) -> (Vec<u8>, Vec<u8>) {
        const CHILDREN: u8 = 1;
        // Abbreviations: 1 compile unit, 2 subprogram (both low_pc as an
        // address, high_pc as an 8-byte length), 3 inlined subroutine.
        let abbrev = vec![
            1, 0x11, CHILDREN, 0x11, 0x01, 0x12, 0x07, 0, 0, //
            2, 0x2e, CHILDREN, 0x11, 0x01, 0x12, 0x07, 0, 0, //
            3, 0x1d, CHILDREN, 0x11, 0x01, 0x12, 0x07, 0, 0, //
            0,
        ];
        let mut entries = function_entries();
        for _ in 0..depth {
            entries.push(3);
            entries.extend_from_slice(&RANGE);
        }
        entries.extend(std::iter::repeat_n(0, depth + 2));
        (unit(&entries), abbrev)
    }

    fn symbols_of<'a>(info: &'a [u8], abbrev: &'a [u8]) -> Symbols<'a> {
        let load = |id: gimli::SectionId| -> Result<Reader<'a>, gimli::Error> {
            let data = match id {
                gimli::SectionId::DebugInfo => info,
                gimli::SectionId::DebugAbbrev => abbrev,
                _ => &[],
            };
            Ok(gimli::EndianSlice::new(data, gimli::RunTimeEndian::Little))
        };
        Symbols { context: gimli::Dwarf::load(load).ok().and_then(context), build_id: None }
    }

    /// An image whose debugging entries nest without end gives no symbols,
    /// and looking an address up in it returns, on a thread of an ordinary
    /// stack. Before, the lookup recursed through every level and
    /// overflowed the stack.
    #[test]
    fn dwarf_nested_without_end_gives_no_symbols_instead_of_overflowing_the_stack() {
        let (info, abbrev) = nested_dwarf(4);
        assert!(symbols_of(&info, &abbrev).context.is_some(), "shallow DWARF was refused");
        let (info, abbrev) = nested_dwarf(200_000);
        let looked_up = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || symbols_of(&info, &abbrev).frames(0x1800).len())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(looked_up, 0);
    }

    #[test]
    fn every_built_in_image_has_a_build_id_and_line_tables() {
        for (name, bytes) in crate::image::BUILT_IN {
            if let Err(error) = object::File::parse(*bytes) {
                panic!("{name}: {error}");
            }
            let symbols = Symbols::new(bytes);
            assert_eq!(symbols.build_id().map(str::len), Some(40), "{name}");
            let layout = crate::image::parse_elf(bytes).unwrap();
            let code = layout.segments.iter().find(|segment| segment.executable).unwrap();
            let located = (code.start..code.end).step_by(64).filter(|&at| symbols.locate(at).is_some()).count();
            assert!(located > 0, "{name}: its code has line tables");
        }
    }

    #[test]
    fn garbage_is_no_image() {
        let symbols = Symbols::new(b"not an elf file");
        assert_eq!(symbols.locate(0x1000), None);
        assert_eq!(symbols.build_id(), None);
    }
}
