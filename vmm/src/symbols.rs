//! Where in the driver's source a guest address is: the image's DWARF line
//! tables (images are built with `debug = "line-tables-only"`), read with
//! `addr2line`, so a crash is reported as a function, file and line instead
//! of a bare instruction address. Inlined frames are walked outward to the
//! first one in the driver's own code (not the standard library's).

use addr2line::gimli;
use object::{Object, ObjectSection};
use serde::Serialize;

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

/// The location of `address` in the ELF `image`: the innermost frame in
/// the driver's own code (inlined standard-library frames are skipped), or
/// the innermost frame if all are the library's. None when the image has no
/// line tables or the address is in none.
pub fn locate(image: &[u8], address: u64) -> Option<Location> {
    let file = object::File::parse(image).ok()?;
    let load = |id: gimli::SectionId| -> Result<gimli::EndianSlice<'_, gimli::RunTimeEndian>, gimli::Error> {
        let data = file.section_by_name(id.name()).and_then(|section| section.data().ok()).unwrap_or(&[]);
        Ok(gimli::EndianSlice::new(data, gimli::RunTimeEndian::Little))
    };
    let dwarf = gimli::Dwarf::load(load).ok()?;
    let context = addr2line::Context::from_dwarf(dwarf).ok()?;
    let mut frames = context.find_frames(address).skip_all_loads().ok()?;
    let mut stack = Vec::new();
    while let Ok(Some(frame)) = frames.next() {
        let Some(location) = frame.location else { continue };
        let (Some(file), Some(line)) = (location.file, location.line) else { continue };
        let function = frame.function.as_ref().and_then(|f| f.demangle().ok()).map(|name| name.into_owned());
        stack.push(Location { function, file: file.to_owned(), line });
    }
    let own = stack.iter().position(|frame| !frame.file.starts_with("/rustc/"));
    own.or((!stack.is_empty()).then_some(0)).map(|at| stack.swap_remove(at))
}
