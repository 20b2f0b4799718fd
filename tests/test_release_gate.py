"""What a release asks of a build's verification: every check its recipe names passed,
in its last local or its last cloud verification; `--allow-unverified` releases a build
that was never verified, or not by every check, and its notes and record say so; a
failed verification is never released. Small fake builds, released with the real
command; nothing is baked or booted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from builder.cli.main import main as bake_main
from builder.core.record import Build
from builder.recipe.recipe import load_recipe
from builder.verify import required_checks
from test_gc import make_build

REQUIRED = ["boots", "metadata", "acpiphp", "volume-hotplug", "hygiene", "sync-agent"]


@pytest.fixture
def isolated(tmp_path, monkeypatch, clean_env):
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BAKE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def run(mode: str, statuses: dict[str, str], required: list[str] | None = REQUIRED) -> dict:
    """A verification run's summary as build.json keeps it."""
    summary = {"result": "failed" if "fail" in statuses.values() else "passed", "mode": mode, "checks": statuses}
    if required is not None:
        summary["required"] = required
    return summary


def verified(output: Path, *runs: dict, build_id: str = "20261207-100000") -> Build:
    """A finished build whose verification runs were `runs`, the last one its `verify`."""
    b = make_build(output, "gate", build_id)
    if runs:
        b.data["verify"] = runs[-1]
        b.data["verifications"] = {r["mode"]: r for r in runs}
    b.save()
    return b


def release(capsys, b: Build, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    status = bake_main(["release", str(b.dir), *extra])
    out, err = capsys.readouterr()
    return status, out + err


def test_a_verification_of_some_checks_only_is_refused_naming_the_others(isolated, capsys):
    b = verified(isolated / "output", run("local", {"boots": "pass", "metadata": "pass"}))
    status, out = release(capsys, b)
    assert status == 1
    assert "did not pass every check its recipe names: acpiphp, volume-hotplug, hygiene and sync-agent did not pass" in out
    assert "--allow-unverified" in out
    assert not (b.dir / "SHA256SUMS").exists() and "released" not in Build.load(b.dir).data


def test_a_skipped_check_the_recipe_names_is_not_a_pass(isolated, capsys):
    passed = dict.fromkeys(REQUIRED, "pass") | {"sync-agent": "skip"}
    b = verified(isolated / "output", run("local", passed))
    status, out = release(capsys, b)
    assert status == 1 and "sync-agent did not pass" in out


def test_every_check_passed_between_the_last_local_and_cloud_runs_is_released(isolated, capsys):
    local = run("local", dict.fromkeys(REQUIRED, "pass"))
    # the cloud, verified after, skips what needs a shell in the guest: its skips take
    # nothing away from what the local run proved
    cloud = run("cloud", {"boots": "pass", "metadata": "skip", "acpiphp": "pass", "volume-hotplug": "pass",
                          "sync-agent": "skip"})
    b = verified(isolated / "output", local, cloud)
    status, out = release(capsys, b)
    assert status == 0, out
    released = Build.load(b.dir).data["released"]
    assert (released["verified"], released["unverified_checks"]) == ("fully", [])
    notes = (b.dir / "RELEASE-NOTES.md").read_text()
    assert "without full verification" not in notes and "unverified" not in notes


def test_allow_unverified_releases_a_partly_verified_build_and_says_so(isolated, capsys):
    b = verified(isolated / "output", run("local", {"boots": "pass", "metadata": "pass"}))
    status, out = release(capsys, b, "--allow-unverified")
    assert status == 0, out
    released = Build.load(b.dir).data["released"]
    assert (released["verified"], released["unverified_checks"]) == ("partly", ["acpiphp", "volume-hotplug",
                                                                                 "hygiene", "sync-agent"])
    notes = (b.dir / "RELEASE-NOTES.md").read_text()
    assert ("**Released without full verification** (`--allow-unverified`): acpiphp, volume-hotplug, hygiene, "
            "sync-agent "
            "did not pass.") in notes
    assert (b.dir / "SHA256SUMS").exists()


def test_allow_unverified_releases_a_build_never_verified_and_says_so(isolated, capsys):
    b = verified(isolated / "output")
    status, out = release(capsys, b)
    assert status == 1 and "was never verified" in out and "--allow-unverified" in out
    status, out = release(capsys, b, "--allow-unverified")
    assert status == 0, out
    released = Build.load(b.dir).data["released"]
    assert (released["verified"], released["unverified_checks"]) == ("never", REQUIRED)
    assert "**Released unverified** (`--allow-unverified`): this build was never verified." in \
        (b.dir / "RELEASE-NOTES.md").read_text()


def test_a_failed_verification_is_refused_even_with_allow_unverified(isolated, capsys):
    b = verified(isolated / "output", run("local", dict.fromkeys(REQUIRED, "pass") | {"metadata": "fail"}))
    status, out = release(capsys, b, "--allow-unverified")
    assert status == 1 and "its verification failed (failed: metadata)" in out
    assert not (b.dir / "SHA256SUMS").exists()


def test_a_build_verified_before_runs_recorded_what_was_required_asks_its_recipe(isolated, capsys):
    """An older record: one `verify` section, no `required`; the recipe (here gone)
    gives the built-in checks, the sync agent's included while the build does not say it
    lacks the agent."""
    b = verified(isolated / "output", run("local", {"boots": "pass"}, required=None))
    del b.data["verifications"]
    b.save()
    status, out = release(capsys, b)
    assert status == 1 and "metadata, acpiphp, volume-hotplug, hygiene and sync-agent did not pass" in out


def test_the_required_checks_follow_the_recipe_and_the_build(tmp_path):
    recipe_path = tmp_path / "r.yml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "r", "release": "debian/bookworm",
        "verify": {"skip": ["volume-hotplug"], "checks": [{"name": "motd", "run": "cat /etc/motd"}]}}))
    recipe = load_recipe(recipe_path)
    b = make_build(tmp_path / "output", "r", "20261207-100000")
    b.data["elements"] = ["acpiphp"]                                     # no sync agent in this image
    b.data["packages"] = [{"name": "cloud-init", "version": "22.4"}]     # user data is checked
    assert required_checks(b, recipe) == ["boots", "metadata", "user-data", "acpiphp", "recipe:motd", "hygiene"]
    b.data["elements"] = ["acpiphp", {"name": "sync-agent", "with": {}}]
    b.data["packages"] = [{"name": "less", "version": "590"}]
    assert required_checks(b, recipe) == ["boots", "metadata", "acpiphp", "recipe:motd", "hygiene", "sync-agent"]
    assert required_checks(b, None) == ["boots", "metadata", "acpiphp", "volume-hotplug", "hygiene", "sync-agent"]
    assert json.loads((b.dir / "build.json").read_text())["recipe"] == {"name": "r"}
