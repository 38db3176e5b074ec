#!/usr/bin/env bash
# Replication benchmark (issue 6): initial replication vs `ferry vault import`, recovery-point
# age under churn, gateway peak RSS. See bench/replication.py and bench/README.md.
#
#   bench/replication.sh                       # 2 GiB image, 180 s per churn level
#   bench/replication.sh --size 512M --seconds 60 --rates 5,20
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
for t in mkfs.ext4 python3; do
    command -v "$t" >/dev/null 2>&1 || "$here/../scripts/install-test-tools.sh"
done
exec python3 "$here/replication.py" --repo-root "$(dirname -- "$here")" "$@"
