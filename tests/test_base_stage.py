"""The first stage of a recipe whose base is an image, run for real by `bake build
--stop-after bootstrap` on small bases the tests make: a UEC tarball and a compressed
qcow2 disk whose partition is larger than its filesystem. What build.json records of the
base, and that the root tree cached is the base's, by the host path and by libguestfs."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from base_fixtures import fs_image, qcow2_disk, special_tree, uec_tarball
from builder.base.extfs import fs_facts
from builder.core.record import sha256_file
from conftest import BAKE

pytestmark = pytest.mark.bakes


def bake_bootstrap(tmp_path: Path, base: dict, env: dict | None = None) -> dict:
    recipe = tmp_path / "evolve.yml"
    recipe.write_text(yaml.safe_dump({"name": "evolve", "release": "debian/bookworm", "base": base}))
    environ = {**os.environ, "BAKE_CACHE": str(tmp_path / "cache"), **(env or {})}
    r = subprocess.run([BAKE, "build", str(recipe), "--stop-after", "bootstrap", "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=900, env=environ)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((Path(r.stdout.strip().splitlines()[-1]) / "build.json").read_text())


@pytest.fixture(scope="module")
def base_image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    return fs_image(special_tree(folder / "tree"), folder / "base.img", label="uec-rootfs")


def cached_names(tmp_path: Path, key: str) -> set[str]:
    with tarfile.open(tmp_path / "cache" / "base" / f"{key}.tar") as t:
        return {n.removeprefix("./") for n in t.getnames()}


def test_a_uec_tarball_is_recorded_with_its_members_and_its_tree_cached(base_image, tmp_path):
    tarball = uec_tarball(tmp_path, "lucid-server-uec-amd64", base_image)
    data = bake_bootstrap(tmp_path, {"image": str(tarball)})
    base = data["base"]
    facts = fs_facts(base_image)
    assert base["type"] == "uec-tarball" and base["format"] == "tar.gz"
    assert base["members"] == {"image": "lucid-server-uec-amd64.img", "kernel": "lucid-server-uec-amd64-vmlinuz-virtual",
                               "ramdisk": "lucid-server-uec-amd64-initrd-virtual",
                               "loader": "lucid-server-uec-amd64-loader"}
    assert base["sha256"] == sha256_file(tarball)
    assert (base["distro"], base["release"]) == ("debian", "bookworm")
    assert base["filesystem"]["label"] == "uec-rootfs" and base["filesystem"]["uuid"] == facts.uuid
    assert base["opened_by"] == "host loop mount + tar"
    stage = data["stages"]["bootstrap"]
    assert stage["namespace"] == "base" and stage["cached"] is False
    names = cached_names(tmp_path, stage["key"])
    assert {"etc/os-release", "etc/fstab"} <= names


@pytest.mark.boots
def test_a_qcow2_disk_is_recorded_with_its_partition_and_opened_by_libguestfs_when_asked(base_image, tmp_path):
    disk = qcow2_disk(base_image, tmp_path / "disk.qcow2")
    data = bake_bootstrap(tmp_path, {"image": str(disk), "sha256": sha256_file(disk)},
                          env={"BAKE_BASE_OPEN": "guestfs"})
    base = data["base"]
    assert base["type"] == "disk" and base["format"] == "qcow2"
    assert base["partition"]["number"] == 1 and base["partition"]["start"] == 1 << 20
    assert base["partition"]["size"] > fs_facts(base_image).size       # the partition is larger than its filesystem
    assert base["filesystem"]["uuid"] == fs_facts(base_image).uuid
    assert base["opened_by"] == "libguestfs tar_out"
    assert "etc/os-release" in cached_names(tmp_path, data["stages"]["bootstrap"]["key"])


def test_a_second_bake_takes_the_base_from_the_cache(base_image, tmp_path):
    first = bake_bootstrap(tmp_path, {"image": str(base_image)})
    again = bake_bootstrap(tmp_path, {"image": str(base_image)})
    assert first["stages"]["bootstrap"]["cached"] is False
    assert again["stages"]["bootstrap"]["cached"] is True
    assert again["stages"]["bootstrap"]["key"] == first["stages"]["bootstrap"]["key"]
    assert again["base"]["opened_by"] == "cache (opened by host loop mount + tar)"
    assert again["base"]["filesystem"] == first["base"]["filesystem"]


@pytest.mark.boots
def test_a_root_on_lvm_which_the_host_cannot_read_is_copied_out_by_libguestfs(tmp_path):
    """A qcow2 disk whose root filesystem is a logical volume (made inside the libguestfs
    appliance: this host has no device-mapper): no partition holds an ext root, so
    libguestfs's inspection finds it and copies it out; the tree is the one put in."""
    from builder.base import appliance
    from builder.core import sh

    tree = special_tree(tmp_path / "tree")
    (tree / "etc" / "hosts").write_text("127.0.0.1 localhost\n")      # what inspection looks for in a root
    (tree / "etc" / "fstab").write_text("/dev/vg0/root / ext4 defaults 0 1\n")
    packed = tmp_path / "tree.tar"
    sh.run(["tar", "--numeric-owner", "-C", tree, "-cf", packed, "."])
    raw = tmp_path / "lvm.raw"
    with open(raw, "wb") as f:
        f.truncate(160 << 20)
    with appliance.opened([raw], readonly=False, mount=False) as g:
        g.part_disk("/dev/sda", "mbr")
        g.pvcreate("/dev/sda1")
        g.vgcreate("vg0", ["/dev/sda1"])
        g.lvcreate("root", "vg0", 96)
        g.mkfs("ext4", "/dev/vg0/root", label="uec-rootfs")
        g.mount("/dev/vg0/root", "/")
        g.tar_in(str(packed), "/")
    disk = tmp_path / "lvm.qcow2"
    sh.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk])
    raw.unlink()

    data = bake_bootstrap(tmp_path, {"image": str(disk)})
    base = data["base"]
    assert base["type"] == "disk" and base["format"] == "qcow2"
    assert base["root_device"] == "/dev/vg0/root"
    assert base["filesystem"]["label"] == "uec-rootfs"
    assert (base["distro"], base["release"]) == ("debian", "bookworm")
    names = cached_names(tmp_path, data["stages"]["bootstrap"]["key"])
    assert {"etc/os-release", "etc/hosts"} <= names
    with tarfile.open(tmp_path / "cache" / "base" / f"{data['stages']['bootstrap']['key']}.tar") as t:
        fstab = t.extractfile("./etc/fstab").read().decode()
    assert fstab.splitlines()[0].startswith("LABEL=uec-rootfs\t/") or fstab.startswith("LABEL=uec-rootfs /"), fstab
