#!/usr/bin/env python3
"""Bundle throughput against the shell pipeline on the same file, and peak memory.

    .venv/bin/python bench/bench_bundle.py [--size-mib 1024] [--runs 1] [--workers N] [--dir /var/tmp]

The image is 1 GiB of generated data shaped like a filesystem image, deterministic
(seeded): in 64 KiB blocks, 30 % random bytes (compressed or binary content, which
gzip cannot shrink), 40 % English-like text from a 5000-word vocabulary (configuration,
scripts, documentation), 30 % zeros (free space). gzip -6 makes it about half its size.

The peer is what ec2-ami-tools and euca2ools run, minus their hashing:
`tar -c | gzip -c | openssl enc -e -aes-128-cbc -K … -iv … | split -b 10m`, each
program its own process. bake's bundler runs in a child process so that its peak
resident memory (VmHWM) is its own. Both read the image from the page cache (it is read
once before timing). Throughput is image bytes per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BLOCK = 64 * 1024
PART = 10 * 1024 * 1024


def generate(path: Path, size: int, seed: int = 20071010) -> None:
    """Write the benchmark image (see the module's doc)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(5000)]
    lines, n = [], 0
    while n < 8 << 20:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + "\n"
        lines.append(line)
        n += len(line)
    text = "".join(lines).encode()
    zero = bytes(BLOCK)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            r = rng.random()
            if r < 0.3:
                b = rng.randbytes(BLOCK)
            elif r < 0.7:
                o = rng.randrange(len(text) - BLOCK)
                b = text[o:o + BLOCK]
            else:
                b = zero
            b = b[:left]
            f.write(b)
            left -= len(b)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_shell(image: Path, out: Path) -> dict:
    out.mkdir()
    key, iv = os.urandom(16).hex(), os.urandom(16).hex()
    script = (f"set -o pipefail; tar -c -f - -C '{image.parent}' '{image.name}' | gzip -c | "
              f"openssl enc -e -aes-128-cbc -K {key} -iv {iv} | split -b {PART} -d -a 2 - '{out}/{image.name}.part.'")
    cpu0, t0 = children_cpu(), time.monotonic()
    subprocess.run(["bash", "-c", script], check=True)
    seconds = time.monotonic() - t0
    size = sum(p.stat().st_size for p in out.iterdir())
    return {"seconds": seconds, "cpu": children_cpu() - cpu0, "bundled": size, "parts": len(list(out.iterdir()))}


CHILD = """
import json, sys, time
from pathlib import Path
from builder.bundle.writer import bundle_image
a = json.loads(sys.argv[1])
t0 = time.monotonic()
r = bundle_image(Path(a["image"]), Path(a["out"]), user_id="123456789012", user_cert=Path(a["cert"]),
                 user_key=Path(a["key"]), cloud_cert=Path(a["cloud"]), workers=a["workers"])
seconds = time.monotonic() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "bundled": r.bundled_size, "parts": len(r.parts), "vmhwm_kib": hwm}))
"""


def run_bake(image: Path, out: Path, creds, workers: int | None) -> dict:
    arg = json.dumps({"image": str(image), "out": str(out), "cert": str(creds.user.cert), "key": str(creds.user.key),
                      "cloud": str(creds.cloud.cert), "workers": workers})
    cpu0, t0 = children_cpu(), time.monotonic()
    r = subprocess.run([sys.executable, "-c", CHILD, arg], check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - t0
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update({"wall": wall, "cpu": children_cpu() - cpu0})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=1, help="alternating runs of each (the best of each is compared)")
    ap.add_argument("--workers", type=int, default=None, help="compression threads (default: bake's default)")
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"), help="where to put the image and bundles")
    args = ap.parse_args()

    from bundle_keys import make_credentials
    from builder.bundle.gzipstream import default_workers

    work = Path(tempfile.mkdtemp(prefix="bench-bundle-", dir=args.dir))
    try:
        size = args.size_mib << 20
        image = work / "bench.img"
        t0 = time.monotonic()
        generate(image, size)
        warm(image)
        creds = make_credentials(work / "keys")
        print(f"image: {size / 2**20:.0f} MiB generated in {time.monotonic() - t0:.1f} s "
              "(30% random, 40% text, 30% zeros in 64 KiB blocks; seeded)")
        print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"bake compression threads: {args.workers or default_workers()}")
        shell, bake = [], []
        for i in range(args.runs):
            s = run_shell(image, work / f"shell{i}")
            print(f"  shell run {i + 1}: {s['seconds']:.2f} s, {size / s['seconds'] / 1e6:.1f} MB/s, "
                  f"cpu {s['cpu']:.1f} s, {s['bundled']} bytes in {s['parts']} parts")
            shell.append(s)
            shutil.rmtree(work / f"shell{i}")
            b = run_bake(image, work / f"bake{i}", creds, args.workers)
            print(f"  bake  run {i + 1}: {b['seconds']:.2f} s, {size / b['seconds'] / 1e6:.1f} MB/s, "
                  f"cpu {b['cpu']:.1f} s (process incl. start-up), {b['bundled']} bytes in {b['parts']} parts, "
                  f"peak RSS {b['vmhwm_kib'] / 1024:.1f} MiB")
            bake.append(b)
            shutil.rmtree(work / f"bake{i}")
        s_best = min(x["seconds"] for x in shell)
        b_best = min(x["seconds"] for x in bake)
        ratio = s_best / b_best
        peak = max(x["vmhwm_kib"] for x in bake) / 1024
        print(f"shell pipeline (tar | gzip | openssl enc | split): {size / s_best / 1e6:.1f} MB/s")
        print(f"bake bundle_image (tar+sha1, gzip on threads, AES, parts+sha1): {size / b_best / 1e6:.1f} MB/s")
        print(f"ratio bake/shell: {ratio:.2f} (target >= 0.90) {'OK' if ratio >= 0.9 else 'BELOW TARGET'}")
        print(f"peak memory of bake: {peak:.1f} MiB (target < 100 MiB) {'OK' if peak < 100 else 'ABOVE TARGET'}")
        return 0 if ratio >= 0.9 and peak < 100 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
