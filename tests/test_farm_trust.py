"""The farm's trust boundary at Redis: whoever can write to the farm's Redis can put
anything on bake's queue, and a bake worker (root) must run none of it but bake's own
build of a spec that fits. Each attack is what such a writer would push (RQ with its
default pickle serializer, or JSON naming another function, or a spec that does not
fit), taken by a real `bake worker --burst` on Debian's redis-server, and judged from
outside: the marker the attack would write is absent, and the job is failed in Redis
with its reason."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
import redis as redis_py
import yaml
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry

from builder.core import cache as cache_mod
from builder.core.cache import TreeCache
from builder.core.errors import BakeError
from builder.farm import hooks as farm_hooks
from builder.farm.connect import SERIALIZER, Farm, redis_from_url, refuse_password, shown
from builder.farm.jobs import BadSpec, submit
from builder.farm.lease import Lease
from builder.farm.remote import sign
from builder.farm.trust import JOB_FUNC, BakeJob, check_spec, refusal
from builder.pipeline.options import BuildOptions
from conftest import BAKE, REPO
from eucalyptus_standin.fixtures import euca4  # noqa: F401  (a fixture)
from events import wait_for
from farm_helpers import farm_key, free_port, redis_server, store_url, tail

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
        "os.system", args=(f"touch {marker}",), job_id="evil-func",
        description="backup\n00:00:00 Worker box-trust: bake: Job OK (evil-func)")    # a line forged into the log
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
    jobs, log, conn = attacked
    assert "the farm's shared stage cache is off on this worker: no farm key (BAKE_FARM_KEY_FILE" in log, \
        "a worker with no farm key says so at start"
    jid, marker = jobs["func"]
    assert not marker.exists(), "os.system never ran"
    assert "Job OK (evil-func)" not in log, "a job's description, its writer's words, is not logged"
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


# --- Redis's password and TLS -------------------------------------------------------------

def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A CA of its own: (its certificate, its key)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def _server_cert(folder: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by `ca`: (certificate, key)."""
    key, csr, cert, ext = folder / "redis.key", folder / "redis.csr", folder / "redis.pem", folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
                    "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                    "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_redis(tmp_path):
    """Debian's redis-server speaking TLS alone on 127.0.0.1: (port, its CA's certificate, another CA's)."""
    ca = _ca(tmp_path / "ca", "farm-ca")
    other = _ca(tmp_path / "other", "other-ca")
    cert, key = _server_cert(tmp_path / "ca", ca)
    port = free_port()
    log = tmp_path / "redis.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
                                 "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
                                 str(ca[0]), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
                                 "--dir", str(tmp_path)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "Ready to accept connections" in log.read_text() or proc.poll() is not None, 60,
                 "redis-server to listen with TLS")
        assert proc.poll() is None, f"redis-server exited {proc.returncode}:\n{tail(log)}"
        yield port, ca[0], other[0]
    finally:
        proc.kill()
        proc.wait()


def test_a_rediss_url_checks_the_servers_certificate_against_its_ca_file(tls_redis):
    port, ca, other = tls_redis
    conn = redis_from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    assert conn.ping() and conn.set("k", "v") and conn.get("k") == b"v"
    conn.close()
    with pytest.raises(BakeError, match=rf"cannot reach the farm's Redis at rediss://127.0.0.1:{port}/0\?ssl_ca_certs="
                                        ".*certificate verify failed"):
        redis_from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other}")
    with pytest.raises(BakeError, match="ssl_cert_reqs=none would take any certificate; bake checks it"):
        redis_from_url(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none")
    with pytest.raises(BakeError, match="ssl_check_hostname off would take another host's certificate"):
        redis_from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname=false")
    with pytest.raises(BakeError, match=f"ssl_ca_certs={ca}.gone cannot be read"):
        redis_from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}.gone")
    with pytest.raises(BakeError, match=r"ssl_ca_certs asks for TLS; use rediss://"):
        redis_from_url(f"redis://127.0.0.1:{port}/0?ssl_ca_certs={ca}")


def test_the_password_file_and_the_ca_file_reach_redis_py(tmp_path, monkeypatch):
    monkeypatch.delenv("BAKE_REDIS_URL", raising=False)
    secret = tmp_path / "pw"
    secret.write_text("p@ss:w/rd\n")
    secret.chmod(0o600)
    args = argparse.Namespace(redis="rediss://bake@10.0.0.1:6380/0?ssl_ca_certs=/etc/bake/redis-ca.pem",
                              redis_password_file=str(secret), store="s3://b/p")
    farm = Farm.from_args(args)
    assert shown(farm.redis_url) == "rediss://bake:***@10.0.0.1:6380/0?ssl_ca_certs=/etc/bake/redis-ca.pem"
    pool = redis_py.Redis.from_url(farm.redis_url).connection_pool
    kwargs = pool.connection_kwargs
    assert pool.connection_class is redis_py.SSLConnection
    assert (kwargs["username"], kwargs["password"], kwargs["ssl_ca_certs"]) == ("bake", "p@ss:w/rd",
                                                                               "/etc/bake/redis-ca.pem")
    assert farm.env()["BAKE_REDIS_URL"] == farm.redis_url, "a job's bake is told the password in its environment"
    monkeypatch.setenv("BAKE_REDIS_URL", "redis://10.0.0.1:6379/0")
    env_farm = Farm.from_args(argparse.Namespace(redis=None, redis_password_file=str(secret), store="s3://b/p"))
    assert redis_py.Redis.from_url(env_farm.redis_url).connection_pool.connection_kwargs["password"] == "p@ss:w/rd"
    with pytest.raises(BakeError, match="a Redis password on the command line"):
        refuse_password("redis://10.0.0.1:6379/0?password=x")
    assert shown("redis://h:6379/0?db=0&password=x") == "redis://h:6379/0?db=0&password=***"


# --- the shared stage cache: entries signed with the farm key ------------------------------

@pytest.fixture
def shared(redis, euca4, tmp_path, monkeypatch):
    """This process as a farm job's bake: the shared stage cache on, with a farm key;
    the store (on the stand-in) and the store's boto3 client, to tamper with it."""
    for k, v in euca4.env().items():
        monkeypatch.setenv(k, v)
    farm = Farm(redis.url, store_url("cache"))
    for k, v in (("BAKE_FARM_SHARED_CACHE", "1"), ("BAKE_REDIS_URL", farm.redis_url),
                 ("BAKE_FARM_STORE", farm.store_url), ("BAKE_FARM_KEY_FILE", str(farm_key(tmp_path / "farm")))):
        monkeypatch.setenv(k, v)
    farm_hooks.install()
    return farm.store()


def _tree(folder: Path, said: str) -> Path:
    (folder / "etc").mkdir(parents=True)
    (folder / "etc" / "made-by").write_text(said)
    return folder


def _made_on_box_one(tmp_path: Path, key: str) -> None:
    one = TreeCache(tmp_path / "box1", "bootstrap")
    with one.lock(key):
        one.save(key, _tree(tmp_path / "tree1", "box one\n"), {"release": "bookworm"})


def _evil_tar(tmp_path: Path) -> bytes:
    evil = _tree(tmp_path / "evil", "the store's writer\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(evil, ".")
    return buf.getvalue()


def _taken_by_box_two(tmp_path: Path, key: str) -> str:
    """What box two's tree says once it holds `key`: taken from the store, or made there."""
    two = TreeCache(tmp_path / "box2", "bootstrap")
    with two.lock(key):
        if not two.has(key):
            two.save(key, _tree(tmp_path / "tree2", "box two\n"), {"release": "bookworm"})
        two.restore(key, tmp_path / "restored")
    return (tmp_path / "restored" / "etc" / "made-by").read_text()


def _refused(caplog, key: str, why: str) -> None:
    said = [r.getMessage() for r in caplog.records if r.name == "bake.farm" and r.levelno == logging.WARNING]
    assert any(m.startswith(f"refused the farm's bootstrap cache entry {key}: ") and why in m and
               m.endswith("it is made on this box instead") for m in said), said


def test_a_signed_entry_is_taken_by_another_box(shared, tmp_path):
    _made_on_box_one(tmp_path, "s1")
    record = shared.get_json("cache/bootstrap/s1.json")
    assert len(record["hmac"]) == 64
    assert _taken_by_box_two(tmp_path, "s1") == "box one\n"


def test_a_tar_changed_in_the_store_is_refused_and_the_entry_made_here(shared, tmp_path, caplog):
    _made_on_box_one(tmp_path, "s2")
    data = _evil_tar(tmp_path)
    # the writer of the bucket replaces the tar, with the digest the store's metadata says
    shared.clients.s3.put_object(Bucket=shared.bucket, Key=shared.key("cache/bootstrap/s2.tar"), Body=data,
                                 Metadata={"sha256": hashlib.sha256(data).hexdigest()})
    with caplog.at_level(logging.WARNING, logger="bake.farm"):
        assert _taken_by_box_two(tmp_path, "s2") == "box two\n", "made on box two, not taken from the store"
    _refused(caplog, "s2", "downloaded content has SHA-256")
    assert not list((tmp_path / "box2" / "bootstrap").glob("*.tmp"))
    # box two uploaded its own entry again, signed: a third box takes it
    three = TreeCache(tmp_path / "box3", "bootstrap")
    with three.lock("s2"):
        assert three.has("s2") and three.meta("s2")["from_farm_store"]["host"]


@pytest.mark.parametrize("tamper", ["digest", "unsigned", "other-key"])
def test_a_record_changed_in_the_store_is_refused_and_the_entry_made_here(shared, tmp_path, caplog, tamper):
    _made_on_box_one(tmp_path, f"r-{tamper}")
    tar_name, meta_name = f"cache/bootstrap/r-{tamper}.tar", f"cache/bootstrap/r-{tamper}.json"
    record = shared.get_json(meta_name)
    data = _evil_tar(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    shared.clients.s3.put_object(Bucket=shared.bucket, Key=shared.key(tar_name), Body=data,
                                 Metadata={"sha256": digest})
    if tamper == "digest":                  # the tar's digest changed to the new tar's, the signature kept
        record["tar_sha256"] = digest
    elif tamper == "unsigned":              # as a bake before signing wrote it, or a writer who has no key
        record["tar_sha256"] = digest
        del record["hmac"]
    else:                                   # signed, but with a key that is not this farm's
        record["tar_sha256"] = digest
        record["hmac"] = sign(b"k" * 32, "bootstrap", f"r-{tamper}", record)
    shared.clients.s3.put_object(Bucket=shared.bucket, Key=shared.key(meta_name), Body=json.dumps(record).encode(),
                                 Metadata={"sha256": hashlib.sha256(json.dumps(record).encode()).hexdigest()})
    with caplog.at_level(logging.WARNING, logger="bake.farm"):
        assert _taken_by_box_two(tmp_path, f"r-{tamper}") == "box two\n"
    _refused(caplog, f"r-{tamper}", "its signature does not match (changed in the store, or not signed with this "
                                   "farm's key)")


def test_without_a_farm_key_the_shared_cache_is_off_and_a_loose_key_is_refused(shared, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("BAKE_FARM_KEY_FILE")
    with caplog.at_level(logging.WARNING, logger="bake.farm"):
        assert cache_mod.shared() is None
    assert "the farm's shared stage cache is off: no farm key to check its entries (BAKE_FARM_KEY_FILE" in caplog.text
    loose = tmp_path / "loose.key"
    loose.write_text("x" * 64)
    loose.chmod(0o644)
    monkeypatch.setenv("BAKE_FARM_KEY_FILE", str(loose))
    with pytest.raises(BakeError, match=r"others than its owner may read it \(mode 0644\); chmod 600 it"):
        cache_mod.shared()
    loose.chmod(0o600)
    loose.write_text("short")
    monkeypatch.setenv("BAKE_FARM_KEY_FILE", str(loose))
    with pytest.raises(BakeError, match="5 bytes; it needs at least 32"):
        cache_mod.shared()


# --- the README's Redis user for bake --------------------------------------------------------

def _readme_acl(password: str) -> list[str]:
    """The README's `ACL SETUSER bake …` line, with `password`, as the words of a command."""
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines()
             if line.strip().startswith("ACL SETUSER bake ")]
    assert len(lines) == 1, lines
    return [w.replace(">PASSWORD", f">{password}") for w in lines[0].split()]


def test_the_readmes_redis_user_runs_the_farm_and_nothing_else(euca4, tmp_path):
    admin_pw, bake_pw = "admin-" + os.urandom(8).hex(), "bake-" + os.urandom(8).hex()
    with redis_server(tmp_path / "redis", password=admin_pw) as server:
        admin = redis_from_url(server.url)
        assert admin.execute_command(*_readme_acl(bake_pw)) in (b"OK", "OK", True)
        url = f"redis://bake:{bake_pw}@127.0.0.1:{server.port}/0"
        conn = redis_from_url(url)
        farm = Farm(url, store_url("acl"))
        env = dict(os.environ, **euca4.env(), BAKE_REDIS_URL=url, BAKE_FARM_KEY_FILE=str(farm_key(tmp_path)))
        for k in ("BAKE_FARM_STORE", "BAKE_FARM_SHARED_CACHE", "BAKE_FARM_LEASE"):
            env.pop(k, None)
        try:
            # a submission, queued and taken back; a lease taken, renewed, checked and let go
            (tmp_path / "note.txt").write_text("acl\n")
            data = yaml.safe_load((REPO / "recipes" / "debian-demo.yml").read_text())
            data.update(name="farm-acl", files=[{"source": "note.txt", "dest": "/etc/note.txt"}])
            recipe = tmp_path / "farm-acl.yml"
            recipe.write_text(yaml.safe_dump(data, sort_keys=False))
            with pytest.MonkeyPatch.context() as mp:
                for k, v in euca4.env().items():
                    mp.setenv(k, v)
                sent = submit(farm, recipe, conn=conn)
            Job.fetch(sent["job"], connection=conn, serializer=SERIALIZER).delete()
            lease = Lease(conn, "recipe:farm-acl", ttl=3, what="the ACL test")
            lease.acquire()
            lease.keep()
            lease.check("publishing")
            lease.release()
            # jobs a worker fails: one to be retried whose options do not fit, and a pickled one
            Queue("bake", connection=conn, serializer=SERIALIZER).enqueue_call(
                JOB_FUNC, args=(good_spec(options={"bogus": 1}),), job_id="acl-spec", retry=Retry(max=2, interval=1))
            Queue("bake", connection=conn).enqueue_call(JOB_FUNC, args=("pickled",), job_id="acl-pickle")
            log = tmp_path / "worker.log"
            with open(log, "w") as out:
                r = subprocess.run([BAKE, "worker", "--burst", "--store", farm.store_url, "--output",
                                    str(tmp_path / "output"), "--name", "box-acl"], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, timeout=300, check=False)
            said = log.read_text()
            assert r.returncode == 0 and "NOPERM" not in said and "no permission" not in said.lower(), tail(log)
            for jid in ("acl-spec", "acl-pickle"):
                assert Job.fetch(jid, connection=conn, serializer=SERIALIZER).get_status() == JobStatus.FAILED, jid
            r = subprocess.run([BAKE, "status", "--json", "--store", farm.store_url], capture_output=True, text=True,
                               env=env, timeout=120, check=False)
            assert r.returncode == 0 and "NOPERM" not in r.stderr and "warning" not in r.stderr, r.stderr
            assert sorted(json.loads(r.stdout)["queue"]["failed"]) == ["acl-pickle", "acl-spec"]
            # and nothing else: no admin command, no key of another
            for command in (("FLUSHALL",), ("CONFIG", "GET", "requirepass"), ("KEYS", "*"), ("SET", "other", "x"),
                            ("ACL", "WHOAMI"), ("CLIENT", "KILL", "ID", "1"), ("EVAL", "return 1", "0")):
                with pytest.raises(redis_py.exceptions.NoPermissionError):
                    conn.execute_command(*command)
        finally:
            conn.close()
            admin.close()


def test_the_farm_redis_settings_setup_writes_give_an_admin_and_the_bake_user(tmp_path):
    admin_pw, bake_pw = "admin-" + os.urandom(8).hex(), "bake-" + os.urandom(8).hex()
    r = subprocess.run([str(REPO / "scripts" / "farm-redis-conf"), "127.0.0.1"], capture_output=True, text=True,
                       env=dict(os.environ, FARM_REDIS_ADMIN_PASSWORD=admin_pw, FARM_REDIS_BAKE_PASSWORD=bake_pw),
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    conf = tmp_path / "bake-farm.conf"
    conf.write_text(r.stdout)
    assert f"user bake on >{bake_pw} resetkeys ~rq:* ~bake:* resetchannels &rq:* -@all " in r.stdout
    port = free_port()
    log = tmp_path / "redis.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["redis-server", str(conf), "--port", str(port), "--save", "", "--appendonly", "no",
                                 "--dir", str(tmp_path)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "Ready to accept connections" in log.read_text() or proc.poll() is not None, 60,
                 "redis-server to start with the farm's settings")
        assert proc.poll() is None, f"redis-server refused the settings:\n{tail(log)}"
        admin = redis_from_url(f"redis://default:{admin_pw}@127.0.0.1:{port}/0")
        bake = redis_from_url(f"redis://bake:{bake_pw}@127.0.0.1:{port}/0")
        lease = Lease(bake, "recipe:setup", ttl=5)
        lease.acquire()
        lease.release()
        assert bake.set("rq:probe", "1") and admin.get("rq:probe") == b"1"
        for command in (("FLUSHALL",), ("SET", "other", "x")):
            with pytest.raises(redis_py.exceptions.NoPermissionError):
                bake.execute_command(*command)
        with pytest.raises(BakeError, match="invalid username-password pair"):
            redis_from_url(f"redis://bake:{admin_pw}@127.0.0.1:{port}/0")
        admin.close()
        bake.close()
    finally:
        proc.kill()
        proc.wait()
    r = subprocess.run([str(REPO / "scripts" / "farm-redis-conf"), "127.0.0.1", admin_pw], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2 and "usage: FARM_REDIS_ADMIN_PASSWORD=" in r.stderr, "passwords never as arguments"
