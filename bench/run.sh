#!/usr/bin/env bash
# Ferry vs restic vs borg on one ext4 disk image. See bench/README.md.
#
#   bench/run.sh                          # 2 GiB image, ferry at its default chunk size
#   bench/run.sh --chunk-sizes 64K,256K,1M
#   bench/run.sh --size 512M --keep --no-limits
#   bench/run.sh --help
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(dirname -- "$here")
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# Install the peers and helpers only if something is missing (the install
# script is itself idempotent, but this keeps the common case silent).
missing=0
for t in restic borg mkfs.ext4 e2fsck debootstrap zstd openssl python3; do
    command -v "$t" >/dev/null 2>&1 || missing=1
done
[[ -x /usr/bin/time ]] || missing=1
if ((missing)); then
    echo "bench: installing missing tools with scripts/install-test-tools.sh" >&2
    "$repo_root/scripts/install-test-tools.sh"
fi

exec python3 "$here/bench.py" --repo-root "$repo_root" "$@"
