"""Where a bake's work tree lives (builder/pipeline/workspace.py): the choice between a
tmpfs and the disk, and the error of a tree that outgrew the tmpfs. The real mounts are
in the bakes: the demo build's record says where its tree was, test_hard_kill kills a bake
whose tree is in memory, and test_build_failures interrupts one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from builder.core.errors import BakeError
from builder.pipeline import workspace
from builder.pipeline.plan import Route

GiB = 1 << 30


def ctx(base: str = "debootstrap", backend: str = "chroot", size: str = "auto", in_memory: bool = False):
    return SimpleNamespace(route=Route(base, backend), recipe=SimpleNamespace(data={"size": size}),
                           build=SimpleNamespace(data={"work_tree": {"in_memory": in_memory}}))


def test_auto_puts_a_debootstrap_tree_in_memory_limited_to_half_of_what_is_available():
    limit, why = workspace.choose(ctx(), value="auto", available=20 * GiB)
    assert limit == 10 * GiB
    assert "auto" in why


def test_auto_keeps_the_tree_on_disk_when_memory_is_short_and_says_why():
    limit, why = workspace.choose(ctx(), value="auto", available=6 * GiB)
    assert limit == 0
    assert "3.0 GiB" in why and "4.0 GiB" in why


def test_auto_wants_room_for_a_fixed_image_size():
    assert workspace.choose(ctx(size="12G"), value="auto", available=20 * GiB)[0] == 0
    assert workspace.choose(ctx(size="2G"), value="auto", available=20 * GiB)[0] == 10 * GiB


def test_a_base_image_stays_on_disk_unless_asked_and_the_appliance_has_no_work_tree():
    limit, why = workspace.choose(ctx(base="image"), value="auto", available=20 * GiB)
    assert limit == 0 and "BAKE_TMPFS=yes" in why
    assert workspace.choose(ctx(base="image"), value="yes", available=20 * GiB)[0] == 10 * GiB
    assert workspace.choose(ctx(base="image", backend="appliance"), value="yes", available=20 * GiB)[0] == 0


def test_yes_and_no_override_the_memory_check():
    assert workspace.choose(ctx(), value="yes", available=2 * GiB)[0] == 1 * GiB
    assert workspace.choose(ctx(), value="no", available=20 * GiB) == (0, "BAKE_TMPFS=no")


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_a_bad_setting_is_refused_naming_the_choices(monkeypatch, value):
    monkeypatch.setenv("BAKE_TMPFS", value)
    with pytest.raises(BakeError, match="BAKE_TMPFS='" + value + "': expected one of auto, yes, no"):
        workspace.setting()


def test_the_setting_defaults_to_auto_and_ignores_case(monkeypatch):
    monkeypatch.delenv("BAKE_TMPFS", raising=False)
    assert workspace.setting() == "auto"
    monkeypatch.setenv("BAKE_TMPFS", "No")
    assert workspace.setting() == "no"


def test_available_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683784 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n")
    assert workspace.available_memory(str(meminfo)) == 2048 * 1024
    meminfo.write_text("MemTotal:       24683784 kB\n")
    assert workspace.available_memory(str(meminfo)) == 0


def test_a_full_tmpfs_is_explained_and_other_errors_are_left_alone():
    full = "customize: dpkg: error: cannot copy extracted data: No space left on device"
    said = workspace.explain(full, ctx(in_memory=True))
    assert said.startswith(full) and "BAKE_TMPFS=no bakes it on disk" in said
    assert workspace.explain(full, ctx(in_memory=False)) == full
    assert workspace.explain("apt-get failed", ctx(in_memory=True)) == "apt-get failed"
