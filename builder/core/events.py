"""Events for programs: with `--json`, one JSON object per line on stdout.

A nightly job or a release pipeline follows a bake through these instead of its human
output (which stays on stderr). Every event has `event` (its kind), `time` (UTC, ISO
8601), `build_id` and `recipe` (null until a build exists); the kinds and their fields
are in `schema/events.schema.json`, which the tests validate every line against:

- `build`: a build started (`dir`);
- `stage`: a stage `started`, `finished` (with `seconds`, `cached` where a cache
  served it), `failed` (with `error`) or was `skipped` (with `reason`);
- `progress`: `done` of `total` `unit`s (packages, bytes) of a long step, at most a few
  times a second;
- `check`: one verification check's `result` (passed, failed, skipped) and `summary`;
- `result`: the bake's end: `result`, `failed_stage`, `dir`, `exit_status`;
- `error`: bake could not run (an invalid recipe, a busy recipe, ...): `message`,
  `exit_status`;
- `summary`: several recipes (`-j`): each recipe's `result`, `exit_status` and `dir`.

The engine emits events whether or not anyone listens; they cost nothing unless
`enable` was called.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
import time
from typing import IO, Any, Callable

SCHEMA_NAME = "events.schema.json"

_lock = threading.Lock()
_sink: IO[str] | None = None
_context: dict[str, Any] = {"build_id": None, "recipe": None}
_last_progress: dict[tuple, float] = {}
PROGRESS_EVERY = 0.2        # seconds between two progress events of one step


def enable(stream: IO[str]) -> None:
    """Write events to `stream` from now on."""
    global _sink
    _sink = stream


def enabled() -> bool:
    return _sink is not None


def set_build(build_id: str | None, recipe: str | None) -> None:
    """The build (and recipe) that later events belong to."""
    _context.update(build_id=build_id, recipe=recipe)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def emit(kind: str, **fields: Any) -> None:
    """Send one event of `kind` (see the module's description) to the listeners and,
    with --json, to stdout."""
    if _sink is None and not _listeners:
        return
    rec = {"event": kind, "time": now(), "build_id": _context["build_id"], "recipe": _context["recipe"], **fields}
    for fn in list(_listeners):
        try:
            fn(rec)
        except Exception:       # a display that fails must not fail the bake
            pass
    if _sink is None:
        return
    line = json.dumps(rec, default=str, ensure_ascii=False)
    with _lock:
        try:
            _sink.write(line + "\n")
            _sink.flush()
        except (OSError, ValueError):
            pass        # the reader went away; the bake itself goes on


def relay(line: str) -> None:
    """Pass on an event line another bake process wrote (`bake build A B -j N --json`)."""
    if _sink is None:
        return
    with _lock:
        try:
            _sink.write(line if line.endswith("\n") else line + "\n")
            _sink.flush()
        except (OSError, ValueError):
            pass


def progress(stage: str, step: str, done: int, total: int | None, unit: str, *, final: bool = False) -> None:
    """A progress event: `done` of `total` (None: not known) `unit`s of `step` in
    `stage`. Sent at most every PROGRESS_EVERY seconds per step, and always when
    `final` (the step is complete)."""
    if _sink is None and not _listeners:
        return
    key = (stage, step)
    t = time.monotonic()
    if not final and t - _last_progress.get(key, 0.0) < PROGRESS_EVERY:
        return
    _last_progress[key] = t
    emit("progress", stage=stage, step=step, done=int(done), total=None if total is None else int(total), unit=unit)


_listeners: list[Callable[[dict], None]] = []


def add_listener(fn: Callable[[dict], None]) -> None:
    """Call `fn(event)` with every event (the terminal's progress display)."""
    _listeners.append(fn)


def remove_listener(fn: Callable[[dict], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)
