#!/usr/bin/env python3
"""Boot-to-ready time of a baked image under QEMU, and the wall time of a whole local
verification.

    .venv/bin/python bench/bench_verify.py [BUILD_DIR] [--boots N] [--skip-verify] [--user NAME]

BUILD_DIR defaults to the newest build of recipes/debian-demo.yml under output/ (a
build with kernel, ramdisk and image). Run as root.

  probe     whether KVM boots the build's kernel here (the probe the verification uses);
  boot      power-on (QEMU started) to the image's `bake-ready` line on the serial
            console, for an m1.small instance (256 MiB, 1 CPU) booted as the node
            controller boots it, N times under TCG and N times under KVM when the probe
            says KVM works (otherwise the output says KVM was not available);
  phases    where each boot's time went, from the kernel's timestamps on the console:
            firmware (QEMU start to the kernel's clock starting: power-on to ready
            minus the guest's uptime), kernel (to `Run /init`), initramfs (to systemd's
            banner), userspace (to the ready line); and under TCG how much guest code
            QEMU translated for the boot (`info jit`: blocks and bytes of host code);
  verify    the wall time of `verify(build)` on a copy of the build: both instances,
            hot-plug, the agent's backup and restore, as `bake verify` runs them.

Targets (TCG, on the 2-core build machines): boot-to-ready under 15 s; the whole
verification under 4 minutes. Exits 0 after printing, even when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder import vm  # noqa: E402
from builder.core.record import Build  # noqa: E402

BOOT_TARGET = 15.0
VERIFY_TARGET = 240.0


def newest_demo_build() -> Path | None:
    found = []
    for rec in (REPO / "output").glob("**/build.json"):
        try:
            data = json.loads(rec.read_text())
        except ValueError:
            continue
        outs = data.get("outputs", {})
        if all(r in outs for r in ("kernel", "ramdisk", "image")) and \
                data.get("recipe", {}).get("name", "").startswith("debian-demo"):
            found.append((rec.stat().st_mtime, rec.parent))
    return max(found)[1] if found else None


STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]")
INIT = re.compile(r"Run /init as init process")
SYSTEMD = re.compile(r"systemd\[1\]: systemd \d+")
JIT = {"blocks": re.compile(r"TB count\s+(\d+)"), "code": re.compile(r"gen code size\s+(\d+)")}


def phases(lines: list[str], ready: vm.Ready) -> dict[str, float | None]:
    """Split a boot at the kernel's `Run /init` and systemd's banner (kernel timestamps
    on the console; None where a line is missing)."""
    def stamp(rx: re.Pattern) -> float | None:
        for line in lines:
            m = STAMP.match(line)
            if m and rx.search(line):
                return float(m.group(1))
        return None

    init, systemd = stamp(INIT), stamp(SYSTEMD)
    return {
        "firmware": round(ready.seconds - ready.uptime, 1),
        "kernel": round(init, 1) if init is not None else None,
        "initramfs": round(systemd - init, 1) if init is not None and systemd is not None else None,
        "userspace": round(ready.uptime - systemd, 1) if systemd is not None else None,
    }


def translated(inst: vm.Instance) -> dict[str, int]:
    """How much guest code TCG translated so far: blocks, and MiB of host code."""
    out = inst.qmp.execute("human-monitor-command", {"command-line": "info jit"})
    found = {k: rx.search(out) for k, rx in JIT.items()}
    return {"blocks": int(found["blocks"].group(1)) if found["blocks"] else -1,
            "code_mib": int(found["code"].group(1)) >> 20 if found["code"] else -1}


def boot_once(build: Build, accel: vm.Accel, workdir: Path, user: str) -> dict:
    trio = vm.Trio.from_build(build)
    base = vm.node_disk(trio.image, build.dir / "vm" / "disk-m1.small.raw", vm.instance_type("m1.small"))
    key, pub = vm.make_keypair(workdir)
    try:
        with vm.launch(trio, base, workdir, name=f"bench-{accel.name}", accel=accel, ssh_public_key=pub,
                       ssh_key=key, ssh_user=user) as inst:
            ready = inst.wait_ready(timeout=300)
            boot = {"seconds": ready.seconds, "phases": phases(inst.console.lines(), ready)}
            if accel.name == "tcg":
                boot["translated"] = translated(inst)
            return boot
    finally:
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)


def describe(boot: dict) -> str:
    ph = ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} ?" for k, v in boot["phases"].items())
    tr = boot.get("translated")
    jit = f"; translated {tr['blocks']} blocks, {tr['code_mib']} MiB of host code" if tr else ""
    return f"{boot['seconds']:.1f} s ({ph}){jit}"


def copy_of(build: Build, root: Path) -> Build:
    d = root / "build"
    d.mkdir()
    data = {k: v for k, v in build.data.items() if k not in ("verify", "result", "error")}
    for role in ("kernel", "ramdisk", "image"):
        src = build.output_path(role)
        os.link(src, d / src.name) if src.stat().st_dev == d.stat().st_dev else shutil.copyfile(src, d / src.name)
        data["outputs"][role] = dict(data["outputs"][role], path=src.name)
    (d / "build.json").write_text(json.dumps(data))
    return Build.load(d)


def _term_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build_dir", nargs="?")
    ap.add_argument("--boots", type=int, default=2, help="boots per accelerator (default 2)")
    ap.add_argument("--skip-verify", action="store_true", help="only the boot times")
    ap.add_argument("--user", help="the image's default user (default: the recipe's first user)")
    args = ap.parse_args()
    # a TERM unwinds like Ctrl-C, so mounts, loop devices and QEMU are undone
    signal.signal(signal.SIGTERM, _term_as_interrupt)

    bdir = Path(args.build_dir) if args.build_dir else newest_demo_build()
    if bdir is None:
        print("bench_verify: no demo build under output/; bake recipes/debian-demo.yml first or name a build",
              file=sys.stderr)
        return 2
    build = Build.load(bdir)
    from builder.verify import recipe_of, render_table, verify

    recipe = recipe_of(build)
    user = args.user or (recipe.default_user if recipe else "") or "root"
    trio = vm.Trio.from_build(build)
    print(f"build: {build.dir}")
    print(f"image: {trio.image.stat().st_size / 2**20:.0f} MiB; host: {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")

    os.environ.pop("BAKE_ACCEL", None)
    t = time.monotonic()
    probed = vm.choose_accel(trio.kernel, trio.ramdisk)
    print(f"probe: {probed.name.upper()} ({probed.reason}; {time.monotonic() - t:.1f} s, cached per machine)")

    figures: dict[str, object] = {"kvm": None, "tcg": None}
    with tempfile.TemporaryDirectory(prefix="bench-verify-", dir=build.dir) as tmp:
        for name in ("tcg", "kvm"):
            if name == "kvm" and probed.name != "kvm":
                print("boot KVM: not available here (the probe boot under KVM did not reach init)")
                continue
            accel = vm.Accel(name, "benchmark")
            boots = [boot_once(build, accel, Path(tmp), user) for _ in range(args.boots)]
            for i, boot in enumerate(boots, 1):
                print(f"boot {name.upper()} {i}: {describe(boot)}")
            times = [b["seconds"] for b in boots]
            figures[name] = boots
            verdict = "" if name == "kvm" else (" (target < 15 s: met)" if statistics.median(times) < BOOT_TARGET
                                                else " (target < 15 s: MISSED)")
            print(f"boot {name.upper()}: power-on to ready " + ", ".join(f"{x:.1f} s" for x in times)
                  + f"; median {statistics.median(times):.1f} s{verdict}")

    if not args.skip_verify:
        with tempfile.TemporaryDirectory(prefix="bench-verify-", dir=build.dir.parent) as tmp:
            copy = copy_of(build, Path(tmp))
            t = time.monotonic()
            report = verify(copy, recipe=recipe, user=user, accel=probed)
            wall = time.monotonic() - t
        print(render_table(report))
        verdict = "met" if wall < VERIFY_TARGET else "MISSED"
        print(f"verify: whole local verification {wall:.0f} s under {probed.name.upper()} "
              f"(target < 240 s: {verdict}); result {report.result}")
        figures["verify_seconds"] = round(wall, 1)
        figures["verify_result"] = report.result
    print(json.dumps({"accelerator": probed.name, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
