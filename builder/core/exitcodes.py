"""bake's exit statuses, one table for every command (the README shows it).

A program running bake (a nightly job, a release pipeline) tells from the status alone
whether to retry later (busy), to fix the recipe, or to look at a failed stage.
"""

from __future__ import annotations

from typing import Any, Mapping

OK = 0
FAILED = 1              # a build stage failed, or another error (the message says which)
USAGE = 2               # the command line is wrong
RECIPE_INVALID = 3      # a recipe does not validate; nothing was made
PUBLISH_FAILED = 4      # the image was made but publishing it failed
VERIFY_FAILED = 5       # the image was made (and published) but its verification failed
BUSY = 6                # --no-wait: the recipe (or build) is in use by another bake
SOME_FAILED = 7         # several recipes: at least one did not succeed (the summary says which)
COULD_NOT_RUN = 8       # bake nightly: bake itself could not run (no recipes, output not writable)
INTERRUPTED = 130       # SIGINT or SIGTERM; everything started was undone

TABLE = (
    (OK, "done"),
    (FAILED, "a build stage failed, or another error"),
    (USAGE, "the command line is wrong"),
    (RECIPE_INVALID, "a recipe is invalid; nothing was made"),
    (PUBLISH_FAILED, "publishing failed (the image itself was made)"),
    (VERIFY_FAILED, "verification failed"),
    (BUSY, "with --no-wait: the recipe or build is in use by another bake"),
    (SOME_FAILED, "several recipes: at least one did not succeed"),
    (COULD_NOT_RUN, "bake nightly: nothing could be baked (no recipes, output not writable)"),
    (INTERRUPTED, "interrupted by SIGINT or SIGTERM; everything started was undone"),
)


def for_build(data: Mapping[str, Any]) -> int:
    """The status of a finished bake from its record."""
    if data.get("result", "ok") == "ok":
        return OK
    stage = data.get("failed_stage")
    if data.get("error") == "interrupted":
        return INTERRUPTED
    return {"publish": PUBLISH_FAILED, "verify": VERIFY_FAILED}.get(str(stage), FAILED)
