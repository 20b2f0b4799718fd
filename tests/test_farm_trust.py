"""The farm's trust boundary at Redis: whoever can write to the farm's Redis can put
anything on bake's queue, and a bake worker (root) must run none of it but bake's own
build of a spec that fits. Each attack is what such a writer would push (RQ with its
default pickle serializer, or JSON naming another function, or a spec that does not
fit), taken by a real `bake worker --burst` on Debian's redis-server, and judged from
outside: the marker the attack would write is absent, and the job is failed in Redis
with its reason."""

from __future__ import annotations

import os
import pickle
import subprocess
import zlib
from pathlib import Path

import pytest
import yaml
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry

from builder.farm.connect import SERIALIZER, Farm, redis_from_url
from builder.farm.jobs import BadSpec, submit
from builder.farm.trust import JOB_FUNC, BakeJob, check_spec, refusal
from builder.pipeline.options import BuildOptions
from conftest import BAKE, REPO
from eucalyptus_standin.fixtures import euca4  # noqa: F401  (a fixture)
from farm_helpers import redis_server, store_url, tail

DIGEST = "ab" * 32


class Payload:
    """What unpickling runs: `touch MARKER`, as root on the worker that loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def good_spec(**changed) -> dict:
    return {"recipe": "app", "bundle": f"recipes/{DIGEST}.tar", "sha256": DIGEST,
            "options": BuildOptions().to_json(), "submitted": "2026-12-07T00:00:00Z", "submitted_from": "box",
            **changed}


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def attacked(redis, euca4, tmp_path_factory):
    """Three hostile jobs pushed onto bake's queue by a writer of its Redis, then one
    `bake worker --burst` run over them: {kind: (job id, marker)} and the worker's log."""
    folder = tmp_path_factory.mktemp("attacked")
    conn = redis_from_url(redis.url)
    conn.flushall()
    jobs = {}
    # (a) RQ's default serializer: the data is a pickle whose loading runs os.system
    marker = folder / "pickled-ran"
    Queue("bake", connection=conn).enqueue_call(JOB_FUNC, args=(Payload(marker),), job_id="evil-pickle")
    jobs["pickle"] = ("evil-pickle", marker)
    # (b) JSON, but naming another function
    marker = folder / "os-system-ran"
    Queue("bake", connection=conn, serializer=SERIALIZER).enqueue_call(
        "os.system", args=(f"touch {marker}",), job_id="evil-func")
    conn.hset("rq:job:evil-func", "failure_callback_name", "os.system")     # called as it fails, were it looked up
    jobs["func"] = ("evil-func", marker)
    # (c) bake's build, with a spec that does not fit: a recipe name that climbs out of the output
    marker = folder / "output" / "etc"
    Queue("bake", connection=conn, serializer=SERIALIZER).enqueue_call(
        JOB_FUNC, args=(good_spec(recipe="../../etc"),), job_id="evil-spec")
    jobs["spec"] = ("evil-spec", marker)
    assert Queue("bake", connection=conn).count == 3
    env = dict(os.environ, **euca4.env())
    for k in ("BAKE_REDIS_URL", "BAKE_FARM_STORE", "BAKE_FARM_SHARED_CACHE", "BAKE_FARM_LEASE"):
        env.pop(k, None)
    log = folder / "worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([BAKE, "worker", "--burst", "--redis", redis.url, "--store", store_url("trust"),
                                 "--output", str(folder / "output"), "--name", "box-trust"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, f"the burst worker exited {proc.returncode}:\n{tail(log)}"
    yield jobs, log.read_text(), conn
    conn.close()


def _failed_with(conn, jid: str) -> str:
    """The last line of the failed job's error, read from Redis."""
    job = Job.fetch(jid, connection=conn, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FAILED, job.get_status()
    return job.latest_result().exc_string.strip().splitlines()[-1]


def test_a_pickled_job_is_never_loaded_and_fails_saying_why(attacked):
    jobs, _, conn = attacked
    jid, marker = jobs["pickle"]
    assert not marker.exists(), "the worker never unpickled the job"
    error = _failed_with(conn, jid)
    assert f"farm job {jid} refused: its data is not JSON (a pickled job?); it was not loaded and nothing of it ran" \
        in error, error
    # and the payload was live: the bytes in Redis, unpickled, run os.system
    pickle.loads(zlib.decompress(conn.hget(f"rq:job:{jid}", "data")))
    assert marker.exists()
    marker.unlink()


def test_a_json_job_naming_another_function_is_refused(attacked):
    jobs, _, conn = attacked
    jid, marker = jobs["func"]
    assert not marker.exists(), "os.system never ran"
    error = _failed_with(conn, jid)
    assert f"farm job {jid} refused: it calls 'os.system', not bake's build ({JOB_FUNC}); nothing of it ran" \
        in error, error


def test_a_job_whose_spec_does_not_fit_fails_naming_what_and_runs_nothing(attacked):
    jobs, _, conn = attacked
    jid, marker = jobs["spec"]
    error = _failed_with(conn, jid)
    assert f"farm job {jid} refused: farm job of '../../etc': not run: its spec does not fit: recipe: " \
           "'../../etc' does not match" in error, error
    assert not marker.exists() and not list(marker.parent.glob(".farm/jobs/*")), "no job folder, no build"


def test_no_hostile_job_is_retried_or_left_queued(attacked):
    jobs, _, conn = attacked
    q = Queue("bake", connection=conn, serializer=SERIALIZER)
    assert q.count == 0 and ScheduledJobRegistry(queue=q).get_job_ids() == []
    assert sorted(FailedJobRegistry(queue=q).get_job_ids()) == sorted(jid for jid, _ in jobs.values())


# --- the check itself -------------------------------------------------------------------

def test_a_spec_as_submit_makes_it_fits_and_its_job_would_run(redis, euca4, tmp_path, monkeypatch):
    for k, v in euca4.env().items():
        monkeypatch.setenv(k, v)
    (tmp_path / "note.txt").write_text("one\n")
    data = yaml.safe_load((REPO / "recipes" / "debian-demo.yml").read_text())
    data.update(name="farm-good", files=[{"source": "note.txt", "dest": "/etc/note.txt"}])
    recipe = tmp_path / "farm-good.yml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    conn = redis_from_url(redis.url)
    try:
        sent = submit(Farm(redis.url, store_url("trust")), recipe, options=BuildOptions(stop_after="image"), conn=conn)
        job = BakeJob.fetch(sent["job"], connection=conn, serializer=SERIALIZER)
        assert refusal(job) is None
        assert check_spec(job.args[0])["recipe"] == "farm-good"
        job.delete()
    finally:
        conn.close()


@pytest.mark.parametrize(("change", "why"), [
    ({"recipe": "App"}, "recipe: 'App' does not match"),
    ({"bundle": "recipes/../../x.tar"}, "bundle: 'recipes/../../x.tar' does not match"),
    ({"bundle": f"recipes/{'cd' * 32}.tar"}, f"bundle recipes/{'cd' * 32}.tar is not the pack of its sha256"),
    ({"sha256": "0" * 63}, "sha256: '" + "0" * 63 + "' does not match"),
    ({"extra": 1}, "(top): Additional properties are not allowed ('extra' was unexpected)"),
    ({"options": {"output": "/", "bogus": True}}, "build options: (top): Additional properties are not allowed"),
])
def test_a_spec_that_does_not_fit_is_named(change, why):
    with pytest.raises(BadSpec) as e:
        check_spec(good_spec(**change))
    assert why in str(e.value), str(e.value)
    assert check_spec(good_spec()) == good_spec()
    with pytest.raises(BadSpec, match="no build options"):
        check_spec({k: v for k, v in good_spec().items() if k != "options"})
