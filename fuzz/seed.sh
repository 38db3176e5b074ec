#!/usr/bin/env bash
# Seed the fuzz corpora (fuzz/corpus/<target>/) with real files: disk images written by
# qemu-img from a small real ext4 filesystem (VMDK sparse/stream/descriptors, VHDX with both
# block sizes and 4 KiB sectors, VHD fixed/dynamic, differencing children), the change
# documents of each source, EBS API responses, plugin manifests and a vault's objects.
#
#   fuzz/seed.sh            # then: cd fuzz && cargo +nightly fuzz run vhdx
#
# Idempotent: seeds are named by content, so rerunning adds nothing twice.
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname -- "$here")
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
command -v qemu-img >/dev/null && command -v mkfs.ext4 >/dev/null || "$root/scripts/install-test-tools.sh"

work=$(mktemp -d -p "${TMPDIR:-/tmp}" ferry-seed.XXXXXX)
trap 'rm -rf "$work"' EXIT
corpus=$here/corpus

seed() { # target file [max-bytes]
    local dir=$corpus/$1 f=$2 max=${3:-}
    mkdir -p "$dir"
    if [[ -n $max ]]; then
        head -c "$max" "$f" >"$work/cut"
        f=$work/cut
    fi
    cp "$f" "$dir/$(sha256sum "$f" | cut -c1-16)"
}
text() { # target text
    printf '%s' "$2" >"$work/text"
    seed "$1" "$work/text"
}

# A small real filesystem with some files, so images have data, holes and metadata.
truncate -s 4M "$work/disk.raw"
mkfs.ext4 -q -F -d "$root/sdk/wit" "$work/disk.raw"
q() { qemu-img convert -f raw "$@"; }
q -O vmdk -o subformat=monolithicSparse "$work/disk.raw" "$work/sparse.vmdk"
q -O vmdk -o subformat=streamOptimized "$work/disk.raw" "$work/stream.vmdk"
q -O vmdk -o subformat=monolithicFlat "$work/disk.raw" "$work/flat.vmdk"
q -O vmdk -o subformat=twoGbMaxExtentSparse "$work/disk.raw" "$work/split.vmdk"
q -O vhdx "$work/disk.raw" "$work/default.vhdx"
q -O vhdx -o block_size=1M "$work/disk.raw" "$work/1m.vhdx"
q -O vhdx -o log_size=1M,block_size=1M "$work/disk.raw" "$work/small-log.vhdx"
q -O vpc -o subformat=dynamic "$work/disk.raw" "$work/dynamic.vhd"
q -O vpc -o subformat=fixed "$work/disk.raw" "$work/fixed.vhd"
qemu-img create -q -f vpc -b "$work/dynamic.vhd" -F vpc "$work/child.vhd" 2>/dev/null || true

seed vmdk_sparse "$work/sparse.vmdk"
seed vmdk_sparse "$work/split-s001.vmdk"
seed vmdk_stream "$work/stream.vmdk"
seed vmdk_descriptor "$work/flat.vmdk"
seed vmdk_descriptor "$work/split.vmdk"
seed vmdk_descriptor "$work/sparse.vmdk" 2048
# The embedded descriptor of a sparse VMDK starts at sector 1.
dd if="$work/sparse.vmdk" of="$work/embedded.txt" bs=512 skip=1 count=2 status=none
seed vmdk_descriptor "$work/embedded.txt"
for f in default.vhdx 1m.vhdx small-log.vhdx; do seed vhdx "$work/$f"; done
for f in dynamic.vhd fixed.vhd child.vhd; do [[ -f $work/$f ]] && seed vhd "$work/$f"; done
# A fixed VHD is data plus a 512-byte footer: the footer alone exercises the same parser.
tail -c 512 "$work/fixed.vhd" >"$work/footer"
seed vhd "$work/footer"

text vmware_cbt '{"startOffset":0,"length":4194304,"changedArea":[{"start":0,"length":65536},{"start":1048576,"length":4096}]}'
text vmware_cbt '{"changedArea":[]}'
text hyperv_rct '[{"ByteOffset":0,"ByteLength":65536},{"ByteOffset":1048576,"ByteLength":4096}]'
text hyperv_rct '{"ByteOffset":4096,"ByteLength":512}'
text changes '{"startOffset":0,"length":4194304,"changedArea":[{"start":0,"length":65536}]}'
text webhook_answer '{"outcome":"proceed"}'
text webhook_answer '{"outcome":"abort","message":"change freeze"}'
text plugin_manifest $'name = "x"\nversion = "1.0.0"\nworld = "source-adapter"\ncomponent = "x.wasm"\n[grants]\nlog = true\nsource = { related = ["*.vmdk"] }\n'
text config $'[vault]\nchunk-size = "1M"\n'
text ebs_list_blocks '{"BlockSize":524288,"Blocks":[{"BlockIndex":0,"BlockToken":"AAUBAb+/Y7Y0m7T5HqZcHw=="},{"BlockIndex":7,"BlockToken":"x+y/z="}],"ExpiryTime":1700000000.5,"NextToken":"bmV4dD03","VolumeSize":1}'
text ebs_changed_blocks '{"BlockSize":524288,"ChangedBlocks":[{"BlockIndex":3,"FirstBlockToken":"a","SecondBlockToken":"b"},{"BlockIndex":9,"FirstBlockToken":"c"}],"ExpiryTime":1700000000,"VolumeSize":1}'
text ebs_reference '{"SnapshotId":"snap-0123456789abcdef0"}'
printf '200\nx-amz-Data-Length: 512\nx-amz-Checksum: %s\nx-amz-Checksum-Algorithm: SHA256\n\n' \
    "$(head -c 512 /dev/zero | openssl dgst -sha256 -binary | base64)" >"$work/block"
head -c 512 /dev/zero >>"$work/block"
seed ebs_block "$work/block"

# A real vault and a real checksum list, when a ferry binary is built.
ferry=""
for b in "$root/target/release/ferry" "$root/target/debug/ferry"; do [[ -x $b ]] && ferry=$b && break; done
if [[ -n $ferry ]]; then
    echo "a passphrase for the fuzz seeds" >"$work/pass"
    "$ferry" vault init --repo "$work/vault" --passphrase-file "$work/pass" >/dev/null
    "$ferry" vault import --repo "$work/vault" --passphrase-file "$work/pass" --item seed --disk "$work/disk.raw" >/dev/null 2>&1
    seed config "$work/vault/config"
    for f in "$work"/vault/index/* "$work"/vault/points/*/*; do seed sealed "$f"; done
    for f in "$work"/vault/packs/*/*/*; do seed pack "$f"; done
    "$ferry" plugin checksums --disk "$work/disk.raw" --out "$work/checksums" --block-size 1M >/dev/null 2>&1
    seed checksum_list "$work/checksums"
else
    echo "fuzz/seed.sh: no ferry binary built; skipping the vault and checksum-list seeds" >&2
fi

# Replication frames: the test vectors of docs/agent-protocol.md §6, one per frame type.
grep -o '`4652[0-9a-f]*`' "$root/docs/agent-protocol.md" | tr -d '`' | while read -r hex; do
    python3 -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1]))' "$hex" >"$work/frame"
    seed proto_frame "$work/frame"
done

# Built plugin components for the component target (if built).
for w in "$root"/target/plugins-wasm/wasm32-unknown-unknown/plugin/*.wasm; do
    [[ -f $w ]] && seed component "$w"
done
echo "seeded $(find "$corpus" -type f | wc -l) files under $corpus"
