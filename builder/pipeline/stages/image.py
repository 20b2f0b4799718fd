"""Stage image: the partition image (a bare filesystem, no partition table), the kernel
and the ramdisk: the trio a Eucalyptus node boots.

The filesystem is made from the root tree with `mkfs -d` (no loop mount), with the
features the distribution profile says the target's kernel and e2fsck understand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from builder.core import exposure, sh
from builder.core.record import Build
from builder.core.errors import BakeError
from builder.core.log import step
from builder.image.boot import newest_kernel, package_list, take_source_boot
from builder.image.filesystem import MiB, auto_size, make_filesystem, parse_size, tree_usage
from builder.pipeline.context import BuildContext
from builder.recipe.recipe import Recipe

def run(ctx: BuildContext) -> None:
    """Write kernel, ramdisk and partition image of the customized tree (`ctx.root`) into
    the build directory."""
    assert ctx.root is not None, "the image stage runs after customize, which leaves the root tree"
    make_image(ctx.build, ctx.recipe, ctx.root)


def make_image(build: Build, recipe: Recipe, root: Path) -> None:
    """Write kernel, ramdisk and partition image of the tree at `root` into `build`'s folder."""
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
            exposure.private_file(p)
        build.record_output("kernel", kernel)
        build.record_output("ramdisk", ramdisk)
        build.record_output("image", image)
        build.set("kernel_version", version)
        build.set("packages", package_list(root))
        build.set("filesystem", {"type": fs, "label": d["label"], "size": size, "features": features,
                                 "content_bytes": content, "inodes_used": inodes})
    build.record_stage("image")
