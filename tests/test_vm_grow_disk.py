"""A verification disk with free space after the root partition (`verify.free_after_root`),
for images that grow their root at boot: growpart grows a partition only up to the next
one, so partition 1 is exactly the image, the gap follows it, and the ephemeral and swap
partitions come after the gap. Read with `sfdisk -J` on the file; nothing is booted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.core import sh
from builder.verify.local import LocalOptions
from builder.vm import disk, metadata

MiB = 1 << 20
GiB = 1 << 30
BAKE = str(Path(sys.executable).parent / "bake")


@pytest.fixture
def image(tmp_path):
    img = tmp_path / "image"
    with open(img, "wb") as f:
        f.truncate(40 * MiB)
    sh.run(["mkfs.ext4", "-q", "-F", "-L", "cloudimg-rootfs", img])
    return img


def _table(d: Path) -> list[dict]:
    t = json.loads(sh.output(["sfdisk", "-J", d]))["partitiontable"]
    assert t["label"] == "dos"
    return t["partitions"]


def _sha(path, offset, length):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        h.update(f.read(length))
    return h.hexdigest()


def _blkid(d: Path, sector: int) -> str:
    return sh.output(["blkid", "-p", "-O", str(sector * 512), "-o", "export", d])


def test_partition_1_ends_where_the_image_ends_and_the_gap_precedes_ephemeral_and_swap(image, tmp_path):
    t = disk.instance_type("m1.small")
    gap = 2 * GiB
    d = disk.node_disk(image, tmp_path / disk.node_disk_name(t, gap), t, free_after_root=gap)
    p1, p2, p3 = _table(d)
    assert (p1["type"], p2["type"], p3["type"]) == ("83", "83", "82")
    assert p1["start"] == 2048 and p1["size"] * 512 == image.stat().st_size
    p1_end = p1["start"] + p1["size"]
    assert (p2["start"] - p1_end) * 512 == gap
    assert p3["start"] == p2["start"] + p2["size"]
    assert p3["size"] * 512 == t.swap_mib * MiB
    assert (p3["start"] + p3["size"]) * 512 == d.stat().st_size == 5 * GiB  # the gap fits in m1.small's 5 GB
    # partitions keep their numbers: what the metadata's block-device-mapping names
    bdm = metadata.metadata_tree(instance_id="i-1", local_ipv4="x", hostname="h", ssh_public_key=None)[
        "block-device-mapping"]
    assert [p["node"][-1] for p in (p1, p2, p3)] == [bdm["root"][-1], bdm["ephemeral0"][-1], bdm["swap"][-1]]
    # contents: the image, then nothing, then the ephemeral ext3 and the swap
    size = image.stat().st_size
    assert _sha(d, p1["start"] * 512, size) == _sha(image, 0, size)
    assert "LABEL=cloudimg-rootfs" in _blkid(d, p1["start"])
    assert "TYPE=ext3" in _blkid(d, p2["start"]) and "LABEL=ephemeral0" in _blkid(d, p2["start"])
    assert "TYPE=swap" in _blkid(d, p3["start"])
    with open(d, "rb") as f:  # the gap is a hole: nothing was written there
        try:
            data = os.lseek(f.fileno(), p1_end * 512, os.SEEK_DATA)
        except OSError:
            data = d.stat().st_size
        assert data >= p2["start"] * 512
    assert d.stat().st_blocks * 512 < 160 * MiB  # sparse, as the node layout


def test_a_gap_larger_than_the_instance_type_disk_makes_the_disk_larger(image, tmp_path):
    t = disk.instance_type("m1.small")
    gap = 6 * GiB
    d = disk.node_disk(image, tmp_path / disk.node_disk_name(t, gap), t, free_after_root=gap)
    p1, p2, p3 = _table(d)
    assert (p2["start"] - p1["start"] - p1["size"]) * 512 == gap
    assert p2["size"] * 512 >= 64 * MiB  # still a usable ephemeral partition
    assert (p3["start"] + p3["size"]) * 512 == d.stat().st_size > 5 * GiB


def test_a_gap_is_rounded_up_to_whole_mib(image, tmp_path):
    t = disk.instance_type("m1.small")
    d = disk.node_disk(image, tmp_path / "disk.raw", t, free_after_root=MiB + 1)
    p1, p2, _ = _table(d)
    assert (p2["start"] - p1["start"] - p1["size"]) * 512 == 2 * MiB
    assert disk.node_disk_name(t, MiB + 1) == "disk-m1.small-free2M.raw"


def test_the_two_layouts_are_cached_under_different_names_and_never_reuse_each_other(image, tmp_path):
    t = disk.instance_type("m1.small")
    plain_name, grow_name = disk.node_disk_name(t), disk.node_disk_name(t, 2 * GiB)
    assert plain_name == "disk-m1.small.raw" and grow_name != plain_name
    plain = disk.node_disk(image, tmp_path / plain_name, t)
    grow = disk.node_disk(image, tmp_path / grow_name, t, free_after_root=2 * GiB)
    assert _table(plain)[1]["start"] == _table(plain)[0]["start"] + _table(plain)[0]["size"]  # no gap
    assert _table(grow)[1]["start"] > _table(grow)[0]["start"] + _table(grow)[0]["size"]
    made = grow.stat().st_mtime_ns
    assert disk.node_disk(image, tmp_path / grow_name, t, free_after_root=2 * GiB).stat().st_mtime_ns == made
    # the same file asked for with another layout is made again, not reused
    again = disk.node_disk(image, tmp_path / grow_name, t, free_after_root=1 * GiB)
    p1, p2, _ = _table(again)
    assert (p2["start"] - p1["start"] - p1["size"]) * 512 == 1 * GiB
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.swap"))


def test_the_recipe_option_reaches_the_verification_options():
    assert LocalOptions.from_recipe({"free_after_root": "2G"}, user="debian").free_after_root == 2 * GiB
    assert LocalOptions.from_recipe({"free_after_root": "512M"}, user="debian").free_after_root == 512 * MiB
    assert LocalOptions.from_recipe({}, user="debian").free_after_root == 0


def _validate(tmp_path: Path, verify: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"name: demo\nrelease: debian/bookworm\nverify:\n  {verify}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("BAKE_ELEMENTS_PATH", "BAKE_MIRROR")}
    return subprocess.run([BAKE, "validate", str(recipe)], capture_output=True, text=True, env=env)


def test_bake_validate_takes_a_size_and_refuses_anything_else(tmp_path):
    ok = _validate(tmp_path, "free_after_root: 2G")
    assert ok.returncode == 0, ok.stderr
    bad = _validate(tmp_path, "free_after_root: 2GB")
    assert bad.returncode == 3
    assert "verify.free_after_root: expected a size such as 2G or 512M" in bad.stderr and '"2GB"' in bad.stderr
