"""The `bake` command: argument parsing and output only; the engine does the work.

Subcommands of other areas (bundle, publish, verify) are registered by their own
`cli` modules (`register(subparsers)`), so each area keeps its options beside its code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path

from .errors import BakeError
from . import log as steplog

AREA_CLIS = ("builder.bundle.cli", "builder.cloud.cli", "builder.verify.cli")


class _StepPrinter:
    """Renders steps on stderr: one line per step start, its time at the end."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream

    def __call__(self, event: str, rec: steplog.StepRecord) -> None:
        pad = "  " * rec.depth
        if event == "start":
            print(f"{pad}» {rec.name}", file=self.stream, flush=True)
        elif rec.depth <= 1:
            mark = "✓" if rec.ok else "✗"
            print(f"{pad}{mark} {rec.name} ({rec.seconds:.1f} s)", file=self.stream, flush=True)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger("bake")
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not quiet:
        steplog.add_listener(_StepPrinter())


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


# --- core commands --------------------------------------------------------------------

def cmd_validate(args) -> int:
    from .recipe import load_recipe

    for path in args.recipes:
        r = load_recipe(path)
        print(f"{path}: ok ({r.name}, {r.release.distro}/{r.release.suite}, {r.arch}, "
              f"elements: {', '.join(r.element_names) or 'none'})")
    return 0


def cmd_plan(args) -> int:
    from .plan import make_plan
    from .recipe import load_recipe

    plan = make_plan(load_recipe(args.recipe), output_root=Path(args.output))
    if args.json:
        import json
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(plan.render())
    return 0


def cmd_build(args) -> int:
    from .pipeline import bake
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    build = bake(recipe, output_root=Path(args.output), stop_after=args.stop_after,
                 skip=set(args.skip or ()), cloud=args.cloud)
    report = build.dir / "verify.json"
    if report.is_file() and not args.quiet:
        import json
        from .verify import render_table
        print(render_table(json.loads(report.read_text())), file=sys.stderr)
    print(build.dir)
    return 0 if build.data.get("result", "ok") == "ok" else 1


def cmd_schema(args) -> int:
    from .recipe import recipe_schema
    from .schemadoc import markdown

    if args.markdown:
        print(markdown(), end="")
    else:
        import json
        print(json.dumps(recipe_schema(), indent=2, ensure_ascii=False))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bake",
        description="Bake a cloud image from a YAML recipe, publish it, and prove it works.",
        epilog="`bake RECIPE.yml` is short for `bake build RECIPE.yml`.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log every command and its output")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("validate", help="check recipes against the schema (no root, no network)")
    sp.add_argument("recipes", nargs="+", metavar="RECIPE")
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser("plan", help="show the stages, element hooks, packages and cache hits of a recipe")
    sp.add_argument("recipe", metavar="RECIPE")
    sp.add_argument("--output", default=os.environ.get("BAKE_OUTPUT", "output"), help="output root (default: output)")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("schema", help="print the recipe JSON Schema (or, with --markdown, the recipe reference)")
    sp.add_argument("--markdown", action="store_true", help="render the reference as Markdown")
    sp.set_defaults(func=cmd_schema)

    sp = sub.add_parser("build", help="bake a recipe: bootstrap, customize, image, then bundle/publish/verify as configured")
    sp.add_argument("recipe", metavar="RECIPE")
    sp.add_argument("--output", default=os.environ.get("BAKE_OUTPUT", "output"), help="output root (default: output)")
    sp.add_argument("--stop-after", choices=("bootstrap", "customize", "image", "bundle", "publish", "verify"),
                    help="stop after this stage")
    sp.add_argument("--skip", action="append", choices=("bundle", "publish", "verify"),
                    help="skip this stage (repeatable)")
    sp.add_argument("--cloud", action="store_true", help="verify on the cloud instead of locally under QEMU")
    sp.set_defaults(func=cmd_build)

    for mod in AREA_CLIS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        m.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in commands:
        argv.insert(argv.index(first), "build")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return int(args.func(args) or 0)
    except BakeError as e:
        print(f"bake: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bake: interrupted; everything mounted or started was undone", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
