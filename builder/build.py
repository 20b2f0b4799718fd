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

from .errors import BakeError

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
        base = Path(output_root) / recipe_name
        base.mkdir(parents=True, exist_ok=True)
        d = base / build_id
        n = 1
        while d.exists():
            n += 1
            d = base / f"{build_id}.{n}"
        d.mkdir()
        b = cls(d, {"build_id": d.name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "outputs": {}, "stages": {}})
        b.save()
        return b

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Build":
        """Open an existing build directory; a BakeError names what is missing."""
        d = Path(directory)
        rec = d / RECORD
        if not rec.is_file():
            raise BakeError(f"{d}: not a build directory (no {RECORD}); give a directory under output/<recipe>/")
        try:
            data = json.loads(rec.read_text())
        except json.JSONDecodeError as e:
            raise BakeError(f"{rec}: unreadable build record: {e}") from None
        return cls(d.resolve(), data)

    def save(self) -> None:
        """Write build.json atomically."""
        tmp = self.dir / (RECORD + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, self.dir / RECORD)

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
        entry = self.data.get("outputs", {}).get(role)
        if not entry:
            raise BakeError(f"{self.dir}: this build has no {role} (stage not run?)")
        p = self.dir / entry["path"]
        if not p.exists():
            raise BakeError(f"{p}: recorded as the build's {role} but missing")
        return p

    def record_stage(self, stage: str, **info: Any) -> None:
        """Merge `info` (seconds, cached, key, ...) into the record of `stage`."""
        self.data.setdefault("stages", {}).setdefault(stage, {}).update(info)
        self.save()

    def set(self, key: str, value: Any) -> None:
        """Set a top-level section of build.json (e.g. "cloud", "bundle", "verify")."""
        self.data[key] = value
        self.save()
