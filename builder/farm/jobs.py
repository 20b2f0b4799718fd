"""Farm jobs: a recipe packed and submitted, and what a worker does with it.

**Submitting** packs the recipe with the files it names (`files[].source`, `dib.env`
files, `dib.elements_path`) into a tar whose bytes depend on their content alone, puts
it in the store under its SHA-256, and enqueues one RQ job whose id is the recipe's
name and that digest (and, for a nightly run, the day): the same recipe submitted again
while its job is queued, running or kept (a day) is refused, not run twice. A local
`base.image` is named by its absolute path, which must exist on every worker (or use
`base.emi`).

The job's spec is data: the recipe's name, where its pack is and its digest, and the
build options as `BuildOptions.to_json()`. **A job**, in the worker's work horse (a
process forked for it, in a process group of its own), first checks those options
(`BuildOptions.from_json`): a spec they do not fit fails at once, saying why, with
nothing run and no retry. It fetches the packed recipe, takes the recipe's lease
(waiting while another box bakes it), writes the durable record, and runs a child bake
(`builder.pipeline.child`, the options on its stdin; the output root and the build id
are the worker's) with the lease in its environment (publishing checks it, see
builder/core/fence.py) and the shared stage cache on. Every stage the child finishes is
written to the record. When the child has ended, the lease is checked once more before
the build's artifacts (kernel, ramdisk, the image compressed with zstd) and its log are
uploaded; the record gets its final state and the lease is released. A failure that a
second try may mend (a stage failed, publishing failed, an interrupt, the lease lost)
raises, and RQ retries the job with back-off; an invalid recipe or a failed
verification is recorded and not retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import yaml

from builder.core import exitcodes, lifetime, sh
from builder.core.errors import BakeError
from builder.pipeline import child
from builder.pipeline.options import BuildOptions
from builder.recipe.recipe import load_recipe
from .connect import EUCARC_ENV, QUEUE, REDIS_ENV, SERIALIZER, STORE_ENV, Farm
from .lease import Lease, describe
from .records import FarmRecord, artifact_folder, log_name, now

log = logging.getLogger("bake.farm")

OUTPUT_ENV = "BAKE_FARM_OUTPUT"
LEASE_TTL_ENV = "BAKE_FARM_LEASE_TTL"
JOB_TIMEOUT = 4 * 3600          # seconds a job may run (`bake submit --timeout`)
RESULT_TTL = 24 * 3600          # a finished job (and so its id) is kept this long
FAILURE_TTL = 7 * 24 * 3600
BACKOFF = 30                    # seconds before the first retry of a failed job
RETRIES = 3


def retry_intervals(backoff: float, retries: int) -> list[int]:
    """The waits before each retry: `backoff`, then 4× and 20× it (30 s, 2 min, 10 min)."""
    steps = [1, 4, 20]
    return [int(backoff * steps[min(i, len(steps) - 1)]) for i in range(retries)]
NOT_RETRIED = (exitcodes.RECIPE_INVALID, exitcodes.VERIFY_FAILED)
ARTIFACT_ROLES = ("kernel", "ramdisk", "image")


# --- submitting ----------------------------------------------------------------------

def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    """Add `path` (a file, or a folder with everything in it) with its content and mode
    alone: no owner, no time, names in order, so the same content packs the same."""
    if path.is_dir():
        info = tarfile.TarInfo(arcname)
        info.type, info.mode = tarfile.DIRTYPE, path.stat().st_mode & 0o7777
        tar.addfile(info)
        for child in sorted(path.iterdir()):
            _add(tar, child, f"{arcname}/{child.name}")
        return
    if path.is_symlink():
        info = tarfile.TarInfo(arcname)
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        tar.addfile(info)
        return
    data = path.read_bytes()
    info = tarfile.TarInfo(arcname)
    info.size, info.mode = len(data), path.stat().st_mode & 0o7777
    tar.addfile(info, io.BytesIO(data))


def pack_recipe(path: str | Path) -> tuple[str, bytes, str]:
    """(recipe name, packed bytes, their SHA-256) of the recipe at `path`, validated
    first (a RecipeError names what is wrong)."""
    recipe = load_recipe(path)
    here = recipe.path.parent
    data = yaml.safe_load(recipe.path.read_text())
    shipped: list[tuple[Path, str]] = []

    def ship(value: str, what: str) -> str:
        src = (here / os.path.expandvars(value)).resolve()
        if not src.exists():
            raise BakeError(f"{recipe.path}: {what} {value}: no such file or folder")
        arc = f"files/{len(shipped)}/{src.name}"
        shipped.append((src, arc))
        return arc

    for i, f in enumerate(data.get("files") or []):
        f["source"] = ship(f["source"], f"files[{i}].source")
    dib = data.get("dib") or {}
    for name, value in (dib.get("env") or {}).items():
        if isinstance(value, dict) and "file" in value:
            value["file"] = ship(value["file"], f"dib.env.{name}.file")
    if dib.get("elements_path"):
        dib["elements_path"] = [ship(p, "dib.elements_path") for p in dib["elements_path"]]
    base = data.get("base") or {}
    if base.get("image"):
        base["image"] = str((here / base["image"]).resolve())
    publish = data.get("publish") or {}
    if publish.get("eucarc"):
        publish["eucarc"] = str(Path(os.path.expandvars(publish["eucarc"])).expanduser().resolve())

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        text = yaml.safe_dump(data, sort_keys=False).encode()
        info = tarfile.TarInfo("recipe.yml")
        info.size, info.mode = len(text), 0o644
        tar.addfile(info, io.BytesIO(text))
        for src, arc in shipped:
            _add(tar, src, arc)
    packed = buf.getvalue()
    return recipe.name, packed, hashlib.sha256(packed).hexdigest()


def job_id(recipe: str, digest: str, day: str | None = None) -> str:
    """One id per recipe and content (and day, for a nightly run)."""
    safe = re.sub(r"[^A-Za-z0-9-]", "-", recipe)        # RQ ids: letters, digits, '_' and '-'
    return f"bake_{safe}_{digest[:20]}" + (f"_{day}" if day else "")


def submit(farm: Farm, path: str | Path, *, options: BuildOptions | None = None, day: str | None = None,
           timeout: int = JOB_TIMEOUT, retries: int = RETRIES, backoff: float = BACKOFF, conn=None,
           store=None) -> dict[str, Any]:
    """Pack and enqueue the recipe at `path` with the build `options` (their output root
    and build id are the worker's); {recipe, job, digest}. A BakeError ("already
    submitted") when a job with the same id is queued, running or kept."""
    from rq import Queue, Retry  # noqa: PLC0415 (rq: only the farm's commands load it)
    from rq.exceptions import DuplicateJobError  # noqa: PLC0415 (rq, as above)

    name, packed, digest = pack_recipe(path)
    conn = conn or farm.redis()
    store = store or farm.store()
    bundle = f"recipes/{digest}.tar"
    if store.head(bundle) is None:
        store.put_bytes(bundle, packed)
    jid = job_id(name, digest, day)
    spec = {"recipe": name, "bundle": bundle, "sha256": digest, "options": (options or BuildOptions()).to_json(),
            "submitted": now(), "submitted_from": socket.gethostname()}
    queue = Queue(QUEUE, connection=conn, serializer=SERIALIZER)
    try:
        queue.enqueue_call("builder.farm.jobs.run_build", args=(spec,), job_id=jid, unique=True, timeout=timeout,
                           result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL,
                           retry=Retry(max=retries, interval=retry_intervals(backoff, retries)) if retries else None,
                           description=f"bake {name}")
    except DuplicateJobError:
        raise Duplicate(name, jid) from None
    return {"recipe": name, "job": jid, "digest": digest}


class Duplicate(BakeError):
    def __init__(self, recipe: str, jid: str):
        self.recipe, self.job = recipe, jid
        super().__init__(f"{recipe}: refused: job {jid} for this recipe with this content is already queued, running "
                         "or done (kept a day); change the recipe, or wait for the job to expire")


# --- running a job on a worker ------------------------------------------------------------

class Retryable(BakeError):
    """A job that failed in a way a second try may mend: RQ tries it again."""


class BadSpec(BakeError):
    """A job whose spec this worker cannot run (no second try can mend it)."""


def job_options(spec: object) -> BuildOptions:
    """The build options of a job's spec, checked; BadSpec says what does not fit."""
    if not isinstance(spec, dict) or "options" not in spec:
        raise BadSpec("the farm job has no build options; submit the recipe again")
    try:
        return BuildOptions.from_json(spec["options"])
    except BakeError as e:
        hint = ("; it was submitted by an older bake (cloud_verify is now cloud): submit it again"
                if isinstance(spec["options"], dict) and "cloud_verify" in spec["options"] else "")
        raise BadSpec(f"farm job of {spec.get('recipe', '?')}: not run: {e}{hint}") from None


def _unpack(tar_path: Path, dest: Path) -> None:
    """Unpack a packed recipe: files, folders and symlinks only, every name inside `dest`."""
    dest.mkdir()
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            target = (dest / m.name).resolve()
            if not target.is_relative_to(dest.resolve()) or not (m.isfile() or m.isdir() or m.issym()):
                raise BakeError(f"{tar_path}: {m.name!r} is not a file of a packed recipe; not unpacked")
            if m.issym() and (os.path.isabs(m.linkname) or
                              not (target.parent / m.linkname).resolve().is_relative_to(dest.resolve())):
                raise BakeError(f"{tar_path}: the link {m.name!r} points out of the recipe; not unpacked")
        tar.extractall(dest, numeric_owner=True)


def _farm_from_env() -> Farm:
    return Farm(os.environ.get(REDIS_ENV, ""), os.environ.get(STORE_ENV, ""), os.environ.get(EUCARC_ENV) or None)


def new_build_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def run_build(spec: dict[str, Any]) -> dict[str, Any]:
    """The RQ job: bake one submitted recipe on this worker (see the module docstring)."""
    from rq import get_current_job  # noqa: PLC0415 (rq: loaded by the worker that runs this)

    job = get_current_job()
    try:
        options = job_options(spec)
    except BadSpec:
        if job is not None:
            job.retries_left = 0    # the same spec fails the same way: fail the job now, not after back-off
        raise
    farm = _farm_from_env()
    conn = farm.redis()
    store = farm.store()
    output = Path(os.environ.get(OUTPUT_ENV) or "output").resolve()
    name = spec["recipe"]
    build_id = new_build_id()
    folder = output / ".farm" / "jobs" / f"{build_id}.{os.getpid()}"
    attempt = 1 + (job.meta.get("attempts", 0) if job else 0)
    if job is not None:
        job.meta["attempts"] = attempt
        job.meta["build_id"] = build_id
        job.save_meta()
    ttl = float(os.environ.get(LEASE_TTL_ENV) or 60)
    lease = Lease(conn, f"recipe:{name}", ttl=ttl, what=f"build {build_id} of {name}",
                  extra={"build_id": build_id, "job": job.id if job else None})
    try:
        with lifetime.tracked("path", folder, what="farm job folder"):
            folder.mkdir(parents=True)
            store.get_file(spec["bundle"], folder / "recipe.tar", sha256=spec["sha256"])
            _unpack(folder / "recipe.tar", folder / "recipe")
            lease.acquire(timeout=JOB_TIMEOUT, on_wait=lambda other: log.warning(
                "waiting for recipe %s, baked by %s", name, describe(other)))
            try:
                options = dataclasses.replace(options, output=str(output), build_id=build_id)
                return _bake(spec, options, job, farm, store, lease, folder, attempt)
            finally:
                lease.release()
    finally:
        sh.discard_tree(folder, ignore_errors=True)
        with contextlib.suppress(Exception):
            lifetime.session().close()


def _bake(spec, options: BuildOptions, job, farm: Farm, store, lease: Lease, folder: Path,
          attempt: int) -> dict[str, Any]:
    name = spec["recipe"]
    output = Path(options.output)
    build_id = options.build_id
    assert build_id is not None
    rec = FarmRecord(store, name, build_id, {
        "recipe": name, "build_id": build_id, "state": "building", "job": job.id if job else None,
        "attempt": attempt, "host": socket.gethostname(), "worker": os.environ.get("RQ_WORKER_ID"),
        "pid": os.getpid(), "content_sha256": spec["sha256"], "submitted": spec.get("submitted"),
        "started": now(), "lease": lease.name, "stages": {}})
    rec.save()
    env = dict(os.environ, **lifetime.child_env(), BAKE_FARM_SHARED_CACHE="1",
               BAKE_FARM_LEASE=json.dumps({"redis": farm.redis_url, **lease.spec}))
    logfile = folder / "bake.log"
    with open(logfile, "w") as logf:
        # in this work horse's process group (os.setpgrp by RQ): a kill of the group ends
        # it too; the horse's watchdog ends it when the horse alone is killed
        proc = child.start(folder / "recipe" / "recipe.yml", options, child.Report(json=True),
                           stdout=subprocess.PIPE, stderr=logf, errors="replace", env=env)

        def lost(why: str) -> None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        lease.keep(on_lost=lost)
        result = None
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "stage" and ev.get("status") in ("finished", "failed", "skipped"):
                rec.stage(ev["stage"], status=ev["status"], seconds=ev.get("seconds"),
                          **({"cached": ev["cached"]} if "cached" in ev else {}))
                rec.save()
            elif ev.get("event") == "result":
                result = ev
        status = proc.wait()
    local = _local_record(output / name / build_id)
    values: dict[str, Any] = {"exit_status": status, "finished": now(), "dir": str(output / name / build_id)}
    if local:
        values["result"] = local.get("result")
        values["failed_stage"] = local.get("failed_stage")
        values["error"] = local.get("error")
        values["outputs"] = {r: {"sha256": e.get("sha256"), "size": e.get("size")}
                             for r, e in (local.get("outputs") or {}).items() if isinstance(e, dict)}
        cloud = local.get("cloud") or {}
        values["cloud"] = {k: cloud.get(f) for k, f in (("emi", "image_id"), ("eki", "kernel_id"),
                                                         ("eri", "ramdisk_id"), ("bucket", "bucket")) if cloud.get(f)}
        if local.get("verify"):
            values["verify"] = {"result": local["verify"].get("result")}
    elif result:
        values["error"] = result.get("error")
    if lease.lost:
        values.update(state="failed", error=lease.lost)
    elif status == exitcodes.OK:
        lease.check("uploading the build's artifacts")
        values["artifacts"] = _upload_artifacts(store, name, build_id, output / name / build_id, local or {})
        values["state"] = ("verified" if (local or {}).get("verify", {}).get("result") == "pass"
                           else "published" if values.get("cloud", {}).get("emi") else "ok")
    else:
        values["state"] = "failed"
    values["log"] = store.put_file(log_name(name, build_id), logfile)["key"]
    rec.update(**values)
    summary = {"recipe": name, "build_id": build_id, "state": values["state"], "exit_status": status,
               "host": socket.gethostname(), "attempt": attempt}
    if values["state"] == "failed" and (lease.lost or status not in NOT_RETRIED):
        raise Retryable(f"{name}: build {build_id} failed (exit {status}"
                        f"{', at ' + str(values.get('failed_stage')) if values.get('failed_stage') else ''}): "
                        f"{values.get('error') or 'see its log'}; tried again with back-off while tries are left")
    return summary


def _local_record(build_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((build_dir / "build.json").read_text())
    except (OSError, ValueError):
        return None


def _upload_artifacts(store, recipe: str, build_id: str, build_dir: Path, local: dict) -> dict[str, Any]:
    sent = {}
    folder = artifact_folder(recipe, build_id)
    for role in ARTIFACT_ROLES:
        entry = (local.get("outputs") or {}).get(role)
        if not entry:
            continue
        path = build_dir / entry["path"]
        if role == "image":
            packed = path.with_name(path.name + ".zst")
            with lifetime.tracked("path", packed, what="compressed image being uploaded"):
                try:
                    sh.run(["zstd", "-q", "-f", "-T0", "-3", path, "-o", packed], what="compressing the image")
                    sent[role] = {**store.put_file(folder + packed.name, packed), "compression": "zstd",
                                  "image_sha256": entry.get("sha256")}
                finally:
                    packed.unlink(missing_ok=True)
        else:
            sent[role] = store.put_file(folder + path.name, path)
    return sent
