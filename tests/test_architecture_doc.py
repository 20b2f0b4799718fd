"""docs/architecture.md is the map of the code as it is: its folders are builder's, and
its stage table is pipeline/table.py's, route by route."""

from __future__ import annotations

import json
import re
from pathlib import Path

from builder.operations.records import STAGES
from builder.pipeline.options import STAGE_NAMES
from builder.pipeline.table import APPLIANCE, DEBOOTSTRAP, IMAGE_CHROOT, TABLE, stages_for

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "architecture.md").read_text()


def _rows(heading: str) -> list[list[str]]:
    section = DOC.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    return rows[2:]  # header and rule


def test_the_layers_table_names_every_folder_of_builder_and_no_other():
    named = {re.sub(r"[`/]", "", row[1]) for row in _rows("The folders, in layers")}
    folders = {p.name for p in (REPO / "builder").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert named == folders


def test_the_stage_table_is_the_codes_route_by_route():
    rows = _rows("The stage table")
    assert [r[0] for r in rows] == [s.name for s in stages_for(DEBOOTSTRAP)]
    for column, route in ((1, DEBOOTSTRAP), (2, IMAGE_CHROOT), (3, APPLIANCE)):
        code = [f"`{s.run.__module__.rsplit('.', 1)[1]}.{s.run.__name__}`" for s in stages_for(route)]
        assert [r[column] for r in rows] == code, route
    assert {s.name for s in TABLE} == {r[0] for r in rows}


def test_the_stage_names_are_one_list_that_records_and_events_read():
    schema = json.loads((REPO / "builder" / "schema" / "events.schema.json").read_text())
    enums = [v["enum"] for v in _walk(schema) if isinstance(v, dict) and "bootstrap" in (v.get("enum") or [])]
    assert enums and all(tuple(e) == STAGE_NAMES for e in enums)
    assert STAGES is STAGE_NAMES


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)
