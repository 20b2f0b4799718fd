"""The `bake` command line itself: the `bake [build options] RECIPE.yml` shorthand, a
mistyped command, `bake validate` over many files, and output cut short by its reader
(`bake schema | head`). Each runs the installed `bake` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent
BAKE = str(Path(sys.executable).parent / "bake")
LUCID = REPO / "recipes" / "lucid-uec.yml"
DEMO = REPO / "recipes" / "debian-demo.yml"
TYPO = HERE / "recipes" / "bad" / "12-unknown-key-typo.yml"
TYPO_ERROR = f"bake: error: {TYPO}:3: pakages: unknown key 'pakages' (did you mean 'packages'?)"
COMMANDS = ("validate", "plan", "schema", "build", "bundle", "unbundle", "publish", "unpublish", "verify")


def bake(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BAKE, *map(str, args)], capture_output=True, text=True, cwd=cwd)


# --- the shorthand ------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--output", "OUT", "RECIPE"],
    ["--skip", "verify", "RECIPE"],
    ["--output", "OUT", "--stop-after", "bootstrap", "--skip", "publish", "--cloud", "RECIPE"],
    ["RECIPE", "--output", "OUT", "--skip", "verify"],
    ["-q", "--skip", "verify", "RECIPE", "--output=OUT"],
    ["--skip", "verify", "RECIPE", "-v"],
    ["--out", "OUT", "--stop", "image", "RECIPE"],
])
def test_shorthand_takes_build_options_before_or_after_the_recipe(tmp_path, args):
    out = tmp_path / "out"
    argv = [str(TYPO) if a == "RECIPE" else a.replace("OUT", str(out)) for a in args]
    r = bake(*argv)
    # the recipe was read (and refused) by the build command: the options were understood
    assert r.returncode == 3, r.stderr  # recipe invalid
    assert r.stderr.strip().splitlines()[-1] == TYPO_ERROR
    assert "unrecognized arguments" not in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not out.exists()


def test_shorthand_options_reach_the_build_command(tmp_path):
    for argv in (["--skip", "nope", TYPO], [TYPO, "--skip", "nope"]):
        r = bake(*argv)
        assert r.returncode == 2
        assert r.stderr.startswith("usage: bake build ")
        assert "argument --skip: invalid choice: 'nope'" in r.stderr


def test_an_existing_file_without_yml_suffix_is_a_recipe(tmp_path):
    (tmp_path / "myrecipe").write_text(TYPO.read_text())
    r = bake("myrecipe", cwd=tmp_path)
    assert r.returncode == 3
    assert r.stderr.strip() == "bake: error: myrecipe:3: pakages: unknown key 'pakages' (did you mean 'packages'?)"


def test_a_missing_recipe_is_named_as_such(tmp_path):
    r = bake("--output", tmp_path / "out", "nosuch.yml", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.strip() == "bake: error: nosuch.yml: no such recipe file"


@pytest.mark.parametrize("typo, suggestion", [("valdate", "validate"), ("bundel", "bundle"), ("veryfi", "verify")])
def test_a_mistyped_command_is_named_with_the_commands_there_are(tmp_path, typo, suggestion):
    r = bake(typo, "x.yml", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bake: error: unknown command '{typo}' (did you mean {suggestion}?); the commands are ")
    assert all(c in last for c in COMMANDS)
    assert "unrecognized arguments" not in r.stderr


def test_an_unknown_word_with_no_close_command_gets_no_suggestion(tmp_path):
    r = bake("frobnicate", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown command 'frobnicate'; the commands are validate, plan, schema, build" in r.stderr
    assert "did you mean" not in r.stderr


# --- validate --------------------------------------------------------------------------

def test_validate_reports_every_file(tmp_path):
    missing = tmp_path / "nosuch.yml"
    r = bake("validate", LUCID, TYPO, missing, DEMO)
    assert r.returncode == 3
    ok = r.stdout.splitlines()
    assert [line.split(": ok (")[0] for line in ok] == [str(LUCID), str(DEMO)]
    assert r.stderr.splitlines() == [TYPO_ERROR, f"bake: error: {missing}: no such recipe file"]


def test_validate_of_good_files_only_succeeds():
    r = bake("validate", LUCID, DEMO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": ok (") == 2 and r.stderr == ""


# --- output cut short by its reader -----------------------------------------------------

def run_into_closed_pipe(*args) -> subprocess.CompletedProcess:
    """Run bake with stdout a pipe nobody reads any more, as `bake … | head` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([BAKE, *map(str, args)], stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["schema"], ["schema", "--markdown"], ["plan", "--json", "LUCID"],
                                  ["plan", "LUCID"], ["validate", "LUCID"]])
def test_a_closed_stdout_ends_quietly_with_the_sigpipe_status(tmp_path, args):
    r = run_into_closed_pipe(*[LUCID if a == "LUCID" else a for a in args], *(
        ["--output", tmp_path] if args[0] == "plan" else []))
    assert r.returncode == 141  # 128 + SIGPIPE, what a shell shows for `yes | head`
    assert r.stderr == ""


def test_bake_schema_piped_into_head_shows_no_traceback():
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {BAKE} schema | head -n 3"], capture_output=True, text=True)
    assert r.returncode in (0, 141)
    assert r.stdout.splitlines()[0] == "{"
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr


def test_bake_plan_lists_the_stage_tables_stages_for_the_recipes_route(tmp_path):
    r = subprocess.run([BAKE, "plan", "--json", str(LUCID), "--output", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stages = json.loads(r.stdout)["stages"]
    assert [s["stage"] for s in stages] == ["bootstrap", "customize", "image", "bundle", "publish", "verify"]
    assert stages[0]["action"].startswith("debootstrap --variant=")


def test_bake_plan_says_which_scrub_operations_run(tmp_path):
    from builder.customize.scrub import NAMES
    recipe = tmp_path / "r.yml"
    recipe.write_text(DEMO.read_text() + "scrub:\n  skip: [random-seed, logfiles]\n")
    r = subprocess.run([BAKE, "plan", "--json", str(recipe), "--output", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    scrub = json.loads(r.stdout)["scrub"]
    assert scrub == {"run": [n for n in NAMES if n not in ("random-seed", "logfiles")],
                     "skipped": {"random-seed": "skipped by the recipe", "logfiles": "skipped by the recipe"}}
    text = subprocess.run([BAKE, "plan", str(recipe), "--output", str(tmp_path)], capture_output=True, text=True)
    assert "\nscrub\n  apt-sources apt-cache " in text.stdout and "  not logfiles: skipped by the recipe" in text.stdout


# --- main() called more than once in one process ----------------------------------------

def test_main_called_twice_in_one_process_prints_each_step_once(capsys):
    """A program that calls main() again (the farm's worker runs many bakes in one
    process) must not print every step once per earlier call."""
    from builder.cli.main import main
    from builder.core import log as steplog

    for _ in range(3):
        assert main(["validate", str(DEMO)]) == 0
    capsys.readouterr()
    with steplog.step("one step"):
        pass
    err = capsys.readouterr().err
    assert err.count("» one step") == 1 and err.count("✓ one step") == 1, err
