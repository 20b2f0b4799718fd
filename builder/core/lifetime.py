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

`stale.clean_stale()` (run before every bake and by `bake doctor`) takes each journal
whose lock nobody holds, ends any process left, unmounts, detaches, removes the
temporary paths, marks unfinished builds failed, and says what it did. It lives above
`sh`, which it uses to unmount and detach; this module lives below it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from builder.core import watchdog
from builder.core.errors import BakeError
from builder.core.locks import is_held
from builder.core.state import state_dir


COOKIE = watchdog.COOKIE


def sessions_dir() -> Path:
    """Where the sessions' journals and lock files are (in `state.state_dir()`)."""
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
        # open for the session's whole life: closed by close(), at exit
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115
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


def current_token() -> str | None:
    """This process's session token, when it has made one (a forked child has not)."""
    return _session.token if _session is not None and _session.pid == os.getpid() else None


def running() -> list[dict]:
    """The journal headers of the bakes alive now (their lock is held), this one aside."""
    d = sessions_dir()
    current = current_token()
    alive = []
    for lock_path in sorted(d.glob("*.lock")) if d.is_dir() else ():
        if lock_path.stem != current and is_held(lock_path):
            header, _ = watchdog.read_journal(str(d / f"{lock_path.stem}.jsonl"))
            if header:
                alive.append(header)
    return alive
