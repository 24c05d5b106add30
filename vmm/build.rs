//! Builds the driver VM images (the `driver-vm` workspace) and embeds them in
//! the `vmm` binary, so that one `cargo build --release` at the root builds
//! host binaries and images alike, and `vmm run --image hello` works from any
//! directory.
//!
//! The images are built by a nested `cargo build` in their own workspace and
//! target directory (`target/guest`): they need bare-metal flags that must not
//! reach the host crates, and a separate target directory keeps the nested
//! build from waiting on the outer build's lock.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest target: the host architecture, freestanding (see
/// driver-vm/.cargo/config.toml for why it is named explicitly).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The images a production vmm (without the `test-images` feature) embeds.
const PRODUCTION_IMAGES: &[&str] = &["blk", "e1000e", "net", "null", "nvme", "vmdisk"];

/// Environment the outer cargo sets for build scripts that would change how
/// the nested build compiles (flags, wrappers such as clippy-driver, targets).
const SCRUBBED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("vmm/ sits in the workspace root").to_path_buf();
    let driver_dir = root.join("driver-vm");
    // Test images and fault injection only with the `test-images` feature;
    // the two kinds of build keep their images apart.
    let testing = env::var_os("CARGO_FEATURE_TEST_IMAGES").is_some();
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join(if testing { "guest" } else { "guest-production" });

    for watched in [
        "driver-vm/src",
        "driver-vm/Cargo.toml",
        "driver-vm/Cargo.lock",
        "driver-vm/build.rs",
        "driver-vm/isolated.toml",
        "guest-kernel/src",
        "guest-kernel/Cargo.toml",
        "guest-kernel/link.ld",
        "guest-kernel/abi/src",
        "guest-kernel/abi/Cargo.toml",
        // Every path dependency of the images: a change to the NVMe core
        // must rebuild the nvme image.
        "nvme/src",
        "nvme/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = |bins: &[&str]| -> std::process::Output {
        let mut command = Command::new(&cargo);
        command
            .current_dir(&driver_dir)
            .args(["build", "--release", "--target", GUEST_TARGET, "--config"])
            .arg(driver_dir.join("isolated.toml"))
            .arg("--target-dir")
            .arg(&target_dir);
        match bins {
            [] => command.arg("--bins"),
            names => names.iter().fold(&mut command, |command, name| command.args(["--bin", name])),
        };
        if testing {
            command.args(["--features", "fault-injection"]);
        }
        for var in SCRUBBED_ENV {
            command.env_remove(var);
        }
        command.output().expect("failed to run cargo for the driver VM images")
    };

    let mut names = image_names(&driver_dir.join("src/bin"));
    names.retain(|name| testing || PRODUCTION_IMAGES.contains(&name.as_str()));
    names.sort();
    let output = build(&[]);
    if !output.status.success() {
        // One broken driver must not break the host binaries: build the
        // images one by one and leave out (loudly) those that do not build.
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !stderr.contains("could not compile `driver-vm` (bin") {
            eprintln!("{stderr}");
            panic!("building the driver VM images in {} failed (output above)", driver_dir.display());
        }
        names.retain(|name| {
            let output = build(&[name]);
            if !output.status.success() {
                let first_error = String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .find(|line| line.starts_with("error"))
                    .unwrap_or("see cargo build in driver-vm")
                    .to_owned();
                println!(
                    "cargo:warning=driver image `{name}` does not build and is left out of the vmm: {first_error}"
                );
            }
            output.status.success()
        });
    }

    let image_dir = target_dir.join(GUEST_TARGET).join("release");
    let mut table =
        String::from("/// Built-in images: (name, ELF bytes).\npub static BUILT_IN: &[(&str, &[u8])] = &[\n");
    for name in &names {
        let path = image_dir.join(name);
        assert!(path.is_file(), "image {} was not built", path.display());
        writeln!(table, "    ({name:?}, aligned_image!({:?})),", path.display().to_string()).expect("write to String");
    }
    table.push_str("];\n");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("images.rs");
    fs::write(&out, table).expect("write images.rs");
}

/// One image per file in driver-vm/src/bin.
fn image_names(bin_dir: &Path) -> Vec<String> {
    fs::read_dir(bin_dir)
        .expect("read driver-vm/src/bin")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect()
}
