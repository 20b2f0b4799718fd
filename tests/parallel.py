"""How the suite's tests are shared out among pytest-xdist's workers (see scripts/test):
which tests must run on one worker, and in what order the work goes out.

- Tests that share a module- or class-scoped fixture form one unit of work (an
  `xdist_group`), so that the fixture is made once; a test that shares none is a unit of
  its own, and any worker may take it.
- A test may name its group (`@pytest.mark.xdist_group(NAME)`): the tests of one group run
  on one worker, one after another. `host-etc` holds the tests that change the host's /etc
  or watch it stay unchanged, and every user of the DIB build (whose bake watches it).
- pytest-xdist's own `--dist loadgroup` renames each test after its group, which pytest 9
  no longer lets it do (the group is silently ignored): each worker writes which unit each
  test belongs to into a file of the run, and the controller's scheduler (`UnitScheduling`,
  pytest-xdist's scheduling by scope with these units as the scopes) reads it.
- The costliest units go out first (a rough cost from the tiers' markers), so that the
  last unit to finish is a short one; in the host-etc group the tests that wait for the
  demo build go last, so that its worker bakes the DIB recipe meanwhile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

HOST_ETC = "host-etc"
# Fixtures that bake: a test using one must say so with the `bakes` marker.
BAKING_FIXTURES = ("demo_build", "dib_build")
SHARED_SCOPES = ("module", "class", "package")


def group_of(item: pytest.Item) -> str | None:
    """The xdist_group `item` names, or None."""
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return None
    return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))


def _weight(item: pytest.Item) -> int:
    names = {m.name for m in item.iter_markers()}
    return 100 * ("bakes" in names) + 50 * ("boots" in names) + 20 * ("e2e" in names) + 10 * ("slow" in names) + 1


def _shared_fixtures(item: pytest.Item) -> list[str]:
    """The module- or class-scoped fixtures `item` uses (the same fixture of two files is two)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    out = []
    for name, defs in info.name2fixturedefs.items():
        if defs and defs[-1].scope in SHARED_SCOPES:
            out.append(f"{item.path.name}::{name}" if defs[-1].scope != "package" else name)
    return out


def check_markers(items: list[pytest.Item]) -> None:
    """A test that uses a baking fixture without the `bakes` marker would slip into the
    quick tier; a user of the DIB build outside the host-etc group would bake it again
    beside a bake that watches /etc: refuse the run, naming them."""
    wrong = [item.nodeid for item in items
             if set(BAKING_FIXTURES) & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("bakes")]
    if wrong:
        raise pytest.UsageError("these tests bake (they use the demo or DIB build) but lack the `bakes` marker, "
                                "so the quick tier would run them:\n  " + "\n  ".join(wrong))
    for item in items:
        if "dib_build" in getattr(item, "fixturenames", ()) and group_of(item) not in (None, HOST_ETC):
            raise pytest.UsageError(f"{item.nodeid} uses the DIB build, whose bake watches the host's /etc: "
                                    f"it belongs to the {HOST_ETC} group, not {group_of(item)}")


def share_out(items: list[pytest.Item], units_path: Path | None = None) -> None:
    """Give each test its unit of work and put the units in the order they go out (in
    place); in a worker, write each test's unit to `units_path` for the scheduler."""
    # tests joined by a shared fixture, found with a union-find over tests and fixtures
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for item in items:
        for fixture in _shared_fixtures(item):
            parent[find(item.nodeid)] = find("fixture:" + fixture)
    for item in items:
        if "dib_build" in getattr(item, "fixturenames", ()) and group_of(item) is None:
            item.add_marker(pytest.mark.xdist_group(HOST_ETC))
        if group_of(item) is None and find(item.nodeid) != item.nodeid:
            item.add_marker(pytest.mark.xdist_group(find(item.nodeid).removeprefix("fixture:")))

    def unit(item: pytest.Item) -> str:
        return group_of(item) or item.nodeid

    weights: dict[str, int] = {}
    for item in items:
        weights[unit(item)] = weights.get(unit(item), 0) + _weight(item)

    def waits_for_demo(item: pytest.Item) -> bool:
        return unit(item) == HOST_ETC and "demo_build" in getattr(item, "fixturenames", ())

    # stable: within a unit the tests keep their order, but for host-etc's demo users
    items.sort(key=lambda item: (-weights[unit(item)], unit(item), waits_for_demo(item)))
    if units_path is not None:
        tmp = units_path.with_name(f"{units_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({item.nodeid: unit(item) for item in items}))
        os.replace(tmp, units_path)        # every worker writes the same: the last one stays


class UnitScheduling(LoadScopeScheduling):
    """pytest-xdist's scheduling by scope, with the units `share_out` wrote to `units_path`
    (by the time the controller schedules, every worker has collected) as the scopes."""

    def __init__(self, config: pytest.Config, log=None, *, units_path: Path) -> None:
        super().__init__(config, log)
        self._units_path = units_path
        self._units: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._units is None:
            self._units = json.loads(self._units_path.read_text())
        return self._units.get(nodeid, nodeid)
