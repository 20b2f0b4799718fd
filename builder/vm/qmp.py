"""QEMU's machine protocol (QMP) through the `qemu.qmp` library, used synchronously.

The monitor is one end of a socket pair handed to QEMU at start (`-chardev socket,fd=N`),
so there is no socket path to race for and nothing left on disk. Every event QEMU sends
is appended to a JSON-lines file kept beside the console log.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

from builder.core.errors import BakeError


class QMPFailure(BakeError):
    """A QMP command failed or QEMU did not answer in time."""


class Monitor:
    """A connected QMP session; every call takes a timeout and names what it did."""

    def __init__(self, sock: socket.socket, events_log: Path, name: str = "qemu"):
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        # open for the session's life, closed by close()
        self._events_log = open(events_log, "a", encoding="utf-8")  # noqa: SIM115
        self._seen: list[dict[str, Any]] = []
        try:
            self._run(self._client.connect(sock), 15, "the QMP greeting")
        except BaseException:
            self.close()
            raise

    def _run(self, coro, timeout: float, what: str):
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError:
            raise QMPFailure(f"QEMU did not answer within {timeout:.0f} s ({what})") from None
        except QMPError as e:
            raise QMPFailure(f"QMP {what}: {e}") from None
        finally:
            self._drain()

    def _record(self, ev) -> dict[str, Any]:
        rec = {"event": ev.get("event"), "data": ev.get("data", {}), "timestamp": ev.get("timestamp")}
        self._seen.append(rec)
        self._events_log.write(json.dumps(rec) + "\n")
        self._events_log.flush()
        return rec

    def _drain(self) -> None:
        while not self._listener.empty():
            self._record(self._loop.run_until_complete(self._listener.get()))

    def execute(self, command: str, args: dict[str, Any] | None = None, *, timeout: float = 30) -> Any:
        """Run one QMP command and return its result; QMPFailure on error or timeout."""
        return self._run(self._client.execute(command, args), timeout, command)

    def wait_event(self, name: str, *, timeout: float, what: str, match: dict[str, Any] | None = None) -> dict:
        """Wait for event `name` (whose data contains `match`), already received or to come;
        the event is consumed, so a later wait needs a later event."""
        deadline = time.monotonic() + timeout

        def take() -> dict | None:
            for rec in self._seen:
                if rec["event"] == name and all(rec["data"].get(k) == v for k, v in (match or {}).items()):
                    self._seen.remove(rec)
                    return rec
            return None

        self._drain()
        while (found := take()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPFailure(f"timed out after {timeout:.0f} s waiting for {what} (QMP event {name})")
            try:
                ev = self._loop.run_until_complete(asyncio.wait_for(self._listener.get(), left))
            except TimeoutError:
                raise QMPFailure(f"timed out after {timeout:.0f} s waiting for {what} (QMP event {name})") from None
            self._record(ev)
        return found

    def events(self) -> list[dict[str, Any]]:
        """Events received so far and not yet consumed by wait_event."""
        self._drain()
        return list(self._seen)

    def quit(self, timeout: float = 15) -> None:
        """Power the machine off at once (no guest shutdown), as `kill` on a node would."""
        try:
            self._run(self._client.execute("quit"), timeout, "quit")
        except QMPFailure:
            pass  # QEMU may close the socket before answering

    def close(self) -> None:
        """Disconnect (QEMU keeps running) and release the event loop."""
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 5))
        except Exception:
            pass
        try:
            self._drain()
        finally:
            self._events_log.close()
            self._loop.close()
