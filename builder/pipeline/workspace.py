"""Where a bake's work tree lives: in memory (a tmpfs that bake mounts on the build's
`work/` folder) or on the disk of the output root.

A chroot bake makes and removes tens of thousands of files in its work tree: the base tree
or the package checkpoint unpacked, packages installed, the initramfs made, the whole tree
removed at the end. Where the disk makes each new file cost (a virtual disk, a busy array)
that is most of a warm bake: on this project's 2-core build box, unpacking the demo's
package checkpoint (11,860 files, 533 MB) took 13 s onto the ext4 root and 1 s into a
tmpfs, nearly all of it the kernel creating inodes. So, as diskimage-builder does by
default, the work tree of a bake that debootstraps is a tmpfs when the box has the memory
for it. `BAKE_TMPFS` chooses:

- `auto` (the default): in memory for the debootstrap route, when half of the memory
  available now is at least `MIN_LIMIT` (and at least the recipe's fixed image size);
  on disk otherwise, and always for a base image (its file, which may be as large as the
  disk, is unpacked in the work tree too).
- `yes`: in memory for every chroot route, whatever the memory.
- `no`: on disk.

The tmpfs is limited to half of the memory available when it is mounted (a limit, not a
reservation: it holds what the tree holds). A tree that outgrows it fails the bake with
"No space left on device", which the error then explains. The mount is bake's own: it is
undone with the work tree, and after a hard kill by the next bake, as every mount bake
records.
"""

from __future__ import annotations

import contextlib
import os

from builder.core import sh
from builder.core.errors import BakeError
from builder.core.log import step
from builder.image.filesystem import parse_size
from builder.pipeline.context import BuildContext

ENV = "BAKE_TMPFS"
CHOICES = ("auto", "yes", "no")
GiB = 1 << 30
MIN_LIMIT = 4 * GiB
MEMINFO = "/proc/meminfo"


def setting() -> str:
    """`BAKE_TMPFS`, checked (auto when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise BakeError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    return value


def available_memory(meminfo: str = MEMINFO) -> int:
    """MemAvailable of /proc/meminfo, in bytes (0 when the kernel does not say)."""
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def choose(ctx: BuildContext, *, value: str | None = None, available: int | None = None) -> tuple[int, str]:
    """(the tmpfs's limit in bytes, or 0 for the disk; why), for `ctx`'s bake."""
    value = setting() if value is None else value
    if value == "no":
        return 0, f"{ENV}=no"
    if ctx.route.backend != "chroot":
        return 0, "the image is changed in place in the appliance: no work tree"
    limit = (available_memory() if available is None else available) // 2
    if value == "yes":
        return limit, f"{ENV}=yes"
    if ctx.route.base != "debootstrap":
        return 0, f"a base image is unpacked in the work tree ({ENV}=yes puts it in memory too)"
    size = ctx.recipe.data.get("size", "auto")
    needed = max(MIN_LIMIT, 0 if size == "auto" else parse_size(size))
    if limit < needed:
        return 0, (f"half of the memory available ({limit / GiB:.1f} GiB) is less than the {needed / GiB:.1f} GiB "
                   "a tree in memory may need")
    return limit, f"{ENV}=auto, {2 * limit / GiB:.1f} GiB available"


def place(ctx: BuildContext, stack: contextlib.ExitStack) -> None:
    """Mount a tmpfs on `ctx.work` (an empty folder) when `choose` says so, undone when
    `stack` closes (or before, with the work tree); record the choice in build.json."""
    limit, why = choose(ctx)
    if not limit:
        ctx.build.set("work_tree", {"in_memory": False, "why": why})
        return
    with step(f"Work tree in memory (tmpfs, up to {limit / GiB:.1f} GiB; {ENV}=no keeps it on disk)"):
        # 0700 as the build folder around it; devices and set-id files as on a disk: the tree
        # is an image's root, whose programs run in a chroot
        stack.enter_context(sh.mount("tmpfs", ctx.work, fstype="tmpfs",
                                     options=f"mode=0700,size={limit // (1 << 20)}m"))
    ctx.build.set("work_tree", {"in_memory": True, "limit": limit, "why": why})


def explain(error: str, ctx: BuildContext) -> str:
    """`error`, with what to do when it is a full tmpfs of this bake's."""
    if "No space left on device" in error and (ctx.build.data.get("work_tree") or {}).get("in_memory"):
        return (f"{error}\n(the work tree was in memory, limited to half of the memory available: "
                f"{ENV}=no bakes it on disk)")
    return error
