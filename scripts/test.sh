#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (apt/npm/pip tools, the
# Rust components), checks formatting and lints, builds the binaries the end-to-end tests run,
# then runs every test. The emulator tests start Azurite and moto themselves.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -- FILTER  # only tests matching FILTER (after the checks)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin:$HOME/.cargo/bin"

step() { printf '\n== %s\n' "$*"; }

step "tools"
scripts/install-test-tools.sh
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "fmt"
cargo fmt --all -- --check

# Lints run inside the real build: clippy-driver wraps rustc for workspace crates (what
# `cargo clippy` does, with the same -D warnings), so dependencies (wasmtime, Cranelift) are
# compiled once, with code generation, instead of once for `cargo check` and again for tests.
# The plugins' wasm builds are linted natively: they are workspace members.
export RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"

step "build + clippy (all targets, -D warnings)"
cargo test --workspace --all-targets --locked --no-run
cargo build --workspace --bins --locked   # the binaries the end-to-end tests run

step "test"
filter=()
if [[ "${1:-}" == "--" ]]; then shift; filter=("$@"); fi
cargo test --workspace --locked -- "${filter[@]}"
