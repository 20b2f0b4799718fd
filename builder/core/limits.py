"""How much bake takes from outside before it stops reading: one cap on the bytes of an
image that comes in (a base's tar member, a decompressed tarball, an unbundled image).

A base or a bundle is hostile until checked: a tar header may declare a terabyte, a
gzip stream may inflate a thousandfold. Every reader of such input counts what it
writes and stops at the cap, rather than finding out once the disk is full.
"""

from __future__ import annotations

import os
import re

from builder.core.errors import BakeError

ENV = "BAKE_MAX_IMAGE_SIZE"
DEFAULT = 64 << 30      # 64 GiB: a cloud image's root filesystem is a few GiB
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def max_image_bytes() -> int:
    """The cap in bytes: BAKE_MAX_IMAGE_SIZE (a number of bytes, or with K, M, G or T)
    when set, else 64 GiB; a BakeError naming the variable when it is not a size."""
    given = os.environ.get(ENV, "").strip()
    if not given:
        return DEFAULT
    m = re.fullmatch(r"([0-9]+)([KMGT]?)i?B?", given, re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise BakeError(f"{ENV}={given!r}: expected a size such as 64G, 500M or a number of bytes")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def over_cap(what: str, cap: int) -> BakeError:
    """The error for input that would pass the cap: what it was, the cap, and how to
    raise it."""
    return BakeError(f"{what} more than {cap} bytes, the most bake takes of an image from outside; "
                     f"nothing was kept (set {ENV}, e.g. {ENV}=128G, to raise the cap)")
