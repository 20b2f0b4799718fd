"""Evolving existing images, end to end: real bakes from a base image, real QEMU boots.

The base is a plain bookworm image made for the test (kernel, systemd, networking and
the end-of-boot line; no SSH server, no metadata element, no sync agent; label
uec-rootfs). Evolved with openssh-server and the acpiphp, ec2-metadata and sync-agent
elements it passes every check but the sync agent's round trip, and holds the agent
installed and enabled as the demo's (whose verification makes that round trip with the
same element and parameters, through the same customizer; tests/test_verify.py shows
the metadata and sync-agent checks failing on images that break their promises). A
second case evolves the demo build the run bakes anyway, with the base's own kernel and
ramdisk, and boots it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from builder.base.extfs import list_dir, read_file
from builder.core import sh
from builder.core.record import Build
from builder.customize import scrub
from conftest import BAKE, TEST_OUTPUT
from eucalyptus_standin.fixtures import euca4  # noqa: F401  (a fixture)
from vm_builds import kill_qemu_under, leftovers

pytestmark = pytest.mark.bakes

OUT = TEST_OUTPUT / "base-e2e"
# the evolved base's checks: the sync agent's round trip (two boots, four to five minutes
# here) is made on the demo build, whose agent is the same element with the same
# parameters; the evolved image is shown to hold that agent, installed and enabled
EVOLVED_CHECKS = "boots,metadata,acpiphp,volume-hotplug"


def bake(*args: str, timeout: float = 2400) -> subprocess.CompletedProcess:
    return subprocess.run([BAKE, *args], capture_output=True, text=True, timeout=timeout)


def write_recipe(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bake_image(recipe: Path) -> Build:
    """`bake build RECIPE --stop-after image` into this module's output; the build."""
    r = bake("build", str(recipe), "--stop-after", "image", "--output", str(OUT))
    assert r.returncode == 0, r.stderr[-4000:]
    builds = sorted((OUT / yaml.safe_load(recipe.read_text())["name"]).iterdir(), key=lambda p: p.stat().st_mtime)
    return Build.load(builds[-1])


def verify(build: Build, checks: str, *extra: str) -> tuple[int, dict[str, str], str]:
    """`bake verify BUILD --checks ... --json`: (exit status, status by check, stderr)."""
    try:
        r = bake("verify", str(build.dir), "--checks", checks, "--json", *extra, timeout=1800)
    finally:
        kill_qemu_under(build.dir)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return r.returncode, {c["name"]: c["status"] for c in report.get("checks", [])}, r.stderr


@pytest.fixture(scope="module")
def handmade_base(tmp_path_factory) -> Build:
    """A plain bookworm image: bake's base and kernel elements only, label uec-rootfs."""
    folder = tmp_path_factory.mktemp("handmade")
    recipe = write_recipe(folder, {"name": "handmade-base", "release": "debian/bookworm", "variant": "minbase",
                                   "label": "uec-rootfs", "size": "auto", "headroom": "128M",
                                   "commands": BOOTED, "scrub": {"skip": list(BOOTED_BY)}})
    return bake_image(recipe)


# What a base that has booted and been logged into carries, and the scrub operations
# that remove each (the handmade base skips them, so that it keeps what the commands left)
BOOTED = ["mkdir -p /etc/ssh && echo 'the base host key' > /etc/ssh/ssh_host_ed25519_key",
          "echo 0123456789abcdef0123456789abcdef > /etc/machine-id",
          "mkdir -p /var/lib/cloud/instances/i-base && echo '#!/bin/sh' > /var/lib/cloud/instances/i-base/user-data.txt",
          "echo 'cat /etc/shadow' > /root/.bash_history"]
BOOTED_BY = {"ssh-hostkeys": "/etc/ssh/ssh_host_ed25519_key", "machine-id": "/etc/machine-id",
             "cloud-init-state": "/var/lib/cloud/instances/i-base/user-data.txt", "shell-history": "/root/.bash_history"}


def debugfs(image: Path, request: str, path: str) -> str:
    """What debugfs's `request` (cat, stat) of `path` prints, read-only."""
    return subprocess.run(["debugfs", "-R", f"{request} {path}", str(image)], capture_output=True, text=True).stdout


def image_file(image: Path, path: str) -> str:
    data = read_file(image, path)
    assert data is not None, f"{path} is not in {image}"
    return data.decode()


@pytest.mark.boots
def test_the_evolved_base_passes_every_check_and_holds_the_sync_agent(handmade_base, tmp_path):
    recipe = write_recipe(tmp_path, {
        "name": "evolved-base", "release": "debian/bookworm",
        "base": {"image": str(handmade_base.dir)},
        "packages": ["openssh-server"],
        "elements": ["acpiphp", "ec2-metadata", {"name": "sync-agent", "with": {"label": "rootsync", "interval": 5}}],
    })
    build = bake_image(recipe)
    skipped = handmade_base.data["stages"]["customize"]["scrub"]["skipped"]
    assert skipped == dict.fromkeys(BOOTED_BY, "skipped by the recipe")
    for path in BOOTED_BY.values():   # the base carries them: its recipe skipped what removes them
        assert debugfs(handmade_base.output_path("image"), "cat", path).strip(), path
    base = build.data["base"]
    assert base["type"] == "build" and base["source"] == str(handmade_base.dir)
    assert (base["distro"], base["release"]) == ("debian", "bookworm")
    assert base["filesystem"]["label"] == "uec-rootfs"
    assert base["opened_by"] == "host loop mount + tar"
    assert base["sha256"] == handmade_base.data["outputs"]["image"]["sha256"]
    assert build.data["filesystem"]["label"] == "uec-rootfs"          # the base's label is kept
    image = build.output_path("image")
    fstab = image_file(image, "/etc/fstab")
    assert "LABEL=uec-rootfs\t/" in fstab or "LABEL=uec-rootfs /" in fstab, fstab
    names = {p["name"] for p in build.data["packages"]}
    assert {"openssh-server", "rsync", "inotify-tools"} <= names
    assert "openssh-server" not in {p["name"] for p in handmade_base.data["packages"]}

    scrubbed = build.data["stages"]["customize"]["scrub"]
    assert (scrubbed["ran"], scrubbed["skipped"]) == (list(scrub.NAMES), {})
    # read with e2fsprogs' debugfs, not bake's own reader
    assert "Inode:" in debugfs(image, "stat", "/etc/machine-id") and debugfs(image, "cat", "/etc/machine-id") == ""
    for path in (p for p in BOOTED_BY.values() if p != "/etc/machine-id"):
        assert "Inode:" not in debugfs(image, "stat", path), f"{path} is still in the evolved image"
    assert "Inode:" not in debugfs(image, "stat", "/var/lib/cloud/instances")

    conf = image_file(image, "/etc/rootsync.conf").splitlines()
    assert {"label=rootsync", "interval=5"} <= set(conf), conf
    assert image_file(image, "/usr/sbin/rootsync").startswith("#!/bin/sh")
    units = "/etc/systemd/system"
    for wants, unit in (("multi-user.target.wants", "rootsync-watch.service"),
                        ("multi-user.target.wants", "rootsync-attach.service"),
                        ("timers.target.wants", "rootsync-backup.timer")):
        assert unit in (list_dir(image, f"{units}/{wants}") or []), f"{unit} is not enabled in {wants}"
        assert "ExecStart=/usr/sbin/rootsync " in image_file(image, f"{units}/{unit.replace('.timer', '.service')}")
    assert "rootsync" in image_file(image, "/etc/udev/rules.d/90-rootsync.rules")

    status, checks, err = verify(build, EVOLVED_CHECKS)
    assert checks == dict.fromkeys(EVOLVED_CHECKS.split(","), "pass"), err[-4000:]
    assert status == 0
    assert not leftovers(build.dir)


@pytest.mark.boots
def test_evolving_the_demo_build_keeps_its_label_takes_its_kernel_and_adds_what_the_recipe_asks(demo_build,
                                                                                                  tmp_path):
    """`kernel: from-source`: the trio's kernel and ramdisk are the base's own, and the
    evolved image boots with them."""
    marker = tmp_path / "evolved.txt"
    marker.write_text("evolved from the demo build\n")
    recipe = write_recipe(tmp_path, {
        "name": "evolved-demo", "release": "debian/bookworm",
        "base": {"image": str(demo_build.dir), "sha256": demo_build.data["outputs"]["image"]["sha256"],
                 "kernel": "from-source"},
        "packages": ["less"],
        "files": [{"source": str(marker), "dest": "/etc/evolved.txt", "mode": "0644"}],
        "verify": {"checks": [{"name": "evolved", "run": "cat /etc/evolved.txt", "expect": "from the demo build"}]},
    })
    build = bake_image(recipe)
    assert build.data["base"]["type"] == "build"
    assert build.data["filesystem"]["label"] == demo_build.data["filesystem"]["label"]
    for role in ("kernel", "ramdisk"):
        assert build.data["outputs"][role]["sha256"] == demo_build.data["outputs"][role]["sha256"], role
    assert build.data["kernel_version"] == demo_build.data["kernel_version"]
    assert ".bake-source-boot" not in list_dir(build.output_path("image"), "/")
    status, checks, err = verify(build, "boots,metadata,recipe:evolved", "--user", "debian")
    assert checks == {"boots": "pass", "metadata": "pass", "recipe:evolved": "pass"}, err[-4000:]
    assert status == 0


def test_a_pinned_base_that_changed_is_refused_before_anything_is_built(demo_build, tmp_path):
    recipe = write_recipe(tmp_path, {
        "name": "pinned-wrong", "release": "debian/bookworm",
        "base": {"image": str(demo_build.dir), "sha256": "0" * 64},
    })
    r = bake("build", str(recipe), "--stop-after", "bootstrap", "--output", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "not the " + "0" * 64 + " the recipe pins" in r.stderr


def test_a_base_of_another_release_is_refused_naming_both(demo_build, tmp_path):
    recipe = write_recipe(tmp_path, {
        "name": "wrong-release", "release": "debian/bullseye",
        "base": {"image": str(demo_build.dir)},
    })
    r = bake("build", str(recipe), "--stop-after", "bootstrap", "--output", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "is debian/bookworm, but the recipe says release: debian/bullseye" in r.stderr
    assert not sh.mounts_under(tmp_path)


@pytest.mark.boots
@pytest.mark.e2e
def test_an_emi_published_from_a_build_is_evolved_in_place_and_boots(demo_build, euca4, tmp_path):
    """Publish the demo build to the Eucalyptus stand-in, then a recipe whose base is its
    EMI, changed in place through libguestfs (`method: guestfs`): downloaded and
    decrypted with the account's own key, a file added, booted and checked."""
    import secrets
    import shutil

    from builder.bundle.keys import BundleKeys
    from builder.cloud.credentials import load_credentials
    from builder.cloud.publish import PublishOptions, publish
    from builder.bundle.build import bundle_build

    source = Build.create(tmp_path / "published", "debian-demo")
    for role in ("kernel", "ramdisk", "image"):
        src = demo_build.output_path(role)
        shutil.copy2(src, source.dir / src.name)
        source.record_output(role, source.dir / src.name)
    source.set("arch", "x86_64")
    i = euca4.identity
    bundle_build(source, BundleKeys(user_id=i.account_id, cert=i.user_cert, private_key=i.user_key,
                                    cloud_cert=i.cloud_cert))
    creds = load_credentials({"eucarc": str(euca4.eucarc)}, environ={})
    emi = publish(source, creds, PublishOptions(bucket="evolve-" + secrets.token_hex(4)))["image_id"]
    shutil.rmtree(source.dir)                     # the cloud's copy is the only one now

    marker = tmp_path / "from-the-cloud.txt"
    marker.write_text("evolved from an EMI\n")
    recipe = write_recipe(tmp_path, {
        "name": "evolved-emi", "release": "debian/bookworm",
        "base": {"emi": emi, "method": "guestfs", "grow": "32M"},
        "files": [{"source": str(marker), "dest": "/etc/from-the-cloud.txt", "mode": "0644"}],
        "publish": {"eucarc": str(euca4.eucarc)},
        "verify": {"checks": [{"name": "evolved", "run": "cat /etc/from-the-cloud.txt", "expect": "from an EMI"}]},
    })
    build = bake_image(recipe)
    base = build.data["base"]
    assert (base["source"], base["emi"]) == (f"emi:{emi}", emi)
    assert base["sha256"] == demo_build.data["outputs"]["image"]["sha256"]
    assert base["opened_by"] == "libguestfs in place"
    assert build.data["stages"]["customize"]["method"] == "guestfs"
    status, checks, err = verify(build, "boots,metadata,recipe:evolved", "--user", "debian")
    assert checks == {"boots": "pass", "metadata": "pass", "recipe:evolved": "pass"}, err[-4000:]
    assert status == 0
    assert not leftovers(build.dir)
