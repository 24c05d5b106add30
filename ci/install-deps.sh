#!/usr/bin/env bash
# Installs what the tests need on a fresh machine. The boot path needs only
# the Rust toolchain (cargo, rustfmt, clippy) and /dev/kvm.
set -euo pipefail

missing=()
command -v cargo >/dev/null || missing+=(cargo)
cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
if ((${#missing[@]})); then
    echo "install-deps: missing ${missing[*]}: install the Rust toolchain with rustfmt and clippy" >&2
    exit 1
fi
if [[ -r /dev/kvm && -w /dev/kvm ]]; then
    echo "install-deps: /dev/kvm is usable"
else
    echo "install-deps: WARNING: /dev/kvm is not usable; KVM tests will skip (or fail under CI)" >&2
fi
# The production vmm is built for musl (static; README "Build").
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    echo "install-deps: adding the Rust target x86_64-unknown-linux-musl (rustup)"
    timeout 600 rustup target add x86_64-unknown-linux-musl
fi
# cargo fuzz (libFuzzer) for the fuzz smoke in the test command; built from
# crates.io once (a few minutes), then found on PATH.
if ! command -v cargo-fuzz >/dev/null; then
    echo "install-deps: installing cargo-fuzz from crates.io"
    timeout 1200 cargo install cargo-fuzz --locked --quiet
fi
