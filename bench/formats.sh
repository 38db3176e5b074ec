#!/usr/bin/env bash
# Source adapters against qemu-img, side by side: the same ext4 image (2 GiB by default) in
# every VMDK / VHDX / VHD variant qemu-img writes, converted to raw by
# `ferry plugin run` (the built-in WASM adapter, sandboxed) and by `qemu-img convert -O raw`.
# Both outputs are checked against the source image by SHA-256. Page cache dropped before each
# run when possible (root). Prints a Markdown table.
#
#   bench/formats.sh [--size 2G] [--runs 3] [--keep]
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname -- "$here")
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
size=2G
runs=3
keep=0
while (($#)); do
    case $1 in
        --size) size=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "bench/formats.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
command -v qemu-img >/dev/null || "$root/scripts/install-test-tools.sh"

echo "bench: building ferry (release)" >&2
(cd "$root" && cargo build --release --locked -p ferry-cli >&2)
ferry=$root/target/release/ferry

work=$(mktemp -d -p "${TMPDIR:-/tmp}" ferry-formats.XXXXXX)
((keep)) || trap 'rm -rf "$work"' EXIT
echo "bench: making a $size ext4 image in $work" >&2
bash "$root/scripts/make-ext4-image.sh" "$work/disk.raw" "$size" >&2
src_sha=$(sha256sum "$work/disk.raw" | cut -d' ' -f1)
export FERRY_PLUGIN_CACHE=$work/cache
# Compile the built-in adapters once (as an installed gateway has): the table measures
# conversions, not the one-time compilation into the plugin cache.
head -c 1M "$work/disk.raw" >"$work/warm.raw"
"$ferry" plugin run auto --disk "$work/warm.raw" --out "$work/warm.out" >/dev/null

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
drop() { sync; if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 >/proc/sys/vm/drop_caches; fi; }
secs() { # command... -> prints seconds
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
}

# name | qemu-img create options | qemu-img input format | ferry plugin
cases=(
    "vmdk monolithicSparse|-O vmdk -o subformat=monolithicSparse|vmdk|auto"
    "vmdk streamOptimized|-O vmdk -o subformat=streamOptimized|vmdk|auto"
    "vmdk monolithicFlat|-O vmdk -o subformat=monolithicFlat|vmdk|auto"
    "vmdk twoGbMaxExtentSparse|-O vmdk -o subformat=twoGbMaxExtentSparse|vmdk|auto"
    "vmdk twoGbMaxExtentFlat|-O vmdk -o subformat=twoGbMaxExtentFlat|vmdk|auto"
    "vhdx (32 MiB blocks)|-O vhdx|vhdx|auto"
    "vhdx (1 MiB blocks)|-O vhdx -o block_size=1M|vhdx|auto"
    "vhd dynamic|-O vpc -o subformat=dynamic,force_size=on|vpc|auto"
    "vhd fixed|-O vpc -o subformat=fixed,force_size=on|vpc|builtin:hyperv"
)

printf '| format | qemu-img convert -O raw (s) | ferry plugin run (s) | ferry/qemu-img | both outputs == source |\n'
printf '|---|---|---|---|---|\n'
i=0
for c in "${cases[@]}"; do
    IFS='|' read -r name opts qfmt plugin <<<"$c"
    i=$((i + 1))
    mkdir -p "$work/$i"
    # The real extension: multi-file VMDKs name their extent files after it, and the
    # adapter may open only related files matching its format's patterns (*.vmdk).
    case $qfmt in vmdk) ext=vmdk ;; vhdx) ext=vhdx ;; *) ext=vhd ;; esac
    img=$work/$i/disk.$ext
    # shellcheck disable=SC2086 # opts is a word list on purpose
    qemu-img convert -f raw $opts "$work/disk.raw" "$img"
    # Median of $runs runs each, alternating the tools, page cache dropped before every run.
    qs=() fs=()
    for ((r = 0; r < runs; r++)); do
        rm -f "$work/$i/qemu.raw" "$work/$i/ferry.raw"
        drop
        qs+=("$(secs qemu-img convert -f "$qfmt" -O raw "$img" "$work/$i/qemu.raw")")
        drop
        fs+=("$(secs "$ferry" plugin run "$plugin" --disk "$img" --out "$work/$i/ferry.raw")")
    done
    q=$(median "${qs[@]}")
    f=$(median "${fs[@]}")
    [[ -f $work/$i/ferry.raw ]] || "$ferry" plugin run "$plugin" --disk "$img" --out "$work/$i/ferry.raw" >&2 || true
    ok=OK
    for out in qemu.raw ferry.raw; do
        [[ $(sha256sum "$work/$i/$out" | cut -d' ' -f1) == "$src_sha" ]] || ok="DIFFERS ($out)"
    done
    ratio=$(python3 -c "print(f'{$f / max($q, 0.01):.2f}x')")
    printf '| %s | %s | %s | %s | %s |\n' "$name" "$q" "$f" "$ratio" "$ok"
    rm -rf "${work:?}/$i"
done
