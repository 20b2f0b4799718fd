"""Nothing a bake starts outlives it; what a killed bake leaves, the next one undoes.

Each process that runs bake's engine has one session, made the first time it starts a
process or changes kernel state:

- a **cookie**, `BAKE_SESSION=<token>`, put in its environment, so that every child and
  every grandchild carries it;
- a **watchdog** (`watchdog.py`), a small process in a session of its own that waits on
  a pipe from this one; the kernel closes the pipe however this process ends (SIGKILL
  too), and the watchdog then kills every process with the cookie, every process group
  and every chroot still listed in the journal;
- a **journal** (`<state>/sessions/<token>.jsonl`, one JSON line per change) of what
  is live: process groups, chroots, mounts, loop devices, temporary paths, builds
  under way; and a lock file, flocked for the session's whole life.

Why both, not a parent-death signal or a cgroup: PR_SET_PDEATHSIG is not inherited by
grandchildren and fires when the forking *thread* ends; a cgroup needs systemd or a
writable hierarchy, which build boxes (and these machines) do not all have, and nothing
tears it down unless something alive does. The watchdog covers processes on any Linux;
the journal covers kernel and file state, which no process can be trusted to undo after
a SIGKILL.

`clean_stale()` (run before every bake and by `bake doctor`) takes each journal whose
lock nobody holds, ends any process left, unmounts, detaches, removes the temporary
paths, marks unfinished builds failed, and says what it did.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from builder.core import watchdog
from builder.core.errors import BakeError

log = logging.getLogger("bake.lifetime")

COOKIE = watchdog.COOKIE


def state_dir() -> Path:
    """BAKE_STATE_DIR, else /var/lib/bake for root, else ~/.local/state/bake.

    On disk, not in /run: a work tree or an overlay outlives a reboot, and the journal
    must too (process groups in it are only trusted on the boot that wrote them)."""
    env = os.environ.get("BAKE_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/bake")
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "bake"


def sessions_dir() -> Path:
    return state_dir() / "sessions"


class Session:
    """This process's cookie, watchdog and journal."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.token = f"{time.strftime('%Y%m%d%H%M%S')}-{self.pid}-{secrets.token_hex(4)}"
        d = sessions_dir()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BakeError(f"cannot make bake's state folder {d} ({e.strerror}): bake keeps there what it "
                            "must undo if it is killed; set BAKE_STATE_DIR to a folder it can write") from None
        self.lock_path = d / f"{self.token}.lock"
        self.journal_path = d / f"{self.token}.jsonl"
        self._mutex = threading.Lock()
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._journal = open(self.journal_path, "a", encoding="utf-8")
        self._write({"op": "session", "token": self.token, "pid": self.pid, "boot_id": watchdog.boot_id(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]})
        read_end, self._pipe = os.pipe()          # both close-on-exec: no child keeps the pipe open
        try:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-I", watchdog.__file__, self.token, str(self.journal_path)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        finally:
            os.close(read_end)
        os.environ[COOKIE] = self.token

    def _write(self, rec: dict) -> None:
        with self._mutex:
            self._journal.write(json.dumps(rec) + "\n")
            self._journal.flush()

    def add(self, kind: str, value: str | int | os.PathLike, **extra) -> None:
        """Record that `value` (a process group, chroot, mount point, loop device, path
        or build folder) is live and must be undone if this process dies."""
        self._write({"op": "+", "kind": kind, "value": os.fspath(value) if not isinstance(value, int) else str(value),
                     **extra})

    def remove(self, kind: str, value: str | int | os.PathLike) -> None:
        """Record that `value` was undone."""
        self._write({"op": "-", "kind": kind, "value": os.fspath(value) if not isinstance(value, int) else str(value)})

    def close(self) -> None:
        """The normal end: the journal goes, the watchdog sees the pipe close."""
        with contextlib.suppress(OSError):
            self._journal.close()
        self.journal_path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._pipe)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.watchdog.wait(10)


_session: Session | None = None
_session_lock = threading.Lock()


def session() -> Session:
    """This process's session, made on first use (and anew in a forked child)."""
    global _session
    with _session_lock:
        if _session is None or _session.pid != os.getpid():
            _session = Session()
            import atexit
            atexit.register(_session.close)
        return _session


def child_env() -> dict[str, str]:
    """What a child must carry beside an environment that bake builds from nothing."""
    return {COOKIE: session().token}


@contextlib.contextmanager
def tracked(kind: str, value: str | int | os.PathLike, **extra) -> Iterator[None]:
    """Journal `value` as live for the block (see `Session.add`)."""
    s = session()
    s.add(kind, value, **extra)
    try:
        yield
    finally:
        s.remove(kind, value)


# --- the next run: undoing what a dead session left -----------------------------------

@dataclass
class Stale:
    """What one dead session had left, and what was done about it."""

    token: str
    header: dict
    found: list[str] = field(default_factory=list)      # what was undone, said for a person
    failed: list[str] = field(default_factory=list)     # what could not be undone

    def describe(self) -> str:
        h = self.header
        who = f"bake pid {h.get('pid', '?')} (`{h.get('command', '?')}`, started {h.get('started', '?')})"
        return who


def _loops_of(backing: str) -> list[str]:
    """Loop devices attached to the file `backing` (also once it was deleted)."""
    found = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if f.read_text().strip().removesuffix(" (deleted)") == backing:
                found.append(f"/dev/{f.parent.parent.name}")
    return found


def _undo(kind: str, value: str, rec: dict, stale: Stale) -> None:
    from builder.core import sh
    if kind in ("chroot", "mount"):
        targets = sh.mounts_under(value)
        if targets:
            sh.unmount_all_under(value)
            left = sh.mounts_under(value)
            if left:
                stale.failed.append(f"still mounted: {', '.join(left)}")
            stale.found.append(f"unmounted {', '.join(t for t in targets if t not in left)}")
    elif kind == "loop":        # value: the file a loop device was attached to
        for dev in _loops_of(value):
            r = sh.run(["losetup", "-d", dev], check=False, quiet=True)
            if r.returncode == 0:
                stale.found.append(f"detached loop device {dev} ({value})")
            else:
                stale.failed.append(f"loop device {dev} ({value}): {r.output.strip()}")
    elif kind == "path":
        p = Path(value)
        if p.exists() or p.is_symlink():
            if sh.mounts_under(p):
                sh.unmount_all_under(p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            if p.exists():
                stale.failed.append(f"could not remove {p}")
            else:
                stale.found.append(f"removed {rec.get('what', 'temporary')} {p}")
    elif kind == "build":
        for tmp in Path(value).glob("*.tmp"):
            tmp.unlink(missing_ok=True)
            stale.found.append(f"removed half-written {tmp}")
        rec_path = Path(value) / "build.json"
        try:
            data = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            return
        if data.get("result") in ("running", None):
            data["result"] = "failed"
            data["error"] = (f"ended without finishing: its bake (pid {stale.header.get('pid', '?')}) was killed; "
                             f"cleaned up by pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            tmp = rec_path.with_name(rec_path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, rec_path)
            stale.found.append(f"marked build {value} failed (it never finished)")


# Mounts and chroots first (deepest first), then loop devices, then paths, then records.
_ORDER = {"pgid": 0, "chroot": 1, "mount": 1, "loop": 2, "path": 3, "build": 4}


def clean_stale() -> list[Stale]:
    """Undo what every dead session left (see the module's docstring); returns what
    was found, one `Stale` per dead session that had left anything."""
    d = sessions_dir()
    if not d.is_dir():
        return []
    current = _session.token if _session is not None and _session.pid == os.getpid() else None
    done: list[Stale] = []
    for lock_path in sorted(d.glob("*.lock")):
        token = lock_path.stem
        if token == current:
            continue
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                              # its bake is alive
            journal = d / f"{token}.jsonl"
            if not lock_path.exists():
                continue                              # another cleaner was first
            stale = _clean_session(token, journal)
            journal.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
            if stale.found or stale.failed:
                done.append(stale)
        finally:
            os.close(fd)
    # a journal whose lock file is gone (a cleaner killed half-way) has nothing to lock on
    for journal in d.glob("*.jsonl"):
        if not (d / f"{journal.stem}.lock").exists():
            stale = _clean_session(journal.stem, journal)
            journal.unlink(missing_ok=True)
            if stale.found or stale.failed:
                done.append(stale)
    return done


def _clean_session(token: str, journal: Path) -> Stale:
    header, live = watchdog.read_journal(str(journal))
    stale = Stale(token, header)
    same_boot = header.get("boot_id") == watchdog.boot_id()
    if header.get("watchdog_killed"):
        stale.found.append(f"its watchdog had ended {len(header['watchdog_killed'])} process(es) when it died")
    killed = watchdog.end_processes(token, str(journal), same_boot=same_boot)
    if killed:
        stale.found.append(f"ended {len(killed)} process(es) left running: {', '.join(map(str, killed))}")
    entries = sorted(live.items(), key=lambda kv: (_ORDER.get(kv[0][0], 9), -kv[0][1].count("/")))
    for (kind, value), rec in entries:
        try:
            _undo(kind, value, rec, stale)
        except Exception as e:  # one thing that cannot be undone must not stop the others
            stale.failed.append(f"{kind} {value}: {type(e).__name__}: {e}")
    return stale


def report_stale(found: list[Stale]) -> None:
    """Log, for a person, what `clean_stale` did."""
    for s in found:
        log.warning("cleaning what %s left when it was killed:", s.describe())
        for line in s.found:
            log.warning("  %s", line)
        for line in s.failed:
            log.error("  could not undo: %s", line)


def running() -> list[dict]:
    """The journal headers of the bakes alive now (their lock is held), this one aside."""
    from builder.core.locks import is_held

    d = sessions_dir()
    current = _session.token if _session is not None and _session.pid == os.getpid() else None
    alive = []
    for lock_path in sorted(d.glob("*.lock")) if d.is_dir() else ():
        if lock_path.stem != current and is_held(lock_path):
            header, _ = watchdog.read_journal(str(d / f"{lock_path.stem}.jsonl"))
            if header:
                alive.append(header)
    return alive
