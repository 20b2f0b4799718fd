#!/usr/bin/env python3
"""Evolving an image against baking it again: the demo build plus one package.

    .venv/bin/python bench/bench_evolve.py [--dir /var/tmp] [--keep] [--package tree]

Run as root. First the demo recipe (recipes/debian-demo.yml) is baked into a new, empty
stage cache (its image is the base to evolve; the time is not one of the figures).
Then, in one run, on the same machine:

  scratch cold    the demo recipe plus one package, baked from scratch (debootstrap,
                  packages, image) with an empty cache;
  scratch cached  the same again, with the cache the first made (debootstrap and the
                  package checkpoint reused);
  evolve cold     `base: {image: <demo build>}` plus the same package: the base's root
                  tree is taken out (host path), the package installed, image made;
  evolve cached   the same again, the base's root tree and package checkpoint cached;
  light           `base.method: guestfs` on the demo build: a file and a user added in
                  place through libguestfs (no package: the light path installs none).

Every bake stops after the image (no verification). Figures: each wall time and the
ratios evolve/scratch, cold and cached (the aim is well under 1: evolving skips
debootstrap and the base's packages). It exits 0 after printing the table; a bake that
fails stops it with a non-zero exit.
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


def bake(recipe: Path, work: Path, cache: Path) -> tuple[float, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EC2_", "S3_", "EUCA"))}
    env["BAKE_CACHE"] = str(cache)
    out = work / "output"
    argv = [str(BAKE), "build", str(recipe), "--stop-after", "image", "--output", str(out)]
    start = time.monotonic()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.monotonic() - start
    if p.returncode != 0:
        sys.exit(f"bench: `{' '.join(argv)}` exited {p.returncode}:\n{p.stderr[-3000:]}")
    name = yaml.safe_load(recipe.read_text())["name"]
    build = max((out / name).iterdir(), key=lambda d: d.stat().st_mtime)
    return wall, build


def write(folder: Path, data: dict) -> Path:
    p = folder / f"{data['name']}.yml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--package", default="tree", help="the one package added (default: tree)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (bakes need it)")
    work = Path(tempfile.mkdtemp(prefix="bench-evolve-", dir=args.dir))
    try:
        demo = yaml.safe_load((ROOT / "recipes" / "debian-demo.yml").read_text())
        demo.pop("verify", None)
        base_recipe = write(work, dict(demo, name="bench-evolve-base"))
        _, base = bake(base_recipe, work, work / "cache-base")

        plus = dict(demo, name="bench-scratch", packages=[*demo.get("packages", []), args.package])
        scratch = write(work, plus)
        evolve = write(work, {"name": "bench-evolve", "release": demo["release"],
                              "base": {"image": str(base)}, "packages": [args.package]})
        marker = work / "marker.txt"
        marker.write_text("changed in place\n")
        light = write(work, {"name": "bench-light", "release": demo["release"],
                             "base": {"image": str(base), "method": "guestfs", "grow": "64M"},
                             "users": [{"name": "ops"}],
                             "files": [{"source": str(marker), "dest": "/etc/bench-light.txt"}]})
        rows = {}
        for label, recipe, cache in (("scratch cold", scratch, "cache-scratch"),
                                     ("scratch cached", scratch, "cache-scratch"),
                                     ("evolve cold", evolve, "cache-evolve"),
                                     ("evolve cached", evolve, "cache-evolve"),
                                     ("light", light, "cache-light")):
            rows[label] = bake(recipe, work, work / cache)[0]
        ratios = {"evolve/scratch cold": rows["evolve cold"] / rows["scratch cold"],
                  "evolve/scratch cached": rows["evolve cached"] / rows["scratch cached"]}
        for k, v in rows.items():
            print(f"{k:<16} {v:8.1f} s")
        for k, v in ratios.items():
            print(f"{k:<22} {v:6.2f}")
        print(json.dumps({"seconds": {k: round(v, 1) for k, v in rows.items()},
                          "ratios": {k: round(v, 2) for k, v in ratios.items()}}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
