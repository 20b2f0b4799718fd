"""Verification: prove a build boots and does what the image promises.

    from builder.verify import verify
    report = verify(build)                     # local, under QEMU (KVM where it boots)
    report = verify(build, cloud=True)         # on the cloud the build was published to

Each check is a small named unit with a result (pass / fail / skip with a reason), a
duration and evidence; the report goes to `verify.json` in the build directory and its
summary to build.json's "verify" section. A failed check marks the build failed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from builder.core.record import Build
from builder.core.errors import BakeError
from builder.core.log import step
from builder.recipe.recipe import load_recipe
from .checks import BUILTIN
from .cloud import CloudOptions, verify_cloud
from .local import LocalOptions, check_names, verify_local
from .report import REPORT, Report, render_table
from .result import FAIL, PASS, SKIP, CheckResult
from .result import event as result_event

__all__ = ["verify", "recipe_of", "required_checks", "Report", "render_table", "CheckResult", "PASS", "FAIL", "SKIP",
           "REPORT"]


def recipe_of(build: Build):
    """The recipe the build was baked from, if its file is still there (else None)."""
    rec = build.data.get("recipe")
    path = rec.get("path") if isinstance(rec, dict) else None
    if not path or not Path(path).is_file():
        return None
    return load_recipe(path)


def required_checks(build: Build, recipe=None) -> list[str]:
    """The checks the recipe names for this build: those a whole local verification
    reports on (its built-in checks and the recipe's own, less those its verify section
    skips), less the sync agent's when the build has no agent; user-data when the image
    has cloud-init. What a release asks to have passed."""
    section = recipe.verify if recipe is not None else {}
    opts = LocalOptions.from_recipe(section, user="", build=build)
    return [n for n in check_names(opts) if not (n == "sync-agent" and opts.sync_agent_in_image is False)]


def verify(build: Build, *, cloud: bool = False, only: set[str] | None = None, recipe=None,
           **options: Any) -> Report:
    """Verify `build` and record the outcome (verify.json, build.json "verify", and
    build.json "result" = "failed" when a check failed). Returns the report.

    `recipe` defaults to the build's own recipe (for its verify section and default
    user); `options` override fields of LocalOptions (local mode) or CloudOptions.
    """
    recipe = recipe if recipe is not None else recipe_of(build)
    section = recipe.verify if recipe is not None else {}
    if only:
        checks = options.get("recipe_checks", section.get("checks") or ())
        known = [*BUILTIN, *(f"recipe:{c['name']}" for c in checks)]
        unknown = sorted(set(only) - set(known))
        if unknown:
            raise BakeError(f"unknown check(s): {', '.join(unknown)}; known: {', '.join(known)}")
    user = options.pop("user", None) or (recipe.default_user if recipe is not None else "")
    opts: CloudOptions | LocalOptions
    if cloud:
        if recipe is not None:
            options.setdefault("publish_section", recipe.publish)
        opts = CloudOptions.from_recipe(section, user=user, only=only, **options)
        report = Report("cloud")
        with step("Verify on the cloud"), _recorded_if_unfinished(build, report):
            report = verify_cloud(build, opts, report)
    else:
        opts = LocalOptions.from_recipe(section, user=user, build=build, only=only, **options)
        report = Report("local")
        with step("Verify locally under QEMU"), _recorded_if_unfinished(build, report):
            report = verify_local(build, opts, report)
    _record(build, report, required_checks(build, recipe))
    return report


def _record(build: Build, report: Report, required: list[str] | None = None) -> None:
    """verify.json, and build.json's "verify" (this run) and "verifications" (the last
    run of each mode, local and cloud: a release asks every required check to have
    passed in one of them)."""
    report.write(build.dir)
    summary = report.summary()
    if required is not None:
        summary["required"] = required
    build.data["verify"] = summary
    runs = build.data.get("verifications")
    build.data["verifications"] = {**(runs if isinstance(runs, dict) else {}), report.mode: summary}
    if not report.ok:
        build.data["result"] = "failed"
        failed = [r.name for r in report.results if r.status == FAIL]
        build.data["error"] = f"verification failed: {', '.join(failed)} (see {build.dir / REPORT})"
    build.save()


@contextlib.contextmanager
def _recorded_if_unfinished(build: Build, report: Report) -> Iterator[None]:
    """A verification that ends in an error or an interruption after it cleared the
    evidence of the one before still leaves a report: what it found, and a failed
    `verification` entry saying why it did not finish (not an earlier run's "passed")."""
    try:
        yield
    except BaseException as e:
        if report.begun:
            why = str(e).splitlines()[0] if isinstance(e, BakeError) and str(e) else type(e).__name__
            report.results.append(CheckResult("verification", FAIL, 0.0, f"did not finish: {why}"))
            result_event(report.results[-1])
            with contextlib.suppress(Exception):
                _record(build, report)
        raise
