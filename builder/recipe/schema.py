"""The recipe's JSON Schema (builder/schema/recipe.schema.json), read once.

Its own module so that everything that reads a rule of it (the recipe loader, the distro
profiles' mirror check, the reference in the docs) depends on it alone, not on each other.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_FILE = Path(__file__).parent.parent / "schema" / "recipe.schema.json"


@lru_cache(maxsize=1)
def recipe_schema() -> dict:
    """The recipe schema as a dict; the same object on every call (do not change it)."""
    return json.loads(SCHEMA_FILE.read_text())
