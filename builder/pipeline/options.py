"""The options of one build, typed, in one place.

The CLI makes them from its flags; `-j`, nightly, the farm and its worker carry them as
JSON (`to_json`/`from_json`), never as a command line rendered to be parsed again. What
comes back from JSON is checked against OPTIONS_SCHEMA before anything uses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jsonschema

from builder.core.errors import BakeError

STAGE_NAMES = ("bootstrap", "customize", "image", "bundle", "publish", "verify")
SKIPPABLE = ("bundle", "publish", "verify")

OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "output": {"type": "string", "minLength": 1, "maxLength": 4096},
        "stop_after": {"enum": [None, *STAGE_NAMES]},
        "skip": {"type": "array", "items": {"enum": list(SKIPPABLE)}, "uniqueItems": True},
        "cloud": {"type": "boolean"},
        "wait": {"type": "boolean"},
        "build_id": {"type": ["string", "null"], "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
    },
}


@dataclass(frozen=True)
class BuildOptions:
    """How to run one bake: where to (output root), how far (stop_after, skip), which
    verification (cloud), whether to wait for another bake of the recipe, and the build
    id (None: the time)."""

    output: str = "output"
    stop_after: str | None = None
    skip: tuple[str, ...] = ()
    cloud: bool = False
    wait: bool = True
    build_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The options as JSON-ready data (what crosses a process or the queue)."""
        data = dataclasses.asdict(self)
        data["skip"] = list(self.skip)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "BuildOptions":
        """Options from JSON data, checked against OPTIONS_SCHEMA; a BakeError names the
        first thing that does not fit."""
        try:
            jsonschema.validate(data, OPTIONS_SCHEMA)
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top)"
            raise BakeError(f"build options: {where}: {e.message}") from None
        values = dict(data)
        if "skip" in values:
            values["skip"] = tuple(values["skip"])
        return cls(**values)
