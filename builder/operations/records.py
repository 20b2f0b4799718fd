"""Build records: `bake ls [RECIPE]` lists the builds under an output root with their
state, and `bake show BUILD` shows one build's record.

A build is any directory with a build.json two levels under the output root
(`OUTPUT/<recipe>/<build-id>/`). Everything here only reads: a record is never changed,
and a damaged one is reported (a warning for `ls`, an error for `show`), never repaired.

The state of a build is computed from its record and its lock, in this order:
released (a `released` section), building (result "running" and a command holds the
build's lock), killed (result "running" or none, and nobody holds the lock: the bake
died), failed (with the stage it failed at), verified (the verification passed),
published (the cloud section has an EMI), baked.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.cli.options import add_output
from builder.core import locks
from builder.core.record import RECORD, Build
from builder.core.errors import BakeError

STAGES = ("bootstrap", "customize", "image", "bundle", "publish", "verify")
RELEASED, BUILDING, KILLED, FAILED = "released", "building", "killed", "failed"
VERIFIED, PUBLISHED, BAKED = "verified", "published", "baked"
SIZE_ROLES = ("image", "kernel", "ramdisk")


@dataclass
class BuildSummary:
    """One line of `bake ls`: what a build is and what became of it."""

    recipe: str
    build_id: str
    dir: Path
    state: str
    failed_stage: str | None
    created: str | None
    sizes: dict[str, int | None]        # image, kernel, ramdisk, bundle (bytes)
    cloud: dict[str, str | None]        # emi, eki, eri
    verify: dict[str, str | None]       # result, mode
    released: Any

    @property
    def state_label(self) -> str:
        """The state as a person reads it: "failed at bundle" rather than "failed"."""
        return f"{FAILED} at {self.failed_stage}" if self.state == FAILED and self.failed_stage else self.state

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of `bake ls --json` (keys are stable; sizes in bytes)."""
        return {"recipe": self.recipe, "build_id": self.build_id, "dir": str(self.dir), "state": self.state,
                "failed_stage": self.failed_stage, "created": self.created, "sizes": dict(self.sizes),
                "cloud": dict(self.cloud), "verify": dict(self.verify), "released": self.released}


# --- reading a record ------------------------------------------------------------------
# A record passed Build.load's shape check, but a field inside a section may still be of
# an unexpected type (a hand-edited or foreign build.json): these read it as absent.

def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _bytes(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def failed_stage(data: dict[str, Any]) -> str | None:
    """The stage a failed build failed at: the recorded `failed_stage`, else "verify" when
    the verification failed, else the first stage whose record holds an error, else the
    first stage with no record at all; None when none of these tells."""
    recorded = _text(data.get("failed_stage"))
    if recorded:
        return recorded
    if _obj(data.get("verify")).get("result") == "failed":
        return "verify"
    stages = _obj(data.get("stages"))
    for name in STAGES:
        if _obj(stages.get(name)).get("error"):
            return name
    run = data.get("stages_run")
    seen = set(stages) | (set(x for x in run if isinstance(x, str)) if isinstance(run, list) else set())
    return next((name for name in STAGES if name not in seen), None)


def is_building(build: Build) -> bool:
    """Whether a command (a bake, a verification, a publication) holds the build now."""
    try:
        return locks.is_held(build.lock_path)
    except OSError:
        return True     # cannot tell: a live bake must not be called dead


def state_of(build: Build) -> tuple[str, str | None]:
    """The build's state and, for a failed build, the stage it failed at (see the
    module's doc for the order in which states are decided)."""
    data = build.data
    if data.get("released"):
        return RELEASED, None
    result = data.get("result")
    if result is None or result == "running":
        return (BUILDING if is_building(build) else KILLED), None
    if result == "failed":
        return FAILED, failed_stage(data)
    if _obj(data.get("verify")).get("result") == "passed":
        return VERIFIED, None
    if _text(_obj(data.get("cloud")).get("image_id")):
        return PUBLISHED, None
    return BAKED, None


def bundle_bytes(data: dict[str, Any]) -> int | None:
    """The bytes of all the build's bundles (every role's parts), when recorded."""
    total, found = 0, False
    for entry in _obj(data.get("bundle")).values():
        entry = _obj(entry)
        size = _bytes(entry.get("bundled_size"))
        if size is None and isinstance(entry.get("parts"), list):
            parts = [_bytes(_obj(p).get("size")) for p in entry["parts"]]
            size = sum(parts) if parts and None not in parts else None   # type: ignore[arg-type]
        if size is not None:
            total, found = total + size, True
    return total if found else None


def summarize(build: Build) -> BuildSummary:
    """What `bake ls` says of one build."""
    data = build.data
    state, stage = state_of(build)
    outputs = _obj(data.get("outputs"))
    sizes: dict[str, int | None] = {role: _bytes(_obj(outputs.get(role)).get("size")) for role in SIZE_ROLES}
    sizes["bundle"] = bundle_bytes(data)
    cloud = _obj(data.get("cloud"))
    images = _obj(cloud.get("images"))
    ids = {key: _text(cloud.get(field)) or _text(_obj(images.get(role)).get("id"))
           for key, field, role in (("emi", "image_id", "image"), ("eki", "kernel_id", "kernel"),
                                    ("eri", "ramdisk_id", "ramdisk"))}
    verify = _obj(data.get("verify"))
    return BuildSummary(
        recipe=build.dir.parent.name, build_id=build.dir.name, dir=build.dir, state=state, failed_stage=stage,
        created=_text(data.get("created")), sizes=sizes, cloud=ids,
        verify={"result": _text(verify.get("result")), "mode": _text(verify.get("mode"))},
        released=data.get("released") or None)


def load_build(directory: str | os.PathLike) -> Build:
    """Build.load, with a file the system will not let us read said as a BakeError too."""
    try:
        return Build.load(directory)
    except OSError as e:
        raise BakeError(f"{Path(directory) / RECORD}: cannot read: {e.strerror or e}") from None


# --- finding builds --------------------------------------------------------------------

def _subdirs(path: Path, warnings: list[str]) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError as e:
        warnings.append(f"{path}: cannot list: {e.strerror or e}; skipped")
        return []


def _order(s: BuildSummary) -> tuple:
    # ids are UTC times to the second, and ".2", ".3"... for builds started in the same
    # second, which sort as numbers (".10" after ".9")
    base, dot, n = s.build_id.rpartition(".")
    key = (base, int(n)) if dot and n.isdigit() else (s.build_id, 1)
    return (s.recipe, s.created or "", key)


def find_builds(output_root: str | os.PathLike, recipe: str | None = None) -> tuple[list[BuildSummary], list[str]]:
    """The builds under `output_root` (of `recipe` only, when given), by recipe and oldest
    first, and a one-line warning for each build.json that could not be read."""
    root = Path(output_root)
    warnings: list[str] = []
    if not root.is_dir():
        return [], warnings
    recipe_dirs = [root / recipe] if recipe else _subdirs(root, warnings)
    found: list[BuildSummary] = []
    for rdir in recipe_dirs:
        if not rdir.is_dir():
            continue
        for bdir in _subdirs(rdir, warnings):
            if not (bdir / RECORD).exists():
                continue
            try:
                found.append(summarize(load_build(bdir)))
            except BakeError as e:
                warnings.append(" ".join(str(e).split()) + "; skipped")
    return sorted(found, key=_order), warnings


def resolve_build(spec: str, output_root: str | os.PathLike) -> Build:
    """The build `spec` names: a build directory (or its build.json), `RECIPE/BUILD_ID`
    under `output_root`, or a build id found under exactly one recipe there. A BakeError
    says what `spec` is not."""
    root = Path(output_root)
    path = Path(spec)
    if path.name == RECORD and path.is_file():
        return load_build(path.parent)
    if path.exists():
        return load_build(path)     # a directory that is no build is said so by Build.load
    parts = [p for p in spec.split("/") if p]
    if len(parts) == 2 and (root / parts[0] / parts[1]).exists():
        return load_build(root / parts[0] / parts[1])
    if len(parts) == 1:
        recipes = _subdirs(root, []) if root.is_dir() else []
        matches = [d / spec for d in recipes if (d / spec).is_dir()]
        if len(matches) == 1:
            return load_build(matches[0])
        if len(matches) > 1:
            names = ", ".join(f"{m.parent.name}/{m.name}" for m in matches)
            raise BakeError(f"build id {spec} is in more than one recipe under {root}: {names}; name one as RECIPE/BUILD_ID")
    raise BakeError(f"no build {spec}: not a build directory, nor RECIPE/BUILD_ID or a build id under {root} "
                    f"(`bake ls --output {root}` lists them)")


def show_record(build: Build) -> dict[str, Any]:
    """The record of `bake show --json`: build.json as it is, with the computed state,
    the stage a failed build failed at, and the build's directory."""
    state, stage = state_of(build)
    return {**build.data, "state": state, "failed_stage": stage, "dir": str(build.dir)}


# --- rendering ---------------------------------------------------------------------------

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
        cells = [c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
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
        report = json.loads((build.dir / (_text(section.get("report")) or "verify.json")).read_text())
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
    recipe = _obj(data.get("recipe"))
    if recipe:
        out.append(f"  recipe    {recipe.get('name', s.recipe)}" + (f" ({recipe['path']})" if recipe.get("path") else ""))
    if data.get("release"):
        out.append(f"  release   {data['release']}" + (f", {data['arch']}" if data.get("arch") else ""))
    if isinstance(data.get("seconds"), (int, float)):
        out.append(f"  took      {data['seconds']:.1f} s")
    if data.get("error"):
        out.append(f"  error     {' '.join(str(data['error']).split())}")
    if s.released:
        rel = s.released
        out.append("  released  " + (", ".join(f"{k}: {v}" for k, v in rel.items()) if isinstance(rel, dict) else str(rel)))

    stages = _obj(data.get("stages"))
    failed_unrecorded = s.state == FAILED and s.failed_stage is not None and s.failed_stage not in stages
    if stages or failed_unrecorded:
        out += ["", "stages"]
        for name in [*(n for n in STAGES if n in stages), *(n for n in stages if n not in STAGES)]:
            out.append(_stage_line(name, _obj(stages[name]), s.state == FAILED and name == s.failed_stage))
        if failed_unrecorded:
            out.append(_stage_line(str(s.failed_stage), {}, True))
    outputs = _obj(data.get("outputs"))
    if outputs:
        out += ["", "outputs"]
        for role, entry in outputs.items():
            entry = _obj(entry)
            size = _bytes(entry.get("size"))
            out.append(f"  {role:<10} {entry.get('path')}  {mib(size)}"
                       + (f" ({size} bytes)" if size is not None else "")
                       + (f"  sha256 {entry['sha256']}" if entry.get("sha256") else ""))
    bundle = _obj(data.get("bundle"))
    if bundle:
        local = _obj(stages.get("bundle")).get("local")
        out += ["", "bundle" + (" (local: made with the build's own key pair)" if local else "")
                + f", {mib(s.sizes['bundle'])} in all"]
        for role, entry in bundle.items():
            entry = _obj(entry)
            parts = entry.get("parts") if isinstance(entry.get("parts"), list) else []
            out.append(f"  {role:<10} {entry.get('manifest')}  {len(parts)} part(s), "
                       f"{mib(_bytes(entry.get('bundled_size')))}")
    cloud = _obj(data.get("cloud"))
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
    verify = _obj(data.get("verify"))
    if verify:
        counts = _obj(verify.get("counts"))
        line = f"verification: {_verify_label(s.verify)}"
        if counts:
            line += f", {counts.get('pass', 0)} passed, {counts.get('fail', 0)} failed, {counts.get('skip', 0)} skipped"
        if isinstance(verify.get("seconds"), (int, float)):
            line += f" in {verify['seconds']:.0f} s"
        out += ["", line]
        summaries = _verify_summaries(build, verify)
        checks = _obj(verify.get("checks"))
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
        from builder.cli.farm import cmd_ls_farm
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
    from builder.cli.farm import add_farm_switch
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
