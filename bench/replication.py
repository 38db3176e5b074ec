#!/usr/bin/env python3
"""Replication benchmark (issue 6): one agent, one ext4 image, the real ferryd and ferry-agent.

Prints, side by side in one run on this machine:

- the wall time of the initial replication (`ferry-agent sync --once` of the whole image
  through the data port into the appliance's vault) against `ferry vault import` of the same
  image into a fresh local vault (target: at most 1.5x);
- the recovery-point age (now minus the newest point's creation time, sampled every second
  through the admin API, which reads the vault) at p50 and p99 under sustained random-write
  churn of 5, 10 and 20 MB/s with `ferry-agent run` on a 30-second cycle (target: p99 at most
  60 s at 20 MB/s);
- the gateway's peak RSS (VmHWM) over the whole run (target: at most 256 MiB).

Churn: 64 KiB blocks of fresh random data at uniformly random 64 KiB-aligned offsets of the
whole image (the worst case for a chunk-based tracker: with 256 KiB chunks, 20 MB/s touches
most of a 2 GiB disk every 30 s), written with pwrite and fdatasync once per second.

    bench/replication.sh                      # 2 GiB image, 180 s per churn level
    bench/replication.sh --size 512M --seconds 60 --rates 5,20
"""

import argparse
import json
import os
import random
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def size_bytes(text):
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (want e.g. 2G, 512M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(extra or {})
    return env


def pct(samples, p):
    s = sorted(samples)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


class Ferryd:
    """`ferryd up` on a fresh data directory, ports 0, cache thresholds off (see below)."""

    def __init__(self, bin_dir, data):
        self.data = data
        env = clean_env({
            # This is a shared build machine whose disk may be fuller than Site Recovery's 25%
            # critical threshold; the benchmark measures replication, not the alert.
            "FERRY_PROCESS__CACHE__CRITICAL_FREE_PERCENT": "0",
            "FERRY_PROCESS__CACHE__WARN_FREE_PERCENT": "0",
        })
        self.p = subprocess.Popen(
            [str(bin_dir / "ferryd"), "up", "--data-dir", str(data), "--listen", "127.0.0.1:0",
             "--data-listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.port = None
        self.stderr_tail = []
        deadline = time.time() + 120
        while self.port is None:
            line = self.p.stderr.readline()
            if not line:
                raise SystemExit(f"ferryd exited: {''.join(self.stderr_tail)}")
            self.stderr_tail.append(line)
            m = re.match(r"ferryd: listening on https://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            if time.time() > deadline:
                raise SystemExit("ferryd did not start")
        threading.Thread(target=self._drain, daemon=True).start()
        self.token = (data / "admin-token").read_text().strip()
        self.ctx = ssl.create_default_context(cafile=str(data / "tls" / "ca.pem"))
        self.peak_rss = 0
        threading.Thread(target=self._rss, daemon=True).start()

    def _drain(self):
        for line in self.p.stderr:
            self.stderr_tail = (self.stderr_tail + [line])[-50:]

    def _rss(self):
        while self.p.poll() is None:
            try:
                for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.5)

    def api(self, path):
        req = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
            return json.loads(r.read())

    def newest_point_ms(self, item):
        """Creation time (Unix ms) of the item's newest point, from the vault."""
        url, newest = f"/api/v1/vaults/default/points?item={item}&limit=500", None
        while True:
            page = self.api(url)
            if page["items"]:
                newest = page["items"][-1]["created"]
            if not page.get("next_cursor"):
                break
            url = f"/api/v1/vaults/default/points?item={item}&limit=500&cursor={page['next_cursor']}"
        if newest is None:
            return None
        from datetime import datetime
        return datetime.fromisoformat(newest.replace("Z", "+00:00")).timestamp() * 1000

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()


class Churn(threading.Thread):
    def __init__(self, image, rate, seed):
        super().__init__(daemon=True)
        self.image, self.rate, self.rng = image, rate, random.Random(seed)
        self.stop_at = None
        self.written = 0

    def run(self):
        fd = os.open(self.image, os.O_RDWR)
        blocks = os.path.getsize(self.image) // 65536
        start, last_sync = time.time(), time.time()
        try:
            while self.stop_at is None or time.time() < self.stop_at:
                wait = start + self.written / self.rate - time.time()
                if wait > 0:
                    time.sleep(min(0.05, wait))
                    continue
                os.pwrite(fd, os.urandom(65536), self.rng.randrange(16, blocks) * 65536)
                self.written += 65536
                if time.time() - last_sync >= 1:
                    os.fdatasync(fd)
                    last_sync = time.time()
        finally:
            os.fdatasync(fd)
            os.close(fd)


def run(cmd, **kw):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p, time.time() - t


def main():
    ap = argparse.ArgumentParser(prog="bench/replication.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo-root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help=argparse.SUPPRESS)
    ap.add_argument("--size", default="2G", type=str, help="image size (default 2G)")
    ap.add_argument("--rates", default="5,10,20", help="churn levels, MB/s (default 5,10,20)")
    ap.add_argument("--seconds", type=int, default=180, help="seconds per churn level (default 180)")
    ap.add_argument("--cycle", type=int, default=30, help="cycle interval, s (default 30)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--bin-dir", type=Path, help="where ferryd, ferry and ferry-agent are "
                    "(default target/release)")
    ap.add_argument("--bench-dir", type=Path, default=Path(os.environ.get(
        "FERRY_BENCH_DIR", "/tmp/ferry-bench-replication")))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    size_bytes(args.size)
    root = args.repo_root
    bins = args.bin_dir or root / "target" / "release"
    if not args.no_build and not args.bin_dir:
        log("cargo build --release -p ferry-daemon -p ferry-cli -p ferry-agent")
        run(["cargo", "build", "--release", "-p", "ferry-daemon", "-p", "ferry-cli",
             "-p", "ferry-agent"], cwd=root)
    work = args.bench_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = work / "os.img"
    log(f"making a {args.size} ext4 image (scripts/make-ext4-image.sh)")
    run(["bash", str(root / "scripts/make-ext4-image.sh"), str(image), args.size])
    allocated = os.stat(image).st_blocks * 512

    # Baseline: ferry vault import of the same image into a fresh local vault.
    env = clean_env({"FERRY_PASSPHRASE": "bench-passphrase", "FERRY_CACHE_DIR": str(work / "cli-cache")})
    run([str(bins / "ferry"), "vault", "init", "--repo", str(work / "import-vault")], env=env)
    _, t_import = run([str(bins / "ferry"), "vault", "import", "--repo", str(work / "import-vault"),
                       "--item", "bench", "--disk", str(image)], env=env)
    log(f"ferry vault import: {t_import:.1f} s")

    gw = Ferryd(bins, work / "site")
    home = work / "home"
    home.mkdir()
    cli_env = clean_env({"HOME": str(home), "FERRY_CONFIG_DIR": str(home / "cfg")})
    fp = None
    for line in gw.p.stdout:
        m = re.search(r"CA fingerprint: SHA256 (\S+)", line)
        if m:
            fp = m.group(1)
            break
    threading.Thread(target=lambda: [None for _ in gw.p.stdout], daemon=True).start()
    ferry = lambda *a: run([str(bins / "ferry"), *a], env=cli_env)[0].stdout  # noqa: E731
    ferry("login", f"https://127.0.0.1:{gw.port}", "--token-file", str(work / "site" / "admin-token"),
          "--ca-fingerprint", fp)
    ferry("policy", "create", "bench", "--cycle-interval-seconds", str(args.cycle),
          "--retry-schedule-seconds", "5,10,30")
    disk_size = os.path.getsize(image)
    ferry("item", "create", "web-01", "--disk", f"os={disk_size}", "--policy", "bench", "--wait")
    out = ferry("agent", "token", "create", "bench-agent", "--item", "web-01")
    line = next(l.strip() for l in out.splitlines() if l.strip().startswith("FERRY_AGENT_TOKEN="))
    words = line.split()
    token = words[0].split("=", 1)[1]
    state = work / "agent"
    agent_env = clean_env({"FERRY_AGENT_DIR": str(state), "FERRY_AGENT_TOKEN": token})
    run([str(bins / "ferry-agent"), *words[2:], "--disk", f"web-01/os={image}"], env=agent_env)
    agent_env.pop("FERRY_AGENT_TOKEN")

    log("initial replication: ferry-agent sync --once")
    p, t_initial = run([str(bins / "ferry-agent"), "sync", "--once", "--output", "json",
                        "--commit-timeout", "3600"], env=agent_env)
    log(f"initial replication: {t_initial:.1f} s ({p.stdout.strip()})")

    # Churn levels with ferry-agent run.
    agent = subprocess.Popen([str(bins / "ferry-agent"), "run"], env=agent_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Its log is read (a full pipe would block it) and kept for a failure report.
    agent_tail = []

    def agent_log():
        for l in agent.stderr:
            agent_tail[:] = (agent_tail + [l])[-40:]

    threading.Thread(target=agent_log, daemon=True).start()
    results = []
    for rate_mb in [float(r) for r in args.rates.split(",") if r.strip()]:
        churn = Churn(image, rate_mb * 1e6, seed=int(rate_mb * 1000))
        churn.start()
        samples = []
        t0 = time.time()
        warmup = 2 * args.cycle
        while time.time() - t0 < args.seconds:
            time.sleep(1)
            newest = gw.newest_point_ms("web-01")
            if newest is not None and time.time() - t0 >= warmup:
                samples.append(time.time() - newest / 1000)
        churn.stop_at = time.time()
        churn.join()
        results.append((rate_mb, samples, churn.written))
        achieved = churn.written / 1e6 / args.seconds
        log(f"churn {rate_mb:g} MB/s (achieved {achieved:.1f}): p50 {pct(samples, 50):.1f} s, "
            f"p99 {pct(samples, 99):.1f} s ({len(samples)} samples)")
    agent.terminate()
    try:
        agent.wait(timeout=60)
    except subprocess.TimeoutExpired:
        agent.kill()
    peak = gw.peak_rss
    gw.stop()

    print()
    print(f"Replication benchmark: {args.size} ext4 image ({allocated / 2**20:.0f} MiB allocated), "
          f"{os.cpu_count()} cores, cycle {args.cycle} s, {args.seconds} s per churn level")
    print()
    print(f"| {'measure':<46} | {'result':>12} | {'target':>14} |")
    print(f"|{'-' * 48}|{'-' * 14}|{'-' * 16}|")
    print(f"| {'ferry vault import of the image (wall)':<46} | {t_import:>10.1f} s | {'baseline':>14} |")
    ratio = t_initial / t_import if t_import else float('nan')
    print(f"| {'initial replication, ferry-agent sync --once':<46} | {t_initial:>10.1f} s | {'<= 1.5x':>14} |")
    print(f"| {'  ratio to vault import':<46} | {ratio:>11.2f}x | {'<= 1.50x':>14} |")
    for rate_mb, samples, written in results:
        tgt = "<= 60 s" if rate_mb == 20 else ""
        print(f"| {f'churn written at {rate_mb:g} MB/s (MB/s achieved)':<46} | {written / 1e6 / args.seconds:>12.1f} | {'':>14} |")
        print(f"| {f'point age at {rate_mb:g} MB/s churn: p50':<46} | {pct(samples, 50):>10.1f} s | {'':>14} |")
        print(f"| {f'point age at {rate_mb:g} MB/s churn: p99':<46} | {pct(samples, 99):>10.1f} s | {tgt:>14} |")
    print(f"| {'gateway peak RSS (VmHWM)':<46} | {peak / 2**20:>8.0f} MiB | {'<= 256 MiB':>14} |")
    print()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
