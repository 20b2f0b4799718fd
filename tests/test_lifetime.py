"""Nothing a bake starts outlives it, however it ends; what a SIGKILL leaves (mounts,
loop devices, temporary folders, an unfinished build), the next bake or `bake doctor`
finds, says and undoes; locks end with their holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.core import lifetime, locks, sh, stale, watchdog
from conftest import BAKE, REPO
from events import wait_for


class Child:
    """A Python process that uses the engine as a bake does and reports, one JSON line
    per event, what it started; killed (and everything it left undone) at the end."""

    def __init__(self, tmp_path: Path, body: str):
        script = tmp_path / "child.py"
        script.write_text(textwrap.dedent("""
            import json, os, sys, time
            from pathlib import Path
            sys.path.insert(0, %r)
            from builder.core import lifetime, sh
            def say(**kw):
                print(json.dumps(kw), flush=True)
            tmp = Path(%r)
        """ % (str(REPO), str(tmp_path))) + textwrap.dedent(body))
        self.proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the child ended early (status {self.proc.wait()})"
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def child_factory(tmp_path):
    made: list[Child] = []

    def make(body: str) -> Child:
        c = Child(tmp_path, body)
        made.append(c)
        return c
    yield make
    for c in made:
        c.kill()
    # whatever a failed test left, as the next bake would
    stale.clean_stale()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_sigkill_ends_children_grandchildren_and_daemons_that_left_their_session(child_factory):
    c = child_factory("""
        import contextlib
        with contextlib.ExitStack() as stack:
            p = stack.enter_context(sh.background(["sleep", "600"]))
            # a grandchild that leaves the process group and the session, as a daemon does
            q = stack.enter_context(sh.background(
                ["sh", "-c", "setsid sh -c 'echo $$ > %s/daemon.pid; exec sleep 601' & exec sleep 602" % tmp]))
            while not (tmp / "daemon.pid").exists() or not (tmp / "daemon.pid").read_text().strip():
                time.sleep(0.05)
            say(pids=[p.pid, q.pid, int((tmp / "daemon.pid").read_text())], token=lifetime.session().token)
            time.sleep(600)
    """)
    started = c.read()
    pids, token = started["pids"], started["token"]
    assert all(alive(p) for p in pids)
    assert set(pids) <= set(watchdog.processes_with_cookie(token))
    os.kill(c.proc.pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in pids), 5, "every process of the killed bake to end")
    assert watchdog.processes_with_cookie(token) == []


def test_a_normal_end_leaves_no_journal_and_no_watchdog(child_factory):
    c = child_factory("""
        r = sh.run(["true"])
        s = lifetime.session()
        say(token=s.token, watchdog=s.watchdog.pid)
    """)
    started = c.read()
    assert c.proc.wait(60) == 0
    wait_for(lambda: not alive(started["watchdog"]), 10, "the watchdog to end with its bake")
    assert not list(lifetime.sessions_dir().glob(f"{started['token']}.*"))


def test_the_next_run_undoes_the_mounts_loop_devices_and_folders_a_killed_bake_left(child_factory, tmp_path):
    c = child_factory("""
        import contextlib, subprocess
        img = tmp / "disk.img"
        with open(img, "wb") as f:
            f.truncate(8 << 20)
        sh.run(["mkfs.ext4", "-q", img])
        (tmp / "mnt").mkdir()
        (tmp / "chroot/proc").mkdir(parents=True)
        scratch = tmp / "overlays"
        scratch.mkdir()
        (scratch / "root.qcow2").write_text("an overlay")
        with contextlib.ExitStack() as stack:
            dev = stack.enter_context(sh.loop_device(img))
            stack.enter_context(sh.mount(dev, tmp / "mnt"))
            stack.enter_context(sh.chroot_guard(tmp / "chroot"))
            sh.run(["mount", "-t", "proc", "proc", tmp / "chroot/proc"])
            stack.enter_context(lifetime.tracked("path", scratch, what="instance overlay folder"))
            say(loop=dev)
            time.sleep(600)
    """)
    dev = c.read()["loop"]
    assert sh.mounts_under(tmp_path / "mnt") and sh.mounts_under(tmp_path / "chroot")
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait()
    # the kernel keeps all of it: nothing alive can undo it
    assert sh.mounts_under(tmp_path / "mnt") and sh.mounts_under(tmp_path / "chroot")
    assert (tmp_path / "overlays").exists()

    r = subprocess.run([BAKE, "doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"pid {c.proc.pid}" in r.stdout and "was killed and had left" in r.stdout
    assert f"unmounted {tmp_path / 'mnt'}" in r.stdout
    assert f"unmounted {tmp_path / 'chroot' / 'proc'}" in r.stdout
    assert f"detached loop device {dev}" in r.stdout
    assert f"removed instance overlay folder {tmp_path / 'overlays'}" in r.stdout
    assert sh.mounts_under(tmp_path) == []
    assert not Path(f"/sys/block/{Path(dev).name}/loop/backing_file").exists() or \
        str(tmp_path) not in Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text()
    assert not (tmp_path / "overlays").exists()

    again = subprocess.run([BAKE, "doctor"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and f"pid {c.proc.pid}" not in again.stdout


def test_doctor_leaves_a_live_bake_alone_and_names_it(child_factory, tmp_path):
    c = child_factory("""
        (tmp / "kept").mkdir()
        with lifetime.tracked("path", tmp / "kept", what="work tree"):
            say(token=lifetime.session().token)
            time.sleep(600)
    """)
    c.read()
    r = subprocess.run([BAKE, "doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "kept").is_dir()
    assert f"running now: pid {c.proc.pid}" in r.stdout


def test_a_lock_ends_with_its_holder_and_a_waiter_is_told_who_holds_it(child_factory, tmp_path):
    lock = tmp_path / "entry.lock"
    c = child_factory("""
        from builder.core import locks
        with locks.held(tmp / "entry.lock", "the test entry"):
            say(held=True)
            time.sleep(600)
    """)
    c.read()
    assert locks.is_held(lock)
    with pytest.raises(locks.Busy) as e:
        with locks.held(lock, "the test entry", wait=False):
            pass
    assert f"the test entry is in use by pid {c.proc.pid}" in str(e.value)
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait()
    with locks.held(lock, "the test entry", wait=False):
        assert locks.is_held(lock)
    assert not locks.is_held(lock)


def test_a_second_bake_waits_for_a_cache_entry_being_made_and_finds_it_made(child_factory, tmp_path):
    from builder.core.cache import TreeCache

    c = child_factory("""
        from builder.core.cache import TreeCache
        cache = TreeCache(tmp / "cache", "bootstrap")
        tree = tmp / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/made-by").write_text(str(os.getpid()))
        with cache.lock("k1"):
            say(holding=True)
            while not (tmp / "go").exists():
                time.sleep(0.05)
            cache.save("k1", tree, {"by": os.getpid()})
        say(saved=True)
    """)
    c.read()
    cache = TreeCache(tmp_path / "cache", "bootstrap")
    assert not cache.has("k1")
    (tmp_path / "go").touch()
    with cache.lock("k1"):
        # the lock is only had once the other holder saved and let go
        assert cache.has("k1") and cache.meta("k1")["by"] == c.proc.pid
    assert c.read() == {"saved": True}
    assert sorted(p.name for p in cache.dir.iterdir()) == ["k1.json", "k1.lock", "k1.tar"]


def test_a_half_written_cache_entry_of_a_killed_writer_is_removed_and_never_trusted(child_factory, tmp_path):
    from builder.core.cache import TreeCache

    c = child_factory("""
        from builder.core.cache import TreeCache
        cache = TreeCache(tmp / "cache", "packages")
        tree = tmp / "tree"
        tree.mkdir()
        (tree / "big").write_bytes(os.urandom(1 << 20))
        # a tar that never ends stands in for one killed half-way
        import builder.core.cache as c
        c.TAR_FLAGS = ["--checkpoint=1", "--checkpoint-action=exec=sleep 600"] + c.TAR_FLAGS
        with cache.lock("k2"):
            say(saving=True)
            cache.save("k2", tree, {})
    """)
    c.read()
    cache = TreeCache(tmp_path / "cache", "packages")
    wait_for(lambda: list(cache.dir.glob("k2.tar.*.tmp")), 60, "the half-written entry")
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait()
    assert not cache.has("k2")
    found = stale.clean_stale()
    assert any("removed half-written cache entry" in line for s in found for line in s.found)
    assert not list(cache.dir.glob("*.tmp")) and not cache.has("k2")
