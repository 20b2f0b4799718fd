"""A failing hook and an interrupted bake lose nothing: no mount under the build
directory, no process left in the chroot, no half-made tree, and a message that names
the element, the phase, the hook and the tail of its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from builder.core import sh
from conftest import BAKE, REPO

pytestmark = pytest.mark.bakes

TEST_ELEMENTS = Path(__file__).parent / "elements"


def demo_plus(element: str, name: str, tmp_path: Path) -> Path:
    """The demo recipe with one test element added (same packages, so the cached
    package checkpoint is reused and the test reaches install.d quickly)."""
    data = yaml.safe_load((REPO / "recipes" / "debian-demo.yml").read_text())
    data["name"] = name
    data["elements"].append(element)
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_nothing_left(build_dir: Path) -> None:
    assert sh.mounts_under(build_dir) == []
    assert sh.chroot_processes(build_dir) == []
    assert not (build_dir / "work").exists()
    assert not list(build_dir.glob("*.tmp"))


def only_build_dir(output: Path, name: str) -> Path:
    dirs = list((output / name).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.e2e
def test_failing_hook_names_element_phase_hook_and_output_tail(demo_build, tmp_path):
    recipe = demo_plus("fails-in-install", "fails-in-hook", tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, BAKE_ELEMENTS_PATH=str(TEST_ELEMENTS))
    r = subprocess.run([BAKE, "build", str(recipe), "--output", str(out), "--stop-after", "image"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 1
    assert "bake: error: element 'fails-in-install', phase install.d, hook 50-fail failed (exit 3)" in r.stderr
    tail = r.stderr.split("--- last lines of its output ---", 1)[1]
    assert "checking something the image needs" in tail and "the thing is missing" in tail
    build_dir = only_build_dir(out, "fails-in-hook")
    assert_nothing_left(build_dir)
    record = json.loads((build_dir / "build.json").read_text())
    assert record["result"] == "failed" and "50-fail" in record["error"]
    assert "image" not in record.get("outputs", {})


@pytest.mark.e2e
@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-then-SIGTERM-during-cleanup"])
def test_sigint_during_customize_undoes_every_mount_and_process(demo_build, tmp_path, signals):
    recipe = demo_plus("sleeps-in-install", "interrupted", tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, BAKE_ELEMENTS_PATH=str(TEST_ELEMENTS))
    proc = subprocess.Popen([BAKE, "build", str(recipe), "--output", str(out), "--stop-after", "image"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 600
        marker = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(out.glob("interrupted/*/work/rootfs/var/tmp/bake-test-sleeping"))
            if found:
                marker = found[0]
                break
            time.sleep(0.2)
        assert marker is not None, "the bake never reached the sleeping install.d hook"
        build_dir = marker.parents[4]
        assert sh.mounts_under(build_dir), "customize should have its chroot mounts while the hook runs"
        assert sh.chroot_processes(build_dir / "work" / "rootfs"), "the hook should be running in the chroot"
        for sig in signals:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()     # its watchdog ends what it started
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted; everything mounted or started was undone" in stderr
    if len(signals) > 1:
        assert "still cleaning up after the interrupt" in stderr
    assert_nothing_left(build_dir)
    record = json.loads((build_dir / "build.json").read_text())
    assert record["result"] == "failed"
