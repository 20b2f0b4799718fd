"""What the farm plugs into the core, which cannot import it (it is below the farm).

`install()` is called by the CLI at start, so every `bake` process (a worker, the child
bake of a farm job, a bake on its own box) has the same hooks; they do nothing unless the
environment a farm worker sets names the farm: then the stage cache is shared through the
farm's store (`remote.current`) and publishing is fenced by the recipe's lease
(`lease.check_env`).
"""

from __future__ import annotations

from builder.core import cache, fence
from builder.farm import lease, remote


def install() -> None:
    """Make the farm's shared stage cache and its lease fence known to the core; installing
    again changes nothing."""
    cache.set_shared_provider(remote.current)
    fence.register(lease.check_env)
