"""The lock of a build by its name (`<recipe>/<build-id>`), not by its folder.

`bake release` and `bake gc` hold it while one marks a build released and the other
deletes it: a build only the cloud knows (gc run with another output root than the one
that holds the build's folder) has no folder lock to take, and its name is what both
commands share on one box. Across boxes, gc reads the release marker again immediately
before it deletes (see `operations.gc.remove`).
"""

from __future__ import annotations

import hashlib

from builder.core import locks
from builder.core.state import state_dir


def name_lock(recipe: str, build_id: str, *, wait: bool = True):
    """Hold build `recipe/build_id` by its name for the block (a context manager); with
    `wait=False` a holder makes it raise locks.Busy at once."""
    name = hashlib.sha256(f"{recipe}/{build_id}".encode()).hexdigest()[:32]
    return locks.held(state_dir() / "builds" / f"name-{name}.lock", f"build {recipe}/{build_id}", wait=wait)
