#!/usr/bin/env python3
"""The build farm on one machine: three workers against one, and how long a killed
worker's job takes to start again elsewhere.

    sudo .venv/bin/python bench/bench_farm.py [--base BUILD_DIR] [--dir /var/tmp] [--keep] [--json PATH]
        [--heartbeat 5] [--maintenance-interval 10] [--lease-ttl 20] [--skip-kill] [--skip-nightly]

Run as root (the bakes chroot and loop-mount). Everything runs on this machine:
Debian's redis-server on 127.0.0.1 (a free port, no persistence), the store on the
Eucalyptus 4.x stand-in of the tests (tests/eucalyptus_standin, served from this
process), and `bake worker` processes, each a box of its own (its own output folder and
stage cache).

The bases: the demo build (`--base`, else the newest output/tests/debian-demo/run-*/
whose build.json says ok, else recipes/debian-demo.yml baked with `--stop-after image`
into the temporary folder), copied into the temporary folder, and a second copy with
one file more in its image (written with debugfs), so that the two have different
cache keys. Six recipes, three on each base, each with a file of its own,
`kernel: from-source`, bundle, publish and verify off.

  farm-1    one worker:    `bake nightly DIR --farm --backoff 0` of the six;
  farm-3    three workers: the same.

Both start cold: a new store prefix (so no shared stage cache), new empty output
folders and stage caches on every box, and Redis emptied. The figures are the wall time
of the nightly command (submission to the last job finished, polled every 2 s by
nightly), the span of the jobs in RQ (first enqueued to last ended), and the ratio
farm-1 / farm-3.

  kill      three workers, cold, one recipe on the first base whose `commands:` waits
            for /tmp/farm-go in its chroot after touching /tmp/farm-waiting, submitted
            with `bake submit --wait --backoff 0`. Once it waits, its worker's process
            group (the worker and its scheduler) and its job's process group (the work
            horse and the bake under it) are SIGKILLed. The figure is the time from the
            kill to the job's restart on another worker: its RQ status started again
            there, and its new durable record in the store in state building; then the
            recipe is let go and must finish (attempt 2).

It reports; it never fails because a figure is poor. A build, or anything started,
that fails stops it with the error and a non-zero exit, after everything it started
(Redis, the stand-in, workers, commands) has been stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent
BAKE = ROOT / ".venv" / "bin" / "bake"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))      # the stand-in that serves the store, the farm's helpers

from events import wait_for  # noqa: E402
from farm_helpers import (GO, WAITING, RedisServer, Worker, copy_base, start_worker, store_url, tail,  # noqa: E402
                          write_recipe)

NAMES_A = ("farm-a1", "farm-a2", "farm-a3")
NAMES_B = ("farm-b1", "farm-b2", "farm-b3")
SLOW = "farm-slow"
RQ_MARGIN = 60      # what RQ adds to the heartbeat interval for a job's time to live


class BenchError(Exception):
    pass


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- the bases and the recipes -----------------------------------------------------------

def ok_build(d: Path) -> bool:
    try:
        return json.loads((d / "build.json").read_text()).get("result") == "ok"
    except (OSError, ValueError):
        return False


def find_base(arg: str | None, top: Path) -> tuple[Path, str]:
    """The demo build to start from, and where it came from."""
    if arg:
        d = Path(arg).resolve()
        if not ok_build(d):
            raise BenchError(f"--base {d}: no build.json with result ok there")
        return d, "given with --base"
    runs = sorted((d for d in (ROOT / "output" / "tests" / "debian-demo").glob("run-*") if ok_build(d)),
                  key=lambda d: (d / "build.json").stat().st_mtime, reverse=True)
    if runs:
        return runs[0], "the newest test run's demo build"
    say("no demo build in output/tests/debian-demo: baking recipes/debian-demo.yml up to the image ...")
    env = dict(os.environ)
    env.setdefault("BAKE_CACHE", str(ROOT / "output" / ".cache"))
    out = top / "demo"
    r = subprocess.run([str(BAKE), "build", str(ROOT / "recipes" / "debian-demo.yml"), "--stop-after", "image",
                        "--output", str(out), "--build-id", "bench"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    d = out / "debian-demo" / "bench"
    if r.returncode != 0 or not ok_build(d):
        raise BenchError(f"baking the demo recipe failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return d, "baked by this run (recipes/debian-demo.yml, --stop-after image)"


# --- cleaning up -------------------------------------------------------------------------

def undo_leftovers(folder: Path) -> list[str]:
    """End processes whose root is under `folder`, unmount what is mounted under it and
    detach loop devices backed by files in it; what was done."""
    from builder.core import sh, watchdog

    done = []
    for pid in watchdog.processes_rooted_in(str(folder)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            done.append(f"killed process {pid} (its root is under {folder})")
    mounted = sh.mounts_under(folder)
    if mounted:
        sh.unmount_all_under(folder)
        done += [f"unmounted {m}" for m in mounted]
    r = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        for dev in json.loads(r.stdout).get("loopdevices", []):
            if (dev.get("back-file") or "").startswith(str(folder).rstrip("/") + "/"):
                subprocess.run(["losetup", "-d", dev["name"]], capture_output=True)
                done.append(f"detached {dev['name']} ({dev['back-file']})")
    return done


def empty_store(url: str) -> int:
    from builder.cloud.objects import ObjectStore

    store = ObjectStore.from_url(url)
    names = list(store.list(""))
    for name in names:
        store.delete(name)
    return len(names)


@contextlib.contextmanager
def farm(top: Path, label: str, redis: RedisServer, cloud_env: dict[str, str], boxes: int, settings: dict[str, float],
         keep: bool):
    """A cold farm of `boxes` workers on a new store prefix and an emptied Redis; yields
    (folder, store URL, boxes). Afterwards every worker is stopped, the store prefix
    emptied, and the folder undone and removed (unless keep)."""
    from builder.farm.connect import redis_from_url

    folder = top / label
    folder.mkdir()
    conn = redis_from_url(redis.url)
    conn.flushall()
    conn.close()
    store = store_url("bench")
    started: list[Worker] = []
    ok = False
    try:
        for i in range(1, boxes + 1):
            started.append(start_worker(f"box-{i}", folder / f"box-{i}", redis, store, cloud_env,
                                        lease_ttl=settings["lease_ttl"], heartbeat=settings["heartbeat"],
                                        maintenance=settings["maintenance_interval"]))
        yield folder, store, started
        ok = True
    finally:
        for b in started:
            b.stop(300 if ok else 5)
        # the bakes of a killed box end by their watchdog; give them the time to
        time.sleep(1)
        left = undo_leftovers(folder)
        if left:
            say(f"{label}: left behind, now undone: " + "; ".join(left))
        with contextlib.suppress(Exception):
            empty_store(store)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


# --- the figures ---------------------------------------------------------------------------

def rq_times(redis_url: str, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    from rq.job import Job

    from builder.farm.connect import SERIALIZER, redis_from_url

    conn = redis_from_url(redis_url)
    out = {}
    for jid in job_ids:
        job = Job.fetch(jid, connection=conn, serializer=SERIALIZER)
        out[jid] = {"enqueued": job.enqueued_at.timestamp() if job.enqueued_at else None,
                    "started": job.started_at.timestamp() if job.started_at else None,
                    "ended": job.ended_at.timestamp() if job.ended_at else None,
                    "worker": job.worker_name, "status": getattr(job.get_status(), "value", None)}
    conn.close()
    return out


def store_records(store: str, recipe: str | None = None) -> list[dict[str, Any]]:
    from builder.cloud.objects import ObjectStore
    from builder.farm.records import list_records

    return list_records(ObjectStore.from_url(store), recipe)


def job_figures(jobs: dict[str, str], times: dict[str, dict], records: dict[str, dict]) -> tuple[dict, dict]:
    """Per recipe: worker, seconds waited and run, stage times, where its base tree
    came from; and the sums over the run."""
    recipes = {}
    had_base: set[tuple[str, str]] = set()     # (box, base) once a job of that box had that base
    for name, jid in sorted(jobs.items(), key=lambda kv: times[kv[1]]["started"]):
        t, rec = times[jid], records.get(name, {})
        stages = {s: {"seconds": v.get("seconds"), "cached": v.get("cached")}
                  for s, v in (rec.get("stages") or {}).items() if v.get("seconds") is not None}
        base = "a" if name in NAMES_A else "b"
        # the base tree: made here (a cache miss), else from the store on a box's first
        # job on it, else from the box's own cache
        made = (stages.get("bootstrap") or {}).get("cached") is False
        source = "made" if made else "local" if (t["worker"], base) in had_base else "store"
        had_base.add((t["worker"], base))
        ran = t["ended"] - t["started"]
        recipes[name] = {
            "worker": t["worker"], "attempt": rec.get("attempt"), "state": rec.get("state"),
            "waited": round(t["started"] - t["enqueued"], 1), "ran": round(ran, 1), "base_tree": source,
            "outside_stages": round(ran - sum(v["seconds"] for v in stages.values()), 1), "stages": stages}
    recipes = dict(sorted(recipes.items()))
    totals = {s: round(sum((r["stages"].get(s) or {}).get("seconds") or 0 for r in recipes.values()), 1)
              for s in ("bootstrap", "customize", "image")}
    totals["outside_stages"] = round(sum(r["outside_stages"] for r in recipes.values()), 1)
    totals["jobs"] = round(sum(r["ran"] for r in recipes.values()), 1)
    return recipes, totals


def run_nightly(label: str, boxes: int, recipes_dir: Path, top: Path, redis: RedisServer, cloud_env: dict[str, str],
                settings: dict[str, float], keep: bool) -> dict[str, Any]:
    say(f"{label}: {boxes} worker(s), cold; bake nightly --farm of the six recipes ...")
    with farm(top, label, redis, cloud_env, boxes, settings, keep) as (folder, store, started):
        env = dict(os.environ, **cloud_env)
        argv = [str(BAKE), "nightly", str(recipes_dir), "--farm", "--redis", redis.url, "--store", store,
                "--backoff", "0", "--output", str(folder / "nightly")]
        load_before = loadavg()
        t0 = time.time()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=4 * 3600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.time() - t0
        summary_path = folder / "nightly" / "nightly" / "latest.json"
        if proc.returncode != 0 or not summary_path.is_file():
            logs = "\n".join(f"--- {b.name}:\n{tail(b.folder / 'worker.log', 15)}" for b in started)
            raise BenchError(f"{label}: `{' '.join(argv)}` exited {proc.returncode}:\n{err[-4000:]}\n{logs}")
        summary = json.loads(summary_path.read_text())
        jobs = {r["recipe"]: r["job"] for r in summary["recipes"]}
        times = rq_times(redis.url, list(jobs.values()))
        records = {r["recipe"]: r for r in store_records(store)}
        span = max(t["ended"] for t in times.values()) - min(t["enqueued"] for t in times.values())
        recipes, totals = job_figures(jobs, times, records)
        result = {"workers": boxes, "wall": round(wall, 1), "span": round(span, 1), "load_before": load_before,
                  "load_after": loadavg(), "passed": summary["passed"], "failed": summary["failed"],
                  "base_trees": {k: sum(r["base_tree"] == k for r in recipes.values())
                                 for k in ("made", "store", "local")},
                  "job_seconds": totals, "recipes": recipes}
        say(f"{label}: wall {wall:.1f} s, jobs' span {span:.1f} s")
        return result


def run_kill(top: Path, slow_recipe: Path, redis: RedisServer, cloud_env: dict[str, str], settings: dict[str, float],
             keep: bool) -> dict[str, Any]:
    from rq.job import Job
    from rq.registry import StartedJobRegistry

    from builder.farm.connect import QUEUE, SERIALIZER, redis_from_url

    say("kill: three workers, cold; the waiting recipe, its worker killed mid-build ...")
    with farm(top, "kill", redis, cloud_env, 3, settings, keep) as (folder, store, boxes):
        env = dict(os.environ, **cloud_env)
        argv = [str(BAKE), "submit", str(slow_recipe), "--redis", redis.url, "--store", store, "--wait",
                "--backoff", "0"]
        t_submit = time.time()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
        try:
            conn = redis_from_url(redis.url)
            registry = StartedJobRegistry(QUEUE, connection=conn, serializer=SERIALIZER)

            def waiting() -> list[Path]:
                if proc.poll() is not None:
                    raise BenchError(f"`bake submit --wait` ended early (exit {proc.returncode}): "
                                     f"{proc.stderr.read()[-4000:]}")
                return [p.parents[1] for p in folder.glob(f"box-*/output/{SLOW}/*/work/rootfs/{WAITING}")]
            root = wait_for(waiting, 1800, f"{SLOW}'s build to reach its command")[0]
            box = next(b for b in boxes if root.is_relative_to(b.folder))
            record = wait_for(lambda: next((r for r in store_records(store, SLOW) if r.get("state") == "building"),
                                             None), 120, f"{SLOW}'s durable record")
            jid = record["job"]
            expiry = next((score for entry, score in conn.zrange(registry.key, 0, -1, withscores=True)
                           if entry.decode().split(":")[0] == jid), None)
            # the box dies: its worker's process group (worker, scheduler) and its job's
            # (the work horse and the bake it runs)
            t_kill = time.time()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(box.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record["pid"], signal.SIGKILL)
            box.proc.wait()
            # the last heartbeat's time to live, as it stood when the box died
            expiry = next((score for entry, score in conn.zrange(registry.key, 0, -1, withscores=True)
                           if entry.decode().split(":")[0] == jid), expiry)
            say(f"kill: killed {box.name} (job {jid}, horse {record['pid']}); waiting for the restart ...")

            seen: dict[str, float] = {}
            first_start = Job.fetch(jid, connection=conn, serializer=SERIALIZER).started_at
            last_store_look = 0.0
            deadline = time.monotonic() + 1800
            while not {"left_started", "started_again", "record_building", "waiting_again"} <= seen.keys():
                now = time.time()
                if proc.poll() is not None:
                    raise BenchError(f"`bake submit --wait` ended before the retry (exit {proc.returncode}): "
                                     f"{proc.stderr.read()[-4000:]}")
                if time.monotonic() > deadline:
                    raise BenchError(f"timed out waiting for {SLOW} to start again; seen so far: {seen}")
                job = Job.fetch(jid, connection=conn, serializer=SERIALIZER)
                status = getattr(job.get_status(), "value", None)
                if status != "started" and "left_started" not in seen:
                    seen["left_started"] = now
                    say(f"kill: the job is {status} (+{now - t_kill:.1f} s)")
                if (status == "started" and job.started_at and job.started_at != first_start
                        and job.worker_name != box.name and "started_again" not in seen):
                    seen["started_again"] = now
                    seen.setdefault("left_started", now)
                    seen["rq_started_at"] = job.started_at.timestamp()
                    seen["worker_again"] = job.worker_name
                    say(f"kill: started again on {job.worker_name} (+{now - t_kill:.1f} s)")
                if now - last_store_look >= 0.5 and "record_building" not in seen:
                    last_store_look = now
                    again = [r for r in store_records(store, SLOW)
                             if r["build_id"] != record["build_id"] and r.get("state") == "building"]
                    if again:
                        seen["record_building"] = now
                        seen["record_worker"] = again[0].get("worker")
                        say(f"kill: new record {again[0]['build_id']} building on {again[0].get('worker')} "
                            f"(+{now - t_kill:.1f} s)")
                if "waiting_again" not in seen:
                    others = [p.parents[1] for p in folder.glob(f"box-*/output/{SLOW}/*/work/rootfs/{WAITING}")
                              if not p.is_relative_to(box.folder)]
                    if others:
                        seen["waiting_again"] = now
                        seen["root_again"] = str(others[0])
                time.sleep(0.2)

            (Path(seen["root_again"]) / GO).touch()
            out, err = proc.communicate(timeout=3600)
            if proc.returncode != 0:
                raise BenchError(f"`bake submit --wait` exited {proc.returncode} after the retry: {err[-4000:]}")
            t_done = time.time()
            final = [r for r in store_records(store, SLOW) if r["build_id"] != record["build_id"]]
            maint = [line for b in boxes if b is not box
                     for line in (b.folder / "worker.log").read_text(errors="replace").splitlines()
                     if "cleaning registries" in line]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        rel = {k: round(v - t_kill, 1) for k, v in seen.items() if isinstance(v, float) and k != "rq_started_at"}
        result = {
            "workers": 3, "killed": box.name, "job": jid, "restarted_on": seen.get("worker_again"),
            "kill_after_submit": round(t_kill - t_submit, 1),
            "kill_clock": time.strftime("%H:%M:%S", time.localtime(t_kill)),
            "heartbeat_expiry": round(expiry - t_kill, 1) if expiry else None,
            "after_kill": rel, "rq_started_at": round(seen["rq_started_at"] - t_kill, 1),
            "finished_after_go": round(t_done - seen["waiting_again"], 1),
            "final": [{"build_id": r["build_id"], "state": r.get("state"), "attempt": r.get("attempt"),
                       "worker": r.get("worker")} for r in final],
            "maintenance_lines": maint[-6:], "load_after": loadavg()}
        say(f"kill: restart {rel.get('started_again')} s after the kill (RQ), record {rel.get('record_building')} s")
        return result


# --- the report ----------------------------------------------------------------------------

def report(res: dict[str, Any]) -> str:
    lines = [f"bake farm benchmark, {res['date']}, {res['cpus']} CPUs, load average at start {res['load_start']}",
             f"base: {res['base']} ({res['base_from']})",
             f"worker settings: --heartbeat {res['settings']['heartbeat']} --maintenance-interval "
             f"{res['settings']['maintenance_interval']} --lease-ttl {res['settings']['lease_ttl']} "
             f"(RQ adds {RQ_MARGIN} s to the heartbeat)", ""]
    runs = res.get("nightly") or {}
    if runs:
        lines.append("six recipes on two bases, cold (new store prefix, empty caches), bake nightly --farm --backoff 0")
        lines.append(f"{'run':<8} {'workers':>7} {'wall s':>8} {'span s':>8}  per recipe: worker, seconds run")
        for label, r in runs.items():
            each = "  ".join(f"{n.removeprefix('farm-')}:{v['worker'].removeprefix('box-')}/{v['ran']:.0f}"
                             for n, v in r["recipes"].items())
            lines.append(f"{label:<8} {r['workers']:>7} {r['wall']:>8.1f} {r['span']:>8.1f}  {each}")
        lines.append(f"{'run':<8} {'jobs s':>7} {'bootstrap':>9} {'customize':>9} {'image':>6} {'outside':>7}  "
                     "base trees (made / from the store / from the box's cache)")
        for label, r in runs.items():
            j, b = r["job_seconds"], r["base_trees"]
            lines.append(f"{label:<8} {j['jobs']:>7.0f} {j['bootstrap']:>9.0f} {j['customize']:>9.0f} "
                         f"{j['image']:>6.0f} {j['outside_stages']:>7.0f}  {b['made']} / {b['store']} / {b['local']}")
        if "ratio_wall" in res:
            lines.append(f"ratio 1 worker / 3 workers: {res['ratio_wall']:.2f} (wall), {res['ratio_span']:.2f} (span)")
        lines.append("")
    k = res.get("kill")
    if k:
        a = k["after_kill"]
        lines += [f"kill: {k['killed']} SIGKILLed mid-build; job restarted on {k['restarted_on']}",
                  f"  the job's heartbeat would have expired      +{k['heartbeat_expiry']} s",
                  f"  RQ status no longer started (first seen)     +{a.get('left_started')} s",
                  f"  RQ status started again on another worker    +{a.get('started_again')} s "
                  f"(RQ's started_at +{k['rq_started_at']} s)",
                  f"  new durable record in state building         +{a.get('record_building')} s",
                  f"  the build waiting in its chroot again        +{a.get('waiting_again')} s",
                  f"  finished after being let go                  {k['finished_after_go']} s; final record(s): "
                  + ", ".join(f"{r['state']} attempt {r['attempt']} on {r['worker']}" for r in k["final"]),
                  f"  killed at {k['kill_clock']}, {k['kill_after_submit']} s after submission; the other workers' "
                  "maintenance runs (from their logs):"] + [f"    {line}" for line in k["maintenance_lines"]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", metavar="BUILD_DIR", help="the demo build to start from (default: the newest "
                    "output/tests/debian-demo/run-*/ that is ok, else the demo recipe baked here)")
    ap.add_argument("--dir", default="/var/tmp", help="where the temporary folder goes (default /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--json", metavar="PATH", help="write the figures there as JSON too")
    ap.add_argument("--heartbeat", type=int, default=5, help="the workers' --heartbeat (default 5)")
    ap.add_argument("--maintenance-interval", type=int, default=10,
                    help="the workers' --maintenance-interval (default 10)")
    ap.add_argument("--lease-ttl", type=float, default=20, help="the workers' --lease-ttl (default 20)")
    ap.add_argument("--skip-kill", action="store_true", help="only the 1-worker and 3-worker runs")
    ap.add_argument("--skip-nightly", action="store_true", help="only the kill")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("run as root: the bakes chroot and loop-mount")
    for tool in ("redis-server", "debugfs"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (scripts/setup installs it)")
    settings = {"heartbeat": args.heartbeat, "maintenance_interval": args.maintenance_interval,
                "lease_ttl": args.lease_ttl}

    from eucalyptus_standin import eucalyptus_standin

    top = Path(tempfile.mkdtemp(prefix="bake-bench-farm-", dir=args.dir))
    (top / "tmp").mkdir()
    tempfile.tempdir = str(top / "tmp")        # the stand-in's object bodies spill here
    res: dict[str, Any] = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "cpus": os.cpu_count(), "load_start": loadavg(), "settings": settings}
    redis = RedisServer(top / "redis")
    try:
        demo, res["base_from"] = find_base(args.base, top)
        res["base"] = str(demo)
        base_a = copy_base(demo, top / "base-a", None)
        base_b = copy_base(demo, top / "base-b", "base b")
        recipes = top / "recipes"
        recipes.mkdir()
        for base, names in ((base_a, NAMES_A), (base_b, NAMES_B)):
            for name in names:
                write_recipe(recipes, name, base)
        slow_dir = top / "slow"
        slow_dir.mkdir()
        slow = write_recipe(slow_dir, SLOW, base_a, slow=True)
        with eucalyptus_standin("4", top / "standin") as cloud:
            cloud_env = cloud.env()
            os.environ.update(cloud_env)        # this process reads the store too
            redis.start()
            if not args.skip_nightly:
                res["nightly"] = {}
                for label, boxes in (("farm-1", 1), ("farm-3", 3)):
                    res["nightly"][label] = run_nightly(label, boxes, recipes, top, redis, cloud_env, settings,
                                                        args.keep)
                one, three = res["nightly"]["farm-1"], res["nightly"]["farm-3"]
                res["ratio_wall"] = round(one["wall"] / three["wall"], 3)
                res["ratio_span"] = round(one["span"] / three["span"], 3)
            if not args.skip_kill:
                res["kill"] = run_kill(top, slow, redis, cloud_env, settings, args.keep)
        res["load_end"] = loadavg()
    except (BenchError, AssertionError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        redis.stop()
        left = undo_leftovers(top)
        if left:
            say("left behind, now undone: " + "; ".join(left))
        if args.keep:
            say(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
