"""What bake reads from a base image and decides before opening it: its release, its
kernel's version, its packages, its fstab's root entry, and the plan of a recipe with a
base (no root, no network, no libguestfs)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import yaml

from builder.base.source import check_release, kernel_version, release_of
from builder.core.errors import BakeError
from builder.pipeline.plan import make_plan
from builder.pipeline.table import plan_build
from builder.recipe.recipe import load_recipe
from builder.image.boot import dpkg_status_packages
from builder.pipeline.stages.baseimage import fstab_by_label

BOOKWORM_OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n' \
                      'VERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n'
LUCID_LSB = "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=10.04\nDISTRIB_CODENAME=lucid\nDISTRIB_DESCRIPTION=\"Ubuntu 10.04.4 LTS\"\n"


@pytest.mark.parametrize("os_release, lsb, debian_version, want", [
    (BOOKWORM_OS_RELEASE, None, "12.8\n", ("debian", "bookworm")),
    (None, LUCID_LSB, "squeeze/sid\n", ("ubuntu", "lucid")),                    # Lucid: no os-release
    ('NAME="Debian GNU/Linux"\nVERSION_ID="11"\nID=debian\n', None, None, ("debian", "bullseye")),
    ('NAME="Ubuntu"\nVERSION="12.04.5 LTS, Precise Pangolin"\nID=ubuntu\nVERSION_ID="12.04"\n',
     "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=12.04\n", None, ("ubuntu", "precise")),
    (None, None, "10.13\n", ("debian", "buster")),
    (None, None, "trixie/sid\n", ("debian", "trixie")),
    (None, None, None, None),
])
def test_the_release_comes_from_os_release_then_lsb_release_then_debian_version(os_release, lsb, debian_version,
                                                                                  want):
    assert release_of(os_release, lsb, debian_version) == want


def recipe_file(tmp_path: Path, **data) -> Path:
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * 4096)
    doc = {"name": "evolved", "release": "debian/bookworm", "base": {"image": "base.img"}, **data}
    p = tmp_path / "evolved.yml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_a_base_of_another_release_is_refused_naming_both(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path))
    with pytest.raises(BakeError, match=r"base x is ubuntu/lucid, but the recipe says release: debian/bookworm; "
                                        r"set release: ubuntu/lucid"):
        check_release(recipe, ("ubuntu", "lucid"), "base x")
    with pytest.raises(BakeError, match="cannot tell which release it is"):
        check_release(recipe, None, "base x")
    check_release(recipe, ("debian", "bookworm"), "base x")


def bzimage(version: str) -> bytes:
    """The first bytes of a bzImage: the setup header's magic and the pointer to the
    version string, as the boot protocol lays them out."""
    data = bytearray(0x800)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = struct.pack("<H", 0x400)
    text = f"{version} (debian-kernel@lists.debian.org) #1 SMP\0".encode()
    data[0x600:0x600 + len(text)] = text
    return bytes(data)


def test_a_kernel_announces_its_version_in_its_setup_header(tmp_path):
    k = tmp_path / "vmlinuz"
    k.write_bytes(bzimage("2.6.32-38-virtual"))
    assert kernel_version(k) == "2.6.32-38-virtual"
    k.write_bytes(b"not a kernel" * 100)
    assert kernel_version(k) is None


def test_fstab_root_by_uuid_becomes_the_label_and_other_uuids_are_kept():
    fstab = ("# /etc/fstab\nUUID=1b2c-33\t/\text4\terrors=remount-ro\t0\t1\n"
             "UUID=77aa /srv ext4 defaults 0 2\nproc /proc proc defaults 0 0\n")
    new, others = fstab_by_label(fstab, "uec-rootfs", "ext4")
    assert new.splitlines()[1] == "LABEL=uec-rootfs\t/\text4\terrors=remount-ro\t0\t1"
    assert new.splitlines()[2:] == fstab.splitlines()[2:]
    assert others == ["UUID=77aa /srv ext4 defaults 0 2"]


def test_an_fstab_without_a_root_line_gets_one():
    new, others = fstab_by_label("proc /proc proc defaults 0 0", "cloudimg-rootfs", "ext4")
    assert new.splitlines() == ["proc /proc proc defaults 0 0",
                                "LABEL=cloudimg-rootfs\t/\text4\tdefaults,errors=remount-ro\t0\t1"]
    assert others == []


def test_installed_packages_come_from_the_dpkg_status_file():
    status = ("Package: openssh-server\nStatus: install ok installed\nArchitecture: amd64\n"
              "Source: openssh (1:9.2p1-2)\nVersion: 1:9.2p1-2+deb12u3\nDescription: x\n continued\n\n"
              "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
              "Package: less\nStatus: install ok installed\nVersion: 590-2\nArchitecture: amd64\n")
    assert dpkg_status_packages(status) == [
        {"name": "less", "version": "590-2", "arch": "amd64", "source": "less"},
        {"name": "openssh-server", "version": "1:9.2p1-2+deb12u3", "arch": "amd64", "source": "openssh",
         "source_version": "1:9.2p1-2"},
    ]


def test_the_plan_of_an_evolved_image_opens_the_base_and_keeps_its_kernel(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, packages=["openssh-server"]))
    plan = plan_build(recipe, tmp_path / "out")
    assert plan.bootstrap.namespace == "base" and not plan.bootstrap.hit
    assert dict(plan.stages)["bootstrap"] == "open base.img and take out its root tree"
    names = plan.package_names
    assert "openssh-server" in names
    assert recipe.kernel_package not in names        # the base's own kernel stays
    # the key follows the image's content
    key = plan.bootstrap.key
    (tmp_path / "base.img").write_bytes(b"\1" * 4096)
    assert make_plan(load_recipe(tmp_path / "evolved.yml"), tmp_path / "out").bootstrap.key != key


def test_the_plan_of_the_light_path_says_it_changes_the_image_in_place(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, elements=["acpiphp"]))
    recipe.data["base"]["method"] = "guestfs"
    stages = dict(plan_build(recipe, tmp_path / "out").stages)
    assert stages["customize"].startswith("in the image through libguestfs, no root")
    assert stages["bootstrap"] == "copy of base.img (auto partition), grown by 0M"


# --- a base whose kernel has acpiphp as a module ------------------------------------------

from test_distro_profiles import kernel_tree, mini_root, run_hook  # noqa: E402,F401  (mini_root: a fixture)


@pytest.mark.parametrize("init, loads_from", [("upstart", "etc/modules"),
                                              ("systemd", "etc/modules-load.d/acpiphp.conf")])
def test_a_base_whose_kernel_has_acpiphp_as_a_module_gets_it_loaded_at_boot(mini_root, tmp_path, init, loads_from):
    """base image → tree (host path) → the acpiphp element's hook in a chroot → image:
    the new image loads the module at boot, the way its init system reads."""
    from base_fixtures import fs_image
    from builder.base.extfs import read_file
    from builder.base.hostcopy import copy_tree
    from builder.image.filesystem import make_filesystem, tree_usage

    kernel_tree(mini_root, "2.6.32-38-virtual", "module")          # acpiphp.ko, not in modules.builtin
    base = fs_image(mini_root, tmp_path / "base.img", label="uec-rootfs")
    assert read_file(base, "/etc/modules") is None
    tree = tmp_path / "tree"
    copy_tree(base, tree)
    r = run_hook(tree, init)
    assert r.returncode == 0, r.stderr
    assert "acpiphp is a module in kernel 2.6.32-38-virtual; loading it at boot" in r.stdout
    image = tmp_path / "evolved.img"
    _, inodes = tree_usage(tree)
    make_filesystem(tree, image, fs="ext4", label="uec-rootfs", size=64 << 20, features=["has_journal", "extent"],
                    inodes=inodes)
    assert read_file(image, "/" + loads_from).decode().splitlines() == ["acpiphp"]
    assert read_file(image, "/etc/initramfs-tools/modules").decode().splitlines() == ["acpiphp"]
