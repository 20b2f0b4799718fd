"""Farm commands: `bake worker`, `bake submit`, `bake status`, and the `--farm` forms of
`bake ls` and `bake gc` (which those commands hand over to here); `bake nightly --farm` is
`builder.cli.nightly`'s."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from builder.cli.options import add_output
from builder.core import exitcodes, stale
from builder.core.errors import BakeError
from builder.farm.connect import QUEUE, SERIALIZER, Farm, refuse_password, shown
from builder.farm.gc import gc_farm
from builder.farm.jobs import BACKOFF, JOB_TIMEOUT, LEASE_TTL_ENV, OUTPUT_ENV, RETRIES, Duplicate, submit
from builder.farm.records import lease_holders, list_records, state_of
from builder.farm.remote import KEY_ENV, farm_key
from builder.farm.workers import clean_job_folders, take_name
from builder.pipeline.options import SKIPPABLE, STAGE_NAMES, BuildOptions
from builder.recipe.schemaerrors import RecipeError

def _redis_arg(value: str) -> str:
    try:
        return refuse_password(value)
    except BakeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_farm_options(sp) -> None:
    sp.add_argument("--redis", metavar="URL", type=_redis_arg,
                    help="the farm's Redis, redis://[USER@]HOST:PORT/DB or rediss://…?ssl_ca_certs=CA-FILE for TLS; "
                         "never with a password (default: $BAKE_REDIS_URL, which may hold one)")
    sp.add_argument("--redis-password-file", metavar="FILE",
                    help="the farm Redis's password: the first line of FILE (mode 600)")
    sp.add_argument("--store", metavar="s3://BUCKET/PREFIX",
                    help="the farm's store for records, logs, artifacts and the stage cache (default: "
                         "$BAKE_FARM_STORE); the cloud from the environment or --eucarc")


# --- bake worker ----------------------------------------------------------------------

def cmd_worker(args) -> int:
    from rq import Queue, Worker  # noqa: PLC0415 (rq: only the farm's commands load it)

    from builder.farm.trust import BakeJob  # noqa: PLC0415 (loads rq, as above)

    farm = Farm.from_args(args)
    conn = farm.redis()
    farm.store().ensure()
    # what a killed worker of this box left: mounts, loop devices, processes, work trees
    stale.report_stale(stale.clean_stale())
    output = Path(args.output).resolve()
    for d in clean_job_folders(output):
        print(f"removed the folder of a killed job: {d}", file=sys.stderr)
    if farm_key() is None:
        print(f"bake: warning: the farm's shared stage cache is off on this worker: no farm key ({KEY_ENV}, the "
              "same on every box) to check its entries", file=sys.stderr)
    os.environ.update(farm.env())
    os.environ[OUTPUT_ENV] = str(output)
    os.environ[LEASE_TTL_ENV] = str(args.lease_ttl)
    queues = [Queue(q, connection=conn, serializer=SERIALIZER, job_class=BakeJob) for q in (args.queues or [QUEUE])]
    name = args.name or f"{socket.gethostname()}.{os.getpid()}"
    said = take_name(conn, name)
    if said:
        print(said, file=sys.stderr)
    # jobs are JSON data, and only bake's build runs (builder/farm/trust.py); a job's
    # description is whatever its writer said, so the log names jobs by their ids
    worker = Worker(queues, connection=conn, name=name, serializer=SERIALIZER, job_class=BakeJob,
                    log_job_description=False,
                    maintenance_interval=args.maintenance_interval, job_monitoring_interval=args.heartbeat,
                    # an idle worker looks for dead workers' jobs once per dequeue wait (worker TTL - 15 s)
                    worker_ttl=args.maintenance_interval + 15)
    print(f"bake worker {worker.name}: queues {', '.join(q.name for q in queues)}, Redis {shown(farm.redis_url)}, "
          f"store {farm.store_url}, output {output}", file=sys.stderr, flush=True)
    worker.work(with_scheduler=True, burst=args.burst, logging_level="INFO")
    return exitcodes.OK


# --- bake submit ------------------------------------------------------------------------

def job_options(args) -> BuildOptions:
    """The build options of the jobs `bake submit` or `bake nightly --farm` asks for; the
    output root and the build id are each worker's."""
    return BuildOptions(stop_after=getattr(args, "stop_after", None), skip=tuple(getattr(args, "skip", None) or ()),
                        cloud=bool(getattr(args, "cloud_verify", False)))


def submit_all(farm: Farm, paths: list[str], options: BuildOptions, *, day: str | None, timeout: int,
               retries: int, backoff: float) -> tuple[list[dict], list[dict]]:
    """Submit each recipe with the build `options`; (submitted, refused), each a list of
    {recipe, path, job?, error}."""
    conn, store = farm.redis(), farm.store()
    submitted, refused = [], []
    for path in paths:
        try:
            s = submit(farm, path, options=options, day=day, timeout=timeout, retries=retries, backoff=backoff,
                       conn=conn, store=store)
            submitted.append({**s, "path": path})
            print(f"{s['recipe']}: submitted as job {s['job']}", file=sys.stderr, flush=True)
        except Duplicate as e:
            refused.append({"recipe": e.recipe, "path": path, "job": e.job, "error": str(e), "duplicate": True})
            print(f"bake: refused: {e}", file=sys.stderr, flush=True)
        except RecipeError as e:
            refused.append({"recipe": Path(path).stem, "path": path, "error": str(e), "invalid": True})
            print(f"bake: error: {e}", file=sys.stderr, flush=True)
    return submitted, refused


def wait_for_jobs(farm: Farm, submitted: list[dict], *, poll: float = 2.0) -> list[dict]:
    """Wait until every submitted job finished or failed for good; each entry gains
    `outcome` (ok, failed, lost) and the job's result or error."""
    from rq.job import Job, JobStatus  # noqa: PLC0415 (rq: only the farm's commands load it)

    conn = farm.redis()
    pending = {s["job"]: s for s in submitted}
    said: dict[str, str] = {}
    while pending:
        for jid, s in list(pending.items()):
            try:
                job = Job.fetch(jid, connection=conn, serializer=SERIALIZER)
            except Exception:
                s.update(outcome="lost", error="the job is no longer in Redis (Redis restarted?); see `bake ls --farm`")
                del pending[jid]
                continue
            status = job.get_status()
            if status == JobStatus.FINISHED:
                s.update(outcome="ok", result=job.return_value())
                if (s["result"] or {}).get("state") == "failed":
                    s["outcome"] = "failed"
            elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                latest = job.latest_result()
                exc = (latest.exc_string if latest is not None else None) or ""
                s.update(outcome="failed", error=exc.strip().splitlines()[-1] if exc.strip() else str(status))
            else:
                if said.get(jid) != str(status):
                    print(f"{s['recipe']}: {status}", file=sys.stderr, flush=True)
                    said[jid] = str(status)
                continue
            print(f"{s['recipe']}: {s['outcome']}" + (f" ({s.get('error')})" if s.get("error") else ""),
                  file=sys.stderr, flush=True)
            del pending[jid]
        if pending:
            time.sleep(poll)
    return submitted


def cmd_submit(args) -> int:
    farm = Farm.from_args(args)
    submitted, refused = submit_all(farm, args.recipes, job_options(args), day=None, timeout=args.timeout,
                                    retries=args.retries, backoff=args.backoff)
    for s in submitted:
        print(s["job"])
    if args.wait and submitted:
        wait_for_jobs(farm, submitted)
        if any(s["outcome"] != "ok" for s in submitted):
            return exitcodes.SOME_FAILED
    if any(r.get("invalid") for r in refused):
        return exitcodes.RECIPE_INVALID if not submitted else exitcodes.SOME_FAILED
    if refused:
        return exitcodes.BUSY
    return exitcodes.OK


# --- ls / status / gc --farm -------------------------------------------------------------

def render(records: list[dict[str, Any]], holders) -> str:
    """The table of farm builds `bake ls --farm` and `bake status` print."""
    rows = [("RECIPE", "BUILD", "STATE", "HOST", "FINISHED", "EMI")]
    for r in records:
        cloud = r.get("cloud") or {}
        rows.append((r["recipe"], r["build_id"], state_of(r, holders), r.get("host") or "-",
                     r.get("finished") or "-", cloud.get("emi") or "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _redis_or_none(farm: Farm):
    try:
        return farm.redis()
    except BakeError as e:
        print(f"bake: warning: {e}; what is building cannot be told", file=sys.stderr)
        return None


def cmd_ls_farm(args) -> int:
    farm = Farm.from_args(args, need_redis=False)
    store = farm.store()
    records = list_records(store, args.recipe)
    conn = _redis_or_none(farm) if farm.redis_url else None
    holders = lease_holders(conn, {r["recipe"] for r in records})
    if args.json:
        print(json.dumps([{**{k: v for k, v in r.items() if k != "_name"}, "state": state_of(r, holders)}
                          for r in records], indent=2))
    elif records:
        print(render(records, holders))
    else:
        print(f"no farm builds in {farm.store_url}" + (f" for recipe {args.recipe}" if args.recipe else ""),
              file=sys.stderr)
    return exitcodes.OK


def cmd_status(args) -> int:
    """The queue (jobs waiting, running, to be retried, failed), the workers, and the
    latest build of each recipe from the store."""
    farm = Farm.from_args(args, need_redis=False)
    out: dict[str, Any] = {}
    conn = _redis_or_none(farm) if farm.redis_url else None
    if conn is not None:
        # rq: only the farm's commands load it
        from rq import Queue, Worker  # noqa: PLC0415
        from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry  # noqa: PLC0415

        q = Queue(QUEUE, connection=conn, serializer=SERIALIZER)
        out["queue"] = {"queued": q.get_job_ids(), "running": StartedJobRegistry(queue=q).get_job_ids(),
                        "retrying": ScheduledJobRegistry(queue=q).get_job_ids(),
                        "failed": FailedJobRegistry(queue=q).get_job_ids()}
        out["workers"] = [{"name": w.name, "state": str(w.get_state()),
                           "job": w.get_current_job_id()} for w in Worker.all(connection=conn, serializer=SERIALIZER)]
    records = list_records(farm.store(), args.recipe)
    holders = lease_holders(conn, {r["recipe"] for r in records})
    latest: dict[str, dict] = {}
    for r in records:
        latest[r["recipe"]] = r
    out["latest"] = {name: {"build_id": r["build_id"], "state": state_of(r, holders), "host": r.get("host"),
                            "stages": r.get("stages"), "finished": r.get("finished"), "log": r.get("log")}
                     for name, r in latest.items()}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return exitcodes.OK
    if "queue" in out:
        for k, ids in out["queue"].items():
            print(f"{k:<9} {len(ids):>3}  {' '.join(ids)}".rstrip())
        for w in out["workers"]:
            print(f"worker {w['name']}: {w['state']}" + (f" ({w['job']})" if w["job"] else ""))
    if latest:
        print(render(list(latest.values()), holders))
    return exitcodes.OK


def cmd_gc_farm(args) -> int:
    farm = Farm.from_args(args, need_redis=False)
    result = gc_farm(farm, args.keep, dry_run=args.dry_run, recipes=args.recipes or None)
    if args.json:
        print(json.dumps(result, indent=2))
        return exitcodes.OK
    verb = "would delete" if args.dry_run else "deleted"
    for e in result["kept"]:
        print(f"kept     {e['recipe']}/{e['build_id']}  {e['state']}: {e['why']}")
    for e in result["deleted"]:
        print(f"{verb:<8} {e['recipe']}/{e['build_id']}  {e['state']}: {e['why']}")
    for t in result["temporary"]:
        print(f"{verb:<8} {t['name']}: a half-written upload, {t['age'] // 3600} h old")
    return exitcodes.OK


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "worker", help="work for the build farm: bake the jobs of its queue (RQ on Redis)",
        description="An RQ worker of the farm: takes a submitted recipe from the queue, bakes it in a work horse "
                    "of its own and records it in the store. On start it undoes what a killed bake or worker "
                    "of this box left. A job whose worker dies is retried on another once its heartbeat has "
                    "expired (within the heartbeat + 60 s, noticed at the next maintenance).")
    add_farm_options(sp)
    sp.add_argument("--eucarc", help="the cloud of the store (default: the environment)")
    add_output(sp)
    sp.add_argument("--queues", nargs="+", metavar="QUEUE", help=f"queues to work on (default: {QUEUE})")
    sp.add_argument("--name", help="the worker's name (default: HOST.PID)")
    sp.add_argument("--burst", action="store_true", help="stop once the queue is empty")
    sp.add_argument("--heartbeat", type=int, default=15, metavar="S",
                    help="seconds between the heartbeats of a running job (default 15)")
    sp.add_argument("--maintenance-interval", type=int, default=30, metavar="S",
                    help="seconds between looks for jobs of dead workers (default 30)")
    sp.add_argument("--lease-ttl", type=float, default=60, metavar="S",
                    help="a recipe's lease ends this long after its holder stopped renewing it (default 60)")
    sp.set_defaults(func=cmd_worker)

    sp = subparsers.add_parser(
        "submit", help="submit recipes to the build farm (one job per recipe)",
        description="Validate and pack each recipe with the files it names, and queue one job per recipe. The "
                    "job id is the recipe's name and the digest of its content: a recipe already queued, running "
                    "or done in the last day is refused (exit 6). Failed jobs are retried with back-off "
                    f"(--backoff S, then 4× and 20× it). A job may run {JOB_TIMEOUT // 3600} h (--timeout).")
    sp.add_argument("recipes", nargs="+", metavar="RECIPE")
    add_farm_options(sp)
    sp.add_argument("--eucarc", help="the cloud of the store (default: the environment)")
    sp.add_argument("--wait", action="store_true", help="wait for the jobs; exit 7 when one did not succeed")
    add_job_options(sp)
    sp.add_argument("--stop-after", choices=STAGE_NAMES, help="stop each build after this stage")
    sp.add_argument("--skip", action="append", choices=SKIPPABLE, help="skip this stage (repeatable)")
    sp.add_argument("--verify-on-cloud", dest="cloud_verify", action="store_true",
                    help="verify on the cloud the builds are published to, instead of locally")
    sp.set_defaults(func=cmd_submit)

    sp = subparsers.add_parser(
        "status", help="the build farm: queued, running, retried and failed jobs, workers, latest builds",
        description="Reads the queue from Redis (when it answers) and the builds from the store.")
    sp.add_argument("recipe", nargs="?", metavar="RECIPE")
    add_farm_options(sp)
    sp.add_argument("--eucarc", help="the cloud of the store (default: the environment)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)


def add_job_options(sp) -> None:
    """`--timeout`, `--retries` and `--backoff` of the jobs a command submits."""
    sp.add_argument("--timeout", type=int, default=JOB_TIMEOUT, metavar="S",
                    help=f"seconds a job may run (default {JOB_TIMEOUT}); then it is stopped and counts as failed")
    sp.add_argument("--retries", type=int, default=RETRIES, metavar="N",
                    help=f"tries of a failed job after the first (default {RETRIES})")
    sp.add_argument("--backoff", type=float, default=BACKOFF, metavar="S",
                    help=f"seconds before the first retry, then 4× and 20× it (default {BACKOFF})")


def add_farm_switch(sp, what: str) -> None:
    """`--farm` (and where the farm is) for nightly, ls and gc."""
    sp.add_argument("--farm", action="store_true", help=what)
    add_farm_options(sp)
