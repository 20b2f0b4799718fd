"""A bake killed outright (SIGKILL, as a CI runner or systemd ends a job that overstays):
within seconds no process of it remains, and the next bake, of another recipe, says
what the killed one left (chroot mounts, work tree, overlays), removes it and succeeds."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from builder.core import lifetime, sh, stale, watchdog
from conftest import BAKE, REPO
from events import wait_for
from test_build_failures import TEST_ELEMENTS, demo_plus
from vm_builds import copy_build, default_user, qemu_processes_under, source_build

pytestmark = [pytest.mark.e2e, pytest.mark.bakes]

GONE_WITHIN = 5     # seconds from the SIGKILL to the last process of the bake


def token_of(pid: int) -> str:
    """The session token of the bake process `pid` (from its journal)."""
    def find():
        for journal in lifetime.sessions_dir().glob("*.jsonl"):
            header, _ = watchdog.read_journal(str(journal))
            if header.get("pid") == pid:
                return header["token"]
        return None
    return wait_for(find, 60, f"the journal of bake pid {pid}")


def processes_of(token: str, *roots: Path) -> list[int]:
    found = set(watchdog.processes_with_cookie(token))
    for r in roots:
        found.update(watchdog.processes_rooted_in(str(r)))
    return sorted(found)


class Bake:
    """A `bake` command run in its own session; killed with its group when the test ends."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([BAKE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)

    def kill(self) -> float:
        """SIGKILL the bake itself (not its children: they are the watchdog's); returns when."""
        os.kill(self.proc.pid, signal.SIGKILL)
        return time.monotonic()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


@pytest.fixture
def bakes():
    started: list[Bake] = []

    def start(*args: str, env: dict | None = None) -> Bake:
        b = Bake(*args, env=env)
        started.append(b)
        return b
    yield start
    for b in started:
        b.stop()
    stale.clean_stale()    # whatever a failed test left, as the next bake would


def other_recipe(tmp_path: Path) -> Path:
    """The demo recipe under another name (same packages: its checkpoint is cached)."""
    data = yaml.safe_load((REPO / "recipes" / "debian-demo.yml").read_text())
    data["name"] = "next-bake"
    path = tmp_path / "next-bake.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigkill_in_customize_leaves_no_process_and_the_next_bake_cleans_up(demo_build, tmp_path, bakes):
    recipe = demo_plus("sleeps-in-install", "killed", tmp_path)
    out = tmp_path / "out"
    # the work tree in memory: the tmpfs is one more mount the next run must undo
    env = dict(os.environ, BAKE_ELEMENTS_PATH=str(TEST_ELEMENTS), BAKE_TMPFS="yes")
    b = bakes("build", str(recipe), "--output", str(out), "--stop-after", "image", env=env)
    marker = wait_for(lambda: next(iter(out.glob("killed/*/work/rootfs/var/tmp/bake-test-sleeping")), None)
                      or (b.proc.poll() is not None and pytest.fail(b.proc.communicate()[1])),
                      900, "the sleeping install.d hook")
    build_dir = marker.parents[4]
    rootfs = build_dir / "work" / "rootfs"
    token = token_of(b.proc.pid)
    assert processes_of(token, rootfs), "the hook runs in the chroot"
    mounts = sh.mounts_under(rootfs)
    assert mounts, "customize has its chroot mounts"
    work = build_dir / "work"
    assert str(work) in sh.mounts_under(work), "the work tree is a tmpfs the bake mounted"

    killed_at = b.kill()
    b.proc.wait()
    wait_for(lambda: not processes_of(token, rootfs), GONE_WITHIN, "every process of the killed bake to end")
    print(f"last process gone {time.monotonic() - killed_at:.2f} s after the SIGKILL")
    # What only the next run can undo is still there.
    assert sh.mounts_under(rootfs) and rootfs.is_dir()
    assert json.loads((build_dir / "build.json").read_text())["result"] == "running"

    nxt = subprocess.run([BAKE, "build", str(other_recipe(tmp_path)), "--output", str(tmp_path / "out2"),
                          "--stop-after", "image"], capture_output=True, text=True, timeout=1800)
    assert nxt.returncode == 0, nxt.stderr
    said = nxt.stderr
    assert f"cleaning what bake pid {b.proc.pid}" in said, said
    for m in mounts:
        assert m in said, f"the next bake does not say it unmounted {m}"
    assert re.search(rf"unmounted .*{re.escape(str(work))}(,|$)", said, re.M), \
        f"the next bake does not say it unmounted the work tree's tmpfs:\n{said}"
    assert f"removed work tree {build_dir / 'work'}" in said
    assert f"marked build {build_dir} failed" in said
    assert sh.mounts_under(build_dir) == [] and not (build_dir / "work").exists()
    record = json.loads((build_dir / "build.json").read_text())
    assert record["result"] == "failed" and "killed" in record["error"]


@pytest.mark.boots
def test_sigkill_while_the_instance_boots_leaves_no_qemu_and_the_next_bake_removes_the_overlays(
        request, tmp_path, bakes):
    build = copy_build(source_build(request), tmp_path / "verified")
    b = bakes("verify", str(build.dir), "--user", default_user(build))
    console = build.dir / "verify/a/console.log"
    wait_for(lambda: (console.exists() and "Linux version" in console.read_text(errors="replace"))
             or (b.proc.poll() is not None and pytest.fail(b.proc.communicate()[1])),
             600, "the instance to start booting")
    token = token_of(b.proc.pid)
    assert qemu_processes_under(build.dir), "QEMU runs while the guest boots"
    overlays = [p for p in (build.dir / "verify").iterdir() if p.name.startswith((".a-", ".scratch-"))]
    assert overlays, "the instance's overlay and the verification's scratch folder exist"

    killed_at = b.kill()
    b.proc.wait()
    wait_for(lambda: not qemu_processes_under(build.dir) and not processes_of(token), GONE_WITHIN,
             "QEMU and every other process of the killed verification to end")
    print(f"last process gone {time.monotonic() - killed_at:.2f} s after the SIGKILL")
    assert all(p.exists() for p in overlays), "files are the next run's to remove"

    nxt = subprocess.run([BAKE, "build", str(other_recipe(tmp_path)), "--output", str(tmp_path / "out2"),
                          "--stop-after", "image"], capture_output=True, text=True, timeout=1800)
    assert nxt.returncode == 0, nxt.stderr
    assert f"cleaning what bake pid {b.proc.pid}" in nxt.stderr, nxt.stderr
    for p in overlays:
        assert str(p) in nxt.stderr and not p.exists()


def test_sigkill_in_a_dib_chroot_phase_leaves_no_process_and_no_mount_of_the_sandbox(tmp_path, bakes):
    """The DIB sandbox's mounts (the hooks tree at /tmp/in_target.d, the confined
    command's own /proc, /sys and /dev) live in a mount namespace of the phase's own: the
    host never sees them, and they end with the phase's processes. What is left is bake's
    own chroot mounts (its proc with /proc/sys read-only, sysfs, the minimal /dev), which
    the next run removes."""
    recipe = tmp_path / "dib-killed.yml"
    recipe.write_text("name: dib-killed\nrelease: debian/bookworm\nvariant: minbase\n"
                      f"elements:\n  - dib: bake-test-sleeps\ndib:\n  elements_path: [{REPO / 'tests/dib-elements'}]\n")
    out = tmp_path / "out"
    b = bakes("build", str(recipe), "--output", str(out), "--stop-after", "image")
    marker = wait_for(lambda: next(iter(out.glob("dib-killed/*/work/rootfs/var/tmp/bake-test-dib-sleeping")), None)
                      or (b.proc.poll() is not None and pytest.fail(b.proc.communicate()[1])),
                      900, "the sleeping DIB pre-install.d hook")
    build_dir = marker.parents[4]
    rootfs = build_dir / "work" / "rootfs"
    token = token_of(b.proc.pid)
    assert processes_of(token, rootfs), "the hook runs in the chroot"
    host_view = sh.mounts_under(rootfs)
    assert str(rootfs / "proc") in host_view, "customize has its chroot mounts"
    assert not [m for m in host_view if "in_target.d" in m], "the sandbox's mounts are not in the host's mount table"

    b.kill()
    b.proc.wait()
    wait_for(lambda: not processes_of(token, rootfs), GONE_WITHIN, "every process of the killed bake to end")
    left = sh.mounts_under(rootfs)
    assert left and set(left) <= set(host_view), "only bake's own chroot mounts remain for the next run"
    stale.clean_stale()
    assert sh.mounts_under(build_dir) == [] and not (build_dir / "work").exists()
