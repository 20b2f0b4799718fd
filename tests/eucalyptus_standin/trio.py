"""Test data: a small kernel/ramdisk/image trio in a real build directory, bundled with
the project's own writer as the bundle stage would. (Client-side helper: the stand-in's
server never imports the project's bundle code.)"""

from __future__ import annotations

import os
from pathlib import Path

from builder.core.record import Build, new_build_id

from . import Standin

ROLES = (("kernel", "kernel", "vmlinuz-2.6.32-test", 3000),
         ("ramdisk", "ramdisk", "initrd.img-2.6.32-test", 5000),
         ("image", "machine", "test.img", 300_000))

# The ids given out in this process. Tests of one worker share one cloud, and the build id
# names the images: two builds made in the same second would claim the same image names,
# which a publish rightly refuses as another build's.
_issued: set[str] = set()


def fresh_build_id() -> str:
    base = new_build_id()
    build_id, n = base, 1
    while build_id in _issued:
        n += 1
        build_id = f"{base}.{n}"
    _issued.add(build_id)
    return build_id


def make_build(output_root: Path, recipe: str = "trio") -> Build:
    """A build with kernel, ramdisk and image outputs of a few random bytes (not bundled)."""
    build = Build.create(output_root, recipe, fresh_build_id())
    build.set("arch", "x86_64")
    for role, _, name, size in ROLES:
        p = build.dir / name
        p.write_bytes(os.urandom(size))
        build.record_output(role, p)
    return build


def bundle_build(build: Build, cloud: Standin, *, part_size: int = 64 * 1024,
                 user_cert: Path | None = None, user_key: Path | None = None,
                 cloud_cert: Path | None = None) -> dict:
    """Bundle the build's trio with the bundle stage's own function (small parts, so the
    image has several), for this cloud's keys unless others are given; returns build.json's
    "bundle" section."""
    from builder.bundle.keys import BundleKeys
    from builder.bundle.build import bundle_build as stage_bundle_build

    i = cloud.identity
    keys = BundleKeys(user_id=i.account_id, cert=user_cert or i.user_cert, private_key=user_key or i.user_key,
                      cloud_cert=cloud_cert or i.cloud_cert)
    return stage_bundle_build(build, keys, part_size=part_size)
