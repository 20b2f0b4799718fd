"""Counting the progress of long steps from what their commands print.

debootstrap prints `I: Validating NAME VERSION` for every package, then `I: Unpacking
NAME...` and `I: Configuring NAME...`; apt-get says how many packages it will install (`N newly
installed`) before `Unpacking NAME (...)` and `Setting up NAME (...)` lines. Counters
are handed to `sh.run(on_line=...)` and report through `events.progress`.
"""

from __future__ import annotations

import re

from builder.core import events

_APT_PLAN = re.compile(r"^(\d+) upgraded, (\d+) newly installed")
_APT_SETUP = re.compile(r"^Setting up \S+ \(")
# `I: Validating NAME VERSION` comes for every package (fetched or found in the package
# cache), `I: Retrieving NAME VERSION` for those fetched; `I: Unpacking NAME...` and
# `I: Configuring NAME...` per package (and the same words before a phase's own title,
# `I: Unpacking required packages...`, which the name pattern leaves out).
_DEBOOTSTRAP_GET = re.compile(r"^I: (?:Retrieving|Validating) ([a-z0-9][a-z0-9+.-]*) \S+$")
_DEBOOTSTRAP_STEP = re.compile(r"^I: (Unpacking|Configuring) ([a-z0-9][a-z0-9+.-]*(?::[a-z0-9]+)?)\.\.\.$")


class DebootstrapCounter:
    """debootstrap's packages: fetched or validated (the total is not known yet), then
    installed: each unpacked and configured, out of twice the packages fetched."""

    def __init__(self, stage: str = "bootstrap") -> None:
        self.stage = stage
        self.known: set[str] = set()
        self.unpacked: set[str] = set()
        self.configured: set[str] = set()

    def _installed(self) -> tuple[int, int | None]:
        done = len(self.unpacked) + len(self.configured)
        total = max(2 * len(self.known), done) if self.known else None
        return done, total

    def __call__(self, line: str) -> None:
        line = line.rstrip("\n")
        m = _DEBOOTSTRAP_GET.match(line)
        if m:
            if m.group(1) not in self.known:
                self.known.add(m.group(1))
                events.progress(self.stage, "packages fetched", len(self.known), None, "packages")
            return
        m = _DEBOOTSTRAP_STEP.match(line)
        if not m:
            return
        what, name = m.groups()
        (self.unpacked if what == "Unpacking" else self.configured).add(name.split(":")[0])
        done, total = self._installed()
        events.progress(self.stage, "packages installed", done, total, "packages")

    def done(self) -> None:
        done, total = self._installed()
        total = total or done
        events.progress(self.stage, "packages installed", total, total, "packages", final=True)


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
