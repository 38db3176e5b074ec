#!/usr/bin/env python3
"""The failover benchmark of issue 7 (run it through bench/failover.sh).

One ext4 image, one vault, one restic repository; then, side by side in one run:

  1. restore to raw: `ferry vault export --format raw` vs `restic restore`
  2. exports: `ferry vault export --format F` vs `qemu-img convert -f raw -O F'` of the image
  3. NBD instant recovery: `ferry vault mount`, time to first byte and a full read
  4. failback after a 1% change: `ferry vault export --in-place` of the changed point onto a
     copy of the original disk (the data path of `ferry failover failback`): bytes written vs
     bytes changed

Every output is checked against the image (SHA-256 for raw, `qemu-img compare` plus the
virtual size for the containers); a failed check makes the row FAIL. Stdlib only. Progress
goes to stderr, the Markdown report to stdout (and, with the raw numbers as JSON, to the
bench directory). See bench/README.md.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ITEM = "bench"

# Export formats: ferry's --format, the row's name, qemu-img's -O and options, the
# qemu-img format name to read it back with, and the target (ferry / qemu-img), if any.
# VHD: force_size=on makes qemu-img keep the exact virtual size (without it qemu rounds to a
# CHS geometry); a fixed VHD is what Azure takes, and the size must be exact for that too.
FORMATS = [
    ("vhd", "VHD fixed", ["-O", "vpc", "-o", "subformat=fixed,force_size=on"], "vpc", 1.0),
    ("qcow2", "qcow2", ["-O", "qcow2"], "qcow2", 1.0),
    ("vhdx", "VHDX dynamic", ["-O", "vhdx"], "vhdx", None),
    ("vmdk", "VMDK monolithicSparse", ["-O", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk",
     None),
    ("vmdk-stream", "VMDK streamOptimized", ["-O", "vmdk", "-o", "subformat=streamOptimized"],
     "vmdk", None),
]
RESTORE_TARGET = 0.3
FAILBACK_TARGET = 1.5     # bytes sent / bytes changed
FAILBACK_CHANGE = 0.01    # fraction of the disk changed before failback


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (want e.g. 2G, 512M)")
    mult = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


class StepError(Exception):
    pass


def can_drop_caches():
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches():
    """sync + drop the page cache when we may (root); silently skip otherwise."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        pass


def sha256_file(path, limit=None):
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while left is None or left > 0:
            b = fh.read(8 * MiB if left is None else min(8 * MiB, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


def rm(path):
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


class Runner:
    """Runs commands with their output in LOGDIR; timed ones under GNU time (peak RSS)."""

    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.gnu_time = os.access("/usr/bin/time", os.X_OK)

    def paths(self, name):
        self.n += 1
        stem = f"{self.n:03d}-{re.sub(r'[^A-Za-z0-9@._-]+', '_', name)}"
        return (self.logdir / f"{stem}.out", self.logdir / f"{stem}.err",
                self.logdir / f"{stem}.time")

    @staticmethod
    def fail(name, argv, rc, err_path):
        tail = ""
        try:
            lines = err_path.read_text(errors="replace").strip().splitlines()
            tail = "\n".join("  | " + l for l in lines[-8:] if l.strip())
        except OSError:
            pass
        return StepError(f"{name}: `{' '.join(map(str, argv))}` exited {rc}\n{tail}".rstrip())

    def run(self, name, argv, env=None, ok_codes=(0,)):
        """Untimed; returns (rc, stdout); raises StepError unless rc is in OK_CODES."""
        out, err, _ = self.paths(name)
        with open(out, "wb") as o, open(err, "wb") as e:
            rc = subprocess.run([str(a) for a in argv], env=env, stdout=o, stderr=e,
                                stdin=subprocess.DEVNULL).returncode
        if rc not in ok_codes:
            raise self.fail(name, argv, rc, err)
        return rc, out.read_text(errors="replace")

    def timed(self, name, argv, env=None):
        """Drops the page cache, runs ARGV; returns (wall_s, peak_rss_kib or None, stdout).
        Wall time is measured here (perf_counter), RSS by /usr/bin/time -f %M."""
        out, err, tfile = self.paths(name)
        argv = [str(a) for a in argv]
        cmd = (["/usr/bin/time", "-f", "%M", "-o", str(tfile)] if self.gnu_time else []) + argv
        drop_caches()
        with open(out, "wb") as o, open(err, "wb") as e:
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, env=env, stdout=o, stderr=e,
                                stdin=subprocess.DEVNULL).returncode
            wall = time.perf_counter() - t0
        if rc != 0:
            raise self.fail(name, argv, rc, err)
        rss = None
        if self.gnu_time:
            try:
                rss = int(tfile.read_text().strip().splitlines()[-1].split()[0])
            except (OSError, IndexError, ValueError):
                pass
        return wall, rss, out.read_text(errors="replace")


# --------------------------------------------------------------------------
# checks

def check_raw(path, size, want_sha):
    """None if PATH is the image byte for byte, else why not."""
    p = Path(path)
    if not p.is_file():
        return f"{p.name} not written"
    if p.stat().st_size != size:
        return f"{p.name} is {p.stat().st_size:,} bytes, not {size:,}"
    got = sha256_file(p)
    return None if got == want_sha else f"{p.name} sha256 {got[:12]}… ≠ image {want_sha[:12]}…"


def check_container(r, name, path, fmt, image, size):
    """None if qemu-img reads PATH (as FMT) as the image: same virtual size and `qemu-img
    compare` says identical. Else why not."""
    p = Path(path)
    if not p.is_file():
        return f"{p.name} not written"
    try:
        _, info = r.run(f"{name}-info", ["qemu-img", "info", "--output=json", "-f", fmt, p])
        vsize = json.loads(info).get("virtual-size")
    except (StepError, ValueError) as e:
        return f"qemu-img info failed: {str(e).splitlines()[0]}"
    if vsize != size:
        return f"virtual size {vsize} ≠ image {size}"
    try:
        rc, out = r.run(f"{name}-compare", ["qemu-img", "compare", "-f", fmt, "-F", "raw", p, image],
                        ok_codes=(0, 1))
    except StepError as e:
        return f"qemu-img compare error: {str(e).splitlines()[0]}"
    return None if rc == 0 else f"qemu-img compare: {out.strip().splitlines()[-1] if out.strip() else 'differ'}"


# --------------------------------------------------------------------------
# the steps

class Ctx:
    pass


def ferry_repo_args(c):
    return ["--repo", c.vault, "--key-file", c.key, "--cache-dir", c.cache]


def ferry_export(c, r, fmt, out):
    rm(out)
    return r.timed(f"ferry-export-{fmt}",
                   [c.ferry, "vault", "export"] + ferry_repo_args(c) +
                   ["--item", ITEM, "--point", "latest", "--format", fmt, "--out", out],
                   env=c.env)


def step_restore(c, r, run):
    """Row 1, one run: (ferry (s, rss), restic (s, rss), check failure or None)."""
    ferry_out = c.out_dir / "ferry.raw"
    restic_dir = c.out_dir / "restic-restore"
    fails, res = [], {}
    try:
        wall, rss, _ = ferry_export(c, r, "raw", ferry_out)
        res["ferry"] = (wall, rss)
        bad = check_raw(ferry_out, c.size, c.sha)
        if bad:
            fails.append(f"ferry: {bad}")
    except StepError as e:
        res["ferry_error"] = str(e)
    finally:
        if not c.keep or run < c.runs - 1:
            rm(ferry_out)
    if c.restic_env is not None:
        rm(restic_dir)
        try:
            wall, rss, _ = r.timed("restic-restore", ["restic", "restore", "latest", "--quiet",
                                                      "--target", restic_dir], env=c.restic_env)
            res["peer"] = (wall, rss)
            out = restic_dir / c.image.resolve().relative_to("/")
            bad = check_raw(out, c.size, c.sha)
            if bad:
                fails.append(f"restic: {bad}")
        except StepError as e:
            res["peer_error"] = str(e)
        finally:
            if not c.keep or run < c.runs - 1:
                rm(restic_dir)
    else:
        res["peer_error"] = c.restic_error
    res["fail"] = "; ".join(fails) or None
    return res


def step_format(c, r, run, fmt, qemu_opts, qemu_fmt):
    ext = {"vhd": "vhd", "qcow2": "qcow2", "vhdx": "vhdx"}.get(fmt, "vmdk")
    ferry_out = c.out_dir / f"ferry-{fmt}.{ext}"
    qemu_out = c.out_dir / f"qemu-{fmt}.{ext}"
    fails, res = [], {}
    try:
        wall, rss, _ = ferry_export(c, r, fmt, ferry_out)
        res["ferry"] = (wall, rss)
        bad = check_container(r, f"ferry-{fmt}", ferry_out, qemu_fmt, c.image, c.size)
        if bad:
            fails.append(f"ferry: {bad}")
    except StepError as e:
        res["ferry_error"] = str(e)
    finally:
        if not c.keep or run < c.runs - 1:
            rm(ferry_out)
    rm(qemu_out)
    try:
        wall, rss, _ = r.timed(f"qemu-img-{fmt}", ["qemu-img", "convert", "-f", "raw"] + qemu_opts +
                               [c.image, qemu_out])
        res["peer"] = (wall, rss)
        bad = check_container(r, f"qemu-{fmt}", qemu_out, qemu_fmt, c.image, c.size)
        if bad:
            fails.append(f"qemu-img: {bad}")
    except StepError as e:
        res["peer_error"] = str(e)
    finally:
        if not c.keep or run < c.runs - 1:
            rm(qemu_out)
    res["fail"] = "; ".join(fails) or None
    return res


def mount_available(c):
    try:
        p = subprocess.run([c.ferry, "vault", "mount", "--help"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and "--listen" in p.stdout


def read_first_line(proc, timeout):
    """The first stdout line of PROC, or None if it exits or TIMEOUT passes first."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.perf_counter() + timeout
    while b"\n" not in buf:
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            b = os.read(fd, 4096)
            if not b:
                return None
            buf += b
        elif proc.poll() is not None:
            return None
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def parse_hexdump(text):
    """Bytes of qemu-io's `read -v` dump ("00000000:  45 46 ... ")."""
    data = bytearray()
    for line in text.splitlines():
        m = re.match(r"^[0-9a-fA-F]{8}:\s+((?:[0-9a-fA-F]{2} ){1,16})", line)
        if m:
            data += bytes(int(x, 16) for x in m.group(1).split())
    return bytes(data)


def image_bytes(c, off, n):
    with open(c.image, "rb") as fh:
        fh.seek(off)
        return fh.read(n)


def qemu_io_read(r, name, url, off, want):
    """Reads 4 KiB at OFF through qemu-io; returns (wall_s, op_s, check failure or None):
    the whole qemu-io process, and the read request alone as qemu-io times it (10 ms steps)."""
    argv = ["qemu-io", "-r", "-f", "raw", "-c", f"read -v {off} 4k", url]
    out, err, _ = r.paths(name)
    with open(out, "wb") as o, open(err, "wb") as e:
        t0 = time.perf_counter()
        rc = subprocess.run(argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - t0
    text = out.read_text(errors="replace")
    if rc != 0 or "read 4096/4096 bytes" not in text:
        raise r.fail(name, argv, rc, err)
    got = parse_hexdump(text)
    # qemu-io's own timing of the read request alone ("4 KiB, 1 ops; 00.03 sec (…)")
    m = re.search(r"1 ops; (?:(\d+):)?(\d+\.\d+) sec", text)
    op = (int(m.group(1) or 0) * 60 + float(m.group(2))) if m else None
    return wall, op, (None if got == want else
                  f"4 KiB at {off} differs from the image ({len(got)} bytes parsed)")


def step_nbd(c, r, run):
    """Rows 3a-3c, one run, one fresh server."""
    res = {"fails": []}
    argv = [str(a) for a in [c.ferry, "vault", "mount"] + ferry_repo_args(c) +
            ["--item", ITEM, "--point", "latest", "--listen", "127.0.0.1:0"]]
    _, err_path, _ = r.paths("ferry-mount")
    full_out = c.out_dir / "nbd-full.raw"
    drop_caches()
    errf = open(err_path, "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL,
                            env=c.env)
    try:
        url = read_first_line(proc, 120)
        t_url = time.perf_counter() - t0
        if not url or not url.startswith("nbd://"):
            proc.poll()
            raise r.fail("ferry-mount", argv, proc.returncode if proc.returncode is not None
                         else f"nothing; first line {url!r}", err_path)
        res["url"] = url
        res["ready_s"] = t_url
        # 3a: server start -> first 4 KiB read completed through a real client
        _, op, bad = qemu_io_read(r, "qemu-io-first", url, 0, c.first4k)
        res["ttfb_s"] = time.perf_counter() - t0
        res["first_op_s"] = op
        if bad:
            res["fails"].append(f"first read: {bad}")
        # 3b: the same read alone, warm server, a chunk it has not read yet (page cache dropped)
        drop_caches()
        wall, op, bad = qemu_io_read(r, "qemu-io-warm", url, c.warm_off, c.warm4k)
        res["warm_s"] = wall
        res["warm_op_s"] = op
        if bad:
            res["fails"].append(f"warm read: {bad}")
        # 3c: full read through the NBD client into a file, checked by SHA-256
        rm(full_out)
        wall, rss, _ = r.timed("qemu-img-nbd-full", ["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                                     url, full_out])
        res["full_s"] = wall
        bad = check_raw(full_out, c.size, c.sha)
        if bad:
            res["fails"].append(f"full read: {bad}")
    except StepError as e:
        res["error"] = str(e)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                res["fails"].append("server did not stop within 20 s of SIGTERM (killed)")
        res["server_exit"] = proc.returncode
        proc.stdout.close()
        errf.close()
        if not c.keep or run < c.runs - 1:
            rm(full_out)
    # the server's RSS: not measured (it is not under GNU time); see the log for its lines
    return res


def in_place_available(c):
    """Does this ferry have `vault export --in-place` (failback's data path)?"""
    try:
        p = subprocess.run([c.ferry, "vault", "export", "--help"], capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL)
        return p.returncode == 0 and "--in-place" in p.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def change_one_percent(path, size, seed=7):
    """Writes 100 KiB blocks of seeded random data at random 4 KiB-aligned offsets until
    1% of `size` is written (as bench/run.sh changes its image); returns the bytes changed
    (the union of the ranges)."""
    import random
    rnd = random.Random(seed)
    block = 100 << 10
    n = max(1, int(size * FAILBACK_CHANGE) // block)
    ranges = []
    with open(path, "r+b") as f:
        for _ in range(n):
            off = rnd.randrange(0, (size - block) // 4096) * 4096
            f.seek(off)
            f.write(rnd.randbytes(block))
            ranges.append((off, off + block))
    ranges.sort()
    total, end = 0, 0
    for a, b in ranges:
        a = max(a, end)
        if b > a:
            total += b - a
            end = b
    return total


def step_failback(c, r):
    """Row 4: the image changed by 1% and imported as the newest point, then written in
    place onto a copy of the original image (what failback does to the original disk)."""
    res = {}
    changed_img = c.out_dir / "changed.raw"
    target = c.out_dir / "original.raw"
    try:
        shutil.copyfile(c.image, changed_img)
        res["changed_bytes"] = change_one_percent(changed_img, c.size)
        want = sha256_file(changed_img)
        r.run("ferry-import-changed", [c.ferry, "vault", "import"] + ferry_repo_args(c) +
              ["--item", ITEM, "--disk", changed_img, "--json"], env=c.env)
        shutil.copyfile(c.image, target)
        wall, rss, out = r.timed("ferry-in-place",
                                 [c.ferry, "vault", "export"] + ferry_repo_args(c) +
                                 ["--item", ITEM, "--point", "latest", "--in-place", target,
                                  "--json"], env=c.env)
        j = json.loads(out)
        res.update(seconds=wall, rss=rss, bytes_written=j["bytes_written"],
                   chunks_written=j["chunks_written"], chunks_compared=j["chunks_compared"])
        got = sha256_file(target)
        res["fail"] = None if got == want else "the target does not equal the changed image"
    except (StepError, OSError, ValueError, KeyError) as e:
        res["error"] = str(e)
    finally:
        if not c.keep:
            rm(changed_img)
            rm(target)
    return res


# --------------------------------------------------------------------------
# report

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt_s(v):
    return "n/a" if v is None else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def md_table(header, rows):
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(cells)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (x + 2) for x in w) + "|"] +
                     [line(r) for r in rows])


def summarize(runs):
    """Median of the per-run results of a ferry-vs-peer step."""
    out = {"ferry_s": med([x.get("ferry", (None,))[0] for x in runs]),
           "ferry_rss": med([x.get("ferry", (None, None))[1] for x in runs]),
           "peer_s": med([x.get("peer", (None,))[0] for x in runs]),
           "fail": "; ".join(sorted({x["fail"] for x in runs if x.get("fail")})) or None,
           "errors": [x[k] for x in runs for k in ("ferry_error", "peer_error") if x.get(k)]}
    return out


def verdict(ratio, target, fail, err):
    if fail:
        return "FAIL"
    if err:
        return "ERR"
    if target is None:
        return "—"
    if ratio is None:
        return "n/a"
    return "met" if ratio <= target else "NOT met"


def ratio_row(num, label, s, peer, target):
    ratio = s["ferry_s"] / s["peer_s"] if s["ferry_s"] and s["peer_s"] else None
    return [num, label,
            "ERR" if s["ferry_s"] is None else fmt_s(s["ferry_s"]),
            "—" if s["ferry_rss"] is None else f"{s['ferry_rss'] / 1024:.0f}",
            peer,
            "ERR" if s["peer_s"] is None else fmt_s(s["peer_s"]),
            "n/a" if ratio is None else f"{ratio:.2f}×",
            "—" if target is None else f"≤ {target:.1f}×",
            verdict(ratio, target, s["fail"], s["errors"]),
            "FAIL: " + s["fail"] if s["fail"] else ("ERR (see below)" if s["errors"] else "OK")]


def report(c, results):
    L = []
    L.append(f"# Ferry failover benchmark (issue 7) — {c.size_arg} ext4 image")
    L.append("")
    L.append(f"- date: {c.date}, host: {platform.node()}, {os.cpu_count()} cores, {c.cpu}, "
             f"kernel {platform.release()}, load average at start {c.loadavg}")
    L.append(f"- image: {c.size:,} bytes; root: {c.image_source}; {c.image_alloc / MiB:.0f} MiB "
             f"allocated; sha256 {c.sha[:16]}…")
    L.append(f"- versions: {c.versions}")
    L.append(f"- ferry binary: {c.ferry} (built {c.ferry_mtime})")
    L.append(f"- page cache dropped before each timed step: "
             f"{'yes' if c.can_drop else 'NO (not root): timings are with a warm cache'}")
    L.append(f"- runs: {c.runs}" + (" (median of each time)" if c.runs > 1 else ""))
    L.append("- times are wall seconds of the whole command; outputs are not fsynced inside the "
             "timed step (as in bench/run.sh); ferry's peak RSS from GNU time")
    L.append("")
    header = ["#", "measure", "ferry (s)", "ferry RSS (MiB)", "peer", "peer (s)", "ferry/peer",
              "target", "result", "check"]
    rows = []
    notes = []

    rows.append(ratio_row("1", "restore to raw: `vault export --format raw`", results["restore"],
                          "`restic restore latest`", RESTORE_TARGET))
    for i, (fmt, name, qopts, _, target) in enumerate(FORMATS):
        peer = "`qemu-img convert " + " ".join(qopts) + "`"
        rows.append(ratio_row(f"2{'abcde'[i]}", f"export {name}: `--format {fmt}`",
                              results["formats"][fmt], peer, target))

    nbd = results.get("nbd")
    if nbd is None:
        why = results.get("nbd_missing", "`ferry vault mount` not available")
        for n, m in (("3a", "NBD time to first byte"), ("3b", "NBD 4 KiB read, warm server"),
                     ("3c", "NBD full read")):
            rows.append([n, m, "not available", "—", "—", "—", "—", "—", "—", why])
    else:
        fails = sorted({f for x in nbd for f in x["fails"]})
        errs = [x["error"] for x in nbd if x.get("error")]
        check = ("FAIL: " + "; ".join(fails)) if fails else ("ERR (see below)" if errs else "OK")
        res = "FAIL" if fails else ("ERR" if errs else "—")
        ready = med([x.get("ready_s") for x in nbd])
        ttfb = med([x.get("ttfb_s") for x in nbd])
        warm = med([x.get("warm_s") for x in nbd])
        full = med([x.get("full_s") for x in nbd])
        raw_s = results["restore"]["ferry_s"]
        first_op = med([x.get("first_op_s") for x in nbd])
        warm_op = med([x.get("warm_op_s") for x in nbd])
        op = lambda v: "" if v is None else (f" (request {v:.2f})" if v >= 0.005
                                              else " (request < 0.01)")
        rows.append(["3a", "NBD time to first byte: start `vault mount` → first 4 KiB read by "
                     "`qemu-io` done", fmt_s(ttfb) + op(first_op), "—", "—", "—", "—", "—", res,
                     check])
        rows.append(["3b", f"NBD 4 KiB read alone, warm server (`qemu-io`, offset {c.warm_off})",
                     fmt_s(warm) + op(warm_op), "—", "—", "—", "—", "—", res, check])
        mibs = f" ({c.size / MiB / full:,.0f} MiB/s)" if full else ""
        ratio = f"{full / raw_s:.2f}×" if full and raw_s else "n/a"
        rows.append(["3c", "NBD full read: `qemu-img convert -O raw nbd://…`",
                     fmt_s(full) + mibs, "—", "`vault export --format raw` (row 1)",
                     fmt_s(raw_s), ratio, "—", res, check])
        if ready is not None:
            notes.append(f"NBD: the server printed its URL {ready:.2f} s after it was started "
                         f"(part of 3a); 3a and 3b include qemu-io's own (cold) start and the NBD handshake, "
                         f"\"request\" is the read request alone as qemu-io times it (10 ms steps); "
                         f"server exit status after SIGTERM: "
                         f"{', '.join(str(x.get('server_exit')) for x in nbd)}.")
        for e in errs:
            notes.append("NBD error: " + e)

    fb = results.get("failback")
    label = f"failback: bytes written after a {FAILBACK_CHANGE:.0%} change (`vault export --in-place`)"
    if fb is None:
        rows.append(["4", label, "not in this binary", "—", "—", "—", "n/a",
                     f"≤ {FAILBACK_TARGET:.1f}× changed", "—", "—"])
    elif fb.get("error"):
        rows.append(["4", label, "ERR", "—", "—", "—", "n/a",
                     f"≤ {FAILBACK_TARGET:.1f}× changed", "ERR", "—"])
        notes.append("failback error: " + fb["error"])
    else:
        ratio = fb["bytes_written"] / max(1, fb["changed_bytes"])
        ok = ratio <= FAILBACK_TARGET
        rows.append(["4", label,
                     f"{fb['bytes_written']:,} B in {fb['seconds']:.2f} s "
                     f"({fb['chunks_written']} of {fb['chunks_compared']} chunks)",
                     f"{fb['rss'] / 1024:.0f}" if fb.get("rss") else "—",
                     f"bytes changed: {fb['changed_bytes']:,}", "—", f"{ratio:.2f}×",
                     f"≤ {FAILBACK_TARGET:.1f}× changed", "met" if ok else "NOT met",
                     "FAIL" if fb.get("fail") else "OK"])
        notes.append("failback: the differing chunks are found by keyed chunk id (no chunk "
                     "data read from the vault for equal chunks), and only their differing "
                     "4 KiB blocks are written; \"chunks\" in the row counts the chunks that "
                     "differed.")
        if fb.get("fail"):
            notes.append("failback check: " + fb["fail"])
    L.append(md_table(header, rows))
    L.append("")
    if c.restic_error:
        notes.append("restic setup failed: " + c.restic_error)
    errs = [(k, e) for k, s in [("restore", results["restore"])] +
            [(f, results["formats"][f]) for f, *_ in FORMATS] for e in s["errors"]]
    for k, e in errs:
        notes.append(f"{k}: " + e)
    if notes:
        L.append("## Notes and errors")
        L.append("")
        for n in notes:
            n = n.replace(str(c.run_dir), "$WORK")
            L.append("- " + n.replace("\n", "\n  "))
        L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------

def version_of(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        return (p.stdout or p.stderr).strip().splitlines()[0] if p.returncode == 0 else "?"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def find_ferry(args, repo_root):
    if args.ferry_bin or os.environ.get("FERRY_BIN"):
        p = Path(args.ferry_bin or os.environ["FERRY_BIN"])
    else:
        p = Path(os.environ.get("CARGO_TARGET_DIR", repo_root / "target")) / "release" / "ferry"
    return p.resolve() if os.access(p, os.X_OK) else None


def first_nonzero_4k(path, start, size):
    """Offset of the first 4 KiB block at or after START that is not all zeros (else START)."""
    zero = bytes(4 * KiB)
    with open(path, "rb") as fh:
        for base in (start, 0):
            fh.seek(base)
            off = base
            while off < size:
                b = fh.read(4 * MiB)
                if not b:
                    break
                for i in range(0, len(b), 4 * KiB):
                    if b[i:i + 4 * KiB] != zero:
                        return off + i
                off += len(b)
    return start


def main():
    ap = argparse.ArgumentParser(
        prog="bench/failover.sh",
        description="Failover benchmark (issue 7): restore, exports, NBD, failback.")
    ap.add_argument("--repo-root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help=argparse.SUPPRESS)
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--runs", type=int, default=1,
                    help="runs of every timed step; the median is reported (default 1)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (vault, repo, image, last run's outputs, logs)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build (failover.sh)")
    ap.add_argument("--ferry-bin", help="ferry binary (default: $FERRY_BIN or target/release/ferry)")
    ap.add_argument("--bench-dir", default=os.environ.get("FERRY_BENCH_DIR", "/tmp/ferry-bench"),
                    help="work directory (default $FERRY_BENCH_DIR or /tmp/ferry-bench)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    size = parse_size(args.size)
    if size < 16 * MiB:
        ap.error("--size must be at least 16M")

    repo_root = args.repo_root.resolve()
    ferry = find_ferry(args, repo_root)
    if ferry is None:
        raise SystemExit("bench: no ferry binary (build it with cargo build --release --locked "
                         "-p ferry-cli, or give --ferry-bin)")
    for tool in ("qemu-img", "qemu-io"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} not found (scripts/install-test-tools.sh installs it)")

    bench_dir = Path(args.bench_dir)
    bench_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = bench_dir / f"failover-{stamp}-{os.getpid()}"
    run_dir.mkdir()
    r = Runner(run_dir / "logs")

    c = Ctx()
    c.ferry, c.size, c.size_arg, c.runs, c.keep = ferry, size, args.size, args.runs, args.keep
    c.run_dir = run_dir
    c.can_drop = can_drop_caches()
    c.date = datetime.datetime.now().isoformat(timespec="seconds")
    c.ferry_mtime = datetime.datetime.fromtimestamp(ferry.stat().st_mtime).isoformat(
        timespec="seconds")
    try:
        c.cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                      if l.startswith("model name")), platform.processor())
        c.loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        c.cpu, c.loadavg = platform.processor(), "?"
    fv = version_of([ferry, "--version"])
    c.versions = "; ".join([fv if fv.startswith("ferry") else f"ferry {fv}",
                            version_of(["restic", "version"]),
                            version_of(["qemu-img", "--version"])])
    free = shutil.disk_usage(run_dir).free
    if free < 4 * size:
        log(f"warning: only {free / GiB:.1f} GiB free in {run_dir}; a run needs about "
            f"{4 * size / GiB:.1f} GiB")

    try:
        # ---- setup (not timed)
        c.image = run_dir / "disk.img"
        log(f"making a {args.size} ext4 image (scripts/make-ext4-image.sh)")
        p = subprocess.run([str(repo_root / "scripts" / "make-ext4-image.sh"), str(c.image), args.size],
                           capture_output=True, text=True)
        (r.logdir / "make-ext4-image.err").write_text(p.stderr)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            raise SystemExit("bench: make-ext4-image.sh failed")
        m = re.search(r"root source: (.*)", p.stderr)
        c.image_source = m.group(1) if m else "?"
        c.image_alloc = os.stat(c.image).st_blocks * 512
        c.sha = sha256_file(c.image)
        c.first4k = image_bytes(c, 0, 4 * KiB)
        c.warm_off = first_nonzero_4k(c.image, (size // 2) // (4 * KiB) * 4 * KiB, size)
        c.warm4k = image_bytes(c, c.warm_off, 4 * KiB)
        c.out_dir = run_dir / "out"
        c.out_dir.mkdir()

        c.vault, c.cache, c.key = run_dir / "vault", run_dir / "ferry-cache", run_dir / "vault.key"
        c.key.write_bytes(os.urandom(32))
        os.chmod(c.key, 0o600)
        # the key file and cache dir are given on the command line; no FERRY_* from outside
        env = c.env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
        log("ferry: vault init + import")
        try:
            r.run("ferry-init", [ferry, "vault", "init"] + ferry_repo_args(c), env=env)
            t0 = time.perf_counter()
            r.run("ferry-import", [ferry, "vault", "import"] + ferry_repo_args(c) +
                  ["--item", ITEM, "--disk", c.image, "--json"], env=env)
            log(f"ferry: imported in {time.perf_counter() - t0:.1f} s (not part of the table)")
        except StepError as e:
            raise SystemExit(f"bench: cannot set up the vault: {e}")

        c.restic_env, c.restic_error = None, None
        if shutil.which("restic"):
            renv = dict(os.environ, RESTIC_PASSWORD="ferry-bench-passphrase",
                        RESTIC_REPOSITORY=str(run_dir / "restic"),
                        RESTIC_CACHE_DIR=str(run_dir / "restic-cache"))
            log("restic: init + backup")
            try:
                r.run("restic-init", ["restic", "init", "--quiet"], env=renv)
                r.run("restic-backup", ["restic", "backup", "--quiet", "--compression", "auto",
                                        "--host", "bench", c.image], env=renv)
                c.restic_env = renv
            except StepError as e:
                c.restic_error = str(e)
                log(f"restic: setup failed: {e}")
        else:
            c.restic_error = "restic not installed"

        # ---- the timed steps
        results = {"formats": {}}
        restore_runs, fmt_runs = [], {f[0]: [] for f in FORMATS}
        for run in range(c.runs):
            log(f"run {run + 1}/{c.runs}: restore to raw (ferry, restic)")
            restore_runs.append(step_restore(c, r, run))
            for fmt, name, qopts, qfmt, _ in FORMATS:
                log(f"run {run + 1}/{c.runs}: {name} (ferry, qemu-img)")
                fmt_runs[fmt].append(step_format(c, r, run, fmt, qopts, qfmt))
        results["restore"] = summarize(restore_runs)
        for fmt in fmt_runs:
            results["formats"][fmt] = summarize(fmt_runs[fmt])

        if mount_available(c):
            nbd = []
            for run in range(c.runs):
                log(f"run {run + 1}/{c.runs}: NBD (ferry vault mount, qemu-io, qemu-img)")
                nbd.append(step_nbd(c, r, run))
            results["nbd"] = nbd
        else:
            results["nbd"] = None
            results["nbd_missing"] = f"`ferry vault mount` not in this binary ({c.ferry_mtime})"
            log("NBD: `ferry vault mount` not available; rows say so")
        if in_place_available(c):
            log("failback: 1% change, import, in-place write onto the original (once)")
            results["failback"] = step_failback(c, r)
        else:
            results["failback"] = None
            log("failback: `vault export --in-place` not in this binary; the row says so")

        text = report(c, results)
        print(text, flush=True)
        (bench_dir / f"failover-report-{stamp}.md").write_text(text + "\n")
        dump = {"context": {k: (v.hex() if isinstance(v, bytes) else
                                str(v) if isinstance(v, Path) else v)
                            for k, v in vars(c).items() if k not in ("first4k", "warm4k",
                                                                      "restic_env", "env")},
                "raw": {"restore": restore_runs, "formats": fmt_runs, "nbd": results["nbd"]},
                "summary": {k: v for k, v in results.items() if k != "nbd"}}
        (bench_dir / f"failover-results-{stamp}.json").write_text(
            json.dumps(dump, indent=1, default=str) + "\n")
        log(f"report saved to {bench_dir}/failover-report-{stamp}.md "
            f"(raw numbers: failover-results-{stamp}.json)")
    finally:
        if args.keep:
            log(f"kept work directory {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
