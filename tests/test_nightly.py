"""`bake nightly`: the examples a box is set up with (systemd units checked by
systemd-analyze, a cron line), the summary file and the exit statuses a scheduler reads."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from builder.core import exitcodes
from builder.core.locks import recipe_lock
from conftest import BAKE, REPO

EXAMPLES = REPO / "docs" / "examples"
DEMO = REPO / "recipes" / "debian-demo.yml"


def installed(tmp_path: Path, name: str, edit=lambda text: text) -> Path:
    """The example unit as it is on a box where bake lives in this checkout."""
    text = (EXAMPLES / name).read_text().replace("/srv/bake/.venv/bin/bake", BAKE).replace("/srv/bake", str(REPO))
    p = tmp_path / name
    p.write_text(edit(text))
    return p


def analyze(*units: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                          timeout=120, cwd=units[0].parent)


def test_the_example_systemd_units_pass_systemd_analyze_verify(tmp_path):
    r = analyze(installed(tmp_path, "bake-nightly.service"), installed(tmp_path, "bake-nightly.timer"))
    assert r.returncode == 0, r.stderr
    assert "bake-nightly" not in r.stderr, r.stderr


def test_systemd_analyze_does_refuse_a_broken_unit(tmp_path):
    # the check above can fail: the same unit with its command misspelled is refused
    broken = installed(tmp_path, "bake-nightly.service", lambda t: t.replace("ExecStart=", "ExecStrat="))
    r = analyze(broken)
    assert r.returncode != 0 and "ExecStrat" in r.stderr


def command_of(unit_text: str) -> list[str]:
    [line] = [line for line in unit_text.splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.split("=", 1)[1])


def test_the_examples_use_options_bake_nightly_has(tmp_path):
    service = command_of((EXAMPLES / "bake-nightly.service").read_text())
    [cron] = [line for line in (EXAMPLES / "bake-nightly.cron").read_text().splitlines()
              if line and not line.startswith("#")]
    fields = cron.split(None, 6)
    assert len(fields) == 7 and fields[5] == "root", "minute hour day month weekday user command"
    cron_cmd = shlex.split(fields[6].split("&&", 1)[1].split(">>", 1)[0])
    cron_cmd = [a for a in cron_cmd if "=" not in a or a.startswith("-")]
    for argv in (service, cron_cmd):
        assert argv[0].endswith("bake") and argv[1] == "nightly", argv
        # the same options on a folder that is not there: refused as "could not run" (8),
        # not as a command-line mistake (2)
        args = [str(tmp_path / "no-recipes-here") if a in ("/srv/bake/recipes", "recipes") else a for a in argv[1:]]
        args = [str(tmp_path / "eucarc") if a == "/srv/bake/eucarc" else a for a in args]
        r = subprocess.run([BAKE, *args, "--output", str(tmp_path / "out")], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == exitcodes.COULD_NOT_RUN, r.stderr
        assert "no such recipe file or folder" in r.stderr


def test_a_folder_without_recipes_could_not_run_and_bakes_nothing(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "notes.txt").write_text("not a recipe\n")
    r = subprocess.run([BAKE, "nightly", str(tmp_path / "recipes"), "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == exitcodes.COULD_NOT_RUN
    assert f"no recipes (*.yml, *.yaml) in {tmp_path / 'recipes'}" in r.stderr
    assert not (tmp_path / "out").exists()


def test_some_failed_is_its_own_status_and_the_summary_says_which(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "a-bad.yml").write_text("name: a-bad\nrelease: debian/bookworm\npakages: [less]\n")
    (folder / "b-demo.yml").write_text(DEMO.read_text())
    out = tmp_path / "out"
    with recipe_lock("debian-demo"):      # held by another bake: with --no-wait, skipped as busy
        r = subprocess.run([BAKE, "nightly", str(folder), "--no-wait", "--output", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == exitcodes.SOME_FAILED, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.parent == out / "nightly"
    summary = json.loads(path.read_text())
    assert json.loads((out / "nightly" / "latest.json").read_text()) == summary
    assert summary["exit_status"] == exitcodes.SOME_FAILED
    assert {x["recipe"]: x["exit_status"] for x in summary["recipes"]} == {
        "a-bad": exitcodes.RECIPE_INVALID, "debian-demo": exitcodes.BUSY}
    assert (summary["passed"], summary["failed"], summary["gc"]) == (0, 2, None)
    assert not [f for f in (out / "nightly").iterdir() if f.name.endswith(".tmp")]


@pytest.mark.bakes
@pytest.mark.e2e
def test_two_nights_bake_the_folder_and_gc_keeps_one_build_per_recipe(demo_build, tmp_path):
    import yaml

    folder = tmp_path / "recipes"
    folder.mkdir()
    data = yaml.safe_load(DEMO.read_text())
    data.update(name="nightly-demo", verify={"enabled": False})     # the base and packages of the demo's
    (folder / "nightly-demo.yml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    # gc removes cache entries no kept build of its output root uses: it gets a cache of
    # its own, hard links to the suite's (made by the demo build), not the suite's own
    cache = tmp_path / "cache"
    subprocess.run(["cp", "-al", os.environ["BAKE_CACHE"], str(cache)], check=True)
    env = dict(os.environ, BAKE_CACHE=str(cache))
    nights = []
    for _ in range(2):
        r = subprocess.run([BAKE, "nightly", str(folder), "--keep", "1", "--output", str(out)],
                           capture_output=True, text=True, timeout=1800, env=env)
        assert r.returncode == exitcodes.OK, r.stderr
        nights.append(json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text()))
    first, second = nights
    for night in nights:
        assert (night["passed"], night["failed"], night["exit_status"]) == (1, 0, 0)
        assert night["gc"]["exit_status"] == 0, night["gc"]
        [recipe] = night["recipes"]
        assert recipe["recipe"] == "nightly-demo" and recipe["result"] == "ok"
    old, new = Path(first["recipes"][0]["dir"]), Path(second["recipes"][0]["dir"])
    assert old != new
    assert new.is_dir() and not old.exists(), "the second night's gc removed the first night's build"
    assert sorted(p.name for p in (out / "nightly-demo").iterdir() if p.is_dir()) == [new.name]
    assert json.loads((out / "nightly" / "latest.json").read_text()) == second
