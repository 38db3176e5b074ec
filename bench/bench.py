#!/usr/bin/env python3
"""Ferry vs restic vs borg on one ext4 disk image (run it through bench/run.sh).

Stdlib only. Progress goes to stderr, the markdown report to stdout; the
report and a JSON of the raw numbers are also saved in the bench directory.
See bench/README.md for what is measured and why.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PASSPHRASE = "ferry-bench-passphrase"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
WRITE_LEN = 100 * KiB          # one modification write
WRITES_PER_2G = 200            # ~1% of a 2 GiB image
ALIGN = 4 * KiB

# (key, label, goal ratio ferry/restic)
TARGETS = [
    ("initial_s", "initial import time", 0.25),
    ("incremental_s", "incremental time", 0.20),
    ("restore_s", "restore time", 0.30),
    ("stored_added", "incremental stored bytes", 1.0),
    ("rss_max_mib", "peak RSS", 1.0),
]


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (want e.g. 2G, 256M, 64K)")
    mult = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


class StepError(Exception):
    pass


class Runner:
    """Runs commands with logs in LOGDIR; timed ones under GNU time."""

    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def _paths(self, name):
        self.n += 1
        stem = f"{self.n:03d}-{re.sub(r'[^A-Za-z0-9@._-]+', '_', name)}"
        return self.logdir / f"{stem}.out", self.logdir / f"{stem}.err", self.logdir / f"{stem}.time"

    @staticmethod
    def drop_caches():
        """sync + drop the page cache when we may; silently skip otherwise."""
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("3\n")
        except OSError:
            pass

    def _fail(self, name, argv, rc, err_path):
        tail = ""
        try:
            lines = err_path.read_text(errors="replace").strip().splitlines()
            tail = "\n".join("  | " + l for l in lines[-8:])
        except OSError:
            pass
        return StepError(f"{name}: `{' '.join(map(str, argv))}` exited {rc}\n{tail}")

    def run(self, name, argv, env=None, cwd=None):
        """Untimed; returns stdout text; raises StepError on failure."""
        out, err, _ = self._paths(name)
        with open(out, "wb") as o, open(err, "wb") as e:
            rc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, stdout=o, stderr=e,
                                stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            raise self._fail(name, argv, rc, err)
        return out.read_text(errors="replace")

    def timed(self, name, argv, env=None, cwd=None):
        """Drops caches, runs under /usr/bin/time; returns (wall_s, maxrss_kib, stdout)."""
        out, err, tfile = self._paths(name)
        warm = getattr(self, "warm_file", None)
        if warm is not None:
            # Compared with CPU limits: start from a warm page cache, so that disk reads
            # are not counted against the pipeline.
            os.sync()
            with open(warm, "rb", buffering=0) as fh:
                buf = bytearray(8 * MiB)
                while fh.readinto(buf):
                    pass
        else:
            self.drop_caches()
        cmd = ["/usr/bin/time", "-f", "%e %M", "-o", str(tfile)] + [str(a) for a in argv]
        t0 = time.perf_counter()
        with open(out, "wb") as o, open(err, "wb") as e:
            rc = subprocess.run(cmd, env=env, cwd=cwd, stdout=o, stderr=e,
                                stdin=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - t0
        if rc != 0:
            raise self._fail(name, argv, rc, err)
        rss_kib = None
        try:
            last = tfile.read_text().strip().splitlines()[-1].split()
            wall = float(last[0])
            rss_kib = int(last[1])
        except (OSError, IndexError, ValueError):
            pass
        return wall, rss_kib, out.read_text(errors="replace")


def du_bytes(path):
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(8 * MiB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def copy_sparse(src, dst):
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


# --------------------------------------------------------------------------
# the modification: same writes for every tool

def make_modified(pristine, modified, changes_path, size, seed):
    """Copies PRISTINE to MODIFIED and writes random data at random 4 KiB-aligned
    offsets (seeded). Writes the vSphere DiskChangeInfo JSON to CHANGES_PATH.
    Returns (n_writes, changed_bytes)."""
    copy_sparse(pristine, modified)
    n = max(1, round(WRITES_PER_2G * size / (2 * GiB)))
    rng = random.Random(f"ferry-bench-writes:{seed}")
    slots = (size - WRITE_LEN) // ALIGN + 1
    ranges = []
    with open(modified, "r+b") as fh:
        for _ in range(n):
            off = rng.randrange(slots) * ALIGN
            fh.seek(off)
            fh.write(rng.randbytes(WRITE_LEN))
            ranges.append((off, WRITE_LEN))
        fh.flush()
        os.fsync(fh.fileno())
    ranges.sort()
    merged = []
    for s, l in ranges:
        if merged and s <= merged[-1][0] + merged[-1][1]:
            ps, pl = merged[-1]
            merged[-1] = (ps, max(ps + pl, s + l) - ps)
        else:
            merged.append((s, l))
    info = {"startOffset": 0, "length": size,
            "changedArea": [{"start": s, "length": l} for s, l in merged]}
    Path(changes_path).write_text(json.dumps(info, indent=1) + "\n")
    return n, sum(l for _, l in merged)


# --------------------------------------------------------------------------
# tools

class Tool:
    label = "?"

    def __init__(self, tdir):
        self.tdir = Path(tdir)
        self.repo = self.tdir / "repo"
        self.env = dict(os.environ)


class Restic(Tool):
    label = "restic"

    def __init__(self, tdir):
        super().__init__(tdir)
        self.env.update(RESTIC_PASSWORD=PASSPHRASE, RESTIC_REPOSITORY=str(self.repo),
                        RESTIC_CACHE_DIR=str(self.tdir / "cache"))

    def init(self, r):
        r.run("restic-init", ["restic", "init", "--quiet"], env=self.env)
        try:
            cfg = json.loads(r.run("restic-config", ["restic", "cat", "config"], env=self.env))
            self.info = f"repository version {cfg.get('version')}"
        except (StepError, ValueError):
            self.info = ""

    def backup(self, r, step, disk, changes):
        return r.timed(f"restic-{step}", ["restic", "backup", "--quiet", "--compression", "auto",
                                          "--host", "bench", disk], env=self.env)

    def restore(self, r, disk, out_dir):
        res = r.timed("restic-restore", ["restic", "restore", "latest", "--quiet",
                                         "--target", out_dir], env=self.env)
        return res, Path(out_dir) / Path(disk).resolve().relative_to("/")


class Borg(Tool):
    label = "borg"

    def __init__(self, tdir):
        super().__init__(tdir)
        self.env.update(BORG_PASSPHRASE=PASSPHRASE, BORG_BASE_DIR=str(self.tdir / "borg-home"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
                        BORG_DISPLAY_PASSPHRASE="no")
        self.n = 0

    def init(self, r):
        r.run("borg-init", ["borg", "init", "-e", "repokey-blake2", self.repo], env=self.env)
        self.info = "repokey-blake2, zstd,3"

    def backup(self, r, step, disk, changes):
        self.n += 1
        name = "ab"[self.n - 1] if self.n <= 2 else f"a{self.n}"
        disk = Path(disk)
        return r.timed(f"borg-{step}", ["borg", "create", "-C", "zstd,3", f"{self.repo}::{name}",
                                        disk.name], env=self.env, cwd=disk.parent)

    def restore(self, r, disk, out_dir):
        name = "ab"[self.n - 1] if self.n <= 2 else f"a{self.n}"
        res = r.timed("borg-restore", ["borg", "extract", f"{self.repo}::{name}"],
                      env=self.env, cwd=out_dir)
        return res, Path(out_dir) / Path(disk).name


class Ferry(Tool):
    def __init__(self, tdir, binary, chunk_size=None):
        super().__init__(tdir)
        self.bin = str(binary)
        self.cs = chunk_size
        self.label = f"ferry@{chunk_size}" if chunk_size else "ferry"
        self.env.update(FERRY_PASSPHRASE=PASSPHRASE, FERRY_CACHE_DIR=str(self.tdir / "cache"))
        self.points = []
        self.info = f"chunk size {chunk_size}" if chunk_size else "default chunk size"

    def _cs(self):
        return ["--chunk-size", self.cs] if self.cs else []

    def init(self, r):
        r.run(f"{self.label}-init", [self.bin, "vault", "init", "--repo", self.repo] + self._cs(),
              env=self.env)

    @staticmethod
    def _json(text):
        text = text.strip()
        try:
            return json.loads(text)
        except ValueError:
            # progress lines before the JSON: try each line that opens an object,
            # last first, parsing from there to the end (handles pretty-printed JSON)
            starts = [m.start() for m in re.finditer(r"(?m)^\s*\{", text)]
            for pos in reversed(starts):
                try:
                    return json.loads(text[pos:])
                except ValueError:
                    try:
                        return json.loads(text[pos:].splitlines()[0])
                    except (ValueError, IndexError):
                        pass
        return None

    def backup(self, r, step, disk, changes, item="bench"):
        argv = [self.bin, "vault", "import", "--repo", self.repo, "--item", item, "--disk", disk]
        if changes:
            argv += ["--changes", changes]
        argv += self._cs() + ["--json"]
        wall, rss, out = r.timed(f"{self.label}-{step}", argv, env=self.env)
        doc = self._json(out)
        if not isinstance(doc, dict) or "point" not in doc:
            raise StepError(f"{self.label} {step}: import printed no JSON object with a \"point\" "
                            f"field (stdout: {out.strip()[:200]!r})")
        self.points.append(doc["point"])
        return wall, rss, out

    def restore(self, r, disk, out_dir):
        out = Path(out_dir) / "restored.img"
        res = r.timed(f"{self.label}-restore",
                      [self.bin, "vault", "export", "--repo", self.repo, "--item", "bench",
                       "--point", "latest", "--out", out], env=self.env)
        try:
            pts = r.run(f"{self.label}-points", [self.bin, "vault", "points", "--repo", self.repo,
                                                 "--item", "bench", "--json"], env=self.env)
            self.points_json = pts.strip()
        except StepError as e:
            log(f"warning: {e}")
        return res, out


def bench_tool(tool, r, ctx):
    """Runs init, initial, incremental, restore for one tool. Returns a result dict."""
    res = {"label": tool.label, "error": None}
    tdir = tool.tdir
    work = tdir / "work"
    restore_dir = tdir / "restore"
    for d in (work, restore_dir):
        d.mkdir(parents=True, exist_ok=True)
    disk = work / "disk.img"
    try:
        tool.init(r)
        res["info"] = getattr(tool, "info", "")

        copy_sparse(ctx["pristine"], disk)
        wall, rss, _ = tool.backup(r, "initial", disk, None)
        res.update(initial_s=wall, initial_rss_kib=rss, stored_initial=du_bytes(tool.repo))
        log(f"{tool.label}: initial import {wall:.2f} s, {fmt_mib(rss)} MiB RSS, "
            f"repo {res['stored_initial'] / MiB:.1f} MiB")

        copy_sparse(ctx["modified"], disk)   # rewrite in place: same path, same inode
        wall, rss, _ = tool.backup(r, "incremental", disk, ctx["changes"])
        after = du_bytes(tool.repo)
        res.update(incremental_s=wall, incremental_rss_kib=rss, stored_after_incremental=after,
                   stored_added=after - res["stored_initial"])
        log(f"{tool.label}: incremental {wall:.2f} s, {fmt_mib(rss)} MiB RSS, "
            f"+{res['stored_added'] / MiB:.1f} MiB")

        (wall, rss, _), out = tool.restore(r, disk, restore_dir)
        res.update(restore_s=wall, restore_rss_kib=rss)
        if not out.is_file():
            res["restore_ok"] = False
            res["restore_note"] = f"restored file {out} not found"
        else:
            got = sha256_file(out)
            res["restore_ok"] = got == ctx["modified_sha256"]
            res["restore_sha256"] = got
        log(f"{tool.label}: restore {wall:.2f} s, {fmt_mib(rss)} MiB RSS, "
            f"sha256 {'OK' if res['restore_ok'] else 'FAIL'}")
        if isinstance(tool, Ferry):
            res["points"] = tool.points
            if hasattr(tool, "points_json"):
                res["points_json"] = tool.points_json
    except (StepError, OSError, subprocess.CalledProcessError) as e:
        res["error"] = str(e)
        log(f"{tool.label}: ERROR {e}")
    finally:
        if not ctx["keep"]:
            shutil.rmtree(restore_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    rss = [res.get(k) for k in ("initial_rss_kib", "incremental_rss_kib", "restore_rss_kib")]
    rss = [x for x in rss if x is not None]
    res["rss_max_mib"] = max(rss) / 1024 if rss else None
    return res


# --------------------------------------------------------------------------
# machine limits

def openssl_rate(r, alg):
    """Single-core MB/s (decimal) at 16384-byte blocks."""
    out = r.run(f"openssl-{alg}", ["openssl", "speed", "-seconds", "2", "-evp", alg])
    lines = [l for l in out.splitlines() if l.strip()]
    last = lines[-1].split()
    val = last[-1]
    if not val.endswith("k"):
        raise StepError(f"cannot parse openssl speed output: {lines[-1]!r}")
    return float(val[:-1]) * 1000 / 1e6


def zstd_rate(r, sample):
    out, err, _ = r._paths("zstd-b1")
    p = subprocess.run(["zstd", "-b1", "-i3", str(sample)], capture_output=True, text=True)
    text = p.stdout + p.stderr
    out.write_text(text)
    # the final result line looks like " 1#sample.bin :268435456 -> 98765432 (x2.718), 512.3 MB/s, 1800.1 MB/s"
    lines = [l for l in re.split(r"[\r\n]", text) if "MB/s" in l]
    if p.returncode != 0 or not lines:
        raise StepError(f"zstd -b1 failed: {text.strip()[-300:]}")
    last = lines[-1]
    rates = re.findall(r"([\d.]+)\s*MB/s", last)
    ratio = re.search(r"\(x?([\d.]+)\)", last)
    return float(rates[0]), float(ratio.group(1)) if ratio else None


def make_dense(path, size, seed):
    """SIZE bytes of real binaries from /usr, concatenated (cycled if needed), with
    4 random bytes changed per 16 KiB so that no chunk dedups."""
    roots = sorted(str(p) for p in Path("/usr/lib").glob("*-linux-gnu")) + ["/usr/bin", "/usr/lib",
                                                                           "/usr/libexec"]
    files, seen = [], set()
    for root in roots:
        for dp, dns, fns in os.walk(root):
            dns.sort()
            for fn in sorted(fns):
                p = os.path.join(dp, fn)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not (st.st_mode & 0o170000 == 0o100000) or st.st_size < 4 * KiB:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                files.append(p)
    if not files:
        raise StepError("no files under /usr to build the dense sample from")
    rng = random.Random(f"ferry-bench-dense:{seed}")
    block = 64 * MiB
    written = 0
    fi = 0
    pending = bytearray()
    with open(path, "wb") as out:
        while written < size:
            while len(pending) < block and written + len(pending) < size:
                try:
                    with open(files[fi % len(files)], "rb") as fh:
                        pending += fh.read(block)
                except OSError:
                    pass
                fi += 1
            n = min(block, size - written, len(pending))
            buf = pending[:n]
            del pending[:n]
            for off in range(0, n, 16 * KiB):
                span = min(16 * KiB, n - off)
                for _ in range(4):
                    buf[off + rng.randrange(span)] = rng.randrange(256)
            out.write(buf)
            written += n


def machine_limits(r, ctx, ferries, restic_ok):
    lim = {"cores": os.cpu_count() or 1}
    log("machine limits: openssl speed sha256 / aes-256-gcm (about 25 s)")
    for key, alg in (("sha256_mbs", "sha256"), ("aes_gcm_mbs", "aes-256-gcm")):
        try:
            lim[key] = openssl_rate(r, alg)
        except StepError as e:
            lim[key] = None
            log(f"warning: {e}")
    dense = ctx["run_dir"] / "dense.bin"
    dense_size = ctx["dense_size"]
    log(f"machine limits: making {dense_size / GiB:.2f} GiB dense sample from /usr binaries")
    make_dense(dense, dense_size, ctx["seed"])
    # cold sequential read of the dense file: the disk's share of the limit
    r.drop_caches()
    t0 = time.perf_counter()
    buf = bytearray(8 * MiB)
    with open(dense, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
    lim["read_mbs"] = dense_size / 1e6 / (time.perf_counter() - t0)
    sample = ctx["run_dir"] / "zstd-sample.bin"
    lim["zstd_sample_bytes"] = min(256 * MiB, dense_size)
    with open(dense, "rb") as src, open(sample, "wb") as dst:
        dst.write(src.read(lim["zstd_sample_bytes"]))
    log("machine limits: zstd -b1")
    try:
        lim["zstd1_mbs"], lim["zstd1_ratio"] = zstd_rate(r, sample)
    except StepError as e:
        lim["zstd1_mbs"] = None
        log(f"warning: {e}")
    sample.unlink()
    rates = [lim.get(k) for k in ("sha256_mbs", "aes_gcm_mbs", "zstd1_mbs")]
    if all(x is not None for x in rates):
        names = ["sha256", "aes-256-gcm", "zstd -1"]
        i = min(range(3), key=lambda k: rates[k])
        lim["slowest_stage"] = names[i]
        lim["limit_mbs"] = rates[i] * lim["cores"]
    lim["dense_bytes"] = dense_size
    lim["ingest"] = []
    # The dense-ingest runs are compared with CPU limits (sha256, AES-GCM, zstd): they start
    # with the sample in the page cache. The cold read rate above is the disk's share.
    r.warm_file = dense
    for f in ferries:
        tool = Ferry(ctx["run_dir"] / f"dense-{f.label}", f.bin, f.cs)
        tool.tdir.mkdir(parents=True, exist_ok=True)
        ent = {"label": tool.label}
        try:
            tool.init(r)
            wall, rss, _ = tool.backup(r, "dense-import", dense, None, item="dense")
            ent.update(wall_s=wall, rss_kib=rss, mbs=dense_size / 1e6 / wall,
                       stored=du_bytes(tool.repo))
            log(f"{tool.label}: dense import {wall:.2f} s = {ent['mbs']:.0f} MB/s")
        except StepError as e:
            ent["error"] = str(e)
            log(f"{tool.label}: dense import ERROR {e}")
        lim["ingest"].append(ent)
        if not ctx["keep"]:
            shutil.rmtree(tool.tdir, ignore_errors=True)
    if restic_ok:
        tool = Restic(ctx["run_dir"] / "dense-restic")
        tool.tdir.mkdir(parents=True, exist_ok=True)
        ent = {"label": "restic (reference)"}
        try:
            tool.init(r)
            wall, rss, _ = tool.backup(r, "dense-import", dense, None)
            ent.update(wall_s=wall, rss_kib=rss, mbs=dense_size / 1e6 / wall,
                       stored=du_bytes(tool.repo))
            log(f"restic: dense import {wall:.2f} s = {ent['mbs']:.0f} MB/s")
        except StepError as e:
            ent["error"] = str(e)
        lim["ingest"].append(ent)
        if not ctx["keep"]:
            shutil.rmtree(tool.tdir, ignore_errors=True)
    r.warm_file = None
    if not ctx["keep"]:
        dense.unlink()
    return lim


# --------------------------------------------------------------------------
# report

def fmt_mib(kib):
    return "?" if kib is None else f"{kib / 1024:.0f}"


def fmt_bytes(b):
    if b is None:
        return "n/a"
    return f"{b:,} ({b / MiB:.1f} MiB)"


def cell(res, key):
    if res is None:
        return "n/a"
    if res.get(key) is None:
        return "ERR" if res.get("error") else "n/a"
    v = res[key]
    if key.endswith("_s"):
        s = f"{v:.2f}"
        if key == "restore_s" and not res.get("restore_ok", True):
            s += " FAIL"
        return s
    if key.endswith("_rss_kib"):
        return f"{v / 1024:.0f}"
    if key == "rss_max_mib":
        return f"{v:.0f}"
    if key.startswith("stored"):
        return fmt_bytes(v)
    if key == "restore_ok":
        return "OK" if v else "FAIL"
    return str(v)


def ratio(a, b, key):
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    va, vb = a[key], b[key]
    if vb == 0:
        return None
    return va / vb


def md_table(header, rows):
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(cells)) + " |"
    out = [line(header), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def report(ctx, results, lim):
    restic = results.get("restic")
    borg = results.get("borg")
    ferries = [v for k, v in results.items() if k.startswith("ferry")]
    ferry_labels = ctx["ferry_labels"]
    lines = []
    lines.append(f"# Ferry benchmark — {ctx['size_arg']} ext4 image")
    lines.append("")
    lines.append(f"- date: {ctx['date']}, host: {platform.node()}, {os.cpu_count()} cores, "
                 f"{ctx['cpu']}, kernel {platform.release()}")
    lines.append(f"- image: {ctx['size']:,} bytes; root: {ctx['image_source']}; "
                 f"{ctx['image_disk'] / MiB:.0f} MiB allocated")
    lines.append(f"- change: {ctx['n_writes']} writes × 100 KiB of random data at random 4 KiB-aligned "
                 f"offsets (seed {ctx['seed']}), {ctx['changed_bytes']:,} bytes in "
                 f"{ctx['n_ranges']} ranges ({100 * ctx['changed_bytes'] / ctx['size']:.2f}%)")
    lines.append(f"- versions: {ctx['versions']}")
    lines.append(f"- page cache dropped before each timed step: {'yes' if ctx['can_drop'] else 'no (not permitted)'}")
    for label, res in results.items():
        if res and res.get("info"):
            lines.append(f"- {label}: {res['info']}")
    lines.append("")

    cols = ["restic", "borg"] + ferry_labels
    rowspec = [
        ("initial import (s)", "initial_s"),
        ("incremental (s)", "incremental_s"),
        ("restore (s)", "restore_s"),
        ("restore == modified image (sha256)", "restore_ok"),
        ("stored bytes after initial", "stored_initial"),
        ("stored bytes added by incremental", "stored_added"),
        ("peak RSS initial (MiB)", "initial_rss_kib"),
        ("peak RSS incremental (MiB)", "incremental_rss_kib"),
        ("peak RSS restore (MiB)", "restore_rss_kib"),
        ("peak RSS, max over steps (MiB)", "rss_max_mib"),
    ]
    header = ["step"] + cols + [f"{l}/restic" for l in ferry_labels]
    rows = []
    for name, key in rowspec:
        row = [name] + [cell(results.get(c), key) for c in cols]
        for l in ferry_labels:
            if key == "restore_ok":
                row.append("")
                continue
            rt = ratio(results.get(l), restic, key)
            row.append("n/a" if rt is None else f"{rt:.2f}×")
        rows.append(row)
    lines.append(md_table(header, rows))
    lines.append("")

    lines.append("## Targets (ferry / restic)")
    lines.append("")
    theader = ["target", "goal"] + ferry_labels
    trows = []
    for key, name, goal in TARGETS:
        row = [name, f"≤ {goal:g} × restic" if goal != 1.0 else "≤ restic"]
        for l in ferry_labels:
            rt = ratio(results.get(l), restic, key)
            if rt is None:
                # 0 added bytes for ferry is a pass even if the ratio is undefined
                f = results.get(l)
                if f and restic and f.get(key) == 0 and restic.get(key) is not None:
                    row.append("0 — MET")
                else:
                    row.append("n/a")
            else:
                row.append(f"{rt:.2f}× — {'MET' if rt <= goal else 'NOT MET'}")
        trows.append(row)
    lines.append(md_table(theader, trows))
    lines.append("")

    if lim is not None:
        lines.append("## Machine limits")
        lines.append("")
        mrows = []

        def mbs(v):
            return "n/a" if v is None else f"{v:,.0f} MB/s"

        mrows.append(["sha256 (openssl speed -evp, 1 core, 16 KiB blocks)", mbs(lim.get("sha256_mbs"))])
        mrows.append(["aes-256-gcm (openssl speed -evp, 1 core, 16 KiB blocks)", mbs(lim.get("aes_gcm_mbs"))])
        z = lim.get("zstd1_mbs")
        zr = lim.get("zstd1_ratio")
        mrows.append([f"zstd -1 compress (zstd -b1, 1 core, "
                      f"{lim.get('zstd_sample_bytes', 0) / MiB:.0f} MiB dense sample)",
                      mbs(z) + (f" (ratio {zr:.2f})" if zr else "")])
        mrows.append(["sequential read of the dense file, page cache dropped (disk)",
                      mbs(lim.get("read_mbs"))])
        if lim.get("limit_mbs"):
            mrows.append([f"ingest limit: slowest stage ({lim['slowest_stage']}) × {lim['cores']} cores",
                          mbs(lim["limit_mbs"])])
        for ent in lim["ingest"]:
            name = f"{ent['label']} dense ingest ({lim['dense_bytes'] / GiB:.2f} GiB, page cache warm)"
            if ent.get("error"):
                mrows.append([name, "ERR"])
                continue
            v = f"{ent['mbs']:,.0f} MB/s, {ent['wall_s']:.2f} s, {fmt_mib(ent['rss_kib'])} MiB RSS"
            if lim.get("limit_mbs"):
                v += f", {ent['mbs'] / lim['limit_mbs']:.2f} of limit"
            mrows.append([name, v])
        lines.append(md_table(["measure", "value"], mrows))
        lines.append("")

    errs = [(l, r["error"]) for l, r in results.items() if r and r.get("error")]
    if lim:
        errs += [(e["label"] + " dense", e["error"]) for e in lim["ingest"] if e.get("error")]
    if ctx.get("ferry_missing"):
        lines.append(f"ferry: not run — {ctx['ferry_missing']}")
        lines.append("")
    if errs:
        lines.append("## Errors")
        lines.append("")
        for l, e in errs:
            lines.append(f"- {l}: " + e.replace("\n", "\n  "))
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------

def version_of(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            return "?"
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def find_ferry(args, repo_root):
    """Returns (path or None, reason if None)."""
    if args.ferry_bin or os.environ.get("FERRY_BIN"):
        p = Path(args.ferry_bin or os.environ["FERRY_BIN"])
        return (p, None) if os.access(p, os.X_OK) else (None, f"{p} is not executable")
    target = Path(os.environ.get("CARGO_TARGET_DIR", repo_root / "target"))
    binary = target / "release" / "ferry"
    if not args.no_build:
        if shutil.which("cargo") and (repo_root / "Cargo.toml").is_file():
            log("building ferry: cargo build --release -p ferry-cli (log: cargo-build.log)")
            logf = Path(args.bench_dir) / "cargo-build.log"
            with open(logf, "wb") as fh:
                rc = subprocess.run(["cargo", "build", "--release", "-p", "ferry-cli"], cwd=repo_root,
                                    stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL).returncode
            if rc != 0:
                log(f"warning: cargo build failed (exit {rc}); see {logf}")
                if not binary.exists():
                    return None, f"cargo build --release -p ferry-cli failed (see {logf})"
                log("warning: using the existing, possibly stale, binary")
        else:
            log("warning: cargo not found; not building ferry")
    if not os.access(binary, os.X_OK):
        return None, f"{binary} not found (build it with cargo build --release -p ferry-cli)"
    return binary, None


def main():
    ap = argparse.ArgumentParser(prog="bench/run.sh",
                                 description="Ferry vs restic vs borg on one ext4 disk image.")
    ap.add_argument("--repo-root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help=argparse.SUPPRESS)
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--chunk-sizes", default="",
                    help="comma list, e.g. 64K,256K,1M: one ferry run per chunk size")
    ap.add_argument("--tools", default="restic,borg,ferry",
                    help="comma list of tools to run (default restic,borg,ferry)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--ferry-bin", help="ferry binary (default: $FERRY_BIN or target/release/ferry)")
    ap.add_argument("--no-limits", action="store_true", help="skip the machine-limits section")
    ap.add_argument("--dense-size", default="1G", help="dense ingest sample size (default 1G)")
    ap.add_argument("--seed", default=os.environ.get("FERRY_BENCH_SEED", "1"),
                    help="seed for the modification and the dense sample (default 1)")
    ap.add_argument("--bench-dir", default=os.environ.get("FERRY_BENCH_DIR", "/tmp/ferry-bench"),
                    help="work directory (default $FERRY_BENCH_DIR or /tmp/ferry-bench)")
    args = ap.parse_args()

    size = parse_size(args.size)
    dense_size = parse_size(args.dense_size)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = set(tools) - {"restic", "borg", "ferry"}
    if bad:
        ap.error(f"unknown tools: {', '.join(sorted(bad))}")
    chunk_sizes = [c.strip() for c in args.chunk_sizes.split(",") if c.strip()]
    for c in chunk_sizes:
        parse_size(c)
    repo_root = args.repo_root.resolve()
    bench_dir = Path(args.bench_dir)
    bench_dir.mkdir(parents=True, exist_ok=True)
    args.bench_dir = str(bench_dir)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = bench_dir / f"run-{stamp}-{os.getpid()}"
    run_dir.mkdir()
    r = Runner(run_dir / "logs")
    free = shutil.disk_usage(run_dir).free
    if free < 4 * size + 2 * dense_size:
        log(f"warning: only {free / GiB:.1f} GiB free in {run_dir}; the run may need ~{(4 * size + 2 * dense_size) / GiB:.1f} GiB")

    ferry_bin, ferry_missing = (None, None)
    if "ferry" in tools:
        ferry_bin, ferry_missing = find_ferry(args, repo_root)
        if ferry_missing:
            log(f"ferry: skipped — {ferry_missing}")
    ferry_labels = ([f"ferry@{c}" for c in chunk_sizes] if chunk_sizes else ["ferry"]) \
        if "ferry" in tools else []

    can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK)
    ctx = {"run_dir": run_dir, "keep": args.keep, "seed": args.seed, "size": size,
           "size_arg": args.size, "dense_size": dense_size, "ferry_labels": ferry_labels,
           "ferry_missing": ferry_missing, "can_drop": can_drop,
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                    if l.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    ctx["cpu"] = cpu
    vers = []
    if "restic" in tools:
        vers.append(version_of(["restic", "version"]))
    if "borg" in tools:
        vers.append(version_of(["borg", "--version"]))
    if ferry_bin:
        v = version_of([ferry_bin, "--version"])
        vers.append(v if v.startswith("ferry") else f"ferry {v}")
    ctx["versions"] = "; ".join(vers)

    try:
        # the image: pristine, then the same modification for every tool
        pristine = run_dir / "pristine.img"
        modified = run_dir / "modified.img"
        changes = run_dir / "changes.json"
        log(f"making {args.size} ext4 image (scripts/make-ext4-image.sh)")
        env = dict(os.environ)
        env.setdefault("FERRY_IMAGE_SEED", str(args.seed))
        p = subprocess.run([str(repo_root / "scripts" / "make-ext4-image.sh"), str(pristine), args.size],
                           env=env, capture_output=True, text=True)
        (r.logdir / "make-ext4-image.err").write_text(p.stderr)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            raise SystemExit("bench: make-ext4-image.sh failed")
        m = re.search(r"root source: (.*)", p.stderr)
        ctx["image_source"] = m.group(1) if m else "?"
        ctx["image_disk"] = os.stat(pristine).st_blocks * 512
        n, changed = make_modified(pristine, modified, changes, size, args.seed)
        ctx["n_writes"], ctx["changed_bytes"] = n, changed
        ctx["n_ranges"] = len(json.loads(changes.read_text())["changedArea"])
        ctx["modified_sha256"] = sha256_file(modified)
        ctx["pristine"], ctx["modified"], ctx["changes"] = pristine, modified, changes
        log(f"image ready: {ctx['image_source']}; {n} writes, {changed:,} bytes changed")

        results = {}
        if "restic" in tools:
            results["restic"] = bench_tool(Restic(run_dir / "restic"), r, ctx)
        if "borg" in tools:
            results["borg"] = bench_tool(Borg(run_dir / "borg"), r, ctx)
        ferry_tools = []
        if ferry_bin:
            for cs in (chunk_sizes or [None]):
                f = Ferry(run_dir / (f"ferry-{cs}" if cs else "ferry"), ferry_bin, cs)
                ferry_tools.append(f)
                results[f.label] = bench_tool(f, r, ctx)
        for l in ferry_labels:
            results.setdefault(l, None)

        lim = None
        if not args.no_limits:
            restic_ok = "restic" in tools and results.get("restic") and not results["restic"].get("error")
            try:
                lim = machine_limits(r, ctx, ferry_tools, restic_ok)
            except (StepError, OSError, subprocess.CalledProcessError) as e:
                log(f"warning: machine limits skipped: {e}")

        text = report(ctx, results, lim)
        print(text, flush=True)
        (bench_dir / f"report-{stamp}.md").write_text(text + "\n")
        dump = {"context": {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.items()},
                "results": results, "limits": lim}
        (bench_dir / f"results-{stamp}.json").write_text(json.dumps(dump, indent=1, default=str) + "\n")
        log(f"report saved to {bench_dir}/report-{stamp}.md (raw numbers: results-{stamp}.json)")
    finally:
        if args.keep:
            log(f"kept work directory {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
