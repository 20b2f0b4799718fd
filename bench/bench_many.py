#!/usr/bin/env python3
"""Several recipes on one box: `bake build A B C D -j 2` against one after another.

    .venv/bin/python bench/bench_many.py [--jobs 2] [--dir /var/tmp] [--keep] [--skip-verify]

Run as root. Four recipes share a base: the demo recipe (recipes/debian-demo.yml) and
three small variants of it (another name, one more file each, so that the images differ
while the base and the package checkpoint are the same). Both ways start from a new,
empty stage cache, so each makes the base once and the package checkpoint once:

  serial    `bake build A B C D -j 1`: one bake after another;
  parallel  `bake build A B C D -j N` (default 2): N at a time.

Each bake runs its stages as its recipe says: bootstrap, customize, image, and the local
verification under QEMU (publishing is skipped: no cloud is configured here). With
`--skip-verify`, bakes stop after the image.

Figures: the wall time of each way, and the ratio parallel / serial (the target is 0.7 or
less), plus each recipe's bake time in both. It exits 0 after printing the table even
when the target is missed; a bake that fails stops it with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BAKE = ROOT / ".venv" / "bin" / "bake"
NAMES = ("bench-many-a", "bench-many-b", "bench-many-c", "bench-many-d")
TARGET = 0.7


def recipes(folder: Path) -> list[Path]:
    demo = yaml.safe_load((ROOT / "recipes" / "debian-demo.yml").read_text())
    out = []
    for name in NAMES:
        own = folder / f"{name}.txt"
        own.write_text(f"{name}\n")
        data = dict(demo, name=name)
        data["files"] = [*(demo.get("files") or []), {"source": str(own), "dest": f"/etc/{name}"}]
        p = folder / f"{name}.yml"
        p.write_text(yaml.safe_dump(data))
        out.append(p)
    return out


def run(paths: list[Path], jobs: int, work: Path, skip_verify: bool) -> tuple[float, dict]:
    cache, output = work / "cache", work / "output"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EC2_", "S3_", "EUCA"))}
    env["BAKE_CACHE"] = str(cache)
    argv = [str(BAKE), "build", *map(str, paths), "-j", str(jobs), "--json", "--output", str(output)]
    if skip_verify:
        argv += ["--stop-after", "image"]
    start = time.monotonic()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    wall = time.monotonic() - start
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    summary = next((e for e in events if e["event"] == "summary"), None)
    if p.returncode != 0 or summary is None:
        sys.exit(f"bench: `{' '.join(argv)}` exited {p.returncode}: "
                 + json.dumps(summary["recipes"] if summary else events[-3:], indent=1))
    return wall, {x["recipe"]: x["seconds"] for x in summary["recipes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--skip-verify", action="store_true", help="stop each bake after the image")
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bake-bench-many-", dir=args.dir))
    try:
        paths = recipes(top)
        results = {}
        for label, jobs in (("serial", 1), ("parallel", args.jobs)):
            work = top / label
            work.mkdir()
            print(f"bench: {label} (-j {jobs}) ...", file=sys.stderr, flush=True)
            results[label] = run(paths, jobs, work, args.skip_verify)
        (s_wall, s_each), (p_wall, p_each) = results["serial"], results["parallel"]
        ratio = p_wall / s_wall
        print(f"{'way':<10} {'wall':>8}  " + "  ".join(f"{n[-1]:>6}" for n in NAMES))
        for label, (wall, each) in results.items():
            print(f"{label:<10} {wall:>7.0f}s  " + "  ".join(f"{each.get(n, 0):>5.0f}s" for n in NAMES))
        verdict = "met" if ratio <= TARGET else "missed"
        print(f"ratio parallel/serial: {ratio:.2f} (target <= {TARGET}: {verdict}); "
              f"{'image only' if args.skip_verify else 'with local verification'}, {os.cpu_count()} CPUs")
    finally:
        if args.keep:
            print(f"bench: kept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
