"""Where bake keeps what outlives one process: the sessions' journals, the locks of
recipes and build folders, the simplestreams lock."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """BAKE_STATE_DIR, else /var/lib/bake for root, else ~/.local/state/bake.

    On disk, not in /run: a work tree or an overlay outlives a reboot, and the journal
    must too (process groups in it are only trusted on the boot that wrote them)."""
    env = os.environ.get("BAKE_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/bake")
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "bake"
