"""The last check before a build writes where others read.

Publishing calls `check(what)` before it uploads and again before it registers. The core
knows no farm: whoever does (the farm, installed by the CLI at start, see
`builder.farm.hooks`) registers a check here, e.g. that a bake run by a farm worker still
holds its recipe's lease. With no check registered, or none that objects (a bake on one
box, guarded by its flock), it passes.
"""

from __future__ import annotations

from typing import Callable

Check = Callable[[str], None]

_checks: list[Check] = []


def register(check: Check) -> None:
    """Have `check(what)` run by every `check`; it raises a BakeError to stop the write.
    Registering the same check again changes nothing."""
    if check not in _checks:
        _checks.append(check)


def check(what: str) -> None:
    """Raise (a BakeError) when a registered check says this bake may no longer `what`."""
    for c in list(_checks):
        c(what)
