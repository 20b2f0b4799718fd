"""The build farm on one machine, for real: Redis and the store (the 4.x stand-in) on
127.0.0.1, three `bake worker` processes each a box of its own (own output folder, own
stage cache), and `bake nightly --farm --keep 1` of six small recipes on two bases (the
demo build, and a copy of it with one file more). One worker and its job's process
group are SIGKILLed in the middle of a build; every build still finishes, the killed
one on another worker; no two holders of a lease overlap; each base is made once on
the farm and taken from the store by the other boxes; a second nightly submission is
refused; gc leaves one build per recipe; nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from builder.core import lifetime, sh, watchdog
from builder.cloud.objects import ObjectStore
from builder.farm import lease as lease_mod
from builder.farm.connect import redis_from_url
from builder.farm.records import list_records
from eucalyptus_standin.fixtures import euca4  # noqa: F401  (a fixture)
from events import wait_for
from farm_helpers import BAKE, GO, copy_base, overlaps, redis_server, start_worker, store_url, waiting_roots, write_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.bakes, pytest.mark.alone]

SLOW = "farm-a1"      # waits in its commands until the test lets it go: the build killed mid-way


def recipes(folder: Path, base_a: Path, base_b: Path) -> Path:
    """Six recipes, three on each base, each with a file of its own."""
    d = folder / "recipes"
    d.mkdir(parents=True)
    for base, names in ((base_a, ("farm-a1", "farm-a2", "farm-a3")), (base_b, ("farm-b1", "farm-b2", "farm-b3"))):
        for name in names:
            write_recipe(d, name, base, slow=name == SLOW)
    return d


def loops_on(path: Path) -> list[str]:
    return [line for line in sh.output(["losetup", "-a"]).splitlines() if str(path) in line]


@pytest.fixture
def farm_space(euca4, tmp_path, monkeypatch):
    """The test's folder and store, emptied afterwards, passed or not: the boxes' caches
    and builds and the store's objects (held by the session's stand-in) take gigabytes
    that the rest of the run needs. A folder with anything still mounted is left alone."""
    for k, v in euca4.env().items():      # the test reads the store as the workers do
        monkeypatch.setenv(k, v)
    store = store_url()
    yield tmp_path, store
    with contextlib.suppress(Exception):
        s3 = ObjectStore.from_url(store)
        for name in list(s3.list("")):
            s3.delete(name)
    if not sh.mounts_under(tmp_path):
        for d in [*tmp_path.glob("box-*/output"), *tmp_path.glob("box-*/cache"), tmp_path / "base-b"]:
            shutil.rmtree(d, ignore_errors=True)


def test_three_workers_bake_six_recipes_through_a_killed_worker(demo_build, euca4, farm_space):
    folder, store = farm_space
    base_b = copy_base(demo_build.dir, folder / "base-b", "base b")
    dir_ = recipes(folder, demo_build.dir, base_b)
    cloud_env = euca4.env()
    workers = []
    nightly = None
    with redis_server(folder / "redis") as redis:
        env = dict(os.environ, **cloud_env)
        farm_args = ["--farm", "--redis", redis.url, "--store", store]
        try:
            workers = [start_worker(f"box-{i}", folder / f"box-{i}", redis, store, cloud_env) for i in (1, 2, 3)]
            nightly = subprocess.Popen([BAKE, "nightly", str(dir_), *farm_args, "--keep", "1", "--backoff", "0",
                                        "--output", str(folder / "nightly")], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
            conn = redis_from_url(redis.url)
            from rq import Queue
            wait_for(lambda: Queue("bake", connection=conn).count + len(conn.keys("rq:job:*")) >= 6
                     or nightly.poll() is not None, 300, "the nightly run to submit its six jobs")

            # the same nightly again, while the first one's jobs are there: refused, not run twice
            again = subprocess.run([BAKE, "nightly", str(dir_), *farm_args, "--keep", "1",
                                    "--output", str(folder / "nightly-again")],
                                   capture_output=True, text=True, env=env, timeout=600)
            assert again.returncode == 6, again.stderr
            assert again.stderr.count("refused: job bake_farm-") == 6, again.stderr
            assert "tonight's jobs of these recipes are already submitted" in again.stderr

            # the slow recipe's build reaches its command: kill its worker and the job's group
            first = wait_for(lambda: waiting_roots(folder, SLOW) or nightly.poll() is not None, 1800,
                             f"{SLOW}'s build to reach its command")
            assert nightly.poll() is None, nightly.communicate()[1][-6000:]
            first = first[0]
            box = next(w for w in workers if first.is_relative_to(w.folder))
            s3 = ObjectStore.from_url(store)
            record = wait_for(lambda: next((r for r in list_records(s3, SLOW) if r.get("state") == "building"),
                                           None), 120, f"{SLOW}'s durable record")
            assert record["worker"] == box.name
            horse = record["pid"]
            os.killpg(box.proc.pid, signal.SIGKILL)       # the worker and its scheduler
            with contextlib.suppress(ProcessLookupError):
                os.killpg(horse, signal.SIGKILL)          # the job: its work horse and the bake it runs
            box.proc.wait()
            # the box's service manager starts its worker again, which cleans what the kill left
            restarted = start_worker(box.name, box.folder, redis, store, cloud_env)
            workers[workers.index(box)] = restarted
            log = (box.folder / "worker.log").read_text()
            assert "left when it was killed" in log and "unmounted" in log and "removed work tree" in log and \
                f"the worker {box.name} of this box (pid {box.proc.pid}) was killed; its name is taken over" in log, \
                log[-3000:]

            # the job comes back, on any worker: let it go there
            again_root = wait_for(lambda: [r for r in waiting_roots(folder, SLOW) if r != first]
                                  or nightly.poll() is not None, 900, f"{SLOW} to be tried again")
            assert nightly.poll() is None, nightly.communicate()[1][-6000:]
            again_root = again_root[0]
            (again_root / GO).touch()
            out, err = nightly.communicate(timeout=2400)
            assert nightly.returncode == 0, err[-6000:]
        finally:
            if nightly is not None and nightly.poll() is None:
                os.killpg(nightly.pid, signal.SIGKILL)
                nightly.wait()
            for w in workers:
                w.stop()

        summary = json.loads((folder / "nightly" / "nightly" / "latest.json").read_text())
        assert summary["passed"] == 6 and summary["failed"] == 0, summary
        results = {r["recipe"]: r["result"] for r in summary["recipes"]}
        assert results[SLOW]["attempt"] == 2 and results[SLOW]["host"], results[SLOW]
        assert all(r["state"] == "ok" for r in results.values()), results
        hosts = {w.name for w in workers}
        done_on = {r["recipe"]: r["worker"] for r in list_records(ObjectStore.from_url(store))}
        assert set(done_on.values()) <= hosts

        # never two live holders of a lease: recipes, and the cache entries of both bases
        conn = redis_from_url(redis.url)
        leases = [k.decode().removeprefix(lease_mod.LOG_PREFIX) for k in conn.keys(lease_mod.LOG_PREFIX + "*")]
        assert {f"recipe:{n}" for n in results} <= set(leases)
        for name in leases:
            history = lease_mod.history(conn, name)
            assert overlaps(history) == [], (name, history)
        killed = [e for e in lease_mod.history(conn, f"recipe:{SLOW}") if "released" not in e]
        assert len(killed) == 1, "the killed build's lease ended by expiring, not by release"

        # each base made once on the farm; the other boxes took it from the store
        local = [json.loads(p.read_text()) for p in folder.glob("box-*/output/farm-*/*/build.json")]
        made = [r["stages"]["bootstrap"]["key"] for r in local if r["stages"].get("bootstrap", {}).get("cached") is False]
        assert len(made) == 2 and len(set(made)) == 2, made
        s3 = ObjectStore.from_url(store)
        assert sorted(n for n in s3.list("cache/base/") if n.endswith(".tar")) == sorted(
            f"cache/base/{k}.tar" for k in made)
        boxes_with_base = {p.parents[2].name for p in folder.glob("box-*/cache/base/*.tar")}
        assert len(boxes_with_base) >= 2, "a box that did not make a base has it from the store"

        # gc --keep 1 left one build per recipe: the killed attempt went
        records = list_records(s3)
        assert sorted(r["recipe"] for r in records) == sorted(results), [(r["recipe"], r["build_id"]) for r in records]
        assert all(r["state"] == "ok" and r["artifacts"]["image"]["sha256"] for r in records)
        assert summary["gc"]["deleted"] and all(d["recipe"] == SLOW for d in summary["gc"]["deleted"])
        assert not list(s3.list(".tmp/")), "no half-written object"

    # nothing is left: no process of any bake, no mount, no loop device, no work tree
    assert sh.mounts_under(folder) == []
    assert loops_on(folder) == []
    assert [p for p in watchdog.processes_rooted_in(str(folder))] == []
    assert not list(folder.glob("box-*/output/farm-*/*/work")), "no work tree"
    assert not [p for p in folder.glob("box-*/output/.farm/jobs/*")], "no job folder"
    assert not [h for h in lifetime.running() if str(folder) in json.dumps(h)]
