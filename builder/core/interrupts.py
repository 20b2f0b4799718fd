"""SIGINT and SIGTERM: the first one interrupts, cleanup is never cut short, and the
bake ends within a bounded time.

`install()` (the command line calls it) makes the first SIGINT or SIGTERM raise
KeyboardInterrupt in the main thread, whatever disposition bake inherited (a job started
in the background of a non-interactive shell inherits SIGINT ignored). Later signals
only say that cleanup is under way. Cleanup code runs inside `deferred()`: a signal that
arrives there is held until the block is done, so it cannot leave a mount half undone.

Python runs signal handlers in the main thread only, and only between two steps of
Python code. When the kernel hands a process-wide signal to another thread (it does
when the main thread already has one pending, as after SIGINT and SIGTERM sent back to
back on a busy machine), the main thread is not woken from a blocking wait such as
`waitpid` and the handler would not run until that wait ends by itself, which for a
hook that sleeps is never. So every thread started after `install()`, bake's own or a
library's, starts with SIGINT and SIGTERM blocked, and the kernel can only hand them to
the main thread; and bake's own waits in the main thread wake up at least twice a
second (`sh.run`).

From the first signal on, the bake has `BOUND` seconds to finish its cleanup; a cleanup
that talks to a cloud may ask for more (`extend`). Past that the process ends with
status 130 at once: its watchdog ends every process it started, and the next bake (or
`bake doctor`) undoes what is left from the journal (see `lifetime`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator

SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
BOUND = 30.0            # seconds from the first SIGINT/SIGTERM to the end of the process
EXIT_INTERRUPTED = 130


class _State:
    installed = False
    interrupted_at: float | None = None
    deadline: float | None = None
    depth = 0            # nested deferred() blocks of the main thread
    pending: int | None = None


_s = _State()


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"bake: {text}\n".encode())


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _s.interrupted_at is not None:
        _say(f"{name}: still cleaning up after the interrupt (at most "
             f"{max(0, (_s.deadline or 0) - time.monotonic()):.0f} s more)")
        return
    _s.interrupted_at = time.monotonic()
    _s.deadline = _s.interrupted_at + BOUND
    threading.Thread(target=_enforce_bound, name="interrupt-bound", daemon=True).start()
    if _s.depth > 0:
        _s.pending = signum
        _say(f"{name}: interrupting once the current cleanup step is done")
        return
    raise KeyboardInterrupt


def _enforce_bound() -> None:
    while True:
        left = (_s.deadline or 0) - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, 0.5))
    _say("cleanup did not finish within the bound after the interrupt; ending now "
         "(the watchdog ends what it started, the next bake or `bake doctor` undoes the rest)")
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


_thread_start = threading.Thread.start


def _start_with_signals_blocked(self: threading.Thread) -> None:
    """`Thread.start`, with SIGINT and SIGTERM blocked in the new thread (a thread
    inherits the signal mask of the one that creates it)."""
    if threading.current_thread() is not threading.main_thread():
        _thread_start(self)         # other threads already have them blocked
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        _thread_start(self)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def install() -> None:
    """Handle SIGINT and SIGTERM as described above (main thread only)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    for s in SIGNALS:
        signal.signal(s, _handler)
    threading.Thread.start = _start_with_signals_blocked  # type: ignore[method-assign]
    _s.installed = True


def interrupted() -> bool:
    """Whether a SIGINT or SIGTERM has come."""
    return _s.interrupted_at is not None


def extend(seconds: float) -> None:
    """After an interrupt, allow the cleanup `seconds` more from now (a cloud's
    instances must be terminated, which takes what the cloud takes)."""
    if _s.deadline is not None:
        _s.deadline = max(_s.deadline, time.monotonic() + seconds)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block with SIGINT/SIGTERM held: one that comes is raised as
    KeyboardInterrupt when the outermost such block ends (unless the block is already
    unwinding through an exception, which then goes on). Outside the main thread, or
    where `install` was not called, the block just runs."""
    if not _s.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    _s.depth += 1
    failed = True
    try:
        yield
        failed = False
    finally:
        _s.depth -= 1
        if _s.depth == 0 and _s.pending is not None:
            _s.pending = None
            if not failed:
                raise KeyboardInterrupt
