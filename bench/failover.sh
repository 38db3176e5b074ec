#!/usr/bin/env bash
# The failover benchmark (issue 7): restore, format exports, NBD instant recovery and
# failback of one ext4 image, Ferry and its peers side by side. See bench/README.md.
#
#   bench/failover.sh                      # 2 GiB image, one run
#   bench/failover.sh --size 512M --runs 3 # quicker image, median of three runs
#   bench/failover.sh --no-build --keep
#   bench/failover.sh --help
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(dirname -- "$here")
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

build=1
for a in "$@"; do
    case $a in
        --no-build | --ferry-bin | --ferry-bin=*) build=0 ;;
        -h | --help) exec python3 "$here/failover.py" --help ;;
    esac
done
[[ -n ${FERRY_BIN:-} ]] && build=0

# Install the peers and helpers only if something is missing (the install script is
# idempotent, but this keeps the common case silent).
missing=0
for t in restic qemu-img qemu-io mkfs.ext4 e2fsck debootstrap python3; do
    command -v "$t" >/dev/null 2>&1 || missing=1
done
[[ -x /usr/bin/time ]] || missing=1
if ((missing)); then
    echo "bench: installing missing tools with scripts/install-test-tools.sh" >&2
    "$repo_root/scripts/install-test-tools.sh" || echo "bench: warning: tool install failed; continuing" >&2
fi

if ((build)); then
    echo "bench: building ferry: cargo build --release --locked -p ferry-cli" >&2
    if ! (cd "$repo_root" && cargo build --release --locked -p ferry-cli >&2); then
        # A benchmark never fails a build: fall back to the binary that is there, if any
        # (failover.py says in the report header how old it is).
        echo "bench: warning: cargo build failed; using the existing binary if there is one" >&2
    fi
fi

exec python3 "$here/failover.py" --repo-root "$repo_root" "$@"
