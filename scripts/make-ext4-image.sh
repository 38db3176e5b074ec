#!/usr/bin/env bash
# make-ext4-image.sh OUT SIZE
#
# Makes a real ext4 file-system image of SIZE (e.g. 2G, 256M, 64M; K/M/G/T are
# powers of 1024; a bare number is bytes) at OUT, as a sparse file populated
# with `mkfs.ext4 -d ROOTDIR`.
#
# ROOTDIR is, in order of preference:
#   debootstrap  a Debian bookworm minbase root (~250 MB), made once with
#                `debootstrap --variant=minbase bookworm DIR $MIRROR` and cached
#                in ${FERRY_FIXTURE_CACHE:-$HOME/.cache/ferry-fixtures}/rootfs-minbase
#                (built in a temp dir beside it and renamed into place, under a
#                lock, so concurrent callers are safe). Used when SIZE >= 1G and
#                the root fills at most 60% of SIZE.
#   usr          otherwise, or when debootstrap fails (no mirror answers, not
#                root): a copy of real files from /usr (/usr/bin, the multiarch
#                libdir, /usr/share/doc, then the rest of /usr/lib, /usr/share)
#                taken in sorted order until ~40% of SIZE (~50% when SIZE < 1G).
# Which one was used is printed on stderr.
#
# Environment:
#   FERRY_FIXTURE_CACHE   cache dir (default $HOME/.cache/ferry-fixtures)
#   FERRY_IMAGE_SEED      seed for every random choice; the file system UUID and
#                         directory hash seed are derived from it, and mkfs time
#                         is pinned, so the same seed + same root gives the same
#                         image. Default 0.
#   FERRY_IMAGE_SOURCE    auto (default) | debootstrap | usr: force a root source
#                         (debootstrap then fails instead of falling back).
#   FERRY_DEBOOTSTRAP_MIRROR  default http://deb.debian.org/debian
#
# The result is checked with `e2fsck -fn` before it is moved to OUT.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

prog=make-ext4-image
die() { echo "$prog: error: $*" >&2; exit 1; }
note() { echo "$prog: $*" >&2; }

[[ $# -eq 2 ]] || die "usage: $0 OUT SIZE   (SIZE like 2G, 256M, 64M)"
out=$1
size_arg=$2

size=$(python3 - "$size_arg" <<'PY'
import re, sys
m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*', sys.argv[1], re.I)
if not m:
    sys.exit(1)
mult = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}[m.group(2).upper()]
print(int(float(m.group(1)) * mult))
PY
) || die "bad SIZE '$size_arg' (want e.g. 2G, 256M, 64M)"
((size >= 16 * 1024 * 1024)) || die "SIZE must be at least 16M (got $size_arg)"

for t in mkfs.ext4 e2fsck truncate python3 tar; do
    command -v "$t" >/dev/null || die "$t not found (run scripts/install-test-tools.sh)"
done

cache=${FERRY_FIXTURE_CACHE:-$HOME/.cache/ferry-fixtures}
seed=${FERRY_IMAGE_SEED:-0}
source_pref=${FERRY_IMAGE_SOURCE:-auto}
mirror=${FERRY_DEBOOTSTRAP_MIRROR:-http://deb.debian.org/debian}
GiB=$((1024 * 1024 * 1024))
case $source_pref in auto | debootstrap | usr) ;; *) die "FERRY_IMAGE_SOURCE must be auto, debootstrap or usr" ;; esac

out_dir=$(dirname -- "$out")
mkdir -p -- "$out_dir"
work=$(mktemp -d "$out_dir/.make-ext4-image.XXXXXX")
cleanup() { rm -rf -- "$work"; }
trap cleanup EXIT

# --- the debootstrap root (cached) -----------------------------------------
rootfs="$cache/rootfs-minbase"

# Prints the path of the cached root on stdout, building it if needed.
# Returns non-zero if it cannot be had.
ensure_rootfs() {
    mkdir -p -- "$cache"
    (
        flock 9
        if [[ -d $rootfs ]]; then exit 0; fi
        if [[ $(id -u) -ne 0 ]]; then
            note "debootstrap needs root; not building $rootfs"
            exit 1
        fi
        command -v debootstrap >/dev/null || { note "debootstrap not installed"; exit 1; }
        tmp=$(mktemp -d "$cache/.rootfs-minbase.tmp.XXXXXX")
        log="$cache/debootstrap.log"
        note "building debootstrap minbase root in $rootfs (once; log: $log)"
        t0=$(date +%s.%N)
        if timeout 1800 debootstrap --variant=minbase bookworm "$tmp" "$mirror" >"$log" 2>&1; then
            t1=$(date +%s.%N)
            # Nothing in the root should vary between runs except the
            # packages themselves; drop apt's downloaded .debs to keep it small.
            rm -rf -- "$tmp"/var/cache/apt/archives/*.deb
            mv -T -- "$tmp" "$rootfs"
            note "debootstrap took $(python3 -c "print(f'{$t1-$t0:.1f}')") s; root is $(du -sh --apparent-size "$rootfs" | cut -f1)"
        else
            rc=$?
            note "debootstrap failed (exit $rc); last lines of $log:"
            tail -n 5 "$log" | sed 's/^/  | /' >&2
            rm -rf -- "$tmp"
            exit 1
        fi
    ) 9>"$cache/.rootfs-minbase.lock"
}

# --- the /usr fallback ------------------------------------------------------
# Copies real files from /usr into $1 until ~$2 bytes (4 KiB-rounded) are taken.
# Prints "<bytes> <entries>" on stdout.
make_usr_root() {
    local dest=$1 budget=$2 list="$work/usr-files.list"
    python3 - "$budget" "$list" <<'PY'
import os, stat, sys, glob
budget = int(sys.argv[1])
out = sys.argv[2]
multiarch = sorted(glob.glob('/usr/lib/*-linux-gnu'))
sources = ['/usr/bin'] + multiarch + ['/usr/share/doc', '/usr/sbin', '/usr/lib',
                                      '/usr/libexec', '/usr/share', '/usr/include',
                                      '/usr/local']
taken = 0
entries = []
seen = set()
dirs_added = set()

def add_dir_chain(d):
    chain = []
    while d not in ('/', '') and d not in dirs_added:
        chain.append(d)
        d = os.path.dirname(d)
    for c in reversed(chain):
        dirs_added.add(c)
        entries.append(c)

def rounded(n):
    return (n + 4095) // 4096 * 4096

done = False
for src in sources:
    if done or not os.path.isdir(src):
        continue
    for root, dirs, files in os.walk(src):
        dirs.sort()
        real = os.path.realpath(root)
        if root in seen or not real.startswith('/usr'):
            dirs[:] = []
            continue
        seen.add(root)
        for f in sorted(files):
            p = os.path.join(root, f)
            if p in seen:
                continue
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                cost = rounded(st.st_size) + 256
            elif stat.S_ISLNK(st.st_mode):
                cost = 256
            else:
                continue
            if not os.access(p, os.R_OK) and not stat.S_ISLNK(st.st_mode):
                continue
            if taken + cost > budget:
                # skip this one, keep looking for smaller files a little longer
                if taken > budget * 0.98:
                    done = True
                    break
                continue
            seen.add(p)
            add_dir_chain(root)
            entries.append(p)
            taken += cost
        if done:
            break
with open(out, 'wb') as fh:
    for e in entries:
        fh.write(e.lstrip('/').encode('utf-8', 'surrogateescape') + b'\0')
print(taken, len(entries))
PY
    mkdir -p -- "$dest"
    tar --null --no-recursion -C / -T "$list" -cf - 2>/dev/null | tar -C "$dest" -xpf -
}

# --- choose the root ----------------------------------------------------------
root_dir=""
used=""
entries=0
want_debootstrap=0
case $source_pref in
    debootstrap) want_debootstrap=1 ;;
    auto) ((size >= GiB)) && want_debootstrap=1 ;;
esac

if ((want_debootstrap)); then
    if ensure_rootfs; then
        root_bytes=$(du -sb -- "$rootfs" | cut -f1)
        if ((root_bytes * 10 <= size * 6)) || [[ $source_pref == debootstrap ]]; then
            root_dir=$rootfs
            used="debootstrap minbase bookworm root ($rootfs, $((root_bytes / 1024 / 1024)) MiB)"
            entries=$(find "$rootfs" -xdev | wc -l)
        else
            note "debootstrap root ($((root_bytes / 1024 / 1024)) MiB) is too big for a $size_arg image"
        fi
    elif [[ $source_pref == debootstrap ]]; then
        die "debootstrap root requested (FERRY_IMAGE_SOURCE=debootstrap) but could not be built"
    fi
fi

if [[ -z $root_dir ]]; then
    if ((size >= GiB)); then pct=40; else pct=50; fi
    budget=$((size * pct / 100))
    make_usr_root "$work/root" "$budget" >"$work/usr-root.stat"
    read -r taken entries <"$work/usr-root.stat"
    root_dir="$work/root"
    used="copy of real files from /usr ($((taken / 1024 / 1024)) MiB, $entries entries, ~$pct% of $size_arg)"
fi
note "root source: $used"

# --- derive deterministic ids from the seed ------------------------------------
read -r uuid hash_seed fake_time < <(python3 - "$seed" <<'PY'
import hashlib, sys, uuid
s = sys.argv[1].encode()
a = hashlib.sha256(b'ferry-image-uuid:' + s).digest()
b = hashlib.sha256(b'ferry-image-hash:' + s).digest()
print(uuid.UUID(bytes=a[:16], version=4), uuid.UUID(bytes=b[:16], version=4), 1700000000)
PY
)

# --- build the image ---------------------------------------------------------------
img="$work/image.ext4"
truncate -s "$size" -- "$img"

mkfs_args=(-F -q -t ext4 -b 4096 -L ferry-fixture -U "$uuid" -E "hash_seed=$hash_seed" -d "$root_dir")
# Make sure there are enough inodes for the root (with room to spare).
default_inodes=$((size / 16384))
need_inodes=$((entries + entries / 5 + 1024))
if ((need_inodes > default_inodes)); then
    mkfs_args+=(-N "$need_inodes")
fi

if ! E2FSPROGS_FAKE_TIME=$fake_time mkfs.ext4 "${mkfs_args[@]}" "$img" >"$work/mkfs.log" 2>&1; then
    cat "$work/mkfs.log" >&2
    die "mkfs.ext4 failed (root: $used)"
fi

if ! e2fsck -fn "$img" >"$work/fsck.log" 2>&1; then
    cat "$work/fsck.log" >&2
    die "e2fsck -fn reports problems in the new image"
fi

mv -f -- "$img" "$out"
note "wrote $out: $size_arg ext4, $(du -h --apparent-size -- "$out" | cut -f1) apparent, $(du -h -- "$out" | cut -f1) on disk"
