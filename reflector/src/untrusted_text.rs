//! Text from an untrusted party (a vmm's report, its standard error) made
//! fit for the reflector's log and an operator's terminal: nothing in it
//! may move a cursor, retitle a terminal, reorder or hide text, or end a
//! line.

/// Whether `c`, from text a vmm or its guest wrote, may reach a log line
/// or an operator's terminal as it is: not a control character (C0, DEL,
/// C1: escape sequences, carriage returns) nor one that reorders or hides
/// text (bidirectional controls, zero-width characters, line and
/// paragraph separators).
pub fn printable(c: char) -> bool {
    !c.is_control()
        && !matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}')
}

/// `text` with each character that is not [`printable`] written as its
/// JSON escape (`\u001b`). A vmm's report is one JSON line, whose strings
/// never hold a raw control character: an honest report keeps its
/// meaning, and a hostile one can no longer move an operator's cursor,
/// retitle their terminal or forge a line when the reflector logs it or
/// `reflector status` prints it (an adversarial review found the report
/// went there raw); nor can a vmm's standard error (`console_relay`).
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if printable(c) {
            escaped.push(c);
        } else {
            // Into the string itself: no allocation a character.
            let _ = std::fmt::Write::write_fmt(&mut escaped, format_args!("\\u{:04x}", u32::from(c)));
        }
    }
    escaped
}
