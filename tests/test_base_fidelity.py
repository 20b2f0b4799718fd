"""A base's root tree comes out of its image and goes back into a new image unchanged.

The base is a tree of every kind of special file (setuid, sticky, capabilities, xattrs,
ACLs, hard links, devices, a fifo, holes, foreign owners) made into ext4 as bake makes
images. Each way out of an image, the host's loop mount and tar and libguestfs's
tar_out, must give a tree whose full listing is the image's, and `make_filesystem`
must turn that tree into an image with the same listing again.
"""

from __future__ import annotations

import difflib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from base_fixtures import MiB, fs_image, scratch, special_tree
from builder.core import sh
from builder.base import hostcopy
from builder.recipe.distro import EXT4_CURRENT
from builder.core.errors import BakeError
from builder.image.filesystem import make_filesystem, tree_usage
from fulllisting import image_listing, listing

MOUNT_PREFIX = "bake-base-mnt-"


@pytest.fixture(scope="module")
def base():
    with scratch() as d:
        src = special_tree(d / "src")
        image = fs_image(src, d / "base.img")
        yield {"src": src, "image": image, "listing": image_listing(image)}


@pytest.fixture
def work():
    with scratch("bake-test-work-") as d:
        yield d


def assert_same(expected: list[str], got: list[str], what: str) -> None:
    if expected != got:
        diff = "\n".join(difflib.unified_diff(expected, got, "base image", what, lineterm="", n=0))
        pytest.fail(f"{what} differs from the base image:\n{diff}")


def round_trip(copy: Callable[[Path, Path], None], base: dict, work: Path) -> None:
    tree = work / "tree"
    copy(base["image"], tree)
    assert_same(base["listing"], listing(tree), "the copied tree")
    result = work / "result.img"
    make_filesystem(tree, result, fs="ext4", label="uec-rootfs", size=64 * MiB, features=list(EXT4_CURRENT),
                    inodes=tree_usage(tree)[1])
    assert_same(base["listing"], image_listing(result), "the image made from the copied tree")


def leftovers(image: Path, mounts_before: set[str]) -> list[str]:
    """Loop devices on `image`, mounts and mount folders of copy_tree, and processes
    still reading one of them."""
    left = sh.output(["losetup", "-j", image]).splitlines()
    mounts = [m for m in sh.mounts_under(tempfile.gettempdir()) if Path(m).name.startswith(MOUNT_PREFIX)]
    folders = {str(p) for p in Path(tempfile.gettempdir()).glob(MOUNT_PREFIX + "*")} - mounts_before
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(f in cmdline for f in folders):
            procs.append(cmdline.replace("\0", " "))
    return left + mounts + sorted(folders) + procs


def mount_folders() -> set[str]:
    return {str(p) for p in Path(tempfile.gettempdir()).glob(MOUNT_PREFIX + "*")}


def test_the_special_tree_survives_mkfs_unchanged(base):
    assert_same(base["listing"], listing(base["src"]), "the tree the base was made from")


def test_the_host_path_keeps_every_special_file(base, work):
    before = mount_folders()
    round_trip(hostcopy.copy_tree, base, work)
    assert leftovers(base["image"], before) == []


@pytest.mark.parametrize("fs", ["ext2", "ext3"])
def test_the_host_path_reads_ext2_and_ext3_bases_too(base, work, fs):
    image = fs_image(base["src"], work / f"{fs}.img", fs=fs)
    expected = image_listing(image)
    hostcopy.copy_tree(image, work / "tree")
    assert_same(expected, listing(work / "tree"), f"the tree copied from {fs}")


@pytest.mark.boots
def test_the_libguestfs_path_keeps_every_special_file(base, work):
    from builder.base.readout import extract_tree
    round_trip(extract_tree, base, work)


def test_the_host_path_refuses_a_folder_that_is_not_empty(base, work):
    (work / "tree").mkdir()
    (work / "tree/something").write_text("x")
    with pytest.raises(BakeError, match="new or empty folder"):
        hostcopy.copy_tree(base["image"], work / "tree")


def test_a_failed_host_copy_undoes_its_mount_and_loop_device(base, work):
    before = mount_folders()
    small = work / "small"
    small.mkdir()
    with sh.mount("tmpfs", small, fstype="tmpfs", options="size=1m"):
        with pytest.raises(sh.CommandError, match="copying the base image's tree") as e:
            hostcopy.copy_tree(base["image"], small / "tree")
        assert "No space left on device" in str(e.value)
    assert leftovers(base["image"], before) == []


def test_an_interrupted_host_copy_undoes_its_mount_loop_device_and_tars(base, work):
    """Ctrl-C arrives while both tars run on the mounted image (raised as the copy starts
    waiting for them)."""
    before = mount_folders()
    seen = {}

    def interrupt(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_wait_all" and frame.f_globals is vars(hostcopy):
            seen["leftovers"] = leftovers(base["image"], before)
            raise KeyboardInterrupt
        return None

    previous = sys.gettrace()
    sys.settrace(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            hostcopy.copy_tree(base["image"], work / "tree")
    finally:
        sys.settrace(previous)
    assert len(seen["leftovers"]) >= 3, "the interrupt came while the loop device, mount and tars were live"
    assert leftovers(base["image"], before) == []
