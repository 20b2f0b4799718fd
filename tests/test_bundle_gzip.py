"""The threaded gzip stream is one ordinary gzip member, whatever the block sizes, the
number of threads and the runs of zeros, and it compresses as well as plain gzip."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import zlib

import pytest

from builder.bundle.gzipstream import ParallelGzip

MiB = 1024 * 1024


def blocks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def compress(blocks: list[bytes], workers: int) -> bytes:
    out = []
    with ParallelGzip(6, workers) as gz:
        for i, b in enumerate(blocks):
            out += gz.write(b, final=i == len(blocks) - 1)
    return b"".join(out)


def sample() -> bytes:
    noise = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(40000))  # 1.25 MiB
    text = b"".join(b"%d: the quick brown fox\n" % i for i in range(60000))
    return text[:700_000] + bytes(4 * MiB + 123) + noise + bytes(3 * MiB) + text


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("block", [MiB, 100_000, 5000])
def test_output_is_one_gzip_member_that_gunzip_reads(workers, block):
    data = sample()
    packed = compress(blocks_of(data, block), workers)
    assert gzip.decompress(packed) == data
    d = zlib.decompressobj(31)
    assert d.decompress(packed) == data and d.eof and d.unused_data == b""  # one member, nothing after
    assert subprocess.run(["gunzip", "-c"], input=packed, capture_output=True, check=True).stdout == data


def test_compresses_about_as_well_as_single_stream_gzip():
    data = sample()
    packed = compress(blocks_of(data, MiB), 2)
    assert len(packed) <= len(gzip.compress(data, 6)) * 1.01


def test_runs_of_zero_blocks_cost_next_to_nothing():
    packed = compress([bytes(MiB)] * 256, 2)  # 256 MiB of zeros
    assert gzip.decompress(packed) == bytes(256 * MiB)
    assert len(packed) < 300_000


def test_empty_and_tiny_streams():
    assert gzip.decompress(compress([b""], 2)) == b""
    assert gzip.decompress(compress([b"x"], 2)) == b"x"
