"""The build farm's parts against a real Redis (Debian's redis-server, started here) and
the store on the Eucalyptus 4.x stand-in: leases, the object store, the shared stage
cache, submission, the fence before publishing, and `ls`/`gc --farm` from the durable
records, with Redis up and after it restarted empty."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
import yaml

from builder.core import cache as cache_mod
from builder.core.cache import TreeCache
from builder.core.errors import BakeError
from builder.farm import hooks as farm_hooks
from builder.farm import lease as lease_mod
from builder.farm.gc import gc_farm
from builder.farm.connect import SERIALIZER, Farm, redis_from_url, shown
from builder.farm.jobs import Duplicate, job_options, pack_recipe, submit
from builder.farm.lease import Lease, LeaseLost
from builder.farm.records import list_records, record_name
from builder.pipeline.options import BuildOptions
from conftest import BAKE, REPO
from eucalyptus_standin.fixtures import euca4  # noqa: F401  (a fixture)
from eucalyptus_standin.trio import bundle_build, make_build
from events import wait_for
from farm_helpers import farm_key, overlaps, redis_server, start_worker, store_url


@pytest.fixture(autouse=True)
def farm_hooks_installed():
    """What the CLI does at start: the core's stage cache and fence know of the farm."""
    farm_hooks.install()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def conn(redis):
    c = redis_from_url(redis.url)
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def cloud_env(euca4, monkeypatch):
    for k, v in euca4.env().items():
        monkeypatch.setenv(k, v)
    return euca4.env()


@pytest.fixture
def farm(redis, cloud_env, conn):
    return Farm(redis.url, store_url())


# --- leases ---------------------------------------------------------------------------

def test_a_lease_has_one_holder_until_released_and_a_busy_one_names_its_holder(conn):
    a = Lease(conn, "recipe:x", ttl=30, what="build 1 of x")
    b = Lease(conn, "recipe:x", ttl=30, what="build 2 of x")
    assert a.try_acquire()
    assert not b.try_acquire()
    with pytest.raises(BakeError, match=r"the farm lease recipe:x is in use by build 1 of x on .* \(pid"):
        b.acquire(wait=False)
    a.check("publishing")
    a.release()
    assert b.try_acquire()
    with pytest.raises(LeaseLost, match="not publishing: this build no longer holds the farm lease recipe:x"):
        a.check("publishing")
    b.release()
    assert lease_mod.holder(conn, "recipe:x") is None


def test_an_unrenewed_lease_expires_a_renewed_one_does_not_and_holders_never_overlap(conn):
    kept = Lease(conn, "recipe:kept", ttl=1.5)
    kept.acquire()
    kept.keep()
    dropped = Lease(conn, "recipe:dropped", ttl=1.5)
    dropped.acquire()                        # never renewed: its holder "died"
    waiter = Lease(conn, "recipe:dropped", ttl=1.5)
    waiter.acquire(timeout=30, poll=0.1)     # returns once the dead holder's lease expired
    with pytest.raises(LeaseLost):
        dropped.check("registering")
    assert not Lease(conn, "recipe:kept", ttl=1.5).try_acquire(), "renewed every ttl/3, so still held"
    kept.check("uploading")
    kept.release()
    waiter.release()
    history = lease_mod.history(conn, "recipe:dropped")
    assert [e["token"] for e in history] == [dropped.token, waiter.token]
    assert history[1]["acquired"] >= history[0]["until"]
    assert "released" not in history[0] and "released" in history[1]
    assert overlaps(history) == []


def test_a_holder_whose_lease_was_taken_is_told_and_stops(conn):
    lost = []
    a = Lease(conn, "recipe:y", ttl=0.9)
    a.acquire()
    a.keep(on_lost=lost.append)
    conn.delete(lease_mod.PREFIX + "recipe:y")          # as when it expired while its holder was paused
    b = Lease(conn, "recipe:y", ttl=30, what="another build")
    assert b.try_acquire()
    wait_for(lambda: lost, 30, "the holder to notice its lease is gone")
    assert "taken by another build" in lost[0] and a.lost == lost[0]
    b.release()
    a.release()


# --- the store --------------------------------------------------------------------------

def test_objects_are_written_whole_and_a_damaged_one_is_refused(farm, tmp_path):
    store = farm.store()
    src = tmp_path / "entry.tar"
    src.write_bytes(os.urandom(300_000))
    sent = store.put_file("cache/base/k.tar", src)
    assert list(store.list(".tmp/")) == [], "the temporary object is gone once the object is in place"
    got = store.get_file("cache/base/k.tar", tmp_path / "back.tar")
    assert got["sha256"] == sent["sha256"] and (tmp_path / "back.tar").read_bytes() == src.read_bytes()
    # damaged in the store: content changed, its recorded digest not
    store.clients.s3.copy_object(Bucket=store.bucket, Key=store.key("cache/base/k.tar"),
                                 CopySource={"Bucket": store.bucket, "Key": store.key("cache/base/k.tar")},
                                 MetadataDirective="REPLACE", Metadata={"sha256": "0" * 64})
    with pytest.raises(BakeError, match="expected 0000"):
        store.get_file("cache/base/k.tar", tmp_path / "bad.tar")
    assert not (tmp_path / "bad.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


# --- the shared stage cache -------------------------------------------------------------

def test_an_entry_made_on_one_box_is_taken_from_the_store_by_another(farm, tmp_path, monkeypatch):
    monkeypatch.setenv("BAKE_FARM_SHARED_CACHE", "1")
    monkeypatch.setenv("BAKE_FARM_KEY_FILE", str(farm_key(tmp_path)))
    monkeypatch.setenv("BAKE_REDIS_URL", farm.redis_url)
    monkeypatch.setenv("BAKE_FARM_STORE", farm.store_url)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "base-made-on").write_text("box one\n")
    one = TreeCache(tmp_path / "box1", "bootstrap")
    two = TreeCache(tmp_path / "box2", "bootstrap")
    with one.lock("k1"):
        assert not one.has("k1")
        one.save("k1", tree, {"release": "bookworm", "release_sha256": "abc"})
    with two.lock("k1"):
        assert two.has("k1"), "box two finds the entry box one made, without making it"
        assert two.meta("k1")["release_sha256"] == "abc"
        assert two.meta("k1")["from_farm_store"]["sha256"]
        two.restore("k1", tmp_path / "restored")
    assert (tmp_path / "restored" / "etc" / "base-made-on").read_text() == "box one\n"
    conn = farm.redis()
    assert lease_mod.holder(conn, "cache:bootstrap:k1") is None, "the entry's lease is let go"
    assert [e["host"] for e in lease_mod.history(conn, "cache:bootstrap:k1")] and \
        overlaps(lease_mod.history(conn, "cache:bootstrap:k1")) == []
    assert not [p for p in (tmp_path / "box2" / "bootstrap").iterdir() if p.name.endswith(".tmp")]


def test_a_process_told_of_a_farm_forgets_it_when_the_variables_go(farm, tmp_path, monkeypatch):
    assert cache_mod.shared() is None
    monkeypatch.setenv("BAKE_FARM_SHARED_CACHE", "1")
    monkeypatch.setenv("BAKE_FARM_KEY_FILE", str(farm_key(tmp_path)))
    monkeypatch.setenv("BAKE_REDIS_URL", farm.redis_url)
    monkeypatch.setenv("BAKE_FARM_STORE", farm.store_url)
    told = cache_mod.shared()
    assert told is not None and told.farm.redis_url == farm.redis_url
    monkeypatch.delenv("BAKE_FARM_SHARED_CACHE")
    assert cache_mod.shared() is None, "a later cache in the same process is local again"


# --- submitting -------------------------------------------------------------------------

def _recipe(folder: Path, name: str, note: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "note.txt").write_text(note)
    data = yaml.safe_load((REPO / "recipes" / "debian-demo.yml").read_text())
    data.update(name=name, files=[{"source": "note.txt", "dest": "/etc/note.txt"}])
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_recipe_is_packed_by_content_and_submitted_once(farm, tmp_path):
    path = _recipe(tmp_path / "r", "farm-sub", "one\n")
    name, packed, digest = pack_recipe(path)
    assert (name, pack_recipe(path)[2]) == ("farm-sub", digest), "the same content packs the same"
    first = submit(farm, path)
    assert first["job"].startswith("bake_farm-sub_") and first["digest"] == digest
    with pytest.raises(Duplicate, match="farm-sub: refused: job bake_farm-sub_.* is already queued"):
        submit(farm, path)
    (tmp_path / "r" / "note.txt").write_text("two\n")       # a file it names changed: new content, new job
    second = submit(farm, path)
    assert second["job"] != first["job"]
    from rq import Queue
    queued = Queue("bake", connection=farm.redis(), serializer=SERIALIZER).get_job_ids()
    assert sorted(queued) == sorted([first["job"], second["job"]])
    store = farm.store()
    assert store.head(f"recipes/{digest}.tar")["sha256"] == digest


def test_submitting_an_invalid_recipe_is_refused_with_the_recipes_error_and_queues_nothing(farm, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("name: bad\nrelease: debian/bookworm\npakages: [less]\n")
    r = subprocess.run([BAKE, "submit", str(bad), "--redis", farm.redis_url, "--store", farm.store_url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert f"{bad}:3: pakages: unknown key" in r.stderr
    from rq import Queue
    assert Queue("bake", connection=farm.redis(), serializer=SERIALIZER).count == 0


def test_a_job_carries_its_build_options_as_json(farm, tmp_path):
    from rq.job import Job

    path = _recipe(tmp_path / "r", "farm-opts", "one\n")
    r = subprocess.run([BAKE, "submit", str(path), "--stop-after", "bundle", "--skip", "verify", "--verify-on-cloud",
                        "--redis", farm.redis_url, "--store", farm.store_url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    [spec] = Job.fetch(r.stdout.strip(), connection=farm.redis(), serializer=SERIALIZER).args
    assert spec["options"] == BuildOptions(stop_after="bundle", skip=("verify",), cloud=True).to_json()
    assert job_options(spec) == BuildOptions(stop_after="bundle", skip=("verify",), cloud=True)


def test_a_job_whose_options_do_not_fit_fails_at_once_saying_why_and_runs_nothing(farm, redis, cloud_env, tmp_path):
    from rq import Queue, Retry
    from rq.job import Job, JobStatus

    conn = farm.redis()
    # as an older bake submitted it: `cloud_verify` is `cloud` now
    spec = {"recipe": "farm-old", "bundle": "recipes/none.tar", "sha256": "0" * 64,
            "options": {"stop_after": None, "skip": [], "cloud_verify": False}}
    Queue("bake", connection=conn, serializer=SERIALIZER).enqueue_call(
        "builder.farm.jobs.run_build", args=(spec,), job_id="bake_farm-old", retry=Retry(max=3, interval=600))
    box = tmp_path / "box-old"
    worker = start_worker("box-old", box, redis, farm.store_url, cloud_env)
    try:
        # a job to be tried again is scheduled (in 600 s), not failed
        wait_for(lambda: Job.fetch("bake_farm-old", connection=conn, serializer=SERIALIZER).get_status() in (
            JobStatus.FAILED, JobStatus.SCHEDULED), 120, "the job to fail")
    finally:
        worker.stop(30)
    job = Job.fetch("bake_farm-old", connection=conn, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FAILED, "failed for good, not tried again"
    error = job.latest_result().exc_string.strip().splitlines()[-1]
    assert "farm job of farm-old: not run: build options: (top): Additional properties are not allowed " \
           "('cloud_verify' was unexpected); it was submitted by an older bake (cloud_verify is now cloud): " \
           "submit it again" in error, error
    assert Queue("bake", connection=conn, serializer=SERIALIZER).count == 0
    assert "attempts" not in job.meta, "no attempt was made"
    assert list_records(farm.store(), "farm-old") == [], "no record: nothing ran"
    assert not (box / "output" / "farm-old").exists() and not list(box.glob("output/.farm/jobs/*"))


def test_the_farm_commands_say_what_is_missing(tmp_path, monkeypatch):
    for k in ("BAKE_REDIS_URL", "BAKE_FARM_STORE"):
        monkeypatch.delenv(k, raising=False)
    r = subprocess.run([BAKE, "submit", str(tmp_path / "x.yml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "the farm needs its Redis (--redis or BAKE_REDIS_URL) and its store (--store or BAKE_FARM_STORE" \
        in r.stderr
    r = subprocess.run([BAKE, "worker", "--redis", "redis://127.0.0.1:1/0", "--store", "s3://b/p"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach the farm's Redis at redis://127.0.0.1:1/0" in r.stderr
    r = subprocess.run([BAKE, "worker", "--store", "s3://b/p"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, BAKE_REDIS_URL="redis://default:s3cret@127.0.0.1:1/0"))
    assert r.returncode == 1 and "cannot reach the farm's Redis at redis://default:***@127.0.0.1:1/0" in r.stderr
    assert "s3cret" not in r.stderr, "a Redis password is never printed"
    r = subprocess.run([BAKE, "worker", "--redis", "redis://default:s3cret@127.0.0.1:1/0", "--store", "s3://b/p"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "argument --redis: refused: a Redis password on the command line is shown by `ps` to every user of " \
           "this box; give --redis redis://default@127.0.0.1:1/0 and the password in --redis-password-file FILE, " \
           "or the whole URL in BAKE_REDIS_URL" in r.stderr, r.stderr
    assert "s3cret" not in r.stderr, "a Redis password is never printed"


def test_a_second_worker_under_a_live_workers_name_is_refused_and_the_first_goes_on(farm, redis, cloud_env,
                                                                                      tmp_path):
    first = start_worker("box-x", tmp_path / "box-x", redis, farm.store_url, cloud_env)
    try:
        r = subprocess.run([BAKE, "worker", "--name", "box-x", "--redis", redis.url, "--store", farm.store_url,
                            "--output", str(tmp_path / "other")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr
        assert f"a worker named box-x runs on this box already (pid {first.proc.pid}); give this one another --name" \
            in r.stderr
        assert first.proc.poll() is None
    finally:
        first.stop(30)
    assert first.proc.returncode == 0, "a warm shutdown of an idle worker"


# --- the fence before publishing --------------------------------------------------------

def test_a_bake_that_lost_its_recipes_lease_publishes_nothing(farm, euca4, tmp_path, monkeypatch):
    build = make_build(tmp_path / "output")
    bundle_build(build, euca4)
    conn = farm.redis()
    mine = Lease(conn, "recipe:fenced", ttl=60)
    mine.acquire()
    monkeypatch.setenv("BAKE_FARM_LEASE", json.dumps({"redis": farm.redis_url, **mine.spec}))
    conn.delete(lease_mod.PREFIX + "recipe:fenced")
    other = Lease(conn, "recipe:fenced", ttl=60, what="a newer build")
    other.acquire()
    euca4.clear_log()
    r = subprocess.run([BAKE, "publish", str(build.dir), "--bucket", "fenced-" + os.urandom(3).hex()],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "no longer holds the farm lease recipe:fenced (now held by a newer build on" in r.stderr
    assert not [q for q in euca4.front.requests if q.method == "PUT"], "nothing was uploaded"
    assert not [q for q in euca4.front.requests if q.operation == "RegisterImage"]
    other.release()


# --- records: ls, status and gc --farm, with and without Redis ------------------------------

def _record(store, recipe: str, build_id: str, state: str, **extra) -> None:
    store.put_json(record_name(recipe, build_id), {"recipe": recipe, "build_id": build_id, "state": state,
                                                   "host": "box", **extra})
    store.put_bytes(f"logs/{recipe}/{build_id}.log", b"log\n")
    store.put_bytes(f"artifacts/{recipe}/{build_id}/vmlinuz", b"kernel\n")


def _farm_cmd(farm: Farm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BAKE, *args, "--farm", "--redis", farm.redis_url, "--store", farm.store_url],
                          capture_output=True, text=True, timeout=300)


def _ls(farm: Farm) -> dict[str, str]:
    r = _farm_cmd(farm, "ls", "--json")
    assert r.returncode == 0, r.stderr
    return {b["build_id"]: b["state"] for b in json.loads(r.stdout)}


@pytest.mark.slow
def test_gc_keeps_n_per_recipe_and_held_and_released_builds_and_works_from_the_store_when_redis_is_lost(
        farm, redis, tmp_path):
    store = farm.store()
    for i in range(1, 5):
        _record(store, "app", f"2026120{i}-000000-aaaa", "ok")
    _record(store, "app", "20261205-000000-aaaa", "failed")
    _record(store, "app", "20261130-000000-aaaa", "verified", released={"channel": "stable"})
    _record(store, "app", "20261206-000000-live", "building")
    _record(store, "app", "20261202-120000-dead", "building")
    _record(store, "other", "20261201-000000-bbbb", "published")
    conn = farm.redis()
    live = Lease(conn, "recipe:app", ttl=120, extra={"build_id": "20261206-000000-live"})
    live.acquire()

    states = _ls(farm)
    assert states["20261206-000000-live"] == "building" and states["20261202-120000-dead"] == "killed"
    assert states["20261130-000000-aaaa"] == "released"

    r = _farm_cmd(farm, "gc", "--keep", "2")
    assert r.returncode == 0, r.stderr
    left = _ls(farm)
    assert sorted(left) == ["20261130-000000-aaaa", "20261201-000000-bbbb", "20261203-000000-aaaa",
                            "20261204-000000-aaaa", "20261205-000000-aaaa", "20261206-000000-live"], r.stdout
    assert "deleted  app/20261202-120000-dead  killed: beyond the 2 newest" in r.stdout
    assert "kept     app/20261206-000000-live  building: its lease is held (building)" in r.stdout
    assert "kept     app/20261205-000000-aaaa  failed: failed, among the 2 newest: kept to be looked into" \
        in r.stdout
    gone = ["20261201-000000-aaaa", "20261202-000000-aaaa", "20261202-120000-dead"]
    names = set(store.list(""))
    for b in gone:
        assert not {f"logs/app/{b}.log", f"artifacts/app/{b}/vmlinuz", f"builds/app/{b}.json"} & names, b
    live.release()

    # Redis lost with everything in it: the records are in the store, and still rule
    redis.restart_empty()
    states = _ls(farm)
    assert states == {b: s for b, s in left.items() if b != "20261206-000000-live"} | \
        {"20261206-000000-live": "killed"}, "nobody holds the lease now: that build's bake is gone"
    r = _farm_cmd(farm, "gc", "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(_ls(farm)) == ["20261130-000000-aaaa", "20261201-000000-bbbb", "20261204-000000-aaaa",
                                 "20261206-000000-live"], r.stdout
    r = subprocess.run([BAKE, "status", "--json", "--redis", farm.redis_url, "--store", farm.store_url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["queue"]["queued"] == []
    assert (status["latest"]["app"]["build_id"], status["latest"]["app"]["state"]) == ("20261206-000000-live",
                                                                                       "killed")

    # what a writer killed between its temporary object and the copy left: gone once
    # older than any job can write, never while a live job may still be writing it
    half = store.key(".tmp/0123abcd-999999")
    store.clients.s3.put_object(Bucket=store.bucket, Key=half, Body=b"half an upload")
    assert gc_farm(farm, 1, dry_run=False)["temporary"] == []
    assert ".tmp/0123abcd-999999" in set(store.list(".tmp/"))
    found = gc_farm(farm, 1, dry_run=True, temporary_after=0)["temporary"]
    assert [t["name"] for t in found] == [".tmp/0123abcd-999999"]
    assert ".tmp/0123abcd-999999" in set(store.list(".tmp/")), "a dry run deletes nothing"
    gc_farm(farm, 1, dry_run=False, temporary_after=0)
    assert list(store.list(".tmp/")) == []

    redis.stop()         # and with no Redis at all, ls and gc still read the store
    try:
        r = _farm_cmd(farm, "ls", "--json")
        assert r.returncode == 0, r.stderr
        assert "cannot reach the farm's Redis" in r.stderr
        listed = {b["build_id"]: b["state"] for b in json.loads(r.stdout)}
        assert listed == {"20261130-000000-aaaa": "released", "20261201-000000-bbbb": "published",
                          "20261204-000000-aaaa": "ok", "20261206-000000-live": "building?"}
        r = _farm_cmd(farm, "gc", "--keep", "1", "--dry-run")
        assert r.returncode == 0 and "would delete" not in r.stdout, r.stdout + r.stderr
    finally:
        redis.start()


# --- a Redis with a password ------------------------------------------------------------

@pytest.mark.slow
def test_a_farm_whose_redis_has_a_password_works_with_it_and_never_prints_it(cloud_env, tmp_path):
    password = "pw-" + secrets.token_hex(8)
    with redis_server(tmp_path / "redis", password=password) as server:
        assert f"default:{password}@" in server.url
        store = store_url()
        worker = start_worker("box-pw", tmp_path / "box-pw", server, store, cloud_env)
        try:
            r = subprocess.run([BAKE, "status", "--store", store], capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, BAKE_REDIS_URL=server.url))
            assert r.returncode == 0, r.stderr
            assert "box-pw" in r.stdout, r.stdout
            assert password not in r.stdout + r.stderr
        finally:
            worker.stop(30)
        assert worker.proc.returncode == 0, "a warm shutdown of an idle worker"
        log = (tmp_path / "box-pw" / "worker.log").read_text()
        assert f"Redis redis://default:***@127.0.0.1:{server.port}/0" in log, log
        assert password not in log

        path = _recipe(tmp_path / "r", "farm-pw", "one\n")
        r = subprocess.run([BAKE, "submit", str(path), "--redis", server.url, "--store", store],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "a Redis password on the command line is shown by `ps`" in r.stderr, r.stderr
        assert password not in r.stdout + r.stderr
        secret = tmp_path / "redis-password"
        secret.write_text(password + "\n")
        secret.chmod(0o644)
        bare = f"redis://127.0.0.1:{server.port}/0"
        r = subprocess.run([BAKE, "submit", str(path), "--redis", bare, "--redis-password-file", str(secret),
                            "--store", store], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"--redis-password-file {secret}: others than its owner may read it (mode " \
            "0644); chmod 600 it" in r.stderr, r.stderr
        secret.chmod(0o600)
        r = subprocess.run([BAKE, "submit", str(path), "--redis", bare, "--redis-password-file", str(secret),
                            "--store", store], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip()
        assert job.startswith("bake_farm-pw_") and password not in r.stdout + r.stderr
        from rq import Queue
        assert Queue("bake", connection=redis_from_url(server.url), serializer=SERIALIZER).get_job_ids() == [job]
        r = subprocess.run([BAKE, "ls", "--farm", "--store", store], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, BAKE_REDIS_URL=server.url))
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr

        wrong = "nope-" + secrets.token_hex(8)
        for url, why in ((server.url.replace(password, wrong), "invalid username-password pair"),
                         (f"redis://127.0.0.1:{server.port}/0", "Authentication required")):
            r = subprocess.run([BAKE, "submit", str(path), "--store", store], capture_output=True, text=True,
                               timeout=120, env=dict(os.environ, BAKE_REDIS_URL=url))
            assert r.returncode == 1, r.stderr
            assert f"cannot reach the farm's Redis at {shown(url)} (" in r.stderr and why in r.stderr, r.stderr
            assert wrong not in r.stderr and password not in r.stderr
        assert Queue("bake", connection=redis_from_url(server.url), serializer=SERIALIZER).count == 1, \
            "the refused submissions queued nothing"
