"""The verification report: `verify.json` in the build directory and a readable table."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .result import FAIL, PASS, SKIP, CheckResult

REPORT = "verify.json"


@dataclass
class Report:
    mode: str                                  # "local" or "cloud"
    results: list[CheckResult] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)   # accelerator, instance type, cloud ids, ...
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)  # evidence files, relative to the build dir
    # set once the verification has begun changing the build folder (its evidence of an
    # earlier run cleared): from then on, an unfinished run still writes what it has
    begun: bool = field(default=False, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def result(self) -> str:
        return "passed" if self.ok else "failed"

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for r in self.results if r.status == s) for s in (PASS, FAIL, SKIP)}

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "mode": self.mode,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 2),
            "counts": self.counts(),
            "info": self.info,
            "files": self.files,
            "checks": [r.as_dict() for r in self.results],
        }

    def write(self, build_dir: Path) -> Path:
        """Write verify.json into `build_dir` and return its path."""
        path = Path(build_dir) / REPORT
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n")
        tmp.replace(path)
        return path

    def summary(self) -> dict[str, Any]:
        """The short form kept in build.json's "verify" section."""
        return {"result": self.result, "mode": self.mode, "seconds": round(self.seconds, 2),
                "counts": self.counts(), "report": REPORT,
                "checks": {r.name: r.status for r in self.results},
                **{k: v for k, v in self.info.items() if k in ("accelerator", "instance_type")}}


def _evidence_line(r: CheckResult, width: int) -> str:
    text = r.summary
    if not text and r.evidence:
        text = ", ".join(f"{k}={v}" for k, v in r.evidence.items() if not isinstance(v, (dict, list)))
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(report: dict[str, Any] | Report, width: int = 110) -> str:
    """The report as a table: check, result, time, evidence; then failures' details."""
    data = report.as_dict() if isinstance(report, Report) else report
    checks = [CheckResult(**c) for c in data["checks"]]
    name_w = max([5] + [len(c.name) for c in checks])
    ev_w = max(30, width - name_w - 20)
    lines = [f"{'check':<{name_w}}  {'result':<6}  {'time':>7}  evidence",
             f"{'-' * name_w}  ------  -------  {'-' * min(ev_w, 40)}"]
    for c in checks:
        lines.append(f"{c.name:<{name_w}}  {c.status.upper():<6}  {c.seconds:>6.1f}s  {_evidence_line(c, ev_w)}")
    counts = data["counts"]
    info = data.get("info", {})
    where = ", ".join(f"{k}: {v}" for k, v in info.items() if k in ("accelerator", "instance_type", "instance_id"))
    lines.append("")
    lines.append(f"verification {data['result'].upper()} ({data['mode']}{', ' + where if where else ''}): "
                 f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped in {data['seconds']:.0f} s")
    for c in checks:
        if c.status == FAIL and (c.evidence.get("console_tail") or c.evidence.get("detail")):
            lines.append("")
            lines.append(f"--- {c.name}: {c.summary}")
            lines.append(str(c.evidence.get("console_tail") or c.evidence.get("detail")).rstrip())
    return "\n".join(lines)
