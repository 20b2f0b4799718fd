"""diskimage-builder's elements end to end: tests/recipes/dib-bookworm.yml baked for real
(devuser, cloud-init + cloud-init-datasources with Ec2, runtime-ssh-host-keys, growroot,
journal-to-console, and a test element using install-static) and verified under QEMU;
a second instance, on a disk with room after the root partition, is logged into as the
devuser with the test's key.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from builder import vm
from builder.vm import metadata
from dib_builds import OUT, bake, latest
from vm_builds import kill_qemu_under, leftovers, qemu_processes_under

pytestmark = [pytest.mark.e2e, pytest.mark.bakes]
FINGERPRINTS = ("-----BEGIN SSH HOST KEY FINGERPRINTS-----", "-----END SSH HOST KEY FINGERPRINTS-----")


def image_file(image: Path, path: str) -> str | None:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True)
    missing = "File not found" in r.stderr
    return None if missing else r.stdout


def image_ls(image: Path, path: str) -> list[str]:
    r = subprocess.run(["debugfs", "-R", f"ls -p {path}", str(image)], capture_output=True, text=True)
    return [line.split("/")[5] for line in r.stdout.splitlines() if line.count("/") >= 6]


def fingerprints(lines: list[str]) -> set[str]:
    """The SHA256 fingerprints cloud-init printed between its markers."""
    out, inside = set(), False
    for line in lines:
        if FINGERPRINTS[0] in line:
            inside = True
        elif FINGERPRINTS[1] in line:
            inside = False
        elif inside:
            out.update(re.findall(r"SHA256:[A-Za-z0-9+/]+", line))
    return out


@pytest.fixture(scope="module")
def dib_bake(dib_build):
    return dib_build


@pytest.mark.boots
def test_the_dib_image_passes_verification_with_cloud_init_and_user_data(dib_bake):
    build = dib_bake["build"]
    assert build.data["result"] == "ok"
    checks = build.data["verify"]["checks"]
    for name in ("boots", "metadata", "user-data", "acpiphp", "volume-hotplug",
                 "recipe:growroot-on-node-layout", "recipe:cloud-init-ec2"):
        assert checks[name] == "pass", (name, checks)
    report = json.loads((build.dir / "verify.json").read_text())
    ud = next(c for c in report["checks"] if c["name"] == "user-data")["evidence"]
    assert ud["marker"] == ud["token_served"]
    assert "status: done" in ud["cloud_init_status"] and ud["datasource"].startswith("Ec2")
    assert any("BEGIN SSH HOST KEY FINGERPRINTS" in line for line in ud["host_key_fingerprints"])
    served = [(q["method"], q["path"], q["status"]) for q in metadata.request_log(build.dir / "verify/a/metadata.json")]
    assert ("GET", "/2009-04-04/user-data", 200) in served
    assert ("GET", "/2009-04-04/meta-data/public-keys/0/openssh-key", 200) in served
    console = (build.dir / "verify" / "a" / "console.log").read_text().splitlines()
    assert fingerprints(console), "cloud-init printed the host key fingerprints on the console"
    stage = build.data["stages"]["customize"]["dib"]
    assert stage["phases"][:4] == ["extra-data.d", "pre-install.d", "install.d", "post-install.d"]
    assert "bake-target" in stage["elements"] and "debian-minimal" not in stage["elements"]
    notes = build.data.get("notes") or []
    assert any("ec2-metadata left out" in n for n in notes)


@pytest.mark.boots
def test_nothing_of_the_build_host_changed_or_went_into_the_image(dib_bake):
    assert dib_bake["host_changes"] == {"/etc": [], "/usr/share": []}
    image = dib_bake["build"].dir / "dib-bookworm.img"
    keys = image_file(image, "/home/ops/.ssh/authorized_keys")
    assert keys is not None and keys.split() == dib_bake["pub"].split()
    host_key_body = dib_bake["host_key"].split()[1].encode()
    with open(image, "rb") as f:
        while chunk := f.read(64 << 20):
            assert host_key_body not in chunk, "the build host's key is in the image"
    seen = image_file(image, "/etc/bake-test/seen-outside")
    assert "ssh-keys=hidden" in seen and "host-etc=read-only" in seen
    assert image_file(image, "/etc/bake-test/kernel-settings").strip() == "kernel-settings=read-only"
    assert image_file(image, "/etc/bake-test/x").startswith("written by extra-data.d for dib-bookworm")
    stat = subprocess.run(["debugfs", "-R", "stat /etc/bake-test/private", str(image)], capture_output=True,
                          text=True).stdout
    assert re.search(r"Mode:\s+0750", stat), stat
    assert image_file(image, "/etc/sudoers.d/ops").strip() == "ops ALL=(ALL) NOPASSWD:ALL"
    assert not [n for n in image_ls(image, "/etc/ssh") if n.startswith("ssh_host_")]
    assert "dib-python" not in image_ls(image, "/usr/local/bin")
    assert "in_target.d" not in image_ls(image, "/tmp")


@pytest.mark.boots
def test_a_second_instance_logs_in_as_ops_grows_root_and_has_its_own_host_keys(dib_bake, tmp_path):
    build = dib_bake["build"]
    trio = vm.Trio.from_build(build)
    accel = vm.choose_accel(trio.kernel, trio.ramdisk)
    gap = 1 << 30
    disk = vm.node_disk(trio.image, tmp_path / "disk.raw", vm.instance_type("m1.small"), free_after_root=gap)
    token = secrets.token_hex(8)
    try:
        with vm.launch(trio, disk, tmp_path, name="b", accel=accel, ssh_key=dib_bake["key"], ssh_user="ops") as inst:
            inst.wait_ready(timeout=600)
            inst.ssh.wait(timeout=300, what="SSH to accept the ops key devuser installed")
            assert inst.ssh.run("id -un; sudo -n true && echo sudo-ok", timeout=60).output.split() == ["ops", "sudo-ok"]
            size = int(inst.ssh.run("df -B1 --output=size / | tail -1", timeout=60).output.strip())
            assert size > build.data["filesystem"]["size"] + gap // 2, (size, build.data["filesystem"]["size"])
            # partition 1 grown up to the ephemeral partition, which follows the gap
            part, eph = inst.ssh.run("cat /sys/class/block/vda1/size /sys/class/block/vda2/start",
                                     timeout=60).output.split()
            assert int(part) * 512 == int(eph) * 512 - (1 << 20) == trio.image.stat().st_size + gap
            assert inst.ssh.run("systemctl is-active growroot.service", timeout=60, check=False).output.strip() == "active"
            inst.ssh.run(f"logger -t bake-journal-probe {token}", timeout=60)
            inst.console.wait_for(re.compile(rf"bake-journal-probe.*{token}"), timeout=120,
                                  what="the logged line forwarded by journald to the console")
            inst.console.wait_for(FINGERPRINTS[1], timeout=300, what="cloud-init's host key fingerprints")
            mine = fingerprints(inst.console.lines())
    finally:
        kill_qemu_under(tmp_path)
    theirs = fingerprints((build.dir / "verify" / "a" / "console.log").read_text().splitlines())
    assert mine and theirs and not mine & theirs, "two instances of the image have different host keys"
    assert not qemu_processes_under(tmp_path)
    assert not leftovers(tmp_path)


@pytest.mark.boots
def test_a_cached_rebuild_installs_the_new_key(dib_bake):
    key2, pub2 = vm.make_keypair(dib_bake["work"], "ops-key-2")
    dib_bake["ops_keys"].write_text(pub2 + "\n")
    r = bake("build", str(dib_bake["recipe"]), "--stop-after", "image", "--output", str(OUT), env=dib_bake["env"])
    assert r.returncode == 0, r.stderr[-4000:]
    rebuilt = latest("dib-bookworm")
    assert rebuilt.dir != dib_bake["build"].dir
    assert rebuilt.data["stages"]["customize"]["cached_packages"] is True
    keys = image_file(rebuilt.dir / "dib-bookworm.img", "/home/ops/.ssh/authorized_keys")
    assert keys.split() == pub2.split()


def test_python3_installed_for_dib_hooks_alone_is_removed_afterwards(tmp_path):
    """journal-to-console needs no package: python3 comes in for DIB's own tools
    (dib-python, package-installs) and goes again, as nothing installed needs it."""
    recipe = tmp_path / "dib-python-only.yml"
    recipe.write_text("name: dib-python-only\nrelease: debian/bookworm\nvariant: minbase\n"
                      "elements:\n  - dib: journal-to-console\nverify: {enabled: false}\n")
    r = bake("build", str(recipe), "--stop-after", "image", "--output", str(OUT), env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-4000:]
    build = latest("dib-python-only")
    customize = build.data["stages"]["customize"]
    stage = customize["dib"]
    # pre-install.d runs before the package checkpoint: not again when it is reused
    assert ("pre-install.d" in stage["phases"]) == (not customize["cached_packages"])
    assert "post-install.d" in stage["phases"]
    assert stage["notes"] == ["python3 removed after DIB's hooks (nothing installed needs it)"]
    names = {p["name"] for p in build.data["packages"]}
    assert "python3" not in names and not {n for n in names if n.startswith("python3.")}
    image = build.dir / "dib-python-only.img"
    assert image_file(image, "/etc/systemd/journald.conf.d/log-to-console.conf").split() == \
        ["[Journal]", "ForwardToConsole=true"]
