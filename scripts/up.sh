#!/usr/bin/env bash
# Start the appliance on embedded defaults: builds `ferryd` (release) and runs `ferryd up`,
# which on first start creates a local vault, a redb catalog, a self-signed CA and server
# certificate and a first admin token under the data directory, serves the HTTPS API, and
# prints the URL, the CA fingerprint and what to run next. Stop it with Ctrl-C.
#
#   scripts/up.sh [--data-dir DIR] [--listen ADDR:PORT] [--config FILE]
#
# Default data directory: $FERRY_DATA_DIR, else /var/lib/ferry as root, else
# ~/.local/share/ferry. Default listen address: 127.0.0.1:8443.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$HOME/.cargo/bin"
echo "== building ferryd and ferry (release)" >&2
cargo build --release --locked -p ferry-daemon -p ferry-cli >&2
exec target/release/ferryd up "$@"
