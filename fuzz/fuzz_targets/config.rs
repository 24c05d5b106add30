//! The operator's configuration: the TOML file and the --blk/--net/--tap
//! one-liners, on any text. Nothing may panic; an accepted config is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflector::config;

fuzz_target!(|text: &str| {
    if let Ok(parsed) = config::parse_file(text, "fuzz.toml") {
        let _ = parsed.validate();
    }
    let _ = config::parse_blk(text, 3);
    let _ = config::parse_net(text, 3);
    let _ = config::parse_tap(text);
    let _ = config::parse_size(text);
    let _ = config::parse_mac(text);
});
