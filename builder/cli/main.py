"""The `bake` command: argument parsing and output only; the engine does the work.

Subcommands of other areas (bundle, publish, verify) are registered by their own
`cli` modules (`register(subparsers)`), so each area keeps its options beside its code.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import importlib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

from builder.cli import display
from builder.cli.many import render_summary
from builder.cli.options import add_output
from builder.core.errors import BakeError
from builder.core.locks import Busy
from builder.recipe.recipe import load_recipe
from builder.recipe.schema import recipe_schema
from builder.recipe.schemadoc import markdown
from builder.recipe.schemaerrors import RecipeError
from builder.pipeline import child
from builder.pipeline.options import SKIPPABLE, STAGE_NAMES, BuildOptions
from builder.core import events, exitcodes, interrupts, lifetime, stale
from builder.core import log as steplog
from builder.farm import hooks as farm_hooks
from builder.operations.many import bake_many

AREA_CLIS = ("builder.cli.bundle", "builder.cli.cloud", "builder.cli.verify", "builder.cli.records",
             "builder.cli.release", "builder.cli.gc", "builder.cli.nightly", "builder.cli.farm")
# Commands that mount, boot or write builds: before them, what killed bakes left is undone.
CLEANS_FIRST = ("build", "bundle", "publish", "unpublish", "verify")


class _StepPrinter:
    """Renders steps on stderr: one line per step start, its time at the end."""

    def __init__(self, stream=None):
        self.stream = stream   # None: sys.stderr as it is when a step is printed

    def __call__(self, event: str, rec: steplog.StepRecord) -> None:
        pad = "  " * rec.depth
        stream = self.stream or sys.stderr
        if event == "start":
            print(f"{pad}» {rec.name}", file=stream, flush=True)
        elif rec.depth <= 1:
            mark = "✓" if rec.ok else "✗"
            print(f"{pad}{mark} {rec.name} ({rec.seconds:.1f} s)", file=stream, flush=True)


_printer: _StepPrinter | None = None


def _setup_logging(verbose: int, quiet: bool) -> None:
    """Route bake's log and its steps to stderr. Called once per `main()`: a program that
    calls main() again (the farm's worker, a test) gets one printer, not one per call."""
    global _printer
    if _printer is not None:
        steplog.remove_listener(_printer)
        _printer = None
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger("bake")
    root.handlers[:] = [handler]
    root.setLevel(level)
    if quiet:
        return
    if display.wanted(sys.stderr):
        # live progress bars on a terminal; the steps are printed above them
        term = display.TerminalDisplay(sys.stderr)
        term.attach()
        handler.setStream(_ConsoleStream(term.console))
        atexit.register(term.detach)
    else:
        _printer = _StepPrinter()
        steplog.add_listener(_printer)


class _ConsoleStream:
    """A stream for logging that prints through the terminal display's console, so that
    a message does not tear a progress bar."""

    def __init__(self, console):
        self.console = console

    def write(self, text: str) -> None:
        text = text.rstrip("\n")
        if text:
            self.console.print(text, markup=False, highlight=False)

    def flush(self) -> None:
        pass


# --- core commands --------------------------------------------------------------------

def cmd_validate(args) -> int:
    failed = 0
    for path in args.recipes:
        try:
            r = load_recipe(path)
        except BakeError as e:
            # every file is checked: one bad recipe must not hide what is wrong with the next
            failed += 1
            message = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            print(f"bake: error: {message}", file=sys.stderr, flush=True)
            continue
        print(f"{path}: ok ({r.name}, {r.release.distro}/{r.release.suite}, {r.arch}, "
              f"elements: {', '.join(r.element_names) or 'none'})", flush=True)
    return exitcodes.RECIPE_INVALID if failed else exitcodes.OK


def cmd_plan(args) -> int:
    from builder.pipeline.table import plan_build  # noqa: PLC0415 (boto3: the table names the publish stage)
    plan = plan_build(load_recipe(args.recipe), output_root=Path(args.output))
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(plan.render())
    return 0


def cmd_build(args) -> int:
    if args.options_json is not None:
        options = _options_sent(args)
    elif len(args.recipes) > 1:
        return _build_many(args)
    else:
        options = _options_of(args)
    # the pipeline reaches the cloud's modules, and so boto3 (a second to load): only a
    # build pays for it, not `bake validate` or `bake --help`
    from builder.pipeline.bake import bake  # noqa: PLC0415 (boto3, as said above)

    recipe = load_recipe(args.recipes[0])
    events.set_build(None, recipe.name)
    build = bake(recipe, options)
    report = build.dir / "verify.json"
    if report.is_file() and not args.quiet:
        from builder.verify import render_table  # noqa: PLC0415 (boto3: loaded with the pipeline above)
        print(render_table(json.loads(report.read_text())), file=sys.stderr)
    if not args.json:
        print(build.dir)     # with --json, the result event names it
    return exitcodes.for_build(build.data)


def _options_of(args) -> BuildOptions:
    """The build options the command line's flags ask for."""
    return BuildOptions(output=args.output, stop_after=args.stop_after, skip=tuple(args.skip or ()),
                        cloud=args.cloud, wait=not args.no_wait, build_id=args.build_id)


def _options_sent(args) -> BuildOptions:
    """The build options of a child bake (`builder.pipeline.child`), sent as JSON: they are
    all there, so a flag that is a build option beside them is a mistake, refused."""
    flags = (("--stop-after", args.stop_after, None), ("--skip", args.skip, None), ("--cloud", args.cloud, False),
             ("--no-wait", args.no_wait, False), ("--build-id", args.build_id, None), ("-j", args.jobs, 1))
    given = [flag for flag, value, default in flags if value != default]
    if len(args.recipes) > 1:
        given.append("several recipes")
    if given:
        raise BakeError(f"--options-json carries every build option of one recipe's bake; "
                        f"not with {', '.join(given)}")
    return child.read_options(args.options_json)


def _build_many(args) -> int:
    report = child.Report(json=args.json, verbose=args.verbose, quiet=args.quiet)
    status, jobs = bake_many(args.recipes, _options_of(args), args.jobs, report=report)
    if args.json:
        events.set_build(None, None)
        events.emit("summary", exit_status=status, recipes=[j.as_dict() for j in jobs])
    else:
        print(render_summary(jobs), flush=True)
    return status


def cmd_doctor(args) -> int:
    """Undo what killed bakes left (as every bake does before it starts) and say what
    was found; list the bakes running now."""
    found = stale.clean_stale()
    for s in found:
        print(f"{s.describe()} was killed and had left:")
        for line in s.found:
            print(f"  {line}")
        for line in s.failed:
            print(f"  could not undo: {line}")
    if not found:
        print("nothing left behind by a killed bake")
    for h in lifetime.running():
        print(f"running now: pid {h.get('pid')} (`{h.get('command', '?')}`, started {h.get('started', '?')})")
    return 1 if any(s.failed for s in found) else 0


def cmd_schema(args) -> int:
    if args.markdown:
        print(markdown(), end="")
    else:
        print(json.dumps(recipe_schema(), indent=2, ensure_ascii=False))
    return 0


def _build_id_arg(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
        raise argparse.ArgumentTypeError(f"{value!r}: a build id is letters, digits, '.', '_' and '-'")
    return value


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bake",
        description="Bake a cloud image from a YAML recipe, publish it, and prove it works.",
        epilog="`bake [build options] RECIPE.yml` is short for `bake build [build options] RECIPE.yml`.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log every command and its output")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("validate", help="check recipes against the schema (no root, no network)")
    sp.add_argument("recipes", nargs="+", metavar="RECIPE")
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser("plan", help="show the stages, element hooks, packages and cache hits of a recipe")
    sp.add_argument("recipe", metavar="RECIPE")
    add_output(sp)
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("schema", help="print the recipe JSON Schema (or, with --markdown, the recipe reference)")
    sp.add_argument("--markdown", action="store_true", help="render the reference as Markdown")
    sp.set_defaults(func=cmd_schema)

    sp = sub.add_parser("build",
                        help="bake recipes: bootstrap, customize, image, then bundle/publish/verify as configured",
                        epilog="Exit statuses: " + "; ".join(f"{n} {text}" for n, text in exitcodes.TABLE) + ".")
    sp.add_argument("recipes", nargs="+", metavar="RECIPE")
    add_output(sp)
    sp.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                    help="with several recipes: bake N at a time (default 1); each in a process of its own")
    sp.add_argument("--no-wait", action="store_true",
                    help=f"when another bake holds the recipe, exit at once with status {exitcodes.BUSY} "
                         "(default: wait for it)")
    sp.add_argument("--stop-after", choices=STAGE_NAMES, help="stop after this stage")
    sp.add_argument("--skip", action="append", choices=SKIPPABLE, help="skip this stage (repeatable)")
    sp.add_argument("--cloud", action="store_true", help="verify on the cloud instead of locally under QEMU")
    sp.add_argument("--build-id", metavar="ID", type=_build_id_arg,
                    help="the build folder's name (default: the UTC time; a farm worker names its builds)")
    sp.add_argument("--json", action="store_true",
                    help="print events (stages, progress, checks, the result) as JSON lines on stdout, and nothing "
                         "else there; schema: builder/schema/events.schema.json")
    # how -j, nightly and a farm worker hand a bake its options: JSON (`-`: on stdin),
    # not flags rendered to be parsed again (builder/pipeline/child.py)
    sp.add_argument("--options-json", metavar="FILE", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_build)

    sp = sub.add_parser("doctor", help="undo what killed bakes left behind (mounts, loop devices, processes, "
                                       "work trees, overlays) and say what was found",
                        description="Every bake does this before it starts; doctor does it on demand. Exits 1 "
                                    "when something could not be undone.")
    sp.set_defaults(func=cmd_doctor)

    for mod in AREA_CLIS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        m.register(sub)
    return p


# Options of the top-level parser; everything else in `bake [options] RECIPE.yml` is the
# build command's.
GLOBAL_OPTIONS = ("-h", "--help", "-v", "--verbose", "-q", "--quiet")
RECIPE_SUFFIXES = (".yml", ".yaml")

# What a shell reports for a process killed by SIGPIPE (128 + 13); `| head` ends so.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _is_global_option(arg: str) -> bool:
    return arg in GLOBAL_OPTIONS or (arg.startswith("-") and not arg.startswith("--")
                                     and len(arg) > 1 and set(arg[1:]) <= {"v", "q"})


def _looks_like_recipe(arg: str) -> bool:
    return arg.endswith(RECIPE_SUFFIXES) or os.path.isfile(arg) or os.sep in arg


def _with_build_command(argv: list[str], commands: dict[str, argparse.ArgumentParser],
                        parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with the `build` command put in where the `bake [options] RECIPE.yml`
    shorthand left it out; `argv` itself when a command is named. A bare word that is no
    command is a mistyped command, reported with the commands there are."""
    first = next((i for i, a in enumerate(argv) if not _is_global_option(a)), None)
    if first is None or argv[first] in commands:
        return argv
    word = argv[first]
    if not word.startswith("-") and not _looks_like_recipe(word):
        close = difflib.get_close_matches(word, list(commands), n=1)
        parser.error(f"unknown command {word!r}" + (f" (did you mean {close[0]}?)" if close else "")
                     + f"; the commands are {', '.join(commands)}; `bake RECIPE.yml` builds a recipe")
    takes_value = _value_options(commands["build"])
    leading: list[str] = []  # the top-level options, taken wherever they stand
    rest: list[str] = []
    recipe = None
    expecting_value = False
    for a in argv:
        if expecting_value:
            rest.append(a)
            expecting_value = False
        elif _is_global_option(a) and a not in ("-h", "--help"):
            leading.append(a)
        else:
            rest.append(a)
            expecting_value = takes_value(a)
            if recipe is None and not a.startswith("-"):
                recipe = a
    if recipe is None or not _looks_like_recipe(recipe):
        return argv  # options and no recipe: argparse says what is wrong
    return leading + ["build"] + rest


def _value_options(command: argparse.ArgumentParser):
    """A test: does this argument name one of `command`'s options that takes a value
    as the next argument (abbreviated long options too, as argparse accepts them)?"""
    with_value = {o for a in command._actions if a.option_strings and a.nargs != 0 for o in a.option_strings}
    longs = [o for a in command._actions for o in a.option_strings if o.startswith("--")]

    def takes_value(arg: str) -> bool:
        if arg in with_value:
            return True
        if arg.startswith("--") and "=" not in arg:
            matches = [o for o in longs if o.startswith(arg)]
            return len(matches) == 1 and matches[0] in with_value
        return False

    return takes_value


def _quiet_broken_pipe() -> int:
    # The reader of our output went away (`bake schema | head`): not an error of ours.
    # Whichever stream it was, point both at /dev/null so that the interpreter's last
    # flush cannot fail again and print what this is here to avoid.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Run the `bake` command line `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _run(argv: list[str]) -> int:
    parser = _build_parser()
    # argparse keeps the subcommands' parsers on a private action; its type says no more than Iterable
    commands: dict[str, argparse.ArgumentParser] = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr, assignment]
    args = parser.parse_args(_with_build_command(argv, commands, parser))
    if not getattr(args, "func", None):
        parser.print_help()
        return exitcodes.USAGE
    _setup_logging(args.verbose, args.quiet)
    interrupts.install()
    farm_hooks.install()    # the shared cache and the fence of a farm job's bake (from its environment)
    if getattr(args, "json", False) and args.command == "build":
        events.enable(sys.stdout)
    try:
        if args.command in CLEANS_FIRST:
            stale.report_stale(stale.clean_stale())
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, while it can still be handled
        return status
    except Busy as e:
        return _failed(f"bake: busy: {e}", exitcodes.BUSY)
    except RecipeError as e:
        return _failed(f"bake: error: {e}", exitcodes.RECIPE_INVALID)
    except BakeError as e:
        return _failed(f"bake: error: {e}", exitcodes.FAILED)
    except KeyboardInterrupt:
        return _failed("bake: interrupted; everything mounted or started was undone", exitcodes.INTERRUPTED)


def _failed(message: str, status: int) -> int:
    print(message, file=sys.stderr)
    events.emit("error", message=message.split(": ", 1)[1], exit_status=status)
    return status


if __name__ == "__main__":
    sys.exit(main())
