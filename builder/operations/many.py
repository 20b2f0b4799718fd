"""`bake build A.yml B.yml ... -j N`: several recipes, N bakes at a time.

Each recipe is baked by a `bake build` process of its own (`builder.pipeline.child`),
exactly as if it had been started alone: its own interrupt handling, watchdog and
journal, the recipe lock, and the shared stage cache whose entries are made once under
their locks (two recipes that need the same base wait for one bootstrap, then both use
it). Every bake gets the same BuildOptions, as JSON. A process per bake, not a thread:
a chroot, a working directory and signal handling belong to a process.

Every line a bake writes on stderr is shown prefixed with its recipe's name; when all
are done, a summary lists each recipe's result. An interrupt is passed on to every
running bake, which undoes what it started, and is waited for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from builder.core import events, exitcodes, interrupts, lifetime
from builder.core.errors import BakeError
from builder.pipeline import child
from builder.pipeline.options import BuildOptions
from builder.recipe.recipe import load_recipe

# How a bake's exit status reads in the summary.
RESULTS = {
    exitcodes.OK: "ok",
    exitcodes.RECIPE_INVALID: "invalid recipe",
    exitcodes.PUBLISH_FAILED: "failed at publish",
    exitcodes.VERIFY_FAILED: "failed at verify",
    exitcodes.BUSY: "busy (another bake holds the recipe)",
    exitcodes.INTERRUPTED: "interrupted",
}


@dataclass
class Job:
    path: str
    name: str
    status: int | None = None
    result: str = "not started"
    build_dir: str | None = None
    seconds: float = 0.0
    error: str | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    pump: threading.Thread | None = None
    stdout: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"recipe": self.name, "path": self.path, "exit_status": self.status, "result": self.result,
                "dir": self.build_dir, "seconds": round(self.seconds, 1), "error": self.error}


def _prefix_lines(stream: IO[str], name: str, out: IO[str]) -> None:
    for line in stream:
        with contextlib.suppress(OSError, ValueError):
            out.write(f"{name} | {line}")
            out.flush()


def _collect(stream: IO[str], into: list[str]) -> None:
    """Keep a bake's stdout; with --json, its events are passed on as they come."""
    for line in stream:
        into.append(line)
        if events.enabled() and line.startswith("{"):
            events.relay(line)


def bake_many(paths: list[str], options: BuildOptions, jobs: int, *, report: child.Report | None = None,
              out: IO[str] = sys.stderr) -> tuple[int, list[Job]]:
    """Bake the recipes at `paths`, `jobs` at a time, each with `options` and reporting as
    `report` says (default: no events, no -v or -q); returns the exit status (OK when all
    succeeded, SOME_FAILED otherwise) and each recipe's job."""
    report = report or child.Report()
    if jobs < 1:
        raise BakeError(f"-j {jobs}: the number of bakes at a time must be at least 1")
    todo: list[Job] = []
    done: list[Job] = []
    for path in paths:
        try:
            name = load_recipe(path).name
        except BakeError as e:
            # every recipe is checked first; one that does not validate is reported and the
            # others are baked all the same
            job = Job(path, Path(path).stem, status=exitcodes.RECIPE_INVALID, result="invalid recipe", error=str(e))
            print(f"bake: error: {e}", file=out, flush=True)
            events.set_build(None, None)
            events.emit("error", message=str(e), exit_status=exitcodes.RECIPE_INVALID)
            done.append(job)
            continue
        todo.append(Job(path, name))
    running: list[Job] = []
    env = dict(os.environ, **lifetime.child_env())   # a killed parent's watchdog ends these too
    try:
        while todo or running:
            while todo and len(running) < jobs:
                job = todo.pop(0)
                _start(job, options, report, env, out)
                running.append(job)
            for job in list(running):
                if job.proc is not None and job.proc.poll() is not None:
                    _finish(job, options.output)
                    running.remove(job)
                    done.append(job)
            if running:
                time.sleep(0.2)
    except BaseException:
        with interrupts.deferred():
            _stop_all(running, options.output)
            done.extend(running)
        raise
    order = {p: i for i, p in enumerate(paths)}
    done.sort(key=lambda j: order.get(j.path, 0))
    status = exitcodes.OK if all(j.status == exitcodes.OK for j in done) else exitcodes.SOME_FAILED
    return status, done


def _start(job: Job, options: BuildOptions, report: child.Report, env: dict, out: IO[str]) -> None:
    job.started = time.monotonic()
    job.proc = child.start(job.path, options, report, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           errors="replace", env=env, start_new_session=True)
    lifetime.session().add("pgid", job.proc.pid)
    job.result = "running"
    job.pump = threading.Thread(target=_prefix_lines, args=(job.proc.stderr, job.name, out), daemon=True)
    job.pump.start()
    threading.Thread(target=_collect, args=(job.proc.stdout, job.stdout), daemon=True).start()


def _finish(job: Job, output: str) -> None:
    assert job.proc is not None
    job.status = job.proc.returncode
    job.seconds = time.monotonic() - job.started
    lifetime.session().remove("pgid", job.proc.pid)
    if job.pump is not None:
        job.pump.join(5)
    job.build_dir = _build_dir_of(job, output)
    record = _record(job.build_dir)
    if job.status < 0:
        job.result = f"killed by {signal.Signals(-job.status).name}"
    elif job.status in RESULTS:
        job.result = RESULTS[job.status]
    elif record and record.get("failed_stage"):
        job.result = f"failed at {record['failed_stage']}"
    else:
        job.result = "failed"
    if record and record.get("error") and job.status != exitcodes.OK:
        job.error = record["error"]


def _build_dir_of(job: Job, output: str) -> str | None:
    """The build folder the job's bake made: the one whose record names its pid."""
    assert job.proc is not None
    for rec in sorted(Path(output).glob(f"{job.name}/*/build.json"), reverse=True):
        data = _record(str(rec.parent))
        if data and data.get("pid") == job.proc.pid:
            return str(rec.parent.resolve())
    return None


def _record(build_dir: str | None) -> dict | None:
    if not build_dir:
        return None
    try:
        return json.loads((Path(build_dir) / "build.json").read_text())
    except (OSError, ValueError):
        return None


def _stop_all(running: list[Job], output: str) -> None:
    """Pass the interrupt on to every running bake and wait while each undoes what it
    started (each has the same bound as this process; the bound is extended so that
    they are not cut short)."""
    live = [j.proc for j in running if j.proc is not None and j.proc.poll() is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    interrupts.extend(interrupts.BOUND + 10)
    for job in running:
        if job.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.proc.wait(interrupts.BOUND + 5)
            if job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()
            _finish(job, output)

