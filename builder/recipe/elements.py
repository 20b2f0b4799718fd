"""Find elements on the search path, resolve their dependencies, order their hooks."""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import BUILTIN_ELEMENTS
from builder.recipe.distro import DEBIAN_ALIASES, distro_of_suite, suite_at_least
from builder.core.errors import BakeError
from builder.recipe.schemaerrors import Located, RecipeError, validate

CHROOT_PHASES = ("pre-install.d", "install.d", "post-install.d", "finalise.d")
OUTSIDE_PHASES = ("root.d", "extra-data.d", "cleanup.d")
PHASES = ("root.d", "extra-data.d", "pre-install.d", "install.d", "post-install.d", "finalise.d", "cleanup.d")

# An element.yaml is itself validated, so a broken element is reported like a broken recipe.
ELEMENT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["description"],
    "properties": {
        "description": {"type": "string", "minLength": 1},
        "parameters": {"type": "object"},
    },
}
PACKAGE_RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": {
        "oneOf": [
            {"type": "null"},
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "distro": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                    "suite": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                    # the first / the last release of each named distribution it holds for
                    "since": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                    "until": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                    "init": {"enum": ["systemd", "upstart"]},
                },
            },
        ]
    },
}


def search_path() -> list[Path]:
    """BAKE_ELEMENTS_PATH's folders (first), then the built-in elements/."""
    extra = [Path(p) for p in os.environ.get("BAKE_ELEMENTS_PATH", "").split(":") if p]
    return extra + [BUILTIN_ELEMENTS]


@dataclass
class Hook:
    phase: str
    name: str
    element: str
    path: Path


@dataclass
class Element:
    name: str
    path: Path
    description: str
    schema: dict[str, Any]
    deps: list[str]
    packages: dict[str, dict | None]
    hooks: dict[str, list[Hook]] = field(default_factory=dict)

    @property
    def static(self) -> Path | None:
        s = self.path / "static"
        return s if s.is_dir() else None

    def hooks_digest(self, phases: tuple[str, ...]) -> str:
        """SHA-256 over the names, modes and contents of this element's hooks in `phases`."""
        h = hashlib.sha256()
        for ph in phases:
            for hk in self.hooks.get(ph, []):
                h.update(f"{ph}/{hk.name}\0{oct(hk.path.stat().st_mode & 0o7777)}\0".encode())
                h.update(hk.path.read_bytes())
        return h.hexdigest()


def _load_yaml(file: Path) -> tuple[Any, Located]:
    loc = Located(file.read_text(), file)
    return loc.data, loc


def load_element(path: Path) -> Element:
    """Read one element folder; a RecipeError names the file that is wrong."""
    name = path.name
    meta_file = path / "element.yaml"
    if not meta_file.is_file():
        raise RecipeError(meta_file, None, "", f"element '{name}' has no element.yaml")
    meta, loc = _load_yaml(meta_file)
    validate(meta, ELEMENT_SCHEMA, loc)
    schema = meta.get("parameters") or {"type": "object", "additionalProperties": False, "properties": {}}
    deps: list[str] = []
    dep_file = path / "element-deps"
    if dep_file.is_file():
        for line in dep_file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                deps.append(line)
    packages: dict[str, dict | None] = {}
    pkg_file = path / "package-installs.yaml"
    if pkg_file.is_file():
        data, ploc = _load_yaml(pkg_file)
        data = data or {}
        validate(data, PACKAGE_RULE_SCHEMA, ploc)
        _check_rule_suites(data, pkg_file, ploc)
        packages = data
    hooks: dict[str, list[Hook]] = {}
    for phase in PHASES:
        d = path / phase
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.name.startswith(".") or f.name.endswith((".md", "~")):
                continue
            if not os.access(f, os.X_OK):
                raise BakeError(f"{f}: hook is not executable (chmod +x it)")
            hooks.setdefault(phase, []).append(Hook(phase, f.name, name, f))
    return Element(name, path, meta["description"], schema, deps, packages, hooks)


def available() -> dict[str, Path]:
    """Every element name on the search path and the folder that provides it."""
    found: dict[str, Path] = {}
    for d in search_path():
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_dir() and (p / "element.yaml").is_file():
                    found.setdefault(p.name, p)
    return found


def find(name: str, known: dict[str, Path] | None = None) -> Path | None:
    known = available() if known is None else known
    return known.get(name)


def unknown_element_message(name: str, known: dict[str, Path]) -> str:
    hint = difflib.get_close_matches(name, list(known), n=1)
    msg = f"unknown element '{name}'"
    if hint:
        return msg + f" (did you mean '{hint[0]}'?)"
    return msg + " (searched: " + ", ".join(str(p) for p in search_path()) + ")"


def resolve(requested: list[str]) -> list[Element]:
    """Load `requested` and everything they depend on, dependencies first.

    A missing dependency or a cycle raises a BakeError that shows the chain.
    """
    known = available()
    loaded: dict[str, Element] = {}
    order: list[Element] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = chain[chain.index(name):] + [name]
            raise BakeError("element dependency cycle: " + " -> ".join(cycle))
        path = known.get(name)
        if path is None:
            via = f" (needed by '{chain[-1]}')" if chain else ""
            raise BakeError(unknown_element_message(name, known) + via)
        state[name] = "active"
        el = loaded.get(name) or load_element(path)
        loaded[name] = el
        for dep in el.deps:
            visit(dep, chain + [name])
        state[name] = "done"
        order.append(el)

    for name in requested:
        visit(name, [])
    return order


def ordered_hooks(elements: list[Element], phase: str) -> list[Hook]:
    """The hooks of `phase` across all elements, in name order (ties by element name)."""
    hooks = [h for el in elements for h in el.hooks.get(phase, [])]
    return sorted(hooks, key=lambda h: (h.name, h.element))


def env_name(element: str, param: str) -> str:
    """sync-agent + label -> SYNC_AGENT_LABEL."""
    def up(s: str) -> str:
        return "".join(c if c.isalnum() else "_" for c in s).upper()
    return f"{up(element)}_{up(param)}"


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return "\n".join(env_value(v) for v in value)
    if value is None:
        return ""
    return str(value)


def parameter_env(element: str, params: dict[str, Any]) -> dict[str, str]:
    """An element's parameters as the environment variables its hooks read."""
    return {env_name(element, k): env_value(v) for k, v in params.items()}


def _names(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _check_rule_suites(rules: dict, file: Path, loc) -> None:
    """Every suite a rule names is one bake knows, and `since`/`until` name at most one
    suite of each distribution (a RecipeError at the rule's line otherwise)."""
    for pkg, rule in rules.items():
        for key in ("suite", "since", "until"):
            seen: dict[str, str] = {}
            for name in _names((rule or {}).get(key)):
                d = distro_of_suite(name)
                where = (pkg, key)
                if d is None:
                    raise RecipeError(file, loc.line_of(where), f"{pkg}.{key}", f"unknown suite {name!r}")
                if key != "suite" and name in DEBIAN_ALIASES:
                    raise RecipeError(file, loc.line_of(where), f"{pkg}.{key}",
                                      f"{name!r} moves from release to release; name a release's code name")
                if key != "suite" and d in seen:
                    raise RecipeError(file, loc.line_of(where), f"{pkg}.{key}",
                                      f"two {d} suites ({seen[d]}, {name}): name one release per distribution")
                seen[d] = name


def package_applies(rule: dict | None, *, distro: str, suite: str, init: str) -> bool:
    """Whether a package-installs.yaml rule holds for this target: every key given
    holds (`distro`, `suite`, `init`: one of the values; `since`/`until`: the target's
    suite is that release of its distribution or a later/an earlier one, and a rule
    naming no release of the target's distribution there does not hold)."""
    if not rule:
        return True
    for key, actual in (("distro", distro), ("suite", suite), ("init", init)):
        want = rule.get(key)
        if want is None:
            continue
        if actual not in _names(want):
            return False
    for key in ("since", "until"):
        if rule.get(key) is None:
            continue
        bound = next((n for n in _names(rule[key]) if distro_of_suite(n) == distro), None)
        if bound is None:
            return False
        if key == "since" and not suite_at_least(distro, suite, bound):
            return False
        if key == "until" and suite != bound and suite_at_least(distro, suite, bound):
            return False
    return True
