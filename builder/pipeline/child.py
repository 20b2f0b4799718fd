"""A bake in a process of its own: how `bake build A B -j N`, `bake nightly` and a farm
worker run one.

The child is `bake build` itself (`python -m builder build`), so it is everything a
bake started alone is: its own interrupt handling, watchdog and journal, the recipe
lock, events on stdout with `--json`. Its BuildOptions reach it as data, JSON on its
stdin (`--options-json -`), checked against OPTIONS_SCHEMA when read; its command line
names only the recipe and how it reports (`Report`), which is no build option.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.errors import BakeError
from builder.pipeline.options import BuildOptions

FROM_STDIN = "-"


@dataclass(frozen=True)
class Report:
    """How a child bake reports: events as JSON lines on stdout (`json`), every command
    logged (`verbose`, a count), or only results and errors (`quiet`)."""

    json: bool = False
    verbose: int = 0
    quiet: bool = False


def command(recipe: str | os.PathLike, report: Report = Report()) -> list[str]:
    """The command line of a child bake of `recipe`: the recipe and `report` only; the
    build options go on the child's stdin (see `start`)."""
    presentation = ["-v"] * report.verbose + (["-q"] if report.quiet else [])
    return [sys.executable, "-m", "builder", *presentation, "build", "--options-json", FROM_STDIN,
            *(["--json"] if report.json else []), "--", str(recipe)]


def start(recipe: str | os.PathLike, options: BuildOptions, report: Report = Report(),
          **popen: Any) -> subprocess.Popen:
    """Start a child bake of `recipe` with `options`, written as JSON on its stdin, which
    is then closed. `popen` are the rest of subprocess.Popen's arguments (stdout, stderr,
    env, errors, ...); stdin is this function's, and the pipes are text."""
    proc = subprocess.Popen(command(recipe, report), stdin=subprocess.PIPE, text=True, **popen)
    assert proc.stdin is not None
    # a child that ended before reading (a usage error) says so by its exit status
    with contextlib.suppress(BrokenPipeError):
        try:
            proc.stdin.write(json.dumps(options.to_json()))
        finally:
            proc.stdin.close()
    return proc


def read_options(source: str) -> BuildOptions:
    """The build options a parent sent: JSON read from stdin (`-`) or from the file
    `source`, checked by `BuildOptions.from_json`. A BakeError says what does not fit.
    After stdin is read, it is /dev/null, as a child bake's stdin was before."""
    where = "stdin" if source == FROM_STDIN else source
    try:
        if source == FROM_STDIN:
            text = sys.stdin.read()
            _stdin_from_devnull()
        else:
            text = Path(source).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BakeError(f"build options from {where}: cannot be read ({e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BakeError(f"build options from {where}: not JSON ({e})") from None
    return BuildOptions.from_json(data)


def _stdin_from_devnull() -> None:
    # what the bake starts inherits stdin: it gets nothing to read, not the parent's pipe
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(devnull, 0)
    finally:
        os.close(devnull)
