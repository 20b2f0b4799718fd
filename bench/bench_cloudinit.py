#!/usr/bin/env python3
"""What cloud-init costs at boot under TCG: the demo image against the cloud-init image
(tests/recipes/dib-bookworm.yml: DIB's cloud-init with the Ec2 datasource), booted
alternately with the same QEMU line (m1.small, the node's disk layout, the same
accelerator), each served the same kind of metadata.

    .venv/bin/python bench/bench_cloudinit.py [--demo BUILD_DIR] [--cloud-init BUILD_DIR] [--boots N]

Build folders default to the newest builds of debian-demo and dib-bookworm under
output/; a missing dib-bookworm build is baked first (`bake build --stop-after image`,
with a throw-away key for its devuser). Run as root.

For each boot: power-on to the image's `bake-ready` line, and for the cloud-init image
also to cloud-init's `finished` line (its last stage, cloud-final: user data has run,
the key is installed) and the guest uptime cloud-init reports there. Prints the
medians and the ratios cloud-init image / demo image. Exits 0 after printing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder import vm  # noqa: E402
from builder.core.record import Build  # noqa: E402

FINISHED = re.compile(r"Cloud-init v\. \S+ finished at .* Up (?P<up>[\d.]+) seconds")


def newest(name: str) -> Path | None:
    found = []
    for rec in (REPO / "output").glob("**/build.json"):
        try:
            data = json.loads(rec.read_text())
        except ValueError:
            continue
        outs = data.get("outputs", {})
        if data.get("recipe", {}).get("name") == name and all(r in outs for r in ("kernel", "ramdisk", "image")):
            found.append((rec.stat().st_mtime, rec.parent))
    return max(found)[1] if found else None


def bake_cloud_init(tmp: Path) -> Path:
    key, pub = vm.make_keypair(tmp, "ops")
    (tmp / "ops.pub").write_text(pub + "\n")
    out = REPO / "output" / "bench-cloudinit"
    env = {**os.environ, "BAKE_TEST_OPS_KEYS": str(tmp / "ops.pub")}
    print("baking tests/recipes/dib-bookworm.yml (no build of it under output/) ...", flush=True)
    subprocess.run([str(Path(sys.executable).parent / "bake"), "build", str(REPO / "tests/recipes/dib-bookworm.yml"),
                    "--stop-after", "image", "--output", str(out)], check=True, env=env)
    return newest("dib-bookworm")


def boot(build: Build, accel: vm.Accel, work: Path, *, cloud_init: bool) -> dict:
    trio = vm.Trio.from_build(build)
    disk = vm.node_disk(trio.image, build.dir / "vm" / "disk-m1.small.raw", vm.instance_type("m1.small"))
    key, pub = vm.make_keypair(work, f"k{len(list(work.iterdir()))}")
    with vm.launch(trio, disk, work, name="bench", accel=accel, ssh_public_key=pub, ssh_key=key,
                   ssh_user="root") as inst:
        ready = inst.wait_ready(timeout=600)
        out = {"ready": ready.seconds}
        if cloud_init:
            m = inst.console.wait_for(FINISHED, timeout=600, what="cloud-init's finished line")
            out["finished_uptime"] = float(m.group("up"))
            # power-on to the line: the firmware's share (power-on to ready minus the guest's
            # uptime then) plus the guest's uptime cloud-init reports at the line
            out["finished"] = round(ready.seconds - ready.uptime + out["finished_uptime"], 1)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo")
    ap.add_argument("--cloud-init", dest="cloud_init")
    ap.add_argument("--boots", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cloudinit-") as t:
        tmp = Path(t)
        demo_dir = Path(a.demo) if a.demo else newest("debian-demo")
        if demo_dir is None:
            print("no debian-demo build under output/: bake recipes/debian-demo.yml first", file=sys.stderr)
            return 2
        ci_dir = Path(a.cloud_init) if a.cloud_init else (newest("dib-bookworm") or bake_cloud_init(tmp))
        demo, ci = Build.load(demo_dir), Build.load(ci_dir)
        trio = vm.Trio.from_build(demo)
        accel = vm.choose_accel(trio.kernel, trio.ramdisk)
        print(f"accelerator: {accel.name.upper()} ({accel.reason})")
        print(f"demo:       {demo.dir}\ncloud-init: {ci.dir}")
        runs: dict[str, list[dict]] = {"demo": [], "cloud-init": []}
        for i in range(a.boots):
            for name, build in (("demo", demo), ("cloud-init", ci)):
                work = tmp / f"{name}-{i}"
                work.mkdir()
                r = boot(build, accel, work, cloud_init=name == "cloud-init")
                runs[name].append(r)
                extra = (f", cloud-init finished {r['finished']:.1f} s (guest uptime {r['finished_uptime']:.1f} s)"
                         if "finished" in r else "")
                print(f"  boot {i + 1} {name:<10}: power-on to ready {r['ready']:.1f} s{extra}", flush=True)
        d_ready = statistics.median(r["ready"] for r in runs["demo"])
        c_ready = statistics.median(r["ready"] for r in runs["cloud-init"])
        c_done = statistics.median(r["finished"] for r in runs["cloud-init"])
        print(f"median power-on to ready: demo {d_ready:.1f} s, cloud-init image {c_ready:.1f} s "
              f"(ratio {c_ready / d_ready:.2f})")
        print(f"median power-on to cloud-init finished: {c_done:.1f} s (ratio to the demo's ready {c_done / d_ready:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
