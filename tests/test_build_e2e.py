"""The demo recipe baked for real (debootstrap, chroot, mkfs): what the trio and its
record must be. The boot under QEMU is in test_boot.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from builder.core import sh

from builder.core.record import sha256_file
from builder.customize import scrub
from builder.recipe.distro import profile_for
from conftest import REPO

pytestmark = pytest.mark.bakes


def debugfs_cat(image, path) -> str:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True)
    return r.stdout


def debugfs_ls(image, path) -> list[str]:
    """The names in folder `path` of the image, "." and ".." left out."""
    r = subprocess.run(["debugfs", "-R", f"ls -p {path}", str(image)], capture_output=True, text=True)
    names = [line.strip("/").split("/")[4] for line in r.stdout.splitlines() if line.startswith("/")]
    return [n for n in names if n not in (".", "..")]


def debugfs_exists(image, path) -> bool:
    r = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True)
    return "Inode:" in r.stdout


@pytest.fixture(scope="module")
def image(demo_build):
    return demo_build.output_path("image")


def test_build_record_lists_outputs_with_sizes_and_hashes(demo_build):
    rec = json.loads((demo_build.dir / "build.json").read_text())
    assert rec["result"] == "ok"
    for role in ("kernel", "ramdisk", "image"):
        out = rec["outputs"][role]
        path = demo_build.dir / out["path"]
        assert path.stat().st_size == out["size"] > 0
        assert sha256_file(path) == out["sha256"]
    assert rec["outputs"]["kernel"]["path"].startswith("vmlinuz-")
    assert rec["outputs"]["ramdisk"]["path"].startswith("initrd.img-")
    names = [e["name"] for e in rec["elements"]]
    assert names[:2] == ["base", "kernel"] and {"acpiphp", "ec2-metadata", "sync-agent"} <= set(names)
    pkgs = {p["name"]: p for p in rec["packages"]}
    for want in ("linux-image-cloud-amd64", "openssh-server", "rsync", "inotify-tools", "systemd-sysv", "sudo"):
        assert want in pkgs, want
    assert all(p["version"] and p["arch"] for p in rec["packages"])
    for stage in ("bootstrap", "customize", "image"):
        assert rec["stages"][stage]["seconds"] >= 0
    # where the work tree was (a tmpfs when the box had the memory), and that it is gone
    work = rec["work_tree"]
    assert work["why"] and (work["limit"] > 0 if work["in_memory"] else "limit" not in work), work
    assert not (demo_build.dir / "work").exists() and sh.mounts_under(demo_build.dir) == []
    # what it was made from, by digest: the recipe, bake's version, the host's tools
    inputs = rec["inputs"]
    assert inputs["recipe"]["sha256"] == sha256_file(REPO / "recipes" / "debian-demo.yml")
    assert inputs["files"] == [] and inputs["bake"]
    assert {"debootstrap", "e2fsprogs", "dpkg"} <= set(inputs["host_tools"]), inputs["host_tools"]


def test_partition_image_is_a_bare_labelled_filesystem_with_the_profiles_features(image):
    probe = subprocess.run(["blkid", "-p", "-o", "export", str(image)], capture_output=True, text=True).stdout
    fields = dict(line.split("=", 1) for line in probe.split())
    assert fields["TYPE"] == "ext4" and fields["LABEL"] == "cloudimg-rootfs"
    assert "PTTYPE" not in fields  # a partition image, not a disk
    subprocess.run(["e2fsck", "-f", "-n", str(image)], check=True, capture_output=True)
    header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    features = next(l for l in header.splitlines() if l.startswith("Filesystem features:")).split(":", 1)[1].split()
    assert set(features) == set(profile_for("debian/bookworm").mkfs_features("ext4"))


def test_image_mounts_root_by_label_and_gets_dhcp_on_eth0(image):
    fstab = debugfs_cat(image, "/etc/fstab")
    assert "LABEL=cloudimg-rootfs\t/\text4" in fstab
    assert "/dev/sda1" not in fstab and "/dev/vda1" not in fstab
    # systemd-networkd does DHCP on eth0; ifupdown is not installed
    network = debugfs_cat(image, "/etc/systemd/network/20-eth0.network")
    assert "[Match]\nName=eth0" in network and "DHCP=ipv4" in network and "UseHostname=no" in network
    assert debugfs_exists(image, "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service")
    assert not debugfs_exists(image, "/etc/network/interfaces")
    assert not debugfs_exists(image, "/sbin/ifup") and not debugfs_exists(image, "/usr/sbin/ifup")
    # names resolve through resolved's stub, fed by the DHCP lease; the build host's
    # resolver, used while customizing, is gone
    assert debugfs_exists(image, "/etc/systemd/system/dbus-org.freedesktop.resolve1.service")
    link = subprocess.run(["debugfs", "-R", "stat /etc/resolv.conf", str(image)], capture_output=True, text=True).stdout
    assert "Type: symlink" in link and 'Fast link dest: "../run/systemd/resolve/stub-resolv.conf"' in link, link
    assert debugfs_exists(image, "/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service")


def test_image_carries_nothing_of_the_build(image, demo_build):
    scrubbed = demo_build.data["stages"]["customize"]["scrub"]
    assert (scrubbed["ran"], scrubbed["skipped"]) == (list(scrub.NAMES), {}) and scrubbed["seconds"] > 0
    assert demo_build.data["image_mirror"] == demo_build.data["mirror"]   # no BAKE_MIRROR in this run
    assert debugfs_cat(image, "/etc/machine-id") == ""
    assert debugfs_ls(image, "/tmp") == debugfs_ls(image, "/var/tmp") == []
    assert debugfs_ls(image, "/var/lib/apt/lists") == ["partial"]
    assert [n for n in debugfs_ls(image, "/var/cache/apt/archives") if n.endswith(".deb")] == []
    assert not debugfs_exists(image, "/root/.bash_history") and not debugfs_exists(image, "/home/debian/.bash_history")
    assert debugfs_ls(image, "/var/lib/cloud") == []  # the demo has no cloud-init: none of its state either
    sources = debugfs_cat(image, "/etc/apt/sources.list")
    assert sources.startswith(f"deb {demo_build.data['image_mirror']} bookworm "), sources
    for leftover in ("/usr/sbin/policy-rc.d", "/usr/sbin/update-initramfs.distrib", "/tmp/bake",
                     "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key"):
        assert not debugfs_exists(image, leftover), leftover
    # update-initramfs is the real one again, not the build's no-op
    assert "exit 0" not in debugfs_cat(image, "/usr/sbin/update-initramfs").splitlines()[:5]
    assert "root:*:" in debugfs_cat(image, "/etc/shadow")


def test_default_user_has_passwordless_sudo(image):
    assert "debian ALL=(ALL) NOPASSWD:ALL" in debugfs_cat(image, "/etc/sudoers.d/90-bake-users")
    assert "debian:" in debugfs_cat(image, "/etc/passwd")


def test_ramdisk_carries_the_virtio_drivers(demo_build):
    listing = subprocess.run(["lsinitramfs", str(demo_build.output_path("ramdisk"))],
                             capture_output=True, text=True, check=True).stdout
    image = demo_build.output_path("image")
    builtin = debugfs_cat(image, f"/lib/modules/{demo_build.data['kernel_version']}/modules.builtin")
    for mod in ("virtio_pci", "virtio_blk"):
        assert f"/{mod}.ko" in listing or f"/{mod}.ko" in builtin, mod


def test_ramdisk_checks_the_root_filesystem_and_is_zstd(demo_build):
    # The root's type is given to initramfs-tools, so its fsck hook includes e2fsck and
    # the root is checked before it is mounted (systemd then skips its own check).
    ramdisk = demo_build.output_path("ramdisk")
    listing = subprocess.run(["lsinitramfs", str(ramdisk)], capture_output=True, text=True, check=True).stdout
    assert "usr/sbin/e2fsck" in listing or "sbin/e2fsck" in listing.split()
    assert "usr/sbin/fsck.ext4" in listing or "sbin/fsck.ext4" in listing.split()
    assert "FSTYPE=ext4" in debugfs_cat(demo_build.output_path("image"), "/etc/initramfs-tools/conf.d/bake-root-fstype")
    # zstd is installed in the image, so initramfs-tools compresses with it: after the
    # uncompressed early cpio (microcode, if any), the main archive starts with zstd's magic
    data = ramdisk.read_bytes()
    assert b"\x28\xb5\x2f\xfd" in data[:4 << 20], "the ramdisk has no zstd-compressed archive"
    assert "W: Couldn't identify type of root file system" not in (demo_build.dir / "initramfs.log").read_text()


def test_acpiphp_built_in_is_noted_and_nothing_written(demo_build, image):
    builtin = debugfs_cat(image, f"/lib/modules/{demo_build.data['kernel_version']}/modules.builtin")
    assert "kernel/drivers/pci/hotplug/acpiphp.ko" in builtin
    assert any("acpiphp is built into kernel" in n for n in demo_build.data["notes"])
    assert not debugfs_exists(image, "/etc/modules-load.d/acpiphp.conf")


def test_initramfs_is_generated_once(demo_build):
    # Package triggers (the kernel's postinst, initramfs-tools' trigger) asked for it and
    # were deferred; the one real generation ran at the end of customize.
    assert demo_build.data["stages"]["customize"]["initramfs_deferred"] >= 1
    log = (demo_build.dir / "initramfs.log").read_text()
    assert log.count("update-initramfs: Generating /boot/initrd.img-") == 1
    assert demo_build.output_path("ramdisk").stat().st_size > 1_000_000


def test_plan_says_the_caches_now_hit(demo_build):
    from builder.pipeline.plan import make_plan
    from builder.recipe.recipe import load_recipe
    from conftest import TEST_OUTPUT
    plan = make_plan(load_recipe(REPO / "recipes" / "debian-demo.yml"), TEST_OUTPUT)
    assert plan.bootstrap.hit and plan.checkpoint.hit
    assert plan.bootstrap.key == demo_build.data["stages"]["bootstrap"]["key"]
    assert plan.checkpoint.key == demo_build.data["stages"]["customize"]["checkpoint_key"]
