"""A build directory, `output/<recipe>/<build-id>/`, and its record, `build.json`.

Every stage reads and writes files in the build directory and records what it made in
build.json, so that a later stage (`bake bundle`, `bake publish`, `bake verify`) can run
alone on an earlier build.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core import exposure, locks
from builder.core.errors import BakeError
from builder.core.state import state_dir

RECORD = "build.json"


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def new_build_id() -> str:
    """A sortable, unique-enough build id: UTC time to the second."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


@dataclass
class Build:
    """One build directory and the record of what its stages made."""

    dir: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, output_root: Path, recipe_name: str, build_id: str | None = None) -> "Build":
        """Make a fresh build directory under `output_root/recipe_name/`."""
        build_id = build_id or new_build_id()
        base = exposure.private_dir(Path(output_root) / recipe_name)
        d = base / build_id
        n = 1
        while True:
            try:
                # atomic: of two bakes started in the same second, each gets its own
                exposure.new_private_dir(d)
                break
            except FileExistsError:
                n += 1
                d = base / f"{build_id}.{n}"
        b = cls(d, {"build_id": d.name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "outputs": {}, "stages": {}})
        b.save()
        return b

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Build":
        """Open an existing build directory; a BakeError names what is missing or
        malformed in it."""
        d = Path(directory)
        rec = d / RECORD
        if not rec.is_file():
            raise BakeError(f"{d}: not a build directory (no {RECORD}); give a directory under output/<recipe>/")
        try:
            data = json.loads(rec.read_text())
        except json.JSONDecodeError as e:
            raise BakeError(f"{rec}: unreadable build record: {e}") from None
        except UnicodeDecodeError:
            raise BakeError(f"{rec}: unreadable build record: not UTF-8 text") from None
        check_record(rec, data)
        return cls(d.resolve(), data)

    def save(self) -> None:
        """Write build.json atomically."""
        tmp = self.dir / f"{RECORD}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, self.dir / RECORD)

    @property
    def lock_path(self) -> Path:
        """The lock file of this build folder (`locks.is_held` on it tells whether some
        command works on the build now)."""
        # kept beside bake's journals, not in the folder: a command refused for what the
        # folder lacks must leave it exactly as it was
        name = hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:32]
        return state_dir() / "builds" / f"{name}.lock"

    def lock(self, *, wait: bool = True):
        """Hold this build for the block (a context manager): one bake, verification or
        publication works on a build folder at a time; the lock ends with its holder."""
        return locks.held(self.lock_path, f"build {self.dir}", wait=wait)

    @property
    def id(self) -> str:
        return self.data.get("build_id", self.dir.name)

    def record_output(self, role: str, path: Path) -> dict[str, Any]:
        """Record file `path` (inside the build directory) as the output `role`
        (kernel, ramdisk, image, ...) with its size and sha256."""
        path = Path(path)
        entry = {"path": str(path.relative_to(self.dir)), "size": path.stat().st_size, "sha256": sha256_file(path)}
        self.data.setdefault("outputs", {})[role] = entry
        self.save()
        return entry

    def output_path(self, role: str) -> Path:
        """The file recorded as output `role`; a BakeError when the build has none."""
        return self.require_outputs(role)[role]

    def require_outputs(self, *roles: str) -> dict[str, Path]:
        """The files recorded as outputs `roles`, by role. All are checked before
        anything is raised, so one BakeError names every role the build has no record
        of and every recorded file that is gone."""
        outputs = self.data.get("outputs") or {}
        found: dict[str, Path] = {}
        unrecorded: list[str] = []
        gone: list[str] = []
        for role in roles:
            entry = outputs.get(role)
            if not entry:
                unrecorded.append(role)
                continue
            p = self.dir / entry["path"]
            if p.exists():
                found[role] = p
            else:
                gone.append(f"{p} (its {role})")
        problems = []
        if unrecorded:
            problems.append(f"this build has no {and_list(unrecorded)} (stage not run?)")
        if gone:
            problems.append(f"recorded but missing: {and_list(gone)}")
        if problems:
            raise BakeError(f"{self.dir}: " + "; ".join(problems))
        return found

    def record_stage(self, stage: str, **info: Any) -> None:
        """Merge `info` (seconds, cached, key, ...) into the record of `stage`."""
        self.data.setdefault("stages", {}).setdefault(stage, {}).update(info)
        self.save()

    def set(self, key: str, value: Any) -> None:
        """Set a top-level section of build.json (e.g. "cloud", "bundle", "verify")."""
        self.data[key] = value
        self.save()


# What every record has (Build.create writes them), and the sections stages read as
# objects when present: checked on load, so that a damaged or foreign build.json is a
# message naming the file rather than a traceback in whichever stage reads it first.
REQUIRED_FIELDS = {"build_id": str, "outputs": dict, "stages": dict}
OBJECT_SECTIONS = ("recipe", "bundle", "cloud", "verify", "filesystem")
_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def and_list(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def check_record(path: Path, data: Any) -> None:
    """Raise a BakeError naming `path` unless `data` has the shape of a build record: an
    object with build_id, outputs (role → object with a "path") and stages, and objects
    for the sections it has."""
    expected = f"a build record (a JSON object with {and_list(list(REQUIRED_FIELDS))}, as `bake build` writes)"
    if not isinstance(data, dict):
        raise BakeError(f"{path}: expected {expected}, found {_kind(data)}")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise BakeError(f"{path}: not {expected}: {and_list(missing)} missing")
    for key, kind in REQUIRED_FIELDS.items():
        if not isinstance(data[key], kind):
            raise BakeError(f"{path}: \"{key}\" should be {_JSON_KINDS[kind]}, found {_kind(data[key])}")
    for key in OBJECT_SECTIONS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise BakeError(f"{path}: \"{key}\" should be an object, found {_kind(data[key])}")
    for role, entry in data["outputs"].items():
        if not isinstance(entry, dict):
            raise BakeError(f"{path}: outputs.{role} should be an object, found {_kind(entry)}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise BakeError(f"{path}: outputs.{role} has no \"path\" (the file's path in the build directory)")
