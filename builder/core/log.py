"""Steps: named, nested, timed units of work, reported through one interface.

The engine never prints. It opens steps (`with step("Installing packages"):`) and logs;
the CLI decides how to show them. Finished steps are kept so that a stage can record
its timings in build.json.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

log = logging.getLogger("bake")


@dataclass
class StepRecord:
    name: str
    depth: int
    seconds: float = 0.0
    ok: bool = True


@dataclass
class _State:
    depth: int = 0
    finished: list[StepRecord] = field(default_factory=list)
    listeners: list[Callable[[str, StepRecord], None]] = field(default_factory=list)


_state = _State()


def add_listener(fn: Callable[[str, StepRecord], None]) -> None:
    """Call `fn(event, record)` on every step start ("start") and end ("end")."""
    _state.listeners.append(fn)


def remove_listener(fn: Callable[[str, StepRecord], None]) -> None:
    with contextlib.suppress(ValueError):
        _state.listeners.remove(fn)


@contextlib.contextmanager
def step(name: str) -> Iterator[StepRecord]:
    """Time the block as a named step, nested under the step that is open around it."""
    rec = StepRecord(name, _state.depth)
    for fn in list(_state.listeners):
        fn("start", rec)
    log.info("%s%s", "  " * rec.depth, name)
    start = time.monotonic()
    _state.depth += 1
    try:
        yield rec
    except BaseException:
        rec.ok = False
        raise
    finally:
        _state.depth -= 1
        rec.seconds = round(time.monotonic() - start, 3)
        _state.finished.append(rec)
        for fn in list(_state.listeners):
            fn("end", rec)
        log.debug("%s%s: %.1f s%s", "  " * rec.depth, name, rec.seconds, "" if rec.ok else " (failed)")
