"""Turn YAML and JSON Schema failures into one message a person can act on:
the file, the line, the key path, what was expected and what was found."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from builder.core.errors import BakeError

Path_ = tuple  # a key path: ("elements", 2, "with", "interval")


class RecipeError(BakeError):
    """A recipe (or element definition) that does not validate."""

    def __init__(self, file: str | Path, line: int | None, keypath: str, message: str):
        self.file = str(file)
        self.line = line
        self.keypath = keypath
        self.detail = message
        where = self.file + (f":{line}" if line else "")
        super().__init__(f"{where}: {keypath + ': ' if keypath else ''}{message}")


def format_path(path: Iterable[Any]) -> str:
    """("elements", 2, "with", "interval") -> "elements[2].with.interval"."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _error_line(e: yaml.MarkedYAMLError) -> int | None:
    """The line a person should look at: where the unclosed bracket, quote or key began
    (the context), not where the parser gave up, which may be lines later. A block
    collection's context is only where the enclosing mapping started, often line 1, so
    there the problem's own line is the one."""
    mark = e.problem_mark
    if e.context_mark is not None and not (e.context or "").startswith("while parsing a block"):
        mark = e.context_mark
    mark = mark or e.context_mark
    return mark.line + 1 if mark else None


class Located:
    """A YAML document loaded with the line of every key and item."""

    def __init__(self, text: str, file: str | Path):
        self.file = str(file)
        self.lines: dict[tuple, int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as e:
            line = _error_line(e)
            problem = (e.problem or str(e)).strip()
            if e.context:
                problem = f"{e.context.strip()}, {problem}"
            raise RecipeError(file, line, "", f"not valid YAML: {problem}") from None
        except yaml.YAMLError as e:
            raise RecipeError(file, None, "", f"not valid YAML: {e}") from None
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for k, v in node.value:
                key = k.value
                line = k.start_mark.line + 1
                if isinstance(key, str) and key in first:
                    # YAML loaders keep the last value silently; a recipe must not say two things.
                    raise RecipeError(self.file, line, format_path(path + (key,)),
                                      f"key '{key}' is given twice (first at line {first[key]})")
                if isinstance(key, str):
                    first[key] = line
                self.lines[path + (key,)] = line
                self._walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, path + (i,))

    def line_of(self, path: tuple) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


def _found(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value} (a number)"
    if isinstance(value, str):
        return json.dumps(value) + " (a string)"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "a mapping with keys " + ", ".join(map(str, list(value)[:5]))
    return repr(value)


_TYPE_WORDS = {
    "string": "a string", "integer": "a whole number", "number": "a number", "boolean": "true or false",
    "array": "a list", "object": "a mapping", "null": "null",
}


def _expected_type(t: Any) -> str:
    if isinstance(t, list):
        return " or ".join(_TYPE_WORDS.get(x, str(x)) for x in t)
    return _TYPE_WORDS.get(t, str(t))


def explain(error: jsonschema.ValidationError) -> tuple[tuple, str]:
    """The key path an error is about and a sentence saying what was expected and found."""
    path = tuple(error.absolute_path)
    # jsonschema types these as maybe unset; an error being explained has them all
    v = error.validator
    val: Any = error.validator_value
    inst: Any = error.instance
    schema: Any = error.schema
    if v == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        extra = [k for k in inst if k not in allowed]
        key = extra[0] if extra else "?"
        hint = difflib.get_close_matches(str(key), allowed, n=1)
        msg = f"unknown key '{key}'"
        msg += f" (did you mean '{hint[0]}'?)" if hint else (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        return path + (key,), msg
    if v == "required":
        missing = [k for k in val if k not in inst]
        return path, f"missing required key '{missing[0]}'" if missing else error.message
    if v == "type":
        return path, f"expected {_expected_type(val)}, found {_found(inst)}"
    if v == "enum":
        hint = difflib.get_close_matches(str(inst), [str(x) for x in val], n=1)
        msg = f"expected one of {', '.join(map(str, val))}, found {_found(inst)}"
        return path, msg + (f" (did you mean '{hint[0]}'?)" if hint else "")
    if v == "const":
        return path, f"expected {json.dumps(val)}, found {_found(inst)}"
    if v == "pattern":
        return path, f"expected {schema.get('x-expected') or 'a value matching ' + val}, found {_found(inst)}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "more than",
                "exclusiveMaximum": "less than"}[v]
        return path, f"expected a number {word} {val}, found {_found(inst)}"
    if v == "x-min-size":
        return path, f"expected a size of at least {val}, found {_found(inst)}"
    if v in ("minLength", "maxLength"):
        word = "at least" if v == "minLength" else "at most"
        return path, f"expected a string of {word} {val} character(s), found {_found(inst)}"
    if v in ("minItems", "maxItems"):
        word = "at least" if v == "minItems" else "at most"
        return path, f"expected a list of {word} {val} item(s), found {_found(inst)}"
    if v == "uniqueItems":
        seen, dup = set(), None
        for x in inst:
            k = json.dumps(x, sort_keys=True)
            if k in seen:
                dup = x
                break
            seen.add(k)
        return path, f"expected unique items, found {json.dumps(dup)} twice"
    if v in ("oneOf", "anyOf"):
        # Explain against the alternative whose type fits what was written.
        for sub in sorted(error.context, key=lambda e: len(e.absolute_path), reverse=True):
            if sub.validator != "type" and sub.validator not in ("const",):
                return explain(sub)
        return path, f"expected {schema.get('x-expected') or 'one of the allowed forms'}, found {_found(inst)}"
    return path, error.message


SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([MG])")


def size_mib(text: str) -> float | None:
    """'2G' -> 2048.0, '1536M' -> 1536.0; None for anything else (such as 'auto')."""
    m = SIZE.fullmatch(text)
    if not m:
        return None
    return float(m.group(1)) * (1024 if m.group(2) == "G" else 1)


def _min_size(validator, minimum: str, instance: Any, schema: dict):
    """`x-min-size`: a size string (1536M, 2G) of at least the given size."""
    if isinstance(instance, str):
        have, least = size_mib(instance), size_mib(minimum)
        if have is not None and least is not None and have < least:
            yield jsonschema.ValidationError(f"{instance!r} is smaller than {minimum}")


# Draft 2020-12 plus the one thing it cannot say: that a size written as text is big enough.
Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-min-size": _min_size})


def validate(instance: Any, schema: dict, located: Located, prefix: tuple = ()) -> None:
    """Validate `instance` (found at `prefix` in the located document) or raise one RecipeError."""
    validator = Validator(schema)
    errors = list(validator.iter_errors(instance))
    if not errors:
        return
    # The error a person should fix first: the earliest in the file, then the deepest.
    def order(e: jsonschema.ValidationError):
        p, _ = explain(e)
        return (located.line_of(prefix + p) or 0, -len(p))
    best = min(errors, key=order)
    path, msg = explain(best)
    full = prefix + path
    raise RecipeError(located.file, located.line_of(full), format_path(full), msg)


def fill_defaults(instance: Any, schema: dict) -> Any:
    """Fill missing keys that the schema gives a default for, recursively through objects."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return instance
    props = schema.get("properties", {})
    for key, sub in props.items():
        if key not in instance and "default" in sub:
            instance[key] = json.loads(json.dumps(sub["default"]))
        if key in instance:
            if sub.get("type") == "object":
                fill_defaults(instance[key], sub)
            elif (sub.get("type") == "array" and isinstance(instance[key], list)
                  and sub.get("items", {}).get("type") == "object"):
                for item in instance[key]:
                    fill_defaults(item, sub["items"])
    return instance
