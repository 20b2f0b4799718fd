"""Locks that the kernel releases when their holder dies: flock on a lock file.

Every directory or file two bakes could share (a cache entry while it is made, the
debootstrap and apt package caches, a build folder while a bake works on it) is
guarded by one of these. A pid file would outlive a killed holder; an flock does not.
The holder writes who it is into the file, so that a bake that has to wait (or, with
`wait=False`, gives up) can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from builder.core.errors import BakeError
from builder.core.state import state_dir

log = logging.getLogger("bake.locks")


class Busy(BakeError):
    """A lock asked for without waiting is held by another process."""

    def __init__(self, what: str, holder: str):
        self.what, self.holder = what, holder
        super().__init__(f"{what} is in use by {holder}")


def holder_of(path: str | os.PathLike) -> str:
    """Who holds (or last held) the lock file `path`, as a person would want it said."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not info:
        return "another process"
    return f"pid {info.get('pid')} ({info.get('command', '?')}, since {info.get('since', '?')})"


def is_held(path: str | os.PathLike) -> bool:
    """Whether some process holds the lock file `path` now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def held(path: str | os.PathLike, what: str, *, wait: bool = True) -> Iterator[None]:
    """Hold the exclusive lock `path` for the block. When another process holds it: wait
    (saying for whom, once), or with `wait=False` raise `Busy` at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(path)
            if not wait:
                raise Busy(what, holder) from None
            log.warning("waiting for %s, in use by %s", what, holder)
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.warning("%s is free after %.0f s", what, time.monotonic() - start)
        me = {"pid": os.getpid(), "command": " ".join(["bake", *sys.argv[1:]])[:200],
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)        # releases the lock


def recipe_locks_dir() -> Path:
    """The folder of the recipes' lock files (`bake gc` reads who holds them)."""
    return state_dir() / "recipes"


def recipe_lock_path(name: str) -> Path:
    """The lock file of recipe `name` (`bake gc` reads it without taking it)."""
    return recipe_locks_dir() / f"{name}.lock"


def recipe_lock(name: str, *, wait: bool = True):
    """Hold recipe `name` for the block: one bake of a recipe at a time on this box (a
    second waits, or with `wait=False` raises Busy naming the holder). An flock: the
    kernel releases it when its holder dies, however it dies."""
    return held(recipe_lock_path(name), f"recipe {name}", wait=wait)
