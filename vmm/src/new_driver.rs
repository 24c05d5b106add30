//! `vmm new-driver NAME`: a driver crate of its own, outside this
//! repository, that builds, tests and serves in three commands (see
//! docs/writing-a-driver.md). It starts from the SDK's `vmdisk` sample (a
//! RAM disk in device memory, with its unit tests) and depends on the SDK's
//! `driver-vm` crate by path; the flags of isolated images come with it
//! (`isolated.toml`, `cargo image`), and the linker script through
//! driver-vm's build metadata.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const CARGO_TOML: &str = include_str!("../../template/driver/Cargo.toml");
const BUILD_RS: &str = include_str!("../../template/driver/build.rs");
const CARGO_CONFIG: &str = include_str!("../../template/driver/.cargo/config.toml");
const ISOLATED_TOML: &str = include_str!("../../driver-vm/isolated.toml");
const SAMPLE: &str = include_str!("../../driver-vm/src/bin/vmdisk.rs");
/// The sample's dependency versions: a new crate resolves offline to the
/// same ones.
const LOCK: &str = include_str!("../../driver-vm/Cargo.lock");

/// The SDK this vmm was built from (the repository's root).
pub fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Whether `name` can name a crate, a binary and a driver: lower-case
/// letters, digits, `-` and `_`, starting with a letter, at most 32.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Writes a new driver crate `name` in `parent/name`, using the SDK at
/// `sdk`; returns its directory.
pub fn create(name: &str, parent: &Path, sdk: &Path) -> Result<PathBuf> {
    if !valid_name(name) {
        return Err(Error::invalid(
            "new-driver NAME",
            format!("{name:?}: use lower-case letters, digits, - and _, starting with a letter (at most 32)"),
        ));
    }
    let sdk = sdk.canonicalize().map_err(|source| Error::Io {
        operation: format!("finding the SDK at {} (pass --sdk PATH, a checkout of the project)", sdk.display()),
        source,
    })?;
    if !sdk.join("driver-vm/Cargo.toml").is_file() {
        return Err(Error::invalid(
            "--sdk",
            format!("{} has no driver-vm/Cargo.toml: pass a checkout of the project", sdk.display()),
        ));
    }
    let dir = parent.join(name);
    if dir.exists() {
        return Err(Error::invalid("new-driver NAME", format!("{} already exists", dir.display())));
    }
    let fill = |text: &str| text.replace("{{name}}", name).replace("{{sdk}}", &sdk.display().to_string());
    let source = format!(
        "//! `{name}`: started from the SDK's `vmdisk` sample by `vmm new-driver`.\n//!\n{}",
        SAMPLE.replace("const NAME: &'static str = \"vmdisk\";", &format!("const NAME: &'static str = {name:?};"))
    );
    let files: [(&str, String); 6] = [
        ("Cargo.toml", fill(CARGO_TOML)),
        ("Cargo.lock", LOCK.to_owned()),
        ("build.rs", BUILD_RS.to_owned()),
        (".cargo/config.toml", CARGO_CONFIG.to_owned()),
        ("isolated.toml", ISOLATED_TOML.to_owned()),
        ("src/main.rs", source),
    ];
    for (path, contents) in files {
        let path = dir.join(path);
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(path.parent().unwrap_or(&dir))?;
            fs::write(&path, contents)
        };
        write().map_err(|source| Error::Io { operation: format!("writing {}", path.display()), source })?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_nothing_is_overwritten() {
        let parent = std::env::temp_dir().join(format!("new-driver-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&parent);
        fs::create_dir_all(&parent).unwrap();
        for bad in ["", "Disk", "9disk", "a/b", "x".repeat(33).as_str()] {
            assert!(create(bad, &parent, &default_sdk()).is_err(), "{bad:?}");
        }
        let dir = create("mydisk", &parent, &default_sdk()).unwrap();
        let main = fs::read_to_string(dir.join("src/main.rs")).unwrap();
        assert!(main.contains("const NAME: &'static str = \"mydisk\";"), "{main}");
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"mydisk\"") && !manifest.contains("{{"), "{manifest}");
        assert!(create("mydisk", &parent, &default_sdk()).unwrap_err().to_string().contains("already exists"));
        assert!(create("other", &parent, Path::new("/nonexistent")).is_err());
        fs::remove_dir_all(&parent).unwrap();
    }
}
