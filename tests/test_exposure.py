"""Who may read what bake makes (builder/core/exposure.py): build folders and the
folders bake creates above them are the owner's alone, or the named group's too."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from builder.core import exposure
from builder.core.errors import BakeError
from builder.core.record import Build


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_a_build_folder_and_the_folders_bake_made_above_it_are_the_owners_alone(tmp_path, monkeypatch):
    monkeypatch.delenv(exposure.GROUP_ENV, raising=False)
    root = tmp_path / "out"
    b = Build.create(root, "demo", "b1")
    assert [mode(p) for p in (root, root / "demo", b.dir)] == [0o700, 0o700, 0o700]


def test_a_folder_the_operator_made_keeps_its_mode(tmp_path, monkeypatch):
    monkeypatch.delenv(exposure.GROUP_ENV, raising=False)
    root = tmp_path / "out"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    b = Build.create(root, "demo", "b1")
    assert (mode(root), mode(b.dir)) == (0o755, 0o700)


def test_a_named_group_owns_and_reads_the_folders_and_images(tmp_path, monkeypatch):
    group = grp.getgrnam("adm")
    monkeypatch.setenv(exposure.GROUP_ENV, "adm")
    b = Build.create(tmp_path / "out", "demo", "b1")
    st = os.lstat(b.dir)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2750, group.gr_gid)
    image = b.dir / "demo.img"
    image.write_bytes(b"x")
    exposure.private_file(image)
    st = os.lstat(image)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, group.gr_gid)


def test_an_image_without_a_group_is_the_owners_alone(tmp_path, monkeypatch):
    monkeypatch.delenv(exposure.GROUP_ENV, raising=False)
    image = tmp_path / "demo.img"
    image.write_bytes(b"x")
    os.chmod(image, 0o644)
    exposure.private_file(image)
    assert mode(image) == 0o600


def test_an_unknown_group_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(exposure.GROUP_ENV, "no-such-group-here")
    with pytest.raises(BakeError, match="BAKE_GROUP=no-such-group-here: no such group"):
        Build.create(tmp_path / "out", "demo", "b1")
    assert not (tmp_path / "out").exists()


def test_a_cache_folder_bake_makes_is_the_owners_alone(tmp_path, monkeypatch):
    from builder.core.cache import TreeCache

    monkeypatch.delenv(exposure.GROUP_ENV, raising=False)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    cache = TreeCache(tmp_path / "cache", "base")
    with cache.lock("k"):
        cache.save("k", tree, {"what": "test"})
    assert mode(tmp_path / "cache") == 0o700
