"""The verify stage: the last stage of a bake (see builder.verify)."""

from __future__ import annotations

from builder.core.record import Build
from builder.verify import verify
from builder.pipeline.context import BuildContext
from builder.core.errors import BakeError


def run(ctx: BuildContext) -> None:
    """Verify the build: on the cloud with `--cloud`, else as the recipe says."""
    run_on(ctx.build, ctx.recipe, cloud=True if ctx.options.cloud else None)


def run_on(build: Build, recipe, *, cloud: bool | None = None) -> dict:
    """Verify the build as the recipe's verify section says (local unless its mode is
    cloud; `cloud` overrides it, as `bake build --cloud` does); records the outcome in
    build.json and returns its summary. A failed check sets the build's result to
    "failed" (the bake then exits non-zero)."""
    section = recipe.verify
    if cloud is None:
        cloud = section.get("mode", "local") == "cloud"
    try:
        report = verify(build, cloud=cloud, recipe=recipe)
    except BakeError as e:
        build.data["result"] = "failed"
        build.data["error"] = f"verification could not run: {e}"
        build.record_stage("verify", error=str(e))
        raise
    build.record_stage("verify", seconds=round(report.seconds, 2), result=report.result)
    return build.data["verify"]
