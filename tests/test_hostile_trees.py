"""An image tree is hostile: its absolute symlinks name folders of the build host
(/usr/sbin, /etc, /etc/apt pointing at a host folder), and bake's own writes into the
tree (the guard script, apt's sources, the resolver, users' sudo rules, static files,
a recipe's files) must land inside the tree, never in the host folder. Judged from
outside: the host folders stay empty."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.customize.chroot import ChrootBackend
from test_customizer import customizer, recipe, small_root  # noqa: F401  (recipe: a fixture)


def hostile(tmp_path: Path, link: str) -> tuple[Path, Path]:
    """A small root whose `link` (an image path) is an absolute symlink to a folder of the
    host (a fresh, empty one), and that host folder."""
    root = small_root(tmp_path / "root")
    host = tmp_path / ("host" + link.replace("/", "-"))
    host.mkdir()
    target = root / link.lstrip("/")
    if target.is_dir() and not target.is_symlink():
        os.rename(target, target.with_name(target.name + ".moved"))    # keep what the image had aside
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(host)
    return root, host


def test_the_guard_script_never_lands_in_a_host_folder_the_images_usr_sbin_names(tmp_path, recipe):  # noqa: F811
    root, host = hostile(tmp_path, "/usr/sbin")
    c = customizer(ChrootBackend(root), recipe)
    c.guard()
    assert list(host.iterdir()) == []
    inside = root / str(host).lstrip("/") / "policy-rc.d"
    assert "bake: no daemon starts" in inside.read_text()


def test_apt_sources_and_static_files_never_land_in_a_host_folder_the_images_etc_names(tmp_path, recipe):  # noqa: F811
    root, host = hostile(tmp_path, "/etc")
    # the image's /etc is now the host folder's name: what bake writes under /etc goes
    # to that name inside the tree
    b = ChrootBackend(root)
    b.write("/etc/apt/sources.list", b"deb http://example.invalid/ bookworm main\n")
    b.use_host_resolver()
    c = customizer(b, recipe)
    c.copy_elements_in()
    c.copy_static()
    assert list(host.iterdir()) == []
    inside = root / str(host).lstrip("/")
    assert (inside / "apt/sources.list").read_text().startswith("deb http://example.invalid/")
    assert (inside / "probe/static.conf").read_text() == "static = yes\n"
    assert (inside / "resolv.conf").exists()


def test_sudo_rules_never_land_in_a_host_folder_the_images_etc_sudoers_d_names(tmp_path, recipe):  # noqa: F811
    root, host = hostile(tmp_path, "/etc/sudoers.d")
    customizer(ChrootBackend(root), recipe).create_users()
    assert list(host.iterdir()) == []
    assert "alice ALL=(ALL) NOPASSWD:ALL" in (root / str(host).lstrip("/") / "90-bake-users").read_text()


@pytest.mark.parametrize("escape", ["../../../../../../..{host}", "{host}/../{name}"])
def test_a_relative_link_climbing_out_of_the_tree_stays_inside_it(tmp_path, recipe, escape):  # noqa: F811
    root = small_root(tmp_path / "root")
    host = tmp_path / "host-apt"
    host.mkdir()
    apt = root / "etc/apt"
    apt.parent.mkdir(parents=True, exist_ok=True)
    apt.symlink_to(escape.format(host=host, name=host.name))
    ChrootBackend(root).write("/etc/apt/sources.list", b"deb http://example.invalid/ bookworm main\n")
    assert list(host.iterdir()) == []
