//! Links the isolated image with the SDK's linker script (driver-vm says
//! where it is); hosted builds are ordinary executables.
fn main() {
    if std::env::var_os("CARGO_CFG_DRIVER_VM_ISOLATED").is_some() {
        if let Some(script) = std::env::var_os("DEP_DRIVER_VM_LINK_SCRIPT") {
            println!("cargo:rustc-link-arg-bins=-T{}", script.to_string_lossy());
        }
    }
}
