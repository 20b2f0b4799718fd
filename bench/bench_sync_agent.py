#!/usr/bin/env python3
"""The sync agent's speed: incremental backup, whole-tree backup against plain rsync,
and the recovery point in watch mode.

    .venv/bin/python bench/bench_sync_agent.py [--rootfs DIR] [--skip-rootfs] [--samples 5]
                                               [--tools DIR]

Run as root (loop devices, mounts). The real `rootsync` runs against trees under
/var/tmp (ROOTSYNC_ROOT), never against this machine's `/`; the volume is a sparse
ext4 image on a loop device, as in the tests.

1. A tree of 30,000 files in 300 directories (about 176 MB, made once and kept in
   /var/tmp/bake-bench-sync-tree30k): the first backup, a whole-tree pass with one
   file changed (`rootsync backup`, rsync --link-dest), and an incremental backup of
   one changed file (`rootsync backup --changes`, the watch-mode path; target < 1 s).
2. A bookworm root tree: the demo image's root filesystem when a build of it is under
   output/ (copied once to /var/tmp/bake-bench-sync-rootfs-<sha>), else a minbase
   debootstrap of bookworm made once into /var/tmp/bake-bench-sync-bookworm from the
   host's own Debian mirror (read from /etc/apt/sources.list.d/debian.sources). Its
   first backup by rootsync, as MB/s, beside `rsync -a` and `rsync -aHAX --numeric-ids
   --sparse` of the same tree onto the same volume.
3. The recovery point in watch mode: `rootsync watch` on the 30,000-file tree; the time
   from a write to the moment a complete generation covers it (`covers_until` in
   `rootsync status --json`); target < 10 s.

--tools DIR puts DIR first on the PATH of the agent and of the plain rsync runs (e.g.
Lucid's rsync 3.0.7 and inotifywait 3.13 built from their sources; see the element's
README). Figures are wall-clock seconds of single runs (medians where several are taken) on a
shared machine: expect noise. It exits 0 after printing them, even when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.core import sh  # noqa: E402

AGENT = ROOT / "builder" / "elements" / "sync-agent" / "static" / "usr" / "sbin" / "rootsync"
TREE30K = Path("/var/tmp/bake-bench-sync-tree30k")
BOOKWORM = Path("/var/tmp/bake-bench-sync-bookworm")
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
TOOLS = ""  # --tools DIR + ":"


# --- the agent ---------------------------------------------------------------------------

class Agent:
    """rootsync pointed at one root tree and one volume mount point."""

    def __init__(self, work: Path, root: Path, mount_point: Path, label: str, debounce: int = 2):
        self.work, self.root, self.mount_point, self.label = work, root, mount_point, label
        self.conf = work / "rootsync.conf"
        self.run_dir = work / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"label={label}\nmount_point={mount_point}\ndebounce={debounce}\n"
                             "generations=20\non_attach=report\n")

    def env(self) -> dict[str, str]:
        assert str(self.root) not in ("", "/")
        return {"PATH": TOOLS + "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "ROOTSYNC_CONF": str(self.conf),
                "ROOTSYNC_ROOT": str(self.root), "ROOTSYNC_RUN_DIR": str(self.run_dir), "ROOTSYNC_SYSLOG": "no"}

    def run(self, *args: str) -> tuple[float, str]:
        t = time.monotonic()
        r = sh.run([str(AGENT), *args], env=self.env(), timeout=3600, what=f"rootsync {args[0]}", quiet=True)
        return time.monotonic() - t, r.output

    def status(self) -> dict:
        return json.loads(sh.run([str(AGENT), "status", "--json"], env=self.env(), quiet=True).output.splitlines()[-1])

    def current_info(self) -> dict:
        st = self.status()
        return next(g for g in st["generations"] if g["current"])


@contextlib.contextmanager
def volume(work: Path, name: str, size_gib: int, label: str) -> Iterator[Path]:
    image = work / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size_gib << 30)
    sh.run(["mkfs.ext4", "-q", "-F", "-L", label, str(image)], quiet=True)
    mp = work / f"{name}-mnt"
    mp.mkdir()
    with sh.loop_device(image) as dev, sh.mount(dev, mp):
        yield mp


def timed(argv: list[str]) -> float:
    t = time.monotonic()
    sh.run(argv, timeout=3600, quiet=True, extra_env={"PATH": TOOLS + os.environ.get("PATH", "/usr/bin:/bin")})
    return time.monotonic() - t


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, n))
                total += st.st_size
    return total


# --- trees -------------------------------------------------------------------------------

def tree30k() -> Path:
    """300 directories of 100 files, sizes spread around 6 KB (about 176 MB); made once."""
    done = TREE30K / ".complete"
    if done.exists():
        return TREE30K
    print(f"making {TREE30K} (30,000 files, once)", flush=True)
    shutil.rmtree(TREE30K, ignore_errors=True)
    data = os.urandom(1 << 20)
    for d in range(300):
        dd = TREE30K / f"d{d:03}"
        dd.mkdir(parents=True)
        for i in range(100):
            size = 200 + ((d * 100 + i) * 7919) % 11500
            off = (d * 131 + i * 977) % ((1 << 20) - size)
            (dd / f"f{i:03}").write_bytes(data[off:off + size])
    done.write_text("")
    return TREE30K


def debian_mirror() -> str:
    for line in DEBIAN_SOURCES.read_text().splitlines():
        if line.startswith("URIs:"):
            for uri in line.split()[1:]:
                if "security" not in uri:
                    return uri
    raise SystemExit(f"no Debian mirror in {DEBIAN_SOURCES}")


def demo_image() -> Path | None:
    """The newest filesystem image of a bookworm build under output/."""
    found = []
    for bj in (ROOT / "output").glob("*/*/build.json"):
        with contextlib.suppress(Exception):
            b = json.loads(bj.read_text())
            img = bj.parent / b["outputs"]["image"]["path"]
            if img.is_file():
                found.append((bj.stat().st_mtime, img, b["outputs"]["image"]["sha256"]))
    if not found:
        return None
    found.sort()
    return found[-1][1]


def bookworm_root(explicit: Path | None) -> tuple[Path, str]:
    if explicit:
        return explicit, f"{explicit} (given)"
    img = demo_image()
    if img is not None:
        digest = sh.output(["sha256sum", str(img)]).split()[0][:16]
        cache = Path(f"/var/tmp/bake-bench-sync-rootfs-{digest}")
        if not (cache / ".complete").exists():
            print(f"copying the root filesystem of {img} to {cache} (once)", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            with tempfile.TemporaryDirectory(dir="/var/tmp") as mnt, sh.loop_device(img, read_only=True) as dev, \
                    sh.mount(dev, mnt, options="ro,noload"):
                sh.run(["rsync", "-aHAX", "--numeric-ids", "--sparse", f"{mnt}/", f"{cache}/"], timeout=3600, quiet=True)
            (cache / ".complete").write_text(str(img) + "\n")
        return cache, f"root filesystem of {img.relative_to(ROOT)}"
    if not (BOOKWORM / ".complete").exists():
        mirror = debian_mirror()
        print(f"debootstrap --variant=minbase bookworm {BOOKWORM} {mirror} (once)", flush=True)
        shutil.rmtree(BOOKWORM, ignore_errors=True)
        sh.run(["debootstrap", "--variant=minbase", "bookworm", str(BOOKWORM), mirror], timeout=3600, quiet=True)
        (BOOKWORM / ".complete").write_text("")
    return BOOKWORM, "minbase debootstrap of bookworm"


# --- the three measurements --------------------------------------------------------------

def bench_30k(work: Path, samples: int) -> dict:
    tree = tree30k()
    out: dict = {}
    with volume(work, "vol30k", 2, "bench30k") as mp:
        agent = Agent(work / "a30k", tree, mp, "bench30k")
        out["first"], _ = agent.run("attach")
        target = tree / "d150/f050"
        target.write_bytes(os.urandom(4000))
        out["whole_tree"], text = agent.run("backup")
        out["whole_tree_files"] = agent.current_info()["files"]
        incs, internal = [], []
        for i in range(samples):
            target.write_bytes(os.urandom(4000 + i))
            events = work / "events"
            events.write_text(f"CLOSE_WRITE,CLOSE {target}\n")
            secs, text = agent.run("backup", "--changes", str(events))
            assert "kind=incremental" in text, text
            incs.append(secs)
            internal.append(agent.current_info()["seconds"])
        out["incremental"] = incs
        out["incremental_internal"] = internal
        plain = mp / "plain"
        out["plain_rsync"] = timed(["rsync", "-a", f"{tree}/", f"{plain}/"])
        # The watch-mode recovery point, on the same tree and volume.
        out["recovery"] = recovery_points(agent, tree, samples)
    return out


def recovery_points(agent: Agent, tree: Path, samples: int) -> list[float]:
    env = agent.env()
    log = open(agent.work / "watch.log", "wb")
    proc = subprocess.Popen([str(AGENT), "watch"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        first = agent.status()["current"]
        deadline = time.monotonic() + 600
        while True:
            st = agent.status()
            if st["watcher"]["running"] and st["current"] != first:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the watcher did not start: " + (agent.work / "watch.log").read_text()[-500:])
            time.sleep(0.2)
        points = []
        for i in range(samples):
            time.sleep(1.5)
            t = time.time()
            (tree / f"d{(i * 37) % 300:03}" / "f010").write_bytes(os.urandom(3000 + i))
            while True:
                info = agent.current_info()
                if (info.get("covers_until") or 0) > t:
                    points.append(time.time() - t)
                    break
                if time.time() - t > 120:
                    raise SystemExit("no generation covered a write within 120 s")
                time.sleep(0.05)
        return points
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        log.close()


def bench_rootfs(work: Path, explicit: Path | None) -> dict:
    root, what = bookworm_root(explicit)
    size = tree_bytes(root)
    files = sum(len(f) + len(d) for _, d, f in os.walk(root))
    out = {"what": what, "bytes": size, "entries": files}
    with volume(work, "volroot", 4, "benchroot") as mp:
        out["rsync_a"] = timed(["rsync", "-a", f"{root}/", f"{mp}/plain-a/"])
        out["rsync_aHAX"] = timed(["rsync", "-aHAX", "--numeric-ids", "--sparse", f"{root}/", f"{mp}/plain-ahax/"])
        shutil.rmtree(mp / "plain-a")
        shutil.rmtree(mp / "plain-ahax")
        sh.run(["sync", "-f", str(mp)], quiet=True)
        # rootsync makes its copy durable (syncfs) before publishing it; so does this one.
        t = time.monotonic()
        sh.run(["rsync", "-aHAX", "--numeric-ids", "--sparse", f"{root}/", f"{mp}/plain-sync/"], timeout=3600,
               quiet=True, extra_env={"PATH": TOOLS + os.environ.get("PATH", "/usr/bin:/bin")})
        sh.run(["sync", "-f", str(mp)], quiet=True)
        out["rsync_aHAX_sync"] = time.monotonic() - t
        shutil.rmtree(mp / "plain-sync")
        sh.run(["sync", "-f", str(mp)], quiet=True)
    # The agent gets a fresh volume of its own, made the same way.
    with volume(work, "volagent", 4, "benchagent") as mp:
        agent = Agent(work / "aroot", root, mp, "benchagent")
        out["rootsync"], _ = agent.run("attach")
        out["rootsync_internal"] = agent.current_info()["seconds"]
        out["rootsync_bytes"] = agent.current_info()["total_bytes"]
    return out


def _term_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rootfs", type=Path, help="a root tree to use for part 2 instead of the demo image's")
    ap.add_argument("--skip-rootfs", action="store_true", help="skip part 2")
    ap.add_argument("--samples", type=int, default=5, help="incremental backups and recovery points measured")
    ap.add_argument("--tools", type=Path, help="a directory of rsync/inotifywait to use first (e.g. Lucid's)")
    args = ap.parse_args()
    # a TERM unwinds like Ctrl-C, so mounts, loop devices and QEMU are undone
    signal.signal(signal.SIGTERM, _term_as_interrupt)
    global TOOLS
    if args.tools:
        TOOLS = str(args.tools.resolve()) + ":"
    if os.geteuid() != 0:
        raise SystemExit("run as root (loop devices and mounts)")
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="bake-bench-sync-") as tmp:
        work = Path(tmp)
        r30 = bench_30k(work, args.samples)
        rfs = None if args.skip_rootfs else bench_rootfs(work, args.rootfs)

    med = statistics.median
    print()
    if TOOLS:
        v = sh.run(["rsync", "--version"], extra_env={"PATH": TOOLS + "/usr/bin:/bin"}, quiet=True).output.splitlines()[0]
        print(f"tools from {TOOLS[:-1]}: {v.strip()}")
    print("1. 30,000 files in 300 directories (176 MB), one file changed")
    print(f"   first backup (rootsync attach: pair + whole tree)   {r30['first']:7.2f} s")
    print(f"   plain rsync -a of the tree (for scale)                {r30['plain_rsync']:7.2f} s")
    print(f"   whole-tree pass, rootsync backup (--link-dest)        {r30['whole_tree']:7.2f} s"
          f"   files copied: {r30['whole_tree_files']}")
    inc = r30["incremental"]
    print(f"   incremental, rootsync backup --changes (watch path)   {med(inc):7.2f} s median of {len(inc)}"
          f" (min {min(inc):.2f}, max {max(inc):.2f}; agent's own timing {med(r30['incremental_internal']):.2f} s)"
          f"   target < 1 s: {'met' if med(inc) < 1 else 'MISSED'}")
    rp = r30["recovery"]
    print()
    print("3. recovery point in watch mode (debounce 2 s, the default), write -> in a complete generation")
    print(f"   {med(rp):.2f} s median of {len(rp)} (min {min(rp):.2f}, max {max(rp):.2f})"
          f"   target < 10 s: {'met' if max(rp) < 10 else 'MISSED'}")
    if rfs:
        mb = rfs["bytes"] / 1e6
        print()
        print(f"2. whole backup of a bookworm root: {rfs['what']}")
        print(f"   {rfs['entries']} entries, {mb:.0f} MB (apparent size)")
        for label, key in (("rsync -a", "rsync_a"), ("rsync -aHAX --numeric-ids --sparse", "rsync_aHAX"),
                           ("the same, then sync -f (durable, as rootsync)", "rsync_aHAX_sync"),
                           ("rootsync attach (pair + first whole tree)", "rootsync")):
            print(f"   {label:46s} {rfs[key]:7.2f} s  {mb / rfs[key]:7.1f} MB/s")
        print(f"   (rootsync's own timing, start of the copy to the copy flushed: {rfs['rootsync_internal']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
