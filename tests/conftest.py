"""Fixtures shared by the whole suite, and what lets it run on several workers at once.

The slow end-to-end tests share one real bake of recipes/debian-demo.yml per run
(`demo_build`); the cache under output/.cache makes a second run on the same machine
fast, and CI starts from a clean clone, so there it bakes from scratch.

Tiers (markers, declared in pyproject.toml): `bakes` (a real bake, root's chroot and
mkfs, or the run's demo or DIB build), `boots` (a QEMU guest or a libguestfs appliance),
`e2e` (a whole flow) and `slow` (neither, but long: the cloud stand-in's flows, a sync
agent's debounce). `scripts/test --quick` leaves all four out; `scripts/test` runs
everything, on two workers (pytest-xdist, `--dist loadgroup`; BAKE_TEST_WORKERS=0 runs it in
one process):

- tests that share a module fixture run on one worker, and so do the tests of one
  `xdist_group` (tests/parallel.py says which and why);
- the demo build is baked by the first worker that needs it, under a file lock; the
  others wait for it and use the same build;
- a test that starts a guest (`boots`) holds the run's guest lock shared; a test that
  starts several guests or bakes at once itself (`alone`) holds it alone, so that no guest
  of the other worker is starved into a timeout beside it (`guest_share`);
- each worker has a state folder (BAKE_STATE_DIR: bake's journals, recipe and build
  locks) and a temporary folder (TMPDIR) of its own, so that a test which kills a bake
  and checks what the next one cleans up, or which counts the mounts in the temporary
  folder, sees its own worker's bakes only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

import parallel

REPO = Path(__file__).resolve().parent.parent
TEST_OUTPUT = REPO / "output" / "tests"
BAKE = str(Path(sys.executable).parent / "bake")

os.environ.setdefault("BAKE_CACHE", str(REPO / "output" / ".cache"))


# This run's name, the same in every worker: the first process's pid (so that a later
# run can tell whether it still goes) and a token (a pid comes round again).
if "BAKE_TEST_RUN" not in os.environ:
    os.environ["BAKE_TEST_RUN"] = f"{os.getpid()}-{secrets.token_hex(4)}"
RUN = os.environ["BAKE_TEST_RUN"]
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# which unit of work each test is, written by the workers for the controller's scheduler
UNITS = TEST_OUTPUT / f"units-{RUN}.json"
# held shared by a test that starts a guest, alone by one that starts several (guest_share)
GUEST_LOCK = TEST_OUTPUT / f"guests-{RUN}.lock"


def run_is_alive(name: str) -> bool:
    """Whether the run named `name` (`run-PID-TOKEN`, or `run-PID` as older runs named
    their builds) is still going."""
    pid = name.removeprefix("run-").split("-")[0]
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


def _worker_folders() -> None:
    """A state folder and a temporary folder of this worker's own (see the docstring)."""
    os.environ["BAKE_STATE_DIR"] = str(TEST_OUTPUT / "state" / WORKER)
    # libguestfs keeps its appliance under TMPDIR unless told: it stays where it was
    os.environ.setdefault("LIBGUESTFS_CACHEDIR", "/var/tmp")
    tmp = Path(tempfile.mkdtemp(prefix=f"bake-test-{WORKER}-"))
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None         # gettempdir() reads TMPDIR again


def pytest_configure(config):
    if WORKER:
        _worker_folders()
    else:
        TEST_OUTPUT.mkdir(parents=True, exist_ok=True)


def pytest_unconfigure(config):
    if not WORKER:
        UNITS.unlink(missing_ok=True)
        GUEST_LOCK.unlink(missing_ok=True)
        GUEST_LOCK.with_suffix(".turnstile").unlink(missing_ok=True)
    tmp = os.environ.get("TMPDIR", "")
    if WORKER and Path(tmp).name.startswith(f"bake-test-{WORKER}-"):
        from builder.core import sh
        # never through a mount: a chroot's /dev or /proc left mounted is the host's own
        if not sh.mounts_under(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


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
    """Check the tiers' markers, and share the tests out among the workers (tests/parallel.py)."""
    parallel.check_markers(items)
    parallel.share_out(items, UNITS if WORKER else None)


def pytest_xdist_make_scheduler(config, log):
    """The controller's scheduler: tests/parallel.py's units of work (`--dist loadgroup`)."""
    if config.getvalue("dist") == "loadgroup":
        return parallel.UnitScheduling(config, log, units_path=UNITS)
    return None


@contextlib.contextmanager
def guest_lock(alone: bool):
    """The run's guest lock, shared or alone. A test that waits to hold it alone first
    takes the turnstile, which every test that would share it passes through: the
    sharers of the other worker cannot keep it from its turn."""
    with open(GUEST_LOCK.with_suffix(".turnstile"), "a") as turnstile, open(GUEST_LOCK, "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield                               # the lock goes when the file closes, or its holder dies


@pytest.fixture(autouse=True)
def guest_share(request):
    """On workers, a `boots` test shares the guest lock and an `alone` test holds it alone
    (see the docstring); with one process there is no one to share with."""
    alone = request.node.get_closest_marker("alone") is not None
    if not WORKER or not (alone or request.node.get_closest_marker("boots")):
        yield
        return
    with guest_lock(alone):
        yield


def _bake_demo() -> "Build":  # noqa: F821
    from builder.pipeline.bake import bake
    from builder.pipeline.options import BuildOptions
    from builder.recipe.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "debian-demo.yml")
    return bake(recipe, BuildOptions(output=str(TEST_OUTPUT), stop_after="image", build_id=f"run-{RUN}"))


@pytest.fixture(scope="session")
def demo_build():
    """The demo recipe baked for real, once per test run (up to the image stage): the
    first worker to ask bakes it, the others wait for that bake and share its build."""
    from builder.core.record import Build

    builds = TEST_OUTPUT / "debian-demo"
    builds.mkdir(parents=True, exist_ok=True)
    here = builds / f"run-{RUN}"
    failed = builds / f"run-{RUN}.failed"
    with open(TEST_OUTPUT / "debian-demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # released when the file closes, or its holder dies
        if failed.exists():
            pytest.fail(f"the run's demo build failed in another worker:\n{failed.read_text()}")
        if (here / "build.json").exists():
            build = Build.load(here)
        else:
            # Earlier runs' builds are a gigabyte or more each; keep only this run's, and
            # those of runs still going beside it.
            for old in builds.glob("run-*"):
                if not old.name.startswith(f"run-{RUN}") and not run_is_alive(old.name):
                    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            try:
                build = _bake_demo()
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}\n")
                raise
    assert build.data["result"] == "ok", build.data.get("error")
    return build


@pytest.fixture(scope="session")
def dib_build(tmp_path_factory):
    """tests/recipes/dib-bookworm.yml baked and verified for real, once per test run
    (see tests/dib_builds.py); its tests all run on one worker (the host-etc group)."""
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
