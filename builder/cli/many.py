"""The terminal's table of several bakes (`bake build -j N`, `bake nightly`)."""

from __future__ import annotations

from builder.core import exitcodes
from builder.operations.many import Job


def render_summary(jobs: list[Job]) -> str:
    """One line per recipe: name, result, seconds, build folder (and the error, if any)."""
    width = max([len(j.name) for j in jobs] + [6])
    rwidth = max([len(j.result) for j in jobs] + [6])
    lines = [f"{'RECIPE':<{width}}  {'RESULT':<{rwidth}}  {'TIME':>7}  BUILD"]
    for j in jobs:
        lines.append(f"{j.name:<{width}}  {j.result:<{rwidth}}  {j.seconds:>6.0f}s  {j.build_dir or '-'}")
        if j.error and j.status != exitcodes.OK:
            first = j.error.strip().splitlines()[0] if j.error.strip() else ""
            lines.append(f"{'':<{width}}  {first}")
    return "\n".join(lines)
