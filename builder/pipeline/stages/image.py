"""Stage image: the partition image (a bare filesystem, no partition table), the kernel
and the ramdisk: the trio a Eucalyptus node boots.

The filesystem is made from the root tree with `mkfs -d` (no loop mount), with the
features the distribution profile says the target's kernel and e2fsck understand.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from builder.core import sh
from builder.core.record import Build
from builder.core.errors import BakeError
from builder.core.log import step
from builder.image.boot import newest_kernel, package_list, take_source_boot
from builder.image.filesystem import MiB, auto_size, make_filesystem, parse_size, tree_usage
from builder.recipe.recipe import Recipe

def run(build: Build, recipe: Recipe, root: Path) -> dict:
    """Write kernel, ramdisk and partition image into the build directory."""
    start = time.monotonic()
    d = recipe.data
    fs = d["filesystem"]
    sh.require(f"mkfs.{fs}", "e2fsck")
    with step(f"Image: {fs} partition image, kernel, ramdisk"):
        source_boot = take_source_boot(root, build.dir)
        content, inodes = tree_usage(root)
        size = parse_size(d["size"]) if d["size"] != "auto" else auto_size(content, inodes, parse_size(d["headroom"]))
        if size < content:
            raise BakeError(f"size {d['size']} is smaller than the image's content ({content // MiB} MiB); "
                            "raise `size` or use `size: auto`")
        image = build.dir / f"{recipe.name}.img"
        features = recipe.profile.mkfs_features(fs)
        make_filesystem(root, image, fs=fs, label=d["label"], size=size, features=features, inodes=inodes)
        if source_boot:
            kernel, ramdisk, version = source_boot
        else:
            version = newest_kernel(root)
            kernel = build.dir / f"vmlinuz-{version}"
            ramdisk = build.dir / f"initrd.img-{version}"
            shutil.copyfile(root / "boot" / f"vmlinuz-{version}", kernel)
            shutil.copyfile(root / "boot" / f"initrd.img-{version}", ramdisk)
        for p in (image, kernel, ramdisk):
            p.chmod(0o644)
        build.record_output("kernel", kernel)
        build.record_output("ramdisk", ramdisk)
        build.record_output("image", image)
        build.set("kernel_version", version)
        build.set("packages", package_list(root))
        build.set("filesystem", {"type": fs, "label": d["label"], "size": size, "features": features,
                                 "content_bytes": content, "inodes_used": inodes})
    build.record_stage("image", seconds=round(time.monotonic() - start, 2))
    return build.data["outputs"]
