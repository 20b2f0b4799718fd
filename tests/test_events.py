"""`bake build --json`: one event per line on stdout, valid against the published schema,
and nothing else there, for the outcomes that need no bake (an invalid recipe, a busy
recipe, several recipes). A whole bake's events are checked in test_many_bakes."""

from __future__ import annotations

import os
import subprocess

import jsonschema

from builder.core import exitcodes
from builder.core.locks import recipe_lock
from conftest import BAKE, REPO
from event_stream import SCHEMA, VALIDATOR, parse

DEMO = REPO / "recipes" / "debian-demo.yml"


def test_the_events_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_schema_refuses_what_bake_must_not_write():
    base = {"event": "stage", "time": "2026-12-03T10:00:00.000Z", "build_id": "x", "recipe": "r"}
    assert VALIDATOR.is_valid({**base, "stage": "image", "status": "finished", "seconds": 1.5})
    assert not VALIDATOR.is_valid({**base, "stage": "image", "status": "finished"})        # no seconds
    assert not VALIDATOR.is_valid({**base, "stage": "polish", "status": "started"})         # no such stage
    assert not VALIDATOR.is_valid({**base, "stage": "image", "status": "started", "time": "yesterday"})
    assert not VALIDATOR.is_valid({**base, "event": "gossip"})


def test_an_invalid_recipe_is_one_error_event_and_nothing_else(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("name: bad\nrelease: debian/bookworm\npakages: [less]\n")
    r = subprocess.run([BAKE, "build", str(bad), "--json", "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == exitcodes.RECIPE_INVALID
    [event] = parse(r.stdout)
    assert event["event"] == "error" and event["exit_status"] == exitcodes.RECIPE_INVALID
    assert event["build_id"] is None and "pakages: unknown key" in event["message"]
    assert "pakages" in r.stderr, "the person at the terminal still reads it on stderr"


def test_a_busy_recipe_is_an_error_event_with_the_busy_status(tmp_path):
    with recipe_lock("debian-demo"):
        r = subprocess.run([BAKE, "build", str(DEMO), "--json", "--no-wait", "--output", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=120)
    [event] = parse(r.stdout)
    assert r.returncode == exitcodes.BUSY == event["exit_status"]
    assert f"in use by pid {os.getpid()}" in event["message"]


def test_several_recipes_end_with_a_summary_event(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("name: bad\nrelease: debian/bookworm\npakages: [less]\n")
    with recipe_lock("debian-demo"):
        r = subprocess.run([BAKE, "build", str(bad), str(DEMO), "--json", "--no-wait", "--output", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    events = parse(r.stdout)
    assert [e["event"] for e in events] == ["error", "error", "summary"], r.stdout
    assert events[0]["exit_status"] == exitcodes.RECIPE_INVALID
    assert events[1]["exit_status"] == exitcodes.BUSY and events[1]["recipe"] == "debian-demo"
    summary = events[-1]
    assert summary["exit_status"] == exitcodes.SOME_FAILED == r.returncode
    assert [(x["recipe"], x["exit_status"]) for x in summary["recipes"]] == [
        ("bad", exitcodes.RECIPE_INVALID), ("debian-demo", exitcodes.BUSY)]
