"""What `bake nightly RECIPES_OR_DIR [--keep N] [-j N]` does, the command line aside.

Bakes every recipe given (files, or every `*.yml`/`*.yaml` of a folder), N at a time,
each publishing and verifying as its recipe says; then `bake gc --keep N` so the box and
the cloud hold N builds per recipe (and every released one); then writes a JSON summary
(`OUTPUT/nightly/<UTC time>.json`, and `OUTPUT/nightly/latest.json`).

The exit status tells a scheduler what happened (see `exitcodes`): 0 every recipe
passed and gc ran; 7 some recipe (or gc) failed, the summary says which; 8 bake itself
could not run (no recipes, an output folder it cannot write), nothing was baked.
The farm's nightly (`builder.cli.nightly`) writes its summary with the same helpers.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

from builder.core import exitcodes, lifetime
from builder.core.errors import BakeError
from builder.operations.many import Job, bake_many
from builder.pipeline.options import BuildOptions

RECIPE_SUFFIXES = (".yml", ".yaml")


def recipes_of(items: list[str]) -> list[str]:
    """The recipe files named by `items`: files as given, folders as their recipe files in
    name order. A BakeError names every item that is neither."""
    found: list[str] = []
    bad: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.extend(str(f) for f in sorted(p.iterdir()) if f.suffix in RECIPE_SUFFIXES and f.is_file())
        elif p.is_file():
            found.append(str(p))
        else:
            bad.append(item)
    if bad:
        raise BakeError(f"no such recipe file or folder: {', '.join(bad)}")
    if not found:
        raise BakeError(f"no recipes (*.yml, *.yaml) in {', '.join(items)}")
    return found


def summary_dir(output: str) -> Path:
    """`OUTPUT/nightly`, made if need be; a BakeError when it cannot be made or written."""
    d = Path(output) / "nightly"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BakeError(f"cannot make {d} for the nightly summary ({e.strerror})") from None
    if not os.access(d, os.W_OK):
        raise BakeError(f"{d}: not writable; the nightly summary goes there")
    return d


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old content or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with lifetime.tracked("path", tmp, what="nightly summary being written"):
        tmp.write_text(text)
        os.replace(tmp, path)


def write_summary(summaries: Path, started: _dt.datetime, summary: dict, suffix: str = "") -> Path:
    """Write `summary` as `<UTC time><suffix>.json` and as `latest.json` in `summaries`;
    returns the first's path."""
    text = json.dumps(summary, indent=2, default=str) + "\n"
    path = summaries / (started.strftime("%Y%m%d-%H%M%S") + suffix + ".json")
    write_atomically(path, text)
    write_atomically(summaries / "latest.json", text)
    return path


def bake_recipes(paths: list[str], options: BuildOptions, *, jobs: int) -> tuple[int, list[Job]]:
    """Bake the recipes at `paths` with `options`, `jobs` at a time (see `many.bake_many`)."""
    return bake_many(paths, options, jobs)


def run_gc(output: str, keep: int, cloud: bool, eucarc: str | None) -> dict:
    """Run `bake gc --keep N` in a process of its own, its lines shown on stderr prefixed
    `gc | `; returns its exit status and the tails of its output and errors."""
    argv = [sys.executable, "-m", "builder", "gc", "--keep", str(keep), "--output", output]
    if cloud:
        argv.append("--cloud")
        if eucarc:
            argv += ["--eucarc", eucarc]
    env = dict(os.environ, **lifetime.child_env())
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False)
    sys.stderr.write("".join(f"gc | {line}\n" for line in (p.stderr + p.stdout).splitlines()))
    return {"exit_status": p.returncode, "output": p.stdout.strip()[-4000:], "error": p.stderr.strip()[-2000:] or None}


def summarize(started: _dt.datetime, status: int, jobs: list[Job], *, parallel: int, keep: int | None,
              gc: dict | None) -> dict:
    """The nightly summary of a run on this box."""
    finished = _dt.datetime.now(_dt.timezone.utc)
    return {
        "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
        "exit_status": status, "jobs": parallel, "keep": keep,
        "recipes": [j.as_dict() for j in jobs],
        "passed": sum(j.status == exitcodes.OK for j in jobs), "failed": sum(j.status != exitcodes.OK for j in jobs),
        "gc": gc,
    }
