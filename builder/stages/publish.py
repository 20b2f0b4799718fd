"""The publish stage: upload the build's bundles and register them, when a cloud is
configured (recipe `publish` section, an eucarc, or the environment); skipped otherwise."""

from __future__ import annotations

import logging
from typing import Any

from ..build import Build

log = logging.getLogger("bake.stages.publish")


def run(build: Build, recipe: Any) -> dict[str, Any]:
    """Publish `build`; returns the build.json "cloud" section, or {"skipped": reason}."""
    from ..cloud.credentials import load_credentials
    from ..cloud.publish import PublishOptions, publish

    section = getattr(recipe, "publish", None) or {}
    if not isinstance(section, dict):
        section = dict(section)
    if section.get("enabled") is False:
        reason = "the recipe's publish.enabled is false"
    else:
        creds = load_credentials(section)
        if creds is not None:
            return publish(build, creds, PublishOptions.from_section(section))
        reason = ("no cloud configured (no publish section with an eucarc or URLs in the recipe, "
                  "and no EC2_URL/S3_URL/EC2_ACCESS_KEY/EC2_SECRET_KEY in the environment)")
    log.info("publish skipped: %s", reason)
    build.record_stage("publish", skipped=reason)
    return {"skipped": reason}
