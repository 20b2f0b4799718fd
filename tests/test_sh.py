"""builder.core.sh: every process, mount and loop device it starts is undone on any exit."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from builder.core import sh


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait for process `pid` to end (a zombie counts as ended): it was killed, and the
    kernel makes that true within moments even on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs {timeout:.0f} s after it was ended"
        time.sleep(0.05)


def test_failed_command_error_shows_the_command_and_its_output_tail():
    with pytest.raises(sh.CommandError) as info:
        sh.run(["sh", "-c", "for i in $(seq 100); do echo line $i; done; echo broken >&2; exit 7"], what="demo step")
    e = info.value
    assert e.returncode == 7
    assert str(e).startswith("demo step: sh -c ")
    assert "line 100" in e.tail and "broken" in e.tail and "line 1\n" not in e.tail


def test_a_silent_hang_is_ended_at_the_timeout_with_its_whole_process_group(tmp_path):
    pidfile = tmp_path / "child"
    start = time.monotonic()
    with pytest.raises(sh.CommandError, match="timed out after 1 s"):
        sh.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=1)
    assert time.monotonic() - start < 30, "ended at the timeout, not when the 60 s sleep did"
    child = int(pidfile.read_text())
    wait_gone(child)


def test_the_timeout_holds_when_a_process_outside_the_group_keeps_the_output_open(tmp_path):
    # as an SSH master connection does with the output of a client that was killed
    pidfile = tmp_path / "holder"
    start = time.monotonic()
    try:
        with pytest.raises(sh.CommandError, match="timed out after 1 s") as info:
            sh.run(["sh", "-c", f"setsid sleep 30 & echo $! > {pidfile}; echo started; sleep 60"], timeout=1)
        assert time.monotonic() - start < 25, "ended at the timeout, not when the holder's 30 s did"
        assert "started" in info.value.tail
    finally:
        if pidfile.exists():
            subprocess.run(["kill", pidfile.read_text().strip()], check=False)


def test_a_command_that_ends_in_time_is_not_held_by_what_it_left_running(tmp_path):
    pidfile = tmp_path / "holder"
    start = time.monotonic()
    try:
        r = sh.run(["sh", "-c", f"setsid sleep 30 & echo $! > {pidfile}; echo done"], timeout=3)
        assert r.returncode == 0 and "done" in r.output
        assert time.monotonic() - start < 25, "not held until the holder's 30 s are over"
    finally:
        if pidfile.exists():
            subprocess.run(["kill", pidfile.read_text().strip()], check=False)


def test_background_process_group_ends_with_the_block(tmp_path):
    pidfile = tmp_path / "child"
    with sh.background(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]) as proc:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert os.path.exists(f"/proc/{child}")
    assert proc.poll() is not None
    wait_gone(child)


def test_chroot_mounts_are_undone_when_the_block_fails(tmp_path):
    root = tmp_path / "root"
    for d in ("proc", "sys", "dev"):
        (root / d).mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with sh.chroot_mounts(root):
            assert len(sh.mounts_under(root)) >= 4
            raise RuntimeError("a hook failed")
    assert sh.mounts_under(root) == []


def test_loop_device_and_mount_are_undone_on_error(tmp_path):
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with sh.loop_device(img) as dev, sh.mount(dev, mnt):
            assert sh.mounts_under(mnt) == [str(mnt)]
            raise KeyboardInterrupt
    assert sh.mounts_under(mnt) == []
    assert str(img) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_missing_program_is_named_with_the_way_to_install_it():
    with pytest.raises(sh.BakeError, match="missing program.*no-such-tool-here.*scripts/setup"):
        sh.require("sh", "no-such-tool-here")
