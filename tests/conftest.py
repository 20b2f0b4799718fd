"""Fixtures shared by the whole suite.

The slow end-to-end tests share one real bake of recipes/debian-demo.yml per run
(`demo_build`); the cache under output/.cache makes a second run on the same machine
fast, and CI starts from a clean clone, so there it bakes from scratch.

Tiers (markers, declared in pyproject.toml): `bakes` (a real bake, root's chroot and
mkfs, or the run's demo or DIB build), `boots` (a QEMU guest or a libguestfs appliance),
`e2e` (a whole flow) and `slow` (neither, but long: the cloud stand-in's flows, a sync
agent's debounce). `scripts/test --quick` leaves all four out.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_OUTPUT = REPO / "output" / "tests"
BAKE = str(Path(sys.executable).parent / "bake")

os.environ.setdefault("BAKE_CACHE", str(REPO / "output" / ".cache"))

# Fixtures that bake: a test using one must say so with the `bakes` marker.
BAKING_FIXTURES = ("demo_build", "dib_build")


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("the test suite bakes and boots images for real: run it as root (see README)")
    # A run started in the background of a non-interactive shell (cron, a CI runner,
    # `scripts/test &`) inherits SIGINT ignored, and Python then installs no handler of its
    # own: the interrupt tests would interrupt nothing, and every process they start would
    # inherit the ignored signal too. The suite runs with Python's usual SIGINT handling.
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test that uses a baking fixture but lacks the `bakes` marker would slip into
    the quick tier: refuse the run, naming it."""
    wrong = [item.nodeid for item in items
             if set(BAKING_FIXTURES) & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("bakes")]
    if wrong:
        raise pytest.UsageError("these tests bake (they use the demo or DIB build) but lack the `bakes` marker, "
                                "so the quick tier would run them:\n  " + "\n  ".join(wrong))


@pytest.fixture(scope="session")
def demo_build():
    """The demo recipe baked for real, once per test run (up to the image stage)."""
    from builder.pipeline.bake import bake
    from builder.pipeline.options import BuildOptions
    from builder.recipe.recipe import load_recipe

    # Earlier runs' builds are a gigabyte or more each; keep only this run's, and those of
    # runs still going beside it (their pid is in the name).
    for old in (TEST_OUTPUT / "debian-demo").glob("run-*"):
        pid = old.name.removeprefix("run-")
        if old.name != f"run-{os.getpid()}" and not (pid.isdigit() and os.path.exists(f"/proc/{pid}")):
            shutil.rmtree(old, ignore_errors=True)
    recipe = load_recipe(REPO / "recipes" / "debian-demo.yml")
    build = bake(recipe, BuildOptions(output=str(TEST_OUTPUT), stop_after="image", build_id=f"run-{os.getpid()}"))
    assert build.data["result"] == "ok"
    return build


@pytest.fixture(scope="session")
def dib_build(tmp_path_factory):
    """tests/recipes/dib-bookworm.yml baked and verified for real, once per test run
    (see tests/dib_builds.py)."""
    from dib_builds import bake_dib

    yield from bake_dib(tmp_path_factory)


@pytest.fixture
def clean_env(monkeypatch):
    """No cloud or bundle credential variables from the environment of the test run."""
    from builder.cloud.credentials import ENV_NAMES

    for names in ENV_NAMES.values():
        for n in names:
            monkeypatch.delenv(n, raising=False)
    return monkeypatch
