"""`bake nightly RECIPES_OR_DIR [--keep N] [-j N]`: what a nightly job runs.

Bakes every recipe given (files, or every `*.yml`/`*.yaml` of a folder), N at a time,
each publishing and verifying as its recipe says; then `bake gc --keep N` so the box and
the cloud hold N builds per recipe (and every released one); then writes a JSON summary
(`OUTPUT/nightly/<UTC time>.json`, and `OUTPUT/nightly/latest.json`).

The exit status tells a scheduler what happened (see `exitcodes`): 0 every recipe
passed and gc ran; 7 some recipe (or gc) failed, the summary says which; 8 bake itself
could not run (no recipes, an output folder it cannot write), nothing was baked.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

from builder.cli.options import add_output
from builder.core import exitcodes, lifetime
from builder.core.errors import BakeError

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


def _summary_dir(output: str) -> Path:
    d = Path(output) / "nightly"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BakeError(f"cannot make {d} for the nightly summary ({e.strerror})") from None
    if not os.access(d, os.W_OK):
        raise BakeError(f"{d}: not writable; the nightly summary goes there")
    return d


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with lifetime.tracked("path", tmp, what="nightly summary being written"):
        tmp.write_text(text)
        os.replace(tmp, path)


def _gc(output: str, keep: int, cloud: bool, eucarc: str | None) -> dict:
    argv = [sys.executable, "-m", "builder", "gc", "--keep", str(keep), "--output", output]
    if cloud:
        argv.append("--cloud")
        if eucarc:
            argv += ["--eucarc", eucarc]
    env = dict(os.environ, **lifetime.child_env())
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    sys.stderr.write("".join(f"gc | {line}\n" for line in (p.stderr + p.stdout).splitlines()))
    return {"exit_status": p.returncode, "output": p.stdout.strip()[-4000:], "error": p.stderr.strip()[-2000:] or None}


def cmd_nightly(args) -> int:
    if args.farm:
        from builder.cli.farm import cmd_nightly_farm
        return cmd_nightly_farm(args)
    from builder.operations.many import bake_many, render_summary

    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        paths = recipes_of(args.recipes)
        summaries = _summary_dir(args.output)
    except BakeError as e:
        print(f"bake: error: {e}", file=sys.stderr)
        return exitcodes.COULD_NOT_RUN
    build_args = (["--cloud"] if args.cloud_verify else []) + (["--no-wait"] if args.no_wait else [])
    status, jobs = bake_many(paths, build_args, args.jobs, output=args.output)
    print(render_summary(jobs), file=sys.stderr, flush=True)
    gc = None
    if args.keep:
        gc = _gc(args.output, args.keep, args.gc_cloud, args.eucarc)
        if gc["exit_status"] != 0 and status == exitcodes.OK:
            status = exitcodes.SOME_FAILED
    finished = _dt.datetime.now(_dt.timezone.utc)
    summary = {
        "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
        "exit_status": status, "jobs": args.jobs, "keep": args.keep,
        "recipes": [j.as_dict() for j in jobs],
        "passed": sum(j.status == exitcodes.OK for j in jobs), "failed": sum(j.status != exitcodes.OK for j in jobs),
        "gc": gc,
    }
    text = json.dumps(summary, indent=2) + "\n"
    path = summaries / (started.strftime("%Y%m%d-%H%M%S") + ".json")
    _write_atomically(path, text)
    _write_atomically(summaries / "latest.json", text)
    print(path)
    return status


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "nightly", help="bake recipes (a folder or files) N at a time, then keep N builds per recipe; a JSON summary",
        description="What a nightly job runs: every recipe baked, published and verified as it says; then "
                    "`bake gc --keep N`; a summary in OUTPUT/nightly/. Exit 0: all passed; 7: some recipe or gc "
                    "failed; 8: nothing could be baked.")
    sp.add_argument("recipes", nargs="+", metavar="RECIPES_OR_DIR")
    add_output(sp)
    sp.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="bake N recipes at a time (default 1)")
    sp.add_argument("--keep", type=int, metavar="N",
                    help="after baking, keep the N newest builds per recipe (and every released one)")
    sp.add_argument("--cloud", dest="gc_cloud", action="store_true",
                    help="gc on the cloud too: deregister and delete images beyond --keep")
    sp.add_argument("--eucarc", help="the cloud's eucarc for gc --cloud (default: the environment)")
    sp.add_argument("--no-wait", action="store_true",
                    help="skip (as busy) a recipe another bake is baking, instead of waiting for it")
    sp.add_argument("--verify-on-cloud", dest="cloud_verify", action="store_true",
                    help="verify on the cloud the builds are published to, instead of locally")
    from builder.cli.farm import add_farm_switch, add_job_options
    add_farm_switch(sp, "submit the recipes to the build farm (one job each, refused when tonight's job of the "
                        "same content is there already), wait for them, then gc the farm's store (--keep N)")
    add_job_options(sp)
    sp.set_defaults(func=cmd_nightly)
