"""What a person at a terminal sees: steps as lines, and live progress bars for the long
steps (packages installed, bytes bundled and uploaded, with a rate), drawn with rich.

Used only when stderr (where bake's human output goes) is a terminal that can draw;
otherwise the steps are plain lines, as a log file or CI wants them (`cli`).
"""

from __future__ import annotations

import threading
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from builder.core import events
from builder.core import log as steplog

MiB = 1 << 20


def wanted(stream: IO[str]) -> bool:
    """Whether `stream` is a terminal that live progress can be drawn on."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    console = Console(file=stream)
    return console.is_terminal and not console.is_dumb_terminal


class TerminalDisplay:
    """Step lines printed above live progress bars; one bar per step being counted."""

    def __init__(self, stream: IO[str]):
        self.console = Console(file=stream, highlight=False)
        self.progress = Progress(
            TextColumn("  {task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            console=self.console, transient=True)
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.units: dict[TaskID, str] = {}
        self.live = False
        self._lock = threading.Lock()

    def attach(self) -> None:
        steplog.add_listener(self.on_step)
        events.add_listener(self.on_event)

    def detach(self) -> None:
        steplog.remove_listener(self.on_step)
        events.remove_listener(self.on_event)
        with self._lock:
            self._stop()

    def on_step(self, event: str, rec: steplog.StepRecord) -> None:
        pad = "  " * rec.depth
        if event == "start":
            self.console.print(f"{pad}» {rec.name}", markup=False)
        elif rec.depth <= 1:
            mark = "✓" if rec.ok else "✗"
            self.console.print(f"{pad}{mark} {rec.name} ({rec.seconds:.1f} s)", markup=False)

    def on_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "progress":
            with self._lock:
                self._progress(ev)
        elif kind == "check":
            mark = {"passed": "✓", "failed": "✗"}.get(ev["result"], "–")
            self.console.print(f"    {mark} check {ev['check']}: {ev['summary']} ({ev['seconds']:.0f} s)",
                               markup=False)

    def _progress(self, ev: dict) -> None:
        key = (ev["stage"], ev["step"])
        done, total, unit = ev["done"], ev["total"], ev["unit"]
        if key not in self.tasks:
            if not self.live:
                self.progress.start()
                self.live = True
            task = self.progress.add_task(f"{ev['step']}", total=total, count="", rate="")
            self.tasks[key] = task
            self.units[task] = unit
        task = self.tasks[key]
        self.progress.update(task, completed=done, total=total, count=_count(done, total, unit))
        t = self.progress.tasks[[x.id for x in self.progress.tasks].index(task)]
        if unit == "bytes" and t.speed:
            self.progress.update(task, rate=f"{t.speed / MiB:.1f} MiB/s")
        if total is not None and done >= total:
            self.progress.remove_task(task)
            del self.tasks[key]
            self.console.print(f"    {ev['step']}: {_count(done, total, unit)}", markup=False)
            if not self.tasks:
                self._stop()

    def _stop(self) -> None:
        if self.live:
            self.progress.stop()
            self.live = False
            for task in list(self.tasks.values()):
                self.progress.remove_task(task)
            self.tasks.clear()


def _count(done: int, total: int | None, unit: str) -> str:
    if unit == "bytes":
        return f"{done / MiB:.1f}" + (f"/{total / MiB:.1f}" if total is not None else "") + " MiB"
    return f"{done}" + (f"/{total}" if total is not None else "") + f" {unit}"
