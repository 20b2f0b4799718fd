"""A build directory's build.json that is not a build record (not an object, missing
what every build has, a section of the wrong kind) is named as such when the build is
opened, by every command that opens one, instead of failing later with a traceback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.core.record import Build
from builder.cloud.credentials import ENV_NAMES
from builder.core.errors import BakeError
from conftest import BAKE


def build_dir(tmp_path: Path, record) -> Path:
    d = tmp_path / "output" / "demo" / "20260101-000000"
    d.mkdir(parents=True)
    (d / "build.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return d


def bake(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not any(k in names for names in ENV_NAMES.values())}
    return subprocess.run([BAKE, *argv], capture_output=True, text=True, env=env, timeout=120)


GOOD = {"build_id": "20260101-000000", "created": "2026-01-01T00:00:00+00:00", "outputs": {}, "stages": {}}


@pytest.mark.parametrize("record,found", [
    ([], "found an array"),
    ('"a string"', "found a string"),
    ("42", "found a number"),
    ("null", "found null"),
])
def test_a_record_that_is_not_an_object_names_the_file_and_what_was_expected(tmp_path, record, found):
    d = build_dir(tmp_path, record)
    with pytest.raises(BakeError) as e:
        Build.load(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'build.json'}: expected a build record (a JSON object with build_id, outputs and "
                          "stages")
    assert msg.endswith(found)


def test_a_record_missing_what_every_build_has_names_the_missing_fields(tmp_path):
    d = build_dir(tmp_path, {"build_id": "x", "result": "ok"})
    with pytest.raises(BakeError, match=r"build\.json: not a build record .*: outputs and stages missing$"):
        Build.load(d)


@pytest.mark.parametrize("change,message", [
    ({"outputs": []}, '"outputs" should be an object, found an array'),
    ({"stages": "bootstrap"}, '"stages" should be an object, found a string'),
    ({"build_id": 7}, '"build_id" should be a string, found a number'),
    ({"cloud": ["emi-1"]}, '"cloud" should be an object, found an array'),
    ({"bundle": "done"}, '"bundle" should be an object, found a string'),
    ({"outputs": {"kernel": "vmlinuz"}}, "outputs.kernel should be an object, found a string"),
    ({"outputs": {"image": {"size": 3}}}, 'outputs.image has no "path"'),
])
def test_a_section_of_the_wrong_kind_is_named(tmp_path, change, message):
    d = build_dir(tmp_path, {**GOOD, **change})
    with pytest.raises(BakeError) as e:
        Build.load(d)
    assert str(e.value).startswith(f"{d / 'build.json'}: {message}")


def test_a_record_as_bake_build_writes_it_loads(tmp_path):
    made = Build.create(tmp_path / "output", "demo")
    made.set("cloud", None)     # a section that is absent or null is fine
    assert Build.load(made.dir).data["build_id"] == made.id


@pytest.mark.parametrize("command", [["verify"], ["publish"], ["unpublish"]])
def test_every_command_on_a_build_says_what_is_wrong_with_its_record_without_a_traceback(tmp_path, command):
    d = build_dir(tmp_path, "[]")
    r = bake(*command, str(d))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"bake: error: {d / 'build.json'}: expected a build record" in r.stderr
    assert (d / "build.json").read_text() == "[]"
    assert sorted(p.name for p in d.iterdir()) == ["build.json"]
