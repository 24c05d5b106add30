//! Links every isolated image with guest-kernel's linker script (hosted
//! builds are ordinary Linux executables).
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let script = manifest.join("../guest-kernel/link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    // For driver crates that depend on this one (DEP_DRIVER_VM_LINK_SCRIPT).
    println!("cargo:link-script={}", script.display());
    if std::env::var_os("CARGO_CFG_DRIVER_VM_ISOLATED").is_some() {
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    }
}
