"""Cleanup never crosses a mount: the mount table is read back exactly (blanks, tabs,
backslashes, newlines and non-ASCII letters in a path), a tree is never removed through
a mount in it (a bind mount, another filesystem, a link leading out), and what a killed
bake left mounted under an output path with such a name is unmounted before its tree goes.

Every mount made here is a tmpfs or a bind mount under the test's own folder, undone in
a finally."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.core import mountinfo, sh, stale
from builder.core.removal import MountBoundaryError, remove_tree
from conftest import BAKE, REPO
from events import wait_for

# names the kernel writes escaped (\040 \011 \012 \134) and ones it writes as raw UTF-8
ODD_NAMES = ["two words", "tab\there", "back\\slash", "new\nline", "öut pút ünïcodé", "mixed \\ ö\t\n end"]


class Mounts(list):
    """The mount points a test made, undone (lazily, deepest last made first) by `undo`,
    which its finally calls: by the paths themselves, whatever the code under test says."""

    def make(self, *args: str | os.PathLike) -> None:
        subprocess.run(["mount", *map(os.fspath, args)], check=True, capture_output=True)
        self.append(os.fspath(args[-1]))

    def undo(self) -> None:
        for point in reversed(self):
            while subprocess.run(["umount", "-l", point], check=False, capture_output=True).returncode == 0:
                pass        # a point mounted on twice
        left = [p for p in self if _is_mounted(Path(p))]
        assert not left, f"still mounted: {left}"


def _is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    return any(m.target == real for m in mountinfo.read())


HOST_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/tty")


def host_dev_intact() -> bool:
    return all(stat.S_ISCHR(os.stat(d).st_mode) for d in HOST_DEVICES) and os.path.isdir("/dev/pts")


# --- reading the mount table --------------------------------------------------------------

@pytest.mark.parametrize("name", ODD_NAMES, ids=["space", "tab", "backslash", "newline", "non-ascii", "mixed"])
def test_mountinfo_gives_back_a_mount_point_whose_name_the_kernel_escapes_or_leaves_raw(tmp_path, name):
    point = tmp_path / name
    point.mkdir()
    made = Mounts()
    try:
        made.make("-t", "tmpfs", "-o", "size=1m", "bake-test", point)
        raw = Path("/proc/self/mountinfo").read_bytes()
        written = os.fsencode(str(point))
        for byte, escape in ((b"\\", b"\\134"), (b" ", b"\\040"), (b"\t", b"\\011"), (b"\n", b"\\012")):
            written = written.replace(byte, escape)
        assert written in raw, "the kernel writes the name escaped, its UTF-8 raw"
        # this test's own: a test on another worker mounts "bake-test" tmpfs too
        found = [m for m in mountinfo.read() if m.fstype == "tmpfs" and m.source == "bake-test"
                 and m.target.startswith(str(tmp_path) + "/")]
        assert [m.target for m in found] == [str(point)]
        assert sh.mounts_under(tmp_path) == [str(point)]
        assert sh.mounts_under(point) == [str(point)]
    finally:
        made.undo()


def test_mountinfo_decodes_octal_escapes_on_bytes_and_raw_utf8_with_the_filesystem_encoding():
    line = ("36 25 0:32 / /tmp/a\\040b\\011c\\012d\\134e/" + "öü" + " rw,relatime shared:1 - tmpfs x\\040y rw\n")
    [m] = mountinfo.parse(line.encode())
    assert m.target == "/tmp/a b\tc\nd\\e/öü"
    assert (m.mount_id, m.parent_id, m.device, m.fstype, m.source, m.shared) == (36, 25, "0:32", "tmpfs", "x y", True)
    # a name that is not UTF-8 comes back as os.fsdecode gives it, and so encodes back to its bytes
    [m] = mountinfo.parse(b"1 0 0:1 / /tmp/\xff\\040z rw - tmpfs t rw\n")
    assert os.fsencode(m.target) == b"/tmp/\xff z"


def test_mounts_under_lists_the_deeper_mount_first(tmp_path):
    top = tmp_path / "öut put"
    (top / "a").mkdir(parents=True)
    made = Mounts()
    try:
        made.make("-t", "tmpfs", "-o", "size=1m", "bake-test", top / "a")
        (top / "a" / "b c").mkdir()
        made.make("-t", "tmpfs", "-o", "size=1m", "bake-test", top / "a" / "b c")
        assert sh.mounts_under(top) == [str(top / "a" / "b c"), str(top / "a")]
    finally:
        made.undo()


# --- undoing what bake mounted -----------------------------------------------------------

def test_a_mount_on_a_non_ascii_path_is_undone_when_its_block_ends(tmp_path):
    point = tmp_path / "öut put" / "mnt"
    point.mkdir(parents=True)
    made = Mounts([str(point)])
    try:
        with sh.mount("bake-test", point, fstype="tmpfs", options="size=1m"):
            assert _is_mounted(point) and sh.own_mounts_under(tmp_path) == [str(point)]
        assert not _is_mounted(point) and sh.own_mounts_under(tmp_path) == []
    finally:
        made.undo()


CHROOT_MOUNTS = ("proc", "sys", "dev")     # what sh.chroot_mounts mounts in a tree (dev/pts within dev)


def test_chroot_mounts_under_a_non_ascii_path_are_all_undone_when_the_block_fails(tmp_path):
    root = tmp_path / "öut put" / "démo" / "work" / "rootfs"
    for d in CHROOT_MOUNTS:
        (root / d).mkdir(parents=True)
    made = Mounts([str(root / d) for d in CHROOT_MOUNTS])
    try:
        with pytest.raises(RuntimeError):
            with sh.chroot_mounts(root):
                mounted = sh.mounts_under(root)
                assert {str(root / d) for d in CHROOT_MOUNTS} <= set(mounted)
                assert sh.own_mounts_under(tmp_path) == mounted
                raise RuntimeError("a hook failed")
        assert sh.mounts_under(tmp_path) == []
        assert host_dev_intact()
    finally:
        made.undo()


# --- removing a tree ------------------------------------------------------------------------

def _tree_with_files(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("image\n")
    (root / "var" / "lib").mkdir(parents=True)
    (root / "var" / "lib" / "état").write_text("x")


def test_removal_refuses_a_bind_mount_in_the_tree_and_removes_nothing_under_it(tmp_path):
    host = tmp_path / "host dev"
    host.mkdir()
    (host / "marker").write_text("the host's own")
    tree = tmp_path / "öut put" / "work"
    _tree_with_files(tree)
    point = tree / "rootfs" / "dev"
    point.mkdir(parents=True)
    made = Mounts()
    try:
        made.make("--bind", host, point)
        with pytest.raises(MountBoundaryError) as e:
            remove_tree(tree)
        assert str(point) in str(e.value) and "\n" not in str(e.value)
        assert e.value.mount_point == str(point)
        assert (host / "marker").read_text() == "the host's own"
        assert (point / "marker").exists() and _is_mounted(point)
        assert (tree / "etc" / "hostname").exists(), "the refusal comes before anything is removed"
        # ignore_errors passes over errors, never a mount
        with pytest.raises(MountBoundaryError):
            remove_tree(tree, ignore_errors=True)
        assert (host / "marker").exists() and _is_mounted(point)
    finally:
        made.undo()
    remove_tree(tree)
    assert not tree.exists() and (host / "marker").exists()


def test_a_bind_mount_made_after_the_table_was_read_still_stops_the_walk(tmp_path, monkeypatch):
    # the walk's own check, by mount id, for a mount that appears once removal has begun
    # (the table read before it is made to miss it): same filesystem, same st_dev
    host = tmp_path / "host"
    host.mkdir()
    (host / "marker").write_text("keep")
    tree = tmp_path / "tree ö"
    _tree_with_files(tree)
    point = tree / "zz" / "dev"
    point.mkdir(parents=True)
    made = Mounts()
    try:
        made.make("--bind", host, point)
        assert os.stat(point).st_dev == os.stat(tree).st_dev
        monkeypatch.setattr(mountinfo, "under", lambda path, table=None: [])
        with pytest.raises(MountBoundaryError) as e:
            remove_tree(tree)
        assert e.value.mount_point == str(point)
        assert (host / "marker").read_text() == "keep" and _is_mounted(point)
    finally:
        monkeypatch.undo()
        made.undo()


def test_removal_stops_at_another_filesystem_below_the_tree(tmp_path, monkeypatch):
    tree = tmp_path / "work"
    _tree_with_files(tree)
    point = tree / "rootfs" / "proc"
    point.mkdir(parents=True)
    made = Mounts()
    try:
        made.make("-t", "tmpfs", "-o", "size=1m", "bake-test", point)
        (point / "marker").write_text("on the tmpfs")
        assert os.stat(point).st_dev != os.stat(tree).st_dev
        with pytest.raises(MountBoundaryError, match="proc is a mount point"):
            remove_tree(tree)
        # and by its device alone, had the table missed it
        monkeypatch.setattr(mountinfo, "under", lambda path, table=None: [])
        with pytest.raises(MountBoundaryError):
            remove_tree(tree)
        monkeypatch.undo()
        assert (point / "marker").read_text() == "on the tmpfs"
    finally:
        monkeypatch.undo()
        made.undo()


def test_removal_refuses_a_tree_that_is_itself_a_mount_point(tmp_path):
    point = tmp_path / "mounted"
    point.mkdir()
    made = Mounts()
    try:
        made.make("-t", "tmpfs", "-o", "size=1m", "bake-test", point)
        (point / "marker").write_text("x")
        with pytest.raises(MountBoundaryError):
            remove_tree(point)
        assert (point / "marker").exists()
    finally:
        made.undo()


def test_removal_removes_a_link_and_never_what_it_leads_to(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "marker").write_text("keep")
    tree = tmp_path / "tree"
    _tree_with_files(tree)
    (tree / "var" / "to-outside").symlink_to(outside)
    (tree / "etc" / "to-marker").symlink_to(outside / "marker")
    (tree / "dangling").symlink_to(tmp_path / "nothing")
    remove_tree(tree)
    assert not tree.exists()
    assert (outside / "marker").read_text() == "keep"
    # a link given as the tree itself goes, its target stays
    link = tmp_path / "link"
    link.symlink_to(outside)
    remove_tree(link)
    assert not link.is_symlink() and (outside / "marker").exists()


def test_discard_tree_unmounts_what_bake_mounted_in_it_deepest_first_then_removes_it(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "marker").write_text("keep")
    work = tmp_path / "öut put" / "work"
    (work / "rootfs" / "dev").mkdir(parents=True)
    (work / "rootfs" / "proc").mkdir()
    made = Mounts()
    try:
        with sh.chroot_guard(work / "rootfs"):
            made.make("--bind", host, work / "rootfs" / "dev")
            made.make("-t", "tmpfs", "-o", "size=1m", "bake-test", work / "rootfs" / "proc")
            sh.discard_tree(work)
            assert not work.exists()
        assert (host / "marker").read_text() == "keep"
    finally:
        made.undo()


def test_discard_tree_leaves_a_mount_bake_did_not_make_and_says_so(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "marker").write_text("keep")
    work = tmp_path / "work"
    (work / "mine").mkdir(parents=True)
    made = Mounts()
    try:
        made.make("--bind", host, work / "mine")
        with pytest.raises(MountBoundaryError):
            sh.discard_tree(work)
        assert _is_mounted(work / "mine") and (host / "marker").exists()
    finally:
        made.undo()


# --- what a killed bake left ----------------------------------------------------------------

CHILD = """
import json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, %(repo)r)
from builder.core import lifetime, sh
work = Path(%(work)r)
root = work / "rootfs"
with lifetime.tracked("path", work, what="work tree"), sh.chroot_guard(root):
    sh.run(["mount", "--bind", %(dev)r, root / "dev"])
    sh.run(["mount", "-t", "tmpfs", "-o", "size=1m", "proc-like", root / "proc"])
    print(json.dumps({"token": lifetime.session().token}), flush=True)
    time.sleep(600)
"""


def test_stale_cleanup_unmounts_a_killed_chroot_under_a_non_ascii_output_path_then_removes_the_tree(
        tmp_path, monkeypatch):
    # journals of this test's own: no other bake's dead session is cleaned here
    monkeypatch.setenv("BAKE_STATE_DIR", str(tmp_path / "state"))
    host_dev = tmp_path / "host dev"
    host_dev.mkdir()
    (host_dev / "null").write_text("stands for the host's /dev/null")
    work = tmp_path / "öut put" / "démo" / "20260101-000000" / "work"
    for sub in ("dev", "proc", "etc"):
        (work / "rootfs" / sub).mkdir(parents=True)
    (work / "rootfs" / "etc" / "hostname").write_text("image\n")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD) % {"repo": str(REPO), "work": str(work), "dev": str(host_dev)})
    made = Mounts([str(work / "rootfs" / "dev"), str(work / "rootfs" / "proc")])    # the child's
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, f"the child ended early (status {proc.wait()})"
        token = json.loads(line)["token"]
        assert sorted(sh.mounts_under(work)) == [str(work / "rootfs" / "dev"), str(work / "rootfs" / "proc")]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert sh.mounts_under(work), "the kernel keeps the mounts of a killed process"

        found = [s for s in stale.clean_stale() if s.token == token]
        assert found, "the killed child's session was not cleaned"
        said = "\n".join(found[0].found)
        assert not found[0].failed, found[0].failed
        assert str(work / "rootfs" / "dev") in said and str(work / "rootfs" / "proc") in said
        assert f"removed work tree {work}" in said
        assert sh.mounts_under(tmp_path) == []
        assert not work.exists()
        assert (host_dev / "null").read_text() == "stands for the host's /dev/null"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        made.undo()


# --- a real bake, interrupted and run again (not in the quick tier) -------------------------

@pytest.mark.bakes
@pytest.mark.e2e
def test_an_interrupted_bake_under_a_non_ascii_output_behind_a_symlink_leaves_nothing_mounted_and_the_host_dev_intact(
        demo_build, tmp_path):
    assert host_dev_intact()
    # the output path is named through a symlink to a folder with a space and a non-ASCII letter:
    # the mount table names the real path, which bake must still know as its own
    real = tmp_path / "öut put"
    real.mkdir()
    out = tmp_path / "the link"
    out.symlink_to(real)
    argv = [BAKE, "build", str(REPO / "recipes" / "debian-demo.yml"), "--stop-after", "customize",
            "--output", str(out)]
    # its output goes to a file: a pipe nobody reads while the test waits would stop the bake
    log_path = tmp_path / "first-run.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def chroot_dev():
            return [t for t in sh.mounts_under(real) if t.endswith("/work/rootfs/dev")] or proc.poll() is not None
        found = wait_for(chroot_dev, 900, "the chroot's /dev to be mounted under the output path (customize)")
        assert proc.poll() is None, "the bake ended before customize mounted its chroot:\n" + log_path.read_text()
        build_dir = Path(found[0].removesuffix("/work/rootfs/dev"))
        assert build_dir.parent.parent == real
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)     # its watchdog ends what it started
            proc.wait()
        # what a failure left mounted under the test's own folder, deepest first
        for target in sh.mounts_under(real):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    said = log_path.read_text()
    assert proc.returncode == 130, said
    assert "interrupted; everything mounted or started was undone" in said
    assert sh.mounts_under(real) == []
    assert sh.chroot_processes(real) == []
    assert not (build_dir / "work").exists()
    assert host_dev_intact()
    assert json.loads((build_dir / "build.json").read_text())["result"] == "failed"

    # run again, to the end of customize
    again = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=1800)
    try:
        assert again.returncode == 0, again.stdout + again.stderr
        assert sh.mounts_under(real) == []
        assert host_dev_intact()
        results = sorted(json.loads(p.read_text())["result"] for p in out.glob("*/*/build.json"))
        assert results == ["failed", "ok"], results
        assert not list(out.glob("*/*/work"))
    finally:
        for target in sh.mounts_under(real):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


# rmtree is left only for folders a run made private to itself, where nothing is mounted:
# a bundle's staging folders, an instance's overlay and SSH control folders, a download's
PRIVATE_RMTREES = {"builder/bundle/files.py": 1, "builder/bundle/writer.py": 1, "builder/bundle/build.py": 2,
                   "builder/vm/instance.py": 2, "builder/cloud/download.py": 1}


def test_the_mount_table_has_one_reader_and_trees_one_remover():
    for path in (REPO / "builder").rglob("*.py"):
        text = path.read_text()
        rel = str(path.relative_to(REPO))
        if path.name != "mountinfo.py":
            for reader in ("/proc/self/mounts", "/proc/mounts", "/proc/self/mountinfo", "findmnt", "unicode_escape"):
                assert reader not in text, f"{rel} reads the mount table itself ({reader})"
        assert text.count("rmtree(") == PRIVATE_RMTREES.get(rel, 0), f"{rel} removes a tree without remove_tree"
