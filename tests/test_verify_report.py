"""The verification's bookkeeping, without a guest: check results, the report and its
table, which checks a recipe asks for, and the verify stage's effect on the build."""

from __future__ import annotations

import json

import pytest

from builder.core.record import Build
from builder.core.errors import BakeError
from builder.verify import FAIL, PASS, SKIP, render_table
from builder.verify.local import LocalOptions, check_names
from builder.verify.report import Report
from builder.verify.result import CheckFailed, CheckSkipped, checking, skipped
from builder.vm.console import GuestTimeout


def test_a_check_records_pass_fail_skip_duration_and_evidence():
    results = []
    with checking("ok", results) as r:
        r.summary = "fine"
        r.evidence["n"] = 1
    with checking("bad", results):
        raise CheckFailed("it broke", console_tail="last words")
    with checking("later", results):
        raise CheckSkipped("not here")
    with checking("guest", results):
        raise GuestTimeout("timed out after 5 s waiting for X", "tail line")
    skipped("never", "no channel", results)
    got = {r.name: (r.status, r.summary) for r in results}
    assert got == {"ok": (PASS, "fine"), "bad": (FAIL, "it broke"), "later": (SKIP, "not here"),
                   "guest": (FAIL, "timed out after 5 s waiting for X"), "never": (SKIP, "no channel")}
    assert results[1].evidence == {"console_tail": "last words"}
    assert "tail line" in results[3].evidence["detail"]
    assert all(r.seconds >= 0 for r in results)


def test_a_bug_in_a_check_is_recorded_and_still_raised():
    results = []
    with pytest.raises(ZeroDivisionError):
        with checking("buggy", results):
            1 / 0
    assert results[0].status == FAIL


def test_report_json_and_table_show_every_check_and_the_failures_detail(tmp_path):
    rep = Report("local", info={"accelerator": "tcg", "instance_type": "m1.small"}, seconds=12.3)
    with checking("boots", rep.results) as r:
        r.summary = "ready in 11.0 s under TCG"
    with checking("volume-hotplug", rep.results):
        raise CheckFailed("no disk with serial x appeared", console_tail="[ 1.0] acpiphp: disabled by user")
    path = rep.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["result"] == "failed" and data["counts"] == {"pass": 1, "fail": 1, "skip": 0}
    table = render_table(data)
    lines = table.splitlines()
    assert lines[0].split() == ["check", "result", "time", "evidence"]
    assert "boots" in lines[2] and "PASS" in lines[2] and "ready in 11.0 s" in lines[2]
    assert "FAIL" in lines[3]
    assert "verification FAILED (local, accelerator: tcg, instance_type: m1.small)" in table
    assert "--- volume-hotplug: no disk with serial x appeared" in table and "disabled by user" in table
    assert rep.summary()["checks"] == {"boots": "pass", "volume-hotplug": "fail"}


def test_options_follow_the_recipes_verify_section_and_elements(tmp_path):
    b = Build.create(tmp_path, "r")
    b.data["elements"] = [{"name": "base"}, {"name": "acpiphp"}]
    section = {"instance_type": "c1.medium", "timeout": 90, "skip": ["acpiphp"],
               "checks": [{"name": "hello", "run": "echo hi", "expect": "hi"}]}
    o = LocalOptions.from_recipe(section, user="debian", build=b)
    assert (o.user, o.instance_type, o.boot_timeout, o.sync_agent_in_image) == ("debian", "c1.medium", 90.0, False)
    assert check_names(o) == ["boots", "metadata", "volume-hotplug", "recipe:hello", "hygiene", "sync-agent"]
    assert LocalOptions.from_recipe({}, user="").user == "root"
    only = LocalOptions.from_recipe(section, user="debian", only={"recipe:hello"})
    assert check_names(only) == ["recipe:hello"]


def test_verify_stage_marks_the_build_failed_when_verification_cannot_run(tmp_path):
    from builder.pipeline.stages import verify as stage

    class Recipe:
        verify = {}
        publish = {}
        default_user = "debian"

    b = Build.create(tmp_path, "r")  # no kernel, ramdisk or image
    with pytest.raises(BakeError, match="no kernel"):
        stage.run_on(b, Recipe())
    assert Build.load(b.dir).data["result"] == "failed"


def test_asking_for_an_unknown_check_names_the_known_ones(tmp_path):
    from builder.verify import verify

    b = Build.create(tmp_path, "r")
    with pytest.raises(BakeError, match=r"unknown check\(s\): bogus; known: boots, metadata, .*recipe:hello"):
        verify(b, only={"boots", "bogus"}, recipe_checks=[{"name": "hello", "run": "true"}])


def test_a_verification_that_cannot_finish_leaves_a_failed_report_not_the_last_one(tmp_path, monkeypatch):
    # a "kernel" of random bytes: QEMU refuses it at start, after the verification has
    # cleared the evidence of the one before, and before any check could run
    from eucalyptus_standin.trio import make_build
    from builder.verify import verify

    monkeypatch.setenv("BAKE_ACCEL", "tcg")
    b = make_build(tmp_path / "output")
    (b.dir / "verify.json").write_text(json.dumps({"result": "passed", "checks": []}))
    b.data["verify"] = {"result": "passed"}
    b.save()
    with pytest.raises(BakeError) as e:
        verify(b, user="nobody", boot_timeout=30)
    assert "QEMU of instance a exited at start" in str(e.value) and "kernel" in str(e.value)
    on_disk = json.loads((b.dir / "verify.json").read_text())
    assert on_disk["result"] == "failed"
    assert on_disk["checks"][-1]["name"] == "verification"
    assert on_disk["checks"][-1]["summary"].startswith("did not finish: QEMU of instance a exited at start")
    assert "verify/a/qemu.log" in on_disk["files"]
    again = Build.load(b.dir)
    assert again.data["verify"]["result"] == "failed" and again.data["result"] == "failed"
