"""The result of one check: pass, fail or skip (with a reason), its duration and evidence."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

from builder.core import events
from builder.core.errors import BakeError

PASS, FAIL, SKIP = "pass", "fail", "skip"


class CheckFailed(BakeError):
    """Raised inside a check: it failed, for `reason`, with `evidence`."""

    def __init__(self, reason: str, **evidence: Any):
        self.reason = reason
        self.evidence = evidence
        super().__init__(reason)


class CheckSkipped(Exception):
    """Raised inside a check: it cannot run here, for `reason`."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class CheckResult:
    name: str
    status: str = PASS
    seconds: float = 0.0
    summary: str = ""                     # one line: what was shown, or why it failed/skipped
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class checking:  # lower case: it reads as the function it was, `with checking(name, results) as r:`
    """Run the block as check `name` and append its result to `results`.

    The block fills `result.summary`/`result.evidence`; raising CheckFailed or any
    BakeError (a guest that timed out, a QMP error) makes it a failure, CheckSkipped a
    skip. Anything else is a bug and propagates (after the result is recorded).

    A class rather than a @contextmanager generator so that its __exit__ says (-> bool)
    that the block's failures stop here: code after the block runs after them.
    """

    def __init__(self, name: str, results: list[CheckResult]):
        self.result = CheckResult(name)
        self._results = results
        self._start = time.monotonic()

    def __enter__(self) -> CheckResult:
        return self.result

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> bool:
        result = self.result
        try:
            if e is None:
                return False
            if isinstance(e, CheckSkipped):
                result.status, result.summary = SKIP, e.reason
            elif isinstance(e, CheckFailed):
                result.status, result.summary = FAIL, e.reason
                result.evidence.update(e.evidence)
            elif isinstance(e, BakeError):
                result.status = FAIL
                lines = str(e).split("\n--- ", 1)
                result.summary = lines[0].strip()
                if len(lines) > 1:
                    result.evidence.setdefault("detail", "--- " + lines[1])
            else:
                result.status, result.summary = FAIL, f"interrupted: {type(e).__name__}"
                return False
            return True
        finally:
            result.seconds = round(time.monotonic() - self._start, 2)
            self._results.append(result)
            event(result)


def event(result: CheckResult) -> None:
    """Emit `result` as a `check` event (see builder.core.events)."""
    events.emit("check", check=result.name, result={PASS: "passed", FAIL: "failed", SKIP: "skipped"}.get(
        result.status, str(result.status)), summary=result.summary or "", seconds=result.seconds)


def skipped(name: str, reason: str, results: list[CheckResult]) -> CheckResult:
    """Record check `name` as skipped for `reason` without running it."""
    r = CheckResult(name, SKIP, 0.0, reason)
    results.append(r)
    event(r)
    return r
