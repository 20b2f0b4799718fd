"""The publish stage: upload the build's bundles and register them, when a cloud is
configured (recipe `publish` section, an eucarc, or the environment); skipped otherwise."""

from __future__ import annotations

import logging
from typing import Any

from builder.cloud.credentials import load_credentials
from builder.cloud.publish import PublishOptions, publish
from builder.core.record import Build
from builder.pipeline.context import BuildContext
from builder.core.log import step

log = logging.getLogger("bake.stages.publish")

NO_CLOUD = ("no cloud configured (no publish section with an eucarc or URLs in the recipe, "
            "and no EC2_URL/S3_URL/EC2_ACCESS_KEY/EC2_SECRET_KEY in the environment)")


def run(ctx: BuildContext) -> None:
    """Publish the build when a cloud is configured (see the module's doc)."""
    run_on(ctx.build, ctx.recipe)


def run_on(build: Build, recipe: Any) -> dict[str, Any]:
    """Publish `build`; returns the build.json "cloud" section, or {"skipped": reason}
    (also recorded as the stage's record in build.json)."""
    section = dict(getattr(recipe, "publish", None) or {})
    creds = None
    if section.get("enabled") is False:
        reason = "the recipe's publish.enabled is false"
    else:
        creds = load_credentials(section)
        reason = NO_CLOUD
    if creds is None:
        log.info("publish skipped: %s", reason)
        build.record_stage("publish", skipped=reason)
        return {"skipped": reason}
    with step("Publish"):
        cloud = publish(build, creds, PublishOptions.from_section(section))
    build.record_stage("publish", image_id=cloud["image_id"],
                       uploaded=cloud["uploaded"], already_uploaded=cloud["already_uploaded"])
    return cloud
