//! The vmm's image loader on any bytes: the ELF parser and header checks,
//! and loading an accepted image into guest memory. Nothing may panic.
#![no_main]

use std::borrow::Cow;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::image::Image;

static MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();

fuzz_target!(|bytes: &[u8]| {
    let Ok(image) = Image::from_bytes("fuzz".into(), Cow::Owned(bytes.to_vec())) else { return };
    if image.ram_needed() > 16 << 20 {
        return;
    }
    let memory = MEMORY
        .get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("16 MiB of guest memory"));
    let _ = image.load(memory);
});
