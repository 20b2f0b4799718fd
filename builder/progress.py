"""Counting the progress of long steps from what their commands print.

debootstrap prints `I: Retrieving NAME`, then `I: Unpacking NAME` and `I: Configuring
NAME` for every package; apt-get says how many packages it will install (`N newly
installed`) before `Unpacking NAME (...)` and `Setting up NAME (...)` lines. Counters
are handed to `sh.run(on_line=...)` and report through `events.progress`.
"""

from __future__ import annotations

import re

from . import events

_APT_PLAN = re.compile(r"^(\d+) upgraded, (\d+) newly installed")
_APT_SETUP = re.compile(r"^Setting up \S+ \(")
_DEBOOTSTRAP = re.compile(r"^I: (Retrieving|Unpacking|Configuring) (\S+)")


class DebootstrapCounter:
    """debootstrap's packages: retrieved (the total is not known yet), then installed
    (unpacked and configured) out of those retrieved."""

    def __init__(self, stage: str = "bootstrap") -> None:
        self.stage = stage
        self.retrieved: set[str] = set()
        self.unpacked = 0
        self.configured = 0

    def __call__(self, line: str) -> None:
        m = _DEBOOTSTRAP.match(line)
        if not m:
            return
        what, name = m.groups()
        if what == "Retrieving":
            if name in ("Release", "Packages", "InRelease"):
                return
            self.retrieved.add(name)
            events.progress(self.stage, "packages retrieved", len(self.retrieved), None, "packages")
        else:
            if what == "Unpacking":
                self.unpacked += 1
            else:
                self.configured += 1
            total = 2 * len(self.retrieved) if self.retrieved else None
            events.progress(self.stage, "packages installed", self.unpacked + self.configured, total, "packages")

    def done(self) -> None:
        n = len(self.retrieved)
        events.progress(self.stage, "packages installed", 2 * n, 2 * n, "packages", final=True)


class AptCounter:
    """apt-get install: packages set up, out of those apt said it would install."""

    def __init__(self, stage: str = "customize", step: str = "packages installed") -> None:
        self.stage, self.step = stage, step
        self.total: int | None = None
        self.done_count = 0

    def __call__(self, line: str) -> None:
        m = _APT_PLAN.match(line)
        if m:
            self.total = int(m.group(1)) + int(m.group(2))
            events.progress(self.stage, self.step, 0, self.total, "packages")
        elif _APT_SETUP.match(line):
            self.done_count += 1
            events.progress(self.stage, self.step, self.done_count, self.total, "packages")

    def done(self) -> None:
        if self.total is not None:
            events.progress(self.stage, self.step, self.total, self.total, "packages", final=True)
