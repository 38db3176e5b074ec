#!/usr/bin/env bash
# Vault demo, offline (no appliance needed): builds `ferry`, creates a
# local vault under ./.ferry/demo, imports a real ext4 disk image, changes 1% of it, imports
# the change list as an incremental point, lists the points, restores the newest one and
# checks it bit for bit, verifies every blob, then tells you what to try next.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin:$HOME/.cargo/bin"

demo=${FERRY_DEMO_DIR:-$PWD/.ferry/demo}
rm -rf "$demo" && mkdir -p "$demo"
command -v mkfs.ext4 >/dev/null || scripts/install-test-tools.sh

echo "== building ferry"
cargo build --release --locked -p ferry-cli
ferry=$PWD/target/release/ferry

umask 077
head -c 24 /dev/urandom | base64 > "$demo/passphrase"
export FERRY_CACHE_DIR=$demo/cache
repo=$demo/vault
v() { "$ferry" vault "$1" --repo "$repo" --passphrase-file "$demo/passphrase" "${@:2}"; }

echo "== making a 512 MiB ext4 disk image"
scripts/make-ext4-image.sh "$demo/disk.img" 512M

echo "== ferry vault init"
v init
echo "== ferry vault import (initial)"
v import --item demo-vm --disk "$demo/disk.img"

echo "== changing 1% of the disk (50 writes of 100 KiB) and recording what changed"
python3 - "$demo/disk.img" "$demo/changes.json" <<'PY'
import json, os, random, sys
img, out = sys.argv[1], sys.argv[2]
size = os.path.getsize(img)
rnd = random.Random(7)
areas = []
with open(img, "r+b") as f:
    for _ in range(50):
        off = rnd.randrange(0, (size - 102400) // 4096) * 4096
        f.seek(off); f.write(os.urandom(102400))
        areas.append({"start": off, "length": 102400})
json.dump({"startOffset": 0, "length": size, "changedArea": areas}, open(out, "w"))
PY
echo "== ferry vault import --changes (incremental)"
v import --item demo-vm --disk "$demo/disk.img" --changes "$demo/changes.json"
echo "== ferry vault points"
v points
echo "== ferry vault export (latest) and compare"
v export --item demo-vm --point latest --out "$demo/restored.img"
cmp "$demo/disk.img" "$demo/restored.img" && echo "restored image is identical to the source"
echo "== ferry vault verify --read-data"
v verify --read-data
echo "== ferry plugin: the built-in physical adapter (WebAssembly, sandboxed) exposes the same disk"
"$ferry" plugin list
"$ferry" plugin run builtin:physical --disk "$demo/disk.img" --out "$demo/via-plugin.img"
cmp "$demo/disk.img" "$demo/via-plugin.img" && echo "the adapter's raw disk is identical to the source"

cat <<MSG

Done. The vault is in $repo, its passphrase in $demo/passphrase.
Next:
  export FERRY_CACHE_DIR=$demo/cache
  $ferry vault points  --repo $repo --passphrase-file $demo/passphrase --json
  $ferry vault export  --repo $repo --passphrase-file $demo/passphrase --item demo-vm --point <ID> --out /tmp/vm.img
  $ferry vault import  --repo s3://bucket/prefix ...   (S3: AWS_* variables; Azure: az://container with AZURE_*)
  $ferry plugin inspect builtin:webhook     # what a plugin imports and needs granted
  sdk/GUIDE.md          # write your own plugin
  bench/run.sh          # Ferry vs restic vs borg, side by side
MSG
