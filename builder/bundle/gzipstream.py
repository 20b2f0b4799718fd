"""One gzip member made from a stream of blocks, compressed on several threads at once.

Each block is deflated on its own (zlib releases the GIL while it works), primed with the
last 32 KiB of the stream before it so that matches across block boundaries are still
found, and ended with a sync flush so the pieces join into one valid deflate stream; the
last block ends the stream. The result is an ordinary gzip file (what pigz does), so any
gunzip reads it. A run of all-zero blocks (holes of a sparse image, free space of a
filesystem) is compressed once and the bytes reused: the output for identical input and
identical dictionary is identical.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

WINDOW = 32 * 1024
# mtime 0, no name, XFL 0, OS 3 (Unix): what zlib writes for a gzip stream.
HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"


def default_workers() -> int:
    """Compression threads: one per CPU, at most four (beyond that, I/O and AES bound)."""
    return max(1, min(4, os.cpu_count() or 1))


def _deflate(block: bytes, zdict: bytes, level: int, final: bool) -> bytes:
    if zdict:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(block) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


class ParallelGzip:
    """Feed blocks in order with `write`; get back compressed bytes in order.

    At most `max_pending` blocks are in flight, so memory stays bounded by about
    2 × max_pending × block size whatever the stream's length.
    """

    def __init__(self, level: int = 6, workers: int | None = None, max_pending: int | None = None):
        self.level = level
        self.workers = workers or default_workers()
        self.max_pending = max_pending or 2 * self.workers + 2
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gzip")
        self._pending: deque[Future] = deque()
        self._crc = 0
        self._size = 0
        self._tail = b""
        self._tail_zero = False
        self._zero_blocks: dict[int, bytes] = {}
        self._zero_outputs: dict[int, Future] = {}
        self._started = False
        self._finished = False

    def write(self, block: bytes, final: bool = False) -> list[bytes]:
        """Queue `block` (the last one with `final`); return the output that is ready.

        Blocks while too many blocks are still being compressed. With `final`, returns
        everything left, gzip trailer included.
        """
        if self._finished:
            raise ValueError("gzip stream already finished")
        out: list[bytes] = []
        if not self._started:
            out.append(HEADER)
            self._started = True
        self._crc = zlib.crc32(block, self._crc)
        self._size += len(block)
        n = len(block)
        zeros = self._zero_blocks.get(n)
        if zeros is None and n >= WINDOW and len(self._zero_blocks) < 4:
            zeros = self._zero_blocks[n] = bytes(n)
        is_zero = zeros is not None and block == zeros
        if is_zero and self._tail_zero and not final:
            fut = self._zero_outputs.get(n)
            if fut is None:
                fut = self._zero_outputs[n] = self._pool.submit(_deflate, block, self._tail, self.level, False)
        else:
            fut = self._pool.submit(_deflate, block, self._tail, self.level, final)
        self._pending.append(fut)
        if n >= WINDOW:
            self._tail = block[-WINDOW:]
            self._tail_zero = is_zero
        else:
            self._tail = (self._tail + block)[-WINDOW:]
            self._tail_zero = self._tail_zero and block.count(0) == n and len(self._tail) == WINDOW
        limit = 0 if final else self.max_pending
        while len(self._pending) > limit:
            out.append(self._pending.popleft().result())
        if final:
            out.append(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))
            self._finished = True
            self.close()
        return out

    def close(self) -> None:
        """Stop the worker threads (waiting for blocks already queued)."""
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ParallelGzip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
