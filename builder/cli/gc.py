"""`bake gc --keep N [--cloud] [--dry-run] [--farm]`: the command line of retention, and
what it prints. The survey, the plan and the removal are builder/operations/gc.py's;
`--farm` is builder/cli/farm.py's.
"""

from __future__ import annotations

import argparse
import json
import sys

from builder.cli.farm import add_farm_switch, cmd_gc_farm
from builder.cli.options import add_output
from builder.cli.records import mib
from builder.cloud.credentials import load_credentials
from builder.core import stale
from builder.core.errors import BakeError
from builder.operations.gc import GcPlan, execute, parse_age, plan_gc, survey_cloud, survey_local


def render(plan: GcPlan) -> str:
    """What `bake gc` prints: every build and cache entry, whether it goes (or went), and
    why; then a summary line."""
    lines = []
    width = max([0, *(len(f"{v.recipe}/{v.build_id}") for v in plan.builds)])
    for v in plan.builds:
        name = f"{v.recipe}/{v.build_id}".ljust(width)
        if not v.goes:
            lines.append(f"{name}  kept: {'; '.join(v.reasons)}")
            continue
        what = []
        if v.dir:
            what.append(f"folder {v.dir}, {mib(v.bytes)}")
        if v.deregister:
            what.append("deregister " + ", ".join(v.deregister))
        if v.keep_images:
            what.append(", ".join(v.keep_images) + " stay (an image or instance still uses them)")
        for bucket, keys in v.delete.items():
            what.append(f"{len(keys)} object(s) in {bucket}")
        what += v.notes
        verb = "would go" if plan.dry_run else (v.outcome or "?")
        lines.append(f"{name}  {verb}: {'; '.join(v.reasons)}" + (f" ({'; '.join(what)})" if what else ""))
    for c in plan.cache:
        label = f"cache {c.namespace}/{c.key}"
        if c.goes:
            verb = "would go" if plan.dry_run else (c.outcome or "?")
            lines.append(f"{label}  {verb}: {c.reason} ({mib(c.bytes)})")
        else:
            lines.append(f"{label}  kept: {c.reason}")
    builds = [v for v in plan.builds if v.goes and (plan.dry_run or v.outcome == "removed")]
    entries = [c for c in plan.cache if c.goes and (plan.dry_run or c.outcome == "removed")]
    freed = sum(v.bytes for v in builds if v.dir) + sum(c.bytes for c in entries)
    images = sum(len(v.deregister) for v in builds)
    objects = sum(len(k) for v in builds for k in v.delete.values())
    head = "would remove" if plan.dry_run else "removed"
    entry_words = "cache entry" if len(entries) == 1 else "cache entries"
    lines.append(f"{head} {len(builds)} build(s) and {len(entries)} {entry_words} ({mib(freed)} here)"
                 + (f", {images} image(s) and {objects} object(s) on the cloud" if plan.cloud else ""))
    skipped = [v for v in plan.builds if v.goes and v.outcome and v.outcome != "removed"] + \
        [c for c in plan.cache if c.goes and c.outcome and c.outcome != "removed"]
    if skipped:
        lines.append(f"{len(skipped)} skipped because something held them when their turn came (see above)")
    return "\n".join(lines)


def _keep_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of builds, at least 1, found {text!r}")
    return int(text)


def _age_arg(text: str) -> str:
    try:
        parse_age(text)
    except BakeError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--older-than ")) from None
    return text


def cmd_gc(args) -> int:
    if args.farm:
        return cmd_gc_farm(args)
    older = parse_age(args.older_than) if args.older_than else None
    clients = creds = None
    if args.cloud:
        # the cloud's clients import boto3: only a gc that goes to the cloud loads it
        from builder.cloud.clients import make_clients  # noqa: PLC0415
        from builder.cloud.images import check_credentials  # noqa: PLC0415

        creds = load_credentials(None, eucarc=args.eucarc)
        if creds is None:
            raise BakeError("--cloud: no cloud configured: source an eucarc (or pass --eucarc), or set EC2_URL, "
                            "S3_URL, EC2_ACCESS_KEY and EC2_SECRET_KEY")
        clients = make_clients(creds)
        check_credentials(clients, creds)
    if not args.dry_run:
        # a killed bake's mounts and work trees are undone first, as before every command
        # that changes builds, so that its folder can go
        stale.report_stale(stale.clean_stale())
    survey = survey_local(args.output, args.recipes or None)
    if clients is not None:
        survey_cloud(survey, clients, creds)
    plan = plan_gc(survey, args.keep, older, older_than_text=args.older_than)
    for w in plan.warnings:
        print(f"bake: warning: {w}", file=sys.stderr)
    if not args.dry_run:
        execute(plan, survey, clients, creds)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2, default=str))
    else:
        print(render(plan))
    outcomes = [v.outcome for v in plan.builds] + [c.outcome for c in plan.cache]
    failed = any((o or "").startswith("failed") for o in outcomes)
    return 1 if failed else 0


def register(subparsers) -> None:
    """Add `gc` to the `bake` command."""
    sp = subparsers.add_parser(
        "gc", help="remove builds beyond the N newest per recipe, cache entries no kept build uses and, with "
                   "--cloud, their images and bundles",
        description="Keep the N newest builds of each recipe and remove the others: their folders, the stage "
                    "cache entries no kept build uses and, with --cloud, their images (EMI, then EKI/ERI no other "
                    "image uses) and bundles, found from the cloud's own listing. Never removed: a released "
                    "build, one whose lock is held or whose recipe is being baked, one whose EMI an instance "
                    "runs (pending, running, stopping or stopped), a public image, one younger than "
                    "--older-than. Failed builds do not count towards N. Prints every build with what happens "
                    "to it and why.")
    sp.add_argument("recipes", nargs="*", metavar="RECIPE", help="only these recipes (default: every recipe)")
    sp.add_argument("--keep", type=_keep_count, required=True, metavar="N",
                    help="builds to keep per recipe (at least 1)")
    sp.add_argument("--older-than", type=_age_arg, metavar="AGE",
                    help="only builds (and cache entries) older than AGE can go: e.g. 7d, 12h, 30m, 2w")
    sp.add_argument("--cloud", action="store_true",
                    help="also deregister the images and delete the bundles of the builds that go, found from the "
                         "cloud's listing (the cloud from the environment or --eucarc, as for publish)")
    sp.add_argument("--eucarc", help="read endpoints and credentials from this eucarc (default: the environment)")
    sp.add_argument("--dry-run", action="store_true", help="change nothing; say what would go and why the rest stays")
    add_output(sp)
    sp.add_argument("--json", action="store_true", help="print the plan (and outcomes) as JSON")
    add_farm_switch(sp, "gc the build farm's store instead of this box: keep the N newest good builds per recipe "
                        "(and released ones, and those whose lease is held); delete the others' records, logs "
                        "and artifacts")
    sp.set_defaults(func=cmd_gc)
