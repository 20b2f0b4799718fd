"""Build options as data: `BuildOptions` round-trips through JSON and refuses what does
not fit its schema; a child bake (`builder.pipeline.child`, how -j, nightly and a farm
worker start one) reads them from its stdin and refuses bad ones before anything runs;
a farm job whose spec's options do not fit is refused with nothing run."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from builder.core import exitcodes
from builder.core.errors import BakeError
from builder.farm import jobs
from builder.pipeline import child
from builder.core.locks import recipe_lock
from builder.pipeline.options import BuildOptions
from conftest import REPO
from event_stream import parse

DEMO = REPO / "recipes" / "debian-demo.yml"


def test_options_round_trip_through_json_text():
    options = BuildOptions(output="/srv/out", stop_after="image", skip=("publish", "verify"), cloud=True,
                           wait=False, build_id="20261206-221700-ab12")
    text = json.dumps(options.to_json())
    assert BuildOptions.from_json(json.loads(text)) == options
    assert BuildOptions.from_json({}) == BuildOptions(), "every option has its default"


@pytest.mark.parametrize("data, says", [
    ({"cloud_verify": True}, "'cloud_verify' was unexpected"),
    ({"skip": ["image"]}, "skip/0: 'image' is not one of"),
    ({"stop_after": "polish"}, "stop_after: 'polish' is not one of"),
    ({"cloud": "yes"}, "cloud: 'yes' is not of type 'boolean'"),
    ({"build_id": "../elsewhere"}, "build_id: '../elsewhere' does not match"),
    ({"output": ""}, "output: '' should be non-empty"),
    (["--cloud"], "(top): ['--cloud'] is not of type 'object'"),
])
def test_options_that_do_not_fit_the_schema_are_refused_saying_where(data, says):
    with pytest.raises(BakeError, match="^build options: ") as e:
        BuildOptions.from_json(data)
    assert says in str(e.value)


def _child(stdin: str, cwd, *, json_events: bool = False,
           extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """A child bake of the demo recipe as -j starts one, `stdin` its input (`extra`: more
    arguments before the recipe)."""
    argv = child.command(DEMO, child.Report(json=json_events))
    end = argv.index("--")
    argv[end:end] = list(extra)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_child_bake_reads_its_options_from_stdin(tmp_path):
    out = tmp_path / "out"
    options = BuildOptions(output=str(out), wait=False)
    with recipe_lock("debian-demo"):         # held here: the child's wait=False says busy at once
        r = _child(json.dumps(options.to_json()), tmp_path, json_events=True)
    assert r.returncode == exitcodes.BUSY, r.stderr
    [event] = parse(r.stdout)
    assert event["event"] == "error" and f"in use by pid {os.getpid()}" in event["message"]
    assert not out.exists()


@pytest.mark.parametrize("stdin, says", [
    ("--stop-after image", "bake: error: build options from stdin: not JSON (Expecting value"),
    ("", "bake: error: build options from stdin: not JSON"),
    ('{"cloud_verify": true}', "bake: error: build options: (top): Additional properties are not allowed"),
    ('{"skip": ["image"]}', "bake: error: build options: skip/0: 'image' is not one of"),
])
def test_a_child_bake_refuses_options_that_are_not_json_or_do_not_fit_and_makes_nothing(tmp_path, stdin, says):
    r = _child(stdin, tmp_path, json_events=True)
    assert r.returncode == exitcodes.FAILED, r.stderr
    assert says in r.stderr
    [event] = parse(r.stdout)
    assert event["event"] == "error" and event["exit_status"] == exitcodes.FAILED
    assert list(tmp_path.iterdir()) == [], "no output folder, no build"


def test_options_are_read_from_a_file_too_and_a_missing_one_is_said(tmp_path):
    options = BuildOptions(output=str(tmp_path / "out"), skip=("verify",))
    sent = tmp_path / "options.json"
    sent.write_text(json.dumps(options.to_json()))
    assert child.read_options(str(sent)) == options
    with pytest.raises(BakeError, match=f"^build options from {tmp_path / 'none.json'}: cannot be read"):
        child.read_options(str(tmp_path / "none.json"))


def test_a_child_bake_refuses_build_option_flags_beside_its_json(tmp_path):
    options = BuildOptions(output=str(tmp_path / "out"))
    r = _child(json.dumps(options.to_json()), tmp_path, extra=("--stop-after", "image", "--no-wait"))
    assert r.returncode == exitcodes.FAILED
    assert "--options-json carries every build option of one recipe's bake; not with --stop-after, --no-wait" \
        in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, says", [
    ({"cloud_verify": True}, "submitted by an older bake (cloud_verify is now cloud): submit it again"),
    ({"skip": "verify"}, "build options: skip: 'verify' is not of type 'array'"),
    ({"stop_after": "image", "retries": 3}, "'retries' was unexpected"),
])
def test_a_farm_job_whose_options_do_not_fit_is_refused_before_anything_runs(tmp_path, monkeypatch, options, says):
    # no Redis, no store: the job must end before it reaches for either
    for k in ("BAKE_REDIS_URL", "BAKE_FARM_STORE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(jobs.OUTPUT_ENV, str(tmp_path / "out"))
    spec = {"recipe": "farm-x", "bundle": "recipes/0.tar", "sha256": "0" * 64, "options": options}
    with pytest.raises(jobs.BadSpec, match="^farm job of farm-x: not run: ") as e:
        jobs.run_build(spec)
    assert says in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_farm_job_spec_carries_the_options_json():
    options = BuildOptions(stop_after="bundle", skip=("verify",), cloud=True)
    assert jobs.job_options({"recipe": "x", "options": options.to_json()}) == options
    with pytest.raises(jobs.BadSpec, match="has no build options"):
        jobs.job_options({"recipe": "x"})
