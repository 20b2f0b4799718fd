"""The recipe reference, rendered from the JSON Schema (the single source of keys)."""

from __future__ import annotations

import json
from typing import Any

from builder.recipe.schema import recipe_schema


def _type(s: dict[str, Any]) -> str:
    if "enum" in s:
        return " \\| ".join(f"`{v}`" for v in s["enum"])
    if "const" in s:
        return f"`{s['const']}`"
    if "oneOf" in s:
        return " or ".join(_type(x) for x in s["oneOf"])
    t = s.get("type", "")
    t = " \\| ".join(t) if isinstance(t, list) else t
    if t == "array" and "items" in s:
        return f"list of {_type(s['items'])}"
    if t == "string" and s.get("x-expected"):
        # Every rule a value must meet, in the words its error uses.
        rules = [s["x-expected"]] + [x["x-expected"] for x in s.get("allOf", []) if x.get("x-expected")]
        if s.get("x-min-size"):
            rules.append(f"at least {s['x-min-size']}")
        return f"string ({'; '.join(rules)})"
    return t or "any"


def _rows(props: dict[str, Any], prefix: str, required: set[str]) -> list[str]:
    rows = []
    for key, s in props.items():
        name = f"{prefix}{key}"
        default = f"`{json.dumps(s['default'])}`" if "default" in s else ("required" if key in required else "")
        desc = (s.get("description") or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {_type(s)} | {default} | {desc} |")
        if s.get("type") == "object" and "properties" in s:
            rows += _rows(s["properties"], name + ".", set(s.get("required", [])))
        items = s.get("items") if s.get("type") == "array" else None
        if isinstance(items, dict) and items.get("type") == "object" and "properties" in items:
            rows += _rows(items["properties"], name + "[].", set(items.get("required", [])))
    return rows


def markdown() -> str:
    """The recipe reference as a Markdown document."""
    s = recipe_schema()
    out = ["# Recipe reference", "",
           ("Generated from `builder/schema/recipe.schema.json` by `bake schema --markdown`; "
            "do not edit by hand."), "", s.get("description", ""), "",
           "| key | type | default | meaning |", "|---|---|---|---|"]
    out += _rows(s["properties"], "", set(s.get("required", [])))
    return "\n".join(out) + "\n"
