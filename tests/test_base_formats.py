"""builder.base.formats: what a base is, and bake's own exact copy of its filesystem.

Every base here is real: ext4 made with mkfs, tarballs laid out as Ubuntu published UEC
images, disks partitioned with sfdisk and converted with qemu-img.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from base_fixtures import (LONG_NAME, MiB, OS_RELEASE, boot_file, disk_image, fs_image, qcow2_disk,
                           raw_disk, scratch, special_tree, uec_tarball)
from builder.core import sh
from builder.base import extfs
from builder.base.disks import partitions
from builder.base.extfs import fs_facts, list_dir, read_file
from builder.base.formats import identify, sha256_of, unpack
from builder.core.record import Build, sha256_file
from builder.core.errors import BakeError


@pytest.fixture(scope="module")
def made():
    """A special tree, its ext4 image (label uec-rootfs) and a small ext4 image labelled
    "boot" holding no root tree."""
    with scratch() as d:
        tree = special_tree(d / "tree")
        base = fs_image(tree, d / "base.img")
        (d / "boot/grub").mkdir(parents=True)
        (d / "boot/grub/grub.cfg").write_text("set timeout=0\n")
        boot = fs_image(d / "boot", d / "boot.img", label="boot", size=32 * MiB)
        yield {"dir": d, "tree": tree, "base": base, "sha": sha256_file(base), "boot": boot}


@pytest.fixture
def work():
    with scratch("bake-test-work-") as d:
        yield d


def is_sparse(path: Path) -> bool:
    st = os.stat(path)
    return st.st_blocks * 512 < st.st_size


# --- UEC tarballs -------------------------------------------------------------------

def test_a_lucid_uec_tarball_is_an_image_and_a_kernel(made, work):
    tarball = uec_tarball(work, "lucid-server-uec-amd64", made["base"], initrd=False, loader=False)
    source = identify(tarball)
    assert (source.kind, source.format) == ("uec-tarball", "tar.gz")
    assert source.members == {"image": "lucid-server-uec-amd64.img",
                              "kernel": "lucid-server-uec-amd64-vmlinuz-virtual"}
    got = unpack(source, work / "unpacked")
    assert sha256_file(got.image) == made["sha"]
    assert is_sparse(got.image)
    assert got.kernel.read_bytes() == boot_file("lucid-server-uec-amd64", "kernel")
    assert (got.ramdisk, got.loader, got.partition) == (None, None, None)
    assert (got.fs.type, got.fs.label) == ("ext4", "uec-rootfs")
    assert sha256_of(source) == sha256_file(tarball)


def test_a_later_uec_tarball_adds_ramdisk_and_loader_and_its_floppy_is_ignored(made, work):
    name = "maverick-server-uec-amd64"
    tarball = uec_tarball(work, name, made["base"])
    source = identify(tarball)
    assert source.members == {"image": f"{name}.img", "kernel": f"{name}-vmlinuz-virtual",
                              "ramdisk": f"{name}-initrd-virtual", "loader": f"{name}-loader"}
    got = unpack(source, work / "unpacked")
    assert sha256_file(got.image) == made["sha"]
    for role in ("kernel", "ramdisk", "loader"):
        assert getattr(got, role).read_bytes() == boot_file(name, role)
    assert sorted(p.name for p in (work / "unpacked").iterdir()) == sorted(
        ["base.img", f"{name}-vmlinuz-virtual", f"{name}-initrd-virtual", f"{name}-loader"])


def test_a_tarball_without_an_image_member_is_refused(made, work):
    import tarfile
    bad = work / "kernel-only.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(made["tree"] / "boot/vmlinuz-6.1.0-99-amd64", arcname="x-vmlinuz-virtual")
    with pytest.raises(BakeError, match=r"without a partition image \(no \*\.img member\)"):
        identify(bad)


def test_a_tarball_whose_image_is_a_disk_says_so(made, work):
    disk = raw_disk(made["base"], work / "disk1.img")
    tarball = uec_tarball(work, "cloud", disk, initrd=False, loader=False)
    with pytest.raises(BakeError, match="its image cloud.img is no bare ext2/ext3/ext4 filesystem"):
        unpack(identify(tarball), work / "unpacked")
    assert list((work / "unpacked").iterdir()) == []


# --- disks --------------------------------------------------------------------------

def test_a_compressed_qcow2_partition_larger_than_its_filesystem_gives_exactly_the_filesystem(made, work):
    disk = qcow2_disk(made["base"], work / "disk.qcow2", extra_partition_space=8 * MiB)
    source = identify(disk)
    assert (source.kind, source.format) == ("disk", "qcow2")
    parts = partitions(disk, "qcow2", work / "scan")
    assert len(parts) == 1
    p = parts[0]
    assert (p.number, p.start, p.type, p.has_root) == (1, MiB, "83", True)
    assert p.fs.label == "uec-rootfs" and p.size > p.fs.size == os.path.getsize(made["base"])
    assert list((work / "scan").iterdir()) == [], "the converted raw disk is removed"

    got = unpack(source, work / "unpacked")
    assert sha256_file(got.image) == made["sha"]
    assert is_sparse(got.image)
    assert got.partition == p and got.kernel is None
    assert [x.name for x in (work / "unpacked").iterdir()] == ["base.img"]


@pytest.mark.parametrize("fmt", ["raw", "vmdk"])
def test_raw_and_vmdk_disks_unpack_the_same_bytes(made, work, fmt):
    disk = disk_image(made["base"], work / f"disk.{fmt}", fmt=fmt)
    source = identify(disk)
    assert (source.kind, source.format) == ("disk", fmt)
    assert sha256_file(unpack(source, work / "unpacked").image) == made["sha"]


def test_a_qcow2_of_a_bare_filesystem_is_one_whole_disk_partition_numbered_0(made, work):
    disk = work / "bare.qcow2"
    sh.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", made["base"], disk])
    source = identify(disk)
    [p] = partitions(disk, source.format, work / "scan")
    assert (p.number, p.start, p.size, p.has_root) == (0, 0, 64 * MiB, True)
    assert sha256_file(unpack(source, work / "unpacked").image) == made["sha"]


def test_a_partition_is_chosen_by_number_or_by_label_on_a_gpt_disk(made, work):
    disk = raw_disk([made["boot"], made["base"]], work / "disk.raw", table="gpt")
    source = identify(disk)
    parts = partitions(disk, "raw", work)
    assert [(p.number, p.fs.label, p.has_root) for p in parts] == [(1, "boot", False), (2, "uec-rootfs", True)]
    assert parts[0].type == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    boot_sha = sha256_file(made["boot"])
    for wanted, number, sha in (("auto", 2, made["sha"]), (2, 2, made["sha"]), ("uec-rootfs", 2, made["sha"]),
                                (1, 1, boot_sha), ("boot", 1, boot_sha)):
        got = unpack(source, work / str(wanted), partition=wanted)
        assert got.partition.number == number and sha256_file(got.image) == sha, wanted


def test_a_wrong_partition_is_an_error_naming_the_partitions(made, work):
    disk = raw_disk([made["boot"], made["base"]], work / "disk.raw")
    source = identify(disk)
    for wanted, says in ((3, "no partition 3"), ("nope", "no partition's filesystem is labelled 'nope'")):
        with pytest.raises(BakeError) as e:
            unpack(source, work / "unpacked", partition=wanted)
        assert says in str(e.value)
        assert "1 (ext4 'boot', 32 MiB)" in str(e.value) and "2 (ext4 'uec-rootfs', 64 MiB, root tree)" in str(e.value)
    assert not (work / "unpacked/base.img").exists()


def test_auto_refuses_a_disk_with_two_root_trees_or_none(made, work):
    two = identify(raw_disk([made["base"], made["base"]], work / "two.raw"))
    with pytest.raises(BakeError, match=r"2 partitions hold a root tree: 1 .*; 2 .*partition: NUMBER"):
        unpack(two, work / "unpacked")
    with pytest.raises(BakeError, match="2 filesystems are labelled 'uec-rootfs'"):
        unpack(two, work / "unpacked", partition="uec-rootfs")
    assert unpack(two, work / "unpacked", partition=2).partition.number == 2

    none = identify(raw_disk([made["boot"]], work / "none.raw"))
    with pytest.raises(BakeError, match=r"no partition holds a root tree .*its partitions: 1 \(ext4 'boot'"):
        unpack(none, work / "unpacked")


# --- bare filesystems and build folders ---------------------------------------------

def test_a_bare_image_is_a_filesystem_with_its_label_and_uuid(made, work):
    source = identify(made["base"])
    assert (source.kind, source.format, source.members) == ("filesystem", "ext4", {})
    facts = fs_facts(made["base"])
    blkid = sh.output(["blkid", "-p", "-o", "value", "-s", "UUID", made["base"]])
    assert (facts.label, facts.uuid, facts.block_size) == ("uec-rootfs", blkid, 4096)
    assert facts.size == 64 * MiB and "metadata_csum" in facts.features
    assert sha256_of(source) == made["sha"]


def test_an_image_file_longer_than_its_filesystem_is_cut_at_the_filesystem_end(made, work):
    longer = work / "longer.img"
    shutil.copyfile(made["base"], longer)
    with open(longer, "ab") as f:
        f.write(b"trailing bytes that are no part of the filesystem" * 100)
    got = unpack(identify(longer), work / "unpacked")
    assert sha256_file(got.image) == made["sha"]


@pytest.mark.parametrize("fs", ["ext2", "ext3"])
def test_ext2_and_ext3_are_told_apart(made, work, fs):
    img = fs_image(made["dir"] / "boot", work / f"{fs}.img", label=fs, size=32 * MiB, fs=fs)
    assert identify(img).format == fs
    assert fs_facts(img).type == fs


def test_a_build_folder_gives_its_partition_image_kernel_and_ramdisk(made, work):
    build = Build.create(work / "output", "evolved", build_id="b1")
    shutil.copyfile(made["base"], build.dir / "evolved.img")
    (build.dir / "vmlinuz-6.1.0-99-amd64").write_bytes(b"kernel")
    (build.dir / "initrd.img-6.1.0-99-amd64").write_bytes(b"ramdisk")
    build.record_output("kernel", build.dir / "vmlinuz-6.1.0-99-amd64")
    build.record_output("ramdisk", build.dir / "initrd.img-6.1.0-99-amd64")
    build.record_output("image", build.dir / "evolved.img")
    source = identify(build.dir)
    assert (source.kind, source.format) == ("build", "build")
    assert source.members == {"image": "evolved.img", "kernel": "vmlinuz-6.1.0-99-amd64",
                              "ramdisk": "initrd.img-6.1.0-99-amd64"}
    assert sha256_of(source) == made["sha"]
    got = unpack(source, work / "unpacked")
    assert sha256_file(got.image) == made["sha"] and is_sparse(got.image)
    assert (got.kernel.read_bytes(), got.ramdisk.read_bytes(), got.loader) == (b"kernel", b"ramdisk", None)


def test_partition_only_applies_to_disks(made, work):
    with pytest.raises(BakeError, match="only applies to disk images; this is a filesystem"):
        unpack(identify(made["base"]), work, partition=1)


# --- what is not a base -------------------------------------------------------------

def test_anything_else_is_a_clear_error(work):
    with pytest.raises(BakeError, match="no such file or folder"):
        identify(work / "missing.img")
    (work / "noise").write_bytes(bytes(range(1, 256)) * 40)
    with pytest.raises(BakeError, match=r"noise: unknown format: not a bare ext2/3/4 filesystem image, a disk"):
        identify(work / "noise")
    (work / "image.img.gz").write_bytes(gzip.compress(b"not a tar archive" * 100))
    with pytest.raises(BakeError, match="a gzip file that is not a whole tar archive"):
        identify(work / "image.img.gz")
    (work / "folder").mkdir()
    with pytest.raises(BakeError, match=r"not a build directory \(no build.json\)"):
        identify(work / "folder")
    with pytest.raises(BakeError, match="not an ext2/ext3/ext4 filesystem"):
        fs_facts(work / "noise")


# --- growing and reading ------------------------------------------------------------

def test_grow_adds_the_space_and_the_filesystem_checks_clean(made, work):
    img = work / "grown.img"
    shutil.copyfile(made["base"], img)
    before = fs_facts(img)
    extfs.grow(img, 16 * MiB)
    after = fs_facts(img)
    assert after.size == before.size + 16 * MiB == os.path.getsize(img)
    assert (after.uuid, after.label) == (before.uuid, before.label)
    assert sh.run(["e2fsck", "-f", "-n", img], check=False).returncode == 0
    assert read_file(img, "/etc/os-release") == OS_RELEASE


def test_read_file_follows_symlinks_inside_the_image(made):
    base = made["base"]
    assert read_file(base, "/etc/os-release") == OS_RELEASE                  # ../usr/lib/os-release
    assert read_file(base, "/bin/sh") == b"#!fake shell\n"                   # /bin -> usr/bin
    assert read_file(base, "/sbin/init") == (made["tree"] / "usr/lib/systemd/systemd").read_bytes()
    assert read_file(base, "/etc/long-link") == b"reached through a slow symlink\n"
    assert read_file(base, '/etc/say "hi"') == b"quoted\n"
    assert read_file(base, "/var/sparse") == (made["tree"] / "var/sparse").read_bytes()
    assert read_file(base, "/etc/dangling") is None
    assert read_file(base, "/etc/missing") is None
    assert read_file(base, "/etc") is None
    assert LONG_NAME in list_dir(base, "/usr/lib")


def test_list_dir_finds_kernels_and_module_folders(made):
    base = made["base"]
    assert list_dir(base, "/boot") == ["initrd.img-6.1.0-99-amd64", "vmlinuz-6.1.0-99-amd64"]
    assert list_dir(base, "/lib/modules") == ["6.1.0-99-amd64"]             # /lib -> usr/lib
    assert list_dir(base, "/nowhere") is None
    assert list_dir(base, "/etc/empty") is None
