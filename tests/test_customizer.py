"""The customizer's operations (element hooks with their environment, the guard, static
files, users, files, commands) on a small real root tree: a few of the host's programs
with their libraries, a merged /usr, an empty dpkg database. The chroot backend runs
them in a chroot of it; the appliance backend, on a filesystem image made from the same
tree, leaves the same tree behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from builder.core import sh
from builder.core.errors import BakeError
from builder.customize import guestfs, scrub
from builder.customize.chroot import ChrootBackend
from builder.customize.customizer import Customizer, HookError
from builder.recipe.recipe import load_recipe
from host_programs import copy_programs

PROGRAMS = ("sh", "env", "mkdir", "cp", "chmod", "chown", "mv", "rm", "cat", "dirname", "id", "getent", "cut", "ls",
            "useradd", "usermod", "dpkg-divert", "find", "truncate", "sort")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBakeCustomizerTestKeyOnlyNotARealOne000000 alice@test"

HOOK = """#!/bin/sh
set -e
if /usr/sbin/policy-rc.d; then policy=0; else policy=$?; fi
echo "word=$PROBE_WORD image=$BAKE_IMAGE_NAME label=$BAKE_ROOT_LABEL init=$BAKE_INIT_SYSTEM policy=$policy" > /etc/probe-env
echo "dir=$BAKE_ELEMENT_DIR home=$HOME path=$PATH" >> /etc/probe-env
update-initramfs -u -k all
echo "bake-note: probed $PROBE_WORD"
"""

FINAL = """#!/bin/sh
set -e
if [ -e /usr/sbin/policy-rc.d ]; then echo guarded; else echo unguarded; fi > /etc/probe-final
"""


def small_root(root: Path) -> Path:
    """A root tree the host's own programs run in: PROGRAMS and their libraries, bin,
    sbin and lib as links into /usr, root's accounts, an empty dpkg database."""
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc/skel", "home", "root", "tmp", "proc", "sys",
              "dev/pts", "var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "sbin", "lib", "lib64"):
        (root / name).symlink_to(f"usr/{name}")
    copy_programs(root, PROGRAMS)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nadm:x:4:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\nadm:*::\n")
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/gshadow").chmod(0o640)
    shutil.copy("/etc/login.defs", root / "etc/login.defs")
    (root / "etc/nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\n")
    (root / "var/lib/dpkg/status").write_text("")
    return root


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """A recipe with an element of the test's own (hooks, static files, a parameter),
    a user with a key, sudo and a group, files with a mode and an owner, and a command."""
    element = tmp_path / "elements/probe"
    for d in ("install.d", "finalise.d", "static/etc/probe"):
        (element / d).mkdir(parents=True)
    (element / "element.yaml").write_text(yaml.safe_dump({
        "description": "Says what it was given.",
        "parameters": {"type": "object", "additionalProperties": False, "properties": {"word": {"type": "string"}}},
    }))
    for path, text in (("install.d/10-probe", HOOK), ("finalise.d/90-probe", FINAL)):
        (element / path).write_text(text)
        (element / path).chmod(0o755)
    (element / "static/etc/probe/static.conf").write_text("static = yes\n")
    (element / "static/etc/probe/static.conf").chmod(0o600)
    (element / "static/etc/probe/current").symlink_to("static.conf")
    monkeypatch.setenv("BAKE_ELEMENTS_PATH", str(tmp_path / "elements"))
    folder = tmp_path / "recipe"
    (folder / "conf.d").mkdir(parents=True)
    (folder / "conf.d/a.conf").write_text("a = 1\n")
    (folder / "motd").write_text("customized\n")
    (folder / "recipe.yml").write_text(yaml.safe_dump({
        "name": "probe-image", "release": "debian/bookworm",
        "elements": [{"name": "probe", "with": {"word": "hello"}}],
        "users": [{"name": "alice", "sudo": True, "groups": ["adm"], "shell": "/bin/sh",
                   "ssh_authorized_keys": [KEY]}],
        "files": [{"source": "motd", "dest": "/etc/motd", "mode": "0640"},
                  {"source": "conf.d", "dest": "/etc/app.d", "mode": "0750", "owner": "alice"}],
        "commands": ['echo "made by $BAKE_IMAGE_NAME" > /etc/made-by'],
    }))
    return load_recipe(folder / "recipe.yml")


def customizer(backend, recipe) -> Customizer:
    """The recipe's own element only: the implied base and kernel elements want a Debian."""
    uses = [u for u in recipe.elements if u.name == "probe"]
    return Customizer(backend, recipe, init_system="systemd", uses=uses)


def customize(c: Customizer) -> int:
    """What both routes do after packages, in their order (the scrub as on the appliance
    route, which keeps the image's apt sources); the deferred initramfs calls."""
    c.copy_elements_in()
    c.guard()
    c.copy_static()
    c.run_phase("install.d")
    c.create_users()
    c.copy_files()
    c.run_commands()
    calls = c.unguard()
    c.run_phase("finalise.d")
    c.scrub()
    c.remove_elements()
    return calls


def account(root: Path, name: str) -> tuple[int, int, str]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3]), fields[5]
    raise AssertionError(f"no user {name}")


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_the_recipes_operations_land_in_the_tree_and_nothing_of_bakes_stays(tmp_path, recipe):
    root = small_root(tmp_path / "root")
    c = customizer(ChrootBackend(root), recipe)
    with sh.chroot_mounts(root):
        calls = customize(c)
    assert sh.mounts_under(root) == []

    assert calls == 1
    assert c.notes == ["probe: probed hello"]
    env = (root / "etc/probe-env").read_text().splitlines()
    assert env[0] == "word=hello image=probe-image label=cloudimg-rootfs init=systemd policy=101"
    assert env[1] == ("dir=/tmp/bake/elements/probe home=/root "
                      "path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert (root / "etc/probe-final").read_text() == "unguarded\n"
    assert (root / "etc/probe/static.conf").read_text() == "static = yes\n"
    assert owner_mode(root / "etc/probe/static.conf") == (0, 0, 0o600)
    assert os.readlink(root / "etc/probe/current") == "static.conf"
    assert (root / "etc/made-by").read_text() == "made by probe-image\n"

    uid, gid, home = account(root, "alice")
    assert "adm:x:4:alice" in (root / "etc/group").read_text().splitlines()
    keys = root / home.lstrip("/") / ".ssh/authorized_keys"
    assert keys.read_text() == KEY + "\n" and owner_mode(keys) == (uid, gid, 0o600)
    sudoers = root / "etc/sudoers.d/90-bake-users"
    assert sudoers.read_text() == "# users the recipe gave passwordless sudo\nalice ALL=(ALL) NOPASSWD:ALL\n"
    assert owner_mode(sudoers) == (0, 0, 0o440)
    assert owner_mode(root / "etc/motd") == (0, 0, 0o640)
    assert owner_mode(root / "etc/app.d") == (uid, 0, 0o750)          # owner: alice, the group kept
    assert owner_mode(root / "etc/app.d/a.conf")[:2] == (uid, 0)

    # the guard is gone: no policy-rc.d, update-initramfs and its diversion as they were
    assert not os.path.lexists(root / "usr/sbin/policy-rc.d")
    assert not os.path.lexists(root / "usr/sbin/update-initramfs")
    assert not os.path.lexists(root / "usr/sbin/update-initramfs.distrib")
    assert (root / "var/lib/dpkg/diversions").read_text() == ""
    assert not (root / "tmp/bake").exists() and not (root / "var/lib/bake-initramfs-deferred").exists()


def test_the_guard_puts_the_images_own_policy_rc_d_and_upstarts_initctl_back(tmp_path, recipe):
    root = small_root(tmp_path / "root")
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\n# the image's own\nexit 0\n")
    (root / "usr/sbin/initctl").write_text("#!/bin/sh\n# upstart's\n")
    c = customizer(ChrootBackend(root), recipe)
    c.init_system = "upstart"
    c.guard()
    assert "bake: no daemon starts" in (root / "usr/sbin/policy-rc.d").read_text()
    assert "bake: upstart cannot be reached" in (root / "usr/sbin/initctl").read_text()
    assert (root / "usr/sbin/initctl.distrib").read_text() == "#!/bin/sh\n# upstart's\n"
    assert c.unguard() == 0
    assert (root / "usr/sbin/policy-rc.d").read_text() == "#!/bin/sh\n# the image's own\nexit 0\n"
    assert (root / "usr/sbin/initctl").read_text() == "#!/bin/sh\n# upstart's\n"
    assert not os.path.lexists(root / "usr/sbin/initctl.distrib")
    assert not os.path.lexists(root / "var/lib/bake-policy-rc.d.image")


def test_writes_follow_the_images_absolute_links_inside_it_never_to_the_host(tmp_path, recipe):
    root = small_root(tmp_path / "root")
    host = tmp_path / "host-sudoers.d"
    host.mkdir()
    (root / "etc/sudoers.d").symlink_to(host)               # absolute: the host's folder, seen from outside
    c = customizer(ChrootBackend(root), recipe)
    c.create_users()
    assert list(host.iterdir()) == []
    inside = root / str(host).lstrip("/") / "90-bake-users"
    assert "alice ALL=(ALL) NOPASSWD:ALL" in inside.read_text()


def test_a_failing_command_is_named_with_its_output_tail(tmp_path, recipe):
    root = small_root(tmp_path / "root")
    recipe.data["commands"] = ["true", "echo one; echo two >&2; exit 4"]
    with pytest.raises(BakeError) as e:
        customizer(ChrootBackend(root), recipe).run_commands()
    assert str(e.value) == ("commands[1] failed in the chroot (exit 4): echo one; echo two >&2; exit 4\n"
                            "--- last lines of its output ---\none\ntwo")


def test_a_failing_hook_is_named_by_element_phase_and_hook(tmp_path, recipe):
    root = small_root(tmp_path / "root")
    hook = next(h for u in recipe.elements if u.name == "probe" for h in u.element.hooks["install.d"])
    hook.path.write_text("#!/bin/sh\necho checking\necho broken >&2\nexit 3\n")
    c = customizer(ChrootBackend(root), recipe)
    c.copy_elements_in()
    with pytest.raises(HookError) as e:
        c.run_phase("install.d")
    assert str(e.value) == ("element 'probe', phase install.d, hook 10-probe failed (exit 3)\n"
                            "--- last lines of its output ---\nchecking\nbroken")


DIRT = {  # what a tree that has booted, been logged into and been built on carries
    "etc/ssh/ssh_host_ed25519_key": "a host key\n", "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA\n",
    "etc/machine-id": "0123456789abcdef0123456789abcdef\n", "var/lib/dbus/machine-id": "0123\n",
    "var/lib/bake/firstboot-done": "", "var/lib/bake/instance-id": "i-12345678\n",
    "var/lib/cloud/instances/i-1/user-data.txt": "#!/bin/sh\n", "var/lib/cloud/data/previous-hostname": "old\n",
    "var/lib/cloud/.instance-id": "i-1\n", "var/log/cloud-init.log": "ran\n",
    "root/.bash_history": "cat /etc/shadow\n", "home/alice/.zsh_history": "ls\n", "home/alice/.lesshst": ".\n",
    "var/lib/dhcp/dhclient.eth0.leases": "lease {}\n", "var/lib/systemd/random-seed": "seed",
    "etc/udev/rules.d/70-persistent-net.rules": "# eth0\n", "var/crash/a.crash": "core\n",
    "var/log/syslog": "boot\n", "var/log/syslog.1": "older\n", "var/log/dpkg.log.2.gz": "gz",
    "var/log/journal/0123/system.journal": "journal", "tmp/build-left": "x", "var/tmp/x/y": "y",
    "var/lib/apt/lists/archive_dists_bookworm_InRelease": "lists", "var/cache/apt/pkgcache.bin": "cache",
    "etc/apt/sources.list": "deb http://build-proxy.internal:3142/debian bookworm main\n",
}
KEPT = {"var/lib/cloud/seed/nocloud/meta-data": "instance-id: seed\n", "home/alice/notes.txt": "mine\n",
        "etc/ssh/sshd_config": "PermitRootLogin no\n"}


def planted(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_scrub_runs_every_named_operation_but_those_the_recipe_skips(tmp_path, recipe):
    root = planted(small_root(tmp_path / "root"), {**DIRT, **KEPT})
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
    recipe.data["scrub"] = {"skip": ["random-seed"]}
    c = customizer(ChrootBackend(root), recipe)
    sources = "deb http://archive.example/debian bookworm main\n"
    with sh.chroot_mounts(root):
        c.scrub(sources)

    assert (c.scrubbed["ran"], c.scrubbed["skipped"]) == ([n for n in scrub.NAMES if n != "random-seed"],
                                                          {"random-seed": "skipped by the recipe"})
    left = {name for name in DIRT if (root / name).exists()}
    emptied = {"etc/machine-id", "var/log/syslog", "etc/apt/sources.list"}
    assert left == emptied | {"var/lib/systemd/random-seed"}
    assert (root / "etc/machine-id").read_text() == "" and (root / "var/log/syslog").read_text() == ""
    assert (root / "etc/apt/sources.list").read_text() == sources
    assert (root / "var/lib/systemd/random-seed").read_text() == "seed"
    assert {name: (root / name).read_text() for name in KEPT} == KEPT
    assert sorted(p.name for p in (root / "var/lib/cloud").iterdir()) == ["seed"]
    assert list((root / "tmp").iterdir()) == list((root / "var/tmp").iterdir()) == []
    assert list((root / "var/log/journal").iterdir()) == []
    assert (root / "var/lib/apt/lists/partial").is_dir()


def test_the_scrubs_names_are_the_schemas_and_without_sources_the_images_own_stay(tmp_path, recipe):
    schema = json.loads((Path(scrub.__file__).parents[1] / "schema/recipe.schema.json").read_text())
    assert schema["properties"]["scrub"]["properties"]["skip"]["items"]["enum"] == list(scrub.NAMES)
    described = schema["properties"]["scrub"]["description"]
    assert [op.name for op in scrub.OPERATIONS if f"`{op.name}`: {op.what}" not in described] == []
    root = planted(small_root(tmp_path / "root"), {"etc/apt/sources.list": "deb http://its-own/debian sid main\n"})
    c = customizer(ChrootBackend(root), recipe)
    with sh.chroot_mounts(root):
        c.scrub()
    assert (root / "etc/apt/sources.list").read_text() == "deb http://its-own/debian sid main\n"
    assert "apt-sources" in c.scrubbed["skipped"] and "apt-sources" not in c.scrubbed["ran"]
    with pytest.raises(BakeError, match="scrub.skip: no operation named history"):
        scrub.chosen(["history"], sources=True)


def test_a_failing_scrub_operation_is_named(tmp_path, recipe):
    root = small_root(tmp_path / "root")
    (root / "usr/bin/truncate").unlink()
    planted(root, {"var/log/syslog": "boot\n", "tmp/later": "x", "root/.bash_history": "ls\n"})
    c = customizer(ChrootBackend(root), recipe)
    with sh.chroot_mounts(root), pytest.raises(BakeError, match=r"^scrub operation logfiles failed in the chroot") as e:
        c.scrub()
    said = str(e.value).split("--- last lines of its output ---\n", 1)[1]
    assert "truncate" in said and "bake-scrub:" not in said, said     # its own output, not the others' names
    # the operations before it ran, those after it did not
    assert not (root / "root/.bash_history").exists() and (root / "tmp/later").exists()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry of the tree (lost+found aside): type, owner, mode, and content or link."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            body = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else b""
            if p == root / "etc/shadow" or p == root / "etc/shadow-":
                body = re.sub(rb":\d+:", b":DAY:", body)   # the day of the password change
            seen[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid,
                                              stat.S_IMODE(st.st_mode), body)
    return seen


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bake-test-customizer-") as mnt, \
            sh.loop_device(image, read_only=True) as dev, sh.mount(dev, mnt, fstype="ext4", options="ro,noload"):
        yield Path(mnt)


@pytest.mark.boots
def test_both_backends_leave_the_same_tree(tmp_path, recipe, monkeypatch):
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"))
    chroot_root = small_root(tmp_path / "chroot")
    image = tmp_path / "image.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", small_root(tmp_path / "source"), image, "64M"], check=True)

    c = customizer(ChrootBackend(chroot_root), recipe)
    with sh.chroot_mounts(chroot_root):
        chroot_calls = customize(c)
    with guestfs.opened(image) as backend:
        a = customizer(backend, recipe)
        appliance_calls = customize(a)

    assert (appliance_calls, a.notes) == (chroot_calls, c.notes) == (1, ["probe: probed hello"])
    with mounted(image) as image_root:
        in_image = snapshot(image_root)
    in_chroot = snapshot(chroot_root)
    assert {k: v for k, v in in_image.items() if k not in in_chroot} == {}
    assert {k: v for k, v in in_chroot.items() if k not in in_image} == {}
    assert {k for k in in_chroot if in_chroot[k] != in_image[k]} == set()
