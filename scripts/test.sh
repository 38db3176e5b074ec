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

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build"
cargo build --workspace --bins --locked

step "test"
filter=()
if [[ "${1:-}" == "--" ]]; then shift; filter=("$@"); fi
cargo test --workspace --locked -- "${filter[@]}"
