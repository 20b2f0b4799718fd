"""A pip-installed bake works from any folder: `pip install .` into a fresh virtualenv (no
system packages, so no libguestfs binding either), then `bake validate` and `bake plan`
of the demo recipe from a folder outside the clone, with the built-in elements found
inside the installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow   # a virtualenv and the runtime dependencies from the package index


def test_an_installed_bake_plans_the_demo_from_another_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(REPO)], capture_output=True, text=True,
                         check=False)
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BAKE_ELEMENTS_PATH")}
    bake = str(venv / "bin" / "bake")
    recipe = str(REPO / "recipes" / "debian-demo.yml")
    checked = subprocess.run([bake, "validate", recipe], cwd=elsewhere, env=env, capture_output=True, text=True,
                             check=False)
    assert checked.returncode == 0, checked.stderr
    plan = subprocess.run([bake, "plan", "--json", recipe, "--output", str(tmp_path / "out")], cwd=elsewhere,
                          env=env, capture_output=True, text=True, check=False)
    assert plan.returncode == 0, plan.stderr
    data = json.loads(plan.stdout)
    site = next((venv / "lib").glob("python3*/site-packages/builder"))
    hooks = [h["hook"] for hs in data["hooks"].values() for h in hs]
    assert "50-sync-agent" in hooks and "30-acpiphp" in hooks
    assert [s["stage"] for s in data["stages"]][:3] == ["bootstrap", "customize", "image"]
    assert (site / "elements" / "sync-agent" / "static" / "usr" / "sbin" / "rootsync").stat().st_mode & 0o111
    assert not str(site).startswith(str(REPO))
