#!/usr/bin/env python3
"""Build time, peak memory and image size of a bake, against diskimage-builder.

    .venv/bin/python bench/bench_build.py [--skip-dib] [--skip-bake] [--no-dib-cached]
                                          [--dib-venv /var/tmp/bake-bench-dib-venv]
                                          [--dir /var/tmp] [--keep]

Run as root (bake and diskimage-builder both chroot). In one run, on one machine:

bake, `bake build RECIPE --output DIR --stop-after image` on the demo recipe
(recipes/debian-demo.yml), three ways:
  cold   BAKE_CACHE is a new empty folder: debootstrap, package installation, hooks, image;
  warm   the same cache again: the base tree and the package checkpoint are cached;
  hook   the same cache, with a copy of the acpiphp element whose install.d hook has
         one more line, found first through BAKE_ELEMENTS_PATH: only the part after
         the package checkpoint runs again.
When the recipe names an element that is not in elements/ yet (`bake validate` says so),
a copy of the recipe without that element is baked instead, and the output says so.

diskimage-builder, from PyPI into its own virtualenv (kept between runs for reuse),
`disk-image-create -t raw debian-minimal baremetal` for the same release (bookworm) from
the same mirror (the host's own Debian source, read from its apt configuration):
  cold   an empty DIB_IMAGE_CACHE, saving its debootstrap tarball (DIB_DEBOOTSTRAP_CACHE=1,
         as bake saves its base tree in its cold run);
  cached the same image cache, using that tarball (DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE=1).
`baremetal` without `vm` makes a bare filesystem image (no partition table) plus the
kernel and ramdisk: the same trio bake makes, and no kpartx/device-mapper needed.

Each build runs as a child of a small wrapper process. Figures:
  wall     seconds from start to exit;
  peak     the largest sum, over the samples (every 0.2 s), of the resident memory
           (VmRSS from /proc/PID/status) of every process in the build's tree, plus the
           space used on tmpfs mounts under the build's temporary folder (diskimage-builder
           builds its root tree in a tmpfs, which is memory no process's RSS shows);
  max-proc the largest resident memory of any single process of the tree, from the
           wrapper's getrusage(RUSAGE_CHILDREN).ru_maxrss (exact, no sampling);
  image    the apparent size of the filesystem image (the kernel and ramdisk are printed
           beside it).

It exits 0 after printing the table, even when a target is missed; a build that fails
stops the benchmark with its error and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.core import sh  # noqa: E402

BAKE = ROOT / ".venv" / "bin" / "bake"
RECIPE = ROOT / "recipes" / "debian-demo.yml"
HOOK_ELEMENT = "acpiphp"
HOOK_MARK = "bake-note: install.d hook changed by the build benchmark"
DIB_VENV = Path("/var/tmp/bake-bench-dib-venv")
DIB_RELEASE = "bookworm"
DIB_ELEMENTS = ["debian-minimal", "baremetal"]
# Host packages diskimage-builder calls for this build (checked with dpkg-query, the
# missing ones installed with apt-get): sudo runs every privileged step, debootstrap makes
# the base, util-linux has losetup/mount/fstrim, e2fsprogs mkfs.ext4, python3-venv makes
# its virtualenv. kpartx, gdisk (sgdisk), squashfs-tools and qemu-utils are only for
# partitioned (`vm`) images, GPT, squashfs and qcow2 output: not needed here.
DIB_HOST_PACKAGES = ["sudo", "debootstrap", "util-linux", "e2fsprogs", "procps", "python3-venv"]
SOURCES = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]

MiB = 1024 * 1024
TARGET_COLD_RATIO = 0.6
TARGET_HOOK_SECONDS = 25.0

# Runs the build, then reports the largest single-process RSS of everything it waited for.
# An interrupt reaches the build's whole process group (as Ctrl-C would): the wrapper
# only goes on waiting for the build to clean up and exit.
WRAPPER = textwrap.dedent("""
    import resource, subprocess, sys
    out = sys.argv[1]
    p = subprocess.Popen(sys.argv[2:])
    while True:
        try:
            rc = p.wait()
            break
        except KeyboardInterrupt:
            pass
    with open(out, "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    sys.exit(rc)
""")


class BenchError(Exception):
    """A build or a setup step failed: the benchmark stops loudly."""


SETUP: list[str] = []   # what the run set up and used, repeated beside the table


def say(msg: str = "") -> None:
    print(msg, flush=True)


# --- measuring ----------------------------------------------------------------------------

@dataclass
class Result:
    tool: str
    scenario: str
    wall: float
    peak_mib: float
    max_proc_mib: float
    image_mib: float = 0.0
    details: dict[str, str] = field(default_factory=dict)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss_kib(top: int, skip: int) -> int:
    kids = _children_map()
    total, todo = 0, [top]
    while todo:
        pid = todo.pop()
        if pid != skip:
            total += _rss_kib(pid)
        todo.extend(kids.get(pid, []))
    return total


def mounts_under(folder: Path) -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount at or under `folder`, deepest first."""
    out = []
    base = str(folder).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4].replace("\\040", " ")
            fstype = parts[parts.index("-") + 1]
            if (mp + "/").startswith(base):
                out.append((mp, fstype))
    return sorted(out, key=lambda m: m[0].count("/"), reverse=True)


def _tmpfs_used_kib(folder: Path | None) -> int:
    if folder is None:
        return 0
    total = 0
    for mp, fstype in mounts_under(folder):
        if fstype == "tmpfs":
            try:
                st = os.statvfs(mp)
                total += (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
            except OSError:
                pass
    return total


def measure(argv: list[str], env: dict[str, str], log: Path, tmpfs_under: Path | None = None,
            interval: float = 0.2) -> tuple[float, float, float, int, str]:
    """Run `argv`; (wall s, peak MiB of the tree + tmpfs, max single-process MiB, exit code,
    the peak's parts). Its stdout and stderr go to `log`."""
    with tempfile.NamedTemporaryFile(prefix="bench-rusage-", delete=False) as t:
        rusage_file = t.name
    peak = peak_rss = peak_tmpfs = 0
    try:
        with open(log, "w") as logf:
            start = time.monotonic()
            # Its own session: a Ctrl-C here is passed on once, by interrupt() below.
            p = subprocess.Popen([sys.executable, "-c", WRAPPER, rusage_file, *argv], env=env,
                                 stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            try:
                while p.poll() is None:
                    rss, shm = _tree_rss_kib(p.pid, skip=p.pid), _tmpfs_used_kib(tmpfs_under)
                    peak, peak_rss, peak_tmpfs = max(peak, rss + shm), max(peak_rss, rss), max(peak_tmpfs, shm)
                    time.sleep(interval)
            except BaseException:
                interrupt(p)
                raise
            wall = time.monotonic() - start
        maxproc = int(Path(rusage_file).read_text() or 0)
    finally:
        os.unlink(rusage_file)
    parts = f"largest sampled tree RSS {peak_rss / 1024:.0f} MiB, largest tmpfs use {peak_tmpfs / 1024:.0f} MiB"
    return wall, peak / 1024, maxproc / 1024, p.returncode, parts


def interrupt(p: subprocess.Popen, grace: float = 120) -> None:
    """SIGINT to the build's process group, as Ctrl-C would send; SIGKILL after `grace`
    seconds if it has not exited by then (what it left is then undone by clean_leftovers)."""
    try:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --- host setup ---------------------------------------------------------------------------

def missing_packages(names: list[str]) -> list[str]:
    missing = []
    for n in names:
        r = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", n], capture_output=True, text=True)
        if r.returncode != 0 or not r.stdout.startswith("ii"):
            missing.append(n)
    return missing


def apt_install(names: list[str]) -> list[str]:
    """Install the missing ones of `names`; returns what was installed."""
    missing = missing_packages(names)
    if not missing:
        return []
    say(f"  installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                           env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"apt-get install {' '.join(missing)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    still = missing_packages(missing)
    if still:
        raise BenchError(f"still missing after apt-get install: {' '.join(still)}")
    return missing


def host_mirrors() -> tuple[str, str]:
    """(main mirror, security mirror) of this host's Debian apt source. The security
    mirror is the main mirror's host with the debian-security path (Debian mirrors
    serve both)."""
    main = None
    for src in SOURCES:
        if not src.is_file():
            continue
        text = src.read_text()
        if src.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.strip()
                suites = fields.get("suites", "").split()
                if fields.get("uris") and any(not s.endswith("-security") for s in suites):
                    main = fields["uris"].split()[0]
                    break
        else:
            for line in text.splitlines():
                w = line.split()
                uris = [i for i, x in enumerate(w) if "://" in x]
                if w and w[0] == "deb" and uris and len(w) > uris[0] + 1 \
                        and not w[uris[0] + 1].endswith("-security"):
                    main = w[uris[0]]
                    break
        if main:
            break
    if not main:
        raise BenchError("no Debian mirror in this host's apt configuration (" + ", ".join(map(str, SOURCES)) + ")")
    u = urlsplit(main)
    return main.rstrip("/"), f"{u.scheme}://{u.netloc}/debian-security"


def dib_venv(venv: Path) -> str:
    """Make (or reuse) the virtualenv with diskimage-builder; returns its version."""
    exe = venv / "bin" / "disk-image-create"
    if exe.exists():
        say(f"  reusing diskimage-builder's virtualenv {venv}")
    else:
        say(f"  creating diskimage-builder's virtualenv {venv} (pip install diskimage-builder)")
        shutil.rmtree(venv, ignore_errors=True)
        py = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        for argv in ([py, "-m", "venv", str(venv)],
                     [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "diskimage-builder"]):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    r = subprocess.run([str(venv / "bin" / "pip"), "show", "diskimage-builder"], capture_output=True, text=True)
    version = next((line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("Version:")), "?")
    return version


def clean_leftovers(folder: Path) -> list[str]:
    """Kill processes whose root is under `folder`, unmount whatever is mounted under it,
    and detach loop devices backed by files under it; returns what was done."""
    done = [f"ended process {pid} (root under {folder})" for pid in sh.kill_chroot_processes(folder)]
    mounted = sh.mounts_under(folder)
    sh.unmount_all_under(folder)
    done += [f"unmounted {mp}" for mp in mounted]
    base = str(folder).rstrip("/") + "/"
    r = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        for dev in json.loads(r.stdout).get("loopdevices", []):
            if (dev.get("back-file") or "").startswith(base):
                subprocess.run(["losetup", "-d", dev["name"]], capture_output=True)
                done.append(f"detached {dev['name']} ({dev['back-file']})")
    return done


def measure_and_clean(argv: list[str], env: dict, log: Path, work: Path, who: str):
    """`measure` a build whose files are under `work`, then undo whatever it left there."""
    try:
        return measure(argv, env, log, tmpfs_under=work)
    finally:
        left = clean_leftovers(work)
        if left:
            say(f"  {who} left behind (now undone): " + "; ".join(left))


# --- diskimage-builder --------------------------------------------------------------------

def run_dib(tmp: Path, venv: Path, cached_too: bool) -> list[Result]:
    say("== diskimage-builder")
    installed = apt_install(DIB_HOST_PACKAGES)
    say(f"  host packages installed by this run: {' '.join(installed) if installed else 'none (all present)'}")
    SETUP.append(f"diskimage-builder's host packages installed by this run: "
                 f"{' '.join(installed) if installed else 'none (all present)'}")
    version = dib_venv(venv)
    mirror, security = host_mirrors()
    say(f"  diskimage-builder {version}; mirror {mirror}, security mirror {security}")
    SETUP.append(f"diskimage-builder {version} in {venv}; DIB_RELEASE={DIB_RELEASE}, "
                 f"DIB_DISTRIBUTION_MIRROR={mirror}, DIB_DEBIAN_SECURITY_MIRROR={security}; "
                 f"disk-image-create -t raw {' '.join(DIB_ELEMENTS)}")
    cache = tmp / "dib-image-cache"
    cache.mkdir()
    results = []
    scenarios = [("cold", {"DIB_DEBOOTSTRAP_CACHE": "1"},
                  "empty image cache; debootstrap, then its tarball is saved (DIB_DEBOOTSTRAP_CACHE=1)")]
    if cached_too:
        scenarios.append(("cached", {"DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE": "1"},
                          "debootstrap tarball from the cold run (DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE=1)"))
    for name, extra, state in scenarios:
        work = tmp / f"dib-{name}"
        (work / "tmp").mkdir(parents=True)
        out = work / "out"
        out.mkdir()
        env = dict(os.environ)
        env.update({
            "PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "TMPDIR": str(work / "tmp"),             # its build dir (and its tmpfs) lives here
            "DIB_IMAGE_CACHE": str(cache),
            "DIB_RELEASE": DIB_RELEASE,
            "DIB_DISTRIBUTION_MIRROR": mirror,
            "DIB_DEBIAN_DISTRIBUTION_MIRROR": mirror,
            "DIB_DEBIAN_SECURITY_MIRROR": security,
        })
        env.update(extra)
        argv = [str(venv / "bin" / "disk-image-create"), "-t", "raw", "-o", str(out / "debian"), *DIB_ELEMENTS]
        log = tmp / f"dib-{name}.log"
        say(f"  {name}: {' '.join(f'{k}={v}' for k, v in extra.items())} disk-image-create -t raw "
            f"{' '.join(DIB_ELEMENTS)} ({state})")
        wall, peak, maxproc, rc, parts = measure_and_clean(argv, env, log, work, "diskimage-builder")
        if rc != 0:
            raise BenchError(f"disk-image-create ({name}) failed with exit {rc}; log {log}, last lines:\n{tail(log)}")
        image = out / "debian.raw"
        kernel, ramdisk = out / "debian.vmlinuz", out / "debian.initrd"
        for f in (image, kernel, ramdisk):
            if not f.is_file():
                raise BenchError(f"disk-image-create ({name}) exited 0 but made no {f.name}; outputs: "
                                 f"{sorted(p.name for p in out.iterdir())}; log tail:\n{tail(log)}")
        res = Result("dib", name, wall, peak, maxproc, image.stat().st_size / MiB,
                     {"cache": state, "memory": parts,
                      "outputs": f"{image.name} {image.stat().st_size / MiB:.0f} MiB "
                                 f"({image.stat().st_blocks * 512 / MiB:.0f} MiB allocated), {kernel.name} "
                                 f"{kernel.stat().st_size / MiB:.1f} MiB, {ramdisk.name} {ramdisk.stat().st_size / MiB:.1f} MiB",
                      "packages": _dib_packages(out, log)})
        say(f"    {wall:.1f} s, peak {peak:.0f} MiB (largest process {maxproc:.0f} MiB); {res.details['outputs']}")
        results.append(res)
        shutil.rmtree(out, ignore_errors=True)
    return results


def _dib_packages(out: Path, log: Path) -> str:
    """How many packages the image has, from the dpkg manifest diskimage-builder saves
    beside the image (else from dpkg's 'Setting up' lines in its log)."""
    manifests = sorted(out.glob("*.d/dib-manifests/dib-manifest-dpkg-*"))
    if manifests:
        n = sum(1 for line in manifests[0].read_text(errors="replace").splitlines() if line.strip())
        return f"{n} installed in the image (its dpkg manifest)"
    try:
        n = sum(1 for line in log.read_text(errors="replace").splitlines() if "Setting up " in line)
    except OSError:
        return "?"
    return f"{n} 'Setting up' lines in its log (no dpkg manifest found)"


# --- bake ---------------------------------------------------------------------------------

def bake_recipe(tmp: Path) -> tuple[Path, str]:
    """The recipe to bake: the demo, or a copy without an element that is not there yet."""
    r = subprocess.run([str(BAKE), "validate", str(RECIPE)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode == 0:
        return RECIPE, f"{RECIPE.relative_to(ROOT)} as it is"
    err = (r.stderr or r.stdout).strip().splitlines()[0] if (r.stderr or r.stdout).strip() else "?"
    import re
    m = re.search(r"unknown element '([^']+)'", err)
    if not m:
        raise BenchError(f"bake validate {RECIPE} failed: {r.stderr or r.stdout}")
    missing = m.group(1)
    import yaml
    data = yaml.safe_load(RECIPE.read_text())
    data["elements"] = [e for e in data.get("elements") or []
                        if (e if isinstance(e, str) else e.get("name")) != missing]
    d = tmp / "recipe"
    d.mkdir()
    copy = d / RECIPE.name
    copy.write_text(f"# {RECIPE.relative_to(ROOT)} without element {missing!r}, not in elements/ yet\n"
                    + yaml.safe_dump(data, sort_keys=False))
    r = subprocess.run([str(BAKE), "validate", str(copy)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise BenchError(f"bake validate {copy} (the demo without {missing}) failed: {r.stderr or r.stdout}")
    return copy, (f"a copy of {RECIPE.relative_to(ROOT)} without element '{missing}' "
                  f"(bake validate: {err.split('error: ', 1)[-1]})")


def bake_plan(recipe: Path, env: dict[str, str], output: Path) -> dict:
    r = subprocess.run([str(BAKE), "plan", str(recipe), "--output", str(output), "--json"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise BenchError(f"bake plan failed: {r.stderr or r.stdout}")
    return json.loads(r.stdout)


def change_hook(elements_dir: Path) -> Path:
    """Copy HOOK_ELEMENT under `elements_dir` and add a harmless line to its first install.d
    hook (a note bake records in build.json, which also proves this copy was used)."""
    src = ROOT / "builder" / "elements" / HOOK_ELEMENT
    dst = elements_dir / HOOK_ELEMENT
    shutil.copytree(src, dst, symlinks=True)
    hooks = sorted((dst / "install.d").iterdir())
    if not hooks:
        raise BenchError(f"{src} has no install.d hook")
    hook = hooks[0]
    lines = hook.read_text().splitlines(keepends=True)
    at = 1 if lines and lines[0].startswith("#!") else 0
    lines.insert(at, f'echo "{HOOK_MARK}"\n')
    hook.write_text("".join(lines))
    return hook


def run_bake(tmp: Path) -> list[Result]:
    say("== bake")
    if not BAKE.exists():
        raise BenchError(f"{BAKE} not found: run scripts/setup first")
    recipe, what = bake_recipe(tmp)
    say(f"  recipe: {what}")
    SETUP.append(f"bake recipe: {what}; bake build RECIPE --output DIR --stop-after image")
    cache = tmp / "bake-cache"
    cache.mkdir()
    elements_dir = tmp / "bake-elements"
    elements_dir.mkdir()
    results = []
    for name in ("cold", "warm", "hook"):
        env = dict(os.environ, BAKE_CACHE=str(cache))
        env.pop("BAKE_ELEMENTS_PATH", None)
        env.pop("BAKE_MIRROR", None)
        changed = None
        if name == "hook":
            changed = change_hook(elements_dir)
            env["BAKE_ELEMENTS_PATH"] = str(elements_dir)
        out = tmp / f"bake-out-{name}"
        out.mkdir()
        plan = bake_plan(recipe, env, out)
        c = plan["cache"]
        state = (f"bootstrap {'hit' if c['bootstrap']['hit'] else 'miss'}, "
                 f"package checkpoint {'hit' if c['packages']['hit'] else 'miss'}")
        if name == "cold":
            say(f"  mirror {plan['mirror']}" + (f", security {plan['security_mirror']}" if plan.get("security_mirror") else ""))
        if changed:
            state += f"; {changed.relative_to(tmp)} changed (one line added), BAKE_ELEMENTS_PATH={elements_dir}"
        pkgs = f"{len(plan['packages'])} asked for beyond debootstrap --variant=minbase: " \
               + " ".join(p["name"] for p in plan["packages"])
        argv = [str(BAKE), "build", str(recipe), "--output", str(out), "--stop-after", "image"]
        log = tmp / f"bake-{name}.log"
        say(f"  {name}: {state}")
        wall, peak, maxproc, rc, parts = measure_and_clean(argv, env, log, out, "bake")
        if rc != 0:
            raise BenchError(f"bake build ({name}) failed with exit {rc}; log {log}, last lines:\n{tail(log)}")
        recs = sorted(out.glob("*/*/build.json"))
        if not recs:
            raise BenchError(f"bake build ({name}) exited 0 but wrote no build.json under {out}")
        rec = json.loads(recs[-1].read_text())
        outs = rec.get("outputs", {})
        if "image" not in outs:
            raise BenchError(f"bake build ({name}) made no image; build.json: {recs[-1]}")
        stages = rec.get("stages", {})
        if name == "hook" and not any(HOOK_MARK.split(": ", 1)[1] in n for n in rec.get("notes", [])):
            raise BenchError(f"the changed hook ({changed}) did not run: no note of it in {recs[-1]}")
        timing = ", ".join(f"{s} {v.get('seconds', '?')} s" for s, v in stages.items() if isinstance(v, dict))
        staged = sum(v.get("seconds") or 0 for v in stages.values() if isinstance(v, dict))
        timing += f"; outside the stage timers {wall - staged:.1f} s (start-up, plan, removing the work tree)"
        cached = f"bootstrap cached={stages.get('bootstrap', {}).get('cached')}, " \
                 f"packages cached={stages.get('customize', {}).get('cached_packages')}"
        res = Result("bake", name, wall, peak, maxproc, outs["image"]["size"] / MiB,
                     {"cache": f"{state} (build.json: {cached})", "memory": parts, "stages": timing,
                      "outputs": ", ".join(f"{r} {Path(v['path']).name} {v['size'] / MiB:.1f} MiB" for r, v in outs.items())
                                 + f" ({(recs[-1].parent / outs['image']['path']).stat().st_blocks * 512 / MiB:.0f} MiB"
                                   " of the image allocated)",
                      "packages": f"{pkgs}; {len(rec.get('packages') or [])} installed in the image (build.json)"})
        scrubbed = stages.get("customize", {}).get("scrub") or {}
        if "seconds" not in scrubbed:
            raise BenchError(f"bake build ({name}): build.json says nothing of the scrub's time: {recs[-1]}")
        res.details["scrub"] = (f"{scrubbed['seconds']:.2f} s for {len(scrubbed['ran'])} operations = "
                                f"{100 * scrubbed['seconds'] / wall:.2f} % of the bake (goal: under 5 %)")
        say(f"    {wall:.1f} s, peak {peak:.0f} MiB (largest process {maxproc:.0f} MiB); stages: {timing}")
        results.append(res)
        shutil.rmtree(out, ignore_errors=True)
    return results


# --- report -------------------------------------------------------------------------------

def report(results: list[Result]) -> None:
    say("")
    say("== setup")
    for line in SETUP:
        say(f"  {line}")
    say("")
    say("== details")
    for r in results:
        say(f"{r.tool} {r.scenario}:")
        for k, v in r.details.items():
            say(f"  {k:<9}{v}")
    say("")
    say(f"{'scenario':<14}{'wall s':>9}{'peak MiB':>10}{'max-proc MiB':>14}{'image MiB':>11}")
    for r in results:
        say(f"{r.tool + ' ' + r.scenario:<14}{r.wall:>9.1f}{r.peak_mib:>10.0f}{r.max_proc_mib:>14.0f}{r.image_mib:>11.0f}")
    say("(peak: sampled sum of the build's process tree RSS plus its tmpfs use; "
        "max-proc: largest single process, getrusage RUSAGE_CHILDREN)")
    by = {(r.tool, r.scenario): r for r in results}
    say("")
    dib = by.get(("dib", "cold"))
    cold = by.get(("bake", "cold"))
    if dib and cold:
        ratio = cold.wall / dib.wall
        say(f"bake cold / dib cold      = {ratio:.3f}  (target <= {TARGET_COLD_RATIO}: "
            f"{'met' if ratio <= TARGET_COLD_RATIO else 'MISSED'})")
    warm, dibc = by.get(("bake", "warm")), by.get(("dib", "cached"))
    if warm and dibc:
        say(f"bake warm / dib cached    = {warm.wall / dibc.wall:.3f}")
    if warm and cold:
        say(f"bake warm / bake cold     = {warm.wall / cold.wall:.3f}")
    hook = by.get(("bake", "hook"))
    if hook:
        say(f"bake after a hook change  = {hook.wall:.1f} s  (target < {TARGET_HOOK_SECONDS:.0f} s: "
            f"{'met' if hook.wall < TARGET_HOOK_SECONDS else 'MISSED'})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-dib", action="store_true", help="do not run diskimage-builder")
    ap.add_argument("--skip-bake", action="store_true", help="do not run bake")
    ap.add_argument("--no-dib-cached", action="store_true",
                    help="run diskimage-builder cold only (not again with its debootstrap cache)")
    ap.add_argument("--dib-venv", type=Path, default=DIB_VENV, help=f"diskimage-builder's virtualenv (default {DIB_VENV})")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) for a look afterwards")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the temporary folder goes (default /var/tmp)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_build: run as root (debootstrap and chroot need it)", file=sys.stderr)
        return 2
    say(f"bench_build: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory")
    tmp = Path(tempfile.mkdtemp(prefix="bench-build-", dir=args.dir)).resolve()
    results: list[Result] = []
    try:
        if not args.skip_dib:
            results += run_dib(tmp, args.dib_venv, cached_too=not args.no_dib_cached)
        if not args.skip_bake:
            results += run_bake(tmp)
        report(results)
    except BenchError as e:
        if results:
            report(results)
        print(f"\nbench_build: FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_build: interrupted", file=sys.stderr)
        return 130
    finally:
        left = clean_leftovers(tmp)
        if left:
            say("cleanup: " + "; ".join(left))
        if args.keep:
            say(f"\nkept {tmp} (logs); diskimage-builder's virtualenv is kept for reuse: {args.dib_venv}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"\nremoved {tmp}; diskimage-builder's virtualenv is kept for reuse: {args.dib_venv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
