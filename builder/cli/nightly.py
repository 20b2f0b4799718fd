"""`bake nightly RECIPES_OR_DIR [--keep N] [-j N] [--farm]`: what a nightly job runs.

The work is `builder.operations.nightly`'s (on this box) or the farm's (`--farm`); this
module parses the command line and says what happened.
"""

from __future__ import annotations

import datetime as _dt
import sys

from builder.cli.farm import add_farm_switch, add_job_options, job_options, submit_all, wait_for_jobs
from builder.cli.many import render_summary
from builder.cli.options import add_output
from builder.core import exitcodes
from builder.core.errors import BakeError
from builder.farm.connect import Farm, shown
from builder.farm.gc import gc_farm
from builder.operations import nightly
from builder.pipeline.options import BuildOptions


def cmd_nightly(args) -> int:
    if args.farm:
        return cmd_nightly_farm(args)
    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        paths = nightly.recipes_of(args.recipes)
        summaries = nightly.summary_dir(args.output)
    except BakeError as e:
        print(f"bake: error: {e}", file=sys.stderr)
        return exitcodes.COULD_NOT_RUN
    options = BuildOptions(output=args.output, cloud=args.cloud_verify, wait=not args.no_wait)
    status, jobs = nightly.bake_recipes(paths, options, jobs=args.jobs)
    print(render_summary(jobs), file=sys.stderr, flush=True)
    gc = None
    if args.keep:
        gc = nightly.run_gc(args.output, args.keep, args.gc_cloud, args.eucarc)
        if gc["exit_status"] != 0 and status == exitcodes.OK:
            status = exitcodes.SOME_FAILED
    summary = nightly.summarize(started, status, jobs, parallel=args.jobs, keep=args.keep, gc=gc)
    print(nightly.write_summary(summaries, started, summary))
    return status


def cmd_nightly_farm(args) -> int:
    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        paths = nightly.recipes_of(args.recipes)
        summaries = nightly.summary_dir(args.output)
        farm = Farm.from_args(args)
    except BakeError as e:
        print(f"bake: error: {e}", file=sys.stderr)
        return exitcodes.COULD_NOT_RUN
    day = started.strftime("%Y%m%d")
    submitted, refused = submit_all(farm, paths, job_options(args), day=day, timeout=args.timeout,
                                    retries=args.retries, backoff=args.backoff)
    if not submitted:
        status = exitcodes.BUSY if refused and all(r.get("duplicate") for r in refused) else exitcodes.SOME_FAILED
        print("bake: nothing submitted: " + ("tonight's jobs of these recipes are already submitted"
                                             if status == exitcodes.BUSY else "no recipe could be submitted"),
              file=sys.stderr)
        return status
    wait_for_jobs(farm, submitted)
    gc = None
    if args.keep:
        gc = gc_farm(farm, args.keep, dry_run=False)
    status = exitcodes.OK if all(s["outcome"] == "ok" for s in submitted) and not refused else exitcodes.SOME_FAILED
    if gc is not None and gc.get("error"):
        status = exitcodes.SOME_FAILED
    finished = _dt.datetime.now(_dt.timezone.utc)
    summary = {"started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
               "farm": {"redis": shown(farm.redis_url), "store": farm.store_url},
               "exit_status": status, "keep": args.keep,
               "recipes": submitted + refused, "refused": len(refused),
               "passed": sum(s["outcome"] == "ok" for s in submitted),
               "failed": sum(s["outcome"] != "ok" for s in submitted), "gc": gc}
    print(nightly.write_summary(summaries, started, summary, suffix="-farm"))
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
    add_farm_switch(sp, "submit the recipes to the build farm (one job each, refused when tonight's job of the "
                        "same content is there already), wait for them, then gc the farm's store (--keep N)")
    add_job_options(sp)
    sp.set_defaults(func=cmd_nightly)
