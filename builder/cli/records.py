"""`bake ls [RECIPE]` and `bake show BUILD`: the builds under an output root as a table,
one build's record in sections a person reads, or either as JSON. The records are read
by builder/operations/records.py; this module only renders them.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from typing import Any

from builder.cli.farm import add_farm_switch, cmd_ls_farm
from builder.cli.options import add_output
from builder.core import locks
from builder.core.record import Build
from builder.operations.records import (
    BUILDING,
    FAILED,
    KILLED,
    RELEASED,
    STAGES,
    BuildSummary,
    as_bytes,
    as_section,
    as_text,
    find_builds,
    resolve_build,
    show_record,
    state_of,
    summarize,
)


def mib(n: int | None) -> str:
    """Bytes in MiB for a table ("-" for unknown)."""
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def when(stamp: str | None) -> str:
    """An ISO time stamp as "YYYY-MM-DD HH:MM:SS" in UTC ("-" for none)."""
    if not stamp:
        return "-"
    try:
        t = _dt.datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _verify_label(v: dict[str, str | None]) -> str:
    if not v.get("result"):
        return "-"
    return f"{v['result']} ({v['mode']})" if v.get("mode") else str(v["result"])


def render_table(builds: list[BuildSummary]) -> str:
    """The `bake ls` table: one line per build, a header above."""
    head = ("RECIPE", "BUILD", "STATE", "CREATED", "IMAGE", "EMI", "VERIFY")
    rows = [(b.recipe, b.build_id, b.state_label, when(b.created), mib(b.sizes["image"]), b.cloud["emi"] or "-",
             _verify_label(b.verify)) for b in builds]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for r in [head, *rows]:
        cells = [c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _state_sentence(build: Build) -> str:
    state, stage = state_of(build)
    if state == BUILDING:
        return f"building: held by {locks.holder_of(build.lock_path)}"
    if state == KILLED:
        return ("killed: build.json says it is running but no bake holds it, so the bake died before it "
                "finished (`bake doctor` undoes what it left)")
    if state == FAILED:
        return f"failed at {stage}" if stage else "failed"
    if state == RELEASED:
        return "released"
    return state


def _stage_line(name: str, rec: dict[str, Any], failed_here: bool) -> str:
    bits = []
    if isinstance(rec.get("seconds"), (int, float)):
        bits.append(f"{rec['seconds']:.1f} s")
    if rec.get("cached") is not None:
        bits.append("cached" if rec["cached"] else "not cached")
    if rec.get("cached_packages") is not None:
        bits.append("packages cached" if rec["cached_packages"] else "packages installed")
    if rec.get("local"):
        bits.append("local")
    for key in ("result", "skipped", "error", "note"):
        if rec.get(key):
            bits.append(f"{key}: {' '.join(str(rec[key]).split())}" if key != "result" else str(rec[key]))
    if failed_here:
        bits.append("failed here")
    return f"  {name:<10} {', '.join(bits) or 'done'}"


def _verify_summaries(build: Build, section: dict[str, Any]) -> dict[str, str]:
    # verify.json holds each check's one-line summary; it is evidence beside the record,
    # so a missing or damaged one only leaves the summaries out
    try:
        report = json.loads((build.dir / (as_text(section.get("report")) or "verify.json")).read_text())
        return {c["name"]: " ".join(str(c.get("summary") or "").split()) for c in report.get("checks", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def render_build(build: Build) -> str:
    """`bake show`: one build's record, in sections a person reads."""
    data = build.data
    s = summarize(build)
    out = [f"{s.recipe}/{s.build_id}: {_state_sentence(build)}",
           f"  dir       {build.dir}",
           f"  created   {when(s.created)}"]
    recipe = as_section(data.get("recipe"))
    if recipe:
        out.append(f"  recipe    {recipe.get('name', s.recipe)}"
                   + (f" ({recipe['path']})" if recipe.get("path") else ""))
    if data.get("release"):
        out.append(f"  release   {data['release']}" + (f", {data['arch']}" if data.get("arch") else ""))
    if isinstance(data.get("seconds"), (int, float)):
        out.append(f"  took      {data['seconds']:.1f} s")
    if data.get("error"):
        out.append(f"  error     {' '.join(str(data['error']).split())}")
    if s.released:
        rel = s.released
        out.append("  released  "
                   + (", ".join(f"{k}: {v}" for k, v in rel.items()) if isinstance(rel, dict) else str(rel)))

    stages = as_section(data.get("stages"))
    failed_unrecorded = s.state == FAILED and s.failed_stage is not None and s.failed_stage not in stages
    if stages or failed_unrecorded:
        out += ["", "stages"]
        for name in [*(n for n in STAGES if n in stages), *(n for n in stages if n not in STAGES)]:
            out.append(_stage_line(name, as_section(stages[name]), s.state == FAILED and name == s.failed_stage))
        if failed_unrecorded:
            out.append(_stage_line(str(s.failed_stage), {}, True))
    outputs = as_section(data.get("outputs"))
    if outputs:
        out += ["", "outputs"]
        for role, entry in outputs.items():
            entry = as_section(entry)
            size = as_bytes(entry.get("size"))
            out.append(f"  {role:<10} {entry.get('path')}  {mib(size)}"
                       + (f" ({size} bytes)" if size is not None else "")
                       + (f"  sha256 {entry['sha256']}" if entry.get("sha256") else ""))
    bundle = as_section(data.get("bundle"))
    if bundle:
        local = as_section(stages.get("bundle")).get("local")
        out += ["", "bundle" + (" (local: made with the build's own key pair)" if local else "")
                + f", {mib(s.sizes['bundle'])} in all"]
        for role, entry in bundle.items():
            entry = as_section(entry)
            parts: list = entry["parts"] if isinstance(entry.get("parts"), list) else []
            out.append(f"  {role:<10} {entry.get('manifest')}  {len(parts)} part(s), "
                       f"{mib(as_bytes(entry.get('bundled_size')))}")
    cloud = as_section(data.get("cloud"))
    if cloud:
        out += ["", "cloud"]
        for key in ("emi", "eki", "eri"):
            if s.cloud[key]:
                out.append(f"  {key:<10} {s.cloud[key]}")
        if cloud.get("bucket"):
            out.append(f"  {'bucket':<10} {cloud['bucket']}" + (f"/{cloud['prefix']}" if cloud.get("prefix") else ""))
        for key in ("ec2_url", "published"):
            if cloud.get(key):
                out.append(f"  {key:<10} {cloud[key]}")
    verify = as_section(data.get("verify"))
    if verify:
        counts = as_section(verify.get("counts"))
        line = f"verification: {_verify_label(s.verify)}"
        if counts:
            line += f", {counts.get('pass', 0)} passed, {counts.get('fail', 0)} failed, {counts.get('skip', 0)} skipped"
        if isinstance(verify.get("seconds"), (int, float)):
            line += f" in {verify['seconds']:.0f} s"
        out += ["", line]
        summaries = _verify_summaries(build, verify)
        checks = as_section(verify.get("checks"))
        width = max([10, *(len(n) for n in checks)])
        for name, status in checks.items():
            summary = summaries.get(name, "")
            out.append(f"  {name:<{width}} {str(status).upper():<4}" + (f"  {summary}" if summary else ""))
    notes = data.get("notes")
    if notes:
        out += ["", "notes"]
        out += [f"  - {' '.join(str(n).split())}" for n in (notes if isinstance(notes, list) else [notes])]
    return "\n".join(out)


# --- the commands ----------------------------------------------------------------------

def cmd_ls(args) -> int:
    if args.farm:
        return cmd_ls_farm(args)
    builds, warnings = find_builds(args.output, args.recipe)
    for w in warnings:
        print(f"bake: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps([b.as_dict() for b in builds], indent=2))
    elif builds:
        print(render_table(builds))
    else:
        print(f"no builds of {args.recipe} under {args.output}" if args.recipe else f"no builds under {args.output}")
    return 0


def cmd_show(args) -> int:
    build = resolve_build(args.build, args.output)
    if args.json:
        print(json.dumps(show_record(build), indent=2, default=str))
    else:
        print(render_build(build))
    return 0


def register(subparsers) -> None:
    """Add `ls` and `show` to the `bake` command."""
    sp = subparsers.add_parser(
        "ls", help="list builds: recipe, id, state, sizes, cloud ids, verification",
        description="List every build under the output root (OUTPUT/<recipe>/<build-id>/build.json), oldest "
                    "first per recipe, with its state: building, killed (its bake died), failed at STAGE, baked, "
                    "published, verified or released. A build.json that cannot be read is skipped with a warning.")
    sp.add_argument("recipe", nargs="?", metavar="RECIPE", help="only the builds of this recipe (its name)")
    add_output(sp)
    sp.add_argument("--json", action="store_true", help="print a JSON array (sizes in bytes) instead of a table")
    add_farm_switch(sp, "list the build farm's builds from its store (building, killed, failed, ok, published, "
                        "verified, released) instead of this box's")
    sp.add_argument("--eucarc", help="--farm: the cloud of the store (default: the environment)")
    sp.set_defaults(func=cmd_ls)
    sp = subparsers.add_parser(
        "show", help="show one build's record: state, stages, outputs, bundle, cloud ids, verification",
        description="Show one build's record. BUILD is a build directory, RECIPE/BUILD_ID under the output root, "
                    "or a build id that only one recipe has.")
    sp.add_argument("build", metavar="BUILD", help="a build directory, RECIPE/BUILD_ID, or a build id")
    add_output(sp)
    sp.add_argument("--json", action="store_true", help="print build.json with the computed state as JSON")
    sp.set_defaults(func=cmd_show)
