"""The light path (`base.method: guestfs`) changes a copy of the demo image in place as a
user with no privileges at all: the recipe's files, users and the acpiphp load line
land in the image, owned by root, without a loop device, a mount or root on the host.
A recipe whose element needs packages the image lacks is refused, saying to unpack.

The base is the demo build's image with a kernel whose acpiphp is a module (a fake
`acpiphp.ko` and a modules.builtin without it): Debian's own kernels build it in."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from builder.core import sh
from builder.base import appliance
from builder.customize import inplace, scrub
from builder.core.errors import BakeError
from builder.recipe.recipe import load_recipe
from conftest import REPO

# the test user goes into the host's /etc: never beside a test watching it (tests/parallel.py)
pytestmark = [pytest.mark.bakes, pytest.mark.boots, pytest.mark.xdist_group("host-etc")]

FAKE_KERNEL = "6.1.0-99-hotplug"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbakeLightPathTestKeyOnlyNotARealOne0000 alice@test"

# Run by the unprivileged user: the light path on one image, and what it ran as.
CHILD = """
import json, os, sys
from pathlib import Path
from builder.customize import inplace
from builder.recipe.recipe import load_recipe
notes, scrubbed = inplace.apply(load_recipe(sys.argv[1]), Path(sys.argv[2]), init_system=sys.argv[3])
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print(json.dumps({"notes": notes, "scrubbed": scrubbed, "euid": os.geteuid(), "capeff": status["CapEff"].strip()}))
"""


@pytest.fixture(scope="module")
def scratch_dir() -> Iterator[Path]:
    """A folder every user can reach (pytest's own is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="bake-test-light-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def traversable_root() -> Iterator[None]:
    """Every user may pass through `/`, as on any machine with users. A root folder made
    by `mktemp -d` for a chroot (0700) lets no one but root reach a single program; it
    gets the search bit for others while these tests run, and its own mode back after."""
    mode = stat.S_IMODE(os.stat("/").st_mode)
    if mode & stat.S_IXOTH:
        yield
        return
    os.chmod("/", mode | stat.S_IXOTH)
    try:
        yield
    finally:
        os.chmod("/", mode)


@pytest.fixture(scope="module")
def user(scratch_dir, traversable_root) -> Iterator[str]:
    """A system user of this test's own, with no group but its own."""
    name = f"bakelight{os.getpid()}"
    sh.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], what="adding a test user")
    try:
        yield name
    finally:
        sh.run(["userdel", name], check=False)


@pytest.fixture(scope="module")
def base(demo_build, scratch_dir) -> Path:
    """The demo image with a kernel whose acpiphp is a module."""
    image = scratch_dir / "base.img"
    sh.run(["cp", "--sparse=always", demo_build.dir / "debian-demo.img", image])
    modules = f"/usr/lib/modules/{FAKE_KERNEL}"
    with appliance.opened([image], readonly=False) as g:
        g.mkdir_p(f"{modules}/kernel/drivers/pci/hotplug")
        g.write(f"{modules}/kernel/drivers/pci/hotplug/acpiphp.ko", b"a module, as far as the hook can tell\n")
        g.write(f"{modules}/modules.builtin", b"kernel/drivers/pci/pcie/portdrv.ko\n")
    return image


def copy_for(user: str, image: Path, dest: Path) -> Path:
    sh.run(["cp", "--sparse=always", image, dest])
    shutil.chown(dest, user, user)
    return dest


def write_recipe(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump({"name": "light-test", "release": "debian/bookworm", "arch": "x86_64", **data}))
    return path


def reachable_project(scratch: Path) -> Path:
    """The project's code, elements and virtualenv copied to a folder every user can
    reach: the project may lie where an unprivileged user cannot (a clone in root's own
    home, which is 0700). Copied once per module (hard links where the filesystem allows)."""
    project = scratch / "project"
    if not project.is_dir():
        project.mkdir()
        for part in ("builder", "elements", ".venv"):
            r = sh.run(["cp", "-al", REPO / part, project / part], check=False, quiet=True)
            if r.returncode != 0:
                shutil.rmtree(project / part, ignore_errors=True)
                sh.run(["cp", "-a", REPO / part, project / part])
    return project


def as_user(user: str, scratch: Path, argv: list, *, path: str, cwd: Path) -> sh.Result:
    """`argv` (its first word a program of the project's virtualenv, e.g. "python") run
    by `user` from a copy of the project it can reach (`reachable_project`), with HOME,
    libguestfs cache and temporary folder of its own and nothing of root's environment."""
    home = scratch / f"home-{user}"
    for d in (home, home / "cache", home / "tmp"):
        d.mkdir(exist_ok=True)
        shutil.chown(d, user, user)
    project = reachable_project(scratch)
    env = {"HOME": str(home), "PATH": path, "LC_ALL": "C.UTF-8", "PYTHONPATH": str(project),
           "LIBGUESTFS_CACHEDIR": str(home / "cache"), "TMPDIR": str(home / "tmp")}
    return sh.run(["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                   project / ".venv" / "bin" / argv[0], *argv[1:]], cwd=cwd, check=False,
                  what=f"{argv[0]} as {user}")


def run_as(user: str, scratch: Path, recipe: Path, image: Path, init_system: str) -> dict:
    """inplace.apply run by `user` in a process of its own (see `as_user`)."""
    r = as_user(user, scratch, ["python", "-c", CHILD, recipe, image, init_system],
                path="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", cwd=scratch)
    assert r.returncode == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[Path]:
    """`image` mounted read-only, for looking at what the light path left in it."""
    with tempfile.TemporaryDirectory(prefix="bake-test-light-mnt-") as mnt, \
            sh.loop_device(image, read_only=True) as dev, \
            sh.mount(dev, mnt, fstype="ext4", options="ro,noload"):
        yield Path(mnt)


def loops_of(image: Path) -> list[str]:
    return sh.output(["losetup", "-j", image]).splitlines()


def account(root: Path, name: str) -> tuple[int, int, str]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3]), fields[5]
    raise AssertionError(f"no user {name} in the image")


def test_an_unprivileged_user_adds_files_users_and_the_acpiphp_line(base, user, scratch_dir):
    work = scratch_dir / "systemd"
    work.mkdir()
    (work / "motd").write_text("evolved by the light path\n")
    (work / "conf.d").mkdir()
    (work / "conf.d/a.conf").write_text("a = 1\n")
    (work / "notes.txt").write_text("alice's\n")
    recipe = write_recipe(work, {
        "elements": ["acpiphp"],
        "users": [{"name": "alice", "sudo": True, "ssh_authorized_keys": [KEY]}],
        "files": [{"source": "motd", "dest": "/etc/motd-light", "mode": "0640"},
                  {"source": "conf.d", "dest": "/etc/light.d", "mode": "0750"},
                  {"source": "notes.txt", "dest": "/home/alice/", "owner": "alice"}],
        "commands": ['echo "made by $BAKE_IMAGE_NAME for $BAKE_INIT_SYSTEM" > /etc/light-command'],
    })
    for p in [work, *work.rglob("*")]:
        shutil.chown(p, user, user)
    image = copy_for(user, base, work / "image.img")
    with appliance.opened([image], readonly=False) as g:   # what a base that has booted carries
        g.write("/etc/ssh/ssh_host_ed25519_key", b"the base's host key\n")
        g.write("/etc/machine-id", b"0123456789abcdef0123456789abcdef\n")
        g.mkdir_p("/var/lib/cloud/instances/i-base")
        g.write("/var/lib/cloud/instances/i-base/user-data.txt", b"#!/bin/sh\n")
        g.mkdir_p("/var/lib/cloud/seed/nocloud")
        g.write("/var/lib/cloud/seed/nocloud/meta-data", b"instance-id: seed\n")
        g.write("/root/.bash_history", b"cat /etc/shadow\n")
    assert sh.run(["runuser", "-u", user, "--", "test", "-w", "/dev/loop-control"], check=False).returncode != 0

    ran = run_as(user, scratch_dir, recipe, image, "systemd")

    assert ran["euid"] == pwd.getpwnam(user).pw_uid != 0
    assert int(ran["capeff"], 16) == 0
    assert loops_of(image) == []
    assert f"acpiphp: acpiphp is a module in kernel {FAKE_KERNEL}; loading it at boot" in ran["notes"]
    sh.run(["e2fsck", "-f", "-n", image], what="checking the changed image")
    with mounted(image) as root:
        motd = (root / "etc/motd-light").lstat()
        assert (motd.st_uid, motd.st_gid, stat.S_IMODE(motd.st_mode)) == (0, 0, 0o640)
        assert (root / "etc/motd-light").read_text() == "evolved by the light path\n"
        folder, conf = (root / "etc/light.d").lstat(), (root / "etc/light.d/a.conf").lstat()
        assert (folder.st_uid, stat.S_IMODE(folder.st_mode), conf.st_uid) == (0, 0o750, 0)
        assert (root / "etc/modules-load.d/acpiphp.conf").read_text() == "acpiphp\n"
        assert (root / "etc/modules-load.d/acpiphp.conf").lstat().st_uid == 0
        assert (root / "etc/light-command").read_text() == "made by light-test for systemd\n"

        uid, gid, home = account(root, "alice")
        inside = root / home.lstrip("/")
        assert (inside.lstat().st_uid, (inside / "notes.txt").lstat().st_uid) == (uid, uid)
        assert (inside / ".ssh/authorized_keys").read_text() == KEY + "\n"
        assert (inside / ".ssh/authorized_keys").lstat().st_uid == uid
        sudoers = root / "etc/sudoers.d/90-bake-users"
        assert "alice ALL=(ALL) NOPASSWD:ALL" in sudoers.read_text()
        assert (sudoers.lstat().st_uid, stat.S_IMODE(sudoers.lstat().st_mode)) == (0, 0o440)

        # nothing of bake's own is left: its files, the daemon and initramfs guards
        assert not (root / "tmp/bake").exists()
        assert not (root / "usr/sbin/policy-rc.d").exists()
        assert not (root / "usr/sbin/update-initramfs.distrib").exists()
        assert b"bake" not in (root / "usr/sbin/update-initramfs").read_bytes()

        # the scrub ran in the image: nothing of the base's boots is left but cloud-init's seed
        assert not (root / "etc/ssh/ssh_host_ed25519_key").exists()
        assert (root / "etc/machine-id").read_text() == ""
        assert not (root / "var/lib/cloud/instances").exists()
        assert (root / "var/lib/cloud/seed/nocloud/meta-data").read_text() == "instance-id: seed\n"
        assert not (root / "root/.bash_history").exists()
    assert ran["scrubbed"]["ran"] == [n for n in scrub.NAMES if n != "apt-sources"]
    assert list(ran["scrubbed"]["skipped"]) == ["apt-sources"]


def test_an_upstart_image_gets_the_acpiphp_line_in_etc_modules(base, user, scratch_dir):
    """An upstart image has /etc/init and its base element's network tools (ifupdown)."""
    work = scratch_dir / "upstart"
    work.mkdir()
    recipe = write_recipe(work, {"elements": ["acpiphp"]})
    image = copy_for(user, base, work / "image.img")
    with appliance.opened([image], readonly=False) as g:
        g.mkdir_p("/etc/init")
        g.write_append("/var/lib/dpkg/status", b"\nPackage: ifupdown\nStatus: install ok installed\n"
                                                b"Architecture: amd64\nVersion: 0.8.41\n")

    ran = run_as(user, scratch_dir, recipe, image, "upstart")

    assert ran["euid"] != 0 and loops_of(image) == []
    with mounted(image) as root:
        assert "acpiphp" in (root / "etc/modules").read_text().splitlines()
        assert not (root / "etc/modules-load.d/acpiphp.conf").exists()
        assert (root / "etc/init/ttyS0.conf").exists()          # the base element's upstart branch ran
        assert not (root / "usr/sbin/initctl").exists()         # the upstart guard is gone again


def test_an_element_whose_packages_the_image_lacks_is_refused(base, tmp_path, monkeypatch):
    element = tmp_path / "elements/needs-cowsay"
    (element / "install.d").mkdir(parents=True)
    (element / "element.yaml").write_text("description: Says things through a cow.\n")
    (element / "package-installs.yaml").write_text("cowsay:\n")
    hook = element / "install.d/10-moo"
    hook.write_text("#!/bin/sh\ncowsay moo\n")
    hook.chmod(0o755)
    monkeypatch.setenv("BAKE_ELEMENTS_PATH", str(tmp_path / "elements"))
    recipe = load_recipe(write_recipe(tmp_path / "recipe", {"elements": ["acpiphp", "needs-cowsay"]}))
    image = tmp_path / "image.img"
    sh.run(["cp", "--sparse=always", base, image])
    with pytest.raises(BakeError, match=r"lacks packages .*element 'needs-cowsay' needs cowsay.*method: unpack"):
        inplace.apply(recipe, image, init_system="systemd")


def test_a_failing_hook_says_which_with_its_output_and_the_chroot_paths_environment(base, tmp_path, monkeypatch):
    element = tmp_path / "elements/fails"
    (element / "install.d").mkdir(parents=True)
    (element / "element.yaml").write_text(yaml.safe_dump({
        "description": "Fails, after saying what it was given.",
        "parameters": {"type": "object", "additionalProperties": False, "properties": {"word": {"type": "string"}}},
    }))
    hook = element / "install.d/10-fail"
    hook.write_text('#!/bin/sh\necho "dir=$BAKE_ELEMENT_DIR label=$BAKE_ROOT_LABEL init=$BAKE_INIT_SYSTEM '
                    'word=$FAILS_WORD home=$HOME"\nls "$BAKE_ELEMENT_DIR/install.d"\necho "it went wrong" >&2\n'
                    'exit 3\n')
    hook.chmod(0o755)
    monkeypatch.setenv("BAKE_ELEMENTS_PATH", str(tmp_path / "elements"))
    recipe = load_recipe(write_recipe(tmp_path / "recipe", {"elements": [{"name": "fails", "with": {"word": "hi"}}]}))
    image = tmp_path / "image.img"
    sh.run(["cp", "--sparse=always", base, image])
    with pytest.raises(BakeError) as e:
        inplace.apply(recipe, image, init_system="systemd", root_label="from-the-base")
    assert str(e.value) == (
        "element 'fails', phase install.d, hook 10-fail failed (exit 3)\n--- last lines of its output ---\n"
        "dir=/tmp/bake/elements/fails label=from-the-base init=systemd word=hi home=/root\n10-fail\nit went wrong")


def test_a_whole_bake_by_an_unprivileged_user_makes_the_trio_from_the_base(base, user, scratch_dir):
    """`bake build` itself, not only the light path, run by the unprivileged user with a
    PATH without the sbin folders: the base is opened, inspected, grown, changed in place
    and becomes the build's image, with the kernel and ramdisk from its /boot."""
    folder = scratch_dir / "whole-bake"
    folder.mkdir()
    shutil.chown(folder, user, user)
    image = copy_for(user, base, folder / "base.img")
    marker = folder / "marker.txt"
    marker.write_text("baked without root\n")
    recipe = write_recipe(folder, {"name": "light-whole", "base": {"image": "base.img", "method": "guestfs",
                                                                    "grow": "32M"},
                                   "elements": ["acpiphp"],
                                   "files": [{"source": "marker.txt", "dest": "/etc/marker.txt", "mode": "0640"}]})
    r = as_user(user, scratch_dir, ["python", "-m", "builder", "build", str(recipe), "--stop-after", "image",
                                    "--output", str(folder / "out")], path="/usr/bin:/bin", cwd=folder)
    assert r.returncode == 0, r.output[-4000:]
    build_dir = Path(r.output.strip().splitlines()[-1])
    data = json.loads((build_dir / "build.json").read_text())
    assert data["base"]["opened_by"] == "libguestfs in place" and data["base"]["grown_by"] == 32 << 20
    assert data["stages"]["customize"]["method"] == "guestfs"
    assert set(data["outputs"]) == {"kernel", "ramdisk", "image"}
    assert data["kernel_version"] != FAKE_KERNEL           # the newest kernel with an initrd
    made = build_dir / data["outputs"]["image"]["path"]
    assert made.stat().st_uid == pwd.getpwnam(user).pw_uid
    assert not loops_of(made) and not loops_of(image)
    with mounted(made) as root:
        st = (root / "etc/marker.txt").stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o640)
        assert (root / "etc/modules-load.d/acpiphp.conf").read_text() == "acpiphp\n"
