#!/usr/bin/env bash
# Installs the external tools Ferry's tests and benchmark use.
#
#   apt:  restic borgbackup debootstrap e2fsprogs zstd time openssl qemu-utils
#   npm:  azurite        (global; provides `azurite-blob`, the Azure Blob emulator)
#   pip:  moto[server] 5.2.5 (provides `moto_server`, the S3 emulator; 5.2.1 answers
#         ListSnapshotBlocks with numbers as strings)
#         schemathesis 4.x (provides `st`, which fuzzes ferryd's REST API against its
#                          OpenAPI document; 4.x because the test uses its 4.x flags)
#   rustup targets: wasm32-unknown-unknown (plugins), wasm32-wasip2 (a sandbox test)
#
# Idempotent and quiet: each tool is probed first (command -v, or the file for
# GNU time), `apt-get update` runs at most once and only if an apt package is
# missing, and one line is printed per thing actually installed. When
# everything is present it prints nothing and takes well under a second.
# Exits non-zero with a message naming what failed.
set -euo pipefail

# debootstrap and mkfs.ext4 live in sbin; a non-login root shell may lack it.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

log="$(mktemp -t ferry-install-tools.XXXXXX)"
trap 'rm -f "$log"' EXIT

failed=()

fail_with_log() { # what
    echo "install-test-tools: FAILED to install $1; last output:" >&2
    tail -n 20 "$log" | sed 's/^/  | /' >&2
    failed+=("$1")
}

have() { command -v "$1" >/dev/null 2>&1; }

# --- apt ------------------------------------------------------------------
# package -> the file or command that proves it is installed.
# (`command -v time` finds the shell keyword, so GNU time is probed by path.)
apt_missing=()
probe_apt() { # package probe
    local pkg=$1 probe=$2
    if [[ $probe == /* ]]; then
        [[ -x $probe ]] || apt_missing+=("$pkg")
    else
        have "$probe" || apt_missing+=("$pkg")
    fi
}
probe_apt restic restic
probe_apt borgbackup borg
probe_apt debootstrap debootstrap
probe_apt e2fsprogs mkfs.ext4
probe_apt e2fsprogs e2fsck
probe_apt zstd zstd
probe_apt time /usr/bin/time
probe_apt openssl openssl
probe_apt qemu-utils qemu-img

if ((${#apt_missing[@]})); then
    # de-duplicate (e2fsprogs can be listed twice)
    mapfile -t apt_missing < <(printf '%s\n' "${apt_missing[@]}" | sort -u)
    if [[ $(id -u) -ne 0 ]]; then
        if have sudo; then apt_get=(sudo -E apt-get); else
            echo "install-test-tools: FAILED: apt packages missing (${apt_missing[*]}) and not root (no sudo)" >&2
            exit 1
        fi
    else
        apt_get=(apt-get)
    fi
    if ! "${apt_get[@]}" update -qq >"$log" 2>&1; then
        fail_with_log "apt-get update (needed for: ${apt_missing[*]})"
    elif ! "${apt_get[@]}" install -y -qq --no-install-recommends "${apt_missing[@]}" >"$log" 2>&1; then
        fail_with_log "apt packages: ${apt_missing[*]}"
    else
        for p in "${apt_missing[@]}"; do echo "installed apt package $p"; done
    fi
fi

# --- npm: azurite ---------------------------------------------------------
if ! have azurite-blob; then
    if ! have npm; then
        echo "install-test-tools: FAILED to install azurite: npm not found (install Node.js with npm first)" >&2
        failed+=(azurite)
    elif ! npm install -g --silent --no-fund --no-audit azurite >"$log" 2>&1; then
        fail_with_log "azurite (npm install -g azurite)"
    else
        npm_bin="$(npm prefix -g 2>/dev/null)/bin"
        if have azurite-blob; then
            echo "installed npm package azurite (azurite-blob)"
        elif [[ -x $npm_bin/azurite-blob ]]; then
            echo "installed npm package azurite at $npm_bin/azurite-blob (NOTE: $npm_bin is not on PATH)"
        else
            echo "install-test-tools: FAILED: npm installed azurite but azurite-blob is not found" >&2
            failed+=(azurite)
        fi
    fi
fi

# --- pip: moto[server], schemathesis -------------------------------------
py=""
pip_ready=""
# Installs pip requirement `spec` unless command `cmd` is already on PATH.
install_pip() { # spec cmd
    local spec=$1 cmd=$2
    have "$cmd" && return 0
    if [[ -z $py ]]; then
        for c in python3 python; do have "$c" && { py=$c; break; }; done
    fi
    if [[ -z $py ]]; then
        echo "install-test-tools: FAILED to install $spec: no python3 found" >&2
        failed+=("$spec")
        return 0
    fi
    if [[ -z $pip_ready ]] && ! "$py" -m pip --version >/dev/null 2>&1; then
        # Debian's system python ships without pip.
        if ! { apt-get update -qq && apt-get install -y -qq python3-pip; } >"$log" 2>&1; then
            fail_with_log "python3-pip (needed for $spec)"
            return 0
        fi
    fi
    pip_ready=1
    # PIP_BREAK_SYSTEM_PACKAGES: allow installing into Debian's
    # externally-managed system python (a no-op for pyenv/venv pythons).
    if ! PIP_BREAK_SYSTEM_PACKAGES=1 "$py" -m pip install -q --disable-pip-version-check \
            --root-user-action=ignore "$spec" >"$log" 2>&1; then
        fail_with_log "$spec (pip install '$spec')"
        return 0
    fi
    if have pyenv; then pyenv rehash >/dev/null 2>&1 || true; fi
    hash -r
    if have "$cmd"; then
        echo "installed pip package $spec ($cmd)"
    else
        echo "install-test-tools: FAILED: pip installed $spec but $cmd is not on PATH" >&2
        failed+=("$spec")
    fi
}
install_pip 'moto[server]==5.2.5' moto_server
install_pip 'schemathesis>=4,<5' st

# --- rustup: wasm targets (also listed in rust-toolchain.toml) -------------
if have rustup; then
    installed_targets="$(rustup target list --installed 2>/dev/null || true)"
    for t in wasm32-unknown-unknown wasm32-wasip2; do
        if ! grep -qx "$t" <<<"$installed_targets"; then
            if rustup target add "$t" >"$log" 2>&1; then
                echo "installed rust target $t"
            else
                fail_with_log "rust target $t (rustup target add $t)"
            fi
        fi
    done
else
    echo "install-test-tools: FAILED: rustup not found (needed for the wasm32 targets)" >&2
    failed+=(rustup)
fi

if ((${#failed[@]})); then
    echo "install-test-tools: FAILED: ${failed[*]}" >&2
    exit 1
fi
