"""Waiting for events, never for a fixed time: a test polls for what it expects (a file,
a process state, a line) and gives up only at a generous deadline, a safety net that a
slow or busy machine does not reach."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Call `predicate` until it returns something true, and return that; an
    AssertionError naming `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
