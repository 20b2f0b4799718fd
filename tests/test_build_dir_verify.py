"""`bake verify` on a build that lacks what a verification boots (kernel, ramdisk,
image) says so before it touches anything: the evidence of an earlier verification in
`verify/`, the node disk in `vm/` and build.json are left exactly as they were."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.core.record import Build
from conftest import BAKE


def with_earlier_verification(build: Build) -> dict[str, tuple[int, int, bytes]]:
    """Give `build` the evidence a verification leaves; returns what must stay as it is."""
    (build.dir / "verify" / "a").mkdir(parents=True)
    (build.dir / "verify" / "a" / "console.log").write_text("bake-ready first_boot=yes instance_id=i-1 uptime=9\n")
    (build.dir / "verify.json").write_text(json.dumps({"result": "pass"}))
    (build.dir / "vm").mkdir()
    (build.dir / "vm" / "disk-m1.small.raw").write_bytes(b"\0" * 4096)
    build.set("verify", {"result": "pass"})
    return snapshot(build.dir)


def snapshot(d: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_ino, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out


def verify(build: Build) -> subprocess.CompletedProcess:
    return subprocess.run([BAKE, "verify", str(build.dir)], capture_output=True, text=True, timeout=120)


def test_a_build_without_outputs_is_refused_and_earlier_evidence_is_kept(tmp_path):
    build = Build.create(tmp_path / "output", "demo")
    before = with_earlier_verification(build)
    r = verify(build)
    assert r.returncode == 1
    assert f"bake: error: {build.dir}: this build has no kernel, ramdisk and image (stage not run?)" in r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(build.dir) == before


@pytest.mark.parametrize("gone", ["ramdisk", "image"])
def test_a_recorded_output_whose_file_is_gone_is_named_and_earlier_evidence_is_kept(tmp_path, gone):
    build = Build.create(tmp_path / "output", "demo")
    for role in ("kernel", "ramdisk", "image"):
        (build.dir / role).write_bytes(os.urandom(512))
        build.record_output(role, build.dir / role)
    (build.dir / gone).unlink()
    before = with_earlier_verification(build)
    r = verify(build)
    assert r.returncode == 1
    assert f"bake: error: {build.dir}: recorded but missing: {build.dir / gone} (its {gone})" in r.stderr
    assert snapshot(build.dir) == before
