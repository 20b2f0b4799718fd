"""The serial console of a running guest: captured to a file, and waited on by pattern.

QEMU writes the guest's ttyS0 to its stdout (a pipe); a reader thread copies every
line to the console log in the build directory and wakes anyone waiting for a line.
Waits never sleep: they block on a condition until the pattern shows up, QEMU exits,
or the timeout, and a timeout says what was awaited and shows the console's tail.
"""

from __future__ import annotations

import codecs
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from builder.core.errors import BakeError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]")


class GuestTimeout(BakeError):
    """A wait on a guest ran out of time (or the guest went away first)."""

    def __init__(self, message: str, tail: str = ""):
        self.tail = tail
        super().__init__(message + (f"\n--- console tail ---\n{tail.rstrip()}" if tail.strip() else ""))


class Console:
    """Reads `stream` (the guest's serial output) until EOF, into `path` and memory."""

    def __init__(self, stream: IO[bytes], path: Path, proc: subprocess.Popen | None = None):
        self.path = Path(path)
        self.proc = proc
        self._text: list[str] = []  # complete lines, ANSI sequences and \r removed
        self._partial = ""
        self._closed = False
        self._cond = threading.Condition()
        self._last_line = time.monotonic()     # when the guest last printed a line
        # open for the console's life: _pump closes it when the guest's stream ends
        self._file = open(self.path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True, name=f"console:{path.name}")
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        # a read may end inside a UTF-8 character or an escape sequence: characters are
        # decoded across reads, and escapes removed from whole lines only
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096)
                if not chunk:
                    break
                text = decoder.decode(chunk)
                self._file.write(text)
                self._file.flush()
                with self._cond:
                    data = self._partial + text.replace("\r", "")
                    *lines, self._partial = data.split("\n")
                    self._text.extend(_ANSI.sub("", line) for line in lines)
                    if lines:
                        self._last_line = time.monotonic()
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                if self._partial:
                    self._text.append(_ANSI.sub("", self._partial))
                    self._partial = ""
                self._closed = True
                self._cond.notify_all()
            self._file.close()

    def mark(self) -> int:
        """A position in the console: waits `since` it only look at later lines."""
        with self._cond:
            return len(self._text)

    def lines(self, since: int = 0) -> list[str]:
        """The complete lines read so far (from position `since`)."""
        with self._cond:
            return list(self._text[since:])

    def tail(self, n: int = 40) -> str:
        """The last `n` lines (the incomplete last line included) as one string."""
        with self._cond:
            return "\n".join(self._text[-n:] + ([_ANSI.sub("", self._partial)] if self._partial else []))

    def wait_for(self, pattern: str | re.Pattern, *, timeout: float, what: str, since: int = 0,
                 fail: str | re.Pattern | None = None, quiet: float | None = None) -> re.Match:
        """Block until a console line after position `since` matches `pattern`.

        Raises GuestTimeout naming `what` after `timeout` seconds, as soon as QEMU exits
        (the console reaches EOF) without the line having appeared, or as soon as a line
        matches `fail` (a sign that the awaited line will never come). With `quiet`, also
        once the guest has printed no line for `quiet` seconds: a guest that keeps printing
        (one slowed by a busy host) is waited for up to `timeout`, one that went silent
        (hung) is given up on sooner.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        bad = re.compile(fail) if isinstance(fail, str) else fail
        start = time.monotonic()
        deadline = start + timeout
        pos = since
        with self._cond:
            while True:
                while pos < len(self._text):
                    m = rx.search(self._text[pos])
                    pos += 1
                    if m:
                        return m
                    if bad is not None and bad.search(self._text[pos - 1]):
                        raise GuestTimeout(f"the guest failed before {what}: {self._text[pos - 1].strip()}",
                                           self.tail())
                if self._closed:
                    code = self.proc.poll() if self.proc is not None else None
                    raise GuestTimeout(f"QEMU exited (status {code}) before {what}", self.tail())
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    raise GuestTimeout(f"timed out after {timeout:.0f} s waiting for {what}", self.tail())
                if quiet is not None:
                    silent_until = max(self._last_line, start) + quiet
                    if now >= silent_until:
                        raise GuestTimeout(f"timed out waiting for {what}: the guest printed nothing for "
                                           f"{quiet:.0f} s ({now - start:.0f} s after the wait began)", self.tail())
                    left = min(left, silent_until - now)
                self._cond.wait(left)

    def close(self, timeout: float = 5.0) -> None:
        """Wait for the reader to reach EOF (the process has ended)."""
        self._thread.join(timeout)
