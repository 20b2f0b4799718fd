"""Real things for the sync agent's tests: an ext4 volume on a loop device, fake root
trees holding every kind of file, a way to run the real `rootsync` against them, and
full listings to compare trees by.

Nothing here touches this machine's own root: every agent run gets `ROOTSYNC_ROOT`
pointing at a temporary tree, and `run_agent` refuses to start without one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from builder.core import sh

REPO = Path(__file__).resolve().parent.parent
ELEMENT = REPO / "builder" / "elements" / "sync-agent"
AGENT = ELEMENT / "static" / "usr" / "sbin" / "rootsync"

# Relative to the root, as the agent excludes them by default.
DEFAULT_EXCLUDES = ("proc", "sys", "dev", "run", "tmp", "mnt", "media", "var/run", "var/lock",
                    "lost+found", "var/lib/rootsync/state", "var/lib/rootsync/volume")

EX_FAIL, EX_REFUSED, EX_BUSY = 1, 3, 4

# Deadlines are a safety net, never a measure: every wait ends on an event, and a
# deadline only stops a test that would otherwise hang.  They are set so that a machine
# several times slower than a quiet one (CPU hogs beside the run, a fresh machine's cold
# caches) still passes: a whole-tree pass or a backup takes seconds there.
PATIENCE = 300

# SYNC_AGENT_TEST_TOOLS=DIR runs the agent with the rsync and inotifywait found in DIR
# first (Lucid's versions, built from their sources), instead of this machine's.
TOOLS_PATH = os.environ["SYNC_AGENT_TEST_TOOLS"] + ":" if os.environ.get("SYNC_AGENT_TEST_TOOLS") else ""


@dataclass
class Instance:
    """One pretend instance: a root tree, its config, its run directory."""

    base: Path
    label: str
    extra_conf: dict[str, str] = field(default_factory=dict)
    excludes: tuple[str, ...] = ()

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def mount_point(self) -> Path:
        return self.root / "var/lib/rootsync/volume"

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def conf(self) -> Path:
        return self.base / "rootsync.conf"

    def write_conf(self) -> None:
        lines = [f"label={self.label}", f"mount_point={self.mount_point}", "debounce=1",
                 "generations=4", "on_attach=restore"]
        for k, v in self.extra_conf.items():
            lines = [ln for ln in lines if not ln.startswith(k + "=")] + [f"{k}={v}"]
        lines += [f"exclude={e}" for e in self.excludes]
        text = "\n".join(lines) + "\n"
        # Written before every run of the agent, while another (a watcher) may be reading
        # it: replaced whole, never truncated under a reader, which would take defaults.
        if not self.conf.exists() or self.conf.read_text() != text:
            new = self.conf.with_name(self.conf.name + ".new")
            new.write_text(text)
            os.replace(new, self.conf)

    def env(self, **extra: str) -> dict[str, str]:
        self.write_conf()
        env = {
            "PATH": TOOLS_PATH + "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ROOTSYNC_CONF": str(self.conf),
            "ROOTSYNC_ROOT": str(self.root),
            "ROOTSYNC_RUN_DIR": str(self.run_dir),
            "ROOTSYNC_SYSLOG": "no",
            "LC_ALL": "C",
        }
        env.update(extra)
        return env

    @property
    def volume_dir(self) -> Path:
        return self.mount_point / "rootsync"

    def current(self) -> Path:
        return (self.volume_dir / "current").resolve()


def new_instance(base: Path, label: str, **conf: str) -> Instance:
    inst = Instance(base, label, dict(conf))
    (inst.root / "var/lib/rootsync/volume").mkdir(parents=True, exist_ok=True)
    inst.run_dir.mkdir(parents=True, exist_ok=True)
    return inst


def run_agent(inst: Instance, *args: str, env_extra: dict[str, str] | None = None,
              timeout: float = PATIENCE) -> sh.Result:
    """Run the real agent against `inst` (never against this machine's root)."""
    env = inst.env(**(env_extra or {}))
    assert env["ROOTSYNC_ROOT"] not in ("", "/"), "tests must never run the agent on /"
    return sh.run([str(AGENT), *args], env=env, check=False, timeout=timeout, quiet=True)


def status(inst: Instance) -> dict:
    r = run_agent(inst, "status", "--json")
    assert r.returncode == 0, r.output
    # Only the last line is JSON; log lines (if any) come first.
    return json.loads(r.output.strip().splitlines()[-1])


# --- volumes ---------------------------------------------------------------------------

@contextlib.contextmanager
def loop_image(path: Path, size_mb: int, label: str | None) -> Iterator[str]:
    """A file of `size_mb` on a loop device, ext4 with `label` (or blank when None)."""
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    if label is not None:
        sh.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)], quiet=True)
    with sh.loop_device(path) as dev:
        try:
            yield dev
        finally:
            # Wherever the agent or a test mounted it (move_volume too), unmounted before
            # the loop device is detached.
            for target in _mount_targets_of(dev):
                sh.unmount_all_under(target)


def _mount_targets_of(dev: str) -> list[str]:
    # /proc/self/mounts writes a blank in a path as \040.
    with open("/proc/self/mounts") as f:
        return [ln.split()[1].encode().decode("unicode_escape") for ln in f if ln.split()[0] == dev]


@contextlib.contextmanager
def mounted_volume(inst: Instance, size_mb: int = 96) -> Iterator[str]:
    """A labelled ext4 volume on a loop device, mounted at `inst`'s mount point."""
    with loop_image(inst.base / "volume.img", size_mb, inst.label) as dev:
        inst.mount_point.mkdir(parents=True, exist_ok=True)
        with sh.mount(dev, inst.mount_point):
            yield dev


def move_volume(dev: str, src: Instance, dst: Instance) -> None:
    """Detach the volume from one pretend instance and attach it to another."""
    sh.unmount_all_under(src.mount_point)
    dst.mount_point.mkdir(parents=True, exist_ok=True)
    sh.run(["mount", dev, str(dst.mount_point)], quiet=True)


# --- trees -----------------------------------------------------------------------------

def _set_times(p: Path, ns: int) -> None:
    os.utime(p, ns=(ns, ns), follow_symlinks=False)


def make_rich_root(root: Path) -> None:
    """A root tree with every kind of file the agent must keep: regular, empty, sparse,
    hard links, symlinks (dangling too), character and block devices, fifos, a socket,
    xattrs, ACLs, odd modes and owners, old mtimes; plus the excluded directories."""
    for d in ("etc", "usr/bin", "var/lib/app", "home/user/.config", "srv/data", "dev", "proc/1",
              "sys/kernel", "run/lock", "tmp", "mnt/ephemeral", "media/cdrom", "var/cache",
              "var/lib/rootsync/volume", "var/lib/rootsync/state", "lib/udev/devices"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/run").symlink_to("../run")
    (root / "var/lock").symlink_to("../run/lock")
    (root / "etc/hostname").write_text("instance-a\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/empty").write_bytes(b"")
    for i in range(40):
        (root / f"usr/bin/tool{i}").write_bytes(os.urandom(200 + i * 37))
        os.chmod(root / f"usr/bin/tool{i}", 0o755)
    # Sparse: 8 MiB with 4 KiB of data at both ends.
    with open(root / "var/lib/app/sparse.img", "wb") as f:
        f.write(b"S" * 4096)
        f.seek(8 * 1024 * 1024 - 4096)
        f.write(b"E" * 4096)
    # Hard links, three names in two directories.
    (root / "usr/bin/perl").write_bytes(b"#!perl\n" * 100)
    os.link(root / "usr/bin/perl", root / "usr/bin/perl5.36")
    os.link(root / "usr/bin/perl", root / "srv/data/perl-hardlink")
    (root / "etc/alternatives").mkdir()
    (root / "etc/alternatives/editor").symlink_to("/usr/bin/tool1")
    (root / "etc/dangling").symlink_to("no/such/target")
    (root / "etc/rel-link").symlink_to("hostname")
    os.mknod(root / "lib/udev/devices/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "lib/udev/devices/loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.mkfifo(root / "var/lib/app/fifo", 0o620)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "var/lib/app/sock"))
    s.close()
    # Odd modes and owners.
    (root / "usr/bin/setuid").write_bytes(b"x" * 10)
    os.chmod(root / "usr/bin/setuid", 0o4755)
    (root / "srv/data/noperm").write_text("secret")
    os.chmod(root / "srv/data/noperm", 0o000)
    os.chmod(root / "srv/data", 0o1777)
    os.chown(root / "home/user", 1234, 5678)
    (root / "home/user/.config/settings").write_text("a=1\n")
    os.chown(root / "home/user/.config/settings", 1234, 5678)
    os.chown(root / "etc/dangling", 4321, 8765, follow_symlinks=False)
    # Extended attributes and ACLs.
    os.setxattr(root / "etc/passwd", "user.origin", b"rich-root")
    os.setxattr(root / "usr/bin/tool2", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    sh.run(["setfacl", "-m", "u:1234:rw,g:5678:r", str(root / "srv/data/noperm")], quiet=True)
    sh.run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "home/user")], quiet=True)
    # Content in excluded places that must never be copied.
    (root / "proc/1/status").write_text("fake proc\n")
    (root / "sys/kernel/x").write_text("fake sys\n")
    (root / "tmp/scratch").write_text("scratch\n")
    (root / "run/lock/l").write_text("lock\n")
    (root / "mnt/ephemeral/big").write_text("ephemeral\n")
    (root / "media/cdrom/x").write_text("cd\n")
    (root / "dev/console").write_text("not a device\n")
    (root / "var/lib/rootsync/state/last").write_text("state\n")
    # Old, distinct mtimes everywhere (directories last, deepest first).
    t0 = 1_300_000_000_123_456_789
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for i, p in enumerate(paths):
        _set_times(p, t0 + i * 1_000_000_007)
    _set_times(root, t0 - 5)


def excluded(rel: str, extra: tuple[str, ...] = ()) -> bool:
    return any(rel == e or rel.startswith(e + "/") for e in DEFAULT_EXCLUDES + extra)


def listing(root: Path, extra_excludes: tuple[str, ...] = (), times: bool = True) -> dict[str, tuple]:
    """path → (type, mode, uid, gid, size, mtime, rdev, link target, xattrs, sparse,
    hard-link group) for everything under `root` except the excluded paths."""
    entries: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if excluded(rel, extra_excludes):
                continue
            entries[rel] = os.lstat(p)
        dirnames[:] = [d for d in dirnames if not excluded(str((Path(dirpath) / d).relative_to(root)), extra_excludes)]
    entries["."] = os.lstat(root)
    groups: dict[tuple[int, int], list[str]] = {}
    for rel, st in entries.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    out = {}
    for rel, st in entries.items():
        p = root / rel
        kind = stat.S_IFMT(st.st_mode)
        xattrs = {}
        for name in os.listxattr(p, follow_symlinks=False):
            xattrs[name] = os.getxattr(p, name, follow_symlinks=False)
        target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
        sparse = stat.S_ISREG(st.st_mode) and st.st_size > 65536 and st.st_blocks * 512 < st.st_size // 2
        names = groups.get((st.st_dev, st.st_ino), [])
        group = tuple(sorted(names)) if len(names) > 1 else ()
        # Whole seconds: rsync 3.0 (Lucid) keeps no more, and a newer rsync leaves a
        # directory alone whose mtime already matches to the second.
        mtime = st.st_mtime_ns // 1_000_000_000 if times else None
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
        rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, mtime, rdev, target,
                    tuple(sorted(xattrs.items())), sparse, group)
    return out


def content(root: Path, extra_excludes: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Regular files' contents by relative path (excluded paths left out)."""
    out = {}
    for rel, entry in listing(root, extra_excludes, times=False).items():
        if entry[0] == stat.S_IFREG:
            out[rel] = (root / rel).read_bytes()
    return out


def assert_same_tree(a: Path, b: Path, extra_excludes: tuple[str, ...] = ()) -> None:
    la, lb = listing(a, extra_excludes), listing(b, extra_excludes)
    only_a = sorted(set(la) - set(lb))
    only_b = sorted(set(lb) - set(la))
    differ = sorted(k for k in set(la) & set(lb) if la[k] != lb[k])
    detail = [f"{k}:\n  {la[k]}\n  {lb[k]}" for k in differ[:10]]
    assert not (only_a or only_b or differ), (
        f"trees differ: only in {a}: {only_a[:10]}; only in {b}: {only_b[:10]}; differ: {differ[:10]}\n"
        + "\n".join(detail))
    ca, cb = content(a, extra_excludes), content(b, extra_excludes)
    assert ca == cb, f"same listing, different contents: {sorted(k for k in ca if ca[k] != cb.get(k))[:10]}"


# --- processes -------------------------------------------------------------------------

def start_agent(inst: Instance, *args: str, env_extra: dict[str, str] | None = None,
                log: Path | None = None) -> subprocess.Popen:
    """Start the agent in its own process group (so a test can kill -9 all of it).

    Only for `running_agent`, which ends it on every exit path."""
    env = inst.env(**(env_extra or {}))
    assert env["ROOTSYNC_ROOT"] not in ("", "/")
    with open(log or (inst.base / "agent.log"), "ab") as out:
        return subprocess.Popen([str(AGENT), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the agent's whole process group and reap it; a second call does nothing
    (its group ID could by then be another process's)."""
    if getattr(proc, "group_killed", False):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.group_killed = True  # type: ignore[attr-defined]
    proc.wait(timeout=PATIENCE)
    # Its other members are reaped by init, not by us; a test that checks for processes
    # left over finds none once they are gone.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not _group_members(proc.pid), 10, "the agent's process group to be reaped")


def _group_members(pgid: int) -> list[int]:
    """Processes (zombies too) in process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # state, ppid, pgrp
            found.append(int(entry))
    return found


def agent_pids(inst: Instance) -> list[int]:
    """Every process that runs for `inst`: the agent and all it started, in its process
    group or not (the udev hand-off starts the attach in a session of its own).  Each
    carries the instance's own run directory in its environment, which no process of
    another test or of this machine does."""
    marker = f"ROOTSYNC_RUN_DIR={inst.run_dir}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return pids


def end_agents(inst: Instance) -> None:
    """SIGKILL every process still running for `inst` (see agent_pids), until none is
    left: a shell killed between two scans may have started one more child."""
    deadline = time.monotonic() + 30  # a process in uninterruptible I/O dies once it returns
    while time.monotonic() < deadline:
        pids = agent_pids(inst)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of {inst.base} survive SIGKILL: {agent_pids(inst)}")


@contextlib.contextmanager
def agents_ended(inst: Instance) -> Iterator[None]:
    """On any exit, every process still running for `inst` is killed (see agent_pids)."""
    try:
        yield
    finally:
        end_agents(inst)


@contextlib.contextmanager
def running_agent(inst: Instance, *args: str, env_extra: dict[str, str] | None = None,
                  log: Path | None = None) -> Iterator[subprocess.Popen]:
    """The agent started with `args` (see start_agent), yielded; on any exit its whole
    process group, and anything else it left running for `inst`, is killed."""
    with agents_ended(inst):
        proc = start_agent(inst, *args, env_extra=env_extra, log=log)
        try:
            yield proc
        finally:
            kill_group(proc)


def lock_free(inst: Instance) -> bool:
    """No backup, restore or attach runs for `inst` (none holds the agent's lock)."""
    return sh.run(["flock", "-n", str(inst.run_dir / "lock"), "true"], check=False, quiet=True).returncode == 0


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_paused(inst: Instance, stage: str, proc: subprocess.Popen, timeout: float = PATIENCE) -> None:
    marker = inst.run_dir / "paused-at"

    def paused() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited ({proc.returncode}) before reaching {stage}")
        return marker.exists() and marker.read_text().strip() == stage

    wait_for(paused, timeout, f"the agent to pause at {stage}")
    marker.unlink()


# --- shared test steps -------------------------------------------------------------

@pytest.fixture
def needs_root_and_tools():
    if os.geteuid() != 0:
        pytest.fail("the sync agent's tests need root (loop devices, mount, device nodes, chown)")
    for tool in ("rsync", "inotifywait", "flock", "losetup", "mkfs.ext4", "blkid", "setfacl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; the sync agent's tests cannot run")


def label_for(tmp_path: Path) -> str:
    # Unique per test so that a volume found by label is always this test's own.
    return "rt" + format(abs(hash(str(tmp_path))) % 16**8, "08x")


def attach(inst) -> None:
    r = run_agent(inst, "attach")
    assert r.returncode == 0, r.output
    assert "backup complete" in r.output or "backups resume" in r.output, r.output


def backup(inst, *args: str) -> str:
    r = run_agent(inst, "backup", *args)
    assert r.returncode == 0, r.output
    assert "backup complete generation=" in r.output, r.output
    return r.output
