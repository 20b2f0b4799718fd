"""Two bakes started together, of two recipes that share a base, with an empty cache:
both succeed, the base is debootstrapped once and its package checkpoint made once, and
the cache holds one intact entry per key (no temporary file of either writer)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.core import sh, stale
from conftest import BAKE
from shared_base import intact, recipes

pytestmark = [pytest.mark.e2e, pytest.mark.bakes, pytest.mark.alone]

ROUNDS = 1      # a second round of two bakes on an empty cache is in test_many_bakes


@pytest.mark.parametrize("round_", range(1, ROUNDS + 1))
def test_two_bakes_sharing_a_base_started_together_both_succeed_with_one_debootstrap(tmp_path, round_):
    cache = tmp_path / "cache"          # empty: nothing is made before the two start
    out = tmp_path / "out"
    env = dict(os.environ, BAKE_CACHE=str(cache))
    procs = [subprocess.Popen([BAKE, "build", str(r), "--output", str(out), "--stop-after", "image"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
             for r in recipes(tmp_path)]
    try:
        results = [p.communicate(timeout=3000) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        stale.clean_stale()
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
    builds = [Path(stdout.strip().splitlines()[-1]) for stdout, _ in results]
    records = [json.loads((b / "build.json").read_text()) for b in builds]
    assert [r["result"] for r in records] == ["ok", "ok"]

    made = [r["stages"]["bootstrap"]["cached"] is False for r in records]
    assert made.count(True) == 1, "the base is debootstrapped by one bake, and taken from the cache by the other"
    assert sum((b / "bootstrap.log").exists() for b in builds) == 1, "one debootstrap log between the two"
    packages = [r["stages"]["customize"]["cached_packages"] for r in records]
    assert sorted(packages) == [False, True], "the package checkpoint is made once"
    waited = [stderr for _, stderr in results if "waiting for the bootstrap cache entry" in stderr]
    assert waited, "the second bake said it waited for the base being made"

    for ns in ("bootstrap", "packages"):
        entries = sorted((cache / ns).iterdir())
        tars = [e for e in entries if e.suffix == ".tar"]
        assert len(tars) == 1 and all(intact(t) for t in tars), entries
        assert [e.name for e in entries if e.suffix == ".json"] == [tars[0].stem + ".json"]
        assert not [e for e in entries if e.name.endswith(".tmp")], entries
    for b in builds:
        assert sh.mounts_under(b) == [] and not (b / "work").exists()
        assert (b / "image").exists() or any(b.glob("*.img")), sorted(p.name for p in b.iterdir())
