"""Reading `bake build --json` output: every line one event, valid against the schema
the project publishes."""

from __future__ import annotations

import json

import jsonschema

from conftest import REPO

SCHEMA = json.loads((REPO / "builder" / "schema" / "events.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def parse(stdout: str) -> list[dict]:
    """The events of `stdout`, each checked against the schema (an AssertionError names
    the first line that is not an event)."""
    found = []
    for n, line in enumerate(stdout.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {n} of stdout is not JSON: {line!r}") from None
        errors = sorted(VALIDATOR.iter_errors(event), key=str)
        assert not errors, f"line {n} does not fit the events schema: {errors[0].message}\n{line}"
        found.append(event)
    return found
