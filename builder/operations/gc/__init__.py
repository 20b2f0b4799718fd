"""`bake gc --keep N`: retention of builds, cache entries and published images.

Three steps, so that `--dry-run` and a real run cannot disagree:

1. **survey** (reads only): the builds under the output root (their records, states and
   locks, through `records`), the stage cache's entries, and with `--cloud` the images
   of this account (DescribeImages), the instances that use them (DescribeInstances) and
   the bundles under each build's prefix in the bucket;
2. **plan** (`plan_gc`, pure): per recipe, what goes and, for everything kept, why;
3. **execute**: each recipe's builds under the recipe lock, each build under its own
   lock, each cache entry under its lock, all taken without waiting and skipped when held.

On the cloud, a build is found from the cloud's own listing, not only from build.json: an
image whose manifest is at `BUCKET/<recipe>/<build-id>/FILE.manifest.xml` (the prefix
`bake publish` uses) is that build's; images a local record names are attributed by id,
whatever their prefix. A build only the cloud knows of counts as released when the
release marker is in the bucket beside its bundles: the object `<prefix>/released.json`
(`RELEASE_MARKER`), which `bake release` writes.

The parts: `facts` (what the survey finds), `survey`, `plan`, `remove`; their public
names are this package's.
"""

from builder.operations.gc.facts import (
    NAMESPACES,
    RELEASE_MARKER,
    BuildFacts,
    CacheFacts,
    CloudImage,
    Survey,
    id_time,
    parse_age,
)
from builder.operations.gc.plan import BuildVerdict, CacheVerdict, GcPlan, plan_gc
from builder.operations.gc.remove import execute
from builder.operations.gc.survey import survey_cloud, survey_local

__all__ = [
    "NAMESPACES", "RELEASE_MARKER", "BuildFacts", "BuildVerdict", "CacheFacts", "CacheVerdict", "CloudImage",
    "GcPlan", "Survey", "execute", "id_time", "parse_age", "plan_gc", "survey_cloud", "survey_local",
]
