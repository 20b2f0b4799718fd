"""A recipe's `files:` land in the image and nowhere else: destinations are resolved as
the image itself resolves them (its absolute symlinks start at the image's root, `..`
stops there), even for a recipe that never went through validation, and the build
host's own files and mounts are never written."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest

from builder.core import sh
from builder.core.record import Build
from builder.core.errors import BakeError
from builder.recipe.recipe import load_recipe
from builder.customize.chroot import ChrootBackend, copy_into_image, path_in_root
from builder.customize.customizer import Customizer


@pytest.fixture
def host(tmp_path) -> Path:
    """A folder standing for the build host's own files, beside the image."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "victim").write_text("the host's file\n")
    return d


@pytest.fixture
def root(tmp_path) -> Path:
    """An image root with the folders a Debian tree has."""
    r = tmp_path / "image"
    for d in ("etc", "usr/share", "usr/lib", "tmp"):
        (r / d).mkdir(parents=True)
    return r


@pytest.fixture
def payload(tmp_path) -> Path:
    p = tmp_path / "payload.conf"
    p.write_text("written by the recipe\n")
    return p


def snapshot(top: Path, skip: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under `top` except `skip`'s tree: its type and content (or link target)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        if d == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            if p == skip:
                continue
            st = p.lstat()
            body = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else ""
            seen[str(p)] = (stat.S_IFMT(st.st_mode), body)
    return seen


def test_an_absolute_symlink_in_the_image_is_followed_inside_the_image_not_to_the_hosts_etc(root, payload):
    (root / "etc/conf.d").symlink_to("/etc")
    name = f"bake-test-escaped-{secrets.token_hex(6)}"
    try:
        written = copy_into_image(root, payload, f"/etc/conf.d/{name}")
        assert not Path("/etc", name).exists()
    finally:
        Path("/etc", name).unlink(missing_ok=True)
    assert written == f"/etc/{name}"
    assert (root / "etc" / name).read_text() == "written by the recipe\n"


def test_an_absolute_symlink_naming_a_host_file_is_not_written_through(tmp_path, root, host, payload):
    (root / "etc/localtime").symlink_to(host / "victim")
    before = snapshot(tmp_path, skip=root)
    written = copy_into_image(root, payload, "/etc/localtime")
    assert snapshot(tmp_path, skip=root) == before
    assert (host / "victim").read_text() == "the host's file\n"
    # where the link points inside the image, as the booted image would see it
    assert written == str(host / "victim")
    assert (root / str(host / "victim").lstrip("/")).read_text() == "written by the recipe\n"
    assert (root / "etc/localtime").is_symlink()


def test_a_relative_symlink_that_climbs_stops_at_the_image_root(tmp_path, root, payload):
    (root / "usr/share/up").symlink_to("../../../../../../../..")
    before = snapshot(tmp_path, skip=root)
    written = copy_into_image(root, payload, "/usr/share/up/escaped")
    assert snapshot(tmp_path, skip=root) == before
    assert written == "/escaped"
    assert (root / "escaped").read_text() == "written by the recipe\n"


def test_a_destination_that_climbs_with_dotdot_is_refused_and_nothing_is_written(tmp_path, root, payload):
    before = snapshot(tmp_path, skip=tmp_path / "none")
    with pytest.raises(BakeError, match=r"files\[3\] \(payload.conf → /\.\./\.\./\.\./etc/escaped\): '\.\.' climbs "
                                        r"above the image's root"):
        copy_into_image(root, payload, "/../../../etc/escaped",
                        what="files[3] (payload.conf → /../../../etc/escaped)")
    with pytest.raises(BakeError, match="climbs above the image's root"):
        copy_into_image(root, payload, "/etc/../../escaped")
    assert snapshot(tmp_path, skip=tmp_path / "none") == before


def test_dotdot_that_stays_inside_the_image_is_resolved_like_any_path(root, payload):
    assert copy_into_image(root, payload, "/usr/share/../lib/./x.conf") == "/usr/lib/x.conf"
    assert (root / "usr/lib/x.conf").is_file()


def test_path_in_root_resolves_links_as_a_chroot_does_and_returns_a_path_free_of_them(root):
    (root / "lib").symlink_to("usr/lib")
    (root / "usr/lib/abs").symlink_to("/usr/share")
    (root / "usr/share/back").symlink_to("../lib/../../../..")
    assert path_in_root(root, "/lib/abs/new/file") == root / "usr/share/new/file"
    assert path_in_root(root, "/usr/share/back/etc") == root / "etc"
    assert path_in_root(root, "/") == root
    resolved = path_in_root(root, "/lib/abs/back/lib/abs")
    assert resolved == root / "usr/share"
    assert not any(p.is_symlink() for p in [resolved, *resolved.parents] if root in [p, *p.parents])


def test_a_symlink_loop_in_the_image_is_an_error_not_a_hang(root, payload):
    (root / "etc/a").symlink_to("b")
    (root / "etc/b").symlink_to("/etc/a")
    with pytest.raises(BakeError, match="too many levels of symbolic links"):
        copy_into_image(root, payload, "/etc/a/x")


def test_a_folder_merges_into_the_image_through_its_links_but_never_out_of_it(tmp_path, root, host):
    src = tmp_path / "overlay"
    (src / "etc/app").mkdir(parents=True)
    (src / "etc/app/app.conf").write_text("conf\n")
    (src / "etc/app/run.sh").write_text("#!/bin/sh\n")
    (src / "etc/app/run.sh").chmod(0o755)
    (src / "etc/app/current").symlink_to("/var/lib/app")        # a link the recipe ships, kept as a link
    (src / "opt").mkdir()
    (src / "opt/tool").write_text("tool\n")
    (root / "etc/app").symlink_to(host)                          # absolute: the host's folder, seen from outside
    (root / "opt").symlink_to("../../../..")                     # climbs: the image's root, seen from inside
    before = snapshot(tmp_path, skip=root)
    written = copy_into_image(root, src, "/")
    assert written == "/"
    assert snapshot(tmp_path, skip=root) == before
    inside = root / str(host).lstrip("/")
    assert (inside / "app.conf").read_text() == "conf\n"
    assert os.access(inside / "run.sh", os.X_OK)
    assert os.readlink(inside / "current") == "/var/lib/app"
    assert (root / "tool").read_text() == "tool\n"
    assert (root / "etc/app").is_symlink() and (root / "opt").is_symlink()


def test_a_file_given_a_folder_goes_into_it_and_takes_the_mode(root, payload):
    written = copy_into_image(root, payload, "/etc", mode=0o640)
    assert written == "/etc/payload.conf"
    assert stat.S_IMODE((root / "etc/payload.conf").stat().st_mode) == 0o640


def test_a_device_node_in_the_image_is_not_written_to(root, payload):
    os.mknod(root / "etc/disk", 0o600 | stat.S_IFCHR, os.makedev(1, 3))   # /dev/null's numbers
    with pytest.raises(BakeError, match="/etc/disk exists in the image and is not a regular file"):
        copy_into_image(root, payload, "/etc/disk")


def test_a_destination_on_a_mount_in_the_chroot_is_refused(root, payload):
    (root / "dev").mkdir()
    with sh.mount("tmpfs", root / "dev", fstype="tmpfs", options="size=1m"):
        for dest in ("/dev/sda", "/dev/new/file", "/dev"):
            with pytest.raises(BakeError, match=r"is on /dev, a filesystem mounted into the build chroot"):
                copy_into_image(root, payload, dest)
        assert list((root / "dev").iterdir()) == []


def test_copy_files_names_the_recipe_entry_even_for_a_recipe_that_skipped_validation(tmp_path, root, payload):
    recipe_path = tmp_path / "files-test.yml"
    recipe_path.write_text("name: files-test\nrelease: debian/bookworm\n"
                           "files:\n  - source: payload.conf\n    dest: /etc/payload.conf\n"
                           "  - source: payload.conf\n    dest: /etc/second.conf\n")
    recipe = load_recipe(recipe_path)
    recipe.data["files"][1]["dest"] = "/../../../etc/escaped"
    build = Build.create(tmp_path / "output", "files-test")
    before = snapshot(tmp_path, skip=root)
    with pytest.raises(BakeError) as e:
        Customizer(ChrootBackend(root), recipe, init_system="systemd").copy_files()
    assert str(e.value).startswith("files[1] (payload.conf → /../../../etc/escaped): "
                                   "'..' climbs above the image's root")
    assert (root / "etc/payload.conf").read_text() == "written by the recipe\n"
    after = snapshot(tmp_path, skip=root)
    assert {k: v for k, v in after.items() if "/output/" not in k} == \
        {k: v for k, v in before.items() if "/output/" not in k}
    assert not (tmp_path / "etc").exists()
