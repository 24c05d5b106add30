//! The guest's serial console: bytes written to COM1, shown line by line
//! with the VM's name in front, control characters escaped.

use std::fs::File;
use std::io::Write;

use crate::outcome::sanitize;

/// Longest line kept before it is shown anyway: bounds the memory a guest
/// that never writes a newline can make the vmm hold.
const MAX_LINE: usize = 4096;

/// Where console lines go.
#[derive(Debug)]
pub enum ConsoleSink {
    /// The vmm's standard error.
    Stderr,
    /// A file.
    File(File),
    /// Nowhere.
    Discard,
}

/// A line-buffered console.
#[derive(Debug)]
pub struct Console {
    prefix: String,
    sink: ConsoleSink,
    line: Vec<u8>,
}

impl Console {
    /// A console whose lines start with `[name] `.
    pub fn new(name: &str, sink: ConsoleSink) -> Self {
        Console { prefix: format!("[{name}] "), sink, line: Vec::new() }
    }

    /// Takes bytes the guest wrote.
    pub fn write(&mut self, bytes: &[u8]) {
        if matches!(self.sink, ConsoleSink::Discard) {
            return;
        }
        for &byte in bytes {
            match byte {
                b'\n' => self.emit_line(),
                b'\r' => {}
                _ => {
                    self.line.push(byte);
                    if self.line.len() >= MAX_LINE {
                        self.emit_line();
                    }
                }
            }
        }
    }

    /// Shows what is left of an unterminated line.
    pub fn flush(&mut self) {
        if !self.line.is_empty() {
            self.emit_line();
        }
    }

    fn emit_line(&mut self) {
        let text = format!("{}{}\n", self.prefix, sanitize(&self.line));
        self.line.clear();
        let result = match &mut self.sink {
            ConsoleSink::Stderr => std::io::stderr().write_all(text.as_bytes()),
            ConsoleSink::File(file) => file.write_all(text.as_bytes()),
            ConsoleSink::Discard => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "console output lost; discarding the rest");
            self.sink = ConsoleSink::Discard;
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    #[test]
    fn lines_are_prefixed_and_sanitized() {
        let file = tempfile();
        let mut console = Console::new("vm0", ConsoleSink::File(file.try_clone().unwrap()));
        console.write(b"hello\r\nwor");
        console.write(b"ld\x07\nunterminated");
        drop(console);
        let mut text = String::new();
        let mut file = file;
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, "[vm0] hello\n[vm0] world\\u{7}\n[vm0] unterminated\n");
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!("vmm-console-test-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
