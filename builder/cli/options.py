"""Command-line options that several commands share, defined once."""

from __future__ import annotations

import os


def add_output(parser) -> None:
    """`--output DIR`: the output root (default: $BAKE_OUTPUT, else output)."""
    parser.add_argument("--output", default=os.environ.get("BAKE_OUTPUT", "output"),
                        help="output root (default: $BAKE_OUTPUT, else output)")
