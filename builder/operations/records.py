"""Build records: the builds under an output root with their state (what `bake ls
[RECIPE]` lists), and one build's record (what `bake show BUILD` shows; the commands and
their rendering are builder/cli/records.py's).

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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core import locks
from builder.core.record import RECORD, Build
from builder.core.errors import BakeError
from builder.pipeline.options import STAGE_NAMES

STAGES = STAGE_NAMES   # the stage table's names, in order
RELEASED, BUILDING, KILLED, FAILED = "released", "building", "killed", "failed"
VERIFIED, PUBLISHED, BAKED = "verified", "published", "baked"
SIZE_ROLES = ("image", "kernel", "ramdisk")
IMAGE_KEYS = (("emi", "image_id", "image"), ("eki", "kernel_id", "kernel"), ("eri", "ramdisk_id", "ramdisk"))


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

def as_section(value: Any) -> dict[str, Any]:
    """`value` if it is a section (a dict), else an empty one."""
    return value if isinstance(value, dict) else {}


def as_text(value: Any) -> str | None:
    """`value` if it is a string that is not empty, else None."""
    return value if isinstance(value, str) and value else None


def as_bytes(value: Any) -> int | None:
    """`value` if it is a count of bytes (a whole number, not negative), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def failed_stage(data: dict[str, Any]) -> str | None:
    """The stage a failed build failed at: the recorded `failed_stage`, else "verify" when
    the verification failed, else the first stage whose record holds an error, else the
    first stage with no record at all; None when none of these tells."""
    recorded = as_text(data.get("failed_stage"))
    if recorded:
        return recorded
    if as_section(data.get("verify")).get("result") == "failed":
        return "verify"
    stages = as_section(data.get("stages"))
    for name in STAGES:
        if as_section(stages.get(name)).get("error"):
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
    if as_section(data.get("verify")).get("result") == "passed":
        return VERIFIED, None
    if as_text(as_section(data.get("cloud")).get("image_id")):
        return PUBLISHED, None
    return BAKED, None


def bundle_bytes(data: dict[str, Any]) -> int | None:
    """The bytes of all the build's bundles (every role's parts), when recorded."""
    total, found = 0, False
    for entry in as_section(data.get("bundle")).values():
        entry = as_section(entry)
        size = as_bytes(entry.get("bundled_size"))
        if size is None and isinstance(entry.get("parts"), list):
            parts = [as_bytes(as_section(p).get("size")) for p in entry["parts"]]
            size = sum(parts) if parts and None not in parts else None   # type: ignore[arg-type]
        if size is not None:
            total, found = total + size, True
    return total if found else None


def image_ids(build: Build) -> dict[str, str | None]:
    """The build's EMI, EKI and ERI as publishing recorded them (None where there is none)."""
    cloud = as_section(build.data.get("cloud"))
    images = as_section(cloud.get("images"))
    return {key: as_text(cloud.get(field)) or as_text(as_section(images.get(role)).get("id"))
            for key, field, role in IMAGE_KEYS}


def summarize(build: Build) -> BuildSummary:
    """What `bake ls` says of one build."""
    data = build.data
    state, stage = state_of(build)
    outputs = as_section(data.get("outputs"))
    sizes: dict[str, int | None] = {role: as_bytes(as_section(outputs.get(role)).get("size")) for role in SIZE_ROLES}
    sizes["bundle"] = bundle_bytes(data)
    ids = image_ids(build)
    verify = as_section(data.get("verify"))
    return BuildSummary(
        recipe=build.dir.parent.name, build_id=build.dir.name, dir=build.dir, state=state, failed_stage=stage,
        created=as_text(data.get("created")), sizes=sizes, cloud=ids,
        verify={"result": as_text(verify.get("result")), "mode": as_text(verify.get("mode"))},
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
            raise BakeError(f"build id {spec} is in more than one recipe under {root}: {names}; "
                            "name one as RECIPE/BUILD_ID")
    raise BakeError(f"no build {spec}: not a build directory, nor RECIPE/BUILD_ID or a build id under {root} "
                    f"(`bake ls --output {root}` lists them)")


def show_record(build: Build) -> dict[str, Any]:
    """The record of `bake show --json`: build.json as it is, with the computed state,
    the stage a failed build failed at, and the build's directory."""
    state, stage = state_of(build)
    return {**build.data, "state": state, "failed_stage": stage, "dir": str(build.dir)}
