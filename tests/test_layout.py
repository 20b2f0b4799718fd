"""The shape of `builder/`, read from its source (no import, no root, a second or two):
no import circle among its modules, no module importing a layer above its own, no module
over 500 lines, and bake's own modules imported at the top of a module, not inside a
function (unless what is imported loads an optional dependency a command may not need).

Every import counts, inside functions too. A package's `__init__` naming its own
submodules is no circle: it is how a package says what it offers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "builder"

# Top folders of builder/ and their layers: a module imports only from its own layer or
# below (docs/ and ../shared/ARCHITECTURE.md draw the same picture).
LAYERS = {
    "core": 1,
    "recipe": 2, "base": 2, "customize": 2, "image": 2, "bundle": 2, "cloud": 2, "vm": 2, "verify": 2,
    "elements": 2,
    "pipeline": 3,
    "operations": 4, "farm": 4,
    "cli": 5,
}
# Modules outside the layers: the package itself (which only names where its data is)
# and `python -m builder`, which is the CLI's door.
OUTSIDE = ("builder", "builder.__main__")

MAX_LINES = 500

# Libraries a command may not need, which bake imports only where it uses them: a module
# that loads one at its top may be imported inside the function that needs it.
OPTIONAL = ("boto3", "botocore", "guestfs", "rq", "redis", "diskimage_builder")

# Function-level imports of bake's own modules that stay, each with its reason
# ((importer, imported): why). Keep it short; better, keep it empty.
ALLOWED_LATE: dict[tuple[str, str], str] = {}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    lines: int
    imports: set[str] = field(default_factory=set)          # bake's own modules, anywhere in it
    top: set[str] = field(default_factory=set)              # bake's own, run when it is imported (its
                                                            # own submodules too, for a package)
    late: set[str] = field(default_factory=set)             # bake's own, inside a function
    optional_at_top: bool = False                           # loads an OPTIONAL library at its top


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool) -> list[str]:
    """What an import statement names: the module, and each `from` name (a submodule or not)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [mod] + [f"{mod}.{a.name}" for a in node.names]


class _Imports(ast.NodeVisitor):
    """Every import of a module, told apart by whether it runs when the module is imported."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self.depth = 0

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self.depth > 0))


@cache
def modules() -> dict[str, Module]:
    """builder's modules by dotted name, with what each imports."""
    found: dict[str, Module] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        found[_module_name(path)] = Module(_module_name(path), path, path.name == "__init__.py",
                                           len(text.splitlines()))
    for m in found.values():
        visitor = _Imports()
        visitor.visit(ast.parse(m.path.read_text(), str(m.path)))
        for node, in_function in visitor.found:
            names = _targets(node, m.name, m.is_package)
            if not in_function and any(n.split(".")[0] in OPTIONAL for n in names):
                m.optional_at_top = True
            own = {n for n in names if n in found and n != m.name}
            # what runs on import counts a package's own submodules; circles do not
            (m.late if in_function else m.top).update(own)
            if m.is_package:
                own = {n for n in own if not n.startswith(m.name + ".")}
            m.imports |= own
    return found


def _packages_of(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def loads_optional(name: str) -> bool:
    """Whether importing module `name` loads an OPTIONAL library (through what it and its
    packages import at their tops)."""
    mods = modules()
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        if m in seen or m not in mods:
            continue
        seen.add(m)
        if mods[m].optional_at_top:
            return True
        todo += [*mods[m].top, *_packages_of(m)]
    return False


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def circles() -> list[list[str]]:
    """The import circles (strongly connected groups of more than one module), each sorted."""
    mods = modules()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(mods[v].imports):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    return found


def test_the_modules_are_found():
    mods = modules()
    assert len(mods) > 50 and "builder.core.sh" in mods and "builder.cli.main" in mods


def test_no_import_circle():
    mods = modules()
    described = []
    for group in circles():
        edges = [f"{a} -> {b}" for a in group for b in sorted(mods[a].imports) if b in group]
        described.append("circle of " + ", ".join(group) + ":\n    " + "\n    ".join(edges))
    assert not described, "\n".join(described)


def test_every_module_is_in_a_layer():
    loose = [n for n in modules() if n not in OUTSIDE and layer_of(n) is None]
    assert not loose, f"modules in no layer (add their folder to LAYERS, or move them): {loose}"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for m in modules().values():
        mine = layer_of(m.name)
        if mine is None:
            continue
        for target in sorted(m.imports):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{m.name} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_no_module_is_over_500_lines():
    long = [f"{m.path.relative_to(REPO)}: {m.lines} lines" for m in modules().values() if m.lines > MAX_LINES]
    assert not long, "\n".join(sorted(long))


def test_bakes_own_modules_are_imported_at_the_top():
    late = []
    for m in modules().values():
        for target in sorted(m.late):
            if loads_optional(target) or (m.name, target) in ALLOWED_LATE:
                continue
            # `from builder.x import y` names both builder.x and (maybe) builder.x.y: say the module
            if any(t.startswith(target + ".") for t in m.late):
                continue
            late.append(f"{m.name}: {target}")
    assert not late, "imported inside a function (move to the top, or say why in ALLOWED_LATE):\n" + "\n".join(late)


def test_the_allowed_late_imports_are_still_there():
    mods = modules()
    gone = [pair for pair in ALLOWED_LATE if pair[0] not in mods or pair[1] not in mods[pair[0]].late]
    assert not gone, f"no longer imported late, take them off ALLOWED_LATE: {gone}"
